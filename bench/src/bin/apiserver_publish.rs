//! clustermesh-apiserver publish benchmark against a real local etcd (/usr/bin/etcd on a free loopback port):
//! the initial publish of N services x M endpoints (index + diff writer + canaries), then single endpoint
//! changes: how many etcd puts each costs and its latency (index apply -> txn acknowledged).
//!
//! `cargo run --release -p mesh-bench --bin apiserver_publish -- --services 10000 --endpoints 10`

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use clustermesh_apiserver::index::{IndexConfig, MeshIndex, owned_prefixes};
use clustermesh_apiserver::leader::campaign;
use clustermesh_apiserver::objects::SourceObject;
use clustermesh_apiserver::source::manifests::parse_manifests;
use clustermesh_apiserver::writer::{Op, StoreWriter, plan};
use mesh_kv::{EtcdStore, KvStore};
use mesh_model::keys::{MeshKey, SyncKind};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

#[derive(Parser)]
#[command(
    about = "clustermesh-apiserver: initial publish and one-endpoint-change cost against a local etcd"
)]
struct Args {
    /// Number of global services.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Single endpoint changes to measure.
    #[arg(long, default_value_t = 500)]
    changes: u32,
    /// etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: String,
}

/// The benchmark's etcd (8 GiB backend quota), its data in a temporary directory.
async fn start_etcd(
    bin: &str,
) -> anyhow::Result<(mesh_bench::BenchEtcd, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let e = mesh_bench::BenchEtcd::start(bin, &dir.path().join("data"), 8 << 30).await?;
    let url = e.url.clone();
    Ok((e, url, dir))
}

fn service_doc(i: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: bench\n  annotations:\n    clustermesh.io/global: \"true\"\nspec:\n  clusterIP: {}\n  ports:\n  - name: http\n    port: 80\n---\n",
        Ipv4Addr::from(0x0a60_0000 + i + 1)
    )
}

