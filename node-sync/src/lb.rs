//! The load-balancer view node-sync programs: frontends, backends, the [`MapWriter`] trait the
//! datapath implements, an in-memory [`FakeMaps`] for tests and benchmarks, and the [`Reconciler`]
//! that brings the maps to the desired state with the fewest writes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use mesh_model::ClusterName;
use mesh_model::values::Protocol;
use serde::Serialize;

/// A service address the datapath rewrites: (VIP, port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Frontend {
    /// Virtual IP (ClusterIP or ClusterSetIP).
    pub ip: IpAddr,
    /// Port on the VIP.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A cluster name interned for the life of the process: cloning, comparing and dropping a
/// backend touch no reference count and read no bytes (a selection at 255 clusters copies 2,550
/// backends per changed endpoint, and the maps' bookkeeping copies and drops them again).
///
/// Interned names are never freed. They are the names of the mesh's clusters, which node-sync
/// takes only from the keys of the etcds it was told to trust, each validated by the cluster name
/// rules (at most 32 characters): at most a few hundred in a mesh of 255 (511) clusters, under
/// 100 bytes each, and a name seen again (a cluster that reconnects, is removed and comes back)
/// is the same entry.
#[derive(Clone)]
pub struct ClusterRef(&'static ClusterName);

impl ClusterRef {
    /// The interned `name`.
    pub fn new(name: ClusterName) -> Self {
        static NAMES: OnceLock<Mutex<HashSet<&'static ClusterName>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = names.get(&name) {
            return Self(n);
        }
        let n: &'static ClusterName = Box::leak(Box::new(name));
        names.insert(n);
        Self(n)
    }

    /// The name.
    pub fn name(&self) -> &ClusterName {
        self.0
    }
}

/// Interned: the same name is the same address.
impl PartialEq for ClusterRef {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for ClusterRef {}

/// By name (as [`ClusterName`], so maps keyed by a `ClusterRef` find a `ClusterName`).
impl Ord for ClusterRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if std::ptr::eq(self.0, other.0) {
            return std::cmp::Ordering::Equal;
        }
        self.0.cmp(other.0)
    }
}

impl PartialOrd for ClusterRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// By name (as [`ClusterName`]).
impl std::hash::Hash for ClusterRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl std::ops::Deref for ClusterRef {
    type Target = ClusterName;
    fn deref(&self) -> &ClusterName {
        self.0
    }
}

impl std::borrow::Borrow<ClusterName> for ClusterRef {
    fn borrow(&self) -> &ClusterName {
        self.0
    }
}

impl From<ClusterName> for ClusterRef {
    fn from(n: ClusterName) -> Self {
        Self::new(n)
    }
}

impl PartialEq<ClusterName> for ClusterRef {
    fn eq(&self, other: &ClusterName) -> bool {
        *self.0 == *other
    }
}

impl fmt::Debug for ClusterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl fmt::Display for ClusterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl Serialize for ClusterRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// A backend list shared between the index, the reconciler and the status page.
pub type Backends = Arc<[Backend]>;

/// One backend a frontend may be rewritten to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    /// Cluster the backend runs in.
    pub cluster: ClusterRef,
    /// Address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}@{}", self.port, self.cluster),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}@{}", self.port, self.cluster),
        }
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("map {op} of service {frontend}: {detail}")]
pub struct MapError {
    /// The operation (`upsert`, `delete`, `list`).
    pub op: &'static str,
    /// The frontend concerned (`*` for a listing).
    pub frontend: String,
    /// What failed.
    pub detail: String,
    /// The maps had no room for it (their capacity: node-sync --max-backends), nothing was
    /// written.
    pub no_room: bool,
}

/// What the datapath must offer node-sync: set, delete and list services.
///
/// An upsert replaces the whole backend set of one frontend atomically (the eBPF implementation
/// writes new backend slots first and the count last).
pub trait MapWriter: Send {
    /// Program `frontend` with exactly `backends` (may be empty: connects then fail fast).
    fn upsert_service(&mut self, frontend: &Frontend, backends: &[Backend])
    -> Result<(), MapError>;
    /// Program `frontend`, which holds `old` now, with exactly `new`. Writers that can change a
    /// few backends without rewriting the whole set override this (one endpoint change of a
    /// 10k-backend service must not cost a 10k-backend rewrite); the default upserts `new`.
    fn update_service(
        &mut self,
        frontend: &Frontend,
        old: &[Backend],
        new: &[Backend],
    ) -> Result<(), MapError> {
        let _ = old;
        self.upsert_service(frontend, new)
    }
    /// Remove `frontend` from the maps.
    fn delete_service(&mut self, frontend: &Frontend) -> Result<(), MapError>;
    /// Everything programmed now (read back from pinned maps after a restart).
    fn services(&mut self) -> Result<HashMap<Frontend, Vec<Backend>>, MapError>;

