//! `--routing vxlan` against the kernel: two network namespaces the test makes, "node A" and "node B", joined by
//! a veth that carries only the nodes' addresses (192.0.2.1 and .2, or 2001:db8::1 and ::2), each with a pod
//! address on `lo` (10.1.1.1 in A's pod CIDR 10.1.1.0/24, 10.2.1.1 in B's 10.2.1.0/24). Nothing routes the pod
//! CIDRs but what node-sync installs, so a TCP connection between the pod addresses goes through
//! `clustermesh0` or nowhere. The host's links and routes are never read or written. Needs root
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN for the namespaces): the tests fail, not skip, without it. The last test runs
//! the `node-sync` binary with `--routing vxlan` in node A, fed by a real etcd there.

mod support;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use mesh_model::ClusterName;
use mesh_model::keys::MeshKey;
use mesh_model::values::{MeshValue, NodeAddress, NodeInfo};
use node_sync::routing::{
    DeviceState, Entries, NetlinkVxlan, NodeSet, OverlayRoute, RemoteNode, RouteManager,
    RouteOwner, RoutingStatus, VXLAN_DEVICE, VxlanConfig, VxlanKernel, VxlanRoutes, mac_for,
};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{LinkUnspec, LinkVeth, LinkVxlan, MulticastGroup, RouteMessageBuilder};

/// A network namespace of the test's own, kept by a file descriptor; gone when the last one closes.
struct Netns {
    fd: OwnedFd,
}

impl Netns {
    fn new() -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "routing_vxlan needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to make network namespaces and links"
        );
        let fd = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            OwnedFd::from(
                std::fs::File::open("/proc/thread-self/ns/net").expect("open the new netns"),
            )
        })
        .join()
        .expect("the netns thread");
        Netns { fd }
    }

    /// Runs `f` to completion on a current-thread runtime in a thread that entered this namespace.
    fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let fd = self.fd.try_clone().expect("dup the netns fd");
        std::thread::spawn(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

fn handle() -> rtnetlink::Handle {
    let (conn, h, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    h
}

async fn link(h: &rtnetlink::Handle, name: &str) -> LinkMessage {
    h.link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .unwrap_or_else(|e| panic!("link {name}: {e}"))
        .unwrap_or_else(|| panic!("link {name}"))
}

async fn up(h: &rtnetlink::Handle, name: &str) -> u32 {
    let i = link(h, name).await.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(i).up().build())
        .execute()
        .await
        .unwrap();
    i
}

async fn set_mtu(h: &rtnetlink::Handle, name: &str, mtu: u32) {
    let i = link(h, name).await.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(i).mtu(mtu).build())
        .execute()
        .await
        .unwrap();
}

async fn add_addr(h: &rtnetlink::Handle, index: u32, a: IpAddr, prefix: u8) {
    let mut req = h.address().add(index, a, prefix);
    // No duplicate address detection: an IPv6 address is usable at once.
    req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    req.execute().await.unwrap();
}

/// The two nodes. `v6`: the underlay is IPv6 (the pod CIDRs stay IPv4).
struct Pair {
    a: Netns,
    b: Netns,
    a_ip: IpAddr,
    b_ip: IpAddr,
}

const A_POD: &str = "10.1.1.1";
const B_POD: &str = "10.2.1.1";

