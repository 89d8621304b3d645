//! Per-cluster API server: publishes global services, endpoints, identities and nodes into etcd.
