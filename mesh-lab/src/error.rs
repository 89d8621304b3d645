//! The one error type of the lab library.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building, driving or tearing down a lab.
///
/// Every variant names the thing that failed: the command line and its stderr, the file, the cluster.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The [`crate::LabSpec`] breaks a rule (prefix syntax, cluster count, cluster name, ...).
    #[error("invalid lab spec: {0}")]
    Spec(String),
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, as it would be typed.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The lab state file could not be decoded or encoded.
    #[error("lab state file {path}: {source}")]
    State {
        /// The state file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Another live process holds the lab with this prefix.
    #[error("lab `{prefix}` is in use by another process (lock {path} is held)")]
    Busy {
        /// The lab prefix.
        prefix: String,
        /// The lock file.
        path: PathBuf,
    },
    /// No lab with this prefix exists (no state file).
    #[error("no lab `{prefix}` (no state file at {path})")]
    NoSuchLab {
        /// The lab prefix.
        prefix: String,
        /// Where its state file would be.
        path: PathBuf,
    },
    /// A cluster index out of range, or an unknown cluster name.
    #[error("no cluster {cluster} in lab `{prefix}` (it has clusters 1..={count})")]
    NoSuchCluster {
        /// The lab prefix.
        prefix: String,
        /// The cluster asked for.
        cluster: String,
        /// How many clusters the lab has.
        count: usize,
    },
    /// A node index out of range.
    #[error("no node {node} in cluster {cluster} of lab `{prefix}` (it has nodes 1..={count})")]
    NoSuchNode {
        /// The lab prefix.
        prefix: String,
        /// The cluster index.
        cluster: usize,
        /// The node asked for.
        node: usize,
        /// How many nodes the cluster has.
        count: usize,
    },
    /// A host prerequisite (a binary, root, a kernel feature) is missing.
    #[error("missing prerequisite: {0}")]
    Prerequisite(String),
    /// Every address range the lab may use is taken by other labs or host routes.
    #[error(
        "no free 10.x.0.0/16 range for lab `{0}`: every candidate is used by another lab or a host route"
    )]
    NoFreeRange(String),
    /// Something did not happen before its deadline.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// etcd of a cluster exited or never became healthy.
    #[error("etcd of cluster {cluster} is not healthy: {detail} (log: {log})")]
    Etcd {
        /// The cluster name.
        cluster: String,
        /// What went wrong (exit status, last response, ...).
        detail: String,
        /// The etcd log file.
        log: PathBuf,
    },
    /// Sending a signal failed (other than "no such process").
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        /// Target pid.
        pid: i32,
        /// Signal name.
        signal: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Issuing the lab's certificates failed.
    #[error("certificates for lab `{prefix}`: {detail}")]
    Certs {
        /// The lab prefix.
        prefix: String,
        /// What failed.
        detail: String,
    },
    /// Teardown finished but left things behind.
    #[error("teardown of lab `{prefix}` left: {}", .leftovers.join("; "))]
    Leftovers {
        /// The lab prefix.
        prefix: String,
        /// One line per thing left behind.
        leftovers: Vec<String>,
    },
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the lab library.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
