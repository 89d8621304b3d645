//! The values stored under the keys of [`crate::keys`], their JSON codec, and validation against the key.
//!
//! Every value names what it is about (cluster, service, chunk, node, id, ip) so a value copied under the
//! wrong key is caught: [`MeshValue::decode`] parses the bytes for the key's kind and then checks that the
//! value agrees with the key. Readers log and count what fails and keep their good state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::chunking::MAX_ENDPOINTS_PER_CHUNK;
use crate::cluster::{ClusterId, ClusterName, ClusterRuleError, MaxConnectedClusters};
use crate::keys::{KeyKind, MeshKey, ServiceName};

/// Why a value was refused.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// The bytes are not valid JSON of the expected shape.
    #[error("value of {key}: not a valid {kind} value: {source}")]
    Json {
        /// The key.
        key: String,
        /// The kind expected.
        kind: KeyKind,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A time value is not RFC 3339.
    #[error("value of {key}: {value:?} is not an RFC 3339 time")]
    Time {
        /// The key.
        key: String,
        /// The text found (cut to 64 bytes).
        value: String,
    },
    /// The value contradicts its key or breaks a rule of the model.
    #[error("value of {key}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The cluster config breaks a cluster rule.
    #[error("value of {key}: {source}")]
    ClusterRule {
        /// The key.
        key: String,
        /// The rule broken.
        #[source]
        source: ClusterRuleError,
    },
}

/// Transport protocol of a port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the Kubernetes default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (published, not load-balanced by the socket datapath).
    Sctp,
}

impl Protocol {
    /// Parse the Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lowercase name as used in DNS SRV names (`tcp`, `udp`, `sctp`).
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Which backends a global service prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Local backends while any is usable, then remote ones (by failover order).
    Local,
    /// Remote backends while any is usable, then local ones.
    Remote,
    /// All usable backends alike (the default, as in Cilium).
    #[default]
    None,
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::None => "none",
        })
    }
}

/// How node-sync probes a service's backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HealthCheck {
    /// A TCP connect to the endpoint port (the default).
    #[default]
    Tcp,
    /// An HTTP GET of `path` on the endpoint port; 2xx and 3xx are healthy.
    Http {
        /// Request path, starting with '/'.
        path: String,
    },
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port name (needed for SRV records and to match endpoint ports when there are several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port on the frontend.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// `services/<cluster>/<ns>/<name>`: a global service as its cluster defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Owning cluster.
    pub cluster: ClusterName,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// ClusterIPs of the service in its cluster (empty for headless services).
    #[serde(default)]
    pub frontends: Vec<IpAddr>,
    /// A headless service (no ClusterIP): clients reach endpoints directly.
    #[serde(default)]
    pub headless: bool,
    /// Whether this cluster shares its backends with the mesh (`clustermesh.io/shared`).
    #[serde(default = "yes")]
    pub shared: bool,
    /// Affinity.
    #[serde(default)]
    pub affinity: Affinity,
    /// Clusters to fail over to, in order, before the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_order: Vec<ClusterName>,
    /// How backends are probed.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// The TCP port of each endpoint probed instead of the backend's own port
    /// (`clustermesh.io/health-check-port`); how a UDP-only service is health-checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_port: Option<u16>,
}

fn yes() -> bool {
    true
}

impl ServiceSpec {
    /// The service's name.
    pub fn service_name(&self) -> ServiceName {
        ServiceName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Conditions of an endpoint, as in an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conditions {
    /// Ready to receive traffic.
    pub ready: bool,
    /// Serving (may be true while terminating).
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

impl Conditions {
    /// DESIGN.md rule 2: usable when ready, or serving and not terminating.
    pub fn usable(&self) -> bool {
        self.ready || (self.serving && !self.terminating)
    }
}

/// A port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointPort {
    /// Port name, matching a [`ServicePort`] name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number on the endpoint.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// One backend address of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Ports. Shared: the endpoints of a decoded chunk with the same ports hold one list
    /// ([`EndpointChunk::compact`]).
    pub ports: Arc<[EndpointPort]>,
    /// Node it runs on (shared between the endpoints of a decoded chunk on the same node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
    /// Zone of that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Hostname (headless services: `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Conditions,
}

/// `endpoints/<cluster>/<ns>/<name>/<n>`: up to 64 endpoints of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointChunk {
    /// Owning cluster.
    pub cluster: ClusterName,
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Chunk number.
    pub chunk: u32,
    /// Endpoints, sorted by IP.
    pub endpoints: Vec<Endpoint>,
}

impl EndpointChunk {
    /// Give back the spare capacity of a decoded chunk, and share what its endpoints repeat. A
    /// decoder grows its lists by doubling: 10 endpoints took room for 16 (and each endpoint's
    /// one port room for 4: 32 of 80 MiB at 255 clusters x 1,000 endpoints was that slack); and
    /// each endpoint had its own copy of the port list and node name its neighbours have too.
    pub fn compact(&mut self) {
        self.endpoints.shrink_to_fit();
        // A few distinct values per chunk at most are looked for (a chunk is 64 endpoints).
        const DISTINCT: usize = 8;
        let mut ports: Vec<Arc<[EndpointPort]>> = Vec::new();
        let mut nodes: Vec<Arc<str>> = Vec::new();
        for e in &mut self.endpoints {
            match ports.iter().find(|p| **p == e.ports) {
                Some(p) => e.ports = p.clone(),
                None if ports.len() < DISTINCT => ports.push(e.ports.clone()),
                None => {}
            }
            if let Some(n) = &e.node {
                match nodes.iter().find(|m| **m == *n) {
                    Some(m) => e.node = Some(m.clone()),
                    None if nodes.len() < DISTINCT => nodes.push(n.clone()),
                    None => {}
                }
            }
        }
    }
}

/// A probe verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The last probes succeeded.
    Healthy,
    /// `--health-failures` probes in a row failed.
    Failing,
}

