//! `--routing native`'s route manager against the kernel, in a network namespace each test makes for itself
//! (a thread that unshares its network namespace; the host's routes are never read or written). Needs root.
//! The last test runs the whole feed: a real etcd and the `node-sync` binary, both started inside the
//! namespace, a remote cluster's `nodes/` keys in, routes out.

mod support;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use mesh_model::ClusterName;
use mesh_model::keys::MeshKey;
use mesh_model::values::{MeshValue, NodeAddress, NodeInfo};
use node_sync::routing::{
    CLUSTERMESH_PROTOCOL, NetlinkRoutes, NodeSet, RefusalReason, RemoteNode, RouteManager,
    RouteOwner, RouteTable,
};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol};
use rtnetlink::{LinkUnspec, LinkVeth, MulticastGroup, RouteMessageBuilder};

/// Runs `f` on a current-thread runtime in a thread of its own, in a fresh network namespace.
fn in_new_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root: each makes a network namespace of its own (unshare(CLONE_NEWNET)) and \
         changes its routes"
    );
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    })
    .join()
    .expect("the test thread");
}

/// In the namespace: `lo` up, and `under0` up with 192.0.2.1/24, the "underlay" the remote nodes are on.
async fn underlay() -> rtnetlink::Handle {
    let (conn, h, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    let lo = link_index(&h, "lo").await;
    h.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .unwrap();
    // A veth pair (the dummy driver is not in every kernel); the peer end stays in the namespace, up.
    h.link()
        .add(LinkVeth::new("under0", "under1").up().build())
        .execute()
        .await
        .unwrap();
    let peer = link_index(&h, "under1").await;
    h.link()
        .set(LinkUnspec::new_with_index(peer).up().build())
        .execute()
        .await
        .unwrap();
    let d = link_index(&h, "under0").await;
    h.address()
        .add(d, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 24)
        .execute()
        .await
        .unwrap();
    h
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> u32 {
    h.link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("link {name}"))
        .header
        .index
}

/// A route made by someone else (`proto static`).
async fn add_foreign(h: &rtnetlink::Handle, dst: &str, via: &str) {
    let dst: IpNet = dst.parse().unwrap();
    let m = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .unwrap()
        .gateway(via.parse().unwrap())
        .unwrap()
        .protocol(RouteProtocol::Static)
        .build();
    h.route().add(m).execute().await.unwrap();
}

/// Every IPv4 route of the main table as `dst via gw proto N`, sorted (what `ip route` would show).
async fn routes(h: &rtnetlink::Handle) -> Vec<String> {
    let mut out = Vec::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = s.try_next().await.unwrap() {
        if m.header.table != 254 {
            continue;
        }
        let (mut dst, mut gw) = (None, None);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = Some(format!("{d:?}")),
                RouteAttribute::Gateway(g) => gw = Some(format!("{g:?}")),
                _ => {}
            }
        }
        let Some(dst) = dst else { continue };
        let dst = dst
            .trim_start_matches("Inet(")
            .trim_end_matches(')')
            .to_string();
        let gw = gw.map(|g| {
            g.trim_start_matches("Inet(")
                .trim_end_matches(')')
                .to_string()
        });
        out.push(format!(
            "{dst}/{} via {} proto {}",
            m.header.destination_prefix_length,
            gw.unwrap_or_else(|| "-".into()),
            u8::from(m.header.protocol)
        ));
    }
    out.sort();
    out
}

