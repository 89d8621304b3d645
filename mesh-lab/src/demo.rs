//! `clustermesh demo`: two clusters of two nodes on this host, every component real, connected, a global
//! service, and two failover drills from a client in cluster 1:
//!
//! * **graceful**: cluster 1's endpoints are marked terminating (as Kubernetes does before it stops a
//!   pod), node-syncs move new connections to cluster 2, then the backends stop; afterwards they start
//!   again, are marked ready, and traffic returns. No connect may fail on this path.
//! * **hard kill**: cluster 1's backends are SIGKILLed with no warning; the node-syncs' active health
//!   checks find out and fail over; then the backends are restarted and traffic returns.
//!
//! The backends are pods behind their nodes (see [`crate::plan`]); node-sync runs with `--routing native`,
//! whose routes are the only way from cluster 1 to cluster 2's pods.
//!
//! The failover time is from the fault to the first connection of the run that lands only on cluster 2;
//! failback likewise (see [`crate::drill::analyze`]).
//!
//! The clusters are connected by the operator's own `clustermesh connect --wait` (gRPC mode), which
//! this crate cannot depend on (the CLI depends on it): the caller passes it as a [`MeshConnect`]
//! (`clustermesh_cli::connect::GrpcConnect`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::drill::{DrillReport, analyze};
use crate::mesh::{EndpointState, LabMesh, LabMeshSpec, Routing, RunningProbe, preflight};

/// How the demo reaches and connects its clusters' apiservers: `clustermesh connect` in gRPC mode.
pub trait MeshConnect {
    /// One attempt to reach the apiserver's gRPC API at `addr` as its cluster's admin
    /// (certificates in `tls_dir`).
    fn open(&self, addr: SocketAddr, tls_dir: &Path) -> impl Future<Output = Result<()>>;

    /// Connect cluster `a` and cluster `b` both ways (each an apiserver address and its cluster's
    /// certificate directory), then wait up to `wait` until every node of each reports the other
    /// connected and synced; `progress` gets a line per step.
    fn connect(
        &self,
        a: (SocketAddr, &Path),
        b: (SocketAddr, &Path),
        wait: Duration,
        progress: &mut dyn FnMut(&str),
    ) -> impl Future<Output = Result<()>>;
}

/// Options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Lab prefix.
    pub prefix: String,
    /// Where the binaries are.
    pub bin_dir: std::path::PathBuf,
    /// Interval between two new connections of the drill client.
    pub interval: Duration,
    /// How long traffic runs before the fault and after each settle.
    pub settle: Duration,
    /// KVStoreMesh mode: each apiserver mirrors the other cluster into its own etcd and node-syncs
    /// read only their local etcd.
    pub kvstoremesh: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            prefix: "cmdemo".into(),
            bin_dir: crate::mesh::default_bin_dir(),
            interval: Duration::from_millis(10),
            settle: Duration::from_millis(1500),
            kvstoremesh: false,
        }
    }
}

/// The demo's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Graceful path: fault -> new connects land on cluster 2.
    pub failover_ms: Option<f64>,
    /// Graceful path: recovery -> new connects land on cluster 1 again.
    pub failback_ms: Option<f64>,
    /// Graceful path: failed connects (the target is zero).
    pub failed_connects: u64,
    /// Graceful path: every figure.
    pub graceful: DrillReport,
    /// Hard-kill path: every figure (failed connects here are the ones made before the health checks
    /// noticed).
    pub hard_kill: DrillReport,
    /// The status page of cluster 1's apiserver.
    pub status_url: String,
    /// Seconds the whole demo took.
    pub total_seconds: f64,
    /// Whether the mesh ran in KVStoreMesh mode.
    pub kvstoremesh: bool,
}

/// Which drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Mark terminating, then stop.
    Graceful,
    /// SIGKILL.
    HardKill,
}

