//! The pure index: Kubernetes objects in, the desired etcd keys and values of this cluster out.
//!
//! [`MeshIndex`] is synchronous (`apply`/`delete`/`reset`); it keeps the objects it was given, recomputes only
//! what an object touches (one service, the pods of one namespace, one node, one import) and records which keys
//! changed, so a writer puts exactly those. It never does I/O: what etcd already holds is handed to [`MeshIndex::seed`]
//! so identities, ClusterSetIPs and endpoint chunk numbers stay what they were before a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_model::chunking::ChunkedEndpoints;
use mesh_model::keys::{KeyKind, MeshKey, ServiceName};
use mesh_model::values::{
    Capabilities, ClusterConfig, Conditions, Endpoint, EndpointChunk, EndpointPort, Identity,
    IpIdentity, MeshValue, NodeAddress, NodeInfo, Protocol, ServiceImport, ServicePort,
    ServiceSpec, identity_id,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters, annotations};
use tracing::{debug, warn};

use crate::objects::{ObjectKind, ObjectRef, ServiceExport, SourceObject};

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label with the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label with the region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Pod labels left out of identities (they differ per pod or per rollout and would explode the identity count).
pub const IGNORED_POD_LABELS: [&str; 4] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
];

/// What the index needs to know about its own cluster.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// This cluster's name.
    pub cluster: ClusterName,
    /// This cluster's id.
    pub cluster_id: ClusterId,
    /// 255 or 511; decides the identity bits.
    pub max_connected_clusters: MaxConnectedClusters,
    /// Where ClusterSetIPs for imported services come from; no imports without it.
    pub clusterset_cidr: Option<IpNet>,
    /// CA fingerprints published in the cluster config.
    pub ca_fingerprints: Vec<String>,
    /// Whether the cluster config says the state is a cache (KVStoreMesh).
    pub cached: bool,
}

impl IndexConfig {
    /// A config with no ClusterSet CIDR and no fingerprints.
    pub fn new(cluster: ClusterName, cluster_id: ClusterId) -> Self {
        Self {
            cluster,
            cluster_id,
            max_connected_clusters: MaxConnectedClusters::DEFAULT,
            clusterset_cidr: None,
            ca_fingerprints: Vec::new(),
            cached: false,
        }
    }
}

/// Why an object was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// The object.
    pub object: ObjectRef,
    /// What is wrong with it.
    pub message: String,
}

/// Prefixes under which the index owns every key (the writer deletes what is there and not desired).
pub fn owned_prefixes(cluster: &ClusterName) -> Vec<String> {
    [
        KeyKind::Services,
        KeyKind::Endpoints,
        KeyKind::Identities,
        KeyKind::Ips,
        KeyKind::Nodes,
        KeyKind::Imports,
    ]
    .into_iter()
    .map(|k| k.cluster_prefix(cluster))
    .collect()
}

/// Identity label set, sorted.
type Labels = BTreeMap<String, String>;

/// Allocates cluster-local identity numbers to label sets; a label set keeps its number for the life of the
/// process, and across restarts through [`MeshIndex::seed`].
#[derive(Debug, Default)]
struct IdentityAllocator {
    by_labels: BTreeMap<Labels, u32>,
    used: BTreeSet<u32>,
    users: HashMap<u32, usize>,
    next: u32,
}

impl IdentityAllocator {
    fn max_local(mcc: MaxConnectedClusters) -> u32 {
        (1u32 << mcc.local_identity_bits()) - 1
    }

    fn seed(&mut self, local: u32, labels: Labels) {
        if self.used.contains(&local) || self.by_labels.contains_key(&labels) {
            return;
        }
        self.used.insert(local);
        self.by_labels.insert(labels, local);
        self.next = self.next.max(local + 1);
    }

    /// Takes one reference on the label set's identity, allocating it when new. `None` when the space is full.
    fn acquire(&mut self, labels: &Labels, mcc: MaxConnectedClusters) -> Option<u32> {
        if let Some(&id) = self.by_labels.get(labels) {
            *self.users.entry(id).or_default() += 1;
            return Some(id);
        }
        let max = Self::max_local(mcc);
        let start = self.next.clamp(1, max);
        let free = (start..=max)
            .chain(1..start)
            .find(|n| !self.used.contains(n))
            .or_else(|| {
                // Every number was handed out once: forget label sets nobody uses any more.
                let idle: Vec<u32> = self
                    .used
                    .iter()
                    .copied()
                    .filter(|n| self.users.get(n).copied().unwrap_or(0) == 0)
                    .collect();
                self.by_labels.retain(|_, n| !idle.contains(n));
                self.used.retain(|n| !idle.contains(n));
                idle.first().copied()
            })?;
        self.used.insert(free);
        self.by_labels.insert(labels.clone(), free);
        self.users.insert(free, 1);
        self.next = free + 1;
        Some(free)
    }

