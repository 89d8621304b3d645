//! A multi-cluster lab on one Linux host: network namespaces, real etcd, fault injection.
//!
//! [`Lab::up`] builds N clusters of M nodes as network namespaces joined through a router namespace (see
//! [`plan`] for the layout and addresses). Each cluster has its own /24, a control-plane namespace running a real
//! etcd, and a cgroup v2 directory per node. Tests start processes inside a node ([`Lab::spawn_in_node`],
//! [`Lab::node_command`]) — in its namespace and cgroup — and inject faults between clusters: [`Lab::partition`]
//! / [`Lab::heal`] (nft in the router), [`Lab::set_latency_loss`] / [`Lab::clear_impairment`] (a user-space delay
//! line behind policy routing, see [`impair`]), and
//! etcd crashes and restarts ([`Lab::kill_etcd`], [`Lab::restart_etcd`]).
//!
//! Everything is recorded in a state file (`/run/mesh-lab/<prefix>/state.json`), so `mesh-lab down` and `status`
//! work from another process and the next `up` with the same prefix cleans up after a crashed run. Dropping a
//! [`Lab`] removes all of it: processes by PID and by cgroup, namespaces, cgroups, the state directory. Labs with
//! different prefixes get different address ranges (`10.<octet>.0.0/16`, allocated under a lock) and never
//! collide, so tests may run concurrently. Needs root, iproute2, nftables, util-linux and etcd.

pub mod cgroup;
mod cmd;
pub mod error;
mod etcd;
pub mod impair;
mod lab;
mod net;
pub mod plan;
pub mod process;
pub mod state;

pub use error::{LabError, Result};
pub use lab::{ClusterRef, Lab, LabStatus};
pub use plan::{ClusterInfo, EtcdInfo, EtcdSecurity, EtcdTlsFiles, LabPlan, LabSpec, NodeInfo};
pub use process::LabProcess;
pub use state::{Impairment, ImpairmentRecord};
