//! The agent: wires cluster watchers, the merge index, the reconciler, the health checker and the
//! publisher together. One task owns the state; it applies watcher events in batches, evaluates
//! cluster liveness on a tick, and writes only the frontends that changed. At start nothing is
//! written until every cluster finished its initial sync (bounded by the sync timeout); then one
//! full reconcile brings the pinned maps to the desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use mesh_model::keys::MeshKey;
use mesh_model::values::{
    BackendState, ClusterConfig, FailoverEvent, MeshValue, NodeStatus, RemoteCluster, RemoteState,
    ServiceState,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::args::Args;
use crate::cluster::{self, ClusterSource, LiveState, Liveness};
use crate::datapath::ClusterIds;
use crate::health;
use crate::index::{MergeIndex, ProbeTarget};
use crate::lb::{MapError, MapWriter, Reconciler};
use crate::publish::{self, Publish};
use crate::reach::{self, ReachChange};
use crate::watch::{ConnEvent, KeyScope, Validator, WatchSettings, watch_cluster};

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Local cluster.
    pub cluster: ClusterName,
    /// Local cluster id.
    pub cluster_id: ClusterId,
    /// This node.
    pub node: String,
    /// Local etcd URLs.
    pub etcd_endpoints: Vec<String>,
    /// Client certificate directory.
    pub tls_dir: Option<PathBuf>,
    /// Remote cluster files.
    pub remote_config_dir: Option<PathBuf>,
    /// Grace before a non-live cluster is stale.
    pub stale_grace: Duration,
    /// Longest wait for the initial sync.
    pub sync_timeout: Duration,
    /// A heartbeat older than this makes a cluster not live.
    pub heartbeat_timeout: Duration,
    /// Read only the local etcd.
    pub kvstoremesh: bool,
    /// Probe interval.
    pub health_interval: Duration,
    /// Failed probes before failing.
    pub health_failures: u32,
    /// Good probes in a row before a failing backend is healthy again.
    pub health_rise: u32,
    /// Timeout of the probes that check, from this node, that remote clusters' selected backends
    /// answer (`None`: not checked).
    pub remote_probe_timeout: Option<Duration>,
    /// Watcher settings.
    pub watch: WatchSettings,
    /// How often the remote config dir is re-read.
    pub remote_dir_poll: Duration,
    /// How often nodestatus is written.
    pub status_every: Duration,
    /// Run the health checker and the publisher.
    pub publish: bool,
    /// Abort this node's sockets to backends that failed (`crate::sockdestroy`).
    pub destroy_sockets: bool,
    /// Cluster ids learnt from accepted configs (shared with the datapath writer).
    pub cluster_ids: ClusterIds,
}

impl AgentOptions {
    /// Options from the command line.
    pub fn from_args(a: &Args) -> Self {
        Self {
            cluster: a.cluster_name.clone(),
            cluster_id: a.cluster_id,
            node: a.node_name.clone(),
            etcd_endpoints: a.etcd_endpoints.clone(),
            tls_dir: a.tls_dir.clone(),
            remote_config_dir: a.remote_config_dir.clone(),
            stale_grace: a.stale_grace,
            sync_timeout: a.sync_timeout,
            heartbeat_timeout: Duration::from_secs(5),
            kvstoremesh: a.kvstoremesh,
            health_interval: a.health_interval,
            health_failures: a.health_failures,
            health_rise: a.health_rise,
            remote_probe_timeout: (!a.remote_probe_timeout.is_zero())
                .then_some(a.remote_probe_timeout),
            destroy_sockets: !a.keep_failed_sockets,
            watch: WatchSettings::default(),
            remote_dir_poll: Duration::from_secs(1),
            status_every: Duration::from_secs(5),
            publish: true,
            cluster_ids: ClusterIds::default(),
        }
    }

    fn local_source(&self) -> ClusterSource {
        let tls = if self
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"))
        {
            self.tls_dir
                .as_deref()
                .map(|d| cluster::tls_from_dir(d, false))
        } else {
            None
        };
        ClusterSource {
            name: self.cluster.clone(),
            expected_id: Some(self.cluster_id),
            endpoints: self.etcd_endpoints.clone(),
            tls,
        }
    }
}

/// One cluster as the agent sees it.
#[derive(Debug)]
pub struct ClusterStatus {
    /// How it is reached (none for clusters only seen through KVStoreMesh).
    pub source: Option<ClusterSource>,
    /// Liveness.
    pub liveness: Liveness,
    /// Last evaluated state.
    pub state: LiveState,
    /// Initial sync done (list + canaries).
    pub synced: bool,
    /// Accepted cluster config.
    pub config: Option<ClusterConfig>,
    /// Refusal or connection error.
    pub error: Option<String>,
    /// Whether the config was refused.
    pub refused: bool,
    /// Keys held.
    pub keys: HashSet<String>,
    /// Reconnects.
    pub reconnects: u64,
    /// Bad values seen.
    pub bad_values: u64,
    /// When it went stale (wall clock).
    pub stale_since: Option<SystemTime>,
    /// Since when its backends do not answer from this node (first silent probe), while they do not.
    pub unreachable_since: Option<SystemTime>,
    /// Left out of selection (stale, or not synced yet).
    pub excluded: bool,
}

