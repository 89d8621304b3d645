//! Tests of the Helm chart in `helm/clustermesh` (no library code: everything is in `tests/chart.rs`).
//!
//! They run the real `helm` (v4; `scripts/install-helm.sh` installs it) to lint and render the chart
//! with its default values and with every file under `helm/clustermesh/examples/`, then check the
//! rendered manifests: node-sync mounts bpffs and cgroup v2 and runs privileged, RBAC grants only
//! read access to the kinds the apiserver's Kubernetes source watches, TLS Secrets are mounted where
//! `--tls-dir` points, the values schema refuses bad cluster ids and names, and every rendered
//! container's arguments are accepted by the binary's own argument parser
//! (`clustermesh_apiserver::Args`, `node_sync::Args`), so chart and binaries cannot drift apart.
//! The shell scripts of `kind-multicluster/` and `scripts/install-helm.sh`, and the scripts embedded
//! in the chart, are checked with `bash -n` and shellcheck.
