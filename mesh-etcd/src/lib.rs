//! Secure etcd: the command line for mTLS with `--client-cert-auth`, starting etcd and waiting until
//! it serves, least-privilege users and roles, and clients whose connection errors say what was wrong.
//!
//! Users (etcd takes the user from the client certificate's CN):
//!
//! | user | role's permissions |
//! |---|---|
//! | `root` | etcd's root role (user and role management); only used to bootstrap |
//! | `admin-<cluster>` | read-write on every key |
//! | `node-<cluster>` | read `clustermesh/v1/`; read-write `clustermesh/v1/health/<cluster>/` and `clustermesh/v1/nodestatus/<cluster>/` |
//! | `remote-<peer>` | read `clustermesh/v1/` (added by [`add_remote_user`] when a peer connects) |
//! | `remote-<cluster>` | read `clustermesh/v1/`: the cluster's own remote certificate, which `clustermesh connect --context` hands to the peers it registers (Kubernetes mode: no etcd access to add per-peer users); created by [`EtcdAuthAdmin::bootstrap`] |
//!
//! etcd 3.4 reads `--trusted-ca-file` only at start: after the bundle changes (rotation, retirement,
//! federation), restart etcd. Its server certificate is re-read on each handshake.

mod connect;
mod error;
mod flags;
mod process;
mod users;

pub use connect::*;
pub use error::{Error, Result};
pub use flags::EtcdFlags;
pub use process::*;
pub use users::*;

use mesh_model::ClusterName;

/// Debian's etcd.
pub const DEFAULT_ETCD_BINARY: &str = "/usr/bin/etcd";

/// The key prefix every mesh key lives under.
pub const MESH_PREFIX: &str = mesh_model::keys::PREFIX;

/// The prefix a cluster's node-syncs may write their health verdicts under: `clustermesh/v1/health/<cluster>/`.
pub fn health_prefix(cluster: &ClusterName) -> String {
    format!("{MESH_PREFIX}health/{cluster}/")
}

/// The prefix a cluster's node-syncs write their summaries under (read by `clustermesh status`):
/// `clustermesh/v1/nodestatus/<cluster>/`.
pub fn nodestatus_prefix(cluster: &ClusterName) -> String {
    format!("{MESH_PREFIX}nodestatus/{cluster}/")
}

// Whether etcd refused a request because its auth store moved under it, and the retry that sends
// it again: the store crate's (every etcd request of the mesh goes through it).
pub use mesh_kv::{is_auth_old_revision, retry_auth_old_revision};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_prefix_is_per_cluster() {
        let c = ClusterName::new("east").unwrap();
        assert_eq!(health_prefix(&c), "clustermesh/v1/health/east/");
    }
}
