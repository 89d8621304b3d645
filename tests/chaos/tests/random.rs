//! Randomized fault runs: `CHAOS_RUNS` runs (default 1) of `CHAOS_STEPS` episodes (default 5), each
//! run on a fresh mesh, seeds from `CHAOS_SEED` (default: the clock) upward. The seed is printed;
//! replay a failure with `CHAOS_SEED=<seed> CHAOS_RUNS=1`, or by hand with the `chaos` binary.

use anyhow::Result;
use chaos_tests::{ChaosMesh, UpOptions, random, settle_budget};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_fault_sequences_settle_to_the_model() -> Result<()> {
    let runs = env("CHAOS_RUNS").unwrap_or(1);
    let steps = env("CHAOS_STEPS").unwrap_or(5) as usize;
    let first = env("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let budget = settle_budget();
    for i in 0..runs {
        let seed = first + i;
        println!("chaos random run {}/{runs}: seed {seed}", i + 1);
        let mut m = ChaosMesh::up(UpOptions::new("cx-random", 2, 2).vxlan())?;
        random::run(&mut m, seed, steps, budget)?;
    }
    Ok(())
}
