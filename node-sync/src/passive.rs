//! Passive failure detection: what the kernel saw of this node's connects.
//!
//! The datapath's `sock_ops` program (see `global_lb_bpf::signals`) marks a backend *suspect* the
//! moment a connect to it is refused (or its SYN goes unanswered until the first retransmission
//! timeout), before the client's `connect()` returns: the node's next connects pass it over while
//! the service has another backend. That mark lasts two seconds. node-sync learns of it from the
//! ring buffer within microseconds and **confirms** it with a probe of its own at once:
//!
//! - the probe fails (refused or silent): the backend leaves this node's selection
//!   ([`crate::index::MergeIndex::set_passive_failure`], cause `passive`, never down to zero), and
//!   is probed again every `--health-interval`; `--health-rise` good probes in a row bring it back
//!   (the failback hold-down of the health checker). The backend's own node publishes its verdict
//!   for every other node as before (its probes see what this one saw);
//! - the probe answers: a false alarm (a backend that restarted, a listen queue that overflowed);
//!   the kernel mark is cleared so traffic returns at once.
//!
//! The same counters give the golden signals per global service and cluster ([`Golden`]): connect
//! rate, errors (refused, timed out) and the SYN-to-established time, exported in `/metrics` and
//! summarised over the last minute in `/api/v1/status`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use global_lb_bpf::signals::{
    CONNECT_BUCKETS, CONNECT_BUCKETS_NS, Outcomes, SUSPECT_REFUSED, SuspectEvents, monotonic_ns,
};
use mesh_model::ClusterName;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::lb::Backend;

/// A suspect mark, as node-sync received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuspectMark {
    /// The datapath's backend id.
    pub backend_id: u32,
    /// Refused (else: the SYN went unanswered).
    pub refused: bool,
    /// When the kernel made the mark (wall clock, from its monotonic stamp).
    pub at: SystemTime,
    /// From the mark to node-sync reading it.
    pub delay: Duration,
}

/// Reads the ring buffer of suspect marks and sends each to `tx`. Runs until `tx` closes or the
/// ring buffer fails.
pub async fn run_event_reader(events: SuspectEvents, tx: mpsc::UnboundedSender<SuspectMark>) {
    // `with_interest` is deprecated for types that could close or swap their fd while tokio
    // watches it (tokio#8587); `SuspectEvents` owns its ring buffer's fd for its whole life and
    // never replaces it, and the sound `register_with_interest` is `unsafe`, which this crate
    // forbids.
    #[allow(deprecated)]
    let fd = AsyncFd::with_interest(events, tokio::io::Interest::READABLE);
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(error) => {
            tracing::error!(%error, "cannot poll the datapath's suspect events: passive failure detection is off");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(error) => {
                tracing::error!(%error, "polling the datapath's suspect events failed");
                return;
            }
        };
        let now_mono = monotonic_ns();
        let now_wall = SystemTime::now();
        while let Some(ev) = guard.get_inner_mut().next_event() {
            let delay = Duration::from_nanos(now_mono.saturating_sub(ev.at_ns));
            let mark = SuspectMark {
                backend_id: ev.backend_id,
                refused: ev.kind == SUSPECT_REFUSED,
                at: now_wall.checked_sub(delay).unwrap_or(now_wall),
                delay,
            };
            if tx.send(mark).is_err() {
                return;
            }
        }
        guard.clear_ready();
    }
}

/// A backend the kernel marked suspect on this node, while node-sync follows it.
#[derive(Debug, Clone)]
pub struct Track {
    /// The backend.
    pub backend: Backend,
    /// The first mark.
    pub since: SystemTime,
    /// A probe confirmed the failure: out of this node's selection.
    pub confirmed: bool,
    /// Good probes in a row since it was confirmed.
    pub goods: u32,
    /// A probe is in flight.
    pub probing: bool,
    /// When to probe it again (confirmed backends).
    pub next_probe: Instant,
}

