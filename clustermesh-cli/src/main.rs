//! The clustermesh command: ca, certs, connect, disconnect, status, drill, demo.

fn main() {}
