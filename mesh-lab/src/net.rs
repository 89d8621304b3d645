//! The lab network: namespaces, veths, bridges, routes (iproute2), partitions (nft) and the detour routes of the
//! impairer (policy routing).

use std::fmt::Write as _;
use std::time::Duration;

use crate::cmd;
use crate::error::{LabError, Result};
use crate::plan::{ClusterInfo, LabPlan, Underlay};

/// nft table (family inet) in the router namespace.
const NFT_TABLE: &str = "meshlab";

/// Names of every network namespace on the host (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    Ok(cmd::ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of processes whose network namespace is `netns` (`ip netns pids`); empty when it does not exist.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    cmd::ip(&["netns", "pids", netns])
        .map(|o| o.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Deletes a namespace; one that does not exist is success.
pub fn delete_netns(netns: &str) -> Result<()> {
    match cmd::ip(&["netns", "del", netns]) {
        Ok(_) => Ok(()),
        Err(_) if !std::path::Path::new("/run/netns").join(netns).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when a host interface of that name exists.
pub fn host_link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Sets a network sysctl inside `netns` (network sysctls under /proc/sys/net are per namespace; no procps needed).
pub fn set_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    cmd::in_netns(
        netns,
        "sh",
        &["-c", "echo \"$1\" > \"$2\"", "sh", value, &path],
    )?;
    Ok(())
}

/// Creates every namespace, link, address and route of `plan`, the router's nft table, and ip forwarding.
pub fn build(plan: &LabPlan) -> Result<()> {
    for ns in plan.netns_names() {
        cmd::ip(&["netns", "add", &ns])?;
    }
    let r = &plan.router_netns;
    let sup = plan.supernet();
    // host <-> router
    cmd::ip(&[
        "link",
        "add",
        &plan.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "uplink",
        "netns",
        r,
    ])?;
    let mut host = String::new();
    let _ = writeln!(
        host,
        "addr add {}/24 dev {}",
        plan.host_addr, plan.host_veth
    );
    let _ = writeln!(host, "link set {} up", plan.host_veth);
    let _ = writeln!(
        host,
        "route add {sup} via {} dev {}",
        plan.router_addr, plan.host_veth
    );
    cmd::ip_batch(None, &host)?;

    // router: uplink, one bridge per cluster (one for all with a switched underlay), one veth per member
    let mut router = String::new();
    let _ = writeln!(router, "link set lo up");
    let _ = writeln!(router, "addr add {}/24 dev uplink", plan.router_addr);
    let _ = writeln!(router, "link set uplink up");
    let mut bridges: Vec<&str> = Vec::new();
    for c in &plan.clusters {
        if !bridges.contains(&c.bridge.as_str()) {
            bridges.push(&c.bridge);
            let _ = writeln!(router, "link add {} type bridge", c.bridge);
        }
        let _ = writeln!(router, "addr add {}/24 dev {}", c.gateway, c.bridge);
        let _ = writeln!(router, "link set {} up", c.bridge);
        for m in std::iter::once(&c.control_plane).chain(&c.nodes) {
            let _ = writeln!(
                router,
                "link add {} type veth peer name eth0 netns {}",
                m.router_port, m.netns
            );
            let _ = writeln!(router, "link set {} master {}", m.router_port, c.bridge);
            let _ = writeln!(router, "link set {} up", m.router_port);
        }
    }
    cmd::ip_batch(Some(r), &router)?;
    set_sysctl(r, "net.ipv4.ip_forward", "1")?;
    if plan.underlay == Underlay::Switched {
        // bridged IPv4 between clusters passes the nft forward chain, so partitions apply to it
        set_sysctl(r, "net.bridge.bridge-nf-call-iptables", "1").map_err(|e| {
            LabError::Prerequisite(format!(
                "a switched underlay needs bridge netfilter (CONFIG_BRIDGE_NETFILTER) in the router: {e}"
            ))
        })?;
    }
    cmd::in_netns_input(r, "nft", &["-f", "-"], &nft_ruleset())?;
    if let Some(rules) = pod_drop_ruleset(plan) {
        cmd::in_netns_input(r, "nft", &["-f", "-"], &rules)?;
    }

    // members: address, default route via the cluster bridge
    for c in &plan.clusters {
        for m in std::iter::once(&c.control_plane).chain(&c.nodes) {
            let mut b = String::new();
            let _ = writeln!(b, "link set lo up");
            let _ = writeln!(b, "addr add {}/{} dev eth0", m.addr, c.prefix_len);
            if m.index == 0 {
                // the other members of a multi-member etcd (member 1 is on the control-plane address)
                for e in c.etcd.members.iter().filter(|e| e.addr != m.addr) {
                    let _ = writeln!(b, "addr add {}/{} dev eth0", e.addr, c.prefix_len);
                }
            }
            let _ = writeln!(b, "link set eth0 up");
            let _ = writeln!(b, "route add default via {}", c.gateway);
            if plan.underlay == Underlay::Switched {
                // every other cluster's members are on this link
                for o in plan.clusters.iter().filter(|o| o.index != c.index) {
                    let _ = writeln!(b, "route add {} dev eth0", o.cidr());
                }
            }
            cmd::ip_batch(Some(&m.netns), &b)?;
        }
    }
    for c in &plan.clusters {
        for n in &c.nodes {
            build_pod(c, n)?;
        }
    }
    Ok(())
}

/// The pod behind node `n` (when it has one): veth `pod0` (node, the pod's gateway) <-> `eth0` (pod), the pod's
/// default route via the node, forwarding on in the node, and the node's routes to the pod CIDRs of its own
/// cluster's other nodes (what the CNI does inside a cluster). Nothing about other clusters' pods.
fn build_pod(c: &ClusterInfo, n: &crate::plan::NodeInfo) -> Result<()> {
    let Some(pod) = &n.pod else {
        return Ok(());
    };
    let mut b = String::new();
    let _ = writeln!(
        b,
        "link add pod0 type veth peer name eth0 netns {}",
        pod.netns
    );
    let _ = writeln!(b, "addr add {}/{} dev pod0", pod.gateway, pod.prefix_len);
    let _ = writeln!(b, "link set pod0 up");
    for peer in c.nodes.iter().filter(|p| p.index != n.index) {
        if let Some(pp) = &peer.pod {
            let _ = writeln!(b, "route add {} via {}", pp.cidr(), peer.addr);
        }
    }
    cmd::ip_batch(Some(&n.netns), &b)?;
    set_sysctl(&n.netns, "net.ipv4.ip_forward", "1")?;
    let mut b = String::new();
    let _ = writeln!(b, "link set lo up");
    let _ = writeln!(b, "addr add {}/{} dev eth0", pod.addr, pod.prefix_len);
    let _ = writeln!(b, "link set eth0 up");
    let _ = writeln!(b, "route add default via {}", pod.gateway);
    cmd::ip_batch(Some(&pod.netns), &b)?;
    Ok(())
}

/// The router's nft ruleset: forwarded packets whose (source, destination) address pair is in the `partitions` set
/// are dropped. Addresses, not interfaces, so traffic detoured through the impairer is caught too.
pub(crate) fn nft_ruleset() -> String {
    format!(
        "table inet {NFT_TABLE} {{\n\
         \tset partitions {{ type ipv4_addr . ipv4_addr; flags interval; }}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tip saddr . ip daddr @partitions drop\n\
         \t}}\n\
         }}\n"
    )
}

/// nft table (family inet) in the router of a routed lab with pods.
const POD_DROP_TABLE: &str = "meshlab-pods";

/// With pods on the routed underlay: the router drops every forwarded packet to a pod range, so another
/// cluster's pods are reached only through node-sync's overlay (`--routing vxlan`, whose packets carry node
/// addresses), never because the router forwarded to a pod address (it has no route for one either): an
/// underlay that routes node addresses and not pod CIDRs (routed packets only: a cluster's own pod traffic is
/// bridged). Packets *from* pods to node addresses pass (a
/// pod answering a client on a remote node's host network answers over the underlay; an underlay that
/// also checks source addresses would need node-sync to carry those too). `None` without pods, and on the
/// switched underlay, where pod traffic between clusters is bridged node to node (native routing) and this
/// chain would see it too.
pub(crate) fn pod_drop_ruleset(plan: &LabPlan) -> Option<String> {
    if plan.underlay != Underlay::Routed {
        return None;
    }
    let mut ranges: Vec<String> = Vec::new();
    for c in &plan.clusters {
        for r in c.ranges().into_iter().skip(1) {
            if !ranges.contains(&r) {
                ranges.push(r);
            }
        }
    }
    if ranges.is_empty() {
        return None;
    }
    let set = ranges.join(", ");
    // Routed packets only: bridged IPv4 passes this chain too (bridge-nf-call-iptables is on by default),
    // and a cluster's own pod traffic is bridged on its bridge.
    let rules: String = plan
        .clusters
        .iter()
        .map(|c| {
            format!(
                "\t\tiifname \"{br}\" oifname != \"{br}\" ip daddr {{ {set} }} drop\n",
                br = c.bridge
            )
        })
        .collect();
    Some(format!(
        "table inet {POD_DROP_TABLE} {{\n\tchain forward {{\n\t\ttype filter hook forward priority -10; policy accept;\n\
         {rules}\t}}\n}}\n"
    ))
}

/// Both directions between every range of `a` and every range of `b` (subnets, and pod ranges with pods).
pub(crate) fn partition_elements(a: &ClusterInfo, b: &ClusterInfo) -> String {
    let mut pairs = Vec::new();
    for x in a.ranges() {
        for y in b.ranges() {
            pairs.push(format!("{x} . {y}, {y} . {x}"));
        }
    }
    format!("{{ {} }}", pairs.join(", "))
}

/// Drops all traffic between clusters `a` and `b` (both directions) in the router.
pub fn partition(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    let elems = partition_elements(a, b);
    cmd::in_netns(
        &plan.router_netns,
        "nft",
        &["add", "element", "inet", NFT_TABLE, "partitions", &elems],
    )?;
    Ok(())
}

/// Removes the partition between `a` and `b` (no-op when there is none).
pub fn heal(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    // `nft delete element` fails on a missing element; add first so delete always finds it
    partition(plan, a, b)?;
    let elems = partition_elements(a, b);
    cmd::in_netns(
        &plan.router_netns,
        "nft",
        &["delete", "element", "inet", NFT_TABLE, "partitions", &elems],
    )?;
    Ok(())
}

/// nft table (family inet) in the router that cuts the control planes of `a` and `b` apart.
fn control_plane_table(a: &ClusterInfo, b: &ClusterInfo) -> String {
    let (lo, hi) = if a.index < b.index { (a, b) } else { (b, a) };
    format!("meshlab-cp-{}-{}", lo.index, hi.index)
}

/// The ruleset that cuts the control planes of `a` and `b` apart: every packet between a cluster
/// and the other's control-plane namespace (its etcd and apiserver) is dropped in the router, so
/// neither cluster's nodes reach the other's etcd, while node-to-node (backend) traffic flows.
pub(crate) fn control_plane_ruleset(a: &ClusterInfo, b: &ClusterInfo) -> String {
    let table = control_plane_table(a, b);
    let mut rules = String::new();
    for (x, y) in [(a, b), (b, a)] {
        for r in x.ranges() {
            rules.push_str(&format!(
                "\t\tip saddr {} ip daddr {} drop\n\t\tip saddr {} ip daddr {} drop\n",
                r, y.control_plane.addr, y.control_plane.addr, r
            ));
        }
    }
    format!(
        "table inet {table} {{\n\tchain forward {{\n\t\ttype filter hook forward priority -5; policy accept;\n{rules}\t}}\n}}\n"
    )
}

/// Drops all traffic between each of `a` and `b` and the other's control plane (etcd, apiserver);
/// backends stay reachable. Idempotent.
pub fn partition_control_plane(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    remove_table(&plan.router_netns, &control_plane_table(a, b))?;
    cmd::in_netns_input(
        &plan.router_netns,
        "nft",
        &["-f", "-"],
        &control_plane_ruleset(a, b),
    )?;
    Ok(())
}

/// Removes the control-plane cut between `a` and `b` (no-op without one).
pub fn heal_control_plane(plan: &LabPlan, a: &ClusterInfo, b: &ClusterInfo) -> Result<()> {
    remove_table(&plan.router_netns, &control_plane_table(a, b))
}

/// Removes the nft table `table` (family inet) of `netns`, if there is one: `add` first, so the
/// `delete` always finds it.
fn remove_table(netns: &str, table: &str) -> Result<()> {
    cmd::in_netns(netns, "nft", &["add", "table", "inet", table])?;
    cmd::in_netns(netns, "nft", &["delete", "table", "inet", table])?;
    Ok(())
}

/// nft table (family inet) a cut-off node's namespace gets.
const ISOLATE_TABLE: &str = "meshlab-isolate";

/// The ruleset that cuts a member namespace off: everything in or out of `eth0` dropped (loopback keeps
/// working, so the node's own processes still talk to each other).
pub(crate) fn isolate_ruleset() -> String {
    format!(
        "table inet {ISOLATE_TABLE} {{\n\
         \tchain input {{ type filter hook input priority -300; policy accept; iifname \"eth0\" drop; }}\n\
         \tchain output {{ type filter hook output priority -300; policy accept; oifname \"eth0\" drop; }}\n\
         }}\n"
    )
}

/// Cuts the namespace `netns` off the network (see [`isolate_ruleset`]). Idempotent.
pub fn isolate_member(netns: &str) -> Result<()> {
    // Re-isolating replaces the rules instead of doubling them.
    remove_table(netns, ISOLATE_TABLE)?;
    cmd::in_netns_input(netns, "nft", &["-f", "-"], &isolate_ruleset())?;
    Ok(())
}

/// Undoes [`isolate_member`] (no-op when the namespace is not cut off).
pub fn heal_member(netns: &str) -> Result<()> {
    remove_table(netns, ISOLATE_TABLE)
}

/// Routes the impairer's table into its TUN device and turns reverse-path filtering off for it (packets come back
/// from the TUN device with sources that live behind a bridge).
pub fn setup_impairer_routing(plan: &LabPlan) -> Result<()> {
    let r = &plan.router_netns;
    let tun = crate::impair::TUN_NAME;
    set_sysctl(r, "net.ipv4.conf.all.rp_filter", "0")?;
    set_sysctl(r, &format!("net.ipv4.conf.{tun}.rp_filter"), "0")?;
    cmd::ip(&[
        "-n",
        r,
        "route",
        "replace",
        "default",
        "dev",
        tun,
        "table",
        crate::impair::TABLE,
    ])?;
    Ok(())
}

fn detour_pref(from: &ClusterInfo, to: &ClusterInfo) -> String {
    (1000 + from.index * 100 + to.index).to_string()
}

/// Sends packets routed from `from` to `to` through the impairer (a policy-routing rule in the router).
pub fn add_detour(plan: &LabPlan, from: &ClusterInfo, to: &ClusterInfo) -> Result<()> {
    let r = &plan.router_netns;
    let pref = detour_pref(from, to);
    let _ = cmd::ip(&["-n", r, "rule", "del", "pref", &pref]);
    cmd::ip(&[
        "-n",
        r,
        "rule",
        "add",
        "pref",
        &pref,
        "iif",
        &from.bridge,
        "from",
        &from.cidr(),
        "to",
        &to.cidr(),
        "table",
        crate::impair::TABLE,
    ])?;
    Ok(())
}

/// Removes the detour from `from` to `to` (no-op when there is none).
pub fn remove_detour(plan: &LabPlan, from: &ClusterInfo, to: &ClusterInfo) -> Result<()> {
    let r = &plan.router_netns;
    let pref = detour_pref(from, to);
    match cmd::ip(&["-n", r, "rule", "del", "pref", &pref]) {
        Ok(_) => Ok(()),
        Err(LabError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until host interface `name` is gone (namespace deletion frees veths asynchronously).
pub fn wait_host_link_gone(name: &str, timeout: Duration) -> bool {
    crate::process::poll_until(timeout, || !host_link_exists(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::LabSpec;

    #[test]
    fn ruleset_drops_partitioned_address_pairs() {
        let r = nft_ruleset();
        assert!(r.contains("ip saddr . ip daddr @partitions drop"));
        assert!(r.contains("flags interval"));
        assert!(r.contains("hook forward"));
    }

    #[test]
    fn the_routed_router_drops_pod_ranges_and_the_switched_one_does_not() {
        let spec = LabSpec::new("t", 2, 1).with_pods();
        let p = LabPlan::new(&spec, 100, std::path::Path::new("/cg")).unwrap();
        let r = pod_drop_ruleset(&p).unwrap();
        assert!(
            r.contains(
                "iifname \"br1\" oifname != \"br1\" ip daddr { 10.100.191.0/24, 10.100.192.0/24 } drop"
            ),
            "{r}"
        );
        assert!(!r.contains("saddr"), "{r}");
        let switched = spec.underlay(crate::plan::Underlay::Switched);
        let p = LabPlan::new(&switched, 100, std::path::Path::new("/cg")).unwrap();
        assert!(pod_drop_ruleset(&p).is_none());
        let p = LabPlan::new(&LabSpec::new("t", 2, 1), 100, std::path::Path::new("/cg")).unwrap();
        assert!(pod_drop_ruleset(&p).is_none());
    }

    #[test]
    fn partition_covers_both_directions() {
        let p = LabPlan::new(&LabSpec::new("t", 2, 1), 100, std::path::Path::new("/cg")).unwrap();
        assert_eq!(
            partition_elements(&p.clusters[0], &p.clusters[1]),
            "{ 10.100.1.0/24 . 10.100.2.0/24, 10.100.2.0/24 . 10.100.1.0/24 }"
        );
    }
}
