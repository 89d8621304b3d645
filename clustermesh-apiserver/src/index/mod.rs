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
use mesh_model::values::{Capabilities, ClusterConfig, Endpoint, MeshValue, ServiceSpec};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use tracing::warn;

use crate::objects::{ObjectKind, ObjectRef, ServiceExport, SourceObject};

mod allocators;
mod translate;

use allocators::{ClusterSetIpAllocator, IdentityAllocator, Labels};

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

    /// Objects currently skipped (or published without a part that is wrong), with the reason.
    pub fn errors(&self) -> impl Iterator<Item = ObjectError> + '_ {
        self.errors.iter().map(|(o, m)| ObjectError {
            object: o.clone(),
            message: m.clone(),
        })
    }

    /// How many objects are skipped (or published without a bad part) now.
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

    /// Records what is wrong with an object that is still published without the bad part: listed and
    /// counted as `set_error` does (logged and counted once per distinct message).
    fn set_partial_error(&mut self, object: ObjectRef, message: String) {
        if self.errors.get(&object) != Some(&message) {
            warn!(kind = %object.kind, namespace = %object.namespace, name = %object.name, error = %message, "object published without its bad parts");
            self.errors_total += 1;
            self.errors.insert(object, message);
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

#[cfg(test)]
pub(crate) mod tests;
