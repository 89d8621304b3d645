//! Leader loss with two clustermesh-apiserver replicas: a second replica of cluster 1's apiserver
//! (same etcd, same manifests, its own ports and data dir) stands by; the leader is SIGKILLed; the
//! standby must take the lead once the dead leader's lease lapses (--leader-lease-ttl, 3 s by
//! default) and publish what changed meanwhile. The datapath depends on neither: no connect may
//! fail, and once the standby leads, a drain written while nobody led reaches every node's maps
//! within the settle budget.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};
use mesh_lab::LabProcess;
use mesh_lab::mesh::http_get;

const STANDBY_GRPC: u16 = 9453;
const STANDBY_STATUS: u16 = 9890;

fn spawn_standby(m: &ChaosMesh, c: usize) -> Result<LabProcess> {
    let mesh = m.mesh();
    let cl = mesh.lab().clusters()[c - 1].clone();
    let cp = cl.control_plane.addr;
    let state = mesh.lab().state_dir();
    let mut cmd = mesh
        .lab()
        .control_plane_command(c, mesh.spec().bin_dir.join("clustermesh-apiserver"))?;
    cmd.args([
        format!("--cluster-name={}", cl.name),
        format!("--cluster-id={}", mesh.cluster_id(c)),
        format!("--etcd-endpoints={}", cl.etcd.client_url),
        format!("--tls-dir={}", mesh.cert_dir(c)?.display()),
        "--source=manifests".into(),
        format!(
            "--manifest-dir={}",
            state.join("manifests").join(&cl.name).display()
        ),
        format!("--grpc-listen={cp}:{STANDBY_GRPC}"),
        format!("--status-listen={cp}:{STANDBY_STATUS}"),
        format!(
            "--data-dir={}",
            state.join(format!("apiserver-{}-b", cl.name)).display()
        ),
        format!("--replica-id={}-apiserver-b", cl.name),
    ]);
    let log = mesh.log_path(&format!("apiserver-{}-b", cl.name));
    let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    cmd.stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .env("RUST_LOG", "info");
    Ok(mesh.lab().spawn(cmd)?)
}

fn metric(m: &ChaosMesh, c: usize, port: u16, line: &str) -> bool {
    let addr = std::net::SocketAddr::new(m.mesh().control_plane_addr(c).into(), port);
    matches!(http_get(addr, "/metrics"), Ok((200, body)) if body.lines().any(|l| l.trim() == line))
}

fn wait(what: &str, timeout: Duration, f: impl Fn() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !f() {
        if started.elapsed() >= timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(started.elapsed())
}

#[test]
fn standby_apiserver_takes_over_when_the_leader_dies() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-leader", 2, 2))?;
    let budget = settle_budget();
    let mut standby = spawn_standby(&m, 1)?;
    wait(
        "the second replica stands by",
        Duration::from_secs(20),
        || metric(&m, 1, STANDBY_STATUS, "clustermesh_apiserver_leader 0"),
    )?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    m.mesh_mut().kill_apiserver(1)?;
    let killed = Instant::now();
    // Written while nobody leads: the new leader must publish it.
    m.publish_cluster(1, Published::Terminating)?;
    wait(
        "the standby takes the lead",
        Duration::from_secs(15),
        || {
            metric(&m, 1, STANDBY_STATUS, "clustermesh_apiserver_leader 1")
                && metric(&m, 1, STANDBY_STATUS, "clustermesh_apiserver_ready 1")
        },
    )?;
    let lead_after = killed.elapsed();
    eprintln!("[chaos] leader SIGKILLed: the standby leads and has written {lead_after:?} later");
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] drain written while leaderless: in every node's maps {:?} after the new leader was ready",
        c.took
    );
    std::thread::sleep(Duration::from_millis(300));
    m.publish_cluster(1, Published::Ready)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] ready under the new leader: maps right in {:?}",
        c.took
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "apiserver leader loss")?;
    let _ = standby.stop();
    Ok(())
}
