//! Raw map access: the one seam between the service logic and the kernel.
//!
//! [`MapStore`] is the set of map operations [`crate::LbMaps`] needs. The aya implementation
//! is behind [`crate::Datapath`]; [`MemStore`] keeps the same maps in memory (with the same
//! capacities) so the update logic, and callers such as node-sync, are tested without a kernel.

use std::collections::{BTreeMap, HashMap};

use global_lb_bpf_common::{self as common, Backend, ServiceKey, ServiceValue};

use crate::Error;

/// The map operations the service logic is built from. Single writer: one `MapStore` per set of
/// pinned maps at a time.
pub trait MapStore {
    /// Inserts or replaces a services-map entry.
    fn put_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error>;
    /// Removes a services-map entry (absent is not an error).
    fn delete_slot(&mut self, key: &ServiceKey) -> Result<(), Error>;
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Error>;
    /// Removes a backend (absent is not an error).
    fn delete_backend(&mut self, id: u32) -> Result<(), Error>;
    /// Sets a backend's connection counter to zero on every CPU.
    fn reset_counter(&mut self, id: u32) -> Result<(), Error>;
    /// A backend's connection counter, summed over CPUs.
    fn counter(&self, id: u32) -> Result<u64, Error>;
    /// Every services-map entry.
    fn slots(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error>;
    /// Every backend.
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Error>;
    /// Writes word `index` of the frontend pre-filter.
    fn put_filter(&mut self, index: u32, word: u64) -> Result<(), Error>;
    /// The pre-filter's words (`FILTER_WORDS` of them).
    fn filter(&self) -> Result<Vec<u64>, Error>;
    /// Capacity of the backends map (and of the maps indexed by backend id): backend ids are
    /// `1..capacity`.
    fn backend_capacity(&self) -> u32;
}

/// One operation on the maps, as recorded by [`MemStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// [`MapStore::put_slot`].
    PutSlot(ServiceKey, ServiceValue),
    /// [`MapStore::delete_slot`].
    DeleteSlot(ServiceKey),
    /// [`MapStore::put_backend`].
    PutBackend(u32, Backend),
    /// [`MapStore::delete_backend`].
    DeleteBackend(u32),
    /// [`MapStore::put_filter`].
    PutFilter(u32, u64),
}

/// The maps in memory, with the kernel maps' capacities, recording every write in order.
#[derive(Clone, Debug)]
pub struct MemStore {
    /// Services map.
    pub slots: BTreeMap<ServiceKey, ServiceValue>,
    /// Backends map.
    pub backends: BTreeMap<u32, Backend>,
    /// Connection counters (tests bump them to play the datapath).
    pub counters: HashMap<u32, u64>,
    /// Non-zero words of the frontend pre-filter.
    pub filter: BTreeMap<u32, u64>,
    /// Every write, in order.
    pub log: Vec<MapOp>,
    /// Capacity of the backends map.
    pub backend_capacity: u32,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::with_backend_capacity(common::DEFAULT_MAX_BACKENDS)
    }
}

impl MemStore {
    /// Empty maps, the backends map of the default capacity.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty maps, the backends map of `capacity` entries.
    pub fn with_backend_capacity(capacity: u32) -> Self {
        Self {
            slots: BTreeMap::new(),
            backends: BTreeMap::new(),
            counters: HashMap::new(),
            filter: BTreeMap::new(),
            log: Vec::new(),
            backend_capacity: capacity,
        }
    }

    /// Whether the pre-filter lets a connect to `key`'s frontend through to the services map
    /// (the programs' first check).
    pub fn passes_filter(&self, key: &ServiceKey) -> bool {
        let bit = common::filter_bit(&key.addr, key.port, key.proto);
        self.filter
            .get(&(bit >> 6))
            .is_some_and(|w| w & (1 << (bit & 63)) != 0)
    }

    /// What a connecting client would see right now for `key`'s frontend if it picked slot
    /// `slot`: the backend, or None (miss). Mirrors the eBPF program: slot 1 comes from slot 0,
    /// which carries it, any other slot from its own entry; the address, port and family are the
    /// ones the slot carries (the program never reads the backends map), the cluster id and flags
    /// those of the backends map (0 if the backend is gone).
    pub fn resolve(&self, frontend_key: &ServiceKey, slot: u32) -> Option<Backend> {
        if !self.passes_filter(frontend_key) {
            return None;
        }
        let mut k = *frontend_key;
        k.slot = if slot == 1 { 0 } else { slot };
        let v = self.slots.get(&k)?;
        if v.family == 0 {
            return None;
        }
        let known = self.backends.get(&v.backend_id);
        Some(Backend {
            addr: v.addr,
            port: v.port,
            cluster_id: known.map_or(0, |b| b.cluster_id),
            flags: known.map_or(0, |b| b.flags),
            family: v.family,
            pad: [0; 2],
        })
    }
}

impl MapStore for MemStore {
    fn put_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        if !self.slots.contains_key(key) && self.slots.len() >= common::MAX_SERVICE_ENTRIES as usize
        {
            return Err(Error::MapFull {
                map: common::SERVICES_MAP,
                capacity: common::MAX_SERVICE_ENTRIES,
            });
        }
        self.slots.insert(*key, *value);
        self.log.push(MapOp::PutSlot(*key, *value));
        Ok(())
    }

    fn delete_slot(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.slots.remove(key);
        self.log.push(MapOp::DeleteSlot(*key));
        Ok(())
    }

    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Error> {
        if !self.backends.contains_key(&id) && self.backends.len() >= self.backend_capacity as usize
        {
            return Err(Error::MapFull {
                map: common::BACKENDS_MAP,
                capacity: self.backend_capacity,
            });
        }
        self.backends.insert(id, *value);
        self.log.push(MapOp::PutBackend(id, *value));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), Error> {
        self.backends.remove(&id);
        self.log.push(MapOp::DeleteBackend(id));
        Ok(())
    }

    fn reset_counter(&mut self, id: u32) -> Result<(), Error> {
        self.counters.remove(&id);
        Ok(())
    }

    fn counter(&self, id: u32) -> Result<u64, Error> {
        Ok(self.counters.get(&id).copied().unwrap_or(0))
    }

    fn slots(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, Error> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn put_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        if word == 0 {
            self.filter.remove(&index);
        } else {
            self.filter.insert(index, word);
        }
        self.log.push(MapOp::PutFilter(index, word));
        Ok(())
    }

    fn filter(&self) -> Result<Vec<u64>, Error> {
        let mut out = vec![0; common::FILTER_WORDS as usize];
        for (i, w) in &self.filter {
            out[*i as usize] = *w;
        }
        Ok(out)
    }

    fn backend_capacity(&self) -> u32 {
        self.backend_capacity
    }
}
