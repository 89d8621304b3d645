//! The pure part of the route manager: which routes the remote nodes call for, which pod CIDRs are refused
//! because they overlap, and the fewest changes that bring what is installed to what is wanted. No netlink here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_model::ClusterName;

/// A node of another cluster, as the route manager needs it (from `clustermesh/v1/nodes/<cluster>/<node>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// The node's cluster.
    pub cluster: ClusterName,
    /// The node's name.
    pub name: String,
    /// The node's addresses, preferred first (InternalIP before ExternalIP): the first of a pod CIDR's
    /// family is that CIDR's gateway.
    pub addresses: Vec<IpAddr>,
    /// The node's pod CIDRs (`Node.spec.podCIDRs`).
    pub pod_cidrs: Vec<IpNet>,
}

/// A route node-sync wants: `dst via gateway`, for one pod CIDR of one remote node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DesiredRoute {
    /// The pod CIDR (normalised: host bits cleared).
    pub dst: IpNet,
    /// The node's address of the CIDR's family.
    pub gateway: IpAddr,
    /// Whose CIDR it is.
    pub cluster: ClusterName,
    /// The node's name.
    pub node: String,
}

/// A route installed with node-sync's protocol id (read back from the kernel).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstalledRoute {
    /// Destination.
    pub dst: IpNet,
    /// Gateway, if the route has one.
    pub gateway: Option<IpAddr>,
}

/// Why a pod CIDR gets no route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// It overlaps a pod CIDR of another remote node (of another cluster or of the same one). Both are refused:
    /// where traffic for the overlap should go is ambiguous, and refusing both does not depend on which was seen
    /// first.
    OverlapsRemote {
        /// The other node's cluster.
        cluster: ClusterName,
        /// The other node.
        node: String,
        /// The other node's CIDR.
        cidr: IpNet,
    },
    /// It overlaps a route of this node that node-sync did not make (the local pod CIDR, a node subnet, another
    /// agent's route); the default route does not count.
    OverlapsLocal {
        /// The local route's destination.
        route: IpNet,
    },
    /// The node has no address of the family its route needs (the CIDR's; the underlay's with vxlan).
    NoGateway,
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::OverlapsRemote {
                cluster,
                node,
                cidr,
            } => write!(f, "overlaps {cidr} of node {node} in cluster {cluster}"),
            RefusalReason::OverlapsLocal { route } => {
                write!(
                    f,
                    "overlaps the local route to {route}, not made by node-sync"
                )
            }
            RefusalReason::NoGateway => {
                write!(f, "the node has no address of the family its route needs")
            }
        }
    }
}

/// A pod CIDR that gets no route, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    /// The refused CIDR.
    pub cidr: IpNet,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its node.
    pub node: String,
    /// Why.
    pub reason: RefusalReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod CIDR {} of node {} in cluster {}: {}",
            self.cidr, self.node, self.cluster, self.reason
        )
    }
}

/// What the remote nodes call for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// One route per accepted pod CIDR, sorted by destination.
    pub routes: Vec<DesiredRoute>,
    /// The refused CIDRs, sorted.
    pub refused: Vec<Refusal>,
}

/// Whether two networks share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Which of a remote node's addresses a route to its pod CIDR goes through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GatewayFamily {
    /// The node's first address of the CIDR's family (`--routing native`: the route's gateway).
    #[default]
    OfCidr,
    /// The node's first IPv4 address, whatever the CIDR's family (`--routing vxlan` on an IPv4 underlay: the
    /// tunnel's remote end).
    Ipv4,
    /// The node's first IPv6 address (`--routing vxlan` on an IPv6 underlay).
    Ipv6,
}

/// The routes for `nodes`: one per pod CIDR via the node's first address of the CIDR's family. A CIDR that
/// overlaps another node's CIDR (both refused) or one of `local` (destinations of routes on this node that
/// node-sync did not make; a default route is ignored) is refused; so is one without a gateway of its family.
/// A node listing the same CIDR twice gets one route.
pub fn plan_routes(nodes: &[RemoteNode], local: &[IpNet]) -> RoutePlan {
    plan_routes_via(nodes, local, GatewayFamily::OfCidr)
}

