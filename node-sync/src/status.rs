//! Status server (axum): `/healthz`, `/readyz`, `/metrics` (Prometheus text format) and
//! `/api/v1/status` (JSON: every cluster's state, every global service's selected backends and why,
//! and `routing`: the `--routing` mode, the routes to remote pod CIDRs and the refused ones).
//!
//! Every answer is rendered from the agent's latest [`Snapshot`]: no lock is shared with the
//! agent's loop, so a scrape never delays a map write. `/metrics` and `/api/v1/status` also ask
//! the agent for fresh connect counters, which it reads on its own loop at most once a second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::agent::StatusSource;
use crate::cluster::LiveState;
use crate::readiness::Readiness;
use crate::routing::{RoutingMode, RoutingStatus};
use crate::snapshot::{ClusterView, Snapshot};

/// What the status server shows of `--routing` when it is not `none`: the mode, and the route manager's
/// status after its last sync.
#[derive(Clone)]
pub struct RoutingView {
    /// `--routing`.
    pub mode: RoutingMode,
    /// Published by the route manager after each sync.
    pub status: tokio::sync::watch::Receiver<RoutingStatus>,
}

fn mode_name(mode: RoutingMode) -> String {
    clap::ValueEnum::to_possible_value(&mode)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// The `routing` object of `/api/v1/status`: the mode, and for a mode that routes, the routes node-sync
/// wants and installed, the pod CIDRs it refused and why, its counters and its last error.
pub fn routing_document(routing: Option<&RoutingView>) -> serde_json::Value {
    let Some(r) = routing else {
        return json!({"mode": mode_name(RoutingMode::None)});
    };
    let st = r.status.borrow().clone();
    json!({
        "mode": mode_name(r.mode),
        "routesInstalled": st.routes.len(),
        "routes": st.routes.iter().map(|r| json!({
            "cidr": r.dst.to_string(),
            "via": r.gateway.to_string(),
            "cluster": r.cluster,
            "node": r.node,
        })).collect::<Vec<_>>(),
        "refused": st.refused.iter().map(|r| json!({
            "cidr": r.cidr.to_string(),
            "cluster": r.cluster,
            "node": r.node,
            "reason": r.reason.to_string(),
        })).collect::<Vec<_>>(),
        "refusedTotal": st.refused_total,
        "changesTotal": st.changes_total,
        "errorsTotal": st.errors_total,
        "lastError": st.last_error,
        "device": st.device.map(|d| json!({
            "name": d.name,
            "vni": d.vni,
            "port": d.port,
            "local": d.local.to_string(),
            "underlay": d.underlay,
            "mtu": d.mtu,
        })),
    })
}

/// The route manager's metrics (nothing for `--routing none`).
pub fn render_routing_metrics(routing: Option<&RoutingView>) -> String {
    let Some(r) = routing else {
        return String::new();
    };
    let st = r.status.borrow().clone();
    let mut o = String::new();
    for (name, kind, help, value) in [
        (
            "nodesync_routing_routes",
            "gauge",
            "Routes to remote pod CIDRs node-sync holds (routing protocol 157)",
            st.routes.len() as u64,
        ),
        (
            "nodesync_routing_refused",
            "gauge",
            "Remote pod CIDRs refused now (overlapping another node's or a local route, or no gateway)",
            st.refused.len() as u64,
        ),
        (
            "nodesync_routing_refused_total",
            "counter",
            "Remote pod CIDR refusals, each counted once when it appears",
            st.refused_total,
        ),
        (
            "nodesync_routing_changes_total",
            "counter",
            "Routes added, replaced and removed",
            st.changes_total,
        ),
        (
            "nodesync_routing_errors_total",
            "counter",
            "Route operations that failed",
            st.errors_total,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{mode=\"{}\"}} {value}",
            mode_name(r.mode)
        );
    }
    o
}

type Shared = StatusSource;

/// The router.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status_json))
        .with_state(state)
}

/// Serve on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Shared) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

async fn readyz(State(s): State<Shared>) -> Response {
    let snap = s.latest();
    match &snap.readiness {
        Readiness::Ready => (StatusCode::OK, "ready\n").into_response(),
        r @ Readiness::Degraded { .. } => (StatusCode::OK, format!("{r}\n")).into_response(),
        r => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")).into_response(),
    }
}

fn state_name(s: &LiveState) -> &'static str {
    match s {
        LiveState::Live => "live",
        LiveState::Grace(_) => "grace",
        LiveState::Stale(_) => "stale",
    }
}