    fn release(&mut self, id: u32) {
        if let Some(n) = self.users.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.users.remove(&id);
            }
        }
    }

    fn in_use(&self, id: u32) -> bool {
        self.users.get(&id).copied().unwrap_or(0) > 0
    }

    fn labels_of(&self, id: u32) -> Option<&Labels> {
        self.by_labels
            .iter()
            .find(|(_, n)| **n == id)
            .map(|(l, _)| l)
    }
}

/// Hands out ClusterSetIPs from a CIDR: one address per imported service, never the same address to two
/// services, and the address a service had before a restart (seeded) again.
#[derive(Debug)]
struct ClusterSetIpAllocator {
    net: IpNet,
    by_service: BTreeMap<ServiceName, IpAddr>,
    used: BTreeSet<IpAddr>,
    /// Offset after the last address handed out: allocation walks forward so a freed address is not reused soon.
    cursor: u128,
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

impl ClusterSetIpAllocator {
    fn new(net: IpNet) -> Self {
        Self {
            net,
            by_service: BTreeMap::new(),
            used: BTreeSet::new(),
            cursor: 1,
        }
    }

    /// Usable host offsets: [1, size-1) for IPv4 nets with a broadcast address, [1, size) otherwise.
    fn range(&self) -> (u128, u128) {
        let bits = u32::from(self.net.max_prefix_len() - self.net.prefix_len());
        let size: u128 = if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        };
        match self.net {
            IpNet::V4(_) if size > 2 => (1, size - 1),
            _ if size > 1 => (1, size),
            _ => (0, size),
        }
    }

    fn at(&self, off: u128) -> IpAddr {
        match self.net {
            IpNet::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(
                u32::from(n.network()) + off as u32,
            )),
            IpNet::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n.network()) + off)),
        }
    }

    fn seed(&mut self, svc: ServiceName, ip: IpAddr) -> bool {
        if !self.net.contains(&ip) || self.used.contains(&ip) || self.by_service.contains_key(&svc)
        {
            return false;
        }
        let off = ip_to_u128(ip) - ip_to_u128(self.net.network());
        self.cursor = self.cursor.max(off + 1);
        self.used.insert(ip);
        self.by_service.insert(svc, ip);
        true
    }

    fn get_or_allocate(&mut self, svc: &ServiceName) -> Option<IpAddr> {
        if let Some(ip) = self.by_service.get(svc) {
            return Some(*ip);
        }
        let (lo, hi) = self.range();
        if lo >= hi || self.used.len() as u128 >= hi - lo {
            return None;
        }
        let start = self.cursor.clamp(lo, hi - 1);
        let mut off = start;
        loop {
            let ip = self.at(off);
            if !self.used.contains(&ip) {
                self.used.insert(ip);
                self.by_service.insert(svc.clone(), ip);
                self.cursor = off + 1;
                return Some(ip);
            }
            off += 1;
            if off >= hi {
                off = lo;
            }
            if off == start {
                return None;
            }
        }
    }

    fn release(&mut self, svc: &ServiceName) {
        if let Some(ip) = self.by_service.remove(svc) {
            self.used.remove(&ip);
        }
    }
}

/// Identity and IP a pod holds in the index.
#[derive(Debug, Clone, PartialEq)]
struct PodEntry {
    identity: Option<u32>,
    ips: Vec<IpAddr>,
}

/// The desired state of this cluster's part of the mesh, computed from source objects.
#[derive(Debug)]
pub struct MeshIndex {
    config: IndexConfig,
    services: BTreeMap<ServiceName, Service>,
    exports: BTreeSet<ServiceName>,
    slices: BTreeMap<(String, String), EndpointSlice>,
    slices_of: BTreeMap<ServiceName, BTreeSet<String>>,
    pods: BTreeMap<(String, String), Pod>,
    pods_of_ns: BTreeMap<String, BTreeSet<String>>,
    pod_entries: BTreeMap<(String, String), PodEntry>,
    namespaces: BTreeMap<String, Namespace>,
    nodes: BTreeMap<String, Node>,
    /// Endpoint chunk assignment per service (seeded from etcd).
    chunks: HashMap<ServiceName, ChunkedEndpoints>,
    /// Services whose endpoints are not published but whose chunk assignment is kept (see `compact`).
    unpublished: BTreeSet<ServiceName>,
    /// Chunk numbers whose keys are in `desired`, per service.
    published_chunks: HashMap<ServiceName, BTreeSet<u32>>,
    identities: IdentityAllocator,
    /// Which pods claim an IP; the first (sorted) claimant owns the ip key.
    ip_claims: BTreeMap<IpAddr, BTreeSet<(String, String)>>,
    imports: Option<ClusterSetIpAllocator>,
    /// Global shared services of other clusters: service -> cluster -> spec.
    remote_services: BTreeMap<ServiceName, BTreeMap<ClusterName, ServiceSpec>>,
    desired: BTreeMap<String, Vec<u8>>,
    dirty: BTreeSet<String>,
    errors: BTreeMap<ObjectRef, String>,
    errors_total: u64,
}

