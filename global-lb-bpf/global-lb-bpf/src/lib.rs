//! Loader and typed map API for the global service socket load balancer.
//!
//! The datapath is a set of cgroup `sock_addr` eBPF programs (crate `global-lb-bpf-ebpf`): a
//! process in the cgroup that connects (or sends a datagram) to a service address is sent, inside
//! the kernel and at connect time, to one of the service's backends, with no proxy and no
//! per-packet cost; replies and `getpeername` show the service address.
//!
//! This crate loads those programs, attaches them to a cgroup v2 directory, pins maps and links
//! under a bpffs directory so they outlive the process ([`Datapath::open`] reuses them on a
//! restart) and offers the typed API node-sync writes through:
//!
//! ```no_run
//! use global_lb_bpf::{Backend, Datapath, DatapathConfig, Frontend, Proto, ServiceMaps};
//! # fn main() -> Result<(), global_lb_bpf::Error> {
//! let mut dp = Datapath::open(&DatapathConfig::new(
//!     "/sys/fs/cgroup/unified/pods",
//!     "/sys/fs/bpf/clustermesh",
//! ))?;
//! let vip = Frontend::new("10.96.0.10".parse().unwrap(), 80, Proto::Tcp);
//! dp.upsert_service(&vip, &[Backend::new("10.1.0.5".parse().unwrap(), 8080, 1).with_local(true)])?;
//! for c in dp.counters()? {
//!     println!("{}:{} cluster {} -> {} connections", c.addr, c.port, c.cluster_id, c.connections);
//! }
//! # Ok(()) }
//! ```
//!
//! [`ServiceMaps`] is the seam: [`Datapath`] writes the kernel maps, [`FakeMaps`] runs the same
//! update logic over in-memory maps for tests.

pub mod conn_table;
mod datapath;
mod error;
mod maps;
mod model;
pub mod mounts;
pub mod signals;
pub mod store;

pub use conn_table::ConnTable;
pub use datapath::{
    Datapath, DatapathConfig, DatapathView, EBPF_OBJECT, PROGRAMS, ProgramStats, RunStats,
};
pub use error::Error;
pub use global_lb_bpf_common::{DEFAULT_MAX_BACKENDS, LIMIT_MAX_BACKENDS, MIN_MAX_BACKENDS};
pub use maps::{FakeMaps, LbMaps, ServiceMaps};
pub use model::{Backend, BackendCounter, BackendEntry, Frontend, Proto, Service};

#[cfg(test)]
mod tests {
    /// node-sync keeps the datapath in an async task: it must be movable across threads.
    #[test]
    fn datapath_and_fake_are_send() {
        fn send<T: Send>() {}
        send::<crate::Datapath>();
        send::<crate::FakeMaps>();
        send::<crate::DatapathView>();
    }
}
