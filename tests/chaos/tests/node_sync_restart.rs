//! node-sync SIGKILLed and restarted on the client's own node: the pinned maps keep serving, so no
//! connect may fail; a change made while it is down (an endpoint drained) must be in the maps within
//! the settle budget after the restarted node-sync reports ready.

use std::time::Duration;

use anyhow::{Result, ensure};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};

#[test]
fn node_sync_sigkill_and_restart_loses_no_connect() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-nodesync", 2, 2))?;
    let budget = settle_budget();
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let before = m.observed(1, 1)?;
    m.kill_node_sync(1, 1)?;
    m.kill_node_sync(2, 1)?;
    std::thread::sleep(Duration::from_millis(1000));
    ensure!(
        m.observed(1, 1)? == before,
        "the maps of c1-n1 changed while its node-sync was dead"
    );
    // A change while node-sync is down (c1-n2 drained; its backend keeps running).
    m.publish_node(1, 2, Published::Terminating)?;
    std::thread::sleep(Duration::from_millis(500));
    m.start_node_sync(1, 1)?;
    m.start_node_sync(2, 1)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] node-syncs restarted: maps caught up {:?} after ready",
        c.took
    );
    std::thread::sleep(Duration::from_millis(500));
    m.publish_node(1, 2, Published::Ready)?;
    m.converge(budget)?;
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "node-sync SIGKILL and restart")?;
    Ok(())
}
