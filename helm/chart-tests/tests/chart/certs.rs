//! The certificate modes (`certs.mode` job, existing, certManager): TLS Secrets mounted where
//! `--tls-dir` points with every file the binary reads; the certgen Job's and the renewal
//! CronJob's scripts run for real against a stand-in Secrets API (with mesh-certs and the real
//! `clustermesh` CLI); and the managed etcd, started by the apiserver's own code on the
//! certificates the chart issues, serving the pod's addresses.
//!
//! Needs `helm` (v4) on PATH, etcd (as the apiserver starts it) and the workspace's binaries
//! built (`cargo build --bins`).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use mesh_testkit::free_port;
use serde_yaml::Value;

use chart_tests::binaries::parse_apiserver;
use chart_tests::fake_secrets_api::FakeSecretsApi;
use chart_tests::helm::{
    Case, NAMESPACE, RELEASE, Rendered, cases, parse_docs, run, stderr, template_set,
};
use chart_tests::manifest::{
    args, at, container, env, flag, mounts, seq_at, str_at, strings, volume_mounted_at,
};
use chart_tests::scratch::Scratch;

/// The files of a `clustermesh ca issue-cluster` directory each component reads from --tls-dir.
/// With KVStoreMesh the apiserver also reads other clusters' etcds (as remote-<cluster>).
fn tls_files(component: &str, kvstoremesh: bool) -> Vec<String> {
    let roles: &[&str] = match component {
        "apiserver" if kvstoremesh => &["etcd-server", "apiserver", "root", "admin", "remote"],
        "apiserver" => &["etcd-server", "apiserver", "root", "admin"],
        _ => &["node", "remote"],
    };
    let mut files = vec!["ca-bundle.pem".to_owned(), "cluster.json".to_owned()];
    if component == "apiserver" {
        // The managed etcd's client trust with etcd.clientTrust=cluster.
        files.push("client-ca.pem".to_owned());
    }
    for role in roles {
        files.push(format!("{role}.crt"));
        files.push(format!("{role}.key"));
    }
    files
}

