//! node-sync figures of DESIGN.md's performance targets, measured in one run:
//!
//! 1. ingest of one endpoint change of a 10k-backend service (target <= 1 ms): decode the chunk,
//!    apply it to the merge index, take the changes, write the one changed frontend;
//! 2. full resync of 100k endpoints from 8 clusters (8 real etcd processes; target <= 5 s,
//!    node-sync RSS <= 150 MiB);
//! 3. propagation put in a remote etcd -> map updated, 3 clusters (3 real etcds; target p99 <= 50 ms);
//! 4. failover (local backend killed -> the map holds the remote backends, with the real health
//!    checker at default settings and real etcds) and failback, p50/p99 (target p99 <= 500 ms).
//!    Through the kernel datapath the same path is measured by node-sync's `tests/datapath.rs`
//!    and `tests/lab.rs` (about 250 ms).
//!
//! Maps: node-sync's in-memory map writer; for the ingest figure also global-lb-bpf's in-memory
//! maps (`global_lb_bpf::FakeMaps`, the slot-level update logic the kernel maps get) and the
//! kernel maps themselves (global-lb-bpf's `Datapath`, loaded and pinned in a bpffs directory of
//! its own, attached to a cgroup of its own: needs root and BPF).
//!
//! Run: `cargo run --release -p mesh-bench --bin node_sync` (needs root and /usr/bin/etcd);
//! `... --bin node_sync -- ingest` measures only the ingest. On a busy host the tails measure the
//! scheduler; `chrt -f 10 target/release/node_sync` gives stable p99s.

use std::path::Path;
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
use node_sync::datapath::{ClusterIds, GlbWriter};
use node_sync::index::MergeIndex;
use node_sync::lb::{FakeMaps, Frontend, MapWriter, Reconciler};
use node_sync::watch::WatchSettings;

const ETCD: &str = "/usr/bin/etcd";

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).expect("valid cluster name")
}

fn spec(cluster: &str, name: &str, vip: &str, affinity: Affinity) -> ServiceSpec {
    ServiceSpec {
        cluster: c(cluster),
        namespace: "bench".into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        frontends: vec![vip.parse().expect("vip")],
        headless: false,
        shared: true,
        affinity,
        failover_order: vec![],
        health_check: HealthCheck::Tcp,
        health_check_port: None,
    }
}

fn ep(ip: std::net::Ipv4Addr) -> Endpoint {
    Endpoint {
        ip: ip.into(),
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
    }
}

