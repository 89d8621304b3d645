//! The Helm chart in `helm/clustermesh`, rendered by the real `helm` (v4) with its default values
//! and every example values file, and checked the way an operator would, one module per concern.
//! The modules form one test binary, so the workspace links this crate's tests once; the helpers
//! they share are in the crate's library (`chart_tests`).
//!
//! Needs `helm` (v4) and `shellcheck` on PATH: `scripts/install-helm.sh` installs both.

mod certs;
mod kind;
mod node_sync_daemonset;
mod notes_and_dashboard;
mod rbac;
mod rendering;
mod routing;
mod schema;
mod shell_scripts;
