//! Data-plane reachability of remote clusters, from this node.
//!
//! Control-plane silence (a broken watch, a late heartbeat) says nothing about whether a remote
//! cluster's backends still answer, and it comes too late: heartbeats are a second apart, and the
//! staleness timer waits `--stale-grace` more. A whole remote cluster cut off (data and control
//! plane) then left its backends selected for about 34 s, and every connect to them hung.
//!
//! So node-sync checks, from this node, the remote backends it actually sends traffic to (those
//! selected on this node), a few per cluster every `--health-interval` (four, or in a large mesh
//! one per cluster whose last round was heard: see [`PROBE_BUDGET`]). A probe is a TCP connect:
//! an answer or a refusal (RST) proves the path works; only *silence* (a timeout, no route) counts
//! against the cluster. When every probe of a cluster is silent for [`DARK_ROUNDS`] rounds in a row
//! (the second round follows the first after a quarter interval), the cluster is *unreachable from
//! this node*: its backends leave this node's selection at once, under every affinity, and the
//! probes go on over all its candidate backends; the first answer brings them back. A
//! control-plane-only cut (its etcd unreachable, its backends answering) changes nothing: no
//! needless failover. The staleness timer stays as the last resort.
//!
//! The timeout follows the path: `--remote-probe-timeout` (default 250 ms) or three times the
//! smoothed round trip of the cluster's answered probes, whichever is longer (at most 2 s); a
//! cluster not yet answered from this node gets 1 s. A far cluster (200 ms each way) is thus not
//! mistaken for a dead one; its cut is seen later, as it must be.
//!
//! Only TCP backends are probed (a UDP backend's silence proves nothing). The verdict is this
//! node's alone and is not published: another node may well reach the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use mesh_model::ClusterName;
use tokio::sync::{mpsc, watch};

/// Silent rounds in a row before a cluster is unreachable.
pub const DARK_ROUNDS: u32 = 2;

/// Backends probed per cluster per round while its reachability is in question (no answer yet, a
/// silent streak, unreachable), and in every round while few clusters are connected.
pub const PROBES_PER_ROUND: usize = 4;

/// Connects per round over the settled clusters (those whose last round was heard): each gets
/// `PROBE_BUDGET / clusters` probes, between 1 and [`PROBES_PER_ROUND`]. With 16 remotes or fewer
/// nothing changes; at 254 remotes a steady round costs 254 connects instead of 1,016 (about 5,000
/// connects/s at the default 200 ms interval, 10 % of a core in the scale simulator). A cut is
/// seen as fast: the first silent probe makes the cluster suspect, and the next round (a quarter
/// interval later) probes [`PROBES_PER_ROUND`] backends, all of which must be silent.
pub const PROBE_BUDGET: usize = 64;

/// Probes for a cluster this round: the full [`PROBES_PER_ROUND`] while its reachability is in
/// question, else its share of [`PROBE_BUDGET`] over the `clusters` probed.
pub fn probes_for(clusters: usize, settled: bool) -> usize {
    if settled {
        (PROBE_BUDGET / clusters.max(1)).clamp(1, PROBES_PER_ROUND)
    } else {
        PROBES_PER_ROUND
    }
}

/// Addresses per cluster the prober takes turns over (a sample spread over the backends selected
/// on this node, see `MergeIndex::remote_probe_sample`).
pub const MAX_TARGETS_PER_CLUSTER: usize = 64;

/// Probe timeout for a cluster with no answered probe yet.
pub const FIRST_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest probe timeout, whatever the round trip.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(2);

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connect succeeded.
    Answered,
    /// The connect was refused (RST) or reset: the path works, the backend does not.
    Refused,
    /// No answer within the timeout, or no route: the path itself may be gone.
    Silent,
}

/// A change of a cluster's reachability from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReachChange {
    /// The cluster.
    pub cluster: ClusterName,
    /// Unreachable now (else reachable again).
    pub unreachable: bool,
    /// The first signal: the first silent probe of the streak (unreachable) or the answer
    /// (reachable again).
    pub since: SystemTime,
}

