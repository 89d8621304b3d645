//! Name constraints on cluster intermediates (issue 17): an intermediate permits only the DNS
//! names of its own cluster's servers, our issuing refuses others with the name said, and a leaf
//! minted outside them with the intermediate's key (past our checks) is refused by etcd's Go
//! verifier (a real etcd with client-certificate auth) and by our rustls code, as client and as
//! server certificate. A leaf inside them is accepted: the control.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::*;
use mesh_certs::ca::permitted_dns_of;
use mesh_certs::{LeafOptions, Role, San, TlsFiles, TrustBundle};
use mesh_etcd::Error;
use mesh_testkit::{Minted, mint_leaf};

#[tokio::test]
async fn a_leaf_outside_its_intermediates_name_constraints_is_refused_by_etcd_and_by_rustls() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let mut req = mesh_certs::ClusterRequest::new("east", 1, tmp.path().join("east")).unwrap();
    req.sans.push(San::Dns("etcd.east.example".into()));
    let east = ca.issue_cluster(&req).unwrap();
    let west = issue(&ca, "west", 2, &tmp.path().join("west"));

    // What the intermediate permits: its own servers' names, not another cluster's.
    let inter = mesh_certs::files::load_certs(&east.cert(Role::Intermediate)).unwrap();
    let permitted = permitted_dns_of(&inter[0]).expect("name constraints on the intermediate");
    for want in [
        "localhost",
        "etcd-server.east",
        "clustermesh-apiserver.east",
        "etcd.east.example",
    ] {
        assert!(permitted.iter().any(|p| p == want), "{want}: {permitted:?}");
    }
    assert!(
        !permitted.iter().any(|p| p.contains("west")),
        "{permitted:?}"
    );

    // Our issuing refuses a name outside them and says how to add it.
    let e = east
        .issue_leaf(
            Role::EtcdServer,
            &LeafOptions {
                extra_sans: vec![San::Dns("etcd-server.west".into())],
                out: Some(mesh_certs::CertKeyPaths {
                    cert: tmp.path().join("x.crt"),
                    key: tmp.path().join("x.key"),
                }),
                ..LeafOptions::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, mesh_certs::Error::OutsideNameConstraints { .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("\"etcd-server.west\"") && msg.contains("--san etcd-server.west"),
        "{msg}"
    );

    let etcd_east = start_etcd(&east, tmp.path()).await;
    let eps = etcd_east.endpoints();
    mesh_etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();

    // Client certificates minted with east's intermediate key, as admin-east.
    let spiffe = "spiffe://mesh.test/cluster/east/admin";
    let inside = mint_leaf(
        &east,
        &Minted {
            cn: "admin-east",
            spiffe: Some(spiffe),
            dns: &["etcd-server.east"],
            ..Minted::default()
        },
        &tmp.path().join("inside"),
    );
    let outside = mint_leaf(
        &east,
        &Minted {
            cn: "admin-east",
            spiffe: Some(spiffe),
            dns: &["etcd-server.west"],
            ..Minted::default()
        },
        &tmp.path().join("outside"),
    );
    let files = |id| TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(id),
    };
    // etcd (Go's x509 verifier): the control passes, the one outside is refused.
    mesh_etcd::probe(&eps[0], &files(inside.clone()))
        .await
        .expect("a leaf inside the constraints is accepted by etcd");
    let e = mesh_etcd::probe(&eps[0], &files(outside.clone()))
        .await
        .expect_err("etcd must refuse a leaf outside its intermediate's name constraints");
    eprintln!("etcd: {e}");
    assert!(
        matches!(e, Error::EtcdClientCertRefused { .. }),
        "refused by etcd itself, not before: {e:?}"
    );
    assert!(e.to_string().contains("name constraints"), "{e}");
    let mut client = mesh_etcd::connect(&eps, &files(inside.clone()))
        .await
        .unwrap();
    client.put("probe", "ok", None).await.unwrap();

    // Our verifier (rustls-webpki), as `clustermesh certs verify` and every server of ours use it.
    let bundle = TrustBundle::load(&east.ca_bundle()).unwrap();
    bundle
        .verify(&east.ca_bundle(), &inside.cert)
        .expect("inside the constraints");
    let e = bundle
        .verify(&east.ca_bundle(), &outside.cert)
        .expect_err("outside the constraints")
        .to_string();
    eprintln!("rustls: {e}");
    assert!(e.contains("outside the name constraints"), "{e}");

    // As a server certificate: our client refuses a server that presents a name outside them.
    let server = mint_leaf(
        &east,
        &Minted {
            cn: "etcd-server.east",
            spiffe: Some("spiffe://mesh.test/cluster/east/etcd-server"),
            dns: &["localhost", "etcd-server.west"],
            ips: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            server: true,
        },
        &tmp.path().join("server-outside"),
    );
    let e = handshake(&files(server), &west.tls_files(Role::Node))
        .await
        .expect_err("a server certificate outside the constraints");
    eprintln!("rustls client: {e}");
    assert!(e.to_lowercase().contains("nameconstraint"), "{e}");
    handshake(
        &east.tls_files(Role::EtcdServer),
        &west.tls_files(Role::Node),
    )
    .await
    .expect("the cluster's own server certificate");
}

/// One TLS handshake on loopback: a server with `server` files (no client auth), a client with
/// `client` files; the client's error, if any.
async fn handshake(server: &TlsFiles, client: &TlsFiles) -> Result<(), String> {
    let cfg = mesh_certs::tls::server_config(server, mesh_certs::tls::ClientAuth::Off).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(mesh_certs::tls::client_config(client).unwrap()));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let r = connector
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"));
    srv.abort();
    r
}