fn node(cluster: &str, name: &str, ip: &str, cidrs: &[&str]) -> RemoteNode {
    RemoteNode {
        cluster: ClusterName::new(cluster).unwrap(),
        name: name.into(),
        addresses: vec![ip.parse().unwrap()],
        pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

fn set(nodes: Vec<RemoteNode>, complete: bool) -> NodeSet {
    NodeSet { nodes, complete }
}

const P: u8 = CLUSTERMESH_PROTOCOL;

#[test]
fn routing_native_installs_removes_and_survives_a_restart_without_touching_foreign_routes() {
    in_new_netns(|| async {
        let h = underlay().await;
        // Someone else's routes: one to an unrelated network, and this node's own pod CIDR.
        add_foreign(&h, "10.9.0.0/24", "192.0.2.50").await;
        add_foreign(&h, "10.1.0.0/16", "192.0.2.51").await;
        let foreign = [
            "10.1.0.0/16 via 192.0.2.51 proto 4".to_string(),
            "10.9.0.0/24 via 192.0.2.50 proto 4".to_string(),
        ];

        let n1 = node("c2", "n1", "192.0.2.11", &["10.2.1.0/24"]);
        let n2 = node("c2", "n2", "192.0.2.12", &["10.2.2.0/24"]);
        // Overlaps this node's pod CIDR (a foreign route): refused.
        let clash = node("c3", "m1", "192.0.2.21", &["10.1.5.0/24"]);

        let mut m = RouteManager::new(NetlinkRoutes::open(RouteOwner::default()).unwrap());
        let st = m
            .sync(&set(vec![n1.clone(), n2.clone(), clash.clone()], true))
            .await
            .unwrap()
            .clone();
        let r = routes(&h).await;
        assert!(
            r.contains(&format!("10.2.1.0/24 via 192.0.2.11 proto {P}")),
            "{r:#?}"
        );
        assert!(
            r.contains(&format!("10.2.2.0/24 via 192.0.2.12 proto {P}")),
            "{r:#?}"
        );
        assert!(!r.iter().any(|l| l.starts_with("10.1.5.0/24")), "{r:#?}");
        for f in &foreign {
            assert!(r.contains(f), "foreign route {f} gone: {r:#?}");
        }
        assert_eq!(st.routes.len(), 2);
        assert_eq!(st.refused.len(), 1);
        assert_eq!(
            st.refused[0].reason,
            RefusalReason::OverlapsLocal {
                route: "10.1.0.0/16".parse().unwrap()
            }
        );
        assert_eq!(st.refused_total, 1);
        assert_eq!(st.changes_total, 2);

        // n2 leaves: its route goes, n1's and the foreign ones stay.
        let st = m
            .sync(&set(vec![n1.clone(), clash.clone()], true))
            .await
            .unwrap()
            .clone();
        let r = routes(&h).await;
        assert!(!r.iter().any(|l| l.starts_with("10.2.2.0/24")), "{r:#?}");
        assert!(
            r.contains(&format!("10.2.1.0/24 via 192.0.2.11 proto {P}")),
            "{r:#?}"
        );
        for f in &foreign {
            assert!(r.contains(f), "foreign route {f} gone: {r:#?}");
        }
        assert_eq!(
            st.refused_total, 1,
            "a refusal still standing is counted once"
        );
        drop(m);

        // A restart: a new socket and a new manager find the route and change nothing; a route monitor sees no
        // route deleted or added, not even for a moment.
        let (mconn, _mh, mut events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route]).unwrap();
        tokio::spawn(mconn);
        let before = routes(&h).await;
        let mut m = RouteManager::new(NetlinkRoutes::open(RouteOwner::default()).unwrap());
        // First while not every cluster is synced and n1 not yet seen: nothing removed.
        let st = m.sync(&set(vec![], false)).await.unwrap().clone();
        assert_eq!(st.changes_total, 0);
        let st = m
            .sync(&set(vec![n1.clone(), clash.clone()], true))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            st.changes_total, 0,
            "a restart with the same nodes changes nothing"
        );
        assert_eq!(routes(&h).await, before);
        // A marker route made by the test (proto static).
        add_foreign(&h, "10.8.0.0/24", "192.0.2.52").await;
        // The first route event after the subscription must be that marker: any other is a blip.
        let (msg, _) = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
            .await
            .expect("a route event within 5 s")
            .expect("the monitor stream");
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r))
                if r.header.protocol == RouteProtocol::Static => {}
            other => panic!("a route changed during the restart: {other:?}"),
        }
    });
}

