//! The gRPC API over mTLS against a real secure etcd: reads for any mesh certificate, registrations
//! only for the cluster's admin, idempotent, with the remote's read-only etcd user created and removed.

use std::path::Path;
use std::sync::Arc;

use clustermesh_api::control::EtcdMeshControl;
use clustermesh_api::pb::{
    GetClusterInfoRequest, GetStatusRequest, IssueRemoteReaderRequest, RegisterRemoteRequest,
    UnregisterRemoteRequest,
};
use mesh_certs::tls::ClientAuth;
use mesh_certs::{ClusterDir, ClusterRequest, Role, RootCa, TrustDomain, Validity};
use mesh_etcd::bootstrap_auth;
use mesh_model::status::{ApiserverState, MeshStatus};
use mesh_model::values::{Capabilities, ClusterConfig};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use tokio::net::TcpListener;
use tonic::Code;

fn issue(ca: &RootCa, cluster: &str, id: u32, out: &Path) -> ClusterDir {
    ca.issue_cluster(&ClusterRequest {
        cluster: ClusterName::new(cluster).unwrap(),
        id: ClusterId::new(id, MaxConnectedClusters::DEFAULT).unwrap(),
        out: out.to_owned(),
        sans: vec![],
        validity: Validity::default(),
    })
    .unwrap()
}

