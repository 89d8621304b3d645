//! Writes this node's health verdicts (`health/<cluster>/<node>`) and status summary
//! (`nodestatus/<cluster>/<node>`) into the local etcd, bound to a lease, so a node that dies takes
//! its verdicts with it. Reconnects with backoff and republishes the latest values.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use mesh_model::ClusterName;
use mesh_model::keys::MeshKey;
use mesh_model::values::{HealthReport, MeshValue, NodeStatus};
use tokio::sync::mpsc;

use crate::cluster::ClusterSource;
use crate::connect::connect;
use mesh_kv::backoff_delay;

/// Lease TTL of the published keys.
pub const LEASE_TTL_SECS: i64 = 10;

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
        let err = async {
            let mut client: Client = connect(&local, Duration::from_secs(5)).await?;
            let lease = client
                .lease_grant(LEASE_TTL_SECS, None)
                .await
                .map_err(|e| format!("granting a lease in the local etcd: {e}"))?
                .id();
            let (mut keeper, mut responses) = client
                .lease_keep_alive(lease)
                .await
                .map_err(|e| format!("keeping lease {lease} alive: {e}"))?;
            let opts = || Some(PutOptions::new().with_lease(lease));
            if let Some(v) = &last_health {
                client
                    .put(health_key.as_str(), v.clone(), opts())
                    .await
                    .map_err(|e| format!("etcd put {health_key}: {e}"))?;
            }
            if let Some(v) = &last_status {
                let _ = client.put(status_key.as_str(), v.clone(), opts()).await;
            }
            attempt = 0;
            let mut keepalive =
                tokio::time::interval(Duration::from_secs((LEASE_TTL_SECS / 3).max(1) as u64));
            loop {
                tokio::select! {
                    msg = rx.recv() => {
                        let Some(msg) = msg else { return Ok::<(), String>(()) };
                        match msg {
                            Publish::Health(h) => {
                                let v = MeshValue::Health(h).encode();
                                last_health = Some(v.clone());
                                // A user change on another member (a peer connecting) refuses
                                // the put for a moment: send it again, keep the lease.
                                mesh_etcd::retry_auth_old_revision("health put", || {
                                    let (mut c, v) = (client.clone(), v.clone());
                                    let key = health_key.clone();
                                    async move { c.put(key, v, opts()).await }
                                })
                                .await
                                .map_err(|e| format!("etcd put {health_key}: {e}"))?;
                            }
                            Publish::Status(s) => {
                                // The summary is best effort: a refusal (e.g. RBAC) must not
                                // hold up health verdicts.
                                let v = MeshValue::NodeStatus(s).encode();
                                last_status = Some(v.clone());
                                if let Err(e) = client.put(status_key.as_str(), v, opts()).await {
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
                        keeper.keep_alive().await.map_err(|e| format!("lease keep-alive: {e}"))?;
                    }
                    r = responses.message() => {
                        match r {
                            Ok(Some(r)) if r.ttl() > 0 => {}
                            Ok(Some(_)) => return Err("lease expired".to_string()),
                            Ok(None) => return Err("lease keep-alive stream closed".to_string()),
                            Err(e) => return Err(format!("lease keep-alive stream: {e}")),
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
