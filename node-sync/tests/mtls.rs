//! node-sync over mTLS to etcds with `--client-cert-auth` and RBAC, using certificates issued by
//! mesh-certs: the node certificate for the local etcd, the cluster's remote certificate
//! (read-only user `remote-c1`) for the other cluster's etcd.

mod support;

use std::time::Duration;

use mesh_certs::{ClusterRequest, Role, RootCa, TrustDomain, Validity};
use mesh_etcd::{EtcdAuthAdmin, connect_as};
use mesh_model::values::Affinity;
use node_sync::lb::FakeMaps;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_the_nodes_certificates_and_read_only_remote_user() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("mesh.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let d1 = ca
        .issue_cluster(&ClusterRequest::new("c1", 1, tmp.path().join("c1")).unwrap())
        .unwrap();
    let d2 = ca
        .issue_cluster(&ClusterRequest::new("c2", 2, tmp.path().join("c2")).unwrap())
        .unwrap();
    let (s1, s2) = tokio::join!(tls_etcd(&d1, tmp.path()), tls_etcd(&d2, tmp.path()));
    let (u1, u2) = (s1.endpoints()[0].clone(), s2.endpoints()[0].clone());
    let mut a1 = EtcdAuthAdmin::connect(&s1.endpoints(), &d1.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    a1.bootstrap(&c("c1")).await.unwrap();
    let mut a2 = EtcdAuthAdmin::connect(&s2.endpoints(), &d2.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    a2.bootstrap(&c("c2")).await.unwrap();
    a2.add_remote_user(&c("c1")).await.unwrap();

    // The apiservers publish as admin.
    let mut w1 = ApiWriter::from_client(
        connect_as(&d1, Role::Admin, &s1.endpoints()).await.unwrap(),
        "c1",
        1,
    );
    let mut w2 = ApiWriter::from_client(
        connect_as(&d2, Role::Admin, &s2.endpoints()).await.unwrap(),
        "c2",
        2,
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk("c1", 0, vec![endpoint("127.0.0.1", port, "n1")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint("127.0.0.2", 8080, "m1")])],
    )
    .await;

    // node-sync: --tls-dir is the c1 cluster directory; the remote file names only endpoints.
    let remotes = tempfile::tempdir().unwrap();
    std::fs::write(
        remotes.path().join("c2.yaml"),
        // A member that is down listed first: node-sync connects to one that answers.
        format!(
            "name: c2\nid: 2\nendpoints: [\"https://127.0.0.1:{}\", \"{u2}\"]\n",
            free_port()
        ),
    )
    .unwrap();
    let mut opts = options_url(&u1, "c1", 1, Some(remotes.path()));
    opts.tls_dir = Some(d1.path.clone());
    let maps = FakeMaps::new();
    let agent = start_agent(opts, &maps);
    wait_for(
        "both clusters programmed over mTLS",
        Duration::from_secs(20),
        || programmed(&maps).is_some_and(|b| b.len() == 2),
    )
    .await;
    // The node's health verdicts reach the local etcd (node user may write health/c1/).
    wait_for("health published", Duration::from_secs(10), || {
        agent.snapshot().has_health_report(&c("c1"), "n1")
    })
    .await;
    // /metrics names when the node's certificates expire; none is near, so no warning.
    let (metrics, warnings) = {
        let st = agent.snapshot();
        (node_sync::status::render_metrics(&st), st.cert_warnings())
    };
    for cert in ["node", "remote", "intermediate"] {
        assert!(
            metrics.contains(&format!(
                "clustermesh_certificate_expiry_timestamp_seconds{{component=\"node-sync\",certificate=\"{cert}\"}}"
            )),
            "{cert}: {metrics}"
        );
    }
    assert!(warnings.is_empty(), "{warnings:?}");
    // The local backend dies: failover to c2 over the secured path.
    drop(listener);
    wait_for("failover to c2", Duration::from_secs(5), || {
        programmed(&maps) == Some(vec!["c2/127.0.0.2:8080".to_string()])
    })
    .await;
}

/// Per-cluster trust (issue 17): c2's etcd trusts only c2's intermediate, so c1's own remote
/// certificate opens nothing there; c1's registration of c2 (what the gRPC connect writes) carries
/// the certificate c2 signed for c1's remote key, node-sync reads c2 with it, and exports its
/// expiry as `remote-reader-c2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_on_per_cluster_trust_is_read_with_the_certificate_it_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RootCa::init(
        &tmp.path().join("ca"),
        &TrustDomain::new("mesh.test").unwrap(),
        &Validity::default(),
    )
    .unwrap();
    let d1 = ca
        .issue_cluster(&ClusterRequest::new("c1", 1, tmp.path().join("c1")).unwrap())
        .unwrap();
    let d2 = ca
        .issue_cluster(&ClusterRequest::new("c2", 2, tmp.path().join("c2")).unwrap())
        .unwrap();
    mesh_testkit::require_etcd();
    let s1 = tls_etcd(&d1, tmp.path()).await;
    let s2 = mesh_etcd::EtcdSpec::for_cluster(
        &d2,
        tmp.path().join("etcd-c2-cluster-trust"),
        format!("https://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    )
    .client_trust(&d2, mesh_etcd::ClientTrust::Cluster)
    .unwrap()
    .spawn(Duration::from_secs(30))
    .await
    .unwrap();
    let u1 = s1.endpoints()[0].clone();
    let mut a1 = EtcdAuthAdmin::connect(&s1.endpoints(), &d1.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    a1.bootstrap(&c("c1")).await.unwrap();
    let mut a2 = EtcdAuthAdmin::connect(&s2.endpoints(), &d2.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    a2.bootstrap(&c("c2")).await.unwrap();
    a2.add_remote_user(&c("c1")).await.unwrap();
    let own = mesh_etcd::connect(
        &s2.endpoints(),
        &mesh_certs::TlsFiles {
            ca_bundle: d1.ca_bundle(),
            identity: Some(d1.cert_key(Role::Remote)),
        },
    )
    .await;
    assert!(
        own.is_err(),
        "c1's own remote certificate must be refused by c2's etcd on cluster trust"
    );

    let mut w1 = ApiWriter::from_client(
        connect_as(&d1, Role::Admin, &s1.endpoints()).await.unwrap(),
        "c1",
        1,
    );
    let mut w2 = ApiWriter::from_client(
        connect_as(&d2, Role::Admin, &s2.endpoints()).await.unwrap(),
        "c2",
        2,
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    w1.publish_all(
        vec![spec("c1", Affinity::None)],
        vec![chunk("c1", 0, vec![endpoint("127.0.0.1", port, "n1")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::None)],
        vec![chunk("c2", 0, vec![endpoint("127.0.0.2", 8080, "m1")])],
    )
    .await;
    let reader = d2
        .issue_remote_reader(&c("c1"), &std::fs::read(d1.cert(Role::Remote)).unwrap())
        .unwrap();
    let entry = mesh_model::values::MeshValue::Remote(mesh_model::values::RemoteCluster {
        name: c("c2"),
        id: mesh_model::ClusterId::new(2, mesh_model::MaxConnectedClusters::DEFAULT).unwrap(),
        endpoints: s2.endpoints(),
        ca_bundle: String::new(),
        client_cert: reader.clone(),
    });
    connect_as(&d1, Role::Admin, &s1.endpoints())
        .await
        .unwrap()
        .put("clustermesh/v1/remotes/c1/c2", entry.encode(), None)
        .await
        .unwrap();

    let mut opts = options_url(&u1, "c1", 1, None);
    opts.tls_dir = Some(d1.path.clone());
    let maps = FakeMaps::new();
    let agent = start_agent(opts, &maps);
    wait_for(
        "c2 read with the certificate c2 issued",
        Duration::from_secs(20),
        || programmed(&maps).is_some_and(|b| b.len() == 2),
    )
    .await;
    let metrics = node_sync::status::render_metrics(&agent.snapshot());
    let want = format!(
        "clustermesh_certificate_expiry_timestamp_seconds{{component=\"node-sync\",certificate=\"remote-reader-c2\"}} {}",
        d2.intermediate_info().unwrap().not_after.unix_timestamp()
    );
    assert!(metrics.contains(&want), "{want}\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_does_not_trust_us_shows_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("mesh.test").unwrap();
    let ca = RootCa::init(&tmp.path().join("ca"), &td, &Validity::default()).unwrap();
    let other = RootCa::init(&tmp.path().join("other"), &td, &Validity::default()).unwrap();
    let d1 = ca
        .issue_cluster(&ClusterRequest::new("c1", 1, tmp.path().join("c1")).unwrap())
        .unwrap();
    let d2 = other
        .issue_cluster(&ClusterRequest::new("c2", 2, tmp.path().join("c2")).unwrap())
        .unwrap();
    let (s1, _s2) = tokio::join!(tls_etcd(&d1, tmp.path()), tls_etcd(&d2, tmp.path()));
    let (u1, u2) = (s1.endpoints()[0].clone(), _s2.endpoints()[0].clone());
    let mut w1 = ApiWriter::from_client(
        connect_as(&d1, Role::EtcdRoot, &s1.endpoints())
            .await
            .unwrap(),
        "c1",
        1,
    );
    w1.publish_all(vec![spec("c1", Affinity::None)], vec![])
        .await;
    let remotes = tempfile::tempdir().unwrap();
    std::fs::write(
        remotes.path().join("c2.yaml"),
        format!("name: c2\nendpoints: [\"{u2}\"]\n"),
    )
    .unwrap();
    let mut opts = options_url(&u1, "c1", 1, Some(remotes.path()));
    opts.tls_dir = Some(d1.path.clone());
    let maps = FakeMaps::new();
    let agent = start_agent(opts, &maps);
    wait_for("c2 error shown", Duration::from_secs(20), || {
        agent
            .snapshot()
            .clusters
            .get(&c("c2"))
            .and_then(|s| s.error.clone())
            .is_some()
    })
    .await;
    let err = agent.snapshot().clusters[&c("c2")].error.clone().unwrap();
    println!("c2: {err}");
    assert!(err.contains(&u2), "{err}");
    assert!(err.contains("not signed by a CA of our bundle"), "{err}");
    assert!(!agent.snapshot().clusters[&c("c2")].synced);
}
