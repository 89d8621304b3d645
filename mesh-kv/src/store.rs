//! The trait: what the mesh needs of a key-value store, and nothing more.

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;

/// A key with its value and the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The store revision of the last write of this key.
    pub mod_revision: i64,
    /// The store revision at which this key was created (the fencing token of a leader key).
    pub create_revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl WatchEvent {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// The keys under a prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing was read at: a watch from `revision + 1` misses nothing.
    pub revision: i64,
}

/// One page of a listing ([`KvStore::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// The store revision the page was read at (the one asked for, when one was).
    pub revision: i64,
    /// Where the next page starts (`None`: this was the last).
    pub next: Option<String>,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Attach the key to this lease (deleted with it).
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
}

/// The condition of a guarded transaction: `key` still exists with this create revision (a
/// leader's election key: the write lands only while the writer still leads). A create revision
/// of 0 means the key is absent (a campaign: create the key only if nobody holds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub key: String,
    pub create_revision: i64,
}

/// The changes of a watch, in order, a batch per store response. The stream ends with an
/// error, never silently: [`KvError::Compacted`] when the revision asked for is gone (relist),
/// anything else when the stream broke (watch again from the last revision seen).
pub type WatchStream = BoxStream<'static, Result<Vec<WatchEvent>, KvError>>;

/// Why a store operation failed. Each names the operation and the key or prefix.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "{what}: revision {revision} is compacted (the store keeps revisions from {compact_revision}); relist"
    )]
    Compacted {
        what: String,
        revision: i64,
        compact_revision: i64,
    },
    #[error("{what}: watch canceled by the server: {reason}")]
    Canceled { what: String, reason: String },
    #[error("{what}: watch stream closed by the server")]
    Closed { what: String },
    /// The store cannot be reached (the in-memory store's simulated outage).
    #[error("{what}: store unavailable: {reason}")]
    Unavailable { what: String, reason: String },
}

impl KvError {
    /// Whether the revision the caller asked for is gone, so only a relist can continue.
    pub fn is_compacted(&self) -> bool {
        matches!(self, KvError::Compacted { .. })
    }
}

/// What the mesh needs of a store: read one key, list prefixes at one revision, watch from a
/// revision, guarded transactions, leases. Cheap to clone (a handle).
pub trait KvStore: Clone + Send + Sync + 'static {
    /// One key, if present.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, KvError>> + Send;

    /// Every key under `prefix`, read at `revision` (`None`: the current one). Listing several
    /// prefixes at the revision the first one returned gives one snapshot of all of them.
    fn list(
        &self,
        prefix: &str,
        revision: Option<i64>,
    ) -> impl Future<Output = Result<Listing, KvError>> + Send;

    /// One page of the keys under `prefix`, from `start` (inclusive; `None`: the first), read at
    /// `revision` (`None`: the current one). A consumer that applies each page before it reads
    /// the next holds one page, not the whole listing (255k endpoints through one KVStoreMesh are
    /// 40 MiB of values). By default the whole listing is one page.
    fn list_page(
        &self,
        prefix: &str,
        start: Option<&str>,
        revision: Option<i64>,
    ) -> impl Future<Output = Result<Page, KvError>> + Send {
        let start = start.map(str::to_owned);
        let listed = self.list(prefix, revision);
        async move {
            let mut l = listed.await?;
            if let Some(s) = start {
                l.kvs.retain(|kv| kv.key >= s);
            }
            Ok(Page {
                kvs: l.kvs,
                revision: l.revision,
                next: None,
            })
        }
    }

    /// The changes under `prefix` from `from_revision` on (inclusive).
    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> impl Future<Output = Result<WatchStream, KvError>> + Send;

    /// Apply `ops` atomically, if `guard` holds (always, without one): `Some(revision)` of the
    /// store after the write, or `None` when the guard failed and nothing was written.
    fn txn(
        &self,
        guard: Option<&Guard>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<Option<i64>, KvError>> + Send;

    /// A lease of `ttl` seconds; keys put with it are deleted when it expires or is revoked.
    fn lease_grant(&self, ttl: i64) -> impl Future<Output = Result<i64, KvError>> + Send;

    /// Renew a lease once; the TTL it has now (0 or less: it is gone).
    fn lease_keep_alive(&self, id: i64) -> impl Future<Output = Result<i64, KvError>> + Send;

    /// Revoke a lease, deleting its keys.
    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), KvError>> + Send;

    /// Put one key (an unguarded transaction of one put).
    fn put(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), KvError>> + Send {
        let op = Op::Put {
            key: key.to_owned(),
            value: value.to_vec(),
            lease: None,
        };
        async move { self.txn(None, vec![op]).await.map(|_| ()) }
    }

    /// Delete one key (an unguarded transaction of one delete).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), KvError>> + Send {
        let op = Op::Delete {
            key: key.to_owned(),
        };
        async move { self.txn(None, vec![op]).await.map(|_| ()) }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("a/b/"), b"a/b0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
