//! The etcd key layout (v1) as typed builders and parsers.
//!
//! ```text
//! clustermesh/v1/cluster-config/<cluster>               cluster config (JSON)
//! clustermesh/v1/heartbeat/<cluster>                    RFC 3339 time, rewritten every second
//! clustermesh/v1/synced/<cluster>/<kind>                sync canary for <kind>, written after its first full write
//! clustermesh/v1/services/<cluster>/<ns>/<name>         service spec
//! clustermesh/v1/endpoints/<cluster>/<ns>/<name>/<n>    endpoint chunk n (at most 64 endpoints)
//! clustermesh/v1/health/<cluster>/<node>                health verdicts of the backends on <node> (lease-bound)
//! clustermesh/v1/identities/<cluster>/<id>              label set of a numeric identity
//! clustermesh/v1/ips/<cluster>/<ip>                     identity of an endpoint IP
//! clustermesh/v1/nodes/<cluster>/<node>                 node addresses, zone, region
//! clustermesh/v1/imports/<cluster>/<ns>/<name>          ClusterSetIP allocated in <cluster> for a service it lacks
//! clustermesh/v1/remotes/<cluster>/<remote>             a remote cluster <cluster> connects to (written by `clustermesh connect`)
//! clustermesh/v1/nodestatus/<cluster>/<node>            a node-sync's summary, read by `clustermesh status`
//! clustermesh/v1/leader/<cluster>                       apiserver leader election (lease-bound)
//! ```
//!
//! The second segment is the owning cluster for every kind, so the keys of different clusters never collide,
//! and a reader can refuse a key that claims to belong to a cluster it did not expect. `build` and `parse`
//! are inverses: `MeshKey::parse(&k.to_string()) == Ok(k)`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterName, ClusterRuleError};

/// Root of every key this version writes.
pub const ROOT: &str = "clustermesh/";
/// The layout version this crate speaks.
pub const VERSION: &str = "v1";
/// `clustermesh/v1/`: every key of this version starts with it.
pub const PREFIX: &str = "clustermesh/v1/";

/// Longest Kubernetes namespace or service name (a DNS label).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest node name (a DNS subdomain).
pub const MAX_SUBDOMAIN_LEN: usize = 253;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not under `clustermesh/`.
    #[error("key {key:?} is not a clustermesh key (it does not start with {ROOT:?})")]
    NotMesh {
        /// The key.
        key: String,
    },
    /// The key belongs to another layout version.
    #[error("key {key:?} is of layout version {found:?}; this build reads {VERSION:?}")]
    OtherVersion {
        /// The key.
        key: String,
        /// The version segment found.
        found: String,
    },
    /// The kind segment is not one of the layout.
    #[error("key {key:?} has unknown kind {kind:?}")]
    UnknownKind {
        /// The key.
        key: String,
        /// The kind segment found.
        kind: String,
    },
    /// The number of segments does not fit the kind.
    #[error("key {key:?} has {found} segments after the kind; {kind} keys have {expected}")]
    Shape {
        /// The key.
        key: String,
        /// The kind.
        kind: KeyKind,
        /// Segments expected after the kind.
        expected: usize,
        /// Segments found after the kind.
        found: usize,
    },
    /// The cluster segment breaks the cluster name rules.
    #[error("key {key:?}: {source}")]
    ClusterName {
        /// The key.
        key: String,
        /// The rule broken.
        #[source]
        source: ClusterRuleError,
    },
    /// The key belongs to another cluster than the one expected.
    #[error("key {key:?} belongs to cluster {found:?}, expected {expected:?}")]
    WrongCluster {
        /// The key.
        key: String,
        /// The cluster expected.
        expected: String,
        /// The cluster in the key.
        found: String,
    },
    /// A segment (namespace, name, node, id, ip, chunk, sync kind) is malformed.
    #[error("key {key:?}: bad {what} {segment:?}: {reason}")]
    Segment {
        /// The key.
        key: String,
        /// Which segment.
        what: &'static str,
        /// The segment text.
        segment: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The kinds of keys of the layout; each has its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    /// `cluster-config/<cluster>`
    ClusterConfig,
    /// `heartbeat/<cluster>`
    Heartbeat,
    /// `synced/<cluster>/<kind>`
    Synced,
    /// `services/<cluster>/<ns>/<name>`
    Services,
    /// `endpoints/<cluster>/<ns>/<name>/<n>`
    Endpoints,
    /// `health/<cluster>/<node>`
    Health,
    /// `identities/<cluster>/<id>`
    Identities,
    /// `ips/<cluster>/<ip>`
    Ips,
    /// `nodes/<cluster>/<node>`
    Nodes,
    /// `imports/<cluster>/<ns>/<name>`
    Imports,
    /// `remotes/<cluster>/<remote>`
    Remotes,
    /// `nodestatus/<cluster>/<node>`
    NodeStatus,
    /// `leader/<cluster>`
    Leader,
}

