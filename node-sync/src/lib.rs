//! Node agent: merges the backends of every connected cluster into the eBPF socket load-balancer maps.
