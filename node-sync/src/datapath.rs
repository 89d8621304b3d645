//! The real map writer on the global-lb-bpf datapath.
//!
//! global-lb-bpf has not published its typed map API yet; until it does, opening the datapath
//! fails with a clear error and `--fake-maps` runs node-sync against in-memory maps.

use std::path::Path;

use crate::lb::{MapError, MapWriter};

/// Open the pinned maps under `bpffs` (programs attached to `cgroup`).
pub fn open(bpffs: &Path, cgroup: &Path) -> Result<Box<dyn MapWriter>, MapError> {
    Err(MapError {
        op: "open",
        frontend: "*".into(),
        detail: format!(
            "the eBPF datapath (global-lb-bpf) is not wired into this build yet (bpffs {}, cgroup {}); run with --fake-maps",
            bpffs.display(),
            cgroup.display()
        ),
    })
}
