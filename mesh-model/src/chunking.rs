//! Stable assignment of a service's endpoints to chunks of at most 64.
//!
//! A service's endpoints are stored as several etcd values (`endpoints/<cluster>/<ns>/<name>/<n>`), so
//! one endpoint change rewrites one small value and a service has no size cap. The assignment is
//! *stateful* and *stable*: an endpoint stays in its chunk for as long as it exists; a new endpoint goes
//! into the lowest-numbered chunk with room (or a new chunk); a removal leaves a hole that the next new
//! endpoint fills. So adding, changing or removing one endpoint changes exactly one chunk, and a writer
//! that seeds the assignment from what etcd already holds ([`ChunkedEndpoints::from_chunks`]) rewrites
//! nothing after a restart. Chunks are never compacted: compaction would rewrite several values to save
//! a few bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::values::Endpoint;

/// Most endpoints one chunk holds.
pub const MAX_ENDPOINTS_PER_CHUNK: usize = 64;

/// A service's endpoints, assigned to chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkedEndpoints {
    chunks: BTreeMap<u32, BTreeMap<IpAddr, Endpoint>>,
    index: HashMap<IpAddr, u32>,
}

impl ChunkedEndpoints {
    /// No endpoints.
    pub fn new() -> Self {
        Self::default()
    }

    /// Seed from chunks already stored. An endpoint seen twice keeps its first place; a chunk over
    /// the limit keeps its first 64 endpoints (by IP) and the rest are placed anew. Returns the
    /// assignment and the chunks that differ from what was given (to be rewritten).
    pub fn from_chunks(
        chunks: impl IntoIterator<Item = (u32, Vec<Endpoint>)>,
    ) -> (Self, BTreeSet<u32>) {
        let mut me = Self::new();
        let mut overflow = Vec::new();
        let mut changed = BTreeSet::new();
        let mut given: Vec<(u32, Vec<Endpoint>)> = chunks.into_iter().collect();
        given.sort_by_key(|(n, _)| *n);
        for (n, eps) in given {
            let given_len = eps.len();
            let slot = me.chunks.entry(n).or_default();
            for ep in eps {
                if me.index.contains_key(&ep.ip) || slot.contains_key(&ep.ip) {
                    changed.insert(n);
                    continue;
                }
                if slot.len() >= MAX_ENDPOINTS_PER_CHUNK {
                    changed.insert(n);
                    overflow.push(ep);
                    continue;
                }
                me.index.insert(ep.ip, n);
                slot.insert(ep.ip, ep);
            }
            if slot.is_empty() {
                me.chunks.remove(&n);
                if given_len > 0 {
                    changed.insert(n);
                }
            }
        }
        for ep in overflow {
            if !me.index.contains_key(&ep.ip) {
                changed.extend(me.upsert(ep));
            }
        }
        (me, changed)
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No endpoints.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The chunk an endpoint is in.
    pub fn chunk_of(&self, ip: &IpAddr) -> Option<u32> {
        self.index.get(ip).copied()
    }

    /// The endpoints of chunk `n`, sorted by IP; `None` if the chunk does not exist.
    pub fn chunk(&self, n: u32) -> Option<Vec<Endpoint>> {
        self.chunks.get(&n).map(|m| m.values().cloned().collect())
    }

    /// Chunk numbers in use.
    pub fn chunk_numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.keys().copied()
    }

