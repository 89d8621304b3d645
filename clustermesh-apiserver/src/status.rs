//! Status shared by the publisher and the status endpoint (axum): `/healthz`, `/readyz`, `/metrics` (Prometheus
//! text) and `/api/v1/status` (JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

/// What this replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Connecting to etcd.
    #[default]
    Starting,
    /// Another replica leads; this one waits.
    Standby,
    /// This replica leads and writes.
    Leader,
}

/// Upper bounds (seconds) of the reconcile latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A snapshot of the status, as `/api/v1/status` returns it.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatusSnapshot {
    /// Cluster name.
    pub cluster: String,
    /// Cluster id.
    pub cluster_id: u16,
    /// This replica's id.
    pub replica: String,
    /// Leader, standby or starting.
    pub role: Role,
    /// True after the first full write of this leader term (or while standing by).
    pub ready: bool,
    /// Sources and whether each has synced in this term.
    pub sources: BTreeMap<String, bool>,
    /// Keys the index wants in etcd.
    pub desired_keys: u64,
    /// Keys put since start.
    pub keys_put_total: u64,
    /// Keys deleted since start.
    pub keys_deleted_total: u64,
    /// etcd transactions since start.
    pub txns_total: u64,
    /// Failed etcd requests since start.
    pub etcd_errors_total: u64,
    /// Leader terms won since start.
    pub leader_terms_total: u64,
    /// Objects and files skipped now, with the reason (`Service default/web` or a file path -> message).
    pub source_errors: BTreeMap<String, String>,
    /// Times an object or file was found broken since start.
    pub source_errors_total: u64,
    /// When the last full write finished (RFC 3339).
    pub last_full_sync: Option<String>,
    /// The last etcd error, if any.
    pub last_error: Option<String>,
    /// KVStoreMesh: values of each remote refused because they did not decode or validate (each
    /// refused value counted once).
    pub remote_bad_values: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Status shared between the publisher and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Status {
    snap: Mutex<StatusSnapshot>,
    latency: Mutex<Histogram>,
    /// The mesh control, once the gRPC API runs: `/api/v1/status` then serves the mesh status.
    pub mesh: crate::mesh_api::MeshSlot,
    /// The TLS directory whose certificates' expiry `/metrics` exports.
    cert_dir: Mutex<Option<std::path::PathBuf>>,
}

impl Status {
    /// A status for `cluster`/`replica`.
    pub fn new(cluster: &str, cluster_id: u16, replica: &str) -> Arc<Self> {
        let s = Self::default();
        {
            let mut g = s.lock();
            g.cluster = cluster.to_owned();
            g.cluster_id = cluster_id;
            g.replica = replica.to_owned();
        }
        Arc::new(s)
    }

