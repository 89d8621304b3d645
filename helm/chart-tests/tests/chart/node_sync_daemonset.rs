//! node-sync's DaemonSet: privileged on the host network with the host's bpffs and cgroup v2
//! mounted where its flags point, a prepare-host init container that is run here for real, static
//! remote cluster files node-sync's own parser accepts, and the clusterset.local DNS behind a
//! node-local Service.
//!
//! Needs `helm` (v4) on PATH, and bpffs and cgroup v2 on this machine (`scripts/setup.sh`).

use std::path::Path;
use std::process::Command;

use serde_yaml::Value;

use chart_tests::binaries::parse_node_sync;
use chart_tests::helm::{Rendered, cases, run, stderr};
use chart_tests::manifest::{
    args, at, container, flag, mounts, seq_at, str_at, strings, volume, volume_mounted_at,
};

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
