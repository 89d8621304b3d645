//! Failover drills and randomized fault runs on the mesh lab.
//!
//! [`ChaosMesh`] wraps a [`LabMesh`] (every component real: network namespaces, TLS etcd per
//! cluster, clustermesh-apiservers, a node-sync with the eBPF datapath on every node, identity
//! backends) and keeps a [`Model`] of what the operator did to it: which endpoints are published
//! ready, which backends run, which node-syncs, apiservers and etcds run, which clusters are
//! partitioned. From the model it computes, for every node, the backend set DESIGN.md's selection
//! rules give for the global service `default/echo` ([`Model::expected`]), and compares it with what
//! the node's pinned BPF maps hold ([`ChaosMesh::observed`], read with
//! `global_lb_bpf::Datapath::inspect`).
//!
//! Why an independent model and not node-sync's own index: the point is to check node-sync, so the
//! expected state is recomputed from the inputs the test itself wrote (manifests, processes,
//! partitions), with the selection rules spelled out again here (local usable backends, else the
//! usable backends of the other clusters). Where the rules leave the answer to timing (a dead
//! backend whose node-sync is dead too, so nobody reports it; a remote cluster that is cut off
//! while it would be needed), the model says "unknown" and that node is not compared, and the
//! caller is told how many nodes were skipped.
//!
//! [`Traffic`] is the steady stream of new connections: one probe on node 1 of every cluster, each
//! to its own cluster's service address.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clustermesh_cli::connect::{ConnectOptions, Side};
use global_lb_bpf::{Datapath, Proto};
use mesh_lab::mesh::{
    BACKEND_PORT, LabMesh, LabMeshSpec, Routing, RunningProbe, SERVICE_PORT, preflight,
};
use mesh_lab::workload::ProbeSample;

pub mod random;

/// How an endpoint of the demo service is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// ready, serving.
    Ready,
    /// not ready, serving, terminating: a graceful drain.
    Terminating,
    /// not ready, not serving: what Kubernetes publishes for a pod on a node that stopped
    /// answering (after its node-monitor grace period).
    NotReady,
}

/// A backend as the maps name it: address and cluster id (the port is always the backend port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bk {
    /// Node address the backend listens on.
    pub addr: Ipv4Addr,
    /// Cluster id.
    pub cluster_id: u16,
}

/// What the operator did to the mesh (the inputs the expected maps are computed from).
#[derive(Debug, Clone)]
pub struct Model {
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
    /// Published endpoint state per (cluster, node).
    pub published: BTreeMap<(usize, usize), Published>,
    /// Backends that run.
    pub backend_up: BTreeSet<(usize, usize)>,
    /// node-syncs that run.
    pub node_sync_up: BTreeSet<(usize, usize)>,
    /// Nodes crashed (every process of the node gone; nothing of it compared).
    pub crashed: BTreeSet<(usize, usize)>,
    /// Clusters whose apiserver is down.
    pub apiserver_down: BTreeSet<usize>,
    /// Clusters whose etcd is down.
    pub etcd_down: BTreeSet<usize>,
    /// Partitioned cluster pairs (a < b).
    pub partitions: BTreeSet<(usize, usize)>,
    /// Cluster pairs (a < b) whose control planes are cut apart (backends still reach each other).
    pub control_plane_cuts: BTreeSet<(usize, usize)>,
    /// The demo service's affinity is `none` (else `local`).
    pub affinity_none: bool,
    /// node-syncs that were down while their backend was down: their last verdict may linger or
    /// lapse with the lease, so those backends are unknown until they run again.
    pub unreported: BTreeSet<(usize, usize)>,
    /// Nodes cut off the network (processes running, nothing in or out): not compared.
    pub isolated: BTreeSet<(usize, usize)>,
    /// Nodes whose health publication lapsed (their `health/<cluster>/<node>` key is gone from
    /// etcd, seen by the test): every node-sync treats their backends as failing while others are
    /// usable, until they publish again.
    pub lapsed: BTreeSet<(usize, usize)>,
    /// When each node-sync that is down went down: once it has been down long enough for its
    /// lease to lapse (see [`LEASE_LAPSE_FROM`]), its backends are unknown.
    pub node_sync_down_since: BTreeMap<(usize, usize), Instant>,
}

/// node-sync's health lease: 10 s TTL, kept alive every 3 s, so a node-sync that dies takes its
/// verdicts with it between about 7 s and 10 s later. From this long on, the model no longer
/// knows whether other nodes still count its backends (they do not once the lease is gone).
pub const LEASE_LAPSE_FROM: Duration = Duration::from_secs(6);

/// Whether a backend counts as usable for selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usable {
    Yes,
    No,
    Unknown,
}

impl Model {
    fn new(clusters: usize, nodes: usize) -> Self {
        let all: BTreeSet<(usize, usize)> = (1..=clusters)
            .flat_map(|c| (1..=nodes).map(move |n| (c, n)))
            .collect();
        Self {
            clusters,
            nodes,
            published: all.iter().map(|k| (*k, Published::Ready)).collect(),
            backend_up: all.clone(),
            node_sync_up: all,
            crashed: BTreeSet::new(),
            apiserver_down: BTreeSet::new(),
            etcd_down: BTreeSet::new(),
            partitions: BTreeSet::new(),
            control_plane_cuts: BTreeSet::new(),
            affinity_none: false,
            unreported: BTreeSet::new(),
            isolated: BTreeSet::new(),
            lapsed: BTreeSet::new(),
            node_sync_down_since: BTreeMap::new(),
        }
    }

