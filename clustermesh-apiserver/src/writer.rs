//! The store writer: knows what the store (etcd) holds under this cluster's prefixes, plans the puts and deletes
//! that bring it to the desired state (only what differs), and sends them in transactions bounded in operations
//! and bytes, each guarded by the leader's fencing comparison.

use std::collections::{BTreeMap, HashMap, HashSet};

use mesh_kv::{Event, Guard, KvStore, Op as KvOp, Watcher};
use tracing::debug;

use crate::etcd::EtcdError;

/// etcd 3.4's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Bytes of keys and values per transaction (etcd's default request limit is 1.5 MiB).
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// One change: a put (`Some`) or a delete (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

impl Op {
    /// The store's form of this change.
    pub fn to_kv(&self) -> KvOp {
        match &self.value {
            Some(v) => KvOp::Put {
                key: self.key.clone(),
                value: v.clone(),
                lease: None,
            },
            None => KvOp::Delete {
                key: self.key.clone(),
            },
        }
    }

    fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len) + 16
    }
}

/// The operations that bring `current` to `desired` for `keys` (keys neither side has are skipped; deletes only
/// when `allow_delete`).
pub fn plan<'a>(
    keys: impl IntoIterator<Item = &'a String>,
    desired: &BTreeMap<String, Vec<u8>>,
    current: &HashMap<String, Vec<u8>>,
    allow_delete: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for k in keys {
        match (desired.get(k), current.get(k)) {
            (Some(d), Some(c)) if d == c => {}
            (Some(d), _) => ops.push(Op {
                key: k.clone(),
                value: Some(d.clone()),
            }),
            (None, Some(_)) if allow_delete => ops.push(Op {
                key: k.clone(),
                value: None,
            }),
            _ => {}
        }
    }
    ops
}

/// Splits operations into transactions of at most `max_ops` operations and about `max_bytes` bytes.
pub fn batches(ops: Vec<Op>, max_ops: usize, max_bytes: usize) -> Vec<Vec<Op>> {
    let mut out: Vec<Vec<Op>> = Vec::new();
    let mut cur: Vec<Op> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let s = op.size();
        if !cur.is_empty() && (cur.len() >= max_ops || bytes + s > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += s;
        cur.push(op);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Counts of one write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Keys put.
    pub puts: u64,
    /// Keys deleted.
    pub deletes: u64,
    /// Transactions sent.
    pub txns: u64,
}

/// Sends `batch` as one transaction guarded by `guard`; returns its revision. A failed guard
/// means leadership is lost. (The store sends it again while etcd's auth store moves under it:
/// a peer registered by `clustermesh connect` adds an etcd user.)
pub async fn send_guarded<S: KvStore>(
    store: &S,
    batch: &[Op],
    guard: &Guard,
) -> Result<i64, EtcdError> {
    let ops = batch.iter().map(Op::to_kv).collect();
    store
        .txn(Some(guard), ops)
        .await?
        .ok_or(EtcdError::LostLeadership)
}

/// Writes to the store and remembers what it holds under the owned prefixes and keys: it learns
/// that from a [`Watcher`] of them (the listing, then every change), so it tells its own writes
/// from someone else's by revision.
pub struct StoreWriter<S> {
    store: S,
    prefixes: Vec<String>,
    exact: Vec<String>,
    current: HashMap<String, Vec<u8>>,
    /// Last revision at which each key was seen or written (deletes included), to tell stale watch events.
    revs: HashMap<String, i64>,
    /// Keys seen by a relist in progress (a compaction made the watcher list again).
    relisting: Option<HashSet<String>>,
    /// Operations per transaction.
    pub max_ops: usize,
    /// Bytes per transaction.
    pub max_bytes: usize,
}

impl<S> std::fmt::Debug for StoreWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("keys", &self.current.len())
            .finish()
    }
}

impl<S: KvStore> StoreWriter<S> {
    /// Lists what the store holds under `prefixes` and at `exact` keys (one snapshot); returns the
    /// writer, that listing, and the watcher of those keys positioned after the listing (feed its
    /// events to [`StoreWriter::on_event`]).
    pub async fn load(
        store: S,
        prefixes: &[String],
        exact: &[String],
    ) -> Result<(Self, BTreeMap<String, Vec<u8>>, Watcher<S>), EtcdError> {
        let mut watched = prefixes.to_vec();
        watched.extend(exact.iter().cloned());
        let mut watcher = Watcher::multi(store.clone(), watched);
        let mut w = Self {
            store,
            prefixes: prefixes.to_vec(),
            exact: exact.to_vec(),
            current: HashMap::new(),
            revs: HashMap::new(),
            relisting: None,
            max_ops: MAX_TXN_OPS,
            max_bytes: MAX_TXN_BYTES,
        };
        loop {
            let ev = watcher.next().await?;
            let done = matches!(ev, Event::InitDone { .. });
            w.on_event(ev);
            if done {
                break;
            }
        }
        let all = w
            .current
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok((w, all, watcher))
    }

