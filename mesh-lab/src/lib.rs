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
//!
//! etcd runs with TLS and client-certificate auth by default: [`Lab::up`] makes a root CA per lab and a
//! certificate directory per cluster with `mesh_certs` ([`Lab::cluster_certs`]), and bootstraps the etcd users
//! `root`, `admin-<cluster>` and `node-<cluster>`; [`Lab::add_remote_user`] adds `remote-<peer>`.
//! [`EtcdSecurity::Plain`] gives plain HTTP for tests that ask for it.
//!
//! With [`LabSpec::with_pods`] every node gets a pod CIDR and a pod (a namespace behind the node, [`Lab::pod`],
//! [`Lab::pod_command`]); the router never routes pod CIDRs, so pods of other clusters are reached only through
//! node-sync's `--routing`. [`Underlay::Switched`] puts all clusters on one bridge, for `--routing native`.
//!
//! # The mesh on the lab
//!
//! On top of the lab, [`mesh::LabMesh`] deploys the whole mesh (an apiserver per cluster, a node-sync
//! and an identity backend per node, a global service); [`workload`] is the backend and the probe that
//! run inside nodes (`clustermesh workload`), [`drill`] turns the probe's samples into failover and
//! failback times, and [`demo`] is `clustermesh demo`: two clusters, connected, two failover drills.
//! `clustermesh demo`, `drill` and `workload`, the lab end-to-end tests, the chaos scenarios and the
//! failover bench all use these.
//!
//! # In an end-to-end test
//!
//! ```no_run
//! use std::process::{Command, Stdio};
//! use std::time::Duration;
//! use mesh_lab::{Lab, LabSpec};
//!
//! let lab = Lab::up(LabSpec::new("e2e-failover", 2, 2))?; // a unique prefix per test
//! lab.add_all_remote_users()?;
//! let certs = lab.cluster_certs(1)?.expect("TLS lab");
//! // node-sync on c1/n1: its own etcd and c2's, attached to the node's cgroup, maps pinned in the node's bpffs dir
//! let node = lab.node(1, 1)?.clone();
//! let mut cmd = lab.node_command(1, 1, "/path/to/node-sync")?;
//! cmd.arg("--cgroup").arg(&node.cgroup)
//!     .arg("--bpffs").arg(&node.bpffs)
//!     .arg("--local-etcd").arg(lab.etcd_endpoint(1)?)
//!     .arg("--remote-etcd").arg(lab.etcd_endpoint(2)?)
//!     .arg("--certs").arg(&certs.path)
//!     .stdout(Stdio::piped());
//! let mut node_sync = lab.spawn(cmd)?;
//! // faults
//! lab.partition(1, 2)?;
//! lab.heal(1, 2)?;
//! lab.set_latency_loss(1, 2, Duration::from_millis(50), 1.0)?;
//! lab.clear_impairment(1, 2)?;
//! lab.kill_etcd(2)?;
//! lab.start_etcd(2)?;
//! node_sync.stop()?; // SIGTERM, then SIGKILL after a grace period
//! # Ok::<(), mesh_lab::LabError>(())
//! // dropping `lab` removes everything
//! ```

pub mod cgroup;
mod cmd;
pub mod demo;
pub mod drill;
pub mod error;
mod etcd;
pub mod impair;
mod lab;
pub mod mesh;
mod net;
pub mod plan;
pub mod process;
pub mod state;
pub mod workload;

pub use error::{LabError, Result};
pub use etcd::MemberStatus;
pub use lab::{ClusterRef, Lab, LabStatus};
pub use nix::sys::signal::Signal;
pub use plan::{
    ClusterInfo, EtcdInfo, EtcdMember, EtcdSecurity, LabEtcdTls, LabPlan, LabSpec, NodeInfo,
    PodInfo, Underlay,
};
pub use process::LabProcess;
pub use state::{Impairment, ImpairmentRecord};
