//! What `helm lint` and `helm template` make of the chart with its default values and every
//! example values file: it lints, every component renders into the release namespace with probes
//! on the status port, every object is one the Kubernetes API knows field by field, and the
//! binaries' own argument parsers accept every rendered container's arguments (optional flags
//! included), as `clustermesh connect`'s parser accepts the mesh-info ConfigMap.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use std::collections::BTreeSet;

use serde_yaml::Value;

use chart_tests::binaries::{assert_env_refs_defined, parse_apiserver, parse_node_sync};
use chart_tests::helm::{
    Case, NAMESPACE, RELEASE, Rendered, cases, chart_dir, helm, parse_docs, run, stderr,
    template_set,
};
use chart_tests::manifest::{
    args, at, container, env, flag, seq_at, str_at, volume, volume_mounted_at,
};

#[test]
fn helm_lint_passes_for_default_values_and_every_example() {
    for case in cases() {
        let mut cmd = helm();
        cmd.args(["lint", "--strict"])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE])
            .args(case.values_args());
        let out = run(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict with {} failed:\n{stdout}\n{}",
            case.name,
            stderr(&out)
        );
        assert!(
            stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint with {}: {stdout}",
            case.name
        );
    }
}

#[test]
fn helm_template_renders_every_component_for_default_values_and_every_example() {
    for r in Rendered::all() {
        let kinds: BTreeSet<&str> = r.docs.iter().filter_map(|d| str_at(d, &["kind"])).collect();
        for kind in [
            "Deployment",
            "DaemonSet",
            "Service",
            "ServiceAccount",
            "ConfigMap",
        ] {
            assert!(
                kinds.contains(kind),
                "{}: no {kind} rendered ({kinds:?})",
                r.case.name
            );
        }
        for d in &r.docs {
            let kind = str_at(d, &["kind"]).unwrap_or("?");
            let name = str_at(d, &["metadata", "name"]).unwrap_or("?");
            assert!(
                str_at(d, &["apiVersion"]).is_some(),
                "{}: {kind} {name} has no apiVersion",
                r.case.name
            );
            if !matches!(kind, "ClusterRole" | "ClusterRoleBinding") {
                assert_eq!(
                    str_at(d, &["metadata", "namespace"])
                        .map(|ns| ns == NAMESPACE || kind == "ConfigMap"),
                    Some(true),
                    "{}: {kind} {name} is not in the release namespace",
                    r.case.name
                );
            }
        }
        // Probes on the status port, on both workloads.
        for (workload, c) in [(r.apiserver(), "apiserver"), (r.node_sync(), "node-sync")] {
            let c = container(workload, c);
            assert_eq!(
                str_at(c, &["livenessProbe", "httpGet", "path"]),
                Some("/healthz")
            );
            assert_eq!(
                str_at(c, &["readinessProbe", "httpGet", "path"]),
                Some("/readyz")
            );
            let port = str_at(c, &["readinessProbe", "httpGet", "port"]).unwrap();
            let status_port = seq_at(c, &["ports"])
                .iter()
                .find(|p| str_at(p, &["name"]) == Some(port))
                .and_then(|p| at(p, &["containerPort"]))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| {
                    panic!("{}: probe port {port} is not a container port", r.case.name)
                });
            let a = args(c);
            let listen = flag(&a, "status-listen").expect("--status-listen");
            assert!(
                listen.ends_with(&format!(":{status_port}")),
                "{}: probes hit port {status_port} but --status-listen={listen}",
                r.case.name
            );
        }
    }
}

/// Deserialize `doc` as the Kubernetes type `T` (k8s-openapi, API 1.35) and serialize it back:
/// every field of the rendered manifest must survive, so a misspelled or misplaced field (which
/// the API server would drop or refuse) shows up as a difference.
fn roundtrip<T>(doc: &serde_json::Value) -> Result<(), String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| format!("does not deserialize: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    missing_fields(doc, &back, String::new(), &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("fields the Kubernetes API does not know: {lost:?}"))
    }
}

