//! A whole node's namespace cut off: node 2 of cluster 1 can neither reach nor be reached (nft drop
//! rules on its link, inside its namespace), while its processes (node-sync, backend) keep running.
//!
//! Only that node's own node-sync probes its backend, so nobody can report it failing. What ends
//! the failed connects is its health publication lapsing: its lease (10 s TTL) expires, its
//! verdicts vanish from etcd, and every other node-sync's merge index counts the backends of a node
//! that stopped publishing as failing while others are usable. Asserted:
//!
//! * the client in cluster 1 (on node 1) sees failed connects only until the lapse reached its
//!   maps (bounded; the count is printed), none afterwards; the client in cluster 2 sees none;
//! * within the settle budget after the lapse, every other node's maps equal the model (cluster
//!   1's nodes without c1-n2);
//! * after the heal, once the node publishes again (the time is printed), every node's maps,
//!   the healed node's included, equal the model within the budget, and the client lands on
//!   c1-n2 again without a failed connect.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chaos_tests::{
    ChaosMesh, Traffic, UpOptions, assert_no_failures, print_reports, settle_budget,
};

#[test]
fn a_cut_off_node_leaves_selection_when_its_health_lapses_and_comes_back_after_heal() -> Result<()>
{
    let mut m = ChaosMesh::up(UpOptions::new("cx-nodeiso", 2, 2))?;
    let budget = settle_budget();
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let t0 = t.mark();
    let cut = Instant::now();
    m.isolate_node(1, 2)?;
    let lapse = m.wait_health_lapsed(1, 2, Duration::from_secs(15))?;
    eprintln!("[chaos] c1-n2 cut off: its health lease lapsed {lapse:?} later");
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] c1-n2's backend out of every other node's maps {:?} after the lapse ({} nodes compared)",
        c.took, c.compared
    );
    ensure!(
        c.compared == 3,
        "expected 3 nodes compared, got {}",
        c.compared
    );
    // Connects that failed: those steered to c1-n2 before its lapse reached the maps (each
    // times out after the probe's 1 s, so some are still in flight now; counted at the end).
    let window = cut.elapsed();
    let during = t.report_since(&t0);
    ensure!(
        during[1].failed == 0,
        "the client in cluster 2 saw failures: {}",
        during[1]
    );
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(1000));
    let r = t.report_since(&after);
    assert_no_failures(&r, "after c1-n2's lapse reached the maps")?;
    ensure!(
        !r[0].landed.contains_key("c1-n2"),
        "the client in cluster 1 still lands on the cut-off node: {}",
        r[0]
    );

    m.heal_node(1, 2)?;
    let back = m.wait_health_published(1, 2, Duration::from_secs(20))?;
    eprintln!("[chaos] c1-n2 healed: publishes health verdicts again {back:?} later");
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] after the heal every node's maps (c1-n2's included) equal the model {:?} after it published ({} nodes)",
        c.took, c.compared
    );
    ensure!(
        c.compared == 4,
        "expected 4 nodes compared, got {}",
        c.compared
    );
    let after = t.mark();
    std::thread::sleep(Duration::from_millis(1000));
    let r = t.report_since(&after);
    assert_no_failures(&r, "after the heal")?;
    ensure!(
        r[0].landed.contains_key("c1-n2"),
        "the client in cluster 1 never reached c1-n2 again: {}",
        r[0]
    );
    let all = t.stop();
    print_reports(&all, "node isolation (whole test)");
    // Bounded: at most every attempt from the cut until the maps dropped c1-n2 (one per 10 ms),
    // the ones still in flight then included (1 s timeout).
    let bound = (window + Duration::from_secs(1)).as_millis() as u64 / 10;
    ensure!(
        all[0].failed <= bound,
        "the client in cluster 1 saw {} failed connects, more than the {bound} attempts made from the cut until c1-n2 left the maps ({window:?}) plus 1 s",
        all[0].failed
    );
    ensure!(
        all[1].failed == 0,
        "the client in cluster 2 saw failures: {}",
        all[1]
    );
    eprintln!(
        "[chaos] node isolation: {} failed connects in cluster 1, all within the {window:?} from the cut until the lapse reached the maps",
        all[0].failed
    );
    Ok(())
}