/// The passive-detection state of the agent.
#[derive(Debug, Default)]
pub struct Passive {
    /// Followed backends by datapath id.
    pub tracks: BTreeMap<u32, Track>,
    /// Marks received.
    pub marks: u64,
    /// Marks a probe confirmed.
    pub confirmed: u64,
    /// Marks a probe contradicted (cleared at once).
    pub cleared: u64,
    /// Backends brought back by good probes after a confirmed failure.
    pub recovered: u64,
    /// Mark to node-sync reading it: the latest and the largest.
    pub last_delay: Duration,
    /// See `last_delay`.
    pub max_delay: Duration,
    /// The kernel's time of the latest mark (for the failover record of a passive move).
    pub last_signal: Option<SystemTime>,
    /// Confirmed failures of this cluster's backends, published in this node's health report.
    pub publish: Option<tokio::sync::watch::Sender<crate::health::PassiveFailures>>,
}

/// Connect counts of one (service, cluster) since node-sync started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Established connects.
    pub established: u64,
    /// Refused connects.
    pub refused: u64,
    /// Connects whose SYN went unanswered until the first retransmission timeout.
    pub timeout: u64,
    /// Sum of SYN-to-established times, ns.
    pub connect_ns_sum: u64,
    /// SYN-to-established times by bucket (`CONNECT_BUCKETS_NS`, last open-ended).
    pub buckets: [u64; CONNECT_BUCKETS],
}

impl Totals {
    fn add(&mut self, d: &Outcomes) {
        self.established += d.established;
        self.refused += d.refused;
        self.timeout += d.timeout;
        self.connect_ns_sum += d.connect_ns_sum;
        for (t, b) in self.buckets.iter_mut().zip(d.buckets) {
            *t += b;
        }
    }

    fn minus(&self, o: &Totals) -> Totals {
        let mut buckets = [0; CONNECT_BUCKETS];
        for (i, b) in buckets.iter_mut().enumerate() {
            *b = self.buckets[i].saturating_sub(o.buckets[i]);
        }
        Totals {
            established: self.established.saturating_sub(o.established),
            refused: self.refused.saturating_sub(o.refused),
            timeout: self.timeout.saturating_sub(o.timeout),
            connect_ns_sum: self.connect_ns_sum.saturating_sub(o.connect_ns_sum),
            buckets,
        }
    }

    /// Every connect with an outcome.
    pub fn connects(&self) -> u64 {
        self.established + self.refused + self.timeout
    }

    /// The upper bound (seconds) of the bucket holding quantile `q` of the connect times; `None`
    /// without an established connect, `+Inf` for the open bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return Some(
                    CONNECT_BUCKETS_NS
                        .get(i)
                        .map(|ns| *ns as f64 / 1e9)
                        .unwrap_or(f64::INFINITY),
                );
            }
        }
        None
    }
}

/// One row of the last-minute summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GoldenRow {
    /// Global service.
    pub service: String,
    /// Cluster of the backends.
    pub cluster: String,
    /// Connects with an outcome per second over the window.
    pub connects_per_second: f64,
    /// Refused and timed-out connects over all connects in the window (0 with none).
    pub error_ratio: f64,
    /// Median SYN-to-established time, ms (bucket upper bound).
    pub p50_ms: Option<f64>,
    /// 99th percentile SYN-to-established time, ms (bucket upper bound).
    pub p99_ms: Option<f64>,
    /// Window length, seconds.
    pub window_seconds: f64,
    /// Counts in the window.
    pub window: Totals,
    /// Totals since node-sync started.
    pub totals: Totals,
}

/// Totals by (service, cluster).
pub type TotalsByService = BTreeMap<(String, ClusterName), Totals>;

