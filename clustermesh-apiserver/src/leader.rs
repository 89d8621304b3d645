//! Leader election through an etcd lease: the leader key (`clustermesh/v1/leader/<cluster>`) is created under
//! the replica's lease when absent; whoever created it leads until its lease ends. Every write of the leader is
//! a transaction guarded by the key's create revision, so a replica that lost the key can never write again.

use std::time::Duration;

use futures::StreamExt;
use mesh_kv::{Backoff, Guard, KvStore, Op, WatchEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::EtcdError;

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
    /// The condition every leader write carries.
    pub fn guard(&self) -> Guard {
        Guard {
            key: self.key.clone(),
            create_revision: self.revision,
        }
    }

    /// Resolves when the lease is gone (keepalive refused or failing for longer than the TTL).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Gives up leadership: revokes the lease, which deletes the leader key.
    pub async fn resign<S: KvStore>(self, store: &S) {
        if let Err(e) = store.lease_revoke(self.lease).await {
            warn!(error = %e, "revoking the leader lease failed; it ends by itself");
        }
    }
}

fn spawn_keepalive<S: KvStore>(
    store: S,
    lease: i64,
    ttl: Duration,
    lost_tx: watch::Sender<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let every = (ttl / 3).max(Duration::from_millis(200));
        let mut last_ok = tokio::time::Instant::now();
        loop {
            if last_ok.elapsed() >= ttl {
                warn!(
                    lease,
                    "leader lease keepalive failed for longer than its TTL"
                );
                let _ = lost_tx.send(true);
                return;
            }
            match tokio::time::timeout(every, store.lease_keep_alive(lease)).await {
                Ok(Ok(left)) if left > 0 => last_ok = tokio::time::Instant::now(),
                Ok(Ok(_)) => {
                    warn!(lease, "leader lease expired");
                    let _ = lost_tx.send(true);
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "leader lease keepalive"),
                Err(_) => warn!(lease, after = ?every, "leader lease keepalive: no answer"),
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
pub async fn campaign<S: KvStore>(
    store: &S,
    key: &str,
    replica: &str,
    ttl: Duration,
) -> Result<LeaderTerm, EtcdError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match try_campaign(store, key, replica, ttl).await {
            Ok(term) => return Ok(term),
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "leader campaign");
                tokio::time::sleep(d).await;
            }
        }
    }
}

async fn try_campaign<S: KvStore>(
    store: &S,
    key: &str,
    replica: &str,
    ttl: Duration,
) -> Result<LeaderTerm, EtcdError> {
    let secs = ttl.as_secs().max(1) as i64;
    let lease = store.lease_grant(secs).await?;
    let (lost_tx, lost_rx) = watch::channel(false);
    // Aborted if this attempt fails (an error return drops it); handed to the term on success.
    let mut keepalive = AbortOnDrop(Some(spawn_keepalive(store.clone(), lease, ttl, lost_tx)));
    let mut announced = false;
    let absent = Guard {
        key: key.to_owned(),
        create_revision: 0,
    };
    loop {
        if *lost_rx.borrow() {
            return Err(EtcdError::LostLeadership);
        }
        let put = Op::Put {
            key: key.to_owned(),
            value: replica.as_bytes().to_vec(),
            lease: Some(lease),
        };
        if let Some(rev) = store.txn(Some(&absent), vec![put]).await? {
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
        // Someone holds it: who, and the revision to watch from.
        let listing = store.list(key, None).await?;
        let Some(holder) = listing.kvs.into_iter().find(|kv| kv.key == key) else {
            continue; // gone meanwhile: try again
        };
        if holder.value == replica.as_bytes() {
            // A previous incarnation of this replica (same id, e.g. a restarted container of the same pod)
            // holds the key: it is dead, take over now instead of waiting for its lease to end.
            info!(
                key,
                replica, "taking over the leader key of this replica's previous run"
            );
            let stale = Guard {
                key: key.to_owned(),
                create_revision: holder.create_revision,
            };
            let delete = Op::Delete {
                key: key.to_owned(),
            };
            store.txn(Some(&stale), vec![delete]).await?;
            continue;
        }
        if !announced {
            info!(key, leader = %String::from_utf8_lossy(&holder.value), "standing by");
            announced = true;
        }
        // Wait until the key is deleted (or its lease ends), then try again. The watch is of a
        // prefix: `leader/c1` also sees `leader/c10`.
        let mut stream = store.watch(key, listing.revision + 1).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(Ok(evs))) => {
                    if evs
                        .iter()
                        .any(|e| matches!(e, WatchEvent::Delete { key: k, .. } if k == key))
                    {
                        break;
                    }
                }
                // The stream broke or ended: campaign again (it reopens the watch).
                Ok(Some(Err(_)) | None) => break,
                // No event for a while: check again (the watch may have been cut without telling).
                Err(_) => break,
            }
        }
    }
}
