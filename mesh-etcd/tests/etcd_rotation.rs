//! Root rotation with overlap against a real etcd: old and new certificates both accepted while the
//! bundle holds both roots, the old refused once retired. etcd 3.4 reads --trusted-ca-file at start
//! only, so the test restarts etcd after each bundle change (and shows why it must).

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::{CertKeyPaths, ClusterDir, Role, RootCa, TlsFiles, TrustBundle, Validity};
use mesh_etcd::Error;
use mesh_etcd::{self as etcd, ClientTrust, EtcdSpec};

#[tokio::test]
async fn rotation_overlaps_then_retire_refuses_the_old_root() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca = init_ca(&ca_dir, "mesh.test");
    let old_root = ca.fingerprint();
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let mut etcd_east = start_etcd(&east, tmp.path()).await;
    let eps = etcd_east.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();

    // Keep the admin certificate of the old root.
    let old_admin = CertKeyPaths {
        cert: tmp.path().join("old-admin.crt"),
        key: tmp.path().join("old-admin.key"),
    };
    std::fs::copy(east.cert(Role::Admin), &old_admin.cert).unwrap();
    std::fs::copy(east.key(Role::Admin), &old_admin.key).unwrap();

    // Rotate: new root current, bundle holds both.
    let rotation = RootCa::rotate(&ca_dir, &Validity::default()).unwrap();
    assert_eq!(rotation.old, old_root);
    assert_eq!(rotation.bundle, vec![rotation.new, old_root]);
    let new_ca = RootCa::load(&ca_dir).unwrap();
    assert_eq!(new_ca.fingerprint(), rotation.new);

    // Re-issue the cluster under the new root (same directory; the bundle copied holds both roots).
    let east = issue(&new_ca, "east", 1, &east.path);
    assert_eq!(
        TrustBundle::load(&east.ca_bundle())
            .unwrap()
            .fingerprints()
            .len(),
        2
    );
    let files = |id: &CertKeyPaths| TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(id.clone()),
    };
    let new_admin = east.cert_key(Role::Admin);

    // etcd still trusts only the old root until it restarts: the new certificate is refused.
    let e = match etcd::connect(&eps, &files(&new_admin)).await {
        Ok(_) => panic!("etcd 3.4 accepted a new-root certificate before re-reading its bundle"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");
    eprintln!("before restart: {e}");

    etcd_east.restart(Duration::from_secs(30)).await.unwrap();
    for (what, id) in [("old", &old_admin), ("new", &new_admin)] {
        let mut c = etcd::connect(&eps, &files(id))
            .await
            .unwrap_or_else(|e| panic!("{what} admin refused during overlap: {e}"));
        c.put(format!("clustermesh/v1/rotation/{what}"), "ok", None)
            .await
            .unwrap_or_else(|e| panic!("{what} admin cannot write during overlap: {e}"));
    }

    // Retire the old root, push the bundle to the cluster, restart etcd.
    let retired = RootCa::retire(&ca_dir, None).unwrap();
    assert_eq!(retired, vec![old_root]);
    east.sync_bundle(new_ca.dir()).unwrap();
    assert_eq!(
        TrustBundle::load(&east.ca_bundle()).unwrap().fingerprints(),
        vec![rotation.new]
    );
    etcd_east.restart(Duration::from_secs(30)).await.unwrap();

    let mut c = etcd::connect(&eps, &files(&new_admin))
        .await
        .expect("new admin after retire");
    c.get("clustermesh/v1/rotation/new", None).await.unwrap();
    let e = match etcd::connect(&eps, &files(&old_admin)).await {
        Ok(_) => panic!("old-root certificate accepted after retire"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("after retire: {msg}");
    assert!(
        msg.contains("old-admin.crt") && msg.contains("retired root"),
        "{msg}"
    );

    // The current root can not be retired.
    let e = RootCa::retire(&ca_dir, Some(&rotation.new.hex()[..8])).unwrap_err();
    assert!(
        e.to_string()
            .contains("refusing to retire the current root"),
        "{e}"
    );
    let _ = ClusterDir::open(&east.path).unwrap();
}

/// The same under per-cluster client trust (`client-ca.pem`): during the overlap the re-issued
/// cluster's etcd accepts leaves of its old and new intermediates; once the old root is retired
/// and the bundle pushed, the old intermediate leaves `client-ca.pem` and its leaves are refused.
#[tokio::test]
async fn retiring_a_root_drops_its_intermediate_from_the_cluster_client_trust() {
    require_etcd();
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca = init_ca(&ca_dir, "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let old_admin = CertKeyPaths {
        cert: tmp.path().join("old-admin.crt"),
        key: tmp.path().join("old-admin.key"),
    };
    std::fs::copy(east.cert(Role::Admin), &old_admin.cert).unwrap();
    std::fs::copy(east.key(Role::Admin), &old_admin.key).unwrap();

    RootCa::rotate(&ca_dir, &Validity::default()).unwrap();
    let new_ca = RootCa::load(&ca_dir).unwrap();
    let east = issue(&new_ca, "east", 1, &east.path);
    let count = |d: &ClusterDir| mesh_certs::files::load_certs(&d.client_ca()).unwrap().len();
    assert_eq!(
        count(&east),
        2,
        "the replaced intermediate stays during the overlap"
    );
    let mut etcd_east = EtcdSpec::for_cluster(
        &east,
        tmp.path().join("etcd-east"),
        format!("https://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    )
    .client_trust(&east, ClientTrust::Cluster)
    .unwrap()
    .spawn(Duration::from_secs(30))
    .await
    .unwrap();
    let eps = etcd_east.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();
    let files = |id: &CertKeyPaths| TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(id.clone()),
    };
    for (what, id) in [("old", &old_admin), ("new", &east.cert_key(Role::Admin))] {
        let mut c = etcd::connect(&eps, &files(id))
            .await
            .unwrap_or_else(|e| panic!("{what} admin refused during overlap: {e}"));
        c.get("clustermesh/v1/", None).await.unwrap();
    }

    RootCa::retire(&ca_dir, None).unwrap();
    let dropped = east.sync_bundle(new_ca.dir()).unwrap();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(count(&east), 1);
    etcd_east.restart(Duration::from_secs(30)).await.unwrap();
    etcd::connect(&eps, &files(&east.cert_key(Role::Admin)))
        .await
        .expect("new admin after retire");
    match etcd::connect(&eps, &files(&old_admin)).await {
        Ok(_) => panic!("a leaf of the retired root's intermediate accepted after retire"),
        Err(e) => assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}"),
    }
    // Pushing the bundle again drops nothing more: the current intermediate always stays.
    assert!(east.sync_bundle(new_ca.dir()).unwrap().is_empty());
    assert_eq!(count(&east), 1);
}
