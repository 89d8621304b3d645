//! A whole mesh deployed on a [`Lab`]: every cluster's clustermesh-apiserver (fed by a
//! manifest directory), a node-sync on every node attached to the node's cgroup, an identity backend on
//! every node, and a global service `default/echo` whose endpoints are those backends.
//!
//! With [`LabMeshSpec::with_pods`] the backends are pods behind their nodes (the node objects carry
//! `spec.podCIDRs`) and node-sync runs with `--routing`: the demo and the chaos suite run that way (native
//! on the switched underlay; vxlan on the routed one where latency and loss are injected, since the delay
//! line takes routed packets only). The backends on the node addresses remain the default of
//! [`LabMeshSpec::new`] for the lab tests that have not moved to pods and for clusters of more than 16
//! nodes (a cluster's pod range holds 16 pod CIDRs).
//!
//! `clustermesh demo`, the lab end-to-end tests and the chaos scenarios all stand on this, so the
//! processes, addresses and manifests are spelled in one place.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::workload::ProbeSample;
use crate::{Lab, LabProcess, LabSpec};

/// Port of the global service on its ClusterIP.
pub const SERVICE_PORT: u16 = 80;
/// Port the backends listen on.
pub const BACKEND_PORT: u16 = 8080;
/// gRPC port of every apiserver (on its control-plane address).
pub const APISERVER_GRPC_PORT: u16 = 9443;
/// Status port of every apiserver.
pub const APISERVER_STATUS_PORT: u16 = 9880;
/// Status port of every node-sync (on its node address).
pub const NODE_SYNC_STATUS_PORT: u16 = 9962;

/// What to deploy.
#[derive(Debug, Clone)]
pub struct LabMeshSpec {
    /// Lab prefix (namespaces, cgroups, state dir are named after it).
    pub prefix: String,
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
    /// Where the binaries `clustermesh-apiserver`, `node-sync` and `clustermesh` are.
    pub bin_dir: PathBuf,
    /// Affinity of the demo service (`local`, `remote`, `none`).
    pub affinity: String,
    /// Extra flags for every node-sync (e.g. `--stale-grace=3s`).
    pub node_sync_args: Vec<String>,
    /// Cluster ids by cluster index (default: the 1-based index); a test sets a duplicate on purpose.
    pub cluster_ids: BTreeMap<usize, u32>,
    /// Extra annotations of the demo service in every cluster (e.g. a health check).
    pub service_annotations: Vec<(String, String)>,
    /// Every backend also serves an HTTP health endpoint on this port, answering as
    /// [`LabMesh::set_health_mode`] says (`ok` until then).
    pub health_port: Option<u16>,
    /// Extra annotations of the demo service in one cluster (by index; e.g. a failover order).
    pub cluster_service_annotations: BTreeMap<usize, Vec<(String, String)>>,
    /// KVStoreMesh: every apiserver mirrors its remotes' keys into its own etcd (`--kvstoremesh`) and
    /// every node-sync reads only its local etcd (`node-sync --kvstoremesh`).
    pub kvstoremesh: bool,
    /// Lifetime of the clusters' leaf certificates (default a year; see `LabSpec::leaf_lifetime`).
    pub leaf_lifetime: Option<Duration>,
    /// Per-cluster trust (default, as the apiserver's and the chart's): every etcd trusts for
    /// clients only its own cluster's intermediate (its `client-ca.pem`); `false`: the mesh bundle. The clusters then read each other with credentials the read cluster
    /// issued: the reader certificates the gRPC connect has minted, or with
    /// [`LabMeshSpec::static_remotes`] each cluster's own `remote` certificate.
    pub cluster_trust: bool,
    /// Every node-sync reads each other cluster through that cluster's own read-only `remote`
    /// certificate, from `--remote-config-dir` entries as `clustermesh connect --context` writes
    /// them (the clusters are then connected from the start; the gRPC connect is not needed).
    pub static_remotes: bool,
    /// The backends run as pods (a namespace behind each node, on the node's pod CIDR, which the node
    /// objects publish as `spec.podCIDRs`) instead of on the node addresses. The router never routes pod
    /// CIDRs: another cluster's pods are reached only through [`LabMeshSpec::routing`].
    pub pods: bool,
    /// node-sync's `--routing` on every node. [`Routing::Native`] puts the clusters on one switched underlay
    /// (`mesh_lab::Underlay::Switched`: latency and loss are then refused), since its routes go via the remote
    /// node's address, which must be on-link.
    pub routing: Routing,
}