#[tokio::test]
async fn register_and_unregister_through_grpc_with_admin_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("grpc.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let c1 = issue(&ca, "c1", 1, &tmp.path().join("c1"));
    let c2 = issue(&ca, "c2", 2, &tmp.path().join("c2"));
    let etcd = mesh_testkit::tls_etcd(&c1, tmp.path()).await;
    let eps = etcd.endpoints();
    bootstrap_auth(&eps, &c1.tls_files(Role::EtcdRoot), &c1.info.name)
        .await
        .unwrap();

    let config = ClusterConfig {
        name: ClusterName::new("c1").unwrap(),
        id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
        max_connected_clusters: MaxConnectedClusters::DEFAULT,
        capabilities: Capabilities::default(),
        ca_fingerprints: vec![],
    };
    let (_state_tx, state) = tokio::sync::watch::channel(ApiserverState {
        ready: true,
        etcd_healthy: true,
        is_leader: true,
        ..Default::default()
    });
    let control = EtcdMeshControl::new(config, c1.clone(), eps.clone(), eps.clone(), state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls =
        mesh_certs::tls::grpc_server_config(&c1.tls_files(Role::Apiserver), ClientAuth::Required)
            .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(clustermesh_api::server::serve(
        listener,
        tls,
        control,
        async {
            let _ = stop_rx.await;
        },
    ));

    // The standard gRPC health service answers SERVING for the API.
    let ch = clustermesh_api::client::channel(addr, &c1.tls_files(Role::Node))
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "clustermesh.v1.ClusterMesh".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Any certificate of the mesh reads.
    let mut node = clustermesh_api::client::connect(addr, &c1, Role::Node)
        .await
        .unwrap();
    let info = node
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.name.as_str(), info.id), ("c1", 1));
    assert_eq!(info.etcd_endpoints, eps);
    assert!(!info.ca_fingerprints.is_empty());
    assert!(info.ca_bundle_pem.contains("BEGIN CERTIFICATE"));

    // Only admin-c1 registers.
    let reg = RegisterRemoteRequest {
        name: "c2".into(),
        id: 2,
        etcd_endpoints: vec!["https://127.0.0.1:1".into()],
        ca_bundle_pem: String::new(),
        client_cert_pem: String::new(),
    };
    let err = node.register_remote(reg.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("node-c1") && err.message().contains("admin-c1"),
        "{}",
        err.message()
    );
    let mut other_admin = clustermesh_api::client::connect(addr, &c2, Role::Admin)
        .await
        .unwrap();
    assert_eq!(
        other_admin
            .register_remote(reg.clone())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Names are not identities: a certificate that says CN=admin-c1 and carries c1's admin SPIFFE
    // id but was signed by c2's intermediate (whoever holds c2's key can mint it), or by the root
    // of a federated mesh, is refused, and the message says what it really is.
    let forged = |signer: &ClusterDir, name: &str| {
        mesh_testkit::mint_leaf(
            signer,
            &mesh_testkit::Minted {
                cn: "admin-c1",
                spiffe: Some("spiffe://grpc.test/cluster/c1/admin"),
                ..Default::default()
            },
            &tmp.path().join(name),
        )
    };
    let by_c2 = forged(&c2, "admin-c1-by-c2");
    let other_mesh = RootCa::init(
        &tmp.path().join("other-ca"),
        &TrustDomain::new("other.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let other_c1 = issue(&other_mesh, "c1", 1, &tmp.path().join("other-c1"));
    let mut bundle = mesh_certs::TrustBundle::load(&c1.ca_bundle()).unwrap();
    bundle.merge(&mesh_certs::TrustBundle::load(&other_c1.ca_bundle()).unwrap());
    bundle.save(&c1.ca_bundle()).unwrap(); // federation: c1 now trusts the other mesh's root
    let by_federated = forged(&other_c1, "admin-c1-by-other-mesh");
    for (id, why) in [
        (by_c2, "signed by CN=clustermesh intermediate CA c2"),
        (
            by_federated,
            "does not chain to a root of trust domain grpc.test",
        ),
    ] {
        let ch = clustermesh_api::client::channel(
            addr,
            &mesh_certs::TlsFiles {
                ca_bundle: c1.ca_bundle(),
                identity: Some(id),
            },
        )
        .await
        .unwrap();
        let err = clustermesh_api::pb::cluster_mesh_client::ClusterMeshClient::new(ch)
            .register_remote(reg.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains(why), "{why}: {}", err.message());
    }

    let mut admin = clustermesh_api::client::connect(addr, &c1, Role::Admin)
        .await
        .unwrap();
    assert!(
        admin
            .register_remote(reg.clone())
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    assert!(
        !admin
            .register_remote(reg.clone())
            .await
            .unwrap()
            .into_inner()
            .changed,
        "running it twice changes nothing"
    );

    // The registration is in etcd and remote-c2 can read c1's etcd (and not write).
    let mut as_remote = mesh_etcd::connect(&eps, &c2.tls_files(Role::Remote))
        .await
        .unwrap();
    let got = as_remote
        .get("clustermesh/v1/remotes/c1/c2", None)
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1);
    assert!(
        as_remote
            .put("clustermesh/v1/services/c1/x/y", "{}", None)
            .await
            .is_err()
    );

    // A clashing id is refused with a clear message.
    let clash = RegisterRemoteRequest {
        name: "c3".into(),
        id: 2,
        ..reg.clone()
    };
    let err = admin.register_remote(clash).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message()
            .contains("already used by registered remote c2"),
        "{}",
        err.message()
    );
    let own = RegisterRemoteRequest {
        name: "c9".into(),
        id: 1,
        ..reg.clone()
    };
    let err = admin.register_remote(own).await.unwrap_err();
    assert!(err.message().contains("unique"), "{}", err.message());
    let bad = RegisterRemoteRequest {
        name: "Bad_Name".into(),
        ..reg.clone()
    };
    assert_eq!(
        admin.register_remote(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Status lists the registered remote.
    let st = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let status: MeshStatus = serde_json::from_str(&st.json).unwrap();
    assert_eq!(status.remotes.len(), 1);
    assert_eq!(status.remotes[0].name, "c2");
    assert!(!st.healthy, "no node reports yet");

    // Unregister: key and user gone, the remote's reads refused.
    assert!(
        admin
            .unregister_remote(UnregisterRemoteRequest { name: "c2".into() })
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    assert!(
        !admin
            .unregister_remote(UnregisterRemoteRequest { name: "c2".into() })
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let mut as_admin = mesh_etcd::connect_as(&c1, Role::Admin, &eps).await.unwrap();
    assert_eq!(
        as_admin
            .get("clustermesh/v1/remotes/c1/c2", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        0
    );
    let refused = as_remote.get("clustermesh/v1/remotes/c1/", None).await;
    assert!(
        refused.is_err(),
        "remote-c2 must be refused once unregistered: {refused:?}"
    );

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// Per-cluster trust through the gRPC connect (issue 17): c1's etcd trusts only c1's intermediate
/// for clients, so c2's own remote certificate opens nothing there; c1's apiserver signs c2's
/// remote key as `remote-c2` (the key never leaves c2), c2 reads c1 with it and cannot write,
/// registering it again with a freshly signed twin changes nothing, and a disconnect revokes it.
#[tokio::test]
async fn a_peer_reads_a_cluster_trusting_only_itself_with_the_certificate_it_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("reader.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let c1 = issue(&ca, "c1", 1, &tmp.path().join("c1"));
    let c2 = issue(&ca, "c2", 2, &tmp.path().join("c2"));
    mesh_testkit::require_etcd();
    let etcd = mesh_etcd::EtcdSpec::for_cluster(
        &c1,
        tmp.path().join("etcd-c1"),
        format!("https://127.0.0.1:{}", mesh_testkit::free_port()),
        format!("http://127.0.0.1:{}", mesh_testkit::free_port()),
    )
    .client_trust(&c1, mesh_etcd::ClientTrust::Cluster)
    .unwrap()
    .spawn(std::time::Duration::from_secs(30))
    .await
    .unwrap();
    let eps = etcd.endpoints();
    bootstrap_auth(&eps, &c1.tls_files(Role::EtcdRoot), &c1.info.name)
        .await
        .unwrap();
    let config = ClusterConfig {
        name: ClusterName::new("c1").unwrap(),
        id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
        max_connected_clusters: MaxConnectedClusters::DEFAULT,
        capabilities: Capabilities::default(),
        ca_fingerprints: vec![],
    };
    let (_state_tx, state) = tokio::sync::watch::channel(ApiserverState {
        ready: true,
        etcd_healthy: true,
        is_leader: true,
        ..Default::default()
    });
    let mut control = EtcdMeshControl::new(config, c1.clone(), eps.clone(), eps.clone(), state);
    Arc::get_mut(&mut control).unwrap().etcd_client_trust = "cluster".into();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls =
        mesh_certs::tls::grpc_server_config(&c1.tls_files(Role::Apiserver), ClientAuth::Required)
            .unwrap();
    let server = tokio::spawn(clustermesh_api::server::serve(
        listener,
        tls,
        control,
        std::future::pending(),
    ));

    let mut admin = clustermesh_api::client::connect(addr, &c1, Role::Admin)
        .await
        .unwrap();
    let info = admin
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.capabilities
            .iter()
            .any(|c| c == clustermesh_api::control::ISSUE_REMOTE_READER),
        "{:?}",
        info.capabilities
    );
    assert_eq!(info.etcd_client_trust, "cluster");
    assert_eq!(
        info.remote_cert_pem,
        std::fs::read_to_string(c1.cert(Role::Remote)).unwrap(),
        "the info hands out c1's own remote certificate (public), for peers to have signed"
    );

    // c2's own remote certificate does not open c1's etcd under per-cluster trust.
    let c2_remote = c2.tls_files(Role::Remote);
    let own = mesh_etcd::connect(
        &eps,
        &mesh_certs::TlsFiles {
            ca_bundle: c1.ca_bundle(),
            identity: c2_remote.identity.clone(),
        },
    )
    .await;
    let refused = match own {
        Err(e) => e.to_string(),
        Ok(mut c) => c
            .get("clustermesh/v1/remotes/c1/", None)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string(),
    };
    eprintln!("c2's own remote certificate: {refused}");

    // Only c1's admin has c1 sign.
    let ask = IssueRemoteReaderRequest {
        name: "c2".into(),
        remote_cert_pem: std::fs::read_to_string(c2.cert(Role::Remote)).unwrap(),
    };
    let mut other_admin = clustermesh_api::client::connect(addr, &c2, Role::Admin)
        .await
        .unwrap();
    assert_eq!(
        other_admin
            .issue_remote_reader(ask.clone())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let err = admin
        .issue_remote_reader(IssueRemoteReaderRequest {
            name: "c1".into(),
            ..ask.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let issued = admin
        .issue_remote_reader(ask.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(!issued.cert_pem.contains("PRIVATE KEY"));
    assert!(!issued.not_after.is_empty());
    let reader_crt = tmp.path().join("c2-reads-c1.crt");
    std::fs::write(&reader_crt, &issued.cert_pem).unwrap();
    let reader = mesh_certs::TlsFiles {
        ca_bundle: c1.ca_bundle(),
        identity: Some(mesh_certs::CertKeyPaths {
            cert: reader_crt.clone(),
            key: c2.key(Role::Remote),
        }),
    };

    // Registered with the certificate; the entry carries it and c2 reads with it, cannot write.
    let reg = RegisterRemoteRequest {
        name: "c2".into(),
        id: 2,
        etcd_endpoints: vec!["https://127.0.0.1:1".into()],
        ca_bundle_pem: String::new(),
        client_cert_pem: issued.cert_pem.clone(),
    };
    assert!(
        admin
            .register_remote(reg.clone())
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let mut as_reader = mesh_etcd::connect(&eps, &reader)
        .await
        .expect("c2's key certified by c1 opens c1's etcd");
    let got = as_reader
        .get("clustermesh/v1/remotes/c1/c2", None)
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1);
    let entry: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
    assert_eq!(entry["clientCert"], issued.cert_pem.as_str());
    assert!(
        as_reader
            .put("clustermesh/v1/services/c1/x/y", "{}", None)
            .await
            .is_err(),
        "remote-c2 is read-only"
    );

    // connect again: a fresh signature of the same key, the registered one stays.
    let again = admin
        .issue_remote_reader(ask.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !admin
            .register_remote(RegisterRemoteRequest {
                client_cert_pem: again.cert_pem,
                ..reg.clone()
            })
            .await
            .unwrap()
            .into_inner()
            .changed,
        "re-running connect changes nothing (no node-sync reconnects)"
    );

    // Disconnect revokes: the user is gone, the certificate opens nothing.
    assert!(
        admin
            .unregister_remote(UnregisterRemoteRequest { name: "c2".into() })
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let refused = as_reader.get("clustermesh/v1/remotes/c1/", None).await;
    assert!(
        refused.is_err(),
        "c2's reader certificate must open nothing once disconnected: {refused:?}"
    );
    server.abort();
}

#[tokio::test]
async fn a_client_with_a_foreign_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("a.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let other = RootCa::init(
        &tmp.path().join("ca2"),
        &TrustDomain::new("b.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let c1 = issue(&ca, "c1", 1, &tmp.path().join("c1"));
    let x1 = issue(&other, "c1", 1, &tmp.path().join("x1"));
    let config = ClusterConfig {
        name: ClusterName::new("c1").unwrap(),
        id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
        max_connected_clusters: MaxConnectedClusters::DEFAULT,
        capabilities: Capabilities::default(),
        ca_fingerprints: vec![],
    };
    let (_tx, state) = tokio::sync::watch::channel(ApiserverState::default());
    let control = EtcdMeshControl::new(
        config,
        c1.clone(),
        vec!["https://127.0.0.1:1".into()],
        vec![],
        state,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls =
        mesh_certs::tls::grpc_server_config(&c1.tls_files(Role::Apiserver), ClientAuth::Required)
            .unwrap();
    let server = tokio::spawn(clustermesh_api::server::serve(
        listener,
        tls,
        Arc::clone(&control),
        std::future::pending(),
    ));
    let r = async {
        let mut c = clustermesh_api::client::connect(addr, &x1, Role::Admin).await?;
        c.get_cluster_info(GetClusterInfoRequest {})
            .await
            .map_err(|e| anyhow_like(e.to_string()))?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    assert!(r.is_err(), "a certificate of another mesh must not get in");
    server.abort();
}

fn anyhow_like(s: String) -> Box<dyn std::error::Error> {
    s.into()
}
