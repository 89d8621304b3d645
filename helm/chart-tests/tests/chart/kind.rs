//! `kind-multicluster/` against the chart: up.sh installs it with values the chart and the
//! binaries accept, the kind configs give every cluster its own CIDRs, the scripts' own logic
//! (clusters, images, routes, installs, connections, the drill, tear-down) checked through
//! stand-ins, and the Dockerfiles of the images up.sh builds.
//!
//! Needs `helm` (v4) on PATH: `scripts/install-helm.sh` installs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

use chart_tests::binaries::{parse_apiserver, parse_node_sync};
use chart_tests::helm::{
    Case, Rendered, chart_dir, parse_docs, repo_root, run, stderr, template_set,
};
use chart_tests::manifest::{args, at, container, env, seq_at, str_at};
use chart_tests::scratch::Scratch;

/// The arguments up.sh passes to `helm upgrade --install` for cluster `c`, computed by bash itself
/// from up.sh's own text (helm replaced by a function that prints its arguments).
fn up_sh_helm_args(c: &str) -> Vec<String> {
    let dir = repo_root().join("kind-multicluster");
    let up = std::fs::read_to_string(dir.join("up.sh")).unwrap();
    let start = up
        .find("    sans=\"$(node_ips")
        .expect("up.sh computes the server SANs, then runs helm upgrade --install");
    let end = start
        + up[start..]
            .find("--wait --timeout")
            .expect("helm ... --wait")
        + "--wait --timeout 5m".len();
    let snippet = &up[start..end];
    // Nodes of cN have the addresses 172.18.N.2 and 172.18.N.3.
    let script = format!(
        "set -euo pipefail\nsource {lib}\nclusters=(c1 c2 c3)\nc={c}\ncontext=kind-{c}\n\
         node_ips() {{ printf '172.18.%s.2\\n172.18.%s.3\\n' \"${{1#c}}\" \"${{1#c}}\"; }}\n\
         helm() {{ printf '%s\\0' \"$@\"; }}\n{snippet}\n",
        lib = dir.join("lib.sh").display()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).env("HOME", std::env::temp_dir());
    let out = run(cmd);
    assert!(
        out.status.success(),
        "evaluating up.sh's helm command: {}",
        stderr(&out)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn up_sh_installs_the_chart_with_values_the_chart_and_the_binaries_accept() {
    for (c, id) in [("c1", 1), ("c2", 2), ("c3", 3)] {
        let helm_args = up_sh_helm_args(c);
        assert_eq!(&helm_args[..2], ["upgrade", "--install"], "{helm_args:?}");
        assert!(
            helm_args[3].ends_with("/helm/clustermesh"),
            "up.sh installs this repository's chart: {helm_args:?}"
        );
        let mut sets = Vec::new();
        let mut it = helm_args.iter();
        while let Some(a) = it.next() {
            if a == "--set" {
                sets.push(it.next().unwrap().clone());
            }
        }
        assert!(sets.contains(&format!("cluster.name={c}")), "{sets:?}");
        assert!(sets.contains(&format!("cluster.id={id}")), "{sets:?}");
        let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
        let yaml = template_set(&set_refs)
            .unwrap_or_else(|e| panic!("up.sh's values for {c} are refused:\n{e}"));
        let r = Rendered {
            case: Case {
                name: format!("up.sh {c}"),
                values_file: None,
            },
            values: Value::Null,
            docs: parse_docs(&yaml),
        };
        let api = parse_apiserver(&r.case.name, &args(container(r.apiserver(), "apiserver")));
        assert_eq!(api.cluster_name, c);
        let ns = parse_node_sync(&r.case.name, &args(container(r.node_sync(), "node-sync")));
        assert_eq!(
            ns.routing,
            node_sync::routing::RoutingMode::Native,
            "{c}: kind clusters share one network: node-sync routes the pod CIDRs"
        );
        // The node IPs are server SANs, so remote clusters can dial the NodePort.
        let job = r.one("Job", "-certgen");
        let server_sans = env(container(job, "certgen"), "SERVER_SANS").unwrap();
        assert!(
            server_sans.contains(&format!("172.18.{id}.2"))
                && server_sans.contains(&format!("172.18.{id}.3")),
            "{server_sans}"
        );
        // The other clusters are static remotes of node-sync at their etcd NodePort on each node,
        // in files node-sync's own parser accepts.
        let cm = r.one("ConfigMap", "-node-sync-remotes");
        let data = at(cm, &["data"])
            .and_then(Value::as_mapping)
            .cloned()
            .unwrap_or_default();
        let mut peers = Vec::new();
        for (file, text) in &data {
            let path = Path::new("/etc/clustermesh/remotes").join(file.as_str().unwrap());
            let src = node_sync::cluster::parse_remote_file(
                &path,
                text.as_str().unwrap(),
                Some(Path::new("/etc/clustermesh/tls")),
            )
            .unwrap_or_else(|e| panic!("{c}: node-sync refuses {}: {e}", path.display()));
            let n = src.name.as_str().trim_start_matches('c').to_owned();
            assert_eq!(
                src.endpoints,
                [
                    format!("https://172.18.{n}.2:32379"),
                    format!("https://172.18.{n}.3:32379")
                ],
                "{c}: endpoints of {}",
                src.name
            );
            peers.push(src.name.to_string());
        }
        let want: Vec<String> = ["c1", "c2", "c3"]
            .iter()
            .filter(|p| **p != c)
            .map(|p| p.to_string())
            .collect();
        assert_eq!(peers, want, "{c}: every other cluster is a static remote");
        // The images up.sh builds and loads are the ones the chart runs, never pulled.
        for (w, cname) in [(r.apiserver(), "apiserver"), (r.node_sync(), "node-sync")] {
            let cont = container(w, cname);
            assert!(
                str_at(cont, &["image"]).unwrap().ends_with(":dev"),
                "{cont:?}"
            );
            assert_eq!(str_at(cont, &["imagePullPolicy"]), Some("Never"));
        }
    }
}

fn parse_cidr(s: &str) -> (u32, u32) {
    let (ip, len) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("not a CIDR: {s}"));
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask, mask)
}