    /// What the kernel counted for backend id `id`, whether or not a backend holds it now (the
    /// counts of a backend just removed are read once more).
    fn connect_outcome(&mut self, id: u32) -> Option<global_lb_bpf::signals::Outcomes> {
        let _ = id;
        None
    }

    /// Every backend in the maps by id, from the writer's own record (no kernel read); empty
    /// when the writer does not count per backend.
    fn backend_ids(&mut self) -> Vec<(u32, Backend)> {
        Vec::new()
    }

    /// Connections the datapath sent to backend `id` (one kernel lookup: see
    /// `agent::state::CounterScan`); `None` when the writer does not count per backend.
    fn connections_to(&mut self, id: u32) -> Option<u64> {
        let _ = id;
        None
    }

    /// How many more distinct backends the maps hold; `None` when they have no such limit.
    fn free_backends(&self) -> Option<usize> {
        None
    }

    /// The backend the datapath knows by `id`.
    fn backend_by_id(&mut self, id: u32) -> Option<Backend> {
        let _ = id;
        None
    }

    /// Clears the kernel's suspect mark of backend `id` (a probe found it answering).
    fn clear_suspect(&mut self, id: u32) {
        let _ = id;
    }

    /// Removes expired suspect marks.
    fn sweep_suspects(&mut self) {}
}

/// Counts of writes, for tests and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Upserts done.
    pub upserts: u64,
    /// Deletes done.
    pub deletes: u64,
}

#[derive(Debug, Default)]
struct FakeInner {
    services: HashMap<Frontend, Vec<Backend>>,
    counts: WriteCounts,
    history: Vec<(std::time::Instant, Frontend)>,
    record_history: bool,
}

/// An in-memory [`MapWriter`]; clones share the same maps, so a test keeps a handle while the
/// agent owns another.
#[derive(Debug, Clone, Default)]
pub struct FakeMaps {
    inner: Arc<Mutex<FakeInner>>,
}

