//! Unit tests of the merge index: every selection rule and the transitions between them.

use super::*;
use mesh_model::values::{BackendVerdict, EndpointPort};

// ---- builders ------------------------------------------------------------------------------------

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn web() -> ServiceName {
    ServiceName::new("default", "web").unwrap()
}

const VIP: &str = "10.96.0.10";

fn fe() -> Frontend {
    Frontend {
        ip: VIP.parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

struct SpecB(ServiceSpec);

impl SpecB {
    fn new(cluster: &str) -> Self {
        Self(ServiceSpec {
            cluster: c(cluster),
            namespace: "default".into(),
            name: "web".into(),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
            }],
            frontends: vec![VIP.parse().unwrap()],
            headless: false,
            shared: true,
            affinity: Affinity::Local,
            failover_order: vec![],
            health_check: HealthCheck::Tcp,
            health_check_port: None,
        })
    }
    fn affinity(mut self, a: Affinity) -> Self {
        self.0.affinity = a;
        self
    }
    fn order(mut self, o: &[&str]) -> Self {
        self.0.failover_order = o.iter().map(|n| c(n)).collect();
        self
    }
    fn shared(mut self, s: bool) -> Self {
        self.0.shared = s;
        self
    }
    fn frontends(mut self, ips: &[&str]) -> Self {
        self.0.frontends = ips.iter().map(|i| i.parse().unwrap()).collect();
        self
    }
    fn headless(mut self) -> Self {
        self.0.headless = true;
        self.0.frontends.clear();
        self
    }
    fn build(self) -> ServiceSpec {
        self.0
    }
}

fn ep(ip: &str) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        ports: vec![EndpointPort {
            name: None,
            port: 8080,
            protocol: Protocol::Tcp,
        }]
        .into(),
        node: Some("n1".into()),
        zone: None,
        hostname: None,
        conditions: Conditions::default(),
    }
}

fn cond(mut e: Endpoint, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    e.conditions = Conditions {
        ready,
        serving,
        terminating,
    };
    e
}

fn chunk(cluster: &str, n: u32, eps: Vec<Endpoint>) -> EndpointChunk {
    EndpointChunk {
        cluster: c(cluster),
        namespace: "default".into(),
        name: "web".into(),
        chunk: n,
        endpoints: eps,
    }
}

fn report(cluster: &str, node: &str, v: &[(&str, Verdict)]) -> HealthReport {
    HealthReport {
        cluster: c(cluster),
        node: node.into(),
        verdicts: v
            .iter()
            .map(|(ip, verdict)| BackendVerdict {
                ip: ip.parse().unwrap(),
                port: 8080,
                protocol: Protocol::Tcp,
                verdict: *verdict,
                since: None,
            })
            .collect(),
    }
}

/// Backends of the frontend as "cluster/ip", sorted.
fn picked(ix: &MergeIndex, f: &Frontend) -> Vec<String> {
    let mut v: Vec<String> = ix
        .desired()
        .get(f)
        .map(|b| {
            b.iter()
                .map(|b| format!("{}/{}", b.cluster, b.ip))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn reason(ix: &MergeIndex) -> Reason {
    ix.service(&web()).unwrap().frontends[0].reason.clone()
}

/// c1 (local) with 10.1.0.1-2, c2 with 10.2.0.1, c3 with 10.3.0.1; all publish the service.
fn three_clusters(affinity: Affinity, order: &[&str]) -> MergeIndex {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").affinity(affinity).order(order).build());
    ix.upsert_service(SpecB::new("c2").frontends(&["10.97.0.10"]).build());
    ix.upsert_service(SpecB::new("c3").frontends(&["10.98.0.10"]).build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1"), ep("10.1.0.2")]));
    ix.upsert_chunk(chunk("c2", 0, vec![ep("10.2.0.1")]));
    ix.upsert_chunk(chunk("c3", 0, vec![ep("10.3.0.1")]));
    ix
}

fn local_unready(ix: &mut MergeIndex) {
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![
            cond(ep("10.1.0.1"), false, false, false),
            cond(ep("10.1.0.2"), false, false, false),
        ],
    ));
}

// ---- batches ------------------------------------------------------------------------------------

/// A batch selects once: the same final selection as change by change, without the moves a
/// half-applied batch would have recorded (here: traffic to c2 and c3 while c1's chunk had not
/// arrived yet).
#[test]
fn a_deferred_batch_selects_each_service_once_with_the_same_result() {
    let mut one_by_one = three_clusters(Affinity::Local, &[]);
    let mut batched = MergeIndex::new(c("c1"));
    batched.defer();
    batched.upsert_service(SpecB::new("c2").frontends(&["10.97.0.10"]).build());
    batched.upsert_chunk(chunk("c2", 0, vec![ep("10.2.0.1")]));
    batched.upsert_chunk(chunk("c3", 0, vec![ep("10.3.0.1")]));
    batched.upsert_service(SpecB::new("c3").frontends(&["10.98.0.10"]).build());
    batched.upsert_service(SpecB::new("c1").affinity(Affinity::Local).build());
    batched.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1"), ep("10.1.0.2")]));
    assert!(
        batched.desired().is_empty(),
        "nothing selected before settle"
    );
    batched.settle();
    assert_eq!(batched.desired(), one_by_one.desired());
    assert_eq!(picked(&batched, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    assert!(batched.take_group_changes().len() <= one_by_one.take_group_changes().len());
    assert_eq!(batched.failovers(), 0);

    // A health move deferred in a batch keeps its cause.
    batched.defer();
    local_unready(&mut batched);
    batched.settle();
    local_unready(&mut one_by_one);
    assert_eq!(batched.desired(), one_by_one.desired());
    assert_eq!(picked(&batched, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
}

// ---- affinity local ------------------------------------------------------------------------------

#[test]
fn local_affinity_prefers_usable_local_backends() {
    let ix = three_clusters(Affinity::Local, &[]);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    assert_eq!(
        reason(&ix),
        Reason::Preferred {
            clusters: vec![c("c1")]
        }
    );
    // Only the local frontend is programmed, never the remote clusters' ClusterIPs.
    assert_eq!(ix.desired().len(), 1);
}

#[test]
fn local_affinity_fails_over_to_all_remotes_together_by_default() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    local_unready(&mut ix);
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
    assert_eq!(
        reason(&ix),
        Reason::FailedOver {
            clusters: vec![c("c2"), c("c3")]
        }
    );
    assert_eq!(ix.failovers(), 1);
}

#[test]
fn one_usable_local_backend_is_enough_to_stay_local() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, false, false), ep("10.1.0.2")],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.2"]);
}

#[test]
fn failover_order_picks_groups_in_order_then_the_rest() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").order(&["c3", "c2"]).build());
    for (cl, ip) in [("c2", "10.2.0.1"), ("c3", "10.3.0.1"), ("c4", "10.4.0.1")] {
        ix.upsert_service(SpecB::new(cl).build());
        ix.upsert_chunk(chunk(cl, 0, vec![ep(ip)]));
    }
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, false, false)],
    ));
    assert_eq!(picked(&ix, &fe()), ["c3/10.3.0.1"]);
    assert_eq!(
        reason(&ix),
        Reason::FailedOver {
            clusters: vec![c("c3")]
        }
    );
    ix.upsert_chunk(chunk(
        "c3",
        0,
        vec![cond(ep("10.3.0.1"), false, false, false)],
    ));
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1"]);
    ix.upsert_chunk(chunk("c2", 0, vec![]));
    assert_eq!(picked(&ix, &fe()), ["c4/10.4.0.1"]);
    assert_eq!(
        reason(&ix),
        Reason::FailedOver {
            clusters: vec![c("c4")]
        }
    );
}

