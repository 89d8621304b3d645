//! A whole remote cluster cut off (data and control plane), and its control plane alone.
//!
//! Cut off: the nodes of the other cluster stop getting answers from its backends; their own
//! reachability probes (`node-sync/src/reach.rs`) take the cluster out of their selection within a
//! second, under affinity `none` (both clusters' backends in use) and `local` (failed over to the
//! remotes). No connect started more than 1 s after the cut fails; after the heal the backends are
//! back within 1 s. The control plane alone cut off (etcd and apiserver unreachable, backends
//! reachable): nothing moves, no connect fails.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chaos_tests::{
    ChaosMesh, ClientReport, Published, Traffic, UpOptions, assert_no_failures, print_reports,
    settle_budget,
};

/// How long after `cut_ms` (probe clock) the last failed connect of `r` started, when that is
/// more than `limit_ms`.
fn late_failures(r: &ClientReport, cut_ms: f64, limit_ms: f64) -> Option<f64> {
    r.last_failure_ms
        .map(|t| t - cut_ms)
        .filter(|late| *late > limit_ms)
}

/// Cut clusters 1 and 2 apart while the client of cluster 1 uses cluster 2's backends; check the
/// client's failures end within 1 s, the maps follow the model, and the heal brings cluster 2 back
/// within 1 s. Returns (last failure after the cut in ms, back after the heal).
fn cut_and_heal(m: &mut ChaosMesh, what: &str) -> Result<(f64, Duration)> {
    let t = Traffic::start(m, Duration::from_millis(10))?;
    // Under affinity none cluster 2 takes a share, not all: one landing there says it is in use
    // (five in a row, as for a failover, happened by chance only, and made this flaky).
    let in_a_row = if m.model.affinity_none { 1 } else { 5 };
    m.mesh()
        .wait_for_landings(
            1,
            1,
            Duration::from_secs(10),
            |b| b.starts_with("c2-"),
            in_a_row,
        )
        .with_context(|| {
            format!("{what}: the client in cluster 1 does not use cluster 2 before the cut")
        })?;
    let cut = t.mark();
    m.partition(1, 2)?;
    let c = m.converge(Duration::from_secs(2))?;
    eprintln!("[chaos] {what}: cut off: maps right in {:?}", c.took);
    std::thread::sleep(Duration::from_secs(3));
    let during = t.report_since(&cut);
    print_reports(&during, &format!("{what}: cut off"));
    let last_failure = during[0].last_failure_ms.map_or(0.0, |t| t - cut[&1]);
    ensure!(
        late_failures(&during[0], cut[&1], 1000.0).is_none(),
        "{what}: a connect started {last_failure:.0} ms after the cut failed (limit 1 s): {}",
        during[0]
    );
    ensure!(during[0].total > 0, "{what}: no connect during the cut");
    let healed = t.mark();
    let heal_at = Instant::now();
    m.heal(1, 2)?;
    let c = m.converge(Duration::from_secs(1))?;
    let back = heal_at.elapsed();
    eprintln!("[chaos] {what}: healed: maps right in {:?}", c.took);
    std::thread::sleep(Duration::from_millis(1500));
    let after = t.report_since(&healed);
    ensure!(
        after[0].landed.keys().any(|b| b.starts_with("c2-")),
        "{what}: cluster 2's backends did not come back for the client in cluster 1: {}",
        after[0]
    );
    assert_no_failures(&after, &format!("{what}: after the heal"))?;
    t.stop();
    Ok((last_failure, back))
}

#[test]
fn a_remote_cluster_cut_off_leaves_within_a_second_under_affinity_none() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-cut-none", 2, 2).affinity_none())?;
    // Twice: what a heal leaves behind (the probes' learnt round trip, rounds still in flight) must
    // not slow the next cut's detection.
    for round in ["first cut", "second cut"] {
        let (last, back) = cut_and_heal(&mut m, &format!("affinity none, {round}"))?;
        eprintln!(
            "[chaos] affinity none, {round}: last failed connect {last:.0} ms after the cut, back {back:?} after the heal"
        );
    }
    Ok(())
}

#[test]
fn a_remote_cluster_cut_off_leaves_within_a_second_in_kvstoremesh_mode() -> Result<()> {
    // The node-syncs read only their local KVStoreMesh cache; the cut is seen in the data plane.
    let mut m = ChaosMesh::up(
        UpOptions::new("cx-cut-kvs", 2, 2)
            .affinity_none()
            .kvstoremesh(),
    )?;
    let (last, back) = cut_and_heal(&mut m, "KVStoreMesh, affinity none")?;
    eprintln!(
        "[chaos] KVStoreMesh: last failed connect {last:.0} ms after the cut, back {back:?} after the heal"
    );
    Ok(())
}

#[test]
fn a_remote_cluster_cut_off_leaves_within_a_second_under_affinity_local() -> Result<()> {
    // Three clusters of one node; cluster 1 drained, so its client uses clusters 2 and 3.
    let mut m = ChaosMesh::up(UpOptions::new("cx-cut-local", 3, 1))?;
    m.publish_cluster(1, Published::Terminating)?;
    m.converge(settle_budget())?;
    let (last, back) = cut_and_heal(&mut m, "affinity local, failed over")?;
    eprintln!(
        "[chaos] affinity local: last failed connect {last:.0} ms after the cut, back {back:?} after the heal"
    );
    Ok(())
}

#[test]
fn a_control_plane_cut_keeps_the_remote_backends_serving() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-cut-cp", 2, 2).affinity_none())?;
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let cut = t.mark();
    m.partition_control_plane(1, 2)?;
    // Past the heartbeat timeout (5 s): the clusters are no longer live to each other.
    std::thread::sleep(Duration::from_secs(7));
    let during = t.report_since(&cut);
    assert_no_failures(&during, "control plane cut off")?;
    for (c, other) in [(0, "c2-"), (1, "c1-")] {
        ensure!(
            during[c].landed.keys().any(|b| b.starts_with(other)),
            "the client in cluster {} stopped using the other cluster's backends: {}",
            c + 1,
            during[c]
        );
    }
    m.converge(settle_budget())?;
    m.heal_control_plane(1, 2)?;
    m.converge(settle_budget())?;
    let r = t.stop();
    assert_no_failures(&r, "control plane cut and heal")?;
    Ok(())
}