#[test]
fn routing_native_routes_ipv6_pod_cidrs_via_the_node_ipv6_address() {
    in_new_netns(|| async {
        let h = underlay().await;
        let d = link_index(&h, "under0").await;
        h.address()
            .add(d, "2001:db8::1".parse().unwrap(), 64)
            .execute()
            .await
            .unwrap();
        let table = NetlinkRoutes::open(RouteOwner::default()).unwrap();
        let mut m = RouteManager::new(table.clone());
        let st = m
            .sync(&set(dual_stack_nodes(), true))
            .await
            .unwrap()
            .clone();
        assert!(st.refused.is_empty(), "{:?}", st.refused);
        let ours: Vec<String> = table
            .read()
            .await
            .unwrap()
            .ours
            .iter()
            .map(|r| format!("{} via {}", r.dst, r.gateway.unwrap()))
            .collect();
        assert_eq!(
            ours,
            [
                "10.2.1.0/24 via 192.0.2.11",
                "fd00:2:1::/64 via 2001:db8::11"
            ]
        );
        // The same set again: nothing to do (the IPv6 route is read back as ours).
        let st = m
            .sync(&set(dual_stack_nodes(), true))
            .await
            .unwrap()
            .clone();
        assert_eq!(st.changes_total, 2);
    });
}

/// One node with an IPv4 and an IPv6 pod CIDR and an address of each family.
fn dual_stack_nodes() -> Vec<RemoteNode> {
    let mut n1 = node("c2", "n1", "192.0.2.11", &["10.2.1.0/24", "fd00:2:1::/64"]);
    n1.addresses.push("2001:db8::11".parse().unwrap());
    vec![n1]
}

#[test]
fn routing_native_refuses_pod_cidrs_that_overlap_between_clusters_and_moves_a_gateway_in_place() {
    in_new_netns(|| async {
        let h = underlay().await;
        let table = NetlinkRoutes::open(RouteOwner::default()).unwrap();
        let mut m = RouteManager::new(table.clone());
        let n1 = node("c2", "n1", "192.0.2.11", &["10.2.1.0/24"]);
        m.sync(&set(vec![n1.clone()], true)).await.unwrap();
        assert_eq!(table.read().await.unwrap().ours.len(), 1);

        // c3 announces a CIDR inside c2's: both refused, both reported, c2's route withdrawn.
        let c3 = node("c3", "m1", "192.0.2.21", &["10.2.1.128/25"]);
        let st = m
            .sync(&set(vec![n1.clone(), c3.clone()], true))
            .await
            .unwrap()
            .clone();
        assert!(st.routes.is_empty());
        assert_eq!(st.refused.len(), 2, "{:?}", st.refused);
        assert_eq!(st.refused_total, 2);
        assert!(
            st.refused.iter().any(|r| r.to_string()
                == "pod CIDR 10.2.1.0/24 of node n1 in cluster c2: overlaps 10.2.1.128/25 of node m1 in cluster c3"),
            "{:?}",
            st.refused
        );
        assert!(!routes(&h).await.iter().any(|l| l.starts_with("10.2.1.")));

        // c3 fixed; n1 moves to another address: the route is replaced in place.
        let mut moved = n1.clone();
        moved.addresses = vec!["192.0.2.99".parse().unwrap()];
        m.sync(&set(vec![n1.clone()], true)).await.unwrap();
        let st = m.sync(&set(vec![moved], true)).await.unwrap().clone();
        assert!(st.refused.is_empty());
        let r = routes(&h).await;
        assert!(
            r.contains(&format!("10.2.1.0/24 via 192.0.2.99 proto {P}")),
            "{r:#?}"
        );
        assert_eq!(
            r.iter().filter(|l| l.starts_with("10.2.1.0/24")).count(),
            1,
            "{r:#?}"
        );
    });
}