    fn usable(&self, c: usize, n: usize) -> Usable {
        if self.published[&(c, n)] != Published::Ready {
            return Usable::No;
        }
        // Nobody checks it any more: out while others are usable (when nothing else is, the
        // selection depends on more than the model says: `expected` answers unknown then).
        if self.lapsed.contains(&(c, n)) {
            return Usable::No;
        }
        if self
            .node_sync_down_since
            .get(&(c, n))
            .is_some_and(|t| t.elapsed() >= LEASE_LAPSE_FROM)
        {
            return Usable::Unknown;
        }
        if self.backend_up.contains(&(c, n)) {
            // A backend that was down while nobody probed it may still carry a failing verdict
            // from before, until its node-sync probes it again.
            if self.unreported.contains(&(c, n)) {
                return Usable::Unknown;
            }
            return Usable::Yes;
        }
        // Down: only its own node-sync's health checks notice.
        if self.node_sync_up.contains(&(c, n)) && !self.unreported.contains(&(c, n)) {
            Usable::No
        } else {
            Usable::Unknown
        }
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions.contains(&(a.min(b), a.max(b)))
    }

    /// Whether node-syncs of cluster `c` see cluster `r` as it is now (not cut off, its etcd and
    /// apiserver up).
    fn sees(&self, c: usize, r: usize) -> bool {
        !self.partitioned(c, r)
            && !self.control_plane_cuts.contains(&(c.min(r), c.max(r)))
            && !self.etcd_down.contains(&r)
            && !self.apiserver_down.contains(&r)
    }

    /// The backends a node of cluster `c` must have for the demo service (affinity local): the
    /// usable local backends, else the usable backends of every other cluster. `None`: the rules
    /// leave it to timing (see the crate docs).
    pub fn expected(&self, c: usize) -> Option<BTreeSet<(usize, usize)>> {
        if self.affinity_none {
            return self.expected_none(c);
        }
        let local = self.usable_of(&[c])?;
        if !local.is_empty() {
            return Some(local);
        }
        // A remote cut off from this cluster (data and control plane) leaves its nodes' selection
        // within a second (their own probes); one seen only partly (its control plane down or cut
        // off) leaves the answer to timing.
        let remotes: Vec<usize> = (1..=self.clusters)
            .filter(|r| *r != c && !self.partitioned(c, *r))
            .collect();
        if remotes.iter().any(|r| !self.sees(c, *r)) {
            return None;
        }
        let remote = self.usable_of(&remotes)?;
        if remote.is_empty() {
            // Rule 4 (keep the last usable set while it serves): depends on history.
            return None;
        }
        Some(remote)
    }

    /// Affinity none: the usable backends of this cluster and of every cluster whose backends this
    /// cluster's nodes reach. A cluster cut off (data and control plane) leaves within a second, by
    /// the nodes' own probes; one whose control plane alone is cut off stays (its backends answer;
    /// the staleness timer, 30 s, is longer than any scenario).
    fn expected_none(&self, c: usize) -> Option<BTreeSet<(usize, usize)>> {
        let reached: Vec<usize> = (1..=self.clusters)
            .filter(|cl| *cl == c || !self.partitioned(c, *cl))
            .collect();
        if reached
            .iter()
            .any(|cl| *cl != c && (self.etcd_down.contains(cl) || self.apiserver_down.contains(cl)))
        {
            // Its verdicts and endpoint changes no longer arrive: the model cannot tell.
            return None;
        }
        self.usable_of(&reached).filter(|out| !out.is_empty())
    }

    /// The usable backends of `clusters` (`None` when any is unknown).
    fn usable_of(&self, clusters: &[usize]) -> Option<BTreeSet<(usize, usize)>> {
        let mut out = BTreeSet::new();
        for &cl in clusters {
            for n in 1..=self.nodes {
                match self.usable(cl, n) {
                    Usable::Yes => {
                        out.insert((cl, n));
                    }
                    Usable::No => {}
                    Usable::Unknown => return None,
                }
            }
        }
        Some(out)
    }

    /// Whether node `n` of cluster `c` has a node-sync whose maps are compared.
    pub fn compared(&self, c: usize, n: usize) -> bool {
        self.node_sync_up.contains(&(c, n))
            && !self.crashed.contains(&(c, n))
            && !self.isolated.contains(&(c, n))
    }
}

/// The result of one comparison of every node's maps with the model.
#[derive(Debug, Clone)]
pub struct Convergence {
    /// Time until every compared node matched.
    pub took: Duration,
    /// Nodes compared.
    pub compared: usize,
    /// Nodes the model could not decide (not compared).
    pub unknown: usize,
}

/// A mesh on the lab with the model of what was done to it.
pub struct ChaosMesh {
    mesh: LabMesh,
    rt: tokio::runtime::Runtime,
    /// The model.
    pub model: Model,
}

