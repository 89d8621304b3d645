//! The `clustermesh` command's library: the commands that talk to a running mesh (`connect`,
//! `disconnect`, `status`, through gRPC or the Kubernetes API). The
//! binary (`src/main.rs`) is a thin clap shell over it; its `demo`, `drill` and `workload`
//! subcommands run the lab harness of `mesh_lab` (`mesh`, `demo`, `drill`, `workload`).

pub mod connect;
pub mod kube_connect;

/// A duration flag (`500ms`, `30s`, `2m`), with an error that says what was wrong.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 500ms, 30s, 2m): {e}"))
}