impl KeyKind {
    /// Every kind, in layout order.
    pub const ALL: [KeyKind; 13] = [
        KeyKind::ClusterConfig,
        KeyKind::Heartbeat,
        KeyKind::Synced,
        KeyKind::Services,
        KeyKind::Endpoints,
        KeyKind::Health,
        KeyKind::Identities,
        KeyKind::Ips,
        KeyKind::Nodes,
        KeyKind::Imports,
        KeyKind::Remotes,
        KeyKind::NodeStatus,
        KeyKind::Leader,
    ];

    /// The segment that names this kind in a key.
    pub fn segment(self) -> &'static str {
        match self {
            KeyKind::ClusterConfig => "cluster-config",
            KeyKind::Heartbeat => "heartbeat",
            KeyKind::Synced => "synced",
            KeyKind::Services => "services",
            KeyKind::Endpoints => "endpoints",
            KeyKind::Health => "health",
            KeyKind::Identities => "identities",
            KeyKind::Ips => "ips",
            KeyKind::Nodes => "nodes",
            KeyKind::Imports => "imports",
            KeyKind::Remotes => "remotes",
            KeyKind::NodeStatus => "nodestatus",
            KeyKind::Leader => "leader",
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.segment() == s)
    }

    /// Segments after the kind (the cluster included).
    fn arity(self) -> usize {
        match self {
            KeyKind::ClusterConfig | KeyKind::Heartbeat | KeyKind::Leader => 1,
            KeyKind::Synced
            | KeyKind::Health
            | KeyKind::Identities
            | KeyKind::Ips
            | KeyKind::Nodes
            | KeyKind::Remotes
            | KeyKind::NodeStatus => 2,
            KeyKind::Services | KeyKind::Imports => 3,
            KeyKind::Endpoints => 4,
        }
    }

    /// `clustermesh/v1/<kind>/`: the prefix of this kind for every cluster.
    pub fn prefix(self) -> String {
        format!("{PREFIX}{}/", self.segment())
    }

    /// `clustermesh/v1/<kind>/<cluster>/`: the prefix of this kind for one cluster.
    ///
    /// For the single-segment kinds (`cluster-config`, `heartbeat`, `leader`) this is the key itself
    /// followed by `/`, which matches nothing; use [`MeshKey`] for those.
    pub fn cluster_prefix(self, cluster: &ClusterName) -> String {
        format!("{PREFIX}{}/{cluster}/", self.segment())
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// The kinds that carry a sync canary (`synced/<cluster>/<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncKind {
    /// Service specs.
    Services,
    /// Endpoint chunks.
    Endpoints,
    /// Identities.
    Identities,
    /// IP to identity entries.
    Ips,
    /// Nodes.
    Nodes,
    /// ClusterSetIP imports.
    Imports,
}

impl SyncKind {
    /// Every synced kind.
    pub const ALL: [SyncKind; 6] = [
        SyncKind::Services,
        SyncKind::Endpoints,
        SyncKind::Identities,
        SyncKind::Ips,
        SyncKind::Nodes,
        SyncKind::Imports,
    ];