#[derive(Debug, Default)]
struct ClusterReach {
    dark_rounds: u32,
    first_silent: Option<SystemTime>,
    unreachable: bool,
    cursor: usize,
    /// Smoothed round trip of answered probes (as TCP's SRTT: 7/8 old + 1/8 new).
    srtt: Option<Duration>,
    /// The latest answered round trip (a path that just got slower counts at once).
    last_rtt: Option<Duration>,
    /// When the latest round with an answer (or a refusal) started: a silent round that started
    /// before it is stale (rounds overlap while a cluster is unreachable).
    last_heard: Option<SystemTime>,
}

/// Probe outcomes -> reachability per cluster (pure).
#[derive(Debug, Default)]
pub struct ReachTracker {
    clusters: BTreeMap<ClusterName, ClusterReach>,
}

impl ReachTracker {
    /// Keep state only for `clusters` (a cluster no longer probed is forgotten; one that was
    /// unreachable is reported reachable, so nothing stays excluded for a cluster nobody checks).
    pub fn retain(
        &mut self,
        clusters: &BTreeSet<&ClusterName>,
        now: SystemTime,
    ) -> Vec<ReachChange> {
        let mut changes = Vec::new();
        self.clusters.retain(|c, r| {
            let keep = clusters.contains(c);
            if !keep && r.unreachable {
                changes.push(ReachChange {
                    cluster: c.clone(),
                    unreachable: false,
                    since: now,
                });
            }
            keep
        });
        changes
    }

    /// The backends to probe this round for `cluster`: up to `n`, taking turns over `targets`.
    pub fn pick(
        &mut self,
        cluster: &ClusterName,
        targets: &[SocketAddr],
        n: usize,
    ) -> Vec<SocketAddr> {
        if targets.is_empty() {
            return Vec::new();
        }
        let r = self.clusters.entry(cluster.clone()).or_default();
        let n = n.min(targets.len());
        let out = (0..n)
            .map(|i| targets[(r.cursor + i) % targets.len()])
            .collect();
        r.cursor = (r.cursor + n) % targets.len();
        out
    }

    /// The probe timeout for `cluster`: `base` or three round trips (the smoothed one or the
    /// latest, the longer), whichever is longer, at most [`MAX_TIMEOUT`]; [`FIRST_TIMEOUT`] before
    /// any answer, and [`MAX_TIMEOUT`] while it is unreachable (a path that only got slower must be
    /// able to answer, or it would stay out).
    pub fn timeout(&self, cluster: &ClusterName, base: Duration) -> Duration {
        let Some(r) = self.clusters.get(cluster) else {
            return FIRST_TIMEOUT.max(base).min(MAX_TIMEOUT);
        };
        if r.unreachable {
            return MAX_TIMEOUT.max(base);
        }
        match (r.srtt, r.last_rtt) {
            (Some(s), Some(l)) => base.max(s.max(l) * 3).min(MAX_TIMEOUT),
            _ => FIRST_TIMEOUT.max(base).min(MAX_TIMEOUT),
        }
    }

    /// Record the round trip of an answered probe of `cluster`.
    pub fn record_rtt(&mut self, cluster: &ClusterName, rtt: Duration) {
        let r = self.clusters.entry(cluster.clone()).or_default();
        r.srtt = Some(match r.srtt {
            Some(s) => (s * 7 + rtt) / 8,
            None => rtt,
        });
        r.last_rtt = Some(rtt);
    }

