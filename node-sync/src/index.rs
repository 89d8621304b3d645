//! The merge index: the pure, synchronous heart of node-sync.
//!
//! It takes the events read from every connected cluster (service specs, ClusterSetIP imports,
//! endpoint chunks, health reports, cluster liveness) and keeps, for every local frontend, the
//! backends to program, chosen by DESIGN.md's selection rules, with the reason for the choice.
//!
//! An event recomputes only the services it touches: an endpoint chunk recomputes its service
//! (splicing the chunk's cluster's backends into the last selection when the chosen group stays,
//! see `Scope`), a health report the services that have an endpoint on the reported addresses,
//! and a liveness change every service (rare). Frontends whose backend set changed are collected
//! for [`MergeIndex::take_changes`], so the map writer touches only those.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use mesh_model::ClusterName;
use mesh_model::keys::{MeshKey, ServiceName};
use mesh_model::values::{
    Affinity, Conditions, Endpoint, EndpointChunk, HealthCheck, HealthReport, MeshValue, Protocol,
    ServiceImport, ServicePort, ServiceSpec, Verdict,
};
use serde::Serialize;

use crate::lb::{Backend, Backends, ClusterRef, Frontend};

/// Why a frontend has the backends it has (shown on the status page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    /// The preferred group has usable backends (affinity local: the local cluster; remote: the
    /// first remote group).
    Preferred {
        /// Clusters of the group.
        clusters: Vec<ClusterName>,
    },
    /// The preferred group has no usable backend; these come from the next group that has.
    FailedOver {
        /// Clusters of the group in use.
        clusters: Vec<ClusterName>,
    },
    /// Affinity none: every usable backend of every candidate cluster.
    AllUsable,
    /// Every ready backend is judged failing by its health checks: rather than refuse every connect
    /// (a probe that cannot reach pods, a wrong probe port), the ready backends of the first group
    /// that has any are used anyway, as Envoy's panic threshold does. Loud: a warning in the log, a
    /// metric, this reason on the status page.
    FailOpen {
        /// Clusters of the group in use.
        clusters: Vec<ClusterName>,
        /// Ready backends failing their health check (all of the group's).
        failing: usize,
    },
    /// Nothing is usable anywhere: the last usable backends that still serve (terminating) are kept.
    KeepServing,
    /// Nothing is usable anywhere: no backend, so connects fail fast.
    NoUsableBackends {
        /// Candidate backends (from live clusters that share the service).
        candidates: usize,
        /// Of those, failing their health check.
        failing_health: usize,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |c: &[ClusterName]| {
            c.iter()
                .map(|c| c.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Reason::Preferred { clusters } => {
                write!(
                    f,
                    "preferred clusters {} have usable backends",
                    names(clusters)
                )
            }
            Reason::FailedOver { clusters } => write!(
                f,
                "failed over: no usable backend in the preferred clusters, using {}",
                names(clusters)
            ),
            Reason::AllUsable => f.write_str("affinity none: every usable backend"),
            Reason::FailOpen { clusters, failing } => write!(
                f,
                "failing open: all {failing} ready backends fail their health check, using the ready backends of {} anyway",
                names(clusters)
            ),
            Reason::KeepServing => f.write_str(
                "no usable backend anywhere: keeping the last usable backends that still serve",
            ),
            Reason::NoUsableBackends {
                candidates,
                failing_health,
            } => write!(
                f,
                "no usable backend anywhere ({candidates} candidates, {failing_health} failing health): connects fail fast"
            ),
        }
    }
}

/// The selection for one frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendSelection {
    /// The frontend.
    pub frontend: Frontend,
    /// Backends to program.
    #[serde(serialize_with = "serialize_backends")]
    pub backends: Backends,
    /// Why.
    pub reason: Reason,
    /// Whether its backends are health-checked: false for a UDP frontend whose service names no
    /// TCP probe port (`clustermesh.io/health-check-port`): then nothing judges them, and the status
    /// says so instead of calling them healthy.
    pub health_checked: bool,
}

impl FrontendSelection {
    /// The reason, plus a note when the backends are not health-checked.
    pub fn why(&self) -> String {
        if self.health_checked {
            self.reason.to_string()
        } else {
            format!(
                "{} (backends not health-checked: UDP without clustermesh.io/health-check-port)",
                self.reason
            )
        }
    }
}

/// Why a global service has no frontend on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoFrontend {
    /// The local Service is headless: clients reach endpoints directly.
    Headless,
    /// Neither a local Service nor a ClusterSetIP import of this cluster exists yet.
    NoLocalServiceOrImport,
}

/// A global service as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    /// The service.
    pub service: ServiceName,
    /// Affinity in force.
    pub affinity: Affinity,
    /// Clusters sharing it (that have published a spec with shared=true, plus this one).
    pub clusters: Vec<ClusterName>,
    /// Clusters left out because they are stale.
    pub stale_clusters: Vec<ClusterName>,
    /// Clusters left out because their backends do not answer from this node (data plane).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreachable_clusters: Vec<ClusterName>,
    /// Frontends and their selections.
    pub frontends: Vec<FrontendSelection>,
    /// Set when the service has no frontend here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_frontend: Option<NoFrontend>,
}

/// A backend probe target on this node (for the health checker).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeTarget {
    /// Address.
    pub ip: IpAddr,
    /// The backend's port (the verdict is on this port and protocol).
    pub port: u16,
    /// The backend's protocol.
    pub protocol: Protocol,
    /// The TCP port probed: the backend's own, or the service's health-check port.
    pub probe_port: u16,
    /// How to probe.
    pub check: ProbeKind,
}

/// How a target is probed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// TCP connect.
    Tcp,
    /// HTTP GET of the path.
    Http(String),
}

type BackendAddr = (IpAddr, u16, Protocol);
type Reporter = (ClusterName, String);

/// Health verdicts by the cluster whose node published them, then backend address, then reporting
/// node. A node probes only its own cluster's backends, so a verdict applies to the backend of that
/// address *in the reporter's cluster*: with overlapping pod CIDRs, one cluster's verdict on
/// 10.0.1.5:8080 never moves another cluster's backend of the same address.
#[derive(Debug, Default)]
struct Verdicts(HashMap<ClusterName, HashMap<BackendAddr, BTreeMap<String, Verdict>>>);

impl Verdicts {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any node of `cluster` judges its backend `addr` failing.
    fn failing(&self, cluster: &ClusterName, addr: &BackendAddr) -> bool {
        self.0
            .get(cluster)
            .and_then(|m| m.get(addr))
            .is_some_and(|m| m.values().any(|v| *v == Verdict::Failing))
    }

    /// Whether some node of `cluster` has a verdict on its backend `addr`.
    fn has(&self, cluster: &ClusterName, addr: &BackendAddr) -> bool {
        self.0.get(cluster).is_some_and(|m| m.contains_key(addr))
    }

    fn insert(&mut self, (cluster, node): &Reporter, addr: BackendAddr, verdict: Verdict) {
        self.0
            .entry(cluster.clone())
            .or_default()
            .entry(addr)
            .or_default()
            .insert(node.clone(), verdict);
    }

    fn remove(&mut self, (cluster, node): &Reporter, addr: &BackendAddr) {
        let Some(by_addr) = self.0.get_mut(cluster) else {
            return;
        };
        if let Some(m) = by_addr.get_mut(addr) {
            m.remove(node);
            if m.is_empty() {
                by_addr.remove(addr);
            }
        }
        if by_addr.is_empty() {
            self.0.remove(cluster);
        }
    }
}

/// Nodes whose health publication lapsed, and the backends nobody checks any more because of it.
///
/// Only a node's own node-sync probes the backends on that node, and it publishes the verdicts
/// under `health/<cluster>/<node>` bound to a lease. A node cut off from the network (or whose
/// node-sync is gone for longer than the lease TTL) loses its lease, the key is deleted, and its
/// verdicts vanish. Read as "no verdict, so not failing", that kept the backends of an unreachable
/// node selected by everybody. So: when a node that was publishing stops (its report is deleted),
/// the backends it covered are *orphaned*, treated as failing unless that would leave a frontend
/// with no usable backend at all, until the node (or any other reporter) publishes verdicts on
/// them again.
///
/// Why the deletion of the report and not the `nodes/<cluster>/<node>` entry: the report's lease is
/// kept alive by the very process that runs the probes, so its expiry is exactly "nobody checks
/// these backends", and it comes within the lease TTL (10 s). The `nodes/` entry is written by the
/// apiserver from Kubernetes Node objects: it says nothing about the prober and only changes after
/// Kubernetes' node-monitor grace period (40 s by default), if at all. "Was publishing before"
/// matters: a node whose node-sync never ran (or that a relist never showed a report for) has
/// nothing to lapse, so nothing changes for it.
///
/// A node's backends are the addresses of its last report (what it probed) and the endpoints that
/// name it as their node (`nodeName`), so an endpoint placed on that node after the lapse is
/// covered too.
#[derive(Debug, Default)]
struct Lapsed {
    /// Reporter -> the addresses its last report covered.
    reporters: HashMap<Reporter, Vec<BackendAddr>>,
    /// Lapsed node names per cluster.
    nodes: HashMap<ClusterName, HashSet<String>>,
    /// Addresses covered by a lapsed report, per the reporter's cluster, with the number of such
    /// reports.
    addrs: HashMap<ClusterName, HashMap<BackendAddr, u32>>,
}

impl Lapsed {
    fn is_empty(&self) -> bool {
        self.reporters.is_empty()
    }