#[test]
fn failback_when_local_recovers() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    local_unready(&mut ix);
    ix.take_changes();
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1"), ep("10.1.0.2")]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    let ch = ix.take_changes();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].0, fe());
    assert!(matches!(reason(&ix), Reason::Preferred { .. }));
    // Failing over again counts a second failover.
    local_unready(&mut ix);
    assert_eq!(ix.failovers(), 2);
}

// ---- health --------------------------------------------------------------------------------------

#[test]
fn failing_health_verdicts_make_local_backends_unusable_and_recovery_brings_them_back() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.upsert_health(report(
        "c1",
        "n1",
        &[
            ("10.1.0.1", Verdict::Failing),
            ("10.1.0.2", Verdict::Failing),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
    ix.upsert_health(report(
        "c1",
        "n1",
        &[
            ("10.1.0.1", Verdict::Healthy),
            ("10.1.0.2", Verdict::Failing),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    // The report vanishing (lease expired) forgets its verdicts, and nobody checks those backends
    // any more: out while others are usable (see the lapse tests below).
    ix.delete_health(&c("c1"), "n1");
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
}

#[test]
fn remote_health_verdicts_apply_to_remote_backends() {
    let mut ix = three_clusters(Affinity::None, &[]);
    ix.upsert_health(report("c2", "n9", &[("10.2.0.1", Verdict::Failing)]));
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c3/10.3.0.1"]
    );
}

#[test]
fn a_verdict_on_another_port_does_not_apply() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    let mut r = report("c1", "n1", &[("10.1.0.1", Verdict::Failing)]);
    r.verdicts[0].port = 9999;
    ix.upsert_health(r);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
}

#[test]
fn health_change_recomputes_only_services_on_those_addresses() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    let mut other = SpecB::new("c1").frontends(&["10.96.0.99"]).build();
    other.name = "other".into();
    ix.upsert_service(other);
    let mut ch = chunk("c1", 0, vec![ep("10.1.9.9"), ep("10.1.9.8")]);
    ch.name = "other".into();
    ix.upsert_chunk(ch);
    ix.take_changes();
    ix.upsert_health(report("c1", "n1", &[("10.1.9.9", Verdict::Failing)]));
    let changes = ix.take_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].0.ip.to_string(), "10.96.0.99");
    let left: Vec<String> = changes[0]
        .1
        .as_ref()
        .unwrap()
        .iter()
        .map(|b| b.ip.to_string())
        .collect();
    assert_eq!(left, ["10.1.9.8"]);
}

// ---- affinity remote / none ------------------------------------------------------------------------

#[test]
fn remote_affinity_prefers_remotes_and_falls_back_to_local() {
    let mut ix = three_clusters(Affinity::Remote, &["c3"]);
    assert_eq!(picked(&ix, &fe()), ["c3/10.3.0.1"]);
    assert_eq!(
        reason(&ix),
        Reason::Preferred {
            clusters: vec![c("c3")]
        }
    );
    ix.upsert_health(report("c3", "n1", &[("10.3.0.1", Verdict::Failing)]));
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1"]);
    ix.upsert_health(report("c2", "n1", &[("10.2.0.1", Verdict::Failing)]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    assert_eq!(
        reason(&ix),
        Reason::FailedOver {
            clusters: vec![c("c1")]
        }
    );
}

#[test]
fn no_affinity_uses_every_usable_backend() {
    let mut ix = three_clusters(Affinity::None, &[]);
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c2/10.2.0.1", "c3/10.3.0.1"]
    );
    assert_eq!(reason(&ix), Reason::AllUsable);
    local_unready(&mut ix);
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
    assert_eq!(reason(&ix), Reason::AllUsable);
    assert_eq!(ix.failovers(), 0);
}

#[test]
fn affinity_change_takes_effect() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.upsert_service(SpecB::new("c1").affinity(Affinity::None).build());
    assert_eq!(picked(&ix, &fe()).len(), 4);
}

// ---- sharing and staleness -----------------------------------------------------------------------

#[test]
fn a_remote_that_does_not_share_is_not_a_candidate() {
    let mut ix = three_clusters(Affinity::None, &[]);
    ix.upsert_service(SpecB::new("c2").shared(false).build());
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c3/10.3.0.1"]
    );
    // Endpoints of a cluster without a spec are not candidates either.
    ix.delete_service(&c("c3"), &web());
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
}