    /// Whether `cluster` has a silent streak that is not yet a verdict (its next round comes sooner).
    pub fn suspect(&self, cluster: &ClusterName) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|r| r.dark_rounds > 0 && !r.unreachable)
    }

    /// Whether `cluster`'s last round was heard (an answer or a refusal) and no silent streak
    /// followed: one probe per round is enough to keep watching it.
    pub fn settled(&self, cluster: &ClusterName) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|r| r.last_heard.is_some() && r.dark_rounds == 0 && !r.unreachable)
    }

    /// Whether `cluster` is unreachable from this node.
    pub fn unreachable(&self, cluster: &ClusterName) -> bool {
        self.clusters.get(cluster).is_some_and(|r| r.unreachable)
    }

    /// Record one round of probes of `cluster`; returns the change of its reachability, if any.
    pub fn record_round(
        &mut self,
        cluster: &ClusterName,
        outcomes: &[Outcome],
        started: SystemTime,
        now: SystemTime,
    ) -> Option<ReachChange> {
        if outcomes.is_empty() {
            return None;
        }
        let r = self.clusters.entry(cluster.clone()).or_default();
        if outcomes.iter().all(|o| *o == Outcome::Silent) {
            if r.last_heard.is_some_and(|h| started < h) {
                return None;
            }
            if r.dark_rounds == 0 {
                r.first_silent = Some(started);
            }
            r.dark_rounds = r.dark_rounds.saturating_add(1);
            if !r.unreachable && r.dark_rounds >= DARK_ROUNDS {
                r.unreachable = true;
                return Some(ReachChange {
                    cluster: cluster.clone(),
                    unreachable: true,
                    since: r.first_silent.unwrap_or(started),
                });
            }
            None
        } else {
            r.last_heard = Some(r.last_heard.map_or(started, |h| h.max(started)));
            r.dark_rounds = 0;
            r.first_silent = None;
            if r.unreachable {
                r.unreachable = false;
                return Some(ReachChange {
                    cluster: cluster.clone(),
                    unreachable: false,
                    since: now,
                });
            }
            None
        }
    }
}

/// One TCP connect to `addr` within `timeout`, with the time it took.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> (Outcome, Duration) {
    let t0 = std::time::Instant::now();
    let outcome = probe_outcome(addr, timeout).await;
    (outcome, t0.elapsed())
}

async fn probe_outcome(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Answered,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
                Outcome::Refused
            }
            // No route, network unreachable, timed out in the kernel: nothing answered.
            _ => Outcome::Silent,
        },
        Err(_) => Outcome::Silent,
    }
}

/// One round of probes of a cluster, as it came back.
struct RoundResult {
    cluster: ClusterName,
    addrs: Vec<SocketAddr>,
    started: SystemTime,
    /// The cluster was unreachable when the round started: its answers may have waited on a SYN
    /// sent into the cut, so their times say nothing of the path.
    while_unreachable: bool,
    /// The cluster's reachability epoch when the round started (see [`Flights`]).
    epoch: u64,
    results: Vec<(Outcome, Duration)>,
}

/// An answer slower than this needed a retransmitted SYN (the kernel's first SYN timeout is 1 s):
/// its time is loss, not the path's round trip, and is not learnt.
const RETRANSMIT_RTT: Duration = Duration::from_secs(1);

/// Rounds of one unreachable cluster that may be in flight at once.
const MAX_ROUNDS_IN_FLIGHT: usize = 8;

/// Rounds in flight for a cluster, counted per reachability epoch: when the cluster changes state,
/// rounds started before (long timeouts of an unreachable cluster, still waiting on SYNs sent into
/// a cut) no longer hold back the rounds of the new state.
#[derive(Debug, Default)]
struct Flights {
    epoch: u64,
    count: usize,
}

