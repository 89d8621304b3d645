//! cgroup v2 and bpffs: find or mount them, create node directories, empty and remove them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cmd;
use crate::error::{LabError, Result};
use crate::process::poll_until;

/// Where the lab mounts cgroup v2 when the host has none mounted.
pub const LAB_CGROUP2_MOUNT: &str = "/run/clustermesh/cgroup2";
/// Where bpffs is mounted (the lab mounts it when absent).
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// One line of `/proc/self/mountinfo`: mount point and file-system type.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// Parses `/proc/self/mountinfo` text.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            Some(Mount {
                point: PathBuf::from(unescape_octal(point)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Result<Vec<Mount>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| LabError::io(path, e))?;
    Ok(parse_mountinfo(&text))
}

/// The first mounted cgroup v2 hierarchy, if any.
pub fn find_cgroup2() -> Result<Option<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point))
}

/// A cgroup v2 root: the host's if mounted (e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), else one the lab
/// mounts at [`LAB_CGROUP2_MOUNT`] (shared by every lab and left mounted, like bpffs).
pub fn ensure_cgroup2() -> Result<PathBuf> {
    if let Some(p) = find_cgroup2()? {
        return Ok(p);
    }
    std::fs::create_dir_all(LAB_CGROUP2_MOUNT).map_err(|e| LabError::io(LAB_CGROUP2_MOUNT, e))?;
    match cmd::run(Command::new("mount").args(["-t", "cgroup2", "cgroup2", LAB_CGROUP2_MOUNT])) {
        Ok(_) => Ok(PathBuf::from(LAB_CGROUP2_MOUNT)),
        // another lab raced us to it
        Err(e) => find_cgroup2()?.ok_or(e),
    }
}

/// Mounts bpffs at [`BPFFS_MOUNT`] unless a bpf file system is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let here = |ms: &[Mount]| {
        ms.iter()
            .any(|m| m.fstype == "bpf" && m.point == Path::new(BPFFS_MOUNT))
    };
    if here(&mounts()?) {
        return Ok(());
    }
    if let Err(e) = cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_MOUNT]))
        && !here(&mounts()?)
    {
        return Err(e);
    }
    Ok(())
}

/// Creates a cgroup directory (and its parents).
pub fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))
}

/// PIDs in a cgroup directory (its own `cgroup.procs`, not its children's).
pub fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// True when no process lives in `dir` or below (`cgroup.events`: `populated 0`).
pub fn is_empty(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(t) => !t.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => procs(dir).is_empty(),
    }
}

/// Kills every process in `dir` and below (`cgroup.kill`, or SIGKILL per PID on older kernels), waits until the
/// cgroup is empty, and removes the directory tree. A missing directory is success.
pub fn kill_and_remove(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1").map_err(|e| LabError::io(&kill_file, e))?;
    } else {
        kill_tree_by_pid(dir)?;
    }
    if !poll_until(timeout, || is_empty(dir)) {
        return Err(LabError::Timeout {
            what: format!("cgroup {} to empty (pids {:?})", dir.display(), procs(dir)),
            timeout,
        });
    }
    remove_tree(dir)
}

fn kill_tree_by_pid(dir: &Path) -> Result<()> {
    for pid in procs(dir) {
        crate::process::send(pid, nix::sys::signal::Signal::SIGKILL)?;
    }
    for sub in subdirs(dir) {
        kill_tree_by_pid(&sub)?;
    }
    Ok(())
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes an empty cgroup tree, children first (cgroup directories are removed with rmdir).
fn remove_tree(dir: &Path) -> Result<()> {
    for sub in subdirs(dir) {
        remove_tree(&sub)?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::io(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let text = "\
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
36 24 0:31 / /sys/fs/bpf rw - bpf bpf rw,mode=700
40 24 0:32 / /mnt/with\\040space rw shared:1 - tmpfs none rw
";
        let ms = parse_mountinfo(text);
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(ms[0].fstype, "cgroup2");
        assert_eq!(ms[1].fstype, "bpf");
        assert_eq!(ms[2].point, Path::new("/mnt/with space"));
    }
}