    /// `reporter`'s report was deleted. Returns false when it was lapsed already.
    fn insert(&mut self, reporter: Reporter, covered: Vec<BackendAddr>) -> bool {
        if self.reporters.contains_key(&reporter) {
            return false;
        }
        let addrs = self.addrs.entry(reporter.0.clone()).or_default();
        for a in &covered {
            *addrs.entry(*a).or_default() += 1;
        }
        self.nodes
            .entry(reporter.0.clone())
            .or_default()
            .insert(reporter.1.clone());
        self.reporters.insert(reporter, covered);
        true
    }

    /// `reporter` publishes again (or its cluster is gone). Returns the addresses its lapsed
    /// report covered, if it was lapsed.
    fn remove(&mut self, reporter: &Reporter) -> Option<Vec<BackendAddr>> {
        let covered = self.reporters.remove(reporter)?;
        if let Some(addrs) = self.addrs.get_mut(&reporter.0) {
            for a in &covered {
                if let Some(n) = addrs.get_mut(a) {
                    *n -= 1;
                    if *n == 0 {
                        addrs.remove(a);
                    }
                }
            }
            if addrs.is_empty() {
                self.addrs.remove(&reporter.0);
            }
        }
        if let Some(s) = self.nodes.get_mut(&reporter.0) {
            s.remove(&reporter.1);
            if s.is_empty() {
                self.nodes.remove(&reporter.0);
            }
        }
        Some(covered)
    }

    /// Whether the backend `addr` of endpoint `ep` (published by `cluster`) lost its prober: no
    /// live report has a verdict on it, and its node's (or a report covering it) lapsed.
    fn orphaned(
        &self,
        cluster: &ClusterName,
        ep: &Endpoint,
        addr: &BackendAddr,
        health: &Verdicts,
    ) -> bool {
        if self.is_empty() || health.has(cluster, addr) {
            return false;
        }
        self.addrs
            .get(cluster)
            .is_some_and(|m| m.contains_key(addr))
            || ep
                .node
                .as_deref()
                .is_some_and(|n| self.nodes.get(cluster).is_some_and(|s| s.contains(n)))
    }
}

/// One cluster's endpoint chunks of a service, sorted by chunk number. Nearly always one chunk
/// (64 endpoints each): a list of one costs 48 bytes where a map's first node took 320, for each
/// of the mesh's services x clusters (25,500 at 255 x 100: 8 MiB).
#[derive(Debug, Default)]
struct Chunks(Vec<(u32, Vec<Endpoint>)>);

impl Chunks {
    /// Put chunk `n`; returns the one it replaced.
    fn insert(&mut self, n: u32, eps: Vec<Endpoint>) -> Option<Vec<Endpoint>> {
        match self.0.binary_search_by_key(&n, |(k, _)| *k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, eps)),
            Err(i) => {
                self.0.insert(i, (n, eps));
                None
            }
        }
    }

    fn remove(&mut self, n: &u32) -> Option<Vec<Endpoint>> {
        let i = self.0.binary_search_by_key(n, |(k, _)| *k).ok()?;
        Some(self.0.remove(i).1)
    }

    fn get(&self, n: &u32) -> Option<&Vec<Endpoint>> {
        let i = self.0.binary_search_by_key(n, |(k, _)| *k).ok()?;
        Some(&self.0[i].1)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The chunks' endpoint lists, in chunk order.
    fn values(&self) -> impl Iterator<Item = &Vec<Endpoint>> {
        self.0.iter().map(|(_, eps)| eps)
    }
}

#[derive(Debug, Default)]
struct ServiceEntry {
    specs: BTreeMap<ClusterName, ServiceSpec>,
    import: Option<ServiceImport>,
    endpoints: BTreeMap<ClusterRef, Chunks>,
    /// The service's name, shared by its entries in `ip_services`.
    name: Option<Arc<ServiceName>>,
    /// The last selection (also the last usable set of rule 4); shared with the agent's snapshots.
    status: Option<Arc<ServiceStatus>>,
    /// The clusters of the last selection's first frontend (`selected_clusters` of `status`),
    /// kept so a selection compares against them instead of taking them again.
    groups: Vec<ClusterName>,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.specs.is_empty() && self.import.is_none() && self.endpoints.is_empty()
    }
}

/// The merge index. See the module docs.
#[derive(Debug)]
pub struct MergeIndex {
    local: ClusterName,
    services: HashMap<ServiceName, ServiceEntry>,
    stale: BTreeSet<ClusterName>,
    /// Remote clusters whose backends do not answer from this node (see `crate::reach`).
    unreachable: BTreeSet<ClusterName>,
    /// Verdicts by reporting cluster, backend address and reporting node.
    health: Verdicts,
    /// Backends that started failing (a verdict turned failing, a confirmed passive failure)
    /// since the last `take_newly_failed`.
    newly_failed: Vec<std::net::SocketAddr>,
    /// Backends this node saw refuse (or not answer) a connect, confirmed by a probe: out of this
    /// node's selection like a failing verdict, until probes find them answering (`crate::passive`).
    passive: BTreeSet<(ClusterName, BackendAddr)>,
    reports: HashMap<Reporter, HealthReport>,
    /// Reporters whose publication lapsed (see [`Lapsed`]).
    lapsed: Lapsed,
    /// Which services have an endpoint on an address (see [`IpIndex`]).
    ip_services: IpIndex,
    desired: HashMap<Frontend, Backends>,
    /// The remote TCP backends of `desired` by cluster, with how many frontends select each:
    /// kept as `desired` changes (by the changed stretch of a frontend's backends), so
    /// [`MergeIndex::remote_probe_targets`] reads them instead of walking every backend.
    /// Each cluster's addresses sorted, so the targets are a copy of contiguous memory per tick.
    remote_selected: BTreeMap<ClusterName, Vec<(std::net::SocketAddr, u32)>>,
    /// Per cluster: chunks held (over every service) and the endpoints in them, kept as chunks
    /// come and go, for [`MergeIndex::endpoints_by_cluster`].
    endpoint_counts: BTreeMap<ClusterName, (usize, usize)>,
    frontend_owner: HashMap<Frontend, ServiceName>,
    changed: HashSet<Frontend>,
    failovers: u64,
    group_changes: Vec<GroupChange>,
    /// The cause of recomputes that are not input changes (set by the event being applied).
    cause: MoveCause,
    generation: u64,
    /// While a batch is applied ([`MergeIndex::defer`]): the services whose selection is due,
    /// whether their inputs changed, the cause of the move if not, and what changed.
    /// [`MergeIndex::settle`] selects each once.
    deferred: Option<HashMap<ServiceName, (bool, MoveCause, Scope)>>,
    /// Selections made in full and by splicing (see [`Scope`]).
    selections: Selections,
}

/// What changed for a service since its last selection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Anything (specs, health, liveness): select in full.
    All,
    /// Only the endpoint chunks of these clusters (a few, by name): each frontend's backends are
    /// the last ones with these clusters' runs rebuilt, when the chosen group stays the same
    /// (`splice`). At 255 clusters a service has 2,550 backends; a changed endpoint rebuilds ten.
    Chunks(Vec<ClusterName>),
}

impl Scope {
    /// At most this many clusters' runs are spliced; a batch that changed more selects in full.
    const MAX_SPLICED: usize = 8;

    /// This scope and then `other`.
    fn and(self, other: &Scope) -> Scope {
        match (self, other) {
            (Scope::Chunks(mut a), Scope::Chunks(b)) => {
                for c in b {
                    if let Err(i) = a.binary_search(c) {
                        a.insert(i, c.clone());
                    }
                }
                if a.len() > Self::MAX_SPLICED {
                    Scope::All
                } else {
                    Scope::Chunks(a)
                }
            }
            _ => Scope::All,
        }
    }
}

/// How many selections were made, and how many of them by splicing one or a few clusters' runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Selections {
    /// Selections of a service in full.
    full: u64,
    /// Selections that spliced the changed clusters' runs into the last backends.
    spliced: u64,
}

/// The cluster group a service's traffic goes to changed (failover, failback, or loss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// The service.
    pub service: ServiceName,
    /// Clusters selected before (empty: none).
    pub from: Vec<ClusterName>,
    /// Clusters selected now (empty: none).
    pub to: Vec<ClusterName>,
    /// What moved it: the first signal the move's duration is measured from.
    pub cause: MoveCause,
}

/// What made a service's traffic move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveCause {
    /// Its specs, import or endpoints changed (endpoints terminating or not ready, a scale-down).
    Endpoints,
    /// Health verdicts (a probe failed or recovered, a node's verdicts lapsed).
    Health,
    /// A cluster became stale or live again, or was removed.
    Liveness,
    /// A remote cluster's backends stopped (or started again) answering probes from this node.
    Reachability,
    /// The kernel saw a connect to the backend fail on this node and a probe confirmed it (or
    /// probes found it answering again): see `crate::passive`.
    Passive,
}

impl MoveCause {
    /// The name shown in records and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveCause::Endpoints => "endpoints",
            MoveCause::Health => "health",
            MoveCause::Liveness => "liveness",
            MoveCause::Reachability => "reachability",
            MoveCause::Passive => "passive",
        }
    }
}

fn selected_clusters(sel: Option<&FrontendSelection>) -> Vec<ClusterName> {
    // A selection lists each cluster's backends together: one entry per run, then sorted (a
    // `contains` per backend cost clusters x backends name comparisons, 255 x 2,550 per call).
    let mut v: Vec<&ClusterRef> = Vec::new();
    for b in sel.map(|s| &s.backends[..]).unwrap_or_default() {
        if v.last() != Some(&&b.cluster) {
            v.push(&b.cluster);
        }
    }
    v.sort();
    v.dedup();
    v.into_iter().map(|c| c.name().clone()).collect()
}