/// Paths present in `want` (non-empty) but absent or different in `got`.
fn missing_fields(
    want: &serde_json::Value,
    got: &serde_json::Value,
    path: String,
    out: &mut Vec<String>,
) {
    use serde_json::Value as J;
    match (want, got) {
        (J::Object(w), J::Object(g)) => {
            for (k, wv) in w {
                let empty = matches!(wv, J::Null) || wv.as_object().is_some_and(|o| o.is_empty());
                match g.get(k) {
                    Some(gv) => missing_fields(wv, gv, format!("{path}.{k}"), out),
                    None if empty => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (J::Array(w), J::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                missing_fields(wv, gv, format!("{path}[{i}]"), out);
            }
        }
        (J::Object(w), _) if w.is_empty() => {}
        (w, g) if w == g => {}
        (w, g) => out.push(format!("{path}: {w} became {g}")),
    }
}

#[test]
fn rendered_manifests_are_valid_kubernetes_objects() {
    use k8s_openapi::api::{
        apps::v1 as apps, batch::v1 as batch, core::v1 as core, policy::v1 as policy,
        rbac::v1 as rbac,
    };
    let mut checked = 0;
    for r in Rendered::all() {
        for doc in &r.docs {
            let kind = str_at(doc, &["kind"]).unwrap_or("?");
            let name = str_at(doc, &["metadata", "name"]).unwrap_or("?");
            let json = serde_json::to_value(doc).unwrap();
            let result = match kind {
                "Deployment" => roundtrip::<apps::Deployment>(&json),
                "DaemonSet" => roundtrip::<apps::DaemonSet>(&json),
                "Service" => roundtrip::<core::Service>(&json),
                "ServiceAccount" => roundtrip::<core::ServiceAccount>(&json),
                "ConfigMap" => roundtrip::<core::ConfigMap>(&json),
                "PersistentVolumeClaim" => roundtrip::<core::PersistentVolumeClaim>(&json),
                "ClusterRole" => roundtrip::<rbac::ClusterRole>(&json),
                "ClusterRoleBinding" => roundtrip::<rbac::ClusterRoleBinding>(&json),
                "Role" => roundtrip::<rbac::Role>(&json),
                "RoleBinding" => roundtrip::<rbac::RoleBinding>(&json),
                "Job" => roundtrip::<batch::Job>(&json),
                "CronJob" => roundtrip::<batch::CronJob>(&json),
                "PodDisruptionBudget" => roundtrip::<policy::PodDisruptionBudget>(&json),
                // CRDs (cert-manager, Prometheus operator): checked by their own tests above.
                "Certificate" | "Issuer" | "ServiceMonitor" => continue,
                other => Err(format!("unexpected kind {other}")),
            };
            if let Err(e) = result {
                panic!("{}: {kind} {name}: {e}", r.case.name);
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "checked {checked} objects");
}

#[test]
fn apiserver_and_node_sync_parse_every_rendered_container_args() {
    let mut checked = 0;
    for r in Rendered::all() {
        let name = &r.case.name;
        let api_c = container(r.apiserver(), "apiserver");
        assert_env_refs_defined(name, api_c);
        let api = parse_apiserver(name, &args(api_c));
        let want_name = str_at(&r.values, &["cluster", "name"]).unwrap_or("cluster1");
        let want_id = at(&r.values, &["cluster", "id"])
            .and_then(Value::as_u64)
            .unwrap_or(1);
        assert_eq!(api.cluster_name, want_name, "{name}: --cluster-name");
        assert_eq!(u64::from(api.cluster_id), want_id, "{name}: --cluster-id");
        let want_mcc = at(&r.values, &["clustermesh", "maxConnectedClusters"])
            .and_then(Value::as_u64)
            .unwrap_or(255);
        assert_eq!(
            u64::from(api.max_connected_clusters),
            want_mcc,
            "{name}: --max-connected-clusters"
        );

        let ns_c = container(r.node_sync(), "node-sync");
        assert_env_refs_defined(name, ns_c);
        let ns = parse_node_sync(name, &args(ns_c));
        assert_eq!(
            ns.cluster_name.to_string(),
            want_name,
            "{name}: node-sync --cluster-name"
        );
        assert!(
            ns.etcd.endpoints.iter().all(|e| e.starts_with("https://")),
            "{name}: node-sync must reach etcd over TLS: {:?}",
            ns.etcd.endpoints
        );
        checked += 1;
    }
    assert!(checked >= 4, "checked {checked} value sets");
}

/// Every flag the chart can render (all optional ones switched on) is accepted too.
#[test]
fn binaries_accept_the_optional_flags_the_chart_can_render() {
    let yaml = template_set(&[
        "clustermesh.kvstoremesh=true",
        "clustermesh.clustersetCIDR=10.253.0.0/16",
        "etcd.mode=external",
        "etcd.external.endpoints[0]=https://etcd-0.example:2379",
        "etcd.external.endpoints[1]=https://etcd-1.example:2379",
        "apiserver.replicas=3",
        "apiserver.source=manifests",
        "apiserver.manifestConfigMap=manifests",
        "apiserver.logFormat=plain",
        "nodeSync.logFormat=plain",
        "nodeSync.cgroup.attachPath=kubepods.slice",
        "nodeSync.health.interval=1s",
        "nodeSync.staleGrace=2m",
        "nodeSync.syncTimeout=1m30s",
        "nodeSync.maxBackends=262144",
        "nodeSync.dns.enabled=true",
        "nodeSync.dns.forward=10.96.0.10:53",
        "nodeSync.dns.ttl=3",
    ])
    .expect("render with every optional flag");
    let r = Rendered {
        case: Case {
            name: "all optional flags".to_owned(),
            values_file: None,
        },
        values: Value::Null,
        docs: parse_docs(&yaml),
    };
    let api = args(container(r.apiserver(), "apiserver"));
    for f in [
        "kvstoremesh",
        "clusterset-cidr",
        "etcd-endpoints",
        "manifest-dir",
        "source",
    ] {
        assert!(
            api.iter()
                .any(|a| a == &format!("--{f}") || a.starts_with(&format!("--{f}="))),
            "--{f} not rendered: {api:?}"
        );
    }
    let parsed = parse_apiserver(&r.case.name, &api);
    assert_eq!(
        parsed.etcd.endpoints.len(),
        2,
        "--etcd-endpoints is comma separated: {api:?}"
    );
    assert!(parsed.kvstoremesh);
    let ns = args(container(r.node_sync(), "node-sync"));
    let parsed = parse_node_sync(&r.case.name, &ns);
    assert_eq!(
        parsed.etcd.endpoints.len(),
        2,
        "--etcd-endpoints is comma separated: {ns:?}"
    );
    assert!(parsed.kvstoremesh);
    assert_eq!(parsed.stale_grace, std::time::Duration::from_secs(120));
    assert_eq!(parsed.max_backends, 262_144);
    assert_eq!(parsed.dns_listen.map(|a| a.port()), Some(10053));
    assert_eq!(parsed.dns_forward, Some("10.96.0.10:53".parse().unwrap()));
    assert_eq!(parsed.dns_ttl, 3);
}

/// The mesh-info ConfigMap `clustermesh connect --context` reads (parsed with the CLI's own parser)
/// tells the truth about the rendered chart: the cluster's identity, an etcd Service with that port
/// (or the external endpoints), the Secret node-sync itself takes its remote certificate from, and
/// the remotes Secret node-sync projects (optional: connect creates it) into --remote-config-dir
/// next to the static-remotes ConfigMap, without items, so every key of it becomes a file there.
#[test]
fn mesh_info_tells_connect_where_the_chart_keeps_everything() {
    use clustermesh_cli::kube_connect::{MeshInfo, mesh_info_name};
    for r in Rendered::all() {
        let name = &r.case.name;
        let cm = r.one("ConfigMap", "-mesh-info");
        assert_eq!(
            str_at(cm, &["metadata", "name"]),
            Some(mesh_info_name(RELEASE).as_str()),
            "{name}: connect derives the ConfigMap's name from the release as the chart does"
        );
        let data: std::collections::BTreeMap<String, String> =
            serde_yaml::from_value(at(cm, &["data"]).cloned().unwrap()).unwrap();
        let m = MeshInfo::from_data(&data)
            .unwrap_or_else(|e| panic!("{name}: connect refuses the mesh-info ConfigMap: {e}"));
        let want_name = str_at(&r.values, &["cluster", "name"]).unwrap_or("cluster1");
        let want_id = at(&r.values, &["cluster", "id"])
            .and_then(Value::as_u64)
            .unwrap_or(1);
        assert_eq!(
            (m.cluster_name.as_str(), u64::from(m.cluster_id)),
            (want_name, want_id),
            "{name}"
        );
        let mcc = at(&r.values, &["clustermesh", "maxConnectedClusters"])
            .and_then(Value::as_u64)
            .unwrap_or(255);
        assert_eq!(u64::from(m.max_connected_clusters), mcc, "{name}");
        match &m.etcd_service {
            Some(svc) => {
                let service = r
                    .of_kind("Service")
                    .find(|s| str_at(s, &["metadata", "name"]) == Some(svc.as_str()))
                    .unwrap_or_else(|| panic!("{name}: no Service {svc}"));
                assert!(
                    seq_at(service, &["spec", "ports"])
                        .iter()
                        .any(|p| str_at(p, &["name"]) == Some(m.etcd_service_port.as_str())),
                    "{name}: Service {svc} has no port {}",
                    m.etcd_service_port
                );
            }
            None => assert!(
                !m.etcd_endpoints.is_empty(),
                "{name}: external etcd endpoints"
            ),
        }
        // `connect --wait` and `status --context` read the apiserver's status through this
        // Service's port (the Kubernetes API server's service proxy).
        let status_svc = m
            .status_service
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: mesh-info names no status-service"));
        let service = r
            .of_kind("Service")
            .find(|s| str_at(s, &["metadata", "name"]) == Some(status_svc))
            .unwrap_or_else(|| panic!("{name}: no Service {status_svc}"));
        let port = seq_at(service, &["spec", "ports"])
            .iter()
            .find(|p| str_at(p, &["name"]) == Some(m.status_service_port.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "{name}: Service {status_svc} has no port {}",
                    m.status_service_port
                )
            });
        let target = str_at(port, &["targetPort"]).unwrap_or_default();
        let apiserver = r.one("Deployment", "-apiserver");
        assert!(
            seq_at(apiserver, &["spec", "template", "spec", "containers"])
                .iter()
                .flat_map(|c| seq_at(c, &["ports"]))
                .any(|p| str_at(p, &["name"]) == Some(target)),
            "{name}: the status Service's port targets {target:?}, which no apiserver container port is"
        );
        // node-sync's own TLS volume takes the remote certificate from the Secret connect copies.
        let ds = r.node_sync();
        let tls = volume(ds, "tls");
        let [ca_k, cert_k, key_k] = &m.remote_tls_keys;
        let src = seq_at(tls, &["projected", "sources"])
            .iter()
            .find(|s| str_at(s, &["secret", "name"]) == Some(m.remote_tls_secret.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "{name}: node-sync's tls volume has no source {}",
                    m.remote_tls_secret
                )
            });
        let keys: Vec<&str> = seq_at(src, &["secret", "items"])
            .iter()
            .filter_map(|i| str_at(i, &["key"]))
            .collect();
        for k in [cert_k, key_k] {
            assert!(keys.contains(&k.as_str()), "{name}: {k} not in {keys:?}");
        }
        let mode = str_at(&r.values, &["certs", "mode"]).unwrap_or("job");
        if mode != "certManager" {
            assert!(
                keys.contains(&ca_k.as_str()),
                "{name}: {ca_k} not in {keys:?}"
            );
        }
        if mode == "job" {
            let job = r.one("Job", "-certgen");
            let script = seq_at(container(job, "certgen"), &["args"])[0]
                .as_str()
                .unwrap();
            assert!(
                script.contains(r#"store "$NODE_SYNC_SECRET" "$work/cluster" cluster.json ca-bundle.pem node.crt node.key remote.crt remote.key"#),
                "{name}: the certgen Job stores remote.crt/key in the node-sync Secret"
            );
            let env_secret = env(container(job, "certgen"), "NODE_SYNC_SECRET");
            assert_eq!(env_secret, Some(m.remote_tls_secret.as_str()), "{name}");
        }
        // The remotes volume: the static ConfigMap plus connect's optional Secret.
        let c = container(ds, "node-sync");
        let dir = flag(&args(c), "remote-config-dir").unwrap().to_owned();
        let vol = volume_mounted_at(ds, c, &dir);
        let sources = seq_at(vol, &["projected", "sources"]);
        let secret = sources
            .iter()
            .find(|s| str_at(s, &["secret", "name"]) == Some(m.remotes_secret.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "{name}: remotes volume does not project {}",
                    m.remotes_secret
                )
            });
        assert_eq!(
            at(secret, &["secret", "optional"]).and_then(Value::as_bool),
            Some(true),
            "{name}: node-sync must start before connect made the Secret"
        );
        assert!(
            at(secret, &["secret", "items"]).is_none(),
            "{name}: every key"
        );
        assert!(
            r.of_kind("Secret")
                .all(|s| str_at(s, &["metadata", "name"]) != Some(m.remotes_secret.as_str())),
            "{name}: the chart must not render the remotes Secret (an upgrade would drop connect's entries)"
        );
    }
}