/// Starts `node-sync --routing native` for node n1 of c1 (in the calling thread's network namespace), its
/// remotes in `remotes` (`None`: `--kvstoremesh`, every peer mirrored into the local etcd), its log appended
/// to `log`.
fn start_node_sync(
    etcd: &support::Etcd,
    remotes: Option<&std::path::Path>,
    port: u16,
    log: &std::path::Path,
) -> support::NodeSync {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .args([
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
        ])
        .args(["--etcd-endpoints", &etcd.url()])
        .args(match remotes {
            Some(dir) => vec!["--remote-config-dir".into(), dir.as_os_str().to_owned()],
            None => vec!["--kvstoremesh".into()],
        })
        .args(["--status-listen", &format!("127.0.0.1:{port}")])
        .args(["--fake-maps", "--routing", "native"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn node-sync");
    support::NodeSync(child)
}

/// A node of `cluster` at `ip` with `cidrs`, as the apiserver publishes it.
fn node_value(cluster: &str, name: &str, ip: &str, cidrs: &[&str]) -> (MeshKey, MeshValue) {
    (
        MeshKey::Node {
            cluster: support::c(cluster),
            node: name.into(),
        },
        MeshValue::Node(NodeInfo {
            cluster: support::c(cluster),
            name: name.into(),
            addresses: vec![NodeAddress {
                kind: "InternalIP".into(),
                ip: ip.parse().unwrap(),
            }],
            zone: None,
            region: None,
            pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
        }),
    )
}

/// `dst/len` and protocol of a route message.
fn route_dst(m: &rtnetlink::packet_route::route::RouteMessage) -> (String, u8) {
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => Some(
                format!("{d:?}")
                    .trim_start_matches("Inet(")
                    .trim_end_matches(')')
                    .to_string(),
            ),
            _ => None,
        })
        .unwrap_or_default();
    (
        format!("{dst}/{}", m.header.destination_prefix_length),
        u8::from(m.header.protocol),
    )
}

type RouteEvents = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// Waits (up to `limit`) for the kernel to announce a route of ours to `dst` added (`added`) or deleted;
/// every other route event before it is returned as a line, for the caller to judge.
async fn route_event(
    events: &mut RouteEvents,
    dst: &str,
    added: bool,
    limit: Duration,
) -> Vec<String> {
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (msg, _) = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no route to {dst} {} within {limit:?}; other route events: {others:?}",
                    if added { "added" } else { "deleted" }
                )
            })
            .expect("the route monitor");
        let (what, m) = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => (true, m),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(m)) => (false, m),
            _ => continue,
        };
        let (d, proto) = route_dst(&m);
        if d == dst && proto == P && what == added {
            return others;
        }
        others.push(format!(
            "{} {d} proto {proto}",
            if what { "add" } else { "del" }
        ));
    }
}

/// Our routes (`ip route show proto 157`), as `routes` shows them.
async fn our_routes(h: &rtnetlink::Handle) -> Vec<String> {
    routes(h)
        .await
        .into_iter()
        .filter(|l| l.ends_with(&format!(" proto {P}")))
        .collect()
}