impl MergeIndex {
    /// An empty index for a node of cluster `local`.
    pub fn new(local: ClusterName) -> Self {
        Self {
            local,
            services: HashMap::new(),
            stale: BTreeSet::new(),
            unreachable: BTreeSet::new(),
            health: Verdicts::default(),
            passive: BTreeSet::new(),
            newly_failed: Vec::new(),
            reports: HashMap::new(),
            lapsed: Lapsed::default(),
            ip_services: IpIndex::default(),
            desired: HashMap::new(),
            remote_selected: BTreeMap::new(),
            endpoint_counts: BTreeMap::new(),
            frontend_owner: HashMap::new(),
            changed: HashSet::new(),
            failovers: 0,
            group_changes: Vec::new(),
            cause: MoveCause::Health,
            generation: 0,
            deferred: None,
            selections: Selections::default(),
        }
    }

    /// Defer selection until [`MergeIndex::settle`]: a batch of changes (the chunks of a listing,
    /// a burst of endpoint changes) selects each service it touches once, not once per change.
    /// Readers of selections must wait for `settle`.
    pub fn defer(&mut self) {
        self.deferred.get_or_insert_with(HashMap::new);
    }

    /// Select every service the batch touched, once, and stop deferring.
    pub fn settle(&mut self) {
        let Some(due) = self.deferred.take() else {
            return;
        };
        let cause = self.cause;
        let mut due: Vec<_> = due.into_iter().collect();
        due.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, (inputs_changed, c, scope)) in due {
            self.cause = c;
            self.recompute_scoped(&name, inputs_changed, scope);
        }
        self.cause = cause;
    }

    /// The local cluster.
    pub fn local(&self) -> &ClusterName {
        &self.local
    }

    // ---- events ------------------------------------------------------------------------------

    /// Apply a decoded key/value (`None`: the key was deleted). Kinds the index does not use are
    /// ignored; returns whether the kind was one it uses.
    pub fn apply(&mut self, key: &MeshKey, value: Option<MeshValue>) -> bool {
        match (key, value) {
            (MeshKey::Service { .. }, Some(MeshValue::Service(s))) => self.upsert_service(s),
            (MeshKey::Service { cluster, service }, None) => self.delete_service(cluster, service),
            (MeshKey::Import { .. }, Some(MeshValue::Import(i))) => self.upsert_import(i),
            (MeshKey::Import { cluster, service }, None) => self.delete_import(cluster, service),
            (MeshKey::EndpointChunk { .. }, Some(MeshValue::EndpointChunk(c))) => {
                self.upsert_chunk(c)
            }
            (
                MeshKey::EndpointChunk {
                    cluster,
                    service,
                    chunk,
                },
                None,
            ) => self.delete_chunk(cluster, service, *chunk),
            (MeshKey::Health { .. }, Some(MeshValue::Health(h))) => self.upsert_health(h),
            (MeshKey::Health { cluster, node }, None) => self.delete_health(cluster, node),
            _ => return false,
        }
        true
    }

    /// A service spec was put.
    pub fn upsert_service(&mut self, spec: ServiceSpec) {
        let name = spec.service_name();
        let entry = self.services.entry(name.clone()).or_default();
        entry.specs.insert(spec.cluster.clone(), spec);
        self.recompute(&name, true);
    }

    /// A service spec was deleted.
    pub fn delete_service(&mut self, cluster: &ClusterName, service: &ServiceName) {
        if let Some(e) = self.services.get_mut(service)
            && e.specs.remove(cluster).is_some()
        {
            self.recompute(service, true);
        }
    }

    /// A ClusterSetIP import was put (only this cluster's imports matter).
    pub fn upsert_import(&mut self, import: ServiceImport) {
        if import.cluster != self.local {
            return;
        }
        let name = ServiceName {
            namespace: import.namespace.clone(),
            name: import.name.clone(),
        };
        self.services.entry(name.clone()).or_default().import = Some(import);
        self.recompute(&name, true);
    }

    /// A ClusterSetIP import was deleted.
    pub fn delete_import(&mut self, cluster: &ClusterName, service: &ServiceName) {
        if cluster != &self.local {
            return;
        }
        if let Some(e) = self.services.get_mut(service)
            && e.import.take().is_some()
        {
            self.recompute(service, true);
        }
    }

    /// An endpoint chunk was put.
    pub fn upsert_chunk(&mut self, chunk: EndpointChunk) {
        let name = ServiceName {
            namespace: chunk.namespace.clone(),
            name: chunk.name.clone(),
        };
        let entry = self.services.entry(name.clone()).or_default();
        // The cluster's name is interned once, when its first chunk of the service comes.
        let chunks = match entry.endpoints.get_mut(&chunk.cluster) {
            Some(c) => c,
            None => entry
                .endpoints
                .entry(ClusterRef::from(chunk.cluster.clone()))
                .or_default(),
        };
        let old = chunks.insert(chunk.chunk, chunk.endpoints);
        let new_ips: Vec<IpAddr> = entry.endpoints[&chunk.cluster]
            .get(&chunk.chunk)
            .map(|eps| eps.iter().map(|e| e.ip).collect())
            .unwrap_or_default();
        count_chunk(
            &mut self.endpoint_counts,
            &chunk.cluster,
            old.as_ref().map(Vec::len),
            Some(new_ips.len()),
        );
        let shared = entry
            .name
            .get_or_insert_with(|| Arc::new(name.clone()))
            .clone();
        for ip in new_ips {
            self.ip_services.add(ip, &shared);
        }
        if let Some(old) = old {
            for e in &old {
                self.ip_services.remove(e.ip, &name);
            }
        }
        self.recompute_scoped(&name, true, Scope::Chunks(vec![chunk.cluster]));
    }

    /// An endpoint chunk was deleted.
    pub fn delete_chunk(&mut self, cluster: &ClusterName, service: &ServiceName, chunk: u32) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        let Some(chunks) = entry.endpoints.get_mut(cluster) else {
            return;
        };
        let Some(old) = chunks.remove(&chunk) else {
            return;
        };
        if chunks.is_empty() {
            entry.endpoints.remove(cluster);
        }
        count_chunk(&mut self.endpoint_counts, cluster, Some(old.len()), None);
        for e in &old {
            self.ip_services.remove(e.ip, service);
        }
        self.recompute_scoped(service, true, Scope::Chunks(vec![cluster.clone()]));
    }

    /// A health report was put (replaces the reporter's previous one).
    pub fn upsert_health(&mut self, report: HealthReport) {
        let reporter = (report.cluster.clone(), report.node.clone());
        // Backends this report turns failing (for the sockets to them: `take_newly_failed`).
        let was_failing: Vec<bool> = report
            .verdicts
            .iter()
            .map(|v| {
                self.health
                    .failing(&report.cluster, &(v.ip, v.port, v.protocol))
            })
            .collect();
        for (v, was) in report.verdicts.iter().zip(was_failing) {
            if v.verdict == Verdict::Failing && !was {
                self.newly_failed
                    .push(std::net::SocketAddr::new(v.ip, v.port));
            }
        }
        let mut touched: HashSet<IpAddr> = HashSet::new();
        if let Some(old) = self.reports.remove(&reporter) {
            self.unlink_report(&reporter, &old, &mut touched);
        }
        for v in &report.verdicts {
            self.health
                .insert(&reporter, (v.ip, v.port, v.protocol), v.verdict);
            touched.insert(v.ip);
        }
        // Publishing again: its backends are checked again.
        let recovered = self.lapsed.remove(&reporter);
        if let Some(covered) = recovered {
            touched.extend(covered.iter().map(|a| a.0));
            let node = reporter.clone();
            self.reports.insert(reporter, report);
            self.recompute_node(&node, &touched);
        } else {
            self.reports.insert(reporter, report);
            self.recompute_ips(&touched);
        }
    }

    /// A health report was deleted: its node's lease expired (the node is cut off, or its
    /// node-sync has been gone longer than the lease TTL), or a relist no longer found it. The
    /// node's backends count as failing from now on unless nothing else is usable, until it
    /// publishes again (see [`Lapsed`]).
    pub fn delete_health(&mut self, cluster: &ClusterName, node: &str) {
        let reporter = (cluster.clone(), node.to_owned());
        let mut touched = HashSet::new();
        let Some(old) = self.reports.remove(&reporter) else {
            return;
        };
        self.unlink_report(&reporter, &old, &mut touched);
        let covered = old
            .verdicts
            .iter()
            .map(|v| (v.ip, v.port, v.protocol))
            .collect();
        // A reporter is never in both `reports` and `lapsed`, so this always inserts.
        self.lapsed.insert(reporter.clone(), covered);
        self.recompute_node(&reporter, &touched);
    }

    /// Recompute the services a node's lapse or return can change: those with a backend at one
    /// of `ips` (its report covered them) or an endpoint on that node (matched by name).
    fn recompute_node(&mut self, (cluster, node): &Reporter, ips: &HashSet<IpAddr>) {
        let mut names: HashSet<ServiceName> = ips
            .iter()
            .flat_map(|ip| self.ip_services.services(ip).map(|s| (**s).clone()))
            .collect();
        for (name, e) in &self.services {
            if e.endpoints.get(cluster).is_some_and(|chunks| {
                chunks
                    .values()
                    .flatten()
                    .any(|ep| ep.node.as_deref() == Some(node.as_str()))
            }) {
                names.insert(name.clone());
            }
        }
        for n in names {
            self.recompute(&n, false);
        }
    }

    /// Nodes whose health publication lapsed, as `(cluster, node)`, sorted.
    pub fn lapsed_nodes(&self) -> Vec<(ClusterName, String)> {
        let mut v: Vec<_> = self.lapsed.reporters.keys().cloned().collect();
        v.sort();
        v
    }

    fn unlink_report(
        &mut self,
        reporter: &Reporter,
        old: &HealthReport,
        touched: &mut HashSet<IpAddr>,
    ) {
        for v in &old.verdicts {
            self.health.remove(reporter, &(v.ip, v.port, v.protocol));
            touched.insert(v.ip);
        }
    }

    /// Mark a cluster stale (left out of selection, kept in memory) or live again.
    pub fn set_stale(&mut self, cluster: &ClusterName, stale: bool) {
        let changed = if stale {
            self.stale.insert(cluster.clone())
        } else {
            self.stale.remove(cluster)
        };
        if changed {
            self.cause = MoveCause::Liveness;
            self.recompute_all();
            self.cause = MoveCause::Health;
        }
    }

    /// Mark a remote cluster unreachable from this node (its backends leave this node's selection,
    /// kept in memory) or reachable again. The local cluster is never left out.
    pub fn set_unreachable(&mut self, cluster: &ClusterName, unreachable: bool) {
        if *cluster == self.local {
            return;
        }
        let changed = if unreachable {
            self.unreachable.insert(cluster.clone())
        } else {
            self.unreachable.remove(cluster)
        };
        if changed {
            self.cause = MoveCause::Reachability;
            self.recompute_all();
            self.cause = MoveCause::Health;
        }
    }

    /// Mark a backend as failed on this node (the kernel saw a connect to it fail and a probe
    /// confirmed it: it leaves this node's selection like a failing verdict, never down to zero),
    /// or answering again. Returns whether it changed.
    pub fn set_passive_failure(
        &mut self,
        cluster: &ClusterName,
        addr: (IpAddr, u16, Protocol),
        failed: bool,
    ) -> bool {
        let key = (cluster.clone(), addr);
        if failed && !self.passive.contains(&key) {
            self.newly_failed
                .push(std::net::SocketAddr::new(addr.0, addr.1));
        }
        let changed = if failed {
            self.passive.insert(key)
        } else {
            self.passive.remove(&key)
        };
        if changed {
            self.cause = MoveCause::Passive;
            self.recompute_ips(&HashSet::from([addr.0]));
            self.cause = MoveCause::Health;
        }
        changed
    }

    /// Backends that started failing since the last call: a health verdict turned failing, a
    /// passive failure was confirmed (the sockets to them are aborted: `crate::sockdestroy`).
    pub fn take_newly_failed(&mut self) -> Vec<std::net::SocketAddr> {
        std::mem::take(&mut self.newly_failed)
    }

    /// Backends out of this node's selection after a confirmed passive failure.
    pub fn passive_failures(&self) -> &BTreeSet<(ClusterName, (IpAddr, u16, Protocol))> {
        &self.passive
    }

    /// Remote clusters marked unreachable from this node.
    pub fn unreachable_clusters(&self) -> &BTreeSet<ClusterName> {
        &self.unreachable
    }

    /// What the reachability prober checks from this node, per remote cluster: the TCP backends
    /// selected here (the traffic this node sends), and every usable-by-conditions TCP backend of a
    /// cluster marked unreachable (to see it answer again). Sorted, deduplicated.
    pub fn remote_probe_targets(&self) -> BTreeMap<ClusterName, Vec<std::net::SocketAddr>> {
        self.remote_selected
            .keys()
            .chain(&self.unreachable)
            .map(|c| (c.clone(), self.remote_probe_targets_of(c)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// [`MergeIndex::remote_probe_targets`] of one cluster (empty: none).
    pub fn remote_probe_targets_of(&self, cluster: &ClusterName) -> Vec<std::net::SocketAddr> {
        let selected = self
            .remote_selected
            .get(cluster)
            .into_iter()
            .flatten()
            .map(|(a, _)| *a);
        if !self.unreachable.contains(cluster) {
            return selected.collect();
        }
        let mut all: BTreeSet<std::net::SocketAddr> = selected.collect();
        for e in self.services.values() {
            if e.status.as_ref().is_none_or(|s| s.frontends.is_empty()) {
                continue;
            }
            let Some(chunks) = e.endpoints.get(cluster) else {
                continue;
            };
            for ep in chunks.values().flatten() {
                if !ep.conditions.usable() {
                    continue;
                }
                for p in ep.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                    all.insert(std::net::SocketAddr::new(ep.ip, p.port));
                }
            }
        }
        all.into_iter().collect()
    }

    /// [`MergeIndex::remote_probe_targets`] with at most `per_cluster` addresses per cluster,
    /// spread evenly over its sorted list: what the prober takes turns over. A 255-cluster mesh
    /// selects about 1,000 backends per remote here; the prober needs a few per round, and a copy
    /// of all 255k each tick cost 8 MiB and a walk per batch. Only an unreachable cluster's list
    /// is built whole (its usable backends are walked).
    pub fn remote_probe_sample(
        &self,
        per_cluster: usize,
    ) -> BTreeMap<ClusterName, Vec<std::net::SocketAddr>> {
        let mut out: BTreeMap<ClusterName, Vec<std::net::SocketAddr>> = self
            .remote_selected
            .iter()
            .map(|(c, addrs)| (c.clone(), spread(addrs, per_cluster, |(a, _)| *a)))
            .collect();
        for c in &self.unreachable {
            let all = self.remote_probe_targets_of(c);
            if !all.is_empty() {
                out.insert(c.clone(), spread(&all, per_cluster, |a| *a));
            }
        }
        out
    }

    /// Forget everything read from `cluster` (it was disconnected).
    pub fn remove_cluster(&mut self, cluster: &ClusterName) {
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for name in names {
            let Some(e) = self.services.get_mut(&name) else {
                continue;
            };
            e.specs.remove(cluster);
            if cluster == &self.local {
                e.import = None;
            }
            if let Some(chunks) = e.endpoints.remove(cluster) {
                for eps in chunks.values() {
                    count_chunk(&mut self.endpoint_counts, cluster, Some(eps.len()), None);
                    for ep in eps {
                        self.ip_services.remove(ep.ip, &name);
                    }
                }
            }
        }
        let reporters: Vec<Reporter> = self
            .reports
            .keys()
            .filter(|(c, _)| c == cluster)
            .cloned()
            .collect();
        let mut touched = HashSet::new();
        for r in reporters {
            if let Some(old) = self.reports.remove(&r) {
                self.unlink_report(&r, &old, &mut touched);
            }
        }
        let lapsed: Vec<Reporter> = self
            .lapsed
            .reporters
            .keys()
            .filter(|(c, _)| c == cluster)
            .cloned()
            .collect();
        for r in lapsed {
            self.lapsed.remove(&r);
        }
        self.stale.remove(cluster);
        self.unreachable.remove(cluster);
        self.cause = MoveCause::Liveness;
        self.recompute_all();
        self.cause = MoveCause::Health;
    }

    // ---- outputs -----------------------------------------------------------------------------

    /// The backends to program, per frontend.
    pub fn desired(&self) -> &HashMap<Frontend, Backends> {
        &self.desired
    }

    /// Frontends whose backends changed since the last call, with the new set (`None`: remove).
    pub fn take_changes(&mut self) -> Vec<(Frontend, Option<Backends>)> {
        let mut out: Vec<_> = self
            .changed
            .drain()
            .map(|fe| (fe, self.desired.get(&fe).cloned()))
            .collect();
        out.sort_by_key(|a| a.0);
        out
    }

    /// Whether changes are pending.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Status of every global service known, sorted by name.
    pub fn services(&self) -> Vec<&ServiceStatus> {
        let mut v: Vec<&ServiceStatus> = self
            .services
            .values()
            .filter_map(|e| e.status.as_deref())
            .collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }

    /// Status of every global service known, in no order, shared (for the agent's snapshot: a
    /// pointer per service, never a copy of its backends).
    pub fn shared_services(&self) -> Vec<Arc<ServiceStatus>> {
        self.services
            .values()
            .filter_map(|e| e.status.clone())
            .collect()
    }

    /// Endpoints held per cluster (every chunk read, usable or not): a cluster is listed while it
    /// has a chunk of some service. Kept as chunks come and go (a walk over every service's
    /// chunks per snapshot cost the agent most of its CPU under churn at 255 clusters).
    pub fn endpoints_by_cluster(&self) -> BTreeMap<ClusterName, usize> {
        self.endpoint_counts
            .iter()
            .map(|(c, (_, n))| (c.clone(), *n))
            .collect()
    }

    /// Whether the health reports held are those of `reporters` (cluster, node), in any order.
    pub fn health_reporters_are(&self, reporters: &[(ClusterName, String)]) -> bool {
        reporters.len() == self.reports.len()
            && reporters.iter().all(|r| self.reports.contains_key(r))
    }

    /// The nodes whose health reports are held, by cluster.
    pub fn health_reporters(&self) -> Vec<(ClusterName, String)> {
        let mut v: Vec<(ClusterName, String)> = self.reports.keys().cloned().collect();
        v.sort();
        v
    }

    /// Status of one service.
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceStatus> {
        self.services.get(name).and_then(|e| e.status.as_deref())
    }

    /// Every known backend of a service for its first frontend, with whether it is selected and,
    /// when it is not usable, why (`cluster stale`, `failing health check`, `terminating`,
    /// `not ready`). Computed on demand for the status page.
    pub fn backend_states(&self, name: &ServiceName) -> Vec<(Backend, bool, Option<&'static str>)> {
        let Some(entry) = self.services.get(name) else {
            return Vec::new();
        };
        let Some(sel) = entry.status.as_ref().and_then(|s| s.frontends.first()) else {
            return Vec::new();
        };
        let Some(sp) = entry
            .specs
            .get(&self.local)
            .map(|s| s.ports.as_slice())
            .or(entry.import.as_ref().map(|i| i.ports.as_slice()))
            .and_then(|p| {
                p.iter()
                    .find(|p| p.port == sel.frontend.port && p.protocol == sel.frontend.protocol)
            })
        else {
            return Vec::new();
        };
        let selected: HashSet<&Backend> = sel.backends.iter().collect();
        let mut out = Vec::new();
        for (cref, chunks) in &entry.endpoints {
            let sharing = entry
                .specs
                .get(cref.name())
                .is_some_and(|s| *cref == self.local || s.shared);
            if !sharing {
                continue;
            }
            for ep in chunks.values().flatten() {
                if ep.ip.is_ipv4() != sel.frontend.ip.is_ipv4() {
                    continue;
                }
                let Some(port) = match_port(sp, ep) else {
                    continue;
                };
                let b = Backend {
                    cluster: cref.clone(),
                    ip: ep.ip,
                    port,
                    protocol: sp.protocol,
                };
                let failing = self
                    .health
                    .failing(cref.name(), &(ep.ip, port, sp.protocol));
                let orphaned = self.lapsed.orphaned(
                    cref.name(),
                    ep,
                    &(ep.ip, port, sp.protocol),
                    &self.health,
                );
                let why = if *cref != self.local && self.stale.contains(cref.name()) {
                    Some("cluster stale")
                } else if *cref != self.local && self.unreachable.contains(cref.name()) {
                    Some("cluster unreachable from this node")
                } else if failing {
                    Some("failing health check")
                } else if orphaned && !selected.contains(&b) {
                    // Left out while others are usable; used when nothing else is.
                    Some("its node stopped publishing health verdicts")
                } else if ep.conditions.terminating && !ep.conditions.usable() {
                    Some("terminating")
                } else if !ep.conditions.usable() {
                    Some("not ready")
                } else {
                    None
                };
                let is_selected = selected.contains(&b);
                out.push((b, is_selected, why));
            }
        }
        out
    }

    /// A number that grows whenever a service's inputs or selection change (to rebuild derived
    /// views, the DNS zone and the probe targets, only then).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The `clusterset.local` view: every global service with its ClusterSetIPs (the local
    /// Service's addresses or this cluster's import) and, for headless services, the usable
    /// endpoints of the live clusters that share it, local ones first.
    pub fn dns_zone(&self) -> clusterset_dns::Zone {
        let mut zone = clusterset_dns::Zone::default();
        for (name, e) in &self.services {
            let local_spec = e.specs.get(&self.local);
            let governing = local_spec.or_else(|| e.specs.values().next());
            let headless = governing.is_some_and(|s| s.headless);
            let (ips, ports) = match (local_spec, &e.import) {
                (Some(s), _) => (s.frontends.clone(), s.ports.clone()),
                (None, Some(i)) => (i.ips.clone(), i.ports.clone()),
                (None, None) if headless => (
                    Vec::new(),
                    governing.map(|s| s.ports.clone()).unwrap_or_default(),
                ),
                (None, None) => continue,
            };
            let mut endpoints = Vec::new();
            // Endpoints whose node stopped publishing verdicts: left out unless nothing else is
            // usable (as for the maps).
            let mut orphans = Vec::new();
            if headless {
                for (cref, chunks) in &e.endpoints {
                    let is_local = *cref == self.local;
                    let shares = e
                        .specs
                        .get(cref.name())
                        .is_some_and(|s| is_local || s.shared);
                    if !shares
                        || (!is_local
                            && (self.stale.contains(cref.name())
                                || self.unreachable.contains(cref.name())))
                    {
                        continue;
                    }
                    for ep in chunks.values().flatten() {
                        let failing = ep.ports.iter().any(|p| {
                            self.health
                                .failing(cref.name(), &(ep.ip, p.port, p.protocol))
                        });
                        if !ep.conditions.usable() || failing {
                            continue;
                        }
                        let orphaned = !ep.ports.is_empty()
                            && ep.ports.iter().all(|p| {
                                self.lapsed.orphaned(
                                    cref.name(),
                                    ep,
                                    &(ep.ip, p.port, p.protocol),
                                    &self.health,
                                )
                            });
                        let d = clusterset_dns::DnsEndpoint {
                            ip: ep.ip,
                            cluster: cref.name().clone(),
                            hostname: ep.hostname.clone(),
                            local: is_local,
                            ports: ep.ports.to_vec(),
                        };
                        if orphaned {
                            orphans.push(d);
                        } else {
                            endpoints.push(d);
                        }
                    }
                }
                if endpoints.is_empty() {
                    endpoints = orphans;
                }
                endpoints.sort_by_key(|d| !d.local);
            }
            zone.insert(clusterset_dns::DnsService {
                name: name.clone(),
                cluster_set_ips: if headless { Vec::new() } else { ips },
                headless,
                ports,
                endpoints,
            });
        }
        zone
    }

    /// Frontends failing open now (every ready backend fails its health check), with their service.
    pub fn fail_open(&self) -> Vec<(&ServiceName, Frontend)> {
        let mut v: Vec<_> = self
            .services
            .values()
            .filter_map(|e| e.status.as_deref())
            .flat_map(|s| {
                s.frontends
                    .iter()
                    .filter(|f| matches!(f.reason, Reason::FailOpen { .. }))
                    .map(move |f| (&s.service, f.frontend))
            })
            .collect();
        v.sort();
        v
    }

    /// How many times a frontend moved from its preferred group to a failover group.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Changes of the cluster group of each service since the last call (judged on the
    /// service's first frontend).
    pub fn take_group_changes(&mut self) -> Vec<GroupChange> {
        std::mem::take(&mut self.group_changes)
    }

    /// Clusters marked stale.
    pub fn stale_clusters(&self) -> &BTreeSet<ClusterName> {
        &self.stale
    }

    /// The backends of the local cluster that run on `node`, with how to probe them.
    pub fn probe_targets(&self, node: &str) -> BTreeSet<ProbeTarget> {
        let mut out = BTreeSet::new();
        for e in self.services.values() {
            let Some(spec) = e.specs.get(&self.local) else {
                continue;
            };
            let kind = match &spec.health_check {
                HealthCheck::Tcp => ProbeKind::Tcp,
                HealthCheck::Http { path } => ProbeKind::Http(path.clone()),
            };
            let Some(chunks) = e.endpoints.get(&self.local) else {
                continue;
            };
            for ep in chunks.values().flatten() {
                if ep.node.as_deref() != Some(node) {
                    continue;
                }
                for p in ep.ports.iter() {
                    // A TCP backend is probed on its port (or the health-check port); a UDP
                    // one only through a health-check port (its own silence proves nothing).
                    let probe_port = match (p.protocol, spec.health_check_port) {
                        (_, Some(hp)) => hp,
                        (Protocol::Tcp, None) => p.port,
                        _ => continue,
                    };
                    out.insert(ProbeTarget {
                        ip: ep.ip,
                        port: p.port,
                        protocol: p.protocol,
                        probe_port,
                        check: kind.clone(),
                    });
                }
            }
        }
        out
    }

    /// Number of endpoints held (all clusters).
    /// When the backends of `service` in `clusters` last changed to `verdict`, by their reporters' clocks:
    /// the latest `since` of a failing verdict (a failover starts when the last usable backend fails;
    /// a backend failing for long before does not count), or the latest `since` of a healthy one (a
    /// failback follows a recovery just seen; backends healthy for long, unusable for another reason,
    /// must not count).
    pub fn verdict_since(
        &self,
        service: &ServiceName,
        clusters: &[ClusterName],
        verdict: Verdict,
    ) -> Option<time::OffsetDateTime> {
        let entry = self.services.get(service)?;
        // Verdicts apply to the reporter's own cluster's backends (see [`Verdicts`]).
        let ips: HashSet<(&ClusterName, IpAddr)> = entry
            .endpoints
            .iter()
            .filter(|(c, _)| clusters.contains(c.name()))
            .flat_map(|(c, chunks)| chunks.values().flatten().map(move |e| (c.name(), e.ip)))
            .collect();
        let times = self
            .reports
            .iter()
            .flat_map(|((c, _), r)| r.verdicts.iter().map(move |v| (c, v)))
            .filter_map(|(c, v)| {
                (v.verdict == verdict && ips.contains(&(c, v.ip)))
                    .then_some(v.since.as_deref())
                    .flatten()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
            });
        times.max()
    }

    pub fn endpoint_count(&self) -> usize {
        self.services
            .values()
            .flat_map(|e| e.endpoints.values())
            .flat_map(|c| c.values())
            .map(Vec::len)
            .sum()
    }

    // ---- selection ---------------------------------------------------------------------------

    fn recompute_all(&mut self) {
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for n in names {
            self.recompute(&n, false);
        }
    }

    fn recompute_ips(&mut self, ips: &HashSet<IpAddr>) {
        let mut names: BTreeSet<ServiceName> = BTreeSet::new();
        for ip in ips {
            names.extend(self.ip_services.services(ip).map(|s| (**s).clone()));
        }
        for n in names {
            self.recompute(&n, false);
        }
    }

    /// Select again for `name`. `inputs_changed`: its specs, import or endpoints changed (the
    /// generation moves); otherwise (health, staleness) the generation moves only when the
    /// selection did, or for a headless service, whose DNS answers follow health directly.
    fn recompute(&mut self, name: &ServiceName, inputs_changed: bool) {
        self.recompute_scoped(name, inputs_changed, Scope::All);
    }

    /// [`MergeIndex::recompute`] when only `scope` changed.
    fn recompute_scoped(&mut self, name: &ServiceName, inputs_changed: bool, scope: Scope) {
        if let Some(due) = &mut self.deferred {
            let cause = self.cause;
            match due.get_mut(name) {
                Some(e) => {
                    e.0 |= inputs_changed;
                    if !inputs_changed {
                        e.1 = cause;
                    }
                    e.2 = std::mem::replace(&mut e.2, Scope::All).and(&scope);
                }
                None => {
                    due.insert(name.clone(), (inputs_changed, cause, scope));
                }
            }
            return;
        }
        let Some(mut entry) = self.services.remove(name) else {
            return;
        };
        if inputs_changed {
            self.generation += 1;
        }
        let old_shared = entry.status.take();
        let old = old_shared.as_deref();
        let old_groups = std::mem::take(&mut entry.groups);
        let cause = if inputs_changed {
            MoveCause::Endpoints
        } else {
            self.cause
        };
        if entry.is_empty() {
            if !old_groups.is_empty() {
                self.group_changes.push(GroupChange {
                    service: name.clone(),
                    from: old_groups,
                    to: Vec::new(),
                    cause,
                });
            }
            for f in old.iter().flat_map(|s| s.frontends.iter()) {
                self.remove_frontend(&f.frontend, name);
            }
            return;
        }
        let ctx = SelectContext {
            local: &self.local,
            stale: &self.stale,
            unreachable: &self.unreachable,
            health: &self.health,
            passive: &self.passive,
            lapsed: &self.lapsed,
        };
        let spliced = match (&scope, old) {
            (Scope::Chunks(clusters), Some(old)) => splice(&ctx, old, &entry, clusters),
            _ => None,
        };
        let status = match spliced {
            Some(s) => {
                self.selections.spliced += 1;
                s
            }
            None => {
                self.selections.full += 1;
                select(name, &ctx, old, &entry)
            }
        };
        if let Some(old) = &old {
            for f in &old.frontends {
                if !status.frontends.iter().any(|n| n.frontend == f.frontend) {
                    self.remove_frontend(&f.frontend, name);
                }
            }
        }
        for sel in &status.frontends {
            let was_fail_open = old.is_some_and(|o| {
                o.frontends.iter().any(|f| {
                    f.frontend == sel.frontend && matches!(f.reason, Reason::FailOpen { .. })
                })
            });
            match (&sel.reason, was_fail_open) {
                (Reason::FailOpen { failing, .. }, false) => tracing::warn!(
                    service = %name,
                    frontend = %sel.frontend,
                    failing,
                    backends = sel.backends.len(),
                    "every ready backend fails its health check: failing open (connects spread over the ready backends; check the probe port and what blocks node-to-pod probes)"
                ),
                (r, true) if !matches!(r, Reason::FailOpen { .. }) => tracing::info!(
                    service = %name,
                    frontend = %sel.frontend,
                    reason = %r,
                    "no longer failing open"
                ),
                _ => {}
            }
            let was_failed_over = old.is_some_and(|o| {
                o.frontends.iter().any(|f| {
                    f.frontend == sel.frontend && matches!(f.reason, Reason::FailedOver { .. })
                })
            });
            if matches!(sel.reason, Reason::FailedOver { .. }) && !was_failed_over {
                self.failovers += 1;
            }
            // One walk both compares and counts what changed.
            let differs = match self.desired.get(&sel.frontend).cloned() {
                None => {
                    self.count_selected(&[], &sel.backends);
                    true
                }
                Some(cur) => self.count_selected(&cur, &sel.backends),
            };
            if differs {
                self.desired.insert(sel.frontend, sel.backends.clone());
                self.changed.insert(sel.frontend);
            }
            if self.frontend_owner.get(&sel.frontend) != Some(name) {
                self.frontend_owner.insert(sel.frontend, name.clone());
            }
        }
        if !inputs_changed {
            let governing = entry
                .specs
                .get(&self.local)
                .or_else(|| entry.specs.values().next());
            if old != Some(&status) || governing.is_some_and(|s| s.headless) {
                self.generation += 1;
            }
        }
        let new_groups = selected_clusters(status.frontends.first());
        if old.is_some() && new_groups != old_groups && self.group_changes.len() < 10_000 {
            self.group_changes.push(GroupChange {
                service: name.clone(),
                from: old_groups,
                to: new_groups.clone(),
                cause,
            });
        }
        entry.groups = new_groups;
        entry.status = Some(Arc::new(status));
        self.services.insert(name.clone(), entry);
    }

    /// A frontend's backends went from `old` to `new`: count the remote TCP backends that left
    /// and came in `remote_selected`, and say whether they differ. Only the stretch between their
    /// common start and common end is walked (a change of one endpoint moves one backend of
    /// thousands).
    fn count_selected(&mut self, old: &[Backend], new: &[Backend]) -> bool {
        let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        if head == old.len() && head == new.len() {
            return false;
        }
        let (old, new) = (&old[head..], &new[head..]);
        let tail = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let (old, new) = (&old[..old.len() - tail], &new[..new.len() - tail]);
        let remote_tcp = |b: &&Backend| b.protocol == Protocol::Tcp && b.cluster != self.local;
        let gone: Vec<&Backend> = old.iter().filter(remote_tcp).collect();
        let came: Vec<&Backend> = new.iter().filter(remote_tcp).collect();
        for b in gone {
            let addr = std::net::SocketAddr::new(b.ip, b.port);
            if let Some(m) = self.remote_selected.get_mut(b.cluster.name()) {
                if let Ok(i) = m.binary_search_by_key(&addr, |(a, _)| *a) {
                    m[i].1 -= 1;
                    if m[i].1 == 0 {
                        m.remove(i);
                    }
                }
                if m.is_empty() {
                    self.remote_selected.remove(b.cluster.name());
                }
            }
        }
        for b in came {
            let addr = std::net::SocketAddr::new(b.ip, b.port);
            match self.remote_selected.get_mut(b.cluster.name()) {
                Some(m) => match m.binary_search_by_key(&addr, |(a, _)| *a) {
                    Ok(i) => m[i].1 += 1,
                    Err(i) => m.insert(i, (addr, 1)),
                },
                None => {
                    self.remote_selected
                        .insert(b.cluster.name().clone(), vec![(addr, 1)]);
                }
            }
        }
        true
    }

    fn remove_frontend(&mut self, fe: &Frontend, owner: &ServiceName) {
        if self.frontend_owner.get(fe) == Some(owner) {
            self.frontend_owner.remove(fe);
            if let Some(old) = self.desired.remove(fe) {
                self.count_selected(&old, &[]);
                self.changed.insert(*fe);
            }
        }
    }
}

/// Which services have an endpoint on an address, each with its count of occurrences. One entry
/// per endpoint address of the mesh (255k at 255 clusters x 1,000), so the common case is
/// small: an IPv4 address of one service is 24 bytes in `v4` (a map keyed by `IpAddr` with a
/// list per address took 56, 30 MiB at 255k); IPv6 addresses and addresses of several services
/// are in `other`.
#[derive(Debug, Default)]
struct IpIndex {
    v4: HashMap<u32, (Arc<ServiceName>, u32)>,
    other: HashMap<IpAddr, Vec<(Arc<ServiceName>, u32)>>,
}

impl IpIndex {
    /// One more endpoint of `svc` on `ip`.
    fn add(&mut self, ip: IpAddr, svc: &Arc<ServiceName>) {
        if let IpAddr::V4(v4) = ip
            && !self.other.contains_key(&ip)
        {
            match self.v4.entry(u32::from(v4)) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert((svc.clone(), 1));
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if *e.get().0 == **svc {
                        e.get_mut().1 += 1;
                    } else {
                        // A second service on the address: it moves to `other`.
                        let first = e.remove();
                        self.other.insert(ip, vec![first, (svc.clone(), 1)]);
                    }
                }
            }
            return;
        }
        let list = self.other.entry(ip).or_default();
        match list.iter_mut().find(|(s, _)| **s == **svc) {
            Some((_, n)) => *n += 1,
            None => list.push((svc.clone(), 1)),
        }
    }

    /// One endpoint of `svc` on `ip` fewer.
    fn remove(&mut self, ip: IpAddr, svc: &ServiceName) {
        if let IpAddr::V4(v4) = ip
            && let std::collections::hash_map::Entry::Occupied(mut e) = self.v4.entry(u32::from(v4))
        {
            if *e.get().0 == *svc {
                e.get_mut().1 -= 1;
                if e.get().1 == 0 {
                    e.remove();
                }
            }
            return;
        }
        if let Some(m) = self.other.get_mut(&ip) {
            if let Some(i) = m.iter().position(|(s, _)| **s == *svc) {
                m[i].1 -= 1;
                if m[i].1 == 0 {
                    m.swap_remove(i);
                }
            }
            if m.is_empty() {
                self.other.remove(&ip);
            }
        }
    }

    /// The services with an endpoint on `ip`.
    fn services(&self, ip: &IpAddr) -> impl Iterator<Item = &Arc<ServiceName>> {
        let one = match ip {
            IpAddr::V4(v4) => self.v4.get(&u32::from(*v4)).map(|(s, _)| s),
            IpAddr::V6(_) => None,
        };
        one.into_iter().chain(
            self.other
                .get(ip)
                .into_iter()
                .flat_map(|m| m.iter().map(|(s, _)| s)),
        )
    }

    /// Every (address, service, count).
    #[cfg(test)]
    fn entries(&self) -> impl Iterator<Item = (IpAddr, &Arc<ServiceName>, u32)> {
        self.v4
            .iter()
            .map(|(ip, (s, n))| (IpAddr::V4((*ip).into()), s, *n))
            .chain(
                self.other
                    .iter()
                    .flat_map(|(ip, m)| m.iter().map(move |(s, n)| (*ip, s, *n))),
            )
    }
}

