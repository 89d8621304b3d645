//! Test support: real etcd processes on loopback, a writer that publishes keys as the
//! clustermesh-apiserver does (built with mesh-model), and an agent with in-memory maps.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::Client;
use mesh_model::keys::{MeshKey, ServiceName, SyncKind};
use mesh_model::values::{
    Affinity, Capabilities, ClusterConfig, Conditions, Endpoint, EndpointChunk, EndpointPort,
    HealthCheck, MeshValue, Protocol, ServicePort, ServiceSpec,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use node_sync::agent::{self, Agent, AgentOptions};
use node_sync::lb::{Backend, FakeMaps, Frontend};
use node_sync::watch::WatchSettings;

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use mesh_testkit::{ETCD, Etcd, free_port, http_get, tls_etcd};

pub const VIP: &str = "10.96.0.10";

pub fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

pub fn web() -> ServiceName {
    ServiceName::new("default", "web").unwrap()
}

pub fn vip() -> Frontend {
    Frontend {
        ip: VIP.parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Publishes a cluster's keys as the clustermesh-apiserver does.
pub struct ApiWriter {
    pub client: Client,
    pub cluster: ClusterName,
    pub id: u32,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl ApiWriter {
    pub async fn new(etcd: &Etcd, cluster: &str, id: u32) -> Self {
        Self {
            client: etcd.client().await,
            cluster: c(cluster),
            id,
            heartbeat: None,
        }
    }

    pub fn from_client(client: Client, cluster: &str, id: u32) -> Self {
        Self {
            client,
            cluster: c(cluster),
            id,
            heartbeat: None,
        }
    }

    pub async fn put(&mut self, key: MeshKey, value: MeshValue) {
        let k = key.to_string();
        self.client
            .put(k.clone(), value.encode(), None)
            .await
            .unwrap_or_else(|e| panic!("etcd put {k}: {e}"));
    }

    pub async fn put_raw(&mut self, key: &str, value: &[u8]) {
        self.client.put(key, value, None).await.unwrap();
    }

    pub async fn delete(&mut self, key: MeshKey) {
        self.client.delete(key.to_string(), None).await.unwrap();
    }

    /// Cluster config, then the given services and chunks, then the canaries, then heartbeats.
    pub async fn publish_all(&mut self, specs: Vec<ServiceSpec>, chunks: Vec<EndpointChunk>) {
        self.config(self.id).await;
        for s in specs {
            self.service(s).await;
        }
        for ch in chunks {
            self.chunk(ch).await;
        }
        self.canaries().await;
        self.start_heartbeat();
    }

    pub async fn config(&mut self, id: u32) {
        let mcc = MaxConnectedClusters::DEFAULT;
        let cfg = ClusterConfig {
            name: self.cluster.clone(),
            id: ClusterId::new(id, mcc).unwrap(),
            max_connected_clusters: mcc,
            capabilities: Capabilities::v1(false),
            ca_fingerprints: vec![],
        };
        self.put(
            MeshKey::ClusterConfig {
                cluster: self.cluster.clone(),
            },
            MeshValue::ClusterConfig(cfg),
        )
        .await;
    }

    pub async fn service(&mut self, s: ServiceSpec) {
        let key = MeshKey::Service {
            cluster: s.cluster.clone(),
            service: s.service_name(),
        };
        self.put(key, MeshValue::Service(s)).await;
    }

    pub async fn chunk(&mut self, ch: EndpointChunk) {
        let key = MeshKey::EndpointChunk {
            cluster: ch.cluster.clone(),
            service: ServiceName::new(&ch.namespace, &ch.name).unwrap(),
            chunk: ch.chunk,
        };
        self.put(key, MeshValue::EndpointChunk(ch)).await;
    }

    pub async fn canaries(&mut self) {
        for kind in SyncKind::ALL {
            self.put(
                MeshKey::Synced {
                    cluster: self.cluster.clone(),
                    kind,
                },
                MeshValue::Synced(time::OffsetDateTime::now_utc()),
            )
            .await;
        }
    }

    pub fn start_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let mut client = self.client.clone();
        let key = MeshKey::Heartbeat {
            cluster: self.cluster.clone(),
        }
        .to_string();
        self.heartbeat = Some(tokio::spawn(async move {
            loop {
                let v = MeshValue::Heartbeat(time::OffsetDateTime::now_utc()).encode();
                let _ = client.put(key.clone(), v, None).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    pub fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Drop for ApiWriter {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

pub fn spec(cluster: &str, affinity: Affinity) -> ServiceSpec {
    ServiceSpec {
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
        affinity,
        failover_order: vec![],
        health_check: HealthCheck::Tcp,
        health_check_port: None,
    }
}

pub fn endpoint(ip: &str, port: u16, node: &str) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        ports: vec![EndpointPort {
            name: None,
            port,
            protocol: Protocol::Tcp,
        }]
        .into(),
        node: Some(node.into()),
        zone: None,
        hostname: None,
        conditions: Conditions::default(),
    }
}

pub fn chunk(cluster: &str, n: u32, eps: Vec<Endpoint>) -> EndpointChunk {
    EndpointChunk {
        cluster: c(cluster),
        namespace: "default".into(),
        name: "web".into(),
        chunk: n,
        endpoints: eps,
    }
}

/// Agent options for tests: short grace and timeouts, plain http.
pub fn options(local: &Etcd, cluster: &str, id: u32, remote_dir: Option<&Path>) -> AgentOptions {
    options_url(&local.url(), cluster, id, remote_dir)
}

/// Agent options for a local etcd at `url`.
pub fn options_url(url: &str, cluster: &str, id: u32, remote_dir: Option<&Path>) -> AgentOptions {
    AgentOptions {
        cluster: c(cluster),
        cluster_id: ClusterId::new(id, MaxConnectedClusters::DEFAULT).unwrap(),
        node: "n1".into(),
        etcd_endpoints: vec![url.to_owned()],
        tls_dir: None,
        remote_config_dir: remote_dir.map(Path::to_owned),
        stale_grace: Duration::from_secs(2),
        sync_timeout: Duration::from_secs(15),
        heartbeat_timeout: Duration::from_secs(1),
        kvstoremesh: false,
        health_interval: Duration::from_millis(200),
        health_failures: 2,
        health_rise: 2,
        remote_probe_timeout: Some(Duration::from_millis(250)),
        watch: WatchSettings {
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_millis(500),
            request_timeout: Duration::from_secs(3),
        },
        remote_dir_poll: Duration::from_millis(200),
        status_every: Duration::from_millis(500),
        publish: true,
        destroy_sockets: true,
        cluster_ids: Default::default(),
    }
}

pub fn remote_file(dir: &Path, name: &str, etcd: &Etcd) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!("name: {name}\nendpoints: [\"{}\"]\n", etcd.url()),
    )
    .unwrap();
}

pub fn start_agent(opts: AgentOptions, maps: &FakeMaps) -> Agent {
    agent::start(opts, Box::new(maps.clone()))
}

/// Backends of the VIP as "cluster/ip:port", sorted.
pub fn programmed(maps: &FakeMaps) -> Option<Vec<String>> {
    maps.get(&vip()).map(|b| {
        let mut v: Vec<String> = b
            .iter()
            .map(|b: &Backend| format!("{}/{}:{}", b.cluster, b.ip, b.port))
            .collect();
        v.sort();
        v
    })
}

/// Poll `cond` every 5 ms until it holds or `limit` passes; returns the time it took.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn agent_with(opts: AgentOptions, writer: Box<dyn node_sync::lb::MapWriter>) -> Agent {
    agent::start(opts, writer)
}

/// `/api/v1/status` once `ok` holds for it (polled: the status server offers no event), or a failure naming
/// what was last seen and the log.
pub async fn status_until(
    port: u16,
    log: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Some((200, body)) = http_get(port, "/api/v1/status").await
            && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body)
        {
            if ok(&doc) {
                return doc;
            }
            last = Some(doc);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node-sync's status never showed {what}; last: {:#}\nlog:\n{}",
            last.unwrap_or_default(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `node-sync` binary, SIGKILLed (by its PID) on drop.
pub struct NodeSync(pub std::process::Child);

impl Drop for NodeSync {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