fn overlap(a: &str, b: &str) -> bool {
    let ((na, ma), (nb, mb)) = (parse_cidr(a), parse_cidr(b));
    let m = ma & mb;
    na & m == nb & m
}

#[test]
fn kind_configs_give_every_cluster_distinct_pod_and_service_cidrs() {
    let dir = repo_root().join("kind-multicluster/kind");
    let mut cidrs: Vec<(String, String)> = Vec::new();
    for n in 1..=3 {
        let path = dir.join(format!("c{n}.yaml"));
        let cfg: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(str_at(&cfg, &["kind"]), Some("Cluster"));
        assert_eq!(
            str_at(&cfg, &["name"]),
            Some(format!("c{n}").as_str()),
            "{}",
            path.display()
        );
        for key in ["podSubnet", "serviceSubnet"] {
            let cidr = str_at(&cfg, &["networking", key])
                .unwrap_or_else(|| panic!("{}: no {key}", path.display()));
            cidrs.push((format!("c{n} {key}"), cidr.to_owned()));
        }
        assert!(
            seq_at(&cfg, &["nodes"]).len() >= 2,
            "{}: a control plane and a worker",
            path.display()
        );
    }
    // Nor may they overlap the Docker network kind uses (172.18.0.0/16 by default).
    cidrs.push(("docker network kind".to_owned(), "172.18.0.0/16".to_owned()));
    for (i, (na, a)) in cidrs.iter().enumerate() {
        for (nb, b) in &cidrs[i + 1..] {
            assert!(!overlap(a, b), "{na} {a} overlaps {nb} {b}");
        }
    }
}

// Docker, kind and a Kubernetes API are not available on the machines these tests run on, so the
// scripts run here against stand-ins for docker, kind, kubectl, helm and clustermesh that log every
// call and answer like a three-cluster kind setup. What is checked is the scripts' own logic: which
// clusters, images, routes, installs and connections they ask for, and that a second run changes
// nothing that exists.
const STUBS: &[(&str, &str)] = &[
    (
        "kind",
        r#"#!/bin/bash
echo "kind $*" >> "$STUB_LOG"
name=""; prev=""
for a in "$@"; do [ "$prev" = --name ] && name="$a"; prev="$a"; done
touch "$STUB_STATE/clusters"
case "$1 $2" in
  "get clusters") cat "$STUB_STATE/clusters" ;;
  "create cluster") echo "$name" >> "$STUB_STATE/clusters" ;;
  "delete cluster") grep -vx "$name" "$STUB_STATE/clusters" > "$STUB_STATE/c.new" || true; mv "$STUB_STATE/c.new" "$STUB_STATE/clusters" ;;
  "get nodes") printf '%s-control-plane\n%s-worker\n' "$name" "$name" ;;
