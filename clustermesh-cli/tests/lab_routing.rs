//! Cross-cluster pod routing on the lab (issue 20): real network namespaces, etcd, apiservers and node-syncs
//! with `--routing`, backends as pods behind their nodes. The lab's router never routes a pod CIDR, so a pod of
//! another cluster is reachable only through what node-sync installs.
//!
//! The reach, join/leave and SIGKILL tests run with `native` (switched underlay) and `vxlan` (routed underlay:
//! the router routes node addresses only).

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_lab::mesh::{LabMesh, LabMeshSpec, Routing};

/// node-sync's routing protocol id (`ip route show proto 157`).
const PROTO: &str = "157";

/// A 2x2 mesh with pods and `routing`, the clusters connected through static remotes, c1's service
/// sending c1's clients to c2 (affinity remote).
fn mesh(
    prefix: &str,
    routing: Routing,
    adjust: impl FnOnce(mesh_lab::LabSpec) -> mesh_lab::LabSpec,
) -> LabMesh {
    support::require_lab();
    let mut spec = LabMeshSpec::new(prefix, 2, 2).with_pods(routing);
    spec.static_remotes = true;
    spec.affinity = "remote".into();
    LabMesh::up_with(spec, adjust).unwrap_or_else(|e| panic!("mesh {prefix} up: {e:#}"))
}

/// c2's pod CIDRs and the addresses of their nodes: the routes c1's nodes are to get with native routing.
fn c2_routes(mesh: &LabMesh, nodes: &[usize]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = nodes
        .iter()
        .map(|&n| {
            let node = mesh.lab().node(2, n).unwrap();
            (node.pod.as_ref().unwrap().cidr(), node.addr.to_string())
        })
        .collect();
    v.sort();
    v
}

/// The routes c1's nodes are to get for c2's `nodes` with `routing`: native via c2's nodes; vxlan via each pod
/// CIDR's first address (the overlay address, on `clustermesh0`, whose FDB entry leads to the node).
fn c2_routes_for(mesh: &LabMesh, routing: Routing, nodes: &[usize]) -> Vec<(String, String)> {
    let mut v = c2_routes(mesh, nodes);
    if routing == Routing::Vxlan {
        for (cidr, via) in &mut v {
            *via = cidr.split('/').next().unwrap().to_string();
        }
    }
    v
}