/// `n` endpoints of cluster number `ci`, service number `si`, in chunks of 64.
fn chunks(cluster: &str, ci: u8, service: &str, si: u16, n: usize) -> Vec<EndpointChunk> {
    let eps: Vec<Endpoint> = (0..n)
        .map(|i| {
            let i = i as u32 + u32::from(si) * 256 * 64;
            // On loopback: node-sync's reachability prober connects to remote backends, and
            // test traffic stays on this machine.
            ep(std::net::Ipv4Addr::new(
                127,
                ci,
                ((i >> 8) & 0xff) as u8,
                (i & 0xff) as u8,
            ))
        })
        .collect();
    eps.chunks(64)
        .enumerate()
        .map(|(k, e)| EndpointChunk {
            cluster: c(cluster),
            namespace: "bench".into(),
            name: service.into(),
            chunk: k as u32,
            endpoints: e.to_vec(),
        })
        .collect()
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---- 1. ingest ----------------------------------------------------------------------------------

fn ingest_with(writer: Box<dyn MapWriter>, label: &str) -> anyhow::Result<()> {
    let mut ix = MergeIndex::new(c("c1"));
    ix.upsert_service(spec("c1", "big", "10.96.0.1", Affinity::None));
    ix.upsert_service(spec("c2", "big", "10.97.0.1", Affinity::None));
    let mut all = chunks("c1", 1, "big", 0, 5000);
    all.extend(chunks("c2", 2, "big", 0, 5000));
    for ch in all.iter().cloned() {
        ix.upsert_chunk(ch);
    }
    let mut rec = Reconciler::new(writer)?;
    rec.reconcile_all(ix.desired().iter());
    ix.take_changes();
    let selected = ix.desired().values().map(|b| b.len()).sum::<usize>();
    if selected != 10_000 {
        bail!("ingest setup: {selected} backends selected, expected 10000");
    }
    // Pre-encode the changed chunks: one endpoint flips ready/not ready each time.
    let target = all[40].clone();
    let key = MeshKey::EndpointChunk {
        cluster: target.cluster.clone(),
        service: ServiceName::new("bench", "big")?,
        chunk: target.chunk,
    };
    let mut down = target.clone();
    down.endpoints[7].conditions = Conditions {
        ready: false,
        serving: false,
        terminating: true,
    };
    let bytes = [
        MeshValue::EndpointChunk(down).encode(),
        MeshValue::EndpointChunk(target).encode(),
    ];
    let mut times = Vec::with_capacity(1000);
    let mut index_only = Vec::with_capacity(1000);
    for i in 0..1000 {
        let t0 = Instant::now();
        let v = MeshValue::decode(&key, &bytes[i % 2])?;
        ix.apply(&key, Some(v));
        let changes = ix.take_changes();
        let t1 = Instant::now();
        if changes.len() != 1 {
            bail!(
                "one endpoint change gave {} frontend changes",
                changes.len()
            );
        }
        for (fe, b) in changes {
            rec.set(&fe, b);
        }
        times.push(t0.elapsed());
        index_only.push(t1 - t0);
    }
    println!(
        "ingest: one endpoint change of a 10k-backend service ({label}): p50 {:?} p99 {:?} (index alone: p50 {:?} p99 {:?}) [target <= 1 ms]",
        percentile(&mut times, 0.5),
        percentile(&mut times, 0.99),
        percentile(&mut index_only, 0.5),
        percentile(&mut index_only, 0.99),
    );
    Ok(())
}

/// The ingest through the kernel maps: global-lb-bpf's datapath loaded, pinned under a bpffs
/// directory and attached to a cgroup made for this run, both removed at the end.
fn ingest_kernel(ids: ClusterIds) -> anyhow::Result<()> {
    use global_lb_bpf::{Datapath, DatapathConfig, mounts};
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the kernel-map ingest needs root (BPF maps, cgroups): run the benchmark as root");
    }
    mounts::ensure_bpffs(Path::new(mounts::DEFAULT_BPFFS))
        .context("mounting bpffs for the kernel-map ingest")?;
    let cg_root = mounts::ensure_cgroup2().context("a cgroup v2 for the kernel-map ingest")?;
    let name = format!("node-sync-bench-{}", std::process::id());
    let config = DatapathConfig::new(
        cg_root.join(&name),
        Path::new(mounts::DEFAULT_BPFFS).join(&name),
    );
    std::fs::create_dir(&config.cgroup)
        .with_context(|| format!("mkdir {}", config.cgroup.display()))?;
    let result = Datapath::open(&config)
        .context("loading the datapath for the kernel-map ingest")
        .and_then(|dp| {
            ingest_with(
                Box::new(GlbWriter::new(dp, c("c1"), ids)),
                "global-lb-bpf Datapath: kernel maps",
            )
        });
    let removed = Datapath::remove(&config.pin_dir);
    let _ = std::fs::remove_dir(&config.cgroup);
    result?;
    removed.context("removing the benchmark's pinned datapath")?;
    Ok(())
}

// ---- etcd helpers -----------------------------------------------------------------------------------

/// One benchmark etcd per simulated cluster, data under `root/name`.
async fn start_etcd(root: &Path, name: &str) -> anyhow::Result<BenchEtcd> {
    BenchEtcd::start(ETCD, &root.join(name), 4 << 30).await
}

async fn put(cl: &mut Client, key: MeshKey, v: MeshValue) -> anyhow::Result<()> {
    let k = key.to_string();
    cl.put(k.clone(), v.encode(), None)
        .await
        .with_context(|| format!("etcd put {k}"))?;
    Ok(())
}

