//! Shared helpers for the integration tests: a CA, issued clusters and real etcd processes.
#![allow(dead_code)]

use std::path::Path;

use mesh_certs::{ClusterDir, ClusterRequest, RootCa, TrustDomain, Validity};
use mesh_etcd::EtcdProcess;
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

#[allow(unused_imports)]
pub use mesh_testkit::{free_port, require_etcd};

pub fn name(s: &str) -> ClusterName {
    ClusterName::new(s).expect("valid cluster name")
}

pub fn init_ca(dir: &Path, td: &str) -> RootCa {
    RootCa::init(dir, &TrustDomain::new(td).unwrap(), &Validity::default()).expect("ca init")
}

pub fn issue(ca: &RootCa, cluster: &str, id: u32, out: &Path) -> ClusterDir {
    ca.issue_cluster(&ClusterRequest {
        cluster: name(cluster),
        id: ClusterId::new(id, MaxConnectedClusters::DEFAULT).unwrap(),
        out: out.to_owned(),
        sans: vec![],
        validity: Validity::default(),
    })
    .expect("issue cluster")
}

/// Start a single-member etcd for `dir` with data under `work` (as production starts it).
pub async fn start_etcd(dir: &ClusterDir, work: &Path) -> EtcdProcess {
    mesh_testkit::tls_etcd(dir, work).await
}
