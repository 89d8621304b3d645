//! Map layouts and their migration. Every map has this build's shape for the configured backends
//! capacity (`global_lb_bpf_common::map_specs`); a map pinned with another shape was made by
//! another build, or for another capacity, and is not reused as it is (the programs would misread
//! it, or it would not hold what is asked): [`stale_pins`] finds them,
//! [`carry_services`] reads the services out of a known older layout (the first layout's 16-byte
//! slot values, or this one), and [`replace_maps`] writes them into maps of this layout and pins
//! those over the old pins. The reverse NAT of the first layouts (a cookie-keyed LRU) is the one
//! exception: it is reused at whatever capacity it was made with, read only, so sockets an older
//! build translated keep their service address across the upgrade.
//!
//! A map a build adds (the connection table `GLB_SOCK_CONN`, issue 21) is simply created and
//! pinned next to the others. Live sockets an older build translated keep their state where that
//! build put it: socket-local storage (`GLB_SOCK_REV_NAT`, `GLB_SOCK_REV_NAT_UDP`, reused as
//! pinned) or the LRU; the reverse programs read the table, then the storage, then the LRU.

use std::path::Path;

use aya::Ebpf;
use aya::maps::{Array, HashMap as AyaHashMap, IterableMap as _, Map, MapData, PerCpuArray};
use global_lb_bpf_common::{self as common, ServiceKey, ServiceValue};
use tracing::{info, warn};

use super::aya_store::{AyaStore, layout_err, map_err, take_map};
use super::pin::pin_over;
use crate::maps::{LbMaps, ServiceMaps};
use crate::signals::{KernelSignals, SuspectEvents};
use crate::{Error, Service};

/// The maps of [`crate::signals`].
const SIGNAL_MAPS: [&str; 4] = [
    common::OUTCOMES_MAP,
    common::SUSPECT_MAP,
    common::SUSPECT_GATE_MAP,
    common::EVENTS_MAP,
];

/// Takes the signal maps out of the object; a replaced one (another layout was pinned) is pinned
/// over the old pin.
pub(super) fn take_signals(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    replaced: &[&'static str],
) -> Result<(KernelSignals, SuspectEvents), Error> {
    let mut take = |name: &'static str| -> Result<Map, Error> {
        let map = take_map(ebpf, name)?;
        if replaced.contains(&name) {
            pin_over(pin_dir, name, map_data(&map))?;
        }
        Ok(map)
    };
    let outcomes = PerCpuArray::try_from(take(common::OUTCOMES_MAP)?)
        .map_err(layout_err(common::OUTCOMES_MAP))?;
    let suspect = AyaHashMap::try_from(take(common::SUSPECT_MAP)?)
        .map_err(layout_err(common::SUSPECT_MAP))?;
    let gate = Array::try_from(take(common::SUSPECT_GATE_MAP)?)
        .map_err(layout_err(common::SUSPECT_GATE_MAP))?;
    let ring = aya::maps::RingBuf::try_from(take(common::EVENTS_MAP)?)
        .map_err(layout_err(common::EVENTS_MAP))?;
    Ok((
        KernelSignals::new(outcomes, suspect, gate),
        SuspectEvents::new(ring),
    ))
}

/// This build's shape of map `name`, with a backends map of `max_backends` entries.
pub(super) fn spec_of(name: &str, max_backends: u32) -> (&'static str, common::MapSpec) {
    common::map_specs(max_backends)
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .expect("every map has a spec")
}

