//! The agent task's state, owned by that task alone: the merge index, the map writer, each
//! cluster's status, and how one watcher event, a liveness tick or a reachability change moves
//! them. After a batch the task calls [`AgentState::publish`], which turns the state into the
//! [`Snapshot`] readers see (reusing the shared parts that did not change).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime};

use mesh_model::ClusterName;
use mesh_model::keys::MeshKey;
use mesh_model::values::{
    BackendState, ClusterConfig, FailoverEvent, MeshValue, NodeStatus, RemoteCluster, RemoteState,
    ServiceState,
};
use tokio::sync::watch;

use super::AgentOptions;
use super::nodes::RemoteNodes;
use super::passive_events::spawn_destroy;
use crate::cluster::{ClusterSource, LiveState, Liveness};
use crate::datapath::ClusterIds;
use crate::index::MergeIndex;
use crate::lb::{MapWriter, Reconciler};
use crate::reach::ReachChange;
use crate::readiness::{Readiness, SyncView};
use crate::snapshot::{
    ClusterView, DestroyStats, GoldenView, MapWrites, PUBLISH_EVERY, PassiveCounts, Snapshot,
    cert_expiries,
};
use crate::watch::ConnEvent;

/// One cluster as the agent sees it.
#[derive(Debug)]
pub(super) struct ClusterStatus {
    /// How it is reached (none for clusters only seen through KVStoreMesh).
    pub source: Option<Arc<ClusterSource>>,
    pub liveness: Liveness,
    /// Last evaluated state.
    pub state: LiveState,
    /// Initial sync done (list + canaries).
    pub synced: bool,
    /// Accepted cluster config.
    pub config: Option<ClusterConfig>,
    /// Refusal or connection error.
    pub error: Option<String>,
    pub refused: bool,
    /// Keys held (handed to a restarted watcher, which reports what went away).
    pub keys: HashSet<String>,
    pub reconnects: u64,
    pub bad_values: u64,
    /// When it went stale (wall clock).
    pub stale_since: Option<SystemTime>,
    /// Since when its backends do not answer from this node (first silent probe), while they do not.
    pub unreachable_since: Option<SystemTime>,
    /// Left out of selection (stale, or not synced yet).
    pub excluded: bool,
}

impl ClusterStatus {
    pub fn new(source: Option<Arc<ClusterSource>>, now: Instant) -> Self {
        Self {
            source,
            liveness: Liveness::new(now),
            state: LiveState::Grace(now),
            synced: false,
            config: None,
            error: None,
            refused: false,
            keys: HashSet::new(),
            reconnects: 0,
            bad_values: 0,
            stale_since: None,
            unreachable_since: None,
            excluded: false,
        }
    }
}

/// The parts of the last snapshot that are rebuilt only when their source changed.
struct Published {
    tx: watch::Sender<Arc<Snapshot>>,
    seq: u64,
    /// When the last snapshot was published.
    at: Instant,
    /// Index-derived parts, valid for `generation`.
    generation: u64,
    services: Arc<[Arc<crate::index::ServiceStatus>]>,
    fail_open: Arc<[(mesh_model::keys::ServiceName, crate::lb::Frontend)]>,
    failovers: u64,
    endpoints: usize,
    endpoints_by_cluster: BTreeMap<ClusterName, usize>,
    health_reporters: Arc<[(ClusterName, String)]>,
    /// `None` after a change.
    failover_log: Option<Arc<[FailoverEvent]>>,
    remote_config_errors: Option<Arc<[String]>>,
    golden: Arc<GoldenView>,
}

/// The status tick's read of every backend's connection counter and connect outcomes from the
/// kernel, a slice per loop tick: each is one lookup per backend and map, about 160 ms for 64k
/// backends in one go, which held every change back behind it (propagation p99 at 255 clusters
/// on the kernel maps). A read of a few backends is done at once.
pub(super) struct CounterScan {
    /// Every backend in the maps, sorted by id.
    ids: Vec<(u32, crate::lb::Backend)>,
    next: usize,
    connections: HashMap<(std::net::IpAddr, u16), u64>,
    /// The outcomes that tell the golden signals something (see [`AgentState::apply_outcomes`]).
    outcomes: Vec<(u32, crate::lb::Backend, global_lb_bpf::signals::Outcomes)>,
    /// Started by the status tick (its summary is published when done), not only by a scrape.
    publish: bool,
}

