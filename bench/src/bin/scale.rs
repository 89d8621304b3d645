//! Scale simulator (issue 19): one node-sync against many clusters, on one machine.
//!
//! N synthetic clusters `c1..cN` (c1 is the node's own cluster) publish their cluster config, sync
//! canaries, heartbeat (every second), S global services (every cluster has the same service
//! names, so every frontend of c1 merges the backends of all N clusters) and their endpoint chunks,
//! all built with mesh-model's types and encoders and written as the apiserver writes them (batched
//! transactions of at most 128 puts, one put per endpoint change). c1 has an etcd of its own; the
//! N-1 remote clusters share `--etcds` etcd processes (round robin).
//!
//! How this differs from production: several clusters' prefixes share one etcd (one process, one
//! CPU budget and one TCP connection per etcd client instead of one per cluster); the remote
//! etcds keep their data on a tmpfs by default (`--remote-etcd-dir`: in production their disks
//! are other machines'; c1's etcd is on this machine's disk, as it is in production); no TLS (plain
//! HTTP on loopback: no handshakes, no encryption); the node-sync agent, KVStoreMesh, the
//! publishers, churn and every etcd share two cores. node-sync is the library agent (the binary's
//! event loop) with the map writer the binary opens: global-lb-bpf's eBPF maps, loaded, pinned
//! under a bpffs directory of the run's own and attached to a cgroup of its own (`--maps
//! kernel`, the default; root), or node-sync's in-memory writer (`--maps memory`). A recording
//! wrapper notes when each frontend's write returned. The kernel's backends map holds
//! `--max-backends` - 1 backends (node-sync's flag of that name, 65,536 by default): past that,
//! the maps refuse the frontends that would add more, and the run says how many writes were
//! refused.
//!
//! Per size and mode (`--via direct`: one watcher per remote cluster; `--via kvstoremesh`: the
//! apiserver's `kvstoremesh::run` over `mesh_kv::EtcdStore` mirrors every remote into c1's etcd
//! and node-sync reads only that):
//! 1. initial sync: node-sync started -> ready with every endpoint programmed; RSS share;
//! 2. churn: `--churn-rate` endpoint changes/s mesh-wide for `--churn-secs` (one endpoint of a
//!    service flips ready; `--quiet` clusters stop their heartbeat and changes for the middle third
//!    and come back): propagation put -> frontend written (p50/p99), node-sync CPU (its runtime's
//!    threads), KVStoreMesh CPU and cache lag (put in the remote -> mirrored put seen in c1's etcd);
//! 3. reconnect: direct, every remote etcd killed and restarted at once; kvstoremesh, c1's etcd
//!    killed and restarted: time until every cluster is synced again, peak request rate any
//!    remote etcd serves (its `grpc_server_started_total`, sampled every 100 ms).
//!
//! `fanout`: what W watchers (each its own connection, listing then watching the prefix, as a
//! node-sync does) cost one etcd holding one cluster under churn: etcd CPU and RSS.
//!
//! Run: `cargo build --release -p mesh-bench --bin scale && target/release/scale` (default: 32
//! clusters, both modes, a few minutes); `--clusters 32,128,255`; `target/release/scale fanout`.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use mesh_bench::BenchEtcd;
use mesh_kv::{EtcdStore, Guard};
use mesh_model::keys::{KeyKind, MeshKey, ServiceName, SyncKind};
use mesh_model::values::{
    Affinity, Capabilities, ClusterConfig, Conditions, Endpoint, EndpointChunk, EndpointPort,
    HealthCheck, MeshValue, Protocol, RemoteCluster, ServicePort, ServiceSpec,
};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use node_sync::agent::{self, Agent, AgentOptions};
use node_sync::datapath::ClusterIds;
use node_sync::lb::{Backend, FakeMaps, Frontend, MapError, MapWriter};
use node_sync::watch::WatchSettings;

const ETCD: &str = "/usr/bin/etcd";

#[derive(Parser, Debug)]
#[command(about = "ClusterMesh scale simulator (issue 19)")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Cluster counts to run (the node's own cluster included).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    clusters: Vec<u32>,
    /// Modes to run.
    #[arg(long, value_delimiter = ',', default_value = "direct,kvstoremesh")]
    via: Vec<Via>,
    /// Endpoints per cluster.
    #[arg(long, default_value_t = 1000)]
    endpoints: u32,
    /// Global services per cluster (endpoints are spread evenly).
    #[arg(long, default_value_t = 100)]
    services: u32,
    /// etcd processes shared by the remote clusters.
    #[arg(long, default_value_t = 4)]
    etcds: usize,
    /// Endpoint changes per second, mesh-wide.
    #[arg(long, default_value_t = 1000)]
    churn_rate: u32,
    /// Seconds of churn.
    #[arg(long, default_value_t = 10)]
    churn_secs: u64,
    /// Clusters that go quiet (no heartbeat, no changes) for the middle third of the churn.
    #[arg(long, default_value_t = 0)]
    quiet: u32,
    /// Skip the reconnect storm.
    #[arg(long)]
    no_reconnect: bool,
    /// Where the remote clusters' shared etcds keep their data. In production each is on another
    /// machine's disk; here, on this machine's disk, their fsyncs (1,000 changes/s) would queue
    /// behind and ahead of the local etcd's, which KVStoreMesh writes every mirrored change to.
    /// The default, a tmpfs, keeps them off the disk the local etcd (always on disk, under the
    /// system temporary directory) uses; `--remote-etcd-dir /tmp` puts them back on it.
    #[arg(long, default_value = "/dev/shm")]
    remote_etcd_dir: PathBuf,
    /// Where node-sync writes its selections: `kernel`, global-lb-bpf's eBPF maps as on a node
    /// (loaded and pinned under /sys/fs/bpf/clustermesh-scale-<pid>-<run>, attached to a cgroup v2
    /// of the same name, both removed at the end; needs root); `memory`, node-sync's in-memory
    /// writer. The kernel's backends map holds `--max-backends` - 1 backends: a mesh whose
    /// frontends select more distinct backends than that gets the maps' refusal for the frontends
    /// past it, counted in the output.
    #[arg(long, value_enum, default_value = "kernel")]
    maps: Maps,
    /// Capacity of the kernel's backends map (node-sync's --max-backends; default 65,536 as on a
    /// node): 255 x 1,000 endpoints need 262144.
    #[arg(long, default_value_t = global_lb_bpf::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Maps {
    Kernel,
    Memory,
}