/// node-sync's `--routing` in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// No routes (`--routing none`, node-sync's default).
    #[default]
    None,
    /// `--routing native`: one route per remote node's pod CIDR via that node.
    Native,
    /// `--routing vxlan`: an overlay between the nodes, over the routed underlay.
    Vxlan,
}

impl Routing {
    /// The value of node-sync's `--routing`.
    pub fn flag(self) -> &'static str {
        match self {
            Routing::None => "none",
            Routing::Native => "native",
            Routing::Vxlan => "vxlan",
        }
    }

    /// The underlay this mode needs.
    pub fn underlay(self) -> crate::Underlay {
        match self {
            Routing::Native => crate::Underlay::Switched,
            Routing::None | Routing::Vxlan => crate::Underlay::Routed,
        }
    }
}

impl LabMeshSpec {
    /// Defaults: affinity local, binaries next to the running executable.
    pub fn new(prefix: impl Into<String>, clusters: usize, nodes: usize) -> Self {
        Self {
            prefix: prefix.into(),
            clusters,
            nodes,
            bin_dir: default_bin_dir(),
            affinity: "local".into(),
            node_sync_args: Vec::new(),
            cluster_ids: BTreeMap::new(),
            service_annotations: Vec::new(),
            health_port: None,
            cluster_service_annotations: BTreeMap::new(),
            kvstoremesh: false,
            leaf_lifetime: None,
            cluster_trust: true,
            static_remotes: false,
            pods: false,
            routing: Routing::None,
        }
    }

    /// Backends as pods behind the nodes, reached across clusters through node-sync's `routing`.
    pub fn with_pods(mut self, routing: Routing) -> Self {
        self.pods = true;
        self.routing = routing;
        self
    }
}

/// The directory of the running executable, or of the test binary's target directory
/// (`target/debug/deps/x` -> `target/debug`).
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Which condition the demo service's endpoints of a cluster are published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// ready, serving.
    Ready,
    /// not ready, serving, terminating (a graceful drain).
    Terminating,
}