impl CounterScan {
    /// Backends read per loop tick (about 10 ms of lookups); a node with no more is read at once.
    pub const SLICE: usize = 4096;
}

/// The state of the agent's task.
pub(super) struct AgentState {
    pub opts: AgentOptions,
    pub index: MergeIndex,
    /// Clusters by name (the local one included).
    pub clusters: BTreeMap<ClusterName, ClusterStatus>,
    pub readiness: Readiness,
    pub started: Instant,
    /// Map writes done (upserts, deletes).
    pub map_writes: (u64, u64),
    /// Taken out while the maps are read back at the initial reconcile.
    pub reconciler: Option<Reconciler<Box<dyn MapWriter>>>,
    pub remote_entries: BTreeMap<ClusterName, RemoteCluster>,
    pub dir_sources: BTreeMap<ClusterName, ClusterSource>,
    pub dir_errors: Vec<String>,
    /// Recent failovers and failbacks (newest last).
    failover_log: VecDeque<FailoverEvent>,
    /// Connections the datapath sent to each backend, refreshed with the node summary.
    pub connections: Arc<HashMap<(std::net::IpAddr, u16), u64>>,
    pub dns_zone: watch::Sender<Arc<clusterset_dns::Zone>>,
    dns_generation: u64,
    /// Index generation the probe targets were last computed at.
    pub probe_generation: u64,
    /// Backends the kernel marked suspect on this node, and what became of the marks.
    pub passive: crate::passive::Passive,
    /// Golden signals per global service and cluster, from the kernel's connect outcomes.
    pub golden: crate::passive::Golden,
    /// When the golden signals were last read from the kernel.
    pub golden_read: Option<Instant>,
    /// The status tick's read of every backend's counters, when it is spread over loop ticks.
    pub scan: Option<CounterScan>,
    /// Set by a scrape that wants fresh connect counters.
    pub counters_wanted: Arc<AtomicBool>,
    /// Sockets aborted because their backend failed.
    pub destroyed: Arc<DestroyStats>,
    /// The remote clusters' nodes (for `--routing`), outside the merge index.
    pub nodes: RemoteNodes,
    published: Published,
}

impl AgentState {
    pub fn new(
        opts: AgentOptions,
        maps: Box<dyn MapWriter>,
        snapshots: watch::Sender<Arc<Snapshot>>,
        dns_zone: watch::Sender<Arc<clusterset_dns::Zone>>,
        counters_wanted: Arc<AtomicBool>,
    ) -> Self {
        let empty = Snapshot::starting(opts.cluster.clone(), opts.node.clone(), None);
        Self {
            index: MergeIndex::new(opts.cluster.clone()),
            clusters: BTreeMap::new(),
            readiness: Readiness::Starting,
            started: Instant::now(),
            map_writes: (0, 0),
            reconciler: Some(Reconciler::unloaded(maps)),
            remote_entries: BTreeMap::new(),
            dir_sources: BTreeMap::new(),
            dir_errors: Vec::new(),
            failover_log: VecDeque::new(),
            connections: Arc::default(),
            dns_zone,
            dns_generation: u64::MAX,
            probe_generation: u64::MAX,
            passive: Default::default(),
            golden: Default::default(),
            golden_read: None,
            scan: None,
            counters_wanted,
            destroyed: empty.destroyed.clone(),
            nodes: RemoteNodes::new(opts.cluster.clone()),
            published: Published {
                tx: snapshots,
                seq: 0,
                at: Instant::now(),
                generation: u64::MAX,
                services: empty.services,
                fail_open: empty.fail_open,
                failovers: 0,
                endpoints: 0,
                endpoints_by_cluster: BTreeMap::new(),
                health_reporters: empty.health_reporters,
                failover_log: None,
                remote_config_errors: None,
                golden: empty.golden,
            },
            opts,
        }
    }

    /// Hands the remote nodes to the route manager if they changed, or if whether every cluster finished its
    /// initial sync (or was refused) did: only then may routes no node calls for be removed.
    pub fn send_nodes(&mut self) {
        let complete = self.clusters.values().all(|c| c.synced || c.refused);
        self.nodes.send(complete);
    }