impl ClusterStatus {
    fn new(source: Option<ClusterSource>, now: Instant) -> Self {
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

/// State shared with the status server.
pub struct AgentState {
    /// Options.
    pub opts: AgentOptions,
    /// The merge index.
    pub index: MergeIndex,
    /// Clusters by name (the local one included).
    pub clusters: BTreeMap<ClusterName, ClusterStatus>,
    /// The initial reconcile was done: the maps follow the index.
    pub ready: bool,
    /// Start time.
    pub started: Instant,
    /// Map writes done (upserts, deletes) and errors.
    pub map_writes: (u64, u64),
    reconciler: Option<Reconciler<Box<dyn MapWriter>>>,
    remote_entries: BTreeMap<ClusterName, RemoteCluster>,
    dir_sources: BTreeMap<ClusterName, ClusterSource>,
    dir_errors: Vec<String>,
    /// Recent failovers and failbacks (newest last).
    pub failover_log: std::collections::VecDeque<FailoverEvent>,
    /// The initial reconcile ran without the local cluster's sync: services the maps hold and
    /// the index lacks are kept until it is synced.
    pub sweep_pending: bool,
    /// Connections the datapath sent to each backend, refreshed with the node summary.
    pub connections: HashMap<(std::net::IpAddr, u16), u64>,
    /// Query counters of the clusterset.local DNS server, when one runs (shown in /metrics).
    pub dns_metrics: Option<Arc<clusterset_dns::DnsMetrics>>,
    dns_zone: watch::Sender<Arc<clusterset_dns::Zone>>,
    dns_generation: u64,
    /// Index generation the probe targets were last computed at.
    probe_generation: u64,
    /// Backends the kernel marked suspect on this node, and what became of the marks.
    pub passive: crate::passive::Passive,
    /// Golden signals per global service and cluster, from the kernel's connect outcomes.
    pub golden: crate::passive::Golden,
    /// Sockets aborted because their backend failed.
    pub destroyed: Arc<DestroyStats>,
}

/// Counts of [`crate::sockdestroy`] runs.
#[derive(Debug, Default)]
pub struct DestroyStats {
    /// TCP sockets aborted.
    pub tcp: std::sync::atomic::AtomicU64,
    /// Connected UDP sockets aborted.
    pub udp: std::sync::atomic::AtomicU64,
    /// Runs that failed (permission, kernel without SOCK_DESTROY).
    pub errors: std::sync::atomic::AtomicU64,
}

impl AgentState {
    /// The certificates this node-sync loads and when they expire: the node and remote leaves of
    /// `--tls-dir` (with their intermediate and the bundle's roots) and each reader certificate a
    /// remote cluster issued us (`remote-reader-<cluster>`, from its `remotes/` entry).
    pub fn cert_expiries(&self) -> Vec<mesh_certs::expiry::CertExpiry> {
        let Some(dir) = self.opts.tls_dir.as_deref() else {
            return Vec::new();
        };
        let mut out =
            mesh_certs::expiry::in_dir(dir, &[mesh_certs::Role::Node, mesh_certs::Role::Remote]);
        for (name, c) in &self.clusters {
            let Some(pem) = c
                .source
                .as_ref()
                .and_then(|s| s.tls.as_ref())
                .and_then(|t| t.cert_pem.as_deref())
            else {
                continue;
            };
            let origin = format!(
                "{}remotes/{}/{name} clientCert",
                mesh_model::keys::PREFIX,
                self.opts.cluster
            );
            out.extend(mesh_certs::expiry::of_pem(
                &format!("remote-reader-{name}"),
                &origin,
                pem,
            ));
        }
        out
    }

    /// Read the kernel's connect outcomes into the golden signals (for `/metrics` and the status).
    pub fn refresh_golden(&mut self) {
        let Some(r) = self.reconciler.as_mut() else {
            return;
        };
        let mut outcomes = r.maps_mut().connect_outcomes();
        // Backends removed since the last read: their last counts (a failover removes the
        // backend whose connects just failed).
        for (id, b) in self.golden.gone(outcomes.iter().map(|(id, _, _)| *id)) {
            if let Some(o) = r.maps_mut().connect_outcome(id) {
                outcomes.push((id, b, o));
            }
        }
        if outcomes.is_empty() {
            return;
        }
        // Every candidate backend, selected or not (a failed one is no longer selected).
        let owners: Vec<(crate::lb::Backend, String)> = self
            .index
            .services()
            .into_iter()
            .flat_map(|s| {
                self.index
                    .backend_states(&s.service)
                    .into_iter()
                    .map(move |(b, _, _)| (b, s.service.to_string()))
            })
            .collect();
        self.golden
            .learn_owners(owners.iter().map(|(b, s)| (b, s.clone())));
        self.golden.update(outcomes);
    }

    /// Map operations that failed.
    pub fn map_errors(&self) -> u64 {
        self.reconciler.as_ref().map(|r| r.errors()).unwrap_or(0)
    }

    /// Errors in the remote config dir.
    pub fn remote_config_errors(&self) -> &[String] {
        &self.dir_errors
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
                .map(|s| ServiceState {
                    service: s.service.to_string(),
                    frontends: s.frontends.iter().map(|f| f.frontend.to_string()).collect(),
                    backends: self
                        .index
                        .backend_states(&s.service)
                        .into_iter()
                        .map(|(b, selected, why)| BackendState {
                            ip: b.ip,
                            port: b.port,
                            cluster: b.cluster.name().clone(),
                            local: b.cluster == self.opts.cluster,
                            selected,
                            unusable: why.map(str::to_owned),
                            connections: self
                                .connections
                                .get(&(b.ip, b.port))
                                .copied()
                                .unwrap_or(0),
                        })
                        .collect(),
                    reason: s
                        .frontends
                        .first()
                        .map(|f| f.why())
                        .or_else(|| s.no_frontend.map(|n| format!("{n:?}")))
                        .unwrap_or_default(),
                })
                .collect(),
            failovers: self.failover_log.iter().cloned().collect(),
            cert_warnings: self
                .opts
                .tls_dir
                .as_deref()
                .map(|_| {
                    mesh_certs::expiry::warnings(
                        "node-sync",
                        &self.cert_expiries(),
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
}

impl MapWriter for Box<dyn MapWriter> {
    fn upsert_service(
        &mut self,
        frontend: &crate::lb::Frontend,
        backends: &[crate::lb::Backend],
    ) -> Result<(), MapError> {
        (**self).upsert_service(frontend, backends)
    }
    fn update_service(
        &mut self,
        frontend: &crate::lb::Frontend,
        old: &[crate::lb::Backend],
        new: &[crate::lb::Backend],
    ) -> Result<(), MapError> {
        (**self).update_service(frontend, old, new)
    }
    fn delete_service(&mut self, frontend: &crate::lb::Frontend) -> Result<(), MapError> {
        (**self).delete_service(frontend)
    }
    fn services(
        &mut self,
    ) -> Result<HashMap<crate::lb::Frontend, Vec<crate::lb::Backend>>, MapError> {
        (**self).services()
    }
    fn connection_counts(&mut self) -> Result<HashMap<(std::net::IpAddr, u16), u64>, MapError> {
        (**self).connection_counts()
    }
    fn connect_outcomes(
        &mut self,
    ) -> Vec<(u32, crate::lb::Backend, global_lb_bpf::signals::Outcomes)> {
        (**self).connect_outcomes()
    }
    fn connect_outcome(&mut self, id: u32) -> Option<global_lb_bpf::signals::Outcomes> {
        (**self).connect_outcome(id)
    }
    fn backend_by_id(&mut self, id: u32) -> Option<crate::lb::Backend> {
        (**self).backend_by_id(id)
    }
    fn clear_suspect(&mut self, id: u32) {
        (**self).clear_suspect(id)
    }
    fn sweep_suspects(&mut self) {
        (**self).sweep_suspects()
    }
}

/// Handle on a running agent.
pub struct Agent {
    shared: Arc<Mutex<AgentState>>,
    task: JoinHandle<()>,
}

impl Agent {
    /// The shared state (lock briefly).
    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        lock(&self.shared)
    }

    /// A clone of the shared state handle (for the status server).
    pub fn shared(&self) -> Arc<Mutex<AgentState>> {
        self.shared.clone()
    }

    /// The clusterset.local zone, kept current while someone holds a receiver (for
    /// `clusterset_dns::DnsServer`).
    pub fn dns_zone(&self) -> watch::Receiver<Arc<clusterset_dns::Zone>> {
        self.state().dns_zone.subscribe()
    }

    /// Stop the agent and its tasks.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lock the shared state, recovering from a poisoned lock (plain data).
pub fn lock(m: &Mutex<AgentState>) -> MutexGuard<'_, AgentState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Registry {
    local_mcc: Option<MaxConnectedClusters>,
    accepted: HashMap<ClusterName, ClusterId>,
}

/// Start the agent on the current tokio runtime.
pub fn start(opts: AgentOptions, maps: Box<dyn MapWriter>) -> Agent {
    start_with_events(opts, maps, None)
}

/// Start the agent with the datapath's ring buffer of suspect marks (passive failure detection,
/// see [`crate::passive`]).
pub fn start_with_events(
    opts: AgentOptions,
    maps: Box<dyn MapWriter>,
    events: Option<global_lb_bpf::signals::SuspectEvents>,
) -> Agent {
    let now = Instant::now();
    let state = AgentState {
        index: MergeIndex::new(opts.cluster.clone()),
        clusters: BTreeMap::new(),
        ready: false,
        started: now,
        map_writes: (0, 0),
        reconciler: Some(Reconciler::unloaded(maps)),
        remote_entries: BTreeMap::new(),
        dir_sources: BTreeMap::new(),
        dir_errors: Vec::new(),
        failover_log: std::collections::VecDeque::new(),
        sweep_pending: false,
        connections: HashMap::new(),
        dns_metrics: None,
        dns_zone: watch::channel(Arc::new(clusterset_dns::Zone::default())).0,
        dns_generation: u64::MAX,
        probe_generation: u64::MAX,
        passive: Default::default(),
        golden: Default::default(),
        destroyed: Default::default(),
        opts,
    };
    let shared = Arc::new(Mutex::new(state));
    let task = tokio::spawn(run(shared.clone(), events));
    Agent { shared, task }
}

struct Tasks {
    watchers: HashMap<ClusterName, (ClusterSource, JoinHandle<()>)>,
    tx: mpsc::UnboundedSender<(ClusterName, ConnEvent)>,
    validator: Validator,
    registry: Arc<Mutex<Registry>>,
    others: Vec<JoinHandle<()>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, (_, h)) in self.watchers.drain() {
            h.abort();
        }
        for h in self.others.drain(..) {
            h.abort();
        }
    }
}

async fn run(
    shared: Arc<Mutex<AgentState>>,
    events: Option<global_lb_bpf::signals::SuspectEvents>,
) {
    let opts = lock(&shared).opts.clone();
    opts.cluster_ids.set(&opts.cluster, opts.cluster_id.get());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let registry = Arc::new(Mutex::new(Registry::default()));
    let validator: Validator = {
        let reg = registry.clone();
        let local = opts.cluster.clone();
        Arc::new(move |source: &ClusterSource, cfg: &ClusterConfig| {
            let mut r = reg.lock().unwrap_or_else(|p| p.into_inner());
            let mcc = if source.name == local {
                None
            } else {
                r.local_mcc
            };
            cluster::validate_config(source, cfg, mcc, &r.accepted).map_err(|e| e.to_string())?;
            if source.name == local {
                r.local_mcc = Some(cfg.max_connected_clusters);
            }
            r.accepted.insert(cfg.name.clone(), cfg.id);
            Ok(())
        })
    };
    let mut tasks = Tasks {
        watchers: HashMap::new(),
        tx: tx.clone(),
        validator,
        registry,
        others: Vec::new(),
    };

    // Publisher and health checker.
    let (targets_tx, targets_rx) = watch::channel(BTreeSet::<ProbeTarget>::new());
    let (pub_tx, pub_rx) = mpsc::unbounded_channel::<Publish>();
    if opts.publish {
        tasks.others.push(tokio::spawn(publish::run_publisher(
            opts.local_source(),
            opts.cluster.clone(),
            opts.node.clone(),
            pub_rx,
        )));
        let (h_tx, mut h_rx) = mpsc::unbounded_channel();
        let (passive_tx, passive_rx) = watch::channel(health::PassiveFailures::new());
        lock(&shared).passive.publish = Some(passive_tx);
        tasks.others.push(tokio::spawn(health::run_health_checker(
            opts.cluster.clone(),
            opts.node.clone(),
            opts.health_interval,
            opts.health_failures,
            opts.health_rise,
            targets_rx,
            passive_rx,
            h_tx,
        )));
        let p = pub_tx.clone();
        tasks.others.push(tokio::spawn(async move {
            while let Some(r) = h_rx.recv().await {
                if p.send(Publish::Health(r)).is_err() {
                    return;
                }
            }
        }));
    }

    // Data-plane reachability of remote clusters from this node.
    let (reach_targets_tx, reach_targets_rx) = watch::channel(BTreeMap::new());
    let (reach_tx, mut reach_rx) = mpsc::unbounded_channel::<ReachChange>();
    if let Some(timeout) = opts.remote_probe_timeout {
        tasks.others.push(tokio::spawn(reach::run_reach_prober(
            opts.health_interval,
            timeout,
            reach_targets_rx,
            reach_tx,
        )));
    }

    // Passive failure detection: the kernel's suspect marks, and the probes that confirm them.
    let (mark_tx, mut mark_rx) = mpsc::unbounded_channel::<crate::passive::SuspectMark>();
    let (confirm_tx, mut confirm_rx) = mpsc::unbounded_channel::<(u32, bool)>();
    if let Some(events) = events {
        tasks
            .others
            .push(tokio::spawn(crate::passive::run_event_reader(
                events, mark_tx,
            )));
    } else {
        drop(mark_tx);
    }
    let passive_timeout = opts
        .remote_probe_timeout
        .unwrap_or(Duration::from_millis(250));

    // The local cluster.
    {
        let mut st = lock(&shared);
        let src = opts.local_source();
        st.clusters.insert(
            opts.cluster.clone(),
            ClusterStatus::new(Some(src.clone()), Instant::now()),
        );
        spawn_watcher(&mut tasks, src, &opts, HashSet::new());
        reread_remote_dir(&mut st);
        reconcile_connections(&mut st, &mut tasks);
    }

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dir_poll = tokio::time::interval(opts.remote_dir_poll);
    dir_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(opts.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let received = SystemTime::now();
                let mut st = lock(&shared);
                let mut conns_changed = handle(&mut st, ev);
                while let Ok(ev) = rx.try_recv() {
                    conns_changed |= handle(&mut st, ev);
                }
                if conns_changed {
                    reconcile_connections(&mut st, &mut tasks);
                }
                after_batch(&mut st, received);
            }
            Some(mark) = mark_rx.recv() => {
                let received = SystemTime::now();
                let mut st = lock(&shared);
                // The counts of the backends about to leave the maps, read once per batch (a
                // read walks every backend).
                st.refresh_golden();
                on_mark(&mut st, mark, &confirm_tx, passive_timeout);
                while let Ok(mark) = mark_rx.try_recv() {
                    on_mark(&mut st, mark, &confirm_tx, passive_timeout);
                }
                after_batch(&mut st, received);
            }
            Some((id, ok)) = confirm_rx.recv() => {
                let received = SystemTime::now();
                let mut st = lock(&shared);
                on_confirm(&mut st, id, ok);
                while let Ok((id, ok)) = confirm_rx.try_recv() {
                    on_confirm(&mut st, id, ok);
                }
                after_batch(&mut st, received);
            }
            Some(change) = reach_rx.recv() => {
                let received = SystemTime::now();
                let mut st = lock(&shared);
                apply_reach(&mut st, change);
                while let Ok(change) = reach_rx.try_recv() {
                    apply_reach(&mut st, change);
                }
                after_batch(&mut st, received);
            }
            _ = tick.tick() => {
                let mut st = lock(&shared);
                reprobe_passive(&mut st, &confirm_tx, passive_timeout);
                evaluate_liveness(&mut st);
                after_batch(&mut st, SystemTime::now());
                refresh_dns_zone(&mut st);
                // Only when the index changed: a walk over every local endpoint ten times a second
                // would cost the most where the mesh is largest.
                if st.probe_generation != st.index.generation() {
                    st.probe_generation = st.index.generation();
                    let targets = st.index.probe_targets(&st.opts.node);
                    targets_tx.send_if_modified(|cur| {
                        if *cur != targets { *cur = targets; true } else { false }
                    });
                    let remote = st.index.remote_probe_targets();
                    reach_targets_tx.send_if_modified(|cur| {
                        if *cur != remote { *cur = remote; true } else { false }
                    });
                }
            }
            _ = dir_poll.tick() => {
                let mut st = lock(&shared);
                if reread_remote_dir(&mut st) {
                    reconcile_connections(&mut st, &mut tasks);
                }
            }
            _ = status_tick.tick() => {
                let mut st = lock(&shared);
                let ready = st.ready;
                if let Some(r) = st.reconciler.as_mut().filter(|_| ready) {
                    let counts = r.connection_counts();
                    r.maps_mut().sweep_suspects();
                    st.connections = counts;
                }
                st.refresh_golden();
                st.golden.sample(Instant::now());
                if opts.publish && st.ready {
                    let _ = pub_tx.send(Publish::Status(st.node_status()));
                }
            }
        }
    }
}

/// Abort this node's sockets to `addrs` (off the event loop), counting what was done.
fn spawn_destroy(st: &AgentState, addrs: Vec<std::net::SocketAddr>, why: &'static str) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = st.destroyed.clone();
    tokio::task::spawn_blocking(
        move || match crate::sockdestroy::destroy_sockets_to(&addrs) {
            Ok(d) => {
                stats.tcp.fetch_add(d.tcp as u64, Relaxed);
                stats.udp.fetch_add(d.udp as u64, Relaxed);
                if d.tcp + d.udp > 0 {
                    tracing::info!(
                        ?addrs,
                        why,
                        tcp = d.tcp,
                        udp = d.udp,
                        "aborted this node's sockets to failed backends"
                    );
                }
            }
            Err(error) => {
                stats.errors.fetch_add(1, Relaxed);
                tracing::warn!(%error, ?addrs, why, "could not abort the sockets to failed backends (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY; --keep-failed-sockets turns this off)");
            }
        },
    );
}

/// Probe backend `id` at `addr` now and report `(id, answered)` on `tx`.
fn spawn_confirm(
    id: u32,
    addr: std::net::SocketAddr,
    timeout: Duration,
    tx: &mpsc::UnboundedSender<(u32, bool)>,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let (outcome, _) = reach::probe(addr, timeout).await;
        let _ = tx.send((id, outcome == reach::Outcome::Answered));
    });
}