// ---- construction, seeding, output ----

impl MeshIndex {
    /// An empty index whose desired state holds only the cluster config.
    pub fn new(config: IndexConfig) -> Self {
        let imports = config.clusterset_cidr.map(ClusterSetIpAllocator::new);
        let mut me = Self {
            config,
            services: BTreeMap::new(),
            exports: BTreeSet::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            pods: BTreeMap::new(),
            pods_of_ns: BTreeMap::new(),
            pod_entries: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            nodes: BTreeMap::new(),
            chunks: HashMap::new(),
            unpublished: BTreeSet::new(),
            published_chunks: HashMap::new(),
            identities: IdentityAllocator::default(),
            ip_claims: BTreeMap::new(),
            imports,
            remote_services: BTreeMap::new(),
            desired: BTreeMap::new(),
            dirty: BTreeSet::new(),
            errors: BTreeMap::new(),
            errors_total: 0,
        };
        me.publish_cluster_config();
        me
    }

    /// The index's configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Seeds the stable allocations from what etcd holds for this cluster: endpoint chunk numbers, identity
    /// numbers of label sets and ClusterSetIPs of imports. Call before the first `apply`. Values that do not
    /// decode are logged and ignored (the writer then replaces or deletes them).
    pub fn seed(&mut self, existing: &BTreeMap<String, Vec<u8>>) {
        let mut chunks: HashMap<ServiceName, Vec<(u32, Vec<Endpoint>)>> = HashMap::new();
        let mut imports: Vec<(ServiceName, IpAddr)> = Vec::new();
        for (k, v) in existing {
            let Ok(key) = MeshKey::parse_for(k, &self.config.cluster) else {
                continue;
            };
            let value = match MeshValue::decode(&key, v) {
                Ok(value) => value,
                Err(e) => {
                    warn!(key = %k, error = %e, "ignoring a value in etcd that does not decode");
                    continue;
                }
            };
            match value {
                MeshValue::EndpointChunk(c) => chunks
                    .entry(ServiceName {
                        namespace: c.namespace,
                        name: c.name,
                    })
                    .or_default()
                    .push((c.chunk, c.endpoints)),
                MeshValue::Identity(i) => {
                    let bits = self.config.max_connected_clusters.local_identity_bits();
                    let own = mesh_model::values::identity_cluster(
                        i.id,
                        self.config.max_connected_clusters,
                    ) == u32::from(self.config.cluster_id.get());
                    if own {
                        self.identities.seed(i.id & ((1 << bits) - 1), i.labels);
                    }
                }
                MeshValue::Import(i) => {
                    if let Some(ip) = i.ips.first() {
                        imports.push((
                            ServiceName {
                                namespace: i.namespace,
                                name: i.name,
                            },
                            *ip,
                        ));
                    }
                }
                _ => {}
            }
        }
        for (svc, given) in chunks {
            let (c, _) = ChunkedEndpoints::from_chunks(given);
            self.chunks.insert(svc, c);
        }
        if let Some(alloc) = &mut self.imports {
            for (svc, ip) in imports {
                alloc.seed(svc, ip);
            }
        }
    }

    /// Forgets the endpoint chunk assignments of services whose endpoints are not published (deleted, not
    /// global, not shared, or seeded from etcd and never seen). Call once every source has synced: before that an
    /// assignment seeded from etcd must wait for its Service to arrive, so a restart rewrites nothing.
    pub fn compact(&mut self) {
        self.compact_unpublished();
        let published = &self.published_chunks;
        self.chunks.retain(|svc, _| published.contains_key(svc));
    }

    /// The cheap part of [`MeshIndex::compact`]: only the services that became unpublished since the last call.
    pub fn compact_unpublished(&mut self) {
        for svc in std::mem::take(&mut self.unpublished) {
            if !self.published_chunks.contains_key(&svc) {
                self.chunks.remove(&svc);
            }
        }
    }

    /// The desired keys and values.
    pub fn desired(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.desired
    }

