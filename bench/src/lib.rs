//! Benchmarks that print the figures of DESIGN.md's performance targets.