fn pair(v6: bool, a_mtu: u32) -> Pair {
    let (a, b) = (Netns::new(), Netns::new());
    let (a_ip, b_ip): (IpAddr, IpAddr) = if v6 {
        (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        )
    } else {
        ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap())
    };
    let prefix = if v6 { 64 } else { 24 };
    let b_fd = b.fd.try_clone().unwrap();
    a.run(move || async move {
        let h = handle();
        let lo = up(&h, "lo").await;
        add_addr(&h, lo, A_POD.parse().unwrap(), 32).await;
        h.link()
            .add(LinkVeth::new("under0", "under1").build())
            .execute()
            .await
            .unwrap();
        let peer = link(&h, "under1").await.header.index;
        h.link()
            .set(
                LinkUnspec::new_with_index(peer)
                    .setns_by_fd(b_fd.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .unwrap();
        set_mtu(&h, "under0", a_mtu).await;
        let u = up(&h, "under0").await;
        add_addr(&h, u, a_ip, prefix).await;
    });
    b.run(move || async move {
        let h = handle();
        let lo = up(&h, "lo").await;
        add_addr(&h, lo, B_POD.parse().unwrap(), 32).await;
        let u = up(&h, "under1").await;
        add_addr(&h, u, b_ip, prefix).await;
    });
    Pair { a, b, a_ip, b_ip }
}

fn node(cluster: &str, name: &str, ip: IpAddr, cidr: &str) -> RemoteNode {
    RemoteNode {
        cluster: ClusterName::new(cluster).unwrap(),
        name: name.into(),
        addresses: vec![ip],
        pod_cidrs: vec![cidr.parse().unwrap()],
    }
}

/// One node-sync start and sync in `ns`: a new table and manager (as after a restart); the manager's sync
/// makes or corrects the device, reconciles the routes and their entries, then sweeps the entries no route
/// needs.
fn sync(ns: &Netns, config: VxlanConfig, nodes: Vec<RemoteNode>) -> RoutingStatus {
    ns.run(move || async move {
        let vx = VxlanRoutes::open(config, RouteOwner::default()).unwrap();
        let mut m = RouteManager::new(vx);
        m.sync(&NodeSet {
            nodes,
            complete: true,
        })
        .await
        .expect("the sync")
        .clone()
    })
}

/// What `ns` has: the device, its entries, our routes.
fn state(ns: &Netns) -> (DeviceState, Entries, Vec<OverlayRoute>) {
    ns.run(|| async {
        let k = NetlinkVxlan::open(RouteOwner::default()).unwrap();
        let d = k
            .device(VXLAN_DEVICE)
            .await
            .unwrap()
            .expect("clustermesh0 exists");
        let e = k.entries(d.index).await.unwrap();
        let r = k.routes().await.unwrap().ours;
        (d, e, r)
    })
}

/// Packets the device sent and received.
fn counters(ns: &Netns) -> (u64, u64) {
    ns.run(|| async {
        let h = handle();
        link(&h, VXLAN_DEVICE)
            .await
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Stats64(s) => Some((s.tx_packets, s.rx_packets)),
                _ => None,
            })
            .expect("stats64")
    })
}

/// A TCP connection from A's pod address to B's, a line sent through it; the peer address B saw.
fn connect_pods(p: &Pair) -> Result<SocketAddr, String> {
    connect_pods_in(&p.a, &p.b)
}

/// `connect_pods` between the namespaces `a` and `b`.
fn connect_pods_in(a: &Netns, b: &Netns) -> Result<SocketAddr, String> {
    let listener = b.run(|| async { std::net::TcpListener::bind((B_POD, 0)).unwrap() });
    let to = listener.local_addr().unwrap();
    a.run(move || async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((A_POD.parse::<IpAddr>().unwrap(), 0).into())
            .unwrap();
        let mut c = tokio::time::timeout(Duration::from_secs(3), s.connect(to))
            .await
            .map_err(|_| format!("connect {A_POD} -> {to}: timed out"))?
            .map_err(|e| format!("connect {A_POD} -> {to}: {e}"))?;
        tokio::io::AsyncWriteExt::write_all(&mut c, b"hello over the overlay\n")
            .await
            .map_err(|e| e.to_string())
    })?;
    let (mut s, peer) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello over the overlay\n");
    s.write_all(b"").unwrap();
    Ok(peer)
}

fn cfg(local: IpAddr) -> VxlanConfig {
    VxlanConfig::new(local)
}