    /// The clusters' initial syncs, for [`Readiness`].
    pub fn sync_view(&self) -> SyncView {
        SyncView {
            unsynced: self
                .clusters
                .iter()
                .filter(|(_, c)| !c.synced && !c.refused)
                .map(|(n, _)| n.clone())
                .collect(),
            local_synced: self
                .clusters
                .get(&self.opts.cluster)
                .is_some_and(|c| c.synced),
            timed_out: self.started.elapsed() >= self.opts.sync_timeout,
        }
    }

    /// Record a failover or failback (the last 50 are kept).
    pub fn record_failover(&mut self, ev: FailoverEvent) {
        self.failover_log.push_back(ev);
        while self.failover_log.len() > 50 {
            self.failover_log.pop_front();
        }
        self.published.failover_log = None;
    }

    /// The remote config dir's errors changed.
    pub fn set_dir_errors(&mut self, errors: Vec<String>) {
        self.dir_errors = errors;
        self.published.remote_config_errors = None;
    }

    /// Read the connect outcomes of backends `ids` and of every backend the golden signals
    /// follow (those that counted connects) into the golden signals: before suspect backends
    /// leave the maps, their last counts. One lookup per backend read, not per backend in the
    /// maps (a node of 255k backends took 250 ms to read them all).
    pub fn refresh_golden_of(&mut self, ids: &[u32]) {
        let Some(r) = self.reconciler.as_mut() else {
            self.golden_read = Some(Instant::now());
            return;
        };
        let wanted: std::collections::BTreeSet<u32> =
            ids.iter().copied().chain(self.golden.followed()).collect();
        let maps = r.maps_mut();
        let outcomes = wanted
            .into_iter()
            .filter_map(|id| {
                let b = maps.backend_by_id(id)?;
                let o = maps.connect_outcome(id)?;
                self.golden.tells(id, &o).then_some((id, b, o))
            })
            .collect();
        // Backends that left are found by the next whole read, not this partial one.
        self.apply_outcomes(outcomes, None);
    }

    /// Start reading every backend's connections and connect outcomes; `publish`: for the
    /// status tick, whose summary goes out when the read is done (a scrape's read only refreshes
    /// what `/metrics` shows). Returns `Some(publish)` when the read is done (then `connections`
    /// and the golden signals are fresh): at once for up to [`CounterScan::SLICE`] backends,
    /// else [`AgentState::continue_counters`] reads the rest a slice per loop tick. A read under
    /// way is left to finish (and publishes when done if either asked).
    pub fn start_counters(&mut self, publish: bool) -> Option<bool> {
        if let Some(scan) = self.scan.as_mut() {
            scan.publish |= publish;
            return None;
        }
        let Some(r) = self.reconciler.as_mut() else {
            // No maps to read yet (the initial reconcile has them).
            self.golden_read = Some(Instant::now());
            return Some(publish);
        };
        self.scan = Some(CounterScan {
            ids: r.maps_mut().backend_ids(),
            next: 0,
            connections: HashMap::new(),
            outcomes: Vec::new(),
            publish,
        });
        self.continue_counters()
    }

    /// Read the next slice of a counter read under way; `Some(publish)` when it is done.
    pub fn continue_counters(&mut self) -> Option<bool> {
        let (Some(scan), Some(r)) = (self.scan.as_mut(), self.reconciler.as_mut()) else {
            self.scan = None;
            return None;
        };
        let end = (scan.next + CounterScan::SLICE).min(scan.ids.len());
        for (id, b) in &scan.ids[scan.next..end] {
            let maps = r.maps_mut();
            let Some(n) = maps.connections_to(*id) else {
                continue;
            };
            // Only backends that took connections (a lookup of another reads 0), and only
            // their connect outcomes: a connect is counted before its outcome, so a backend
            // sent none has none, unless its id held a backend the golden signals follow.
            if n > 0 {
                *scan.connections.entry((b.ip, b.port)).or_default() += n;
            }
            if (n > 0 || self.golden.follows(*id))
                && let Some(o) = maps.connect_outcome(*id)
                && self.golden.tells(*id, &o)
            {
                scan.outcomes.push((*id, b.clone(), o));
            }
        }
        scan.next = end;
        if end < scan.ids.len() {
            return None;
        }
        let scan = self.scan.take()?;
        self.connections = Arc::new(scan.connections);
        let ids = scan.ids;
        self.apply_outcomes(
            scan.outcomes,
            Some(&|id| ids.binary_search_by_key(&id, |(i, _)| *i).is_ok()),
        );
        Some(scan.publish)
    }