#[test]
fn tls_secrets_are_mounted_where_tls_dir_points_with_every_file_the_binary_reads() {
    for r in Rendered::all() {
        let name = &r.case.name;
        let values = &r.values;
        let mode = str_at(values, &["certs", "mode"]).unwrap_or("job");
        for (workload, cname, component, secret_env) in [
            (r.apiserver(), "apiserver", "apiserver", "APISERVER_SECRET"),
            (r.node_sync(), "node-sync", "nodeSync", "NODE_SYNC_SECRET"),
        ] {
            let c = container(workload, cname);
            let a = args(c);
            let tls_dir =
                flag(&a, "tls-dir").unwrap_or_else(|| panic!("{name}: {cname} has no --tls-dir"));
            let (_, _, _) = mounts(c)
                .into_iter()
                .find(|(_, p, _)| p == tls_dir)
                .unwrap_or_else(|| {
                    panic!("{name}: {cname} --tls-dir={tls_dir} is not a volumeMount")
                });
            let vol = volume_mounted_at(workload, c, tls_dir);
            let kvstoremesh = at(values, &["clustermesh", "kvstoremesh"])
                .and_then(Value::as_bool)
                .unwrap_or(false);
            // The managed etcd trusts only the cluster's own intermediate unless told otherwise
            // (certManager and an external etcd default to the mesh bundle).
            let managed = str_at(values, &["etcd", "mode"]).is_none_or(|m| m == "managed");
            let cluster_trust = match str_at(values, &["etcd", "clientTrust"]) {
                Some(t) if !t.is_empty() => t == "cluster",
                _ => managed && mode != "certManager",
            };
            assert_eq!(
                flag(&a, "managed-etcd-client-trust").is_some_and(|t| t == "cluster"),
                cluster_trust && component == "apiserver",
                "{name}: {cname} --managed-etcd-client-trust"
            );
            // client-ca.pem is stored always, mounted only where the managed etcd uses it.
            let want: Vec<String> = tls_files(component, kvstoremesh)
                .into_iter()
                .filter(|f| f != "client-ca.pem" || cluster_trust)
                .collect();
            // Under cluster trust the apiserver also holds the intermediate, optionally, to sign
            // other clusters' reader certificates (gRPC connect); nothing else ever does.
            let mut optional_files = BTreeSet::new();
            let mut files = BTreeSet::new();
            let mut secrets = BTreeSet::new();
            for src in seq_at(vol, &["projected", "sources"]) {
                if at(src, &["secret", "optional"]).and_then(Value::as_bool) == Some(true) {
                    let secret = str_at(src, &["secret", "name"]).unwrap();
                    for item in seq_at(src, &["secret", "items"]) {
                        optional_files.insert(str_at(item, &["path"]).unwrap().to_owned());
                    }
                    let from = if mode == "job" {
                        let job = r.one("Job", "-certgen");
                        env(container(job, "certgen"), "INTERMEDIATE_SECRET")
                            .unwrap()
                            .to_owned()
                    } else {
                        str_at(values, &["certs", "existing", "apiserverSecret"])
                            .unwrap()
                            .to_owned()
                    };
                    assert_eq!(secret, from, "{name}: {cname} intermediate Secret");
                    continue;
                }
                if let Some(secret) = str_at(src, &["secret", "name"]) {
                    secrets.insert(secret.to_owned());
                }
                for kind in ["secret", "configMap"] {
                    for item in seq_at(src, &[kind, "items"]) {
                        files.insert(str_at(item, &["path"]).unwrap().to_owned());
                    }
                }
            }
            for f in &want {
                assert!(
                    files.contains(f),
                    "{name}: {cname} --tls-dir={tls_dir} lacks {f} ({files:?})"
                );
            }
            let want_optional: BTreeSet<String> = if cluster_trust && component == "apiserver" {
                BTreeSet::from(["intermediate.crt".to_owned(), "intermediate.key".to_owned()])
            } else {
                BTreeSet::new()
            };
            assert_eq!(
                optional_files, want_optional,
                "{name}: {cname} --tls-dir={tls_dir}: the intermediate goes to the apiserver under cluster trust only"
            );
            assert!(
                !secrets.is_empty(),
                "{name}: {cname} --tls-dir volume holds no Secret: {vol:?}"
            );
            match mode {
                "job" => {
                    // The Secret is the one the certgen Job stores, with these very files.
                    let job = r.one("Job", "-certgen");
                    let jc = container(job, "certgen");
                    let stored = env(jc, secret_env).unwrap();
                    assert_eq!(
                        secrets,
                        BTreeSet::from([stored.to_owned()]),
                        "{name}: {cname} mounts {secrets:?}"
                    );
                    let script = strings(seq_at(jc, &["args"])).join("\n");
                    let store = script
                        .lines()
                        .skip_while(|l| !l.contains(&format!("store \"${secret_env}\"")))
                        .take_while(|l| !l.trim().is_empty() && !l.trim_start().starts_with("fi"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    for f in &want {
                        // KEY=FILE stores FILE under the Secret key KEY (the name the binary reads).
                        assert!(
                            store
                                .split_whitespace()
                                .any(|w| w == f || w.split_once('=').is_some_and(|(k, _)| k == f)),
                            "{name}: the certgen Job does not store {f} in {stored} ({store})"
                        );
                    }
                }
                "existing" => {
                    let key = if component == "apiserver" {
                        "apiserverSecret"
                    } else {
                        "nodeSyncSecret"
                    };
                    let given = str_at(values, &["certs", "existing", key]).unwrap();
                    assert_eq!(
                        secrets,
                        BTreeSet::from([given.to_owned()]),
                        "{name}: {cname} mounts the Secret named in certs.existing.{key}"
                    );
                }
                "certManager" => {
                    let certificates: BTreeSet<String> = r
                        .of_kind("Certificate")
                        .filter_map(|c| str_at(c, &["spec", "secretName"]))
                        .map(str::to_owned)
                        .collect();
                    assert!(
                        secrets.is_subset(&certificates),
                        "{name}: {cname} projects {secrets:?}, not all written by a Certificate ({certificates:?})"
                    );
                }
                other => panic!("{name}: unknown certs.mode {other}"),
            }
            // Keys are never world-readable.
            let mode_bits = at(vol, &["secret", "defaultMode"])
                .or_else(|| at(vol, &["projected", "defaultMode"]))
                .and_then(Value::as_u64)
                .unwrap_or(0o644);
            assert_eq!(
                mode_bits & 0o007,
                0,
                "{name}: {cname} TLS files are world-readable ({mode_bits:o})"
            );
        }
        // node-sync never gets the admin, root or server keys.
        let ns = container(r.node_sync(), "node-sync");
        let tls_dir = flag(&args(ns), "tls-dir").unwrap().to_owned();
        let vol = volume_mounted_at(r.node_sync(), ns, &tls_dir);
        let text = serde_yaml::to_string(vol).unwrap();
        for forbidden in ["admin", "root.", "etcd-server", "apiserver-tls"] {
            assert!(
                !text.contains(forbidden),
                "{name}: node-sync's TLS volume exposes {forbidden}: {text}"
            );
        }
    }
}

/// A chart script as it would run in its pod, on this machine: the ServiceAccount files (token
/// `token`) under `work/sa`, the script's paths pointed there, its API calls over plain HTTP.
fn in_fake_pod(script: &str, work: &Path, token: &str) -> String {
    let sa = work.join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), token).unwrap();
    std::fs::write(sa.join("ca.crt"), "unused over plain http").unwrap();
    std::fs::write(sa.join("namespace"), NAMESPACE).unwrap();
    script
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            sa.to_str().unwrap(),
        )
        .replace("api=\"https://", "api=\"http://")
}