#[test]
fn routing_vxlan_carries_pod_traffic_between_two_nodes_and_a_restart_changes_nothing() {
    let p = pair(false, 1400);
    let e = connect_pods(&p).expect_err("no route to B's pods before node-sync");
    assert!(e.contains("unreachable"), "{e}");

    let st = sync(
        &p.a,
        cfg(p.a_ip),
        vec![node("c2", "b", p.b_ip, "10.2.1.0/24")],
    );
    assert_eq!(st.changes_total, 1, "{st:?}");
    sync(
        &p.b,
        cfg(p.b_ip),
        vec![node("c1", "a", p.a_ip, "10.1.1.0/24")],
    );

    // A's device, entries and route, as designed.
    let (d, e, r) = state(&p.a);
    assert_eq!(d.kind.as_deref(), Some("vxlan"));
    assert_eq!((d.vni, d.port), (Some(2), Some(8472)));
    assert_eq!(d.learning, Some(false));
    assert_eq!(d.local, Some(p.a_ip));
    assert_eq!(d.mtu, 1350, "the underlay's 1400 - 50");
    assert_eq!(d.mac, Some(mac_for(p.a_ip)));
    assert!(d.up);
    let b_mac = mac_for(p.b_ip);
    assert_eq!(e.fdb.iter().copied().collect::<Vec<_>>(), [(b_mac, p.b_ip)]);
    assert_eq!(
        e.neighbours
            .iter()
            .map(|(a, m)| (*a, *m))
            .collect::<Vec<_>>(),
        [("10.2.1.0".parse().unwrap(), b_mac)]
    );
    assert_eq!(
        r,
        [OverlayRoute {
            dst: "10.2.1.0/24".parse().unwrap(),
            via: Some("10.2.1.0".parse().unwrap()),
            oif: Some(d.index),
        }]
    );

    // Pod to pod, through the overlay: A's device sends, B's receives, B sees A's pod address.
    let (a_tx, _) = counters(&p.a);
    let (_, b_rx) = counters(&p.b);
    let peer = connect_pods(&p).expect("pod to pod after the sync");
    assert_eq!(peer.ip().to_string(), A_POD);
    let (a_tx2, _) = counters(&p.a);
    let (_, b_rx2) = counters(&p.b);
    assert!(
        a_tx2 > a_tx,
        "A's clustermesh0 sent nothing: {a_tx} -> {a_tx2}"
    );
    assert!(
        b_rx2 > b_rx,
        "B's clustermesh0 received nothing: {b_rx} -> {b_rx2}"
    );

    // A restart of A's node-sync: a link, neighbour/FDB and route monitor sees no change at all, only the
    // marker route the test adds after the sync.
    let b_ip = p.b_ip;
    let a_ip = p.a_ip;
    p.a.run(move || async move {
        let (mconn, _mh, mut events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
        ])
        .unwrap();
        tokio::spawn(mconn);
        let mut m = RouteManager::new(VxlanRoutes::open(cfg(a_ip), RouteOwner::default()).unwrap());
        let st = m
            .sync(&NodeSet {
                nodes: vec![node("c2", "b", b_ip, "10.2.1.0/24")],
                complete: true,
            })
            .await
            .unwrap()
            .clone();
        assert_eq!(
            st.changes_total, 0,
            "a restart with the same nodes changes nothing"
        );
        let h = handle();
        let marker = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("10.8.0.0".parse().unwrap(), 24)
            .unwrap()
            .gateway("192.0.2.52".parse().unwrap())
            .unwrap()
            .protocol(RouteProtocol::Static)
            .build();
        h.route().add(marker).execute().await.unwrap();
        let (msg, _) = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
            .expect("the monitor stream");
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r))
                if r.header.protocol == RouteProtocol::Static => {}
            other => panic!("something changed during the restart: {other:?}"),
        }
    });
    connect_pods(&p).expect("pod to pod after the restart");
}