/// Options of [`ChaosMesh::up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab prefix (at most 24 chars, unique per test).
    pub prefix: String,
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
    /// Extra node-sync flags.
    pub node_sync_args: Vec<String>,
    /// Affinity of the demo service: `local` (default) or `none`.
    pub affinity: String,
    /// Extra annotations of the demo service in every cluster.
    pub service_annotations: Vec<(String, String)>,
    /// Extra annotations of the demo service in one cluster (by index).
    pub cluster_service_annotations: BTreeMap<usize, Vec<(String, String)>>,
    /// Backends also serve an HTTP health endpoint on this port (`LabMesh::set_health_mode`).
    pub health_port: Option<u16>,
    /// KVStoreMesh: apiservers mirror their remotes, node-syncs read only their local etcd.
    pub kvstoremesh: bool,
    /// Lifetime of the clusters' leaf certificates (default a year).
    pub leaf_lifetime: Option<Duration>,
    /// Per-cluster trust (`LabMeshSpec::cluster_trust`, the default as in the product): every etcd
    /// trusts only its own cluster's intermediate for clients. `false`: the mesh bundle.
    pub cluster_trust: bool,
    /// Clusters connected from the start through each other's own remote certificates
    /// (`LabMeshSpec::static_remotes`, what `connect --context` writes), not by the gRPC connect.
    pub static_remotes: bool,
    /// Backends as pods behind their nodes, the other clusters' pods reached through node-sync's
    /// `--routing` (default [`Routing::Native`], on a switched underlay; [`UpOptions::vxlan`]); `None`:
    /// backends on the node addresses over the routed underlay, as the lab had them before pods.
    pub pods: Option<Routing>,
}

impl UpOptions {
    /// `clusters` x `nodes`, default node-sync settings.
    pub fn new(prefix: &str, clusters: usize, nodes: usize) -> Self {
        Self {
            prefix: prefix.into(),
            clusters,
            nodes,
            node_sync_args: Vec::new(),
            affinity: "local".into(),
            service_annotations: Vec::new(),
            cluster_service_annotations: BTreeMap::new(),
            health_port: None,
            kvstoremesh: false,
            leaf_lifetime: None,
            cluster_trust: true,
            static_remotes: false,
            pods: Some(Routing::Native),
        }
    }

    /// Pods reached through `--routing vxlan` over the routed underlay, instead of native routing over the
    /// switched one: for latency and loss between clusters, which the lab's delay line applies to routed
    /// traffic only (native routing needs the nodes on one bridge).
    pub fn vxlan(mut self) -> Self {
        self.pods = Some(Routing::Vxlan);
        self
    }

    /// The same in KVStoreMesh mode.
    pub fn kvstoremesh(mut self) -> Self {
        self.kvstoremesh = true;
        self
    }

    /// The same with affinity `none`.
    pub fn affinity_none(mut self) -> Self {
        self.affinity = "none".into();
        self
    }
}

