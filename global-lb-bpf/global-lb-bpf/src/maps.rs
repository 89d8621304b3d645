//! The service map logic: typed services in, ordered map writes out.
//!
//! [`LbMaps`] keeps an in-memory mirror of the services and backends maps and turns
//! [`ServiceMaps::upsert_service`] / [`ServiceMaps::delete_service`] into map writes in an order
//! that keeps every connecting client on a backend of either the old or the new backend set:
//!
//! 1. new backends are written to the backends map (their counters zeroed first);
//! 2. backend slots `1..=new_count` are written, keeping a backend that stays in the slot it
//!    already had, so a one-backend change rewrites about one slot;
//! 3. slot 0 gets the new count (the switch);
//! 4. slots past the new count are removed, then backends no service uses any more.
//!
//! A program that races with step 4 misses its slot or backend and re-reads slot 0 (see the
//! eBPF crate). Backend and service ids are allocated round-robin, so a just-freed id is not
//! handed out again while a racing program may still hold it.
//!
//! The same logic runs over the kernel maps ([`crate::Datapath`]) and over [`MemStore`]
//! ([`FakeMaps`]), which is what tests of callers such as node-sync use.

use std::collections::{BTreeMap, HashMap, HashSet};

use global_lb_bpf_common::{self as common, ServiceValue};
use tracing::{debug, warn};

use crate::model::{BackendIdentity, backend_from_value, backend_value};
use crate::store::{MapStore, MemStore};
use crate::{Backend, BackendCounter, BackendEntry, Error, Frontend, Service};

/// The typed map API node-sync writes through.
///
/// Implemented by [`crate::Datapath`] (kernel maps) and [`FakeMaps`] (memory).
pub trait ServiceMaps {
    /// Creates or replaces the backends of `frontend`. Backends must have the frontend's address
    /// family; duplicates are merged (weights added); weight-0 backends are left out. An empty
    /// list makes connects to the frontend fail at once with `ECONNREFUSED`. Returns the
    /// service id. Nothing is written when the update cannot fit in the maps.
    fn upsert_service(&mut self, frontend: &Frontend, backends: &[Backend]) -> Result<u32, Error>;

    /// Changes some backends of `frontend` and leaves the others in the slots they hold: every
    /// backend of `remove` (matched by address, port and cluster) leaves the service, then every
    /// backend of `add` joins it or gets the weight and flags given (a weight of 0 removes it).
    /// A backend in both lists ends as `add` says. The result is what [`upsert_service`] of the
    /// whole new list would give, but the work is proportional to the change (plus one pass over
    /// the service's slot ids), not to the service's size: this is the path for one endpoint
    /// change of a large service. A frontend not in the maps is created with `add`. Same
    /// validation, room checks and write order as [`upsert_service`].
    ///
    /// [`upsert_service`]: ServiceMaps::upsert_service
    fn update_backends(
        &mut self,
        frontend: &Frontend,
        add: &[Backend],
        remove: &[Backend],
    ) -> Result<u32, Error>;

    /// Removes `frontend`; connects to it are left alone afterwards. Returns whether it existed.
    fn delete_service(&mut self, frontend: &Frontend) -> Result<bool, Error>;

    /// Every service, sorted by frontend.
    fn services(&self) -> Result<Vec<Service>, Error>;

    /// Connection counters of every backend in the maps, sorted by backend id.
    fn counters(&self) -> Result<Vec<BackendCounter>, Error>;

    /// Every backend in the maps, sorted by backend id, from the writer's own record: no map is
    /// read (the counters are one kernel lookup per backend and CPU: 32k backends took a node's
    /// event loop 30 ms).
    fn backend_entries(&self) -> Vec<BackendEntry>;

    /// Backend `id`, from the writer's own record (no map is read).
    fn backend_entry(&self, id: u32) -> Option<BackendEntry>;

    /// How many more distinct backends the backends map holds.
    fn backend_room(&self) -> usize;

    /// Connections sent to backend `id` (one kernel lookup: a caller reading many spreads them).
    fn counter(&self, id: u32) -> Result<u64, Error>;
}

/// The in-memory maps with the real update logic, for tests of code that writes services.
pub type FakeMaps = LbMaps<MemStore>;

impl FakeMaps {
    /// Empty in-memory maps.
    pub fn new() -> Self {
        LbMaps::with_empty_store(MemStore::new())
    }
}

impl Default for FakeMaps {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug)]
struct ServiceState {
    service_id: u32,
    /// Backend id of slot `i + 1`.
    slots: Vec<u32>,
}

#[derive(Clone, Debug)]
struct BackendState {
    value: common::Backend,
    identity: BackendIdentity,
    /// Number of services using this backend.
    refs: u32,
}

/// Service logic over a [`MapStore`]; see the module docs.
#[derive(Debug)]
pub struct LbMaps<S> {
    store: S,
    services: BTreeMap<Frontend, ServiceState>,
    backends: HashMap<u32, BackendState>,
    backend_ids: HashMap<BackendIdentity, u32>,
    service_ids: HashSet<u32>,
    next_backend_id: u32,
    next_service_id: u32,
    /// The backends map's capacity: ids are `1..backend_capacity`.
    backend_capacity: u32,
    /// Entries in the services map (slot 0 entries plus backend slots).
    service_entries: usize,
    /// A failed write could not be cleaned up yet: sweep before the next write.
    needs_sweep: bool,
    /// The last write was refused before it wrote anything (no room): nothing to re-read.
    refused_unwritten: bool,
    /// The pre-filter's words as written to the store.
    filter: Vec<u64>,
    /// Frontends per pre-filter bit (a bit is cleared when its last frontend goes).
    filter_refs: HashMap<u32, u32>,
}

impl<S: MapStore> LbMaps<S> {
    /// Logic over a store known to be empty.
    pub fn with_empty_store(store: S) -> Self {
        Self {
            backend_capacity: store.backend_capacity(),
            store,
            services: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            service_ids: HashSet::new(),
            next_backend_id: 1,
            next_service_id: 1,
            service_entries: 0,
            needs_sweep: false,
            refused_unwritten: false,
            filter: vec![0; common::FILTER_WORDS as usize],
            filter_refs: HashMap::new(),
        }
    }

    /// The backends map's capacity: at most one less distinct backends fit (ids start at 1).
    pub fn backend_capacity(&self) -> u32 {
        self.backend_capacity
    }

    /// Logic over a store that may hold services written before (by an earlier process):
    /// reads them back, removes leftovers of an interrupted update (slots past a service's count,
    /// slots without a service, unused backends) and repairs a service whose slots point at a
    /// missing backend. Services are not rewritten otherwise.
    pub fn recover(store: S) -> Result<Self, Error> {
        let mut me = Self::with_empty_store(store);
        me.reload(true)?;
        Ok(me)
    }

    /// Logic over a store another writer may be changing: reads the services back without
    /// removing or repairing anything. For inspection only (`services()`, `counters()`).
    pub fn read_only(store: S) -> Result<Self, Error> {
        let mut me = Self::with_empty_store(store);
        me.reload(false)?;
        Ok(me)
    }