/// `bash -euo pipefail -c script` with nothing of our environment but `bin` first in PATH, a
/// TMPDIR under `work` and the API server at `api`.
fn script_command(script: &str, bin: &Path, work: &Path, api: &FakeSecretsApi) -> Command {
    let tmp = work.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script])
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
        )
        .env("TMPDIR", &tmp)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.port.to_string());
    cmd
}

/// Run the certgen container's script from `rendered` against `api`, with a `clustermesh` on PATH
/// that hands out certificates issued beforehand by mesh-certs (the library behind `clustermesh ca`)
/// and logs its arguments.
fn run_certgen(
    rendered: &Rendered,
    api: &FakeSecretsApi,
    work: &Path,
    ca_mount: Option<&Path>,
) -> (Output, String) {
    let job = rendered.one("Job", "-certgen");
    let c = container(job, "certgen");
    assert_eq!(
        strings(seq_at(c, &["command"])),
        ["/bin/bash", "-euo", "pipefail", "-c"]
    );
    let mut script = in_fake_pod(
        &strings(seq_at(c, &["args"])).join("\n"),
        work,
        "test-token",
    );
    if let Some(m) = ca_mount {
        script = script.replace("/etc/clustermesh/ca", m.to_str().unwrap());
    }

    // Certificates from mesh-certs, copied into --out by the stand-in CLI.
    let issued = work.join("issued");
    if !issued.exists() {
        let td = mesh_certs::TrustDomain::new("clustermesh.local").unwrap();
        let root = mesh_certs::RootCa::init(&issued.join("ca"), &td, &Default::default())
            .expect("ca init");
        let req = mesh_certs::ClusterRequest::new("cluster1", 1, issued.join("cluster")).unwrap();
        root.issue_cluster(&req).expect("issue cluster");
    }
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let shim = bin.join("clustermesh");
    std::fs::write(
        &shim,
        r#"#!/bin/bash
set -eu
echo "$*" >> "$SHIM_LOG"
out=""; prev=""
for a in "$@"; do if [ "$prev" = --out ]; then out="$a"; fi; prev="$a"; done
case "$1 $2" in
  "ca init") cp -r "$SHIM_ISSUED/ca" "$out" ;;
  "ca issue-cluster") cp -r "$SHIM_ISSUED/cluster" "$out" ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#,
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let log = work.join("cli.log");
    let mut cmd = script_command(&script, &bin, work, api);
    cmd.env("SHIM_LOG", &log).env("SHIM_ISSUED", &issued);
    for e in seq_at(c, &["env"]) {
        cmd.env(
            str_at(e, &["name"]).unwrap(),
            str_at(e, &["value"]).unwrap(),
        );
    }
    let out = run(cmd);
    let cli_log = std::fs::read_to_string(&log).unwrap_or_default();
    (out, cli_log)
}

