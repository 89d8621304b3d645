//! The network between the clusters: a partition (then heal), and 200 ms latency each way with 5 %
//! loss. Local traffic must not notice the partition (zero failed connects); after the heal the
//! maps equal the model within the settle budget and a failover (cluster 1 drained) works across
//! the healed link. Under latency and loss, a drain of cluster 1 still reaches cluster 1's nodes
//! within the budget (the remote backends were known before); connects that then cross the
//! impaired link can fail when a SYN is lost (the client gives up after 1 s, the SYN retransmit
//! comes at 1 s), so the test bounds them instead of requiring none.

use std::time::Duration;

use anyhow::{Result, ensure};
use chaos_tests::{
    ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, print_reports, settle_budget,
};

#[test]
fn partition_heal_and_latency_loss_between_clusters() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-network", 2, 2).vxlan())?;
    let budget = settle_budget();

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.partition(1, 2)?;
    std::thread::sleep(Duration::from_secs(3));
    m.converge(budget)?;
    m.heal(1, 2)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] healed: maps right in {:?}", c.took);
    // The healed link carries a failover: cluster 1 drained -> cluster 2's backends.
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] drain after heal: failed over in {:?}", c.took);
    std::thread::sleep(Duration::from_millis(500));
    m.publish_cluster(1, Published::Ready)?;
    m.converge(budget)?;
    std::thread::sleep(Duration::from_millis(300));
    let r = t.stop();
    assert_no_failures(&r, "partition and heal")?;
    ensure!(
        r[0].landed.keys().any(|b| b.starts_with("c2-")),
        "the client in cluster 1 never reached cluster 2 after the heal: {}",
        r[0]
    );

    let t = Traffic::start(&m, Duration::from_millis(20))?;
    m.mesh()
        .lab()
        .set_latency_loss(1, 2, Duration::from_millis(200), 5.0)?;
    std::thread::sleep(Duration::from_secs(2));
    let local_only = t.report_since(&Default::default());
    assert_no_failures(
        &local_only,
        "local traffic under 200 ms + 5 % loss between clusters",
    )?;
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] drain under latency+loss: failed over in {:?}",
        c.took
    );
    let cross = t.mark();
    std::thread::sleep(Duration::from_secs(3));
    let r = t.report_since(&cross);
    print_reports(&r, "cross-cluster connects under 200 ms + 5 % loss");
    ensure!(
        r[1].failed == 0,
        "the client in cluster 2 (local traffic) saw failures: {}",
        r[1]
    );
    // A probe's exchange needs about five crossings of the lossy link in time (SYN, SYN-ACK,
    // request, response, and their ACKs' effect) at 200 ms a way, 800 ms without loss; one lost
    // packet costs a retransmission (the SYN's after 1 s) and pushes it past the probe's 1 s
    // timeout: 1 - 0.95^5 = 23 % expected, and ~109 samples spread it by +-4 %. Seen: 16 % and 28 %;
    // 25 % (the bound before) failed a CI run. 45 % still catches a mesh that sends clients astray.
    ensure!(
        r[0].total > 0 && (r[0].failed as f64) <= 0.45 * r[0].total as f64,
        "more cross-cluster connects failed than 5 % loss explains: {}",
        r[0]
    );
    m.publish_cluster(1, Published::Ready)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] ready under latency+loss: failed back in {:?}",
        c.took
    );
    m.mesh().lab().clear_impairment(1, 2)?;
    m.converge(budget)?;
    t.stop();
    Ok(())
}
