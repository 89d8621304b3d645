//! [`KvStore`] in memory, with etcd's revision semantics: one revision per transaction, lists at
//! a past revision, watches from a past revision replayed from history, compaction that makes
//! older revisions unreadable, leases, and two faults a test can cause: a broken watch stream
//! and an outage. For unit tests of everything that reads the store; the real-etcd tests stay.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::store::{Guard, KeyValue, KvError, KvStore, Listing, Op, WatchEvent, WatchStream};

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    create_revision: i64,
    lease: Option<i64>,
}

type Sink = mpsc::UnboundedSender<Result<Vec<WatchEvent>, KvError>>;

#[derive(Default)]
struct Inner {
    revision: i64,
    /// Revisions below this one are gone.
    compacted: i64,
    data: BTreeMap<String, Entry>,
    /// Every change, in order, with its revision (for lists and watches in the past).
    history: Vec<WatchEvent>,
    watchers: Vec<(String, Sink)>,
    leases: HashMap<i64, i64>,
    next_lease: i64,
    outage: Option<String>,
}

/// An in-memory store; clones share it.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemStore {
    /// An empty store at revision 0; every transaction that changes something takes the next
    /// revision.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Forget every revision before `revision`, as etcd's compaction does: lists at and
    /// watches from an older revision fail with [`KvError::Compacted`].
    pub fn compact(&self, revision: i64) {
        let mut g = self.lock();
        g.compacted = revision.min(g.revision);
        let keep = g.compacted;
        g.history.retain(|e| e.revision() >= keep);
    }

    /// Break every open watch stream (each yields an error and ends), as a lost connection does.
    pub fn break_watches(&self) {
        let mut g = self.lock();
        for (prefix, sink) in g.watchers.drain(..) {
            let _ = sink.send(Err(KvError::Unavailable {
                what: format!("watching {prefix}"),
                reason: "connection lost".into(),
            }));
        }
    }

    /// Make every request fail with [`KvError::Unavailable`] (`Some(reason)`) or work again.
    pub fn set_outage(&self, reason: Option<&str>) {
        let mut g = self.lock();
        g.outage = reason.map(str::to_owned);
        if reason.is_some() {
            drop(g);
            self.break_watches();
        }
    }

    /// Waits, on the store's own watch (no polling), until the keys under `prefix` satisfy `done`,
    /// and returns them. Panics after 5 s naming the keys it saw: for tests.
    pub async fn until(
        &self,
        prefix: &str,
        done: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool,
    ) -> BTreeMap<String, Vec<u8>> {
        let mut w = crate::Watcher::new(self.clone(), prefix);
        let mut keys = BTreeMap::new();
        let mut listed = false;
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match w.next().await.expect("the in-memory store's watch") {
                    crate::Event::Init { .. } => keys.clear(),
                    crate::Event::InitApply(kv) | crate::Event::Apply(kv) => {
                        keys.insert(kv.key, kv.value);
                    }
                    crate::Event::Delete { key, .. } => {
                        keys.remove(&key);
                    }
                    crate::Event::InitDone { .. } => listed = true,
                }
                if listed && done(&keys) {
                    return;
                }
            }
        })
        .await;
        assert!(r.is_ok(), "timed out; {prefix} holds {:?}", keys.keys());
        keys
    }

    /// Expire a lease now: its keys are deleted.
    pub fn expire_lease(&self, id: i64) {
        let mut g = self.lock();
        g.leases.remove(&id);
        let keys: Vec<Op> = g
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| Op::Delete { key: k.clone() })
            .collect();
        apply(&mut g, keys);
    }
}

fn check(g: &Inner, what: impl FnOnce() -> String) -> Result<(), KvError> {
    match &g.outage {
        Some(reason) => Err(KvError::Unavailable {
            what: what(),
            reason: reason.clone(),
        }),
        None => Ok(()),
    }
}

/// Apply `ops` at one new revision and tell the watchers. No revision for no change.
fn apply(g: &mut Inner, ops: Vec<Op>) {
    let rev = g.revision + 1;
    let mut events = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let create_revision = g.data.get(&key).map_or(rev, |e| e.create_revision);
                g.data.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        mod_revision: rev,
                        create_revision,
                        lease,
                    },
                );
                events.push(WatchEvent::Put(KeyValue {
                    key,
                    value,
                    mod_revision: rev,
                    create_revision,
                }));
            }
            Op::Delete { key } => {
                if g.data.remove(&key).is_some() {
                    events.push(WatchEvent::Delete {
                        key,
                        mod_revision: rev,
                    });
                }
            }
        }
    }
    if events.is_empty() {
        return;
    }
    g.revision = rev;
    g.history.extend(events.iter().cloned());
    g.watchers.retain(|(prefix, sink)| {
        let mine: Vec<WatchEvent> = events
            .iter()
            .filter(|e| e.key().starts_with(prefix.as_str()))
            .cloned()
            .collect();
        mine.is_empty() || sink.send(Ok(mine)).is_ok()
    });
}

