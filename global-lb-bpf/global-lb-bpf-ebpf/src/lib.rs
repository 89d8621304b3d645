//! eBPF socket load-balancer programs.
