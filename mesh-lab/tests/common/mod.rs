//! Helpers shared by the lab tests (root, real namespaces, real etcd).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_lab::{EtcdSecurity, Lab, LabSpec};

/// A plain-etcd lab with a stable prefix (a crashed earlier run of the same test is cleaned up by `up`).
pub fn lab(prefix: &str, clusters: usize, nodes: usize) -> Lab {
    let spec = LabSpec::new(prefix, clusters, nodes).etcd_security(EtcdSecurity::Plain);
    Lab::up(spec).unwrap_or_else(|e| panic!("lab {prefix} up: {e}"))
}

/// `curl` of `url` from node `n` of cluster `c` with a whole-request limit; `(success, stdout+stderr)`.
pub fn curl_from(lab: &Lab, c: usize, n: usize, url: &str, max: Duration) -> (bool, String) {
    let out = lab
        .output_in_node(
            c,
            n,
            Command::new("curl")
                .args(["-sS", "--max-time"])
                .arg(format!("{:.3}", max.as_secs_f64()))
                .arg(url),
        )
        .expect("run curl in node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// True when node `n` of cluster `c` gets a healthy answer from cluster `target`'s etcd within `max`.
pub fn reaches_etcd(lab: &Lab, c: usize, n: usize, target: usize, max: Duration) -> bool {
    let url = format!("{}/health", lab.etcd_endpoint(target).unwrap());
    let (ok, text) = curl_from(lab, c, n, &url, max);
    ok && text.contains("\"health\":\"true\"")
}

/// TCP connect time (seconds) from node `n` of cluster `c` to cluster `target`'s etcd, measured by curl.
pub fn connect_time(lab: &Lab, c: usize, n: usize, target: usize) -> f64 {
    let url = format!("{}/health", lab.etcd_endpoint(target).unwrap());
    let out = lab
        .output_in_node(
            c,
            n,
            Command::new("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{time_connect}",
                &url,
            ]),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Median of `n` samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Names of the host's network namespaces.
pub fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Everything of a torn-down lab that must be gone: namespaces, processes, cgroups, mounts, state, host veth.
pub struct Footprint {
    pub prefix: String,
    pub netns: Vec<String>,
    pub pids: Vec<mesh_lab::process::ProcRecord>,
    pub cgroups: Vec<PathBuf>,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub host_veth: String,
}

impl Footprint {
    pub fn of(lab: &Lab, extra: &[u32]) -> Footprint {
        let mut pids: Vec<_> = lab
            .clusters()
            .iter()
            .filter_map(|c| lab.etcd_pid(c).unwrap())
            .chain(extra.iter().copied())
            .filter_map(|p| mesh_lab::process::ProcRecord::of(p as i32, "lab process"))
            .collect();
        pids.dedup();
        Footprint {
            prefix: lab.prefix().to_string(),
            netns: lab.plan().netns_names(),
            pids,
            cgroups: lab.plan().cgroup_dirs(),
            bpffs: lab.plan().bpffs_dir.clone(),
            state_dir: lab.state_dir().to_path_buf(),
            host_veth: lab.plan().host_veth.clone(),
        }
    }

    /// Asserts that the lab existed (every item present) — a check of the check.
    pub fn assert_present(&self) {
        let ns = netns_list();
        for n in &self.netns {
            assert!(ns.contains(n), "namespace {n} missing while the lab runs");
        }
        for p in &self.pids {
            assert!(p.is_alive(), "process {} not running", p.pid);
        }
        for c in &self.cgroups {
            assert!(c.is_dir(), "cgroup {} missing", c.display());
        }
        assert!(
            mounts_mentioning(&self.prefix) > 0,
            "no netns mounts of {}",
            self.prefix
        );
        assert!(Path::new("/sys/class/net").join(&self.host_veth).exists());
    }

    /// Asserts that nothing of the lab remains.
    pub fn assert_gone(&self) {
        let ns = netns_list();
        for n in &self.netns {
            assert!(!ns.contains(n), "namespace {n} remains after teardown");
        }
        for p in &self.pids {
            assert!(
                !p.is_alive(),
                "process {} ({}) remains after teardown",
                p.pid,
                p.what
            );
        }
        for c in &self.cgroups {
            assert!(!c.exists(), "cgroup {} remains after teardown", c.display());
        }
        assert_eq!(
            mounts_mentioning(&self.prefix),
            0,
            "mounts of {} remain",
            self.prefix
        );
        assert!(
            !self.state_dir.exists(),
            "state dir {} remains",
            self.state_dir.display()
        );
        assert!(
            !Path::new("/sys/class/net").join(&self.host_veth).exists(),
            "host veth {} remains",
            self.host_veth
        );
    }
}

/// Number of mounts whose mount point mentions `/run/netns/<prefix>-` (namespace bind mounts of the lab).
pub fn mounts_mentioning(prefix: &str) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!("/run/netns/{prefix}-");
    text.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|p| p.starts_with(&needle))
        })
        .count()
}