#[test]
fn stale_cluster_is_left_out_kept_in_memory_and_back_when_live() {
    let mut ix = three_clusters(Affinity::None, &[]);
    ix.set_stale(&c("c2"), true);
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c3/10.3.0.1"]
    );
    assert_eq!(ix.service(&web()).unwrap().stale_clusters, vec![c("c2")]);
    // Updates from a stale cluster are still taken in.
    ix.upsert_chunk(chunk("c2", 0, vec![ep("10.2.0.1"), ep("10.2.0.2")]));
    ix.set_stale(&c("c2"), false);
    assert_eq!(
        picked(&ix, &fe()),
        [
            "c1/10.1.0.1",
            "c1/10.1.0.2",
            "c2/10.2.0.1",
            "c2/10.2.0.2",
            "c3/10.3.0.1"
        ]
    );
}

#[test]
fn failover_skips_stale_clusters() {
    let mut ix = three_clusters(Affinity::Local, &["c2"]);
    ix.set_stale(&c("c2"), true);
    local_unready(&mut ix);
    assert_eq!(picked(&ix, &fe()), ["c3/10.3.0.1"]);
}

#[test]
fn the_local_cluster_is_never_left_out_as_stale() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.set_stale(&c("c1"), true);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
}

#[test]
fn removing_a_cluster_forgets_its_backends_and_verdicts() {
    let mut ix = three_clusters(Affinity::None, &[]);
    ix.upsert_health(report("c3", "n1", &[("10.1.0.1", Verdict::Failing)]));
    ix.remove_cluster(&c("c3"));
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c2/10.2.0.1"]
    );
}

// ---- nothing usable ------------------------------------------------------------------------------

#[test]
fn nothing_usable_keeps_last_usable_backends_that_still_serve() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1"), ep("10.1.0.2")]));
    // Both terminate; one still serves.
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![
            cond(ep("10.1.0.1"), false, true, true),
            cond(ep("10.1.0.2"), false, false, true),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    assert_eq!(reason(&ix), Reason::KeepServing);
    // When it stops serving too: no backends (connects fail fast).
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![
            cond(ep("10.1.0.1"), false, false, true),
            cond(ep("10.1.0.2"), false, false, true),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), Vec::<String>::new());
    assert!(
        ix.desired().contains_key(&fe()),
        "programmed empty, not removed"
    );
    assert_eq!(
        reason(&ix),
        Reason::NoUsableBackends {
            candidates: 2,
            failing_health: 0
        }
    );
}

#[test]
fn serving_terminating_backends_never_usable_are_not_kept() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, true, true)],
    ));
    assert_eq!(picked(&ix, &fe()), Vec::<String>::new());
}

#[test]
fn serving_not_terminating_is_usable_even_when_not_ready() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, true, false)],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
}

#[test]
fn every_ready_backend_failing_its_probe_fails_open_over_the_preferred_group() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.upsert_health(report(
        "c1",
        "n1",
        &[
            ("10.1.0.1", Verdict::Failing),
            ("10.1.0.2", Verdict::Failing),
        ],
    ));
    // Remote backends are healthy: an ordinary failover, not failing open.
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1", "c3/10.3.0.1"]);
    assert!(ix.fail_open().is_empty());
    ix.upsert_health(report("c2", "n1", &[("10.2.0.1", Verdict::Failing)]));
    ix.upsert_health(report("c3", "n1", &[("10.3.0.1", Verdict::Failing)]));
    // Probes fail everywhere (a NetworkPolicy blocking node-to-pod traffic, a wrong probe port):
    // spread over the ready backends of the preferred group rather than refuse every connect.
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    assert_eq!(
        reason(&ix),
        Reason::FailOpen {
            clusters: vec![c("c1")],
            failing: 2
        }
    );
    assert!(reason(&ix).to_string().starts_with("failing open"));
    assert_eq!(ix.fail_open(), [(&web(), fe())]);
    // One backend answering its probe again ends failing open.
    ix.upsert_health(report(
        "c1",
        "n1",
        &[
            ("10.1.0.1", Verdict::Healthy),
            ("10.1.0.2", Verdict::Failing),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    assert!(ix.fail_open().is_empty());
}

#[test]
fn no_ready_backend_at_all_still_refuses_at_once() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, false, false)],
    ));
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Failing)]));
    assert_eq!(picked(&ix, &fe()), Vec::<String>::new());
    assert_eq!(
        reason(&ix),
        Reason::NoUsableBackends {
            candidates: 1,
            failing_health: 1
        }
    );
    assert!(ix.fail_open().is_empty());
}

#[test]
fn a_verdict_moves_only_the_backend_of_the_reporters_cluster() {
    // Overlapping pod CIDRs: c1 and c2 both have a backend at 10.0.1.5:8080.
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").affinity(Affinity::None).build());
    ix.upsert_service(SpecB::new("c2").build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.0.1.5"), ep("10.1.0.1")]));
    ix.upsert_chunk(chunk("c2", 0, vec![ep("10.0.1.5")]));
    ix.upsert_health(report("c2", "n1", &[("10.0.1.5", Verdict::Failing)]));
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.0.1.5", "c1/10.1.0.1"],
        "c2's verdict takes out c2's backend only"
    );
    ix.upsert_health(report("c2", "n1", &[("10.0.1.5", Verdict::Healthy)]));
    ix.upsert_health(report("c1", "n1", &[("10.0.1.5", Verdict::Failing)]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c2/10.0.1.5"]);
    // A lapse of c1's node n1 orphans c1's backends on it, not c2's of the same address.
    ix.delete_health(&c("c1"), "n1");
    assert_eq!(picked(&ix, &fe()), ["c2/10.0.1.5"]);
    let states = ix.backend_states(&web());
    let c2_state = states
        .iter()
        .find(|(b, _, _)| b.cluster.name().as_str() == "c2")
        .unwrap();
    assert!(c2_state.1 && c2_state.2.is_none(), "{states:?}");
}

// ---- frontends -----------------------------------------------------------------------------------

#[test]
fn import_gives_the_frontend_when_there_is_no_local_service() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c2").affinity(Affinity::None).build());
    ix.upsert_chunk(chunk("c2", 0, vec![ep("10.2.0.1")]));
    assert_eq!(
        ix.service(&web()).unwrap().no_frontend,
        Some(NoFrontend::NoLocalServiceOrImport)
    );
    assert!(ix.desired().is_empty());
    ix.upsert_import(ServiceImport {
        cluster: c("c1"),
        namespace: "default".into(),
        name: "web".into(),
        ips: vec!["10.100.0.5".parse().unwrap()],
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
    });
    let f = Frontend {
        ip: "10.100.0.5".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(picked(&ix, &f), ["c2/10.2.0.1"]);
    // Another cluster's import is not ours.
    ix.delete_import(&c("c2"), &web());
    assert_eq!(picked(&ix, &f), ["c2/10.2.0.1"]);
    ix.delete_import(&c("c1"), &web());
    assert!(ix.desired().is_empty());
    assert_eq!(ix.take_changes().last().unwrap().1, None);
}

#[test]
fn headless_local_service_has_no_frontend() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").headless().build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1")]));
    assert!(ix.desired().is_empty());
    assert_eq!(
        ix.service(&web()).unwrap().no_frontend,
        Some(NoFrontend::Headless)
    );
}

