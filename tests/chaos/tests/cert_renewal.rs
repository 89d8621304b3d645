//! Automatic renewal of short-lived leaves while traffic flows (issue 17): every cluster's leaves
//! (etcd server, apiserver, etcd root user, admin, node, remote) live two minutes, and
//! `clustermesh ca renew` runs every 10 s per cluster, as the chart's CronJob would (a third of
//! the lifetime before the end: 40 s ahead). Nothing is restarted for it: etcd reads its server
//! certificate on each handshake, the apiserver reconnects to etcd when its files change, its
//! gRPC server presents the renewed certificate, node-syncs keep their connections.
//!
//! Once every original leaf has expired, new handshakes are forced with the renewed files: one
//! node-sync per cluster is restarted (its etcd connections, local and remote, are new), a TLS
//! probe reaches each etcd with the node's credentials, and a gRPC connection reaches each
//! apiserver. Asserted: no connect fails all along; etcd was never restarted; every leaf is
//! valid beyond its original end; the expiry metric of node-sync and of the apiserver moved
//! forward; a change still reaches every node's maps.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use chaos_tests::{ChaosMesh, Traffic, UpOptions, assert_no_failures, settle_budget};
use mesh_certs::{CertInfo, ClusterDir, Role};
use mesh_lab::mesh::http_get;

const LIFETIME: Duration = Duration::from_secs(120);
const EVERY: Duration = Duration::from_secs(10);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// End of validity (unix seconds) of every leaf of a cluster directory.
fn leaf_ends(dir: &ClusterDir) -> Result<Vec<(Role, i64)>> {
    Role::LEAVES
        .iter()
        .map(|&r| {
            let info = CertInfo::from_pem_file(&dir.cert(r))?.remove(0);
            Ok((r, info.not_after.unix_timestamp()))
        })
        .collect()
}

/// `clustermesh_certificate_expiry_timestamp_seconds{component=..,certificate=..}` at `addr`.
fn expiry_metric(addr: std::net::SocketAddr, component: &str, cert: &str) -> Result<i64> {
    let (code, body) = http_get(addr, "/metrics")?;
    ensure!(code == 200, "GET {addr}/metrics: {code}");
    let want = format!(
        "clustermesh_certificate_expiry_timestamp_seconds{{component=\"{component}\",certificate=\"{cert}\"}} "
    );
    let line = body
        .lines()
        .find(|l| l.starts_with(&want))
        .with_context(|| format!("{addr}/metrics has no {want}"))?;
    line[want.len()..]
        .trim()
        .parse::<f64>()
        .map(|v| v as i64)
        .with_context(|| format!("bad value in {line}"))
}

fn renew(m: &ChaosMesh, c: usize) -> Result<usize> {
    let bin = m.mesh().spec().bin_dir.join("clustermesh");
    let dir = m.mesh().cert_dir(c)?;
    let out = Command::new(&bin)
        .args(["ca", "renew", "--cluster-dir"])
        .arg(&dir)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "clustermesh ca renew --cluster-dir {} failed ({}):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout.lines().filter(|l| l.starts_with("renewed ")).count())
}