/// The kernel marked backend `mark.backend_id` suspect: follow it and confirm with a probe.
fn on_mark(
    st: &mut AgentState,
    mark: crate::passive::SuspectMark,
    confirm: &mpsc::UnboundedSender<(u32, bool)>,
    timeout: Duration,
) {
    let p = &mut st.passive;
    p.marks += 1;
    p.last_delay = mark.delay;
    p.max_delay = p.max_delay.max(mark.delay);
    if let Some(t) = p.tracks.get(&mark.backend_id) {
        // Already followed: a confirmed failure stays out; a probe in flight will tell.
        tracing::debug!(backend = %format!("{}:{}", t.backend.ip, t.backend.port), "suspect again");
        return;
    }
    let Some(backend) = st
        .reconciler
        .as_mut()
        .and_then(|r| r.maps_mut().backend_by_id(mark.backend_id))
    else {
        return;
    };
    tracing::info!(
        backend = %format!("{}:{}", backend.ip, backend.port),
        cluster = %backend.cluster.name(),
        refused = mark.refused,
        learnt_after_us = mark.delay.as_micros() as u64,
        "the kernel saw a connect fail: backend suspect on this node, probing it"
    );
    spawn_confirm(
        mark.backend_id,
        std::net::SocketAddr::new(backend.ip, backend.port),
        timeout,
        confirm,
    );
    st.passive.tracks.insert(
        mark.backend_id,
        crate::passive::Track {
            backend,
            since: mark.at,
            confirmed: false,
            goods: 0,
            probing: true,
            next_probe: Instant::now(),
        },
    );
}