    /// Take `outcomes` (the backends' whose reading tells something, just read) into the golden
    /// signals. `present`, after a read of every backend: whether a backend id is in the maps
    /// (the last counts of those that left are read once more).
    fn apply_outcomes(
        &mut self,
        mut outcomes: Vec<(u32, crate::lb::Backend, global_lb_bpf::signals::Outcomes)>,
        present: Option<&dyn Fn(u32) -> bool>,
    ) {
        self.golden_read = Some(Instant::now());
        let Some(r) = self.reconciler.as_mut() else {
            return;
        };
        // Backends removed since the last read: their last counts (a failover removes the
        // backend whose connects just failed).
        if let Some(present) = present {
            for (id, b) in self.golden.gone(present) {
                if let Some(o) = r.maps_mut().connect_outcome(id) {
                    outcomes.push((id, b, o));
                }
            }
        }
        if outcomes.is_empty() {
            return;
        }
        // The service of each backend read (selected or not: a failed one no longer is). Only
        // those: every candidate of a 255k-backend mesh, each with its service's name, was a
        // 100 MiB walk per read.
        let read: HashSet<(&ClusterName, std::net::IpAddr, u16)> = outcomes
            .iter()
            .map(|(_, b, _)| (b.cluster.name(), b.ip, b.port))
            .collect();
        let owners: Vec<(crate::lb::Backend, String)> = self
            .index
            .services()
            .into_iter()
            .flat_map(|s| {
                let name = s.service.to_string();
                self.index
                    .backend_states(&s.service)
                    .into_iter()
                    .filter(|(b, _, _)| read.contains(&(b.cluster.name(), b.ip, b.port)))
                    .map(move |(b, _, _)| (b, name.clone()))
            })
            .collect();
        self.golden
            .learn_owners(owners.iter().map(|(b, s)| (b, s.clone())));
        self.golden.update(outcomes);
        self.golden_changed();
    }

    /// Take a sample of the golden signals for the last-minute window.
    pub fn sample_golden(&mut self) {
        self.golden.sample(Instant::now());
        self.golden_changed();
    }

    fn golden_changed(&mut self) {
        self.published.golden = Arc::new(GoldenView {
            totals: self.golden.totals.clone(),
            summary: self.golden.summary(Instant::now()),
        });
    }

    /// One service as this node sees it: every backend, or for a service of more than
    /// [`ServiceState::LIST_ALL`], that many of those unusable, sent connections or selected (in
    /// that order: what explains a problem first), the rest counted.
    fn service_state(&self, s: &crate::index::ServiceStatus) -> ServiceState {
        let states = self.index.backend_states(&s.service);
        let list_all = states.len() <= ServiceState::LIST_ALL;
        let mut backends: Vec<BackendState> = states
            .into_iter()
            .map(|(b, selected, why)| BackendState {
                ip: b.ip,
                port: b.port,
                cluster: b.cluster.name().clone(),
                local: b.cluster == self.opts.cluster,
                selected,
                unusable: why.map(str::to_owned),
                connections: self.connections.get(&(b.ip, b.port)).copied().unwrap_or(0),
            })
            .collect();
        let mut unlisted = None;
        if !list_all {
            // Stable: backends of equal rank keep the index's order.
            backends.sort_by_key(|b| {
                (
                    b.unusable.is_none(),
                    std::cmp::Reverse(b.connections),
                    !b.selected,
                )
            });
            let interesting = backends
                .iter()
                .take_while(|b| b.unusable.is_some() || b.connections > 0 || b.selected)
                .count()
                .min(ServiceState::LIST_ALL);
            let mut u = mesh_model::values::Unlisted::default();
            for b in backends.drain(interesting..) {
                *u.by_cluster.entry(b.cluster.to_string()).or_default() += 1;
                u.selected += u64::from(b.selected);
                if b.local {
                    u.connections_local += b.connections;
                } else {
                    u.connections_remote += b.connections;
                }
            }
            unlisted = Some(u);
        }
        ServiceState {
            service: s.service.to_string(),
            frontends: s.frontends.iter().map(|f| f.frontend.to_string()).collect(),
            backends,
            reason: s
                .frontends
                .first()
                .map(|f| f.why())
                .or_else(|| s.no_frontend.map(|n| format!("{n:?}")))
                .unwrap_or_default(),
            unlisted,
        }
    }

