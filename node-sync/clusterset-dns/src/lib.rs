//! `clusterset.local` DNS for node-sync: the Kubernetes Multi-Cluster Services names (KEP-1645,
//! specification.md), answered from what node-sync knows about usable and local backends.
//!
//! node-sync keeps a [`Zone`] snapshot on a `tokio::sync::watch` channel; [`DnsServer`] serves it over
//! UDP and TCP with hickory-server. [`resolve`] is the pure answer function every rule is tested on.

pub mod server;
pub mod zone;

pub use server::{ClustersetDns, DnsConfig, DnsMetrics, DnsServer};
pub use zone::{DnsEndpoint, DnsService, Resolution, Zone, resolve};