/// The verdict on one backend (ip, port, protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendVerdict {
    /// Backend address.
    pub ip: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// The verdict.
    pub verdict: Verdict,
    /// When the evidence for this verdict began (RFC 3339): for `failing`, the first failed probe of the
    /// streak; for `healthy` after a failure, the first good probe. Lets every node measure failover and
    /// failback from the moment the backend changed, not from when it heard of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// `health/<cluster>/<node>`: verdicts on the backends running on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Owning cluster.
    pub cluster: ClusterName,
    /// Node that probed.
    pub node: String,
    /// Verdicts.
    pub verdicts: Vec<BackendVerdict>,
}

/// `identities/<cluster>/<id>`: the label set of a numeric identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The identity: `cluster_id << 16 | local` (`<< 15` with maxConnectedClusters=511).
    pub id: u32,
    /// The labels (pod labels prefixed `k8s:`, namespace labels `k8s:io.cilium.k8s.namespace.labels.`, as Cilium does).
    pub labels: BTreeMap<String, String>,
}

/// Compose a cluster-scoped identity.
pub fn identity_id(cluster: ClusterId, local: u32, mcc: MaxConnectedClusters) -> Option<u32> {
    let bits = mcc.local_identity_bits();
    (local > 0 && local < (1 << bits)).then(|| (u32::from(cluster.get()) << bits) | local)
}

/// The cluster id part of an identity.
pub fn identity_cluster(id: u32, mcc: MaxConnectedClusters) -> u32 {
    id >> mcc.local_identity_bits()
}

/// `ips/<cluster>/<ip>`: the identity of an endpoint IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpIdentity {
    /// The address.
    pub ip: IpAddr,
    /// Its identity.
    pub identity: u32,
    /// Namespace of the pod, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// An address of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The address.
    pub ip: IpAddr,
}

/// `nodes/<cluster>/<node>`: a node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Owning cluster.
    pub cluster: ClusterName,
    /// Node name.
    pub name: String,
    /// Addresses.
    pub addresses: Vec<NodeAddress>,
    /// `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `topology.kubernetes.io/region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The node's pod CIDRs (`Node.spec.podCIDRs`, or `spec.podCIDR` when that is absent): node-sync's
    /// `--routing native` routes each via the node's address. Absent in values written before it existed (read
    /// as none) and left out when empty.
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<IpNet>,
}

/// `imports/<cluster>/<ns>/<name>`: a ClusterSetIP this cluster allocated for a global service it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceImport {
    /// Cluster that allocated it.
    pub cluster: ClusterName,
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// The ClusterSetIPs (one per family).
    pub ips: Vec<IpAddr>,
    /// Ports, the union of the ports of the service in the clusters that have it.
    pub ports: Vec<ServicePort>,
}

/// Capabilities a cluster announces in its config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The cluster writes sync canaries (readers wait for them before trusting a prefix).
    #[serde(default)]
    pub sync_canaries: bool,
    /// Endpoints are chunked (always true for v1 writers).
    #[serde(default)]
    pub endpoint_chunks: bool,
    /// This config is a KVStoreMesh cached copy of a remote cluster's.
    #[serde(default)]
    pub cached: bool,
}

impl Capabilities {
    /// What every v1 writer announces: sync canaries and chunked endpoints; `cached` for a
    /// KVStoreMesh copy.
    pub fn v1(cached: bool) -> Self {
        Self {
            sync_canaries: true,
            endpoint_chunks: true,
            cached,
        }
    }
}

/// `cluster-config/<cluster>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    /// Cluster name.
    pub name: ClusterName,
    /// Cluster id.
    pub id: ClusterId,
    /// maxConnectedClusters of the mesh.
    #[serde(default)]
    pub max_connected_clusters: MaxConnectedClusters,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// SHA-256 fingerprints of the CAs the cluster trusts.
    #[serde(default)]
    pub ca_fingerprints: Vec<String>,
}

