//! Does a `/metrics` scrape delay node-sync's map writes? (issue 18)
//!
//! One real etcd holds 2,000 global services of 10 endpoints each; an in-process node-sync agent
//! (in-memory maps that record when each frontend is written) serves its status endpoint on
//! loopback, in the same runtime, as the binary does. A burst of endpoint changes (4 writers
//! putting 2,000 chunks back to back, one per service) is sent twice: once alone, once while a
//! thread scrapes `/metrics` in a tight loop (each scrape renders every service). For every change
//! the time from its put to the write of its frontend is measured; the figure is that latency's
//! p50, p99 and max, with and without the scrapes.
//!
//! Run: `cargo run --release -p mesh-bench --bin node_sync_scrape` (needs /usr/bin/etcd).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::Client;
use mesh_bench::BenchEtcd;
use mesh_model::keys::{MeshKey, ServiceName, SyncKind};
use mesh_model::values::{
    Affinity, Capabilities, ClusterConfig, Conditions, Endpoint, EndpointChunk, EndpointPort,
    HealthCheck, MeshValue, Protocol, ServicePort, ServiceSpec,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use node_sync::agent::{self, AgentOptions};
use node_sync::datapath::ClusterIds;
use node_sync::lb::{FakeMaps, Frontend};
use node_sync::watch::WatchSettings;

const ETCD: &str = "/usr/bin/etcd";
const SERVICES: u32 = 2000;
const ENDPOINTS: u32 = 10;
const WRITERS: u32 = 4;

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).expect("valid cluster name")
}

fn name(i: u32) -> String {
    format!("svc{i}")
}

fn vip(i: u32) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(10, 96, (i >> 8) as u8, (i & 0xff) as u8).into()
}

fn frontend(i: u32) -> Frontend {
    Frontend {
        ip: vip(i),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn spec(i: u32) -> ServiceSpec {
    ServiceSpec {
        cluster: c("c1"),
        namespace: "bench".into(),
        name: name(i),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        frontends: vec![vip(i)],
        headless: false,
        shared: true,
        affinity: Affinity::None,
        failover_order: vec![],
        health_check: HealthCheck::Tcp,
        health_check_port: None,
    }
}

/// Service `i`'s endpoints (`n` of them), in one chunk.
fn chunk(i: u32, n: u32) -> (MeshKey, MeshValue) {
    let endpoints = (0..n)
        .map(|k| Endpoint {
            ip: std::net::Ipv4Addr::new(10, 1, (i >> 4) as u8, ((i & 0xf) << 4 | k) as u8).into(),
            ports: vec![EndpointPort {
                name: None,
                port: 8080,
                protocol: Protocol::Tcp,
            }]
            .into(),
            node: Some("elsewhere".into()),
            zone: None,
            hostname: None,
            conditions: Conditions::default(),
        })
        .collect();
    let key = MeshKey::EndpointChunk {
        cluster: c("c1"),
        service: ServiceName::new("bench", &name(i)).expect("service name"),
        chunk: 0,
    };
    let value = MeshValue::EndpointChunk(EndpointChunk {
        cluster: c("c1"),
        namespace: "bench".into(),
        name: name(i),
        chunk: 0,
        endpoints,
    });
    (key, value)
}

async fn put(cl: &mut Client, key: MeshKey, v: MeshValue) -> anyhow::Result<()> {
    let k = key.to_string();
    cl.put(k.clone(), v.encode(), None)
        .await
        .with_context(|| format!("etcd put {k}"))?;
    Ok(())
}

async fn publish(url: &str) -> anyhow::Result<()> {
    let mut cl = Client::connect([url], None).await?;
    let mcc = MaxConnectedClusters::DEFAULT;
    let cfg = ClusterConfig {
        name: c("c1"),
        id: ClusterId::new(1, mcc)?,
        max_connected_clusters: mcc,
        capabilities: Capabilities::v1(false),
        ca_fingerprints: vec![],
    };
    put(
        &mut cl,
        MeshKey::ClusterConfig { cluster: c("c1") },
        MeshValue::ClusterConfig(cfg),
    )
    .await?;
    for i in 0..SERVICES {
        let s = spec(i);
        let key = MeshKey::Service {
            cluster: c("c1"),
            service: s.service_name(),
        };
        put(&mut cl, key, MeshValue::Service(s)).await?;
        let (k, v) = chunk(i, ENDPOINTS);
        put(&mut cl, k, v).await?;
    }
    for kind in SyncKind::ALL {
        put(
            &mut cl,
            MeshKey::Synced {
                cluster: c("c1"),
                kind,
            },
            MeshValue::Synced(time::OffsetDateTime::now_utc()),
        )
        .await?;
    }
    Ok(())
}

fn options(url: &str) -> AgentOptions {
    AgentOptions {
        cluster: c("c1"),
        cluster_id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).expect("id"),
        node: "bench-node".into(),
        etcd_endpoints: vec![url.to_owned()],
        tls_dir: None,
        remote_config_dir: None,
        stale_grace: Duration::from_secs(30),
        sync_timeout: Duration::from_secs(60),
        heartbeat_timeout: Duration::from_secs(3600),
        kvstoremesh: false,
        health_interval: Duration::from_secs(1),
        health_failures: 2,
        health_rise: 2,
        remote_probe_timeout: None,
        watch: WatchSettings::default(),
        remote_dir_poll: Duration::from_secs(1),
        status_every: Duration::from_secs(5),
        destroy_sockets: false,
        publish: false,
        cluster_ids: ClusterIds::default(),
    }
}

/// One GET on loopback; returns the body's length.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<usize> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf.len())
}

