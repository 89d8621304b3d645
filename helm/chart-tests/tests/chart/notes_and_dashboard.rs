//! The install NOTES tell the next step, and the Grafana dashboard is valid, found by the sidecar
//! and queries only metrics the binaries export.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use std::collections::{BTreeMap, BTreeSet};

use chart_tests::helm::{
    NAMESPACE, RELEASE, Rendered, cases, chart_dir, helm, repo_root, run, stderr,
};
use chart_tests::manifest::str_at;

#[test]
fn notes_tell_the_next_step_and_the_dashboard_is_valid_grafana_json() {
    let mut cmd = helm();
    cmd.args(["install", RELEASE]).arg(chart_dir()).args([
        "--dry-run=client",
        "--namespace",
        NAMESPACE,
        "--set",
        "cluster.name=east,cluster.id=3",
    ]);
    let out = run(cmd);
    assert!(
        out.status.success(),
        "helm install --dry-run=client: {}",
        stderr(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let notes = stdout
        .split("NOTES:")
        .nth(1)
        .unwrap_or_else(|| panic!("no NOTES in:\n{stdout}"));
    assert!(notes.contains("clustermesh connect"), "{notes}");
    assert!(notes.contains("\"east\" (id 3)"), "{notes}");
    assert!(
        !notes.contains("WARNING"),
        "no default-name warning for a named cluster: {notes}"
    );

    let r = Rendered::of(&cases()[0]);
    let cm = r.one("ConfigMap", "-dashboard");
    assert_eq!(
        str_at(cm, &["metadata", "labels", "grafana_dashboard"]),
        Some("1"),
        "the Grafana sidecar finds dashboards by this label"
    );
    let json = str_at(cm, &["data", "clustermesh.json"]).expect("dashboard JSON");
    let dash: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut metrics = BTreeMap::new();
    for p in panels {
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            for m in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if m.starts_with("clustermesh_apiserver_") || m.starts_with("nodesync_") {
                    metrics.insert(m.to_owned(), p["title"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert!(
        metrics
            .keys()
            .any(|m| m.starts_with("clustermesh_apiserver_")),
        "{metrics:?}"
    );
    assert!(
        metrics.keys().any(|m| m.starts_with("nodesync_")),
        "{metrics:?}"
    );
}

/// Every metric the Grafana dashboard queries is one the binaries export: the apiserver's from its
/// real exposition (`Status::metrics`), node-sync's from the names in its status module.
#[test]
fn dashboard_queries_only_metrics_the_binaries_export() {
    let r = Rendered::of(&cases()[0]);
    let json = str_at(
        r.one("ConfigMap", "-dashboard"),
        &["data", "clustermesh.json"],
    )
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut queried = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("clustermesh_apiserver_")
                    || word.starts_with("clustermesh_certificate_")
                    || word.starts_with("nodesync_")
                {
                    queried.insert(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");

    let status = clustermesh_apiserver::status::Status::new("c1", 1, "replica-0");
    let exposition = status.metrics();
    let apiserver_families: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let node_sync_src = std::fs::read_to_string(repo_root().join("node-sync/src/status.rs"))
        .expect("node-sync/src/status.rs");
    for m in &queried {
        if m.starts_with("clustermesh_apiserver_") || m.starts_with("clustermesh_certificate_") {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    m.strip_suffix(s)
                        .filter(|f| apiserver_families.contains(*f))
                })
                .unwrap_or(m);
            assert!(
                apiserver_families.contains(family),
                "the dashboard queries {m}, which clustermesh-apiserver does not export ({apiserver_families:?})"
            );
        } else {
            assert!(
                node_sync_src.contains(&format!("\"{m}\""))
                    || node_sync_src.contains(&format!("\"{m}{{")),
                "the dashboard queries {m}, which node-sync/src/status.rs does not name"
            );
        }
    }
}
