//! Per-cluster API server: publishes global services, endpoints, identities and nodes into etcd.
//!
//! Sources (a manifest directory or the Kubernetes API) feed [`objects::SourceObject`]s into the pure
//! [`index::MeshIndex`], which computes the desired keys and values of this cluster under `clustermesh/v1/`.
//! The etcd writer ([`writer`]) reconciles etcd against that: it puts only what changed, deletes only what vanished
//! (and only after every source synced once), writes sync canaries and a heartbeat, and only while it holds the
//! leader lease ([`leader`]), so several replicas can run side by side.

pub mod index;
pub mod objects;