#[test]
fn routing_vxlan_corrects_a_wrong_device_follows_the_underlay_mtu_and_removes_a_gone_node() {
    let p = pair(false, 1500);
    // A device left with another VNI and port, learning on and the wrong MTU (another configuration, an
    // older node-sync).
    p.a.run(|| async {
        let h = handle();
        h.link()
            .add(
                LinkVxlan::new(VXLAN_DEVICE, 7)
                    .port(4789)
                    .learning(true)
                    .mtu(1500)
                    .build(),
            )
            .execute()
            .await
            .unwrap();
    });
    let before = state(&p.a).0;
    assert_eq!((before.vni, before.port), (Some(7), Some(4789)));

    // A knows B and a node C that is not there (its entries are only looked at).
    let c_ip: IpAddr = "192.0.2.3".parse().unwrap();
    let both = vec![
        node("c2", "b", p.b_ip, "10.2.1.0/24"),
        node("c3", "c", c_ip, "10.3.1.0/24"),
    ];
    sync(&p.a, cfg(p.a_ip), both.clone());
    sync(
        &p.b,
        cfg(p.b_ip),
        vec![node("c1", "a", p.a_ip, "10.1.1.0/24")],
    );
    let (d, e, r) = state(&p.a);
    assert_eq!(
        (d.vni, d.port),
        (Some(2), Some(8472)),
        "VNI and port corrected"
    );
    assert_ne!(
        d.index, before.index,
        "made again: the kernel changes neither in place"
    );
    assert_eq!((d.learning, d.mtu), (Some(false), 1450));
    assert_eq!(e.fdb.len(), 2);
    assert_eq!(r.len(), 2);
    connect_pods(&p).expect("pod to pod through the corrected device");

    // The underlay's MTU changes: corrected in place at the next sync, nothing else moves.
    p.a.run(|| async { set_mtu(&handle(), "under0", 9000).await });
    let st = sync(&p.a, cfg(p.a_ip), both.clone());
    assert_eq!(st.changes_total, 0);
    let (d2, e2, r2) = state(&p.a);
    assert_eq!(d2.index, d.index, "the MTU changes in place");
    assert_eq!(d2.mtu, 8950);
    assert_eq!((e2, r2), (e, r));

    // C leaves: its route, neighbour and FDB entries go; B's stay and carry traffic.
    let st = sync(&p.a, cfg(p.a_ip), both[..1].to_vec());
    assert_eq!(
        st.changes_total, 2,
        "C's route (and neighbour entry) removed, its FDB entry swept"
    );
    let (_, e, r) = state(&p.a);
    assert_eq!(
        e.fdb.iter().copied().collect::<Vec<_>>(),
        [(mac_for(p.b_ip), p.b_ip)]
    );
    assert_eq!(
        e.neighbours
            .keys()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["10.2.1.0"]
    );
    assert_eq!(
        r.iter().map(|r| r.dst).collect::<Vec<IpNet>>(),
        ["10.2.1.0/24".parse::<IpNet>().unwrap()]
    );
    connect_pods(&p).expect("pod to pod after C left");

    // With no --vxlan-local-address, node-sync takes the address of the default route's device; with no
    // default route it says what to give.
    let a_ip = p.a_ip;
    p.a.run(move || async move {
        let k = NetlinkVxlan::open(RouteOwner::default()).unwrap();
        let e = k.default_route_address().await.unwrap_err().to_string();
        assert!(e.contains("--vxlan-local-address"), "{e}");
        let h = handle();
        let default = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("0.0.0.0".parse().unwrap(), 0)
            .unwrap()
            .gateway("192.0.2.2".parse().unwrap())
            .unwrap()
            .build();
        h.route().add(default).execute().await.unwrap();
        assert_eq!(k.default_route_address().await.unwrap(), a_ip);
    });
}