impl KvStore for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let g = self.lock();
        check(&g, || format!("reading {key}"))?;
        Ok(g.data.get(key).map(|e| KeyValue {
            key: key.to_owned(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
            create_revision: e.create_revision,
        }))
    }

    async fn list(&self, prefix: &str, revision: Option<i64>) -> Result<Listing, KvError> {
        let g = self.lock();
        check(&g, || format!("listing {prefix}"))?;
        let at = revision.unwrap_or(g.revision);
        if at < g.compacted {
            return Err(KvError::Compacted {
                what: format!("listing {prefix}"),
                revision: at,
                compact_revision: g.compacted,
            });
        }
        // The current state, or, in the past, every key's last change at or before `at`.
        let mut state: BTreeMap<String, KeyValue> = g
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| {
                let kv = KeyValue {
                    key: k.clone(),
                    value: e.value.clone(),
                    mod_revision: e.mod_revision,
                    create_revision: e.create_revision,
                };
                (k.clone(), kv)
            })
            .collect();
        if at < g.revision {
            state.clear();
            for e in g.history.iter().filter(|e| e.revision() <= at) {
                if !e.key().starts_with(prefix) {
                    continue;
                }
                match e {
                    WatchEvent::Put(kv) => {
                        state.insert(kv.key.clone(), kv.clone());
                    }
                    WatchEvent::Delete { key, .. } => {
                        state.remove(key);
                    }
                }
            }
        }
        Ok(Listing {
            kvs: state.into_values().collect(),
            revision: at,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, KvError> {
        let mut g = self.lock();
        let what = format!("watching {prefix}");
        check(&g, || what.clone())?;
        if from_revision < g.compacted {
            return Err(KvError::Compacted {
                what,
                revision: from_revision,
                compact_revision: g.compacted,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let past: Vec<WatchEvent> = g
            .history
            .iter()
            .filter(|e| e.revision() >= from_revision && e.key().starts_with(prefix))
            .cloned()
            .collect();
        if !past.is_empty() {
            let _ = tx.send(Ok(past));
        }
        g.watchers.push((prefix.to_owned(), tx));
        let closed = what.clone();
        // After an error the stream ends; a dropped sender (store gone) is a close.
        let stream = futures::stream::unfold(Some(rx), move |rx| {
            let closed = closed.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Some(Ok(evs)) => Some((Ok(evs), Some(rx))),
                    Some(Err(e)) => Some((Err(e), None)),
                    None => Some((Err(KvError::Closed { what: closed }), None)),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn txn(&self, guard: Option<&Guard>, ops: Vec<Op>) -> Result<Option<i64>, KvError> {
        let mut g = self.lock();
        check(&g, || format!("writing {} key(s)", ops.len()))?;
        if let Some(guard) = guard {
            let create_revision = g.data.get(&guard.key).map_or(0, |e| e.create_revision);
            if create_revision != guard.create_revision {
                return Ok(None);
            }
        }
        apply(&mut g, ops);
        Ok(Some(g.revision))
    }

    async fn lease_grant(&self, ttl: i64) -> Result<i64, KvError> {
        let mut g = self.lock();
        check(&g, || format!("granting a lease of {ttl} s"))?;
        g.next_lease += 1;
        let id = g.next_lease;
        g.leases.insert(id, ttl);
        Ok(id)
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        let g = self.lock();
        check(&g, || format!("renewing lease {id:x}"))?;
        Ok(g.leases.get(&id).copied().unwrap_or(0))
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        check(&self.lock(), || format!("revoking lease {id:x}"))?;
        self.expire_lease(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_at_a_past_revision_and_refuses_a_compacted_one() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        let r1 = s.revision();
        s.put("p/a", b"2").await.unwrap();
        s.put("p/b", b"3").await.unwrap();
        s.delete("p/a").await.unwrap();
        let now = s.list("p/", None).await.unwrap();
        assert_eq!(now.kvs.len(), 1);
        assert_eq!(now.kvs[0].key, "p/b");
        let then = s.list("p/", Some(r1)).await.unwrap();
        assert_eq!(then.kvs.len(), 1);
        assert_eq!(then.kvs[0].value, b"1");
        s.compact(s.revision());
        assert!(s.list("p/", Some(r1)).await.unwrap_err().is_compacted());
        assert!(s.watch("p/", r1).await.is_err());
    }

    #[tokio::test]
    async fn a_guarded_write_lands_only_while_the_guard_key_is_the_same() {
        let s = MemStore::new();
        let lease = s.lease_grant(10).await.unwrap();
        s.txn(
            None,
            vec![Op::Put {
                key: "leader".into(),
                value: b"me".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
        let g = Guard {
            key: "leader".into(),
            create_revision: s.revision(),
        };
        let put = |v: &str| Op::Put {
            key: "k".into(),
            value: v.as_bytes().to_vec(),
            lease: None,
        };
        assert_eq!(
            s.txn(Some(&g), vec![put("1")]).await.unwrap(),
            Some(s.revision())
        );
        s.expire_lease(lease);
        assert!(s.get("leader").await.unwrap().is_none());
        assert_eq!(s.txn(Some(&g), vec![put("2")]).await.unwrap(), None);
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"1");
        // Create revision 0: the key is absent (a campaign).
        let absent = Guard {
            key: "leader".into(),
            create_revision: 0,
        };
        assert!(
            s.txn(Some(&absent), vec![put("3")])
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"3");
    }

    #[tokio::test]
    async fn an_outage_fails_requests_and_breaks_watches() {
        let s = MemStore::new();
        let mut w = s.watch("p/", 1).await.unwrap();
        s.set_outage(Some("down for the test"));
        assert!(matches!(
            w.next().await,
            Some(Err(KvError::Unavailable { .. }))
        ));
        assert!(w.next().await.is_none());
        assert!(s.get("p/a").await.is_err());
        s.set_outage(None);
        assert!(s.get("p/a").await.unwrap().is_none());
    }
}