/// `remotes/<cluster>/<remote>`: how `<cluster>`'s node-syncs reach `<remote>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    /// Remote cluster name.
    pub name: ClusterName,
    /// Remote cluster id.
    pub id: ClusterId,
    /// The remote's etcd client URLs (`https://host:port`).
    pub endpoints: Vec<String>,
    /// PEM bundle of CAs that sign the remote's etcd server certificate (federation); empty when the
    /// meshes share a root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_bundle: String,
    /// PEM chain of the certificate the remote issued for this cluster's `remote` key (CN
    /// `remote-<cluster>`, signed by the remote's own intermediate): what `<cluster>`'s node-syncs
    /// and KVStoreMesh present to the remote's etcd, so that etcd can trust only its own cluster's
    /// issuer. Empty: they present their own `remote` certificate (a remote trusting the mesh root).
    /// A certificate, not a secret: the key stays in the cluster's own files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_cert: String,
}

/// One remote cluster as a node-sync sees it, in [`NodeStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteState {
    /// Cluster name.
    pub name: ClusterName,
    /// The watch stream is up.
    pub connected: bool,
    /// Every canary was seen.
    pub synced: bool,
    /// Age of the last heartbeat seen, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<u64>,
    /// When the cluster went stale (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<String>,
    /// Keys held from this cluster.
    pub keys: u64,
    /// Why the connection is refused or down, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `nodestatus/<cluster>/<node>`: a node-sync's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Owning cluster.
    pub cluster: ClusterName,
    /// Node name.
    pub node: String,
    /// When this summary was written (RFC 3339).
    pub updated_at: String,
    /// Remote clusters.
    pub remotes: Vec<RemoteState>,
    /// Global services programmed.
    pub services: u64,
    /// Each global service: backends, which are selected and why, connections by locality.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_states: Vec<ServiceState>,
    /// Recent failovers and failbacks (newest last, bounded by the writer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failovers: Vec<FailoverEvent>,
    /// Golden signals of this node's connects per global service and backend cluster, over the
    /// last minute (what the kernel saw of each TCP connect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden_signals: Vec<GoldenSignal>,
    /// Certificates this node-sync loads that expire within 30 days (or have), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cert_warnings: Vec<String>,
}

/// A node's connects to one global service's backends in one cluster over a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GoldenSignal {
    /// `namespace/name`.
    pub service: String,
    /// Cluster of the backends.
    pub cluster: String,
    /// Window length, ms.
    pub window_ms: u64,
    /// Connects with an outcome in the window.
    pub connects: u64,
    /// Of which refused or timed out.
    pub errors: u64,
    /// Median SYN-to-established time, us (upper bound of its bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    /// 99th percentile SYN-to-established time, us (upper bound of its bucket; none above 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
}

impl GoldenSignal {
    /// Connects per second over the window.
    pub fn rate(&self) -> f64 {
        if self.window_ms == 0 {
            0.0
        } else {
            self.connects as f64 * 1000.0 / self.window_ms as f64
        }
    }

    /// Share of the window's connects that failed.
    pub fn error_ratio(&self) -> f64 {
        if self.connects == 0 {
            0.0
        } else {
            self.errors as f64 / self.connects as f64
        }
    }
}

/// A backend of a global service as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendState {
    /// Address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Cluster it runs in.
    pub cluster: ClusterName,
    /// It runs in the node's own cluster.
    pub local: bool,
    /// It is programmed in the datapath now.
    pub selected: bool,
    /// Why it is not usable, if it is not (`failing health check`, `terminating`, `cluster stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
    /// Connections the datapath sent to it since the node-sync started.
    #[serde(default)]
    pub connections: u64,
}

/// A global service as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    /// `namespace/name`.
    pub service: String,
    /// Frontend addresses programmed (`ip:port/proto`).
    pub frontends: Vec<String>,
    /// The known backends: every one, or, for a service of more than
    /// [`ServiceState::LIST_ALL`], at most [`ServiceState::LIST_ALL`] of those unusable, sent
    /// connections or selected (in that order); the rest are counted in `unlisted`.
    pub backends: Vec<BackendState>,
    /// Why the selection is what it is (e.g. `local backends usable`, `no local backend usable: failed over to c2`).
    pub reason: String,
    /// The backends not listed in `backends`, counted. Absent when every backend is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlisted: Option<Unlisted>,
}

impl ServiceState {
    /// A service with at most this many backends lists every one; a larger one lists this many.
    /// A node of a 255-cluster mesh listing every backend wrote a summary of 255k of them (tens
    /// of MB, past etcd's request limit) every few seconds.
    pub const LIST_ALL: usize = 64;
}

/// Backends of a service a node counts without listing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unlisted {
    /// How many, by cluster.
    pub by_cluster: BTreeMap<String, u64>,
    /// How many of them are selected (programmed in the datapath).
    pub selected: u64,
    /// Connections the datapath sent to those of the node's own cluster.
    pub connections_local: u64,
    /// Connections the datapath sent to those of other clusters.
    pub connections_remote: u64,
}

