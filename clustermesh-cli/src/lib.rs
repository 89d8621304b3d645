//! The `clustermesh` command's library: drill workloads and analysis, and the commands that talk to a
//! running mesh. The binary (`src/main.rs`) is a thin clap shell over it.

pub mod connect;
pub mod demo;
pub mod drill;
pub mod kube_connect;
pub mod labmesh;
pub mod workload;

/// A duration flag (`500ms`, `30s`, `2m`), with an error that says what was wrong.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 500ms, 30s, 2m): {e}"))
}
