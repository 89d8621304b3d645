//! Map layouts shared by the eBPF programs and the loader.
