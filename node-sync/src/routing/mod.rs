//! Cross-cluster pod routes (issue 20): node-sync makes the pod CIDRs of every remote node reachable from this
//! node, so the remote backends the socket LB selects (pod IPs) can be reached without a CNI that knows the
//! other clusters.
//!
//! `--routing native` (`RoutingMode::Native`): one route per remote node's pod CIDR via that node's address
//! (Cilium's auto-direct-node-routes case: the nodes reach each other directly). Routes go into the main table
//! with node-sync's own routing protocol id (`CLUSTERMESH_PROTOCOL`, 157: `ip route show proto 157`), which is
//! the only mark of ownership:
//! - **Reconcile, never flush**: each sync dumps the table, takes the routes with our protocol id as installed
//!   and applies the fewest changes (`plan::diff_routes`): add, replace in place when a node's address moved
//!   (no moment without a route), delete what is no longer called for. A restarted node-sync finds its routes
//!   and changes nothing; until every cluster finished its initial sync (`NodeSet::complete`) it only adds.
//! - **Other routes are never touched**: deletes name our protocol id, so the kernel matches only ours; a
//!   route of another protocol to the same destination is a local route (below), so ours is never added
//!   beside it.
//! - **Overlaps are refused**: a pod CIDR overlapping another remote node's (both refused: which side is meant
//!   is ambiguous) or a route of this node that node-sync did not make (the local pod CIDR, a node subnet;
//!   default routes aside) gets no route; it is in `RoutingStatus::refused` with its reason and counted once
//!   in `refused_total`.
//!
//! The split: `plan.rs` is pure (desired routes, overlaps, diff; unit-tested), `netlink.rs` is the kernel
//! behind the `RouteTable` trait (tested in a network namespace, `node-sync/tests/routing.rs`), `manager.rs`
//! joins them and follows a `watch` of the remote nodes.
//!
//! **The feed**: each apiserver publishes its nodes with their pod CIDRs (`NodeInfo::pod_cidrs`, `podCIDRs`,
//! from `Node.spec.podCIDRs`, else `spec.podCIDR`; a CIDR that does not parse is reported and left out). A
//! remote connection lists and watches `nodes/<cluster>/` (`watch.rs`; through KVStoreMesh the local etcd's
//! every peer's, never the local cluster's own). The agent keeps them apart from the merge index
//! (`agent/nodes.rs`, keyed by cluster and node, dropped with their cluster) and after a batch that changed
//! them sends `NodeSet { nodes, complete: every cluster synced or refused }` on a watch (`Agent::remote_nodes`).
//! `run.rs` (`start_routing`) opens `NetlinkRoutes` and runs `RouteManager::run` on it for `native`, resyncing
//! every 10 s without a change; the status server shows `RoutingStatus` (`routing` in `/api/v1/status`;
//! `nodesync_routing_routes`, `_refused`, `_refused_total`, `_changes_total`, `_errors_total` in `/metrics`).
//! Tested end to end in `node-sync/tests/routing.rs` (etcd and the binary in the test's network namespace).
//!
//! `--routing vxlan` (`RoutingMode::Vxlan`, `vxlan.rs`): one device `clustermesh0` of kind vxlan
//! (`--vxlan-vni`, default 2; `--vxlan-port`, default 8472 as Cilium's; `nolearning`; local address = this
//! node's address on the underlay, `--vxlan-local-address` or else the default route's source; MTU = the
//! underlay device's MTU - 50 for IPv4 underlays, - 70 for IPv6; MAC = `mac_for` of the local address), made
//! and kept by node-sync: before each sync (`RouteTable::prepare`) it is found by name and kind, its MTU, MAC,
//! local address, learning and up corrected in place (only what differs), made again when its VNI, port or
//! address family differ (the kernel changes none of them in place; its routes go with it and the same sync
//! adds them back), a link of another kind with its name refused by name; never deleted on exit. Per remote
//! node an FDB entry `00:00:00:00:00:00 dst <node ip>` is not enough for unicast, so, as flannel's vxlan
//! backend does: an FDB entry `<mac> dst <node ip>` (the MAC derived from the node's address, locally
//! administered, `0a:` + 4 octets (an IPv6 address's last 4) + `:00`; the node address is the one of the
//! underlay's family, `GatewayFamily`), per pod CIDR a permanent neighbour entry for the overlay address (the
//! CIDR's first address) with that MAC, and the route `<cidr> via <overlay address> dev clustermesh0 onlink`
//! with protocol id 157: the same plan, diff, ownership, refusals and status as native; only the gateway and
//! device differ (`RoutingStatus` shows the node address as `via`, and the device, `routing.device` in
//! `/api/v1/status`: name, VNI, port, local address, underlay device, MTU). A route reads back as going to a node only
//! when its whole chain is there (route, neighbour, FDB), so a broken chain or a native route left behind is
//! replaced in place. FDB and neighbour entries are ours by device: after each sync with every cluster synced
//! (`RouteTable::settle`) those no route needs are removed; never a flush. Tested in two network namespaces
//! joined by a veth that carries only node addresses (`node-sync/tests/routing_vxlan.rs`). Not done: the
//! overlay address of this node's own pod CIDR is not put on `clustermesh0`, so a host-network client (not a
//! pod) reaching a remote pod sends from its node address, and the reply comes back over the underlay: a
//! remote node with strict `rp_filter` on `clustermesh0` drops the request.

mod manager;
mod netlink;
mod plan;
mod vxlan;

pub use manager::{NodeSet, RouteManager, RoutingStatus};
pub use netlink::{
    CLUSTERMESH_PROTOCOL, NetlinkRoutes, RouteError, RouteOwner, RouteTable, TableView,
};
pub use plan::{
    DesiredRoute, GatewayFamily, InstalledRoute, Refusal, RefusalReason, RemoteNode, RouteDiff,
    RoutePlan, diff_routes, overlaps, plan_routes, plan_routes_via,
};
pub use vxlan::{
    DEFAULT_PORT, DEFAULT_VNI, DeviceAction, DeviceSpec, DeviceState, Entries, MAX_VNI, Mac,
    NetlinkVxlan, OverlayDevice, OverlayRoute, OverlayTable, Underlay, VXLAN_DEVICE, VxlanConfig,
    VxlanKernel, VxlanRoutes, device_action, mac_for, overhead, overlay_addr, resolve,
    stale_entries,
};

/// `--routing`: how node-sync makes remote pod CIDRs reachable from this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingMode {
    /// No routes: today's behaviour; pod CIDRs are routed by the CNI, the network or by hand.
    #[default]
    None,
    /// One route per remote node's pod CIDR via that node's address (nodes reach each other directly), in the
    /// main table with routing protocol id 157; never flushed on restart, other routes never touched,
    /// overlapping CIDRs refused.
    Native,
    /// An overlay device (`clustermesh0`) with one forwarding entry per remote node, for underlays that route
    /// node addresses but not pod CIDRs; routes marked as native's (protocol id 157), same ownership and
    /// refusals.
    Vxlan,
}