/// At most `n` of `items`, spread evenly (all of them when there are no more than `n`).
fn spread<T, U>(items: &[T], n: usize, f: impl Fn(&T) -> U) -> Vec<U> {
    if items.len() <= n {
        return items.iter().map(f).collect();
    }
    (0..n).map(|i| f(&items[i * items.len() / n])).collect()
}

/// A chunk of `cluster` went from `old` endpoints to `new` (`None`: no chunk).
fn count_chunk(
    counts: &mut BTreeMap<ClusterName, (usize, usize)>,
    cluster: &ClusterName,
    old: Option<usize>,
    new: Option<usize>,
) {
    if old.is_none() && new.is_none() {
        return;
    }
    if !counts.contains_key(cluster) {
        counts.insert(cluster.clone(), (0, 0));
    }
    let Some((chunks, endpoints)) = counts.get_mut(cluster) else {
        return;
    };
    if let Some(o) = old {
        *chunks -= 1;
        *endpoints -= o;
    }
    if let Some(n) = new {
        *chunks += 1;
        *endpoints += n;
    }
    if *chunks == 0 {
        counts.remove(cluster);
    }
}

/// Find the endpoint port serving `sp`: same protocol and same name; an unnamed service port
/// takes the endpoint's only port of that protocol.
fn match_port(sp: &ServicePort, ep: &Endpoint) -> Option<u16> {
    let mut same_proto = ep.ports.iter().filter(|p| p.protocol == sp.protocol);
    match &sp.name {
        Some(n) => ep
            .ports
            .iter()
            .find(|p| p.protocol == sp.protocol && p.name.as_deref() == Some(n.as_str()))
            .or_else(|| {
                // A single-port endpoint whose port is unnamed serves a single named service port.
                let only = same_proto.next()?;
                (same_proto.next().is_none() && only.name.is_none()).then_some(only)
            })
            .map(|p| p.port),
        None => {
            let only = same_proto.next()?;
            same_proto.next().is_none().then_some(only.port)
        }
    }
}

