//! The Kubernetes objects the apiserver reads, as one enum, whichever source they come from.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// API group of the Multi-Cluster Services API.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// apiVersion of the `ServiceExport` we read.
pub const SERVICE_EXPORT_API_VERSION: &str = "multicluster.x-k8s.io/v1alpha1";

/// An MCS `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`): its existence marks the Service of the same
/// namespace and name as global. Only the metadata matters to us.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExport {
    /// Standard object metadata (namespace and name name the exported Service).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Status as written by an MCS controller; kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// The kinds of objects the index reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ObjectKind {
    /// core/v1 Service
    Service,
    /// discovery.k8s.io/v1 EndpointSlice
    EndpointSlice,
    /// core/v1 Pod
    Pod,
    /// core/v1 Namespace
    Namespace,
    /// core/v1 Node
    Node,
    /// multicluster.x-k8s.io/v1alpha1 ServiceExport
    ServiceExport,
}

impl ObjectKind {
    /// Every kind, in the order sources list them.
    pub const ALL: [ObjectKind; 6] = [
        ObjectKind::Namespace,
        ObjectKind::Node,
        ObjectKind::Service,
        ObjectKind::ServiceExport,
        ObjectKind::EndpointSlice,
        ObjectKind::Pod,
    ];

    /// The Kubernetes `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Pod => "Pod",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Node => "Node",
            ObjectKind::ServiceExport => "ServiceExport",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, ObjectKind::Namespace | ObjectKind::Node)
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Kind of the object.
    pub kind: ObjectKind,
    /// Namespace; empty for Namespaces and Nodes.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind` `namespace/name`.
    pub fn new(kind: ObjectKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of a kind the index reads.
// The variants are the Kubernetes types as they are; boxing them would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SourceObject {
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A Pod.
    Pod(Pod),
    /// A Namespace.
    Namespace(Namespace),
    /// A Node.
    Node(Node),
    /// An MCS ServiceExport.
    ServiceExport(ServiceExport),
}

impl SourceObject {
    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            SourceObject::Service(o) => &o.metadata,
            SourceObject::EndpointSlice(o) => &o.metadata,
            SourceObject::Pod(o) => &o.metadata,
            SourceObject::Namespace(o) => &o.metadata,
            SourceObject::Node(o) => &o.metadata,
            SourceObject::ServiceExport(o) => &o.metadata,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            SourceObject::Service(_) => ObjectKind::Service,
            SourceObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            SourceObject::Pod(_) => ObjectKind::Pod,
            SourceObject::Namespace(_) => ObjectKind::Namespace,
            SourceObject::Node(_) => ObjectKind::Node,
            SourceObject::ServiceExport(_) => ObjectKind::ServiceExport,
        }
    }

    /// The reference naming this object. Namespaced objects without a namespace are taken to be in `default`,
    /// as `kubectl apply` does.
    pub fn object_ref(&self) -> ObjectRef {
        let m = self.metadata();
        let kind = self.kind();
        let namespace = if kind.namespaced() {
            m.namespace.clone().unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        ObjectRef {
            kind,
            namespace,
            name: m.name.clone().unwrap_or_default(),
        }
    }

    /// Fills in the `default` namespace on namespaced objects that have none (manifest files usually omit it).
    pub fn with_default_namespace(mut self) -> Self {
        if self.kind().namespaced() {
            let m = match &mut self {
                SourceObject::Service(o) => &mut o.metadata,
                SourceObject::EndpointSlice(o) => &mut o.metadata,
                SourceObject::Pod(o) => &mut o.metadata,
                SourceObject::ServiceExport(o) => &mut o.metadata,
                SourceObject::Namespace(o) => &mut o.metadata,
                SourceObject::Node(o) => &mut o.metadata,
            };
            if m.namespace.as_deref().unwrap_or("").is_empty() {
                m.namespace = Some("default".to_owned());
            }
        }
        self
    }

    /// Reads one object from its JSON/YAML value by `apiVersion` and `kind`. `Ok(None)` for kinds the index does
    /// not read (Deployments, ConfigMaps, ...); an error when the kind is ours but the object does not parse.
    pub fn from_value(value: serde_json::Value) -> Result<Option<Self>, String> {
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let parse = |v: serde_json::Value| -> Result<Option<SourceObject>, String> {
            let obj = match (api.as_str(), kind.as_str()) {
                ("v1", "Service") => SourceObject::Service(from(v)?),
                ("v1", "Pod") => SourceObject::Pod(from(v)?),
                ("v1", "Namespace") => SourceObject::Namespace(from(v)?),
                ("v1", "Node") => SourceObject::Node(from(v)?),
                ("discovery.k8s.io/v1", "EndpointSlice") => SourceObject::EndpointSlice(from(v)?),
                (SERVICE_EXPORT_API_VERSION, "ServiceExport") => {
                    SourceObject::ServiceExport(from(v)?)
                }
                _ => return Ok(None),
            };
            Ok(Some(obj.with_default_namespace()))
        };
        let obj = parse(value)?;
        if let Some(o) = &obj
            && o.metadata().name.as_deref().unwrap_or("").is_empty()
        {
            return Err(format!("{} without metadata.name", o.kind()));
        }
        Ok(obj)
    }
}

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}