#[test]
fn each_frontend_family_gets_backends_of_its_family() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").frontends(&[VIP, "fd00::10"]).build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1"), ep("fd00:1::1")]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    let f6 = Frontend {
        ip: "fd00::10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(picked(&ix, &f6), ["c1/fd00:1::1"]);
}

#[test]
fn named_ports_map_to_the_endpoint_port_of_the_same_name() {
    let mut ix = MergeIndex::new(c("c1"));
    let mut s = SpecB::new("c1").build();
    s.ports = vec![
        ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
        },
        ServicePort {
            name: Some("metrics".into()),
            port: 9090,
            protocol: Protocol::Tcp,
        },
    ];
    ix.upsert_service(s);
    let mut e = ep("10.1.0.1");
    e.ports = vec![
        EndpointPort {
            name: Some("metrics".into()),
            port: 19090,
            protocol: Protocol::Tcp,
        },
        EndpointPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        },
    ]
    .into();
    ix.upsert_chunk(chunk("c1", 0, vec![e]));
    let mf = Frontend {
        ip: VIP.parse().unwrap(),
        port: 9090,
        protocol: Protocol::Tcp,
    };
    assert_eq!(ix.desired()[&fe()][0].port, 8080);
    assert_eq!(ix.desired()[&mf][0].port, 19090);
}

#[test]
fn a_changed_cluster_ip_removes_the_old_frontend() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.take_changes();
    ix.upsert_service(SpecB::new("c1").frontends(&["10.96.0.11"]).build());
    let ch = ix.take_changes();
    assert_eq!(ch.len(), 2);
    assert!(ch.iter().any(|(f, b)| *f == fe() && b.is_none()));
    assert!(!ix.desired().contains_key(&fe()));
}

#[test]
fn deleting_everything_of_a_service_removes_its_frontend() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1")]));
    ix.delete_chunk(&c("c1"), &web(), 0);
    assert_eq!(picked(&ix, &fe()), Vec::<String>::new());
    ix.delete_service(&c("c1"), &web());
    assert!(ix.desired().is_empty());
    assert!(ix.services().is_empty());
}

#[test]
fn endpoints_across_chunks_are_merged() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").build());
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1")]));
    ix.upsert_chunk(chunk("c1", 1, vec![ep("10.1.0.2")]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    ix.delete_chunk(&c("c1"), &web(), 0);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.2"]);
}

#[test]
fn unchanged_selection_reports_no_change() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.take_changes();
    // A remote endpoint change does not alter a local-affinity selection.
    ix.upsert_chunk(chunk("c2", 0, vec![ep("10.2.0.1"), ep("10.2.0.2")]));
    assert!(!ix.has_changes());
}

#[test]
fn apply_dispatches_decoded_values() {
    let mut ix = MergeIndex::new(c("c1"));
    let spec = SpecB::new("c1").build();
    let key = MeshKey::Service {
        cluster: c("c1"),
        service: web(),
    };
    let bytes = MeshValue::Service(spec).encode();
    let v = MeshValue::decode(&key, &bytes).unwrap();
    assert!(ix.apply(&key, Some(v)));
    assert!(ix.service(&web()).is_some());
    assert!(ix.apply(&key, None));
    assert!(ix.service(&web()).is_none());
    assert!(!ix.apply(&MeshKey::Heartbeat { cluster: c("c1") }, None));
}

#[test]
fn probe_targets_are_local_backends_on_this_node() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    let mut other_node = ep("10.1.0.3");
    other_node.node = Some("n2".into());
    ix.upsert_chunk(chunk("c1", 1, vec![other_node]));
    ix.upsert_service(SpecB::new("c1").build().tap_http("/healthz"));
    let t = ix.probe_targets("n1");
    let ips: Vec<String> = t.iter().map(|t| t.ip.to_string()).collect();
    assert_eq!(ips, ["10.1.0.1", "10.1.0.2"]);
    assert!(
        t.iter()
            .all(|t| t.check == ProbeKind::Http("/healthz".into()))
    );
}

/// A UDP-only service: its endpoints serve UDP 53 (and a TCP health port 8081 when asked for).
fn udp_service(health_port: Option<u16>) -> MergeIndex {
    let mut ix = MergeIndex::new(c("c1"));
    let mut spec = SpecB::new("c1").build();
    spec.ports = vec![ServicePort {
        name: None,
        port: 53,
        protocol: Protocol::Udp,
    }];
    spec.health_check_port = health_port;
    ix.upsert_service(spec);
    let mut e = ep("10.1.0.1");
    e.ports = vec![EndpointPort {
        name: None,
        port: 5353,
        protocol: Protocol::Udp,
    }]
    .into();
    ix.upsert_chunk(chunk("c1", 0, vec![e]));
    ix
}

fn udp_fe() -> Frontend {
    Frontend {
        ip: VIP.parse().unwrap(),
        port: 53,
        protocol: Protocol::Udp,
    }
}