    /// Keys whose desired value changed (or vanished) since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty)
    }

    /// Objects currently skipped, with the reason.
    pub fn errors(&self) -> impl Iterator<Item = ObjectError> + '_ {
        self.errors.iter().map(|(o, m)| ObjectError {
            object: o.clone(),
            message: m.clone(),
        })
    }

    /// How many objects are skipped now.
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// How many times an object was found invalid since start.
    pub fn errors_total(&self) -> u64 {
        self.errors_total
    }

    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => {
                if self.desired.get(&key) != Some(&v) {
                    self.desired.insert(key.clone(), v);
                    self.dirty.insert(key);
                }
            }
            None => {
                if self.desired.remove(&key).is_some() {
                    self.dirty.insert(key);
                }
            }
        }
    }

    fn set_error(&mut self, object: ObjectRef, message: Option<String>) {
        match message {
            Some(m) => {
                if self.errors.get(&object) != Some(&m) {
                    warn!(kind = %object.kind, namespace = %object.namespace, name = %object.name, error = %m, "skipping object");
                    self.errors_total += 1;
                    self.errors.insert(object, m);
                }
            }
            None => {
                self.errors.remove(&object);
            }
        }
    }

    fn publish_cluster_config(&mut self) {
        let key = MeshKey::ClusterConfig {
            cluster: self.config.cluster.clone(),
        };
        let v = MeshValue::ClusterConfig(ClusterConfig {
            name: self.config.cluster.clone(),
            id: self.config.cluster_id,
            max_connected_clusters: self.config.max_connected_clusters,
            capabilities: Capabilities::v1(self.config.cached),
            ca_fingerprints: self.config.ca_fingerprints.clone(),
        });
        self.set(key.to_string(), Some(v.encode()));
    }
}

// ---- apply / delete / reset ----

fn ns_name(obj: &SourceObject) -> (String, String) {
    let r = obj.object_ref();
    (r.namespace, r.name)
}

impl MeshIndex {
    /// Adds or replaces one object and recomputes what it touches.
    pub fn apply(&mut self, obj: SourceObject) {
        let r = obj.object_ref();
        let _span =
            tracing::debug_span!("apply", kind = %r.kind, namespace = %r.namespace, name = %r.name)
                .entered();
        let (ns, name) = ns_name(&obj);
        match obj {
            SourceObject::Service(s) => match ServiceName::new(&ns, &name) {
                Ok(svc) => {
                    if self.services.get(&svc) == Some(&s) {
                        return;
                    }
                    self.services.insert(svc.clone(), s);
                    self.recompute_service(&svc);
                    self.recompute_import(&svc);
                }
                Err(e) => self.set_error(r, Some(e.to_string())),
            },
            SourceObject::ServiceExport(ServiceExport { .. }) => {
                if let Ok(svc) = ServiceName::new(&ns, &name)
                    && self.exports.insert(svc.clone())
                {
                    self.recompute_service(&svc);
                }
            }
            SourceObject::EndpointSlice(sl) => {
                let key = (ns.clone(), name.clone());
                if self.slices.get(&key) == Some(&sl) {
                    return;
                }
                let old = self.slices.insert(key, sl);
                let mut touched = BTreeSet::new();
                if let Some(old) = old.as_ref().and_then(|o| slice_service(&ns, o)) {
                    touched.insert(old);
                }
                if let Some(new) = slice_service(&ns, &self.slices[&(ns.clone(), name.clone())]) {
                    touched.insert(new);
                }
                for svc in &touched {
                    self.slices_of.entry(svc.clone()).or_default();
                }
                self.reindex_slice(&ns, &name, old.as_ref());
                for svc in touched {
                    self.recompute_service(&svc);
                }
            }
            SourceObject::Pod(p) => {
                let key = (ns.clone(), name.clone());
                if self.pods.get(&key) == Some(&p) {
                    return;
                }
                self.pods.insert(key.clone(), p);
                self.pods_of_ns.entry(ns).or_default().insert(name);
                self.recompute_pod(&key);
            }
            SourceObject::Namespace(n) => {
                if self.namespaces.get(&name) == Some(&n) {
                    return;
                }
                let labels_changed = self.namespaces.get(&name).map(|o| &o.metadata.labels)
                    != Some(&n.metadata.labels);
                self.namespaces.insert(name.clone(), n);
                if labels_changed {
                    self.recompute_namespace(&name);
                }
            }
            SourceObject::Node(n) => {
                if self.nodes.get(&name) == Some(&n) {
                    return;
                }
                self.nodes.insert(name.clone(), n);
                self.recompute_node(&name);
            }
        }
    }

