//! Backends failing under a steady stream of new connections from clients in both clusters:
//! a graceful drain (zero failed connects), a SIGKILL of one backend and of a whole cluster's
//! backends (failed connects only until the health checks notice), and every node's maps equal to
//! the model within the settle budget (one second) after each step. Once in the normal mode, once in
//! KVStoreMesh mode (apiservers mirror their remotes, node-syncs read only their local etcd).

use std::time::Duration;

use anyhow::{Result, ensure};
use chaos_tests::{
    ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, print_reports, settle_budget,
};

const INTERVAL: Duration = Duration::from_millis(10);

#[test]
fn backend_graceful_stop_and_sigkill() -> Result<()> {
    scenario(UpOptions::new("cx-backend", 2, 2))
}

#[test]
fn backend_graceful_stop_and_sigkill_kvstoremesh() -> Result<()> {
    scenario(UpOptions::new("cx-kvsbackend", 2, 2).kvstoremesh())
}

fn scenario(opts: UpOptions) -> Result<()> {
    let mut m = ChaosMesh::up(opts)?;
    let budget = settle_budget();

    // Graceful: drain cluster 1 (terminating), stop its backends, start them, publish ready.
    let t = Traffic::start(&m, INTERVAL)?;
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] drain published: maps moved in {:?}", c.took);
    std::thread::sleep(Duration::from_millis(300));
    for n in 1..=2 {
        m.stop_backend(1, n)?;
    }
    std::thread::sleep(Duration::from_millis(800));
    for n in 1..=2 {
        m.start_backend(1, n)?;
    }
    m.publish_cluster(1, Published::Ready)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] ready published: maps back in {:?}", c.took);
    std::thread::sleep(Duration::from_millis(300));
    let r = t.stop();
    assert_no_failures(&r, "graceful stop of cluster 1's backends")?;
    ensure!(
        r[0].landed.keys().any(|b| b.starts_with("c2-")),
        "the client in cluster 1 never landed on cluster 2 during the drain: {}",
        r[0]
    );

    // SIGKILL one backend: connects to it fail until its node-sync's health checks notice.
    let t = Traffic::start(&m, INTERVAL)?;
    m.kill_backend(1, 2)?;
    let c = m.converge(Duration::from_secs(2))?;
    eprintln!("[chaos] c1-n2 SIGKILLed: out of the maps in {:?}", c.took);
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(500));
    assert_no_failures(
        &t.report_since(&after),
        "after the dead backend left the maps",
    )?;
    m.start_backend(1, 2)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] c1-n2 restarted: back in the maps in {:?}", c.took);
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(500));
    assert_no_failures(&t.report_since(&after), "after the backend came back")?;
    let r = t.stop();
    print_reports(&r, "SIGKILL of c1-n2 (whole step)");
    ensure!(
        r[1].failed == 0,
        "the client in cluster 2 saw failures: {}",
        r[1]
    );

    // SIGKILL every backend of cluster 1: failover to cluster 2.
    let t = Traffic::start(&m, INTERVAL)?;
    for n in 1..=2 {
        m.kill_backend(1, n)?;
    }
    let c = m.converge(Duration::from_secs(2))?;
    eprintln!(
        "[chaos] cluster 1's backends SIGKILLed: failed over in {:?}",
        c.took
    );
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(500));
    let r = t.report_since(&after);
    assert_no_failures(&r, "after failover to cluster 2")?;
    ensure!(
        r[0].landed.keys().all(|b| b.starts_with("c2-")),
        "after failover the client in cluster 1 must land on cluster 2: {}",
        r[0]
    );
    for n in 1..=2 {
        m.start_backend(1, n)?;
    }
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] cluster 1's backends restarted: failed back in {:?}",
        c.took
    );
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(500));
    assert_no_failures(&t.report_since(&after), "after failback")?;
    let r = t.stop();
    print_reports(&r, "SIGKILL of cluster 1 (whole step)");
    ensure!(
        r[1].failed == 0,
        "the client in cluster 2 saw failures: {}",
        r[1]
    );
    Ok(())
}
