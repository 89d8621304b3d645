//! `chaos`: randomized fault runs on a mesh lab, by hand (`--runs 200`) or in CI (a few).
//!
//! Each run brings up a fresh mesh, picks `--steps` fault episodes from its seed, and after every
//! episode compares every node's BPF maps with the model. The seed of every run is printed; a
//! failing run is replayed with `--seed N --runs 1`.
//!
//! Needs root, etcd and the binaries `clustermesh-apiserver`, `node-sync`, `clustermesh` next to
//! this one (`cargo build --bins -p clustermesh-apiserver -p node-sync -p clustermesh-cli -p chaos-tests`).

use std::time::{Duration, Instant};

use anyhow::Result;
use chaos_tests::{ChaosMesh, UpOptions, random, settle_budget};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "chaos", about = "randomized fault runs on the mesh lab")]
struct Args {
    /// Runs (each on a fresh mesh).
    #[arg(long, env = "CHAOS_RUNS", default_value_t = 1)]
    runs: u64,
    /// Seed of the first run (the next runs use seed+1, seed+2, ...); default: from the clock.
    #[arg(long, env = "CHAOS_SEED")]
    seed: Option<u64>,
    /// Fault episodes per run.
    #[arg(long, env = "CHAOS_STEPS", default_value_t = 8)]
    steps: usize,
    /// Clusters.
    #[arg(long, default_value_t = 2)]
    clusters: usize,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// How long after a fault ends the maps may take to match the model (ms).
    #[arg(long, env = "CHAOS_SETTLE_MS")]
    settle_ms: Option<u64>,
    /// Lab prefix.
    #[arg(long, default_value = "chaos-rand")]
    prefix: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let budget = args
        .settle_ms
        .map_or_else(settle_budget, Duration::from_millis);
    let first = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let started = Instant::now();
    let mut settles = Vec::new();
    for i in 0..args.runs {
        let seed = first + i;
        println!("run {}/{}: seed {seed}", i + 1, args.runs);
        let mut m = ChaosMesh::up(UpOptions::new(&args.prefix, args.clusters, args.nodes))?;
        let eps = random::run(&mut m, seed, args.steps, budget).inspect_err(|e| {
            println!("FAILED: seed {seed}: {e:#}");
        })?;
        settles.extend(eps.iter().map(|e| e.settle));
        drop(m);
    }
    settles.sort();
    let pct = |p: f64| {
        settles
            .get(((settles.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0, |d| d.as_millis())
    };
    println!(
        "{} runs, {} episodes, all settled; settle p50 {} ms, p99 {} ms, max {} ms; {:.0} s",
        args.runs,
        settles.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
