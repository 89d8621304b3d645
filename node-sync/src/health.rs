//! Health checker: probes the backends that run on this node (TCP connect, or HTTP GET when the
//! service asks for it) and turns probe results into verdicts ([`HealthTracker`], pure), which the
//! [`publisher`](crate::publish) writes under `health/<cluster>/<node>` with a lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_model::ClusterName;
use mesh_model::values::{BackendVerdict, HealthReport, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::index::{ProbeKind, ProbeTarget};

/// One target's probe history.
#[derive(Debug, Clone)]
struct Track {
    /// Failed probes in a row.
    fails: u32,
    /// Good probes in a row.
    goods: u32,
    verdict: Verdict,
}

/// Consecutive probe results -> verdicts, with a failback hold-down.
///
/// `failures` misses in a row make a healthy backend failing; a failing backend comes back after
/// `rise` good probes in a row, so a backend that fails every other probe never takes traffic back
/// until it is steady. (A hold-down that grows with each flap was tried and left out: a rehearsed
/// drill, kill then restart then kill again within seconds, is indistinguishable from a flap, and
/// the chaos scenarios' backends then came back seconds later than their 1 s window.)
#[derive(Debug)]
pub struct HealthTracker {
    failures_needed: u32,
    rise: u32,
    state: BTreeMap<ProbeTarget, Track>,
    /// When the current streak began: the first failed probe of a failure streak, or the first good
    /// probe after failing.
    since: BTreeMap<ProbeTarget, std::time::SystemTime>,
}

impl HealthTracker {
    /// A tracker that declares a backend failing after `failures_needed` failed probes in a row
    /// and healthy again after `rise` good ones in a row.
    pub fn new(failures_needed: u32, rise: u32) -> Self {
        Self {
            failures_needed: failures_needed.max(1),
            rise: rise.max(1),
            state: BTreeMap::new(),
            since: BTreeMap::new(),
        }
    }

    /// Set the targets; vanished ones are forgotten. A new target has no history, so its first
    /// probe decides its verdict (after a restart a dead backend is reported failing at once, not
    /// after `failures` more probes); from then on `failures` misses in a row make it failing.
    /// Returns whether the set changed.
    pub fn set_targets(&mut self, targets: &BTreeSet<ProbeTarget>) -> bool {
        let before = self.state.len();
        self.state.retain(|t, _| targets.contains(t));
        self.since.retain(|t, _| targets.contains(t));
        let mut changed = self.state.len() != before;
        for t in targets {
            if !self.state.contains_key(t) {
                self.state.insert(
                    t.clone(),
                    Track {
                        fails: self.failures_needed - 1,
                        goods: 0,
                        verdict: Verdict::Healthy,
                    },
                );
                changed = true;
            }
        }
        changed
    }

    /// The targets.
    pub fn targets(&self) -> impl Iterator<Item = &ProbeTarget> {
        self.state.keys()
    }

    /// Whether `target` is failing and has started a good streak that is not yet enough.
    pub fn rising(&self, target: &ProbeTarget) -> bool {
        self.state
            .get(target)
            .is_some_and(|t| t.verdict == Verdict::Failing && t.goods > 0)
    }

    /// Record a probe result; returns whether the verdict changed.
    pub fn record(&mut self, target: &ProbeTarget, ok: bool) -> bool {
        let rise = self.rise;
        let failures_needed = self.failures_needed;
        let Some(t) = self.state.get_mut(target) else {
            return false;
        };
        let old = t.verdict;
        let wall = std::time::SystemTime::now();
        if ok {
            if t.fails > 0 || (old == Verdict::Failing && t.goods == 0) {
                // A good probe after failures: the recovery started now.
                self.since.insert(target.clone(), wall);
            }
            t.fails = 0;
            t.goods = t.goods.saturating_add(1);
            if old == Verdict::Failing && t.goods >= rise {
                t.verdict = Verdict::Healthy;
            }
        } else {
            if t.fails == 0 && (old == Verdict::Healthy || t.goods > 0) {
                // The first failed probe of a streak: the failure started now.
                self.since.insert(target.clone(), wall);
            }
            t.goods = 0;
            t.fails = t.fails.saturating_add(1);
            if old == Verdict::Healthy && t.fails >= failures_needed {
                t.verdict = Verdict::Failing;
            }
        }
        old != t.verdict
    }

    /// The verdict on a target.
    pub fn verdict(&self, target: &ProbeTarget) -> Option<Verdict> {
        self.state.get(target).map(|t| t.verdict)
    }

    /// The report to publish.
    pub fn report(&self, cluster: &ClusterName, node: &str) -> HealthReport {
        HealthReport {
            cluster: cluster.clone(),
            node: node.to_owned(),
            verdicts: self
                .state
                .iter()
                .map(|(t, track)| BackendVerdict {
                    ip: t.ip,
                    port: t.port,
                    protocol: t.protocol,
                    verdict: track.verdict,
                    since: self
                        .since
                        .get(t)
                        .map(|at| mesh_model::values::format_time(time::OffsetDateTime::from(*at))),
                })
                .collect(),
        }
    }
}

/// Probe one target: a TCP connect, or an HTTP/1.0 GET whose status must be 2xx or 3xx.
pub async fn probe(target: &ProbeTarget, timeout: Duration) -> bool {
    let addr = std::net::SocketAddr::new(target.ip, target.probe_port);
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        match &target.check {
            ProbeKind::Tcp => Some(true),
            ProbeKind::Http(path) => {
                let host = addr.to_string();
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: node-sync\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.ok()?;
                let mut buf = [0u8; 32];
                let mut n = 0;
                while n < 12 {
                    let r = s.read(&mut buf[n..]).await.ok()?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                let head = std::str::from_utf8(&buf[..n]).ok()?;
                let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
                Some((200..400).contains(&code))
            }
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Backends of this node's cluster whose failure this node saw in the kernel and confirmed with a
/// probe (`crate::passive`), with when the kernel saw it: published as failing verdicts in this
/// node's report, so every other node (of every cluster) follows within one etcd round trip
/// instead of waiting for the backend's own node to probe it twice.
pub type PassiveFailures = BTreeMap<(std::net::IpAddr, u16), std::time::SystemTime>;

/// `report` with the passive failures as failing verdicts (TCP), replacing this node's own
/// verdict on the same backend.
pub fn merge_passive(mut report: HealthReport, passive: &PassiveFailures) -> HealthReport {
    for ((ip, port), at) in passive {
        let since = Some(mesh_model::values::format_time(time::OffsetDateTime::from(
            *at,
        )));
        match report.verdicts.iter_mut().find(|v| {
            v.ip == *ip && v.port == *port && v.protocol == mesh_model::values::Protocol::Tcp
        }) {
            Some(v) if v.verdict == Verdict::Failing => {}
            Some(v) => {
                v.verdict = Verdict::Failing;
                v.since = since;
            }
            None => report.verdicts.push(BackendVerdict {
                ip: *ip,
                port: *port,
                protocol: mesh_model::values::Protocol::Tcp,
                verdict: Verdict::Failing,
                since,
            }),
        }
    }
    report
}

/// Run the health checker: every `interval`, probe the current targets; when a verdict, the
/// target set or the passive failures change, send the new report to `publish`.
#[allow(clippy::too_many_arguments)]
pub async fn run_health_checker(
    cluster: ClusterName,
    node: String,
    interval: Duration,
    failures: u32,
    rise: u32,
    mut targets: watch::Receiver<BTreeSet<ProbeTarget>>,
    mut passive: watch::Receiver<PassiveFailures>,
    publish: mpsc::UnboundedSender<HealthReport>,
) {
    let mut tracker = HealthTracker::new(failures, rise);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = interval.max(Duration::from_millis(100));
    // After a miss, the next probe of that backend comes sooner, so `failures` misses in a row
    // are confirmed in a fraction of the interval; so are the good probes of a recovery.
    let retry = (interval / 4).max(Duration::from_millis(10));
    let mut retry_list: Vec<ProbeTarget> = Vec::new();
    let mut published_once = false;
    let mut passive_open = true;
    loop {
        let (mut changed, list) = tokio::select! {
            _ = tick.tick() => {
                let changed = tracker.set_targets(&targets.borrow_and_update());
                (changed, tracker.targets().cloned().collect::<Vec<_>>())
            }
            _ = tokio::time::sleep(retry), if !retry_list.is_empty() => {
                (false, std::mem::take(&mut retry_list))
            }
            r = passive.changed(), if passive_open => {
                passive_open = r.is_ok();
                (r.is_ok(), Vec::new())
            }
        };
        if !list.is_empty() {
            retry_list.clear();
        }
        let results = futures::future::join_all(list.iter().map(|t| probe(t, timeout))).await;
        for (t, ok) in list.iter().zip(results) {
            if tracker.record(t, ok) {
                tracing::info!(backend = %format!("{}:{}", t.ip, t.port), healthy = ok, "health verdict changed");
                changed = true;
            }
            let confirm_miss = !ok && tracker.verdict(t) == Some(Verdict::Healthy);
            let confirm_rise = ok && tracker.rising(t);
            if confirm_miss || confirm_rise {
                retry_list.push(t.clone());
            }
        }
        if changed || (!published_once && tracker.targets().next().is_some()) {
            published_once = true;
            let report = merge_passive(tracker.report(&cluster, &node), &passive.borrow());
            if publish.send(report).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::values::Protocol;

    fn t(port: u16, check: ProbeKind) -> ProbeTarget {
        ProbeTarget {
            ip: "127.0.0.1".parse().unwrap(),
            port,
            probe_port: port,
            protocol: Protocol::Tcp,
            check,
        }
    }

    #[test]
    fn verdicts_carry_when_their_streak_began() {
        let mut h = HealthTracker::new(2, 1);
        let a = t(1, ProbeKind::Tcp);
        let c = ClusterName::new("c1").unwrap();
        h.set_targets(&BTreeSet::from([a.clone()]));
        h.record(&a, true);
        let healthy_since = h.report(&c, "n1").verdicts[0].since.clone();
        h.record(&a, true);
        assert_eq!(
            h.report(&c, "n1").verdicts[0].since,
            healthy_since,
            "good probes in a row do not move it"
        );
        h.record(&a, false);
        let first_miss = h.report(&c, "n1").verdicts[0]
            .since
            .clone()
            .expect("streak start");
        h.record(&a, false);
        let r = h.report(&c, "n1");
        assert_eq!(r.verdicts[0].verdict, Verdict::Failing);
        assert_eq!(
            r.verdicts[0].since.as_ref(),
            Some(&first_miss),
            "failing since the first miss, not the second"
        );
        h.record(&a, true);
        let r = h.report(&c, "n1");
        assert_eq!(r.verdicts[0].verdict, Verdict::Healthy);
        assert!(r.verdicts[0].since.as_ref().unwrap() >= &first_miss);
    }

    #[test]
    fn failing_after_n_misses_and_healthy_after_rise_successes() {
        let mut h = HealthTracker::new(2, 2);
        let a = t(1, ProbeKind::Tcp);
        assert!(h.set_targets(&BTreeSet::from([a.clone()])));
        // The first probe of a new target decides.
        assert!(h.record(&a, false));
        assert_eq!(h.verdict(&a), Some(Verdict::Failing));
        // Two good probes in a row bring it back.
        assert!(!h.record(&a, true));
        assert!(h.rising(&a));
        assert!(h.record(&a, true));
        // From then on two misses in a row.
        assert!(!h.record(&a, false));
        assert_eq!(h.verdict(&a), Some(Verdict::Healthy));
        assert!(h.record(&a, false));
        assert_eq!(h.verdict(&a), Some(Verdict::Failing));
        assert!(!h.record(&a, false));
        // A miss in between restarts the good streak.
        h.record(&a, true);
        h.record(&a, false);
        assert_eq!(h.verdict(&a), Some(Verdict::Failing));
        assert!(!h.rising(&a));
        let r = h.report(&ClusterName::new("c1").unwrap(), "n1");
        assert_eq!(r.verdicts.len(), 1);
        assert!(h.set_targets(&BTreeSet::new()));
        assert_eq!(h.verdict(&a), None);
    }

    #[test]
    fn a_backend_failing_every_other_probe_never_comes_back() {
        let mut h = HealthTracker::new(2, 2);
        let a = t(1, ProbeKind::Tcp);
        h.set_targets(&BTreeSet::from([a.clone()]));
        h.record(&a, false);
        assert_eq!(h.verdict(&a), Some(Verdict::Failing));
        // 10 s of probes at 200 ms, every other one failing.
        for i in 0..50 {
            h.record(&a, i % 2 == 0);
            assert_eq!(h.verdict(&a), Some(Verdict::Failing), "probe {i}");
        }
        // Steady again: back after two good probes.
        h.record(&a, true);
        assert!(h.record(&a, true));
        assert_eq!(h.verdict(&a), Some(Verdict::Healthy));
    }

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let code = if req.starts_with("GET /ok ") {
                        "200 OK"
                    } else {
                        "503 Unavailable"
                    };
                    let _ = s
                        .write_all(format!("HTTP/1.0 {code}\r\n\r\n").as_bytes())
                        .await;
                });
            }
        });
        let to = Duration::from_secs(2);
        assert!(probe(&t(port, ProbeKind::Tcp), to).await);
        assert!(probe(&t(port, ProbeKind::Http("/ok".into())), to).await);
        assert!(!probe(&t(port, ProbeKind::Http("/bad".into())), to).await);
        // A port nobody listens on.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = free.local_addr().unwrap().port();
        drop(free);
        assert!(!probe(&t(dead, ProbeKind::Tcp), to).await);
    }
}
