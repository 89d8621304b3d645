//! `clustermesh ca rotate` / `ca retire` against a real etcd with --client-cert-auth: certificates
//! of the old and the new root are both accepted while the bundle holds both, the old one is refused
//! after `ca retire`. etcd 3.4 reads --trusted-ca-file at start, so etcd is restarted after each
//! bundle change, as the command's output tells the user to.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_certs::{CertKeyPaths, ClusterDir, Role, TlsFiles};
use mesh_etcd as etcd;
use mesh_etcd::Error;

fn clustermesh(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .output()
        .expect("run clustermesh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "clustermesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn rotate_and_retire_with_the_cli_against_etcd() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let east_dir = tmp.path().join("east");
    clustermesh(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--out",
        p(&ca),
    ]);
    let issue = || {
        clustermesh(&[
            "ca",
            "issue-cluster",
            "--ca",
            p(&ca),
            "--cluster",
            "east",
            "--id",
            "1",
            "--out",
            p(&east_dir),
        ])
    };
    issue();
    let east = ClusterDir::open(&east_dir).unwrap();

    let mut etcd_east = mesh_testkit::tls_etcd(&east, tmp.path()).await;
    let eps = etcd_east.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();

    let old_admin = CertKeyPaths {
        cert: tmp.path().join("old-admin.crt"),
        key: tmp.path().join("old-admin.key"),
    };
    std::fs::copy(east.cert(Role::Admin), &old_admin.cert).unwrap();
    std::fs::copy(east.key(Role::Admin), &old_admin.key).unwrap();

    let out = clustermesh(&[
        "ca",
        "rotate",
        "--ca",
        p(&ca),
        "--cluster-dir",
        p(&east_dir),
    ]);
    assert!(out.contains("now holds 2 CA(s)"), "{out}");
    issue();
    etcd_east.restart(Duration::from_secs(30)).await.unwrap();

    let files = |id: &CertKeyPaths| TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(id.clone()),
    };
    let new_admin = east.cert_key(Role::Admin);
    for (what, id) in [("old", &old_admin), ("new", &new_admin)] {
        let mut c = etcd::connect(&eps, &files(id))
            .await
            .unwrap_or_else(|e| panic!("{what}-root admin refused during the overlap: {e}"));
        c.put(format!("clustermesh/v1/rotation/{what}"), "ok", None)
            .await
            .unwrap_or_else(|e| panic!("{what}-root admin cannot write: {e}"));
    }

    let out = clustermesh(&[
        "ca",
        "retire",
        "--ca",
        p(&ca),
        "--cluster-dir",
        p(&east_dir),
    ]);
    assert!(out.contains("Retired root"), "{out}");
    etcd_east.restart(Duration::from_secs(30)).await.unwrap();

    etcd::connect(&eps, &files(&new_admin))
        .await
        .expect("new-root admin after retire");
    match etcd::connect(&eps, &files(&old_admin)).await {
        Ok(_) => panic!("old-root admin accepted after ca retire"),
        Err(e) => {
            assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");
            assert!(e.to_string().contains("old-admin.crt"), "{e}");
        }
    }
}