    /// The key kind whose data this canary covers.
    pub fn key_kind(self) -> KeyKind {
        match self {
            SyncKind::Services => KeyKind::Services,
            SyncKind::Endpoints => KeyKind::Endpoints,
            SyncKind::Identities => KeyKind::Identities,
            SyncKind::Ips => KeyKind::Ips,
            SyncKind::Nodes => KeyKind::Nodes,
            SyncKind::Imports => KeyKind::Imports,
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.key_kind().segment() == s)
    }
}

impl fmt::Display for SyncKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key_kind().segment())
    }
}

/// A Kubernetes object name usable as a key segment: a DNS label (namespaces, services) or a DNS
/// subdomain (nodes): lowercase letters, digits, '-' (and '.' for subdomains), starting and ending with
/// a letter or digit.
fn check_dns_name(s: &str, max: usize, dots: bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > max {
        return Err(format!(
            "it is {} characters long, at most {max} allowed",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || (dots && *c == '.'))
    }) {
        return Err(format!("it contains {c:?}"));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge_ok(s.chars().next()) || !edge_ok(s.chars().last()) {
        return Err("it must start and end with a lowercase letter or digit".into());
    }
    Ok(())
}

/// Error building a name: which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// What kind of name.
    pub what: &'static str,
    /// The value.
    pub value: String,
    /// The rule broken.
    pub reason: String,
}

/// The namespace and name of a Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    /// Namespace (a DNS label).
    pub namespace: String,
    /// Name (a DNS label).
    pub name: String,
}

impl ServiceName {
    /// Validate a namespace and name.
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        check_dns_name(namespace, MAX_LABEL_LEN, false).map_err(|reason| NameError {
            what: "namespace",
            value: namespace.to_owned(),
            reason,
        })?;
        check_dns_name(name, MAX_LABEL_LEN, false).map_err(|reason| NameError {
            what: "service name",
            value: name.to_owned(),
            reason,
        })?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    /// Parse `namespace/name`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = s.split_once('/').ok_or_else(|| NameError {
            what: "service",
            value: s.to_owned(),
            reason: "expected NAMESPACE/NAME".into(),
        })?;
        Self::new(ns, name)
    }
}

/// Validate a node name (a DNS subdomain).
pub fn check_node_name(node: &str) -> Result<(), NameError> {
    check_dns_name(node, MAX_SUBDOMAIN_LEN, true).map_err(|reason| NameError {
        what: "node name",
        value: node.to_owned(),
        reason,
    })
}

/// A key of the layout, typed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeshKey {
    /// `cluster-config/<cluster>`
    ClusterConfig {
        /// Owning cluster.
        cluster: ClusterName,
    },
    /// `heartbeat/<cluster>`
    Heartbeat {
        /// Owning cluster.
        cluster: ClusterName,
    },
    /// `synced/<cluster>/<kind>`
    Synced {
        /// Owning cluster.
        cluster: ClusterName,
        /// Which kind of data is synced.
        kind: SyncKind,
    },
    /// `services/<cluster>/<ns>/<name>`
    Service {
        /// Owning cluster.
        cluster: ClusterName,
        /// The service.
        service: ServiceName,
    },
    /// `endpoints/<cluster>/<ns>/<name>/<n>`
    EndpointChunk {
        /// Owning cluster.
        cluster: ClusterName,
        /// The service.
        service: ServiceName,
        /// Chunk number.
        chunk: u32,
    },
    /// `health/<cluster>/<node>`
    Health {
        /// Owning cluster.
        cluster: ClusterName,
        /// Node whose backends were probed.
        node: String,
    },
    /// `identities/<cluster>/<id>`
    Identity {
        /// Owning cluster.
        cluster: ClusterName,
        /// Numeric identity.
        id: u32,
    },
    /// `ips/<cluster>/<ip>`
    Ip {
        /// Owning cluster.
        cluster: ClusterName,
        /// Endpoint IP.
        ip: IpAddr,
    },
    /// `nodes/<cluster>/<node>`
    Node {
        /// Owning cluster.
        cluster: ClusterName,
        /// Node name.
        node: String,
    },
    /// `imports/<cluster>/<ns>/<name>`
    Import {
        /// Cluster that allocated the ClusterSetIP.
        cluster: ClusterName,
        /// The imported service.
        service: ServiceName,
    },
    /// `remotes/<cluster>/<remote>`
    Remote {
        /// Cluster that connects.
        cluster: ClusterName,
        /// Cluster connected to.
        remote: ClusterName,
    },
    /// `nodestatus/<cluster>/<node>`
    NodeStatus {
        /// Owning cluster.
        cluster: ClusterName,
        /// Node name.
        node: String,
    },
    /// `leader/<cluster>`
    Leader {
        /// Owning cluster.
        cluster: ClusterName,
    },
}

