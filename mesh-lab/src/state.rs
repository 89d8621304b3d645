//! The lab state file (`<state_root>/<prefix>/state.json`), its locks, and address-range allocation.
//!
//! The state file is what lets `mesh-lab down`/`status` work from another process and lets the next `up` clean up
//! after a crashed run. A lab in use by a live process holds an exclusive lock on `<state_root>/<prefix>.lock`
//! (released by the kernel when that process dies); octets are allocated under `<state_root>/.alloc.lock`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::plan::{LabPlan, OCTETS};
use crate::process::ProcRecord;

/// Latency and loss between two clusters, in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Impairment {
    /// Delay added to every packet, in each direction (the round trip grows by twice this).
    #[serde(with = "humantime_serde_compat")]
    pub delay: Duration,
    /// Loss in percent (0.0..=100.0) applied in each direction.
    pub loss_percent: f64,
}

impl Impairment {
    /// Checks the loss percentage (0..=100).
    pub fn validate(&self) -> Result<()> {
        if self.loss_percent.is_nan() || !(0.0..=100.0).contains(&self.loss_percent) {
            return Err(LabError::Spec(format!(
                "loss must be 0..=100 percent, got {}",
                self.loss_percent
            )));
        }
        Ok(())
    }
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// An impairment in force from cluster `from` to cluster `to` (cluster indices).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImpairmentRecord {
    /// Source cluster index.
    pub from: usize,
    /// Destination cluster index.
    pub to: usize,
    /// What is applied.
    pub impairment: Impairment,
}

/// Everything a process needs to know about a lab it did not build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// The layout.
    pub plan: LabPlan,
    /// PID of the process that built the lab.
    pub owner_pid: u32,
    /// True once `up` finished.
    pub complete: bool,
    /// etcd process per cluster (index 0 is cluster 1); `None` while stopped.
    pub etcd: Vec<Option<ProcRecord>>,
    /// Processes started in nodes and control planes (pruned of dead ones on every write).
    pub processes: Vec<ProcRecord>,
    /// Partitioned cluster pairs `(a, b)` with `a < b`.
    pub partitions: Vec<(usize, usize)>,
    /// Latency/loss in force.
    pub impairments: Vec<ImpairmentRecord>,
    /// Nodes cut off the network `(cluster, node)` ([`crate::Lab::isolate_node`]).
    #[serde(default)]
    pub isolated_nodes: Vec<(usize, usize)>,
}

impl LabState {
    /// A fresh state for `plan`.
    pub fn new(plan: LabPlan) -> Self {
        let n = plan.clusters.len();
        LabState {
            plan,
            owner_pid: std::process::id(),
            complete: false,
            etcd: vec![None; n],
            processes: Vec::new(),
            partitions: Vec::new(),
            impairments: Vec::new(),
            isolated_nodes: Vec::new(),
        }
    }

    /// Writes the state file atomically (temp file + rename), dropping records of dead processes first.
    pub fn save(&mut self) -> Result<()> {
        self.processes.retain(ProcRecord::is_alive);
        let dir = &self.plan.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let path = state_file(dir);
        let tmp = dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|source| LabError::State {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(|e| LabError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))
    }

    /// Reads the state file of the lab in `state_dir`; `None` when there is none.
    pub fn load(state_dir: &Path) -> Result<Option<LabState>> {
        let path = state_file(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LabError::io(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| LabError::State { path, source })
    }
}

/// `<state_dir>/state.json`.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

/// Holds the exclusive lock of one lab prefix; dropping it releases the lock.
#[derive(Debug)]
pub struct PrefixLock {
    _file: File,
}

fn open_lock(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| LabError::io(parent, e))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LabError::io(path, e))
}

