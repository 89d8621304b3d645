//! eBPF socket load-balancer programs (cgroup `sock_addr` hooks).
//!
//! Built for `bpfel-unknown-none` by `global-lb-bpf`'s `build.rs` (aya-build, nightly). On any
//! other target this is an empty binary, so `cargo clippy --workspace` works on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no compare-and-swap on the atomic types; the intrinsic compiles to the
// BPF_CMPXCHG instruction (kernel 5.12+).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