impl FakeMaps {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps that already hold `services` (as pinned maps do after a restart).
    pub fn with(services: HashMap<Frontend, Vec<Backend>>) -> Self {
        let maps = Self::default();
        maps.lock().services = services;
        maps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeInner> {
        // A test that panicked while holding the lock leaves plain data behind; keep reading it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backends programmed for `frontend`.
    pub fn get(&self, frontend: &Frontend) -> Option<Vec<Backend>> {
        self.lock().services.get(frontend).cloned()
    }

    /// A copy of every service programmed.
    pub fn snapshot(&self) -> HashMap<Frontend, Vec<Backend>> {
        self.lock().services.clone()
    }

    /// Writes done so far.
    pub fn counts(&self) -> WriteCounts {
        self.lock().counts
    }

    /// Record the time of every write (for propagation measurements).
    pub fn record_history(&self, on: bool) {
        self.lock().record_history = on;
    }

    /// Drain the recorded write times.
    pub fn take_history(&self) -> Vec<(std::time::Instant, Frontend)> {
        std::mem::take(&mut self.lock().history)
    }
}

impl MapWriter for FakeMaps {
    fn upsert_service(
        &mut self,
        frontend: &Frontend,
        backends: &[Backend],
    ) -> Result<(), MapError> {
        let mut g = self.lock();
        g.services.insert(*frontend, backends.to_vec());
        g.counts.upserts += 1;
        if g.record_history {
            g.history.push((std::time::Instant::now(), *frontend));
        }
        Ok(())
    }

    fn delete_service(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        let mut g = self.lock();
        g.services.remove(frontend);
        g.counts.deletes += 1;
        if g.record_history {
            g.history.push((std::time::Instant::now(), *frontend));
        }
        Ok(())
    }

    fn services(&mut self) -> Result<HashMap<Frontend, Vec<Backend>>, MapError> {
        Ok(self.lock().services.clone())
    }
}

fn same_set(a: &[Backend], b: &[Backend]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a == b {
        return true;
    }
    let mut x: Vec<&Backend> = a.iter().collect();
    let mut y: Vec<&Backend> = b.iter().collect();
    x.sort();
    y.sort();
    x == y
}

/// Brings a [`MapWriter`] to a desired state with the fewest writes: a frontend is written only
/// when its backend set differs from what the maps hold; frontends no longer desired are deleted.
pub struct Reconciler<M: MapWriter> {
    maps: M,
    programmed: HashMap<Frontend, Backends>,
    errors: u64,
    /// Frontends the maps refused for lack of room, with what they want now: tried again
    /// when the maps' free room covers every backend they want, not on every change (a refused
    /// frontend of 2,550 backends tried on each of its changes took a third of a core at 255
    /// clusters); see [`Waiting`].
    waiting: HashMap<Frontend, Waiting>,
    /// Bumped whenever a write may have freed room.
    room_epoch: u64,
}

/// A frontend refused for lack of room.
struct Waiting {
    /// What it wants now.
    backends: Backends,
    /// The room epoch of the last try.
    epoch: u64,
    /// When it was last tried.
    tried: std::time::Instant,
    /// The maps' free room when it was refused.
    free_then: Option<usize>,
}

impl Waiting {
    /// Some of a frontend's backends may be in the maps already (another service's), so the
    /// room it needs is at most its backend count: it is tried again when the free room grew
    /// since the refusal and covers that, or, when room freed since the last try, once per
    /// [`WAITING_RETRY`] (or, with maps that do not say their room, whenever room may have
    /// freed or it wants fewer).
    fn due(&self, backends: usize, free: Option<usize>, epoch: u64) -> bool {
        match free {
            Some(free) => {
                (free >= backends && self.free_then.is_none_or(|then| free > then))
                    || (epoch != self.epoch && self.tried.elapsed() >= WAITING_RETRY)
            }
            None => epoch != self.epoch || backends < self.backends.len(),
        }
    }
}

/// How often a frontend waiting for room is tried again at most, while room frees but not
/// enough for all its backends.
pub const WAITING_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl<M: MapWriter> Reconciler<M> {
    /// Start from what the maps hold now (nothing is flushed).
    pub fn new(maps: M) -> Result<Self, MapError> {
        let mut r = Self::unloaded(maps);
        r.reload()?;
        Ok(r)
    }

    /// A reconciler that has not read the maps yet; call [`Reconciler::reload`] before writing.
    pub fn unloaded(maps: M) -> Self {
        Self {
            maps,
            programmed: HashMap::new(),
            errors: 0,
            waiting: HashMap::new(),
            room_epoch: 0,
        }
    }

    /// Read back what the maps hold.
    pub fn reload(&mut self) -> Result<(), MapError> {
        self.programmed = self
            .maps
            .services()?
            .into_iter()
            .map(|(f, b)| (f, Backends::from(b)))
            .collect();
        Ok(())
    }

    /// What the maps hold, as far as this reconciler knows.
    pub fn programmed(&self) -> &HashMap<Frontend, Backends> {
        &self.programmed
    }

    /// The map writer underneath.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The map writer underneath, for what is not a service write (kernel signals).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Map operations that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Frontends not programmed because the maps had no room for them, waiting for room.
    pub fn waiting_for_room(&self) -> usize {
        self.waiting.len()
    }

    /// Full reconcile: make the maps equal `desired`. Returns the writes done. A frontend
    /// whose backends are the same set in another order (as read back from the maps) is not
    /// rewritten.
    pub fn reconcile_all<'a>(
        &mut self,
        desired: impl IntoIterator<Item = (&'a Frontend, &'a Backends)>,
    ) -> WriteCounts {
        self.reconcile(desired, true)
    }

    /// Like [`Reconciler::reconcile_all`], but frontends the maps hold and `desired` lacks are
    /// kept (`sweep == false`): used when the desired state is known to be incomplete.
    pub fn reconcile<'a>(
        &mut self,
        desired: impl IntoIterator<Item = (&'a Frontend, &'a Backends)>,
        sweep: bool,
    ) -> WriteCounts {
        let mut counts = WriteCounts::default();
        let mut wanted = std::collections::HashSet::new();
        for (fe, backends) in desired {
            wanted.insert(*fe);
            if self
                .programmed
                .get(fe)
                .is_some_and(|cur| same_set(cur, backends))
            {
                self.programmed.insert(*fe, backends.clone());
                continue;
            }
            counts = add(counts, self.set(fe, Some(backends.clone())));
        }
        if !sweep {
            return counts;
        }
        self.waiting.retain(|fe, _| wanted.contains(fe));
        let stale: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|fe| !wanted.contains(fe))
            .copied()
            .collect();
        for fe in stale {
            counts = add(counts, self.set(&fe, None));
        }
        counts
    }

    /// Set one frontend (`None`: delete it). Writes only when it differs. A frontend the maps
    /// refused for lack of room is written again once room may have freed, or when it wants
    /// fewer backends.
    pub fn set(&mut self, frontend: &Frontend, backends: Option<Backends>) -> WriteCounts {
        let epoch = self.room_epoch;
        let mut counts = self.write(frontend, backends);
        if self.room_epoch != epoch {
            counts = add(counts, self.retry_waiting());
        }
        counts
    }

    /// Write the frontends waiting for room that are due, while writes free more.
    fn retry_waiting(&mut self) -> WriteCounts {
        let mut counts = WriteCounts::default();
        loop {
            let epoch = self.room_epoch;
            let free = self.maps.free_backends();
            let due: Vec<(Frontend, Backends)> = self
                .waiting
                .iter()
                .filter(|(_, w)| w.epoch != epoch && w.due(w.backends.len(), free, epoch))
                .map(|(fe, w)| (*fe, w.backends.clone()))
                .collect();
            for (fe, b) in due {
                counts = add(counts, self.write(&fe, Some(b)));
            }
            if self.room_epoch == epoch {
                return counts;
            }
        }
    }

    fn write(&mut self, frontend: &Frontend, backends: Option<Backends>) -> WriteCounts {
        let mut counts = WriteCounts::default();
        match backends {
            Some(b) => {
                let cur = self.programmed.get(frontend).cloned();
                if cur.as_ref().is_some_and(|c| *c == b) {
                    self.waiting.remove(frontend);
                    return counts;
                }
                if let Some(w) = self.waiting.get_mut(frontend)
                    && !w.due(b.len(), self.maps.free_backends(), self.room_epoch)
                {
                    // Not enough room yet: remember what it wants now.
                    w.backends = b;
                    return counts;
                }
                let written = match &cur {
                    Some(cur) => self.maps.update_service(frontend, cur, &b),
                    None => self.maps.upsert_service(frontend, &b),
                };
                match written {
                    Ok(()) => {
                        if cur.as_ref().is_some_and(|c| b.len() < c.len()) {
                            self.room_epoch += 1;
                        }
                        if self.waiting.remove(frontend).is_some() {
                            tracing::info!(%frontend, backends = b.len(), "programmed after waiting for room in the maps");
                        }
                        self.programmed.insert(*frontend, b);
                        counts.upserts += 1;
                    }
                    Err(error) if error.no_room => {
                        self.errors += 1;
                        let first = self
                            .waiting
                            .insert(
                                *frontend,
                                Waiting {
                                    backends: b,
                                    epoch: self.room_epoch,
                                    tried: std::time::Instant::now(),
                                    free_then: self.maps.free_backends(),
                                },
                            )
                            .is_none();
                        if first {
                            tracing::warn!(%error, "no room in the maps for this service: it is written when room frees (raise --max-backends)");
                        }
                    }
                    Err(error) => {
                        self.errors += 1;
                        tracing::warn!(%error, "map write failed");
                    }
                }
            }
            None => {
                self.waiting.remove(frontend);
                if !self.programmed.contains_key(frontend) {
                    return counts;
                }
                match self.maps.delete_service(frontend) {
                    Ok(()) => {
                        self.programmed.remove(frontend);
                        counts.deletes += 1;
                        self.room_epoch += 1;
                    }
                    Err(error) => {
                        self.errors += 1;
                        tracing::warn!(%error, "map delete failed");
                    }
                }
            }
        }
        counts
    }
}

