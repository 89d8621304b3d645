//! Clients etcd must refuse, and the error the caller sees says which case it is.

mod common;

use common::*;
use mesh_certs::{CertKeyPaths, LeafOptions, Role, TlsFiles};
use mesh_etcd::Error;
use mesh_etcd::{self as etcd, EtcdAuthAdmin};
use time::{Duration, OffsetDateTime};

#[tokio::test]
async fn refused_clients_are_told_why() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let etcd_east = start_etcd(&east, tmp.path()).await;
    let eps = etcd_east.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();

    // 1. No client certificate.
    let no_cert = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: None,
    };
    let e = refused(etcd::connect(&eps, &no_cert).await, "no certificate");
    assert!(matches!(e, Error::EtcdClientCertRequired { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("refusal: {msg}");
    assert!(
        msg.contains("requires a client certificate") && msg.contains("none was presented"),
        "{msg}"
    );

    // 2. A certificate from a foreign CA (another mesh with its own root).
    let foreign_ca = init_ca(&tmp.path().join("foreign-ca"), "other.test");
    let foreign = issue(&foreign_ca, "east", 1, &tmp.path().join("foreign-east"));
    let files = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(foreign.cert_key(Role::Admin)),
    };
    let e = refused(etcd::connect(&eps, &files).await, "foreign CA");
    assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("refusal: {msg}");
    assert!(
        msg.contains("refused the client certificate") && msg.contains("foreign CA"),
        "{msg}"
    );
    assert!(
        msg.contains("foreign-east/admin.crt"),
        "names the file: {msg}"
    );

    // 3. An expired certificate: caught before connecting, and etcd refuses it too.
    let expired = CertKeyPaths {
        cert: tmp.path().join("expired-admin.crt"),
        key: tmp.path().join("expired-admin.key"),
    };
    let now = OffsetDateTime::now_utc();
    east.issue_leaf(
        Role::Admin,
        &LeafOptions {
            not_before: Some(now - Duration::days(10)),
            not_after: Some(now - Duration::days(1)),
            out: Some(expired.clone()),
            ..LeafOptions::default()
        },
    )
    .unwrap();
    let files = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(expired.clone()),
    };
    let e = refused(etcd::connect(&eps, &files).await, "expired");
    assert!(
        matches!(e, Error::Certs(mesh_certs::Error::Expired { .. })),
        "{e:?}"
    );
    let msg = e.to_string();
    eprintln!("refusal: {msg}");
    assert!(
        msg.contains("expired-admin.crt") && msg.contains("expired at"),
        "{msg}"
    );
    let e = etcd::probe(&eps[0], &files)
        .await
        .expect_err("etcd refuses expired");
    let msg = e.to_string();
    eprintln!("refusal: {msg}");
    assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");
    assert!(
        msg.contains("expired"),
        "the server-side refusal says expired: {msg}"
    );

    // 4. A key that does not belong to the certificate.
    let mixed = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(CertKeyPaths {
            cert: east.cert(Role::Admin),
            key: east.key(Role::Node),
        }),
    };
    let e = refused(etcd::connect(&eps, &mixed).await, "key mismatch");
    assert!(
        matches!(e, Error::Certs(mesh_certs::Error::KeyMismatch { .. })),
        "{e:?}"
    );
    let msg = e.to_string();
    eprintln!("refusal: {msg}");
    assert!(
        msg.contains("node.key") && msg.contains("admin.crt") && msg.contains("does not match"),
        "{msg}"
    );
    let e = etcd::probe(&eps[0], &mixed)
        .await
        .expect_err("probe with mismatched key");
    assert!(e.to_string().contains("does not match"), "{e}");

    // 5. A server we do not trust (our bundle is the foreign mesh's).
    let files = TlsFiles {
        ca_bundle: foreign.ca_bundle(),
        identity: Some(foreign.cert_key(Role::Admin)),
    };
    let e = refused(etcd::connect(&eps, &files).await, "untrusted server");
    assert!(matches!(e, Error::EtcdServerUntrusted { .. }), "{e:?}");
    assert!(e.to_string().contains("does not trust"), "{e}");

    // 6. A valid certificate whose CN is no etcd user: etcd refuses every request.
    let stranger = issue(&ca, "north", 3, &tmp.path().join("north"));
    let mut c = etcd::connect_as(&stranger, Role::Admin, &eps)
        .await
        .unwrap();
    let e = c
        .put("clustermesh/v1/x", "y", None)
        .await
        .expect_err("unknown user");
    assert!(
        e.to_string().contains("permission denied")
            || e.to_string().contains("user name not found"),
        "{e}"
    );

    // The good admin still works (nothing above broke the server).
    let mut admin = etcd::connect_as(&east, Role::Admin, &eps).await.unwrap();
    admin.put("clustermesh/v1/ok", "1", None).await.unwrap();
    drop(
        EtcdAuthAdmin::connect(&eps, &east.tls_files(Role::EtcdRoot))
            .await
            .unwrap(),
    );
}

fn refused<T>(r: mesh_etcd::Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: connected, but etcd should have refused"),
        Err(e) => e,
    }
}
