//! Shared helpers for the integration tests: a CA, issued clusters and real etcd processes (the
//! workspace's test kit).
#![allow(unused_imports)]

pub use mesh_testkit::{free_port, init_ca, issue, name, require_etcd, tls_etcd as start_etcd};