/// The shape of the map pinned at `path`, if one is.
pub(super) fn pinned_spec(
    name: &'static str,
    path: &Path,
) -> Result<Option<common::MapSpec>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| Error::MapLayout {
        map: name,
        reason: format!("reading the pin {}: {e}", path.display()),
    })?;
    Ok(Some(common::MapSpec {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// Whether a map pinned with shape `found` is what this build's programs expect of map `name`.
/// The legacy reverse-NAT LRU is read only, at whatever capacity it was made with.
pub(super) fn same_shape(name: &str, found: &common::MapSpec, want: &common::MapSpec) -> bool {
    if name == common::REV_NAT_MAP {
        return common::MapSpec {
            max_entries: want.max_entries,
            ..*found
        } == *want;
    }
    found == want
}

/// Pinned maps whose shape differs from this build's with a backends map of `max_backends`
/// entries, with the shape found.
pub(super) fn stale_pins(
    pin_dir: &Path,
    max_backends: u32,
) -> Result<Vec<(&'static str, common::MapSpec)>, Error> {
    let mut out = Vec::new();
    for (name, want) in common::map_specs(max_backends) {
        if let Some(found) = pinned_spec(name, &pin_dir.join(name))?
            && !same_shape(name, &found, &want)
        {
            out.push((name, found));
        }
    }
    Ok(out)
}

/// The services held by the services and backends maps pinned under `pin_dir`, read in the
/// layout they were written in (the first layout, 16-byte slot values, or this one). A layout
/// this build does not know carries nothing over (and says so): the caller writes its services
/// again. A known layout that cannot be read is an error: nothing is replaced, the old maps and
/// programs keep serving, and the next start tries again.
pub(super) fn carry_services(
    pin_dir: &Path,
    stale: &[(&'static str, common::MapSpec)],
) -> Result<Vec<Service>, Error> {
    let value_size = stale
        .iter()
        .find(|(n, _)| *n == common::SERVICES_MAP)
        .map_or(std::mem::size_of::<ServiceValue>(), |(_, s)| {
            s.value_size as usize
        });
    let known = value_size == std::mem::size_of::<common::ServiceValueV1>()
        || value_size == std::mem::size_of::<ServiceValue>();
    match read_pinned_services(pin_dir, stale) {
        Ok(services) => {
            info!(
                services = services.len(),
                "carrying the services over to the maps of this layout"
            );
            Ok(services)
        }
        Err(e) if known => Err(e),
        Err(e) => {
            warn!(
                error = %e,
                value_size,
                "the pinned services map has a layout this build does not know; starting with \
                 empty maps (services must be written again)"
            );
            Ok(Vec::new())
        }
    }
}

pub(super) fn read_pinned_services(
    pin_dir: &Path,
    stale: &[(&'static str, common::MapSpec)],
) -> Result<Vec<Service>, Error> {
    let open = |name: &'static str| -> Result<Option<MapData>, Error> {
        let path = pin_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        MapData::from_pin(&path)
            .map(Some)
            .map_err(|e| Error::MapLayout {
                map: name,
                reason: format!("opening the pin {}: {e}", path.display()),
            })
    };
    let found = |name: &str| {
        stale
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(spec_of(name, common::DEFAULT_MAX_BACKENDS).1, |(_, s)| *s)
    };
    let (Some(services), Some(backends)) =
        (open(common::SERVICES_MAP)?, open(common::BACKENDS_MAP)?)
    else {
        return Ok(Vec::new());
    };
    // A mirror as big as the pinned backends map, whatever capacity it was made with.
    let capacity = backends
        .info()
        .map_err(map_err(common::BACKENDS_MAP, "read the capacity of"))?
        .max_entries();
    let mut mem = crate::store::MemStore::with_backend_capacity(capacity);
    let backends = AyaHashMap::<_, u32, common::Backend>::try_from(Map::HashMap(backends))
        .map_err(layout_err(common::BACKENDS_MAP))?;
    for entry in backends.iter() {
        let (id, value) = entry.map_err(map_err(common::BACKENDS_MAP, "iterate"))?;
        mem.backends.insert(id, value);
    }
    let services_spec = found(common::SERVICES_MAP);
    if services_spec.value_size as usize == std::mem::size_of::<common::ServiceValueV1>() {
        let services =
            AyaHashMap::<_, ServiceKey, common::ServiceValueV1>::try_from(Map::HashMap(services))
                .map_err(layout_err(common::SERVICES_MAP))?;
        let mut heads = Vec::new();
        for entry in services.iter() {
            let (key, old) = entry.map_err(map_err(common::SERVICES_MAP, "iterate"))?;
            let mut value = ServiceValue {
                backend_id: old.backend_id,
                count: old.count,
                service_id: old.service_id,
                ..ServiceValue::default()
            };
            if let Some(b) = mem.backends.get(&old.backend_id) {
                (value.addr, value.port, value.family) = (b.addr, b.port, b.family);
            }
            if key.slot == 0 {
                heads.push(key);
            }
            mem.slots.insert(key, value);
        }
        // The first layout's slot 0 carried no backend; this one carries slot 1's.
        for key in heads {
            let mut one = key;
            one.slot = 1;
            if let Some(first) = mem.slots.get(&one).copied()
                && let Some(head) = mem.slots.get_mut(&key)
            {
                (head.backend_id, head.addr, head.port, head.family) =
                    (first.backend_id, first.addr, first.port, first.family);
            }
        }
    } else {
        let services = AyaHashMap::<_, ServiceKey, ServiceValue>::try_from(Map::HashMap(services))
            .map_err(layout_err(common::SERVICES_MAP))?;
        for entry in services.iter() {
            let (key, value) = entry.map_err(map_err(common::SERVICES_MAP, "iterate"))?;
            mem.slots.insert(key, value);
        }
    }
    LbMaps::read_only(mem)?.services()
}

/// Replaces the pinned maps `replaced` (created unpinned by the loader) : writes the `carried`
/// services into the new services and backends maps, then pins each new map next to the old
/// one and renames it over the old pin. Programs still attached keep the old maps until their
/// links are replaced.
pub(super) fn replace_maps(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    replaced: &[&'static str],
    carried: Option<Vec<Service>>,
    max_backends: u32,
) -> Result<LbMaps<AyaStore>, Error> {
    let mut taken: Vec<(&'static str, Map)> = Vec::new();
    for name in replaced {
        if *name != common::SERVICES_MAP
            && *name != common::BACKENDS_MAP
            && *name != common::COUNTERS_MAP
            && *name != common::FILTER_MAP
            && !SIGNAL_MAPS.contains(name)
        {
            taken.push((name, take_map(ebpf, name)?));
        }
    }
    let store = AyaStore::take(ebpf)?;
    let mut maps = if carried.is_some() {
        // New, empty services and backends maps (counters are reused or new: zeroed per new
        // backend id either way).
        let mut maps = LbMaps::with_empty_store(store);
        for service in carried.unwrap_or_default() {
            maps.upsert_service(&service.frontend, &service.backends)
                .map_err(|e| match e {
                    Error::MapFull { map, capacity } if map == common::BACKENDS_MAP => {
                        Error::MapLayout {
                            map,
                            reason: format!(
                                "the pinned maps hold more backends than a backends map of \
                                 {capacity} entries (max_backends {max_backends}): not resized; \
                                 the pinned maps keep serving"
                            ),
                        }
                    }
                    other => other,
                })?;
        }
        maps
    } else {
        LbMaps::recover(store)?
    };
    let pin = |name: &'static str, map: &MapData| pin_over(pin_dir, name, map);
    for (name, map) in &taken {
        pin(name, map_data(map))?;
    }
    let store = maps.store_mut();
    for name in replaced {
        match *name {
            common::SERVICES_MAP => pin(name, store.services.map())?,
            common::BACKENDS_MAP => pin(name, store.backends.map())?,
            common::COUNTERS_MAP => pin(name, store.counters.map())?,
            common::FILTER_MAP => {
                if let Some(filter) = &store.filter {
                    pin(name, filter.map())?;
                }
            }
            _ => {}
        }
    }
    Ok(maps)
}

/// The map data under any kind of map this crate uses.
pub(super) fn map_data(map: &Map) -> &MapData {
    match map {
        Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::Array(m)
        | Map::SkStorage(m) => m,
        other => unreachable!("no map of this crate is a {other:?}"),
    }
}
