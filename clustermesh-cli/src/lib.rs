//! The `clustermesh` command's library: the commands that talk to a running mesh (`connect`,
//! `disconnect`, `status`, through gRPC or the Kubernetes API). The
//! binary (`src/main.rs`) is a thin clap shell over it; its `demo`, `drill` and `workload`
//! subcommands run the lab harness of `mesh_lab` (`mesh`, `demo`, `drill`, `workload`).

pub mod connect;
pub mod kube_connect;
