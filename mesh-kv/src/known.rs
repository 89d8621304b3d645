//! What a consumer has seen, so that a relist turns into the changes it has not.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use crate::store::KeyValue;

/// A change a consumer must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(KeyValue),
    Delete(String),
}

/// The keys a consumer holds, each with the mod revision and a hash of the value it last saw (a
/// rebuilt store reuses revisions, so the revision alone does not tell a change). Between
/// [`Known::init`] and [`Known::init_done`] it records which keys the relist had, and
/// `init_done` returns those it no longer has.
#[derive(Debug, Default, Clone)]
pub struct Known {
    seen: HashMap<String, (i64, u64)>,
    relist: Option<HashSet<String>>,
}

fn value_hash(v: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Known {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys a predecessor forwarded, value unknown: the next relist re-sends those it has and
    /// deletes the others.
    pub fn with_keys(keys: impl IntoIterator<Item = String>) -> Self {
        Self {
            seen: keys.into_iter().map(|k| (k, (0, 0))).collect(),
            relist: None,
        }
    }

    /// A relist begins.
    pub fn init(&mut self) {
        self.relist = Some(HashSet::new());
    }

    /// A key was put (listed or watched); whether it differs from what was seen.
    pub fn put(&mut self, kv: &KeyValue) -> bool {
        if let Some(r) = &mut self.relist {
            r.insert(kv.key.clone());
        }
        let stamp = (kv.mod_revision, value_hash(&kv.value));
        self.seen.insert(kv.key.clone(), stamp) != Some(stamp)
    }

    /// A key was deleted; whether it was known.
    pub fn delete(&mut self, key: &str) -> bool {
        self.seen.remove(key).is_some()
    }

    /// The relist is complete: the keys known before it that it did not have, now forgotten.
    pub fn init_done(&mut self) -> Vec<String> {
        let Some(listed) = self.relist.take() else {
            return Vec::new();
        };
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        for k in &gone {
            self.seen.remove(k);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: v.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
        }
    }

    #[test]
    fn a_relist_yields_only_what_changed_and_what_vanished() {
        let mut k = Known::new();
        k.init();
        assert!(k.put(&kv("a", "1", 2)));
        assert!(k.put(&kv("b", "1", 3)));
        assert!(k.init_done().is_empty());
        k.init();
        assert!(!k.put(&kv("a", "1", 2)), "unchanged: nothing to do");
        assert!(k.put(&kv("c", "1", 5)));
        assert_eq!(k.init_done(), ["b"]);
        assert_eq!(k.len(), 2);
    }

    #[test]
    fn a_rebuilt_store_reusing_a_revision_still_counts_as_a_change() {
        let mut k = Known::new();
        assert!(k.put(&kv("a", "1", 2)));
        assert!(k.put(&kv("a", "2", 2)));
    }

    #[test]
    fn keys_from_a_predecessor_are_resent_or_deleted() {
        let mut k = Known::with_keys(["a".to_string(), "b".to_string()]);
        k.init();
        assert!(k.put(&kv("a", "1", 2)), "value unknown: re-sent");
        assert_eq!(k.init_done(), ["b"]);
    }
}