struct Candidate<'a> {
    ip: IpAddr,
    port: u16,
    conditions: &'a Conditions,
    failing: bool,
    /// Its node's health publication lapsed (see [`Lapsed`]).
    orphaned: bool,
}

fn serialize_backends<S: serde::Serializer>(b: &Backends, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(b.iter())
}

/// What selection reads besides the service itself.
struct SelectContext<'a> {
    local: &'a ClusterName,
    stale: &'a BTreeSet<ClusterName>,
    unreachable: &'a BTreeSet<ClusterName>,
    health: &'a Verdicts,
    passive: &'a BTreeSet<(ClusterName, BackendAddr)>,
    lapsed: &'a Lapsed,
}

/// The spec that governs affinity and failover order: the local one, else the first remote one.
fn governing<'a>(entry: &'a ServiceEntry, local: &ClusterName) -> Option<&'a ServiceSpec> {
    entry
        .specs
        .get(local)
        .or_else(|| entry.specs.values().next())
}

/// Clusters that share the service, by name: this one when it has the Service, and remotes that
/// published a spec with shared=true.
fn sharing<'a>(entry: &'a ServiceEntry, local: &ClusterName) -> Vec<&'a ClusterName> {
    entry
        .specs
        .iter()
        .filter(|(c, s)| *c == local || s.shared)
        .map(|(c, _)| c)
        .collect()
}