    /// Removes one object and recomputes what it touched.
    pub fn delete(&mut self, r: &ObjectRef) {
        let _span = tracing::debug_span!("delete", kind = %r.kind, namespace = %r.namespace, name = %r.name).entered();
        self.set_error(r.clone(), None);
        let ns = r.namespace.clone();
        let name = r.name.clone();
        let svc = ServiceName {
            namespace: ns.clone(),
            name: name.clone(),
        };
        match r.kind {
            ObjectKind::Service => {
                if self.services.remove(&svc).is_some() {
                    self.recompute_service(&svc);
                    self.recompute_import(&svc);
                }
            }
            ObjectKind::ServiceExport => {
                if self.exports.remove(&svc) {
                    self.recompute_service(&svc);
                }
            }
            ObjectKind::EndpointSlice => {
                if let Some(old) = self.slices.remove(&(ns.clone(), name.clone())) {
                    self.reindex_slice(&ns, &name, Some(&old));
                    if let Some(s) = slice_service(&ns, &old) {
                        self.recompute_service(&s);
                    }
                }
            }
            ObjectKind::Pod => {
                let key = (ns.clone(), name.clone());
                if self.pods.remove(&key).is_some() {
                    if let Some(set) = self.pods_of_ns.get_mut(&ns) {
                        set.remove(&name);
                        if set.is_empty() {
                            self.pods_of_ns.remove(&ns);
                        }
                    }
                    self.recompute_pod(&key);
                }
            }
            ObjectKind::Namespace => {
                if self.namespaces.remove(&name).is_some() {
                    self.recompute_namespace(&name);
                }
            }
            ObjectKind::Node => {
                if self.nodes.remove(&name).is_some() {
                    self.recompute_node(&name);
                }
            }
        }
    }

    /// Replaces every object of `kind` by `objects` (a relist): what is not in the list is deleted.
    pub fn reset(&mut self, kind: ObjectKind, objects: Vec<SourceObject>) {
        let keep: BTreeSet<ObjectRef> = objects.iter().map(|o| o.object_ref()).collect();
        let gone: Vec<ObjectRef> = self
            .refs_of(kind)
            .into_iter()
            .filter(|r| !keep.contains(r))
            .collect();
        for r in gone {
            self.delete(&r);
        }
        for o in objects {
            if o.kind() == kind {
                self.apply(o);
            }
        }
    }

    /// References of every object of `kind` the index holds.
    pub fn refs_of(&self, kind: ObjectKind) -> Vec<ObjectRef> {
        let svc_ref = |s: &ServiceName| ObjectRef::new(kind, &s.namespace, &s.name);
        let pair_ref = |(ns, n): &(String, String)| ObjectRef::new(kind, ns, n);
        match kind {
            ObjectKind::Service => self.services.keys().map(svc_ref).collect(),
            ObjectKind::ServiceExport => self.exports.iter().map(svc_ref).collect(),
            ObjectKind::EndpointSlice => self.slices.keys().map(pair_ref).collect(),
            ObjectKind::Pod => self.pods.keys().map(pair_ref).collect(),
            ObjectKind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectRef::new(kind, "", n))
                .collect(),
            ObjectKind::Node => self
                .nodes
                .keys()
                .map(|n| ObjectRef::new(kind, "", n))
                .collect(),
        }
    }

    /// Sets the global services another cluster publishes (read from its `services/` keys); they decide which
    /// ClusterSetIP imports this cluster needs. An empty list forgets the cluster.
    pub fn set_remote_services(&mut self, cluster: &ClusterName, specs: Vec<ServiceSpec>) {
        let mut touched: BTreeSet<ServiceName> = BTreeSet::new();
        for (svc, by_cluster) in &mut self.remote_services {
            if by_cluster.remove(cluster).is_some() {
                touched.insert(svc.clone());
            }
        }
        for spec in specs {
            let svc = spec.service_name();
            touched.insert(svc.clone());
            self.remote_services
                .entry(svc)
                .or_default()
                .insert(cluster.clone(), spec);
        }
        self.remote_services.retain(|_, m| !m.is_empty());
        for svc in touched {
            self.recompute_import(&svc);
        }
    }

    /// Adds or replaces one remote service spec.
    pub fn apply_remote_service(&mut self, spec: ServiceSpec) {
        let svc = spec.service_name();
        let cluster = spec.cluster.clone();
        if self.remote_services.get(&svc).and_then(|m| m.get(&cluster)) == Some(&spec) {
            return;
        }
        self.remote_services
            .entry(svc.clone())
            .or_default()
            .insert(cluster, spec);
        self.recompute_import(&svc);
    }

    /// Removes one remote service spec.
    pub fn delete_remote_service(&mut self, cluster: &ClusterName, svc: &ServiceName) {
        if let Some(m) = self.remote_services.get_mut(svc)
            && m.remove(cluster).is_some()
        {
            if m.is_empty() {
                self.remote_services.remove(svc);
            }
            self.recompute_import(svc);
        }
    }
}

fn slice_service(ns: &str, s: &EndpointSlice) -> Option<ServiceName> {
    let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    ServiceName::new(ns, name).ok()
}

// ---- recomputation ----

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    let p = p.unwrap_or("TCP");
    Protocol::parse(p).ok_or_else(|| format!("unknown protocol {p:?}"))
}

fn port_u16(p: i32, what: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{what} {p} is not a port number (1-65535)"))
}