/// Waits (polling the kernel's table: nothing signals a route change to the test) until node `n` of `c` has
/// exactly `want` as node-sync's routes; returns how long it took.
fn wait_routes(
    mesh: &LabMesh,
    c: usize,
    n: usize,
    want: &[(String, String)],
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = mesh.node_routes(c, n, PROTO).unwrap();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "c{c}/n{n}: node-sync's routes after {timeout:?}: {got:?}, want {want:?}\nnode-sync log:\n{}",
            mesh.log_tail(&format!("node-sync-c{c}-n{n}"), 20)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ip_in_node(mesh: &LabMesh, c: usize, n: usize, args: &[&str]) -> String {
    let netns = &mesh.lab().node(c, n).unwrap().netns;
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client in c1 reaches a pod in c2 through the global service, and only thanks to node-sync's routes.
fn a_client_in_c1_reaches_a_pod_in_c2(prefix: &str, routing: Routing) {
    let mesh = mesh(prefix, routing, |s| s);
    mesh.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with("c2-"))
        .unwrap_or_else(|e| {
            panic!(
                "{routing:?}: {e:#}\n{}",
                mesh.log_tail("node-sync-c1-n1", 20)
            )
        });
    // The socket LB of c1/n1 sends to c2's backends (affinity remote) ...
    assert_eq!(support::programmed_cluster_ids(&mesh, 1, 1), vec![2]);
    // ... which are the pods, on c2's pod CIDRs, which node-sync routes (native: via c2's nodes).
    let routes = mesh.node_routes(1, 1, PROTO).unwrap();
    let dsts: BTreeSet<String> = routes.iter().map(|(d, _)| d.clone()).collect();
    let want: BTreeSet<String> = c2_routes(&mesh, &[1, 2])
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(dsts, want, "{routing:?}: c1/n1's routes {routes:?}");
    if routing == Routing::Native {
        assert_eq!(
            routes,
            c2_routes(&mesh, &[1, 2]),
            "native routes go via c2's nodes"
        );
    }
    let status = mesh.node_sync_status_json(1, 1).unwrap();
    assert_eq!(status["routing"]["mode"], routing.flag(), "{status}");
    assert_eq!(
        status["routing"]["refused"],
        serde_json::json!([]),
        "{status}"
    );
    mesh.teardown().expect("teardown");
}

#[test]
fn native_routing_reaches_a_pod_in_another_cluster() {
    a_client_in_c1_reaches_a_pod_in_c2("rt-native", Routing::Native);
}

#[test]
fn vxlan_routing_reaches_a_pod_in_another_cluster() {
    a_client_in_c1_reaches_a_pod_in_c2("rt-vxlan", Routing::Vxlan);
}

#[test]
fn a_node_joining_or_leaving_adds_or_removes_its_routes_within_a_second_and_others_routes_stay() {
    join_and_leave("rt-join", Routing::Native);
}

#[test]
fn vxlan_a_node_joining_or_leaving_adds_or_removes_its_routes_within_a_second() {
    join_and_leave("rt-vjoin", Routing::Vxlan);
}

fn join_and_leave(prefix: &str, routing: Routing) {
    let mut mesh = mesh(prefix, routing, |s| s);
    let all = c2_routes_for(&mesh, routing, &[1, 2]);
    for n in [1, 2] {
        wait_routes(&mesh, 1, n, &all, Duration::from_secs(30));
    }
    // A route someone else made (proto static), to a destination of its own: node-sync never touches it.
    let gw = mesh.lab().cluster(1).unwrap().gateway.to_string();
    ip_in_node(
        &mesh,
        1,
        1,
        &[
            "route",
            "add",
            "198.18.7.0/24",
            "via",
            &gw,
            "proto",
            "static",
        ],
    );
    let foreign =
        |mesh: &LabMesh| ip_in_node(mesh, 1, 1, &["-4", "route", "show", "proto", "static"]);
    let before = foreign(&mesh);
    assert!(before.contains("198.18.7.0/24"), "{before}");

    // c2/n2 leaves its cluster: its pod CIDR's route goes from every c1 node within a second.
    mesh.set_node_published(2, 2, false).unwrap();
    let only_n1 = c2_routes_for(&mesh, routing, &[1]);
    for n in [1, 2] {
        let took = wait_routes(&mesh, 1, n, &only_n1, Duration::from_secs(5));
        assert!(
            took < Duration::from_secs(1),
            "c1/n{n}: c2/n2's route removed after {took:?}"
        );
    }
    // ... and joins again: back within a second.
    mesh.set_node_published(2, 2, true).unwrap();
    for n in [1, 2] {
        let took = wait_routes(&mesh, 1, n, &all, Duration::from_secs(5));
        assert!(
            took < Duration::from_secs(1),
            "c1/n{n}: c2/n2's route added after {took:?}"
        );
    }
    assert_eq!(
        foreign(&mesh),
        before,
        "node-sync changed a route it did not make"
    );
    mesh.teardown().expect("teardown");
}

#[test]
fn a_node_sync_sigkill_under_traffic_fails_no_connect_and_leaves_the_routes() {
    sigkill_under_traffic("rt-kill", Routing::Native);
}

#[test]
fn vxlan_a_node_sync_sigkill_under_traffic_fails_no_connect_and_leaves_the_routes() {
    sigkill_under_traffic("rt-vkill", Routing::Vxlan);
}

fn sigkill_under_traffic(prefix: &str, routing: Routing) {
    let mut mesh = mesh(prefix, routing, |s| s);
    let all = c2_routes_for(&mesh, routing, &[1, 2]);
    wait_routes(&mesh, 1, 1, &all, Duration::from_secs(30));
    mesh.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with("c2-"))
        .unwrap();
    let probe = mesh
        .spawn_probe(1, 1, mesh.service_addr(1), Duration::from_millis(10))
        .unwrap();
    assert!(
        probe.wait_for(0.0, Duration::from_secs(5), |s| s.ok),
        "the probe never got through"
    );
    mesh.kill_node_sync(1, 1).unwrap();
    let killed_at = probe.now_ms();
    // Traffic keeps flowing with node-sync dead: wait for a second of answers after the kill.
    assert!(
        probe.wait_for(killed_at + 1000.0, Duration::from_secs(5), |s| s.ok),
        "no answer a second after the kill"
    );
    assert_eq!(
        mesh.node_routes(1, 1, PROTO).unwrap(),
        all,
        "routes gone with node-sync"
    );
    // A new node-sync finds its routes and changes none.
    mesh.start_node_sync(1, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = mesh.node_sync_status_json(1, 1).ok();
        let routes = st.as_ref().map(|s| s["routing"]["routesInstalled"].clone());
        if routes == Some(serde_json::json!(2)) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node-sync: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted_at = probe.now_ms();
    assert!(probe.wait_for(restarted_at + 500.0, Duration::from_secs(5), |s| s.ok));
    let samples = probe.stop();
    let failed: Vec<_> = samples.iter().filter(|s| !s.ok).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed across the SIGKILL and restart: {:?}",
        failed.len(),
        samples.len(),
        failed.first()
    );
    assert!(
        samples
            .iter()
            .all(|s| s.backend.as_deref().is_some_and(|b| b.starts_with("c2-")))
    );
    assert_eq!(
        mesh.node_routes(1, 1, PROTO).unwrap(),
        all,
        "routes after the restart"
    );
    let st = mesh.node_sync_status_json(1, 1).unwrap();
    assert_eq!(
        st["routing"]["changesTotal"], 0,
        "a restart changes no route: {st}"
    );
    mesh.teardown().expect("teardown");
}