#[test]
fn a_udp_service_without_a_probe_port_is_not_called_healthy() {
    let ix = udp_service(None);
    assert!(
        ix.probe_targets("n1").is_empty(),
        "UDP silence proves nothing"
    );
    let sel = &ix.service(&web()).unwrap().frontends[0];
    assert_eq!(sel.frontend, udp_fe());
    assert!(!sel.health_checked);
    assert!(sel.why().contains("not health-checked"), "{}", sel.why());
}

#[test]
fn a_udp_service_is_probed_on_its_tcp_health_port_and_the_verdict_applies() {
    let mut ix = udp_service(Some(8081));
    let t: Vec<ProbeTarget> = ix.probe_targets("n1").into_iter().collect();
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].port, t[0].protocol, t[0].probe_port),
        (5353, Protocol::Udp, 8081),
        "the verdict is on the UDP backend, the probe on the TCP port"
    );
    let sel = &ix.service(&web()).unwrap().frontends[0];
    assert!(sel.health_checked && !sel.why().contains("not health-checked"));
    // Its verdict, published on the UDP backend, takes it out (with another one ready).
    let mut second = ep("10.1.0.2");
    second.ports = vec![EndpointPort {
        name: None,
        port: 5353,
        protocol: Protocol::Udp,
    }]
    .into();
    let mut first = ep("10.1.0.1");
    first.ports = second.ports.clone();
    ix.upsert_chunk(chunk("c1", 0, vec![first, second]));
    let mut r = report("c1", "n1", &[("10.1.0.1", Verdict::Failing)]);
    r.verdicts[0].port = 5353;
    r.verdicts[0].protocol = Protocol::Udp;
    ix.upsert_health(r);
    assert_eq!(picked(&ix, &udp_fe()), ["c1/10.1.0.2"]);
}

trait TapHttp {
    fn tap_http(self, path: &str) -> Self;
}
impl TapHttp for ServiceSpec {
    fn tap_http(mut self, path: &str) -> Self {
        self.health_check = HealthCheck::Http { path: path.into() };
        self
    }
}

#[test]
fn backend_states_say_why_a_backend_is_not_used() {
    let mut ix = three_clusters(Affinity::Local, &[]);
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![cond(ep("10.1.0.1"), false, true, true), ep("10.1.0.2")],
    ));
    ix.upsert_health(report("c1", "n1", &[("10.1.0.2", Verdict::Failing)]));
    ix.set_stale(&c("c3"), true);
    let states: Vec<(String, bool, Option<&str>)> = ix
        .backend_states(&web())
        .into_iter()
        .map(|(b, sel, why)| (format!("{}/{}", b.cluster, b.ip), sel, why))
        .collect();
    assert_eq!(
        states,
        vec![
            ("c1/10.1.0.1".to_string(), false, Some("terminating")),
            (
                "c1/10.1.0.2".to_string(),
                false,
                Some("failing health check")
            ),
            ("c2/10.2.0.1".to_string(), true, None),
            ("c3/10.3.0.1".to_string(), false, Some("cluster stale")),
        ]
    );
}

#[test]
fn group_changes_record_failover_and_failback() {
    let mut ix = three_clusters(Affinity::Local, &["c2"]);
    ix.take_group_changes();
    local_unready(&mut ix);
    ix.upsert_chunk(chunk("c1", 0, vec![ep("10.1.0.1")]));
    let g = ix.take_group_changes();
    assert_eq!(g.len(), 2);
    assert_eq!(
        (g[0].from.clone(), g[0].to.clone()),
        (vec![c("c1")], vec![c("c2")])
    );
    assert_eq!(
        (g[1].from.clone(), g[1].to.clone()),
        (vec![c("c2")], vec![c("c1")])
    );
}

// ---- lapsed health publication (a node cut off, or its node-sync gone past the lease TTL) ---------

fn on(mut e: Endpoint, node: &str) -> Endpoint {
    e.node = Some(node.into());
    e
}

/// c1 (local) with 10.1.0.1 on n1 and 10.1.0.2 on n2, c2 with 10.2.0.1 on n1; every node reports
/// its own backend healthy.
fn two_clusters_reporting(affinity: Affinity) -> MergeIndex {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").affinity(affinity).build());
    ix.upsert_service(SpecB::new("c2").frontends(&["10.97.0.10"]).build());
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![on(ep("10.1.0.1"), "n1"), on(ep("10.1.0.2"), "n2")],
    ));
    ix.upsert_chunk(chunk("c2", 0, vec![on(ep("10.2.0.1"), "n1")]));
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Healthy)]));
    ix.upsert_health(report("c1", "n2", &[("10.1.0.2", Verdict::Healthy)]));
    ix.upsert_health(report("c2", "n1", &[("10.2.0.1", Verdict::Healthy)]));
    ix
}

