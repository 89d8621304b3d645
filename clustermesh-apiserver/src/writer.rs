//! The etcd writer: knows what etcd holds under this cluster's prefixes, plans the puts and deletes that bring it
//! to the desired state (only what differs), and sends them in transactions bounded in operations and bytes,
//! each guarded by the leader's fencing comparison.

use std::collections::{BTreeMap, HashMap};

use etcd_client::{Client, Compare, Txn, TxnOp};
use tracing::debug;

use crate::etcd::{EtcdError, list_prefix};

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
/// means leadership is lost.
pub async fn send_guarded(
    client: &mut Client,
    batch: &[Op],
    guard: &Compare,
) -> Result<i64, EtcdError> {
    let txn_ops: Vec<TxnOp> = batch
        .iter()
        .map(|op| match &op.value {
            Some(v) => TxnOp::put(op.key.as_str(), v.clone(), None),
            None => TxnOp::delete(op.key.as_str(), None),
        })
        .collect();
    let n = txn_ops.len();
    let txn = Txn::new().when([guard.clone()]).and_then(txn_ops);
    // A peer registered by `clustermesh connect` adds an etcd user; a member that has not applied
    // that yet refuses the transaction for a moment: it is sent again rather than ending the term.
    let resp = mesh_certs::etcd::retry_auth_old_revision("txn", || {
        let (mut c, txn) = (client.clone(), txn.clone());
        async move { c.txn(txn).await }
    })
    .await
    .map_err(|e| EtcdError::request(format!("txn of {n} ops"), e))?;
    if !resp.succeeded() {
        return Err(EtcdError::LostLeadership);
    }
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

/// Writes to etcd and remembers what etcd holds under the owned prefixes.
pub struct EtcdWriter {
    client: Client,
    current: HashMap<String, Vec<u8>>,
    /// Last revision at which each key was seen or written (deletes included), to tell stale watch events.
    revs: HashMap<String, i64>,
    /// Revision of the initial listing.
    listed_at: i64,
    /// Operations per transaction.
    pub max_ops: usize,
    /// Bytes per transaction.
    pub max_bytes: usize,
}

impl std::fmt::Debug for EtcdWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWriter")
            .field("keys", &self.current.len())
            .finish()
    }
}

impl EtcdWriter {
    /// Lists what etcd holds under `prefixes` and at `exact` keys; returns the writer and that listing.
    pub async fn load(
        client: Client,
        prefixes: &[String],
        exact: &[String],
    ) -> Result<(Self, BTreeMap<String, Vec<u8>>), EtcdError> {
        let mut c = client.clone();
        let mut all = BTreeMap::new();
        let mut revs = HashMap::new();
        let mut listed_at = i64::MAX;
        for p in prefixes {
            let (kvs, rev) = list_prefix(&mut c, p).await?;
            listed_at = listed_at.min(rev);
            for (k, (v, r)) in kvs {
                revs.insert(k.clone(), r);
                all.insert(k, v);
            }
        }
        for k in exact {
            let resp = c
                .get(k.as_str(), None)
                .await
                .map_err(|e| EtcdError::request(format!("get {k}"), e))?;
            if let Some(h) = resp.header() {
                listed_at = listed_at.min(h.revision());
            }
            if let Some(kv) = resp.kvs().first() {
                revs.insert(k.clone(), kv.mod_revision());
                all.insert(k.clone(), kv.value().to_vec());
            }
        }
        if listed_at == i64::MAX {
            listed_at = 0;
        }
        let current = all.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok((
            Self {
                client,
                current,
                revs,
                listed_at,
                max_ops: MAX_TXN_OPS,
                max_bytes: MAX_TXN_BYTES,
            },
            all,
        ))
    }

    /// What etcd holds, as far as this writer knows.
    pub fn current(&self) -> &HashMap<String, Vec<u8>> {
        &self.current
    }

    /// Revision of the initial listing (a watch from the next revision misses nothing).
    pub fn listed_at(&self) -> i64 {
        self.listed_at
    }

    /// Records a change someone else made (seen on a watch at `revision`; `None` = deleted). Returns whether it
    /// is news: events of our own writes, or older than what we know, are not.
    pub fn observe(&mut self, key: &str, value: Option<&[u8]>, revision: i64) -> bool {
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
    pub async fn write(&mut self, ops: Vec<Op>, guard: &Compare) -> Result<WriteStats, EtcdError> {
        let mut stats = WriteStats::default();
        for batch in batches(ops, self.max_ops, self.max_bytes) {
            let rev = send_guarded(&mut self.client, &batch, guard).await?;
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
        guard: &Compare,
    ) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when([guard.clone()])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = mesh_certs::etcd::retry_auth_old_revision("put", || {
            let (mut c, txn) = (self.client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await
        .map_err(|e| EtcdError::request(format!("put {key}"), e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(EtcdError::LostLeadership)
        }
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