/// What the run reads of node-sync's map writes.
#[derive(Default)]
struct MapLog {
    /// Whether `writes` records.
    recording: bool,
    /// When each frontend's write returned.
    writes: Vec<(Instant, Frontend)>,
    /// Backends per frontend, as last written.
    backends: HashMap<Frontend, usize>,
    /// Writes the maps refused, and the last refusal.
    refused: u64,
    last_refusal: Option<String>,
}

/// A map writer that notes the writes of another (the kernel maps or the in-memory ones).
struct Recorded {
    inner: Box<dyn MapWriter>,
    log: Arc<Mutex<MapLog>>,
}

impl Recorded {
    fn note(&self, fe: &Frontend, r: &Result<(), MapError>, backends: Option<usize>) {
        let mut l = self.log.lock().expect("map log");
        match r {
            Ok(()) => {
                if l.recording {
                    l.writes.push((Instant::now(), *fe));
                }
                match backends {
                    Some(n) => l.backends.insert(*fe, n),
                    None => l.backends.remove(fe),
                };
            }
            Err(e) => {
                l.refused += 1;
                l.last_refusal = Some(e.to_string());
            }
        }
    }
}

impl MapWriter for Recorded {
    fn upsert_service(&mut self, fe: &Frontend, backends: &[Backend]) -> Result<(), MapError> {
        let r = self.inner.upsert_service(fe, backends);
        self.note(fe, &r, Some(backends.len()));
        r
    }
    fn update_service(
        &mut self,
        fe: &Frontend,
        old: &[Backend],
        new: &[Backend],
    ) -> Result<(), MapError> {
        let r = self.inner.update_service(fe, old, new);
        self.note(fe, &r, Some(new.len()));
        r
    }
    fn delete_service(&mut self, fe: &Frontend) -> Result<(), MapError> {
        let r = self.inner.delete_service(fe);
        self.note(fe, &r, None);
        r
    }
    fn services(&mut self) -> Result<HashMap<Frontend, Vec<Backend>>, MapError> {
        self.inner.services()
    }
    fn connect_outcome(&mut self, id: u32) -> Option<global_lb_bpf::signals::Outcomes> {
        self.inner.connect_outcome(id)
    }
    fn backend_by_id(&mut self, id: u32) -> Option<Backend> {
        self.inner.backend_by_id(id)
    }
    fn backend_ids(&mut self) -> Vec<(u32, Backend)> {
        self.inner.backend_ids()
    }
    fn connections_to(&mut self, id: u32) -> Option<u64> {
        self.inner.connections_to(id)
    }
    fn free_backends(&self) -> Option<usize> {
        self.inner.free_backends()
    }
    fn clear_suspect(&mut self, id: u32) {
        self.inner.clear_suspect(id)
    }
    fn sweep_suspects(&mut self) {
        self.inner.sweep_suspects()
    }
}