/// The JSON status document.
pub fn status_document(st: &Snapshot) -> serde_json::Value {
    let now = Instant::now();
    let clusters: Vec<serde_json::Value> = st
        .clusters
        .iter()
        .map(|(n, c)| {
            json!({
                "name": n,
                "local": *n == st.cluster,
                "id": c.id,
                "state": state_name(&c.state),
                "connected": c.liveness.connected(),
                "synced": c.synced,
                "refused": c.refused,
                "heartbeatAgeMs": c.liveness.heartbeat_age(now).map(|d| d.as_millis() as u64),
                "staleSince": c.stale_since.map(|t| mesh_model::values::format_time(time::OffsetDateTime::from(t))),
                "unreachableSince": c.unreachable_since.map(|t| mesh_model::values::format_time(time::OffsetDateTime::from(t))),
                "keys": c.keys,
                "reconnects": c.reconnects,
                "badValues": c.bad_values,
                "error": c.error,
                "endpoints": c.source.as_ref().map(|s| s.endpoints.clone()),
            })
        })
        .collect();
    let services: Vec<serde_json::Value> = st
        .services_by_name()
        .into_iter()
        .map(|s| {
            json!({
                "service": s.service.to_string(),
                "affinity": s.affinity,
                "clusters": s.clusters,
                "staleClusters": s.stale_clusters,
                "unreachableClusters": s.unreachable_clusters,
                "noFrontend": s.no_frontend,
                "frontends": s.frontends.iter().map(|f| json!({
                    "frontend": f.frontend.to_string(),
                    "backends": f.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
                    "connections": f.backends.iter().map(|b| st.connections.get(&(b.ip, b.port)).copied().unwrap_or(0)).collect::<Vec<_>>(),
                    "reason": f.reason,
                    "why": f.why(),
                    "healthChecked": f.health_checked,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "cluster": st.cluster,
        "node": st.node,
        "ready": st.ready(),
        "readiness": st.readiness,
        "clusters": clusters,
        "services": services,
        "failovers": st.failovers,
        "mapWrites": {"upserts": st.map_writes.upserts, "deletes": st.map_writes.deletes, "errors": st.map_writes.errors, "waitingForRoom": st.map_writes.waiting_for_room},
        "remoteConfigErrors": &*st.remote_config_errors,
        "goldenSignals": st.golden.summary,
        "passive": {
            "marks": st.passive.marks,
            "confirmed": st.passive.confirmed,
            "cleared": st.passive.cleared,
            "recovered": st.passive.recovered,
            "failedBackends": st.passive_failures.iter().map(|(c, (ip, port, _))| format!("{c}/{ip}:{port}")).collect::<Vec<_>>(),
            "lastMarkDelayUs": st.passive.last_delay.as_micros() as u64,
            "maxMarkDelayUs": st.passive.max_delay.as_micros() as u64,
        },
    })
}

async fn status_json(State(s): State<Shared>) -> Response {
    let snap = s.latest_with_fresh_counters();
    let routing = routing_document(s.routing.as_ref());
    let text = off_the_workers(move || {
        let mut doc = status_document(&snap);
        doc["routing"] = routing;
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    })
    .await;
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// Render on a blocking thread: a large document takes milliseconds, which on a runtime worker
/// would hold back the tasks queued behind it (the agent's among them).
async fn off_the_workers(render: impl FnOnce() -> String + Send + 'static) -> String {
    tokio::task::spawn_blocking(render)
        .await
        .unwrap_or_default()
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of a snapshot (the DNS server's counters, when one runs, are
/// appended by the handler).
pub fn render_metrics(st: &Snapshot) -> String {
    let now = Instant::now();
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Box<dyn Fn(&ClusterView) -> f64 + 'a>,
    );
    let rows: Vec<Row<'_>> = vec![
        (
            "nodesync_remote_connected",
            "gauge",
            "1 when the watch stream of the cluster is up",
            Box::new(|c| f64::from(u8::from(c.liveness.connected()))),
        ),
        (
            "nodesync_remote_synced",
            "gauge",
            "1 when the cluster's initial sync (list and canaries) is done",
            Box::new(|c| f64::from(u8::from(c.synced))),
        ),
        (
            "nodesync_remote_stale",
            "gauge",
            "1 when the cluster is stale (left out of selection)",
            Box::new(|c| f64::from(u8::from(matches!(c.state, LiveState::Stale(_))))),
        ),
        (
            "nodesync_remote_unreachable",
            "gauge",
            "1 while no probed backend of the cluster answers from this node (left out of this node's selection)",
            Box::new(|c| f64::from(u8::from(c.unreachable_since.is_some()))),
        ),
        (
            "nodesync_remote_refused",
            "gauge",
            "1 when the cluster's config was refused",
            Box::new(|c| f64::from(u8::from(c.refused))),
        ),
        (
            "nodesync_remote_heartbeat_age_seconds",
            "gauge",
            "Age of the last heartbeat seen (-1: none)",
            Box::new(move |c| {
                c.liveness
                    .heartbeat_age(now)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(-1.0)
            }),
        ),
        (
            "nodesync_remote_keys",
            "gauge",
            "Keys held from the cluster",
            Box::new(|c| c.keys as f64),
        ),
        (
            "nodesync_remote_reconnects_total",
            "counter",
            "Reconnects to the cluster's etcd",
            Box::new(|c| c.reconnects as f64),
        ),
        (
            "nodesync_remote_bad_values_total",
            "counter",
            "Values refused because they did not decode or validate",
            Box::new(|c| c.bad_values as f64),
        ),
    ];
    for (name, kind, help, f) in &rows {
        family(&mut o, name, kind, help);
        for (n, c) in &st.clusters {
            let _ = writeln!(o, "{name}{{cluster=\"{}\"}} {}", esc(n.as_str()), f(c));
        }
    }
    family(
        &mut o,
        "nodesync_service_backends",
        "gauge",
        "Backends selected per global service frontend, by backend cluster",
    );
    for s in st.services_by_name() {
        for f in &s.frontends {
            let mut by: BTreeMap<&str, u64> = BTreeMap::new();
            for c in &s.clusters {
                by.insert(c.as_str(), 0);
            }
            for b in f.backends.iter() {
                *by.entry(b.cluster.as_str()).or_default() += 1;
            }
            for (c, n) in by {
                let _ = writeln!(
                    o,
                    "nodesync_service_backends{{service=\"{}\",frontend=\"{}\",cluster=\"{}\"}} {n}",
                    esc(&s.service.to_string()),
                    esc(&f.frontend.to_string()),
                    esc(c)
                );
            }
        }
    }
    family(
        &mut o,
        "nodesync_failovers_total",
        "counter",
        "Frontends moved from their preferred clusters to a failover group",
    );
    let _ = writeln!(o, "nodesync_failovers_total {}", st.failovers);
    family(
        &mut o,
        "nodesync_service_fail_open",
        "gauge",
        "1 while every ready backend of the frontend fails its health check and connects are spread over them anyway (fail open)",
    );
    if st.fail_open.is_empty() {
        let _ = writeln!(o, "nodesync_service_fail_open 0");
    }
    for (svc, fe) in st.fail_open.iter() {
        let _ = writeln!(
            o,
            "nodesync_service_fail_open{{service=\"{}\",frontend=\"{}\"}} 1",
            esc(&svc.to_string()),
            esc(&fe.to_string())
        );
    }
    family(
        &mut o,
        "nodesync_ready",
        "gauge",
        "1 once the initial reconcile of the maps is done",
    );
    let _ = writeln!(o, "nodesync_ready {}", u8::from(st.ready()));
    family(
        &mut o,
        "nodesync_map_writes_total",
        "counter",
        "Map writes by operation",
    );
    let _ = writeln!(
        o,
        "nodesync_map_writes_total{{op=\"upsert\"}} {}",
        st.map_writes.upserts
    );
    let _ = writeln!(
        o,
        "nodesync_map_writes_total{{op=\"delete\"}} {}",
        st.map_writes.deletes
    );
    family(
        &mut o,
        "nodesync_map_errors_total",
        "counter",
        "Map operations that failed",
    );
    let _ = writeln!(o, "nodesync_map_errors_total {}", st.map_writes.errors);
    family(
        &mut o,
        "nodesync_map_frontends_waiting_for_room",
        "gauge",
        "Frontends not programmed because the maps have no room (--max-backends), written when room frees",
    );
    let _ = writeln!(
        o,
        "nodesync_map_frontends_waiting_for_room {}",
        st.map_writes.waiting_for_room
    );
    family(
        &mut o,
        "nodesync_endpoints",
        "gauge",
        "Endpoints held from every cluster",
    );
    let _ = writeln!(o, "nodesync_endpoints {}", st.endpoints);
    render_golden(&mut o, st);
    let certs = st.cert_expiries();
    o.push_str(&mesh_certs::expiry::prometheus("node-sync", &certs));
    o
}

/// The golden signals and the passive-detection counters.
fn render_golden(o: &mut String, st: &Snapshot) {
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        o,
        "nodesync_backend_connects_total",
        "counter",
        "TCP connects from this node to the backends of a global service in a cluster, by outcome as the kernel saw it: established, refused (RST to the SYN), timeout (the SYN unanswered until its first retransmission timeout)",
    );
    for ((svc, cluster), t) in &st.golden.totals {
        for (outcome, n) in [
            ("established", t.established),
            ("refused", t.refused),
            ("timeout", t.timeout),
        ] {
            let _ = writeln!(
                o,
                "nodesync_backend_connects_total{{service=\"{}\",cluster=\"{}\",outcome=\"{outcome}\"}} {n}",
                esc(svc),
                esc(cluster.as_str())
            );
        }
    }
    family(
        o,
        "nodesync_backend_connect_seconds",
        "histogram",
        "SYN-to-established time of the TCP connects from this node to the backends of a global service in a cluster",
    );
    for ((svc, cluster), t) in &st.golden.totals {
        let labels = format!(
            "service=\"{}\",cluster=\"{}\"",
            esc(svc),
            esc(cluster.as_str())
        );
        let mut cum = 0;
        for (i, b) in t.buckets.iter().enumerate() {
            cum += b;
            let le = crate::passive::bucket_le(i);
            let _ = writeln!(
                o,
                "nodesync_backend_connect_seconds_bucket{{{labels},le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "nodesync_backend_connect_seconds_sum{{{labels}}} {}",
            t.connect_ns_sum as f64 / 1e9
        );
        let _ = writeln!(
            o,
            "nodesync_backend_connect_seconds_count{{{labels}}} {}",
            t.established
        );
    }
    let p = &st.passive;
    family(
        o,
        "nodesync_passive_marks_total",
        "counter",
        "Backends the kernel marked suspect on this node after a failed connect, by what a probe then found: confirmed (out of this node's selection), cleared (it answered: false alarm)",
    );
    let _ = writeln!(
        o,
        "nodesync_passive_marks_total{{result=\"confirmed\"}} {}\nnodesync_passive_marks_total{{result=\"cleared\"}} {}",
        p.confirmed, p.cleared
    );
    family(
        o,
        "nodesync_passive_failed_backends",
        "gauge",
        "Backends out of this node's selection after a confirmed failed connect",
    );
    let _ = writeln!(
        o,
        "nodesync_passive_failed_backends {}",
        st.passive_failures.len()
    );
    family(
        o,
        "nodesync_sockets_destroyed_total",
        "counter",
        "Sockets of this node aborted (SOCK_DESTROY) because their backend failed, by protocol; result=\"error\" counts runs that failed",
    );
    {
        use std::sync::atomic::Ordering::Relaxed;
        let d = &st.destroyed;
        let _ = writeln!(
            o,
            "nodesync_sockets_destroyed_total{{proto=\"tcp\"}} {}\nnodesync_sockets_destroyed_total{{proto=\"udp\"}} {}\nnodesync_sockets_destroyed_total{{result=\"error\"}} {}",
            d.tcp.load(Relaxed),
            d.udp.load(Relaxed),
            d.errors.load(Relaxed)
        );
    }
    family(
        o,
        "nodesync_passive_mark_delay_seconds_max",
        "gauge",
        "Longest time from the kernel's suspect mark to node-sync reading it",
    );
    let _ = writeln!(
        o,
        "nodesync_passive_mark_delay_seconds_max {}",
        p.max_delay.as_secs_f64()
    );
}

async fn metrics(State(s): State<Shared>) -> Response {
    let snap = s.latest_with_fresh_counters();
    let dns = s.dns_metrics.clone();
    let routing = render_routing_metrics(s.routing.as_ref());
    let text = off_the_workers(move || {
        let mut text = render_metrics(&snap);
        text.push_str(&routing);
        if let Some(dns) = &dns {
            text.push_str(&dns.prometheus());
        }
        text
    })
    .await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
