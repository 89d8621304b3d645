//! A multi-cluster lab on one Linux host: network namespaces, real etcd, fault injection.