#[test]
fn routing_vxlan_over_an_ipv6_underlay_carries_ipv4_pods_with_a_70_byte_overhead() {
    let p = pair(true, 1500);
    // The nodes publish an IPv4 address too (not on the underlay): the tunnel goes to the IPv6 one.
    let mut b = node("c2", "b", p.b_ip, "10.2.1.0/24");
    b.addresses.insert(0, "198.51.100.2".parse().unwrap());
    let st = sync(&p.a, cfg(p.a_ip), vec![b]);
    assert_eq!(st.routes[0].gateway, p.b_ip, "{st:?}");
    sync(
        &p.b,
        cfg(p.b_ip),
        vec![node("c1", "a", p.a_ip, "10.1.1.0/24")],
    );
    let (d, e, _) = state(&p.a);
    assert_eq!(d.mtu, 1430, "1500 - 70");
    assert_eq!(d.local, Some(p.a_ip));
    assert_eq!(
        e.fdb.iter().copied().collect::<Vec<_>>(),
        [(mac_for(p.b_ip), p.b_ip)]
    );
    let peer = connect_pods(&p).expect("pod to pod over the IPv6 underlay");
    assert_eq!(peer.ip().to_string(), A_POD);
}

#[test]
fn routing_vxlan_carries_ipv6_pods_over_an_ipv4_underlay() {
    let p = pair(false, 1500);
    for (ns, pod) in [(&p.a, "fd00:1:1::1"), (&p.b, "fd00:2:1::1")] {
        ns.run(move || async move {
            let h = handle();
            let lo = link(&h, "lo").await.header.index;
            add_addr(&h, lo, pod.parse().unwrap(), 128).await;
        });
    }
    let mut b = node("c2", "b", p.b_ip, "10.2.1.0/24");
    b.pod_cidrs.push("fd00:2:1::/64".parse().unwrap());
    let st = sync(&p.a, cfg(p.a_ip), vec![b]);
    assert!(st.refused.is_empty(), "{st:?}");
    assert_eq!(st.routes.len(), 2, "{st:?}");
    let mut a = node("c1", "a", p.a_ip, "10.1.1.0/24");
    a.pod_cidrs.push("fd00:1:1::/64".parse().unwrap());
    sync(&p.b, cfg(p.b_ip), vec![a]);
    let (_, e, r) = state(&p.a);
    assert_eq!(e.fdb.len(), 1, "one FDB entry for the node: {e:?}");
    assert_eq!(
        e.neighbours
            .keys()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["10.2.1.0", "fd00:2:1::"]
    );
    assert_eq!(r.len(), 2, "{r:?}");

    let listener =
        p.b.run(|| async { std::net::TcpListener::bind(("fd00:2:1::1", 0)).unwrap() });
    let to = listener.local_addr().unwrap();
    p.a.run(move || async move {
        let s = tokio::net::TcpSocket::new_v6().unwrap();
        s.bind(("fd00:1:1::1".parse::<IpAddr>().unwrap(), 0).into())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), s.connect(to))
            .await
            .expect("IPv6 pod connect within 3 s")
            .expect("IPv6 pod to pod through the overlay");
    });
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "fd00:1:1::1");
}

/// `node-sync --routing vxlan` for node a of c1, in the calling thread's network namespace, its log appended to
/// `log`.
fn start_node_sync(
    etcd: &support::Etcd,
    remotes: &Path,
    port: u16,
    local: IpAddr,
    log: &Path,
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
            "a",
        ])
        .args(["--etcd-endpoints", &etcd.url()])
        .arg("--remote-config-dir")
        .arg(remotes)
        .args(["--status-listen", &format!("127.0.0.1:{port}")])
        .args(["--fake-maps", "--routing", "vxlan"])
        .args(["--vxlan-local-address", &local.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn node-sync");
    support::NodeSync(child)
}

/// A node of `cluster` at `ip` with `cidr`, as the apiserver publishes it.
fn node_value(cluster: &str, name: &str, ip: IpAddr, cidr: &str) -> (MeshKey, MeshValue) {
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
                ip,
            }],
            zone: None,
            region: None,
            pod_cidrs: vec![cidr.parse().unwrap()],
        }),
    )
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A monitor of links, neighbour/FDB entries and IPv4 routes in the calling thread's namespace.
fn monitor() -> Events {
    let (conn, _h, events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
    ])
    .unwrap();
    tokio::spawn(conn);
    events
}

