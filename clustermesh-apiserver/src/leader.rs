//! Leader election through an etcd lease: the leader key (`clustermesh/v1/leader/<cluster>`) is created under
//! the replica's lease when absent; whoever created it leads until its lease ends. Every write of the leader is
//! a transaction guarded by the key's create revision, so a replica that lost the key can never write again.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::{Backoff, EtcdError};

/// A term as leader. Dropping it stops the keepalive; [`LeaderTerm::resign`] also deletes the key at once so a
/// standby takes over without waiting for the lease to end.
#[derive(Debug)]
pub struct LeaderTerm {
    /// The leader key.
    pub key: String,
    /// Create revision of the leader key in this term (the fencing token).
    pub revision: i64,
    /// Lease holding the key.
    pub lease: i64,
    lost: watch::Receiver<bool>,
    keepalive: JoinHandle<()>,
}

impl Drop for LeaderTerm {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl LeaderTerm {
    /// The comparison every leader write carries.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    /// Resolves when the lease is gone (keepalive refused or failing for longer than the TTL).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Gives up leadership: revokes the lease, which deletes the leader key.
    pub async fn resign(self, client: &mut Client) {
        if let Err(e) = client.lease_revoke(self.lease).await {
            warn!(error = %e, "revoking the leader lease failed; it ends by itself");
        }
    }
}

fn spawn_keepalive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    lost_tx: watch::Sender<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let every = (ttl / 3).max(Duration::from_millis(200));
        let mut last_ok = tokio::time::Instant::now();
        let mut stream = None;
        loop {
            if last_ok.elapsed() >= ttl {
                warn!(
                    lease,
                    "leader lease keepalive failed for longer than its TTL"
                );
                let _ = lost_tx.send(true);
                return;
            }
            if stream.is_none() {
                match client.lease_keep_alive(lease).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => warn!(error = %e, "leader lease keepalive stream"),
                }
            }
            if let Some((keeper, st)) = &mut stream {
                let ok = async {
                    keeper.keep_alive().await?;
                    st.message().await
                };
                match tokio::time::timeout(every, ok).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(Some(_))) => {
                        warn!(lease, "leader lease expired");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => stream = None,
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}

struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Campaigns until this replica holds the leader key. Keeps a standby waiting on a watch of the key (no polling).
pub async fn campaign(
    client: &Client,
    key: &str,
    replica: &str,
    ttl: Duration,
) -> Result<LeaderTerm, EtcdError> {
    let mut c = client.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match try_campaign(&mut c, key, replica, ttl).await {
            Ok(term) => return Ok(term),
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "leader campaign");
                tokio::time::sleep(d).await;
            }
        }
    }
}

async fn try_campaign(
    client: &mut Client,
    key: &str,
    replica: &str,
    ttl: Duration,
) -> Result<LeaderTerm, EtcdError> {
    let secs = ttl.as_secs().max(1) as i64;
    let lease = client
        .lease_grant(secs, None)
        .await
        .map_err(|e| EtcdError::request("lease grant", e))?
        .id();
    let (lost_tx, lost_rx) = watch::channel(false);
    // Aborted if this attempt fails (an error return drops it); handed to the term on success.
    let mut keepalive = AbortOnDrop(Some(spawn_keepalive(client.clone(), lease, ttl, lost_tx)));
    let mut announced = false;
    loop {
        if *lost_rx.borrow() {
            return Err(EtcdError::LostLeadership);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                replica,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = client
            .txn(txn)
            .await
            .map_err(|e| EtcdError::request(format!("campaign {key}"), e))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            info!(key, replica, revision = rev, "became leader");
            let Some(keepalive) = keepalive.0.take() else {
                return Err(EtcdError::LostLeadership);
            };
            return Ok(LeaderTerm {
                key: key.to_owned(),
                revision: rev,
                lease,
                lost: lost_rx,
                keepalive,
            });
        }
        let (holder, holder_rev) = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.create_revision(),
                    )
                }),
                _ => None,
            })
            .unwrap_or_default();
        if holder == replica && holder_rev > 0 {
            // A previous incarnation of this replica (same id, e.g. a restarted container of the same pod)
            // holds the key: it is dead, take over now instead of waiting for its lease to end.
            info!(
                key,
                replica, "taking over the leader key of this replica's previous run"
            );
            client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, holder_rev)])
                        .and_then([TxnOp::delete(key, None)]),
                )
                .await
                .map_err(|e| EtcdError::request(format!("delete stale {key}"), e))?;
            continue;
        }
        if !announced {
            info!(key, leader = %holder, "standing by");
            announced = true;
        }
        // Wait until the key is deleted (or its lease ends), then try again.
        let mut stream = client
            .watch(key, Some(WatchOptions::new().with_start_revision(rev + 1)))
            .await
            .map_err(|e| EtcdError::request(format!("watch {key}"), e))?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
            match msg {
                Ok(Ok(Some(resp))) => {
                    if resp.canceled() {
                        break;
                    }
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        break;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(EtcdError::request(format!("watch {key}"), e)),
                // No event for a while: check again (the watch may have been cut without telling).
                Err(_) => break,
            }
        }
    }
}