/// global-lb-bpf's datapath for one run: pinned under bpffs and attached to a cgroup made for
/// it, both removed on drop (after the agent, which holds the maps, stopped).
struct KernelMaps {
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl KernelMaps {
    fn open(
        name: &str,
        max_backends: u32,
        ids: ClusterIds,
    ) -> anyhow::Result<(
        Self,
        Box<dyn MapWriter>,
        Option<global_lb_bpf::signals::SuspectEvents>,
    )> {
        use global_lb_bpf::mounts;
        if !nix::unistd::Uid::effective().is_root() {
            bail!("--maps kernel needs root (eBPF maps, a cgroup): run as root, or --maps memory");
        }
        mounts::ensure_bpffs(Path::new(mounts::DEFAULT_BPFFS)).context("mounting bpffs")?;
        let cg_root = mounts::ensure_cgroup2().context("a cgroup v2 for the datapath")?;
        let me = Self {
            pin_dir: Path::new(mounts::DEFAULT_BPFFS).join(name),
            cgroup: cg_root.join(name),
        };
        std::fs::create_dir(&me.cgroup)
            .with_context(|| format!("mkdir {}", me.cgroup.display()))?;
        let (writer, events) =
            node_sync::datapath::open(&me.pin_dir, &me.cgroup, max_backends, c(1), ids)
                .with_context(|| format!("loading the datapath under {}", me.pin_dir.display()))?;
        Ok((me, writer, events))
    }
}

impl Drop for KernelMaps {
    fn drop(&mut self) {
        if let Err(e) = global_lb_bpf::Datapath::remove(&self.pin_dir) {
            eprintln!("removing {}: {e}", self.pin_dir.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.cgroup) {
            eprintln!("removing {}: {e}", self.cgroup.display());
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Watch fan-out on one etcd.
    Fanout {
        /// Watcher counts.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        watchers: Vec<u32>,
        /// Endpoint changes per second on the cluster.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Seconds of churn per watcher count.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Via {
    Direct,
    Kvstoremesh,
}

fn c(k: u32) -> ClusterName {
    ClusterName::new(&format!("c{k}")).expect("valid cluster name")
}

fn svc_name(s: u32) -> String {
    format!("svc-{s}")
}

/// Frontend of service `s` in cluster `k`: 172.0.0.0/8 + k << 12 + s.
fn vip(k: u32, s: u32) -> std::net::IpAddr {
    std::net::Ipv4Addr::from((172u32 << 24) | (k << 12) | s).into()
}

fn frontend(s: u32) -> Frontend {
    Frontend {
        ip: vip(1, s),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn spec(k: u32, s: u32) -> ServiceSpec {
    ServiceSpec {
        cluster: c(k),
        namespace: "bench".into(),
        name: svc_name(s),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        frontends: vec![vip(k, s)],
        headless: false,
        shared: true,
        affinity: Affinity::None,
        failover_order: vec![],
        health_check: HealthCheck::Tcp,
        health_check_port: None,
    }
}

#[derive(Clone, Copy)]
struct Shape {
    services: u32,
    per_service: u32,
}

/// The chunks of service `s` of cluster `k`; endpoint 0 carries `flip` (not ready when set) and
/// hostname `s<seq>` (the churn's sequence number, read back by the cache-lag watcher).
fn chunks(k: u32, s: u32, shape: Shape, flip: bool, seq: Option<u64>) -> Vec<EndpointChunk> {
    let eps: Vec<Endpoint> = (0..shape.per_service)
        .map(|i| {
            let idx = s * shape.per_service + i;
            Endpoint {
                // On loopback (127/8): node-sync's reachability prober connects to a sample of
                // remote backends, and test traffic stays on this machine (a connect is refused at
                // once, which the prober counts as a path that works).
                ip: std::net::Ipv4Addr::from((127u32 << 24) | (k << 12) | idx).into(),
                ports: vec![EndpointPort {
                    name: None,
                    port: 8080,
                    protocol: Protocol::Tcp,
                }]
                .into(),
                node: Some("elsewhere".into()),
                zone: None,
                hostname: if i == 0 {
                    seq.map(|q| format!("s{q}"))
                } else {
                    None
                },
                conditions: if i == 0 && flip {
                    Conditions {
                        ready: false,
                        serving: false,
                        terminating: true,
                    }
                } else {
                    Conditions::default()
                },
            }
        })
        .collect();
    eps.chunks(64)
        .enumerate()
        .map(|(n, e)| EndpointChunk {
            cluster: c(k),
            namespace: "bench".into(),
            name: svc_name(s),
            chunk: n as u32,
            endpoints: e.to_vec(),
        })
        .collect()
}

fn chunk_kv(ch: EndpointChunk) -> anyhow::Result<(String, Vec<u8>)> {
    let key = MeshKey::EndpointChunk {
        cluster: ch.cluster.clone(),
        service: ServiceName::new(&ch.namespace, &ch.name)?,
        chunk: ch.chunk,
    };
    Ok((key.to_string(), MeshValue::EndpointChunk(ch).encode()))
}

fn heartbeat_kv(k: u32) -> (String, Vec<u8>) {
    (
        MeshKey::Heartbeat { cluster: c(k) }.to_string(),
        MeshValue::Heartbeat(time::OffsetDateTime::now_utc()).encode(),
    )
}

/// Every key of cluster `k`, as its apiserver's first full write has them (canaries last).
fn cluster_kvs(k: u32, shape: Shape) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mcc = MaxConnectedClusters::DEFAULT;
    let mut out = vec![(
        MeshKey::ClusterConfig { cluster: c(k) }.to_string(),
        MeshValue::ClusterConfig(ClusterConfig {
            name: c(k),
            id: ClusterId::new(k, mcc)?,
            max_connected_clusters: mcc,
            capabilities: Capabilities::v1(false),
            ca_fingerprints: vec![],
        })
        .encode(),
    )];
    for s in 0..shape.services {
        let sp = spec(k, s);
        out.push((
            MeshKey::Service {
                cluster: c(k),
                service: sp.service_name(),
            }
            .to_string(),
            MeshValue::Service(sp).encode(),
        ));
        for ch in chunks(k, s, shape, false, None) {
            out.push(chunk_kv(ch)?);
        }
    }
    for kind in SyncKind::ALL {
        out.push((
            MeshKey::Synced {
                cluster: c(k),
                kind,
            }
            .to_string(),
            MeshValue::Synced(time::OffsetDateTime::now_utc()).encode(),
        ));
    }
    out.push(heartbeat_kv(k));
    Ok(out)
}

/// Puts in transactions of at most 128 operations (the apiserver writer's limit).
async fn put_all(cl: &mut Client, kvs: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let mut it = kvs.into_iter().peekable();
    while it.peek().is_some() {
        let ops: Vec<TxnOp> = it
            .by_ref()
            .take(128)
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        cl.txn(Txn::new().and_then(ops)).await.context("etcd txn")?;
    }
    Ok(())
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn status_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_mib() -> u64 {
    status_kib("/proc/self/status", "VmRSS:") / 1024
}

/// utime + stime (clock ticks) of a /proc stat line.
fn stat_ticks(stat: &str) -> u64 {
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = match stat.rfind(')') {
        Some(i) => &stat[i + 2..],
        None => return 0,
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let u: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let s: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    u + s
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
fn thread_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(prefix) {
                stat_ticks(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default())
            } else {
                0
            }
        })
        .sum()
}

fn pid_ticks(pid: u32) -> u64 {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// USER_HZ: /proc reports CPU times in hundredths of a second on Linux.
fn clk_tck() -> f64 {
    100.0
}

/// Sum of `grpc_server_started_total` (every gRPC request an etcd began) from its /metrics.
fn grpc_started(url: &str) -> Option<f64> {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("grpc_server_started_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Samples the request counters of `urls` every 100 ms until `stop`; returns each etcd's peak
/// requests per second over a 100 ms window.
fn sample_rates(
    urls: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || {
        let mut last: Vec<Option<(Instant, f64)>> = vec![None; urls.len()];
        let mut peak = vec![0f64; urls.len()];
        let mut ok = 0u64;
        let mut down_since: Vec<Option<Instant>> = vec![None; urls.len()];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, u) in urls.iter().enumerate() {
                let now = Instant::now();
                match grpc_started(u) {
                    Some(v) => {
                        ok += 1;
                        // Back after a restart: its counters restarted from 0 while it was down
                        // (a lower bound of the rate since it went away).
                        if let Some(d) = down_since[i].take() {
                            peak[i] = peak[i].max(v / (now - d).as_secs_f64());
                        }
                        if let Some((t, p)) = last[i] {
                            // A counter that went down restarted between two samples (killed
                            // and back within 100 ms): all it counts came since the last one.
                            let since = if v >= p { v - p } else { v };
                            peak[i] = peak[i].max(since / (now - t).as_secs_f64());
                        }
                        last[i] = Some((now, v));
                    }
                    None => {
                        last[i] = None;
                        down_since[i].get_or_insert(now);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if ok == 0 {
            eprintln!("request-rate sampler: no /metrics scrape succeeded");
        }
        peak
    })
}

struct Mesh {
    local: BenchEtcd,
    shared: Vec<BenchEtcd>,
    n: u32,
    shape: Shape,
}

impl Mesh {
    fn etcd_of(&self, k: u32) -> &BenchEtcd {
        if k == 1 {
            &self.local
        } else {
            &self.shared[(k as usize - 2) % self.shared.len()]
        }
    }
}

async fn build_mesh(
    root: &Path,
    remote_root: &Path,
    n: u32,
    etcds: usize,
    shape: Shape,
) -> anyhow::Result<Mesh> {
    let local = BenchEtcd::start(ETCD, &root.join("local"), 8 << 30).await?;
    let mut shared = Vec::new();
    for i in 0..etcds.min(n as usize - 1).max(1) {
        shared
            .push(BenchEtcd::start(ETCD, &remote_root.join(format!("shared{i}")), 8 << 30).await?);
    }
    let mesh = Mesh {
        local,
        shared,
        n,
        shape,
    };
    let t0 = Instant::now();
    // One publisher per etcd, its clusters one after the other.
    let mut by_url: HashMap<String, Vec<u32>> = HashMap::new();
    for k in 1..=n {
        by_url
            .entry(mesh.etcd_of(k).url.clone())
            .or_default()
            .push(k);
    }
    let mut set = tokio::task::JoinSet::new();
    for (url, ks) in by_url {
        set.spawn(async move {
            let mut cl = Client::connect([url.as_str()], None).await?;
            for k in ks {
                put_all(&mut cl, cluster_kvs(k, shape)?).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    println!(
        "  published {n} clusters x {} endpoints ({} services each) into 1 + {} etcds in {:.1?}",
        shape.services * shape.per_service,
        shape.services,
        mesh.shared.len(),
        t0.elapsed()
    );
    Ok(mesh)
}

fn options(local_url: &str, remote_dir: Option<PathBuf>, kvstoremesh: bool) -> AgentOptions {
    AgentOptions {
        cluster: c(1),
        cluster_id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).expect("id"),
        node: "bench-node".into(),
        etcd_endpoints: vec![local_url.to_owned()],
        tls_dir: None,
        remote_config_dir: remote_dir,
        stale_grace: Duration::from_secs(30),
        sync_timeout: Duration::from_secs(120),
        heartbeat_timeout: Duration::from_secs(5),
        kvstoremesh,
        health_interval: Duration::from_millis(200),
        health_failures: 2,
        health_rise: 2,
        remote_probe_timeout: Some(Duration::from_millis(250)),
        watch: WatchSettings::default(),
        remote_dir_poll: Duration::from_secs(1),
        status_every: Duration::from_secs(5),
        destroy_sockets: false,
        // As on a node: health verdicts and the node summary go to c1's etcd.
        publish: true,
        cluster_ids: ClusterIds::default(),
    }
}

fn runtime(name: &'static str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// Heartbeats of every cluster every second, except the quiet ones.
fn spawn_heartbeats(
    mesh: &Mesh,
    quiet: Arc<Mutex<Vec<u32>>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut by_url: HashMap<String, Vec<u32>> = HashMap::new();
    for k in 1..=mesh.n {
        by_url
            .entry(mesh.etcd_of(k).url.clone())
            .or_default()
            .push(k);
    }
    Ok(tokio::spawn(async move {
        let mut clients = Vec::new();
        for (url, ks) in by_url {
            if let Ok(cl) = Client::connect([url.as_str()], None).await {
                clients.push((cl, ks));
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let q = quiet.lock().expect("quiet").clone();
            for (cl, ks) in &mut clients {
                let kvs: Vec<_> = ks
                    .iter()
                    .filter(|k| !q.contains(k))
                    .map(|&k| heartbeat_kv(k))
                    .collect();
                let _ = put_all(cl, kvs).await;
            }
        }
    }))
}

struct Churn {
    /// (put time, service) by sequence number.
    puts: Vec<(Instant, u32)>,
    /// Puts that failed.
    failed: u64,
}

/// `rate` endpoint changes/s over the remote clusters for `secs`; the `quiet` clusters (the last
/// ones) stop for the middle third.
async fn churn(
    mesh: &Mesh,
    rate: u32,
    secs: u64,
    quiet_n: u32,
    quiet: Arc<Mutex<Vec<u32>>>,
    put_times: Arc<Mutex<Vec<Option<Instant>>>>,
) -> anyhow::Result<Churn> {
    let mut clients: HashMap<String, Client> = HashMap::new();
    for k in 2..=mesh.n {
        let url = mesh.etcd_of(k).url.clone();
        if !clients.contains_key(&url) {
            clients.insert(url.clone(), Client::connect([url.as_str()], None).await?);
        }
    }
    let remotes = mesh.n - 1;
    let shape = mesh.shape;
    let mut flipped: HashMap<(u32, u32), bool> = HashMap::new();
    let total = u64::from(rate) * secs;
    let tick = Duration::from_millis(10);
    let per_tick = (f64::from(rate) / 100.0).max(1.0);
    let mut due = 0f64;
    let mut seq = 0u64;
    let mut puts = Vec::with_capacity(total as usize);
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut iv = tokio::time::interval(tick);
    let mut set = tokio::task::JoinSet::new();
    let quiet_set: Vec<u32> = (0..quiet_n.min(remotes)).map(|i| mesh.n - i).collect();
    while seq < total {
        iv.tick().await;
        let el = start.elapsed().as_secs_f64() / secs as f64;
        let q_now = (1.0 / 3.0..2.0 / 3.0).contains(&el) && !quiet_set.is_empty();
        *quiet.lock().expect("quiet") = if q_now { quiet_set.clone() } else { vec![] };
        due += per_tick;
        while due >= 1.0 && seq < total {
            due -= 1.0;
            let i = seq as u32;
            let mut k = 2 + i % remotes;
            let s = (i / remotes) % shape.services;
            if q_now && quiet_set.contains(&k) {
                k = 2 + (k - 1) % (remotes - quiet_set.len() as u32).max(1);
            }
            let f = flipped.entry((k, s)).or_insert(false);
            *f = !*f;
            let (key, value) = chunk_kv(chunks(k, s, shape, *f, Some(seq)).remove(0))?;
            let mut cl = clients[&mesh.etcd_of(k).url].clone();
            let t = Instant::now();
            put_times.lock().expect("put times")[seq as usize] = Some(t);
            puts.push((t, s));
            let failed = failed.clone();
            set.spawn(async move {
                if cl.put(key, value, None).await.is_err() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            seq += 1;
        }
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    quiet.lock().expect("quiet").clear();
    Ok(Churn {
        puts,
        failed: failed.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Watches c1's etcd for mirrored endpoint chunks carrying a churn sequence number: the cache lag
/// of KVStoreMesh (put in the remote -> mirrored put seen locally).
fn spawn_lag_watch(
    url: String,
    put_times: Arc<Mutex<Vec<Option<Instant>>>>,
    lags: Arc<Mutex<Vec<Duration>>>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut cl = Client::connect([url.as_str()], None).await?;
        let mut stream = cl
            .watch(
                KeyKind::Endpoints.prefix(),
                Some(WatchOptions::new().with_prefix()),
            )
            .await?;
        while let Some(resp) = stream.message().await? {
            let now = Instant::now();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let v = kv.value();
                // `"hostname":"s<seq>"`
                let needle = b"\"hostname\":\"s";
                if let Some(p) = v.windows(needle.len()).position(|w| w == needle) {
                    let digits: String = v[p + needle.len()..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .map(|&b| b as char)
                        .collect();
                    if let Ok(q) = digits.parse::<usize>()
                        && let Some(Some(t)) = put_times.lock().expect("put times").get(q)
                    {
                        lags.lock().expect("lags").push(now - *t);
                    }
                }
            }
        }
        Ok(())
    })
}

/// Starts KVStoreMesh (the apiserver's `kvstoremesh::run`) for c1 on its own runtime.
fn start_kvstoremesh(rt: &tokio::runtime::Runtime, local_url: String) {
    rt.spawn(async move {
        let run = async {
            let client = Client::connect([local_url.as_str()], None).await?;
            let store = EtcdStore::new(client.clone(), Duration::from_secs(10));
            let mut cl = client;
            let key = MeshKey::Leader { cluster: c(1) }.to_string();
            cl.put(
                key.clone(),
                MeshValue::Leader("bench".into()).encode(),
                None,
            )
            .await?;
            let got = cl.get(key.clone(), None).await?;
            let create_revision = got
                .kvs()
                .first()
                .map(|kv| kv.create_revision())
                .unwrap_or(0);
            clustermesh_apiserver::kvstoremesh::run(
                store,
                c(1),
                clustermesh_apiserver::kvstoremesh::MirrorTls::default(),
                Guard {
                    key,
                    create_revision,
                },
                None,
            )
            .await;
            anyhow::Ok(())
        };
        if let Err(e) = run.await {
            eprintln!("kvstoremesh: {e:#}");
        }
    });
}

/// Writes `remotes/c1/<peer>` for every remote (what `clustermesh connect` stores).
async fn register_remotes(mesh: &Mesh) -> anyhow::Result<()> {
    let mut cl = Client::connect([mesh.local.url.as_str()], None).await?;
    let mut kvs = Vec::new();
    for k in 2..=mesh.n {
        let r = RemoteCluster {
            name: c(k),
            id: ClusterId::new(k, MaxConnectedClusters::DEFAULT)?,
            endpoints: vec![mesh.etcd_of(k).url.clone()],
            ca_bundle: String::new(),
            client_cert: String::new(),
        };
        kvs.push((
            MeshKey::Remote {
                cluster: c(1),
                remote: c(k),
            }
            .to_string(),
            MeshValue::Remote(r).encode(),
        ));
    }
    put_all(&mut cl, kvs).await
}

/// Number of peers whose KVStoreMesh canaries are in c1's etcd.
async fn mirrored_peers(url: &str) -> anyhow::Result<usize> {
    let mut cl = Client::connect([url], None).await?;
    let r = cl
        .get(
            KeyKind::Synced.prefix(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    let mut peers = std::collections::HashSet::new();
    for kv in r.kvs() {
        if let Ok(MeshKey::Synced { cluster, .. }) = MeshKey::parse(kv.key_str()?)
            && cluster != c(1)
        {
            peers.insert(cluster);
        }
    }
    Ok(peers.len())
}

fn all_synced(
    agent: &Agent,
    want_endpoints: usize,
    n: u32,
    after: Option<&HashMap<ClusterName, u64>>,
) -> bool {
    let st = agent.snapshot();
    if !st.ready() || st.endpoints != want_endpoints {
        return false;
    }
    if let Some(before) = after {
        // Every connection reconnected since, and synced again.
        return before.iter().all(|(name, r)| {
            st.clusters
                .get(name)
                .is_some_and(|v| v.reconnects > *r && v.synced)
        });
    }
    st.clusters.len() >= n as usize
}

async fn wait_for(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t0.elapsed())
}

async fn run_one(
    args: &Args,
    root: &Path,
    remote_root: &Path,
    n: u32,
    via: Via,
) -> anyhow::Result<()> {
    let shape = Shape {
        services: args.services,
        per_service: args.endpoints / args.services,
    };
    if shape.per_service * shape.services >= 4096 || n > 255 {
        bail!("sizes: at most 4095 endpoints per cluster and 255 clusters");
    }
    let total = (n * shape.services * shape.per_service) as usize;
    println!(
        "== {n} clusters x {} endpoints = {total}, via {via:?} ==",
        shape.services * shape.per_service
    );
    println!(
        "  etcds: local (c1) under {}, {} shared remote etcds under {}",
        root.display(),
        args.etcds.min(n as usize - 1).max(1),
        remote_root.display()
    );
    let rss0 = rss_mib();
    let mut mesh = build_mesh(root, remote_root, n, args.etcds, shape).await?;
    let quiet = Arc::new(Mutex::new(Vec::new()));
    let hb = spawn_heartbeats(&mesh, quiet.clone())?;
    let tck = clk_tck();

    let kvsm_rt = runtime("kvsm")?;
    let mut kvsm_rss = 0;
    if via == Via::Kvstoremesh {
        register_remotes(&mesh).await?;
        let r0 = rss_mib();
        let c0 = thread_ticks("kvsm");
        let t0 = Instant::now();
        start_kvstoremesh(&kvsm_rt, mesh.local.url.clone());
        let url = mesh.local.url.clone();
        loop {
            if mirrored_peers(&url).await? >= (n - 1) as usize {
                break;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("kvstoremesh did not mirror {} peers in 300 s", n - 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kvsm_rss = rss_mib().saturating_sub(r0);
        println!(
            "  kvstoremesh: {} remotes mirrored in {:.2?}, CPU {:.1} s, RSS share {} MiB",
            n - 1,
            t0.elapsed(),
            (thread_ticks("kvsm") - c0) as f64 / tck,
            kvsm_rss
        );
    }

    // Initial sync.
    let agent_rt = runtime("nsync")?;
    let remote_dir = root.join("remotes");
    std::fs::create_dir_all(&remote_dir)?;
    if via == Via::Direct {
        for k in 2..=n {
            std::fs::write(
                remote_dir.join(format!("c{k}.yaml")),
                format!("name: c{k}\nendpoints: [\"{}\"]\n", mesh.etcd_of(k).url),
            )?;
        }
    }
    let rss_before = rss_mib();
    let cpu0 = thread_ticks("nsync");
    let opts = options(
        &mesh.local.url,
        (via == Via::Direct).then(|| remote_dir.clone()),
        via == Via::Kvstoremesh,
    );
    let (kernel, writer, events) = match args.maps {
        Maps::Kernel => {
            let name = format!("clustermesh-scale-{}-{n}-{via:?}", std::process::id());
            let (k, w, e) = KernelMaps::open(&name, args.max_backends, opts.cluster_ids.clone())?;
            (Some(k), w, e)
        }
        Maps::Memory => (None, Box::new(FakeMaps::new()) as Box<dyn MapWriter>, None),
    };
    let maps = Arc::new(Mutex::new(MapLog::default()));
    let agent = {
        let _g = agent_rt.enter();
        let w = Recorded {
            inner: writer,
            log: maps.clone(),
        };
        agent::start_with_events(opts, Box::new(w), events)
    };
    let sync = wait_for(Duration::from_secs(300), "initial sync", || {
        all_synced(&agent, total, n, None)
    })
    .await?;
    let agent_rss = rss_mib().saturating_sub(rss_before);
    let (frontends, backends) = {
        let l = maps.lock().expect("map log");
        (l.backends.len(), l.backends.values().sum::<usize>())
    };
    println!(
        "  node-sync initial sync: {total} endpoints -> {frontends} frontends, {backends} backends in {} maps in {sync:.2?}, CPU {:.1} s; RSS share {agent_rss} MiB (process {} MiB, {} MiB before the mesh) [target <= 10 s; <= {} MiB]",
        if args.maps == Maps::Kernel {
            "the kernel's"
        } else {
            "in-memory"
        },
        (thread_ticks("nsync") - cpu0) as f64 / tck,
        rss_mib(),
        rss0,
        if via == Via::Direct { 256 } else { 128 }
    );

    // Churn.
    let total_puts = (u64::from(args.churn_rate) * args.churn_secs) as usize;
    let put_times = Arc::new(Mutex::new(vec![None; total_puts]));
    let lags = Arc::new(Mutex::new(Vec::new()));
    let lag_watch = (via == Via::Kvstoremesh)
        .then(|| spawn_lag_watch(mesh.local.url.clone(), put_times.clone(), lags.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let mut l = maps.lock().expect("map log");
        l.writes.clear();
        l.recording = true;
    }
    let (a0, k0) = (thread_ticks("nsync"), thread_ticks("kvsm"));
    let tc = Instant::now();
    let ch = churn(
        &mesh,
        args.churn_rate,
        args.churn_secs,
        args.quiet,
        quiet.clone(),
        put_times.clone(),
    )
    .await?;
    let churn_wall = tc.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wall = tc.elapsed().as_secs_f64();
    let (a1, k1) = (thread_ticks("nsync"), thread_ticks("kvsm"));
    let mut writes: HashMap<Frontend, Vec<Instant>> = HashMap::new();
    {
        let mut l = maps.lock().expect("map log");
        l.recording = false;
        for (at, fe) in std::mem::take(&mut l.writes) {
            writes.entry(fe).or_default().push(at);
        }
    }
    let mut prop = Vec::new();
    let mut missing = 0;
    for (t, s) in &ch.puts {
        match writes
            .get(&frontend(*s))
            .and_then(|w| w.iter().find(|a| *a >= t))
        {
            Some(a) => prop.push(*a - *t),
            None => missing += 1,
        }
    }
    let rate_seen = ch.puts.len() as f64 / churn_wall.as_secs_f64();
    println!(
        "  churn: {} changes in {churn_wall:.1?} ({rate_seen:.0}/s, {} failed, {} quiet clusters for the middle third)",
        ch.puts.len(),
        ch.failed,
        args.quiet.min(n - 1)
    );
    println!(
        "  node-sync propagation put -> frontend written: p50 {:.2?} p99 {:.2?} max {:.2?} ({missing} without a later write) [target p99 <= 100 ms]",
        percentile(&mut prop, 0.5),
        percentile(&mut prop, 0.99),
        percentile(&mut prop, 1.0)
    );
    println!(
        "  node-sync CPU under churn: {:.1} % of one core (over {wall:.1} s incl. 2 s drain) [target <= 25 %]; RSS share now {} MiB",
        (a1 - a0) as f64 / tck / wall * 100.0,
        rss_mib().saturating_sub(rss_before)
    );
    // What the status page is built from: this node's summary in c1's etcd.
    let key = mesh_model::keys::MeshKey::NodeStatus {
        cluster: c(1),
        node: "bench-node".into(),
    };
    let summary = Client::connect([mesh.local.url.as_str()], None)
        .await?
        .get(key.to_string(), None)
        .await?;
    match summary.kvs().first() {
        Some(kv) => println!(
            "  node summary in c1's etcd: {} KiB, {} backends listed",
            kv.value().len() / 1024,
            match mesh_model::values::MeshValue::decode(&key, kv.value()) {
                Ok(mesh_model::values::MeshValue::NodeStatus(s)) => s
                    .service_states
                    .iter()
                    .map(|s| s.backends.len())
                    .sum::<usize>()
                    .to_string(),
                Ok(_) | Err(_) => "? (not a node summary)".to_owned(),
            }
        ),
        None => println!("  node summary in c1's etcd: NOT WRITTEN"),
    }
    if let Some(h) = lag_watch {
        h.abort();
        let mut l = lags.lock().expect("lags").clone();
        println!(
            "  kvstoremesh under churn: CPU {:.1} % of one core [target <= 100 %]; RSS share {} MiB at sync [target <= 512 MiB]; cache lag put in remote -> mirrored put in c1's etcd (n={}): p50 {:.2?} p99 {:.2?} max {:.2?} [target p99 <= 50 ms]",
            (k1 - k0) as f64 / tck / wall * 100.0,
            kvsm_rss,
            l.len(),
            percentile(&mut l, 0.5),
            percentile(&mut l, 0.99),
            percentile(&mut l, 1.0)
        );
    }

    // Reconnect storm.
    if !args.no_reconnect {
        let before: HashMap<ClusterName, u64> = {
            let st = agent.snapshot();
            st.clusters
                .iter()
                .filter(|(name, _)| (via == Via::Kvstoremesh) == (**name == c(1)))
                .map(|(name, v)| (name.clone(), v.reconnects))
                .collect()
        };
        let urls: Vec<String> = mesh.shared.iter().map(|e| e.url.clone()).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = sample_rates(urls, stop.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        let what = if via == Via::Direct {
            for e in &mut mesh.shared {
                e.kill_now();
            }
            for e in &mut mesh.shared {
                e.start_again()?;
            }
            "every remote etcd killed and restarted"
        } else {
            mesh.local.restart().await?;
            "c1's etcd killed and restarted"
        };
        let back = wait_for(Duration::from_secs(300), "reconnect", || {
            all_synced(&agent, total, n, Some(&before))
        })
        .await;
        let synced_at = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peaks = sampler.join().unwrap_or_default();
        let per_etcd = (n - 1) as f64 / mesh.shared.len() as f64;
        let peak = peaks.iter().cloned().fold(0f64, f64::max);
        match back {
            Ok(_) => println!(
                "  reconnect ({what}): every cluster synced again {synced_at:.2?} after the kill [target <= 30 s]; peak requests/s on a remote etcd {peak:.0} (it holds {per_etcd:.0} clusters: ~{:.0}/s per cluster){}",
                peak / per_etcd,
                if via == Via::Kvstoremesh {
                    "; with KVStoreMesh these are its requests to the remotes"
                } else {
                    ""
                }
            ),
            Err(e) => println!(
                "  reconnect ({what}): {e:#} after {:.1?}; peak requests/s on a remote etcd {peak:.0}",
                t0.elapsed()
            ),
        }
    }
    {
        let l = maps.lock().expect("map log");
        if l.refused > 0 {
            println!(
                "  map writes refused by the maps: {} (last: {})",
                l.refused,
                l.last_refusal.as_deref().unwrap_or("")
            );
        }
    }
    agent.stop();
    hb.abort();
    // The agent's runtime holds the maps: stopped before they are removed.
    tokio::task::block_in_place(|| agent_rt.shutdown_timeout(Duration::from_secs(5)));
    drop(kernel);
    kvsm_rt.shutdown_background();
    drop(mesh);
    Ok(())
}

/// W watchers on one etcd holding one cluster, under `rate` changes/s.
async fn fanout(root: &Path, watchers: &[u32], rate: u32, secs: u64) -> anyhow::Result<()> {
    let shape = Shape {
        services: 100,
        per_service: 10,
    };
    let tck = clk_tck();
    println!(
        "== watch fan-out: one etcd, one cluster (1000 endpoints), {rate} changes/s for {secs} s =="
    );
    for &w in watchers {
        let e = BenchEtcd::start(ETCD, &root.join(format!("fanout-{w}")), 8 << 30).await?;
        let mut cl = Client::connect([e.url.as_str()], None).await?;
        put_all(&mut cl, cluster_kvs(2, shape)?).await?;
        let rss0 = status_kib(&format!("/proc/{}/status", e.pid()), "VmRSS:") / 1024;
        let t0 = Instant::now();
        let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..w {
            let url = e.url.clone();
            let events = events.clone();
            // Each watcher: its own connection, list then watch from the list's revision.
            let mut wc = Client::connect([url.as_str()], None).await?;
            let list = wc
                .get(
                    mesh_model::keys::PREFIX,
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            let rev = list.header().map(|h| h.revision()).unwrap_or(0);
            let mut stream = wc
                .watch(
                    mesh_model::keys::PREFIX,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            tasks.push(tokio::spawn(async move {
                let _keep = wc;
                while let Ok(Some(r)) = stream.message().await {
                    events.fetch_add(
                        r.events().len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }));
        }
        let setup = t0.elapsed();
        let c0 = pid_ticks(e.pid());
        let tc = Instant::now();
        let mut flipped = vec![false; shape.services as usize];
        let mut iv = tokio::time::interval(Duration::from_millis(10));
        let total = u64::from(rate) * secs;
        let mut due = 0f64;
        let mut seq = 0u64;
        while seq < total {
            iv.tick().await;
            due += f64::from(rate) / 100.0;
            while due >= 1.0 && seq < total {
                due -= 1.0;
                let s = (seq % u64::from(shape.services)) as u32;
                flipped[s as usize] = !flipped[s as usize];
                let (k, v) =
                    chunk_kv(chunks(2, s, shape, flipped[s as usize], Some(seq)).remove(0))?;
                cl.put(k, v, None).await?;
                seq += 1;
            }
        }
        let wall = tc.elapsed().as_secs_f64();
        let cpu = (pid_ticks(e.pid()) - c0) as f64 / tck / wall * 100.0;
        let rss = status_kib(&format!("/proc/{}/status", e.pid()), "VmRSS:") / 1024;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = events.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "  {w} watchers: etcd CPU {cpu:.1} % of one core under churn, RSS {rss} MiB ({rss0} MiB with none), {:.0} events delivered ({:.0}% of {}); watchers set up in {setup:.2?}",
            got,
            got as f64 / (total * u64::from(w)) as f64 * 100.0,
            total * u64::from(w)
        );
        for t in tasks {
            t.abort();
        }
        drop(e);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "scale simulator (issue 19): synthetic clusters in shared loopback etcds (no TLS, several clusters per etcd, everything on this machine's {} cores); node-sync writing {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        match args.maps {
            Maps::Kernel => format!(
                "the kernel's eBPF maps (global-lb-bpf, a cgroup of the run's own; backends map of \
                 {} entries, its per-CPU arrays {:.1} MiB per CPU)",
                args.max_backends,
                global_lb_bpf::DatapathConfig::new("", "")
                    .with_max_backends(args.max_backends)
                    .per_cpu_map_bytes() as f64
                    / f64::from(1 << 20)
            ),
            Maps::Memory => "in-memory maps".to_owned(),
        }
    );
    let rt = runtime("bench")?;
    let root = std::env::temp_dir().join(format!("clustermesh-scale-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let r = rt.block_on(async {
        if let Some(Cmd::Fanout {
            watchers,
            rate,
            secs,
        }) = &args.cmd
        {
            return fanout(&root, watchers, *rate, *secs).await;
        }
        for &n in &args.clusters {
            for &via in &args.via {
                let dir = root.join(format!("{n}-{via:?}"));
                std::fs::create_dir_all(&dir)?;
                let remote_dir = args.remote_etcd_dir.join(format!(
                    "clustermesh-scale-{}-{n}-{via:?}",
                    std::process::id()
                ));
                std::fs::create_dir_all(&remote_dir)?;
                let r = run_one(&args, &dir, &remote_dir, n, via).await;
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(&remote_dir);
                r?;
            }
        }
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&root);
    r
}
