//! Certificate renewal and root rotation under a running apiserver: when its --tls-dir files
//! change, it reconnects to etcd with the new certificate (and republishes the CA fingerprints),
//! so it keeps publishing after etcd stops trusting the old root. Real etcd with mTLS and auth.

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::{ClusterRequest, Role, RootCa, TrustDomain, Validity};

const T: Duration = Duration::from_secs(60);

async fn published(dir: &mesh_certs::ClusterDir, endpoints: &[String], key: &str) -> bool {
    let Ok(mut c) = mesh_etcd::connect_as(dir, Role::Admin, endpoints).await else {
        return false;
    };
    clustermesh_apiserver::etcd::list_prefix(&mut c, "clustermesh/v1/")
        .await
        .is_ok_and(|(keys, _)| keys.contains_key(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_root_and_reissued_certificates_are_picked_up_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    RootCa::init(
        &ca_dir,
        &TrustDomain::new("mesh.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let issue = || {
        RootCa::load(&ca_dir)
            .unwrap()
            .issue_cluster(&ClusterRequest::new("c1", 1, tmp.path().join("c1")).unwrap())
            .unwrap()
    };
    let dir = issue();
    let mut etcd = mesh_testkit::tls_etcd(&dir, tmp.path()).await;
    let endpoints = etcd.endpoints();
    mesh_etcd::bootstrap_auth(&endpoints, &dir.tls_files(Role::EtcdRoot), &dir.info.name)
        .await
        .unwrap();
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("web.yaml"),
        global_service_yaml("shop", "web", "10.96.0.10"),
    )
    .unwrap();
    let ap = Apiserver::start(&ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: endpoints[0].clone(),
        manifest_dir: manifests.clone(),
        replica: "r1".into(),
        extra: vec![
            "--tls-dir".into(),
            dir.path.display().to_string(),
            "--tls-reload-interval".into(),
            "200ms".into(),
        ],
        log_dir: tmp.path().to_path_buf(),
    });
    ap.wait_ready_leader(T).await;
    assert!(published(&dir, &endpoints, "clustermesh/v1/services/c1/shop/web").await);
    let old_root = dir.ca_fingerprints().unwrap()[0].clone();
    // /metrics names when each certificate it loads expires (read from the files).
    let admin_expiry = |text: &str| -> Option<i64> {
        text.lines()
            .find(|l| {
                l.starts_with("clustermesh_certificate_expiry_timestamp_seconds{")
                    && l.contains("certificate=\"admin\"")
            })?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    let (_, text) = ap.get("/metrics").await.expect("metrics");
    let before = admin_expiry(&text).unwrap_or_else(|| panic!("no admin expiry in\n{text}"));
    assert!(
        text.contains("component=\"clustermesh-apiserver\",certificate=\"intermediate\""),
        "{text}"
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (364..=366).contains(&((before - now) / 86_400)),
        "{before} vs {now}"
    );
    // Renewal moves it forward (certificates have whole seconds: wait one).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Rotate the root, re-issue the cluster from it (etcd's server certificate included) and
    // restart etcd on the bundle of both roots.
    RootCa::rotate(&ca_dir, &Validity::default()).unwrap();
    let dir = issue();
    let (_, text) = ap.get("/metrics").await.expect("metrics");
    let after = admin_expiry(&text).expect("admin expiry");
    assert!(after > before, "re-issued: {before} -> {after}");
    let new_root = RootCa::load(&ca_dir).unwrap().fingerprint().hex();
    assert_ne!(new_root, old_root);
    etcd.restart(Duration::from_secs(30)).await.unwrap();
    eventually(
        T,
        "the apiserver reconnecting with the re-issued certificate",
        || {
            let log = ap.log_text();
            async move { log.contains("TLS files changed").then_some(()) }
        },
    )
    .await;
    // The cluster config it publishes names the new root.
    eventually(T, "the new root in the published cluster config", || {
        let dir = dir.clone();
        let endpoints = endpoints.clone();
        let new_root = new_root.clone();
        async move {
            let mut c = mesh_etcd::connect_as(&dir, Role::Admin, &endpoints)
                .await
                .ok()?;
            let keys = data_keys(&mut c, "c1").await;
            let cc = String::from_utf8_lossy(&keys.get("clustermesh/v1/cluster-config/c1")?.0)
                .into_owned();
            cc.contains(&new_root).then_some(())
        }
    })
    .await;

    // Retire the old root and restart etcd trusting the new one only: the old client certificate
    // would be refused now, and the apiserver still publishes a new service.
    RootCa::retire(&ca_dir, None).unwrap();
    dir.sync_bundle(&mesh_certs::CaDir::new(&ca_dir)).unwrap();
    assert_eq!(dir.ca_fingerprints().unwrap(), vec![new_root.clone()]);
    etcd.restart(Duration::from_secs(30)).await.unwrap();
    std::fs::write(
        manifests.join("more.yaml"),
        global_service_yaml("shop", "more", "10.96.0.11"),
    )
    .unwrap();
    eventually(T, "publishing after the old root was retired", || {
        let dir = dir.clone();
        let endpoints = endpoints.clone();
        async move {
            published(&dir, &endpoints, "clustermesh/v1/services/c1/shop/more")
                .await
                .then_some(())
        }
    })
    .await;
    drop(ap);
}
