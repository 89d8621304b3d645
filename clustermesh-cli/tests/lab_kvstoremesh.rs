//! KVStoreMesh end to end on the lab (root, real etcd with mTLS, apiservers, node-syncs, eBPF, backends):
//! the demo with `--kvstoremesh`: each cluster's apiserver mirrors the other cluster (registered by
//! `connect` through gRPC) into its own etcd, every node-sync runs with `--kvstoremesh` and reads only
//! its local etcd. The graceful and hard-kill drills must do what they do in the normal mode, and no
//! node holds a connection to the other cluster's etcd.

mod support;

use std::time::{Duration, Instant};

use clustermesh_cli::connect::GrpcConnect;
use mesh_lab::demo::{self, DemoOptions};
use mesh_lab::mesh::{EndpointState, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_drills_fail_over_and_back_within_a_second_and_no_node_dials_a_remote_etcd() {
    support::require_lab();
    let opts = DemoOptions {
        prefix: "kvsdemo".into(),
        kvstoremesh: true,
        ..DemoOptions::default()
    };
    let mut progress = |l: &str| eprintln!("[kvstoremesh] {l}");
    let (report, mut mesh) = demo::run(&opts, &GrpcConnect, &mut progress)
        .await
        .expect("the demo in KVStoreMesh mode");
    eprintln!(
        "[kvstoremesh] report: {}",
        serde_json::to_string(&report).unwrap()
    );

    // The drills: what the normal mode promises.
    for (name, d) in [
        ("graceful", &report.graceful),
        ("hard kill", &report.hard_kill),
    ] {
        let fo = d
            .failover_ms
            .unwrap_or_else(|| panic!("{name}: no failover: {d:?}"));
        let fb = d
            .failback_ms
            .unwrap_or_else(|| panic!("{name}: no failback: {d:?}"));
        assert!(fo < 1000.0, "{name}: failover took {fo} ms: {d:?}");
        assert!(fb < 1000.0, "{name}: failback took {fb} ms: {d:?}");
    }
    assert_eq!(
        report.graceful.failed_connects, 0,
        "the graceful drill lost connects: {:?}",
        report.graceful
    );

    tokio::task::block_in_place(|| {
        for c in 1..=2 {
            let other = 3 - c;
            let other_name = mesh.cluster_name(other);
            for n in 1..=2 {
                // No node dials the other cluster's etcd; node-sync does hold its own.
                let remote = mesh.etcd_connections(c, n, other).unwrap();
                assert!(
                    remote.is_empty(),
                    "c{c}/n{n} holds connections to {other_name}'s etcd: {remote:?}"
                );
                let own = mesh.etcd_connections(c, n, c).unwrap();
                assert!(
                    own.iter().any(|(_, p)| p.contains("node-sync")),
                    "c{c}/n{n}: node-sync holds no connection to its own etcd: {own:?}"
                );
                // node-sync knows the other cluster only from the mirror: connected (its local
                // stream) and synced, with no etcd endpoints of its own.
                let st = mesh.node_sync_status_json(c, n).unwrap();
                let clusters = st["clusters"].as_array().unwrap();
                let o = clusters
                    .iter()
                    .find(|x| x["name"] == other_name.as_str())
                    .unwrap_or_else(|| panic!("c{c}/n{n} does not know {other_name}: {st}"));
                assert_eq!(o["connected"], true, "{o}");
                assert_eq!(o["synced"], true, "{o}");
                assert!(
                    o["endpoints"].is_null(),
                    "c{c}/n{n} dials {other_name}: {o}"
                );
                assert_eq!(o["badValues"], 0, "{o}");
            }
            // The mirror refused nothing.
            let (code, metrics) = http_get(mesh.apiserver_status(c), "/metrics").unwrap();
            assert_eq!(code, 200);
            let refused = metrics.lines().find(|l| {
                l.starts_with(&format!(
                    "clustermesh_apiserver_remote_bad_values_total{{cluster=\"{other_name}\"}}"
                ))
            });
            assert!(
                refused.is_none_or(|l| l.ends_with(" 0")),
                "c{c}'s mirror refused values: {refused:?}"
            );
        }

        // Drained, c1's nodes program c2's backends under c2's id (learnt from the mirrored config).
        mesh.write_service(1, EndpointState::Terminating).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while [1, 2]
            .iter()
            .any(|&n| support::programmed_cluster_ids(&mesh, 1, n) != vec![2])
        {
            assert!(
                Instant::now() < deadline,
                "c1's nodes did not program c2's backends with id 2: {:?} {:?}",
                support::programmed_cluster_ids(&mesh, 1, 1),
                support::programmed_cluster_ids(&mesh, 1, 2)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        mesh.write_service(1, EndpointState::Ready).unwrap();
        mesh.teardown().expect("teardown");
    });
}
