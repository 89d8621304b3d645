//! Support for the tests of the Helm chart in `helm/clustermesh`; the tests themselves are under
//! `tests/chart/`, one module per concern of the chart, all in one test binary (one link, not one
//! per file):
//!
//! - `rendering.rs`: `helm lint` and `helm template` with the default values and every example,
//!   the rendered objects as Kubernetes sees them, and the binaries' own parsers on what is rendered;
//! - `schema.rs`: the values schema and the chart's own checks refuse settings that cannot work;
//! - `rbac.rs`: RBAC and ServiceAccounts;
//! - `node_sync_daemonset.rs`: node-sync's DaemonSet (bpffs, cgroup v2, remotes, DNS);
//! - `certs.rs`: the certificate modes, the certgen Job and renewal CronJob scripts run for real,
//!   and the managed etcd on the certificates the chart issues;
//! - `notes_and_dashboard.rs`: the install NOTES and the Grafana dashboard;
//! - `shell_scripts.rs`: `bash -n` and shellcheck on every script, in the repository and the chart;
//! - `kind.rs`: `kind-multicluster/` against the chart, driven through stand-ins, and the images it builds.
//!
//! They run the real `helm` (v4) and `shellcheck`: `scripts/install-helm.sh` installs both. This
//! library holds what several of those files share: running helm and parsing what it renders
//! ([`helm`], [`manifest`]), the binaries' argument parsers on rendered args ([`binaries`]), a
//! stand-in for the Kubernetes Secrets API ([`fake_secrets_api`]) and scratch directories
//! ([`scratch`]).

pub mod binaries;
pub mod fake_secrets_api;
pub mod helm;
pub mod manifest;
pub mod scratch;
