//! Control-plane crashes under traffic: cluster 1's clustermesh-apiserver SIGKILLed and restarted,
//! then cluster 1's etcd SIGKILLed and restarted. The datapath does not depend on either, so no
//! connect may fail; after each restart the maps must equal the model within the settle budget.
//! Once the control plane is back (the restarted apiserver leads again: it waits for the dead
//! replica's leader lease to lapse; every node-sync reconnected; both times are printed), a change
//! (cluster 1 drained, then ready again) must reach every node within the budget: the watches came
//! back.

use std::time::Duration;

use anyhow::Result;
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};

fn change_propagates(m: &mut ChaosMesh, what: &str) -> Result<()> {
    let budget = settle_budget();
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] {what}: drain after recovery reached every node in {:?}",
        c.took
    );
    std::thread::sleep(Duration::from_millis(300));
    m.publish_cluster(1, Published::Ready)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] {what}: ready after recovery reached every node in {:?}",
        c.took
    );
    Ok(())
}

#[test]
fn apiserver_and_etcd_sigkill_and_restart() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-ctlplane", 2, 2))?;
    let budget = settle_budget();

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.kill_apiserver(1)?;
    std::thread::sleep(Duration::from_millis(1500));
    m.start_apiserver(1)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] apiserver restarted: maps right {:?} after", c.took);
    let back = m.wait_control_plane(1, Duration::from_secs(15))?;
    eprintln!(
        "[chaos] apiserver restarted: leader and written {back:?} after its start (the dead one's lease lapses first)"
    );
    change_propagates(&mut m, "apiserver restart")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "apiserver SIGKILL and restart")?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.kill_etcd(1)?;
    std::thread::sleep(Duration::from_millis(1500));
    m.start_etcd(1)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] etcd restarted: maps right {:?} after", c.took);
    let back = m.wait_control_plane(1, Duration::from_secs(15))?;
    eprintln!(
        "[chaos] etcd restarted: apiserver leader and every node-sync connected {back:?} after etcd was healthy"
    );
    change_propagates(&mut m, "etcd restart")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "etcd SIGKILL and restart")?;
    Ok(())
}