esac
"#,
    ),
    (
        "docker",
        "#!/bin/bash\necho \"docker $*\" >> \"$STUB_LOG\"\n",
    ),
    (
        "helm",
        "#!/bin/bash\nif [ \"$1 $2\" = \"version --short\" ]; then echo v4.1.4+stub; exit 0; fi\necho \"helm $*\" >> \"$STUB_LOG\"\n",
    ),
    (
        "kubectl",
        r#"#!/bin/bash
echo "kubectl $*" >> "$STUB_LOG"
ctx=""; prev=""
for a in "$@"; do [ "$prev" = --context ] && ctx="$a"; prev="$a"; done
n="${ctx#kind-c}"
case "$*" in
  *"get nodes"*podCIDR*) printf '10.%s0.0.0/24 172.18.%s.2\n10.%s0.1.0/24 172.18.%s.3\n' "$n" "$n" "$n" "$n" ;;
  *"get nodes"*InternalIP*) printf '172.18.%s.2\n172.18.%s.3\n' "$n" "$n" ;;
  *"get secret"*) printf 'c3R1Yg==' ;;
  *"--dry-run=client -o yaml"*) echo "kind: Stub" ;;
  *"apply -f -"*) cat > /dev/null ;;
  *"jsonpath={.spec.replicas}"*) printf 2 ;;
  *"jsonpath={.spec.clusterIP}"*) printf '10.%s1.0.10' "$n" ;;
esac
"#,
    ),
    (
        "clustermesh",
        r#"#!/bin/bash
echo "clustermesh $*" >> "$STUB_LOG"
if [ "$1 $2" = "ca init" ]; then
  out=""; prev=""
  for a in "$@"; do [ "$prev" = --out ] && out="$a"; prev="$a"; done
  mkdir -p "$out" && touch "$out/trust-domain" "$out/root.crt" "$out/root.key" "$out/ca-bundle.pem"
fi
"#,
    ),
];

struct KindStubs {
    work: Scratch,
}

impl KindStubs {
    fn new() -> Self {
        let work = Scratch::new("kind-stubs");
        let bin = work.0.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(work.0.join("state")).unwrap();
        for (name, text) in STUBS {
            let p = bin.join(name);
            std::fs::write(&p, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        Self { work }
    }

    fn mesh_work_dir(&self) -> PathBuf {
        self.work.0.join("mesh")
    }

    /// Run a kind-multicluster script; returns (success, the calls it made, stderr).
    fn run(&self, script: &str, extra_env: &[(&str, &str)]) -> (bool, Vec<String>, String) {
        let log = self.work.0.join("calls.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("kind-multicluster").join(script))
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.work.0.join("bin").display()),
            )
            .env("HOME", &self.work.0)
            .env("STUB_LOG", &log)
            .env("STUB_STATE", self.work.0.join("state"))
            .env("WORK_DIR", self.mesh_work_dir())
            .env("CLUSTERMESH", self.work.0.join("bin/clustermesh"))
            .env("CLUSTERS", "3");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let out = run(cmd);
        let calls = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        (out.status.success(), calls, stderr(&out))
    }
}

fn calls_starting<'a>(calls: &'a [String], prefix: &str) -> Vec<&'a str> {
    calls
        .iter()
        .filter(|c| c.starts_with(prefix))
        .map(String::as_str)
        .collect()
}