fn secret_file(secret: &serde_json::Value, key: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {} has no key {key}", secret["metadata"]["name"]));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 data")
}

#[test]
fn certgen_job_script_issues_and_stores_secrets_once_and_keeps_them() {
    let r = Rendered::of(&cases()[0]);
    let work = Scratch::new("certgen");
    let api = FakeSecretsApi::start();

    // First install: a new CA, then the cluster's certificates, stored as three Secrets.
    let (out, cli) = run_certgen(&r, &api, &work.0, None);
    assert!(
        out.status.success(),
        "certgen failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let lines: Vec<&str> = cli.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "the CLI runs twice (ca init, ca issue-cluster): {cli}"
    );
    assert!(
        lines[0].starts_with("ca init --trust-domain clustermesh.local --out "),
        "{cli}"
    );
    assert!(
        lines[1].starts_with("ca issue-cluster --ca ")
            && lines[1].contains(" --cluster cluster1 --id 1 --out "),
        "{cli}"
    );
    let svc = format!("{RELEASE}-clustermesh-apiserver");
    for san in [
        svc.clone(),
        format!("{svc}.{NAMESPACE}.svc"),
        format!("{svc}.{NAMESPACE}.svc.cluster.local"),
    ] {
        assert!(
            lines[1].contains(&format!("--san {san} "))
                || lines[1].ends_with(&format!("--san {san}")),
            "{cli}"
        );
    }

    let issued = work.0.join("issued");
    let st = api.state.lock().unwrap();
    let names: BTreeSet<&str> = st.secrets.keys().map(String::as_str).collect();
    let ca_name = format!("{RELEASE}-clustermesh-ca");
    let api_name = format!("{RELEASE}-clustermesh-apiserver-tls");
    let ns_name = format!("{RELEASE}-clustermesh-node-sync-tls");
    let inter_name = format!("{RELEASE}-clustermesh-intermediate");
    assert_eq!(
        names,
        BTreeSet::from([
            ca_name.as_str(),
            api_name.as_str(),
            ns_name.as_str(),
            inter_name.as_str()
        ])
    );
    for (name, dir, files) in [
        (
            &ca_name,
            issued.join("ca"),
            vec!["trust-domain", "root.crt", "root.key", "ca-bundle.pem"],
        ),
        (
            &api_name,
            issued.join("cluster"),
            tls_files("apiserver", true)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        (
            &ns_name,
            issued.join("cluster"),
            tls_files("nodeSync", false)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        (
            &inter_name,
            issued.join("cluster"),
            vec!["cluster.json", "intermediate.crt", "intermediate.key"],
        ),
    ] {
        let s = &st.secrets[name.as_str()];
        assert_eq!(s["type"], "Opaque");
        assert_eq!(
            s["metadata"]["labels"]["clustermesh.io/cluster-name"],
            "cluster1"
        );
        let keys: BTreeSet<&str> = s["data"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            files.iter().copied().collect::<BTreeSet<_>>(),
            "{name}"
        );
        for f in files {
            // The Secrets keep the key names of earlier releases (an upgrade mounts existing
            // Secrets); the etcd root user's files are named etcd-root.* in the cluster directory.
            let file = match f {
                "root.crt" if name == &api_name => "etcd-root.crt",
                "root.key" if name == &api_name => "etcd-root.key",
                other => other,
            };
            assert_eq!(
                secret_file(s, f),
                std::fs::read(dir.join(file)).unwrap(),
                "{name}/{f} differs from the file the CLI wrote"
            );
        }
    }
    // What node-sync gets is a usable identity: certificate and key belong together.
    let check = work.0.join("check");
    std::fs::create_dir_all(&check).unwrap();
    for f in ["node.crt", "node.key", "remote.crt", "remote.key"] {
        std::fs::write(check.join(f), secret_file(&st.secrets[ns_name.as_str()], f)).unwrap();
    }
    for role in ["node", "remote"] {
        mesh_certs::files::KeyedChain::load(
            &check.join(format!("{role}.crt")),
            &check.join(format!("{role}.key")),
        )
        .unwrap_or_else(|e| panic!("{role} certificate from the Secret: {e}"));
    }
    assert!(
        st.requests
            .iter()
            .all(|(_, _, auth)| auth == "Bearer test-token"),
        "every call carries the ServiceAccount token: {:?}",
        st.requests
    );
    drop(st);

    // An upgrade runs the hook again: nothing is issued, nothing is written.
    std::fs::remove_file(work.0.join("cli.log")).ok();
    let posts_before = api
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.0 == "POST")
        .count();
    let (out, cli) = run_certgen(&r, &api, &work.0, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeping them"));
    assert_eq!(cli, "", "no certificate is issued when the Secrets exist");
    let posts_after = api
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.0 == "POST")
        .count();
    assert_eq!(
        posts_before, posts_after,
        "no Secret is written when they exist"
    );

    // An API server that answers 500: the Job fails and says why.
    api.state.lock().unwrap().fail_gets = Some(500);
    let (out, _) = run_certgen(&r, &api, &work.0, None);
    assert!(
        !out.status.success(),
        "certgen must fail when the API server fails"
    );
    assert!(stderr(&out).contains("HTTP 500"), "{}", stderr(&out));
}

#[test]
fn certgen_job_script_issues_from_a_shared_ca_secret_without_making_a_new_ca() {
    let yaml =
        template_set(&["certs.job.caSecret=mesh-ca"]).expect("render with certs.job.caSecret");
    let r = Rendered {
        case: Case {
            name: "certs.job.caSecret=mesh-ca".to_owned(),
            values_file: None,
        },
        values: Value::Null,
        docs: parse_docs(&yaml),
    };
    // The CA Secret is mounted where the script copies it from.
    let job = r.one("Job", "-certgen");
    let c = container(job, "certgen");
    assert_eq!(
        str_at(
            volume_mounted_at(job, c, "/etc/clustermesh/ca"),
            &["secret", "secretName"]
        ),
        Some("mesh-ca")
    );

    let work = Scratch::new("certgen-shared-ca");
    let api = FakeSecretsApi::start();
    let mounted = work.0.join("ca-mount");
    // First call issues the stand-in certificates; the mounted CA is the one mesh-certs made.
    let td = mesh_certs::TrustDomain::new("clustermesh.local").unwrap();
    mesh_certs::RootCa::init(&mounted, &td, &Default::default()).unwrap();
    let (out, cli) = run_certgen(&r, &api, &work.0, Some(&mounted));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(
        !cli.contains("ca init"),
        "no new CA with certs.job.caSecret: {cli}"
    );
    assert!(cli.starts_with("ca issue-cluster --ca "), "{cli}");
    let st = api.state.lock().unwrap();
    let names: BTreeSet<&str> = st.secrets.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            format!("{RELEASE}-clustermesh-apiserver-tls").as_str(),
            format!("{RELEASE}-clustermesh-node-sync-tls").as_str(),
            format!("{RELEASE}-clustermesh-intermediate").as_str()
        ]),
        "the shared CA is not copied into a new Secret (the cluster's intermediate is kept for renewal)"
    );
}