    /// Rebuilds the in-memory mirror from the store; with `sweep`, also removes leftovers and
    /// repairs broken services (see [`LbMaps::recover`]).
    fn reload(&mut self, sweep: bool) -> Result<(), Error> {
        self.services.clear();
        self.backends.clear();
        self.backend_ids.clear();
        self.service_ids.clear();
        self.service_entries = 0;
        self.filter_refs.clear();
        let me = self;
        let slots = me.store.slots()?;
        let stored_backends = me.store.backends()?;

        // Slot 0 entries first: they say which services exist and how many slots they have.
        let mut heads: BTreeMap<Frontend, ServiceValue> = BTreeMap::new();
        let mut by_key: HashMap<common::ServiceKey, ServiceValue> = HashMap::new();
        let mut orphans = Vec::new();
        for (key, value) in &slots {
            by_key.insert(*key, *value);
            if key.slot == 0 {
                match Frontend::from_key(key) {
                    Some(f) => {
                        heads.insert(f, *value);
                    }
                    None => orphans.push(*key),
                }
            }
        }
        let backend_values: HashMap<u32, common::Backend> = stored_backends.into_iter().collect();
        let mut repairs: Vec<(Frontend, Vec<Backend>)> = Vec::new();

        // A slot is sound when its backend exists and the slot carries that backend's address.
        // Position 0 (slot 1) is what the programs serve: the backend slot 0 carries. An unsound
        // position is kept as id 0 (never a backend id), so the repair below rewrites it.
        let carries = |v: &ServiceValue| {
            backend_values
                .get(&v.backend_id)
                .is_some_and(|b| b.addr == v.addr && b.port == v.port && b.family == v.family)
        };
        let mut stale_first: Vec<Frontend> = Vec::new();
        for (frontend, head) in &heads {
            let mut ids = Vec::with_capacity(head.count as usize);
            let mut broken = false;
            for slot in 1..=head.count {
                let sound = if slot == 1 {
                    Some(head).filter(|h| carries(h))
                } else {
                    by_key.get(&frontend.key(slot)).filter(|v| carries(v))
                };
                match sound {
                    Some(v) => ids.push(v.backend_id),
                    None => {
                        broken = true;
                        ids.push(0);
                    }
                }
            }
            // Slot 1's own entry is not read by the programs (slot 0 carries it); an update
            // interrupted between the two leaves it ahead of slot 0: rewritten in the sweep.
            if let Some(&first) = ids.first()
                && first != 0
                && by_key
                    .get(&frontend.key(1))
                    .map(|v| (v.backend_id, v.addr, v.port))
                    != Some((head.backend_id, head.addr, head.port))
            {
                stale_first.push(*frontend);
            }
            me.service_ids.insert(head.service_id);
            me.next_service_id = me.next_service_id.max(head.service_id.wrapping_add(1));
            for id in ids
                .iter()
                .copied()
                .filter(|id| *id != 0)
                .collect::<HashSet<_>>()
            {
                let value = backend_values[&id];
                let identity = backend_from_value(&value).identity();
                me.backend_ids.insert(identity, id);
                me.backends
                    .entry(id)
                    .or_insert(BackendState {
                        value,
                        identity,
                        refs: 0,
                    })
                    .refs += 1;
                me.next_backend_id = me.next_backend_id.max(id.wrapping_add(1));
            }
            me.service_entries += 1 + ids.len();
            if broken {
                warn!(%frontend, "service slots point at missing or other backends; rewriting it");
                repairs.push((*frontend, me.backends_of(&ids)));
            }
            me.services.insert(
                *frontend,
                ServiceState {
                    service_id: head.service_id,
                    slots: ids,
                },
            );
        }

        // Leftovers: slots beyond a service's count or without a service, unused backends.
        for (key, _) in &slots {
            if key.slot == 0 {
                continue;
            }
            let keep = Frontend::from_key(key)
                .and_then(|f| heads.get(&f))
                .is_some_and(|head| key.slot <= head.count);
            if !keep {
                orphans.push(*key);
            }
        }
        // The pre-filter: one bit per frontend.
        let mut wanted = vec![0u64; common::FILTER_WORDS as usize];
        for frontend in heads.keys() {
            let bit = filter_bit(frontend);
            *me.filter_refs.entry(bit).or_insert(0) += 1;
            wanted[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        if !sweep {
            me.filter = wanted;
            return Ok(());
        }
        // Bits of existing frontends first (before anything else is swept), so that every
        // frontend in the maps passes the filter; bits of frontends that are gone are cleared
        // with them.
        let stored = me.store.filter()?;
        me.filter = stored;
        for (i, want) in wanted.iter().enumerate() {
            if me.filter[i] != *want {
                me.store.put_filter(i as u32, *want)?;
                me.filter[i] = *want;
            }
        }
        for frontend in stale_first {
            if let Some(state) = me.services.get(&frontend) {
                let value = me.slot_value(state.slots[0], 0, state.service_id);
                debug!(%frontend, "rewriting slot 1 as slot 0 carries it");
                me.store.put_slot(&frontend.key(1), &value)?;
            }
        }
        if !orphans.is_empty() {
            debug!(count = orphans.len(), "removing leftover service slots");
        }
        for key in &orphans {
            me.store.delete_slot(key)?;
        }
        for id in backend_values.keys() {
            if !me.backends.contains_key(id) {
                debug!(backend_id = id, "removing unused backend");
                me.store.delete_backend(*id)?;
            }
        }
        if me.next_backend_id >= me.backend_capacity {
            me.next_backend_id = 1;
        }
        for (frontend, backends) in repairs {
            // Not `upsert_service`: a failure must not re-enter this sweep.
            me.try_upsert(&frontend, &backends)?;
        }
        Ok(())
    }

    /// After a failed write: re-read the maps so the mirror matches them again (a half-done
    /// update is swept back to the old backend set, plus any slots already rewritten in place).
    fn after_error(&mut self, error: Error) -> Error {
        // Refused before any write: the maps are as the mirror says. (A re-read of 64k backends
        // and their slots per refused write cost a node a core when its frontends outgrew the
        // backends map.)
        if std::mem::take(&mut self.refused_unwritten)
            || matches!(error, Error::InvalidService { .. })
        {
            return error;
        }
        if let Err(reload) = self.reload(true) {
            warn!(%reload, "re-reading the maps after a failed write failed too");
            self.needs_sweep = true;
        }
        error
    }

    /// A write refused for lack of room in `map`, before anything was written.
    fn no_room(&mut self, map: &'static str, capacity: u32) -> Error {
        self.refused_unwritten = true;
        Error::MapFull { map, capacity }
    }

    /// Finishes the clean-up of an earlier failed write, if one is pending. Every write starts
    /// here (so a refusal's mark never outlives its write).
    fn sweep_if_needed(&mut self) -> Result<(), Error> {
        self.refused_unwritten = false;
        if self.needs_sweep {
            self.reload(true)?;
            self.needs_sweep = false;
        }
        Ok(())
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store underneath, mutably (tests use it to play the datapath).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Backends (weight = slot multiplicity) of a slot list, sorted.
    fn backends_of(&self, slots: &[u32]) -> Vec<Backend> {
        let mut weights: BTreeMap<u32, u16> = BTreeMap::new();
        for id in slots {
            let w = weights.entry(*id).or_insert(0);
            *w = w.saturating_add(1);
        }
        let mut out: Vec<Backend> = weights
            .into_iter()
            .filter_map(|(id, weight)| {
                self.backends
                    .get(&id)
                    .map(|b| backend_from_value(&b.value).with_weight(weight))
            })
            .collect();
        out.sort();
        out
    }

    fn validate(frontend: &Frontend, backends: &[Backend]) -> Result<Vec<Backend>, Error> {
        let invalid = |reason: String| Error::InvalidService {
            frontend: *frontend,
            reason,
        };
        if frontend.port == 0 {
            return Err(invalid("port 0 cannot be a service port".into()));
        }
        let mut merged: BTreeMap<BackendIdentity, Backend> = BTreeMap::new();
        for b in backends {
            if b.addr.is_ipv4() != frontend.addr.is_ipv4() {
                return Err(invalid(format!(
                    "backend {} is not of the service's address family",
                    b.socket_addr()
                )));
            }
            if b.port == 0 {
                return Err(invalid(format!("backend {} has port 0", b.socket_addr())));
            }
            if b.addr.is_unspecified() {
                return Err(invalid(format!(
                    "backend {} has an unspecified address",
                    b.socket_addr()
                )));
            }
            if b.weight == 0 {
                continue;
            }
            merged
                .entry(b.identity())
                .and_modify(|m| {
                    m.weight = m.weight.saturating_add(b.weight);
                    m.local |= b.local;
                })
                .or_insert(*b);
        }
        let slots: u64 = merged.values().map(|b| u64::from(b.weight)).sum();
        if slots > u64::from(common::MAX_SLOTS_PER_SERVICE) {
            return Err(invalid(format!(
                "{slots} slots (sum of weights) exceed the limit of {}",
                common::MAX_SLOTS_PER_SERVICE
            )));
        }
        Ok(merged.into_values().collect())
    }

    fn allocate_backend_id(&mut self) -> Result<u32, Error> {
        for _ in 0..self.backend_capacity {
            let id = self.next_backend_id;
            self.next_backend_id = if id + 1 >= self.backend_capacity {
                1
            } else {
                id + 1
            };
            if !self.backends.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted { what: "backend" })
    }

    /// A backend new to the maps: an id, its counter zeroed, its value written; no service
    /// references it yet.
    fn add_backend(
        &mut self,
        identity: BackendIdentity,
        value: common::Backend,
    ) -> Result<u32, Error> {
        let id = self.allocate_backend_id()?;
        self.store.reset_counter(id)?;
        self.store.put_backend(id, &value)?;
        self.backends.insert(
            id,
            BackendState {
                value,
                identity,
                refs: 0,
            },
        );
        self.backend_ids.insert(identity, id);
        Ok(id)
    }

    fn allocate_service_id(&mut self) -> Result<u32, Error> {
        for _ in 0..u32::MAX {
            let id = self.next_service_id;
            self.next_service_id = self.next_service_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.service_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted { what: "service" })
    }

    /// Drops a reference to each backend of `ids` (deduplicated); removes unused ones.
    fn release_backends(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<(), Error> {
        for id in ids.into_iter().collect::<HashSet<_>>() {
            let Some(state) = self.backends.get_mut(&id) else {
                continue;
            };
            state.refs = state.refs.saturating_sub(1);
            if state.refs == 0 {
                let identity = state.identity;
                self.store.delete_backend(id)?;
                self.backends.remove(&id);
                self.backend_ids.remove(&identity);
            }
        }
        Ok(())
    }
}

/// The pre-filter bit of a frontend, as the programs compute it.
fn filter_bit(frontend: &Frontend) -> u32 {
    let key = frontend.key(0);
    common::filter_bit(&key.addr, key.port, key.proto)
}

/// New slot list: a backend keeps the slots it already had (up to its new weight); freed and
/// added slots are filled with the backends that still need slots.
pub(crate) fn assign_slots(old: &[u32], wanted: &[(u32, u16)]) -> Vec<u32> {
    let total: usize = wanted.iter().map(|(_, w)| usize::from(*w)).sum();
    let mut need: HashMap<u32, u16> = wanted.iter().copied().collect();
    let mut out: Vec<Option<u32>> = vec![None; total];
    for (i, id) in old.iter().take(total).enumerate() {
        if let Some(n) = need.get_mut(id)
            && *n > 0
        {
            *n -= 1;
            out[i] = Some(*id);
        }
    }
    let mut fill = wanted
        .iter()
        .flat_map(|(id, _)| std::iter::repeat_n(*id, usize::from(need[id])));
    out.into_iter()
        .map(|slot| slot.or_else(|| fill.next()).unwrap_or_default())
        .collect()
}

impl<S: MapStore> ServiceMaps for LbMaps<S> {
    fn upsert_service(&mut self, frontend: &Frontend, backends: &[Backend]) -> Result<u32, Error> {
        self.sweep_if_needed()?;
        self.try_upsert(frontend, backends)
            .map_err(|e| self.after_error(e))
    }

    fn update_backends(
        &mut self,
        frontend: &Frontend,
        add: &[Backend],
        remove: &[Backend],
    ) -> Result<u32, Error> {
        self.sweep_if_needed()?;
        self.try_update(frontend, add, remove)
            .map_err(|e| self.after_error(e))
    }

    fn delete_service(&mut self, frontend: &Frontend) -> Result<bool, Error> {
        self.sweep_if_needed()?;
        self.try_delete(frontend).map_err(|e| self.after_error(e))
    }

    fn services(&self) -> Result<Vec<Service>, Error> {
        Ok(self
            .services
            .iter()
            .map(|(frontend, s)| Service {
                frontend: *frontend,
                service_id: s.service_id,
                backends: self.backends_of(&s.slots),
            })
            .collect())
    }

    fn counter(&self, id: u32) -> Result<u64, Error> {
        self.store.counter(id)
    }

    fn backend_entries(&self) -> Vec<BackendEntry> {
        let mut ids: Vec<u32> = self.backends.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.backend_entry(id))
            .collect()
    }

    fn backend_room(&self) -> usize {
        (self.backend_capacity as usize)
            .saturating_sub(1)
            .saturating_sub(self.backends.len())
    }

    fn backend_entry(&self, id: u32) -> Option<BackendEntry> {
        let b = backend_from_value(&self.backends.get(&id)?.value);
        Some(BackendEntry {
            backend_id: id,
            addr: b.addr,
            port: b.port,
            cluster_id: b.cluster_id,
            local: b.local,
        })
    }

    fn counters(&self) -> Result<Vec<BackendCounter>, Error> {
        self.backend_entries()
            .into_iter()
            .map(|e| {
                Ok(BackendCounter {
                    connections: self.store.counter(e.backend_id)?,
                    backend_id: e.backend_id,
                    addr: e.addr,
                    port: e.port,
                    cluster_id: e.cluster_id,
                    local: e.local,
                })
            })
            .collect()
    }
}

impl<S: MapStore> LbMaps<S> {
    fn try_upsert(&mut self, frontend: &Frontend, backends: &[Backend]) -> Result<u32, Error> {
        let backends = Self::validate(frontend, backends)?;
        let old = self.services.get(frontend).cloned();
        let old_slots = old.as_ref().map(|s| s.slots.clone()).unwrap_or_default();
        let new_total: usize = backends.iter().map(|b| usize::from(b.weight)).sum();

        // Room check before any write.
        let added_backends = backends
            .iter()
            .filter(|b| !self.backend_ids.contains_key(&b.identity()))
            .count();
        if added_backends > self.backend_room() {
            return Err(self.no_room(common::BACKENDS_MAP, self.backend_capacity));
        }
        let peak_entries = self.service_entries
            + usize::from(old.is_none())
            + new_total.saturating_sub(old_slots.len());
        if peak_entries > common::MAX_SERVICE_ENTRIES as usize {
            return Err(self.no_room(common::SERVICES_MAP, common::MAX_SERVICE_ENTRIES));
        }

        let service_id = match &old {
            Some(s) => s.service_id,
            None => self.allocate_service_id()?,
        };

        // 1. backends: new ones (counter zeroed first), changed flags rewritten in place.
        let mut wanted: Vec<(u32, u16)> = Vec::with_capacity(backends.len());
        let mut acquired: Vec<u32> = Vec::new();
        // A set, not the slot list: a 10k-backend service must not cost 10k x 10k comparisons.
        let old_ids: HashSet<u32> = old_slots.iter().copied().collect();
        for b in &backends {
            let value = backend_value(b);
            let id = match self.backend_ids.get(&b.identity()) {
                Some(&id) => {
                    let state = self
                        .backends
                        .get_mut(&id)
                        .expect("backend id index in sync");
                    if state.value != value {
                        self.store.put_backend(id, &value)?;
                        state.value = value;
                    }
                    id
                }
                None => self.add_backend(b.identity(), value)?,
            };
            if !old_ids.contains(&id) {
                acquired.push(id);
            }
            wanted.push((id, b.weight));
        }
        for id in &acquired {
            if let Some(state) = self.backends.get_mut(id) {
                state.refs += 1;
            }
        }

        let new_slots = assign_slots(&old_slots, &wanted);
        let kept: HashSet<u32> = new_slots.iter().copied().collect();
        let dropped: Vec<u32> = old_slots
            .iter()
            .copied()
            .filter(|id| !kept.contains(id))
            .collect();
        self.commit_slots(
            frontend,
            service_id,
            old.is_none(),
            &old_slots,
            new_slots,
            dropped,
        )?;
        debug!(%frontend, service_id, backends = backends.len(), "service written");
        Ok(service_id)
    }

    /// Steps 2 to 4 of an update (module docs): slots `1..=new_count` that change, slot 0 when
    /// the count changes (or the service is new), stale slots, then `dropped` backends (ids no
    /// slot of this service holds any more) lose this service's reference. The backends of
    /// `new_slots` must be in the backends map and referenced already.
    fn commit_slots(
        &mut self,
        frontend: &Frontend,
        service_id: u32,
        is_new: bool,
        old_slots: &[u32],
        new_slots: Vec<u32>,
        dropped: Vec<u32>,
    ) -> Result<(), Error> {
        if is_new {
            // The programs look a frontend up only if its filter bit is set: before slot 0.
            self.filter_add(frontend)?;
        }
        for (i, id) in new_slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let value = self.slot_value(*id, 0, service_id);
                self.store.put_slot(&frontend.key(i as u32 + 1), &value)?;
            }
        }
        // Slot 0 carries the count and slot 1's backend: rewritten when either changes.
        if is_new || old_slots.len() != new_slots.len() || old_slots.first() != new_slots.first() {
            let first = new_slots.first().copied().unwrap_or(0);
            let value = self.slot_value(first, new_slots.len() as u32, service_id);
            self.store.put_slot(&frontend.key(0), &value)?;
        }
        self.service_ids.insert(service_id);
        for slot in new_slots.len()..old_slots.len() {
            self.store.delete_slot(&frontend.key(slot as u32 + 1))?;
        }
        let old_entries = if is_new { 0 } else { 1 + old_slots.len() };
        self.service_entries = self.service_entries + 1 + new_slots.len() - old_entries;
        self.services.insert(
            *frontend,
            ServiceState {
                service_id,
                slots: new_slots,
            },
        );
        self.release_backends(dropped)
    }

    /// Counts `frontend` in its pre-filter bit, setting the bit if it is the first.
    fn filter_add(&mut self, frontend: &Frontend) -> Result<(), Error> {
        let bit = filter_bit(frontend);
        let refs = self.filter_refs.entry(bit).or_insert(0);
        *refs += 1;
        let (i, mask) = ((bit >> 6) as usize, 1u64 << (bit & 63));
        if self.filter[i] & mask == 0 {
            self.store.put_filter(i as u32, self.filter[i] | mask)?;
            self.filter[i] |= mask;
        }
        Ok(())
    }

    /// Uncounts `frontend` from its pre-filter bit, clearing the bit if it was the last.
    fn filter_remove(&mut self, frontend: &Frontend) -> Result<(), Error> {
        let bit = filter_bit(frontend);
        let refs = self.filter_refs.entry(bit).or_insert(1);
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return Ok(());
        }
        self.filter_refs.remove(&bit);
        let (i, mask) = ((bit >> 6) as usize, 1u64 << (bit & 63));
        if self.filter[i] & mask != 0 {
            self.store.put_filter(i as u32, self.filter[i] & !mask)?;
            self.filter[i] &= !mask;
        }
        Ok(())
    }