    /// Export the expiry of the certificates in `dir` (`--tls-dir`).
    pub fn set_cert_dir(&self, dir: &std::path::Path) {
        *self.cert_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_owned());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusSnapshot> {
        self.snap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the status under the lock.
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.lock());
    }

    /// A copy of the status.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.lock().clone()
    }

    /// Records one reconcile (event received -> written).
    pub fn observe_reconcile(&self, d: Duration) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        let g = self.lock();
        g.ready
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let s = self.snapshot();
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(o, "# HELP clustermesh_apiserver_{name} {help}");
            let _ = writeln!(o, "# TYPE clustermesh_apiserver_{name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(o, "clustermesh_apiserver_{name}{labels} {v}");
            }
        };
        metric(
            "keys_written_total",
            "counter",
            "Keys written to etcd, by operation.",
            vec![
                ("{op=\"put\"}".into(), s.keys_put_total.to_string()),
                ("{op=\"delete\"}".into(), s.keys_deleted_total.to_string()),
            ],
        );
        metric(
            "etcd_txns_total",
            "counter",
            "etcd transactions sent.",
            vec![(String::new(), s.txns_total.to_string())],
        );
        metric(
            "etcd_errors_total",
            "counter",
            "Failed etcd requests.",
            vec![(String::new(), s.etcd_errors_total.to_string())],
        );
        metric(
            "source_errors_total",
            "counter",
            "Objects or files found invalid and skipped.",
            vec![(String::new(), s.source_errors_total.to_string())],
        );
        metric(
            "source_errors",
            "gauge",
            "Objects or files skipped now.",
            vec![(String::new(), s.source_errors.len().to_string())],
        );
        metric(
            "desired_keys",
            "gauge",
            "Keys this cluster wants in etcd.",
            vec![(String::new(), s.desired_keys.to_string())],
        );
        metric(
            "leader",
            "gauge",
            "1 while this replica is the leader.",
            vec![(String::new(), u8::from(s.role == Role::Leader).to_string())],
        );
        metric(
            "leader_terms_total",
            "counter",
            "Leader terms won.",
            vec![(String::new(), s.leader_terms_total.to_string())],
        );
        metric(
            "ready",
            "gauge",
            "1 after the first full sync (or while standing by).",
            vec![(String::new(), u8::from(s.ready).to_string())],
        );
        // Named and labelled as node-sync's `nodesync_remote_bad_values_total{cluster}`.
        metric(
            "remote_bad_values_total",
            "counter",
            "Values refused because they did not decode or validate (KVStoreMesh), by remote cluster.",
            s.remote_bad_values
                .iter()
                .map(|(c, n)| (format!("{{cluster=\"{}\"}}", c), n.to_string()))
                .collect(),
        );
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines: Vec<(String, String)> = LATENCY_BUCKETS
            .iter()
            .zip(h.buckets.iter())
            .map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string()))
            .collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
        lines.push(("_sum".into(), format!("{}", h.sum)));
        lines.push(("_count".into(), h.count.to_string()));
        metric(
            "reconcile_seconds",
            "histogram",
            "Time from a source event to its keys written in etcd.",
            lines,
        );
        let certs = self
            .cert_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(|d| mesh_certs::expiry::in_dir(d, &mesh_certs::Role::LEAVES))
            .unwrap_or_default();
        o.push_str(&mesh_certs::expiry::prometheus(
            "clustermesh-apiserver",
            &certs,
        ));
        o
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    if s.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics(),
    )
}

async fn status_json(State(s): State<Arc<Status>>) -> axum::response::Response {
    use clustermesh_api::MeshControl as _;
    let snap = s.snapshot();
    if let Some(control) = s.mesh.get() {
        match control.status().await {
            Ok(mesh) => {
                let mut v = serde_json::to_value(&mesh).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert(
                        "apiserverDetail".into(),
                        serde_json::to_value(&snap).unwrap_or_default(),
                    );
                }
                return axum::Json(v).into_response();
            }
            Err(e) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("mesh status: {e}\n"),
                )
                    .into_response();
            }
        }
    }
    axum::Json(snap).into_response()
}

async fn index_html() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        crate::mesh_api::INDEX_HTML,
    )
}

async fn status_schema() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/schema+json")],
        mesh_model::status::MeshStatus::json_schema(),
    )
}

/// The status router.
pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status_json))
        .route("/api/v1/status/schema", get(status_schema))
        .route("/", get(index_html))
        .with_state(status)
}

/// Serves the status endpoint on `addr`; returns the bound address (port 0 picks one) and the server task.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(status);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status endpoint stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_has_every_family() {
        let s = Status::new("c1", 1, "r1");
        s.update(|g| {
            g.keys_put_total = 5;
            g.role = Role::Leader;
            g.remote_bad_values.insert("c2".into(), 3);
        });
        s.observe_reconcile(Duration::from_millis(3));
        let m = s.metrics();
        assert!(m.contains("clustermesh_apiserver_keys_written_total{op=\"put\"} 5"));
        assert!(m.contains("clustermesh_apiserver_leader 1"));
        assert!(m.contains("clustermesh_apiserver_remote_bad_values_total{cluster=\"c2\"} 3"));
        assert!(m.contains("clustermesh_apiserver_reconcile_seconds_bucket{le=\"0.005\"} 1"));
        assert!(m.contains("clustermesh_apiserver_reconcile_seconds_bucket{le=\"0.001\"} 0"));
        assert!(m.contains("clustermesh_apiserver_reconcile_seconds_count 1"));
    }
}