#[test]
fn overlapping_pod_cidrs_are_refused_with_a_clear_status() {
    // c2/n1 gets c1/n1's pod CIDR: ambiguous for every node, so no node routes it.
    let mesh = mesh("rt-overlap", Routing::Native, |s| {
        s.pod_cidr_same_as(2, 1, 1, 1)
    });
    let clash = mesh.lab().pod(1, 1).unwrap().cidr();
    // c2/n2's CIDR is fine: routed.
    wait_routes(
        &mesh,
        1,
        2,
        &c2_routes(&mesh, &[2]),
        Duration::from_secs(30),
    );
    for n in [1, 2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            // the status server may not listen yet: poll until it answers with a refusal
            let st = mesh.node_sync_status_json(1, n);
            let refused = st
                .as_ref()
                .ok()
                .and_then(|st| st["routing"]["refused"].as_array().cloned())
                .unwrap_or_default();
            if !refused.is_empty() {
                break refused;
            }
            assert!(Instant::now() < deadline, "c1/n{n} refused nothing: {st:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(refused.len(), 1, "c1/n{n}: {refused:?}");
        let r = &refused[0];
        assert_eq!(r["cidr"], clash.as_str(), "{r}");
        assert_eq!(r["cluster"], "c2", "{r}");
        assert_eq!(r["node"], "n1", "{r}");
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("overlaps"), "c1/n{n}: reason {reason:?}");
        assert_eq!(
            mesh.node_routes(1, n, PROTO).unwrap(),
            c2_routes(&mesh, &[2]),
            "c1/n{n}: a route for the refused CIDR"
        );
    }
    mesh.teardown().expect("teardown");
}
