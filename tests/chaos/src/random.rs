//! Randomized fault runs: a seed picks a sequence of fault episodes; every episode applies a fault
//! while clients keep connecting, ends it, and then the maps of every node must equal the model
//! within the settle budget. The seed is printed first, so a failure replays with `--seed`.

use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{ChaosMesh, Published, Traffic};

/// One fault episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a backend, later start it again.
    BackendKill { c: usize, n: usize },
    /// Drain a cluster's endpoints (terminating), stop its backends, start them, publish ready.
    GracefulDrain { c: usize },
    /// SIGKILL a node-sync, start it again.
    NodeSyncRestart { c: usize, n: usize },
    /// SIGKILL an apiserver, start it again.
    ApiserverRestart { c: usize },
    /// SIGKILL an etcd, start it again.
    EtcdRestart { c: usize },
    /// Partition two clusters, heal.
    Partition { a: usize, b: usize },
    /// 200 ms each way and 5 % loss between two clusters, then clear.
    LatencyLoss { a: usize, b: usize },
    /// Crash a whole node, mark its endpoint not ready (as Kubernetes would), bring it back.
    NodeCrash { c: usize, n: usize },
    /// Cut a node's namespace off the network (its processes keep running) for less than its
    /// health lease, heal. (A cut long enough for the lease to lapse is `node_isolation.rs`.)
    NodeIsolation { c: usize, n: usize },
}

/// Pick a fault for a mesh of `clusters` x `nodes`.
pub fn pick(rng: &mut StdRng, clusters: usize, nodes: usize) -> Fault {
    let c = rng.random_range(1..=clusters);
    let n = rng.random_range(1..=nodes);
    let other = {
        let o = rng.random_range(1..clusters.max(2));
        if o >= c { o + 1 } else { o }
    };
    let (a, b) = (c.min(other), c.max(other));
    match rng.random_range(0..9) {
        0 => Fault::BackendKill { c, n },
        1 => Fault::GracefulDrain { c },
        2 => Fault::NodeSyncRestart { c, n },
        3 => Fault::ApiserverRestart { c },
        4 => Fault::EtcdRestart { c },
        5 if clusters > 1 => Fault::Partition { a, b },
        6 if clusters > 1 => Fault::LatencyLoss { a, b },
        // Not node 1: the cluster's client runs there.
        7 if nodes > 1 => Fault::NodeCrash {
            c,
            n: 2 + (n - 1) % (nodes - 1),
        },
        8 if nodes > 1 => Fault::NodeIsolation {
            c,
            n: 2 + (n - 1) % (nodes - 1),
        },
        _ => Fault::BackendKill { c, n },
    }
}

/// What one episode showed.
#[derive(Debug, Clone)]
pub struct Episode {
    /// The fault.
    pub fault: Fault,
    /// Time from the end of the fault until the maps matched.
    pub settle: Duration,
    /// For control-plane restarts: from the restart until the apiserver led again and every
    /// node-sync was connected (the settle time counts from then).
    pub recovery: Option<Duration>,
    /// Nodes compared / left to timing by the model.
    pub compared: usize,
    /// Nodes the model could not decide.
    pub unknown: usize,
    /// Failed connects of all clients during the episode.
    pub failed_connects: u64,
    /// Connects during the episode.
    pub connects: u64,
}