/// Whether a sharing cluster's backends may be chosen: the local one always, a remote one when
/// it is neither stale nor unreachable.
fn is_candidate(c: &ClusterName, ctx: &SelectContext<'_>) -> bool {
    c == ctx.local || !(ctx.stale.contains(c) || ctx.unreachable.contains(c))
}

/// The groups of candidate clusters a service's frontends choose from, in order of preference:
/// a frontend takes the usable backends of the first group that has any.
struct Groups<'a> {
    /// The candidate clusters, by name.
    candidates: Vec<&'a ClusterName>,
    /// Each candidate's group, in the order of `candidates` (every candidate is in one).
    group_of: Vec<Option<usize>>,
    /// The groups.
    list: Vec<Vec<&'a ClusterName>>,
}

impl<'a> Groups<'a> {
    fn new(
        entry: &'a ServiceEntry,
        local: &'a ClusterName,
        candidates: Vec<&'a ClusterName>,
    ) -> Self {
        let governing = governing(entry, local);
        let affinity = governing.map(|s| s.affinity).unwrap_or_default();
        let failover_order: &[ClusterName] = governing
            .map(|s| s.failover_order.as_slice())
            .unwrap_or_default();
        // Which group is the remotes outside the failover order (the only large one; every other
        // group is one cluster).
        let mut rest_at: Option<usize> = None;
        let list: Vec<Vec<&ClusterName>> = {
            let remotes: Vec<&ClusterName> = candidates
                .iter()
                .filter(|c| **c != local)
                .copied()
                .collect();
            let mut remote_groups: Vec<Vec<&ClusterName>> = Vec::new();
            for c in failover_order {
                if remotes.contains(&c) {
                    remote_groups.push(vec![c]);
                }
            }
            let rest: Vec<&ClusterName> = remotes
                .iter()
                .filter(|c| !failover_order.contains(c))
                .copied()
                .collect();
            let singles = remote_groups.len();
            if !rest.is_empty() {
                remote_groups.push(rest);
            }
            let local_group = if candidates.contains(&local) {
                vec![vec![local]]
            } else {
                Vec::new()
            };
            if remote_groups.len() > singles {
                rest_at = match affinity {
                    Affinity::Local => Some(local_group.len() + singles),
                    Affinity::Remote => Some(singles),
                    Affinity::None => None,
                };
            }
            match affinity {
                Affinity::Local => local_group.into_iter().chain(remote_groups).collect(),
                Affinity::Remote => remote_groups.into_iter().chain(local_group).collect(),
                Affinity::None => vec![candidates.clone()],
            }
        };
        // Each candidate cluster's group (the first that names it: a cluster twice in the
        // failover order adds nothing the first time did not). The one-cluster groups are
        // searched; a remote in none of them is in the rest.
        let group_of: Vec<Option<usize>> = candidates
            .iter()
            .map(|c| {
                if affinity == Affinity::None {
                    return Some(0);
                }
                list.iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != rest_at)
                    .find(|(_, g)| g.contains(c))
                    .map(|(i, _)| i)
                    .or(rest_at.filter(|_| *c != local))
            })
            .collect();
        Self {
            candidates,
            group_of,
            list,
        }
    }

    /// The group of cluster `c` (`None`: not a candidate, or in no group).
    fn of(&self, c: &ClusterName) -> Option<usize> {
        let i = self.candidates.binary_search(&c).ok()?;
        self.group_of[i]
    }
}