/// The renewal CronJob's script and container, from a render with `sets`.
fn renew_cronjob(sets: &[&str]) -> (String, Vec<(String, String)>) {
    let yaml = template_set(sets).expect("render");
    let r = Rendered {
        case: Case {
            name: format!("{sets:?}"),
            values_file: None,
        },
        values: Value::Null,
        docs: parse_docs(&yaml),
    };
    let cron = r.one("CronJob", "-cert-renew");
    let pod = at(cron, &["spec", "jobTemplate"]).unwrap();
    let c = container(pod, "cert-renew");
    // Every Secret the script reads is mounted where it reads it.
    for (vol, path) in [
        ("apiserver", "/etc/clustermesh/apiserver"),
        ("node-sync", "/etc/clustermesh/node-sync"),
        ("intermediate", "/etc/clustermesh/intermediate"),
    ] {
        let v = volume_mounted_at(pod, c, path);
        assert_eq!(str_at(v, &["name"]), Some(vol));
    }
    let env = seq_at(c, &["env"])
        .iter()
        .map(|e| {
            (
                str_at(e, &["name"]).unwrap().to_owned(),
                str_at(e, &["value"]).unwrap().to_owned(),
            )
        })
        .collect();
    (strings(seq_at(c, &["args"])).join("\n"), env)
}