/// Run `steps` episodes chosen by `seed` on `m`. Stops at the first episode whose maps do not
/// match the model within `budget`; the error names the seed and the episode.
pub fn run(m: &mut ChaosMesh, seed: u64, steps: usize, budget: Duration) -> Result<Vec<Episode>> {
    eprintln!("[chaos] random run: seed {seed}, {steps} episodes (replay with --seed {seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let traffic = Traffic::start(m, Duration::from_millis(20))?;
    let mut out = Vec::new();
    for i in 0..steps {
        let fault = pick(&mut rng, m.model.clusters, m.model.nodes);
        let hold = Duration::from_millis(rng.random_range(300..2000));
        // Half the episodes run while one cluster is drained, so its nodes depend on the others
        // (a partition, a remote etcd or apiserver crash then matters to their maps).
        // (Not with a graceful drain: two drained clusters whose backends stop is an outage the
        // operator made, not a fault.)
        let drained = (m.model.clusters > 1 && rng.random_bool(0.5))
            .then(|| rng.random_range(1..=m.model.clusters))
            .filter(|_| !matches!(fault, Fault::GracefulDrain { .. }));
        let mark = traffic.mark();
        let ep = (|| {
            if let Some(d) = drained {
                m.publish_cluster(d, Published::Terminating)?;
                m.converge(budget).context("after the background drain")?;
            }
            let ep = episode(m, fault, hold, budget)?;
            if let Some(d) = drained {
                m.publish_cluster(d, Published::Ready)?;
                m.converge(budget).context("after the background drain ended")?;
            }
            anyhow::Ok(ep)
        })()
        .with_context(|| {
            format!(
                "seed {seed}, episode {}/{steps}: {fault:?} (hold {hold:?}, drained cluster {drained:?})",
                i + 1
            )
        })?;
        let reports = traffic.report_since(&mark);
        let ep = Episode {
            failed_connects: reports.iter().map(|r| r.failed).sum(),
            connects: reports.iter().map(|r| r.total).sum(),
            ..ep
        };
        eprintln!(
            "[chaos] seed {seed} #{:>3} {:<45} drained {:<7} recovered {:>6} settled in {:>4} ms ({} nodes compared, {} unknown), {} / {} connects failed",
            i + 1,
            format!("{fault:?}"),
            format!("{drained:?}"),
            ep.recovery
                .map_or("-".to_string(), |d| format!("{}ms", d.as_millis())),
            ep.settle.as_millis(),
            ep.compared,
            ep.unknown,
            ep.failed_connects,
            ep.connects
        );
        out.push(ep);
    }
    traffic.stop();
    Ok(out)
}

fn episode(m: &mut ChaosMesh, fault: Fault, hold: Duration, budget: Duration) -> Result<Episode> {
    // A mid-fault check where the rules give a definite answer soon (health checks, drains).
    let mid = Duration::from_secs(5);
    let mut recovery = None;
    match fault {
        Fault::BackendKill { c, n } => {
            m.kill_backend(c, n)?;
            m.converge(mid).context("while the backend is down")?;
            std::thread::sleep(hold);
            m.start_backend(c, n)?;
        }
        Fault::GracefulDrain { c } => {
            m.publish_cluster(c, Published::Terminating)?;
            m.converge(mid).context("after the drain was published")?;
            for n in 1..=m.model.nodes {
                m.stop_backend(c, n)?;
            }
            std::thread::sleep(hold);
            for n in 1..=m.model.nodes {
                m.start_backend(c, n)?;
            }
            m.publish_cluster(c, Published::Ready)?;
        }
        Fault::NodeSyncRestart { c, n } => {
            m.kill_node_sync(c, n)?;
            std::thread::sleep(hold);
            m.start_node_sync(c, n)?;
        }
        Fault::ApiserverRestart { c } => {
            m.kill_apiserver(c)?;
            std::thread::sleep(hold);
            m.start_apiserver(c)?;
            // The fault ends when the restarted apiserver leads again (after the dead one's lease
            // lapses): until then nothing the cluster publishes reaches etcd.
            recovery = Some(m.wait_control_plane(c, Duration::from_secs(20))?);
        }
        Fault::EtcdRestart { c } => {
            m.kill_etcd(c)?;
            std::thread::sleep(hold);
            m.start_etcd(c)?;
            // ... when the apiserver and every node-sync are connected again.
            recovery = Some(m.wait_control_plane(c, Duration::from_secs(20))?);
        }
        Fault::Partition { a, b } => {
            m.partition(a, b)?;
            std::thread::sleep(hold);
            m.heal(a, b)?;
        }
        Fault::LatencyLoss { a, b } => {
            m.mesh()
                .lab()
                .set_latency_loss(a, b, Duration::from_millis(200), 5.0)?;
            std::thread::sleep(hold);
            m.mesh().lab().clear_impairment(a, b)?;
        }
        Fault::NodeCrash { c, n } => {
            m.crash_node(c, n)?;
            m.publish_node(c, n, Published::NotReady)?;
            m.converge(mid)
                .context("after the crashed node's endpoint went not ready")?;
            std::thread::sleep(hold);
            m.restore_node(c, n)?;
        }
        Fault::NodeIsolation { c, n } => {
            m.isolate_node(c, n)?;
            // Holds stay far below the 10 s lease: nobody stops counting its backend.
            std::thread::sleep(hold);
            m.heal_node(c, n)?;
            // ... when its node-sync is connected again to every cluster.
            recovery = Some(m.wait_control_plane(c, Duration::from_secs(20))?);
        }
    }
    let conv = m.converge(budget).context("after the fault ended")?;
    Ok(Episode {
        fault,
        settle: conv.took,
        recovery,
        compared: conv.compared,
        unknown: conv.unknown,
        failed_connects: 0,
        connects: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_picks_the_same_faults_every_time() {
        let a: Vec<Fault> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..20).map(|_| pick(&mut r, 2, 2)).collect()
        };
        let b: Vec<Fault> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..20).map(|_| pick(&mut r, 2, 2)).collect()
        };
        assert_eq!(a, b);
        for f in a {
            if let Fault::Partition { a, b } | Fault::LatencyLoss { a, b } = f {
                assert!(a < b && b <= 2);
            }
        }
    }
}