/// One line per event: `newroute 10.2.1.0/24 proto 157`, `delneigh family Bridge`, `newlink clustermesh0`.
fn describe(m: &RouteNetlinkMessage) -> String {
    match m {
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            let dst = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    rtnetlink::packet_route::route::RouteAttribute::Destination(d) => {
                        Some(format!("{d:?}"))
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let dst = dst.trim_start_matches("Inet(").trim_end_matches(')');
            format!(
                "{} {dst}/{} proto {}",
                if matches!(m, RouteNetlinkMessage::NewRoute(_)) {
                    "newroute"
                } else {
                    "delroute"
                },
                r.header.destination_prefix_length,
                u8::from(r.header.protocol)
            )
        }
        RouteNetlinkMessage::NewNeighbour(n) => format!("newneigh family {:?}", n.header.family),
        RouteNetlinkMessage::DelNeighbour(n) => format!("delneigh family {:?}", n.header.family),
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => format!(
            "{} {}",
            if matches!(m, RouteNetlinkMessage::NewLink(_)) {
                "newlink"
            } else {
                "dellink"
            },
            l.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        ),
        other => format!("{other:?}"),
    }
}

/// Waits (up to `limit`) for an event described as `want`; returns the descriptions of those before it.
async fn event(events: &mut Events, want: &str, limit: Duration) -> Vec<String> {
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (msg, _) = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within {limit:?}; other events: {others:?}"))
            .expect("the monitor");
        let NetlinkPayload::InnerMessage(m) = msg.payload else {
            continue;
        };
        let d = describe(&m);
        if d == want {
            return others;
        }
        others.push(d);
    }
}

