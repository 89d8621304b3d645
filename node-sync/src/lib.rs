//! Node agent: merges the backends of every connected cluster into the eBPF socket load-balancer maps.
//!
//! The core is pure and synchronous: the [`index::MergeIndex`] turns the keys read from every
//! cluster's etcd into the backends of each local frontend by DESIGN.md's selection rules, and the
//! [`lb::Reconciler`] writes the difference to a [`lb::MapWriter`]. Around it sit thin shells:
//! cluster connections ([`cluster`]: etcd list/watch with reconnects and liveness), the health
//! checker ([`health`]) and its [`publish`]er, passive failure detection from the kernel's view of
//! each connect ([`passive`]), the [`agent`] task that owns the index and the map writer and
//! publishes a [`snapshot::Snapshot`] after every batch, and the [`status`] server that reads only
//! those snapshots. [`readiness`] is the one state `/readyz` answers from; [`run`] is the binary's
//! wiring.

pub mod agent;
pub mod args;
pub mod cluster;
pub mod connect;
pub mod datapath;
pub mod health;
pub mod index;
pub mod lb;
pub mod passive;
pub mod publish;
pub mod reach;
pub mod readiness;
pub mod routing;
mod run;
pub mod snapshot;
pub mod sockdestroy;
pub mod status;
pub mod watch;

pub use run::run;
