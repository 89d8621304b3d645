//! `clustermesh connect`, `disconnect` and `status` against apiserver gRPC addresses.
//!
//! Connect runs a preflight whose every check prints a verdict, then registers each side at the other
//! (the remote entry and the remote's read-only etcd user, through the apiserver), and with `--wait` waits
//! until every node of each side reports the other connected and synced. Running it twice changes
//! nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clustermesh_api::pb::cluster_mesh_client::ClusterMeshClient;
use clustermesh_api::pb::{
    AddTrustBundleRequest, ClusterInfo, GetClusterInfoRequest, GetStatusRequest,
    IssueRemoteReaderRequest, RegisterRemoteRequest, UnregisterRemoteRequest,
};
use mesh_certs::{ClusterDir, Role};
use mesh_model::status::MeshStatus;
use serde::Serialize;
use tonic::transport::Channel;

/// One side of a connection: an apiserver address and the admin credentials of its cluster.
#[derive(Debug, Clone)]
pub struct Side {
    /// gRPC address of the apiserver.
    pub addr: SocketAddr,
    /// Cluster certificate directory holding `admin.{crt,key}` and `ca-bundle.pem`.
    pub tls_dir: std::path::PathBuf,
}

/// A connected side: its client and what it says about itself.
pub struct Peer {
    /// The side.
    pub side: Side,
    /// The client.
    pub client: ClusterMeshClient<Channel>,
    /// Its cluster info.
    pub info: ClusterInfo,
}

/// Verdict of one preflight check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Passed.
    Ok,
    /// Passed with a warning.
    Warn,
    /// Failed: nothing is changed.
    Fail,
}

/// A preflight check and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Verdict.
    pub verdict: Verdict,
    /// In words.
    pub detail: String,
}

impl Check {
    /// A check with its verdict.
    pub fn new(name: &str, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            verdict,
            detail: detail.into(),
        }
    }

    /// `✔ name: detail`, `! ...`, `✘ ...`.
    pub fn line(&self) -> String {
        let mark = match self.verdict {
            Verdict::Ok => "✔",
            Verdict::Warn => "!",
            Verdict::Fail => "✘",
        };
        format!("{mark} {}: {}", self.name, self.detail)
    }
}

/// Open a side with its admin credentials and read its cluster info.
pub async fn open(side: &Side) -> Result<Peer> {
    let dir = ClusterDir::open(&side.tls_dir)
        .with_context(|| format!("credentials {}", side.tls_dir.display()))?;
    let mut client = clustermesh_api::client::connect(side.addr, &dir, Role::Admin).await?;
    let info = client
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .map_err(|s| anyhow!("GetClusterInfo at {}: {}", side.addr, s.message()))?
        .into_inner();
    Ok(Peer {
        side: side.clone(),
        client,
        info,
    })
}

fn cidrs_overlap(a: &[String], b: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            if let (Ok(nx), Ok(ny)) = (x.parse::<ipnet::IpNet>(), y.parse::<ipnet::IpNet>())
                && (nx.contains(&ny.network()) || ny.contains(&nx.network()))
            {
                out.push((x.clone(), y.clone()));
            }
        }
    }
    out
}