#[test]
fn a_node_whose_report_lapses_leaves_selection_and_comes_back_when_it_publishes() {
    let mut ix = two_clusters_reporting(Affinity::Local);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    ix.take_changes();
    // n2 is cut off: its lease expires, its report is deleted.
    ix.delete_health(&c("c1"), "n2");
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    assert_eq!(ix.take_changes().len(), 1, "the frontend is rewritten");
    assert_eq!(ix.lapsed_nodes(), [(c("c1"), "n2".to_string())]);
    let why: Vec<_> = ix
        .backend_states(&web())
        .into_iter()
        .filter(|(b, _, _)| b.ip.to_string() == "10.1.0.2")
        .collect();
    assert_eq!(why.len(), 1);
    assert!(!why[0].1);
    assert_eq!(
        why[0].2,
        Some("its node stopped publishing health verdicts")
    );
    // It publishes again (healed): back at once.
    ix.upsert_health(report("c1", "n2", &[("10.1.0.2", Verdict::Healthy)]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    assert!(ix.lapsed_nodes().is_empty());
    // A failing verdict after the recovery counts as before.
    ix.upsert_health(report("c1", "n2", &[("10.1.0.2", Verdict::Failing)]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
}

#[test]
fn a_node_that_never_published_has_nothing_to_lapse() {
    let mut ix = two_clusters_reporting(Affinity::Local);
    ix.delete_health(&c("c1"), "n7");
    ix.delete_health(&c("c1"), "n2");
    // Deleted twice (a relist sweep after the watch saw it): still one lapse, same selection.
    ix.delete_health(&c("c1"), "n2");
    assert_eq!(ix.lapsed_nodes(), [(c("c1"), "n2".to_string())]);
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    // Without any report at all (no node-sync ever ran), nothing is orphaned.
    let mut fresh = MergeIndex::new(c("c1"));
    fresh.upsert_service(SpecB::new("c1").build());
    fresh.upsert_chunk(chunk(
        "c1",
        0,
        vec![on(ep("10.1.0.1"), "n1"), on(ep("10.1.0.2"), "n2")],
    ));
    fresh.delete_health(&c("c1"), "n2");
    assert_eq!(picked(&fresh, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
}

#[test]
fn lapsed_backends_are_kept_when_nothing_else_is_usable() {
    let mut ix = two_clusters_reporting(Affinity::Local);
    // The local backend n1 fails its health check, n2 lapses, the remote lapses too: the only
    // backends that may still work are the lapsed ones (never zero while some are usable).
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Failing)]));
    ix.delete_health(&c("c1"), "n2");
    assert_eq!(
        picked(&ix, &fe()),
        ["c2/10.2.0.1"],
        "fails over to the live remote"
    );
    assert!(matches!(reason(&ix), Reason::FailedOver { .. }));
    ix.delete_health(&c("c2"), "n1");
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.2"],
        "the lapsed local one, in order"
    );
    // The remote publishes again: it is checked, so preferred to the unchecked local one.
    ix.upsert_health(report("c2", "n1", &[("10.2.0.1", Verdict::Healthy)]));
    assert_eq!(picked(&ix, &fe()), ["c2/10.2.0.1"]);
    // The local n1 recovers: local again, without the lapsed n2.
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Healthy)]));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
}

#[test]
fn a_remote_node_lapse_applies_to_its_backends_everywhere() {
    let mut ix = two_clusters_reporting(Affinity::None);
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c2/10.2.0.1"]
    );
    ix.delete_health(&c("c2"), "n1");
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
    // Same node name in another cluster: c1's n1 is not affected.
    assert!(picked(&ix, &fe()).contains(&"c1/10.1.0.1".to_string()));
    ix.upsert_health(report("c2", "n1", &[("10.2.0.1", Verdict::Healthy)]));
    assert_eq!(picked(&ix, &fe()).len(), 3);
}

#[test]
fn an_endpoint_placed_on_a_lapsed_node_is_covered_by_its_node_name() {
    let mut ix = two_clusters_reporting(Affinity::Local);
    ix.delete_health(&c("c1"), "n2");
    // A new pod lands on n2 after the lapse: its address was in no report, its node name says.
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![
            on(ep("10.1.0.1"), "n1"),
            on(ep("10.1.0.2"), "n2"),
            on(ep("10.1.0.3"), "n2"),
        ],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    ix.upsert_health(report(
        "c1",
        "n2",
        &[
            ("10.1.0.2", Verdict::Healthy),
            ("10.1.0.3", Verdict::Healthy),
        ],
    ));
    assert_eq!(
        picked(&ix, &fe()),
        ["c1/10.1.0.1", "c1/10.1.0.2", "c1/10.1.0.3"]
    );
}

#[test]
fn a_live_verdict_from_another_reporter_overrides_the_lapse() {
    let mut ix = two_clusters_reporting(Affinity::Local);
    ix.delete_health(&c("c1"), "n2");
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1"]);
    // The pod moved: n3 now reports the address, healthy.
    ix.upsert_health(report("c1", "n3", &[("10.1.0.2", Verdict::Healthy)]));
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![on(ep("10.1.0.1"), "n1"), on(ep("10.1.0.2"), "n3")],
    ));
    assert_eq!(picked(&ix, &fe()), ["c1/10.1.0.1", "c1/10.1.0.2"]);
}

#[test]
fn removing_a_cluster_forgets_its_lapsed_nodes() {
    let mut ix = two_clusters_reporting(Affinity::None);
    ix.delete_health(&c("c2"), "n1");
    assert_eq!(ix.lapsed_nodes().len(), 1);
    ix.remove_cluster(&c("c2"));
    assert!(ix.lapsed_nodes().is_empty());
    // Reconnected, its endpoints without a report yet are usable (nothing lapsed since).
    ix.upsert_service(SpecB::new("c2").frontends(&["10.97.0.10"]).build());
    ix.upsert_chunk(chunk("c2", 0, vec![on(ep("10.2.0.1"), "n1")]));
    assert_eq!(picked(&ix, &fe()).len(), 3);
}

#[test]
fn headless_dns_leaves_out_endpoints_of_a_lapsed_node_unless_nothing_else_is_usable() {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(SpecB::new("c1").headless().build());
    ix.upsert_chunk(chunk(
        "c1",
        0,
        vec![on(ep("10.1.0.1"), "n1"), on(ep("10.1.0.2"), "n2")],
    ));
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Healthy)]));
    ix.upsert_health(report("c1", "n2", &[("10.1.0.2", Verdict::Healthy)]));
    let ips = |ix: &MergeIndex| -> Vec<String> {
        let z = ix.dns_zone();
        let mut v: Vec<String> = z.services[&web()]
            .endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ips(&ix), ["10.1.0.1", "10.1.0.2"]);
    ix.delete_health(&c("c1"), "n2");
    assert_eq!(ips(&ix), ["10.1.0.1"]);
    ix.delete_health(&c("c1"), "n1");
    assert_eq!(
        ips(&ix),
        ["10.1.0.1", "10.1.0.2"],
        "never none while some may work"
    );
    ix.upsert_health(report("c1", "n1", &[("10.1.0.1", Verdict::Healthy)]));
    assert_eq!(ips(&ix), ["10.1.0.1"]);
    ix.upsert_health(report("c1", "n2", &[("10.1.0.2", Verdict::Healthy)]));
    assert_eq!(ips(&ix), ["10.1.0.1", "10.1.0.2"]);
}

// ---- splicing one cluster's change -------------------------------------------------------------