/// Golden signals per (service, cluster): totals fed from the kernel's per-backend counters.
#[derive(Debug, Default)]
pub struct Golden {
    /// Totals by (service, cluster).
    pub totals: TotalsByService,
    /// Last counters read per backend id (deltas are what is added).
    seen: HashMap<u32, Outcomes>,
    /// The service each backend (cluster, ip, port) was last seen serving.
    owner: HashMap<(ClusterName, IpAddr, u16), String>,
    /// Backends by id as last seen in the maps, with the reads since they left (kept a few
    /// reads so connects in flight when a backend was removed are still counted).
    ids: HashMap<u32, (Backend, u32)>,
    /// Samples of `totals` for the last-minute window (oldest first).
    samples: VecDeque<(Instant, TotalsByService)>,
}

/// The `le` label of histogram bucket `i` (seconds; `+Inf` for the last).
pub fn bucket_le(i: usize) -> String {
    match CONNECT_BUCKETS_NS.get(i) {
        Some(ns) => format!("{}", *ns as f64 / 1e9),
        None => "+Inf".to_owned(),
    }
}

/// Reads of a removed backend's counts before it is forgotten.
pub const GONE_READS: u32 = 10;

/// The summary window.
pub const WINDOW: Duration = Duration::from_secs(60);

fn delta(cur: &Outcomes, prev: Option<&Outcomes>) -> Outcomes {
    let Some(p) = prev else { return *cur };
    // A counter that went down belongs to a backend id given out again: all of it is new.
    if cur.established < p.established || cur.refused < p.refused || cur.timeout < p.timeout {
        return *cur;
    }
    let mut buckets = [0; CONNECT_BUCKETS];
    for (i, b) in buckets.iter_mut().enumerate() {
        *b = cur.buckets[i].saturating_sub(p.buckets[i]);
    }
    Outcomes {
        established: cur.established - p.established,
        refused: cur.refused - p.refused,
        timeout: cur.timeout - p.timeout,
        connect_ns_sum: cur.connect_ns_sum.saturating_sub(p.connect_ns_sum),
        buckets,
    }
}