fn add(a: WriteCounts, b: WriteCounts) -> WriteCounts {
    WriteCounts {
        upserts: a.upserts + b.upserts,
        deletes: a.deletes + b.deletes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fe(ip: &str, port: u16) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }
    fn be(c: &str, ip: &str) -> Backend {
        Backend {
            cluster: ClusterName::new(c).unwrap().into(),
            ip: ip.parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn start_does_not_flush_and_unchanged_is_not_rewritten() {
        let a = fe("10.96.0.1", 80);
        let b = fe("10.96.0.2", 80);
        let maps = FakeMaps::with(HashMap::from([
            (a, vec![be("c1", "10.0.0.1"), be("c1", "10.0.0.2")]),
            (b, vec![be("c1", "10.0.0.3")]),
        ]));
        let mut r = Reconciler::new(maps.clone()).unwrap();
        assert_eq!(maps.counts(), WriteCounts::default());
        // Same set in another order: no write. b changed: one write.
        let da: Backends = vec![be("c1", "10.0.0.2"), be("c1", "10.0.0.1")].into();
        let db: Backends = vec![be("c2", "10.1.0.3")].into();
        let w = r.reconcile_all([(&a, &da), (&b, &db)]);
        assert_eq!(
            w,
            WriteCounts {
                upserts: 1,
                deletes: 0
            }
        );
        assert_eq!(maps.get(&b).unwrap(), db.to_vec());
    }

    #[test]
    fn undesired_frontends_are_deleted_once() {
        let a = fe("10.96.0.1", 80);
        let maps = FakeMaps::with(HashMap::from([(a, vec![be("c1", "10.0.0.1")])]));
        let mut r = Reconciler::new(maps.clone()).unwrap();
        let w = r.reconcile_all(std::iter::empty());
        assert_eq!(w.deletes, 1);
        assert!(maps.get(&a).is_none());
        assert_eq!(r.set(&a, None), WriteCounts::default());
    }

    #[test]
    fn empty_backend_set_is_programmed_not_deleted() {
        let a = fe("10.96.0.1", 80);
        let maps = FakeMaps::new();
        let mut r = Reconciler::new(maps.clone()).unwrap();
        r.set(&a, Some(Backends::from(Vec::new())));
        assert_eq!(maps.get(&a), Some(vec![]));
    }
}

#[cfg(test)]
mod room_tests {
    use super::*;
    use crate::datapath::{ClusterIds, GlbWriter};
    use global_lb_bpf::LbMaps;
    use global_lb_bpf::store::MemStore;

    /// global-lb-bpf's update logic over in-memory maps whose backends map holds 10 backends.
    fn small_maps() -> GlbWriter<LbMaps<MemStore>> {
        let ids = ClusterIds::default();
        ids.set(&ClusterName::new("c1").unwrap(), 1);
        GlbWriter::new(
            LbMaps::with_empty_store(MemStore::with_backend_capacity(11)),
            ClusterName::new("c1").unwrap(),
            ids,
        )
    }

    fn fe(last: u8) -> Frontend {
        Frontend {
            ip: format!("10.96.0.{last}").parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(from: u8, n: u8) -> Backends {
        (from..from + n)
            .map(|i| Backend {
                cluster: ClusterName::new("c1").unwrap().into(),
                ip: format!("10.0.0.{i}").parse().unwrap(),
                port: 8080,
                protocol: Protocol::Tcp,
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// A frontend the maps have no room for is tried once, not on each of its changes; it is
    /// written as soon as a delete or a shrink frees room enough for it.
    #[test]
    fn a_frontend_without_room_waits_for_room_instead_of_retrying_each_change() {
        // Each write the maps refuse is counted in errors(): the tries.
        let mut r = Reconciler::new(small_maps()).unwrap();
        r.set(&fe(1), Some(backends(0, 6)));
        r.set(&fe(2), Some(backends(100, 6)));
        assert_eq!((r.errors(), r.waiting_for_room()), (1, 1));
        // Its changes while no room freed: not tried, what it wants remembered.
        r.set(&fe(2), Some(backends(100, 7)));
        r.set(&fe(2), Some(backends(101, 7)));
        assert_eq!(r.errors(), 1, "no write tried without room");
        // Another frontend shrinks: room enough, fe(2) is written with its latest set.
        r.set(&fe(1), Some(backends(0, 3)));
        assert_eq!(r.programmed()[&fe(2)], backends(101, 7));
        assert_eq!((r.errors(), r.waiting_for_room()), (1, 0));

        // Full again (3 + 7): a third frontend waits, wanting fewer is not tried while no room
        // is free; a delete frees room enough and it gets in.
        r.set(&fe(3), Some(backends(200, 5)));
        assert_eq!((r.errors(), r.waiting_for_room()), (2, 1));
        r.set(&fe(3), Some(backends(200, 3)));
        assert_eq!((r.errors(), r.waiting_for_room()), (2, 1));
        r.set(&fe(1), None);
        assert_eq!((r.errors(), r.waiting_for_room()), (2, 0));
        assert_eq!(r.programmed()[&fe(3)], backends(200, 3));

        // A waiting frontend no longer wanted is forgotten.
        r.set(&fe(4), Some(backends(50, 9)));
        assert_eq!(r.waiting_for_room(), 1);
        r.set(&fe(4), None);
        assert_eq!(r.waiting_for_room(), 0);
    }
}
