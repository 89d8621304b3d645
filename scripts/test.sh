#!/usr/bin/env bash
# The test command: setup, formatting, lints, then every test of the workspace
# (root, etcd, eBPF and lab tests included; they need root and run for real).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# setup.sh installs what is missing, then checks every promise (each program at its version, protoc's
# well-known types, mounts) and stops here naming the package that brings a missing piece.
bash scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

echo "[test] shellcheck scripts/*.sh"
shellcheck scripts/*.sh .ci/run

echo "[test] cargo fmt --check"
cargo fmt --all -- --check

echo "[test] cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "[test] cargo nextest"
# The eBPF program crate only builds for the bpf target (global-lb-bpf builds it through aya-build).
cargo nextest run --workspace --exclude global-lb-bpf-ebpf --no-fail-fast "$@"