    /// The node summary written to `nodestatus/<cluster>/<node>`.
    pub fn node_status(&self) -> NodeStatus {
        let now = Instant::now();
        NodeStatus {
            cluster: self.opts.cluster.clone(),
            node: self.opts.node.clone(),
            updated_at: mesh_model::values::format_time(time::OffsetDateTime::now_utc()),
            remotes: self
                .clusters
                .iter()
                .filter(|(n, _)| **n != self.opts.cluster)
                .map(|(n, c)| RemoteState {
                    name: n.clone(),
                    connected: c.liveness.connected(),
                    synced: c.synced,
                    heartbeat_age_ms: c.liveness.heartbeat_age(now).map(|d| d.as_millis() as u64),
                    stale_since: c
                        .stale_since
                        .map(|t| mesh_model::values::format_time(time::OffsetDateTime::from(t))),
                    keys: c.keys.len() as u64,
                    error: c.error.clone(),
                })
                .collect(),
            services: self.index.services().len() as u64,
            service_states: self
                .index
                .services()
                .into_iter()
                .map(|s| self.service_state(s))
                .collect(),
            failovers: self.failover_log.iter().cloned().collect(),
            cert_warnings: self
                .opts
                .tls_dir
                .as_deref()
                .map(|dir| {
                    let certs = cert_expiries(
                        Some(dir),
                        &self.opts.cluster,
                        self.clusters.iter().map(|(n, c)| (n, c.source.as_deref())),
                    );
                    mesh_certs::expiry::warnings(
                        "node-sync",
                        &certs,
                        time::OffsetDateTime::now_utc().unix_timestamp(),
                    )
                })
                .unwrap_or_default(),
            golden_signals: self
                .golden
                .summary(now)
                .into_iter()
                .map(|r| mesh_model::values::GoldenSignal {
                    service: r.service,
                    cluster: r.cluster,
                    window_ms: (r.window_seconds * 1e3) as u64,
                    connects: r.window.connects(),
                    errors: r.window.refused + r.window.timeout,
                    p50_us: r.p50_ms.filter(|v| v.is_finite()).map(|v| (v * 1e3) as u64),
                    p99_us: r.p99_ms.filter(|v| v.is_finite()).map(|v| (v * 1e3) as u64),
                })
                .collect(),
        }
    }

    /// Publish now if the last snapshot is at least [`PUBLISH_EVERY`] old; otherwise returns when
    /// the next one is due (the caller publishes then, whatever came in between).
    pub fn publish_or_defer(&mut self) -> Option<Instant> {
        let due = self.published.at + PUBLISH_EVERY;
        if Instant::now() >= due {
            self.publish();
            return None;
        }
        Some(due)
    }

