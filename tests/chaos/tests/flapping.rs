//! A flapping backend: cluster 1's services are health-checked over HTTP on a health port
//! (`clustermesh.io/health-check: http:/healthz`, `clustermesh.io/health-check-port`). Backend
//! c1-n1's health endpoint fails (it leaves every node's maps), then fails every other probe for
//! 10 s: it must not take new connections back while it flaps (the failback hold-down: two good
//! probes in a row). Steady again, it is back within a second. Its TCP service answers throughout,
//! so no connect fails.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use chaos_tests::{ChaosMesh, Traffic, UpOptions, assert_no_failures};

const HEALTH_PORT: u16 = 8081;

/// Whether backend (1, 1) is in the maps of every node of cluster 1.
fn flapper_in_maps(m: &ChaosMesh) -> Result<(bool, bool)> {
    let flapper = m.bk(1, 1);
    let a = m.observed(1, 1)?.contains(&flapper);
    let b = m.observed(1, 2)?.contains(&flapper);
    Ok((a, b))
}

fn wait_flapper(m: &ChaosMesh, present: bool, within: Duration, what: &str) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if flapper_in_maps(m)? == (present, present) {
            eprintln!("[chaos] {what} in {:?}", t0.elapsed());
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("{what}: not within {within:?}: {:?}", flapper_in_maps(m)?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flapping_backend_takes_no_traffic_back_until_it_is_steady() -> Result<()> {
    let mut opts = UpOptions::new("cx-flap", 2, 2);
    opts.health_port = Some(HEALTH_PORT);
    opts.cluster_service_annotations.insert(
        1,
        vec![
            ("clustermesh.io/health-check".into(), "http:/healthz".into()),
            (
                "clustermesh.io/health-check-port".into(),
                HEALTH_PORT.to_string(),
            ),
        ],
    );
    let m = ChaosMesh::up(opts)?;
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.mesh().set_health_mode(1, 1, "fail")?;
    wait_flapper(
        &m,
        false,
        Duration::from_secs(2),
        "failing health: c1-n1 out",
    )?;
    m.mesh().set_health_mode(1, 1, "flap")?;
    let flap = t.mark();
    let until = Instant::now() + Duration::from_secs(10);
    let mut checks = 0;
    while Instant::now() < until {
        let (a, b) = flapper_in_maps(&m)?;
        ensure!(
            !a && !b,
            "c1-n1 took traffic back while it flapped (maps of c1-n1: {a}, c1-n2: {b})"
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let during = t.report_since(&flap);
    ensure!(
        !during[0].landed.contains_key("c1-n1"),
        "the client in cluster 1 landed on the flapping backend: {}",
        during[0]
    );
    eprintln!("[chaos] flapping for 10 s: out of the maps at all {checks} checks");
    m.mesh().set_health_mode(1, 1, "ok")?;
    wait_flapper(&m, true, Duration::from_secs(1), "steady: c1-n1 back")?;
    std::thread::sleep(Duration::from_millis(300));
    let r = t.stop();
    assert_no_failures(&r, "a flapping health check")?;
    Ok(())
}