/// Append to `out` the candidates for frontend `ip` / `sp` among `cluster`'s endpoints: those of
/// the frontend's address family with a port serving `sp`, in chunk order.
fn push_candidates<'a>(
    out: &mut Vec<Candidate<'a>>,
    cluster: &ClusterName,
    chunks: &'a Chunks,
    ip: &IpAddr,
    sp: &ServicePort,
    ctx: &SelectContext<'_>,
) {
    let SelectContext {
        health,
        passive,
        lapsed,
        ..
    } = *ctx;
    for ep in chunks.values().flatten() {
        if ep.ip.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        let Some(port) = match_port(sp, ep) else {
            continue;
        };
        let addr = (ep.ip, port, sp.protocol);
        let failing = (!health.is_empty() && health.failing(cluster, &addr))
            || (!passive.is_empty() && passive.contains(&(cluster.clone(), addr)));
        let orphaned = lapsed.orphaned(cluster, ep, &addr, health);
        out.push(Candidate {
            ip: ep.ip,
            port,
            conditions: &ep.conditions,
            failing,
            orphaned,
        });
    }
}

/// The selection of a service of which only the endpoints of `changed` (sorted) changed since
/// `old`: each frontend keeps its backends with the changed clusters' runs rebuilt, when that
/// is what [`select`] would choose. That holds when the frontend chose a group's usable backends
/// (not failing open, not keeping the last, no lapsed health publication anywhere), and each
/// changed cluster is in the chosen group (its run is rebuilt; the group keeps some usable
/// backend), in a later group (nothing changes), or in an earlier one that still has no usable
/// backend of the frontend. Otherwise `None`: select in full.
fn splice(
    ctx: &SelectContext<'_>,
    old: &ServiceStatus,
    entry: &ServiceEntry,
    changed: &[ClusterName],
) -> Option<ServiceStatus> {
    if !ctx.lapsed.is_empty() || old.no_frontend.is_some() || old.frontends.is_empty() {
        return None;
    }
    let local = ctx.local;
    let candidates: Vec<&ClusterName> = sharing(entry, local)
        .into_iter()
        .filter(|c| is_candidate(c, ctx))
        .collect();
    let groups = Groups::new(entry, local, candidates);
    // The changed clusters that are candidates, with their group and endpoints (none: its last
    // chunk was deleted).
    type Changed<'e> = (&'e ClusterName, usize, Option<(&'e ClusterRef, &'e Chunks)>);
    let changed: Vec<Changed<'_>> = changed
        .iter()
        .filter_map(|c| Some((c, groups.of(c)?, entry.endpoints.get_key_value(c))))
        .collect();
    let ports: &[ServicePort] = match (entry.specs.get(local), &entry.import) {
        (Some(s), _) => &s.ports,
        (None, Some(i)) => &i.ports,
        (None, None) => return None,
    };
    let mut frontends = Vec::with_capacity(old.frontends.len());
    for f in &old.frontends {
        if !matches!(
            f.reason,
            Reason::AllUsable | Reason::Preferred { .. } | Reason::FailedOver { .. }
        ) {
            return None;
        }
        let sp = ports
            .iter()
            .find(|p| p.port == f.frontend.port && p.protocol == f.frontend.protocol)?;
        let chosen = groups.of(f.backends.first()?.cluster.name())?;
        let mut backends: Option<Vec<Backend>> = None;
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        for &(c, g, eps) in &changed {
            if g > chosen {
                continue;
            }
            candidates.clear();
            if let Some((_, chunks)) = eps {
                push_candidates(&mut candidates, c, chunks, &f.frontend.ip, sp, ctx);
            }
            let usable = candidates
                .iter()
                .filter(|c| c.conditions.usable() && !c.failing);
            if g < chosen {
                if usable.count() > 0 {
                    return None;
                }
                continue;
            }
            let cref = eps.map(|(r, _)| r)?;
            let run = usable.map(|cand| Backend {
                cluster: cref.clone(),
                ip: cand.ip,
                port: cand.port,
                protocol: sp.protocol,
            });
            // The chosen group's backends are by cluster name: `c`'s run is where its name goes.
            let cur: &[Backend] = backends.as_deref().unwrap_or(&f.backends);
            let start = cur.partition_point(|b| b.cluster.name() < c);
            let end = start + cur[start..].partition_point(|b| b.cluster.name() == c);
            let mut next = Vec::with_capacity(cur.len() - (end - start) + candidates.len());
            next.extend_from_slice(&cur[..start]);
            next.extend(run);
            next.extend_from_slice(&cur[end..]);
            backends = Some(next);
        }
        let backends = match backends {
            Some(b) if b.is_empty() => return None,
            Some(b) => Backends::from(b),
            None => f.backends.clone(),
        };
        frontends.push(FrontendSelection {
            backends,
            ..f.clone()
        });
    }
    Some(ServiceStatus {
        frontends,
        ..old.clone()
    })
}

