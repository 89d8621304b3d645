//! Several etcd endpoints, one of them down: clients connect to a member that answers and every
//! request works (etcd-client alone would keep sending a share of them to the dead member).

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::Error;
use mesh_certs::Role;
use mesh_certs::etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_listed_first_or_last_never_fails_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let etcd_east = start_etcd(&east, tmp.path()).await;
    let live = etcd_east.endpoints()[0].clone();
    etcd::bootstrap_auth(
        std::slice::from_ref(&live),
        &east.tls_files(Role::EtcdRoot),
        &east.info.name,
    )
    .await
    .unwrap();
    let dead = || format!("https://127.0.0.1:{}", free_port());
    let endpoints = vec![dead(), live, dead()];
    for attempt in 0..8 {
        let mut node = etcd::connect_as(&east, Role::Node, &endpoints)
            .await
            .unwrap_or_else(|e| panic!("connect {attempt}: {e}"));
        for _ in 0..5 {
            tokio::time::timeout(Duration::from_secs(2), node.get("clustermesh/v1/x", None))
                .await
                .unwrap_or_else(|_| panic!("connect {attempt}: a request timed out"))
                .unwrap_or_else(|e| panic!("connect {attempt}: a request failed: {e}"));
        }
    }
    // The long-lived client (the apiserver's): only the answering member is in its channel.
    let opts = etcd::client_options(&east.tls_files(Role::Node)).unwrap();
    let (mut tracked, _members) = etcd::connect_tracked(
        &endpoints,
        &opts,
        Duration::from_secs(2),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    for i in 0..20 {
        tokio::time::timeout(
            Duration::from_secs(2),
            tracked.get("clustermesh/v1/x", None),
        )
        .await
        .unwrap_or_else(|_| panic!("tracked request {i} timed out"))
        .unwrap_or_else(|e| panic!("tracked request {i} failed: {e}"));
    }
    // Nothing answers: the error names an endpoint and says it cannot be reached.
    let none = vec![dead(), dead()];
    match etcd::connect_as(&east, Role::Node, &none).await {
        Err(e @ Error::EtcdUnreachable { .. }) => {
            assert!(
                none.iter().any(|ep| e.to_string().contains(ep.as_str())),
                "{e}"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected with no member up"),
    }
}