/// Run one drill against a running lab mesh: a probe from cluster 1 node 1, a fault on cluster 1's
/// backends, recovery, analysis.
pub fn drill(
    mesh: &mut LabMesh,
    fault: Fault,
    opts: &DemoOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DrillReport> {
    let nodes = mesh.spec().nodes;
    let local_prefix = format!("{}-", mesh.cluster_name(1));
    let is_local = |b: &str| b.starts_with(&local_prefix);
    let probe: RunningProbe = mesh.spawn_probe(1, 1, mesh.service_addr(1), opts.interval)?;
    std::thread::sleep(opts.settle);
    let before = probe.samples();
    if before.is_empty() {
        bail!(
            "the drill client in {}/n1 produced no sample",
            mesh.cluster_name(1)
        );
    }
    let fault_ms = probe.now_ms();
    match fault {
        Fault::Graceful => {
            progress("  marking cluster 1's endpoints terminating");
            mesh.write_service(1, EndpointState::Terminating)?;
            let moved = probe.wait_for(fault_ms, Duration::from_secs(10), |s| {
                s.ok && s.backend.as_deref().is_some_and(|b| !is_local(b))
            });
            progress(if moved {
                "  new connections land in cluster 2"
            } else {
                "  traffic did not move within 10 s"
            });
            std::thread::sleep(Duration::from_millis(300));
            progress("  stopping cluster 1's backends (SIGTERM)");
            for n in 1..=nodes {
                mesh.stop_backend(1, n)?;
            }
        }
        Fault::HardKill => {
            progress("  SIGKILL cluster 1's backends");
            for n in 1..=nodes {
                mesh.kill_backend(1, n)?;
            }
            let moved = probe.wait_for(fault_ms, Duration::from_secs(10), |s| {
                s.ok && s.backend.as_deref().is_some_and(|b| !is_local(b))
            });
            progress(if moved {
                "  new connections land in cluster 2"
            } else {
                "  traffic did not move within 10 s"
            });
        }
    }
    std::thread::sleep(opts.settle);
    progress("  restarting cluster 1's backends");
    // Recovery starts when the backends are started: after a hard kill, the health checks let traffic
    // back as soon as they answer.
    let recover_ms = probe.now_ms();
    for n in 1..=nodes {
        mesh.start_backend(1, n)?;
    }
    if fault == Fault::Graceful {
        mesh.write_service(1, EndpointState::Ready)?;
    }
    let back = probe.wait_for(recover_ms, Duration::from_secs(10), |s| {
        s.ok && s.backend.as_deref().is_some_and(is_local)
    });
    progress(if back {
        "  connections are back in cluster 1"
    } else {
        "  traffic did not come back within 10 s"
    });
    std::thread::sleep(opts.settle);
    let samples = probe.stop();
    Ok(analyze(&samples, fault_ms, Some(recover_ms), is_local))
}

/// Bring the demo mesh up and connect it with `connect`.
pub async fn bring_up(
    opts: &DemoOptions,
    connect: &impl MeshConnect,
    progress: &mut dyn FnMut(&str),
) -> Result<LabMesh> {
    let missing = preflight();
    if !missing.is_empty() {
        bail!(
            "this machine cannot run the demo; missing:\n  - {}",
            missing.join("\n  - ")
        );
    }
    progress(if opts.kvstoremesh {
        "bringing up 2 clusters x 2 nodes in KVStoreMesh mode (network namespaces, etcd with mTLS, apiservers mirroring their remotes, node-syncs reading only their local etcd, eBPF, backends as pods routed across clusters by node-sync --routing native)"
    } else {
        "bringing up 2 clusters x 2 nodes (network namespaces, etcd with mTLS, apiservers, node-syncs, eBPF, backends as pods routed across clusters by node-sync --routing native)"
    });
    // Backends are pods behind their nodes, on the nodes' pod CIDRs; nothing but node-sync's routes
    // makes cluster 2's pods reachable from cluster 1.
    let mut spec = LabMeshSpec::new(opts.prefix.clone(), 2, 2).with_pods(Routing::Native);
    spec.bin_dir = opts.bin_dir.clone();
    spec.kvstoremesh = opts.kvstoremesh;
    let mesh = tokio::task::spawn_blocking(move || LabMesh::up(spec))
        .await
        .context("lab task")??;
    progress("connecting c1 <-> c2 (clustermesh connect --wait)");
    let a = (mesh.apiserver_grpc(1), mesh.cert_dir(1)?);
    let b = (mesh.apiserver_grpc(2), mesh.cert_dir(2)?);
    for (c, (addr, tls_dir)) in [(1, &a), (2, &b)] {
        if let Err(e) = wait_grpc(connect, *addr, tls_dir, Duration::from_secs(30)).await {
            let name = mesh.cluster_name(c);
            let tail = mesh.log_tail(&format!("apiserver-{name}"), 15);
            return Err(e.context(format!("apiserver of {name}; its log ends with:\n{tail}")));
        }
    }
    connect
        .connect(
            (a.0, &a.1),
            (b.0, &b.1),
            Duration::from_secs(60),
            &mut |l| progress(&format!("  {l}")),
        )
        .await?;
    Ok(mesh)
}

async fn wait_grpc(
    connect: &impl MeshConnect,
    addr: SocketAddr,
    tls_dir: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match connect.open(addr, tls_dir).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("apiserver at {addr} did not come up")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The whole demo; the mesh is returned so `--keep` can leave it running.
pub async fn run(
    opts: &DemoOptions,
    connect: &impl MeshConnect,
    progress: &mut dyn FnMut(&str),
) -> Result<(DemoReport, LabMesh)> {
    let started = Instant::now();
    let mut mesh = bring_up(opts, connect, progress).await?;
    progress("waiting until a client in c1/n1 lands on cluster 1's backends");
    let local = format!("{}-", mesh.cluster_name(1));
    let m = &mesh;
    tokio::task::block_in_place(|| {
        m.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with(&local))
    })?;
    progress("drill 1: graceful failover");
    let graceful =
        tokio::task::block_in_place(|| drill(&mut mesh, Fault::Graceful, opts, progress))?;
    progress(&format!(
        "  failover {} ms, failback {} ms, failed connects {}/{}",
        fmt_ms(graceful.failover_ms),
        fmt_ms(graceful.failback_ms),
        graceful.failed_connects,
        graceful.total_connects
    ));
    progress("drill 2: hard kill");
    let hard_kill =
        tokio::task::block_in_place(|| drill(&mut mesh, Fault::HardKill, opts, progress))?;
    progress(&format!(
        "  failover {} ms, failback {} ms, failed connects {}/{}",
        fmt_ms(hard_kill.failover_ms),
        fmt_ms(hard_kill.failback_ms),
        hard_kill.failed_connects,
        hard_kill.total_connects
    ));
    let status_url = format!("http://{}/", mesh.apiserver_status(1));
    Ok((
        DemoReport {
            failover_ms: graceful.failover_ms,
            failback_ms: graceful.failback_ms,
            failed_connects: graceful.failed_connects,
            graceful,
            hard_kill,
            status_url,
            total_seconds: started.elapsed().as_secs_f64(),
            kvstoremesh: opts.kvstoremesh,
        },
        mesh,
    ))
}

/// `123.4` or `-`.
pub fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}