/// Run the renewal script against `api`, the Secrets mounted from `mounts`, with the real CLI.
fn run_renew(script: &str, env: &[(String, String)], api: &FakeSecretsApi, work: &Path) -> Output {
    let script = in_fake_pod(script, work, "renew-token")
        .replace("/etc/clustermesh", work.join("mounts").to_str().unwrap());
    let bin = mesh_lab::mesh::default_bin_dir();
    assert!(
        bin.join("clustermesh").is_file(),
        "{} missing: build the workspace's binaries first (cargo build --bins)",
        bin.join("clustermesh").display()
    );
    let mut cmd = script_command(&script, &bin, work, api);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd)
}

#[test]
fn cert_renew_cronjob_re_signs_due_leaves_and_updates_the_secrets_in_place() {
    use base64::Engine as _;
    let work = Scratch::new("cert-renew");
    let api = FakeSecretsApi::start();
    // What the certgen Job stored: a real cluster directory split into the chart's three Secrets.
    let td = mesh_certs::TrustDomain::new("clustermesh.local").unwrap();
    let root = mesh_certs::RootCa::init(&work.0.join("ca"), &td, &Default::default()).unwrap();
    let cdir = work.0.join("cluster");
    root.issue_cluster(&mesh_certs::ClusterRequest::new("cluster1", 1, &cdir).unwrap())
        .unwrap();
    let api_name = format!("{RELEASE}-clustermesh-apiserver-tls");
    let ns_name = format!("{RELEASE}-clustermesh-node-sync-tls");
    let inter_name = format!("{RELEASE}-clustermesh-intermediate");
    let layout: Vec<(&str, &str, Vec<String>)> = vec![
        (&api_name, "apiserver", tls_files("apiserver", true)),
        (&ns_name, "node-sync", tls_files("nodeSync", false)),
        (
            &inter_name,
            "intermediate",
            ["cluster.json", "intermediate.crt", "intermediate.key"]
                .map(String::from)
                .to_vec(),
        ),
    ];
    let file_of = |key: &str| match key {
        "root.crt" => "etcd-root.crt".to_owned(),
        "root.key" => "etcd-root.key".to_owned(),
        k => k.to_owned(),
    };
    for (name, mount, keys) in &layout {
        let dir = work.0.join("mounts").join(mount);
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = serde_json::Map::new();
        for k in keys {
            let bytes = std::fs::read(cdir.join(file_of(k))).unwrap();
            std::fs::write(dir.join(k), &bytes).unwrap();
            data.insert(
                k.clone(),
                base64::engine::general_purpose::STANDARD
                    .encode(&bytes)
                    .into(),
            );
        }
        api.state.lock().unwrap().secrets.insert(
            name.to_string(),
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}),
        );
    }
    let puts = |api: &FakeSecretsApi| {
        api.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.0 == "PUT")
            .map(|r| r.1.clone())
            .collect::<Vec<_>>()
    };

    // Year-long leaves, just issued: nothing is due, nothing is written.
    let (script, env) = renew_cronjob(&[]);
    let out = run_renew(&script, &env, &api, &work.0);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert_eq!(
        stdout.matches("nothing due in Secret").count(),
        2,
        "{stdout}"
    );
    assert!(puts(&api).is_empty(), "{:?}", puts(&api));

    // With a margin longer than the lifetime: every leaf of both Secrets is re-signed, keys kept.
    let (script, env) = renew_cronjob(&["certs.job.renew.within=400d"]);
    assert!(env.contains(&("RENEW_WITHIN".to_owned(), "400d".to_owned())));
    let out = run_renew(&script, &env, &api, &work.0);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert_eq!(
        puts(&api),
        [
            format!("/api/v1/namespaces/{NAMESPACE}/secrets/{api_name}"),
            format!("/api/v1/namespaces/{NAMESPACE}/secrets/{ns_name}")
        ]
    );
    let st = api.state.lock().unwrap();
    let check = work.0.join("check");
    std::fs::create_dir_all(&check).unwrap();
    for (name, mount, keys) in &layout[..2] {
        let s = &st.secrets[*name];
        assert_eq!(
            s["metadata"]["labels"]["clustermesh.io/cluster-name"], "cluster1",
            "{name}"
        );
        let got: BTreeSet<String> = s["data"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(got, keys.iter().cloned().collect(), "{name}: same keys");
        for k in keys {
            let before = std::fs::read(work.0.join("mounts").join(mount).join(k)).unwrap();
            let after = secret_file(s, k);
            if k.ends_with(".crt") {
                assert_ne!(before, after, "{name}/{k} re-signed");
                std::fs::write(check.join(k), &after).unwrap();
            } else {
                assert_eq!(before, after, "{name}/{k} unchanged");
                std::fs::write(check.join(k), &after).unwrap();
            }
        }
        for k in keys.iter().filter(|k| k.ends_with(".crt")) {
            let key = check.join(k.replace(".crt", ".key"));
            mesh_certs::files::KeyedChain::load(&check.join(k), &key)
                .unwrap_or_else(|e| panic!("{name}/{k} with its key: {e}"));
        }
    }
    let root_user = mesh_certs::CertInfo::from_pem_file(&check.join("root.crt")).unwrap();
    assert_eq!(root_user[0].common_name.as_deref(), Some("root"));
    assert!(
        st.requests
            .iter()
            .all(|(_, _, auth)| auth == "Bearer renew-token"),
        "{:?}",
        st.requests
    );
    drop(st);

    // A release that predates renewal: no intermediate Secret. The job fails and says what to do.
    std::fs::remove_dir_all(work.0.join("mounts").join("intermediate")).unwrap();
    let out = run_renew(&script, &env, &api, &work.0);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("Secret {NAMESPACE}/{inter_name} is missing")),
        "{}",
        stderr(&out)
    );
}