#[test]
fn kind_scripts_bring_up_connect_drill_and_tear_down_three_clusters() {
    let stubs = KindStubs::new();
    let root = repo_root();
    let repo = root.display().to_string();
    let work = stubs.mesh_work_dir().display().to_string();

    let (ok, calls, err) = stubs.run("up.sh", &[]);
    assert!(ok, "up.sh failed:\n{err}\ncalls:\n{}", calls.join("\n"));
    let names = ["c1", "c2", "c3"];
    for (i, c) in names.iter().enumerate() {
        let n = i + 1;
        let create = format!(
            "kind create cluster --name {c} --config {repo}/kind-multicluster/kind/{c}.yaml"
        );
        assert_eq!(
            calls_starting(&calls, &create).len(),
            1,
            "{create}\n{calls:#?}"
        );
        let install = format!(
            "helm upgrade --install clustermesh {repo}/helm/clustermesh --kube-context kind-{c}"
        );
        let installs = calls_starting(&calls, &install);
        assert_eq!(installs.len(), 1, "{install}\n{calls:#?}");
        assert!(
            installs[0].contains(&format!("cluster.id={n}"))
                && installs[0].contains("certs.job.caSecret=clustermesh-ca"),
            "{}",
            installs[0]
        );
        for image in ["clustermesh-apiserver", "node-sync", "clustermesh"] {
            let load = format!("kind load docker-image --name {c} clustermesh/{image}:dev");
            assert_eq!(calls_starting(&calls, &load).len(), 1, "{load}");
        }
        // node-sync routes the other clusters' pod CIDRs (--routing native); up.sh adds none by hand.
        assert!(
            installs[0].contains("nodeSync.routing.mode=native"),
            "{}",
            installs[0]
        );
        for other in names {
            for node in ["control-plane", "worker"] {
                let routes =
                    calls_starting(&calls, &format!("docker exec {other}-{node} ip route"));
                assert!(
                    routes.is_empty(),
                    "hand-made routes on {other}-{node}: {routes:?}"
                );
            }
        }
    }
    for image in ["clustermesh-apiserver", "node-sync", "clustermesh"] {
        let build = format!(
            "docker build -f {repo}/images/{image}.Dockerfile -t clustermesh/{image}:dev {repo}"
        );
        assert_eq!(calls_starting(&calls, &build).len(), 1, "{build}");
        assert!(root.join(format!("images/{image}.Dockerfile")).is_file());
    }
    assert_eq!(
        calls_starting(&calls, "clustermesh ca init"),
        [
            format!("clustermesh ca init --trust-domain kind.clustermesh.local --out {work}/ca")
                .as_str()
        ]
    );
    let connects = calls_starting(&calls, "clustermesh connect");
    assert_eq!(
        connects,
        [(1, 2), (1, 3), (2, 3)]
            .iter()
            .map(|(a, b)| format!(
                "clustermesh connect 172.18.{a}.2:32443 172.18.{b}.2:32443 --tls-dir {work}/c{a} --destination-tls-dir {work}/c{b} --wait"
            ))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "every pair connected once"
    );
    let admin_key = std::fs::read_to_string(stubs.mesh_work_dir().join("c1/admin.key")).unwrap();
    assert_eq!(
        admin_key, "stub",
        "admin certificates are taken out of the chart's Secret"
    );
    assert_eq!(
        calls_starting(&calls, "clustermesh status --server 172.18.1.2:32443").len(),
        1
    );
    let demo = calls
        .iter()
        .filter(|c| c.contains("-n demo rollout status deployment/echo-"))
        .count();
    assert_eq!(demo, 3, "the demo service in every cluster");

    // Run again: clusters and CA exist, nothing is created twice.
    let (ok, calls, err) = stubs.run("up.sh", &[("SKIP_BUILD", "1")]);
    assert!(ok, "second up.sh failed:\n{err}");
    assert!(
        calls_starting(&calls, "kind create").is_empty(),
        "{calls:#?}"
    );
    assert!(
        calls_starting(&calls, "clustermesh ca init").is_empty(),
        "{calls:#?}"
    );
    assert!(
        calls_starting(&calls, "docker build").is_empty(),
        "SKIP_BUILD=1"
    );

    // The drill runs the CLI inside c1's control-plane node (in its pod cgroups) against the
    // service's ClusterIP, fails the local backends through a hook, and always restores them.
    let (ok, calls, err) = stubs.run("drill.sh", &[]);
    assert!(ok, "drill.sh failed:\n{err}");
    assert_eq!(
        calls_starting(
            &calls,
            "docker cp stub-container:/usr/local/bin/clustermesh "
        )
        .len(),
        0,
        "CLUSTERMESH names a local binary: the image is not needed"
    );
    assert_eq!(
        calls_starting(&calls, "docker cp ")
            .iter()
            .filter(|c| c.ends_with("c1-control-plane:/usr/local/bin/clustermesh"))
            .count(),
        1,
        "{calls:#?}"
    );
    let drill = calls_starting(
        &calls,
        "docker exec c1-control-plane /usr/local/bin/clustermesh drill",
    );
    assert_eq!(drill.len(), 1, "{calls:#?}");
    for part in [
        "--service demo/echo",
        "--target 10.11.0.10:7000",
        "--local-prefix echo-c1-",
        "--fail kubectl --kubeconfig /etc/kubernetes/admin.conf -n demo scale deployment/echo-c1 --replicas=0",
        "--recover kubectl --kubeconfig /etc/kubernetes/admin.conf -n demo scale deployment/echo-c1 --replicas=2",
        "--cgroup /sys/fs/cgroup/kubelet.slice/clustermesh-drill",
        "--budget 1000ms",
    ] {
        assert!(
            drill[0].contains(part),
            "drill lacks {part:?}: {}",
            drill[0]
        );
    }
    assert_eq!(
        calls.last().map(String::as_str),
        Some("kubectl --context kind-c1 -n demo scale deployment/echo-c1 --replicas=2"),
        "the local backends are scaled back after the drill"
    );

    // Tear down: every cluster deleted, the work dir (CA, admin certificates) removed.
    let (ok, calls, err) = stubs.run("down.sh", &[]);
    assert!(ok, "down.sh failed:\n{err}");
    for c in names {
        assert_eq!(
            calls_starting(&calls, &format!("kind delete cluster --name {c}")).len(),
            1
        );
    }
    assert!(
        !stubs.mesh_work_dir().exists(),
        "down.sh removes the work dir"
    );
}

