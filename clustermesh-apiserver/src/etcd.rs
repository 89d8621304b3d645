//! Small etcd helpers of the apiserver: plain connects, the files of a Kubernetes TLS secret, paginated
//! prefix listing (for tests and the bench), and its error type.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// etcd errors, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A request failed.
    #[error("etcd {op}: {source}")]
    Request {
        /// What was being done (`list clustermesh/v1/services/c1/`, `txn of 12 ops`, ...).
        op: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// This replica no longer holds the leader key; it must stop writing.
    #[error("leadership lost")]
    LostLeadership,
    /// No member of a multi-member etcd answered.
    #[error("etcd: {0}")]
    Unreachable(String),
    /// A store request failed (it names what and where).
    #[error(transparent)]
    Store(#[from] mesh_kv::KvError),
}

impl EtcdError {
    /// Wraps a client error with what was being done.
    pub fn request(op: impl Into<String>, source: etcd_client::Error) -> Self {
        EtcdError::Request {
            op: op.into(),
            source,
        }
    }
}

/// The client TLS files of a Kubernetes TLS secret mounted as a directory (`ca.crt`, `tls.crt`,
/// `tls.key`). A cluster certificate directory (`clustermesh ca issue-cluster`) gives its own
/// ([`mesh_certs::ClusterDir::tls_files`], see `run`).
pub fn secret_dir_files(dir: &Path) -> mesh_certs::TlsFiles {
    mesh_certs::TlsFiles {
        ca_bundle: dir.join("ca.crt"),
        identity: Some(mesh_certs::CertKeyPaths {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }),
    }
}

/// The connect options of a plain (no TLS) etcd client: timeouts, keepalive. With TLS files,
/// [`mesh_etcd::client_options`].
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
}

/// Connects to a plain (no TLS) etcd; with TLS files, [`mesh_etcd::connect`]. Several endpoints:
/// one member that answers (for clients that reconnect on failure; the apiserver's own long-lived
/// client is [`mesh_etcd::connect_tracked`]).
pub async fn connect(endpoints: &[String]) -> Result<Client, EtcdError> {
    let opts = connect_options();
    if endpoints.len() > 1 {
        // One member that answers, not all: see mesh_etcd::connect_any_member.
        return mesh_etcd::connect_any_member(endpoints, &opts, Duration::from_secs(3))
            .await
            .map_err(|e| EtcdError::Unreachable(e.to_string()));
    }
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| EtcdError::request(format!("connect {}", endpoints.join(",")), e))
}

/// Every key under `prefix` with its value and mod revision, and the revision of the listing (the
/// store's paged list at one revision; for the integration tests and the bench, which hold a client).
pub async fn list_prefix(
    client: &mut Client,
    prefix: &str,
) -> Result<(BTreeMap<String, (Vec<u8>, i64)>, i64), EtcdError> {
    let store = mesh_kv::EtcdStore::new(client.clone(), Duration::from_secs(10));
    let l = mesh_kv::KvStore::list(&store, prefix, None).await?;
    let kvs = l
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect();
    Ok((kvs, l.revision))
}