fn slice_doc(i: u32, n: u32, not_ready: Option<u32>) -> String {
    let mut eps = String::new();
    for j in 0..n {
        let ip = Ipv4Addr::from(0x0a00_0000 + i * 64 + j + 1);
        let ready = Some(j) != not_ready;
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: node-{}\n  conditions:\n    ready: {ready}\n",
            j % 50
        ));
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-a\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: s{i}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- name: http\n  port: 8080\n---\n"
    )
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.endpoints > 63 {
        bail!("--endpoints at most 63 (address layout of this benchmark)");
    }
    let (_etcd, url, _data) = start_etcd(&args.etcd).await?;
    let client = etcd_client::Client::connect([url.as_str()], None).await?;
    let mcc = MaxConnectedClusters::DEFAULT;
    let cluster = ClusterName::new("bench")?;
    let cfg = IndexConfig::new(cluster.clone(), ClusterId::new(1, mcc)?);

    // Objects (parsing is not part of the figures).
    let mut text = String::new();
    for i in 0..args.services {
        text.push_str(&service_doc(i));
        text.push_str(&slice_doc(i, args.endpoints, None));
    }
    let objects = parse_manifests("bench.yaml", &text).map_err(|e| anyhow::anyhow!("{e}"))?;

    // Initial publish: list, seed, index, write everything, then the canaries.
    let store = EtcdStore::new(client.clone(), Duration::from_secs(30));
    let term = campaign(
        &store,
        &MeshKey::Leader {
            cluster: cluster.clone(),
        }
        .to_string(),
        "bench",
        Duration::from_secs(10),
    )
    .await?;
    let guard = term.guard();
    let t0 = Instant::now();
    let (mut writer, existing, _watcher) =
        StoreWriter::load(store.clone(), &owned_prefixes(&cluster), &[]).await?;
    let mut index = MeshIndex::new(cfg);
    index.seed(&existing);
    for o in objects {
        index.apply(o);
    }
    let t_index = t0.elapsed();
    let keys: Vec<String> = index.desired().keys().cloned().collect();
    let ops = plan(keys.iter(), index.desired(), writer.current(), true);
    let n_ops = ops.len();
    let st = writer.write(ops, &guard).await?;
    let canaries: Vec<Op> = SyncKind::ALL
        .into_iter()
        .map(|kind| Op {
            key: MeshKey::Synced {
                cluster: cluster.clone(),
                kind,
            }
            .to_string(),
            value: Some(b"2026-01-01T00:00:00Z".to_vec()),
        })
        .collect();
    writer.write(canaries, &guard).await?;
    let t_initial = t0.elapsed();
    index.take_dirty();

    // One endpoint change at a time.
    let mut c = client.clone();
    let rev_before = c
        .status()
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    let mut lat = Vec::new();
    let mut puts = Vec::new();
    for k in 0..args.changes {
        let svc = (k * 7919) % args.services;
        let flip = k % args.endpoints;
        let doc = slice_doc(svc, args.endpoints, Some(flip));
        let mut obj = parse_manifests("change.yaml", &doc).map_err(|e| anyhow::anyhow!("{e}"))?;
        let obj: SourceObject = obj.remove(0);
        let t = Instant::now();
        index.apply(obj);
        let dirty = index.take_dirty();
        let ops = plan(dirty.iter(), index.desired(), writer.current(), true);
        let s = writer.write(ops, &guard).await?;
        lat.push(t.elapsed());
        puts.push(s.puts + s.deletes);
        // Put it back (not measured).
        let back = parse_manifests("back.yaml", &slice_doc(svc, args.endpoints, None))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .remove(0);
        index.apply(back);
        let dirty = index.take_dirty();
        let ops = plan(dirty.iter(), index.desired(), writer.current(), true);
        writer.write(ops, &guard).await?;
    }
    let rev_after = c
        .status()
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    lat.sort();
    let total_keys = store.list("clustermesh/v1/", None).await?.kvs.len();
    let one_put = puts.iter().all(|p| *p == 1);

    println!(
        "clustermesh-apiserver publish benchmark (local etcd 3.4, debug={})",
        cfg!(debug_assertions)
    );
    println!("{:<52} {:>14}", "figure", "value");
    println!("{:-<52} {:->14}", "", "");
    println!(
        "{:<52} {:>14}",
        format!("services x endpoints"),
        format!("{} x {}", args.services, args.endpoints)
    );
    println!(
        "{:<52} {:>14}",
        "keys in etcd after initial publish", total_keys
    );
    println!(
        "{:<52} {:>14}",
        "initial publish: index build",
        format!("{:.2?}", t_index)
    );
    println!(
        "{:<52} {:>14}",
        "initial publish: total (list+index+write+canaries)",
        format!("{:.2?}", t_initial)
    );
    println!(
        "{:<52} {:>14}",
        "initial publish: puts / txns",
        format!("{} / {}", st.puts, st.txns)
    );
    println!("{:<52} {:>14}", "initial publish: ops planned", n_ops);
    println!(
        "{:<52} {:>14}",
        "one endpoint change: puts per change (min..max)",
        format!(
            "{}..{}",
            puts.iter().min().unwrap_or(&0),
            puts.iter().max().unwrap_or(&0)
        )
    );
    println!(
        "{:<52} {:>14}",
        "one endpoint change: etcd revisions per change",
        format!(
            "{:.2}",
            (rev_after - rev_before) as f64 / (2.0 * f64::from(args.changes.max(1)))
        )
    );
    println!(
        "{:<52} {:>14}",
        "one endpoint change: latency p50",
        format!("{:.2?}", pct(&lat, 0.5))
    );
    println!(
        "{:<52} {:>14}",
        "one endpoint change: latency p99 (target < 10 ms)",
        format!("{:.2?}", pct(&lat, 0.99))
    );
    println!(
        "{:<52} {:>14}",
        "one endpoint change: exactly one put (target)",
        if one_put { "yes" } else { "NO" }
    );
    Ok(())
}