/// The preflight over two clusters' info (pure): reachability is shown by having the info at all.
pub fn preflight(a: &ClusterInfo, b: &ClusterInfo, federate: bool) -> Vec<Check> {
    let mut checks = vec![Check::new(
        "reachable",
        Verdict::Ok,
        format!(
            "{} (id {}) and {} (id {}) answer",
            a.name, a.id, b.name, b.id
        ),
    )];
    checks.push(if a.name == b.name {
        Check::new(
            "names",
            Verdict::Fail,
            format!(
                "both clusters are named {:?}; names must be unique in a mesh",
                a.name
            ),
        )
    } else {
        Check::new(
            "names",
            Verdict::Ok,
            format!("{} and {} are distinct", a.name, b.name),
        )
    });
    checks.push(if a.id == b.id {
        Check::new(
            "cluster ids",
            Verdict::Fail,
            format!("{} and {} both have cluster id {}; ids must be unique in a mesh (reinstall one with another id)", a.name, b.name, a.id),
        )
    } else {
        Check::new("cluster ids", Verdict::Ok, format!("{} and {} are distinct", a.id, b.id))
    });
    checks.push(if a.max_connected_clusters != b.max_connected_clusters {
        Check::new(
            "maxConnectedClusters",
            Verdict::Fail,
            format!(
                "{} has {}, {} has {}: they must be equal",
                a.name, a.max_connected_clusters, b.name, b.max_connected_clusters
            ),
        )
    } else {
        Check::new(
            "maxConnectedClusters",
            Verdict::Ok,
            format!("{} on both", a.max_connected_clusters),
        )
    });
    let shared: Vec<&String> = a
        .ca_fingerprints
        .iter()
        .filter(|f| b.ca_fingerprints.contains(f))
        .collect();
    checks.push(if !shared.is_empty() {
        Check::new("trust", Verdict::Ok, format!("shared root {}", short_fp(shared[0])))
    } else if federate {
        Check::new("trust", Verdict::Warn, "no shared root: the trust bundles will be exchanged (--federate)")
    } else {
        Check::new(
            "trust",
            Verdict::Fail,
            format!(
                "no shared root ({} trusts {}, {} trusts {}): issue both from one CA, or pass --federate",
                a.name,
                a.ca_fingerprints.iter().map(|f| short_fp(f)).collect::<Vec<_>>().join(","),
                b.name,
                b.ca_fingerprints.iter().map(|f| short_fp(f)).collect::<Vec<_>>().join(",")
            ),
        )
    });
    let mut overlaps = cidrs_overlap(&a.pod_cidrs, &b.pod_cidrs);
    overlaps.extend(cidrs_overlap(&a.service_cidrs, &b.service_cidrs));
    checks.push(if overlaps.is_empty() {
        Check::new("cidrs", Verdict::Ok, "no overlapping pod or service CIDRs")
    } else {
        Check::new(
            "cidrs",
            Verdict::Warn,
            format!(
                "overlapping CIDRs {}: endpoints with the same address in both clusters cannot be told apart",
                overlaps.iter().map(|(x, y)| format!("{x}~{y}")).collect::<Vec<_>>().join(", ")
            ),
        )
    });
    if a.etcd_endpoints.is_empty() || b.etcd_endpoints.is_empty() {
        checks.push(Check::new(
            "etcd endpoints",
            Verdict::Fail,
            "a cluster advertises no etcd endpoint for remote nodes",
        ));
    }
    checks
}

fn short_fp(f: &str) -> String {
    f.chars().take(11).collect()
}

/// What `connect` did.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Preflight checks.
    pub checks: Vec<Check>,
    /// Registrations made (`a -> b` means b registered at a), with whether each changed anything.
    pub registrations: Vec<(String, bool)>,
    /// Whether the wait (if asked) ended with every node connected and synced.
    pub synced: Option<bool>,
}

/// Options of `connect`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Only register B at A (A's nodes reach B), not the reverse.
    pub unidirectional: bool,
    /// Exchange trust bundles when the clusters do not share a root.
    pub federate: bool,
    /// Wait until every node of each side reports the other connected and synced.
    pub wait: Option<Duration>,
}