/// A change of the cluster group a service's traffic goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverEvent {
    /// `namespace/name`.
    pub service: String,
    /// Clusters selected before (empty: none).
    pub from: Vec<String>,
    /// Clusters selected after.
    pub to: Vec<String>,
    /// When (RFC 3339).
    pub at: String,
    /// Time from the first signal (the endpoint change received, the first failed probe or the
    /// first good one of a recovery) to the map write on the node, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The node whose maps moved (each node records its own moves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What moved it: `endpoints`, `health` or `liveness`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// A value of the layout, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum MeshValue {
    /// Cluster config.
    ClusterConfig(ClusterConfig),
    /// Heartbeat time.
    Heartbeat(OffsetDateTime),
    /// Sync canary time.
    Synced(OffsetDateTime),
    /// Service spec.
    Service(ServiceSpec),
    /// Endpoint chunk.
    EndpointChunk(EndpointChunk),
    /// Health verdicts.
    Health(HealthReport),
    /// Identity.
    Identity(Identity),
    /// IP to identity.
    Ip(IpIdentity),
    /// Node.
    Node(NodeInfo),
    /// ClusterSetIP import.
    Import(ServiceImport),
    /// Remote cluster registration.
    Remote(RemoteCluster),
    /// Node-sync summary.
    NodeStatus(NodeStatus),
    /// Leader election value: the holder's identity.
    Leader(String),
}

/// Format a time as RFC 3339 (UTC).
pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

fn parse_time(key: &MeshKey, bytes: &[u8]) -> Result<OffsetDateTime, ValueError> {
    let text = std::str::from_utf8(bytes).unwrap_or("");
    OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| ValueError::Time {
        key: key.to_string(),
        value: String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned(),
    })
}