/// A probe of a followed backend answered (`ok`) or not.
fn on_confirm(st: &mut AgentState, id: u32, ok: bool) {
    let rise = st.opts.health_rise.max(1);
    let interval = st.opts.health_interval;
    let Some(t) = st.passive.tracks.get_mut(&id) else {
        return;
    };
    t.probing = false;
    let b = t.backend.clone();
    let addr = (b.ip, b.port, mesh_model::values::Protocol::Tcp);
    let name = format!("{}:{}", b.ip, b.port);
    match (t.confirmed, ok) {
        (false, true) => {
            // A false alarm: let traffic return at once.
            st.passive.tracks.remove(&id);
            st.passive.cleared += 1;
            if let Some(r) = st.reconciler.as_mut() {
                r.maps_mut().clear_suspect(id);
            }
            tracing::info!(backend = %name, "suspect backend answers a probe: mark cleared");
        }
        (false, false) => {
            t.confirmed = true;
            t.goods = 0;
            // Failed backends are probed twice as often as the health checker does: its own
            // verdict and this publication must both clear before traffic returns everywhere.
            t.next_probe = Instant::now() + interval / 2;
            let since = t.since;
            st.passive.confirmed += 1;
            st.passive.last_signal = Some(since);
            // A backend of this cluster: publish the verdict so every other node follows now.
            if *b.cluster.name() == st.opts.cluster
                && let Some(p) = &st.passive.publish
            {
                p.send_modify(|m| {
                    m.insert((b.ip, b.port), since);
                });
            }
            tracing::warn!(backend = %name, cluster = %b.cluster.name(), "a probe confirms the failed connect: backend out of this node's selection");
            st.index.set_passive_failure(b.cluster.name(), addr, true);
        }
        (true, false) => {
            t.goods = 0;
            t.next_probe = Instant::now() + interval / 2;
        }
        (true, true) => {
            t.goods += 1;
            t.next_probe = Instant::now() + interval / 4;
            if t.goods >= rise {
                st.passive.tracks.remove(&id);
                st.passive.recovered += 1;
                st.passive.last_signal = Some(SystemTime::now());
                if let Some(r) = st.reconciler.as_mut() {
                    r.maps_mut().clear_suspect(id);
                }
                if let Some(p) = &st.passive.publish {
                    p.send_if_modified(|m| m.remove(&(b.ip, b.port)).is_some());
                }
                tracing::info!(backend = %name, good_probes = rise, "backend answers again: back in this node's selection");
                st.index.set_passive_failure(b.cluster.name(), addr, false);
            }
        }
    }
}