/// Publish cluster config, services, chunks and canaries as the apiserver does.
async fn publish(
    url: &str,
    cluster: &str,
    id: u32,
    specs: Vec<ServiceSpec>,
    chunks: Vec<EndpointChunk>,
) -> anyhow::Result<Client> {
    let mut cl = Client::connect([url], None).await?;
    let mcc = MaxConnectedClusters::DEFAULT;
    put(
        &mut cl,
        MeshKey::ClusterConfig {
            cluster: c(cluster),
        },
        MeshValue::ClusterConfig(ClusterConfig {
            name: c(cluster),
            id: ClusterId::new(id, mcc)?,
            max_connected_clusters: mcc,
            capabilities: Capabilities::v1(false),
            ca_fingerprints: vec![],
        }),
    )
    .await?;
    for s in specs {
        let key = MeshKey::Service {
            cluster: s.cluster.clone(),
            service: s.service_name(),
        };
        put(&mut cl, key, MeshValue::Service(s)).await?;
    }
    for ch in chunks {
        let key = MeshKey::EndpointChunk {
            cluster: ch.cluster.clone(),
            service: ServiceName::new(&ch.namespace, &ch.name)?,
            chunk: ch.chunk,
        };
        put(&mut cl, key, MeshValue::EndpointChunk(ch)).await?;
    }
    for kind in SyncKind::ALL {
        put(
            &mut cl,
            MeshKey::Synced {
                cluster: c(cluster),
                kind,
            },
            MeshValue::Synced(time::OffsetDateTime::now_utc()),
        )
        .await?;
    }
    put(
        &mut cl,
        MeshKey::Heartbeat {
            cluster: c(cluster),
        },
        MeshValue::Heartbeat(time::OffsetDateTime::now_utc()),
    )
    .await?;
    Ok(cl)
}

fn options(local_url: &str, remote_dir: &Path) -> AgentOptions {
    AgentOptions {
        cluster: c("c1"),
        cluster_id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).expect("id"),
        node: "bench-node".into(),
        etcd_endpoints: vec![local_url.to_owned()],
        tls_dir: None,
        remote_config_dir: Some(remote_dir.to_owned()),
        stale_grace: Duration::from_secs(30),
        sync_timeout: Duration::from_secs(60),
        heartbeat_timeout: Duration::from_secs(3600),
        kvstoremesh: false,
        health_interval: Duration::from_millis(200),
        health_failures: 2,
        health_rise: 2,
        remote_probe_timeout: Some(Duration::from_millis(250)),
        watch: WatchSettings::default(),
        remote_dir_poll: Duration::from_secs(1),
        status_every: Duration::from_secs(5),
        destroy_sockets: false,
        publish: false,
        cluster_ids: ClusterIds::default(),
    }
}

// ---- 2. full resync ------------------------------------------------------------------------------------