    /// Publish the state as a new [`Snapshot`]. The service selections are taken again only when
    /// the index's generation moved; everything else is small.
    pub fn publish(&mut self) {
        let p = &mut self.published;
        p.at = Instant::now();
        if p.generation != self.index.generation() {
            p.generation = self.index.generation();
            p.services = self.index.shared_services().into();
            p.fail_open = self
                .index
                .fail_open()
                .into_iter()
                .map(|(s, f)| (s.clone(), f))
                .collect::<Vec<_>>()
                .into();
            p.failovers = self.index.failovers();
            p.endpoints_by_cluster = self.index.endpoints_by_cluster();
            p.endpoints = p.endpoints_by_cluster.values().sum();
        }
        // Health reports do not always move the generation (a verdict that changes no selection).
        if !self.index.health_reporters_are(&p.health_reporters) {
            p.health_reporters = self.index.health_reporters().into();
        }
        let failover_log = p
            .failover_log
            .get_or_insert_with(|| self.failover_log.iter().cloned().collect::<Vec<_>>().into())
            .clone();
        let remote_config_errors = p
            .remote_config_errors
            .get_or_insert_with(|| self.dir_errors.clone().into())
            .clone();
        p.seq += 1;
        let clusters = self
            .clusters
            .iter()
            .map(|(n, c)| {
                let view = ClusterView {
                    source: c.source.clone(),
                    liveness: c.liveness.clone(),
                    state: c.state,
                    synced: c.synced,
                    id: c.config.as_ref().map(|c| c.id.get()),
                    error: c.error.clone(),
                    refused: c.refused,
                    keys: c.keys.len(),
                    endpoints: p.endpoints_by_cluster.get(n).copied().unwrap_or(0),
                    reconnects: c.reconnects,
                    bad_values: c.bad_values,
                    stale_since: c.stale_since,
                    unreachable_since: c.unreachable_since,
                    excluded: c.excluded,
                };
                (n.clone(), view)
            })
            .collect();
        let ps = &self.passive;
        let snapshot = Snapshot {
            seq: p.seq,
            at: p.at,
            cluster: self.opts.cluster.clone(),
            node: self.opts.node.clone(),
            tls_dir: self.opts.tls_dir.clone(),
            readiness: self.readiness.clone(),
            clusters,
            generation: p.generation,
            services: p.services.clone(),
            fail_open: p.fail_open.clone(),
            failovers: p.failovers,
            endpoints: p.endpoints,
            health_reporters: p.health_reporters.clone(),
            passive_failures: self.index.passive_failures().iter().cloned().collect(),
            map_writes: MapWrites {
                upserts: self.map_writes.0,
                deletes: self.map_writes.1,
                errors: self.reconciler.as_ref().map(|r| r.errors()).unwrap_or(0),
                waiting_for_room: self
                    .reconciler
                    .as_ref()
                    .map(|r| r.waiting_for_room() as u64)
                    .unwrap_or(0),
            },
            remote_config_errors,
            failover_log,
            connections: self.connections.clone(),
            golden: p.golden.clone(),
            passive: PassiveCounts {
                marks: ps.marks,
                confirmed: ps.confirmed,
                cleared: ps.cleared,
                recovered: ps.recovered,
                last_delay: ps.last_delay,
                max_delay: ps.max_delay,
            },
            destroyed: self.destroyed.clone(),
        };
        p.tx.send_replace(Arc::new(snapshot));
    }

    /// Rebuild the DNS zone when the index changed and someone serves it.
    pub fn refresh_dns_zone(&mut self) {
        if self.dns_zone.receiver_count() == 0 || self.dns_generation == self.index.generation() {
            return;
        }
        self.dns_generation = self.index.generation();
        let zone = Arc::new(self.index.dns_zone());
        self.dns_zone.send_if_modified(|cur| {
            if **cur != *zone {
                *cur = zone;
                true
            } else {
                false
            }
        });
    }

    /// Apply one watcher event; returns whether the set of remote registrations changed.
    pub fn handle(&mut self, (conn, ev): (ClusterName, ConnEvent)) -> bool {
        let now = Instant::now();
        let local = self.opts.cluster.clone();
        let kvstoremesh = self.opts.kvstoremesh;
        let Some(cs) = self.clusters.get_mut(&conn) else {
            // An event of a watcher that was just removed.
            return false;
        };
        match ev {
            ConnEvent::Connecting(n) => {
                if n > 1 {
                    cs.reconnects += 1;
                }
            }
            ConnEvent::Accepted(cfg) => {
                self.opts.cluster_ids.set(&cfg.name, cfg.id.get());
                cs.config = Some(cfg);
                cs.refused = false;
                cs.error = None;
                // The local config is in: remotes can be connected now.
                return conn == local;
            }
            ConnEvent::Refused(why) => {
                tracing::warn!(cluster = %conn, reason = %why, "cluster config refused");
                cs.refused = true;
                cs.error = Some(why);
            }
            ConnEvent::Connected => {
                cs.liveness.set_connected(true);
                cs.error = None;
                if kvstoremesh && conn == local {
                    for c in self.clusters.values_mut() {
                        c.liveness.set_connected(true);
                    }
                }
            }
            ConnEvent::Disconnected(e) => {
                cs.liveness.set_connected(false);
                cs.error = Some(e);
                if kvstoremesh && conn == local {
                    for c in self.clusters.values_mut() {
                        c.liveness.set_connected(false);
                    }
                }
            }
            ConnEvent::Synced => {
                if !cs.synced {
                    tracing::info!(cluster = %conn, keys = cs.keys.len(), "initial sync done");
                }
                cs.synced = true;
                self.apply_exclusion(&conn);
            }
            ConnEvent::BadValue { .. } => cs.bad_values += 1,
            ConnEvent::Heartbeat(c) => {
                if c == conn {
                    cs.liveness.heartbeat(now);
                } else if kvstoremesh {
                    let other = self.clusters.entry(c).or_insert_with(|| {
                        let mut s = ClusterStatus::new(None, now);
                        s.liveness.set_connected(true);
                        s.synced = true;
                        s
                    });
                    other.liveness.heartbeat(now);
                }
            }
            ConnEvent::Put(key, value) => {
                cs.keys.insert(key.to_string());
                if let (MeshKey::Remote { .. }, MeshValue::Remote(r)) = (&key, &value) {
                    if conn == local {
                        self.remote_entries.insert(r.name.clone(), r.clone());
                        return true;
                    }
                    return false;
                }
                if kvstoremesh && conn == local {
                    learn_mirrored_id(&self.opts.cluster_ids, &local, &value);
                }
                // Nodes select no backend: they are kept apart, for the route manager.
                let value = match (&key, value) {
                    (MeshKey::Node { cluster, node }, MeshValue::Node(info)) => {
                        self.nodes.put(cluster, node, info);
                        return false;
                    }
                    (_, v) => v,
                };
                self.index.apply(&key, Some(value));
            }
            ConnEvent::Delete(key) => {
                cs.keys.remove(&key.to_string());
                if let MeshKey::Remote { remote, .. } = &key {
                    return conn == local && self.remote_entries.remove(remote).is_some();
                }
                if let MeshKey::Node { cluster, node } = &key {
                    self.nodes.delete(cluster, node);
                    return false;
                }
                self.index.apply(&key, None);
            }
        }
        false
    }

