//! A whole node's namespace cut off: every process of node 2 in cluster 1 (node-sync, backend)
//! SIGKILLed at once. Nobody is left to report the backend failing (its own node-sync ran the health
//! checks), but the client node's kernel sees its connects to it fail: passive detection (a probe
//! confirming the kernel's mark) takes it out of that node's maps within seconds. Then Kubernetes
//! marks the endpoint not ready (here: the test publishes it, as the node lifecycle controller would
//! after its grace period); from then on the maps must hold the model within the settle budget and
//! no connect may fail. Bringing the node back must put it back within the budget (the client
//! node's probes find it answering), again without a failed connect.

use std::time::Duration;

use anyhow::{Result, ensure};
use chaos_tests::{
    ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, print_reports, settle_budget,
};

#[test]
fn node_crash_then_endpoint_not_ready_then_back() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-nodecrash", 2, 2))?;
    let budget = settle_budget();
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.crash_node(1, 2)?;
    // Nobody is left to report the backend failing, but the client node's kernel sees its connects
    // to it fail (refused, or the SYN unanswered until its first retransmission timeout, 1 s):
    // passive detection takes it out of that node's maps before Kubernetes marks the endpoint.
    let crashed = std::time::Instant::now();
    loop {
        let now = m.observed(1, 1)?;
        if !now.contains(&m.bk(1, 2)) {
            eprintln!(
                "[chaos] crashed node's backend out of c1-n1's maps by passive detection {:?} after the crash",
                crashed.elapsed()
            );
            break;
        }
        ensure!(
            crashed.elapsed() < Duration::from_secs(3),
            "with nobody reporting it, c1-n2 should leave c1-n1's maps on the kernel's failed connects; maps hold {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.publish_node(1, 2, Published::NotReady)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] crashed node's endpoint not ready: out of the maps in {:?}",
        c.took
    );
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(700));
    assert_no_failures(
        &t.report_since(&after),
        "after the crashed node's endpoint went not ready",
    )?;

    m.restore_node(1, 2)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] node back: in the maps in {:?}", c.took);
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(700));
    let r = t.report_since(&after);
    assert_no_failures(&r, "after the node came back")?;
    ensure!(
        r[0].landed.contains_key("c1-n2"),
        "the client in cluster 1 never reached c1-n2 again: {}",
        r[0]
    );
    let r = t.stop();
    print_reports(
        &r,
        "node crash (whole test; failures are the connects to the dead node before it was marked)",
    );
    ensure!(
        r[1].failed == 0,
        "the client in cluster 2 saw failures: {}",
        r[1]
    );
    Ok(())
}