impl MeshKey {
    /// The kind of this key.
    pub fn kind(&self) -> KeyKind {
        match self {
            MeshKey::ClusterConfig { .. } => KeyKind::ClusterConfig,
            MeshKey::Heartbeat { .. } => KeyKind::Heartbeat,
            MeshKey::Synced { .. } => KeyKind::Synced,
            MeshKey::Service { .. } => KeyKind::Services,
            MeshKey::EndpointChunk { .. } => KeyKind::Endpoints,
            MeshKey::Health { .. } => KeyKind::Health,
            MeshKey::Identity { .. } => KeyKind::Identities,
            MeshKey::Ip { .. } => KeyKind::Ips,
            MeshKey::Node { .. } => KeyKind::Nodes,
            MeshKey::Import { .. } => KeyKind::Imports,
            MeshKey::Remote { .. } => KeyKind::Remotes,
            MeshKey::NodeStatus { .. } => KeyKind::NodeStatus,
            MeshKey::Leader { .. } => KeyKind::Leader,
        }
    }

    /// The cluster that owns this key.
    pub fn cluster(&self) -> &ClusterName {
        match self {
            MeshKey::ClusterConfig { cluster }
            | MeshKey::Heartbeat { cluster }
            | MeshKey::Synced { cluster, .. }
            | MeshKey::Service { cluster, .. }
            | MeshKey::EndpointChunk { cluster, .. }
            | MeshKey::Health { cluster, .. }
            | MeshKey::Identity { cluster, .. }
            | MeshKey::Ip { cluster, .. }
            | MeshKey::Node { cluster, .. }
            | MeshKey::Import { cluster, .. }
            | MeshKey::Remote { cluster, .. }
            | MeshKey::NodeStatus { cluster, .. }
            | MeshKey::Leader { cluster } => cluster,
        }
    }

