//! Writes this node's health verdicts (`health/<cluster>/<node>`) and status summary
//! (`nodestatus/<cluster>/<node>`) into the local etcd, bound to a lease, so a node that dies takes
//! its verdicts with it. Reconnects with backoff and republishes the latest values.

use std::time::Duration;

use mesh_kv::{EtcdStore, KvError, KvStore, Op};
use mesh_model::ClusterName;
use mesh_model::keys::MeshKey;
use mesh_model::values::{HealthReport, MeshValue, NodeStatus};
use tokio::sync::mpsc;

use crate::cluster::ClusterSource;
use crate::connect::{ConnectError, connect};
use mesh_kv::backoff_delay;

/// Lease TTL of the published keys.
pub const LEASE_TTL_SECS: i64 = 10;

/// How long one request to the local etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why publishing stopped (it reconnects with backoff).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Store(#[from] KvError),
    #[error("lease {0:x} of the published keys expired")]
    LeaseExpired(i64),
}

/// Something to publish.
#[derive(Debug, Clone)]
pub enum Publish {
    /// New health verdicts of this node.
    Health(HealthReport),
    /// New status summary of this node.
    Status(NodeStatus),
}

/// Run the publisher until every sender is dropped.
pub async fn run_publisher(
    local: ClusterSource,
    cluster: ClusterName,
    node: String,
    mut rx: mpsc::UnboundedReceiver<Publish>,
) {
    let health_key = MeshKey::Health {
        cluster: cluster.clone(),
        node: node.clone(),
    }
    .to_string();
    let status_key = MeshKey::NodeStatus {
        cluster: cluster.clone(),
        node: node.clone(),
    }
    .to_string();
    let mut last_health: Option<Vec<u8>> = None;
    let mut last_status: Option<Vec<u8>> = None;
    let mut attempt = 0u32;
    let mut status_refused = false;
    loop {
        let err: Result<(), PublishError> = async {
            let client = connect(&local, REQUEST_TIMEOUT).await?;
            let store = EtcdStore::new(client, REQUEST_TIMEOUT);
            let lease = store.lease_grant(LEASE_TTL_SECS).await?;
            let put = |key: &str, value: &[u8]| {
                let op = Op::Put {
                    key: key.to_owned(),
                    value: value.to_vec(),
                    lease: Some(lease),
                };
                // A user change on another member (a peer connecting) refuses the put for a
                // moment: the store sends it again, the lease stays.
                store.txn(None, vec![op])
            };
            if let Some(v) = &last_health {
                put(&health_key, v).await?;
            }
            if let Some(v) = &last_status {
                let _ = put(&status_key, v).await;
            }
            attempt = 0;
            let mut keepalive =
                tokio::time::interval(Duration::from_secs((LEASE_TTL_SECS / 3).max(1) as u64));
            loop {
                tokio::select! {
                    msg = rx.recv() => {
                        let Some(msg) = msg else { return Ok(()) };
                        match msg {
                            Publish::Health(h) => {
                                let v = MeshValue::Health(h).encode();
                                last_health = Some(v.clone());
                                put(&health_key, &v).await?;
                            }
                            Publish::Status(s) => {
                                // The summary is best effort: a refusal (e.g. RBAC) must not
                                // hold up health verdicts.
                                let v = MeshValue::NodeStatus(s).encode();
                                last_status = Some(v.clone());
                                if let Err(e) = put(&status_key, &v).await {
                                    if !status_refused {
                                        tracing::warn!(key = %status_key, error = %e, "writing the node summary failed");
                                    }
                                    status_refused = true;
                                } else {
                                    status_refused = false;
                                }
                            }
                        }
                    }
                    _ = keepalive.tick() => {
                        if store.lease_keep_alive(lease).await? <= 0 {
                            return Err(PublishError::LeaseExpired(lease));
                        }
                    }
                }
            }
        }
        .await;
        match err {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "publishing to the local etcd failed; retrying");
                attempt += 1;
                let d = backoff_delay(
                    attempt,
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                    rand::random::<f64>(),
                );
                tokio::time::sleep(d).await;
            }
        }
    }
}
