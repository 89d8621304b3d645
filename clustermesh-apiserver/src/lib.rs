//! Per-cluster API server: publishes global services, endpoints, identities and nodes into etcd.
//!
//! Sources (a manifest directory or the Kubernetes API, [`source`]) feed [`objects::SourceObject`]s into the pure
//! [`index::MeshIndex`], which computes the desired keys and values of this cluster under `clustermesh/v1/`.
//! The [`publisher`] reconciles etcd against that through the [`writer`]: it puts only what changed, deletes only
//! what vanished (and only after every source synced once), writes sync canaries and a heartbeat, and only while it
//! holds the leader lease ([`leader`]), so several replicas can run side by side. [`status`] serves `/healthz`,
//! `/readyz`, `/metrics` and `/api/v1/status`.
//!
//! Without `--etcd-endpoints` the apiserver runs its own etcd ([`managed`]); with `--kvstoremesh` the leader also
//! mirrors every remote cluster listed under `remotes/<self>/` into the local etcd ([`kvstoremesh`]).
//!
//! Guarantees, each covered by a test against a real etcd (`tests/`):
//! - one endpoint change rewrites exactly one endpoint chunk key; a restart or a leader change rewrites nothing
//!   that is already right; nothing is deleted before every source synced; sync canaries are written only after
//!   the whole first write (a kill during it leaves none);
//! - an object that is invalid (bad annotation, no ports, ...) or a manifest file that does not parse is skipped
//!   and reported (log, `/metrics`, `/api/v1/status` naming the object or `file:line`); the rest stays published;
//! - keys under this cluster's prefixes changed by someone else are repaired (own writes are told apart by
//!   revision).
//!
//! ClusterSetIP imports (with `--clusterset-cidr`) are allocated for the global services of other clusters whose
//! `services/<peer>/...` keys are in the local etcd, which is the case in KVStoreMesh mode (the apiserver does not
//! open connections to remote etcds for imports otherwise). An import is kept for the life of the remote
//! service, and seeded from etcd at start, so its address survives restarts and is never given to two services.

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