impl Golden {
    /// Learn which service each selected backend serves (`owners`: backend -> service).
    pub fn learn_owners<'a>(&mut self, owners: impl IntoIterator<Item = (&'a Backend, String)>) {
        for (b, service) in owners {
            self.owner
                .insert((b.cluster.name().clone(), b.ip, b.port), service);
        }
    }

    /// Whether reading `cur` of backend `id` tells anything: it counted connects, or its counts
    /// are followed already (deltas are taken from the last reading). The zero readings of
    /// backends that never counted a connect are most of a large mesh's: they are skipped.
    pub fn tells(&self, id: u32, cur: &Outcomes) -> bool {
        *cur != Outcomes::default() || self.follows(id)
    }

    /// Whether backend id `id`'s counts are followed.
    pub fn follows(&self, id: u32) -> bool {
        self.seen.contains_key(&id)
    }

    /// The backend ids whose counts are followed (those that counted connects).
    pub fn followed(&self) -> impl Iterator<Item = u32> + '_ {
        self.seen.keys().copied()
    }

    /// Backends seen before that are not `present` (in the maps now): read their counts once
    /// more. Forgotten after [`GONE_READS`] reads.
    pub fn gone(&mut self, present: impl Fn(u32) -> bool) -> Vec<(u32, Backend)> {
        let mut out = Vec::new();
        self.ids.retain(|id, (b, reads)| {
            if present(*id) {
                return true;
            }
            *reads += 1;
            out.push((*id, b.clone()));
            *reads < GONE_READS
        });
        out
    }

    /// Add what the kernel counted since the last read.
    pub fn update(&mut self, outcomes: Vec<(u32, Backend, Outcomes)>) {
        for (id, b, cur) in outcomes {
            if self.ids.get(&id).is_none_or(|(known, _)| *known != b) {
                self.ids.insert(id, (b.clone(), 0));
            }
            let d = delta(&cur, self.seen.get(&id));
            self.seen.insert(id, cur);
            if d == Outcomes::default() {
                continue;
            }
            let cluster = b.cluster.name().clone();
            let service = self
                .owner
                .get(&(cluster.clone(), b.ip, b.port))
                .cloned()
                .unwrap_or_else(|| format!("{}:{}", b.ip, b.port));
            self.totals.entry((service, cluster)).or_default().add(&d);
        }
    }

    /// Keep a sample for the window.
    pub fn sample(&mut self, now: Instant) {
        self.samples.push_back((now, self.totals.clone()));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The last-minute summary (from the oldest sample in the window to the totals now).
    pub fn summary(&self, now: Instant) -> Vec<GoldenRow> {
        let (start, base) = match self.samples.front() {
            Some((t, m)) => (*t, Some(m)),
            None => (now, None),
        };
        let secs = now.duration_since(start).as_secs_f64();
        self.totals
            .iter()
            .map(|(k, t)| {
                let w = match base.and_then(|b| b.get(k)) {
                    Some(b) => t.minus(b),
                    None => *t,
                };
                let connects = w.connects();
                GoldenRow {
                    service: k.0.clone(),
                    cluster: k.1.to_string(),
                    connects_per_second: if secs > 0.0 {
                        connects as f64 / secs
                    } else {
                        0.0
                    },
                    error_ratio: if connects > 0 {
                        (w.refused + w.timeout) as f64 / connects as f64
                    } else {
                        0.0
                    },
                    p50_ms: w.quantile(0.5).map(|s| s * 1e3),
                    p99_ms: w.quantile(0.99).map(|s| s * 1e3),
                    window_seconds: secs,
                    window: w,
                    totals: *t,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::values::Protocol;

    fn b(cluster: &str, ip: &str) -> Backend {
        Backend {
            cluster: ClusterName::new(cluster).unwrap().into(),
            ip: ip.parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn o(established: u64, refused: u64, bucket: usize) -> Outcomes {
        let mut buckets = [0; CONNECT_BUCKETS];
        buckets[bucket] = established;
        Outcomes {
            established,
            refused,
            timeout: 0,
            connect_ns_sum: established * 50_000,
            buckets,
        }
    }

    #[test]
    fn totals_add_deltas_per_service_and_cluster() {
        let mut g = Golden::default();
        let (a, c) = (b("c1", "10.0.0.1"), b("c2", "10.0.0.2"));
        g.learn_owners([(&a, "web".to_owned()), (&c, "web".to_owned())]);
        g.update(vec![
            (1, a.clone(), o(10, 1, 0)),
            (2, c.clone(), o(5, 0, 3)),
        ]);
        g.update(vec![
            (1, a.clone(), o(15, 1, 0)),
            (2, c.clone(), o(5, 2, 3)),
        ]);
        let t1 = g.totals[&("web".to_owned(), ClusterName::new("c1").unwrap())];
        assert_eq!((t1.established, t1.refused), (15, 1));
        let t2 = g.totals[&("web".to_owned(), ClusterName::new("c2").unwrap())];
        assert_eq!((t2.established, t2.refused), (5, 2));
        assert_eq!(t2.quantile(0.5), Some(0.001));
        // An id given out again starts from zero: all of it is new.
        g.update(vec![(1, a.clone(), o(3, 0, 1))]);
        let t1 = g.totals[&("web".to_owned(), ClusterName::new("c1").unwrap())];
        assert_eq!(t1.established, 18);
    }

    #[test]
    fn the_summary_covers_the_window() {
        let mut g = Golden::default();
        let a = b("c1", "10.0.0.1");
        g.learn_owners([(&a, "web".to_owned())]);
        let t0 = Instant::now();
        g.update(vec![(1, a.clone(), o(100, 0, 0))]);
        g.sample(t0);
        g.update(vec![(1, a.clone(), o(190, 10, 0))]);
        let rows = g.summary(t0 + Duration::from_secs(10));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert!((r.connects_per_second - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.error_ratio - 0.1).abs() < 1e-9, "{r:?}");
        assert_eq!(r.p99_ms, Some(0.1));
        assert_eq!(r.totals.established, 190);
    }
}