    /// Evaluate every cluster's liveness (on the tick).
    pub fn evaluate_liveness(&mut self) {
        let now = Instant::now();
        let grace = self.opts.stale_grace;
        let hb = self.opts.heartbeat_timeout;
        let local = self.opts.cluster.clone();
        let names: Vec<ClusterName> = self.clusters.keys().cloned().collect();
        for n in names {
            let Some(c) = self.clusters.get_mut(&n) else {
                continue;
            };
            let s = c.liveness.evaluate(now, grace, hb);
            let was_stale = matches!(c.state, LiveState::Stale(_));
            let is_stale = matches!(s, LiveState::Stale(_));
            c.state = s;
            if was_stale != is_stale && n != local {
                if is_stale {
                    tracing::warn!(cluster = %n, grace = ?grace, "cluster not live beyond the grace: its backends leave selection");
                    c.stale_since = Some(SystemTime::now());
                } else {
                    tracing::info!(cluster = %n, "cluster live again: its backends are back in selection");
                    c.stale_since = None;
                }
            }
            self.apply_exclusion(&n);
        }
    }

    /// A remote cluster's backends stopped (or started again) answering from this node.
    pub fn apply_reach(&mut self, change: ReachChange) {
        if change.unreachable
            && self.opts.destroy_sockets
            && let addrs = self.index.remote_probe_targets_of(&change.cluster)
            && !addrs.is_empty()
        {
            spawn_destroy(self, addrs, "cluster unreachable from this node");
        }
        if let Some(c) = self.clusters.get_mut(&change.cluster) {
            c.unreachable_since = change.unreachable.then_some(change.since);
        }
        self.index
            .set_unreachable(&change.cluster, change.unreachable);
    }

    /// A remote's backends are selectable once its initial sync is done (canaries seen: its prefix
    /// is complete) and while it is not stale.
    pub fn apply_exclusion(&mut self, name: &ClusterName) {
        if *name == self.opts.cluster {
            return;
        }
        let Some(c) = self.clusters.get_mut(name) else {
            return;
        };
        let excluded = matches!(c.state, LiveState::Stale(_)) || !c.synced;
        if excluded != c.excluded {
            c.excluded = excluded;
            self.index.set_stale(name, excluded);
        }
    }
}

/// KVStoreMesh: a peer's config arrives as a mirrored key of the local etcd, not through a watcher of
/// its own, so its id is learnt here; the datapath stores a backend's cluster by id. An id that another
/// cluster already holds is not taken (the backends of that peer then carry id 0).
fn learn_mirrored_id(ids: &ClusterIds, local: &ClusterName, value: &MeshValue) {
    let MeshValue::ClusterConfig(cfg) = value else {
        return;
    };
    if cfg.name == *local {
        return;
    }
    if let Err(holder) = ids.set_unless_taken(&cfg.name, cfg.id.get()) {
        tracing::warn!(cluster = %cfg.name, id = cfg.id.get(), holder = %holder,
            "mirrored cluster config claims an id another cluster holds; its id is not recorded");
    }
}