/// Scrape `/metrics` back to back until `stop`; counts scrapes and their total time.
fn scrape_loop(addr: SocketAddr, stop: Arc<AtomicBool>, n: Arc<AtomicU64>, ns: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if get(addr, "/metrics").is_ok() {
            n.fetch_add(1, Ordering::Relaxed);
            ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A burst: every service's chunk rewritten once (`n` endpoints), by `WRITERS` writers back to
/// back; returns each change's put -> map write latency.
async fn burst(url: &str, maps: &FakeMaps, n: u32) -> anyhow::Result<Vec<Duration>> {
    maps.take_history();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut cl = Client::connect([url], None).await?;
        writers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in (w..SERVICES).step_by(WRITERS as usize) {
                let (k, v) = chunk(i, n);
                let t = Instant::now();
                put(&mut cl, k, v).await?;
                sent.push((i, t));
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = Vec::new();
    for w in writers {
        sent.extend(w.await??);
    }
    // Every frontend written with its new backend count.
    let t0 = Instant::now();
    while (0..SERVICES).any(|i| maps.get(&frontend(i)).map(|b| b.len()) != Some(n as usize)) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("burst not programmed in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut written: HashMap<Frontend, Instant> = HashMap::new();
    for (at, fe) in maps.take_history() {
        written.entry(fe).or_insert(at);
    }
    Ok(sent
        .into_iter()
        .map(|(i, t)| {
            written
                .get(&frontend(i))
                .map(|w| w.saturating_duration_since(t))
                .unwrap_or_default()
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("node-sync-scrape-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let r = rt.block_on(run(&tmp));
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

async fn run(tmp: &std::path::Path) -> anyhow::Result<()> {
    let etcd = BenchEtcd::start(ETCD, &tmp.join("etcd"), 4 << 30).await?;
    publish(&etcd.url).await?;
    let maps = FakeMaps::new();
    let agent = agent::start(options(&etcd.url), Box::new(maps.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let _status = tokio::spawn(node_sync::status::serve(listener, agent.status_source()));
    let t0 = Instant::now();
    while (0..SERVICES).any(|i| maps.get(&frontend(i)).map(|b| b.len()) != Some(ENDPOINTS as usize))
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("initial sync not programmed in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let size = tokio::task::spawn_blocking(move || get(addr, "/metrics")).await??;
    println!(
        "scrape: {SERVICES} services x {ENDPOINTS} endpoints programmed; /metrics is {} KiB",
        size / 1024
    );
    maps.record_history(true);
    // Alternate: alone, scraped, alone, scraped (the endpoint count flips each burst).
    let mut alone = Vec::new();
    let mut scraped = Vec::new();
    let (mut scrapes, mut scrape_ns) = (0, 0);
    for round in 0..4u32 {
        let n = if round % 2 == 0 {
            ENDPOINTS + 1
        } else {
            ENDPOINTS
        };
        if round % 2 == 0 {
            alone.extend(burst(&etcd.url, &maps, n).await?);
            continue;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (cnt, ns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let scraper = {
            let (stop, cnt, ns) = (stop.clone(), cnt.clone(), ns.clone());
            std::thread::spawn(move || scrape_loop(addr, stop, cnt, ns))
        };
        let r = burst(&etcd.url, &maps, n).await;
        stop.store(true, Ordering::Relaxed);
        let _ = scraper.join();
        scraped.extend(r?);
        scrapes += cnt.load(Ordering::Relaxed);
        scrape_ns += ns.load(Ordering::Relaxed);
    }
    let show = |v: &mut Vec<Duration>| {
        format!(
            "p50 {:?}, p99 {:?}, max {:?} (n={})",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0),
            v.len()
        )
    };
    println!(
        "scrape: put -> map write during a burst of {SERVICES} endpoint changes, no scrapes: {}",
        show(&mut alone)
    );
    println!(
        "scrape: put -> map write during a burst of {SERVICES} endpoint changes, /metrics scraped back to back: {} ({scrapes} scrapes, mean {:?} each)",
        show(&mut scraped),
        Duration::from_nanos(scrape_ns / scrapes.max(1))
    );
    agent.stop();
    Ok(())
}
