//! Failover and failback on the mesh lab (DESIGN.md "Performance targets": failover p99 <= 500 ms,
//! failback p99 <= 500 ms, default settings), measured by `clustermesh demo`'s drills repeated
//! on one two-cluster lab: every component real (TLS etcd, clustermesh-apiservers, node-syncs with
//! the eBPF datapath, backends and a client in network namespaces).
//!
//! * graceful: cluster 1's endpoints are published terminating, then its backends stop; failover is
//!   from the publish to the first connect of the run that lands only on cluster 2;
//! * hard kill: cluster 1's backends are SIGKILLed; node-sync's health checks (200 ms x 2 by
//!   default) notice, failover is from the kill.
//!
//! Failback: from the restart (and, graceful, the ready publish) to the first connect of the run
//! that lands only on cluster 1 again.
//!
//! Needs root and the binaries next to this one:
//! `cargo build --release --bins -p mesh-bench -p clustermesh-apiserver -p node-sync -p clustermesh-cli`,
//! then `target/release/failover --drills 10`.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use clustermesh_cli::demo::{self, DemoOptions, Fault};

#[derive(Debug, Parser)]
#[command(name = "failover", about = "failover/failback drills on the mesh lab")]
struct Args {
    /// Drills of each kind (graceful, hard kill).
    #[arg(long, env = "BENCH_DRILLS", default_value_t = 10)]
    drills: usize,
    /// Interval between two new connections of the drill client (ms).
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Lab prefix.
    #[arg(long, default_value = "bench-failover")]
    prefix: String,
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() as f64 - 1.0) * p).round() as usize])
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let opts = DemoOptions {
        prefix: args.prefix.clone(),
        interval: Duration::from_millis(args.interval_ms),
        settle: Duration::from_millis(1000),
        ..DemoOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut quiet = |_: &str| {};
    let mut mesh = rt
        .block_on(demo::bring_up(&opts, &mut quiet))
        .context("bring up the lab mesh")?;
    let local = format!("{}-", mesh.cluster_name(1));
    mesh.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with(&local))?;
    println!(
        "failover benchmark: 2 clusters x 2 nodes on the lab, default node-sync settings, client every {} ms, {} drills of each kind",
        args.interval_ms, args.drills
    );
    for (fault, name) in [
        (Fault::Graceful, "graceful"),
        (Fault::HardKill, "hard-kill"),
    ] {
        let (mut fo, mut fb, mut failed, mut total, mut missing) =
            (Vec::new(), Vec::new(), 0u64, 0u64, 0usize);
        for i in 0..args.drills {
            let r = demo::drill(&mut mesh, fault, &opts, &mut quiet)?;
            println!(
                "  {name} #{:>2}: failover {} ms, failback {} ms, failed connects {}/{}",
                i + 1,
                fmt(r.failover_ms),
                fmt(r.failback_ms),
                r.failed_connects,
                r.total_connects
            );
            match (r.failover_ms, r.failback_ms) {
                (Some(a), Some(b)) => {
                    fo.push(a);
                    fb.push(b);
                }
                _ => missing += 1,
            }
            failed += r.failed_connects;
            total += r.total_connects;
        }
        println!(
            "FIGURE {name}_failover_ms p50={} p99={} max={} n={}",
            fmt(pct(&mut fo, 0.5)),
            fmt(pct(&mut fo, 0.99)),
            fmt(pct(&mut fo, 1.0)),
            fo.len()
        );
        println!(
            "FIGURE {name}_failback_ms p50={} p99={} max={} n={}",
            fmt(pct(&mut fb, 0.5)),
            fmt(pct(&mut fb, 0.99)),
            fmt(pct(&mut fb, 1.0)),
            fb.len()
        );
        println!("FIGURE {name}_failed_connects failed={failed} total={total} unsettled={missing}");
    }
    mesh.teardown()?;
    Ok(())
}