/// `plan_routes` with the gateway's family chosen by `via`: a node without an address of that family gets
/// its CIDRs refused (`NoGateway`).
pub fn plan_routes_via(nodes: &[RemoteNode], local: &[IpNet], via: GatewayFamily) -> RoutePlan {
    let mut candidates: Vec<DesiredRoute> = Vec::new();
    let mut refused = Vec::new();
    for n in nodes {
        for cidr in &n.pod_cidrs {
            let dst = cidr.trunc();
            let want_v4 = match via {
                GatewayFamily::OfCidr => dst.addr().is_ipv4(),
                GatewayFamily::Ipv4 => true,
                GatewayFamily::Ipv6 => false,
            };
            let gateway = n.addresses.iter().find(|a| a.is_ipv4() == want_v4);
            match gateway {
                Some(gw) => candidates.push(DesiredRoute {
                    dst,
                    gateway: *gw,
                    cluster: n.cluster.clone(),
                    node: n.name.clone(),
                }),
                None => refused.push(Refusal {
                    cidr: dst,
                    cluster: n.cluster.clone(),
                    node: n.name.clone(),
                    reason: RefusalReason::NoGateway,
                }),
            }
        }
    }
    candidates.sort();
    candidates.dedup_by(|a, b| a.dst == b.dst && a.cluster == b.cluster && a.node == b.node);

    let mut routes = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let mut bad = false;
        for (j, o) in candidates.iter().enumerate() {
            if i != j && overlaps(&c.dst, &o.dst) {
                bad = true;
                refused.push(Refusal {
                    cidr: c.dst,
                    cluster: c.cluster.clone(),
                    node: c.node.clone(),
                    reason: RefusalReason::OverlapsRemote {
                        cluster: o.cluster.clone(),
                        node: o.node.clone(),
                        cidr: o.dst,
                    },
                });
            }
        }
        for l in local {
            if l.prefix_len() > 0 && overlaps(&c.dst, l) {
                bad = true;
                refused.push(Refusal {
                    cidr: c.dst,
                    cluster: c.cluster.clone(),
                    node: c.node.clone(),
                    reason: RefusalReason::OverlapsLocal { route: l.trunc() },
                });
            }
        }
        if !bad {
            routes.push(c.clone());
        }
    }
    refused.sort();
    refused.dedup();
    RoutePlan { routes, refused }
}

/// The changes from what is installed (with node-sync's protocol id) to what is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Routes to add (nothing of ours there yet).
    pub add: Vec<DesiredRoute>,
    /// Routes of ours to replace in place (another gateway): no moment without a route.
    pub replace: Vec<DesiredRoute>,
    /// Routes of ours to delete.
    pub remove: Vec<InstalledRoute>,
}

impl RouteDiff {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.remove.is_empty()
    }
}

