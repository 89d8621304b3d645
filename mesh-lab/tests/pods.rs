//! Pods behind nodes (issue 20) on a real lab: root, network namespaces, etcd. Each test uses its own prefix.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use mesh_lab::{EtcdSecurity, Lab, LabSpec, Underlay};

/// What a TCP connect from node `n` of cluster `c` to `addr` (a port nothing listens on) shows: `true` when the
/// address answered (connection refused: the packet got there and the answer came back), `false` when it
/// did not (no route, timeout).
fn answers(lab: &Lab, c: usize, n: usize, addr: std::net::Ipv4Addr) -> (bool, String) {
    // bash's /dev/tcp names the outcome: "Connection refused", "No route to host", or the timeout's kill
    let out = lab
        .output_in_node(
            c,
            n,
            Command::new("timeout")
                .args(["1", "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{addr}/9")),
        )
        .expect("run bash in node");
    let text = format!(
        "{} (exit {:?})",
        String::from_utf8_lossy(&out.stderr).trim(),
        out.status.code()
    );
    (text.contains("Connection refused"), text)
}

fn ip(lab: &Lab, c: usize, n: usize, args: &[&str]) {
    let netns = &lab.node(c, n).unwrap().netns;
    let out = Command::new("ip")
        .arg("-n")
        .arg(netns)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pods_of_another_cluster_are_reached_only_through_a_route_to_their_node() {
    let spec = LabSpec::new("mlt-pods", 2, 2)
        .etcd_security(EtcdSecurity::Plain)
        .with_pods()
        .underlay(Underlay::Switched);
    let lab = Lab::up(spec).unwrap_or_else(|e| panic!("lab up: {e}"));
    let own = lab.pod(1, 1).unwrap().clone();
    let peer = lab.pod(1, 2).unwrap().clone();
    let remote = lab.pod(2, 1).unwrap().clone();
    let remote_node = lab.node(2, 1).unwrap().clone();

    // The pod sits in its own namespace behind the node, on the node's pod CIDR.
    assert!(netns_list().contains(&own.netns), "{}", own.netns);
    let (ok, text) = answers(&lab, 1, 1, own.addr);
    assert!(ok, "c1/n1 -> its own pod {}: {text}", own.addr);
    // Inside a cluster the nodes route each other's pod CIDRs (the CNI's part).
    let (ok, text) = answers(&lab, 1, 1, peer.addr);
    assert!(ok, "c1/n1 -> c1/n2's pod {}: {text}", peer.addr);
    // Nodes of other clusters are on-link (switched underlay) ...
    let (ok, text) = answers(&lab, 1, 1, remote_node.addr);
    assert!(ok, "c1/n1 -> c2/n1 {}: {text}", remote_node.addr);
    // ... but their pods are not routed by anyone: not even the router.
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(
        !ok,
        "c1/n1 reached c2's pod {} with no route: {text}",
        remote.addr
    );

    // A route to the pod CIDR via its node (what node-sync --routing native adds) is all it takes.
    ip(
        &lab,
        1,
        1,
        &[
            "route",
            "add",
            &remote.cidr(),
            "via",
            &remote_node.addr.to_string(),
        ],
    );
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(ok, "c1/n1 -> c2's pod {} via its node: {text}", remote.addr);

    // Partitions cover pods and bridged traffic: cut, then restored.
    lab.partition(1, 2).unwrap();
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(!ok, "partition let c1/n1 reach c2's pod: {text}");
    let (ok, text) = answers(&lab, 1, 1, remote_node.addr);
    assert!(!ok, "partition let c1/n1 reach c2/n1: {text}");
    lab.heal(1, 2).unwrap();
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(ok, "heal did not restore c1/n1 -> c2's pod: {text}");

    // Latency and loss need the routed underlay: refused with the reason.
    let e = lab
        .set_latency_loss(1, 2, Duration::from_millis(10), 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("switched underlay"), "{e}");

    lab.teardown().unwrap();
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with("mlt-pods-"))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn on_the_routed_underlay_the_router_does_not_route_pod_cidrs() {
    let spec = LabSpec::new("mlt-podr", 2, 1)
        .etcd_security(EtcdSecurity::Plain)
        .with_pods();
    let lab = Lab::up(spec).unwrap_or_else(|e| panic!("lab up: {e}"));
    let remote = lab.pod(2, 1).unwrap().clone();
    let remote_node = lab.node(2, 1).unwrap().clone();
    let (ok, text) = answers(&lab, 1, 1, remote_node.addr);
    assert!(ok, "c1/n1 -> c2/n1 through the router: {text}");
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(!ok, "the router routed c2's pod {}: {text}", remote.addr);
    // The router drops pod-range traffic: a route to its address for c2's pod changes nothing.
    let netns = lab.plan().router_netns.clone();
    let out = Command::new("ip")
        .args(["-n", &netns, "route", "add", &remote.cidr(), "via"])
        .arg(remote_node.addr.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, text) = answers(&lab, 1, 1, remote.addr);
    assert!(
        !ok,
        "the router forwarded to c2's pod {}: {text}",
        remote.addr
    );
    // c2's node is not on-link here: a native route via it is refused by the kernel, which is why
    // --routing native runs on the switched underlay.
    let netns = &lab.node(1, 1).unwrap().netns;
    let out = Command::new("ip")
        .args(["-n", netns, "route", "add", &remote.cidr(), "via"])
        .arg(remote_node.addr.to_string())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a route via an off-link node was accepted"
    );
    // The pod answers from its own node.
    let (ok, text) = answers(&lab, 2, 1, remote.addr);
    assert!(ok, "c2/n1 -> its pod: {text}");
}