    /// The service this key is about, for service, endpoint and import keys.
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            MeshKey::Service { service, .. }
            | MeshKey::EndpointChunk { service, .. }
            | MeshKey::Import { service, .. } => Some(service),
            _ => None,
        }
    }

    /// Parse a key and refuse it unless it belongs to `expected`.
    pub fn parse_for(key: &str, expected: &ClusterName) -> Result<Self, KeyError> {
        let k = Self::parse(key)?;
        if k.cluster() != expected {
            return Err(KeyError::WrongCluster {
                key: key.to_owned(),
                expected: expected.to_string(),
                found: k.cluster().to_string(),
            });
        }
        Ok(k)
    }

    /// Parse any key of the layout.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let owned = || key.to_owned();
        let rest = key
            .strip_prefix(ROOT)
            .ok_or_else(|| KeyError::NotMesh { key: owned() })?;
        let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if version != VERSION {
            return Err(KeyError::OtherVersion {
                key: owned(),
                found: version.to_owned(),
            });
        }
        let (kind_seg, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let kind = KeyKind::from_segment(kind_seg).ok_or_else(|| KeyError::UnknownKind {
            key: owned(),
            kind: kind_seg.to_owned(),
        })?;
        let segs: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        if segs.len() != kind.arity() {
            return Err(KeyError::Shape {
                key: owned(),
                kind,
                expected: kind.arity(),
                found: segs.len(),
            });
        }
        let cluster = ClusterName::new(segs[0]).map_err(|source| KeyError::ClusterName {
            key: owned(),
            source,
        })?;
        let seg_err = |what: &'static str, segment: &str, reason: String| KeyError::Segment {
            key: owned(),
            what,
            segment: segment.to_owned(),
            reason,
        };
        let service = |ns: &str, name: &str| {
            ServiceName::new(ns, name).map_err(|e| seg_err(e.what, &e.value, e.reason))
        };
        let node = |n: &str| {
            check_node_name(n)
                .map(|()| n.to_owned())
                .map_err(|e| seg_err("node name", n, e.reason))
        };
        let number = |what: &'static str, s: &str| -> Result<u32, KeyError> {
            // Canonical decimal only: no sign, no leading zeros, so one value has one key.
            let canonical = !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'));
            if !canonical {
                return Err(seg_err(
                    what,
                    s,
                    "expected a decimal number without leading zeros".into(),
                ));
            }
            s.parse()
                .map_err(|e: std::num::ParseIntError| seg_err(what, s, e.to_string()))
        };
        Ok(match kind {
            KeyKind::ClusterConfig => MeshKey::ClusterConfig { cluster },
            KeyKind::Heartbeat => MeshKey::Heartbeat { cluster },
            KeyKind::Leader => MeshKey::Leader { cluster },
            KeyKind::Synced => MeshKey::Synced {
                cluster,
                kind: SyncKind::from_segment(segs[1]).ok_or_else(|| {
                    seg_err(
                        "sync kind",
                        segs[1],
                        "not a kind that has a sync canary".into(),
                    )
                })?,
            },
            KeyKind::Services => MeshKey::Service {
                cluster,
                service: service(segs[1], segs[2])?,
            },
            KeyKind::Imports => MeshKey::Import {
                cluster,
                service: service(segs[1], segs[2])?,
            },
            KeyKind::Endpoints => MeshKey::EndpointChunk {
                cluster,
                service: service(segs[1], segs[2])?,
                chunk: number("chunk number", segs[3])?,
            },
            KeyKind::Health => MeshKey::Health {
                cluster,
                node: node(segs[1])?,
            },
            KeyKind::Nodes => MeshKey::Node {
                cluster,
                node: node(segs[1])?,
            },
            KeyKind::NodeStatus => MeshKey::NodeStatus {
                cluster,
                node: node(segs[1])?,
            },
            KeyKind::Identities => MeshKey::Identity {
                cluster,
                id: number("identity", segs[1])?,
            },
            KeyKind::Ips => {
                let ip: IpAddr = segs[1]
                    .parse()
                    .map_err(|e: std::net::AddrParseError| seg_err("ip", segs[1], e.to_string()))?;
                if ip.to_string() != segs[1] {
                    return Err(seg_err(
                        "ip",
                        segs[1],
                        format!("not in canonical form (expected {ip})"),
                    ));
                }
                MeshKey::Ip { cluster, ip }
            }
            KeyKind::Remotes => MeshKey::Remote {
                cluster,
                remote: ClusterName::new(segs[1])
                    .map_err(|e| seg_err("remote cluster name", segs[1], e.to_string()))?,
            },
        })
    }

    /// The prefix under which every endpoint chunk of `service` in `cluster` lives.
    pub fn endpoints_prefix(cluster: &ClusterName, service: &ServiceName) -> String {
        format!(
            "{}{}/{}/",
            KeyKind::Endpoints.cluster_prefix(cluster),
            service.namespace,
            service.name
        )
    }
}

impl fmt::Display for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/{}", self.kind().segment(), self.cluster())?;
        match self {
            MeshKey::ClusterConfig { .. } | MeshKey::Heartbeat { .. } | MeshKey::Leader { .. } => {
                Ok(())
            }
            MeshKey::Synced { kind, .. } => write!(f, "/{kind}"),
            MeshKey::Service { service, .. } | MeshKey::Import { service, .. } => {
                write!(f, "/{}/{}", service.namespace, service.name)
            }
            MeshKey::EndpointChunk { service, chunk, .. } => {
                write!(f, "/{}/{}/{chunk}", service.namespace, service.name)
            }
            MeshKey::Health { node, .. }
            | MeshKey::Node { node, .. }
            | MeshKey::NodeStatus { node, .. } => write!(f, "/{node}"),
            MeshKey::Identity { id, .. } => write!(f, "/{id}"),
            MeshKey::Ip { ip, .. } => write!(f, "/{ip}"),
            MeshKey::Remote { remote, .. } => write!(f, "/{remote}"),
        }
    }
}