    /// Whether `key` is one this writer owns (under a prefix, or one of the exact keys; a watch of
    /// `cluster-config/c1` also sees `cluster-config/c10`).
    pub fn owns(&self, key: &str) -> bool {
        self.exact.iter().any(|k| k == key) || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// What the store holds, as far as this writer knows.
    pub fn current(&self) -> &HashMap<String, Vec<u8>> {
        &self.current
    }

    /// Takes one event of the watcher of the owned keys. Returns the changes that are news
    /// (made by someone else, not older than what we know): `(key, deleted)`. A relist (after a
    /// compaction) reports what changed and what vanished while the watch was down.
    pub fn on_event(&mut self, ev: Event) -> Vec<(String, bool)> {
        let mut news = Vec::new();
        match ev {
            Event::Init { .. } => self.relisting = Some(HashSet::new()),
            Event::InitApply(kv) | Event::Apply(kv) => {
                if !self.owns(&kv.key) {
                    return news;
                }
                if let Some(seen) = &mut self.relisting {
                    seen.insert(kv.key.clone());
                }
                if self.observe(&kv.key, Some(&kv.value), kv.mod_revision) {
                    news.push((kv.key, false));
                }
            }
            Event::InitDone { revision } => {
                let seen = self.relisting.take().unwrap_or_default();
                let vanished: Vec<String> = self
                    .current
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in vanished {
                    if self.observe(&k, None, revision) {
                        news.push((k, true));
                    }
                }
            }
            Event::Delete { key, mod_revision } => {
                if self.owns(&key) && self.observe(&key, None, mod_revision) {
                    news.push((key, true));
                }
            }
        }
        news
    }

    /// Records a change someone else made (seen on a watch at `revision`; `None` = deleted). Returns whether it
    /// is news: events of our own writes, or older than what we know, are not.
    fn observe(&mut self, key: &str, value: Option<&[u8]>, revision: i64) -> bool {
        if let Some(&r) = self.revs.get(key)
            && r >= revision
        {
            // The watch has reached our own delete: nothing older can follow, so the deleted
            // key's revision need not be kept (churned keys would otherwise pile up).
            if value.is_none() && r == revision && !self.current.contains_key(key) {
                self.revs.remove(key);
            }
            return false;
        }
        self.revs.insert(key.to_owned(), revision);
        let same = self.current.get(key).map(Vec::as_slice) == value;
        match value {
            Some(v) => {
                self.current.insert(key.to_owned(), v.to_vec());
            }
            None => {
                self.current.remove(key);
            }
        }
        !same
    }

    /// Sends `ops` in guarded transactions. On success of each transaction its keys are recorded as written; a
    /// failed guard means leadership is lost.
    pub async fn write(&mut self, ops: Vec<Op>, guard: &Guard) -> Result<WriteStats, EtcdError> {
        let mut stats = WriteStats::default();
        for batch in batches(ops, self.max_ops, self.max_bytes) {
            let rev = send_guarded(&self.store, &batch, guard).await?;
            stats.txns += 1;
            for op in batch {
                self.revs.insert(op.key.clone(), rev);
                debug!(key = %op.key, put = op.value.is_some(), "written");
                match op.value {
                    Some(v) => {
                        stats.puts += 1;
                        self.current.insert(op.key, v);
                    }
                    None => {
                        stats.deletes += 1;
                        self.current.remove(&op.key);
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Puts one key outside the tracked state (heartbeat), guarded.
    pub async fn put_untracked(
        &mut self,
        key: &str,
        value: Vec<u8>,
        guard: &Guard,
    ) -> Result<(), EtcdError> {
        let op = Op {
            key: key.to_owned(),
            value: Some(value),
        };
        send_guarded(&self.store, &[op], guard).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn plan_puts_what_differs_and_deletes_only_when_allowed() {
        let desired = m(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let current: HashMap<String, Vec<u8>> = m(&[("a", "1"), ("b", "x"), ("d", "4")])
            .into_iter()
            .collect();
        let keys: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let ops = plan(&keys, &desired, &current, false);
        assert_eq!(
            ops.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        let ops = plan(&keys, &desired, &current, true);
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[2].value, None);
    }

    #[test]
    fn batches_respect_op_and_byte_limits() {
        let ops: Vec<Op> = (0..300)
            .map(|i| Op {
                key: format!("k{i}"),
                value: Some(vec![0; 100]),
            })
            .collect();
        let b = batches(ops.clone(), 128, usize::MAX);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [128, 128, 44]);
        let b = batches(ops, 128, 1200);
        assert!(b.iter().all(|x| x.len() <= 10));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 300);
    }
}