/// Fail with a message naming what is missing when this machine cannot run the lab.
pub fn require_lab() -> Result<()> {
    let missing = preflight();
    if !missing.is_empty() {
        bail!(
            "the chaos tests need the mesh lab; missing:\n  - {}",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

impl ChaosMesh {
    /// Bring up the mesh, connect every pair of clusters, wait until every node's maps hold its
    /// local backends and a client in every cluster lands on them.
    pub fn up(opts: UpOptions) -> Result<Self> {
        require_lab()?;
        let started = Instant::now();
        let mut spec = LabMeshSpec::new(opts.prefix.clone(), opts.clusters, opts.nodes);
        spec.node_sync_args = opts.node_sync_args.clone();
        spec.affinity = opts.affinity.clone();
        spec.service_annotations = opts.service_annotations.clone();
        spec.cluster_service_annotations = opts.cluster_service_annotations.clone();
        spec.health_port = opts.health_port;
        spec.kvstoremesh = opts.kvstoremesh;
        spec.leaf_lifetime = opts.leaf_lifetime;
        spec.cluster_trust = opts.cluster_trust;
        spec.static_remotes = opts.static_remotes;
        if let Some(routing) = opts.pods {
            spec = spec.with_pods(routing);
        }
        anyhow::ensure!(
            matches!(opts.affinity.as_str(), "local" | "none"),
            "the chaos model knows affinity local and none, not {}",
            opts.affinity
        );
        let mesh = LabMesh::up(spec).with_context(|| format!("bring up mesh {}", opts.prefix))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let mut model = Model::new(opts.clusters, opts.nodes);
        model.affinity_none = opts.affinity == "none";
        let mut me = Self { model, mesh, rt };
        if !opts.static_remotes {
            me.connect_all()?;
        }
        for c in 1..=opts.clusters {
            let local = format!("{}-", me.mesh.cluster_name(c));
            me.mesh
                .wait_for_landing(c, 1, Duration::from_secs(30), |b| b.starts_with(&local))?;
        }
        me.converge(Duration::from_secs(20))
            .context("maps right after bring-up")?;
        eprintln!(
            "[chaos] mesh {} up ({} clusters x {} nodes) in {:.1}s",
            opts.prefix,
            opts.clusters,
            opts.nodes,
            started.elapsed().as_secs_f64()
        );
        Ok(me)
    }

    /// `clustermesh connect` (gRPC) every pair of clusters, waiting until each sees the other.
    /// Idempotent: run again after a re-issue to have reader certificates signed for new keys.
    pub fn connect_all(&mut self) -> Result<()> {
        let n = self.model.clusters;
        let sides: Vec<Side> = (1..=n)
            .map(|c| {
                Ok(Side {
                    addr: self.mesh.apiserver_grpc(c),
                    tls_dir: self.mesh.cert_dir(c)?,
                })
            })
            .collect::<Result<_>>()?;
        self.rt.block_on(async {
            for s in &sides {
                wait_grpc(s, Duration::from_secs(30)).await?;
            }
            let opts = ConnectOptions {
                unidirectional: false,
                federate: false,
                wait: Some(Duration::from_secs(60)),
            };
            for i in 0..n {
                for j in i + 1..n {
                    clustermesh_cli::connect::connect(&sides[i], &sides[j], &opts, &mut |_| {})
                        .await
                        .with_context(|| format!("connect cluster {} and {}", i + 1, j + 1))?;
                }
            }
            anyhow::Ok(())
        })
    }

    /// The mesh underneath.
    pub fn mesh(&self) -> &LabMesh {
        &self.mesh
    }

    /// The mesh underneath, mutable (for faults the model does not cover).
    pub fn mesh_mut(&mut self) -> &mut LabMesh {
        &mut self.mesh
    }

    /// Run a future on the mesh's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The backend key of node `n` of cluster `c`.
    pub fn bk(&self, c: usize, n: usize) -> Bk {
        Bk {
            addr: self.mesh.backend_addr(c, n),
            cluster_id: self.mesh.cluster_id(c) as u16,
        }
    }

    fn name_of(&self, b: &Bk) -> String {
        for c in 1..=self.model.clusters {
            for n in 1..=self.model.nodes {
                if self.bk(c, n) == *b {
                    return self.mesh.backend_name(c, n);
                }
            }
        }
        format!("{}@{}", b.addr, b.cluster_id)
    }

    fn names(&self, set: &BTreeSet<Bk>) -> String {
        let v: Vec<String> = set.iter().map(|b| self.name_of(b)).collect();
        format!("{{{}}}", v.join(", "))
    }

    /// The backends the maps of node `n` of cluster `c` hold for its cluster's service address
    /// (weight > 0). Empty when the frontend is absent.
    pub fn observed(&self, c: usize, n: usize) -> Result<BTreeSet<Bk>> {
        let node = &self.mesh.lab().clusters()[c - 1].nodes[n - 1];
        let view = Datapath::inspect(&node.bpffs)
            .with_context(|| format!("read the maps of {}", node.bpffs.display()))?;
        let vip = std::net::IpAddr::V4(self.mesh.vip(c));
        let mut out = BTreeSet::new();
        for s in view.services()? {
            if s.frontend.addr == vip
                && s.frontend.port == SERVICE_PORT
                && s.frontend.proto == Proto::Tcp
            {
                for b in s.backends {
                    if let (std::net::IpAddr::V4(addr), true) =
                        (b.addr, b.weight > 0 && b.port == BACKEND_PORT)
                    {
                        out.insert(Bk {
                            addr,
                            cluster_id: b.cluster_id,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The expected backends of cluster `c`'s nodes as map keys (`None`: unknown).
    pub fn expected(&self, c: usize) -> Option<BTreeSet<Bk>> {
        self.model
            .expected(c)
            .map(|s| s.into_iter().map(|(c, n)| self.bk(c, n)).collect())
    }

    /// Differences between the maps and the model, one line per node (empty: all match).
    pub fn diff(&self) -> Result<(Vec<String>, usize, usize)> {
        let mut lines = Vec::new();
        let (mut compared, mut unknown) = (0, 0);
        for c in 1..=self.model.clusters {
            let exp = self.expected(c);
            for n in 1..=self.model.nodes {
                if !self.model.compared(c, n) {
                    continue;
                }
                let Some(exp) = &exp else {
                    unknown += 1;
                    continue;
                };
                compared += 1;
                let got = self.observed(c, n)?;
                if &got != exp {
                    lines.push(format!(
                        "{}: maps {} expected {}",
                        self.mesh.backend_name(c, n),
                        self.names(&got),
                        self.names(exp)
                    ));
                }
            }
        }
        Ok((lines, compared, unknown))
    }

    /// Wait until every compared node's maps equal the model, at most `within`. The error names
    /// every node that differs, what it holds, what it should, and why node-sync says it chose.
    pub fn converge(&self, within: Duration) -> Result<Convergence> {
        let started = Instant::now();
        loop {
            let (lines, compared, unknown) = self.diff()?;
            if lines.is_empty() {
                return Ok(Convergence {
                    took: started.elapsed(),
                    compared,
                    unknown,
                });
            }
            if started.elapsed() >= within {
                let mut why = Vec::new();
                for c in 1..=self.model.clusters {
                    if let Ok(doc) = self.mesh.node_sync_status_json(c, 1) {
                        for s in doc["services"].as_array().into_iter().flatten() {
                            for f in s["frontends"].as_array().into_iter().flatten() {
                                why.push(format!(
                                    "  node-sync {}: {} -> {} ({})",
                                    self.mesh.backend_name(c, 1),
                                    f["frontend"],
                                    f["backends"],
                                    f["why"]
                                ));
                            }
                        }
                    }
                }
                // How long it really takes, for the report.
                let extra = Instant::now();
                let later = loop {
                    if self.diff().is_ok_and(|(l, _, _)| l.is_empty()) {
                        break format!("they matched {:?} after the start", started.elapsed());
                    }
                    if extra.elapsed() >= Duration::from_secs(10) {
                        break format!(
                            "they still differed {:?} after the start",
                            started.elapsed()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                bail!(
                    "maps differ from the model {:?} after the fault ended ({later}):\n  {}\n{}\nmodel: {:?}",
                    within,
                    lines.join("\n  "),
                    why.join("\n"),
                    self.model
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // ---- operations (each updates the model) ----

    /// Publish every endpoint of cluster `c` in `state`.
    pub fn publish_cluster(&mut self, c: usize, state: Published) -> Result<()> {
        for n in 1..=self.model.nodes {
            self.model.published.insert((c, n), state);
        }
        self.write_echo(c)
    }

    /// A graceful drain of cluster `c` and back: its endpoints terminating until every node's maps
    /// follow (within `budget`; the time is printed after `what`), then ready again. Returns how
    /// long the drain took to reach every map.
    pub fn drain_and_restore(
        &mut self,
        c: usize,
        budget: Duration,
        what: &str,
    ) -> Result<Duration> {
        self.publish_cluster(c, Published::Terminating)?;
        let took = self.converge(budget)?.took;
        eprintln!("[chaos] {what}: the drain of cluster {c} in every node's maps in {took:?}");
        std::thread::sleep(Duration::from_millis(300));
        self.publish_cluster(c, Published::Ready)?;
        self.converge(budget)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(took)
    }

    /// Publish node `n`'s endpoint of cluster `c` in `state`.
    pub fn publish_node(&mut self, c: usize, n: usize, state: Published) -> Result<()> {
        self.model.published.insert((c, n), state);
        self.write_echo(c)
    }

    /// Write cluster `c`'s `echo.yaml` from the model (the same manifest as
    /// `LabMesh::write_service`, with a state per endpoint).
    fn write_echo(&self, c: usize) -> Result<()> {
        let cl = &self.mesh.lab().clusters()[c - 1];
        let endpoints = self
            .mesh
            .endpoints_yaml(c, |n| match self.model.published[&(c, n)] {
                Published::Ready => (true, true, false),
                Published::Terminating => (false, true, true),
                Published::NotReady => (false, false, false),
            });
        let text = self.mesh.service_manifest(c, &endpoints);
        let dir = self.mesh.lab().state_dir().join("manifests").join(&cl.name);
        let tmp = dir.join(".echo.yaml.chaos");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("echo.yaml"))
            .with_context(|| format!("rename into {}", dir.display()))?;
        Ok(())
    }

    /// SIGKILL the backend on node `n` of cluster `c`.
    pub fn kill_backend(&mut self, c: usize, n: usize) -> Result<()> {
        self.model.backend_up.remove(&(c, n));
        if !self.model.node_sync_up.contains(&(c, n)) {
            self.model.unreported.insert((c, n));
        }
        self.mesh.kill_backend(c, n)
    }

    /// SIGTERM the backend on node `n` of cluster `c`.
    pub fn stop_backend(&mut self, c: usize, n: usize) -> Result<()> {
        self.model.backend_up.remove(&(c, n));
        if !self.model.node_sync_up.contains(&(c, n)) {
            self.model.unreported.insert((c, n));
        }
        self.mesh.stop_backend(c, n)
    }

    /// Start the backend on node `n` of cluster `c` (returns once it listens).
    pub fn start_backend(&mut self, c: usize, n: usize) -> Result<()> {
        self.mesh.start_backend(c, n)?;
        self.model.backend_up.insert((c, n));
        Ok(())
    }

    /// SIGKILL node-sync on node `n` of cluster `c`.
    pub fn kill_node_sync(&mut self, c: usize, n: usize) -> Result<()> {
        self.model.node_sync_up.remove(&(c, n));
        self.model
            .node_sync_down_since
            .entry((c, n))
            .or_insert_with(Instant::now);
        if !self.model.backend_up.contains(&(c, n)) {
            self.model.unreported.insert((c, n));
        }
        self.mesh.kill_node_sync(c, n)
    }

    /// Start node-sync on node `n` of cluster `c` and wait until it reports ready.
    pub fn start_node_sync(&mut self, c: usize, n: usize) -> Result<()> {
        self.mesh.start_node_sync(c, n)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(doc) = self.mesh.node_sync_status_json(c, n)
                && doc["ready"] == serde_json::Value::Bool(true)
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "node-sync {} not ready 20 s after its start:\n{}",
                    self.mesh.backend_name(c, n),
                    self.mesh
                        .log_tail(&format!("node-sync-{}-n{n}", self.mesh.cluster_name(c)), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.model.node_sync_up.insert((c, n));
        // Running again, it probes its backend and reports the truth.
        self.model.unreported.remove(&(c, n));
        self.model.node_sync_down_since.remove(&(c, n));
        self.model.lapsed.remove(&(c, n));
        Ok(())
    }

    /// SIGKILL cluster `c`'s apiserver.
    pub fn kill_apiserver(&mut self, c: usize) -> Result<()> {
        self.model.apiserver_down.insert(c);
        self.mesh.kill_apiserver(c)
    }

    /// Start cluster `c`'s apiserver and wait until its gRPC API answers.
    pub fn start_apiserver(&mut self, c: usize) -> Result<()> {
        self.mesh.start_apiserver(c)?;
        let side = Side {
            addr: self.mesh.apiserver_grpc(c),
            tls_dir: self.mesh.cert_dir(c)?,
        };
        self.rt
            .block_on(wait_grpc(&side, Duration::from_secs(30)))?;
        self.model.apiserver_down.remove(&c);
        Ok(())
    }

    /// Wait until cluster `c`'s apiserver is the leader and has written its state (a restarted
    /// replica waits for the dead one's leader lease to lapse first), and every node-sync of the mesh
    /// reports every cluster connected. Returns how long that took.
    pub fn wait_control_plane(&self, c: usize, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last = String::new();
        // CHAOS_VERBOSE=1: print what is still awaited whenever it changes.
        let verbose = std::env::var_os("CHAOS_VERBOSE").is_some();
        let mut shown = String::new();
        loop {
            let leader = match mesh_lab::mesh::http_get(self.mesh.apiserver_status(c), "/metrics") {
                Ok((200, body)) => {
                    body.lines()
                        .any(|l| l.trim() == "clustermesh_apiserver_leader 1")
                        && body
                            .lines()
                            .any(|l| l.trim() == "clustermesh_apiserver_ready 1")
                }
                Ok((code, _)) => {
                    last = format!("apiserver metrics: HTTP {code}");
                    false
                }
                Err(e) => {
                    last = format!("apiserver metrics: {e:#}");
                    false
                }
            };
            let mut connected = leader;
            if leader {
                'nodes: for cl in 1..=self.model.clusters {
                    for n in 1..=self.model.nodes {
                        if !self.model.compared(cl, n) {
                            continue;
                        }
                        let doc = self.mesh.node_sync_status_json(cl, n)?;
                        for x in doc["clusters"].as_array().into_iter().flatten() {
                            if x["connected"] != serde_json::Value::Bool(true) {
                                last = format!(
                                    "node-sync {}: cluster {} not connected ({})",
                                    self.mesh.backend_name(cl, n),
                                    x["name"],
                                    x["error"]
                                );
                                connected = false;
                                break 'nodes;
                            }
                        }
                    }
                }
            } else if last.is_empty() {
                last = "apiserver not leader and ready yet".into();
            }
            if connected {
                return Ok(started.elapsed());
            }
            if verbose && last != shown {
                eprintln!(
                    "[chaos] {:>6} ms: waiting: {last}",
                    started.elapsed().as_millis()
                );
                shown = last.clone();
            }
            if Instant::now() >= deadline {
                bail!("control plane of cluster {c} not back within {timeout:?}: {last}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL cluster `c`'s etcd.
    pub fn kill_etcd(&mut self, c: usize) -> Result<()> {
        self.model.etcd_down.insert(c);
        self.mesh.lab().kill_etcd(c)?;
        Ok(())
    }

    /// Start cluster `c`'s etcd (same data) and wait until it is healthy.
    pub fn start_etcd(&mut self, c: usize) -> Result<()> {
        self.mesh.lab().start_etcd(c)?;
        self.model.etcd_down.remove(&c);
        Ok(())
    }

    /// Cut clusters `a` and `b` apart.
    pub fn partition(&mut self, a: usize, b: usize) -> Result<()> {
        self.mesh.lab().partition(a, b)?;
        self.model.partitions.insert((a.min(b), a.max(b)));
        Ok(())
    }

    /// Cut the control planes of `a` and `b` apart (their backends still reach each other).
    pub fn partition_control_plane(&mut self, a: usize, b: usize) -> Result<()> {
        self.mesh.lab().partition_control_plane(a, b)?;
        self.model.control_plane_cuts.insert((a.min(b), a.max(b)));
        Ok(())
    }

    /// Heal the control-plane cut between `a` and `b`.
    pub fn heal_control_plane(&mut self, a: usize, b: usize) -> Result<()> {
        self.mesh.lab().heal_control_plane(a, b)?;
        self.model.control_plane_cuts.remove(&(a.min(b), a.max(b)));
        Ok(())
    }

    /// Heal the partition between `a` and `b`.
    pub fn heal(&mut self, a: usize, b: usize) -> Result<()> {
        self.mesh.lab().heal(a, b)?;
        self.model.partitions.remove(&(a.min(b), a.max(b)));
        Ok(())
    }

    /// Crash node `n` of cluster `c`: every process in it SIGKILLed at once (node-sync, backend,
    /// any probe there).
    pub fn crash_node(&mut self, c: usize, n: usize) -> Result<()> {
        self.mesh.lab().crash_node(c, n)?;
        // The handles in LabMesh see their processes gone; reap them.
        let _ = self.mesh.kill_backend(c, n);
        let _ = self.mesh.kill_node_sync(c, n);
        self.model.crashed.insert((c, n));
        self.model.backend_up.remove(&(c, n));
        self.model.node_sync_up.remove(&(c, n));
        self.model
            .node_sync_down_since
            .entry((c, n))
            .or_insert_with(Instant::now);
        self.model.unreported.insert((c, n));
        Ok(())
    }

    /// Cut node `n` of cluster `c` off the network (its processes keep running; see
    /// `mesh_lab::Lab::isolate_node`). Its maps are not compared until [`ChaosMesh::heal_node`].
    pub fn isolate_node(&mut self, c: usize, n: usize) -> Result<()> {
        self.mesh.lab().isolate_node(c, n)?;
        self.model.isolated.insert((c, n));
        Ok(())
    }

    /// Reconnect a node cut off by [`ChaosMesh::isolate_node`]. Its health publication stays
    /// lapsed (if it had) until [`ChaosMesh::wait_health_published`] sees it back.
    pub fn heal_node(&mut self, c: usize, n: usize) -> Result<()> {
        self.mesh.lab().heal_node(c, n)?;
        self.model.isolated.remove(&(c, n));
        Ok(())
    }

    /// The etcd key node `n` of cluster `c` publishes its health verdicts under.
    pub fn health_key(&self, c: usize, n: usize) -> String {
        format!(
            "clustermesh/v1/health/{}/{}",
            self.mesh.cluster_name(c),
            self.mesh.lab().clusters()[c - 1].nodes[n - 1].name
        )
    }

    /// Whether node `n` of cluster `c` has health verdicts in its cluster's etcd now.
    pub fn health_published(&self, c: usize, n: usize) -> Result<bool> {
        let key = self.health_key(c, n);
        let lab = self.mesh.lab();
        let dir = lab
            .cluster_certs(c)?
            .context("the lab runs plain etcd; the chaos tests need TLS")?;
        let endpoints = lab.etcd_endpoints(c)?;
        self.rt.block_on(async {
            let mut client = tokio::time::timeout(
                Duration::from_secs(3),
                mesh_etcd::connect_as(&dir, mesh_certs::Role::Admin, &endpoints),
            )
            .await
            .context("connect to etcd: no answer in 3 s")??;
            let r = tokio::time::timeout(Duration::from_secs(3), client.get(key.as_str(), None))
                .await
                .with_context(|| format!("etcd get {key}: no answer in 3 s"))??;
            anyhow::Ok(!r.kvs().is_empty())
        })
    }

    /// Wait until node `n` of cluster `c`'s health key is gone from etcd (its lease lapsed),
    /// at most `timeout`; from then on the model counts its backends as lapsed. Returns the wait.
    pub fn wait_health_lapsed(
        &mut self,
        c: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        while self.health_published(c, n)? {
            if started.elapsed() >= timeout {
                bail!(
                    "{} still in etcd {timeout:?} later (node-sync's lease TTL is 10 s)",
                    self.health_key(c, n)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.model.lapsed.insert((c, n));
        Ok(started.elapsed())
    }

    /// Wait until node `n` of cluster `c` publishes health verdicts again, at most `timeout`; from
    /// then on the model counts its backends as checked again. Returns the wait.
    pub fn wait_health_published(
        &mut self,
        c: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        while !self.health_published(c, n)? {
            if started.elapsed() >= timeout {
                bail!(
                    "{} not back in etcd {timeout:?} later:\n{}",
                    self.health_key(c, n),
                    self.mesh
                        .log_tail(&format!("node-sync-{}-n{n}", self.mesh.cluster_name(c)), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.model.lapsed.remove(&(c, n));
        Ok(started.elapsed())
    }

    /// Bring a crashed node back: backend, node-sync, endpoint published ready.
    pub fn restore_node(&mut self, c: usize, n: usize) -> Result<()> {
        self.start_backend(c, n)?;
        self.start_node_sync(c, n)?;
        self.model.crashed.remove(&(c, n));
        self.publish_node(c, n, Published::Ready)
    }
}

async fn wait_grpc(side: &Side, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match clustermesh_cli::connect::open(side).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("apiserver at {} did not come up", side.addr)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Failed connects of one client.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    /// Cluster of the client.
    pub cluster: usize,
    /// Connects attempted.
    pub total: u64,
    /// Connects that failed.
    pub failed: u64,
    /// The first few errors, with their time on the probe's clock.
    pub errors: Vec<(f64, String)>,
    /// Backend name -> connects.
    pub landed: BTreeMap<String, u64>,
    /// Time of the last failure on the probe's clock.
    pub last_failure_ms: Option<f64>,
}

impl fmt::Display for ClientReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client in cluster {}: {} connects, {} failed, landed {:?}",
            self.cluster, self.total, self.failed, self.landed
        )?;
        if !self.errors.is_empty() {
            write!(f, ", first errors {:?}", self.errors)?;
        }
        Ok(())
    }
}

/// The steady stream of new connections: a probe on node 1 of every cluster to its service.
pub struct Traffic {
    probes: Vec<(usize, RunningProbe)>,
}

impl Traffic {
    /// Start one probe per cluster (on node 1), one new connection every `interval`, and wait
    /// until each has landed at least once.
    pub fn start(m: &ChaosMesh, interval: Duration) -> Result<Self> {
        let mut probes = Vec::new();
        for c in 1..=m.model.clusters {
            let p = m.mesh.spawn_probe(c, 1, m.mesh.service_addr(c), interval)?;
            probes.push((c, p));
        }
        for (c, p) in &probes {
            if !p.wait_for(0.0, Duration::from_secs(10), |s| s.ok) {
                bail!("the client in cluster {c} made no successful connect in 10 s");
            }
        }
        Ok(Self { probes })
    }

    /// The probe clock of the client in cluster `c` (for "after" filters).
    pub fn now_ms(&self, c: usize) -> f64 {
        self.probes
            .iter()
            .find(|(pc, _)| *pc == c)
            .map_or(0.0, |(_, p)| p.now_ms())
    }

    /// The probe clocks of every client now.
    pub fn mark(&self) -> BTreeMap<usize, f64> {
        self.probes.iter().map(|(c, p)| (*c, p.now_ms())).collect()
    }

    /// Reports of every client so far (samples at or after `since`, per cluster).
    pub fn report_since(&self, since: &BTreeMap<usize, f64>) -> Vec<ClientReport> {
        self.probes
            .iter()
            .map(|(c, p)| report(*c, &p.samples(), since.get(c).copied().unwrap_or(0.0)))
            .collect()
    }

    /// Stop the clients; every sample's report.
    pub fn stop(self) -> Vec<ClientReport> {
        self.probes
            .into_iter()
            .map(|(c, p)| report(c, &p.stop(), 0.0))
            .collect()
    }
}

fn report(cluster: usize, samples: &[ProbeSample], since: f64) -> ClientReport {
    let mut r = ClientReport {
        cluster,
        ..Default::default()
    };
    for s in samples.iter().filter(|s| s.t_ms >= since) {
        r.total += 1;
        if s.ok {
            if let Some(b) = &s.backend {
                *r.landed.entry(b.clone()).or_default() += 1;
            }
        } else {
            r.failed += 1;
            r.last_failure_ms = Some(r.last_failure_ms.map_or(s.t_ms, |t: f64| t.max(s.t_ms)));
            if r.errors.len() < 5 {
                r.errors
                    .push((s.t_ms, s.error.clone().unwrap_or_else(|| "?".into())));
            }
        }
    }
    r
}

/// Fail when any client saw a failed connect.
pub fn assert_no_failures(reports: &[ClientReport], what: &str) -> Result<()> {
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| r.failed > 0)
        .map(|r| r.to_string())
        .collect();
    if !bad.is_empty() {
        bail!(
            "{what}: clients saw failed connects:\n  {}",
            bad.join("\n  ")
        );
    }
    for r in reports {
        if r.total == 0 {
            bail!(
                "{what}: the client in cluster {} made no connect",
                r.cluster
            );
        }
        eprintln!("[chaos] {what}: {r}");
    }
    Ok(())
}

/// Print the reports.
pub fn print_reports(reports: &[ClientReport], what: &str) {
    for r in reports {
        eprintln!("[chaos] {what}: {r}");
    }
}

/// The setting of the "maps equal the model within" check: `CHAOS_SETTLE_MS` or one second.
pub fn settle_budget() -> Duration {
    std::env::var("CHAOS_SETTLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_usable_backends_win() {
        let m = Model::new(2, 2);
        assert_eq!(m.expected(1), Some([(1, 1), (1, 2)].into()));
    }

    #[test]
    fn a_drained_cluster_fails_over_to_the_others() {
        let mut m = Model::new(3, 2);
        for n in 1..=2 {
            m.published.insert((1, n), Published::Terminating);
        }
        assert_eq!(m.expected(1), Some([(2, 1), (2, 2), (3, 1), (3, 2)].into()));
        assert_eq!(m.expected(2), Some([(2, 1), (2, 2)].into()));
        // cut off from a cluster it fails over to: that cluster leaves within a second (the
        // nodes' own reachability probes)
        m.partitions.insert((1, 3));
        assert_eq!(m.expected(1), Some([(2, 1), (2, 2)].into()));
        assert_eq!(m.expected(2), Some([(2, 1), (2, 2)].into()));
        // its control plane alone cut off: its endpoints may have changed unseen, timing decides
        m.partitions.clear();
        m.control_plane_cuts.insert((1, 3));
        assert_eq!(m.expected(1), None);
    }

    #[test]
    fn affinity_none_uses_every_reachable_cluster() {
        let mut m = Model::new(2, 2);
        m.affinity_none = true;
        let all = [(1, 1), (1, 2), (2, 1), (2, 2)].into();
        assert_eq!(m.expected(1), Some(all));
        m.partitions.insert((1, 2));
        assert_eq!(m.expected(1), Some([(1, 1), (1, 2)].into()));
        assert_eq!(m.expected(2), Some([(2, 1), (2, 2)].into()));
        m.partitions.clear();
        m.control_plane_cuts.insert((1, 2));
        assert_eq!(
            m.expected(1).map(|s| s.len()),
            Some(4),
            "a control-plane cut keeps the remote backends"
        );
    }

    #[test]
    fn a_dead_backend_is_out_only_when_its_node_sync_reports_it() {
        let mut m = Model::new(2, 2);
        m.backend_up.remove(&(1, 1));
        assert_eq!(m.expected(1), Some([(1, 2)].into()));
        m.node_sync_up.remove(&(1, 1));
        m.unreported.insert((1, 1));
        assert_eq!(m.expected(1), None);
        assert!(!m.compared(1, 1));
    }

    #[test]
    fn nothing_usable_anywhere_is_unknown() {
        let mut m = Model::new(2, 1);
        m.published.insert((1, 1), Published::NotReady);
        m.published.insert((2, 1), Published::NotReady);
        assert_eq!(m.expected(1), None);
    }
}