impl FromStr for MeshKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }
    fn svc() -> ServiceName {
        ServiceName::new("default", "web").unwrap()
    }

    fn every_key() -> Vec<MeshKey> {
        let cl = c("c1");
        vec![
            MeshKey::ClusterConfig {
                cluster: cl.clone(),
            },
            MeshKey::Heartbeat {
                cluster: cl.clone(),
            },
            MeshKey::Leader {
                cluster: cl.clone(),
            },
            MeshKey::Synced {
                cluster: cl.clone(),
                kind: SyncKind::Endpoints,
            },
            MeshKey::Service {
                cluster: cl.clone(),
                service: svc(),
            },
            MeshKey::EndpointChunk {
                cluster: cl.clone(),
                service: svc(),
                chunk: 12,
            },
            MeshKey::Health {
                cluster: cl.clone(),
                node: "node-1.example".into(),
            },
            MeshKey::Identity {
                cluster: cl.clone(),
                id: 65_537,
            },
            MeshKey::Ip {
                cluster: cl.clone(),
                ip: "10.1.2.3".parse().unwrap(),
            },
            MeshKey::Ip {
                cluster: cl.clone(),
                ip: "fd00::1".parse().unwrap(),
            },
            MeshKey::Node {
                cluster: cl.clone(),
                node: "n1".into(),
            },
            MeshKey::Import {
                cluster: cl.clone(),
                service: svc(),
            },
            MeshKey::Remote {
                cluster: cl.clone(),
                remote: c("c2"),
            },
            MeshKey::NodeStatus {
                cluster: cl,
                node: "n1".into(),
            },
        ]
    }

    #[test]
    fn the_layout_of_design_md() {
        let keys: Vec<String> = every_key().iter().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "clustermesh/v1/cluster-config/c1",
                "clustermesh/v1/heartbeat/c1",
                "clustermesh/v1/leader/c1",
                "clustermesh/v1/synced/c1/endpoints",
                "clustermesh/v1/services/c1/default/web",
                "clustermesh/v1/endpoints/c1/default/web/12",
                "clustermesh/v1/health/c1/node-1.example",
                "clustermesh/v1/identities/c1/65537",
                "clustermesh/v1/ips/c1/10.1.2.3",
                "clustermesh/v1/ips/c1/fd00::1",
                "clustermesh/v1/nodes/c1/n1",
                "clustermesh/v1/imports/c1/default/web",
                "clustermesh/v1/remotes/c1/c2",
                "clustermesh/v1/nodestatus/c1/n1",
            ]
        );
    }

    #[test]
    fn parse_of_build_round_trips() {
        for k in every_key() {
            assert_eq!(MeshKey::parse(&k.to_string()), Ok(k.clone()), "{k}");
            assert_eq!(k.kind().prefix(), format!("clustermesh/v1/{}/", k.kind()));
            assert!(
                k.to_string()
                    .starts_with(&k.kind().cluster_prefix(k.cluster())[..])
                    || k.kind().arity() == 1
            );
        }
    }

    #[test]
    fn other_cluster_is_recognised_and_refused() {
        let k = MeshKey::Service {
            cluster: c("c2"),
            service: svc(),
        }
        .to_string();
        assert_eq!(
            MeshKey::parse_for(&k, &c("c1")),
            Err(KeyError::WrongCluster {
                key: k.clone(),
                expected: "c1".into(),
                found: "c2".into()
            })
        );
        assert!(MeshKey::parse_for(&k, &c("c2")).is_ok());
    }

    #[test]
    fn other_version_is_recognised_and_refused() {
        let err = MeshKey::parse("clustermesh/v2/services/c1/default/web").unwrap_err();
        assert!(matches!(err, KeyError::OtherVersion { ref found, .. } if found == "v2"));
        assert!(err.to_string().contains("v2"));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "cilium/state/services/v1/c1/default/web",
                "not a clustermesh key",
            ),
            ("clustermesh/v1/bogus/c1", "unknown kind"),
            ("clustermesh/v1/services/c1/default", "segments"),
            ("clustermesh/v1/services/c1/default/web/extra", "segments"),
            ("clustermesh/v1/services/Bad/default/web", "cluster name"),
            ("clustermesh/v1/services/default/default/web", "reserved"),
            ("clustermesh/v1/services/c1/Default/web", "namespace"),
            ("clustermesh/v1/services/c1/default/", "service name"),
            ("clustermesh/v1/endpoints/c1/default/web/x", "chunk number"),
            (
                "clustermesh/v1/endpoints/c1/default/web/01",
                "leading zeros",
            ),
            ("clustermesh/v1/endpoints/c1/default/web/-1", "chunk number"),
            ("clustermesh/v1/identities/c1/99999999999", "identity"),
            ("clustermesh/v1/ips/c1/10.0.0.256", "ip"),
            ("clustermesh/v1/ips/c1/fd00:0::1", "canonical"),
            ("clustermesh/v1/synced/c1/heartbeat", "sync kind"),
            ("clustermesh/v1/nodes/c1/node_1", "node name"),
            ("clustermesh/v1/remotes/c1/C2", "remote cluster name"),
            ("clustermesh/v1/heartbeat/c1/x", "segments"),
            ("clustermesh/v1/heartbeat", "segments"),
        ];
        for (key, needle) in cases {
            let err = MeshKey::parse(key).expect_err(key).to_string();
            assert!(err.contains(needle), "{key}: {err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn endpoints_prefix_covers_every_chunk_and_no_other_service() {
        let p = MeshKey::endpoints_prefix(&c("c1"), &svc());
        assert_eq!(p, "clustermesh/v1/endpoints/c1/default/web/");
        let chunk = MeshKey::EndpointChunk {
            cluster: c("c1"),
            service: svc(),
            chunk: 0,
        };
        assert!(chunk.to_string().starts_with(&p));
        let other = MeshKey::EndpointChunk {
            cluster: c("c1"),
            service: ServiceName::new("default", "web2").unwrap(),
            chunk: 0,
        };
        assert!(!other.to_string().starts_with(&p));
    }

    #[test]
    fn service_name_from_str() {
        assert_eq!("ns/a".parse::<ServiceName>().unwrap().to_string(), "ns/a");
        assert!(
            "nsa"
                .parse::<ServiceName>()
                .unwrap_err()
                .to_string()
                .contains("NAMESPACE/NAME")
        );
        assert!("ns/A".parse::<ServiceName>().is_err());
        assert!(ServiceName::new("ns", &"a".repeat(64)).is_err());
    }

    proptest! {
        #[test]
        fn prop_round_trip(
            cl in "[a-z][a-z0-9-]{0,30}[a-z0-9]",
            ns in "[a-z][a-z0-9-]{0,20}[a-z0-9]",
            name in "[a-z][a-z0-9-]{0,20}[a-z0-9]",
            chunk in any::<u32>(),
            id in any::<u32>(),
            ip in any::<std::net::IpAddr>(),
        ) {
            prop_assume!(cl != "default");
            let cluster = c(&cl);
            let service = ServiceName::new(&ns, &name).unwrap();
            for k in [
                MeshKey::EndpointChunk { cluster: cluster.clone(), service: service.clone(), chunk },
                MeshKey::Identity { cluster: cluster.clone(), id },
                MeshKey::Ip { cluster: cluster.clone(), ip },
                MeshKey::Import { cluster, service },
            ] {
                prop_assert_eq!(MeshKey::parse(&k.to_string()), Ok(k));
            }
        }

        #[test]
        fn prop_parse_never_panics(s in "clustermesh/v1/[a-z/0-9.:-]{0,40}") {
            let _ = MeshKey::parse(&s);
        }
    }
}
