//! A multi-member etcd with a member down: node-sync's connection to it must work every time.
//! etcd-client balances over every endpoint it is given and keeps sending to one that refuses
//! connections; node-sync connects to one member that answers (from a random start).

mod support;

use std::time::Duration;

use node_sync::cluster::ClusterSource;
use node_sync::connect::connect;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_among_the_endpoints_never_breaks_a_connect() {
    let etcd = Etcd::start().await;
    etcd.client().await.put("k", "v", None).await.unwrap();
    let dead = |_| format!("http://127.0.0.1:{}", free_port());
    let source = ClusterSource {
        name: c("c2"),
        expected_id: None,
        endpoints: vec![dead(1), etcd.url(), dead(2)],
        tls: None,
    };
    // Every connect (from whichever member it starts) gives a client whose requests all work.
    for attempt in 0..12 {
        let mut client = connect(&source, Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("connect {attempt}: {e}"));
        for _ in 0..5 {
            let got = tokio::time::timeout(Duration::from_secs(2), client.get("k", None))
                .await
                .unwrap_or_else(|_| panic!("connect {attempt}: a request timed out"))
                .unwrap_or_else(|e| panic!("connect {attempt}: a request failed: {e}"));
            assert_eq!(got.kvs().len(), 1);
        }
    }
    // No member answers: the error names each one.
    let none = ClusterSource {
        endpoints: vec![dead(3), dead(4)],
        ..source
    };
    let Err(err) = connect(&none, Duration::from_secs(2)).await else {
        panic!("connected with every member down");
    };
    let err = err.to_string();
    for ep in &none.endpoints {
        assert!(err.contains(ep.as_str()), "{err}");
    }
}