/// Probe again the confirmed failures that are due.
fn reprobe_passive(
    st: &mut AgentState,
    confirm: &mpsc::UnboundedSender<(u32, bool)>,
    timeout: Duration,
) {
    let now = Instant::now();
    for (id, t) in st.passive.tracks.iter_mut() {
        if t.confirmed && !t.probing && t.next_probe <= now {
            t.probing = true;
            spawn_confirm(
                *id,
                std::net::SocketAddr::new(t.backend.ip, t.backend.port),
                timeout,
                confirm,
            );
        }
    }
}

fn spawn_watcher(
    tasks: &mut Tasks,
    source: ClusterSource,
    opts: &AgentOptions,
    known: HashSet<String>,
) {
    let scope = if source.name == opts.cluster {
        if opts.kvstoremesh {
            KeyScope::All(opts.cluster.clone())
        } else {
            KeyScope::Local(opts.cluster.clone())
        }
    } else {
        KeyScope::Cluster(source.name.clone())
    };
    if let Some((_, h)) = tasks.watchers.remove(&source.name) {
        h.abort();
    }
    let h = tokio::spawn(watch_cluster(
        source.clone(),
        scope,
        opts.watch.clone(),
        tasks.validator.clone(),
        tasks.tx.clone(),
        known,
    ));
    tasks.watchers.insert(source.name.clone(), (source, h));
}