fn json<T: for<'de> Deserialize<'de>>(key: &MeshKey, bytes: &[u8]) -> Result<T, ValueError> {
    serde_json::from_slice(bytes).map_err(|source| ValueError::Json {
        key: key.to_string(),
        kind: key.kind(),
        source,
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain data types cannot fail (string keys, no custom serialisers that error).
    serde_json::to_vec(v).unwrap_or_default()
}

impl MeshValue {
    /// Encode as stored in etcd (JSON; times as RFC 3339 text).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            MeshValue::ClusterConfig(v) => to_json(v),
            MeshValue::Heartbeat(t) | MeshValue::Synced(t) => format_time(*t).into_bytes(),
            MeshValue::Service(v) => to_json(v),
            MeshValue::EndpointChunk(v) => to_json(v),
            MeshValue::Health(v) => to_json(v),
            MeshValue::Identity(v) => to_json(v),
            MeshValue::Ip(v) => to_json(v),
            MeshValue::Node(v) => to_json(v),
            MeshValue::Import(v) => to_json(v),
            MeshValue::Remote(v) => to_json(v),
            MeshValue::NodeStatus(v) => to_json(v),
            MeshValue::Leader(s) => s.clone().into_bytes(),
        }
    }

    /// Decode the value stored under `key` and check that it agrees with the key.
    pub fn decode(key: &MeshKey, bytes: &[u8]) -> Result<Self, ValueError> {
        let v = match key.kind() {
            KeyKind::ClusterConfig => MeshValue::ClusterConfig(json(key, bytes)?),
            KeyKind::Heartbeat => MeshValue::Heartbeat(parse_time(key, bytes)?),
            KeyKind::Synced => MeshValue::Synced(parse_time(key, bytes)?),
            KeyKind::Services => MeshValue::Service(json(key, bytes)?),
            KeyKind::Endpoints => {
                let mut chunk: EndpointChunk = json(key, bytes)?;
                chunk.compact();
                MeshValue::EndpointChunk(chunk)
            }
            KeyKind::Health => MeshValue::Health(json(key, bytes)?),
            KeyKind::Identities => MeshValue::Identity(json(key, bytes)?),
            KeyKind::Ips => MeshValue::Ip(json(key, bytes)?),
            KeyKind::Nodes => MeshValue::Node(json(key, bytes)?),
            KeyKind::Imports => MeshValue::Import(json(key, bytes)?),
            KeyKind::Remotes => MeshValue::Remote(json(key, bytes)?),
            KeyKind::NodeStatus => MeshValue::NodeStatus(json(key, bytes)?),
            KeyKind::Leader => MeshValue::Leader(String::from_utf8_lossy(bytes).into_owned()),
        };
        v.validate(key)?;
        Ok(v)
    }

    /// Check that this value agrees with `key` and with the model's rules.
    pub fn validate(&self, key: &MeshKey) -> Result<(), ValueError> {
        let bad = |reason: String| ValueError::Invalid {
            key: key.to_string(),
            reason,
        };
        let same_cluster = |c: &ClusterName| {
            if c == key.cluster() {
                Ok(())
            } else {
                Err(bad(format!(
                    "value names cluster {:?} but the key is of cluster {:?}",
                    c.as_str(),
                    key.cluster().as_str()
                )))
            }
        };
        let same_service = |ns: &str, name: &str| match key.service() {
            Some(s) if s.namespace == ns && s.name == name => Ok(()),
            Some(s) => Err(bad(format!(
                "value names service {ns}/{name} but the key is of {s}"
            ))),
            None => Ok(()),
        };
        match (self, key) {
            (MeshValue::ClusterConfig(c), MeshKey::ClusterConfig { .. }) => {
                same_cluster(&c.name)?;
                ClusterId::new(c.id.into(), c.max_connected_clusters).map_err(|source| {
                    ValueError::ClusterRule {
                        key: key.to_string(),
                        source,
                    }
                })?;
                Ok(())
            }
            (MeshValue::Heartbeat(_), MeshKey::Heartbeat { .. })
            | (MeshValue::Synced(_), MeshKey::Synced { .. })
            | (MeshValue::Leader(_), MeshKey::Leader { .. }) => Ok(()),
            (MeshValue::Service(s), MeshKey::Service { .. }) => {
                same_cluster(&s.cluster)?;
                same_service(&s.namespace, &s.name)?;
                validate_ports(&s.ports).map_err(bad)?;
                if s.headless && !s.frontends.is_empty() {
                    return Err(bad("a headless service has no frontends".into()));
                }
                if !s.headless && s.frontends.is_empty() {
                    return Err(bad(
                        "a service that is not headless needs a frontend address".into(),
                    ));
                }
                if s.failover_order.contains(&s.cluster) {
                    return Err(bad("failoverOrder names the service's own cluster".into()));
                }
                if let HealthCheck::Http { path } = &s.health_check
                    && !path.starts_with('/')
                {
                    return Err(bad(format!(
                        "health check path {path:?} must start with '/'"
                    )));
                }
                if s.health_check_port == Some(0) {
                    return Err(bad("health check port 0".to_owned()));
                }
                Ok(())
            }
            (MeshValue::EndpointChunk(c), MeshKey::EndpointChunk { chunk, .. }) => {
                same_cluster(&c.cluster)?;
                same_service(&c.namespace, &c.name)?;
                if c.chunk != *chunk {
                    return Err(bad(format!(
                        "value is chunk {} but the key is chunk {chunk}",
                        c.chunk
                    )));
                }
                if c.endpoints.len() > MAX_ENDPOINTS_PER_CHUNK {
                    return Err(bad(format!(
                        "chunk holds {} endpoints, at most {MAX_ENDPOINTS_PER_CHUNK} allowed",
                        c.endpoints.len()
                    )));
                }
                let mut seen = BTreeSet::new();
                for e in &c.endpoints {
                    if !seen.insert(e.ip) {
                        return Err(bad(format!("endpoint {} appears twice", e.ip)));
                    }
                    if e.ports.iter().any(|p| p.port == 0) {
                        return Err(bad(format!("endpoint {} has port 0", e.ip)));
                    }
                }
                Ok(())
            }
            (MeshValue::Health(h), MeshKey::Health { node, .. }) => {
                same_cluster(&h.cluster)?;
                if &h.node != node {
                    return Err(bad(format!(
                        "value is of node {:?} but the key is of {node:?}",
                        h.node
                    )));
                }
                Ok(())
            }
            (MeshValue::Identity(i), MeshKey::Identity { id, .. }) => {
                if i.id != *id {
                    return Err(bad(format!(
                        "value is identity {} but the key is {id}",
                        i.id
                    )));
                }
                Ok(())
            }
            (MeshValue::Ip(i), MeshKey::Ip { ip, .. }) => {
                if i.ip != *ip {
                    return Err(bad(format!(
                        "value is of ip {} but the key is of {ip}",
                        i.ip
                    )));
                }
                Ok(())
            }
            (MeshValue::Node(n), MeshKey::Node { node, .. }) => {
                same_cluster(&n.cluster)?;
                if &n.name != node {
                    return Err(bad(format!(
                        "value is node {:?} but the key is {node:?}",
                        n.name
                    )));
                }
                Ok(())
            }
            (MeshValue::Import(i), MeshKey::Import { .. }) => {
                same_cluster(&i.cluster)?;
                same_service(&i.namespace, &i.name)?;
                if i.ips.is_empty() {
                    return Err(bad("an import needs at least one ClusterSetIP".into()));
                }
                validate_ports(&i.ports).map_err(bad)
            }
            (MeshValue::Remote(r), MeshKey::Remote { remote, .. }) => {
                if &r.name != remote {
                    return Err(bad(format!(
                        "value is of remote {:?} but the key is of {remote:?}",
                        r.name.as_str()
                    )));
                }
                if &r.name == key.cluster() {
                    return Err(bad("a cluster cannot be its own remote".into()));
                }
                if r.endpoints.is_empty() {
                    return Err(bad("a remote needs at least one etcd endpoint".into()));
                }
                if !r.client_cert.is_empty()
                    && !r.client_cert.contains("-----BEGIN CERTIFICATE-----")
                {
                    return Err(bad(
                        "clientCert is not a PEM certificate (no \"-----BEGIN CERTIFICATE-----\")"
                            .into(),
                    ));
                }
                Ok(())
            }
            (MeshValue::NodeStatus(s), MeshKey::NodeStatus { node, .. }) => {
                same_cluster(&s.cluster)?;
                if &s.node != node {
                    return Err(bad(format!(
                        "value is of node {:?} but the key is of {node:?}",
                        s.node
                    )));
                }
                Ok(())
            }
            _ => Err(bad("value kind does not match the key kind".into())),
        }
    }
}