/// The fewest changes from `installed` to `desired`. With `prune` false (some cluster has not finished its
/// initial sync, so its nodes may still be missing) nothing is removed: a restart never withdraws a route
/// before it knows the route is no longer wanted.
pub fn diff_routes(
    desired: &[DesiredRoute],
    installed: &[InstalledRoute],
    prune: bool,
) -> RouteDiff {
    let have: BTreeMap<IpNet, Option<IpAddr>> =
        installed.iter().map(|r| (r.dst, r.gateway)).collect();
    let want: BTreeMap<IpNet, &DesiredRoute> = desired.iter().map(|r| (r.dst, r)).collect();
    let mut out = RouteDiff::default();
    for (dst, r) in &want {
        match have.get(dst) {
            None => out.add.push((*r).clone()),
            Some(gw) if *gw != Some(r.gateway) => out.replace.push((*r).clone()),
            Some(_) => {}
        }
    }
    if prune {
        out.remove = installed
            .iter()
            .filter(|r| !want.contains_key(&r.dst))
            .cloned()
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn node(cluster: &str, name: &str, ip: &str, cidrs: &[&str]) -> RemoteNode {
        RemoteNode {
            cluster: c(cluster),
            name: name.into(),
            addresses: vec![ip.parse().unwrap()],
            pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn one_route_per_pod_cidr_via_the_node_address_of_its_family() {
        let mut n = node("c2", "n1", "192.0.2.11", &["10.2.1.0/24", "fd00:2:1::/64"]);
        n.addresses.push("2001:db8::11".parse().unwrap());
        let p = plan_routes(&[n, node("c2", "n2", "192.0.2.12", &["10.2.2.0/24"])], &[]);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        let got: Vec<(String, String)> = p
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.gateway.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.2.1.0/24".into(), "192.0.2.11".into()),
                ("10.2.2.0/24".into(), "192.0.2.12".into()),
                ("fd00:2:1::/64".into(), "2001:db8::11".into()),
            ]
        );
    }

    #[test]
    fn overlapping_pod_cidrs_between_clusters_are_both_refused_and_the_rest_routed() {
        let p = plan_routes(
            &[
                node("c2", "n1", "192.0.2.11", &["10.2.0.0/16"]),
                node("c3", "m1", "192.0.2.21", &["10.2.5.0/24"]),
                node("c3", "m2", "192.0.2.22", &["10.3.2.0/24"]),
            ],
            &[],
        );
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].dst, net("10.3.2.0/24"));
        assert_eq!(p.refused.len(), 2);
        assert_eq!(
            p.refused[0].to_string(),
            "pod CIDR 10.2.0.0/16 of node n1 in cluster c2: overlaps 10.2.5.0/24 of node m1 in cluster c3"
        );
        assert_eq!(p.refused[1].cidr, net("10.2.5.0/24"));
    }

    #[test]
    fn a_pod_cidr_overlapping_a_local_route_is_refused_but_the_default_route_does_not_count() {
        let p = plan_routes(
            &[
                node("c2", "n1", "192.0.2.11", &["10.1.7.0/24"]),
                node("c2", "n2", "192.0.2.12", &["10.2.2.0/24"]),
            ],
            &[net("10.1.0.0/16"), net("0.0.0.0/0")],
        );
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].node, "n2");
        assert_eq!(
            p.refused[0].reason,
            RefusalReason::OverlapsLocal {
                route: net("10.1.0.0/16")
            }
        );
    }

    #[test]
    fn an_underlay_family_gateway_carries_both_families_of_pod_cidrs() {
        let mut n = node("c2", "n1", "192.0.2.11", &["10.2.1.0/24", "fd00:2:1::/64"]);
        n.addresses.push("2001:db8::11".parse().unwrap());
        let p = plan_routes_via(&[n.clone()], &[], GatewayFamily::Ipv4);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert!(
            p.routes
                .iter()
                .all(|r| r.gateway.to_string() == "192.0.2.11")
        );
        let p = plan_routes_via(&[n], &[], GatewayFamily::Ipv6);
        assert!(
            p.routes
                .iter()
                .all(|r| r.gateway.to_string() == "2001:db8::11")
        );
        let p = plan_routes_via(
            &[node("c2", "n2", "192.0.2.12", &["10.2.2.0/24"])],
            &[],
            GatewayFamily::Ipv6,
        );
        assert_eq!(p.refused[0].reason, RefusalReason::NoGateway);
    }

    #[test]
    fn a_cidr_without_a_gateway_of_its_family_is_refused() {
        let p = plan_routes(&[node("c2", "n1", "192.0.2.11", &["fd00::/64"])], &[]);
        assert!(p.routes.is_empty());
        assert_eq!(p.refused[0].reason, RefusalReason::NoGateway);
    }

    #[test]
    fn host_bits_are_cleared_and_a_repeated_cidr_is_one_route() {
        let p = plan_routes(
            &[node(
                "c2",
                "n1",
                "192.0.2.11",
                &["10.2.1.7/24", "10.2.1.0/24"],
            )],
            &[],
        );
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].dst, net("10.2.1.0/24"));
    }

    fn installed(dst: &str, gw: &str) -> InstalledRoute {
        InstalledRoute {
            dst: net(dst),
            gateway: Some(gw.parse().unwrap()),
        }
    }

    #[test]
    fn the_diff_adds_replaces_a_moved_gateway_and_removes_only_when_pruning() {
        let want = plan_routes(
            &[
                node("c2", "n1", "192.0.2.11", &["10.2.1.0/24"]),
                node("c2", "n2", "192.0.2.99", &["10.2.2.0/24"]),
            ],
            &[],
        )
        .routes;
        let have = [
            installed("10.2.2.0/24", "192.0.2.12"),
            installed("10.2.3.0/24", "192.0.2.13"),
        ];
        let d = diff_routes(&want, &have, true);
        assert_eq!(d.add.len(), 1);
        assert_eq!(d.add[0].dst, net("10.2.1.0/24"));
        assert_eq!(d.replace.len(), 1);
        assert_eq!(d.replace[0].gateway.to_string(), "192.0.2.99");
        assert_eq!(d.remove, [installed("10.2.3.0/24", "192.0.2.13")]);

        let d = diff_routes(&want, &have, false);
        assert!(d.remove.is_empty());
        assert_eq!(d.add.len() + d.replace.len(), 2);
    }

    #[test]
    fn what_is_installed_and_wanted_needs_no_change() {
        let want = plan_routes(&[node("c2", "n1", "192.0.2.11", &["10.2.1.0/24"])], &[]).routes;
        assert!(diff_routes(&want, &[installed("10.2.1.0/24", "192.0.2.11")], true).is_empty());
    }
}