#[test]
fn kind_scripts_refuse_a_cluster_count_other_than_two_or_three() {
    let stubs = KindStubs::new();
    let (ok, calls, err) = stubs.run("up.sh", &[("CLUSTERS", "4")]);
    assert!(!ok, "CLUSTERS=4 must be refused");
    assert!(err.contains("CLUSTERS must be 2 or 3"), "{err}");
    assert!(
        calls_starting(&calls, "kind create").is_empty(),
        "{calls:?}"
    );
}

#[test]
fn kind_up_sh_makes_two_clusters_by_default() {
    let stubs = KindStubs::new();
    let (ok, calls, err) = stubs.run("up.sh", &[("CLUSTERS", "2")]);
    assert!(ok, "up.sh failed:\n{err}");
    assert_eq!(
        calls_starting(&calls, "kind create cluster").len(),
        2,
        "{calls:#?}"
    );
    assert_eq!(calls_starting(&calls, "helm upgrade --install").len(), 2);
    assert_eq!(
        calls_starting(
            &calls,
            "clustermesh connect 172.18.1.2:32443 172.18.2.2:32443"
        )
        .len(),
        1
    );
    assert_eq!(calls_starting(&calls, "clustermesh connect").len(), 1);
    assert!(
        !calls.iter().any(|c| c.contains("c3")),
        "no third cluster: {calls:#?}"
    );
}

/// Every Dockerfile builds, from the repository root, a binary that exists in the workspace, in two
/// stages (rust:1.95-bookworm, then debian:bookworm-slim), runs it as its entry point, and runs as
/// the chart's non-root user unless it is node-sync (eBPF needs root).
#[test]
fn dockerfiles_build_workspace_binaries_into_slim_images_non_root_where_possible() {
    let root = repo_root();
    let meta = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(&root)
        .output()
        .expect("cargo metadata");
    assert!(meta.status.success(), "cargo metadata: {}", stderr(&meta));
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    let bins: BTreeSet<(String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let pkg = p["name"].as_str().unwrap().to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(move |t| (pkg.clone(), t["name"].as_str().unwrap().to_owned()))
        })
        .collect();

    let chart_values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    for (file, image_key, needs_root) in [
        ("clustermesh-apiserver.Dockerfile", "apiserver", false),
        ("node-sync.Dockerfile", "nodeSync", true),
        ("clustermesh.Dockerfile", "cli", false),
    ] {
        let path = root.join("images").join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(froms.len(), 2, "{file}: two stages: {froms:?}");
        assert!(
            froms[0].starts_with("FROM rust:1.95-bookworm AS build"),
            "{file}: {}",
            froms[0]
        );
        assert_eq!(froms[1], "FROM debian:bookworm-slim", "{file}");
        let build = text
            .lines()
            .find(|l| l.contains("cargo build --release --locked -p "))
            .unwrap_or_else(|| panic!("{file}: no cargo build line"));
        let words: Vec<&str> = build.split_whitespace().collect();
        let pkg = words[words.iter().position(|w| *w == "-p").unwrap() + 1];
        let bin = words[words.iter().position(|w| *w == "--bin").unwrap() + 1];
        assert!(
            bins.contains(&(pkg.to_owned(), bin.to_owned())),
            "{file}: builds -p {pkg} --bin {bin}, which the workspace does not have ({bins:?})"
        );
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")),
            "{file}: the entry point must be the binary it builds ({bin})"
        );
        let user = text.lines().find_map(|l| l.strip_prefix("USER "));
        if needs_root {
            assert_eq!(user, None, "{file}: node-sync runs as root (eBPF)");
        } else {
            assert_eq!(
                user,
                Some("65532:65532"),
                "{file}: non-root, the uid the chart runs it with"
            );
        }
        // The chart's image repository names the image up.sh builds from this Dockerfile.
        let repo = str_at(&chart_values, &["image", image_key, "repository"]).unwrap();
        assert_eq!(
            repo,
            format!("clustermesh/{}", file.trim_end_matches(".Dockerfile")),
            "{file}: chart image.{image_key}.repository"
        );
        assert!(
            root.join("images")
                .join(format!("{file}.dockerignore"))
                .is_file(),
            "{file}: no .dockerignore"
        );
    }
}