async fn resync(root: &Path) -> anyhow::Result<()> {
    const CLUSTERS: u8 = 8;
    const SERVICES: u16 = 100;
    const PER_SERVICE: usize = 125; // 8 x 100 x 125 = 100k endpoints
    let mut etcds = Vec::new();
    for i in 1..=CLUSTERS {
        etcds.push(start_etcd(root, &format!("resync-c{i}")).await?);
    }
    let t_pub = Instant::now();
    let mut writers = Vec::new();
    for (i, e) in etcds.iter().enumerate() {
        let ci = i as u8 + 1;
        let name = format!("c{ci}");
        let url = e.url.clone();
        writers.push(tokio::spawn(async move {
            let mut specs = Vec::new();
            let mut chs = Vec::new();
            for s in 0..SERVICES {
                let svc = format!("svc-{s}");
                let vip = format!("10.{}.{}.{}", 96 + u16::from(ci), s / 256, s % 256);
                specs.push(spec(&name, &svc, &vip, Affinity::Local));
                chs.extend(chunks(&name, ci, &svc, s, PER_SERVICE));
            }
            publish(&url, &name, u32::from(ci), specs, chs).await
        }));
    }
    for w in writers {
        w.await??;
    }
    println!(
        "resync: published {} endpoints in {} clusters in {:?}",
        usize::from(CLUSTERS) * usize::from(SERVICES) * PER_SERVICE,
        CLUSTERS,
        t_pub.elapsed()
    );
    let dir = root.join("resync-remotes");
    std::fs::create_dir_all(&dir)?;
    for (i, e) in etcds.iter().enumerate().skip(1) {
        std::fs::write(
            dir.join(format!("c{}.yaml", i + 1)),
            format!("name: c{}\nendpoints: [\"{}\"]\n", i + 1, e.url),
        )?;
    }
    let rss_before = rss_kib("VmRSS:");
    let maps = FakeMaps::new();
    let t0 = Instant::now();
    let agent = agent::start(options(&etcds[0].url, &dir), Box::new(maps.clone()));
    let deadline = Duration::from_secs(120);
    loop {
        {
            let st = agent.snapshot();
            if st.ready() && st.endpoints == 100_000 {
                break;
            }
        }
        if t0.elapsed() > deadline {
            let st = agent.snapshot();
            bail!(
                "resync did not finish in {deadline:?}: ready={} endpoints={}",
                st.ready(),
                st.endpoints
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t0.elapsed();
    let rss_after = rss_kib("VmRSS:");
    let hwm = rss_kib("VmHWM:");
    let programmed = maps.snapshot();
    let backends: usize = programmed.values().map(Vec::len).sum();
    println!(
        "resync: 100k endpoints from 8 clusters -> {} frontends, {} backends programmed in {:?} [target <= 5 s]",
        programmed.len(),
        backends,
        took
    );
    println!(
        "resync: memory: bench process RSS {} MiB after (agent share {} MiB; peak {} MiB, includes the bench's own etcd writers) [target <= 150 MiB]",
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024,
        hwm / 1024
    );
    agent.stop();
    Ok(())
}

// ---- 3. propagation ------------------------------------------------------------------------------

async fn propagation(root: &Path) -> anyhow::Result<()> {
    let e1 = start_etcd(root, "prop-c1").await?;
    let e2 = start_etcd(root, "prop-c2").await?;
    let e3 = start_etcd(root, "prop-c3").await?;
    let vip = "10.96.0.10";
    publish(
        &e1.url,
        "c1",
        1,
        vec![spec("c1", "web", vip, Affinity::None)],
        chunks("c1", 1, "web", 0, 3),
    )
    .await?;
    let mut w2 = publish(
        &e2.url,
        "c2",
        2,
        vec![spec("c2", "web", "10.97.0.10", Affinity::None)],
        chunks("c2", 2, "web", 0, 3),
    )
    .await?;
    let mut w3 = publish(
        &e3.url,
        "c3",
        3,
        vec![spec("c3", "web", "10.98.0.10", Affinity::None)],
        chunks("c3", 3, "web", 0, 3),
    )
    .await?;
    let dir = root.join("prop-remotes");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("c2.yaml"),
        format!("name: c2\nendpoints: [\"{}\"]\n", e2.url),
    )?;
    std::fs::write(
        dir.join("c3.yaml"),
        format!("name: c3\nendpoints: [\"{}\"]\n", e3.url),
    )?;
    let maps = FakeMaps::new();
    let agent = agent::start(options(&e1.url, &dir), Box::new(maps.clone()));
    let fe = Frontend {
        ip: vip.parse()?,
        port: 80,
        protocol: Protocol::Tcp,
    };
    let t0 = Instant::now();
    while maps.get(&fe).map(|b| b.len()) != Some(9) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("propagation setup: 9 backends not programmed in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    maps.record_history(true);
    let mut lat = Vec::new();
    // Endpoints per cluster now: c1, c2, c3.
    let mut counts = [3usize, 3, 3];
    for i in 0..300u32 {
        let (w, cluster, ci) = if i % 2 == 0 {
            (&mut w2, "c2", 2u8)
        } else {
            (&mut w3, "c3", 3u8)
        };
        // Add or remove a fourth endpoint of the cluster.
        let slot = usize::from(ci) - 1;
        let n = if counts[slot] == 3 { 4 } else { 3 };
        counts[slot] = n;
        let ch = chunks(cluster, ci, "web", 0, n).remove(0);
        let want: usize = counts.iter().sum();
        let key = MeshKey::EndpointChunk {
            cluster: c(cluster),
            service: ServiceName::new("bench", "web")?,
            chunk: 0,
        };
        maps.take_history();
        let t = Instant::now();
        put(w, key, MeshValue::EndpointChunk(ch)).await?;
        loop {
            if maps.get(&fe).map(|b| b.len()) == Some(want) {
                break;
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("propagation: update {i} not programmed in 5 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let written = maps
            .take_history()
            .into_iter()
            .filter(|(_, f)| *f == fe)
            .map(|(at, _)| at)
            .next_back()
            .unwrap_or_else(Instant::now);
        lat.push(written.saturating_duration_since(t));
    }
    println!(
        "propagation: put in a remote etcd -> map updated, 3 clusters, {} updates: p50 {:?} p99 {:?} max {:?} [target p99 <= 50 ms]",
        lat.len(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        percentile(&mut lat, 1.0)
    );
    agent.stop();
    Ok(())
}

// ---- 4. failover / failback ----------------------------------------------------------------------------

/// Local backend killed -> map holds only the remote backend (health checker at default settings:
/// 200 ms interval, 2 failures), and back when it listens again.
async fn failover(root: &Path) -> anyhow::Result<()> {
    let e1 = start_etcd(root, "fo-c1").await?;
    let e2 = start_etcd(root, "fo-c2").await?;
    let vip = "10.96.0.20";
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut local_ep = ep(std::net::Ipv4Addr::new(127, 0, 0, 1));
    local_ep.ports = [EndpointPort {
        port,
        ..local_ep.ports[0].clone()
    }]
    .into();
    local_ep.node = Some("bench-node".into());
    let local_chunk = EndpointChunk {
        cluster: c("c1"),
        namespace: "bench".into(),
        name: "fo".into(),
        chunk: 0,
        endpoints: vec![local_ep],
    };
    let _w1 = publish(
        &e1.url,
        "c1",
        1,
        vec![spec("c1", "fo", vip, Affinity::Local)],
        vec![local_chunk],
    )
    .await?;
    let _w2 = publish(
        &e2.url,
        "c2",
        2,
        vec![spec("c2", "fo", "10.97.0.20", Affinity::Local)],
        chunks("c2", 2, "fo", 0, 1),
    )
    .await?;
    let dir = root.join("fo-remotes");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("c2.yaml"),
        format!("name: c2\nendpoints: [\"{}\"]\n", e2.url),
    )?;
    let maps = FakeMaps::new();
    let mut opts = options(&e1.url, &dir);
    opts.publish = true;
    let agent = agent::start(opts, Box::new(maps.clone()));
    let fe = Frontend {
        ip: vip.parse()?,
        port: 80,
        protocol: Protocol::Tcp,
    };
    let on = |cluster: &str| {
        maps.get(&fe)
            .is_some_and(|b| !b.is_empty() && b.iter().all(|b| b.cluster.as_str() == cluster))
    };
    let wait = |cluster: &'static str, limit: Duration| {
        let on = &on;
        async move {
            let t = Instant::now();
            while !on(cluster) {
                if t.elapsed() > limit {
                    bail!("failover: {cluster} not selected within {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(t.elapsed())
        }
    };
    wait("c1", Duration::from_secs(30)).await?;
    let mut listener = Some(listener);
    let (mut fo, mut fb) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        // Let a few healthy probes pass, as in steady state.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(listener.take());
        fo.push(wait("c2", Duration::from_secs(5)).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
        listener = Some(std::net::TcpListener::bind(("127.0.0.1", port))?);
        fb.push(wait("c1", Duration::from_secs(5)).await?);
    }
    println!(
        "failover: local backend killed -> map holds the remote backends, {} runs: p50 {:?} p99 {:?} [target p99 <= 500 ms]",
        fo.len(),
        percentile(&mut fo, 0.5),
        percentile(&mut fo, 0.99)
    );
    println!(
        "failback: local backend back -> map holds it again: p50 {:?} p99 {:?} [target p99 <= 500 ms]",
        percentile(&mut fb, 0.5),
        percentile(&mut fb, 0.99)
    );
    agent.stop();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!(
        "node-sync benchmark (maps: in-memory map writers; for the ingest also the kernel maps)"
    );
    ingest_with(Box::new(FakeMaps::new()), "node-sync FakeMaps")?;
    let ids = ClusterIds::default();
    ids.set(&c("c1"), 1);
    ids.set(&c("c2"), 2);
    ingest_with(
        Box::new(GlbWriter::new(
            global_lb_bpf::FakeMaps::new(),
            c("c1"),
            ids.clone(),
        )),
        "global-lb-bpf LbMaps over MemStore",
    )?;
    ingest_kernel(ids)?;
    if std::env::args().nth(1).as_deref() == Some("ingest") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("node-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let r = rt.block_on(async {
        failover(&tmp).await?;
        propagation(&tmp).await?;
        resync(&tmp).await
    });
    let _ = std::fs::remove_dir_all(&tmp);
    r
}