/// Re-read the remote config dir; returns whether the set of sources changed.
fn reread_remote_dir(st: &mut AgentState) -> bool {
    let Some(dir) = st.opts.remote_config_dir.clone() else {
        return false;
    };
    let (sources, errors) = cluster::read_remote_dir(&dir, st.opts.tls_dir.as_deref());
    let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    if errors != st.dir_errors {
        for e in &errors {
            tracing::warn!(error = %e, "remote cluster config refused");
        }
        st.dir_errors = errors;
    }
    if sources != st.dir_sources {
        st.dir_sources = sources;
        return true;
    }
    false
}

/// Start, restart or stop watchers so they match the configured remotes.
fn reconcile_connections(st: &mut AgentState, tasks: &mut Tasks) {
    let opts = st.opts.clone();
    let mut desired: BTreeMap<ClusterName, ClusterSource> = BTreeMap::new();
    if !opts.kvstoremesh {
        for (n, r) in &st.remote_entries {
            desired.insert(
                n.clone(),
                cluster::source_from_entry(r, opts.tls_dir.as_deref()),
            );
        }
        for (n, s) in &st.dir_sources {
            desired.insert(n.clone(), s.clone());
        }
    }
    desired.remove(&opts.cluster);
    let running: Vec<ClusterName> = tasks
        .watchers
        .keys()
        .filter(|n| **n != opts.cluster)
        .cloned()
        .collect();
    for n in running {
        if !desired.contains_key(&n) {
            if let Some((_, h)) = tasks.watchers.remove(&n) {
                h.abort();
            }
            tracing::info!(cluster = %n, "remote cluster removed");
            st.index.remove_cluster(&n);
            st.clusters.remove(&n);
            lock_registry(&tasks.registry).accepted.remove(&n);
        }
    }
    // Remotes are validated against the local cluster's config: connect them once it is read.
    if lock_registry(&tasks.registry).local_mcc.is_none() {
        return;
    }
    for (n, src) in desired {
        let same = tasks.watchers.get(&n).is_some_and(|(s, _)| *s == src);
        if same {
            continue;
        }
        tracing::info!(cluster = %n, endpoints = ?src.endpoints, "connecting to remote cluster");
        if !st.clusters.contains_key(&n) {
            // Not trusted until its initial sync is done.
            let mut status = ClusterStatus::new(None, Instant::now());
            status.excluded = true;
            st.clusters.insert(n.clone(), status);
            st.index.set_stale(&n, true);
        }
        if let Some(status) = st.clusters.get_mut(&n) {
            status.source = Some(src.clone());
        }
        lock_registry(&tasks.registry).accepted.remove(&n);
        let known = st
            .clusters
            .get(&n)
            .map(|c| c.keys.clone())
            .unwrap_or_default();
        spawn_watcher(tasks, src, &opts, known);
    }
}

