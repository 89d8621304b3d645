//! A three-member etcd losing its leader: cluster 1's etcd runs three members (TLS for clients and
//! peers; the apiserver and node-syncs of cluster 1, and cluster 2's node-syncs through the
//! endpoints cluster 1 advertises, know all three). Under traffic the current leader (found
//! through etcd's maintenance status API) is SIGKILLed. Asserted:
//!
//! * the two others elect a new leader (the time is printed);
//! * no connect fails (no backend changed) and every node's maps equal the model within the
//!   settle budget after the new leader is up;
//! * the killed member restarts on its data and rejoins (it follows the new leader); then the
//!   apiserver leads, every node-sync is connected, the maps equal the model again (what changed
//!   while the member was down catches up), and a change (cluster 1 drained, then ready) reaches
//!   every node within the budget.
//!
//! * while the member is down, the control plane is whole (apiserver leads, every node-sync
//!   connected) and a change reaches every node: clients talk to one member that answers.
//!
//! `LabMesh` builds the lab spec itself, so the member count reaches mesh-lab through
//! `MESH_LAB_ETCD_MEMBERS`: the test runs itself again as a child process with it set.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};

const NAME: &str = "three_member_etcd_loses_its_leader";

fn wait_leader(m: &ChaosMesh, not: Option<usize>, timeout: Duration) -> Result<usize> {
    let lab = m.mesh().lab();
    let started = Instant::now();
    loop {
        if let Some(l) = lab.etcd_leader(1)?
            && Some(l) != not
        {
            return Ok(l);
        }
        if started.elapsed() >= timeout {
            bail!("cluster 1's etcd has no leader (other than {not:?}) after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn change_propagates(m: &mut ChaosMesh, what: &str) -> Result<()> {
    let budget = settle_budget();
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] {what}: drain reached every node in {:?}", c.took);
    std::thread::sleep(Duration::from_millis(300));
    m.publish_cluster(1, Published::Ready)?;
    let c = m.converge(budget)?;
    eprintln!("[chaos] {what}: ready reached every node in {:?}", c.took);
    Ok(())
}

#[test]
fn three_member_etcd_loses_its_leader() -> Result<()> {
    if std::env::var_os(mesh_lab::plan::ETCD_MEMBERS_ENV).is_none() {
        let exe = std::env::current_exe().context("the test binary's path")?;
        let status = Command::new(&exe)
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(mesh_lab::plan::ETCD_MEMBERS_ENV, "1=3")
            .status()
            .with_context(|| format!("run {} again with three etcd members", exe.display()))?;
        ensure!(status.success(), "the three-member run failed ({status})");
        return Ok(());
    }
    let mut m = ChaosMesh::up(UpOptions::new("cx-etcd3", 2, 2))?;
    let budget = settle_budget();
    let lab = m.mesh().lab();
    ensure!(
        lab.etcd_members(1)? == 3,
        "cluster 1's etcd has {} members, expected 3",
        lab.etcd_members(1)?
    );
    let leader = wait_leader(&m, None, Duration::from_secs(10))?;
    eprintln!("[chaos] cluster 1's etcd: member {leader} of 3 leads");

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let killed = Instant::now();
    m.mesh().lab().kill_etcd_member(1, leader)?;
    let new = wait_leader(&m, Some(leader), Duration::from_secs(10))?;
    let elected = killed.elapsed();
    eprintln!("[chaos] leader (member {leader}) SIGKILLed: member {new} elected {elected:?} later");
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] maps equal the model {:?} after the new leader was up ({} nodes)",
        c.took, c.compared
    );
    // With the member still down, the mesh keeps working: the apiserver and every node-sync
    // (cluster 2's too, through the endpoints cluster 1 advertises) talk to a member that answers
    // (mesh_etcd::connect_any_member: etcd-client alone keeps sending to a dead endpoint,
    // etcdv3/etcd-client#39), and a change made now reaches every node. A client that was talking
    // to the killed member notices the broken stream (keepalive) and reconnects with backoff.
    let down_budget = Duration::from_secs(15);
    let back = m.wait_control_plane(1, down_budget).with_context(|| {
        format!("with member {leader} down, the control plane of cluster 1 did not come back")
    })?;
    eprintln!(
        "[chaos] with member {leader} down: apiserver leads, every node-sync connected ({back:?})"
    );
    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(down_budget).with_context(|| {
        format!("with member {leader} down, a drain of cluster 1 did not reach every node")
    })?;
    eprintln!(
        "[chaos] with member {leader} down, a drain of cluster 1 reached every node in {:?}",
        c.took
    );
    m.publish_cluster(1, Published::Ready)?;

    let started = Instant::now();
    m.mesh().lab().start_etcd_member(1, leader)?;
    let st = m.mesh().lab().etcd_member_status(1, leader)?;
    ensure!(
        st.leader != 0 && st.leader != st.member_id,
        "the rejoined member {leader} should follow the new leader: {st:?}"
    );
    eprintln!(
        "[chaos] old leader (member {leader}) restarted and rejoined in {:?} (follows the leader, term {})",
        started.elapsed(),
        st.raft_term
    );
    let back = m.wait_control_plane(1, Duration::from_secs(20))?;
    eprintln!(
        "[chaos] after the rejoin: apiserver leads and every node-sync is connected {back:?} later"
    );
    // What was changed during the gap catches up now (not timed: part of the gap).
    let c = m.converge(Duration::from_secs(10))?;
    eprintln!(
        "[chaos] after the rejoin maps equal the model ({:?})",
        c.took
    );
    change_propagates(&mut m, "after the old leader rejoined")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "etcd leader loss")?;
    Ok(())
}