/// With the chart's defaults (managed etcd), the apiserver's etcd must serve the pod's own
/// addresses, not only 127.0.0.1: node-syncs of this cluster and of remote clusters come in through
/// the Service, i.e. to the pod IP. This starts the real etcd through
/// `clustermesh_apiserver::managed::ManagedEtcd` with the URLs the chart passes, on certificates
/// issued with the SANs the chart's certgen Job passes, then connects as the apiserver does (admin,
/// to the endpoints it advertises) and as a node-sync does through a non-127.0.0.1 address (here
/// 127.0.0.2, given to the chart as an extra SAN, as a node or load balancer address would be).
#[test]
fn managed_etcd_serves_the_pod_addresses_and_the_apiserver_itself() {
    // With the default client trust, the cluster's own intermediate: its own clients still get in.
    let yaml = template_set(&["certs.extraSans={127.0.0.2}"]).expect("render");
    let r = Rendered {
        case: Case {
            name: "managed etcd".to_owned(),
            values_file: None,
        },
        values: Value::Null,
        docs: parse_docs(&yaml),
    };
    let api = parse_apiserver(&r.case.name, &args(container(r.apiserver(), "apiserver")));
    assert!(
        api.etcd.endpoints.is_empty(),
        "the default is the managed etcd"
    );
    assert_eq!(
        api.managed_etcd_client_trust,
        clustermesh_apiserver::args::EtcdClientTrust::Cluster
    );
    let client_port = free_port();
    let peer_port = free_port();
    let client_url = api
        .managed_etcd_client_url
        .replace(":2379", &format!(":{client_port}"));
    let peer_url = api
        .managed_etcd_peer_url
        .replace(":2380", &format!(":{peer_port}"));
    assert_ne!(
        client_url, api.managed_etcd_client_url,
        "the chart's etcd client port is 2379"
    );

    // The cluster's certificates, with exactly the SANs the certgen Job asks for.
    let sans_env = env(
        container(r.one("Job", "-certgen"), "certgen"),
        "SERVER_SANS",
    )
    .unwrap()
    .to_owned();
    let work = Scratch::new("managed-etcd");
    let td = mesh_certs::TrustDomain::new("clustermesh.local").unwrap();
    let root = mesh_certs::RootCa::init(&work.0.join("ca"), &td, &Default::default()).unwrap();
    let mut req = mesh_certs::ClusterRequest::new("cluster1", 1, work.0.join("cluster")).unwrap();
    req.sans = sans_env.split(',').map(|s| s.parse().unwrap()).collect();
    let dir = root.issue_cluster(&req).expect("issue cluster");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let managed = clustermesh_apiserver::managed::ManagedEtcd::start(&dir, &work.0.join("data"), &client_url, &peer_url, api.managed_etcd_client_trust.into())
            .await
            .unwrap_or_else(|e| panic!("managed etcd with --managed-etcd-client-url={client_url}: {e}"));
        // The apiserver connects to what the managed etcd advertises, as admin-<cluster>.
        let mut admin = mesh_etcd::connect_as(&dir, mesh_certs::Role::Admin, managed.endpoints())
            .await
            .unwrap_or_else(|e| panic!("apiserver -> managed etcd {:?}: {e}", managed.endpoints()));
        admin
            .put("clustermesh/v1/heartbeat/cluster1", "2026-01-01T00:00:00Z", None)
            .await
            .expect("admin writes");
        // A node-sync comes in on another address of the pod.
        let via_pod_address = vec![format!("https://127.0.0.2:{client_port}")];
        let mut node = mesh_etcd::connect_as(&dir, mesh_certs::Role::Node, &via_pod_address)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "node-sync -> managed etcd at {via_pod_address:?} (the chart passes --managed-etcd-client-url={}): {e}",
                    api.managed_etcd_client_url
                )
            });
        let got = node.get("clustermesh/v1/heartbeat/cluster1", None).await.expect("node reads");
        assert_eq!(got.kvs().len(), 1, "node-sync reads what the apiserver wrote");
    });
}