    /// The services-map value of a slot holding backend `id` (0: none), with the backend's
    /// address, port and family, which never change for an id.
    fn slot_value(&self, id: u32, count: u32, service_id: u32) -> ServiceValue {
        let mut value = ServiceValue {
            backend_id: id,
            count,
            service_id,
            ..ServiceValue::default()
        };
        if let Some(b) = self.backends.get(&id) {
            value.addr = b.value.addr;
            value.port = b.value.port;
            value.family = b.value.family;
        }
        value
    }

    /// [`ServiceMaps::update_backends`]: a pass over the service's slot ids against the few ids
    /// that change (a sorted list, no hashing per slot), holes refilled in place, the tail moved
    /// into holes that remain.
    fn try_update(
        &mut self,
        frontend: &Frontend,
        add: &[Backend],
        remove: &[Backend],
    ) -> Result<u32, Error> {
        let Some(old) = self.services.get(frontend) else {
            return self.try_upsert(frontend, add);
        };
        let service_id = old.service_id;
        let old_slots = old.slots.clone();
        // Weight 0 in `add` removes; validation merges duplicates and checks the family.
        let drained: Vec<BackendIdentity> = add
            .iter()
            .filter(|b| b.weight == 0)
            .map(Backend::identity)
            .collect();
        let add = Self::validate(frontend, add)?;
        let add_ids: HashSet<BackendIdentity> = add.iter().map(Backend::identity).collect();

        // Ids whose slots change: removed backends, and added ones that exist already.
        let mut touched: Vec<u32> = remove
            .iter()
            .map(Backend::identity)
            .chain(drained)
            .filter(|i| !add_ids.contains(i))
            .chain(add_ids.iter().copied())
            .filter_map(|i| self.backend_ids.get(&i).copied())
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let mut held = vec![0usize; touched.len()];
        let mut positions: Vec<usize> = Vec::new();
        for (pos, id) in old_slots.iter().enumerate() {
            if let Ok(t) = touched.binary_search(id) {
                held[t] += 1;
                positions.push(pos);
            }
        }
        let held_by = |id: u32| touched.binary_search(&id).map_or(0, |t| held[t]);

        // What each added backend needs: nothing (same weight and value), a value rewrite, or
        // its slots redone (new, or another weight).
        let mut fill: Vec<(u32, u16)> = Vec::new();
        let mut new_backends: Vec<(&Backend, common::Backend)> = Vec::new();
        let mut rewritten: Vec<(u32, common::Backend)> = Vec::new();
        let mut keep: Vec<u32> = Vec::new();
        for b in &add {
            let value = backend_value(b);
            match self.backend_ids.get(&b.identity()).copied() {
                Some(id) => {
                    if self.backends[&id].value != value {
                        rewritten.push((id, value));
                    }
                    if held_by(id) != usize::from(b.weight) {
                        fill.push((id, b.weight));
                    } else {
                        keep.push(id);
                    }
                }
                None => new_backends.push((b, value)),
            }
        }
        keep.sort_unstable();
        // Holes: the slots of touched ids that do not keep theirs.
        let holes: Vec<usize> = positions
            .into_iter()
            .filter(|p| keep.binary_search(&old_slots[*p]).is_err())
            .collect();
        let added_slots: usize = fill.iter().map(|(_, w)| usize::from(*w)).sum::<usize>()
            + new_backends
                .iter()
                .map(|(b, _)| usize::from(b.weight))
                .sum::<usize>();
        let new_total = old_slots.len() - holes.len() + added_slots;

        // Room checks before any write.
        if new_total > common::MAX_SLOTS_PER_SERVICE as usize {
            return Err(Error::InvalidService {
                frontend: *frontend,
                reason: format!(
                    "{new_total} slots (sum of weights) exceed the limit of {}",
                    common::MAX_SLOTS_PER_SERVICE
                ),
            });
        }
        if new_backends.len() > self.backend_room() {
            return Err(self.no_room(common::BACKENDS_MAP, self.backend_capacity));
        }
        if self.service_entries + new_total.saturating_sub(old_slots.len())
            > common::MAX_SERVICE_ENTRIES as usize
        {
            return Err(self.no_room(common::SERVICES_MAP, common::MAX_SERVICE_ENTRIES));
        }

        // 1. backends: new ones (counter zeroed first), changed flags rewritten in place.
        for (id, value) in rewritten {
            self.store.put_backend(id, &value)?;
            if let Some(state) = self.backends.get_mut(&id) {
                state.value = value;
            }
        }
        for (b, value) in new_backends {
            let id = self.add_backend(b.identity(), value)?;
            fill.push((id, b.weight));
        }
        // This service's reference: taken by ids it did not hold, given back by ids it drops.
        for (id, _) in &fill {
            if held_by(*id) == 0
                && let Some(state) = self.backends.get_mut(id)
            {
                state.refs += 1;
            }
        }
        let refilled: Vec<u32> = fill.iter().map(|(id, _)| *id).collect();
        let dropped: Vec<u32> = touched
            .iter()
            .zip(&held)
            .filter(|(id, n)| **n > 0 && keep.binary_search(id).is_err() && !refilled.contains(id))
            .map(|(id, _)| *id)
            .collect();

        // 2-4. the new slot list: holes refilled in order, extra slots appended, holes that
        // remain filled from the tail, then the shared write order.
        let mut new_slots = old_slots.clone();
        let mut fills = fill
            .iter()
            .flat_map(|(id, w)| std::iter::repeat_n(*id, usize::from(*w)));
        let mut open: Vec<usize> = Vec::new();
        for h in holes {
            match fills.next() {
                Some(id) => new_slots[h] = id,
                None => open.push(h),
            }
        }
        new_slots.extend(fills);
        if !open.is_empty() {
            // Move the last live slots into the lowest open holes, then cut the tail.
            let len = new_slots.len() - open.len();
            let mut tail = (len..new_slots.len())
                .rev()
                .filter(|p| open.binary_search(p).is_err());
            for h in open.iter().copied().filter(|h| *h < len) {
                let from = tail.next().expect("as many live tail slots as low holes");
                new_slots[h] = new_slots[from];
            }
            new_slots.truncate(len);
        }
        self.commit_slots(frontend, service_id, false, &old_slots, new_slots, dropped)?;
        debug!(%frontend, service_id, added = add.len(), removed = remove.len(), "service updated");
        Ok(service_id)
    }