/// A change of one cluster's endpoints rebuilds that cluster's backends only (a selection in full
/// at 255 clusters rebuilt 2,550 per change); a change a full selection would answer differently
/// (the chosen group emptied, an earlier group got a usable backend) selects in full.
#[test]
fn one_cluster_s_changed_endpoints_are_spliced_into_the_last_selection() {
    let mut ix = MergeIndex::new(c("c1"));
    for cl in ["c1", "c2", "c3"] {
        ix.upsert_service(SpecB::new(cl).affinity(Affinity::None).build());
    }
    let ready = |ip: &str, r: bool| cond(ep(ip), r, r, false);
    ix.upsert_chunk(chunk("c1", 0, vec![ready("10.1.0.1", true)]));
    ix.upsert_chunk(chunk(
        "c2",
        0,
        vec![ready("10.2.0.1", true), ready("10.2.0.2", true)],
    ));
    ix.upsert_chunk(chunk("c3", 0, vec![ready("10.3.0.1", true)]));
    ix.take_changes();
    let ips = |ix: &MergeIndex| -> Vec<String> {
        ix.desired()[&fe()]
            .iter()
            .map(|b| b.ip.to_string())
            .collect()
    };
    assert_eq!(ips(&ix), ["10.1.0.1", "10.2.0.1", "10.2.0.2", "10.3.0.1"]);

    // c2's second endpoint stops being ready: spliced, one frontend changed.
    let before = ix.selections;
    ix.upsert_chunk(chunk(
        "c2",
        0,
        vec![ready("10.2.0.1", true), ready("10.2.0.2", false)],
    ));
    assert_eq!(ix.selections.spliced, before.spliced + 1);
    assert_eq!(ix.selections.full, before.full);
    assert_eq!(ips(&ix), ["10.1.0.1", "10.2.0.1", "10.3.0.1"]);
    assert_eq!(ix.take_changes().len(), 1);

    // Two clusters' chunks in one batch: one splice.
    ix.defer();
    ix.upsert_chunk(chunk("c2", 1, vec![ready("10.2.1.1", true)]));
    ix.upsert_chunk(chunk("c3", 0, vec![]));
    ix.settle();
    assert_eq!(ix.selections.spliced, before.spliced + 2);
    assert_eq!(ips(&ix), ["10.1.0.1", "10.2.0.1", "10.2.1.1"]);

    // Local affinity: the local cluster is chosen, so a remote's change leaves the backends.
    ix.upsert_service(SpecB::new("c1").affinity(Affinity::Local).build());
    ix.take_changes();
    let before = ix.selections;
    ix.upsert_chunk(chunk("c3", 0, vec![ready("10.3.0.9", true)]));
    assert_eq!(ix.selections.spliced, before.spliced + 1);
    assert_eq!(ips(&ix), ["10.1.0.1"]);
    assert!(ix.take_changes().is_empty(), "nothing to write");

    // The local cluster's last usable backend goes: the chosen group is empty, so in full (the
    // traffic fails over to the remotes).
    ix.upsert_chunk(chunk("c1", 0, vec![ready("10.1.0.1", false)]));
    assert_eq!(ix.selections.full, before.full + 1);
    assert_eq!(ips(&ix), ["10.2.0.1", "10.2.1.1", "10.3.0.9"]);
    let failed_over = ix.service(&web()).unwrap().frontends[0].reason.clone();
    assert!(
        matches!(failed_over, Reason::FailedOver { .. }),
        "{failed_over:?}"
    );

    // Failed over, a local backend is usable again: an earlier group, so in full (failback).
    ix.upsert_chunk(chunk("c1", 0, vec![ready("10.1.0.1", true)]));
    assert_eq!(ix.selections.full, before.full + 2);
    assert_eq!(ips(&ix), ["10.1.0.1"]);
}

// ---- counters kept incrementally ----------------------------------------------------------------

/// `endpoints_by_cluster` by a walk over every chunk (what the kept counts must equal).
fn endpoints_by_cluster_walked(ix: &MergeIndex) -> BTreeMap<ClusterName, usize> {
    let mut out: BTreeMap<ClusterName, usize> = BTreeMap::new();
    for (cref, chunks) in ix.services.values().flat_map(|e| e.endpoints.iter()) {
        *out.entry(cref.name().clone()).or_default() +=
            chunks.values().map(Vec::len).sum::<usize>();
    }
    out
}

/// `remote_probe_targets` by a walk over every selected backend (what the kept counts must give).
fn remote_probe_targets_walked(
    ix: &MergeIndex,
) -> BTreeMap<ClusterName, Vec<std::net::SocketAddr>> {
    let mut out: BTreeMap<ClusterName, BTreeSet<std::net::SocketAddr>> = BTreeMap::new();
    for b in ix.desired().values().flat_map(|b| b.iter()) {
        if b.cluster != *ix.local() && b.protocol == Protocol::Tcp {
            out.entry(b.cluster.name().clone())
                .or_default()
                .insert(std::net::SocketAddr::new(b.ip, b.port));
        }
    }
    for cluster in ix.unreachable_clusters() {
        for e in ix.services.values() {
            if e.status.as_ref().is_none_or(|s| s.frontends.is_empty()) {
                continue;
            }
            for ep in e
                .endpoints
                .get(cluster)
                .into_iter()
                .flat_map(|c| c.values().flatten())
            {
                if !ep.conditions.usable() {
                    continue;
                }
                for p in ep.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                    out.entry(cluster.clone())
                        .or_default()
                        .insert(std::net::SocketAddr::new(ep.ip, p.port));
                }
            }
        }
    }
    out.into_iter()
        .map(|(c, s)| (c, s.into_iter().collect()))
        .collect()
}