/// Connect A and B. `progress` receives lines as they happen.
pub async fn connect(
    a: &Side,
    b: &Side,
    opts: &ConnectOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ConnectReport> {
    let mut pa = open(a)
        .await
        .with_context(|| format!("cluster A at {}", a.addr))?;
    let mut pb = open(b)
        .await
        .with_context(|| format!("cluster B at {}", b.addr))?;
    let mut checks = preflight(&pa.info, &pb.info, opts.federate);
    checks.extend(reader_checks(&pa.info, &pb.info, opts.unidirectional));
    for c in &checks {
        progress(&c.line());
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        bail!("preflight failed; nothing was changed");
    }
    let shared_root = pa
        .info
        .ca_fingerprints
        .iter()
        .any(|f| pb.info.ca_fingerprints.contains(f));
    if !shared_root && opts.federate {
        trust(&mut pa, &pb.info, progress).await?;
        if !opts.unidirectional {
            trust(&mut pb, &pa.info, progress).await?;
        }
    }
    // Reader certificates first: the cluster that is read signs the reader's remote key.
    let a_reads_b = issue_reader(&mut pb, &pa.info, progress).await?;
    let b_reads_a = if opts.unidirectional {
        String::new()
    } else {
        issue_reader(&mut pa, &pb.info, progress).await?
    };
    let mut registrations = Vec::new();
    let pairs: Vec<(&mut Peer, ClusterInfo, String)> = if opts.unidirectional {
        vec![(&mut pa, pb.info.clone(), a_reads_b)]
    } else {
        let (ia, ib) = (pa.info.clone(), pb.info.clone());
        vec![(&mut pa, ib, a_reads_b), (&mut pb, ia, b_reads_a)]
    };
    for (at, other, client_cert_pem) in pairs {
        let req = RegisterRemoteRequest {
            name: other.name.clone(),
            id: other.id,
            etcd_endpoints: other.etcd_endpoints.clone(),
            ca_bundle_pem: if shared_root {
                String::new()
            } else {
                other.ca_bundle_pem.clone()
            },
            client_cert_pem,
        };
        let changed = at
            .client
            .register_remote(req)
            .await
            .map_err(|s| {
                anyhow!(
                    "register {} at {}: {}",
                    other.name,
                    at.info.name,
                    s.message()
                )
            })?
            .into_inner()
            .changed;
        progress(&format!(
            "✔ {} registered at {}{}",
            other.name,
            at.info.name,
            if changed { "" } else { " (already, unchanged)" }
        ));
        registrations.push((format!("{} -> {}", at.info.name, other.name), changed));
    }
    let mut synced = None;
    if let Some(timeout) = opts.wait {
        let (na, nb) = (pa.info.name.clone(), pb.info.name.clone());
        let mut sides = vec![(pa, nb)];
        if !opts.unidirectional {
            sides.push((pb, na));
        }
        synced = Some(wait_all_connected(sides, timeout, progress).await?);
    }
    Ok(ConnectReport {
        checks,
        registrations,
        synced,
    })
}

/// Whether `info`'s apiserver can sign reader certificates (it holds the intermediate key).
fn issues_readers(info: &ClusterInfo) -> bool {
    info.capabilities
        .iter()
        .any(|c| c == clustermesh_api::control::ISSUE_REMOTE_READER)
}

/// How each side's nodes will be let into the other's etcd (pure). `a` reads `b` always, `b`
/// reads `a` unless `unidirectional`. A cluster whose etcd trusts only its own intermediate
/// (`etcd_client_trust` "cluster") must issue the reader's certificate; one that cannot and
/// trusts the mesh root lets the reader in with its own remote certificate (a warning: any
/// cluster's intermediate then speaks for its etcd users).
pub fn reader_checks(a: &ClusterInfo, b: &ClusterInfo, unidirectional: bool) -> Vec<Check> {
    let mut dirs = vec![(a, b)];
    if !unidirectional {
        dirs.push((b, a));
    }
    dirs.into_iter()
        .map(|(reader, read)| {
            let name = format!("{} reads {}", reader.name, read.name);
            if issues_readers(read) && !reader.remote_cert_pem.is_empty() {
                Check::new(
                    &name,
                    Verdict::Ok,
                    format!(
                        "{} signs {}'s remote key as remote-{} (its own intermediate)",
                        read.name, reader.name, reader.name
                    ),
                )
            } else {
                let why = if reader.remote_cert_pem.is_empty() {
                    format!("{}'s apiserver does not hold its remote certificate", reader.name)
                } else {
                    format!(
                        "{}'s apiserver cannot issue certificates (no intermediate key)",
                        read.name
                    )
                };
                if read.etcd_client_trust == "cluster" {
                    Check::new(
                        &name,
                        Verdict::Fail,
                        format!(
                            "{}'s etcd trusts only its own intermediate and {why}: give the apiserver \
                             the intermediate, or connect with --context (hands {} {}'s own remote \
                             certificate)",
                            read.name, reader.name, read.name
                        ),
                    )
                } else {
                    Check::new(
                        &name,
                        Verdict::Warn,
                        format!(
                            "{why}: {}'s nodes present their own remote certificate, which {}'s etcd \
                             accepts only while it trusts the whole mesh",
                            reader.name, read.name
                        ),
                    )
                }
            }
        })
        .collect()
}

/// The certificate `read` issues for `reader`'s nodes (empty when it cannot; [`reader_checks`]
/// said whether that is allowed).
async fn issue_reader(
    read: &mut Peer,
    reader: &ClusterInfo,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    if !issues_readers(&read.info) || reader.remote_cert_pem.is_empty() {
        return Ok(String::new());
    }
    let r = read
        .client
        .issue_remote_reader(IssueRemoteReaderRequest {
            name: reader.name.clone(),
            remote_cert_pem: reader.remote_cert_pem.clone(),
        })
        .await
        .map_err(|s| {
            anyhow!(
                "issue {}'s reader certificate at {}: {}",
                reader.name,
                read.info.name,
                s.message()
            )
        })?
        .into_inner();
    progress(&format!(
        "✔ {} issued remote-{} for {}'s nodes (valid until {})",
        read.info.name, reader.name, reader.name, r.not_after
    ));
    Ok(r.cert_pem)
}

/// Federation: `at` adds `other`'s CA bundle to the roots it trusts.
async fn trust(at: &mut Peer, other: &ClusterInfo, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let r = at
        .client
        .add_trust_bundle(AddTrustBundleRequest {
            bundle_pem: other.ca_bundle_pem.clone(),
        })
        .await?;
    progress(&format!(
        "✔ {} now trusts {} roots",
        at.info.name,
        r.into_inner().ca_fingerprints.len()
    ));
    Ok(())
}

/// Where a cluster's mesh status comes from: its apiserver's gRPC API, or (Kubernetes mode) its
/// status endpoint through the Kubernetes API server's service proxy.
pub trait StatusSource {
    /// The cluster's name, for progress lines.
    fn cluster_name(&self) -> &str;
    /// The cluster's mesh status now.
    fn mesh_status(&mut self) -> impl std::future::Future<Output = Result<MeshStatus>>;
}

impl StatusSource for Peer {
    fn cluster_name(&self) -> &str {
        &self.info.name
    }
    async fn mesh_status(&mut self) -> Result<MeshStatus> {
        get_status(&mut self.client).await
    }
}

/// `--wait` of connect: each side's status polled until every node reports its remote
/// connected and synced; an error when `timeout` passes first.
pub async fn wait_all_connected<S: StatusSource>(
    sides: Vec<(S, String)>,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut all = true;
    for (mut side, remote) in sides {
        all &= wait_connected(&mut side, &remote, deadline, progress).await?;
    }
    if !all {
        bail!("timed out after {timeout:?} waiting for every node to connect and sync");
    }
    Ok(all)
}

/// Poll `peer`'s status until every node reports `remote` connected and synced; `false` when
/// `deadline` passes first.
pub async fn wait_connected(
    peer: &mut impl StatusSource,
    remote: &str,
    deadline: Instant,
    progress: &mut dyn FnMut(&str),
) -> Result<bool> {
    let mut last = String::new();
    loop {
        // A status that cannot be read yet (apiserver restarting) is shown and polled again.
        let status = match peer.mesh_status().await {
            Ok(s) => s,
            Err(e) if Instant::now() < deadline => {
                let line = format!("{}: status not readable: {e:#}", peer.cluster_name());
                if line != last {
                    progress(&format!("… {line}"));
                    last = line;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let line = match status.remotes.iter().find(|r| r.name == remote) {
            Some(r) => {
                let l = format!(
                    "{}: {}/{} nodes connected to {remote}, {}/{} synced",
                    peer.cluster_name(),
                    r.nodes_connected,
                    r.nodes,
                    r.nodes_synced,
                    r.nodes
                );
                if r.healthy() {
                    progress(&format!("✔ {l}"));
                    return Ok(true);
                }
                l
            }
            None => format!("{}: no node reports {remote} yet", peer.cluster_name()),
        };
        if line != last {
            progress(&format!("… {line}"));
            last = line;
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The status of the cluster behind `client`.
pub async fn get_status(client: &mut ClusterMeshClient<Channel>) -> Result<MeshStatus> {
    let r = client
        .get_status(GetStatusRequest {})
        .await
        .map_err(|s| anyhow!("GetStatus: {}", s.message()))?
        .into_inner();
    serde_json::from_str(&r.json).context("GetStatus: the answer is not a mesh status")
}

/// Disconnect A and B (both ways unless `unidirectional`). Returns lines describing what changed.
pub async fn disconnect(a: &Side, b: &Side, unidirectional: bool) -> Result<Vec<String>> {
    let mut pa = open(a)
        .await
        .with_context(|| format!("cluster A at {}", a.addr))?;
    let mut pb = open(b)
        .await
        .with_context(|| format!("cluster B at {}", b.addr))?;
    let mut lines = Vec::new();
    let (na, nb) = (pa.info.name.clone(), pb.info.name.clone());
    let changed = pa
        .client
        .unregister_remote(UnregisterRemoteRequest { name: nb.clone() })
        .await?
        .into_inner()
        .changed;
    lines.push(format!(
        "✔ {nb} unregistered at {na}{}",
        if changed { "" } else { " (was not registered)" }
    ));
    if !unidirectional {
        let changed = pb
            .client
            .unregister_remote(UnregisterRemoteRequest { name: na.clone() })
            .await?
            .into_inner()
            .changed;
        lines.push(format!(
            "✔ {na} unregistered at {nb}{}",
            if changed { "" } else { " (was not registered)" }
        ));
    }
    Ok(lines)
}

/// `clustermesh status` in words.
pub fn render_status(s: &MeshStatus) -> String {
    let mut out = String::new();
    let ok = |b: bool| if b { "✔" } else { "✘" };
    out.push_str(&format!(
        "Cluster:      {} (id {}, maxConnectedClusters {})\n",
        s.cluster.name, s.cluster.id, s.cluster.max_connected_clusters
    ));
    out.push_str(&format!(
        "Apiserver:    {} ready={} leader={}{}\n",
        ok(s.apiserver.ready),
        s.apiserver.ready,
        s.apiserver
            .leader
            .as_deref()
            .unwrap_or(if s.apiserver.is_leader {
                s.apiserver.replica.as_str()
            } else {
                "?"
            }),
        if s.apiserver.is_leader {
            " (this replica)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "etcd:         {} {}\n",
        ok(s.apiserver.etcd_healthy),
        if s.apiserver.etcd_healthy {
            "healthy"
        } else {
            "unreachable"
        }
    ));
    out.push_str(&format!("Connectivity: {}\n", s.connectivity_line()));
    for r in &s.remotes {
        out.push_str(&format!(
            "  {} {:<16} {}/{} nodes connected, {}/{} synced, heartbeat age {}, keys {}{}{}\n",
            ok(r.healthy()),
            r.name,
            r.nodes_connected,
            r.nodes,
            r.nodes_synced,
            r.nodes,
            r.max_heartbeat_age_ms
                .map_or("-".to_string(), |a| format!("{a} ms")),
            r.keys,
            r.stale_since
                .as_ref()
                .map_or(String::new(), |t| format!(", stale since {t}")),
            if r.errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.errors.join("; "))
            }
        ));
    }
    out.push_str(&format!("Global services: {}\n", s.services.len()));
    for svc in &s.services {
        out.push_str(&format!(
            "  {:<24} frontends {}  connections local {} / remote {}\n",
            svc.service,
            svc.frontends.join(","),
            svc.connections_local,
            svc.connections_remote
        ));
        for (cluster, n) in &svc.backends_by_cluster {
            let selected = svc
                .backends
                .iter()
                .filter(|b| &b.cluster == cluster && b.selected_on > 0)
                .count();
            let golden = svc
                .golden
                .iter()
                .find(|g| &g.cluster == cluster)
                .map(|g| {
                    let us = |v: Option<u64>| {
                        v.map_or("-".to_owned(), |us| format!("{:.2} ms", us as f64 / 1e3))
                    };
                    format!(
                        "; {:.1} connects/s, {:.1}% failed, connect p50 {} p99 {} (last {} s)",
                        g.rate(),
                        100.0 * g.error_ratio(),
                        us(g.p50_us),
                        us(g.p99_us),
                        g.window_ms / 1000
                    )
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "    {cluster:<16} {n} backends, {selected} selected{golden}\n"
            ));
        }
    }
    if !s.failovers.is_empty() {
        out.push_str("Recent failovers:\n");
        for f in s.failovers.iter().rev().take(5) {
            out.push_str(&format!(
                "  {} {}: {} -> {}{}\n",
                f.at,
                f.service,
                f.from.join(","),
                f.to.join(","),
                f.duration_ms
                    .map_or(String::new(), |d| format!(" in {d} ms"))
            ));
        }
    }
    for w in &s.warnings {
        out.push_str(&format!("⚠ {w}\n"));
    }
    if s.healthy {
        out.push_str("Status: healthy\n");
    } else {
        out.push_str("Status: unhealthy\n");
        for p in &s.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}

/// Wait until the status is healthy (or the timeout passes); returns the last status.
pub async fn status(side: &Side, wait: Option<Duration>) -> Result<MeshStatus> {
    let dir = ClusterDir::open(&side.tls_dir)
        .with_context(|| format!("credentials {}", side.tls_dir.display()))?;
    let client = clustermesh_api::client::connect(side.addr, &dir, Role::Admin).await?;
    let mut peer = Peer {
        side: side.clone(),
        client,
        info: ClusterInfo::default(),
    };
    status_of(&mut peer, wait).await
}

/// `source`'s status; with `wait`, polled until healthy or until `wait` passes (the last one).
pub async fn status_of(
    source: &mut impl StatusSource,
    wait: Option<Duration>,
) -> Result<MeshStatus> {
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let s = match source.mesh_status().await {
            Ok(s) => s,
            // With --wait, an unreadable status (apiserver restarting) is polled again.
            Err(_) if deadline.is_some_and(|d| Instant::now() < d) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        match deadline {
            Some(d) if !s.healthy && Instant::now() < d => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            _ => return Ok(s),
        }
    }
}

/// Whether `dir` looks like a cluster certificate directory (for clear errors before connecting).
pub fn check_tls_dir(dir: &Path) -> Result<()> {
    ClusterDir::open(dir)
        .map(|_| ())
        .with_context(|| format!("{} is not a cluster certificate directory", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// The lab demo's connector

/// How `clustermesh demo` (and the tests and bench built on `mesh_lab::demo`) connect the lab's
/// clusters: this module's [`open`], and [`connect`] both ways with `--wait`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcConnect;

impl mesh_lab::demo::MeshConnect for GrpcConnect {
    async fn open(&self, addr: SocketAddr, tls_dir: &Path) -> Result<()> {
        let side = Side {
            addr,
            tls_dir: tls_dir.to_path_buf(),
        };
        open(&side).await.map(|_| ())
    }

    async fn connect(
        &self,
        a: (SocketAddr, &Path),
        b: (SocketAddr, &Path),
        wait: Duration,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let side = |(addr, tls_dir): (SocketAddr, &Path)| Side {
            addr,
            tls_dir: tls_dir.to_path_buf(),
        };
        let opts = ConnectOptions {
            unidirectional: false,
            federate: false,
            wait: Some(wait),
        };
        connect(&side(a), &side(b), &opts, progress).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, id: u32) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            id,
            max_connected_clusters: 255,
            etcd_endpoints: vec!["https://10.0.0.1:2379".into()],
            ca_fingerprints: vec!["AA:BB:CC:DD".into()],
            pod_cidrs: vec![format!("10.{id}.0.0/16")],
            service_cidrs: vec![format!("10.9{id}.0.0/16")],
            ..Default::default()
        }
    }

    fn verdicts(c: &[Check]) -> Vec<(String, Verdict)> {
        c.iter()
            .map(|c| (c.name.clone(), c.verdict.clone()))
            .collect()
    }

    #[test]
    fn a_clean_pair_passes() {
        let c = preflight(&info("c1", 1), &info("c2", 2), false);
        assert!(
            c.iter().all(|c| c.verdict == Verdict::Ok),
            "{:?}",
            verdicts(&c)
        );
    }

    #[test]
    fn a_duplicate_cluster_id_is_refused_with_a_clear_message() {
        let c = preflight(&info("c1", 1), &info("c2", 1), false);
        let bad = c.iter().find(|c| c.verdict == Verdict::Fail).unwrap();
        assert_eq!(bad.name, "cluster ids");
        assert!(
            bad.line().contains("c1 and c2 both have cluster id 1"),
            "{}",
            bad.line()
        );
    }

    #[test]
    fn names_mcc_trust_and_cidrs() {
        assert!(
            preflight(&info("c1", 1), &info("c1", 2), false)
                .iter()
                .any(|c| c.name == "names" && c.verdict == Verdict::Fail)
        );
        let mut b = info("c2", 2);
        b.max_connected_clusters = 511;
        assert!(
            preflight(&info("c1", 1), &b, false)
                .iter()
                .any(|c| c.name == "maxConnectedClusters" && c.verdict == Verdict::Fail)
        );
        let mut b = info("c2", 2);
        b.ca_fingerprints = vec!["11:22".into()];
        let c = preflight(&info("c1", 1), &b, false);
        assert!(c.iter().any(|c| c.name == "trust"
            && c.verdict == Verdict::Fail
            && c.detail.contains("--federate")));
        let c = preflight(&info("c1", 1), &b, true);
        assert!(
            c.iter()
                .any(|c| c.name == "trust" && c.verdict == Verdict::Warn)
        );
        let mut b = info("c2", 2);
        b.pod_cidrs = vec!["10.1.128.0/17".into()];
        let c = preflight(&info("c1", 1), &b, false);
        assert!(c.iter().any(|c| c.name == "cidrs"
            && c.verdict == Verdict::Warn
            && c.detail.contains("10.1.0.0/16~10.1.128.0/17")));
    }
}
