//! Failover drill analysis: from the probe's samples and the times of the fault and the recovery,
//! the failover time, the failback time and the failed connects.

use serde::{Deserialize, Serialize};

use crate::workload::ProbeSample;

/// The figures of one drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// From the fault to the first connect of the run that lands only on remote backends until the
    /// recovery (`None`: traffic never settled on remote backends).
    pub failover_ms: Option<f64>,
    /// From the recovery to the first connect of the run that lands only on local backends until the end
    /// (`None`: traffic never came back).
    pub failback_ms: Option<f64>,
    /// Connects that failed (refused, reset, timed out) over the whole drill.
    pub failed_connects: u64,
    /// Connects attempted.
    pub total_connects: u64,
    /// Connects that landed on a local backend after the fault and before failover settled.
    pub local_after_fault: u64,
    /// Backends seen, with how many connects each got.
    pub backends: Vec<(String, u64)>,
}

/// Analyse samples (ordered by start time) of a drill whose fault began at `fault_ms` and whose
/// recovery began at `recover_ms` (both on the probe's clock). `is_local` says whether a backend name
/// is a local backend.
pub fn analyze(
    samples: &[ProbeSample],
    fault_ms: f64,
    recover_ms: Option<f64>,
    is_local: impl Fn(&str) -> bool,
) -> DrillReport {
    let mut sorted: Vec<&ProbeSample> = samples.iter().collect();
    sorted.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    let remote_ok = |s: &ProbeSample| s.ok && s.backend.as_deref().is_some_and(|b| !is_local(b));
    let local_ok = |s: &ProbeSample| s.ok && s.backend.as_deref().is_some_and(&is_local);
    let end_fault = recover_ms.unwrap_or(f64::INFINITY);

    let during: Vec<&&ProbeSample> = sorted
        .iter()
        .filter(|s| s.t_ms >= fault_ms && s.t_ms < end_fault)
        .collect();
    // The last sample in the window that was not a remote success; the settled run starts after it.
    let settled_from = during
        .iter()
        .rposition(|s| !remote_ok(s))
        .map_or(0, |i| i + 1);
    let failover_ms = during.get(settled_from).map(|s| s.t_ms - fault_ms);
    let local_after_fault = during[..settled_from.min(during.len())]
        .iter()
        .filter(|s| local_ok(s))
        .count() as u64;

    let failback_ms = recover_ms.and_then(|r| {
        let after: Vec<&&ProbeSample> = sorted.iter().filter(|s| s.t_ms >= r).collect();
        let from = after
            .iter()
            .rposition(|s| !local_ok(s))
            .map_or(0, |i| i + 1);
        after.get(from).map(|s| s.t_ms - r)
    });

    let mut backends: std::collections::BTreeMap<String, u64> = Default::default();
    for s in &sorted {
        if let Some(b) = &s.backend {
            *backends.entry(b.clone()).or_default() += 1;
        }
    }
    DrillReport {
        failover_ms,
        failback_ms,
        failed_connects: sorted.iter().filter(|s| !s.ok).count() as u64,
        total_connects: sorted.len() as u64,
        local_after_fault,
        backends: backends.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, r: Result<&str, &str>) -> ProbeSample {
        ProbeSample {
            t_ms: t,
            unix_ms: 0,
            ok: r.is_ok(),
            backend: r.ok().map(Into::into),
            error: r.err().map(Into::into),
            latency_us: 100,
        }
    }
    fn local(b: &str) -> bool {
        b.starts_with("c1")
    }

    #[test]
    fn failover_and_failback_are_measured_from_the_events() {
        let mut v = vec![];
        for t in 0..10 {
            v.push(s(t as f64 * 10.0, Ok("c1-a")));
        }
        // fault at 100: two refused, one still local (in flight), then remote.
        v.push(s(100.0, Err("connection refused")));
        v.push(s(110.0, Ok("c1-a")));
        v.push(s(120.0, Err("connection refused")));
        for t in 13..30 {
            v.push(s(t as f64 * 10.0, Ok("c2-a")));
        }
        // recovery at 300: remote until 340, then local.
        for t in 30..35 {
            v.push(s(t as f64 * 10.0, Ok("c2-b")));
        }
        for t in 35..40 {
            v.push(s(t as f64 * 10.0, Ok("c1-b")));
        }
        let r = analyze(&v, 100.0, Some(300.0), local);
        assert_eq!(r.failover_ms, Some(30.0));
        assert_eq!(r.failback_ms, Some(50.0));
        assert_eq!(r.failed_connects, 2);
        assert_eq!(r.local_after_fault, 1);
        assert_eq!(r.total_connects, 40);
        assert_eq!(r.backends.len(), 4);
    }

    #[test]
    fn never_settling_is_none_not_zero() {
        let v = vec![
            s(0.0, Ok("c1-a")),
            s(10.0, Err("refused")),
            s(20.0, Err("refused")),
        ];
        let r = analyze(&v, 5.0, None, local);
        assert_eq!(r.failover_ms, None);
        assert_eq!(r.failback_ms, None);
        let v = vec![s(10.0, Ok("c2-a")), s(20.0, Ok("c1-a"))];
        let r = analyze(&v, 0.0, Some(15.0), local);
        assert_eq!(r.failover_ms, Some(10.0));
        assert_eq!(r.failback_ms, Some(5.0));
    }

    #[test]
    fn a_blip_back_to_local_restarts_the_settled_run() {
        let v = vec![
            s(10.0, Ok("c2-a")),
            s(20.0, Ok("c1-a")),
            s(30.0, Ok("c2-a")),
            s(40.0, Ok("c2-a")),
        ];
        let r = analyze(&v, 0.0, None, local);
        assert_eq!(r.failover_ms, Some(30.0));
        assert_eq!(r.local_after_fault, 1);
    }
}