fn lock_registry(r: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Apply one watcher event; returns whether the set of remote registrations changed.
fn handle(st: &mut AgentState, (conn, ev): (ClusterName, ConnEvent)) -> bool {
    let now = Instant::now();
    let local = st.opts.cluster.clone();
    let kvstoremesh = st.opts.kvstoremesh;
    let Some(cs) = st.clusters.get_mut(&conn) else {
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
            st.opts.cluster_ids.set(&cfg.name, cfg.id.get());
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
                for c in st.clusters.values_mut() {
                    c.liveness.set_connected(true);
                }
            }
        }
        ConnEvent::Disconnected(e) => {
            cs.liveness.set_connected(false);
            cs.error = Some(e);
            if kvstoremesh && conn == local {
                for c in st.clusters.values_mut() {
                    c.liveness.set_connected(false);
                }
            }
        }
        ConnEvent::Synced => {
            if !cs.synced {
                tracing::info!(cluster = %conn, keys = cs.keys.len(), "initial sync done");
            }
            cs.synced = true;
            apply_exclusion(st, &conn);
        }
        ConnEvent::BadValue { .. } => cs.bad_values += 1,
        ConnEvent::Heartbeat(c) => {
            if c == conn {
                cs.liveness.heartbeat(now);
            } else if kvstoremesh {
                let other = st.clusters.entry(c).or_insert_with(|| {
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
                    st.remote_entries.insert(r.name.clone(), r.clone());
                    return true;
                }
                return false;
            }
            if kvstoremesh && conn == local {
                learn_mirrored_id(&st.opts.cluster_ids, &local, &value);
            }
            st.index.apply(&key, Some(value));
        }
        ConnEvent::Delete(key) => {
            cs.keys.remove(&key.to_string());
            if let MeshKey::Remote { remote, .. } = &key {
                return conn == local && st.remote_entries.remove(remote).is_some();
            }
            st.index.apply(&key, None);
        }
    }
    false
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

/// Rebuild the DNS zone when the index changed and someone serves it.
fn refresh_dns_zone(st: &mut AgentState) {
    if st.dns_zone.receiver_count() == 0 || st.dns_generation == st.index.generation() {
        return;
    }
    st.dns_generation = st.index.generation();
    let zone = Arc::new(st.index.dns_zone());
    st.dns_zone.send_if_modified(|cur| {
        if **cur != *zone {
            *cur = zone;
            true
        } else {
            false
        }
    });
}

fn evaluate_liveness(st: &mut AgentState) {
    let now = Instant::now();
    let grace = st.opts.stale_grace;
    let hb = st.opts.heartbeat_timeout;
    let local = st.opts.cluster.clone();
    let names: Vec<ClusterName> = st.clusters.keys().cloned().collect();
    for n in names {
        let Some(c) = st.clusters.get_mut(&n) else {
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
        apply_exclusion(st, &n);
    }
}

/// A remote cluster's backends stopped (or started again) answering from this node.
fn apply_reach(st: &mut AgentState, change: ReachChange) {
    if change.unreachable
        && st.opts.destroy_sockets
        && let Some(addrs) = st.index.remote_probe_targets().remove(&change.cluster)
    {
        spawn_destroy(st, addrs, "cluster unreachable from this node");
    }
    if let Some(c) = st.clusters.get_mut(&change.cluster) {
        c.unreachable_since = change.unreachable.then_some(change.since);
    }
    st.index
        .set_unreachable(&change.cluster, change.unreachable);
}

/// A remote's backends are selectable once its initial sync is done (canaries seen: its prefix is
/// complete) and while it is not stale.
fn apply_exclusion(st: &mut AgentState, name: &ClusterName) {
    if *name == st.opts.cluster {
        return;
    }
    let Some(c) = st.clusters.get_mut(name) else {
        return;
    };
    let excluded = matches!(c.state, LiveState::Stale(_)) || !c.synced;
    if excluded != c.excluded {
        c.excluded = excluded;
        st.index.set_stale(name, excluded);
    }
}

/// After a batch of events (received at `received`) or a liveness tick: write what changed into
/// the maps, then record the moves of traffic between cluster groups, timed to the map write.
fn after_batch(st: &mut AgentState, received: SystemTime) {
    let failed = st.index.take_newly_failed();
    if !failed.is_empty() && st.opts.destroy_sockets {
        spawn_destroy(st, failed, "backend failed");
    }
    let groups = st.index.take_group_changes();
    // Moves while the initial sync runs are not failovers: only a ready node records them.
    let was_ready = st.ready;
    write_changes(st);
    if !was_ready {
        return;
    }
    let written = time::OffsetDateTime::now_utc();
    let at = mesh_model::values::format_time(written);
    for g in groups {
        // How long the move took on this node, from its first signal to the map write: the
        // endpoint change received (a graceful drain), the failure of the last usable backend of
        // the clusters traffic left (a failover on probes), or the latest recovery in the clusters
        // it went to (a failback). A liveness move (a cluster stale by timer) has no such signal.
        use crate::index::MoveCause;
        use mesh_model::values::Verdict;
        let started = match g.cause {
            MoveCause::Endpoints => Some(time::OffsetDateTime::from(received)),
            MoveCause::Health => st
                .index
                .verdict_since(&g.service, &g.from, Verdict::Failing)
                .into_iter()
                .chain(st.index.verdict_since(&g.service, &g.to, Verdict::Healthy))
                .filter(|t| *t <= written)
                .max(),
            MoveCause::Liveness => None,
            // From the kernel's mark: the first connect that failed.
            MoveCause::Passive => st
                .passive
                .last_signal
                .map(time::OffsetDateTime::from)
                .or(Some(time::OffsetDateTime::from(received))),
            // From the first silent probe of the clusters traffic left, or the answer of the
            // clusters it went back to.
            MoveCause::Reachability => g
                .from
                .iter()
                .filter_map(|c| st.clusters.get(c).and_then(|c| c.unreachable_since))
                .min()
                .map(time::OffsetDateTime::from)
                .or(Some(time::OffsetDateTime::from(received))),
        };
        let duration_ms = started
            .map(|t| (written - t).whole_milliseconds())
            .filter(|ms| (0..60_000).contains(ms))
            .map(|ms| ms as u64);
        tracing::info!(service = %g.service, from = ?g.from, to = ?g.to, cause = g.cause.as_str(), ?duration_ms, "service traffic moved");
        st.failover_log.push_back(FailoverEvent {
            service: g.service.to_string(),
            from: g.from.iter().map(|c| c.to_string()).collect(),
            to: g.to.iter().map(|c| c.to_string()).collect(),
            at: at.clone(),
            duration_ms,
            node: Some(st.opts.node.clone()),
            cause: Some(g.cause.as_str().to_owned()),
        });
        while st.failover_log.len() > 50 {
            st.failover_log.pop_front();
        }
    }
}

/// The map writes of a batch: the initial reconcile once everything synced, the full sweep once the
/// local cluster synced, else the frontends whose backends changed.
fn write_changes(st: &mut AgentState) {
    if !st.ready {
        let all_synced = st.clusters.values().all(|c| c.synced || c.refused);
        let timed_out = st.started.elapsed() >= st.opts.sync_timeout;
        let local_synced = st.clusters.get(&st.opts.cluster).is_some_and(|c| c.synced);
        if !((all_synced && local_synced) || timed_out) {
            return;
        }
        if timed_out && !all_synced {
            let waiting: Vec<String> = st
                .clusters
                .iter()
                .filter(|(_, c)| !c.synced && !c.refused)
                .map(|(n, _)| n.to_string())
                .collect();
            tracing::warn!(
                ?waiting,
                "sync timeout: reconciling without these clusters' initial sync"
            );
        }
        let Some(mut r) = st.reconciler.take() else {
            return;
        };
        if !local_synced {
            tracing::warn!(
                "sync timeout without the local cluster's sync: programming what is known, keeping the other services in the maps"
            );
        }
        match r.reload() {
            Ok(()) => {
                st.index.take_changes();
                let w = r.reconcile(st.index.desired().iter(), local_synced);
                st.sweep_pending = !local_synced;
                st.map_writes.0 += w.upserts;
                st.map_writes.1 += w.deletes;
                tracing::info!(
                    services = st.index.desired().len(),
                    upserts = w.upserts,
                    deletes = w.deletes,
                    "initial reconcile done"
                );
                st.reconciler = Some(r);
                st.ready = true;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the maps failed; retrying");
                st.reconciler = Some(r);
                return;
            }
        }
        return;
    }
    if st.sweep_pending && st.clusters.get(&st.opts.cluster).is_some_and(|c| c.synced) {
        if let Some(r) = st.reconciler.as_mut() {
            st.index.take_changes();
            let w = r.reconcile_all(st.index.desired().iter());
            st.map_writes.0 += w.upserts;
            st.map_writes.1 += w.deletes;
            tracing::info!(
                upserts = w.upserts,
                deletes = w.deletes,
                "local cluster synced: full reconcile done"
            );
        }
        st.sweep_pending = false;
        return;
    }
    if !st.index.has_changes() {
        return;
    }
    let changes = st.index.take_changes();
    if let Some(r) = st.reconciler.as_mut() {
        for (fe, b) in changes {
            let w = r.set(&fe, b);
            st.map_writes.0 += w.upserts;
            st.map_writes.1 += w.deletes;
        }
    }
}
