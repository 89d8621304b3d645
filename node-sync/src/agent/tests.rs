//! The agent's task state driven directly, without etcd or the task: watcher events in, map
//! writes and published snapshots out.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use mesh_model::keys::{MeshKey, ServiceName};
use mesh_model::values::{
    Affinity, Conditions, Endpoint, EndpointChunk, EndpointPort, HealthCheck, MeshValue, Protocol,
    ServicePort, ServiceSpec,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use tokio::sync::watch;

use super::state::{AgentState, ClusterStatus};
use super::writes::after_batch;
use super::{AgentOptions, Readiness, Snapshot};
use crate::datapath::ClusterIds;
use crate::lb::{FakeMaps, Frontend};
use crate::watch::{ConnEvent, WatchSettings};

const VIP: &str = "10.96.0.10";

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn web() -> ServiceName {
    ServiceName::new("default", "web").unwrap()
}

fn vip() -> Frontend {
    Frontend {
        ip: VIP.parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn options() -> AgentOptions {
    AgentOptions {
        cluster: c("c1"),
        cluster_id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
        node: "n1".into(),
        etcd_endpoints: vec!["http://127.0.0.1:1".into()],
        tls_dir: None,
        remote_config_dir: None,
        stale_grace: Duration::from_secs(2),
        sync_timeout: Duration::from_secs(3600),
        heartbeat_timeout: Duration::from_secs(5),
        kvstoremesh: false,
        health_interval: Duration::from_secs(1),
        health_failures: 2,
        health_rise: 2,
        remote_probe_timeout: None,
        watch: WatchSettings::default(),
        remote_dir_poll: Duration::from_secs(1),
        status_every: Duration::from_secs(5),
        publish: false,
        destroy_sockets: false,
        cluster_ids: ClusterIds::default(),
    }
}

/// A task state over in-memory maps with the given clusters registered, and its snapshots.
fn agent(clusters: &[&str]) -> (AgentState, watch::Receiver<Arc<Snapshot>>, FakeMaps) {
    let opts = options();
    let maps = FakeMaps::new();
    let first = Snapshot::starting(opts.cluster.clone(), opts.node.clone(), None);
    let (tx, rx) = watch::channel(Arc::new(first));
    let zone = watch::channel(Arc::new(clusterset_dns::Zone::default())).0;
    let mut st = AgentState::new(
        opts,
        Box::new(maps.clone()),
        tx,
        zone,
        Arc::new(AtomicBool::new(false)),
    );
    for n in clusters {
        st.clusters
            .insert(c(n), ClusterStatus::new(None, Instant::now()));
    }
    (st, rx, maps)
}

fn spec(cluster: &str) -> ConnEvent {
    spec_with(cluster, Affinity::None)
}

fn spec_with(cluster: &str, affinity: Affinity) -> ConnEvent {
    let s = ServiceSpec {
        cluster: c(cluster),
        namespace: "default".into(),
        name: "web".into(),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        frontends: vec![VIP.parse().unwrap()],
        headless: false,
        shared: true,
        affinity,
        failover_order: vec![],
        health_check: HealthCheck::Tcp,
        health_check_port: None,
    };
    let key = MeshKey::Service {
        cluster: c(cluster),
        service: web(),
    };
    ConnEvent::Put(key, MeshValue::Service(s))
}

fn chunk(cluster: &str, ips: &[&str]) -> ConnEvent {
    let endpoints = ips
        .iter()
        .map(|ip| Endpoint {
            ip: ip.parse().unwrap(),
            ports: vec![EndpointPort {
                name: None,
                port: 8080,
                protocol: Protocol::Tcp,
            }]
            .into(),
            node: Some("elsewhere".into()),
            zone: None,
            hostname: None,
            conditions: Conditions::default(),
        })
        .collect();
    let ch = EndpointChunk {
        cluster: c(cluster),
        namespace: "default".into(),
        name: "web".into(),
        chunk: 0,
        endpoints,
    };
    let key = MeshKey::EndpointChunk {
        cluster: c(cluster),
        service: web(),
        chunk: 0,
    };
    ConnEvent::Put(key, MeshValue::EndpointChunk(ch))
}

/// One batch as the task runs it: apply the events, write the maps, publish.
fn batch(st: &mut AgentState, events: Vec<(&str, ConnEvent)>) {
    for (cluster, ev) in events {
        st.handle((c(cluster), ev));
    }
    after_batch(st, SystemTime::now());
    st.publish();
}

fn selected(s: &Snapshot) -> Vec<String> {
    s.service(&web())
        .and_then(|s| s.frontends.first())
        .map(|f| f.backends.iter().map(|b| b.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn a_batch_is_written_then_published_and_a_held_snapshot_never_changes() {
    let (mut st, rx, maps) = agent(&["c1"]);
    batch(
        &mut st,
        vec![
            ("c1", spec("c1")),
            ("c1", chunk("c1", &["10.1.0.1"])),
            ("c1", ConnEvent::Synced),
        ],
    );
    // A reader takes the snapshot (no lock shared with the task is held from here on).
    let held = rx.borrow().clone();
    assert_eq!(held.readiness, Readiness::Ready);
    assert_eq!(selected(&held), ["10.1.0.1:8080@c1"]);
    assert_eq!(maps.get(&vip()).map(|b| b.len()), Some(1));
    assert_eq!(held.map_writes.upserts, 1);
    assert_eq!(held.endpoints, 1);
    assert_eq!(held.clusters[&c("c1")].endpoints, 1);

    // The next batch is written and published while the reader still holds its snapshot.
    batch(
        &mut st,
        vec![("c1", chunk("c1", &["10.1.0.1", "10.1.0.2"]))],
    );
    let now = rx.borrow().clone();
    assert_eq!(maps.get(&vip()).map(|b| b.len()), Some(2));
    assert_eq!(selected(&now), ["10.1.0.1:8080@c1", "10.1.0.2:8080@c1"]);
    assert_eq!(now.map_writes.upserts, 2);
    assert!(now.seq > held.seq);
    // What the reader holds is what it read.
    assert_eq!(selected(&held), ["10.1.0.1:8080@c1"]);
    assert_eq!(held.map_writes.upserts, 1);
}

#[test]
fn nothing_is_written_until_every_cluster_synced() {
    let (mut st, rx, maps) = agent(&["c1", "c2"]);
    batch(
        &mut st,
        vec![
            ("c1", spec("c1")),
            ("c1", chunk("c1", &["10.1.0.1"])),
            ("c1", ConnEvent::Synced),
        ],
    );
    let snap = rx.borrow().clone();
    assert_eq!(
        snap.readiness,
        Readiness::Syncing {
            waiting: vec![c("c2")]
        }
    );
    assert!(!snap.ready());
    assert_eq!(maps.counts().upserts, 0, "written before c2's sync");
    // The index already knows: the status shows it before the maps get it.
    assert_eq!(selected(&snap), ["10.1.0.1:8080@c1"]);

    batch(&mut st, vec![("c2", ConnEvent::Synced)]);
    let snap = rx.borrow().clone();
    assert_eq!(snap.readiness, Readiness::Ready);
    assert_eq!(maps.get(&vip()).map(|b| b.len()), Some(1));
}

#[test]
fn a_batch_that_changes_no_service_shares_the_published_selections() {
    let (mut st, rx, _maps) = agent(&["c1"]);
    batch(
        &mut st,
        vec![
            ("c1", spec("c1")),
            ("c1", chunk("c1", &["10.1.0.1"])),
            ("c1", ConnEvent::Synced),
        ],
    );
    let a = rx.borrow().clone();
    batch(&mut st, vec![("c1", ConnEvent::Connected)]);
    let b = rx.borrow().clone();
    assert!(b.clusters[&c("c1")].liveness.connected());
    assert!(
        Arc::ptr_eq(&a.services, &b.services),
        "selections copied though the index did not change"
    );
}

#[test]
fn a_refused_remote_is_shown_and_not_waited_for() {
    let (mut st, rx, _maps) = agent(&["c1", "c2"]);
    batch(
        &mut st,
        vec![
            ("c1", ConnEvent::Synced),
            (
                "c2",
                ConnEvent::Refused("cluster id 1 is already used by c1".into()),
            ),
        ],
    );
    let snap = rx.borrow().clone();
    assert_eq!(snap.readiness, Readiness::Ready);
    let c2 = &snap.clusters[&c("c2")];
    assert!(c2.refused);
    assert!(
        c2.error
            .as_deref()
            .is_some_and(|e| e.contains("already used"))
    );
    let doc = crate::status::status_document(&snap).to_string();
    assert!(doc.contains("already used"), "{doc}");
}

#[test]
fn a_burst_is_published_at_most_once_per_interval_and_its_end_when_due() {
    let (mut st, rx, _maps) = agent(&["c1"]);
    batch(&mut st, vec![("c1", spec("c1")), ("c1", ConnEvent::Synced)]);
    let first = rx.borrow().seq;
    // A change right after: held back, with the time it is due.
    st.handle((c("c1"), chunk("c1", &["10.1.0.1"])));
    after_batch(&mut st, SystemTime::now());
    let due = st.publish_or_defer().expect("deferred within the interval");
    assert_eq!(rx.borrow().seq, first);
    assert!(due <= Instant::now() + crate::snapshot::PUBLISH_EVERY);
    // Once due, it goes out with everything that came in between.
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    assert_eq!(st.publish_or_defer(), None);
    let snap = rx.borrow().clone();
    assert!(snap.seq > first);
    assert_eq!(selected(&snap), ["10.1.0.1:8080@c1"]);
}

fn node_put(cluster: &str, name: &str, cidr: &str) -> ConnEvent {
    let key = MeshKey::Node {
        cluster: c(cluster),
        node: name.into(),
    };
    ConnEvent::Put(
        key,
        MeshValue::Node(mesh_model::values::NodeInfo {
            cluster: c(cluster),
            name: name.into(),
            addresses: vec![mesh_model::values::NodeAddress {
                kind: "InternalIP".into(),
                ip: "192.0.2.11".parse().unwrap(),
            }],
            zone: None,
            region: None,
            pod_cidrs: vec![cidr.parse().unwrap()],
        }),
    )
}

/// The nodes of remote clusters (and of a peer mirrored into the local etcd by KVStoreMesh) reach the route
/// manager's channel, apart from the merge index; the set is complete once every cluster synced.
#[test]
fn remote_nodes_are_sent_to_the_route_manager_and_complete_once_every_cluster_synced() {
    let (mut st, _rx, _maps) = agent(&["c1", "c2"]);
    let mut nodes = st.nodes.subscribe();
    let node_batch = |st: &mut AgentState, events: Vec<(&str, ConnEvent)>| {
        batch(st, events);
        st.send_nodes();
    };
    node_batch(
        &mut st,
        vec![
            ("c1", ConnEvent::Synced),
            ("c2", node_put("c2", "n1", "10.2.1.0/24")),
            // KVStoreMesh: a peer's node arrives on the local connection, under its own cluster.
            ("c1", node_put("c3", "m1", "10.3.1.0/24")),
            // The local cluster's own nodes are not routed.
            ("c1", node_put("c1", "own", "10.1.1.0/24")),
        ],
    );
    assert!(nodes.has_changed().unwrap());
    let set = nodes.borrow_and_update().clone();
    let names: Vec<String> = set
        .nodes
        .iter()
        .map(|n| format!("{}/{} {}", n.cluster, n.name, n.pod_cidrs[0]))
        .collect();
    assert_eq!(names, ["c2/n1 10.2.1.0/24", "c3/m1 10.3.1.0/24"]);
    assert!(!set.complete, "c2 has not synced");
    assert_eq!(st.index.services().len(), 0, "nodes are not in the index");

    node_batch(&mut st, vec![("c2", ConnEvent::Synced)]);
    assert!(nodes.borrow_and_update().complete);

    node_batch(
        &mut st,
        vec![(
            "c2",
            ConnEvent::Delete(MeshKey::Node {
                cluster: c("c2"),
                node: "n1".into(),
            }),
        )],
    );
    let set = nodes.borrow_and_update().clone();
    assert_eq!(set.nodes.len(), 1);
    assert_eq!(set.nodes[0].name, "m1");

    // A batch that changes no node sends nothing.
    node_batch(&mut st, vec![("c2", ConnEvent::Connected)]);
    assert!(!nodes.has_changed().unwrap());
}

/// In-memory maps holding one service of `n` backends (10.0.0.0 onwards), their ids, and the
/// cluster ids the writer names them by.
fn one_service_of(n: usize) -> (global_lb_bpf::FakeMaps, Vec<u32>, ClusterIds) {
    let ids = ClusterIds::default();
    ids.set(&c("c1"), 1);
    let mut maps = global_lb_bpf::FakeMaps::new();
    let fe = global_lb_bpf::Frontend::new(vip().ip, 80, global_lb_bpf::Proto::Tcp);
    let backends: Vec<global_lb_bpf::Backend> = (0..n as u32)
        .map(|i| {
            global_lb_bpf::Backend::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 8080, 1)
        })
        .collect();
    global_lb_bpf::ServiceMaps::upsert_service(&mut maps, &fe, &backends).unwrap();
    let held: Vec<u32> = maps.store().backends.keys().copied().collect();
    (maps, held, ids)
}

/// A task state writing through `writer`.
fn state_over(writer: Box<dyn crate::lb::MapWriter>) -> AgentState {
    let opts = options();
    let first = Snapshot::starting(opts.cluster.clone(), opts.node.clone(), None);
    let (tx, _rx) = watch::channel(Arc::new(first));
    let zone = watch::channel(Arc::new(clusterset_dns::Zone::default())).0;
    AgentState::new(opts, writer, tx, zone, Arc::new(AtomicBool::new(false)))
}

/// The status tick's read of many backends' counters goes a slice per loop tick and ends with the
/// same connection counts as one read of them all; a read under way is not started again.
#[test]
fn many_backends_counters_are_read_a_slice_per_tick_and_add_up() {
    use super::state::CounterScan;

    let n = 3 * CounterScan::SLICE + 100;
    let (mut maps, held, ids) = one_service_of(n);
    for (k, id) in held.iter().enumerate() {
        maps.store_mut().counters.insert(*id, k as u64 % 7);
    }
    // What one read of them all gives.
    let mut expected = std::collections::HashMap::new();
    for k in global_lb_bpf::ServiceMaps::counters(&maps).unwrap() {
        if k.connections > 0 {
            *expected.entry((k.addr, k.port)).or_insert(0) += k.connections;
        }
    }
    assert!(expected.len() > n / 2);

    let mut st = state_over(Box::new(crate::datapath::GlbWriter::new(
        maps,
        c("c1"),
        ids,
    )));
    assert_eq!(
        st.start_counters(false),
        None,
        "{n} backends are not read in one go"
    );
    assert_eq!(
        st.start_counters(true),
        None,
        "a read under way is left to finish"
    );
    // One slice at the status tick, one per loop tick after it.
    let mut slices = 1;
    loop {
        slices += 1;
        if let Some(publish) = st.continue_counters() {
            assert!(
                publish,
                "the status tick asked while a scrape's read was under way"
            );
            break;
        }
        assert!(
            slices < 10,
            "{n} backends in slices of {}",
            CounterScan::SLICE
        );
    }
    assert_eq!(slices, 4);
    assert!(st.scan.is_none());
    assert_eq!(*st.connections, expected);
}

/// A datapath that counted connects to a few backends (every other backend reads zero), and
/// how many outcome readings were taken from it.
struct Counted {
    inner: crate::datapath::GlbWriter<global_lb_bpf::FakeMaps>,
    outcomes:
        Arc<std::sync::Mutex<std::collections::HashMap<u32, global_lb_bpf::signals::Outcomes>>>,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl Counted {
    fn read(&self, id: u32) -> global_lb_bpf::signals::Outcomes {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.outcomes
            .lock()
            .unwrap()
            .get(&id)
            .copied()
            .unwrap_or_default()
    }
}

impl crate::lb::MapWriter for Counted {
    fn upsert_service(
        &mut self,
        fe: &Frontend,
        backends: &[crate::lb::Backend],
    ) -> Result<(), crate::lb::MapError> {
        self.inner.upsert_service(fe, backends)
    }
    fn delete_service(&mut self, fe: &Frontend) -> Result<(), crate::lb::MapError> {
        self.inner.delete_service(fe)
    }
    fn services(
        &mut self,
    ) -> Result<std::collections::HashMap<Frontend, Vec<crate::lb::Backend>>, crate::lb::MapError>
    {
        self.inner.services()
    }
    fn backend_ids(&mut self) -> Vec<(u32, crate::lb::Backend)> {
        self.inner.backend_ids()
    }
    fn backend_by_id(&mut self, id: u32) -> Option<crate::lb::Backend> {
        self.inner.backend_by_id(id)
    }
    fn connect_outcome(&mut self, id: u32) -> Option<global_lb_bpf::signals::Outcomes> {
        Some(self.read(id))
    }
    fn connections_to(&mut self, id: u32) -> Option<u64> {
        // A connect is counted before its outcome.
        let o = self.outcomes.lock().unwrap().get(&id).copied();
        Some(o.map_or(0, |o| o.established + o.refused + o.timeout))
    }
}

/// Of a large node's backends, the golden signals follow those that counted connects: a read of
/// every backend adds their deltas, and the zero readings of the rest are not kept; a suspect
/// mark reads only the marked backend and those followed, not every backend.
#[test]
fn golden_signals_follow_the_backends_that_counted_connects() {
    use global_lb_bpf::signals::Outcomes;

    let n = 2 * super::state::CounterScan::SLICE + 10;
    let (maps, held, ids) = one_service_of(n);
    let est = |n: u64| Outcomes {
        established: n,
        ..Outcomes::default()
    };
    let outcomes = Arc::new(std::sync::Mutex::new(std::collections::HashMap::from([
        (held[3], est(5)),
        (held[n / 2], est(7)),
        (held[n - 1], est(11)),
    ])));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut st = state_over(Box::new(Counted {
        inner: crate::datapath::GlbWriter::new(maps, c("c1"), ids),
        outcomes: outcomes.clone(),
        reads: reads.clone(),
    }));
    let read_all = |st: &mut AgentState| {
        let mut done = st.start_counters(true);
        while done.is_none() {
            done = st.continue_counters();
        }
    };
    let established =
        |st: &AgentState| -> u64 { st.golden.totals.values().map(|t| t.established).sum() };

    read_all(&mut st);
    assert_eq!(established(&st), 23);
    assert_eq!(
        st.golden.followed().count(),
        3,
        "the zero readings are not kept"
    );

    // More connects to one followed backend and to one that had none.
    outcomes.lock().unwrap().insert(held[n / 2], est(9));
    outcomes.lock().unwrap().insert(held[100], est(1));
    read_all(&mut st);
    assert_eq!(established(&st), 26, "deltas added once");
    assert_eq!(st.golden.followed().count(), 4);

    // A suspect mark on a backend: it and the followed ones are read, nobody else.
    outcomes.lock().unwrap().insert(held[200], est(2));
    reads.store(0, std::sync::atomic::Ordering::Relaxed);
    st.refresh_golden_of(&[held[200]]);
    assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(established(&st), 28);
}

/// The node summary of a service of many backends lists at most 64 of those unusable, sent
/// connections or selected and counts the rest; a small service lists every backend.
#[test]
fn the_node_summary_lists_a_large_service_s_interesting_backends_and_counts_the_rest() {
    let ips = |prefix: &str, n: usize| -> Vec<String> {
        (1..=n)
            .map(|i| format!("{prefix}.{}.{}", i / 250, i % 250))
            .collect()
    };
    let summary = |remote: usize, connections: &[(&str, u64)], affinity: Affinity| {
        let (mut st, _rx, _maps) = agent(&["c1", "c2"]);
        let local = ips("10.1", 3);
        let far = ips("10.2", remote);
        let local: Vec<&str> = local.iter().map(String::as_str).collect();
        let far: Vec<&str> = far.iter().map(String::as_str).collect();
        batch(
            &mut st,
            vec![
                ("c1", spec_with("c1", affinity)),
                ("c1", chunk("c1", &local)),
                ("c1", ConnEvent::Synced),
                ("c2", spec_with("c2", affinity)),
                ("c2", chunk("c2", &far)),
                ("c2", ConnEvent::Synced),
            ],
        );
        st.connections = Arc::new(
            connections
                .iter()
                .map(|(ip, n)| ((ip.parse().unwrap(), 8080), *n))
                .collect(),
        );
        let mut states = st.node_status().service_states;
        assert_eq!(states.len(), 1);
        states.remove(0)
    };
    let listed = |s: &mesh_model::values::ServiceState| -> Vec<String> {
        s.backends
            .iter()
            .map(|b| format!("{}@{}", b.ip, b.cluster))
            .collect()
    };

    // 103 backends: the 3 selected local ones listed, the 100 remote ones counted.
    let s = summary(100, &[], Affinity::Local);
    assert_eq!(
        listed(&s),
        ["10.1.0.1@c1", "10.1.0.2@c1", "10.1.0.3@c1"],
        "{s:?}"
    );
    assert!(s.backends.iter().all(|b| b.selected));
    let u = s.unlisted.clone().unwrap();
    assert_eq!(
        u.by_cluster,
        std::collections::BTreeMap::from([("c2".to_owned(), 100)])
    );
    assert_eq!((u.selected, u.connections_remote), (0, 0));

    // One remote backend took connections from this node: listed first, with its count.
    let s = summary(100, &[("10.2.0.7", 4)], Affinity::Local);
    assert_eq!(s.backends.len(), 4);
    assert_eq!(
        (s.backends[0].ip.to_string(), s.backends[0].connections),
        ("10.2.0.7".to_owned(), 4)
    );
    assert_eq!(
        s.unlisted.unwrap().by_cluster,
        std::collections::BTreeMap::from([("c2".to_owned(), 99)])
    );

    // Every backend selected (no affinity): 64 listed, those with connections first; the rest
    // counted with their connections, so the totals stay true.
    let mut conns: Vec<(String, u64)> = (1..=70).map(|i| (format!("10.2.0.{i}"), 1)).collect();
    conns[0].1 = 9;
    let conns: Vec<(&str, u64)> = conns.iter().map(|(ip, n)| (ip.as_str(), *n)).collect();
    let s = summary(100, &conns, Affinity::None);
    assert_eq!(s.backends.len(), mesh_model::values::ServiceState::LIST_ALL);
    assert_eq!(s.backends[0].connections, 9);
    assert!(s.backends.iter().all(|b| b.connections > 0 && b.selected));
    let u = s.unlisted.unwrap();
    assert_eq!(u.by_cluster.values().sum::<u64>(), 103 - 64);
    assert_eq!(u.selected, 103 - 64);
    assert_eq!(
        s.backends.iter().map(|b| b.connections).sum::<u64>() + u.connections_remote,
        9 + 69
    );

    // A small service lists every backend.
    let s = summary(10, &[], Affinity::Local);
    assert_eq!(s.backends.len(), 13);
    assert!(s.unlisted.is_none());
}
