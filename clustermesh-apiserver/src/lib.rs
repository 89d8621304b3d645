//! Per-cluster API server: publishes global services, endpoints, identities and nodes into etcd.
//!
//! Sources (a manifest directory or the Kubernetes API, [`source`]) feed [`objects::SourceObject`]s into the pure
//! [`index::MeshIndex`], which computes the desired keys and values of this cluster under `clustermesh/v1/`.
//! The [`publisher`] reconciles etcd against that through the [`writer`]: it puts only what changed, deletes only
//! what vanished (and only after every source synced once), writes sync canaries and a heartbeat, and only while it
//! holds the leader lease ([`leader`]), so several replicas can run side by side. [`status`] serves `/healthz`,
//! `/readyz`, `/metrics` and `/api/v1/status`.

pub mod args;
pub mod etcd;
pub mod index;
pub mod kvstoremesh;
pub mod leader;
pub mod managed;
pub mod mesh_api;
pub mod objects;
pub mod publisher;
pub mod run;
pub mod source;
pub mod status;
pub mod writer;

pub use args::{Args, LogFormat, SourceKind};
