//! Issuance, bad inputs, and rustls configs that pick up changed files without a restart.

mod common;

use std::sync::Arc;

use common::*;
use mesh_certs::tls::{self, ClientAuth};
use mesh_certs::{
    CertInfo, ClusterDir, ClusterRequest, Error, Fingerprint, LeafOptions, Role, RootCa, San,
    TlsFiles, TrustBundle, Validity,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn issued_cluster_has_the_documented_layout_and_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let mut req = ClusterRequest::new("east", 7, tmp.path().join("east")).unwrap();
    req.sans = vec![
        "etcd.east.example".parse().unwrap(),
        "10.1.2.3".parse().unwrap(),
    ];
    let east = ca.issue_cluster(&req).unwrap();
    let reopened = ClusterDir::open(&east.path).unwrap();
    assert_eq!(reopened.info.id.get(), 7);

    for role in Role::LEAVES {
        let infos = CertInfo::from_pem_file(&east.cert(role)).unwrap();
        assert_eq!(infos.len(), 2, "{role}: leaf + intermediate");
        let leaf = &infos[0];
        assert_eq!(
            leaf.spiffe_id.as_ref().unwrap().to_string(),
            format!("spiffe://mesh.test/cluster/east/{role}")
        );
        assert!(!leaf.is_ca);
        assert!(infos[1].is_ca);
        assert_eq!(leaf.issuer, infos[1].subject);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(east.key(role))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{role} key must be private");
        }
    }
    let admin = &CertInfo::from_pem_file(&east.cert(Role::Admin)).unwrap()[0];
    assert_eq!(admin.common_name.as_deref(), Some("admin-east"));
    assert!(admin.client_auth && !admin.server_auth);
    let root_user = &CertInfo::from_pem_file(&east.cert(Role::EtcdRoot)).unwrap()[0];
    assert_eq!(root_user.common_name.as_deref(), Some("root"));
    let server = &CertInfo::from_pem_file(&east.cert(Role::EtcdServer)).unwrap()[0];
    assert!(server.server_auth);
    for ip in ["127.0.0.1", "::1", "10.1.2.3"] {
        assert!(
            server.ip_addresses.contains(&ip.parse().unwrap()),
            "{ip} in {server:?}"
        );
    }
    for dns in ["localhost", "etcd.east.example", "etcd-server.east"] {
        assert!(
            server.dns_names.iter().any(|d| d == dns),
            "{dns} in {server:?}"
        );
    }
    // The bundle holds the root and nothing else; its fingerprint is the CA's.
    let bundle = TrustBundle::load(&east.ca_bundle()).unwrap();
    assert_eq!(bundle.fingerprints(), vec![ca.fingerprint()]);
    assert_eq!(
        east.ca_fingerprints().unwrap(),
        vec![ca.fingerprint().hex()]
    );
    let root_info = &CertInfo::from_pem_file(&ca.dir().root_cert()).unwrap()[0];
    assert_eq!(
        root_info.spiffe_id.as_ref().unwrap().to_string(),
        "spiffe://mesh.test/ca"
    );
    assert_eq!(root_info.fingerprint, ca.fingerprint());
    let text = admin.describe(time::OffsetDateTime::now_utc());
    assert!(
        text.contains("client certificate (etcd user \"admin-east\")"),
        "{text}"
    );
    assert!(text.contains("valid, expires in 36"), "{text}");
}

#[test]
fn bad_inputs_name_the_file_or_rule() {
    let tmp = tempfile::tempdir().unwrap();
    // Cluster names and ids.
    let e = ClusterRequest::new("East_1", 1, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("East_1") && e.contains("lowercase"), "{e}");
    let e = ClusterRequest::new("default", 1, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("reserved"), "{e}");
    let e = ClusterRequest::new(&"a".repeat(33), 1, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 32"), "{e}");
    let e = ClusterRequest::new("east", 0, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cluster id 0 is out of range"), "{e}");
    let e = mesh_certs::TrustDomain::new("Mesh Test")
        .unwrap_err()
        .to_string();
    assert!(e.contains("Mesh Test") && e.contains("lowercase"), "{e}");
    let e = "under_score.example"
        .parse::<San>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("under_score.example"), "{e}");

    // A key file given where a certificate belongs.
    let ca3 = init_ca(&tmp.path().join("ca3"), "mesh.test");
    let e = CertInfo::from_pem_file(&ca3.dir().root_key())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("root.key") && e.contains("holds a private key, not a certificate"),
        "{e}"
    );

    // Missing CA directory / files.
    let e = RootCa::load(&tmp.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nowhere/trust-domain") && e.contains("does not exist"),
        "{e}"
    );
    let e = ClusterDir::open(&tmp.path().join("nocluster"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nocluster") && e.contains("does not exist"),
        "{e}"
    );

    // Corrupt PEM in the CA's root certificate.
    let ca_dir = tmp.path().join("ca");
    init_ca(&ca_dir, "mesh.test");
    std::fs::write(
        ca_dir.join("root.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = RootCa::load(&ca_dir).unwrap_err();
    assert!(matches!(e, Error::CorruptPem { .. }), "{e:?}");
    assert!(e.to_string().contains("root.crt"), "{e}");

    // A cluster whose key files got swapped.
    let ca2 = init_ca(&tmp.path().join("ca2"), "mesh.test");
    let east = issue(&ca2, "east", 1, &tmp.path().join("east"));
    std::fs::copy(east.key(Role::Node), east.key(Role::Admin)).unwrap();
    let e = tls::client_config(&east.tls_files(Role::Admin))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("admin.key") && e.contains("admin.crt") && e.contains("does not match"),
        "{e}"
    );

    // A bundle that is not a CA.
    let files = TlsFiles {
        ca_bundle: east.cert(Role::Node),
        identity: None,
    };
    // node.crt holds the leaf first: not a CA.
    let e = tls::client_config(&files).unwrap_err().to_string();
    assert!(e.contains("node.crt") && e.contains("not a CA"), "{e}");

    // A certificate file with garbage after a good block is still refused with the file named.
    std::fs::write(east.ca_bundle(), "").unwrap();
    let e = tls::client_config(&east.tls_files(Role::Node))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ca-bundle.pem") && e.contains("no \"-----BEGIN CERTIFICATE-----\" block"),
        "{e}"
    );
}