    /// Every endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> + '_ {
        self.chunks.values().flat_map(|m| m.values())
    }

    /// Add or change an endpoint. Returns the chunk that changed, or `None` if nothing did.
    pub fn upsert(&mut self, ep: Endpoint) -> Option<u32> {
        if let Some(&n) = self.index.get(&ep.ip) {
            let slot = self.chunks.entry(n).or_default();
            if slot.get(&ep.ip) == Some(&ep) {
                return None;
            }
            slot.insert(ep.ip, ep);
            return Some(n);
        }
        let n = self
            .chunks
            .iter()
            .find(|(_, m)| m.len() < MAX_ENDPOINTS_PER_CHUNK)
            .map(|(n, _)| *n)
            .unwrap_or_else(|| self.first_free_number());
        self.index.insert(ep.ip, n);
        self.chunks.entry(n).or_default().insert(ep.ip, ep);
        Some(n)
    }

    /// Remove an endpoint. Returns the chunk that changed (it may now be empty, and gone).
    pub fn remove(&mut self, ip: &IpAddr) -> Option<u32> {
        let n = self.index.remove(ip)?;
        if let Some(slot) = self.chunks.get_mut(&n) {
            slot.remove(ip);
            if slot.is_empty() {
                self.chunks.remove(&n);
            }
        }
        Some(n)
    }

    /// Make the endpoints exactly `desired` (by IP; a later duplicate wins), changing as few chunks as
    /// possible. Returns the chunks that changed.
    pub fn set_all(&mut self, desired: impl IntoIterator<Item = Endpoint>) -> BTreeSet<u32> {
        let desired: BTreeMap<IpAddr, Endpoint> = desired.into_iter().map(|e| (e.ip, e)).collect();
        let mut changed = BTreeSet::new();
        let gone: Vec<IpAddr> = self
            .index
            .keys()
            .filter(|ip| !desired.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            changed.extend(self.remove(&ip));
        }
        for ep in desired.into_values() {
            changed.extend(self.upsert(ep));
        }
        changed
    }

    fn first_free_number(&self) -> u32 {
        (0..)
            .find(|n| !self.chunks.contains_key(n))
            .unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::{Conditions, EndpointPort, Protocol};
    use proptest::prelude::*;

    fn ep(i: u32, port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            ports: vec![EndpointPort {
                name: None,
                port,
                protocol: Protocol::Tcp,
            }]
            .into(),
            node: None,
            zone: None,
            hostname: None,
            conditions: Conditions::default(),
        }
    }

    fn snapshot(c: &ChunkedEndpoints) -> BTreeMap<u32, Vec<Endpoint>> {
        c.chunk_numbers()
            .map(|n| (n, c.chunk(n).unwrap()))
            .collect()
    }

    fn diff(a: &BTreeMap<u32, Vec<Endpoint>>, b: &BTreeMap<u32, Vec<Endpoint>>) -> BTreeSet<u32> {
        a.keys()
            .chain(b.keys())
            .filter(|n| a.get(n) != b.get(n))
            .copied()
            .collect()
    }

    #[test]
    fn fills_chunks_of_64_then_opens_the_next() {
        let mut c = ChunkedEndpoints::new();
        for i in 0..130 {
            c.upsert(ep(i, 80));
        }
        assert_eq!(c.chunk_numbers().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(c.chunk(0).unwrap().len(), 64);
        assert_eq!(c.chunk(1).unwrap().len(), 64);
        assert_eq!(c.chunk(2).unwrap().len(), 2);
        assert_eq!(c.len(), 130);
    }

    #[test]
    fn a_hole_is_filled_by_the_next_new_endpoint() {
        let mut c = ChunkedEndpoints::new();
        for i in 0..128 {
            c.upsert(ep(i, 80));
        }
        assert_eq!(c.remove(&ep(3, 80).ip), Some(0));
        assert_eq!(c.upsert(ep(500, 80)), Some(0));
        assert_eq!(c.upsert(ep(501, 80)), Some(2));
    }

    #[test]
    fn unchanged_upsert_changes_nothing() {
        let mut c = ChunkedEndpoints::new();
        c.upsert(ep(1, 80));
        assert_eq!(c.upsert(ep(1, 80)), None);
        assert_eq!(c.upsert(ep(1, 81)), Some(0));
        assert_eq!(c.remove(&ep(9, 80).ip), None);
    }

    #[test]
    fn reseeding_from_stored_chunks_rewrites_nothing() {
        let mut c = ChunkedEndpoints::new();
        for i in 0..200 {
            c.upsert(ep(i, 80));
        }
        c.remove(&ep(70, 80).ip);
        let stored = snapshot(&c);
        let (seeded, changed) = ChunkedEndpoints::from_chunks(stored.clone());
        assert!(changed.is_empty());
        assert_eq!(snapshot(&seeded), stored);
        // And the same desired set applied to the seed changes nothing.
        let mut seeded = seeded;
        assert!(
            seeded
                .set_all(c.endpoints().cloned().collect::<Vec<_>>())
                .is_empty()
        );
    }

    #[test]
    fn reseeding_repairs_duplicates_and_overfull_chunks() {
        let over: Vec<Endpoint> = (0..70).map(|i| ep(i, 80)).collect();
        let (c, changed) =
            ChunkedEndpoints::from_chunks([(0, over), (1, vec![ep(1, 80), ep(100, 80)])]);
        assert_eq!(c.len(), 71);
        assert!(
            c.chunk_numbers()
                .all(|n| c.chunk(n).unwrap().len() <= MAX_ENDPOINTS_PER_CHUNK)
        );
        assert!(changed.contains(&0) && changed.contains(&1));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u32, u16),
        Change(usize, u16),
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..400, 1u16..4).prop_map(|(i, p)| Op::Add(i, p)),
            (any::<usize>(), 1u16..4).prop_map(|(i, p)| Op::Change(i, p)),
            any::<usize>().prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Adding, changing or removing one endpoint changes exactly one chunk (none when the value is the
        /// same), every chunk holds at most 64, and every endpoint is in exactly one chunk.
        #[test]
        fn one_endpoint_change_changes_exactly_one_chunk(
            initial in 0u32..300,
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let mut c = ChunkedEndpoints::new();
            for i in 0..initial {
                c.upsert(ep(i, 1));
            }
            for op in ops {
                let before = snapshot(&c);
                let ips: Vec<IpAddr> = c.endpoints().map(|e| e.ip).collect();
                let (reported, noop) = match op {
                    Op::Add(i, p) => {
                        let e = ep(1000 + i, p);
                        let same = c.endpoints().any(|x| *x == e);
                        (c.upsert(e), same)
                    }
                    Op::Change(i, p) if !ips.is_empty() => {
                        let ip = ips[i % ips.len()];
                        let mut e = c.endpoints().find(|e| e.ip == ip).unwrap().clone();
                        let same = e.ports[0].port == p;
                        let mut ports = e.ports.to_vec();
                        ports[0].port = p;
                        e.ports = ports.into();
                        (c.upsert(e), same)
                    }
                    Op::Remove(i) if !ips.is_empty() => (c.remove(&ips[i % ips.len()]), false),
                    _ => continue,
                };
                let after = snapshot(&c);
                let d = diff(&before, &after);
                if noop {
                    prop_assert!(d.is_empty());
                    prop_assert_eq!(reported, None);
                } else {
                    prop_assert_eq!(d.len(), 1, "changed chunks {:?}", d);
                    prop_assert_eq!(reported, d.into_iter().next());
                }
                let mut seen = BTreeSet::new();
                for (n, eps) in &after {
                    prop_assert!(!eps.is_empty() && eps.len() <= MAX_ENDPOINTS_PER_CHUNK);
                    for e in eps {
                        prop_assert!(seen.insert(e.ip));
                        prop_assert_eq!(c.chunk_of(&e.ip), Some(*n));
                    }
                }
                prop_assert_eq!(seen.len(), c.len());
            }
        }

        /// `set_all` reaches exactly the desired set and reports exactly the chunks that differ.
        #[test]
        fn set_all_reports_the_chunks_it_changed(
            a in proptest::collection::btree_set(0u32..300, 0..200),
            b in proptest::collection::btree_set(0u32..300, 0..200),
        ) {
            let mut c = ChunkedEndpoints::new();
            c.set_all(a.iter().map(|&i| ep(i, 1)));
            let before = snapshot(&c);
            let changed = c.set_all(b.iter().map(|&i| ep(i, 1)));
            let after = snapshot(&c);
            prop_assert_eq!(changed, diff(&before, &after));
            let got: BTreeSet<IpAddr> = c.endpoints().map(|e| e.ip).collect();
            let want: BTreeSet<IpAddr> = b.iter().map(|&i| ep(i, 1).ip).collect();
            prop_assert_eq!(got, want);
        }
    }
}
