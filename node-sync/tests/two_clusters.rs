//! node-sync against two real etcd processes ("clusters" c1 and c2) with the in-memory map writer.
//! Keys are written as the clustermesh-apiserver writes them; the assertions are on what the
//! datapath would be programmed with.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use global_lb_bpf::ServiceMaps as _;
use mesh_model::keys::MeshKey;
use mesh_model::values::{Affinity, MeshValue, RemoteCluster};
use mesh_model::{ClusterId, MaxConnectedClusters};
use node_sync::datapath::{ClusterIds, GlbWriter};
use node_sync::lb::{Backend, FakeMaps, Frontend, MapError, MapWriter};
use support::*;

const C1_EP: &str = "127.0.0.1";
const C2_EP: &str = "127.0.0.2";

/// c1 (local, affinity as given) with one backend on this node at a real TCP listener; c2 with
/// one backend elsewhere.
async fn two_clusters(
    affinity: Affinity,
    backend_port: u16,
) -> (Etcd, Etcd, ApiWriter, ApiWriter, tempfile::TempDir) {
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", affinity)],
        vec![chunk("c1", 0, vec![endpoint(C1_EP, backend_port, "n1")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::Local)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    (e1, e2, w1, w2, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_preferred_failover_on_failing_health_and_failback() {
    let listener = tokio::net::TcpListener::bind((C1_EP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (e1, _e2, _w1, _w2, dir) = two_clusters(Affinity::Local, port).await;
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    let local = vec![format!("c1/{C1_EP}:{port}")];
    let remote = vec![format!("c2/{C2_EP}:8080")];
    wait_for("local backend programmed", Duration::from_secs(15), || {
        programmed(&maps) == Some(local.clone())
    })
    .await;
    // Wait until the health checker has published at least once (its verdict is healthy).
    wait_for("first health report", Duration::from_secs(5), || {
        agent.snapshot().has_health_report(&c("c1"), "n1")
    })
    .await;

    // The local backend dies: new connects must go to c2 within half a second.
    drop(listener);
    let took = wait_for("failover to c2", Duration::from_secs(5), || {
        programmed(&maps) == Some(remote.clone())
    })
    .await;
    println!("failover took {took:?}");
    assert!(
        took <= Duration::from_millis(500),
        "failover took {took:?}, more than 500 ms"
    );
    {
        let st = agent.snapshot();
        let svc = st.service(&web()).unwrap();
        assert!(
            svc.frontends[0].reason.to_string().contains("failed over"),
            "{}",
            svc.frontends[0].reason
        );
        assert_eq!(st.failovers, 1);
    }

    // It comes back on the same port: traffic returns to c1.
    let _back = tokio::net::TcpListener::bind((C1_EP, port)).await.unwrap();
    let took = wait_for("failback to c1", Duration::from_secs(5), || {
        programmed(&maps) == Some(local.clone())
    })
    .await;
    println!("failback took {took:?}");
    assert!(took <= Duration::from_millis(500), "failback took {took:?}");
    let log = agent.snapshot().failover_log.to_vec();
    assert!(log.len() >= 2, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_killed_leaves_after_grace_and_returns_when_restarted() {
    let listener = tokio::net::TcpListener::bind((C1_EP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (e1, mut e2, _w1, mut w2, dir) = two_clusters(Affinity::None, port).await;
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    let both = vec![format!("c1/{C1_EP}:{port}"), format!("c2/{C2_EP}:8080")];
    let local = vec![format!("c1/{C1_EP}:{port}")];
    wait_for("both clusters programmed", Duration::from_secs(15), || {
        programmed(&maps) == Some(both.clone())
    })
    .await;

    w2.stop_heartbeat();
    e2.kill();
    // Within the grace (2 s) c2's backend stays.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        programmed(&maps),
        Some(both.clone()),
        "c2 left before the grace"
    );
    let took = wait_for("c2 stale", Duration::from_secs(10), || {
        programmed(&maps) == Some(local.clone())
    })
    .await;
    println!("c2 left selection {took:?} after the first second");
    {
        let st = agent.snapshot();
        let c2 = &st.clusters[&c("c2")];
        assert!(c2.stale_since.is_some());
        assert!(c2.error.is_some(), "a killed etcd shows an error");
        // Kept in memory.
        assert_eq!(st.endpoints, 2);
        let m = node_sync::status::render_metrics(&st);
        assert!(m.contains("nodesync_remote_stale{cluster=\"c2\"} 1"), "{m}");
    }

    e2.restart().await;
    w2 = ApiWriter::new(&e2, "c2", 2).await;
    w2.start_heartbeat();
    wait_for("c2 back after restart", Duration::from_secs(10), || {
        programmed(&maps) == Some(both.clone())
    })
    .await;
    assert!(agent.snapshot().clusters[&c("c2")].reconnects >= 1);
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_remote_etcd_is_counted_and_good_backends_stay() {
    let listener = tokio::net::TcpListener::bind((C1_EP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (e1, _e2, _w1, mut w2, dir) = two_clusters(Affinity::None, port).await;
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    let both = vec![format!("c1/{C1_EP}:{port}"), format!("c2/{C2_EP}:8080")];
    wait_for("both clusters programmed", Duration::from_secs(15), || {
        programmed(&maps) == Some(both.clone())
    })
    .await;
    // Garbage over a good chunk, a chunk copied under the wrong key, and garbage under a new key.
    w2.put_raw("clustermesh/v1/endpoints/c2/default/web/0", b"{not json")
        .await;
    let wrong = MeshValue::EndpointChunk(chunk("c2", 0, vec![endpoint("127.0.0.9", 1, "x")]));
    w2.put_raw("clustermesh/v1/endpoints/c2/default/web/5", &wrong.encode())
        .await;
    w2.put_raw("clustermesh/v1/services/c2/default/web", b"\xff\xfe")
        .await;
    wait_for("three bad values counted", Duration::from_secs(5), || {
        agent.snapshot().clusters[&c("c2")].bad_values >= 3
    })
    .await;
    assert_eq!(programmed(&maps), Some(both.clone()));
    let m = node_sync::status::render_metrics(&agent.snapshot());
    assert!(
        m.contains("nodesync_remote_bad_values_total{cluster=\"c2\"} 3"),
        "{m}"
    );
    // A good value after the garbage is taken.
    w2.chunk(chunk(
        "c2",
        0,
        vec![
            endpoint(C2_EP, 8080, "m1"),
            endpoint("127.0.0.3", 8080, "m1"),
        ],
    ))
    .await;
    wait_for("good update after garbage", Duration::from_secs(5), || {
        programmed(&maps).is_some_and(|b| b.len() == 3)
    })
    .await;
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reconciles_pinned_maps_without_flushing() {
    let listener = tokio::net::TcpListener::bind((C1_EP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (e1, _e2, _w1, _w2, dir) = two_clusters(Affinity::None, port).await;
    // The maps as the previous node-sync left them: the right backends for the VIP (in another
    // order) and a service that no longer exists.
    let be = |cl: &str, ip: &str, p: u16| Backend {
        cluster: c(cl).into(),
        ip: ip.parse().unwrap(),
        port: p,
        protocol: mesh_model::values::Protocol::Tcp,
    };
    let gone = Frontend {
        ip: "10.96.9.9".parse().unwrap(),
        port: 80,
        protocol: mesh_model::values::Protocol::Tcp,
    };
    let maps = FakeMaps::with(HashMap::from([
        (vip(), vec![be("c2", C2_EP, 8080), be("c1", C1_EP, port)]),
        (gone, vec![be("c1", "127.0.0.7", 80)]),
    ]));
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    wait_for("initial reconcile", Duration::from_secs(15), || {
        agent.snapshot().ready()
    })
    .await;
    let counts = maps.counts();
    assert_eq!(
        counts.upserts, 0,
        "an unchanged service must not be rewritten"
    );
    assert_eq!(counts.deletes, 1);
    assert!(maps.get(&gone).is_none());
    assert_eq!(maps.get(&vip()).unwrap().len(), 2);
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotes_follow_the_config_dir_and_local_etcd_entries_without_restart() {
    let (e1, e2, e3) = tokio::join!(Etcd::start(), Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    let mut w3 = ApiWriter::new(&e3, "c3", 3).await;
    w1.publish_all(vec![spec("c1", Affinity::None)], vec![])
        .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    w3.publish_all(
        vec![spec("c3", Affinity::None)],
        vec![chunk("c3", 0, vec![endpoint("127.0.0.3", 8080, "m1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    wait_for("ready with no remote", Duration::from_secs(15), || {
        agent.snapshot().ready()
    })
    .await;
    assert_eq!(programmed(&maps), Some(vec![]));

    // A file appears: c2 is connected.
    remote_file(dir.path(), "c2", &e2);
    wait_for("c2 from the config dir", Duration::from_secs(10), || {
        programmed(&maps) == Some(vec![format!("c2/{C2_EP}:8080")])
    })
    .await;
    // `clustermesh connect` writes remotes/c1/c3 into the local etcd: c3 is connected.
    let entry = RemoteCluster {
        name: c("c3"),
        id: ClusterId::new(3, MaxConnectedClusters::DEFAULT).unwrap(),
        endpoints: vec![e3.url()],
        ca_bundle: String::new(),
        client_cert: String::new(),
    };
    let key = MeshKey::Remote {
        cluster: c("c1"),
        remote: c("c3"),
    };
    w1.put(key.clone(), MeshValue::Remote(entry)).await;
    wait_for("c3 from the remotes entry", Duration::from_secs(10), || {
        programmed(&maps).is_some_and(|b| b.len() == 2)
    })
    .await;
    // Both go away again.
    std::fs::remove_file(dir.path().join("c2.yaml")).unwrap();
    w1.delete(key).await;
    wait_for("remotes removed", Duration::from_secs(10), || {
        programmed(&maps) == Some(vec![])
    })
    .await;
    assert!(agent.snapshot().clusters.len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_with_a_clashing_id_is_refused_with_a_clear_status() {
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 1).await;
    w1.publish_all(vec![spec("c1", Affinity::None)], vec![])
        .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    wait_for("c2 refused", Duration::from_secs(15), || {
        agent
            .snapshot()
            .clusters
            .get(&c("c2"))
            .is_some_and(|s| s.refused)
    })
    .await;
    wait_for("ready without c2", Duration::from_secs(15), || {
        agent.snapshot().ready()
    })
    .await;
    let err = agent.snapshot().clusters[&c("c2")].error.clone().unwrap();
    assert!(err.contains("id 1") && err.contains("c1"), "{err}");
    assert_eq!(programmed(&maps), Some(vec![]));
    let doc = node_sync::status::status_document(&agent.snapshot());
    assert!(doc.to_string().contains("already uses"), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_reconnect_sweeps_what_vanished_and_keeps_the_rest() {
    let (e1, mut e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(vec![spec("c1", Affinity::None)], vec![])
        .await;
    let two = vec![
        endpoint(C2_EP, 8080, "m1"),
        endpoint("127.0.0.3", 8080, "m1"),
    ];
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![
            chunk("c2", 0, two),
            chunk("c2", 1, vec![endpoint("127.0.0.4", 8080, "m1")]),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let maps = FakeMaps::new();
    let _agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    wait_for("three c2 backends", Duration::from_secs(15), || {
        programmed(&maps).is_some_and(|b| b.len() == 3)
    })
    .await;
    // c2's etcd is rebuilt and republished without chunk 1 while node-sync is disconnected.
    w2.stop_heartbeat();
    e2.restart_empty().await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk(
            "c2",
            0,
            vec![
                endpoint(C2_EP, 8080, "m1"),
                endpoint("127.0.0.3", 8080, "m1"),
            ],
        )],
    )
    .await;
    wait_for("chunk 1 swept", Duration::from_secs(10), || {
        programmed(&maps).is_some_and(|b| b.len() == 2)
    })
    .await;
    assert_eq!(
        programmed(&maps).unwrap(),
        vec![format!("c2/{C2_EP}:8080"), "c2/127.0.0.3:8080".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_reads_every_cluster_from_the_local_etcd_only() {
    let e1 = Etcd::start().await;
    // KVStoreMesh caches c2's keys in the local etcd, next to c1's own.
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e1, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk("c1", 0, vec![endpoint(C1_EP, 9, "other")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    // A remote file is ignored in this mode (it points nowhere reachable).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c3.yaml"),
        "name: c3\nendpoints: [\"http://127.0.0.1:9\"]\n",
    )
    .unwrap();
    let mut opts = options(&e1, "c1", 1, Some(dir.path()));
    opts.kvstoremesh = true;
    let maps = FakeMaps::new();
    let agent = start_agent(opts, &maps);
    let both = vec![format!("c1/{C1_EP}:9"), format!("c2/{C2_EP}:8080")];
    wait_for(
        "both clusters from the local etcd",
        Duration::from_secs(15),
        || programmed(&maps) == Some(both.clone()),
    )
    .await;
    assert!(!agent.snapshot().clusters.contains_key(&c("c3")));
    // c2's cached heartbeat stops: after the grace its backends leave.
    w2.stop_heartbeat();
    wait_for("c2 stale", Duration::from_secs(10), || {
        programmed(&maps) == Some(vec![format!("c1/{C1_EP}:9")])
    })
    .await;
    w2.start_heartbeat();
    wait_for("c2 back", Duration::from_secs(10), || {
        programmed(&maps) == Some(both.clone())
    })
    .await;
}

/// The datapath writer (global-lb-bpf's slot logic over memory) shared between the agent and the
/// test, counting the writes that reach it.
#[derive(Clone)]
struct SharedGlb(Arc<Mutex<(GlbWriter<global_lb_bpf::FakeMaps>, u64)>>);

impl SharedGlb {
    fn new(ids: ClusterIds) -> Self {
        Self(Arc::new(Mutex::new((
            GlbWriter::new(global_lb_bpf::FakeMaps::new(), c("c1"), ids),
            0,
        ))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (GlbWriter<global_lb_bpf::FakeMaps>, u64)> {
        self.0.lock().unwrap()
    }

    /// The VIP's backends as the datapath holds them: (cluster id, ip), sorted.
    fn vip_backends(&self) -> Vec<(u16, String)> {
        let g = self.lock();
        let mut v: Vec<(u16, String)> =
            g.0.maps()
                .services()
                .unwrap()
                .into_iter()
                .filter(|s| s.frontend.addr.to_string().ends_with(VIP))
                .flat_map(|s| s.backends)
                .map(|b| (b.cluster_id, b.addr.to_string().replace("::ffff:", "")))
                .collect();
        v.sort();
        v
    }

    fn writes(&self) -> u64 {
        self.lock().1
    }

    /// A writer for the next agent with a fresh id map (as after a process restart).
    fn rewire(&self, ids: ClusterIds) {
        let mut g = self.lock();
        let placeholder = GlbWriter::new(global_lb_bpf::FakeMaps::new(), c("c1"), ids.clone());
        let maps = std::mem::replace(&mut g.0, placeholder).into_maps();
        g.0 = GlbWriter::new(maps, c("c1"), ids);
        g.1 = 0;
    }
}

impl MapWriter for SharedGlb {
    fn upsert_service(&mut self, f: &Frontend, b: &[Backend]) -> Result<(), MapError> {
        let mut g = self.lock();
        g.1 += 1;
        g.0.upsert_service(f, b)
    }
    fn update_service(
        &mut self,
        f: &Frontend,
        old: &[Backend],
        new: &[Backend],
    ) -> Result<(), MapError> {
        let mut g = self.lock();
        g.1 += 1;
        g.0.update_service(f, old, new)
    }
    fn delete_service(&mut self, f: &Frontend) -> Result<(), MapError> {
        let mut g = self.lock();
        g.1 += 1;
        g.0.delete_service(f)
    }
    fn services(&mut self) -> Result<HashMap<Frontend, Vec<Backend>>, MapError> {
        self.lock().0.services()
    }
}

/// KVStoreMesh: a peer's id comes from its mirrored config (the datapath stores backends by cluster
/// id), so a restart finds the maps as it would write them; the mirror rewriting the peer's config
/// never drops the local stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_learns_mirrored_cluster_ids_and_keeps_its_stream_on_a_peer_config_write() {
    let e1 = Etcd::start().await;
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e1, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk("c1", 0, vec![endpoint(C1_EP, 9, "other")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    let mut opts = options(&e1, "c1", 1, None);
    opts.kvstoremesh = true;
    let glb = SharedGlb::new(opts.cluster_ids.clone());
    let agent = node_sync::agent::start(opts.clone(), Box::new(glb.clone()));
    let both = vec![(1, C1_EP.to_string()), (2, C2_EP.to_string())];
    wait_for("c1 and c2 with their ids", Duration::from_secs(15), || {
        glb.vip_backends() == both
    })
    .await;

    // The mirror writes c2's config again (a peer's apiserver restarted, or its CA changed).
    w2.config(2).await;
    // A later change of c2 is seen on the same stream.
    w2.chunk(chunk(
        "c2",
        0,
        vec![
            endpoint(C2_EP, 8080, "m1"),
            endpoint("127.0.0.3", 8080, "m2"),
        ],
    ))
    .await;
    let three = vec![
        (1, C1_EP.to_string()),
        (2, C2_EP.to_string()),
        (2, "127.0.0.3".to_string()),
    ];
    wait_for("c2's second backend", Duration::from_secs(10), || {
        glb.vip_backends() == three
    })
    .await;
    // The snapshot is published after the write (within a publish interval of it).
    wait_for(
        "c2 in the published snapshot",
        Duration::from_secs(5),
        || {
            agent
                .snapshot()
                .clusters
                .get(&c("c2"))
                .is_some_and(|c| c.liveness.connected())
        },
    )
    .await;
    {
        let st = agent.snapshot();
        let local = &st.clusters[&c("c1")];
        assert_eq!(local.reconnects, 0, "the local stream was dropped");
        assert!(!local.refused, "{:?}", local.error);
        assert!(st.clusters[&c("c2")].liveness.connected());
    }

    // A restart (fresh id map) reads the maps back as written: nothing is rewritten.
    agent.stop();
    drop(agent);
    opts.cluster_ids = ClusterIds::default();
    glb.rewire(opts.cluster_ids.clone());
    let agent = node_sync::agent::start(opts, Box::new(glb.clone()));
    wait_for("ready after the restart", Duration::from_secs(15), || {
        agent.snapshot().ready()
    })
    .await;
    assert_eq!(glb.writes(), 0, "a restart rewrote unchanged services");
    assert_eq!(glb.vip_backends(), three);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_is_not_trusted_before_its_sync_canaries() {
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk("c1", 0, vec![endpoint(C1_EP, 9, "other")])],
    )
    .await;
    // c2's apiserver is still writing: config, spec and one chunk, no canaries yet.
    w2.config(2).await;
    w2.service(spec("c2", Affinity::None)).await;
    w2.chunk(chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")]))
        .await;
    w2.start_heartbeat();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&e1, "c1", 1, Some(dir.path()));
    opts.sync_timeout = Duration::from_millis(500);
    let maps = FakeMaps::new();
    let agent = start_agent(opts, &maps);
    wait_for("ready", Duration::from_secs(15), || {
        agent.snapshot().ready()
    })
    .await;
    remote_file(dir.path(), "c2", &e2);
    wait_for("c2 connected", Duration::from_secs(10), || {
        agent
            .snapshot()
            .clusters
            .get(&c("c2"))
            .is_some_and(|s| s.liveness.connected())
    })
    .await;
    // c2's service and endpoint have arrived (held, not trusted): still only c1 is programmed.
    wait_for("c2's keys held", Duration::from_secs(10), || {
        agent
            .snapshot()
            .clusters
            .get(&c("c2"))
            .is_some_and(|s| s.endpoints > 0)
    })
    .await;
    assert_eq!(programmed(&maps), Some(vec![format!("c1/{C1_EP}:9")]));
    w2.canaries().await;
    wait_for(
        "c2 trusted after its canaries",
        Duration::from_secs(5),
        || programmed(&maps).is_some_and(|b| b.len() == 2),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_remote_file_moves_to_the_new_endpoints_and_sweeps_what_they_lack() {
    let (e1, e2, e2b) = tokio::join!(Etcd::start(), Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    w1.publish_all(vec![spec("c1", Affinity::None)], vec![])
        .await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![
            chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")]),
            chunk("c2", 1, vec![endpoint("127.0.0.4", 8080, "m1")]),
        ],
    )
    .await;
    // The same cluster served from another etcd, without chunk 1.
    let mut w2b = ApiWriter::new(&e2b, "c2", 2).await;
    w2b.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint(C2_EP, 8080, "m1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let maps = FakeMaps::new();
    let _agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    wait_for("two c2 backends", Duration::from_secs(15), || {
        programmed(&maps).is_some_and(|b| b.len() == 2)
    })
    .await;
    maps.record_history(true);
    remote_file(dir.path(), "c2", &e2b);
    wait_for(
        "chunk 1 swept after the move",
        Duration::from_secs(10),
        || programmed(&maps) == Some(vec![format!("c2/{C2_EP}:8080")]),
    )
    .await;
    // The move never left the service without backends: one write, from two backends to one.
    assert_eq!(maps.take_history().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_local_etcd_at_restart_never_empties_the_maps() {
    let be = Backend {
        cluster: c("c1").into(),
        ip: "10.1.0.1".parse().unwrap(),
        port: 8080,
        protocol: mesh_model::values::Protocol::Tcp,
    };
    let maps = FakeMaps::with(HashMap::from([(vip(), vec![be])]));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut opts = options_url(&dead, "c1", 1, None);
    opts.sync_timeout = Duration::from_millis(300);
    let agent = start_agent(opts, &maps);
    wait_for(
        "ready after the sync timeout",
        Duration::from_secs(10),
        || agent.snapshot().ready(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(maps.get(&vip()).map(|b| b.len()), Some(1));
    assert_eq!(maps.counts().deletes, 0);
    assert!(agent.snapshot().readiness.sweep_pending());
}

/// Overlapping pod CIDRs: c1 and c2 both have a backend at 127.0.0.5:8080. A failing verdict
/// published by a node of c2 takes out c2's backend only; one published by c1 takes out c1's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_moves_only_the_backend_of_its_own_cluster_at_a_shared_address() {
    use mesh_model::values::{BackendVerdict, HealthReport, Protocol, Verdict};
    const SHARED: &str = "127.0.0.5";
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    // Not on this node (n1): no local probe of them, only the published verdicts count.
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk(
            "c1",
            0,
            vec![
                endpoint(SHARED, 8080, "m9"),
                endpoint("127.0.0.6", 8080, "m9"),
            ],
        )],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::Local)],
        vec![chunk("c2", 0, vec![endpoint(SHARED, 8080, "x1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let maps = FakeMaps::new();
    let _agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    let all = vec![
        format!("c1/{SHARED}:8080"),
        "c1/127.0.0.6:8080".to_string(),
        format!("c2/{SHARED}:8080"),
    ];
    wait_for("all three programmed", Duration::from_secs(15), || {
        programmed(&maps) == Some(all.clone())
    })
    .await;
    let report = |cluster: &str, node: &str, verdict: Verdict| HealthReport {
        cluster: c(cluster),
        node: node.into(),
        verdicts: vec![BackendVerdict {
            ip: SHARED.parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
            verdict,
            since: None,
        }],
    };
    let key = |cluster: &str, node: &str| MeshKey::Health {
        cluster: c(cluster),
        node: node.into(),
    };
    w2.put(
        key("c2", "x1"),
        MeshValue::Health(report("c2", "x1", Verdict::Failing)),
    )
    .await;
    let without_c2 = vec![format!("c1/{SHARED}:8080"), "c1/127.0.0.6:8080".to_string()];
    wait_for(
        "c2's backend out, c1's of the same address in",
        Duration::from_secs(5),
        || programmed(&maps) == Some(without_c2.clone()),
    )
    .await;
    w2.put(
        key("c2", "x1"),
        MeshValue::Health(report("c2", "x1", Verdict::Healthy)),
    )
    .await;
    w1.put(
        key("c1", "m9"),
        MeshValue::Health(report("c1", "m9", Verdict::Failing)),
    )
    .await;
    let without_c1 = vec!["c1/127.0.0.6:8080".to_string(), format!("c2/{SHARED}:8080")];
    wait_for(
        "c1's backend out, c2's of the same address in",
        Duration::from_secs(5),
        || programmed(&maps) == Some(without_c1.clone()),
    )
    .await;
}
