//! Ordered failover on three clusters: cluster 1's service says `failover-order: c2,c3`. Drained,
//! cluster 1's client goes to cluster 2 only; cluster 2 drained too, to cluster 3; cluster 2 ready
//! again, back to cluster 2 (failback climbs the order); cluster 1 ready, home. Every step is
//! graceful: no connect fails. (The chaos model knows only "all remotes together", so this test
//! compares cluster 1's maps with the order itself.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures};

/// Wait until cluster 1's node maps hold exactly the backends of `clusters`.
fn wait_clusters(m: &ChaosMesh, clusters: &[usize], what: &str) -> Result<Duration> {
    let want: BTreeSet<_> = clusters.iter().map(|c| m.bk(*c, 1)).collect();
    let t0 = Instant::now();
    loop {
        let got = m.observed(1, 1)?;
        if got == want {
            eprintln!(
                "[chaos] {what}: cluster 1's maps follow the order in {:?}",
                t0.elapsed()
            );
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(2) {
            let doc = m.mesh().node_sync_status_json(1, 1)?;
            let manifest =
                std::fs::read_to_string(m.mesh().lab().state_dir().join("manifests/c1/echo.yaml"))
                    .unwrap_or_default();
            bail!(
                "{what}: cluster 1's maps hold {got:?}, the order wants {want:?}; node-sync c1-n1 says {}; manifest:\n{manifest}",
                doc["services"]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn failover_follows_the_order_and_failback_climbs_it() -> Result<()> {
    let mut opts = UpOptions::new("cx-ordered", 3, 1);
    opts.cluster_service_annotations.insert(
        1,
        vec![("clustermesh.io/failover-order".into(), "c2,c3".into())],
    );
    let mut m = ChaosMesh::up(opts)?;
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.publish_cluster(1, Published::Terminating)?;
    wait_clusters(&m, &[2], "c1 drained")?;
    m.publish_cluster(2, Published::Terminating)?;
    wait_clusters(&m, &[3], "c1 and c2 drained")?;
    m.publish_cluster(2, Published::Ready)?;
    wait_clusters(&m, &[2], "c2 ready again")?;
    m.publish_cluster(1, Published::Ready)?;
    wait_clusters(&m, &[1], "c1 ready again")?;
    std::thread::sleep(Duration::from_millis(300));
    let r = t.stop();
    assert_no_failures(&r, "ordered failover and failback")?;
    let mut seen = BTreeSet::new();
    for b in r[0].landed.keys() {
        seen.insert(b.split('-').next().unwrap_or_default().to_owned());
    }
    if seen != BTreeSet::from(["c1".to_owned(), "c2".to_owned(), "c3".to_owned()]) {
        bail!(
            "the client in cluster 1 did not go through c2 and c3: {}",
            r[0]
        );
    }
    Ok(())
}