    fn try_delete(&mut self, frontend: &Frontend) -> Result<bool, Error> {
        let Some(state) = self.services.get(frontend).cloned() else {
            return Ok(false);
        };
        self.store.delete_slot(&frontend.key(0))?;
        // Cleared only once slot 0 is gone (and no other frontend shares the bit).
        self.filter_remove(frontend)?;
        for slot in 1..=state.slots.len() {
            self.store.delete_slot(&frontend.key(slot as u32))?;
        }
        self.services.remove(frontend);
        self.service_ids.remove(&state.service_id);
        self.service_entries -= 1 + state.slots.len();
        self.release_backends(state.slots)?;
        debug!(%frontend, "service deleted");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Proto;
    use crate::store::MapOp;

    fn fe(s: &str) -> Frontend {
        s.parse().unwrap()
    }

    fn be(s: &str) -> Backend {
        s.parse().unwrap()
    }

    /// Every backend a client could land on right now, over every slot the current count allows.
    fn reachable(maps: &FakeMaps, f: &Frontend) -> Vec<Backend> {
        let store = maps.store();
        let head = store.slots.get(&f.key(0)).copied();
        let Some(head) = head else { return vec![] };
        (1..=head.count)
            .map(|slot| {
                backend_from_value(
                    &store
                        .resolve(&f.key(0), slot)
                        .expect("slot within count resolves"),
                )
            })
            .collect()
    }

    #[test]
    fn upsert_then_services_reads_back_weights() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        let id = maps
            .upsert_service(
                &f,
                &[be("127.0.0.2:8080@1*2,local"), be("127.0.0.3:8080@2")],
            )
            .unwrap();
        let services = maps.services().unwrap();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].service_id, id);
        assert_eq!(
            services[0].backends,
            vec![be("127.0.0.2:8080@1*2,local"), be("127.0.0.3:8080@2")]
        );
        assert_eq!(reachable(&maps, &f).len(), 3);
    }

    #[test]
    fn slots_are_written_before_the_count_and_removed_after() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        maps.upsert_service(
            &f,
            &[
                be("127.0.0.2:1@1"),
                be("127.0.0.3:1@1"),
                be("127.0.0.4:1@1"),
            ],
        )
        .unwrap();
        maps.store_mut().log.clear();
        maps.upsert_service(&f, &[be("127.0.0.5:1@1")]).unwrap();
        let log = &maps.store().log;
        let head_at = log
            .iter()
            .position(|op| matches!(op, MapOp::PutSlot(k, _) if k.slot == 0))
            .expect("count rewritten");
        let first_put = log
            .iter()
            .position(|op| matches!(op, MapOp::PutBackend(..)))
            .unwrap();
        let first_delete = log
            .iter()
            .position(|op| matches!(op, MapOp::DeleteSlot(_) | MapOp::DeleteBackend(_)))
            .unwrap();
        assert!(
            first_put < head_at,
            "new backend before the switch: {log:?}"
        );
        assert!(head_at < first_delete, "removals after the switch: {log:?}");
    }

    #[test]
    fn every_intermediate_state_serves_old_or_new_backends() {
        // Replay the write log one op at a time; after each op every slot a client could pick
        // (given the slot 0 it reads) must resolve to a backend of the old or the new set, or
        // miss (the program then re-reads slot 0 and finds a complete state).
        let f = fe("udp:[fd00::10]:53");
        let set_a: Vec<Backend> = (1..=5).map(|i| be(&format!("[fd00::{i}]:53@1"))).collect();
        let set_b: Vec<Backend> = (6..=7).map(|i| be(&format!("[fd00::{i}]:53@2"))).collect();
        let mut maps = FakeMaps::new();
        maps.upsert_service(&f, &set_a).unwrap();
        for (from, to) in [(&set_a, &set_b), (&set_b, &set_a)] {
            let start = maps.store().clone();
            maps.store_mut().log.clear();
            maps.upsert_service(&f, to).unwrap();
            let ops = maps.store().log.clone();
            let allowed: HashSet<(std::net::IpAddr, u16)> = from
                .iter()
                .chain(to.iter())
                .map(|b| (b.addr, b.port))
                .collect();
            let mut replay = start;
            for op in ops {
                replay_op(&mut replay, &op);
                assert!(
                    replay.passes_filter(&f.key(0)),
                    "filter bit set after {op:?}"
                );
                let head = replay.slots[&f.key(0)];
                assert!(head.count > 0);
                for slot in 1..=head.count {
                    if let Some(b) = replay.resolve(&f.key(0), slot) {
                        let b = backend_from_value(&b);
                        assert!(allowed.contains(&(b.addr, b.port)), "{b:?} after {op:?}");
                    }
                }
                // The slots within the *new* count always resolve once the count is written.
                if head.count as usize == to.len() {
                    for slot in 1..=head.count {
                        assert!(replay.resolve(&f.key(0), slot).is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn slot_zero_carries_slot_one_and_an_interrupted_switch_is_repaired_on_restart() {
        let f = fe("tcp:127.10.0.1:80");
        let mut maps = FakeMaps::new();
        maps.upsert_service(&f, &[be("127.0.0.2:80@1")]).unwrap();
        let head = maps.store().slots[&f.key(0)];
        assert_eq!(head.count, 1);
        assert_eq!(head.backend_id, maps.store().slots[&f.key(1)].backend_id);
        assert_eq!(reachable(&maps, &f), vec![be("127.0.0.2:80@1")]);

        // Replacing the only backend: backend, slot 1, then slot 0 (the switch), then cleanup.
        let start = maps.store().clone();
        maps.store_mut().log.clear();
        maps.upsert_service(&f, &[be("127.0.0.3:80@1")]).unwrap();
        let log = maps.store().log.clone();
        let pos = |want: u32| {
            log.iter()
                .position(|op| matches!(op, MapOp::PutSlot(k, _) if k.slot == want))
                .unwrap()
        };
        assert!(pos(1) < pos(0), "{log:?}");
        let allowed = [be("127.0.0.2:80@1"), be("127.0.0.3:80@1")]
            .iter()
            .map(|b| (b.addr, b.port))
            .collect();
        assert_every_step_serves(start.clone(), log.clone(), &f, &allowed);

        // A loader that died right after writing slot 1: programs still serve the old backend
        // (slot 0 carries it); a restart keeps serving it and rewrites slot 1 to match.
        let mut crashed = start;
        for op in log.iter().take(pos(1) + 1) {
            match op {
                MapOp::PutSlot(k, v) => {
                    crashed.slots.insert(*k, *v);
                }
                MapOp::PutBackend(id, v) => {
                    crashed.backends.insert(*id, *v);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        crashed.log.clear();
        assert_eq!(
            backend_from_value(&crashed.resolve(&f.key(0), 1).unwrap()),
            be("127.0.0.2:80@1")
        );
        let recovered = FakeMaps::recover(crashed).unwrap();
        assert_eq!(
            recovered.services().unwrap()[0].backends,
            vec![be("127.0.0.2:80@1")]
        );
        let head = recovered.store().slots[&f.key(0)];
        let one = recovered.store().slots[&f.key(1)];
        assert_eq!((one.backend_id, one.addr), (head.backend_id, head.addr));
    }

    #[test]
    fn filter_bits_follow_frontends() {
        let f = fe("tcp:127.10.0.1:80");
        let g = fe("udp:127.10.0.1:80");
        let mut maps = FakeMaps::new();
        assert!(!maps.store().passes_filter(&f.key(0)));
        maps.upsert_service(&f, &[be("127.0.0.2:80@1")]).unwrap();
        maps.upsert_service(&g, &[]).unwrap();
        assert!(maps.store().passes_filter(&f.key(0)));
        assert!(maps.store().passes_filter(&g.key(0)));
        // A second frontend on the same bit keeps it set until the last one goes.
        let bit = filter_bit(&f);
        let h = (1..1u32 << 24)
            .map(|i| {
                Frontend::new(
                    std::net::Ipv4Addr::from(0x7f00_0000 + i).into(),
                    80,
                    Proto::Tcp,
                )
            })
            .find(|h| *h != f && filter_bit(h) == bit)
            .expect("some address shares the bit");
        maps.upsert_service(&h, &[]).unwrap();
        assert!(maps.delete_service(&f).unwrap());
        assert!(
            maps.store().passes_filter(&f.key(0)),
            "h still uses the bit"
        );
        assert!(maps.delete_service(&h).unwrap());
        assert!(!maps.store().passes_filter(&f.key(0)));
        assert!(maps.delete_service(&g).unwrap());
        assert!(maps.store().filter.is_empty(), "{:?}", maps.store().filter);
        // Deleting: slot 0 first, then the bit.
        maps.upsert_service(&f, &[]).unwrap();
        maps.store_mut().log.clear();
        maps.delete_service(&f).unwrap();
        let log = &maps.store().log;
        assert!(
            matches!(log[0], MapOp::DeleteSlot(k) if k.slot == 0),
            "{log:?}"
        );
        assert!(matches!(log[1], MapOp::PutFilter(..)), "{log:?}");
        // A restart on maps whose filter was lost sets the bits again before anything else.
        maps.upsert_service(&f, &[be("127.0.0.2:80@1")]).unwrap();
        let mut store = maps.store().clone();
        store.filter.clear();
        store.log.clear();
        let recovered = FakeMaps::recover(store).unwrap();
        assert!(recovered.store().passes_filter(&f.key(0)));
        assert!(matches!(recovered.store().log[0], MapOp::PutFilter(..)));
    }

    #[test]
    fn one_backend_change_rewrites_one_slot() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        let mut set: Vec<Backend> = (1..=200)
            .map(|i| be(&format!("127.1.{}.{}:80@1", i / 250, i % 250 + 1)))
            .collect();
        maps.upsert_service(&f, &set).unwrap();
        maps.store_mut().log.clear();
        set[17] = be("127.9.9.9:80@1");
        maps.upsert_service(&f, &set).unwrap();
        let log = &maps.store().log;
        let slot_writes = log
            .iter()
            .filter(|op| matches!(op, MapOp::PutSlot(..)))
            .count();
        assert_eq!(slot_writes, 1, "{log:?}");
        assert_eq!(
            log.iter()
                .filter(|op| matches!(op, MapOp::DeleteBackend(_)))
                .count(),
            1
        );
    }

    /// One logged map write applied to a copy of the maps.
    fn replay_op(replay: &mut MemStore, op: &MapOp) {
        match *op {
            MapOp::PutSlot(k, v) => {
                replay.slots.insert(k, v);
            }
            MapOp::DeleteSlot(k) => {
                replay.slots.remove(&k);
            }
            MapOp::PutBackend(id, v) => {
                replay.backends.insert(id, v);
            }
            MapOp::DeleteBackend(id) => {
                replay.backends.remove(&id);
            }
            MapOp::PutFilter(i, w) => {
                replay.put_filter(i, w).unwrap();
            }
        }
    }

    /// Replays `ops` over `start` one at a time; after each, every slot a client could pick must
    /// resolve to a backend of `allowed`.
    fn assert_every_step_serves(
        start: MemStore,
        ops: Vec<MapOp>,
        f: &Frontend,
        allowed: &HashSet<(std::net::IpAddr, u16)>,
    ) {
        let mut replay = start;
        for op in ops {
            replay_op(&mut replay, &op);
            let Some(head) = replay.slots.get(&f.key(0)).copied() else {
                continue;
            };
            assert!(
                replay.passes_filter(&f.key(0)),
                "a frontend in the maps passes the filter after {op:?}"
            );
            // Slots are written before the count grows and removed after it shrinks: every slot
            // within the count a program reads resolves, to an old or a new backend.
            for slot in 1..=head.count {
                let b = replay
                    .resolve(&f.key(0), slot)
                    .unwrap_or_else(|| panic!("slot {slot} of {} misses after {op:?}", head.count));
                let b = backend_from_value(&b);
                assert!(allowed.contains(&(b.addr, b.port)), "{b:?} after {op:?}");
            }
        }
    }

    fn big_service(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| {
                be(&format!(
                    "10.{}.{}.{}:80@{}",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255,
                    1 + i % 2
                ))
            })
            .collect()
    }

    #[test]
    fn one_endpoint_change_of_a_10k_service_is_a_few_writes() {
        let f = fe("tcp:127.10.0.1:80");
        let mut set = big_service(10_000);
        let mut maps = FakeMaps::new();
        maps.upsert_service(&f, &set).unwrap();

        // Remove one: the last slot moves into its hole, the count drops, the tail slot and the
        // backend go.
        let gone = set.remove(17);
        let start = maps.store().clone();
        maps.store_mut().log.clear();
        maps.update_backends(&f, &[], &[gone]).unwrap();
        let log = maps.store().log.clone();
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(
            log.iter()
                .filter(|op| matches!(op, MapOp::DeleteBackend(_)))
                .count(),
            1
        );
        let mut allowed: HashSet<_> = set.iter().map(|b| (b.addr, b.port)).collect();
        assert_every_step_serves(start, log, &f, &allowed);
        assert_eq!(maps.services().unwrap()[0].backends.len(), 9_999);
        assert!(!reachable(&maps, &f).contains(&gone));

        // Add it back: backend (counter zeroed), one slot, the count.
        let start = maps.store().clone();
        maps.store_mut().log.clear();
        maps.update_backends(&f, &[gone], &[]).unwrap();
        let log = maps.store().log.clone();
        assert_eq!(log.len(), 3, "{log:?}");
        allowed.insert((gone.addr, gone.port));
        assert_every_step_serves(start, log, &f, &allowed);
        set.push(gone);
        set.sort();
        assert_eq!(maps.services().unwrap()[0].backends, set);

        // Adding what is there already writes nothing.
        maps.store_mut().log.clear();
        maps.update_backends(&f, &[gone], &[]).unwrap();
        assert!(maps.store().log.is_empty(), "{:?}", maps.store().log);
    }

    #[test]
    fn update_of_a_missing_frontend_creates_it_and_bad_backends_are_refused() {
        let f = fe("tcp:127.10.0.1:80");
        let mut maps = FakeMaps::new();
        maps.update_backends(&f, &[be("127.0.0.2:80@1")], &[be("127.0.0.3:80@1")])
            .unwrap();
        assert_eq!(reachable(&maps, &f), vec![be("127.0.0.2:80@1")]);
        let err = maps
            .update_backends(&f, &[be("[::1]:80@1")], &[])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidService { .. }), "{err}");
        assert_eq!(reachable(&maps, &f), vec![be("127.0.0.2:80@1")]);
    }

    mod update_model {
        use super::*;
        use proptest::prelude::*;

        /// Backend `i` of a pool of 12 (two clusters share addresses), with a weight and flag.
        fn pooled(i: u8, weight: u16, local: bool) -> Backend {
            let mut b = be(&format!("127.0.0.{}:80@{}", 1 + i % 6, 1 + i / 6));
            b.weight = weight;
            b.local = local;
            b
        }

        fn arb_backends(max: usize) -> impl Strategy<Value = Vec<Backend>> {
            prop::collection::vec((0u8..12, 0u16..4, any::<bool>()), 0..max)
                .prop_map(|v| v.into_iter().map(|(i, w, l)| pooled(i, w, l)).collect())
        }

        /// The backend list `update_backends` promises, as a list to give `upsert_service`.
        fn expected(current: &[Backend], add: &[Backend], remove: &[Backend]) -> Vec<Backend> {
            let mut m: BTreeMap<BackendIdentity, Backend> =
                current.iter().map(|b| (b.identity(), *b)).collect();
            for r in remove {
                m.remove(&r.identity());
            }
            let mut merged: BTreeMap<BackendIdentity, Backend> = BTreeMap::new();
            for a in add.iter().filter(|a| a.weight == 0) {
                m.remove(&a.identity());
            }
            for a in add.iter().filter(|a| a.weight > 0) {
                merged
                    .entry(a.identity())
                    .and_modify(|m| {
                        m.weight = m.weight.saturating_add(a.weight);
                        m.local |= a.local;
                    })
                    .or_insert(*a);
            }
            m.extend(merged);
            m.into_values().collect()
        }

        proptest! {
            /// Any sequence of updates over two services sharing backends ends where upserting
            /// the whole new lists ends; the maps read back by a new process say the same; every
            /// intermediate state serves old or new backends only.
            #[test]
            fn updates_equal_upserts(
                steps in prop::collection::vec((any::<bool>(), arb_backends(6), arb_backends(6)), 1..12)
            ) {
                let fronts = [fe("tcp:127.10.0.1:80"), fe("tcp:127.10.0.2:80")];
                let mut maps = FakeMaps::new();
                let mut model = FakeMaps::new();
                for (which, add, remove) in steps {
                    let f = fronts[usize::from(which)];
                    let current = maps
                        .services()
                        .unwrap()
                        .into_iter()
                        .find(|s| s.frontend == f)
                        .map(|s| s.backends)
                        .unwrap_or_default();
                    let want = expected(&current, &add, &remove);
                    let start = maps.store().clone();
                    maps.store_mut().log.clear();
                    maps.update_backends(&f, &add, &remove).unwrap();
                    let allowed: HashSet<_> = current
                        .iter()
                        .chain(&want)
                        .map(|b| (b.addr, b.port))
                        .collect();
                    assert_every_step_serves(start, maps.store().log.clone(), &f, &allowed);
                    model.upsert_service(&f, &want).unwrap();
                    let got = maps.services().unwrap();
                    let wanted = model.services().unwrap();
                    prop_assert_eq!(
                        got.iter().map(|s| (s.frontend, s.backends.clone())).collect::<Vec<_>>(),
                        wanted.iter().map(|s| (s.frontend, s.backends.clone())).collect::<Vec<_>>()
                    );
                    let mut slots = reachable(&maps, &f);
                    slots.sort();
                    let mut want_slots: Vec<Backend> = want
                        .iter()
                        .flat_map(|b| std::iter::repeat_n(b.with_weight(1), usize::from(b.weight)))
                        .collect();
                    want_slots.sort();
                    prop_assert_eq!(slots, want_slots);
                    // Nothing leaked or lost: a restart reads the same services and finds no
                    // leftovers to sweep.
                    let mut store = maps.store().clone();
                    store.log.clear();
                    let again = LbMaps::recover(store).unwrap();
                    prop_assert!(again.store().log.is_empty(), "leftovers: {:?}", again.store().log);
                    prop_assert_eq!(again.services().unwrap(), got);
                    prop_assert_eq!(maps.store().backends.len(), model.store().backends.len());
                }
            }
        }
    }

    #[test]
    fn assign_slots_keeps_positions_and_respects_weights() {
        assert_eq!(assign_slots(&[1, 2, 3], &[(3, 1), (2, 1)]), vec![3, 2]);
        assert_eq!(
            assign_slots(&[1, 2, 3], &[(1, 1), (3, 1), (4, 1)]),
            vec![1, 4, 3]
        );
        assert_eq!(assign_slots(&[], &[(7, 3)]), vec![7, 7, 7]);
        assert_eq!(assign_slots(&[5, 5], &[]), Vec::<u32>::new());
        let out = assign_slots(&[1, 1, 2], &[(1, 1), (2, 2)]);
        assert_eq!(out, vec![1, 2, 2]);
    }

    #[test]
    fn zero_backends_keeps_the_service_with_count_zero() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        maps.upsert_service(&f, &[be("127.0.0.2:1")]).unwrap();
        maps.upsert_service(&f, &[]).unwrap();
        assert_eq!(maps.store().slots[&f.key(0)].count, 0);
        assert!(maps.store().backends.is_empty());
        assert_eq!(maps.services().unwrap()[0].backends, vec![]);
    }

    #[test]
    fn shared_backends_are_refcounted() {
        let mut maps = FakeMaps::new();
        let f1 = fe("tcp:127.10.0.1:80");
        let f2 = fe("udp:127.10.0.1:80");
        let b = be("127.0.0.2:8080@1");
        maps.upsert_service(&f1, &[b]).unwrap();
        maps.upsert_service(&f2, &[b]).unwrap();
        assert_eq!(maps.store().backends.len(), 1);
        assert!(maps.delete_service(&f1).unwrap());
        assert_eq!(maps.store().backends.len(), 1);
        assert!(maps.delete_service(&f2).unwrap());
        assert!(maps.store().backends.is_empty());
        assert!(maps.store().slots.is_empty());
        assert!(!maps.delete_service(&f2).unwrap());
    }

    #[test]
    fn invalid_services_are_refused_with_the_reason() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        let err = maps
            .upsert_service(&f, &[be("[::1]:80")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tcp:127.10.0.1:80") && err.contains("family"),
            "{err}"
        );
        let err = maps
            .upsert_service(&Frontend::new(f.addr, 0, Proto::Tcp), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("port 0"), "{err}");
        assert!(maps.store().log.is_empty());
    }

    #[test]
    fn recover_reads_back_and_sweeps_leftovers() {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        let g = fe("tcp:127.10.0.2:80");
        maps.upsert_service(&f, &[be("127.0.0.2:1@1*2"), be("127.0.0.3:1@1")])
            .unwrap();
        maps.upsert_service(&g, &[]).unwrap();
        let mut store = maps.store().clone();
        // An interrupted update: a slot past the count, an orphan backend.
        store.slots.insert(
            f.key(9),
            ServiceValue {
                backend_id: 1,
                ..Default::default()
            },
        );
        store
            .backends
            .insert(999, backend_value(&be("127.0.0.99:1")));
        store.log.clear();
        let before = maps.services().unwrap();
        let recovered = FakeMaps::recover(store).unwrap();
        assert_eq!(recovered.services().unwrap(), before);
        let log = &recovered.store().log;
        assert_eq!(
            log,
            &vec![MapOp::DeleteSlot(f.key(9)), MapOp::DeleteBackend(999)]
        );
    }

    /// Upsert one backend more than the backends map holds into `maps`: refused for lack of
    /// room. Returns the frontend and the backends.
    fn refused_for_room<S: MapStore>(maps: &mut LbMaps<S>) -> (Frontend, Vec<Backend>) {
        let f = fe("tcp:127.10.0.1:80");
        let many: Vec<Backend> = (0..maps.backend_capacity())
            .map(|i| Backend::new(std::net::Ipv4Addr::from(0x7f00_0000 + i + 1).into(), 80, 1))
            .collect();
        let err = maps.upsert_service(&f, &many).unwrap_err();
        assert!(matches!(err, Error::MapFull { map, .. } if map == common::BACKENDS_MAP));
        (f, many)
    }

    /// A backends map made bigger than the default holds more backends than the default one
    /// (ids past it included), and refuses exactly where its own capacity ends.
    #[test]
    fn the_backends_capacity_is_the_store_s() {
        let cap = common::DEFAULT_MAX_BACKENDS * 2;
        let mut maps = LbMaps::with_empty_store(MemStore::with_backend_capacity(cap));
        assert_eq!(maps.backend_capacity(), cap);
        // Two services of `cap / 2` backends: one more than the map holds (ids start at 1).
        let half = cap / 2;
        let set = |from: u32| -> Vec<Backend> {
            (from..from + half)
                .map(|i| Backend::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 80, 1))
                .collect()
        };
        maps.upsert_service(&fe("tcp:127.10.0.1:80"), &set(0))
            .unwrap();
        let mut second = set(half);
        let last = second.pop().unwrap();
        maps.upsert_service(&fe("tcp:127.10.0.2:80"), &second)
            .unwrap();
        assert_eq!(maps.store().backends.len(), cap as usize - 1);
        assert_eq!(maps.store().backends.keys().max(), Some(&(cap - 1)));
        second.push(last);
        let err = maps
            .upsert_service(&fe("tcp:127.10.0.2:80"), &second)
            .unwrap_err();
        assert!(
            matches!(err, Error::MapFull { map, capacity } if map == common::BACKENDS_MAP && capacity == cap),
            "{err}"
        );
    }

    #[test]
    fn full_maps_are_refused_before_any_write() {
        let mut maps = FakeMaps::new();
        refused_for_room(&mut maps);
        assert!(maps.store().log.is_empty());
    }

    /// Maps with one service of two backends, a local one in cluster 1 and one of cluster 2.
    fn two_backends() -> (FakeMaps, Frontend) {
        let mut maps = FakeMaps::new();
        let f = fe("tcp:127.10.0.1:80");
        maps.upsert_service(&f, &[be("127.0.0.2:1@1,local"), be("127.0.0.3:1@2")])
            .unwrap();
        (maps, f)
    }

    #[test]
    fn counters_follow_backends() {
        let (mut maps, _) = two_backends();
        let ids: Vec<u32> = maps.store().backends.keys().copied().collect();
        maps.store_mut().counters.insert(ids[0], 5);
        let c = maps.counters().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].connections, c[0].local), (5, true));
        assert_eq!((c[1].connections, c[1].local), (0, false));
    }

    /// The backends listed without their counters are the ones the counters list (same ids,
    /// addresses, clusters), and leave with their service.
    #[test]
    fn backend_entries_are_the_counted_backends_without_a_map_read() {
        let (mut maps, f) = two_backends();
        let entries = maps.backend_entries();
        let counted: Vec<_> = maps
            .counters()
            .unwrap()
            .into_iter()
            .map(|c| (c.backend_id, c.addr, c.port, c.cluster_id, c.local))
            .collect();
        let listed: Vec<_> = entries
            .into_iter()
            .map(|e| (e.backend_id, e.addr, e.port, e.cluster_id, e.local))
            .collect();
        assert_eq!(listed, counted);
        assert_eq!(listed.len(), 2);
        maps.delete_service(&f).unwrap();
        assert!(maps.backend_entries().is_empty());
    }

    /// A store that fails every write after the first `budget` ones, and counts the reads of
    /// its slots and backends (a re-read after a failed write).
    struct FailingStore {
        inner: MemStore,
        budget: usize,
        reads: std::cell::Cell<usize>,
    }

    impl FailingStore {
        fn spend(&mut self) -> Result<(), Error> {
            if self.budget == 0 {
                return Err(Error::MapFull {
                    map: common::SERVICES_MAP,
                    capacity: 0,
                });
            }
            self.budget -= 1;
            Ok(())
        }
    }

    impl MapStore for FailingStore {
        fn put_slot(&mut self, k: &common::ServiceKey, v: &ServiceValue) -> Result<(), Error> {
            self.spend()?;
            self.inner.put_slot(k, v)
        }
        fn delete_slot(&mut self, k: &common::ServiceKey) -> Result<(), Error> {
            self.spend()?;
            self.inner.delete_slot(k)
        }
        fn put_backend(&mut self, id: u32, v: &common::Backend) -> Result<(), Error> {
            self.spend()?;
            self.inner.put_backend(id, v)
        }
        fn delete_backend(&mut self, id: u32) -> Result<(), Error> {
            self.spend()?;
            self.inner.delete_backend(id)
        }
        fn reset_counter(&mut self, id: u32) -> Result<(), Error> {
            self.inner.reset_counter(id)
        }
        fn counter(&self, id: u32) -> Result<u64, Error> {
            self.inner.counter(id)
        }
        fn slots(&self) -> Result<Vec<(common::ServiceKey, ServiceValue)>, Error> {
            self.reads.set(self.reads.get() + 1);
            self.inner.slots()
        }
        fn backends(&self) -> Result<Vec<(u32, common::Backend)>, Error> {
            self.reads.set(self.reads.get() + 1);
            self.inner.backends()
        }
        fn put_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
            self.spend()?;
            self.inner.put_filter(index, word)
        }
        fn filter(&self) -> Result<Vec<u64>, Error> {
            self.inner.filter()
        }
        fn backend_capacity(&self) -> u32 {
            self.inner.backend_capacity()
        }
    }

    /// A write refused for lack of room wrote nothing, so nothing is read back (at 64k backends
    /// a re-read per refused write took a core); a write that failed midway is read back.
    #[test]
    fn a_write_refused_for_room_reads_nothing_back_and_one_failed_midway_does() {
        let mut maps = LbMaps::with_empty_store(FailingStore {
            inner: MemStore::new(),
            budget: usize::MAX,
            reads: Default::default(),
        });
        let (f, many) = refused_for_room(&mut maps);
        assert_eq!(
            maps.store().reads.get(),
            0,
            "nothing was written: nothing to read back"
        );
        maps.store_mut().budget = 1;
        maps.upsert_service(&f, &many[..3]).unwrap_err();
        assert!(
            maps.store().reads.get() > 0,
            "a write that failed midway is read back"
        );
        maps.store_mut().budget = usize::MAX;
        maps.upsert_service(&f, &many[..3]).unwrap();
        assert_eq!(maps.services().unwrap()[0].backends.len(), 3);
    }

    #[test]
    fn a_write_failing_midway_leaves_maps_and_mirror_consistent() {
        let f = fe("tcp:127.10.0.1:80");
        let old: Vec<Backend> = (1..=3).map(|i| be(&format!("127.0.1.{i}:80@1"))).collect();
        let new: Vec<Backend> = (1..=5).map(|i| be(&format!("127.0.2.{i}:80@2"))).collect();
        for budget in 0..20 {
            let mut maps = LbMaps::with_empty_store(FailingStore {
                inner: MemStore::new(),
                budget: usize::MAX,
                reads: Default::default(),
            });
            maps.upsert_service(&f, &old).unwrap();
            maps.store_mut().budget = budget;
            let result = maps.upsert_service(&f, &new);
            maps.store_mut().budget = usize::MAX;
            // Whatever happened, the mirror says what the maps hold...
            let reread = LbMaps::read_only(maps.store().inner.clone()).unwrap();
            assert_eq!(maps.services().unwrap(), reread.services().unwrap());
            // ...every slot within the count resolves to a backend of one of the two sets...
            let head = maps.store().inner.slots[&f.key(0)];
            for slot in 1..=head.count {
                let b = backend_from_value(&maps.store().inner.resolve(&f.key(0), slot).unwrap());
                assert!(
                    old.contains(&b) || new.contains(&b),
                    "budget {budget}: {b:?}"
                );
            }
            assert!(result.is_ok() || head.count > 0, "budget {budget}");
            // ...and the next write completes the update.
            maps.upsert_service(&f, &new).unwrap();
            assert_eq!(maps.services().unwrap()[0].backends, new);
            assert_eq!(maps.store().inner.backends.len(), new.len());
        }
    }
}