/// Run the prober: every `interval` (a quarter of it while a cluster is suspect), probe a few of
/// each cluster's `targets` ([`probes_for`]; timeout: `timeout` or more, see the module docs),
/// and send every change of reachability to `changes`.
///
/// A reachable cluster has one round in flight at a time. An unreachable one gets a fresh round
/// every beat even while older ones wait on their (long) timeouts: a probe sent into a cut is
/// answered only when its SYN is retransmitted, a second later, and the first answer after a heal
/// must not wait for that.
pub async fn run_reach_prober(
    interval: Duration,
    timeout: Duration,
    mut targets: watch::Receiver<std::sync::Arc<BTreeMap<ClusterName, Vec<SocketAddr>>>>,
    changes: mpsc::UnboundedSender<ReachChange>,
) {
    let mut tracker = ReachTracker::default();
    let quick = (interval / 4).max(Duration::from_millis(10));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<RoundResult>();
    let mut in_flight: BTreeMap<ClusterName, Flights> = BTreeMap::new();
    let mut next_round = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_round) => {
                let current = targets.borrow_and_update().clone();
                let keep: BTreeSet<&ClusterName> = current.keys().collect();
                for c in tracker.retain(&keep, SystemTime::now()) {
                    if changes.send(c).is_err() {
                        return;
                    }
                }
                for (cluster, list) in current.iter() {
                    let busy = in_flight.get(cluster).map_or(0, |f| f.count);
                    let limit = if tracker.unreachable(cluster) { MAX_ROUNDS_IN_FLIGHT } else { 1 };
                    if busy >= limit {
                        continue;
                    }
                    let n = probes_for(current.len(), tracker.settled(cluster));
                    let addrs = tracker.pick(cluster, list, n);
                    if addrs.is_empty() {
                        continue;
                    }
                    let to = tracker.timeout(cluster, timeout);
                    let while_unreachable = tracker.unreachable(cluster);
                    let flights = in_flight.entry(cluster.clone()).or_default();
                    flights.count += 1;
                    let epoch = flights.epoch;
                    let done = done_tx.clone();
                    let cluster = cluster.clone();
                    tokio::spawn(async move {
                        let started = SystemTime::now();
                        let results =
                            futures::future::join_all(addrs.iter().map(|a| probe(*a, to))).await;
                        let _ = done.send(RoundResult {
                            cluster,
                            addrs,
                            started,
                            while_unreachable,
                            epoch,
                            results,
                        });
                    });
                }
                let suspect = current.keys().any(|c| tracker.suspect(c));
                next_round = tokio::time::Instant::now() + if suspect { quick } else { interval };
            }
            Some(r) = done_rx.recv() => {
                if let Some(f) = in_flight.get_mut(&r.cluster)
                    && f.epoch == r.epoch
                {
                    f.count = f.count.saturating_sub(1);
                }
                for (o, rtt) in &r.results {
                    if *o == Outcome::Answered && !r.while_unreachable && *rtt < RETRANSMIT_RTT {
                        tracker.record_rtt(&r.cluster, *rtt);
                    }
                }
                let outcomes: Vec<Outcome> = r.results.iter().map(|(o, _)| *o).collect();
                if let Some(change) =
                    tracker.record_round(&r.cluster, &outcomes, r.started, SystemTime::now())
                {
                    let f = in_flight.entry(r.cluster.clone()).or_default();
                    f.epoch += 1;
                    f.count = 0;
                    if change.unreachable {
                        tracing::warn!(cluster = %r.cluster, probed = ?r.addrs, rounds = DARK_ROUNDS, "no backend of the cluster answers from this node: its backends leave this node's selection");
                    } else {
                        tracing::info!(cluster = %r.cluster, "the cluster's backends answer from this node again: back in selection");
                    }
                    if changes.send(change).is_err() {
                        return;
                    }
                }
                if tracker.suspect(&r.cluster) {
                    next_round = next_round.min(tokio::time::Instant::now() + quick);
                }
            }
            r = targets.changed() => {
                // A new target set is probed on the next beat, not at once (selection churn must
                // not turn into a probe storm).
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    #[test]
    fn two_silent_rounds_make_a_cluster_unreachable_and_one_answer_brings_it_back() {
        let mut t = ReachTracker::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let c2 = c("c2");
        use Outcome::*;
        assert_eq!(
            t.record_round(&c2, &[Answered, Answered], at(0), at(1)),
            None
        );
        assert_eq!(
            t.record_round(&c2, &[Silent, Silent], at(200), at(450)),
            None
        );
        assert!(t.suspect(&c2));
        let ch = t
            .record_round(&c2, &[Silent, Silent], at(500), at(750))
            .expect("unreachable");
        assert!(ch.unreachable);
        assert_eq!(ch.since, at(200), "timed from the first silent probe");
        assert!(t.unreachable(&c2) && !t.suspect(&c2));
        assert_eq!(t.record_round(&c2, &[Silent], at(1000), at(1250)), None);
        let back = t
            .record_round(&c2, &[Silent, Answered], at(1400), at(1401))
            .unwrap();
        assert!(!back.unreachable);
        assert!(!t.unreachable(&c2));
    }

    #[test]
    fn the_timeout_follows_the_round_trip() {
        let mut t = ReachTracker::default();
        let c2 = c("c2");
        let base = Duration::from_millis(250);
        assert_eq!(t.timeout(&c2, base), FIRST_TIMEOUT, "no answer yet");
        t.record_rtt(&c2, Duration::from_micros(200));
        assert_eq!(t.timeout(&c2, base), base, "a near cluster: the base");
        t.record_rtt(&c2, Duration::from_millis(400));
        assert_eq!(
            t.timeout(&c2, base),
            Duration::from_millis(1200),
            "a path that just got slower counts at once"
        );
        for _ in 0..50 {
            t.record_rtt(&c2, Duration::from_millis(400));
        }
        let far = t.timeout(&c2, base);
        assert!(
            far > Duration::from_millis(1100) && far <= Duration::from_millis(1200),
            "a far cluster: three round trips, got {far:?}"
        );
        for _ in 0..50 {
            t.record_rtt(&c2, Duration::from_secs(5));
        }
        assert_eq!(t.timeout(&c2, base), MAX_TIMEOUT);
        t.record_rtt(&c2, Duration::from_micros(100));
        let now = SystemTime::now();
        for _ in 0..2 {
            for _ in 0..20 {
                t.record_rtt(&c2, Duration::from_micros(100));
            }
            t.record_round(&c2, &[Outcome::Silent], now, now);
        }
        assert!(t.unreachable(&c2));
        assert_eq!(
            t.timeout(&c2, base),
            MAX_TIMEOUT,
            "an unreachable cluster gets the longest timeout"
        );
    }

    #[test]
    fn a_silent_round_older_than_an_answer_is_stale() {
        let mut t = ReachTracker::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let c2 = c("c2");
        t.record_round(&c2, &[Outcome::Silent], at(0), at(250));
        t.record_round(&c2, &[Outcome::Silent], at(300), at(550));
        assert!(t.unreachable(&c2));
        // After the heal a fresh round answers while an older one still waits on its timeout.
        assert!(
            !t.record_round(&c2, &[Outcome::Answered], at(900), at(901))
                .unwrap()
                .unreachable
        );
        assert_eq!(
            t.record_round(&c2, &[Outcome::Silent], at(700), at(2700)),
            None
        );
        assert!(
            !t.unreachable(&c2) && !t.suspect(&c2),
            "the stale silence does not count"
        );
    }

    #[test]
    fn a_refusal_proves_the_path_works() {
        let mut t = ReachTracker::default();
        let now = SystemTime::now();
        let c2 = c("c2");
        for _ in 0..5 {
            assert_eq!(
                t.record_round(&c2, &[Outcome::Refused, Outcome::Silent], now, now),
                None
            );
        }
        assert!(!t.unreachable(&c2) && !t.suspect(&c2));
    }

    #[test]
    fn probes_take_turns_over_the_targets() {
        let mut t = ReachTracker::default();
        let c2 = c("c2");
        let targets: Vec<SocketAddr> = (1..=6)
            .map(|i| format!("10.2.0.{i}:80").parse().unwrap())
            .collect();
        let a = t.pick(&c2, &targets, 4);
        let b = t.pick(&c2, &targets, 4);
        assert_eq!(a, targets[..4]);
        assert_eq!(b, [targets[4], targets[5], targets[0], targets[1]]);
        assert!(t.pick(&c2, &[], 4).is_empty());
    }

    #[test]
    fn a_cluster_no_longer_probed_is_not_left_unreachable() {
        let mut t = ReachTracker::default();
        let now = SystemTime::now();
        let c2 = c("c2");
        t.record_round(&c2, &[Outcome::Silent], now, now);
        t.record_round(&c2, &[Outcome::Silent], now, now);
        assert!(t.unreachable(&c2));
        let changes = t.retain(&BTreeSet::new(), now);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].unreachable);
    }

    #[test]
    fn a_large_mesh_probes_settled_clusters_once_per_round() {
        assert_eq!(probes_for(1, true), PROBES_PER_ROUND);
        assert_eq!(
            probes_for(16, true),
            PROBES_PER_ROUND,
            "small meshes: unchanged"
        );
        assert_eq!(probes_for(32, true), 2);
        assert_eq!(probes_for(254, true), 1);
        assert_eq!(
            probes_for(254, false),
            PROBES_PER_ROUND,
            "in question: all four"
        );
        let mut t = ReachTracker::default();
        let now = SystemTime::now();
        let c2 = c("c2");
        assert!(!t.settled(&c2), "never heard");
        t.record_round(&c2, &[Outcome::Refused], now, now);
        assert!(t.settled(&c2));
        t.record_round(&c2, &[Outcome::Silent], now, now);
        assert!(
            !t.settled(&c2) && t.suspect(&c2),
            "one silent round: four next"
        );
    }

    /// 40 remote clusters, each with 4 answering backends on loopback: after the first round
    /// (4 probes each, nothing heard yet) a round costs one connect per cluster. The test waits
    /// until every cluster has been probed in three more rounds, then counts every connect made.
    #[tokio::test]
    async fn the_probe_budget_bounds_connects_in_a_large_mesh() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        const CLUSTERS: usize = 40;
        let accepted: Arc<Vec<AtomicUsize>> =
            Arc::new((0..CLUSTERS).map(|_| AtomicUsize::new(0)).collect());
        // Each accept bumps this, so the test waits on the connects themselves.
        let (bump, mut bumped) = watch::channel(());
        let mut targets = BTreeMap::new();
        for i in 0..CLUSTERS {
            let mut addrs = Vec::new();
            for _ in 0..PROBES_PER_ROUND {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addrs.push(l.local_addr().unwrap());
                let acc = accepted.clone();
                let bump = bump.clone();
                tokio::spawn(async move {
                    while l.accept().await.is_ok() {
                        acc[i].fetch_add(1, Ordering::Relaxed);
                        bump.send_replace(());
                    }
                });
            }
            targets.insert(c(&format!("c{}", i + 2)), addrs);
        }
        let (_tx, rx) = watch::channel(Arc::new(targets));
        let (ch_tx, mut ch_rx) = mpsc::unbounded_channel();
        let interval = Duration::from_millis(100);
        let started = std::time::Instant::now();
        let prober = tokio::spawn(run_reach_prober(
            interval,
            Duration::from_millis(250),
            rx,
            ch_tx,
        ));
        // Until every cluster was probed in at least 3 rounds after its first (4 + 3 connects).
        let enough = PROBES_PER_ROUND + 3;
        tokio::time::timeout(Duration::from_secs(10), async {
            while !accepted.iter().all(|a| a.load(Ordering::Relaxed) >= enough) {
                bumped.changed().await.unwrap();
            }
        })
        .await
        .expect("every cluster probed round after round within 10 s");
        prober.abort();
        let elapsed = started.elapsed();
        let counts: Vec<usize> = accepted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        let total: usize = counts.iter().sum();
        // Rounds that can have started: one at once, then one per interval.
        let rounds = (elapsed.as_millis() / interval.as_millis()) as usize + 1;
        assert!(rounds >= 3, "the test ran {elapsed:?}");
        let budget = CLUSTERS * PROBES_PER_ROUND + (rounds - 1) * CLUSTERS;
        assert!(
            total <= budget,
            "{total} connects in {rounds} rounds (at most {budget}: 4 per cluster in the first, one after)"
        );
        let old_cost = rounds.saturating_sub(1) * CLUSTERS * PROBES_PER_ROUND;
        assert!(
            total < old_cost,
            "{total} connects, as many as 4 per cluster per round ({old_cost})"
        );
        assert!(ch_rx.try_recv().is_err(), "no cluster changed reachability");
    }

    #[tokio::test]
    async fn probe_outcomes_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap();
        assert_eq!(
            probe(open, Duration::from_secs(1)).await.0,
            Outcome::Answered
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = free.local_addr().unwrap();
        drop(free);
        assert_eq!(
            probe(closed, Duration::from_secs(1)).await.0,
            Outcome::Refused
        );
    }
}
