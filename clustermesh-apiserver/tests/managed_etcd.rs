//! Managed etcd: without --etcd-endpoints the apiserver starts its own etcd with the secure bootstrap (mTLS,
//! users and roles, auth on), publishes into it as admin-<cluster>, and restarts it when it dies.

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::{ClusterRequest, Role, RootCa, TrustDomain, Validity};

const T: Duration = Duration::from_secs(60);

fn etcd_children(pid: u32) -> Vec<u32> {
    // Children of every thread (the etcd child may be spawned from any tokio worker).
    let mut all: Vec<u32> = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        all.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    all.into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "etcd")
                .unwrap_or(false)
                && !std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_etcd_is_secure_published_into_and_restarted() {
    assert!(
        std::path::Path::new(ETCD).exists(),
        "{ETCD} is missing: install Debian's etcd-server"
    );
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("mesh.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let dir = ca
        .issue_cluster(&ClusterRequest::new("c1", 1, tmp.path().join("c1")).unwrap())
        .unwrap();
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("svc.yaml"),
        global_service_yaml("shop", "web", "10.96.0.10"),
    )
    .unwrap();
    let client_url = format!("https://127.0.0.1:{}", free_port());
    let peer_url = format!("http://127.0.0.1:{}", free_port());
    let ap = Apiserver::start(&ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: String::new(),
        manifest_dir: manifests.clone(),
        replica: "r1".into(),
        extra: vec![
            "--tls-dir".into(),
            dir.path.display().to_string(),
            "--data-dir".into(),
            tmp.path().join("data").display().to_string(),
            "--managed-etcd-client-url".into(),
            client_url.clone(),
            "--managed-etcd-peer-url".into(),
            peer_url,
        ],
        log_dir: tmp.path().to_path_buf(),
    });
    ap.wait_ready_leader(T).await;
    let endpoints = vec![client_url.clone()];
    let mut admin = mesh_etcd::connect_as(&dir, Role::Admin, &endpoints)
        .await
        .unwrap();
    let keys = data_keys(&mut admin, "c1").await;
    assert!(
        keys.contains_key("clustermesh/v1/services/c1/shop/web"),
        "{keys:?}"
    );
    let cc = String::from_utf8_lossy(&keys["clustermesh/v1/cluster-config/c1"].0).into_owned();
    let fp = dir.ca_fingerprints().unwrap();
    assert!(cc.contains(&fp[0]), "cluster config names the CA: {cc}");
    // Secure: without a client certificate etcd refuses; the node user may not write.
    let plain = mesh_certs::TlsFiles {
        ca_bundle: dir.ca_bundle(),
        identity: None,
    };
    assert!(mesh_etcd::connect(&endpoints, &plain).await.is_err());
    let mut node = mesh_etcd::connect_as(&dir, Role::Node, &endpoints)
        .await
        .unwrap();
    assert!(
        node.put("clustermesh/v1/services/c1/shop/x", "x", None)
            .await
            .is_err()
    );

    // Kill the etcd child: the apiserver restarts it and keeps publishing.
    let kids = etcd_children(ap.child.id());
    assert_eq!(kids.len(), 1, "one etcd child");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = std::time::Instant::now() + T;
    loop {
        let k = etcd_children(ap.child.id());
        if k.len() == 1 && k[0] != kids[0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new etcd child; apiserver log:\n{}",
            ap.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(
        manifests.join("more.yaml"),
        global_service_yaml("shop", "more", "10.96.0.11"),
    )
    .unwrap();
    eventually(T, "publishing after the etcd restart", || {
        let dir = dir.clone();
        let endpoints = endpoints.clone();
        async move {
            let mut c = mesh_etcd::connect_as(&dir, Role::Admin, &endpoints)
                .await
                .ok()?;
            let keys =
                clustermesh_apiserver::etcd::list_prefix(&mut c, "clustermesh/v1/services/c1/")
                    .await
                    .ok()?
                    .0;
            (keys.contains_key("clustermesh/v1/services/c1/shop/more")
                && keys.contains_key("clustermesh/v1/services/c1/shop/web"))
            .then_some(())
        }
    })
    .await;
}
