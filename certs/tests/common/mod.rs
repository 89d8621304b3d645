//! Shared helpers for the integration tests: a CA, issued clusters and real etcd processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_certs::etcd::{EtcdProcess, EtcdSpec};
use mesh_certs::{ClusterDir, ClusterRequest, RootCa, TrustDomain, Validity};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

/// A TCP port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Fail with a clear message when etcd is not installed.
pub fn require_etcd() {
    assert!(
        Path::new(mesh_certs::etcd::DEFAULT_ETCD_BINARY).exists(),
        "these tests need etcd at {} (Debian package etcd-server)",
        mesh_certs::etcd::DEFAULT_ETCD_BINARY
    );
}

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

/// Start a single-member etcd for `dir` with data under `work`.
pub async fn start_etcd(dir: &ClusterDir, work: &Path) -> EtcdProcess {
    require_etcd();
    let client = format!("https://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let data: PathBuf = work.join(format!("etcd-{}", dir.info.name));
    EtcdSpec::for_cluster(dir, data, client, peer)
        .spawn(Duration::from_secs(30))
        .await
        .expect("etcd starts with TLS and --client-cert-auth")
}
