//! Starting etcd fails with an error that says why: a missing binary, an etcd that exits, a probe
//! certificate that can not work.

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::Role;
use mesh_etcd::Error;
use mesh_etcd::EtcdSpec;

#[tokio::test]
async fn spawn_failures_are_explained() {
    require_etcd();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let url = || format!("https://127.0.0.1:{}", free_port());

    // No such binary.
    let mut spec = EtcdSpec::for_cluster(&east, tmp.path().join("d1"), url(), url());
    spec.binary = tmp.path().join("no-etcd-here");
    let e = spec.spawn(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(e, Error::EtcdSpawn { .. }), "{e:?}");
    assert!(e.to_string().contains("no-etcd-here"), "{e}");

    // etcd exits at once: its server key file is missing.
    let mut spec = EtcdSpec::for_cluster(&east, tmp.path().join("d2"), url(), url());
    spec.tls.server.key = tmp.path().join("missing-server.key");
    let e = spec.spawn(Duration::from_secs(20)).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::EtcdNotHealthy { .. }), "{e:?}");
    assert!(
        msg.contains("etcd exited") && msg.contains("missing-server.key"),
        "{msg}"
    );

    // The probe certificate is unusable: fail fast naming it, instead of waiting out the timeout.
    let mut spec = EtcdSpec::for_cluster(&east, tmp.path().join("d3"), url(), url());
    spec.tls.probe_client.key = east.key(Role::Node);
    let started = std::time::Instant::now();
    let e = spec.spawn(Duration::from_secs(20)).await.unwrap_err();
    assert!(
        matches!(e, Error::Certs(mesh_certs::Error::KeyMismatch { .. })),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