/// The whole feed: a real etcd and the `node-sync` binary with `--routing native`, both in the test's own
/// network namespace; remote clusters c2 and c3 publish nodes with pod CIDRs as the apiserver does. A node
/// appearing gets its route within a second and a deleted node loses it; a SIGKILL leaves the routes and a
/// restart changes nothing (a route monitor sees no event); an overlap between c2 and c3 is refused, both
/// CIDRs, and shows in `/api/v1/status` and `/metrics`.
#[test]
fn routing_native_end_to_end_from_etcd_node_keys_to_kernel_routes_through_the_binary() {
    in_new_netns(|| async {
        let h = underlay().await;
        let (mconn, _mh, mut events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route]).unwrap();
        tokio::spawn(mconn);

        // One etcd holds the three clusters' keys (a remote connection reads only its cluster's prefixes).
        let etcd = support::Etcd::start().await;
        let mut c1 = support::ApiWriter::new(&etcd, "c1", 1).await;
        let mut c2 = support::ApiWriter::new(&etcd, "c2", 2).await;
        let mut c3 = support::ApiWriter::new(&etcd, "c3", 3).await;
        c1.publish_all(vec![], vec![]).await;
        let (k, v) = node_value("c2", "n1", "192.0.2.11", &["10.2.1.0/24"]);
        c2.put(k, v).await;
        c2.publish_all(vec![], vec![]).await;
        c3.publish_all(vec![], vec![]).await;
        let dir = tempfile::tempdir().unwrap();
        let remotes = dir.path().join("remotes");
        std::fs::create_dir(&remotes).unwrap();
        support::remote_file(&remotes, "c2", &etcd);
        support::remote_file(&remotes, "c3", &etcd);
        let log = dir.path().join("node-sync.log");
        let port = support::free_port();

        let t0 = Instant::now();
        let mut ns = start_node_sync(&etcd, Some(&remotes), port, &log);
        let others = route_event(&mut events, "10.2.1.0/24", true, Duration::from_secs(20)).await;
        eprintln!("first route {:?} after node-sync's start", t0.elapsed());
        assert!(
            others.iter().all(|l| !l.ends_with(&format!("proto {P}"))),
            "{others:?}"
        );

        // A node appears: its route within a second of the put.
        let (k, v) = node_value("c2", "n2", "192.0.2.12", &["10.2.2.0/24"]);
        let t = Instant::now();
        c2.put(k.clone(), v).await;
        route_event(&mut events, "10.2.2.0/24", true, Duration::from_secs(1)).await;
        let added = t.elapsed();
        // It leaves: its route goes within a second.
        let t = Instant::now();
        c2.delete(k).await;
        route_event(&mut events, "10.2.2.0/24", false, Duration::from_secs(1)).await;
        let removed = t.elapsed();
        eprintln!("node put -> route added {added:?}; node deleted -> route removed {removed:?}");
        let doc = support::status_until(port, &log, "one route", |d| {
            d["routing"]["routesInstalled"] == 1
        })
        .await;
        assert_eq!(doc["routing"]["mode"], "native", "{:#}", doc["routing"]);
        assert_eq!(
            doc["routing"]["routes"][0],
            serde_json::json!({"cidr": "10.2.1.0/24", "via": "192.0.2.11", "cluster": "c2", "node": "n1"})
        );

        // SIGKILL: the routes stay. A restart finds them and changes nothing.
        let before = our_routes(&h).await;
        assert_eq!(before, [format!("10.2.1.0/24 via 192.0.2.11 proto {P}")]);
        let _ = ns.0.kill();
        let _ = ns.0.wait();
        assert_eq!(
            our_routes(&h).await,
            before,
            "routes gone with node-sync's SIGKILL"
        );
        let ns = start_node_sync(&etcd, Some(&remotes), port, &log);
        let doc = support::status_until(
            port,
            &log,
            "the restarted node-sync synced with its route",
            |d| d["ready"] == true && d["routing"]["routesInstalled"] == 1,
        )
        .await;
        assert_eq!(doc["routing"]["changesTotal"], 0, "{:#}", doc["routing"]);
        assert_eq!(our_routes(&h).await, before);
        // The first route event since the SIGKILL must be the test's marker: any other is a blip.
        add_foreign(&h, "10.8.0.0/24", "192.0.2.52").await;
        let blips = route_event_any(&mut events, "10.8.0.0/24").await;
        assert!(
            blips.is_empty(),
            "routes changed across the restart: {blips:?}"
        );

        // c3 announces a CIDR inside c2's n1: both refused, c2's route withdrawn, both in the status and
        // counted in the metrics.
        let (k, v) = node_value("c3", "m1", "192.0.2.21", &["10.2.1.128/25"]);
        c3.put(k.clone(), v).await;
        route_event(&mut events, "10.2.1.0/24", false, Duration::from_secs(1)).await;
        let doc = support::status_until(port, &log, "two refusals", |d| {
            d["routing"]["refused"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
        })
        .await;
        let reasons: Vec<String> = doc["routing"]["refused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {}/{}: {}",
                    r["cidr"].as_str().unwrap(),
                    r["cluster"].as_str().unwrap(),
                    r["node"].as_str().unwrap(),
                    r["reason"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "10.2.1.0/24 c2/n1: overlaps 10.2.1.128/25 of node m1 in cluster c3",
                "10.2.1.128/25 c3/m1: overlaps 10.2.1.0/24 of node n1 in cluster c2",
            ]
        );
        assert_eq!(doc["routing"]["routesInstalled"], 0);
        assert!(our_routes(&h).await.is_empty());
        let (_, metrics) = support::http_get(port, "/metrics").await.unwrap();
        for needle in [
            "nodesync_routing_routes{mode=\"native\"} 0",
            "nodesync_routing_refused_total{mode=\"native\"} 2",
            "nodesync_routing_errors_total{mode=\"native\"} 0",
        ] {
            assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
        }
        // c3 withdraws it: c2's route comes back.
        c3.delete(k).await;
        route_event(&mut events, "10.2.1.0/24", true, Duration::from_secs(1)).await;
        let log_text = std::fs::read_to_string(&log).unwrap();
        for needle in ["route added", "route removed", "pod CIDR refused"] {
            assert!(
                log_text.contains(needle),
                "no {needle:?} in the log:\n{log_text}"
            );
        }
        drop(ns);
    });
}

