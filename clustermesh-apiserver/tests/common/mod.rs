//! Test harness: a real etcd process on a free loopback port, the real apiserver binary, and small readers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use etcd_client::Client;

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use mesh_testkit::{ETCD, Etcd, free_port, http_get};

/// Keys under `prefix` with value and mod revision.
pub async fn snapshot(c: &mut Client, prefix: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    clustermesh_apiserver::etcd::list_prefix(c, prefix)
        .await
        .unwrap()
        .0
}

/// The keys of this cluster's published state (no heartbeat, leader or canaries).
pub async fn data_keys(c: &mut Client, cluster: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    snapshot(c, "clustermesh/v1/")
        .await
        .into_iter()
        .filter(|(k, _)| k.contains(&format!("/{cluster}/")) || k.ends_with(&format!("/{cluster}")))
        .filter(|(k, _)| {
            !k.starts_with("clustermesh/v1/heartbeat/")
                && !k.starts_with("clustermesh/v1/leader/")
                && !k.starts_with("clustermesh/v1/synced/")
                && !k.starts_with("clustermesh/v1/remotes/")
        })
        .collect()
}

/// Polls `f` until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A running clustermesh-apiserver process.
pub struct Apiserver {
    pub child: Child,
    pub status_port: u16,
    pub log: PathBuf,
}

pub struct ApiserverOpts {
    pub cluster: String,
    pub cluster_id: u32,
    pub etcd: String,
    pub manifest_dir: PathBuf,
    pub replica: String,
    pub extra: Vec<String>,
    pub log_dir: PathBuf,
}

impl Apiserver {
    pub fn start(o: &ApiserverOpts) -> Self {
        let status_port = free_port();
        let log = o
            .log_dir
            .join(format!("apiserver-{}-{status_port}.log", o.replica));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .args(["--cluster-name", &o.cluster])
            .args(["--cluster-id", &o.cluster_id.to_string()])
            .args(if o.etcd.is_empty() {
                vec![]
            } else {
                vec!["--etcd-endpoints".to_owned(), o.etcd.clone()]
            })
            .args(if o.extra.iter().any(|a| a == "--source") {
                vec![]
            } else {
                vec![
                    "--source".to_owned(),
                    "manifests".to_owned(),
                    "--manifest-dir".to_owned(),
                    o.manifest_dir.display().to_string(),
                ]
            })
            .args(["--status-listen", &format!("127.0.0.1:{status_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--replica-id", &o.replica])
            .args(["--manifest-poll-interval", "50ms"])
            .args(&o.extra)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawning clustermesh-apiserver");
        Self {
            child,
            status_port,
            log,
        }
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.status_port, path).await
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.get("/api/v1/status").await?;
        let v: serde_json::Value = (code == 200).then(|| serde_json::from_str(&body).ok())??;
        // With a mesh control (--tls-dir) the replica's own status sits under apiserverDetail.
        match v.get("apiserverDetail") {
            Some(d) => Some(d.clone()),
            None => Some(v),
        }
    }

    pub async fn wait_ready_leader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status().await
                && s["role"] == "leader"
                && s["ready"] == true
            {
                return;
            }
            if Instant::now() > deadline {
                let log = self.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "timed out after {timeout:?} waiting for the apiserver to lead and be ready; log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A metric's value from /metrics.
    pub async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- manifest builders ----

pub fn service_yaml(ns: &str, name: &str, ip: &str, annotations: &[(&str, &str)]) -> String {
    let mut ann = String::new();
    for (k, v) in annotations {
        ann.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n{ann}spec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n---\n"
    )
}

pub fn global_service_yaml(ns: &str, name: &str, ip: &str) -> String {
    service_yaml(ns, name, ip, &[("clustermesh.io/global", "true")])
}

/// An EndpointSlice; `not_ready` lists the indexes of endpoints marked not ready.
pub fn slice_yaml(ns: &str, name: &str, svc: &str, ips: &[String], not_ready: &[usize]) -> String {
    let mut eps = String::new();
    for (i, ip) in ips.iter().enumerate() {
        let ready = !not_ready.contains(&i);
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: node-1\n  zone: z1\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n"
        ));
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- name: http\n  port: 8080\n  protocol: TCP\n---\n"
    )
}

pub fn ips(base: u32, n: u32) -> Vec<String> {
    (0..n)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + base * 65536 + i + 1).to_string())
        .collect()
}
