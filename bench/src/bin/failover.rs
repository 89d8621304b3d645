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
//! Then, with the service switched to affinity `none` (the client uses both clusters), `--cuts`
//! times: every packet between the clusters dropped in the lab's router for 3 s, then healed. Per
//! cut: when the last failed connect of the client in cluster 1 started, after the cut (target:
//! within 1 s), and how long after the heal its connects land on cluster 2 again.
//!
//! Needs root and the binaries next to this one:
//! `cargo build --release --bins -p mesh-bench -p clustermesh-apiserver -p node-sync -p clustermesh-cli`,
//! then `target/release/failover --drills 10`.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use clustermesh_cli::connect::GrpcConnect;
use mesh_lab::demo::{self, DemoOptions, Fault};

#[derive(Debug, Parser)]
#[command(name = "failover", about = "failover/failback drills on the mesh lab")]
struct Args {
    /// Drills of each kind (graceful, hard kill).
    #[arg(long, env = "BENCH_DRILLS", default_value_t = 10)]
    drills: usize,
    /// Interval between two new connections of the drill client (ms).
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Remote-cluster cuts (affinity none).
    #[arg(long, env = "BENCH_CUTS", default_value_t = 10)]
    cuts: usize,
    /// Lab prefix.
    #[arg(long, default_value = "bench-failover")]
    prefix: String,
}

/// `--cuts` whole-cluster cuts under affinity none; prints the FIGURE lines.
fn cutoff(mesh: &mut mesh_lab::mesh::LabMesh, args: &Args) -> Result<()> {
    mesh.set_affinity("none")?;
    let remote = format!("{}-", mesh.cluster_name(2));
    mesh.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with(&remote))?;
    let interval = Duration::from_millis(args.interval_ms);
    let (mut last, mut back, mut failed, mut total) = (Vec::new(), Vec::new(), 0u64, 0u64);
    for i in 0..args.cuts {
        let probe = mesh.spawn_probe(1, 1, mesh.service_addr(1), interval)?;
        if !probe.wait_for(0.0, Duration::from_secs(10), |s| {
            s.ok && s.backend.as_deref().is_some_and(|b| b.starts_with(&remote))
        }) {
            anyhow::bail!(
                "cut #{}: the client does not reach cluster 2 before the cut",
                i + 1
            );
        }
        let cut_ms = probe.now_ms();
        mesh.lab().partition(1, 2)?;
        std::thread::sleep(Duration::from_secs(3));
        let heal_ms = probe.now_ms();
        mesh.lab().heal(1, 2)?;
        let returned = probe.wait_for(heal_ms, Duration::from_secs(10), |s| {
            s.ok && s.backend.as_deref().is_some_and(|b| b.starts_with(&remote))
        });
        std::thread::sleep(Duration::from_millis(200));
        let samples = probe.stop();
        let during: Vec<_> = samples
            .iter()
            .filter(|s| s.t_ms >= cut_ms && s.t_ms < heal_ms)
            .collect();
        let last_fail = during
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.t_ms - cut_ms)
            .fold(0.0, f64::max);
        let back_ms = samples
            .iter()
            .filter(|s| {
                s.t_ms >= heal_ms
                    && s.ok
                    && s.backend.as_deref().is_some_and(|b| b.starts_with(&remote))
            })
            .map(|s| s.t_ms - heal_ms)
            .fold(f64::INFINITY, f64::min);
        failed += during.iter().filter(|s| !s.ok).count() as u64;
        total += during.len() as u64;
        println!(
            "  cut #{:>2}: last failed connect {:.0} ms after the cut, back {} ms after the heal, failed {}/{}",
            i + 1,
            last_fail,
            if returned {
                format!("{back_ms:.0}")
            } else {
                "-".into()
            },
            during.iter().filter(|s| !s.ok).count(),
            during.len()
        );
        last.push(last_fail);
        if returned {
            back.push(back_ms);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "FIGURE cutoff_last_failure_ms p50={} p99={} max={} n={}",
        fmt(pct(&mut last, 0.5)),
        fmt(pct(&mut last, 0.99)),
        fmt(pct(&mut last, 1.0)),
        last.len()
    );
    println!(
        "FIGURE cutoff_back_ms p50={} p99={} max={} n={}",
        fmt(pct(&mut back, 0.5)),
        fmt(pct(&mut back, 0.99)),
        fmt(pct(&mut back, 1.0)),
        back.len()
    );
    println!("FIGURE cutoff_failed_connects failed={failed} total={total}");
    Ok(())
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
        .block_on(demo::bring_up(&opts, &GrpcConnect, &mut quiet))
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
    if args.cuts > 0 {
        println!(
            "remote cluster cut off: affinity none, {} cuts of 3 s, client every {} ms",
            args.cuts, args.interval_ms
        );
        cutoff(&mut mesh, &args)?;
    }
    mesh.teardown()?;
    Ok(())
}