fn select(
    name: &ServiceName,
    ctx: &SelectContext<'_>,
    old: Option<&ServiceStatus>,
    entry: &ServiceEntry,
) -> ServiceStatus {
    let SelectContext {
        local,
        stale,
        unreachable,
        ..
    } = *ctx;
    let local_spec = entry.specs.get(local);
    let affinity = governing(entry, local)
        .map(|s| s.affinity)
        .unwrap_or_default();
    let sharing = sharing(entry, local);
    let stale_clusters: Vec<ClusterName> = sharing
        .iter()
        .filter(|c| **c != local && stale.contains(**c))
        .map(|c| (*c).clone())
        .collect();
    let unreachable_clusters: Vec<ClusterName> = sharing
        .iter()
        .filter(|c| **c != local && unreachable.contains(**c) && !stale.contains(**c))
        .map(|c| (*c).clone())
        .collect();
    let candidate_clusters: Vec<&ClusterName> = sharing
        .iter()
        .filter(|c| is_candidate(c, ctx))
        .copied()
        .collect();

    let mut status = ServiceStatus {
        service: name.clone(),
        affinity,
        clusters: sharing.iter().map(|c| (*c).clone()).collect(),
        stale_clusters,
        unreachable_clusters,
        frontends: Vec::new(),
        no_frontend: None,
    };

    // Frontends: the local Service's ClusterIPs x ports, else this cluster's import.
    let (ips, ports): (&[IpAddr], &[ServicePort]) = match (local_spec, &entry.import) {
        (Some(s), _) if s.headless => {
            status.no_frontend = Some(NoFrontend::Headless);
            return status;
        }
        (Some(s), _) => (&s.frontends, &s.ports),
        (None, Some(i)) => (&i.ips, &i.ports),
        (None, None) => {
            status.no_frontend = Some(NoFrontend::NoLocalServiceOrImport);
            return status;
        }
    };

    let Groups {
        list: groups,
        group_of,
        ..
    } = Groups::new(entry, local, candidate_clusters.clone());
    // Endpoints of the candidate clusters, in the same (name) order: one walk, no lookups.
    let candidate_endpoints: Vec<(&ClusterRef, &Chunks, Option<usize>)> = {
        let mut out = Vec::with_capacity(candidate_clusters.len());
        let mut eps = entry.endpoints.iter().peekable();
        for (c, gi) in candidate_clusters.iter().zip(&group_of) {
            while eps.next_if(|(r, _)| r.name() < *c).is_some() {}
            if let Some((cref, chunks)) = eps.next_if(|(r, _)| r.name() == *c) {
                out.push((cref, chunks, *gi));
            }
        }
        out
    };
    let endpoint_count: usize = candidate_endpoints
        .iter()
        .map(|(_, chunks, _)| chunks.values().map(Vec::len).sum::<usize>())
        .sum();

    for sp in ports {
        for ip in ips {
            let frontend = Frontend {
                ip: *ip,
                port: sp.port,
                protocol: sp.protocol,
            };
            // Candidates of the frontend's address family, in one list; per cluster its stretch
            // of the list and its group.
            let mut all: Vec<Candidate<'_>> = Vec::with_capacity(endpoint_count);
            let mut per_cluster: Vec<(&ClusterRef, std::ops::Range<usize>, Option<usize>)> =
                Vec::with_capacity(candidate_endpoints.len());
            for &(cref, chunks, gi) in &candidate_endpoints {
                let start = all.len();
                push_candidates(&mut all, cref.name(), chunks, ip, sp, ctx);
                per_cluster.push((cref, start..all.len(), gi));
            }
            let total = all.len();
            // First without the backends whose node stopped publishing verdicts; only when that
            // leaves nothing anywhere, with them (never zero backends while usable ones exist).
            let any_orphaned = all.iter().any(|c| c.orphaned);
            let passes: &[bool] = if any_orphaned {
                &[true, false]
            } else {
                &[false]
            };
            let usable = |c: &Candidate<'_>, strict: bool| {
                c.conditions.usable() && !c.failing && !(strict && c.orphaned)
            };
            let backend = |cref: &ClusterRef, c: &Candidate<'_>| Backend {
                cluster: cref.clone(),
                ip: c.ip,
                port: c.port,
                protocol: sp.protocol,
            };
            let mut chosen: Option<(Vec<Backend>, Reason)> = None;
            'passes: for &strict in passes {
                for (i, g) in groups.iter().enumerate() {
                    let in_group = || per_cluster.iter().filter(|(_, _, gi)| *gi == Some(i));
                    // Room for every candidate of the group (a second walk to count the usable
                    // ones cost more than the slack; the list is copied once, exactly, below).
                    let room: usize = in_group().map(|(_, r, _)| r.len()).sum();
                    let mut picked: Vec<Backend> = Vec::with_capacity(room);
                    for (cref, r, _) in in_group() {
                        picked.extend(
                            all[r.clone()]
                                .iter()
                                .filter(|c| usable(c, strict))
                                .map(|c| backend(cref, c)),
                        );
                    }
                    if picked.is_empty() {
                        continue;
                    }
                    let reason = if affinity == Affinity::None {
                        Reason::AllUsable
                    } else if i == 0 {
                        Reason::Preferred {
                            clusters: g.iter().map(|c| (*c).clone()).collect(),
                        }
                    } else {
                        Reason::FailedOver {
                            clusters: g.iter().map(|c| (*c).clone()).collect(),
                        }
                    };
                    chosen = Some((picked, reason));
                    break 'passes;
                }
            }
            if chosen.is_none() {
                // Fail open: ready backends exist but every one fails its health check.
                for (i, g) in groups.iter().enumerate() {
                    let mut picked: Vec<Backend> = Vec::new();
                    let mut failing = 0;
                    for (cref, r, gi) in &per_cluster {
                        if *gi != Some(i) {
                            continue;
                        }
                        for c in all[r.clone()].iter().filter(|c| c.conditions.usable()) {
                            failing += usize::from(c.failing);
                            picked.push(backend(cref, c));
                        }
                    }
                    if !picked.is_empty() {
                        let clusters = g.iter().map(|c| (*c).clone()).collect();
                        chosen = Some((picked, Reason::FailOpen { clusters, failing }));
                        break;
                    }
                }
            }
            let (backends, reason) = match chosen {
                Some((b, r)) => (Backends::from(b), r),
                None => {
                    // Rule 4: keep the last usable backends that still serve (terminating), if any.
                    let last = old.and_then(|o| {
                        o.frontends.iter().find(|f| {
                            f.frontend == frontend
                                && !matches!(f.reason, Reason::NoUsableBackends { .. })
                        })
                    });
                    let keep: Vec<Backend> = match last {
                        Some(last) => {
                            let serving: HashSet<Backend> = per_cluster
                                .iter()
                                .flat_map(|(cref, r, _)| {
                                    all[r.clone()]
                                        .iter()
                                        .filter(|c| c.conditions.serving && !c.failing)
                                        .map(|c| backend(cref, c))
                                })
                                .collect();
                            last.backends
                                .iter()
                                .filter(|b| serving.contains(*b))
                                .cloned()
                                .collect()
                        }
                        None => Vec::new(),
                    };
                    if keep.is_empty() {
                        let failing_health = all.iter().filter(|c| c.failing).count();
                        (
                            Backends::from(Vec::new()),
                            Reason::NoUsableBackends {
                                candidates: total,
                                failing_health,
                            },
                        )
                    } else {
                        (Backends::from(keep), Reason::KeepServing)
                    }
                }
            };
            let health_checked = sp.protocol == Protocol::Tcp
                || entry.specs.values().all(|s| s.health_check_port.is_some());
            status.frontends.push(FrontendSelection {
                frontend,
                backends,
                reason,
                health_checked,
            });
        }
    }
    status
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
