//! [`AyaStore`]: the [`MapStore`] [`LbMaps`](crate::LbMaps) writes through, over the kernel's
//! services, backends, counters and pre-filter maps; and the errors of map operations, named
//! after the map.

use aya::Ebpf;
use aya::maps::{
    Array, HashMap as AyaHashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
    PerCpuValues,
};
use global_lb_bpf_common::{self as common, ServiceKey, ServiceValue};

use crate::Error;
use crate::store::MapStore;

/// [`MapStore`] over the kernel maps.
pub struct AyaStore {
    pub(super) services: AyaHashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) backends: AyaHashMap<MapData, u32, common::Backend>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    /// The pre-filter; absent in a read-only view.
    pub(super) filter: Option<Array<MapData, u64>>,
    nr_cpus: usize,
    /// The backends map's capacity, as the kernel reports it.
    backend_capacity: u32,
}

pub(super) fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name).ok_or_else(|| Error::MapLayout {
        map: name,
        reason: "missing from the eBPF object".into(),
    })
}

pub(super) fn layout_err(map: &'static str) -> impl Fn(MapError) -> Error {
    move |e| Error::MapLayout {
        map,
        reason: format!(
            "{e} (pinned by an incompatible version? remove the pin directory to start afresh)"
        ),
    }
}

pub(super) fn map_err(map: &'static str, op: &'static str) -> impl Fn(MapError) -> Error {
    let capacity = match map {
        common::SERVICES_MAP => common::MAX_SERVICE_ENTRIES,
        _ => 0,
    };
    sized_map_err(map, op, capacity)
}

/// [`map_err`] for a map of `capacity` entries (named in the error when it is full).
pub(super) fn sized_map_err(
    map: &'static str,
    op: &'static str,
    capacity: u32,
) -> impl Fn(MapError) -> Error {
    move |e| {
        if let MapError::SyscallError(s) = &e
            && s.io_error.raw_os_error() == Some(libc::E2BIG)
        {
            return Error::MapFull { map, capacity };
        }
        Error::Map {
            map,
            op,
            source: Box::new(e),
        }
    }
}

pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl AyaStore {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut store = Self::from_maps(
            take_map(ebpf, common::SERVICES_MAP)?,
            take_map(ebpf, common::BACKENDS_MAP)?,
            take_map(ebpf, common::COUNTERS_MAP)?,
        )?;
        store.filter = Some(
            Array::try_from(take_map(ebpf, common::FILTER_MAP)?)
                .map_err(layout_err(common::FILTER_MAP))?,
        );
        Ok(store)
    }

    pub(super) fn from_maps(services: Map, backends: Map, counters: Map) -> Result<Self, Error> {
        let services = AyaHashMap::try_from(services).map_err(layout_err(common::SERVICES_MAP))?;
        let backends: AyaHashMap<MapData, u32, common::Backend> =
            AyaHashMap::try_from(backends).map_err(layout_err(common::BACKENDS_MAP))?;
        let counters = PerCpuArray::try_from(counters).map_err(layout_err(common::COUNTERS_MAP))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| Error::Io {
            what: "reading",
            path: what.into(),
            source: e,
        })?;
        let backend_capacity = backends
            .map()
            .info()
            .map_err(map_err(common::BACKENDS_MAP, "read the capacity of"))?
            .max_entries();
        Ok(Self {
            services,
            backends,
            counters,
            filter: None,
            nr_cpus,
            backend_capacity,
        })
    }
}

impl MapStore for AyaStore {
    fn put_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(common::SERVICES_MAP, "insert"))
    }

    fn delete_slot(&mut self, key: &ServiceKey) -> Result<(), Error> {
        match self.services.remove(key) {
            Err(e) if !is_not_found(&e) => Err(map_err(common::SERVICES_MAP, "remove")(e)),
            _ => Ok(()),
        }
    }

    fn put_backend(&mut self, id: u32, value: &common::Backend) -> Result<(), Error> {
        self.backends.insert(id, value, 0).map_err(sized_map_err(
            common::BACKENDS_MAP,
            "insert",
            self.backend_capacity,
        ))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), Error> {
        match self.backends.remove(&id) {
            Err(e) if !is_not_found(&e) => Err(map_err(common::BACKENDS_MAP, "remove")(e)),
            _ => Ok(()),
        }
    }

    fn reset_counter(&mut self, id: u32) -> Result<(), Error> {
        let zeros =
            PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(|source| Error::Io {
                what: "sizing per-CPU values for",
                path: common::COUNTERS_MAP.into(),
                source,
            })?;
        self.counters
            .set(id, zeros, 0)
            .map_err(map_err(common::COUNTERS_MAP, "reset"))
    }

    fn counter(&self, id: u32) -> Result<u64, Error> {
        let values = self
            .counters
            .get(&id, 0)
            .map_err(map_err(common::COUNTERS_MAP, "read"))?;
        Ok(values.iter().sum())
    }

    fn slots(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        let mut out = Vec::new();
        for entry in self.services.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(common::SERVICES_MAP, "iterate")(e)),
            }
        }
        Ok(out)
    }

    fn backends(&self) -> Result<Vec<(u32, common::Backend)>, Error> {
        let mut out = Vec::new();
        for entry in self.backends.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(common::BACKENDS_MAP, "iterate")(e)),
            }
        }
        Ok(out)
    }
    fn put_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        let filter = self.filter.as_mut().ok_or_else(|| Error::MapLayout {
            map: common::FILTER_MAP,
            reason: "not opened for writing (read-only view)".into(),
        })?;
        filter
            .set(index, word, 0)
            .map_err(map_err(common::FILTER_MAP, "update"))
    }

    fn filter(&self) -> Result<Vec<u64>, Error> {
        let Some(filter) = &self.filter else {
            return Ok(vec![0; common::FILTER_WORDS as usize]);
        };
        (0..common::FILTER_WORDS)
            .map(|i| {
                filter
                    .get(&i, 0)
                    .map_err(map_err(common::FILTER_MAP, "read"))
            })
            .collect()
    }

    fn backend_capacity(&self) -> u32 {
        self.backend_capacity
    }
}
