//! The `clustermesh` command's library: drill workloads and analysis, and the commands that talk to a
//! running mesh. The binary (`src/main.rs`) is a thin clap shell over it.

pub mod connect;
pub mod demo;
pub mod drill;
pub mod kube_connect;
pub mod labmesh;
pub mod workload;