/// A probe running inside a node, collecting [`ProbeSample`]s.
pub struct RunningProbe {
    process: LabProcess,
    samples: Arc<Mutex<Vec<ProbeSample>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl RunningProbe {
    /// Milliseconds on the probe's clock now. The probe stamps every sample with both its own clock and
    /// the wall clock; their offset maps our wall clock onto the probe's (falls back to the time since
    /// spawn before the first sample).
    pub fn now_ms(&self) -> f64 {
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or_default();
        match self.samples.lock().ok().and_then(|v| v.first().cloned()) {
            Some(s) => unix_now - (s.unix_ms as f64 - s.t_ms),
            None => self.started.elapsed().as_secs_f64() * 1000.0,
        }
    }

    /// Samples so far.
    pub fn samples(&self) -> Vec<ProbeSample> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Wait until a sample at or after `t_ms` satisfies `pred`, or `timeout` passes.
    pub fn wait_for(
        &self,
        t_ms: f64,
        timeout: Duration,
        pred: impl Fn(&ProbeSample) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.samples().iter().any(|s| s.t_ms >= t_ms && pred(s)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the probe (SIGTERM, it finishes attempts in flight) and return every sample.
    pub fn stop(mut self) -> Vec<ProbeSample> {
        let _ = self.process.stop_with_grace(Duration::from_secs(3));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.samples()
    }
}

/// The deployed mesh. Dropping it stops every process and tears the lab down.
pub struct LabMesh {
    lab: Option<Lab>,
    spec: LabMeshSpec,
    manifests: PathBuf,
    logs: PathBuf,
    apiservers: BTreeMap<usize, LabProcess>,
    node_syncs: BTreeMap<(usize, usize), LabProcess>,
    backends: BTreeMap<(usize, usize), LabProcess>,
    endpoint_state: BTreeMap<usize, EndpointState>,
    /// Nodes left out of their cluster's node objects ([`LabMesh::set_node_published`]).
    unpublished: std::collections::BTreeSet<(usize, usize)>,
}

impl LabMesh {
    /// Bring up the lab and start everything (apiservers, node-syncs, backends). The clusters are not
    /// connected to each other yet: call [`LabMesh::connect_all`].
    pub fn up(spec: LabMeshSpec) -> Result<Self> {
        Self::up_with(spec, |l| l)
    }

    /// [`LabMesh::up`] with the lab's spec adjusted by `adjust` first (e.g. a pod CIDR given by hand).
    pub fn up_with(spec: LabMeshSpec, adjust: impl FnOnce(LabSpec) -> LabSpec) -> Result<Self> {
        if spec.routing != Routing::None && !spec.pods {
            bail!(
                "--routing {} routes pod CIDRs: the lab needs pods (LabMeshSpec::with_pods)",
                spec.routing.flag()
            );
        }
        for bin in ["clustermesh-apiserver", "node-sync", "clustermesh"] {
            let p = spec.bin_dir.join(bin);
            if !p.is_file() {
                bail!(
                    "{} not found: build the workspace first (cargo build --bins) or pass the directory of the binaries",
                    p.display()
                );
            }
        }
        let mut lab_spec = LabSpec::new(spec.prefix.clone(), spec.clusters, spec.nodes);
        lab_spec.leaf_lifetime = spec.leaf_lifetime;
        lab_spec.etcd_client_trust_cluster = spec.cluster_trust;
        lab_spec.pods = spec.pods;
        lab_spec.underlay = spec.routing.underlay();
        let lab_spec = adjust(lab_spec);
        let lab = Lab::up(lab_spec).with_context(|| format!("bring up lab {}", spec.prefix))?;
        let manifests = lab.state_dir().join("manifests");
        let logs = lab.state_dir().join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
        let mut mesh = LabMesh {
            lab: Some(lab),
            spec,
            manifests,
            logs,
            apiservers: BTreeMap::new(),
            node_syncs: BTreeMap::new(),
            backends: BTreeMap::new(),
            endpoint_state: BTreeMap::new(),
            unpublished: Default::default(),
        };
        for c in 1..=mesh.spec.clusters {
            mesh.write_nodes(c)?;
            mesh.write_service(c, EndpointState::Ready)?;
            for n in 1..=mesh.spec.nodes {
                mesh.start_backend(c, n)?;
            }
            mesh.start_apiserver(c)?;
        }
        if mesh.spec.static_remotes {
            for c in 1..=mesh.spec.clusters {
                mesh.write_remote_entries(c)?;
            }
        }
        for c in 1..=mesh.spec.clusters {
            for n in 1..=mesh.spec.nodes {
                mesh.start_node_sync(c, n)?;
            }
        }
        Ok(mesh)
    }

    /// The lab underneath.
    pub fn lab(&self) -> &Lab {
        self.lab
            .as_ref()
            .expect("the lab lives as long as the mesh")
    }

    /// The spec.
    pub fn spec(&self) -> &LabMeshSpec {
        &self.spec
    }

    /// Name of cluster `c` (1-based).
    pub fn cluster_name(&self, c: usize) -> String {
        self.lab().clusters()[c - 1].name.clone()
    }

    /// The ClusterIP of the demo service in cluster `c`: `10.<lab>.<100+c>.10`, inside the lab's own
    /// address space and on no interface (the socket load balancer rewrites it at connect time).
    pub fn vip(&self, c: usize) -> Ipv4Addr {
        let o = self.lab().clusters()[c - 1].subnet.octets();
        Ipv4Addr::new(o[0], o[1], 100 + c as u8, 10)
    }

    /// `vip:80` of cluster `c`.
    pub fn service_addr(&self, c: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.vip(c), SERVICE_PORT))
    }

    /// The cluster id of cluster `c`.
    pub fn cluster_id(&self, c: usize) -> u32 {
        self.spec.cluster_ids.get(&c).copied().unwrap_or(c as u32)
    }

    /// The backend name on node `n` of cluster `c` (`c1-n1`).
    pub fn backend_name(&self, c: usize, n: usize) -> String {
        format!("{}-n{n}", self.cluster_name(c))
    }

    /// The control-plane address of cluster `c`.
    pub fn control_plane_addr(&self, c: usize) -> Ipv4Addr {
        self.lab().clusters()[c - 1].control_plane.addr
    }

    /// The gRPC address of cluster `c`'s apiserver.
    pub fn apiserver_grpc(&self, c: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            self.control_plane_addr(c),
            APISERVER_GRPC_PORT,
        ))
    }

    /// The status address of cluster `c`'s apiserver (the web page is at `/`).
    pub fn apiserver_status(&self, c: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            self.control_plane_addr(c),
            APISERVER_STATUS_PORT,
        ))
    }

    /// The status address of node-sync on node `n` of cluster `c`.
    pub fn node_sync_status(&self, c: usize, n: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            self.lab().clusters()[c - 1].nodes[n - 1].addr,
            NODE_SYNC_STATUS_PORT,
        ))
    }

    /// The certificate directory of cluster `c`.
    pub fn cert_dir(&self, c: usize) -> Result<PathBuf> {
        let tls = self.lab().clusters()[c - 1]
            .etcd
            .tls
            .as_ref()
            .ok_or_else(|| {
                anyhow!(
                    "lab {} runs plain etcd; the mesh needs TLS",
                    self.spec.prefix
                )
            })?;
        Ok(tls.dir.clone())
    }

    /// The log file of a process of the mesh.
    pub fn log_path(&self, what: &str) -> PathBuf {
        self.logs.join(format!("{what}.log"))
    }

    fn log_stdio(&self, what: &str) -> Result<(Stdio, Stdio)> {
        let path = self.log_path(what);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
    }

    // ---- manifests ----

    fn manifest_dir(&self, c: usize) -> PathBuf {
        self.manifests.join(self.cluster_name(c))
    }

    fn write_file(&self, c: usize, name: &str, text: &str) -> Result<()> {
        let dir = self.manifest_dir(c);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // Write then rename, so the apiserver never reads half a file.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("rename into {}", dir.display()))?;
        Ok(())
    }

    fn write_nodes(&self, c: usize) -> Result<()> {
        let cl = &self.lab().clusters()[c - 1];
        let mut out = String::new();
        for n in &cl.nodes {
            if self.unpublished.contains(&(c, n.index)) {
                continue;
            }
            let spec = match &n.pod {
                Some(p) => format!(
                    "spec:\n  podCIDR: {cidr}\n  podCIDRs: [\"{cidr}\"]\n",
                    cidr = p.cidr()
                ),
                None => String::new(),
            };
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {cluster}-z{idx}\n    topology.kubernetes.io/region: {cluster}\n{spec}status:\n  addresses:\n  - type: InternalIP\n    address: {addr}\n",
                name = n.name,
                cluster = cl.name,
                idx = n.index,
                addr = n.addr
            ));
        }
        self.write_file(c, "nodes.yaml", &out)
    }

    /// Publishes node `n` of cluster `c` in its cluster's node objects, or leaves it out (`false`): a node
    /// joining or leaving the cluster, as the apiserver sees it (its namespace, pod and processes stay).
    pub fn set_node_published(&mut self, c: usize, n: usize, published: bool) -> Result<()> {
        if published {
            self.unpublished.remove(&(c, n));
        } else {
            self.unpublished.insert((c, n));
        }
        self.write_nodes(c)
    }

    /// The address the backend of node `n` of cluster `c` listens on: its pod's with pods, else the node's.
    pub fn backend_addr(&self, c: usize, n: usize) -> Ipv4Addr {
        let node = &self.lab().clusters()[c - 1].nodes[n - 1];
        node.pod.as_ref().map_or(node.addr, |p| p.addr)
    }

    /// The IPv4 routes of node `n` of cluster `c` made with routing protocol `proto` (`ip route show proto
    /// <proto>`; node-sync's is 157), as `(destination, gateway)`, sorted.
    pub fn node_routes(&self, c: usize, n: usize, proto: &str) -> Result<Vec<(String, String)>> {
        let netns = &self.lab().node(c, n)?.netns;
        let out = Command::new("ip")
            .args(["-4", "-n", netns, "route", "show", "proto", proto])
            .output()
            .context("run ip route")?;
        if !out.status.success() {
            bail!(
                "ip route in {netns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut v: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let via = f
                    .iter()
                    .position(|w| *w == "via")
                    .and_then(|i| f.get(i + 1))
                    .map_or(String::new(), |g| g.to_string());
                Some((f.first()?.to_string(), via))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// The EndpointSlice endpoints of cluster `c`'s backends (one per node), with the conditions
    /// `(ready, serving, terminating)` that `conditions` gives for each node index.
    pub fn endpoints_yaml(
        &self,
        c: usize,
        conditions: impl Fn(usize) -> (bool, bool, bool),
    ) -> String {
        let cl = &self.lab().clusters()[c - 1];
        let mut endpoints = String::new();
        for n in &cl.nodes {
            let (ready, serving, terminating) = conditions(n.index);
            endpoints.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  zone: {cluster}-z{idx}\n  conditions:\n    ready: {ready}\n    serving: {serving}\n    terminating: {terminating}\n",
                addr = n.pod.as_ref().map_or(n.addr, |p| p.addr),
                node = n.name,
                cluster = cl.name,
                idx = n.index,
            ));
        }
        endpoints
    }

    /// The demo service's manifest for cluster `c` (Service with the spec's affinity and extra
    /// annotations, and an EndpointSlice with `endpoints`, a YAML list of endpoints).
    pub fn service_manifest(&self, c: usize, endpoints: &str) -> String {
        let cl = &self.lab().clusters()[c - 1];
        let mut extra = String::new();
        for (k, v) in self.spec.service_annotations.iter().chain(
            self.spec
                .cluster_service_annotations
                .get(&c)
                .into_iter()
                .flatten(),
        ) {
            extra.push_str(&format!("    {k}: \"{v}\"\n"));
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\n  annotations:\n    clustermesh.io/global: \"true\"\n    clustermesh.io/affinity: {affinity}\n{extra}spec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [\"{vip}\"]\n  ports:\n  - name: echo\n    port: {SERVICE_PORT}\n    targetPort: {BACKEND_PORT}\n    protocol: TCP\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-{cluster}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nports:\n- name: echo\n  port: {BACKEND_PORT}\n  protocol: TCP\nendpoints:\n{endpoints}",
            affinity = self.spec.affinity,
            vip = self.vip(c),
            cluster = cl.name,
        )
    }

    /// Switch the demo service of every cluster to `affinity` (`local`, `remote`, `none`), keeping
    /// each cluster's endpoint state.
    pub fn set_affinity(&mut self, affinity: &str) -> Result<()> {
        self.spec.affinity = affinity.to_owned();
        for c in 1..=self.spec.clusters {
            let state = self
                .endpoint_state
                .get(&c)
                .copied()
                .unwrap_or(EndpointState::Ready);
            self.write_service(c, state)?;
        }
        Ok(())
    }

    /// Publish the demo service of cluster `c` with its endpoints in `state` (the apiserver picks the
    /// file change up; node-syncs everywhere follow).
    pub fn write_service(&mut self, c: usize, state: EndpointState) -> Result<()> {
        let (ready, terminating) = match state {
            EndpointState::Ready => (true, false),
            EndpointState::Terminating => (false, true),
        };
        let endpoints = self.endpoints_yaml(c, |_| (ready, true, terminating));
        let text = self.service_manifest(c, &endpoints);
        self.write_file(c, "echo.yaml", &text)?;
        self.endpoint_state.insert(c, state);
        Ok(())
    }

    // ---- processes ----

    /// Start (or restart) cluster `c`'s apiserver.
    pub fn start_apiserver(&mut self, c: usize) -> Result<()> {
        if let Some(mut old) = self.apiservers.remove(&c) {
            let _ = old.stop();
        }
        let cl = self.lab().clusters()[c - 1].clone();
        let cp = cl.control_plane.addr;
        let data_dir = self
            .lab()
            .state_dir()
            .join(format!("apiserver-{}", cl.name));
        let mut cmd = self
            .lab()
            .control_plane_command(c, self.spec.bin_dir.join("clustermesh-apiserver"))?;
        cmd.args([
            format!("--cluster-name={}", cl.name),
            format!("--cluster-id={}", self.cluster_id(c)),
            format!("--etcd-endpoints={}", cl.etcd.client_url),
            format!("--tls-dir={}", self.cert_dir(c)?.display()),
            "--source=manifests".into(),
            format!("--manifest-dir={}", self.manifest_dir(c).display()),
            // Kubernetes delivers a change to a watch in milliseconds; the manifest source polls, so
            // poll often enough that drills measure the mesh, not the poll.
            "--manifest-poll-interval=50ms".into(),
            format!("--grpc-listen={cp}:{APISERVER_GRPC_PORT}"),
            format!("--status-listen={cp}:{APISERVER_STATUS_PORT}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--replica-id={}-apiserver", cl.name),
        ]);
        if self.spec.kvstoremesh {
            cmd.arg("--kvstoremesh");
        }
        let (out, err) = self.log_stdio(&format!("apiserver-{}", cl.name))?;
        cmd.stdout(out).stderr(err).env("RUST_LOG", "info");
        let p = self.lab().spawn(cmd)?;
        self.apiservers.insert(c, p);
        Ok(())
    }

    /// SIGKILL cluster `c`'s apiserver.
    pub fn kill_apiserver(&mut self, c: usize) -> Result<()> {
        if let Some(mut p) = self.apiservers.remove(&c) {
            p.kill()?;
        }
        Ok(())
    }

    /// Start (or restart) node-sync on node `n` of cluster `c`.
    pub fn start_node_sync(&mut self, c: usize, n: usize) -> Result<()> {
        if let Some(mut old) = self.node_syncs.remove(&(c, n)) {
            let _ = old.stop();
        }
        let cl = self.lab().clusters()[c - 1].clone();
        let node = cl.nodes[n - 1].clone();
        let mut cmd = self
            .lab()
            .node_command(c, n, self.spec.bin_dir.join("node-sync"))?;
        cmd.args([
            format!("--cluster-name={}", cl.name),
            format!("--cluster-id={}", self.cluster_id(c)),
            format!("--node-name={}", node.name),
            format!("--etcd-endpoints={}", cl.etcd.client_url),
            format!("--tls-dir={}", self.cert_dir(c)?.display()),
            format!("--cgroup={}", node.cgroup.display()),
            format!("--bpffs={}", node.bpffs.display()),
            format!("--status-listen={}:{NODE_SYNC_STATUS_PORT}", node.addr),
        ]);
        if self.spec.kvstoremesh {
            cmd.arg("--kvstoremesh");
        }
        if self.spec.routing != Routing::None {
            cmd.arg(format!("--routing={}", self.spec.routing.flag()));
        }
        if self.spec.static_remotes {
            cmd.arg(format!(
                "--remote-config-dir={}",
                self.remotes_dir(c).display()
            ));
        }
        cmd.args(&self.spec.node_sync_args);
        let (out, err) = self.log_stdio(&format!("node-sync-{}-{}", cl.name, node.name))?;
        cmd.stdout(out).stderr(err).env("RUST_LOG", "info");
        let p = self.lab().spawn(cmd)?;
        self.node_syncs.insert((c, n), p);
        Ok(())
    }

    /// Where cluster `c`'s node-syncs read their static remotes (with [`LabMeshSpec::static_remotes`]).
    pub fn remotes_dir(&self, c: usize) -> PathBuf {
        self.lab().state_dir().join(format!("remotes-c{c}"))
    }

    /// Cluster `c`'s remote entries: every other cluster, through that cluster's own read-only
    /// `remote` certificate, as `clustermesh connect --context` writes them into a remotes Secret.
    fn write_remote_entries(&self, c: usize) -> Result<()> {
        let dir = self.remotes_dir(c);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for other in (1..=self.spec.clusters).filter(|&o| o != c) {
            let cl = &self.lab().clusters()[other - 1];
            let certs = mesh_certs::ClusterDir::open(&self.cert_dir(other)?)?;
            let read =
                |p: PathBuf| std::fs::read(&p).with_context(|| format!("read {}", p.display()));
            let tls = mesh_model::remotes::RemoteTls {
                ca_bundle: read(certs.ca_bundle())?,
                cert: read(certs.cert(mesh_certs::Role::Remote))?,
                key: read(certs.key(mesh_certs::Role::Remote))?,
            };
            let entry = mesh_model::remotes::entry(
                &cl.name,
                self.cluster_id(other),
                &cl.etcd.client_urls(),
                &tls,
            );
            for (file, bytes) in entry {
                let p = dir.join(file);
                std::fs::write(&p, bytes).with_context(|| format!("write {}", p.display()))?;
            }
        }
        Ok(())
    }

    /// SIGKILL node-sync on node `n` of cluster `c`.
    pub fn kill_node_sync(&mut self, c: usize, n: usize) -> Result<()> {
        if let Some(mut p) = self.node_syncs.remove(&(c, n)) {
            p.kill()?;
        }
        Ok(())
    }

    /// Start (or restart) the identity backend on node `n` of cluster `c`, and wait until it listens.
    fn health_mode_file(&self, c: usize, n: usize) -> PathBuf {
        self.lab()
            .state_dir()
            .join(format!("health-mode-{}", self.backend_name(c, n)))
    }

    /// What the HTTP health endpoint of backend `n` of cluster `c` answers from now on (with
    /// `health_port` set): `ok` 200, `fail` 503, `flap` 200 and 503 in turn.
    pub fn set_health_mode(&self, c: usize, n: usize, mode: &str) -> Result<()> {
        let path = self.health_mode_file(c, n);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, mode).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename {}", path.display()))?;
        Ok(())
    }

    pub fn start_backend(&mut self, c: usize, n: usize) -> Result<()> {
        if let Some(mut old) = self.backends.remove(&(c, n)) {
            let _ = old.kill();
        }
        let program = self.spec.bin_dir.join("clustermesh");
        let mut cmd = if self.spec.pods {
            self.lab().pod_command(c, n, program)?
        } else {
            self.lab().node_command(c, n, program)?
        };
        cmd.args([
            "workload".to_string(),
            "backend".into(),
            format!("--name={}", self.backend_name(c, n)),
            format!("--tcp=0.0.0.0:{BACKEND_PORT}"),
            format!("--udp=0.0.0.0:{BACKEND_PORT}"),
        ]);
        if let Some(port) = self.spec.health_port {
            cmd.arg(format!("--health=0.0.0.0:{port}"));
            cmd.arg(format!(
                "--health-mode-file={}",
                self.health_mode_file(c, n).display()
            ));
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut p = self.lab().spawn(cmd)?;
        // The backend prints "ready" once it listens.
        let stdout = p
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("backend stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!(
                "backend {} did not start: {line:?}",
                self.backend_name(c, n)
            );
        }
        self.backends.insert((c, n), p);
        Ok(())
    }

    /// SIGKILL the backend on node `n` of cluster `c`.
    pub fn kill_backend(&mut self, c: usize, n: usize) -> Result<()> {
        if let Some(mut p) = self.backends.remove(&(c, n)) {
            p.kill()?;
        }
        Ok(())
    }

    /// Stop the backend on node `n` of cluster `c` gracefully (SIGTERM).
    pub fn stop_backend(&mut self, c: usize, n: usize) -> Result<()> {
        if let Some(mut p) = self.backends.remove(&(c, n)) {
            p.stop_with_grace(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Start a probe on node `n` of cluster `c` against `target`, one new connection every `interval`.
    pub fn spawn_probe(
        &self,
        c: usize,
        n: usize,
        target: SocketAddr,
        interval: Duration,
    ) -> Result<RunningProbe> {
        let mut cmd = self
            .lab()
            .node_command(c, n, self.spec.bin_dir.join("clustermesh"))?;
        cmd.args([
            "workload".to_string(),
            "probe".into(),
            format!("--target={target}"),
            format!("--interval={}ms", interval.as_millis().max(1)),
            "--timeout=1s".into(),
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let started = Instant::now();
        let mut process = self.lab().spawn(cmd)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("probe stdout"))?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(s) = serde_json::from_str::<ProbeSample>(&line)
                    && let Ok(mut v) = sink.lock()
                {
                    v.push(s);
                }
            }
        });
        Ok(RunningProbe {
            process,
            samples,
            reader: Some(reader),
            started,
        })
    }

    /// The JSON status of node-sync on node `n` of cluster `c`.
    pub fn node_sync_status_json(&self, c: usize, n: usize) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.node_sync_status(c, n), "/api/v1/status")?;
        if code != 200 {
            bail!("node-sync {c}/{n} status: HTTP {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The established TCP connections from node `n` of cluster `c` to the etcd of cluster `to`, as
    /// `ss` shows them inside the node's network namespace: (peer address, owning process).
    pub fn etcd_connections(
        &self,
        c: usize,
        n: usize,
        to: usize,
    ) -> Result<Vec<(SocketAddr, String)>> {
        let etcd: Vec<SocketAddr> = self.lab().clusters()[to - 1]
            .etcd
            .client_urls()
            .iter()
            .filter_map(|u| u.rsplit("://").next()?.trim_end_matches('/').parse().ok())
            .collect();
        if etcd.is_empty() {
            bail!("no etcd client address of {}", self.cluster_name(to));
        }
        let netns = &self.lab().node(c, n)?.netns;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "ss",
                "-Htnp",
                "state",
                "established",
            ])
            .output()
            .context("run ss in the node's namespace")?;
        if !out.status.success() {
            bail!("ss in {netns}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // With a state filter the columns are: Recv-Q Send-Q Local Peer [Process].
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let peer: SocketAddr = f.get(3)?.parse().ok()?;
                etcd.contains(&peer)
                    .then(|| (peer, f.get(4..).map(|p| p.join(" ")).unwrap_or_default()))
            })
            .collect())
    }

    /// Wait until a connection from node `n` of cluster `c` to the service lands on a backend whose
    /// name satisfies `pred`, several times in a row (all traffic goes there).
    pub fn wait_for_landing(
        &self,
        c: usize,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<()> {
        self.wait_for_landings(c, n, timeout, pred, 5)
    }

    /// Wait until `in_a_row` connections in a row from node `n` of cluster `c` land on backends
    /// whose names satisfy `pred` (1: some traffic goes there, as with affinity none, where
    /// every backend of the mesh takes a share).
    pub fn wait_for_landings(
        &self,
        c: usize,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
        in_a_row: usize,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut streak = 0;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut cmd = self
                .lab()
                .node_command(c, n, self.spec.bin_dir.join("clustermesh"))?;
            cmd.args([
                "workload".to_string(),
                "probe".into(),
                format!("--target={}", self.service_addr(c)),
                "--interval=5ms".into(),
                "--duration=40ms".into(),
                "--timeout=300ms".into(),
            ]);
            let out = cmd.output().context("run probe")?;
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines() {
                match serde_json::from_str::<ProbeSample>(line) {
                    Ok(s) if s.ok && s.backend.as_deref().is_some_and(&pred) => {
                        streak += 1;
                        if streak >= in_a_row.max(1) {
                            return Ok(());
                        }
                    }
                    Ok(s) => {
                        streak = 0;
                        last = s.backend.or(s.error).unwrap_or_default();
                    }
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "connections from {}/n{n} to {} did not land as expected within {timeout:?} (last: {last})",
            self.cluster_name(c),
            self.service_addr(c)
        )
    }

    /// The log tail of a process (for error messages); a panic is shown with its message, not its
    /// backtrace.
    pub fn log_tail(&self, what: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(what)).unwrap_or_default();
        let v: Vec<&str> = text.lines().filter(|l| !l.starts_with("  ")).collect();
        if let Some(i) = v.iter().position(|l| l.contains("panicked at")) {
            return v[i..(i + 3).min(v.len())].join("\n");
        }
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Stop every process and tear the lab down.
    pub fn teardown(mut self) -> Result<()> {
        self.stop_all();
        match self.lab.take() {
            Some(lab) => lab.teardown().map_err(Into::into),
            None => Ok(()),
        }
    }

    fn stop_all(&mut self) {
        for (_, mut p) in std::mem::take(&mut self.node_syncs) {
            let _ = p.stop_with_grace(Duration::from_secs(3));
        }
        for (_, mut p) in std::mem::take(&mut self.apiservers) {
            let _ = p.stop_with_grace(Duration::from_secs(3));
        }
        for (_, mut p) in std::mem::take(&mut self.backends) {
            let _ = p.kill();
        }
    }
}

impl Drop for LabMesh {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A minimal HTTP/1.0 GET (status code, body), for status endpoints inside the lab.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("read {addr}{path}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response from {addr}{path}"))?;
    Ok((code, body.to_owned()))
}

/// Whether this process may run the lab: root, bpffs and cgroup v2 usable, etcd installed.
/// Returns what is missing, in words.
pub fn preflight() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix_is_root() {
        missing.push("root: the lab creates network namespaces and cgroups and loads eBPF programs (run with sudo)".into());
    }
    if !Path::new("/usr/bin/etcd").is_file() {
        missing.push("etcd: install Debian's etcd-server (scripts/setup.sh does)".into());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        missing.push("bpffs: the kernel has no /sys/fs/bpf (BPF is not available)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        missing.push("ip: install iproute2".into());
    }
    if Command::new("nft").arg("--version").output().is_err() {
        missing.push("nft: install nftables".into());
    }
    missing
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
