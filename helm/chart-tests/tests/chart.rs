//! The Helm chart, rendered by the real `helm` (v4) with its default values and every example
//! values file, checked the way an operator would: it lints, it renders, node-sync gets bpffs,
//! cgroup v2 and privileges, RBAC is read-only on exactly the kinds the apiserver watches, TLS
//! Secrets land where `--tls-dir` points, the schema refuses bad cluster ids and names, and the
//! binaries' own argument parsers accept every rendered container's arguments.
//!
//! Needs `helm` (v4) and `shellcheck` on PATH: `scripts/install-helm.sh` installs both.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::Parser;
use serde_yaml::Value;

// ---------------------------------------------------------------------------------------------
// Running helm and parsing what it renders

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root above helm/chart-tests")
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm/clustermesh")
}

/// The path of `tool` on PATH; fails the test with the fix when it is missing.
fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{tool}` not found on PATH: run scripts/install-helm.sh (installs helm v4 and shellcheck)"
    );
}

fn helm() -> Command {
    let helm = require_tool("helm");
    let out = Command::new(&helm)
        .args(["version", "--short"])
        .output()
        .expect("run helm version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with("v4."),
        "{} is helm {}, the chart is tested with helm v4: run scripts/install-helm.sh",
        helm.display(),
        version.trim()
    );
    Command::new(helm)
}

fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One set of values the chart is rendered with: the defaults, or an example file.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    values_file: Option<PathBuf>,
}

impl Case {
    fn values_args(&self) -> Vec<String> {
        match &self.values_file {
            Some(f) => vec!["-f".to_owned(), f.display().to_string()],
            None => Vec::new(),
        }
    }

    /// The example's values as YAML (empty mapping for the defaults).
    fn values(&self) -> Value {
        match &self.values_file {
            Some(f) => serde_yaml::from_str(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display())),
            None => Value::Mapping(Default::default()),
        }
    }
}

fn cases() -> Vec<Case> {
    let mut cases = vec![Case {
        name: "default values".to_owned(),
        values_file: None,
    }];
    let dir = chart_dir().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected several example values files in {}, found {files:?}",
        dir.display()
    );
    for f in files {
        cases.push(Case {
            name: f.file_name().unwrap().to_string_lossy().into_owned(),
            values_file: Some(f),
        });
    }
    cases
}

const NAMESPACE: &str = "clustermesh";
const RELEASE: &str = "mesh";

/// `helm template` with extra arguments; Ok(stdout) or Err(stderr).
fn template(extra: &[String]) -> Result<String, String> {
    let mut cmd = helm();
    cmd.args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(extra);
    let out = run(cmd);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm output is UTF-8"))
    } else {
        Err(stderr(&out))
    }
}

/// Every document of a multi-document YAML stream, empty ones dropped.
fn parse_docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The rendered manifests of a case.
struct Rendered {
    case: Case,
    values: Value,
    docs: Vec<Value>,
}

impl Rendered {
    fn of(case: &Case) -> Self {
        let yaml = template(&case.values_args())
            .unwrap_or_else(|e| panic!("helm template with {} failed:\n{e}", case.name));
        Self {
            case: case.clone(),
            values: case.values(),
            docs: parse_docs(&yaml),
        }
    }

    fn all() -> Vec<Self> {
        cases().iter().map(Self::of).collect()
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs
            .iter()
            .filter(move |d| str_at(d, &["kind"]) == Some(kind))
    }

    fn one<'a>(&'a self, kind: &'a str, name_suffix: &str) -> &'a Value {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .filter(|d| str_at(d, &["metadata", "name"]).is_some_and(|n| n.ends_with(name_suffix)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: expected one {kind} named *{name_suffix}, found {}",
            self.case.name,
            found.len()
        );
        found[0]
    }

    fn apiserver(&self) -> &Value {
        self.one("Deployment", "-apiserver")
    }

    fn node_sync(&self) -> &Value {
        self.one("DaemonSet", "-node-sync")
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    Some(cur)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {s:?}"))
                .to_owned()
        })
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    seq_at(workload, &["spec", "template", "spec", "containers"])
        .iter()
        .find(|c| str_at(c, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("no container {name} in {workload:?}"))
}

fn args(c: &Value) -> Vec<String> {
    strings(seq_at(c, &["args"]))
}

/// The value of `--flag=value` among a container's args.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("--{flag}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    seq_at(workload, &["spec", "template", "spec", "volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("no volume {name} in {workload:?}"))
}

/// (volume name, mountPath) of every volumeMount of a container.
fn mounts(c: &Value) -> Vec<(String, String, Option<String>)> {
    seq_at(c, &["volumeMounts"])
        .iter()
        .map(|m| {
            (
                str_at(m, &["name"]).unwrap().to_owned(),
                str_at(m, &["mountPath"]).unwrap().to_owned(),
                str_at(m, &["mountPropagation"]).map(str::to_owned),
            )
        })
        .collect()
}

/// The volume mounted at exactly `path` in container `c` of `workload`.
fn volume_mounted_at<'a>(workload: &'a Value, c: &Value, path: &str) -> &'a Value {
    let (name, _, _) = mounts(c)
        .into_iter()
        .find(|(_, p, _)| p == path)
        .unwrap_or_else(|| panic!("no volumeMount at {path} in container {c:?}"));
    volume(workload, &name)
}

// ---------------------------------------------------------------------------------------------
// helm lint and helm template

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

// ---------------------------------------------------------------------------------------------
// node-sync: privileged, host network, bpffs and cgroup v2 from the host

#[test]
fn node_sync_daemonset_mounts_bpffs_and_cgroup_v2_and_runs_privileged() {
    for r in Rendered::all() {
        let ds = r.node_sync();
        let name = &r.case.name;
        let spec = at(ds, &["spec", "template", "spec"]).unwrap();
        assert_eq!(
            at(spec, &["hostNetwork"]).and_then(Value::as_bool),
            Some(true),
            "{name}: hostNetwork"
        );
        assert_eq!(
            str_at(spec, &["dnsPolicy"]),
            Some("ClusterFirstWithHostNet"),
            "{name}: a hostNetwork pod that resolves the etcd Service needs ClusterFirstWithHostNet"
        );
        let c = container(ds, "node-sync");
        assert_eq!(
            at(c, &["securityContext", "privileged"]).and_then(Value::as_bool),
            Some(true),
            "{name}: node-sync must be privileged to load eBPF programs"
        );
        let a = args(c);

        // bpffs: the host's bpf filesystem, mounted so that --bpffs lies inside it, propagation
        // from the host (pins outlive the pod).
        let bpffs = flag(&a, "bpffs").unwrap_or_else(|| panic!("{name}: no --bpffs"));
        let (vol_name, bpf_mount, propagation) = mounts(c)
            .into_iter()
            .find(|(_, p, _)| bpffs == p || bpffs.starts_with(&format!("{p}/")))
            .unwrap_or_else(|| panic!("{name}: --bpffs={bpffs} is under no volumeMount"));
        let host_bpffs = str_at(volume(ds, &vol_name), &["hostPath", "path"])
            .unwrap_or_else(|| panic!("{name}: --bpffs={bpffs} is not on a hostPath volume"));
        let expected_bpffs =
            str_at(&r.values, &["nodeSync", "bpffs", "hostPath"]).unwrap_or("/sys/fs/bpf");
        assert_eq!(host_bpffs, expected_bpffs, "{name}: bpffs host path");
        assert!(
            matches!(
                propagation.as_deref(),
                Some("HostToContainer" | "Bidirectional")
            ),
            "{name}: bpffs mount must see the host's mounts (got {propagation:?})"
        );

        // cgroup v2: the host's unified hierarchy, and --cgroup inside that mount.
        let cgroup = flag(&a, "cgroup").unwrap_or_else(|| panic!("{name}: no --cgroup"));
        let (vol_name, mount_path, _) = mounts(c)
            .into_iter()
            .find(|(_, p, _)| cgroup == p || cgroup.starts_with(&format!("{p}/")))
            .unwrap_or_else(|| panic!("{name}: --cgroup={cgroup} is under no volumeMount"));
        let vol = volume(ds, &vol_name);
        let host_root =
            str_at(&r.values, &["nodeSync", "cgroup", "hostRoot"]).unwrap_or("/sys/fs/cgroup");
        assert_eq!(
            str_at(vol, &["hostPath", "path"]),
            Some(host_root),
            "{name}: --cgroup={cgroup} (mount {mount_path}) must come from the host's cgroup v2 hierarchy"
        );
        assert!(!cgroup.contains(".."), "{name}: --cgroup={cgroup}");

        // The init container refuses a node without cgroup v2 and mounts bpffs when missing.
        let init = seq_at(ds, &["spec", "template", "spec", "initContainers"])
            .iter()
            .find(|c| str_at(c, &["name"]) == Some("prepare-host"))
            .unwrap_or_else(|| panic!("{name}: no prepare-host init container"));
        let script = strings(seq_at(init, &["args"])).join("\n");
        assert!(
            script.contains(&format!("{mount_path}/cgroup.controllers")),
            "{name}: {script}"
        );
        assert!(
            script.contains(&format!(" {bpf_mount} bpf ")),
            "{name}: {script}"
        );
        let bidir = mounts(init)
            .into_iter()
            .any(|(_, p, prop)| p == bpf_mount && prop.as_deref() == Some("Bidirectional"));
        assert!(
            bidir,
            "{name}: a bpffs mounted by the init container must propagate to the host"
        );

        // No Kubernetes API access at all.
        assert_eq!(
            at(spec, &["automountServiceAccountToken"]).and_then(Value::as_bool),
            Some(false),
            "{name}: node-sync reads etcd, it needs no API token"
        );
    }
}

/// The mount point of this machine's cgroup v2 hierarchy (pure v2 at /sys/fs/cgroup, or the
/// hybrid layout's /sys/fs/cgroup/unified, or wherever setup.sh mounted one).
fn host_cgroup2_mount() -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].to_owned())
        .expect("this machine has no cgroup v2 mount: run scripts/setup.sh (it mounts one)")
}

/// The chart's prepare-host init container script, run for real on this machine: it accepts a
/// real cgroup v2 mount and the real bpffs, and refuses a directory that is not cgroup v2 with a
/// message that says so.
#[test]
fn prepare_host_script_accepts_real_cgroup2_and_bpffs_and_refuses_a_non_cgroup2_dir() {
    let r = Rendered::of(&cases()[0]);
    let init = seq_at(
        r.node_sync(),
        &["spec", "template", "spec", "initContainers"],
    )
    .iter()
    .find(|c| str_at(c, &["name"]) == Some("prepare-host"))
    .expect("prepare-host init container");
    let script = strings(seq_at(init, &["args"])).join("\n");
    let cgroup_mount = mounts(init)
        .into_iter()
        .find(|(n, _, _)| n == "cgroup")
        .map(|(_, p, _)| p)
        .expect("cgroup mount of prepare-host");
    let bpffs_mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(" /sys/fs/bpf bpf ");
    assert!(
        bpffs_mounted,
        "this machine has no bpffs at /sys/fs/bpf: run scripts/setup.sh"
    );

    let run_with = |cgroup_dir: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-ec", &script.replace(&cgroup_mount, cgroup_dir)]);
        run(cmd)
    };
    let ok = run_with(&host_cgroup2_mount());
    assert!(
        ok.status.success(),
        "prepare-host on a real cgroup v2 mount: {}",
        stderr(&ok)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("bpffs present at /sys/fs/bpf"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let not_cgroup2 =
        std::env::temp_dir().join(format!("chart-tests-not-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&not_cgroup2).unwrap();
    let bad = run_with(not_cgroup2.to_str().unwrap());
    std::fs::remove_dir_all(&not_cgroup2).ok();
    assert!(
        !bad.status.success(),
        "prepare-host must refuse a directory that is not cgroup v2"
    );
    assert!(
        stderr(&bad).contains("node-sync needs cgroup v2"),
        "{}",
        stderr(&bad)
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// (apiGroup, resource) the apiserver's Kubernetes source reads; each gets exactly get/list/watch.
const READ_KINDS: &[(&str, &str)] = &[
    ("", "services"),
    ("", "pods"),
    ("", "namespaces"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    ("multicluster.x-k8s.io", "serviceexports"),
];

/// Every (apiGroup, resource, verb, resourceNames) a role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in seq_at(role, &["rules"]) {
        assert!(
            seq_at(rule, &["nonResourceURLs"]).is_empty(),
            "role grants nonResourceURLs: {rule:?}"
        );
        let names = strings(seq_at(rule, &["resourceNames"]));
        for g in strings(seq_at(rule, &["apiGroups"])) {
            for res in strings(seq_at(rule, &["resources"])) {
                for verb in strings(seq_at(rule, &["verbs"])) {
                    out.insert((g.clone(), res.clone(), verb, names.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_read_on_the_watched_kinds_and_nothing_else() {
    for r in Rendered::all() {
        let name = &r.case.name;
        let source = str_at(&r.values, &["apiserver", "source"]).unwrap_or("kubernetes");
        let cluster_roles: Vec<&Value> = r.of_kind("ClusterRole").collect();
        if source == "manifests" {
            assert!(
                cluster_roles.is_empty(),
                "{name}: the manifests source needs no ClusterRole"
            );
            let dep = r.apiserver();
            assert_eq!(
                at(
                    dep,
                    &["spec", "template", "spec", "automountServiceAccountToken"]
                )
                .and_then(Value::as_bool),
                Some(false),
                "{name}: the manifests source needs no API token"
            );
            continue;
        }
        assert_eq!(
            cluster_roles.len(),
            1,
            "{name}: one ClusterRole, the apiserver's"
        );
        let got = grants(cluster_roles[0]);
        let want: BTreeSet<(String, String, String, Vec<String>)> = READ_KINDS
            .iter()
            .flat_map(|(g, res)| {
                ["get", "list", "watch"]
                    .into_iter()
                    .map(move |v| (g.to_string(), res.to_string(), v.to_owned(), Vec::new()))
            })
            .collect();
        assert_eq!(
            got, want,
            "{name}: the apiserver's ClusterRole must be exactly read on {READ_KINDS:?}"
        );

        // It is bound to the apiserver's ServiceAccount only.
        let bindings: Vec<&Value> = r.of_kind("ClusterRoleBinding").collect();
        assert_eq!(bindings.len(), 1, "{name}: one ClusterRoleBinding");
        let subjects = seq_at(bindings[0], &["subjects"]);
        assert_eq!(subjects.len(), 1, "{name}: {subjects:?}");
        let sa = str_at(
            r.apiserver(),
            &["spec", "template", "spec", "serviceAccountName"],
        )
        .unwrap();
        assert_eq!(
            str_at(&subjects[0], &["name"]),
            Some(sa),
            "{name}: binding subject"
        );
        assert_eq!(
            str_at(bindings[0], &["roleRef", "name"]),
            str_at(cluster_roles[0], &["metadata", "name"])
        );
    }
}

#[test]
fn only_the_certgen_job_may_touch_secrets_and_only_in_its_namespace() {
    for r in Rendered::all() {
        let name = &r.case.name;
        let mode = str_at(&r.values, &["certs", "mode"]).unwrap_or("job");
        let roles: Vec<&Value> = r.of_kind("Role").collect();
        if mode != "job" {
            assert!(roles.is_empty(), "{name}: no Role outside certs.mode=job");
            assert_eq!(
                r.of_kind("Job").count(),
                0,
                "{name}: no certgen Job outside certs.mode=job"
            );
            continue;
        }
        let renew_on = at(&r.values, &["certs", "job", "renew", "enabled"])
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let renew_name = format!("{RELEASE}-clustermesh-cert-renew");
        let (renew_roles, roles): (Vec<&Value>, Vec<&Value>) = roles
            .into_iter()
            .partition(|r| str_at(r, &["metadata", "name"]) == Some(renew_name.as_str()));
        assert_eq!(
            roles.len(),
            1,
            "{name}: one Role besides the renewal's, the certgen Job's"
        );
        assert_eq!(
            renew_roles.len(),
            usize::from(renew_on),
            "{name}: the renewal Role"
        );
        if let Some(rr) = renew_roles.first() {
            // The renewal CronJob: get and update the two leaf Secrets, get the intermediate, by name.
            let api = format!("{RELEASE}-clustermesh-apiserver-tls");
            let ns = format!("{RELEASE}-clustermesh-node-sync-tls");
            let inter = format!("{RELEASE}-clustermesh-intermediate");
            for rule in seq_at(rr, &["rules"]) {
                let names = strings(seq_at(rule, &["resourceNames"]));
                let verbs = strings(seq_at(rule, &["verbs"]));
                assert_eq!(strings(seq_at(rule, &["resources"])), ["secrets"]);
                assert!(
                    !names.is_empty(),
                    "{name}: renewal rule without resourceNames"
                );
                if verbs.contains(&"update".to_owned()) {
                    assert_eq!(names, [api.clone(), ns.clone()], "{name}");
                    assert_eq!(verbs, ["get", "update"], "{name}");
                } else {
                    assert_eq!(names, std::slice::from_ref(&inter), "{name}");
                    assert_eq!(verbs, ["get"], "{name}");
                }
            }
            let cron = r.one("CronJob", "-cert-renew");
            let sa = str_at(
                cron,
                &[
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "spec",
                    "serviceAccountName",
                ],
            );
            assert_eq!(
                sa,
                Some(renew_name.as_str()),
                "{name}: the CronJob's own account"
            );
        }
        let role = roles[0];
        assert_eq!(str_at(role, &["metadata", "namespace"]), Some(NAMESPACE));
        for (group, res, verb, _) in grants(role) {
            assert_eq!(
                (group.as_str(), res.as_str()),
                ("", "secrets"),
                "{name}: certgen Role"
            );
            assert!(
                matches!(verb.as_str(), "get" | "create"),
                "{name}: certgen may not {verb} secrets"
            );
        }
        let job = r.one("Job", "-certgen");
        let job_sa = str_at(job, &["spec", "template", "spec", "serviceAccountName"]).unwrap();
        for sa in [
            str_at(
                r.apiserver(),
                &["spec", "template", "spec", "serviceAccountName"],
            )
            .unwrap(),
            str_at(
                r.node_sync(),
                &["spec", "template", "spec", "serviceAccountName"],
            )
            .unwrap(),
        ] {
            assert_ne!(
                sa, job_sa,
                "{name}: the certgen ServiceAccount is the Job's own"
            );
        }
        let bindings: Vec<&Value> = r
            .of_kind("RoleBinding")
            .filter(|b| str_at(b, &["metadata", "name"]) != Some(renew_name.as_str()))
            .collect();
        assert_eq!(
            bindings.len(),
            1,
            "{name}: one RoleBinding besides the renewal's"
        );
        let subjects = seq_at(bindings[0], &["subjects"]);
        assert_eq!(subjects.len(), 1);
        assert_eq!(str_at(&subjects[0], &["name"]), Some(job_sa));
        // The Role, its binding and the Job exist only while the pre-install hook runs.
        for obj in [role, bindings[0], job] {
            let hook = str_at(obj, &["metadata", "annotations", "helm.sh/hook"]).unwrap_or("");
            assert!(
                hook.contains("pre-install"),
                "{name}: {obj:?} must be a pre-install hook"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS wiring

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

/// The env value `name` of a container.
fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some(name))
        .and_then(|e| str_at(e, &["value"]))
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
            let cluster_trust =
                str_at(values, &["etcd", "clientTrust"]).is_some_and(|t| t == "cluster");
            // client-ca.pem is stored always, mounted only where the managed etcd uses it.
            let want: Vec<String> = tls_files(component, kvstoremesh)
                .into_iter()
                .filter(|f| f != "client-ca.pem" || cluster_trust)
                .collect();
            let mut files = BTreeSet::new();
            let mut secrets = BTreeSet::new();
            for src in seq_at(vol, &["projected", "sources"]) {
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

// ---------------------------------------------------------------------------------------------
// The values schema

fn template_set(sets: &[&str]) -> Result<String, String> {
    let mut extra = Vec::new();
    for s in sets {
        extra.push("--set".to_owned());
        extra.push((*s).to_owned());
    }
    template(&extra)
}

#[test]
fn schema_refuses_bad_cluster_ids() {
    for (sets, path) in [
        (&["cluster.id=0"][..], "/cluster/id"),
        (&["cluster.id=256"][..], "/cluster/id"),
        (&["cluster.id=-1"][..], "/cluster/id"),
        (
            &["cluster.id=512", "clustermesh.maxConnectedClusters=511"][..],
            "/cluster/id",
        ),
        (
            &["clustermesh.maxConnectedClusters=300"][..],
            "/clustermesh/maxConnectedClusters",
        ),
        (&["cluster.id=seven"][..], "/cluster/id"),
    ] {
        let err = template_set(sets).expect_err(&format!("helm template --set {sets:?} must fail"));
        assert!(
            err.contains("schema") && err.contains(path),
            "--set {sets:?}: the error must name {path}:\n{err}"
        );
    }
    for sets in [
        &["cluster.id=1"][..],
        &["cluster.id=255"][..],
        &[
            "cluster.id=256",
            "clustermesh.maxConnectedClusters=511",
            "certs.mode=existing",
            "certs.existing.apiserverSecret=a",
        ][..],
        &[
            "cluster.id=511",
            "clustermesh.maxConnectedClusters=511",
            "certs.mode=existing",
            "certs.existing.apiserverSecret=a",
        ][..],
    ] {
        let yaml = template_set(sets).unwrap_or_else(|e| panic!("--set {sets:?} must render: {e}"));
        let id = sets[0].trim_start_matches("cluster.id=");
        assert!(
            yaml.contains(&format!("--cluster-id={id}")),
            "--set {sets:?}"
        );
    }
}

#[test]
fn schema_refuses_bad_cluster_names() {
    for bad in [
        "default",
        "Cluster1",
        "-leading-dash",
        "trailing-dash-",
        "under_score",
        "dot.ted",
        "a23456789012345678901234567890123",
        "",
    ] {
        let err = template_set(&[&format!("cluster.name={bad}")])
            .expect_err(&format!("cluster.name={bad:?} must be refused"));
        assert!(
            err.contains("/cluster/name"),
            "cluster.name={bad:?}: the error must name /cluster/name:\n{err}"
        );
    }
    // Static remote clusters follow the same rules.
    let err = template_set(&[
        "clustermesh.config.clusters[0].name=default",
        "clustermesh.config.clusters[0].endpoints[0]=https://10.0.0.1:2379",
    ])
    .expect_err("a static remote named default must be refused");
    assert!(err.contains("/clustermesh/config/clusters/0/name"), "{err}");
    for good in [
        "a",
        "c1",
        "prod-eu-west-1",
        "a2345678901234567890123456789012",
    ] {
        template_set(&[&format!("cluster.name={good}")])
            .unwrap_or_else(|e| panic!("cluster.name={good:?} must render: {e}"));
    }
}

#[test]
fn chart_refuses_settings_that_cannot_work() {
    for (sets, needle) in [
        (&["apiserver.replicas=2"][..], "/apiserver/replicas"),
        (&["etcd.mode=external"][..], "/etcd/external/endpoints"),
        (
            &["certs.mode=existing"][..],
            "certs.existing.apiserverSecret is required",
        ),
        (
            &["certs.mode=certManager"][..],
            "certs.certManager.issuerRef.name",
        ),
        (
            &[
                "clustermesh.config.clusters[0].name=cluster1",
                "clustermesh.config.clusters[0].endpoints[0]=https://10.0.0.1:2379",
            ][..],
            "is this cluster's own name",
        ),
        (
            &["nodeSync.health.interval=fast"][..],
            "/nodeSync/health/interval",
        ),
        (
            &["cluster.id=300", "clustermesh.maxConnectedClusters=511"][..],
            "issues cluster ids 1..255 only",
        ),
        (
            &[
                "etcd.clientTrust=cluster",
                "certs.mode=certManager",
                "certs.certManager.issuerRef.name=x",
            ][..],
            "does not produce",
        ),
        (&["etcd.clientTrust=everyone"][..], "/etcd/clientTrust"),
    ] {
        let err = template_set(sets).expect_err(&format!("--set {sets:?} must fail"));
        assert!(
            err.contains(needle),
            "--set {sets:?}: expected {needle:?} in:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Drift: the binaries parse what the chart renders

/// Parse `args` as clustermesh-apiserver would at start, including its cluster rules
/// (`Args::index_config`: name, id against maxConnectedClusters, --manifest-dir with --source manifests).
fn parse_apiserver(case: &str, args: &[String]) -> clustermesh_apiserver::Args {
    let argv = std::iter::once("clustermesh-apiserver".to_owned()).chain(args.iter().cloned());
    let parsed = clustermesh_apiserver::Args::try_parse_from(argv).unwrap_or_else(|e| {
        panic!("{case}: clustermesh-apiserver refuses the chart's args {args:?}:\n{e}")
    });
    if let Err(e) = parsed.index_config() {
        panic!("{case}: clustermesh-apiserver would refuse to start with {args:?}: {e}");
    }
    parsed
}

fn parse_node_sync(case: &str, args: &[String]) -> node_sync::args::Args {
    let argv = std::iter::once("node-sync".to_owned()).chain(args.iter().cloned());
    node_sync::args::Args::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{case}: node-sync refuses the chart's args {args:?}:\n{e}"))
}

/// Every `$(VAR)` in a container's args names an env var of that container (the kubelet leaves
/// unknown references as they are, and the binary would get the literal text).
fn assert_env_refs_defined(case: &str, c: &Value) {
    let defined: BTreeSet<&str> = seq_at(c, &["env"])
        .iter()
        .filter_map(|e| str_at(e, &["name"]))
        .collect();
    for a in args(c) {
        let mut rest = a.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..]
                .find(')')
                .map(|e| start + e)
                .unwrap_or_else(|| panic!("{case}: unclosed $( in {a}"));
            let var = &rest[start + 2..end];
            assert!(
                defined.contains(var),
                "{case}: arg {a} uses $({var}), which the container does not define"
            );
            rest = &rest[end..];
        }
    }
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
            ns.etcd_endpoints.iter().all(|e| e.starts_with("https://")),
            "{name}: node-sync must reach etcd over TLS: {:?}",
            ns.etcd_endpoints
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
        parsed.etcd_endpoints.len(),
        2,
        "--etcd-endpoints is comma separated: {api:?}"
    );
    assert!(parsed.kvstoremesh);
    let ns = args(container(r.node_sync(), "node-sync"));
    let parsed = parse_node_sync(&r.case.name, &ns);
    assert_eq!(
        parsed.etcd_endpoints.len(),
        2,
        "--etcd-endpoints is comma separated: {ns:?}"
    );
    assert!(parsed.kvstoremesh);
    assert_eq!(parsed.stale_grace, std::time::Duration::from_secs(120));
    assert_eq!(parsed.dns_listen.map(|a| a.port()), Some(10053));
    assert_eq!(parsed.dns_forward, Some("10.96.0.10:53".parse().unwrap()));
    assert_eq!(parsed.dns_ttl, 3);
}

// ---------------------------------------------------------------------------------------------
// NOTES, dashboard

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

// ---------------------------------------------------------------------------------------------
// Shell scripts

/// The scripts of kind-multicluster/ and scripts/install-helm.sh.
fn scripts() -> Vec<PathBuf> {
    let root = repo_root();
    let dir = root.join("kind-multicluster");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    out.sort();
    for name in ["up.sh", "drill.sh", "down.sh"] {
        assert!(
            out.iter().any(|p| p.ends_with(name)),
            "kind-multicluster/{name} missing"
        );
    }
    out.push(root.join("scripts/install-helm.sh"));
    out
}

fn shellcheck(input: ShellInput<'_>) -> Output {
    let mut cmd = Command::new(require_tool("shellcheck"));
    cmd.args(["--severity=style", "--external-sources"]);
    match input {
        ShellInput::File(path) => {
            cmd.arg(path);
            if let Some(dir) = path.parent() {
                cmd.current_dir(dir);
            }
            run(cmd)
        }
        ShellInput::Stdin { shell, text } => {
            cmd.args(["--shell", shell, "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn shellcheck");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

enum ShellInput<'a> {
    File(&'a Path),
    Stdin { shell: &'a str, text: &'a str },
}

#[test]
fn scripts_pass_bash_n_and_shellcheck() {
    for script in scripts() {
        let mut cmd = Command::new("bash");
        cmd.arg("-n").arg(&script);
        let out = run(cmd);
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            script.display(),
            stderr(&out)
        );
        let out = shellcheck(ShellInput::File(&script));
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&script).unwrap().permissions().mode();
            assert!(mode & 0o111 != 0, "{} is not executable", script.display());
        }
    }
}

/// The shell scripts inside the chart (certgen Job, node-sync's prepare-host) pass shellcheck too.
#[test]
fn scripts_embedded_in_the_chart_pass_shellcheck() {
    for r in Rendered::all() {
        let mut embedded = Vec::new();
        let cron_pods = r
            .of_kind("CronJob")
            .filter_map(|c| at(c, &["spec", "jobTemplate"]));
        for workload in r
            .of_kind("Job")
            .chain(r.of_kind("DaemonSet"))
            .chain(cron_pods)
        {
            let spec = at(workload, &["spec", "template", "spec"]).unwrap();
            for c in seq_at(spec, &["containers"])
                .iter()
                .chain(seq_at(spec, &["initContainers"]))
            {
                let cmd = strings(seq_at(c, &["command"]));
                if let Some(shell) = cmd.first().filter(|s| s.ends_with("sh")) {
                    let shell = if shell.ends_with("bash") {
                        "bash"
                    } else {
                        "sh"
                    };
                    let text = strings(seq_at(c, &["args"])).join("\n");
                    embedded.push((str_at(c, &["name"]).unwrap().to_owned(), shell, text));
                }
            }
        }
        for (cname, shell, text) in &embedded {
            let out = shellcheck(ShellInput::Stdin { shell, text });
            assert!(
                out.status.success(),
                "{}: shellcheck of container {cname}'s script:\n{}\n{text}",
                r.case.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(
            !embedded.is_empty(),
            "{}: no embedded scripts found",
            r.case.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Images

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

// ---------------------------------------------------------------------------------------------
// Config files and dashboard against the binaries

/// Every static remote cluster the chart renders (clustermesh.config.clusters) is a file node-sync's
/// own parser accepts, naming TLS files that the node-sync container has mounted.
#[test]
fn node_sync_parses_every_rendered_remote_cluster_file() {
    let mut parsed = 0;
    for r in Rendered::all() {
        let name = &r.case.name;
        let ds = r.node_sync();
        let c = container(ds, "node-sync");
        let a = args(c);
        let dir = flag(&a, "remote-config-dir")
            .unwrap_or_else(|| panic!("{name}: no --remote-config-dir"));
        let tls_dir = flag(&a, "tls-dir").map(Path::new);
        let vol = volume_mounted_at(ds, c, dir);
        let sources = seq_at(vol, &["projected", "sources"]);
        let cm_name = sources
            .iter()
            .find_map(|s| str_at(s, &["configMap", "name"]))
            .unwrap_or_else(|| panic!("{name}: remotes volume has no ConfigMap source: {vol:?}"));
        let cm = r.one("ConfigMap", cm_name);
        let data = at(cm, &["data"])
            .and_then(Value::as_mapping)
            .cloned()
            .unwrap_or_default();
        let want: Vec<Value> = seq_at(&r.values, &["clustermesh", "config", "clusters"]).to_vec();
        assert_eq!(
            data.len(),
            want.len(),
            "{name}: one remote file per clustermesh.config.clusters entry"
        );
        for (file, text) in &data {
            let file = file.as_str().unwrap();
            let text = text.as_str().unwrap();
            let path = Path::new(dir).join(file);
            let source = node_sync::cluster::parse_remote_file(&path, text, tls_dir)
                .unwrap_or_else(|e| {
                    panic!("{name}: node-sync refuses {}: {e}\n{text}", path.display())
                });
            assert_eq!(
                format!("{}.yaml", source.name),
                file,
                "{name}: file name vs cluster name"
            );
            let tls = source
                .tls
                .unwrap_or_else(|| panic!("{name}: {file}: https endpoints without TLS files"));
            let ca = match &tls.ca {
                node_sync::cluster::CaSource::File(p) => p.clone(),
                other => panic!("{name}: {file}: CA {other:?}"),
            };
            for f in [&ca, &tls.cert, &tls.key] {
                let covered = mounts(c)
                    .iter()
                    .any(|(_, m, _)| f.parent() == Some(Path::new(m)));
                assert!(
                    covered,
                    "{name}: {file} names {}, which is in no volumeMount of node-sync",
                    f.display()
                );
            }
            parsed += 1;
        }
    }
    assert!(
        parsed >= 2,
        "no example renders static remote clusters ({parsed})"
    );
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

// ---------------------------------------------------------------------------------------------
// Kubernetes API shapes

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

// ---------------------------------------------------------------------------------------------
// The certgen Job's script, run for real

/// A loopback stand-in for the Kubernetes API's Secrets endpoints (the only ones the certgen Job
/// and the renewal CronJob call): GET .../secrets/NAME (200 or 404), POST .../secrets (201, or 409
/// when it exists) and PUT .../secrets/NAME (200, or 404 when it does not exist).
struct FakeSecretsApi {
    port: u16,
    state: std::sync::Arc<std::sync::Mutex<ApiState>>,
}

#[derive(Default)]
struct ApiState {
    secrets: BTreeMap<String, serde_json::Value>,
    /// (method, path, authorization header)
    requests: Vec<(String, String, String)>,
    /// Answer every GET with this status instead (an API server in trouble).
    fail_gets: Option<u16>,
}

impl FakeSecretsApi {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ApiState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                Self::serve(conn, &st);
            }
        });
        Self { port, state }
    }

    fn serve(mut conn: std::net::TcpStream, state: &std::sync::Mutex<ApiState>) {
        use std::io::{BufRead, BufReader, Read};
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let (mut len, mut auth) = (0usize, String::new());
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "authorization" => auth = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let (code, reply) = {
            let mut st = state.lock().unwrap();
            st.requests.push((method.clone(), path.clone(), auth));
            let prefix = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
            match (method.as_str(), path.strip_prefix(&prefix)) {
                ("GET", Some(rest)) if st.fail_gets.is_some() => {
                    let _ = rest;
                    (st.fail_gets.unwrap(), "{}".to_owned())
                }
                ("GET", Some(rest)) => match st.secrets.get(rest.trim_start_matches('/')) {
                    Some(s) => (200, s.to_string()),
                    None => (404, r#"{"kind":"Status","code":404}"#.to_owned()),
                },
                ("POST", Some("")) => match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(secret) => {
                        let name = secret["metadata"]["name"].as_str().unwrap_or("").to_owned();
                        match st.secrets.entry(name) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                (409, r#"{"kind":"Status","code":409}"#.to_owned())
                            }
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(secret.clone());
                                (201, secret.to_string())
                            }
                        }
                    }
                    Err(e) => (400, format!("{{\"message\":{:?}}}", e.to_string())),
                },
                ("PUT", Some(rest)) => {
                    let name = rest.trim_start_matches('/').to_owned();
                    match serde_json::from_slice::<serde_json::Value>(&body) {
                        Ok(secret) if secret["metadata"]["name"] != name.as_str() => {
                            (400, r#"{"message":"name in body differs"}"#.to_owned())
                        }
                        Ok(secret) => match st.secrets.get_mut(&name) {
                            Some(old) => {
                                *old = secret.clone();
                                (200, secret.to_string())
                            }
                            None => (404, r#"{"kind":"Status","code":404}"#.to_owned()),
                        },
                        Err(e) => (400, format!("{{\"message\":{:?}}}", e.to_string())),
                    }
                }
                _ => (404, "{}".to_owned()),
            }
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("chart-tests-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the certgen container's script from `rendered` against `api`, with a `clustermesh` on PATH
/// that hands out certificates issued beforehand by mesh-certs (the library behind `clustermesh ca`)
/// and logs its arguments.
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
    let bin = clustermesh_cli::labmesh::default_bin_dir();
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

// ---------------------------------------------------------------------------------------------
// kind-multicluster against the chart

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
        parse_node_sync(&r.case.name, &args(container(r.node_sync(), "node-sync")));
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

/// scripts/install-helm.sh is idempotent: with helm v4 already in place it changes nothing and
/// downloads nothing.
#[test]
fn install_helm_script_keeps_an_installed_helm_v4() {
    let helm_bin = require_tool("helm");
    let work = Scratch::new("install-helm");
    let dir = work.0.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&helm_bin, dir.join("helm")).unwrap();
    let before = std::fs::metadata(dir.join("helm"))
        .unwrap()
        .modified()
        .unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/install-helm.sh"))
        .env("HELM_INSTALL_DIR", &dir)
        // Any attempt to reach PyPI would fail loudly.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_NO_INPUT", "1");
    let out = run(cmd);
    assert!(out.status.success(), "install-helm.sh: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("helm present") && err.contains("v4."), "{err}");
    assert!(!err.contains("downloading"), "{err}");
    let after = std::fs::metadata(dir.join("helm"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an installed helm v4 is left alone");
}

// ---------------------------------------------------------------------------------------------
// kind-multicluster scripts, driven through stand-ins
//
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
        // Every other cluster's nodes get routes to this cluster's two pod CIDRs; its own do not.
        for (j, other) in names.iter().enumerate() {
            for node in ["control-plane", "worker"] {
                let routes = calls_starting(
                    &calls,
                    &format!("docker exec {other}-{node} ip route replace 10.{n}0."),
                );
                assert_eq!(
                    routes.len(),
                    if i == j { 0 } else { 2 },
                    "{other}-{node} routes to {c}: {routes:?}"
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

// ---------------------------------------------------------------------------------------------
// The managed etcd as the chart configures it, started for real by the apiserver's own code

use mesh_testkit::free_port;

/// With the chart's defaults (managed etcd), the apiserver's etcd must serve the pod's own
/// addresses, not only 127.0.0.1: node-syncs of this cluster and of remote clusters come in through
/// the Service, i.e. to the pod IP. This starts the real etcd through
/// `clustermesh_apiserver::managed::ManagedEtcd` with the URLs the chart passes, on certificates
/// issued with the SANs the chart's certgen Job passes, then connects as the apiserver does (admin,
/// to the endpoints it advertises) and as a node-sync does through a non-127.0.0.1 address (here
/// 127.0.0.2, given to the chart as an extra SAN, as a node or load balancer address would be).
#[test]
fn managed_etcd_serves_the_pod_addresses_and_the_apiserver_itself() {
    // With the client trust of the cluster's own intermediate: its own clients still get in.
    let yaml =
        template_set(&["certs.extraSans={127.0.0.2}", "etcd.clientTrust=cluster"]).expect("render");
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
        api.etcd_endpoints.is_empty(),
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

/// With `nodeSync.dns.enabled`, node-sync serves clusterset.local on the port its container
/// declares (UDP and TCP), and a node-local Service (internalTrafficPolicy: Local) sends queries to
/// the node-sync of the node they come from; without it there is neither flag nor Service.
#[test]
fn clusterset_dns_is_served_by_node_sync_behind_a_node_local_service() {
    let mut enabled_cases = 0;
    for r in Rendered::all() {
        let name = &r.case.name;
        let c = container(r.node_sync(), "node-sync");
        let parsed = parse_node_sync(name, &args(c));
        let enabled = at(&r.values, &["nodeSync", "dns", "enabled"])
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let services: Vec<&Value> = r
            .of_kind("Service")
            .filter(|s| {
                str_at(s, &["metadata", "name"]).is_some_and(|n| n.ends_with("-node-sync-dns"))
            })
            .collect();
        if !enabled {
            assert!(parsed.dns_listen.is_none(), "{name}: DNS is off by default");
            assert!(
                services.is_empty(),
                "{name}: no DNS Service when DNS is off"
            );
            continue;
        }
        enabled_cases += 1;
        let listen = parsed
            .dns_listen
            .unwrap_or_else(|| panic!("{name}: --dns-listen"));
        let ports = seq_at(c, &["ports"]);
        for proto in ["UDP", "TCP"] {
            let p = ports
                .iter()
                .find(|p| {
                    str_at(p, &["protocol"]) == Some(proto)
                        && at(p, &["containerPort"]).and_then(Value::as_u64)
                            == Some(u64::from(listen.port()))
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{name}: no {proto} container port {} for --dns-listen",
                        listen.port()
                    )
                });
            let port_name = str_at(p, &["name"]).unwrap();
            assert_eq!(services.len(), 1, "{name}: one DNS Service");
            let svc = services[0];
            assert_eq!(
                str_at(svc, &["spec", "internalTrafficPolicy"]),
                Some("Local"),
                "{name}"
            );
            let sp = seq_at(svc, &["spec", "ports"])
                .iter()
                .find(|sp| str_at(sp, &["protocol"]) == Some(proto))
                .unwrap_or_else(|| panic!("{name}: DNS Service has no {proto} port"));
            assert_eq!(
                at(sp, &["port"]).and_then(Value::as_u64),
                Some(53),
                "{name}"
            );
            assert_eq!(
                str_at(sp, &["targetPort"]),
                Some(port_name),
                "{name}: {proto} target port"
            );
        }
        if let Some(ip) = str_at(&r.values, &["nodeSync", "dns", "clusterIP"]) {
            assert_eq!(
                str_at(services[0], &["spec", "clusterIP"]),
                Some(ip),
                "{name}"
            );
        }
    }
    assert!(
        enabled_cases >= 1,
        "no example enables the clusterset.local DNS"
    );
}