/// Random sequences of specs, chunks, health, passive failures, staleness, reachability and
/// removed clusters (with batches deferred or not): the endpoint counts, remote probe targets and
/// services by address kept as the index changes equal a walk over everything after every step,
/// and every service's selection (spliced when only chunks changed) equals a selection in full.
#[test]
fn kept_counts_equal_a_full_walk_over_random_sequences() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let clusters = ["c1", "c2", "c3", "c4"];
    let services = ["web", "api", "db"];
    // Steps where some remote backend was selected (the sequences must exercise the counts).
    let mut selected_steps = 0;
    let mut totals = Selections::default();
    for run in 0..20 {
        let mut ix = MergeIndex::new(c("c1"));
        for step in 0..300 {
            let cl = clusters[next(4) as usize];
            let svc = services[next(3) as usize];
            let defer = next(4) == 0;
            if defer {
                ix.defer();
            }
            match next(10) {
                0 | 1 => {
                    let order: Vec<&str> =
                        (0..next(3)).map(|_| clusters[next(4) as usize]).collect();
                    let mut s = SpecB::new(cl)
                        .affinity(
                            [Affinity::Local, Affinity::Remote, Affinity::None][next(3) as usize],
                        )
                        .order(&order)
                        .shared(next(5) != 0)
                        .build();
                    s.name = svc.into();
                    s.frontends = vec![
                        format!("10.96.{}.{}", next(3), next(3) + 1)
                            .parse()
                            .unwrap(),
                    ];
                    ix.upsert_service(s);
                }
                2 => ix.delete_service(&c(cl), &ServiceName::new("default", svc).unwrap()),
                3..=6 => {
                    let eps = (0..next(4))
                        .map(|i| {
                            // Some IPv6 addresses: the address index keeps them apart.
                            let (a, b) = (cl.len() + next(4) as usize, next(2));
                            let e = ep(&if next(6) == 0 {
                                format!("fd00::{a}:{b}:{}", i + 1)
                            } else {
                                format!("10.{a}.{b}.{}", i + 1)
                            });
                            cond(e, next(3) != 0, next(2) == 0, next(4) == 0)
                        })
                        .collect();
                    let mut ch = chunk(cl, next(3) as u32, eps);
                    ch.name = svc.into();
                    ix.upsert_chunk(ch);
                }
                7 => ix.delete_chunk(
                    &c(cl),
                    &ServiceName::new("default", svc).unwrap(),
                    next(3) as u32,
                ),
                8 => match next(5) {
                    0 => ix.set_stale(&c(cl), next(2) == 0),
                    1 => ix.set_unreachable(&c(cl), next(2) == 0),
                    // This node saw connects to a backend fail (or answer again).
                    4 => {
                        let ip = format!("10.{}.{}.1", cl.len() + next(4) as usize, next(2));
                        ix.set_passive_failure(
                            &c(cl),
                            (ip.parse().unwrap(), 8080, Protocol::Tcp),
                            next(2) == 0,
                        );
                    }
                    2 => ix.upsert_health(report(
                        cl,
                        "n1",
                        &[(
                            &format!("10.{}.0.1", cl.len() + next(4) as usize),
                            [Verdict::Healthy, Verdict::Failing][next(2) as usize],
                        )],
                    )),
                    _ => ix.delete_health(&c(cl), "n1"),
                },
                _ => {
                    if next(3) == 0 {
                        ix.remove_cluster(&c(cl));
                    }
                }
            }
            if defer {
                ix.settle();
            }
            assert_eq!(
                ix.endpoints_by_cluster(),
                endpoints_by_cluster_walked(&ix),
                "endpoint counts, run {run} step {step}"
            );
            let walked_targets = remote_probe_targets_walked(&ix);
            assert_eq!(
                ix.remote_probe_targets(),
                walked_targets,
                "remote probe targets, run {run} step {step}"
            );
            // The prober's sample: at most 3 per cluster, spread over the whole sorted list.
            let sample = ix.remote_probe_sample(3);
            assert_eq!(
                sample.keys().collect::<Vec<_>>(),
                walked_targets.keys().collect::<Vec<_>>(),
                "sampled clusters, run {run} step {step}"
            );
            for (c, all) in &walked_targets {
                let s = &sample[c];
                assert_eq!(s.len(), all.len().min(3), "run {run} step {step}");
                assert!(s.iter().all(|a| all.contains(a)) && s.is_sorted());
                assert_eq!(s.first(), all.first());
                if all.len() > 3 {
                    assert!(s[2] >= all[all.len() / 2], "spread, not the first three");
                }
            }
            let mut walked: HashMap<IpAddr, BTreeMap<ServiceName, u32>> = HashMap::new();
            for (name, e) in &ix.services {
                for ep in e.endpoints.values().flat_map(|c| c.values().flatten()) {
                    *walked
                        .entry(ep.ip)
                        .or_default()
                        .entry(name.clone())
                        .or_default() += 1;
                }
            }
            let mut kept: HashMap<IpAddr, BTreeMap<ServiceName, u32>> = HashMap::new();
            for (ip, s, n) in ix.ip_services.entries() {
                let prev = kept.entry(ip).or_default().insert((**s).clone(), n);
                assert_eq!(prev, None, "{ip} {s:?} held twice, run {run} step {step}");
            }
            assert_eq!(kept, walked, "services by address, run {run} step {step}");
            selected_steps += usize::from(!ix.remote_selected.is_empty());
            let ctx = SelectContext {
                local: &ix.local,
                stale: &ix.stale,
                unreachable: &ix.unreachable,
                health: &ix.health,
                passive: &ix.passive,
                lapsed: &ix.lapsed,
            };
            for (name, e) in &ix.services {
                let Some(kept) = e.status.as_deref() else {
                    continue;
                };
                // Selecting again changes nothing (the last selection only matters to rule 4,
                // which keeps what it kept).
                let full = select(name, &ctx, Some(kept), e);
                assert_eq!(kept, &full, "{name}'s selection, run {run} step {step}");
                // What the maps get (the services here may share a frontend: its owner's).
                for f in &kept.frontends {
                    if ix.frontend_owner.get(&f.frontend) == Some(name) {
                        assert_eq!(ix.desired.get(&f.frontend), Some(&f.backends));
                    }
                }
            }
        }
        totals.full += ix.selections.full;
        totals.spliced += ix.selections.spliced;
    }
    assert!(
        selected_steps > 500,
        "only {selected_steps} steps selected a remote backend"
    );
    let Selections { full, spliced } = totals;
    assert!(
        spliced > 400 && full > 1_000,
        "{spliced} selections spliced, {full} in full: the sequences must exercise both"
    );
}
