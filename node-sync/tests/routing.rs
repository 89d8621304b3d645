//! `--routing native`'s route manager against the kernel, in a network namespace each test makes for itself
//! (a thread that unshares its network namespace; the host's routes are never read or written). Needs root.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use mesh_model::ClusterName;
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
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
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