/// Takes the lock of `prefix` without waiting; [`LabError::Busy`] when a live process holds it.
pub fn lock_prefix(state_root: &Path, prefix: &str) -> Result<PrefixLock> {
    let path = state_root.join(format!("{prefix}.lock"));
    let file = open_lock(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(PrefixLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LabError::Busy {
            prefix: prefix.to_string(),
            path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(LabError::io(path, e)),
    }
}

/// True when a live process holds the lock of `prefix`.
pub fn prefix_in_use(state_root: &Path, prefix: &str) -> bool {
    matches!(lock_prefix(state_root, prefix), Err(LabError::Busy { .. }))
}

/// Runs `f` under the global allocation lock (blocking until it is free).
pub fn with_alloc_lock<T>(state_root: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = state_root.join(".alloc.lock");
    let file = open_lock(&path)?;
    file.lock().map_err(|e| LabError::io(&path, e))?;
    let out = f();
    let _ = file.unlock();
    out
}

/// Prefixes of every lab with a state directory under `state_root`.
pub fn lab_prefixes(state_root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state_root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Octets recorded by the state files of every lab under `state_root` except `except_prefix`.
pub fn octets_in_use(state_root: &Path, except_prefix: &str) -> BTreeSet<u8> {
    lab_prefixes(state_root)
        .into_iter()
        .filter(|p| p != except_prefix)
        .filter_map(|p| LabState::load(&state_root.join(p)).ok().flatten())
        .map(|s| s.plan.octet)
        .collect()
}

/// Octets whose `10.<octet>.0.0/16` overlaps a host route that is not a lab's own (`ip -4 route show table all`
/// output; routes on `mlh*` devices belong to labs).
pub fn octets_taken_by_routes(routes: &str) -> BTreeSet<u8> {
    const TYPES: [&str; 10] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "blackhole",
        "unreachable",
        "prohibit",
        "throw",
        "anycast",
        "nat",
    ];
    let mut taken = BTreeSet::new();
    for line in routes.lines() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        let Some(mut dest) = toks.first().copied() else {
            continue;
        };
        if TYPES.contains(&dest) {
            dest = toks.get(1).copied().unwrap_or("");
        }
        if let Some(i) = toks.iter().position(|t| *t == "dev")
            && toks.get(i + 1).is_some_and(|d| d.starts_with("mlh"))
        {
            continue;
        }
        let (addr, len) = match dest.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().unwrap_or(32)),
            None => (dest, 32),
        };
        let Ok(addr) = addr.parse::<Ipv4Addr>() else {
            continue; // "default" and friends
        };
        let o = addr.octets();
        for octet in OCTETS {
            // two prefixes overlap iff the shorter contains the other's base
            let overlaps = if len <= 16 {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(Ipv4Addr::new(10, octet, 0, 0)) & mask == u32::from(addr) & mask
            } else {
                o[0] == 10 && o[1] == octet
            };
            if overlaps {
                taken.insert(octet);
            }
        }
    }
    taken
}

/// The lowest octet of [`OCTETS`] not in `used`.
pub fn pick_octet(used: &BTreeSet<u8>) -> Option<u8> {
    OCTETS.into_iter().find(|o| !used.contains(o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::LabSpec;

    #[test]
    fn routes_that_overlap_are_taken_and_lab_routes_are_not() {
        let routes = "\
default via 192.0.2.1 dev eth0
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
10.101.5.0/24 dev docker0
10.128.0.0/10 dev wg0
10.100.0.0/16 via 10.100.0.1 dev mlh100
local 10.200.0.7 dev lo table local
broadcast 10.201.255.255 dev eth1 table local
";
        let t = octets_taken_by_routes(routes);
        assert!(t.contains(&101));
        assert!(t.contains(&128), "10.128.0.0/10 covers 10.128-10.191");
        assert!(t.contains(&191));
        assert!(!t.contains(&192));
        assert!(!t.contains(&100), "a lab's own route");
        assert!(t.contains(&200));
        assert!(t.contains(&201));
        assert!(!t.contains(&202));
        assert!(!t.contains(&127));
        let all = octets_taken_by_routes("10.0.0.0/8 dev x\n");
        assert_eq!(all.len(), OCTETS.count());
        assert_eq!(pick_octet(&all), None);
        assert_eq!(pick_octet(&t), Some(100));
    }

    #[test]
    fn state_round_trips_and_locks_exclude() {
        let root = std::env::temp_dir().join(format!("mesh-lab-state-{}", std::process::id()));
        let mut spec = LabSpec::new("st", 2, 1);
        spec.state_root = root.clone();
        let plan = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let mut st = LabState::new(plan);
        st.impairments.push(ImpairmentRecord {
            from: 1,
            to: 2,
            impairment: Impairment {
                delay: Duration::from_millis(150),
                loss_percent: 2.5,
            },
        });
        st.processes
            .push(ProcRecord::of(std::process::id() as i32, "me").unwrap());
        st.save().unwrap();
        let back = LabState::load(&root.join("st")).unwrap().unwrap();
        assert_eq!(back, st);
        assert_eq!(octets_in_use(&root, "other"), BTreeSet::from([100]));
        assert!(octets_in_use(&root, "st").is_empty());

        let held = lock_prefix(&root, "st").unwrap();
        // flock locks are per open file description: a second open in this process conflicts too
        assert!(matches!(
            lock_prefix(&root, "st"),
            Err(LabError::Busy { .. })
        ));
        assert!(prefix_in_use(&root, "st"));
        drop(held);
        assert!(!prefix_in_use(&root, "st"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
