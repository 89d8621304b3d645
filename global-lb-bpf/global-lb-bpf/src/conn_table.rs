//! The connection table (`GLB_SOCK_CONN`) seen from user space: how many live translated
//! sockets keep their reverse NAT there, and, for benchmarks and tests of the other path, every
//! free slot reserved so that connects keep their state in socket-local storage instead.
//!
//! The programs own the slots: a connect claims the slot of its socket's cookie with a
//! compare-and-swap, `sock_release` frees it. User space cannot compare-and-swap a map value, so
//! [`ConnTable::reserve_free_slots`] is for a quiet datapath only (a benchmark, a test): a
//! connect that claimed a slot between its read and its write would lose its state.

use std::path::Path;

use aya::maps::{Array, Map, MapData};
use global_lb_bpf_common::{ConnSlot, MAX_SOCK_CONN, SOCK_CONN_MAP};

use crate::Error;

/// Tags at or above this are reserved by [`ConnTable::reserve_free_slots`]: socket cookies
/// count up from 1 and never get there.
const RESERVED: u64 = 1 << 63;

/// The pinned connection table of a datapath.
pub struct ConnTable {
    slots: Array<MapData, ConnSlot>,
}

fn table_err(op: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map: SOCK_CONN_MAP,
        op,
        source: Box::new(e),
    }
}

impl ConnTable {
    /// Opens the table pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        let path = pin_dir.join(SOCK_CONN_MAP);
        let data = MapData::from_pin(&path).map_err(|e| Error::MapLayout {
            map: SOCK_CONN_MAP,
            reason: format!("opening the pin {}: {e}", path.display()),
        })?;
        let slots = Array::try_from(Map::Array(data)).map_err(|e| Error::MapLayout {
            map: SOCK_CONN_MAP,
            reason: e.to_string(),
        })?;
        Ok(Self { slots })
    }

    /// Slots held by live sockets (reserved ones not counted).
    pub fn live_slots(&self) -> Result<usize, Error> {
        let mut live = 0;
        for slot in self.slots.iter() {
            let tag = slot.map_err(table_err("read"))?.cookie;
            if tag != 0 && tag < RESERVED {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Reserves every free slot: until [`ConnTable::release_reserved`], connects find their slot
    /// taken and keep their state in socket-local storage. Returns how many were reserved.
    /// Only while no translated socket is being opened (see the module doc).
    pub fn reserve_free_slots(&mut self) -> Result<usize, Error> {
        let mut reserved = 0;
        for i in 0..MAX_SOCK_CONN {
            let slot = self.slots.get(&i, 0).map_err(table_err("read"))?;
            if slot.cookie == 0 {
                let tag = ConnSlot {
                    cookie: RESERVED | u64::from(i),
                    ..ConnSlot::default()
                };
                self.slots.set(i, tag, 0).map_err(table_err("reserve"))?;
                reserved += 1;
            }
        }
        Ok(reserved)
    }

    /// Frees the slots [`ConnTable::reserve_free_slots`] reserved.
    pub fn release_reserved(&mut self) -> Result<(), Error> {
        for i in 0..MAX_SOCK_CONN {
            let slot = self.slots.get(&i, 0).map_err(table_err("read"))?;
            if slot.cookie >= RESERVED {
                self.slots
                    .set(i, ConnSlot::default(), 0)
                    .map_err(table_err("release"))?;
            }
        }
        Ok(())
    }
}