impl MeshIndex {
    fn reindex_slice(&mut self, ns: &str, name: &str, old: Option<&EndpointSlice>) {
        if let Some(svc) = old.and_then(|o| slice_service(ns, o))
            && let Some(set) = self.slices_of.get_mut(&svc)
        {
            set.remove(name);
        }
        if let Some(new) = self.slices.get(&(ns.to_owned(), name.to_owned()))
            && let Some(svc) = slice_service(ns, new)
        {
            self.slices_of
                .entry(svc)
                .or_default()
                .insert(name.to_owned());
        }
        self.slices_of.retain(|_, s| !s.is_empty());
    }

    /// The spec to publish for a Service: `Ok(None)` when it is not global.
    fn service_spec(&self, svc: &ServiceName, s: &Service) -> Result<Option<ServiceSpec>, String> {
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let a = annotations::parse(&ann).map_err(|e| e.to_string())?;
        if !a.global && !self.exports.contains(svc) {
            return Ok(None);
        }
        let spec = s.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err("an ExternalName Service cannot be global".into());
        }
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            ports.push(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: port_u16(p.port, "port")?,
                protocol: protocol(p.protocol.as_deref())?,
            });
        }
        if ports.is_empty() {
            return Err("the Service has no ports".into());
        }
        let cluster_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(v), _) if !v.is_empty() => v.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => Vec::new(),
        };
        let headless = cluster_ips.iter().any(|ip| ip == "None");
        let mut frontends = Vec::new();
        if !headless {
            for ip in &cluster_ips {
                frontends.push(
                    ip.parse::<IpAddr>()
                        .map_err(|_| format!("clusterIP {ip:?} is not an IP address"))?,
                );
            }
            if frontends.is_empty() {
                return Err("the Service has no clusterIP yet".into());
            }
        }
        let spec = ServiceSpec {
            cluster: self.config.cluster.clone(),
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            ports,
            frontends,
            headless,
            shared: a.shared,
            affinity: a.affinity,
            failover_order: a.failover_order,
            health_check: a.health_check,
            health_check_port: a.health_check_port,
        };
        let key = MeshKey::Service {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        };
        MeshValue::Service(spec.clone())
            .validate(&key)
            .map_err(|e| e.to_string())?;
        Ok(Some(spec))
    }

    /// Endpoints of a service, merged over its slices (an address in two slices gets the union of their ports).
    fn service_endpoints(&mut self, svc: &ServiceName) -> Vec<Endpoint> {
        let mut out: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        let names: Vec<String> = self
            .slices_of
            .get(svc)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let key = (svc.namespace.clone(), name.clone());
            let Some(sl) = self.slices.get(&key) else {
                continue;
            };
            let r = ObjectRef::new(ObjectKind::EndpointSlice, &svc.namespace, &name);
            match slice_endpoints(sl) {
                Ok(eps) => {
                    self.set_error(r, None);
                    for e in eps {
                        match out.get_mut(&e.ip) {
                            Some(have) => {
                                for p in e.ports {
                                    if !have.ports.contains(&p) {
                                        have.ports.push(p);
                                    }
                                }
                                have.ports.sort();
                            }
                            None => {
                                out.insert(e.ip, e);
                            }
                        }
                    }
                }
                Err(m) => self.set_error(r, Some(m)),
            }
        }
        out.into_values().collect()
    }

    fn recompute_service(&mut self, svc: &ServiceName) {
        let r = ObjectRef::new(ObjectKind::Service, &svc.namespace, &svc.name);
        let spec = match self.services.get(svc) {
            Some(s) => match self.service_spec(svc, s) {
                Ok(spec) => {
                    self.set_error(r, None);
                    spec
                }
                Err(m) => {
                    self.set_error(r, Some(m));
                    None
                }
            },
            None => {
                self.set_error(r, None);
                None
            }
        };
        let key = MeshKey::Service {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        }
        .to_string();
        let publish_endpoints = matches!(&spec, Some(s) if s.shared);
        let endpoints = if publish_endpoints {
            self.service_endpoints(svc)
        } else {
            Vec::new()
        };
        self.set(
            key,
            spec.as_ref()
                .map(|s| MeshValue::Service(s.clone()).encode()),
        );
        // Endpoint chunks: stable assignment, then (re)publish changed or not yet published chunks. While the
        // service is not published its assignment is kept (objects may arrive in any order after a restart, and
        // the assignment seeded from etcd must survive until the Service is there); `compact` drops it later.
        let published = self.published_chunks.remove(svc).unwrap_or_default();
        let mut writes: Vec<(u32, Option<Vec<Endpoint>>)> = Vec::new();
        let mut now: BTreeSet<u32> = BTreeSet::new();
        if publish_endpoints {
            let chunker = self.chunks.entry(svc.clone()).or_default();
            let changed = chunker.set_all(endpoints);
            now = chunker.chunk_numbers().collect();
            for n in &now {
                if changed.contains(n) || !published.contains(n) {
                    writes.push((*n, chunker.chunk(*n)));
                }
            }
            if chunker.is_empty() {
                self.chunks.remove(svc);
            }
            self.unpublished.remove(svc);
        } else if self.chunks.contains_key(svc) {
            self.unpublished.insert(svc.clone());
        }
        for n in published.difference(&now) {
            writes.push((*n, None));
        }
        for (n, eps) in writes {
            let key = MeshKey::EndpointChunk {
                cluster: self.config.cluster.clone(),
                service: svc.clone(),
                chunk: n,
            }
            .to_string();
            let value = eps.map(|endpoints| {
                MeshValue::EndpointChunk(EndpointChunk {
                    cluster: self.config.cluster.clone(),
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    chunk: n,
                    endpoints,
                })
                .encode()
            });
            self.set(key, value);
        }
        if !now.is_empty() {
            self.published_chunks.insert(svc.clone(), now);
        }
    }

    fn recompute_import(&mut self, svc: &ServiceName) {
        let Some(alloc) = &mut self.imports else {
            return;
        };
        let key = MeshKey::Import {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        }
        .to_string();
        let remote = self.remote_services.get(svc).filter(|m| !m.is_empty());
        let wanted = match remote {
            Some(m) if !self.services.contains_key(svc) => m,
            _ => {
                alloc.release(svc);
                self.set(key, None);
                return;
            }
        };
        // Ports: those of the first cluster (by name) that shares the service.
        let ports = wanted
            .values()
            .next()
            .map(|s| s.ports.clone())
            .unwrap_or_default();
        let Some(ip) = alloc.get_or_allocate(svc) else {
            let r = ObjectRef::new(ObjectKind::Service, &svc.namespace, &svc.name);
            let m = format!(
                "no free ClusterSetIP left in {} for the import of {svc}",
                alloc.net
            );
            self.set_error(r, Some(m));
            self.set(key, None);
            return;
        };
        let v = MeshValue::Import(ServiceImport {
            cluster: self.config.cluster.clone(),
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            ips: vec![ip],
            ports,
        });
        self.set(key, Some(v.encode()));
    }

    fn identity_labels(&self, ns: &str, pod: &Pod) -> Labels {
        let mut l = Labels::new();
        for (k, v) in pod.metadata.labels.iter().flatten() {
            if !IGNORED_POD_LABELS.contains(&k.as_str()) {
                l.insert(format!("k8s:{k}"), v.clone());
            }
        }
        if let Some(n) = self.namespaces.get(ns) {
            for (k, v) in n.metadata.labels.iter().flatten() {
                l.insert(format!("k8s:io.cilium.k8s.namespace.labels.{k}"), v.clone());
            }
        }
        l.insert("k8s:io.kubernetes.pod.namespace".into(), ns.to_owned());
        l.insert(
            "k8s:io.cilium.k8s.policy.cluster".into(),
            self.config.cluster.to_string(),
        );
        l
    }

    fn recompute_namespace(&mut self, ns: &str) {
        let pods: Vec<String> = self
            .pods_of_ns
            .get(ns)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for p in pods {
            self.recompute_pod(&(ns.to_owned(), p));
        }
    }

    fn full_identity(&self, local: u32) -> Option<u32> {
        identity_id(
            self.config.cluster_id,
            local,
            self.config.max_connected_clusters,
        )
    }

    fn recompute_pod(&mut self, key: &(String, String)) {
        let r = ObjectRef::new(ObjectKind::Pod, &key.0, &key.1);
        let old = self.pod_entries.remove(key);
        // What the pod should hold now.
        let mut new = PodEntry {
            identity: None,
            ips: Vec::new(),
        };
        let mut error = None;
        if let Some(pod) = self.pods.get(key) {
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let status = pod.status.clone().unwrap_or_default();
            let done = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            let mut ips: Vec<String> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.clone())
                .collect();
            if ips.is_empty()
                && let Some(ip) = &status.pod_ip
            {
                ips.push(ip.clone());
            }
            if !host_network && !done {
                for ip in ips {
                    match ip.parse::<IpAddr>() {
                        Ok(ip) => {
                            if !new.ips.contains(&ip) {
                                new.ips.push(ip);
                            }
                        }
                        Err(_) => error = Some(format!("pod IP {ip:?} is not an IP address")),
                    }
                }
                if error.is_none() && !new.ips.is_empty() {
                    let labels = self.identity_labels(&key.0, pod);
                    // Acquire first, release the old one after, so an unchanged label set keeps its number.
                    match self
                        .identities
                        .acquire(&labels, self.config.max_connected_clusters)
                    {
                        Some(id) => new.identity = Some(id),
                        None => error = Some("the cluster's identity space is full".into()),
                    }
                }
                if error.is_some() {
                    new.ips.clear();
                }
            }
        }
        self.set_error(r, error);
        let mut touched_ids = BTreeSet::new();
        let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(old) = &old {
            if let Some(id) = old.identity {
                self.identities.release(id);
                touched_ids.insert(id);
            }
            for ip in &old.ips {
                if let Some(c) = self.ip_claims.get_mut(ip) {
                    c.remove(key);
                    if c.is_empty() {
                        self.ip_claims.remove(ip);
                    }
                }
                touched_ips.insert(*ip);
            }
        }
        if let Some(id) = new.identity {
            touched_ids.insert(id);
        }
        for ip in &new.ips {
            self.ip_claims.entry(*ip).or_default().insert(key.clone());
            touched_ips.insert(*ip);
        }
        if new.identity.is_some() || !new.ips.is_empty() {
            self.pod_entries.insert(key.clone(), new);
        }
        for id in touched_ids {
            self.publish_identity(id);
        }
        for ip in touched_ips {
            self.publish_ip(ip);
        }
    }

    fn publish_identity(&mut self, local: u32) {
        let Some(full) = self.full_identity(local) else {
            return;
        };
        let key = MeshKey::Identity {
            cluster: self.config.cluster.clone(),
            id: full,
        }
        .to_string();
        let value = if self.identities.in_use(local) {
            self.identities.labels_of(local).map(|labels| {
                MeshValue::Identity(Identity {
                    id: full,
                    labels: labels.clone(),
                })
                .encode()
            })
        } else {
            None
        };
        self.set(key, value);
    }

    fn publish_ip(&mut self, ip: IpAddr) {
        let key = MeshKey::Ip {
            cluster: self.config.cluster.clone(),
            ip,
        }
        .to_string();
        let owner = self
            .ip_claims
            .get(&ip)
            .and_then(|c| c.iter().next().cloned());
        let value = owner.and_then(|pk| {
            let local = self.pod_entries.get(&pk)?.identity?;
            let full = self.full_identity(local)?;
            Some(
                MeshValue::Ip(IpIdentity {
                    ip,
                    identity: full,
                    namespace: Some(pk.0.clone()),
                    pod: Some(pk.1.clone()),
                })
                .encode(),
            )
        });
        self.set(key, value);
    }

    fn recompute_node(&mut self, name: &str) {
        let r = ObjectRef::new(ObjectKind::Node, "", name);
        let key_ok = mesh_model::keys::check_node_name(name);
        let value = match (self.nodes.get(name), key_ok) {
            (None, _) => {
                self.set_error(r, None);
                None
            }
            (Some(_), Err(e)) => {
                self.set_error(r, Some(e.to_string()));
                None
            }
            (Some(n), Ok(())) => {
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let mut addresses = Vec::new();
                let mut error = None;
                for a in n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                {
                    if a.type_ == "Hostname" || a.type_ == "InternalDNS" || a.type_ == "ExternalDNS"
                    {
                        continue;
                    }
                    match a.address.parse::<IpAddr>() {
                        Ok(ip) => addresses.push(NodeAddress {
                            kind: a.type_.clone(),
                            ip,
                        }),
                        Err(_) => {
                            error = Some(format!(
                                "node address {:?} ({}) is not an IP address",
                                a.address, a.type_
                            ))
                        }
                    }
                }
                if error.is_some() {
                    self.set_error(r, error);
                    None
                } else {
                    self.set_error(r, None);
                    Some(
                        MeshValue::Node(NodeInfo {
                            cluster: self.config.cluster.clone(),
                            name: name.to_owned(),
                            addresses,
                            zone: labels.get(ZONE_LABEL).cloned(),
                            region: labels.get(REGION_LABEL).cloned(),
                        })
                        .encode(),
                    )
                }
            }
        };
        let key = format!(
            "{}{name}",
            KeyKind::Nodes.cluster_prefix(&self.config.cluster)
        );
        debug!(node = name, published = value.is_some(), "node recomputed");
        self.set(key, value);
    }
}

/// The endpoints of one EndpointSlice (FQDN slices and addresses that do not parse are errors).
fn slice_endpoints(sl: &EndpointSlice) -> Result<Vec<Endpoint>, String> {
    if sl.address_type == "FQDN" {
        return Err("FQDN EndpointSlices are not supported".into());
    }
    let mut ports = Vec::new();
    for p in sl.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: port_u16(port, "endpoint port")?,
            protocol: protocol(p.protocol.as_deref())?,
        });
    }
    ports.sort();
    let mut out = Vec::new();
    for e in &sl.endpoints {
        let c = e.conditions.clone().unwrap_or_default();
        // Kubernetes: a missing ready means ready; a missing serving means as ready; terminating defaults false.
        let ready = c.ready.unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        };
        for a in &e.addresses {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("endpoint address {a:?} is not an IP address"))?;
            out.push(Endpoint {
                ip,
                ports: ports.clone(),
                node: e.node_name.clone(),
                zone: e.zone.clone(),
                hostname: e.hostname.clone(),
                conditions,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
