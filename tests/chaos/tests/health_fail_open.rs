//! Probes that cannot succeed for every backend of a service (here: an HTTP health check against
//! backends that do not speak HTTP, as a wrong probe port or a NetworkPolicy blocking node-to-pod
//! probes would): the mesh fails open, loudly. Connects keep succeeding on the ready backends of the
//! preferred cluster, every node-sync shows the service as failing open, and the maps equal the
//! model (which knows nothing of health: with every backend failing, the ready ones are used).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chaos_tests::{ChaosMesh, Traffic, UpOptions, assert_no_failures, settle_budget};

#[test]
fn probes_failing_for_every_backend_fail_open_and_say_so() -> Result<()> {
    let mut opts = UpOptions::new("cx-failopen", 2, 2);
    opts.service_annotations = vec![("clustermesh.io/health-check".into(), "http:/healthz".into())];
    let m = ChaosMesh::up(opts)?;
    // Every node-sync judges every backend failing, and says it fails open.
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in 1..=2 {
        for n in 1..=2 {
            loop {
                let doc = m.mesh().node_sync_status_json(c, n)?;
                let why = doc["services"][0]["frontends"][0]["why"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if why.starts_with("failing open") {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "node-sync c{c}-n{n} does not show the service failing open: {why:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    m.converge(settle_budget())?;
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(2));
    let r = t.stop();
    assert_no_failures(&r, "every probe failing (fail open)")?;
    for (i, rep) in r.iter().enumerate() {
        let own = format!("c{}-", i + 1);
        ensure!(
            rep.landed.keys().all(|b| b.starts_with(&own)),
            "failing open keeps the preferred (local) cluster: {rep}"
        );
    }
    Ok(())
}