/// The next route event of any protocol: the lines of those before the one to `dst`.
async fn route_event_any(events: &mut RouteEvents, dst: &str) -> Vec<String> {
    let mut others = Vec::new();
    loop {
        let (msg, _) = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("a route event within 5 s")
            .expect("the route monitor");
        let (what, m) = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => ("add", m),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(m)) => ("del", m),
            _ => continue,
        };
        let (d, proto) = route_dst(&m);
        if d == dst {
            return others;
        }
        others.push(format!("{what} {d} proto {proto}"));
    }
}

/// Through KVStoreMesh the local etcd holds every peer's keys, nodes among them: node-sync `--kvstoremesh
/// --routing native` routes a mirrored peer's pod CIDRs and withdraws them with the mirrored node.
#[test]
fn routing_native_follows_the_nodes_kvstoremesh_mirrors_into_the_local_etcd() {
    in_new_netns(|| async {
        let _h = underlay().await;
        let (mconn, _mh, mut events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route]).unwrap();
        tokio::spawn(mconn);
        let etcd = support::Etcd::start().await;
        let mut c1 = support::ApiWriter::new(&etcd, "c1", 1).await;
        // c2's keys as KVStoreMesh mirrors them into c1's etcd (the same keys, under c2's prefixes).
        let mut c2 = support::ApiWriter::new(&etcd, "c2", 2).await;
        c1.publish_all(vec![], vec![]).await;
        c2.publish_all(vec![], vec![]).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node-sync.log");
        let port = support::free_port();
        let _ns = start_node_sync(&etcd, None, port, &log);
        support::status_until(port, &log, "ready", |d| d["ready"] == true).await;

        let (k, v) = node_value("c2", "n1", "192.0.2.11", &["10.2.1.0/24"]);
        let t = Instant::now();
        c2.put(k.clone(), v).await;
        route_event(&mut events, "10.2.1.0/24", true, Duration::from_secs(1)).await;
        let added = t.elapsed();
        c2.delete(k).await;
        route_event(&mut events, "10.2.1.0/24", false, Duration::from_secs(1)).await;
        eprintln!("kvstoremesh: mirrored node put -> route added {added:?}");
        // The local cluster's own nodes are never routed.
        let (k, v) = node_value("c1", "n2", "192.0.2.31", &["10.1.2.0/24"]);
        c1.put(k, v).await;
        let (k, v) = node_value("c2", "n3", "192.0.2.13", &["10.2.3.0/24"]);
        c2.put(k, v).await;
        let others = route_event(&mut events, "10.2.3.0/24", true, Duration::from_secs(1)).await;
        assert!(others.is_empty(), "{others:?}");
        let doc = support::status_until(port, &log, "one route", |d| {
            d["routing"]["routesInstalled"] == 1
        })
        .await;
        assert_eq!(
            doc["routing"]["routes"][0]["node"], "n3",
            "{:#}",
            doc["routing"]
        );
    });
}
