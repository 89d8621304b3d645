//! node-sync with the real eBPF datapath (global-lb-bpf attached to a fresh cgroup v2 directory)
//! and two real etcd "clusters": a client process in the cgroup connects to the service VIP and
//! lands on the local backend; when that backend dies it lands in the other cluster; when it comes
//! back, traffic returns. Needs root (attaching cgroup programs, pinning on bpffs).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use global_lb_bpf::{Datapath, mounts};
use mesh_model::values::Affinity;
use node_sync::datapath::{self, ClusterIds};
use support::*;

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "this test attaches eBPF programs to a cgroup and needs root"
    );
}

struct Cleanup {
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = Datapath::remove(&self.pins) {
            eprintln!("cleanup {}: {e}", self.pins.display());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A backend that answers every connection with its name.
fn serve(listener: tokio::net::TcpListener, name: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
            });
        }
    })
}

/// Connect to the VIP from a process inside the cgroup; the backend's name, or "" on failure.
fn connect_in(cgroup: &Path, vip: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec 3<>"/dev/tcp/$1/80" && timeout 2 cat <&3"#)
        .arg(cgroup)
        .arg(vip)
        .output()
        .expect("spawning bash");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The node's datapath (default capacity) pinned under `pins`, attached to `cgroup`, for c1.
fn open_datapath(
    pins: &Path,
    cgroup: &Path,
    opts: &node_sync::agent::AgentOptions,
) -> (
    Box<dyn node_sync::lb::MapWriter>,
    Option<global_lb_bpf::signals::SuspectEvents>,
) {
    datapath::open(
        pins,
        cgroup,
        global_lb_bpf::DEFAULT_MAX_BACKENDS,
        c("c1"),
        opts.cluster_ids.clone(),
    )
    .unwrap_or_else(|e| panic!("opening the datapath: {e}"))
}

async fn wait_lands(cgroup: &Path, vip: &str, want: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let cg = cgroup.to_owned();
        let v = vip.to_owned();
        let got = tokio::task::spawn_blocking(move || connect_in(&cg, &v))
            .await
            .unwrap();
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "new connects did not land on {want:?} within {limit:?} (last: {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two etcd "clusters" publishing one global service on a VIP of this test's own (`10.<net>.x.y`:
/// other tests on this host may program the usual ones): c1's backend on 127.0.0.1, c2's on
/// 127.0.0.2, c2 named in a remote-config dir; plus a fresh cgroup and bpffs pin directory for the
/// datapath, removed on drop.
struct TwoClusters {
    cgroup: PathBuf,
    pins: PathBuf,
    vip: String,
    p1: u16,
    b1: tokio::task::JoinHandle<()>,
    _b2: tokio::task::JoinHandle<()>,
    e1: Etcd,
    _e2: Etcd,
    /// c2's writer, whose heartbeats keep c2 live for the whole test (dropped, they stop and
    /// c2 leaves selection after the 1 s heartbeat timeout and 2 s grace: a test slowed by a
    /// loaded machine then found no c2 to fail over to).
    _w2: ApiWriter,
    remotes: tempfile::TempDir,
    _cleanup: Cleanup,
}

async fn two_clusters(name: &str, net: u8, affinity: Affinity) -> TwoClusters {
    require_root();
    let name = format!("{name}-{}", std::process::id());
    let root = mounts::ensure_cgroup2().expect("a cgroup v2 hierarchy");
    let cgroup = root.join(&name);
    std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
    mounts::ensure_bpffs(Path::new(mounts::DEFAULT_BPFFS)).expect("bpffs");
    let pins = Path::new(mounts::DEFAULT_BPFFS).join(&name);
    let cleanup = Cleanup {
        cgroup: cgroup.clone(),
        pins: pins.clone(),
    };
    let l1 = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let p1 = l1.local_addr().unwrap().port();
    let l2 = tokio::net::TcpListener::bind(("127.0.0.2", 0))
        .await
        .unwrap();
    let p2 = l2.local_addr().unwrap().port();
    let vip = format!(
        "10.{net}.{}.{}",
        std::process::id() % 250,
        1 + std::process::id() % 200
    );
    let with_vip = |mut s: mesh_model::values::ServiceSpec| {
        s.frontends = vec![vip.parse().unwrap()];
        s
    };
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(
        vec![with_vip(spec("c1", affinity))],
        vec![chunk("c1", 0, vec![endpoint("127.0.0.1", p1, "n1")])],
    )
    .await;
    w2.publish_all(
        vec![with_vip(spec("c2", affinity))],
        vec![chunk("c2", 0, vec![endpoint("127.0.0.2", p2, "m1")])],
    )
    .await;
    let remotes = tempfile::tempdir().unwrap();
    remote_file(remotes.path(), "c2", &e2);
    TwoClusters {
        cgroup,
        pins,
        vip,
        p1,
        b1: serve(l1, "c1"),
        _b2: serve(l2, "c2"),
        e1,
        _e2: e2,
        _w2: w2,
        remotes,
        _cleanup: cleanup,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_fail_over_to_the_remote_cluster_and_back_through_the_real_datapath() {
    let mut tc = two_clusters("node-sync-test", 253, Affinity::Local).await;
    let (cgroup, pins, vip, p1) = (tc.cgroup.clone(), tc.pins.clone(), tc.vip.clone(), tc.p1);
    let mut opts = options(&tc.e1, "c1", 1, Some(tc.remotes.path()));
    opts.cluster_ids = ClusterIds::default();
    let (writer, _events) = open_datapath(&pins, &cgroup, &opts);
    let agent = agent_with(opts, writer);

    wait_lands(&cgroup, &vip, "c1", Duration::from_secs(20)).await;

    // SIGKILL-like: the local backend disappears.
    tc.b1.abort();
    let _ = (&mut tc.b1).await;
    let took = wait_lands(&cgroup, &vip, "c2", Duration::from_secs(5)).await;
    println!("failover through the datapath took {took:?}");

    // It comes back on the same port.
    let l1 = tokio::net::TcpListener::bind(("127.0.0.1", p1))
        .await
        .unwrap();
    let _b1 = serve(l1, "c1");
    let took = wait_lands(&cgroup, &vip, "c1", Duration::from_secs(5)).await;
    println!("failback through the datapath took {took:?}");
    assert!(agent.snapshot().ready());
    // The datapath's per-backend counters (of the backends in the maps now) reach the status.
    let t0 = Instant::now();
    loop {
        let local = agent
            .snapshot()
            .connections
            .get(&("127.0.0.1".parse().unwrap(), p1))
            .copied()
            .unwrap_or(0);
        if local > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "connection counter of the local backend not seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);
}

/// A hard kill under the default affinity (local), with passive failure detection: the first
/// connect to the killed backend is refused, the kernel marks it, node-sync reads the mark,
/// confirms it with a probe and fails the service over: the client's next connect lands in the
/// other cluster. One failed connect, where the health checker alone (2 probes 200 ms apart)
/// costs every connect made in the meantime. The golden signals count what the client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_kill_costs_one_failed_connect_with_passive_detection() {
    let mut tc = two_clusters("node-sync-passive", 252, Affinity::Local).await;
    let (cgroup, pins, vip) = (tc.cgroup.clone(), tc.pins.clone(), tc.vip.clone());
    let mut opts = options(&tc.e1, "c1", 1, Some(tc.remotes.path()));
    opts.cluster_ids = ClusterIds::default();
    // A slow health checker: what moves traffic here is the kernel's mark, not a probe round.
    opts.health_interval = Duration::from_secs(2);
    let (writer, events) = open_datapath(&pins, &cgroup, &opts);
    assert!(
        events.is_some(),
        "the real datapath has the suspect ring buffer"
    );
    let agent = node_sync::agent::start_with_events(opts, writer, events);
    let before_kill = wait_lands(&cgroup, &vip, "c1", Duration::from_secs(20)).await;
    let mut landed = std::collections::BTreeMap::<String, u64>::new();
    *landed.entry("c1".into()).or_default() += 1;
    let _ = before_kill;

    tc.b1.abort();
    let _ = (&mut tc.b1).await;
    let killed = Instant::now();
    let mut failed = 0u64;
    let took = loop {
        let (cg, v) = (cgroup.clone(), vip.clone());
        let got = tokio::task::spawn_blocking(move || connect_in(&cg, &v))
            .await
            .unwrap();
        if got.is_empty() {
            failed += 1;
        } else {
            *landed.entry(got.clone()).or_default() += 1;
        }
        if got == "c2" {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "connects did not move to c2 ({failed} failed)"
        );
    };
    println!("hard kill: {failed} failed connect(s), first connect to c2 after {took:?}");
    assert_eq!(failed, 1, "one failed connect, then the other cluster");
    assert!(
        took < Duration::from_secs(1),
        "moved in {took:?}, before the 2 s health checker could"
    );
    // The maps are written before the batch's snapshot is published, so the client can land in c2
    // a moment before the status shows why: wait for the snapshot that carries the record.
    let (log, marks, confirmed, delay) = {
        let mut sub = agent.subscribe();
        let st = tokio::time::timeout(
            Duration::from_secs(5),
            sub.wait_for(|st| !st.failover_log.is_empty()),
        )
        .await
        .expect("no failover record in node-sync's snapshot within 5 s of the client's failover")
        .expect("the agent is running")
        .clone();
        (
            st.failover_log.last().cloned(),
            st.passive.marks,
            st.passive.confirmed,
            st.passive.max_delay,
        )
    };
    let log = log.expect("a failover record");
    assert_eq!(log.cause.as_deref(), Some("passive"), "{log:?}");
    assert_eq!(
        (log.from.clone(), log.to.clone()),
        (vec!["c1".to_owned()], vec!["c2".to_owned()])
    );
    assert!(log.duration_ms.is_some_and(|ms| ms < 1000), "{log:?}");
    assert!(
        marks >= 1 && confirmed >= 1,
        "marks {marks}, confirmed {confirmed}"
    );
    println!("mark read by node-sync {delay:?} after the kernel made it; failover record {log:?}");
    assert!(delay < Duration::from_millis(100), "mark delay {delay:?}");

    // The golden signals equal the client's counts, as a scrape sees them: a scrape asks the
    // agent for fresh connect counters, which it reads on its own loop (at most once a second).
    let source = agent.status_source();
    let mut snapshots = agent.subscribe();
    let scrape = || node_sync::status::render_metrics(&source.latest_with_fresh_counters());
    let count = |metrics: &str, cluster: &str, outcome: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("nodesync_backend_connects_total{")
                    && l.contains(&format!("cluster=\"{cluster}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut metrics = scrape();
    while count(&metrics, "c2", "established") < landed["c2"] {
        tokio::time::timeout_at(deadline, snapshots.changed())
            .await
            .unwrap_or_else(|_| panic!("golden signals not read within 5 s\n{metrics}"))
            .unwrap();
        metrics = scrape();
    }
    let value = |cluster: &str, outcome: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("nodesync_backend_connects_total{")
                    && l.contains(&format!("cluster=\"{cluster}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let c1_ok: u64 = landed.get("c1").copied().unwrap_or(0);
    assert!(
        value("c1", "established") >= c1_ok,
        "c1 established {} < the client's {c1_ok}\n{metrics}",
        value("c1", "established")
    );
    assert_eq!(value("c1", "refused"), failed, "{metrics}");
    assert_eq!(value("c2", "established"), landed["c2"], "{metrics}");
    assert_eq!(
        value("c2", "refused") + value("c2", "timeout"),
        0,
        "{metrics}"
    );
    drop(agent);
}

/// A backend that answers each connection with `c1` and keeps it open (the test writes to the
/// connections it holds); `listener` closing stops new connects only, like a host whose process
/// died without its connections learning of it.
struct Holding {
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::net::TcpStream>>>,
    listener: tokio::task::JoinHandle<()>,
}

fn hold(listener: tokio::net::TcpListener) -> Holding {
    let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::net::TcpStream>>> = Default::default();
    let c = conns.clone();
    let listener = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.write_all(b"c1\n").await;
            c.lock().unwrap().push(s);
        }
    });
    Holding { conns, listener }
}

/// A client process in the cgroup holding one connection to the VIP and printing what it reads;
/// its first line names the backend.
struct HeldClient {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl HeldClient {
    fn start(cgroup: &Path, vip: &str) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec 3<>"/dev/tcp/$1/80" && exec cat <&3"#)
            .arg(cgroup)
            .arg(vip)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning bash");
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    fn line(&mut self) -> String {
        self.lines.next().and_then(Result::ok).unwrap_or_default()
    }

    /// Waits for the process to end, at most `limit`: its stderr, or None while it runs.
    fn ended(&mut self, limit: Duration) -> Option<String> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.child.try_wait().ok().flatten().is_some() {
                let mut err = String::new();
                use std::io::Read as _;
                let _ = self.child.stderr.take()?.read_to_string(&mut err);
                return Some(err);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Established connections through the VIP: a graceful drain (the endpoint terminating) leaves
/// them working; a failure (the backend stops answering probes: a failing verdict) aborts them at
/// once, so the application learns of it within a second instead of a TCP timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backend_s_connections_are_aborted_and_a_drained_one_s_are_not() {
    let tc = two_clusters("node-sync-destroy", 251, Affinity::Local).await;
    let (cgroup, pins, vip, p1) = (tc.cgroup.clone(), tc.pins.clone(), tc.vip.clone(), tc.p1);
    tc.b1.abort();
    let _ = (&mut { tc.b1 }).await;
    let backend = hold(
        tokio::net::TcpListener::bind(("127.0.0.1", p1))
            .await
            .unwrap(),
    );
    let mut opts = options(&tc.e1, "c1", 1, Some(tc.remotes.path()));
    opts.cluster_ids = ClusterIds::default();
    let (writer, events) = open_datapath(&pins, &cgroup, &opts);
    let agent = node_sync::agent::start_with_events(opts, writer, events);
    wait_lands(&cgroup, &vip, "c1", Duration::from_secs(20)).await;

    let mut drained = HeldClient::start(&cgroup, &vip);
    assert_eq!(drained.line(), "c1");
    // Graceful: c1's endpoint terminating. New connects go to c2; the held one keeps working.
    let mut w1 = ApiWriter::new(&tc.e1, "c1", 1).await;
    let mut ep = endpoint("127.0.0.1", p1, "n1");
    ep.conditions.ready = false;
    ep.conditions.terminating = true;
    w1.chunk(chunk("c1", 0, vec![ep])).await;
    wait_lands(&cgroup, &vip, "c2", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        drained.ended(Duration::ZERO),
        None,
        "a drain must not abort connections"
    );
    {
        use tokio::io::AsyncWriteExt;
        let mut held = std::mem::take(&mut *backend.conns.lock().unwrap());
        // (The probes of wait_lands are among them, closed since.)
        for s in &mut held {
            let _ = s.write_all(b"still\n").await;
        }
        backend.conns.lock().unwrap().extend(held);
    }
    assert_eq!(
        drained.line(),
        "still",
        "the drained backend's connection still carries data"
    );

    // Ready again, then a failure: the backend stops accepting (its probes are refused) while the
    // connections it holds stay open, as on a host that died without a FIN.
    w1.chunk(chunk("c1", 0, vec![endpoint("127.0.0.1", p1, "n1")]))
        .await;
    wait_lands(&cgroup, &vip, "c1", Duration::from_secs(5)).await;
    let mut failed = HeldClient::start(&cgroup, &vip);
    assert_eq!(failed.line(), "c1");
    backend.listener.abort();
    let killed = Instant::now();
    let err = tokio::task::spawn_blocking(move || {
        let e = failed.ended(Duration::from_secs(3));
        (e, failed)
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    let stderr = err.0.unwrap_or_else(|| {
        panic!("the client's connection to the failed backend was not aborted within 3 s")
    });
    println!(
        "connection to the failed backend aborted {took:?} after it stopped answering: {stderr:?}"
    );
    assert!(
        stderr.contains("connection abort"),
        "the application sees the abort: {stderr:?}"
    );
    assert!(took < Duration::from_secs(1), "aborted after {took:?}");
    // (Counted once the whole run is done: the UDP and IPv6 dumps come after the client's abort.)
    let destroyed = || {
        agent
            .snapshot()
            .destroyed
            .tcp
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_for(
        "both held connections to c1 counted as aborted",
        Duration::from_secs(2),
        || destroyed() >= 2,
    )
    .await;
    drop(agent);
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node_sync(e1: &Etcd, remote_dir: &Path, pins: &Path, cgroup: &Path, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .args([
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
        ])
        .args(["--etcd-endpoints", &e1.url()])
        .arg("--remote-config-dir")
        .arg(remote_dir)
        .arg("--bpffs")
        .arg(pins)
        .arg("--cgroup")
        .arg(cgroup)
        .args(["--status-listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn node-sync");
    Proc(child)
}

async fn wait_ready(port: u16) {
    let t0 = Instant::now();
    loop {
        let ok = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.ok()?;
            let mut b = Vec::new();
            s.read_to_end(&mut b).await.ok()?;
            Some(String::from_utf8_lossy(&b).starts_with("HTTP/1.0 200"))
        }
        .await;
        if ok == Some(true) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node-sync not ready in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_of_node_sync_under_steady_connects_fails_none() {
    let tc = two_clusters("node-sync-restart", 254, Affinity::None).await;
    let (cgroup, pins, vip, e1, dir) = (&tc.cgroup, &tc.pins, &tc.vip, &tc.e1, &tc.remotes);
    let port = free_port();
    let first = spawn_node_sync(e1, dir.path(), pins, cgroup, port);
    wait_ready(port).await;
    wait_lands(cgroup, vip, "c1", Duration::from_secs(10)).await;
    wait_lands(cgroup, vip, "c2", Duration::from_secs(10)).await;

    // A steady stream of new connections from the cgroup; each phase lasts until it has made
    // ten more connects (not a fixed time).
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let made = std::sync::Arc::new(AtomicU32::new(0));
    let stream = {
        let (cg, v, stop, made) = (cgroup.clone(), vip.clone(), stop.clone(), made.clone());
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let got = connect_in(&cg, &v);
                if got != "c1" && got != "c2" {
                    failed.push(got);
                }
                made.fetch_add(1, Ordering::Relaxed);
            }
            failed
        })
    };
    let ten_more = |what: &'static str| {
        let made = made.clone();
        async move {
            let from = made.load(Ordering::Relaxed);
            let t0 = Instant::now();
            while made.load(Ordering::Relaxed) < from + 10 {
                assert!(t0.elapsed() < Duration::from_secs(20), "no connects {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    ten_more("before the kill").await;
    drop(first); // SIGKILL
    ten_more("while node-sync is down").await;
    let _second = spawn_node_sync(e1, dir.path(), pins, cgroup, port);
    wait_ready(port).await;
    ten_more("after the restart").await;
    stop.store(true, Ordering::Relaxed);
    let failed = stream.join().unwrap();
    let ok = made.load(Ordering::Relaxed) - failed.len() as u32;
    println!("{ok} connects across the restart, {} failed", failed.len());
    assert!(ok >= 30, "too few connects measured: {ok}");
    assert!(failed.is_empty(), "failed connects: {failed:?}");
}