/// The whole feed with the binary: etcd and `node-sync --routing vxlan` in node A; c2 publishes node B with
/// its pod CIDR. The device, FDB/neighbour entries and route come up and carry pod traffic to B; a SIGKILL
/// leaves them and traffic flowing; a restart changes nothing (a link/neighbour/route monitor sees no event);
/// B's node key deleted takes its route and entries within a second.
#[test]
fn routing_vxlan_end_to_end_from_etcd_node_keys_through_the_binary() {
    let p = pair(false, 1500);
    // B's side, by the library: its route back to A's pods.
    sync(
        &p.b,
        cfg(p.b_ip),
        vec![node("c1", "a", p.a_ip, "10.1.1.0/24")],
    );
    let (a, b) = (
        Netns {
            fd: p.a.fd.try_clone().unwrap(),
        },
        Netns {
            fd: p.b.fd.try_clone().unwrap(),
        },
    );
    let (a_ip, b_ip) = (p.a_ip, p.b_ip);
    p.a.run(move || async move {
        let mut events = monitor();
        let etcd = support::Etcd::start().await;
        let mut c1 = support::ApiWriter::new(&etcd, "c1", 1).await;
        c1.publish_all(vec![], vec![]).await;
        let mut c2 = support::ApiWriter::new(&etcd, "c2", 2).await;
        let (k, v) = node_value("c2", "b", b_ip, "10.2.1.0/24");
        c2.put(k.clone(), v).await;
        c2.publish_all(vec![], vec![]).await;
        let dir = tempfile::tempdir().unwrap();
        let remotes = dir.path().join("remotes");
        std::fs::create_dir(&remotes).unwrap();
        support::remote_file(&remotes, "c2", &etcd);
        let log = dir.path().join("node-sync.log");
        let port = support::free_port();

        let t0 = Instant::now();
        let mut ns = start_node_sync(&etcd, &remotes, port, a_ip, &log);
        event(&mut events, "newroute 10.2.1.0/24 proto 157", Duration::from_secs(20)).await;
        eprintln!("vxlan route up {:?} after node-sync's start", t0.elapsed());
        let doc = support::status_until(port, &log, "one route", |d| {
            d["routing"]["routesInstalled"] == 1
        })
        .await;
        assert_eq!(doc["routing"]["mode"], "vxlan", "{:#}", doc["routing"]);
        assert_eq!(
            doc["routing"]["device"],
            serde_json::json!({"name": "clustermesh0", "vni": 2, "port": 8472, "local": a_ip.to_string(),
                               "underlay": "under0", "mtu": 1450})
        );
        assert_eq!(
            doc["routing"]["routes"][0],
            serde_json::json!({"cidr": "10.2.1.0/24", "via": b_ip.to_string(), "cluster": "c2", "node": "b"})
        );
        let (d, e, _) = state(&a);
        assert_eq!((d.vni, d.port, d.mtu), (Some(2), Some(8472), 1450));
        assert_eq!(e.fdb.iter().copied().collect::<Vec<_>>(), [(mac_for(b_ip), b_ip)]);
        let t = Instant::now();
        connect_pods_in(&a, &b).expect("pod to pod through node-sync's overlay");
        eprintln!("pod-to-pod connect + line through the overlay: {:?}", t.elapsed());

        // SIGKILL: everything stays and still carries traffic.
        let _ = ns.0.kill();
        let _ = ns.0.wait();
        let kept = state(&a);
        connect_pods_in(&a, &b).expect("pod to pod with node-sync dead");
        // A restart: nothing changes, not even for a moment.
        let mut after_kill = monitor();
        let ns = start_node_sync(&etcd, &remotes, port, a_ip, &log);
        let doc = support::status_until(port, &log, "the restarted node-sync synced", |d| {
            d["ready"] == true && d["routing"]["routesInstalled"] == 1
        })
        .await;
        assert_eq!(doc["routing"]["changesTotal"], 0, "{:#}", doc["routing"]);
        assert_eq!(doc["routing"]["errorsTotal"], 0, "{:#}", doc["routing"]);
        assert_eq!(state(&a), kept);
        let h = handle();
        let marker = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("10.8.0.0".parse().unwrap(), 24)
            .unwrap()
            .gateway("192.0.2.52".parse().unwrap())
            .unwrap()
            .protocol(RouteProtocol::Static)
            .build();
        h.route().add(marker).execute().await.unwrap();
        let blips = event(&mut after_kill, "newroute 10.8.0.0/24 proto 4", Duration::from_secs(5)).await;
        assert!(blips.is_empty(), "changes across the restart: {blips:?}");

        // B leaves: its route, then its FDB entry, within a second of the delete.
        let t = Instant::now();
        c2.delete(k).await;
        event(&mut after_kill, "delroute 10.2.1.0/24 proto 157", Duration::from_secs(1)).await;
        event(&mut after_kill, "delneigh family Bridge", Duration::from_secs(1)).await;
        eprintln!("node deleted -> route and FDB entry gone {:?}", t.elapsed());
        let (_, e, r) = state(&a);
        assert!(e.fdb.is_empty() && e.neighbours.is_empty() && r.is_empty(), "{e:?} {r:?}");
        let err = connect_pods_in(&a, &b).expect_err("B's pods unreachable once B left");
        assert!(err.contains("unreachable"), "{err}");
        let log_text = std::fs::read_to_string(&log).unwrap();
        for needle in ["vxlan device created", "route added", "route removed", "vxlan FDB entry removed"] {
            assert!(log_text.contains(needle), "no {needle:?} in the log:\n{log_text}");
        }
        drop(ns);
    });
}
