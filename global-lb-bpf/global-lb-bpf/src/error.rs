//! Errors of the loader and the map API.

use std::io;
use std::path::PathBuf;

use crate::Frontend;

/// What went wrong, naming the cgroup, pin path, program, map or service concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cgroup directory to attach to cannot be opened.
    #[error("cgroup {path}: cannot open: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The directory is not part of a cgroup v2 hierarchy.
    #[error(
        "cgroup {path} is not a cgroup v2 directory (mount one with `mount -t cgroup2 none DIR`)"
    )]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
    },

    /// The pin directory is not on a BPF filesystem.
    #[error(
        "pin directory {path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },

    /// Another process has the datapath of this pin directory open.
    #[error("pin directory {pin_dir} is in use by another loader (one writer at a time)")]
    Busy {
        /// The pin directory.
        pin_dir: PathBuf,
    },

    /// A filesystem operation on the pin directory or a mount point failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// Mounting a filesystem failed.
    #[error("mounting {fstype} at {path}: {source}")]
    Mount {
        /// `bpf` or `cgroup2`.
        fstype: &'static str,
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },

    /// The eBPF object could not be parsed or its maps created/opened.
    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        /// The pin directory.
        pin_dir: PathBuf,
        /// Why.
        #[source]
        source: Box<aya::EbpfError>,
    },

    /// The kernel refused a program (the message carries the verifier log).
    #[error("the kernel refused program {program}: {source}")]
    ProgramRefused {
        /// Program name, e.g. `connect4`.
        program: &'static str,
        /// Why, with the verifier output.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// Attaching a program to the cgroup failed.
    #[error("attaching program {program} to cgroup {cgroup}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// Pinning or opening a pinned link failed.
    #[error("link of program {program} pinned at {path}: {reason}")]
    Link {
        /// Program name.
        program: &'static str,
        /// The pin path.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// A map is missing from the object or has another layout than this build expects (for
    /// example maps pinned by an older, incompatible version).
    #[error("map {map}: {reason}")]
    MapLayout {
        /// Map name.
        map: &'static str,
        /// Why.
        reason: String,
    },

    /// A map has no room for the entries an update needs; nothing was written.
    #[error(
        "map {map} is full ({capacity} entries{})",
        if *map == global_lb_bpf_common::BACKENDS_MAP {
            "; its capacity is DatapathConfig::max_backends, node-sync --max-backends"
        } else {
            ""
        }
    )]
    MapFull {
        /// Map name.
        map: &'static str,
        /// Its capacity.
        capacity: u32,
    },

    /// A map operation failed in the kernel.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The operation, e.g. `insert`.
        op: &'static str,
        /// Why.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// The service cannot be written as asked.
    #[error("service {frontend}: {reason}")]
    InvalidService {
        /// The service.
        frontend: Frontend,
        /// Why.
        reason: String,
    },

    /// Every backend or service id is in use.
    #[error("no free {what} id left")]
    IdsExhausted {
        /// `backend` or `service`.
        what: &'static str,
    },
}
