//! The two filesystems the datapath needs: bpffs (pins) and cgroup v2 (attach points).

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use crate::Error;

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Where [`ensure_cgroup2`] mounts a cgroup v2 hierarchy when the host has none.
pub const FALLBACK_CGROUP2: &str = "/run/clustermesh/cgroup2";

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Whether `path` is on a cgroup v2 filesystem.
pub fn is_cgroup2(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// Mount points of `fstype` listed in `/proc/mounts`.
fn mount_points(fstype: &str) -> Result<Vec<PathBuf>, Error> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| Error::Io {
        what: "reading",
        path: "/proc/mounts".into(),
        source,
    })?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let point = fields.next()?;
            (fields.next()? == fstype).then(|| PathBuf::from(point.replace("\\040", " ")))
        })
        .collect())
}

/// Makes sure a bpf filesystem is mounted at `path` (mounting one if not).
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    if is_bpffs(path) {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(|source| Error::Io {
        what: "creating",
        path: path.into(),
        source,
    })?;
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::Mount {
        fstype: "bpf",
        path: path.into(),
        source,
    })
}

/// The root of a cgroup v2 hierarchy: the first one in `/proc/mounts`, or a new mount at
/// [`FALLBACK_CGROUP2`] when the host has none (for example a cgroup v1 host).
pub fn ensure_cgroup2() -> Result<PathBuf, Error> {
    if let Some(point) = mount_points("cgroup2")?.into_iter().next() {
        return Ok(point);
    }
    let path = Path::new(FALLBACK_CGROUP2);
    if is_cgroup2(path) {
        return Ok(path.into());
    }
    fs::create_dir_all(path).map_err(|source| Error::Io {
        what: "creating",
        path: path.into(),
        source,
    })?;
    mount(
        Some("none"),
        path,
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::Mount {
        fstype: "cgroup2",
        path: path.into(),
        source,
    })?;
    Ok(path.into())
}
