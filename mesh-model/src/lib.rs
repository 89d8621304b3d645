//! Pure domain model of ClusterMesh.
//!
//! Everything the other crates agree on lives here, with no I/O and no async runtime:
//! the rules for cluster names and ids ([`cluster`]), the etcd key layout as typed builders
//! and parsers ([`keys`]), the values stored under those keys with their JSON codecs and
//! validation against the key ([`values`]), stable endpoint chunking ([`chunking`]), the
//! Service annotations that make a service global ([`annotations`]), and the files that register a
//! remote cluster with node-sync ([`remotes`]).

pub mod annotations;
pub mod chunking;
pub mod cluster;
pub mod keys;
pub mod remotes;
pub mod status;
pub mod values;

pub use cluster::{ClusterId, ClusterName, ClusterRuleError, MaxConnectedClusters};