/// A TLS echo server with our server config: answers each connection with the peer's SPIFFE id.
async fn serve(cfg: rustls::ServerConfig) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let id = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| tls::peer_spiffe_id(&c[0]))
                        .map(|id| id.to_string())
                        .unwrap_or_default();
                    let _ = tls.write_all(id.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connect, return (server certificate fingerprint, what the server said) or the TLS error text.
async fn call(
    cfg: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> Result<(Fingerprint, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let fp = Fingerprint::of(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok((fp, out))
}

#[tokio::test]
async fn configs_reload_changed_certificates_and_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca = init_ca(&ca_dir, "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let west = issue(&ca, "west", 2, &tmp.path().join("west"));

    let server_cfg =
        tls::server_config(&east.tls_files(Role::Apiserver), ClientAuth::Required).unwrap();
    let addr = serve(server_cfg).await;
    let client = Arc::new(tls::client_config(&west.tls_files(Role::Remote)).unwrap());

    let fp_of = |p: &std::path::Path| CertInfo::from_pem_file(p).unwrap()[0].fingerprint;
    let (fp1, who) = call(&client, addr).await.expect("mTLS works");
    assert_eq!(fp1, fp_of(&east.cert(Role::Apiserver)));
    assert_eq!(who, "spiffe://mesh.test/cluster/west/remote");

    // Re-issue the server certificate in place: the next handshake presents the new one.
    east.issue_leaf(Role::Apiserver, &LeafOptions::default())
        .unwrap();
    let (fp2, _) = call(&client, addr).await.unwrap();
    assert_ne!(fp1, fp2);
    assert_eq!(fp2, fp_of(&east.cert(Role::Apiserver)));

    // A broken file (half-written rotation, corrupt PEM) does not break the server: it keeps
    // presenting the last good certificate, and picks up the next good one.
    let good = std::fs::read(east.cert(Role::Apiserver)).unwrap();
    std::fs::write(
        east.cert(Role::Apiserver),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    let (fp3, _) = call(&client, addr)
        .await
        .expect("still serving with the previous certificate");
    assert_eq!(fp3, fp2);
    std::fs::write(east.cert(Role::Apiserver), &good).unwrap();
    let (fp4, _) = call(&client, addr).await.unwrap();
    assert_eq!(fp4, fp2);

    // Rotate the root and issue a new cluster under it: east's server refuses it until east's
    // bundle file holds the new root, then accepts it, with no restart.
    RootCa::rotate(&ca_dir, &Validity::default()).unwrap();
    let new_ca = RootCa::load(&ca_dir).unwrap();
    let north = issue(&new_ca, "north", 3, &tmp.path().join("north"));
    let north_client = Arc::new(tls::client_config(&north.tls_files(Role::Remote)).unwrap());
    let refused = match call(&north_client, addr).await {
        Err(e) => e,
        Ok((_, who)) => {
            assert!(
                who.is_empty(),
                "the server accepted a client of an untrusted root: {who}"
            );
            "closed".to_owned()
        }
    };
    eprintln!("new-root client before the bundle changed: {refused}");
    assert!(
        refused.contains("UnknownCA") || refused == "closed",
        "{refused}"
    );
    east.sync_bundle(new_ca.dir()).unwrap();
    let (_, who) = call(&north_client, addr)
        .await
        .expect("accepted after the bundle changed");
    assert_eq!(who, "spiffe://mesh.test/cluster/north/remote");
}
