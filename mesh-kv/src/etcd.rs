//! [`KvStore`] on a real etcd (etcd-client): paged lists at one revision, watches that end with
//! a named error (compaction included), transactions guarded by a create revision, leases. Every
//! request is bounded by the store's request timeout.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::store::{
    Guard, KeyValue, KvError, KvStore, Listing, Op, Page, WatchEvent, WatchStream, prefix_end,
};

/// Keys per page of a list.
const PAGE: i64 = 1000;

/// An etcd client as a [`KvStore`].
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
}

impl EtcdStore {
    /// Wrap a connected client; every request waits at most `timeout`.
    pub fn new(client: Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    /// The client, for what the trait does not cover (member and user administration).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn bounded<T>(
        &self,
        what: impl Fn() -> String,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(KvError::Timeout {
                what: what(),
                after: self.timeout,
            }),
            Ok(Err(source)) => Err(classify(what(), source)),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

/// A request for a compacted revision is its own error: the caller must relist.
fn classify(what: String, source: etcd_client::Error) -> KvError {
    let text = source.to_string();
    if text.contains("required revision has been compacted") {
        return KvError::Compacted {
            what,
            revision: 0,
            compact_revision: 0,
        };
    }
    KvError::Etcd { what, source }
}

fn kv_of(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
    }
}

/// Whether etcd refused a request because its auth store moved under it ("revision of auth store
/// is old"): a member that has not yet applied a user or role change refuses for a moment.
pub fn is_auth_old_revision(e: &etcd_client::Error) -> bool {
    e.to_string().contains("revision of auth store is old")
}

/// Runs `op` again while etcd answers "revision of auth store is old" (for at most 2 s, backing off
/// from 10 ms to 250 ms): a peer registered by `clustermesh connect` adds an etcd user, and a
/// member that has not applied it yet refuses requests for a moment. Any other answer is returned.
pub async fn retry_auth_old_revision<T, F, Fut>(
    what: &str,
    mut op: F,
) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    loop {
        match op().await {
            Err(e) if is_auth_old_revision(&e) && waited < Duration::from_secs(2) => {
                tracing::debug!(
                    request = what,
                    "etcd's auth store moved under the request; sending it again"
                );
                tokio::time::sleep(delay).await;
                waited += delay;
                delay = (delay * 2).min(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

impl KvStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(|| format!("reading {key}"), c.get(key, None))
            .await?;
        Ok(resp.kvs().first().map(kv_of))
    }

    async fn list(&self, prefix: &str, revision: Option<i64>) -> Result<Listing, KvError> {
        let mut out = Listing {
            kvs: Vec::new(),
            revision: revision.unwrap_or(0),
        };
        let mut start: Option<String> = None;
        loop {
            let rev = (out.revision > 0).then_some(out.revision);
            let page = self.list_page(prefix, start.as_deref(), rev).await?;
            out.revision = page.revision;
            out.kvs.extend(page.kvs);
            match page.next {
                Some(next) => start = Some(next),
                None => break,
            }
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start: Option<&str>,
        revision: Option<i64>,
    ) -> Result<Page, KvError> {
        let end = prefix_end(prefix);
        let mut opts = GetOptions::new().with_range(end).with_limit(PAGE);
        if let Some(r) = revision.filter(|r| *r > 0) {
            opts = opts.with_revision(r);
        }
        let from = start.unwrap_or(prefix).to_owned();
        let mut c = self.client.clone();
        let resp = self
            .bounded(|| format!("listing {prefix}"), c.get(from, Some(opts)))
            .await
            .map_err(|e| match e {
                KvError::Compacted { what, .. } => KvError::Compacted {
                    what,
                    revision: revision.unwrap_or(0),
                    compact_revision: 0,
                },
                e => e,
            })?;
        let revision = match revision.filter(|r| *r > 0) {
            Some(r) => r,
            None => resp.header().map(|h| h.revision()).unwrap_or(0),
        };
        let next = match resp.kvs().last() {
            Some(last) if resp.more() => {
                let mut k = String::from_utf8_lossy(last.key()).into_owned();
                k.push('\0');
                Some(k)
            }
            _ => None,
        };
        Ok(Page {
            kvs: resp.kvs().iter().map(kv_of).collect(),
            revision,
            next,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, KvError> {
        let mut c = self.client.clone();
        let what = format!("watching {prefix}");
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let stream = self
            .bounded(|| what.clone(), c.watch(prefix, Some(opts)))
            .await?;
        // The watcher handle keeps the watch open; it lives as long as the stream.
        let stream =
            futures::stream::unfold(Some((stream, what, from_revision)), |state| async move {
                let (mut s, what, from) = state?;
                let item = match s.message().await {
                    Err(source) => Err(KvError::Etcd {
                        what: what.clone(),
                        source,
                    }),
                    Ok(None) => Err(KvError::Closed { what: what.clone() }),
                    Ok(Some(m)) if m.canceled() && m.compact_revision() > 0 => {
                        Err(KvError::Compacted {
                            what: what.clone(),
                            revision: from,
                            compact_revision: m.compact_revision(),
                        })
                    }
                    Ok(Some(m)) if m.canceled() => Err(KvError::Canceled {
                        what: what.clone(),
                        reason: m.cancel_reason().to_owned(),
                    }),
                    Ok(Some(m)) => Ok(m
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            Some(match ev.event_type() {
                                EventType::Put => WatchEvent::Put(kv_of(kv)),
                                EventType::Delete => WatchEvent::Delete {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    mod_revision: kv.mod_revision(),
                                },
                            })
                        })
                        .collect::<Vec<_>>()),
                };
                // An error ends the stream after it is yielded.
                let next = item.is_ok().then_some((s, what, from));
                Some((item, next))
            });
        Ok(stream.boxed())
    }

    async fn txn(&self, guard: Option<&Guard>, ops: Vec<Op>) -> Result<Option<i64>, KvError> {
        let what = || {
            let first = ops.first().map(|o| match o {
                Op::Put { key, .. } | Op::Delete { key } => key.as_str(),
            });
            format!(
                "writing {} key(s){}",
                ops.len(),
                first.map(|k| format!(" from {k}")).unwrap_or_default()
            )
        };
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|o| match o {
                Op::Put { key, value, lease } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let mut txn = Txn::new();
        if let Some(g) = guard {
            txn = txn.when([Compare::create_revision(
                g.key.as_str(),
                CompareOp::Equal,
                g.create_revision,
            )]);
        }
        let txn = txn.and_then(txn_ops);
        // A member that has not applied a user change yet refuses for a moment: send it again.
        let resp = self
            .bounded(
                what,
                retry_auth_old_revision("txn", || {
                    let (mut c, txn) = (self.client.clone(), txn.clone());
                    async move { c.txn(txn).await }
                }),
            )
            .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    async fn lease_grant(&self, ttl: i64) -> Result<i64, KvError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(
                || format!("granting a lease of {ttl} s"),
                c.lease_grant(ttl, None),
            )
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        let what = || format!("renewing lease {id:x}");
        let mut c = self.client.clone();
        let (mut keeper, mut stream) = self.bounded(what, c.lease_keep_alive(id)).await?;
        self.bounded(what, keeper.keep_alive()).await?;
        match self.bounded(what, stream.message()).await? {
            Some(r) => Ok(r.ttl()),
            None => Err(KvError::Closed { what: what() }),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        let mut c = self.client.clone();
        self.bounded(|| format!("revoking lease {id:x}"), c.lease_revoke(id))
            .await?;
        Ok(())
    }
}