fn validate_ports(ports: &[ServicePort]) -> Result<(), String> {
    if ports.is_empty() {
        return Err("a service needs at least one port".into());
    }
    let mut seen = BTreeSet::new();
    for p in ports {
        if p.port == 0 {
            return Err("port 0 is not a valid service port".into());
        }
        if !seen.insert((p.port, p.protocol)) {
            return Err(format!("port {}/{} appears twice", p.port, p.protocol));
        }
    }
    if ports.len() > 1 && ports.iter().any(|p| p.name.is_none()) {
        return Err("every port of a multi-port service needs a name".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }
    fn svc_key() -> MeshKey {
        MeshKey::Service {
            cluster: c("c1"),
            service: ServiceName::new("default", "web").unwrap(),
        }
    }
    fn spec() -> ServiceSpec {
        ServiceSpec {
            cluster: c("c1"),
            namespace: "default".into(),
            name: "web".into(),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            frontends: vec!["10.96.0.10".parse().unwrap()],
            headless: false,
            shared: true,
            affinity: Affinity::Local,
            failover_order: vec![c("c3"), c("c2")],
            health_check: HealthCheck::Http {
                path: "/healthz".into(),
            },
            health_check_port: None,
        }
    }
    fn chunk(n: u32, ips: &[&str]) -> EndpointChunk {
        EndpointChunk {
            cluster: c("c1"),
            namespace: "default".into(),
            name: "web".into(),
            chunk: n,
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    ip: ip.parse().unwrap(),
                    ports: vec![EndpointPort {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }]
                    .into(),
                    node: Some("n1".into()),
                    zone: Some("z1".into()),
                    hostname: None,
                    conditions: Conditions::default(),
                })
                .collect(),
        }
    }
    fn chunk_key(n: u32) -> MeshKey {
        MeshKey::EndpointChunk {
            cluster: c("c1"),
            service: ServiceName::new("default", "web").unwrap(),
            chunk: n,
        }
    }

    fn round_trip(key: &MeshKey, v: MeshValue) {
        let bytes = v.encode();
        assert_eq!(MeshValue::decode(key, &bytes).unwrap(), v, "{key}");
    }

    #[test]
    fn a_decoded_chunk_holds_no_spare_capacity_and_shares_what_repeats() {
        let ips: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}")).collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let bytes = MeshValue::EndpointChunk(chunk(0, &refs)).encode();
        let MeshValue::EndpointChunk(c) = MeshValue::decode(&chunk_key(0), &bytes).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(c.endpoints.len(), 10);
        assert_eq!(
            c.endpoints.capacity(),
            10,
            "a decoder's doubling left room for 16"
        );
        assert!(
            c.endpoints
                .windows(2)
                .all(|w| Arc::ptr_eq(&w[0].ports, &w[1].ports)),
            "the same ports, one list"
        );
        assert!(
            c.endpoints
                .windows(2)
                .all(|w| Arc::ptr_eq(w[0].node.as_ref().unwrap(), w[1].node.as_ref().unwrap())),
            "the same node, one name"
        );
    }

    #[test]
    fn a_node_value_carries_pod_cidrs_as_pod_cidrs_and_one_written_before_them_still_reads() {
        let key = MeshKey::Node {
            cluster: c("c1"),
            node: "n1".into(),
        };
        let old = br#"{"cluster":"c1","name":"n1","addresses":[{"type":"InternalIP","ip":"192.168.1.1"}]}"#;
        let MeshValue::Node(n) = MeshValue::decode(&key, old).unwrap() else {
            panic!("not a node")
        };
        assert!(n.pod_cidrs.is_empty());
        let text = String::from_utf8(MeshValue::Node(n.clone()).encode()).unwrap();
        assert!(
            !text.contains("podCIDRs"),
            "an empty list is left out: {text}"
        );
        let with = NodeInfo {
            pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
            ..n
        };
        let text = String::from_utf8(MeshValue::Node(with).encode()).unwrap();
        assert!(text.contains(r#""podCIDRs":["10.1.1.0/24"]"#), "{text}");
    }

    #[test]
    fn every_value_round_trips() {
        let cc = ClusterConfig {
            name: c("c1"),
            id: ClusterId::new(7, MaxConnectedClusters::DEFAULT).unwrap(),
            max_connected_clusters: MaxConnectedClusters::DEFAULT,
            capabilities: Capabilities {
                sync_canaries: true,
                endpoint_chunks: true,
                cached: false,
            },
            ca_fingerprints: vec!["ab:cd".into()],
        };
        round_trip(
            &MeshKey::ClusterConfig { cluster: c("c1") },
            MeshValue::ClusterConfig(cc),
        );
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        round_trip(
            &MeshKey::Heartbeat { cluster: c("c1") },
            MeshValue::Heartbeat(t),
        );
        round_trip(
            &MeshKey::Synced {
                cluster: c("c1"),
                kind: crate::keys::SyncKind::Services,
            },
            MeshValue::Synced(t),
        );
        round_trip(&svc_key(), MeshValue::Service(spec()));
        round_trip(
            &chunk_key(3),
            MeshValue::EndpointChunk(chunk(3, &["10.0.0.1", "fd00::2"])),
        );
        round_trip(
            &MeshKey::Health {
                cluster: c("c1"),
                node: "n1".into(),
            },
            MeshValue::Health(HealthReport {
                cluster: c("c1"),
                node: "n1".into(),
                verdicts: vec![BackendVerdict {
                    ip: "10.0.0.1".parse().unwrap(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                    verdict: Verdict::Failing,
                    since: Some("2026-11-23T15:00:00Z".into()),
                }],
            }),
        );
        round_trip(
            &MeshKey::Identity {
                cluster: c("c1"),
                id: 458_753,
            },
            MeshValue::Identity(Identity {
                id: 458_753,
                labels: [("k8s:app".to_string(), "web".to_string())].into(),
            }),
        );
        round_trip(
            &MeshKey::Ip {
                cluster: c("c1"),
                ip: "10.0.0.1".parse().unwrap(),
            },
            MeshValue::Ip(IpIdentity {
                ip: "10.0.0.1".parse().unwrap(),
                identity: 458_753,
                namespace: Some("default".into()),
                pod: Some("web-1".into()),
            }),
        );
        round_trip(
            &MeshKey::Node {
                cluster: c("c1"),
                node: "n1".into(),
            },
            MeshValue::Node(NodeInfo {
                cluster: c("c1"),
                name: "n1".into(),
                addresses: vec![NodeAddress {
                    kind: "InternalIP".into(),
                    ip: "192.168.1.1".parse().unwrap(),
                }],
                zone: Some("z1".into()),
                region: Some("r1".into()),
                pod_cidrs: vec![
                    "10.1.1.0/24".parse().unwrap(),
                    "fd00:1:1::/64".parse().unwrap(),
                ],
            }),
        );
        round_trip(
            &MeshKey::Import {
                cluster: c("c1"),
                service: ServiceName::new("default", "web").unwrap(),
            },
            MeshValue::Import(ServiceImport {
                cluster: c("c1"),
                namespace: "default".into(),
                name: "web".into(),
                ips: vec!["10.100.0.1".parse().unwrap()],
                ports: spec().ports,
            }),
        );
        round_trip(
            &MeshKey::Remote {
                cluster: c("c1"),
                remote: c("c2"),
            },
            MeshValue::Remote(RemoteCluster {
                name: c("c2"),
                id: ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
                endpoints: vec!["https://10.0.2.1:2379".into()],
                ca_bundle: String::new(),
                client_cert: String::new(),
            }),
        );
    }

    #[test]
    fn the_stored_json_is_readable_and_stable() {
        let bytes = MeshValue::Service(spec()).encode();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(
            text,
            r#"{"cluster":"c1","namespace":"default","name":"web","ports":[{"name":"http","port":80,"protocol":"TCP"}],"frontends":["10.96.0.10"],"headless":false,"shared":true,"affinity":"local","failoverOrder":["c3","c2"],"healthCheck":{"type":"http","path":"/healthz"}}"#
        );
    }

    #[test]
    fn values_that_contradict_their_key_are_refused() {
        let other_cluster = ServiceSpec {
            cluster: c("c2"),
            ..spec()
        };
        let e =
            MeshValue::decode(&svc_key(), &MeshValue::Service(other_cluster).encode()).unwrap_err();
        assert!(e.to_string().contains("cluster \"c2\""), "{e}");

        let other_name = ServiceSpec {
            name: "api".into(),
            ..spec()
        };
        let e =
            MeshValue::decode(&svc_key(), &MeshValue::Service(other_name).encode()).unwrap_err();
        assert!(e.to_string().contains("default/api"), "{e}");

        let e = MeshValue::decode(
            &chunk_key(4),
            &MeshValue::EndpointChunk(chunk(3, &["10.0.0.1"])).encode(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("chunk 3"), "{e}");

        let e = MeshValue::decode(
            &chunk_key(0),
            &MeshValue::EndpointChunk(chunk(0, &["10.0.0.1", "10.0.0.1"])).encode(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");

        let big: Vec<String> = (0..65).map(|i| format!("10.0.1.{i}")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let e = MeshValue::decode(
            &chunk_key(0),
            &MeshValue::EndpointChunk(chunk(0, &big)).encode(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");

        // A service value stored under an endpoint key.
        let e = MeshValue::decode(&chunk_key(0), &MeshValue::Service(spec()).encode()).unwrap_err();
        assert!(e.to_string().contains("not a valid endpoints value"), "{e}");
    }

    #[test]
    fn malformed_values_are_refused_with_the_key_named() {
        for garbage in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"\xff\xfe",
            b"{\"cluster\":\"c1\"}",
        ] {
            let e = MeshValue::decode(&svc_key(), garbage).unwrap_err();
            assert!(
                e.to_string()
                    .contains("clustermesh/v1/services/c1/default/web"),
                "{e}"
            );
        }
        let e =
            MeshValue::decode(&MeshKey::Heartbeat { cluster: c("c1") }, b"yesterday").unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }

    #[test]
    fn service_rules() {
        let no_ports = ServiceSpec {
            ports: vec![],
            ..spec()
        };
        let e = MeshValue::Service(no_ports)
            .validate(&svc_key())
            .unwrap_err();
        assert!(e.to_string().contains("at least one port"));
        let headless_with_ip = ServiceSpec {
            headless: true,
            ..spec()
        };
        assert!(
            MeshValue::Service(headless_with_ip)
                .validate(&svc_key())
                .is_err()
        );
        let no_frontend = ServiceSpec {
            frontends: vec![],
            ..spec()
        };
        assert!(
            MeshValue::Service(no_frontend)
                .validate(&svc_key())
                .is_err()
        );
        let own_failover = ServiceSpec {
            failover_order: vec![c("c1")],
            ..spec()
        };
        assert!(
            MeshValue::Service(own_failover)
                .validate(&svc_key())
                .is_err()
        );
        let mut two_unnamed = spec();
        two_unnamed.ports = vec![
            ServicePort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
            },
            ServicePort {
                name: None,
                port: 81,
                protocol: Protocol::Tcp,
            },
        ];
        assert!(
            MeshValue::Service(two_unnamed)
                .validate(&svc_key())
                .is_err()
        );
        let bad_path = ServiceSpec {
            health_check: HealthCheck::Http { path: "x".into() },
            ..spec()
        };
        assert!(MeshValue::Service(bad_path).validate(&svc_key()).is_err());
    }

    #[test]
    fn cluster_config_rules() {
        let key = MeshKey::ClusterConfig { cluster: c("c1") };
        let v = br#"{"name":"c1","id":300,"maxConnectedClusters":255}"#;
        let e = MeshValue::decode(&key, v).unwrap_err();
        assert!(e.to_string().contains("1..=255"), "{e}");
        let v = br#"{"name":"c1","id":300,"maxConnectedClusters":511}"#;
        assert!(MeshValue::decode(&key, v).is_ok());
        let v = br#"{"name":"c1","id":0}"#;
        assert!(MeshValue::decode(&key, v).is_err());
        let v = br#"{"name":"c2","id":2}"#;
        assert!(
            MeshValue::decode(&key, v)
                .unwrap_err()
                .to_string()
                .contains("c2")
        );
        let v = br#"{"name":"c1","id":1,"maxConnectedClusters":300}"#;
        assert!(
            MeshValue::decode(&key, v)
                .unwrap_err()
                .to_string()
                .contains("maxConnectedClusters")
        );
    }

    #[test]
    fn remote_rules() {
        let key = MeshKey::Remote {
            cluster: c("c1"),
            remote: c("c2"),
        };
        assert!(MeshValue::decode(&key, br#"{"name":"c2","id":2,"endpoints":[]}"#).is_err());
        assert!(
            MeshValue::decode(&key, br#"{"name":"c3","id":2,"endpoints":["https://x:1"]}"#)
                .is_err()
        );
        let own = MeshKey::Remote {
            cluster: c("c1"),
            remote: c("c1"),
        };
        assert!(
            MeshValue::decode(&own, br#"{"name":"c1","id":1,"endpoints":["https://x:1"]}"#)
                .is_err()
        );
    }

    #[test]
    fn conditions_usable() {
        let c = |ready, serving, terminating| Conditions {
            ready,
            serving,
            terminating,
        };
        assert!(c(true, true, false).usable());
        assert!(c(false, true, false).usable());
        assert!(!c(false, true, true).usable());
        assert!(!c(false, false, false).usable());
        assert!(c(true, false, true).usable());
    }

    #[test]
    fn identities() {
        let d = MaxConnectedClusters::DEFAULT;
        let id = identity_id(ClusterId::new(7, d).unwrap(), 1, d).unwrap();
        assert_eq!(id, (7 << 16) | 1);
        assert_eq!(identity_cluster(id, d), 7);
        assert_eq!(identity_id(ClusterId::new(7, d).unwrap(), 0, d), None);
        assert_eq!(identity_id(ClusterId::new(7, d).unwrap(), 1 << 16, d), None);
        let e = MaxConnectedClusters::EXTENDED;
        let id = identity_id(ClusterId::new(511, e).unwrap(), 5, e).unwrap();
        assert_eq!(identity_cluster(id, e), 511);
    }
}

/// How values are turned into bytes. JSON ([`JsonCodec`]) is what v1 writes, so `etcdctl get` is
/// readable; the trait leaves room for a compact encoding negotiated through [`Capabilities`].
pub trait Codec: Send + Sync {
    /// Encode a value.
    fn encode(&self, value: &MeshValue) -> Vec<u8>;
    /// Decode and validate the value stored under `key`.
    fn decode(&self, key: &MeshKey, bytes: &[u8]) -> Result<MeshValue, ValueError>;
}

/// The v1 codec: JSON values, RFC 3339 times.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn encode(&self, value: &MeshValue) -> Vec<u8> {
        value.encode()
    }
    fn decode(&self, key: &MeshKey, bytes: &[u8]) -> Result<MeshValue, ValueError> {
        MeshValue::decode(key, bytes)
    }
}
