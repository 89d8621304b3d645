//! `nodeSync.routing` (issue 20): the mode reaches node-sync as `--routing`, vxlan's VNI and port as
//! their flags, node-sync's own parser takes what is rendered, a mode that changes the host's routes
//! runs on the host network with NET_ADMIN, and the schema refuses a mode node-sync does not know.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use serde_yaml::Value;

use chart_tests::binaries::parse_node_sync;
use chart_tests::helm::{parse_docs, template_set};
use chart_tests::manifest::{args, at, container, flag, seq_at, str_at};

/// The node-sync DaemonSet rendered with `sets`.
fn node_sync_with(sets: &[&str]) -> Value {
    let yaml = template_set(sets).unwrap_or_else(|e| panic!("--set {sets:?} must render: {e}"));
    parse_docs(&yaml)
        .into_iter()
        .find(|d| {
            str_at(d, &["kind"]) == Some("DaemonSet")
                && str_at(d, &["metadata", "name"]).is_some_and(|n| n.ends_with("-node-sync"))
        })
        .unwrap_or_else(|| panic!("--set {sets:?}: no node-sync DaemonSet"))
}

fn has_net_admin(c: &Value) -> bool {
    seq_at(c, &["securityContext", "capabilities", "add"])
        .iter()
        .any(|v| v.as_str() == Some("NET_ADMIN"))
}

#[test]
fn routing_mode_reaches_node_sync_with_host_network_and_net_admin() {
    use node_sync::routing::RoutingMode;
    for (mode, want) in [
        (None, RoutingMode::None),
        (Some("none"), RoutingMode::None),
        (Some("native"), RoutingMode::Native),
    ] {
        let set = mode.map(|m| format!("nodeSync.routing.mode={m}"));
        let sets: Vec<&str> = set.iter().map(String::as_str).collect();
        let ds = node_sync_with(&sets);
        let c = container(&ds, "node-sync");
        let a = args(c);
        let parsed = parse_node_sync(&format!("routing {mode:?}"), &a);
        assert_eq!(parsed.routing, want, "--set {sets:?}: node-sync's routing");
        assert!(
            flag(&a, "vxlan-vni").is_none() && flag(&a, "vxlan-port").is_none(),
            "--set {sets:?}: vxlan flags only with mode vxlan: {a:?}"
        );
        assert_eq!(
            at(&ds, &["spec", "template", "spec", "hostNetwork"]).and_then(Value::as_bool),
            Some(true),
            "--set {sets:?}: the routes must go into the host's namespace"
        );
        let privileged = at(c, &["securityContext", "privileged"]).and_then(Value::as_bool);
        if want != RoutingMode::None {
            assert!(
                has_net_admin(c) || privileged == Some(true),
                "--set {sets:?}: changing routes needs NET_ADMIN"
            );
            assert!(has_net_admin(c), "--set {sets:?}: NET_ADMIN is named");
        } else {
            assert!(!has_net_admin(c), "--set {sets:?}: no NET_ADMIN asked for");
        }
    }
}

#[test]
fn vxlan_mode_renders_its_vni_and_port() {
    let ds = node_sync_with(&[
        "nodeSync.routing.mode=vxlan",
        "nodeSync.routing.vxlan.vni=42",
        "nodeSync.routing.vxlan.port=4789",
    ]);
    let c = container(&ds, "node-sync");
    let a = args(c);
    assert_eq!(flag(&a, "routing"), Some("vxlan"), "{a:?}");
    assert_eq!(flag(&a, "vxlan-vni"), Some("42"), "{a:?}");
    assert_eq!(flag(&a, "vxlan-port"), Some("4789"), "{a:?}");
    assert!(
        has_net_admin(c),
        "vxlan makes a device and routes: NET_ADMIN"
    );
    let parsed = parse_node_sync("routing vxlan", &a);
    assert_eq!(parsed.routing, node_sync::routing::RoutingMode::Vxlan);
    assert_eq!((parsed.vxlan_vni, parsed.vxlan_port), (42, 4789));
}

#[test]
fn schema_refuses_an_unknown_routing_mode_and_bad_vxlan_numbers() {
    for (sets, path) in [
        (&["nodeSync.routing.mode=bgp"][..], "/nodeSync/routing/mode"),
        (
            &[
                "nodeSync.routing.mode=vxlan",
                "nodeSync.routing.vxlan.vni=0",
            ][..],
            "/nodeSync/routing/vxlan/vni",
        ),
        (
            &[
                "nodeSync.routing.mode=vxlan",
                "nodeSync.routing.vxlan.port=70000",
            ][..],
            "/nodeSync/routing/vxlan/port",
        ),
    ] {
        let err = template_set(sets).expect_err(&format!("--set {sets:?} must fail"));
        assert!(
            err.contains(path),
            "--set {sets:?}: the error must name {path}:\n{err}"
        );
    }
}