#[test]
fn two_minute_leaves_are_renewed_while_traffic_flows() -> Result<()> {
    let mut opts = UpOptions::new("cx-renew", 2, 2);
    opts.leaf_lifetime = Some(LIFETIME);
    let mut m = ChaosMesh::up(opts)?;
    let clusters = [1usize, 2];
    let dirs: Vec<ClusterDir> = clusters
        .iter()
        .map(|&c| {
            m.mesh()
                .lab()
                .cluster_certs(c)?
                .context("the lab runs plain etcd; the chaos tests need TLS")
        })
        .collect::<Result<_>>()?;
    let original: Vec<Vec<(Role, i64)>> = dirs.iter().map(leaf_ends).collect::<Result<_>>()?;
    let last_end = original
        .iter()
        .flatten()
        .map(|(_, e)| *e)
        .max()
        .unwrap_or(0);
    ensure!(
        last_end - unix_now() <= LIFETIME.as_secs() as i64,
        "the lab's leaves should live {LIFETIME:?}: {original:?}"
    );
    let etcd_pids: Vec<Option<u32>> = clusters
        .iter()
        .map(|&c| m.mesh().lab().etcd_pid(c))
        .collect::<Result<_, _>>()?;
    let ns_metric = |m: &ChaosMesh, c: usize| {
        expiry_metric(m.mesh().node_sync_status(c, 2), "node-sync", "node")
    };
    let api_metric = |m: &ChaosMesh, c: usize| {
        expiry_metric(
            m.mesh().apiserver_status(c),
            "clustermesh-apiserver",
            "admin",
        )
    };
    let metrics_before: Vec<(i64, i64)> = clusters
        .iter()
        .map(|&c| Ok((ns_metric(&m, c)?, api_metric(&m, c)?)))
        .collect::<Result<_>>()?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    // The CronJob, until every original leaf has been expired for a few seconds.
    let started = Instant::now();
    let mut renewed = [0usize; 2];
    let mut runs = 0;
    while unix_now() < last_end + 5 {
        let tick = Instant::now();
        for (i, &c) in clusters.iter().enumerate() {
            renewed[i] += renew(&m, c)?;
        }
        runs += 1;
        std::thread::sleep(EVERY.saturating_sub(tick.elapsed()));
    }
    eprintln!(
        "[chaos] {runs} renewal runs in {:?}: {renewed:?} leaves renewed; every original leaf has expired",
        started.elapsed()
    );
    for (i, dir) in dirs.iter().enumerate() {
        let now = leaf_ends(dir)?;
        for ((role, was), (_, is)) in original[i].iter().zip(&now) {
            ensure!(
                is > was && *is > unix_now() + 30,
                "cluster {}: {role} valid until {is}, was {was}: not renewed",
                i + 1
            );
        }
        ensure!(renewed[i] >= Role::LEAVES.len(), "{renewed:?}");
    }

    // New handshakes, now that only the renewed certificates are valid.
    for &c in &clusters {
        m.start_node_sync(c, 1)?;
    }
    for (i, &c) in clusters.iter().enumerate() {
        let back = m
            .wait_control_plane(c, Duration::from_secs(20))
            .with_context(|| {
                format!(
                    "node-sync of cluster {c} restarted after the original leaves expired:\n{}",
                    m.mesh().log_tail(
                        &format!("node-sync-{}-{}", m.mesh().cluster_name(c), "n1"),
                        15
                    )
                )
            })?;
        eprintln!("[chaos] cluster {c}: restarted node-sync connected in {back:?}");
        let endpoint = m.mesh().lab().clusters()[c - 1].etcd.client_url.clone();
        m.block_on(mesh_etcd::probe(&endpoint, &dirs[i].tls_files(Role::Node)))
            .with_context(|| format!("TLS probe of cluster {c}'s etcd with renewed files"))?;
        let side = clustermesh_cli::connect::Side {
            addr: m.mesh().apiserver_grpc(c),
            tls_dir: m.mesh().cert_dir(c)?,
        };
        m.block_on(clustermesh_cli::connect::open(&side))
            .with_context(|| format!("gRPC to cluster {c}'s apiserver after expiry"))?;
    }
    let c = m.converge(settle_budget())?;
    eprintln!("[chaos] maps right {:?} after the restarts", c.took);

    for (i, &c) in clusters.iter().enumerate() {
        ensure!(
            m.mesh().lab().etcd_pid(c)? == etcd_pids[i],
            "cluster {c}'s etcd was restarted"
        );
        let (ns_before, api_before) = metrics_before[i];
        let (ns, api) = (ns_metric(&m, c)?, api_metric(&m, c)?);
        ensure!(
            ns > ns_before && api > api_before,
            "cluster {c}: expiry metric node-sync {ns_before} -> {ns}, apiserver {api_before} -> {api}"
        );
        eprintln!(
            "[chaos] cluster {c}: expiry metric node-sync {ns_before} -> {ns}, apiserver {api_before} -> {api}"
        );
    }
    let log = std::fs::read_to_string(m.mesh().log_path("apiserver-c1")).unwrap_or_default();
    ensure!(
        log.contains("TLS files changed"),
        "the apiserver of c1 never noticed its renewed files"
    );

    m.drain_and_restore(1, settle_budget(), "after renewal")?;
    assert_no_failures(&t.stop(), "certificate renewal")?;
    Ok(())
}
