//! The lab's layout as pure data: names, addresses, paths. No I/O here.
//!
//! A lab with prefix `P` and address octet `X` (allocated per lab, see [`OCTETS`]) looks like this:
//!
//! ```text
//! host ──(veth mlhX / 10.X.0.2)──── router netns `P-router` (10.X.0.1 on `uplink`, ip_forward on)
//!                                      ├─ bridge br1 10.X.1.1/24 ── c1cp ── `P-c1-cp`  10.X.1.2  (etcd :2379)
//!                                      │                          ├ c1n1 ── `P-c1-n1`  10.X.1.11
//!                                      │                          └ c1n2 ── `P-c1-n2`  10.X.1.12
//!                                      └─ bridge br2 10.X.2.1/24 ── ...
//! ```
//!
//! Traffic inside a cluster is bridged (never impaired); traffic between clusters is routed by the router
//! namespace, where partitions (nft) and latency/loss (a user-space delay line, see [`crate::impair`]) apply.
//! The host reaches every lab address through its veth, so tests and the CLI talk to etcd directly.
//!
//! # Pods ([`LabSpec::pods`])
//!
//! As in Kubernetes, each node then gets a pod CIDR (a /28 of its cluster's pod range `10.X.<190+c>.0/24`:
//! node `n` has `10.X.<190+c>.<16(n-1)>/28`) and a pod: a namespace `P-c<c>-n<n>-pod` behind the node (veth
//! `pod0` in the node, `.1` of the CIDR; `eth0` in the pod, `.2`, default route via the node). Nodes of one
//! cluster route each other's pod CIDRs (what the CNI does inside a cluster); the router never routes a pod
//! CIDR (on the routed underlay it drops routed packets to one), so a pod of another cluster is reachable
//! only through what node-sync installs (`--routing`).
//!
//! # Underlays ([`Underlay`])
//!
//! [`Underlay::Routed`] is the picture above. [`Underlay::Switched`] puts every member of every cluster on one
//! bridge (`brlab`), each cluster keeping its /24 and gateway, every member with an on-link route to the other
//! clusters' /24s: the nodes of all clusters reach each other directly, as kind's nodes on one Docker network
//! do, which `--routing native` needs (its routes go via the remote node's address, which must be on-link).
//! Partitions still apply there (bridged IPv4 goes through the router's nft forward chain,
//! `bridge-nf-call-iptables`); latency and loss do not (the delay line takes routed packets only).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// Where lab state lives by default: `/run/mesh-lab/<prefix>/state.json`.
pub const DEFAULT_STATE_ROOT: &str = "/run/mesh-lab";
/// etcd client port on every control-plane address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd peer port on every control-plane address.
pub const ETCD_PEER_PORT: u16 = 2380;
/// Most members one cluster's etcd may have.
pub const MAX_ETCD_MEMBERS: usize = 5;
/// Environment variable read by [`LabSpec::new`] for [`LabSpec::etcd_members`]: `<cluster>=<members>` pairs,
/// comma-separated (e.g. `1=3`). For harnesses that build the spec themselves and have no option for it.
pub const ETCD_MEMBERS_ENV: &str = "MESH_LAB_ETCD_MEMBERS";
/// Most clusters one lab may have.
pub const MAX_CLUSTERS: usize = 64;
/// Most nodes one cluster may have.
pub const MAX_NODES: usize = 200;
/// Longest lab prefix (it ends up in namespace names).
pub const MAX_PREFIX_LEN: usize = 24;
/// Third octets of the lab's `10.<octet>.0.0/16` that no interface ever gets (clusters use 1..=[`MAX_CLUSTERS`],
/// the host link 0, pods `POD_RANGE_BASE + c`): free for virtual addresses such as service VIPs, which stay
/// inside the lab's range.
pub const UNASSIGNED_THIRD_OCTETS: RangeInclusive<u8> = 100..=POD_RANGE_BASE;
/// Second octets a lab may take: lab addresses are `10.<octet>.0.0/16`, one octet per live lab.
pub const OCTETS: RangeInclusive<u8> = 100..=249;
/// Cluster `c`'s pod range (with [`LabSpec::pods`]) is `10.<octet>.<POD_RANGE_BASE + c>.0/24`.
pub const POD_RANGE_BASE: u8 = 190;
/// Prefix length of a node's pod CIDR: a /28 of its cluster's pod range.
pub const POD_CIDR_PREFIX: u8 = 28;
/// Most nodes per cluster with pods (16 /28s fill a cluster's /24 pod range).
pub const MAX_NODES_WITH_PODS: usize = 16;
/// The single bridge of an [`Underlay::Switched`] lab, in the router namespace.
pub const SWITCHED_BRIDGE: &str = "brlab";

/// How the clusters' members reach each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Underlay {
    /// One bridge per cluster; the router routes between clusters (partitions, latency and loss apply).
    #[default]
    Routed,
    /// One bridge for every cluster: every node reaches every other node directly (on-link), as `--routing
    /// native` needs. Partitions apply; latency and loss are refused.
    Switched,
}

/// A node's pod: its network namespace behind the node and its pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// Network namespace of the pod (`P-c<c>-n<n>-pod`).
    pub netns: String,
    /// The node's pod CIDR's network address.
    pub network: Ipv4Addr,
    /// The node's pod CIDR's prefix length.
    pub prefix_len: u8,
    /// The node's address on its veth to the pod (`pod0`), the pod's default gateway (`.1`).
    pub gateway: Ipv4Addr,
    /// The pod's address (on its `eth0`, `.2`).
    pub addr: Ipv4Addr,
}

impl PodInfo {
    /// The pod CIDR, e.g. `10.123.191.16/28`: what the node object's `spec.podCIDRs` says.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network, self.prefix_len)
    }

    fn of(netns: String, network: Ipv4Addr, prefix_len: u8) -> Result<PodInfo> {
        let n = u32::from(network);
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        if prefix_len > 30 || n & !mask != 0 {
            return Err(LabError::Spec(format!(
                "pod CIDR {network}/{prefix_len}: a network address with a prefix of at most /30"
            )));
        }
        Ok(PodInfo {
            netns,
            network,
            prefix_len,
            gateway: Ipv4Addr::from(n + 1),
            addr: Ipv4Addr::from(n + 2),
        })
    }
}

/// How the clusters' etcd servers are secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdSecurity {
    /// Plain HTTP, no authentication. Only for tests that ask for it.
    Plain,
    /// TLS with client-certificate authentication and etcd RBAC (users `root`, `admin-<cluster>`,
    /// `node-<cluster>`); certificates issued by a per-lab CA with `mesh_certs`.
    #[default]
    Tls,
}

/// What to build: the input of [`crate::Lab::up`].
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Lab prefix: `[a-z][a-z0-9-]*`, at most [`MAX_PREFIX_LEN`] chars, not ending in `-`. Namespaces, cgroups and
    /// the state directory are named after it; two labs with different prefixes never collide.
    pub prefix: String,
    /// Number of clusters, 1..=[`MAX_CLUSTERS`].
    pub clusters: usize,
    /// Nodes per cluster, 1..=[`MAX_NODES`].
    pub nodes_per_cluster: usize,
    /// Cluster names (ClusterMesh rules); empty means `c1`, `c2`, ... Cluster ids are the 1-based indices.
    pub cluster_names: Vec<String>,
    /// How etcd is secured (default [`EtcdSecurity::Tls`]).
    pub etcd: EtcdSecurity,
    /// The etcd binary (default `/usr/bin/etcd`).
    pub etcd_binary: PathBuf,
    /// Directory for lab state (default [`DEFAULT_STATE_ROOT`]).
    pub state_root: PathBuf,
    /// How long to wait for each etcd to report healthy.
    pub etcd_ready_timeout: Duration,
    /// Members of a cluster's etcd by cluster index (1-based); clusters not named here get one member. A cluster
    /// with `k > 1` members runs them all in its control-plane namespace, member `m` (1-based) on address `.1+m`
    /// (`.2`, `.3`, `.4`, ...), with peer TLS like the clients'. Default: [`ETCD_MEMBERS_ENV`], else empty.
    pub etcd_members: BTreeMap<usize, usize>,
    /// Lifetime of every cluster's leaf certificates (default: `mesh_certs::Validity`'s, a year). A
    /// renewal scenario issues minutes-long leaves and renews them while the lab runs.
    pub leaf_lifetime: Option<Duration>,
    /// Every etcd trusts for clients only its own cluster's intermediate (`ClientTrust::Cluster`);
    /// other clusters then read it with the credential it issued (its `remote` certificate).
    pub etcd_client_trust_cluster: bool,
    /// Every node gets a pod CIDR and a pod namespace behind it (see the module doc); at most
    /// [`MAX_NODES_WITH_PODS`] nodes per cluster.
    pub pods: bool,
    /// How members of different clusters reach each other (default [`Underlay::Routed`]).
    pub underlay: Underlay,
    /// Pod CIDRs given by hand, by `(cluster, node)` (1-based), instead of the node's /28: e.g. an overlap
    /// on purpose.
    pub pod_cidrs: BTreeMap<(usize, usize), PodCidr>,
}

/// A pod CIDR given by hand ([`LabSpec::pod_cidrs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodCidr {
    /// `network/prefix length`.
    Given(Ipv4Addr, u8),
    /// The /28 another node `(cluster, node)` gets by default (the lab's address range is allocated at
    /// `up`, so an overlap on purpose is said this way).
    SameAs(usize, usize),
}

impl LabSpec {
    /// A spec with defaults: names `c1..cN`, TLS etcd from `/usr/bin/etcd`, state under `/run/mesh-lab`.
    pub fn new(prefix: impl Into<String>, clusters: usize, nodes_per_cluster: usize) -> Self {
        LabSpec {
            prefix: prefix.into(),
            clusters,
            nodes_per_cluster,
            cluster_names: Vec::new(),
            etcd: EtcdSecurity::default(),
            etcd_binary: PathBuf::from("/usr/bin/etcd"),
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            etcd_ready_timeout: Duration::from_secs(30),
            etcd_members: std::env::var(ETCD_MEMBERS_ENV)
                .map(|v| parse_etcd_members(&v))
                .unwrap_or_default(),
            leaf_lifetime: None,
            etcd_client_trust_cluster: false,
            pods: false,
            underlay: Underlay::default(),
            pod_cidrs: BTreeMap::new(),
        }
    }

    /// Gives every node a pod (see the module doc).
    pub fn with_pods(mut self) -> Self {
        self.pods = true;
        self
    }

    /// Sets the underlay.
    pub fn underlay(mut self, underlay: Underlay) -> Self {
        self.underlay = underlay;
        self
    }

    /// Gives node `n` of cluster `c` (1-based) the pod CIDR `network/prefix_len` instead of its /28.
    pub fn pod_cidr(mut self, c: usize, n: usize, network: Ipv4Addr, prefix_len: u8) -> Self {
        self.pod_cidrs
            .insert((c, n), PodCidr::Given(network, prefix_len));
        self
    }

    /// Gives node `n` of cluster `c` the pod CIDR that node `of_n` of cluster `of_c` gets by default: an
    /// overlap on purpose.
    pub fn pod_cidr_same_as(mut self, c: usize, n: usize, of_c: usize, of_n: usize) -> Self {
        self.pod_cidrs.insert((c, n), PodCidr::SameAs(of_c, of_n));
        self
    }

    /// Issues every cluster's leaf certificates with this lifetime (at least a minute).
    pub fn leaf_lifetime(mut self, lifetime: Duration) -> Self {
        self.leaf_lifetime = Some(lifetime);
        self
    }

    /// Gives cluster `cluster` (1-based) an etcd of `members` members (odd, at most [`MAX_ETCD_MEMBERS`]).
    pub fn etcd_members(mut self, cluster: usize, members: usize) -> Self {
        self.etcd_members.insert(cluster, members);
        self
    }

    /// Members of cluster `index`'s etcd.
    fn members_of(&self, index: usize) -> usize {
        self.etcd_members.get(&index).copied().unwrap_or(1)
    }

    /// Sets the etcd security mode.
    pub fn etcd_security(mut self, security: EtcdSecurity) -> Self {
        self.etcd = security;
        self
    }

    /// Sets the cluster names (their number must equal `clusters`).
    pub fn cluster_names<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.cluster_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// Checks every rule; the error says which one failed.
    pub fn validate(&self) -> Result<()> {
        check_prefix(&self.prefix)?;
        if let Some(l) = self.leaf_lifetime
            && l < Duration::from_secs(60)
        {
            return Err(LabError::Spec(format!(
                "leaf lifetime {l:?}: at least a minute (components must start before it ends)"
            )));
        }
        for (&c, &k) in &self.etcd_members {
            if c == 0 || c > self.clusters {
                return Err(LabError::Spec(format!(
                    "etcd members given for cluster {c}, but the lab has clusters 1..={}",
                    self.clusters
                )));
            }
            if k == 0 || k > MAX_ETCD_MEMBERS || k % 2 == 0 {
                return Err(LabError::Spec(format!(
                    "cluster {c}: etcd members must be odd and 1..={MAX_ETCD_MEMBERS} (a quorum), got {k}"
                )));
            }
        }
        if !(1..=MAX_CLUSTERS).contains(&self.clusters) {
            return Err(LabError::Spec(format!(
                "clusters must be 1..={MAX_CLUSTERS}, got {}",
                self.clusters
            )));
        }
        if !(1..=MAX_NODES).contains(&self.nodes_per_cluster) {
            return Err(LabError::Spec(format!(
                "nodes per cluster must be 1..={MAX_NODES}, got {}",
                self.nodes_per_cluster
            )));
        }
        if self.pods && self.nodes_per_cluster > MAX_NODES_WITH_PODS {
            return Err(LabError::Spec(format!(
                "with pods, at most {MAX_NODES_WITH_PODS} nodes per cluster (a /{POD_CIDR_PREFIX} each in the \
                 cluster's /24 pod range), got {}",
                self.nodes_per_cluster
            )));
        }
        if !self.pods && !self.pod_cidrs.is_empty() {
            return Err(LabError::Spec(
                "pod CIDRs given for a lab without pods".into(),
            ));
        }
        for (&(c, n), how) in &self.pod_cidrs {
            let mut nodes = vec![(c, n)];
            if let PodCidr::SameAs(oc, on) = how {
                nodes.push((*oc, *on));
            }
            for (c, n) in nodes {
                if c == 0 || c > self.clusters || n == 0 || n > self.nodes_per_cluster {
                    return Err(LabError::Spec(format!(
                        "pod CIDR given for node {n} of cluster {c}, which the lab does not have"
                    )));
                }
            }
        }
        if !self.cluster_names.is_empty() {
            if self.cluster_names.len() != self.clusters {
                return Err(LabError::Spec(format!(
                    "{} cluster names given for {} clusters",
                    self.cluster_names.len(),
                    self.clusters
                )));
            }
            for (i, n) in self.cluster_names.iter().enumerate() {
                mesh_model::cluster::ClusterName::new(n)
                    .map_err(|e| LabError::Spec(format!("cluster name {n:?}: {e}")))?;
                if self.cluster_names[..i].contains(n) {
                    return Err(LabError::Spec(format!("cluster name {n:?} given twice")));
                }
            }
        }
        Ok(())
    }

    /// The name of cluster `index` (1-based).
    fn cluster_name(&self, index: usize) -> String {
        self.cluster_names
            .get(index - 1)
            .cloned()
            .unwrap_or_else(|| format!("c{index}"))
    }
}

/// Parses [`ETCD_MEMBERS_ENV`]: `1=3,2=3`. Pairs that do not parse are ignored (validation names bad counts).
pub fn parse_etcd_members(v: &str) -> BTreeMap<usize, usize> {
    v.split(',')
        .filter_map(|p| {
            let (c, k) = p.trim().split_once('=')?;
            Some((c.trim().parse().ok()?, k.trim().parse().ok()?))
        })
        .collect()
}

/// Checks a lab prefix: `[a-z][a-z0-9-]*`, at most [`MAX_PREFIX_LEN`] chars, not ending in `-`.
pub fn check_prefix(prefix: &str) -> Result<()> {
    let bad = |why: &str| Err(LabError::Spec(format!("lab prefix {prefix:?}: {why}")));
    if prefix.is_empty() {
        return bad("must not be empty");
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return bad(&format!("longer than {MAX_PREFIX_LEN} chars"));
    }
    if !prefix.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("must start with a lowercase letter");
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if prefix.ends_with('-') {
        return bad("must not end with '-'");
    }
    Ok(())
}

/// One network namespace of a cluster: a node or the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// 1-based cluster index.
    pub cluster: usize,
    /// 1-based node index; 0 for the control plane.
    pub index: usize,
    /// Node name within its cluster: `n1`, `n2`, ... or `cp`.
    pub name: String,
    /// Network namespace name (`ip netns exec <netns>`; `/run/netns/<netns>`).
    pub netns: String,
    /// The namespace's address (on `eth0`, /24 of the cluster subnet).
    pub addr: Ipv4Addr,
    /// The veth end in the router namespace (a port of the cluster bridge).
    pub router_port: String,
    /// The cgroup v2 directory of this node (absolute path); processes of the node run in it.
    pub cgroup: PathBuf,
    /// The node's pod, with [`LabSpec::pods`] (never for the control plane).
    #[serde(default)]
    pub pod: Option<PodInfo>,
    /// A bpffs directory for this node's pinned BPF objects (`/sys/fs/bpf/mesh-lab/<prefix>/c<i>-<name>`),
    /// removed with the lab.
    #[serde(default)]
    pub bpffs: PathBuf,
}

/// One cluster's etcd: where it listens and where its files are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdInfo {
    /// etcd member name.
    pub name: String,
    /// Client URL (`http://` or `https://<control-plane addr>:2379`), reachable from the host and every node. With
    /// several members: every member's client URL, comma-separated (the form `--etcd-endpoints` takes, so the
    /// apiserver and node-syncs started with it know every member); [`EtcdInfo::client_urls`] splits it.
    pub client_url: String,
    /// Peer URL.
    pub peer_url: String,
    /// Data directory (kept across [`crate::Lab::restart_etcd`]).
    pub data_dir: PathBuf,
    /// Log file (stdout and stderr of etcd, appended across restarts).
    pub log_file: PathBuf,
    /// TLS material, when etcd runs with TLS.
    pub tls: Option<LabEtcdTls>,
    /// With more than one member: every member, the first being the one the fields above describe (except
    /// `client_url`, which then lists every member's). Empty for a single-member etcd.
    #[serde(default)]
    pub members: Vec<EtcdMember>,
}

/// One member of a multi-member etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdMember {
    /// 1-based member index.
    pub index: usize,
    /// etcd member name (`<cluster>` for member 1, `<cluster>-m<i>` for the others).
    pub name: String,
    /// Address in the control-plane namespace.
    pub addr: Ipv4Addr,
    /// Client URL of this member alone.
    pub client_url: String,
    /// Peer URL.
    pub peer_url: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file.
    pub log_file: PathBuf,
}

impl EtcdInfo {
    /// Every client URL (one per member).
    pub fn client_urls(&self) -> Vec<String> {
        self.client_url.split(',').map(str::to_owned).collect()
    }

    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.members.len().max(1)
    }

    /// `--initial-cluster` of a multi-member etcd (`None` with one member).
    pub fn initial_cluster(&self) -> Option<String> {
        (!self.members.is_empty()).then(|| {
            self.members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    /// Member `m` (1-based) as a single-member view (its own name, URLs, data and log), for starting it.
    pub fn member(&self, m: usize) -> Option<EtcdInfo> {
        if self.members.is_empty() {
            return (m == 1).then(|| self.clone());
        }
        let x = self.members.get(m.checked_sub(1)?)?;
        Some(EtcdInfo {
            name: x.name.clone(),
            client_url: x.client_url.clone(),
            peer_url: x.peer_url.clone(),
            data_dir: x.data_dir.clone(),
            log_file: x.log_file.clone(),
            tls: self.tls.clone(),
            members: Vec::new(),
        })
    }
}

/// PEM files of a cluster's TLS etcd as the lab's state file records them, in the cluster's certificate directory
/// (a `mesh_certs::ClusterDir`, which also holds the `admin`, `node`, `remote` and `apiserver` certificates of the
/// cluster). `mesh_etcd::EtcdTlsFiles` is what an etcd process is started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabEtcdTls {
    /// The cluster's certificate directory (open it with `mesh_certs::ClusterDir::open`).
    pub dir: PathBuf,
    /// The CA bundle etcd trusts for clients and clients trust for etcd.
    pub ca: PathBuf,
    /// Server certificate chain of etcd (SANs: the control-plane address, localhost).
    pub server_cert: PathBuf,
    /// Server key of etcd.
    pub server_key: PathBuf,
    /// A client certificate with full rights (etcd user `root`), for tests and the CLI.
    pub client_cert: PathBuf,
    /// Key of [`LabEtcdTls::client_cert`].
    pub client_key: PathBuf,
    /// etcd trusts for clients only the cluster's own intermediate (`client-ca.pem`), not the
    /// bundle ([`LabSpec::etcd_client_trust_cluster`]).
    #[serde(default)]
    pub client_trust_cluster: bool,
}

impl LabEtcdTls {
    /// The files of a certificate directory.
    pub fn of(dir: &mesh_certs::ClusterDir) -> Self {
        use mesh_certs::Role;
        LabEtcdTls {
            dir: dir.path.clone(),
            ca: dir.ca_bundle(),
            server_cert: dir.cert(Role::EtcdServer),
            server_key: dir.key(Role::EtcdServer),
            client_cert: dir.cert(Role::EtcdRoot),
            client_key: dir.key(Role::EtcdRoot),
            client_trust_cluster: false,
        }
    }
}

/// Trust domain of a lab's CA: `<prefix>.mesh-lab`.
pub fn trust_domain(prefix: &str) -> String {
    format!("{prefix}.mesh-lab")
}

/// The certificate directory (layout of `mesh_certs`) of cluster `name` with id `index` at `path`.
pub(crate) fn cluster_cert_dir(
    prefix: &str,
    name: &str,
    index: usize,
    path: PathBuf,
) -> Result<mesh_certs::ClusterDir> {
    let bad = |e: &dyn std::fmt::Display| LabError::Certs {
        prefix: prefix.to_string(),
        detail: format!("cluster {name} (id {index}): {e}"),
    };
    let name_ok = mesh_model::ClusterName::new(name).map_err(|e| bad(&e))?;
    let id = mesh_model::ClusterId::new(index as u32, mesh_model::MaxConnectedClusters::DEFAULT)
        .map_err(|e| bad(&e))?;
    Ok(mesh_certs::ClusterDir {
        path,
        info: mesh_certs::ClusterInfo {
            name: name_ok,
            id,
            trust_domain: trust_domain(prefix),
        },
    })
}

/// One cluster of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// 1-based index; also the ClusterMesh cluster id.
    pub index: usize,
    /// Cluster name.
    pub name: String,
    /// Subnet base address (`10.X.<index>.0`).
    pub subnet: Ipv4Addr,
    /// Subnet prefix length (24).
    pub prefix_len: u8,
    /// Gateway of the cluster (the router's bridge address, `.1`).
    pub gateway: Ipv4Addr,
    /// Bridge name in the router namespace.
    pub bridge: String,
    /// The control-plane namespace (runs etcd), address `.2`.
    pub control_plane: NodeInfo,
    /// The nodes, addresses `.11`, `.12`, ...
    pub nodes: Vec<NodeInfo>,
    /// The cluster's etcd.
    pub etcd: EtcdInfo,
    /// The cluster's pod range (`10.X.<190+c>.0/24`), with [`LabSpec::pods`].
    #[serde(default)]
    pub pod_range: Option<String>,
}

impl ClusterInfo {
    /// The subnet in CIDR notation, e.g. `10.123.1.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }

    /// Every address range of the cluster: its subnet, and its pod range with pods (a pod CIDR given by
    /// hand outside the range is added too).
    pub fn ranges(&self) -> Vec<String> {
        let mut v = vec![self.cidr()];
        v.extend(self.pod_range.clone());
        for n in &self.nodes {
            if let Some(p) = &n.pod
                && !v.contains(&p.cidr())
                && !self.pod_range_contains(p)
            {
                v.push(p.cidr());
            }
        }
        v
    }

    fn pod_range_contains(&self, p: &PodInfo) -> bool {
        let Some((net, len)) = self
            .pod_range
            .as_deref()
            .and_then(|r| r.split_once('/'))
            .and_then(|(a, l)| Some((a.parse::<Ipv4Addr>().ok()?, l.parse::<u32>().ok()?)))
        else {
            return false;
        };
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        p.prefix_len as u32 >= len && u32::from(p.network) & mask == u32::from(net) & mask
    }

    /// The etcd client endpoint (`http(s)://addr:2379`).
    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd.client_url
    }
}

/// The whole lab layout, computed from a spec, an octet and the cgroup v2 root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    /// Lab prefix.
    pub prefix: String,
    /// The lab's second address octet: all lab addresses are in `10.<octet>.0.0/16`.
    pub octet: u8,
    /// State directory (`<state_root>/<prefix>`).
    pub state_dir: PathBuf,
    /// Router namespace.
    pub router_netns: String,
    /// Host end of the host<->router veth.
    pub host_veth: String,
    /// Host address on that veth.
    pub host_addr: Ipv4Addr,
    /// Router address on its uplink.
    pub router_addr: Ipv4Addr,
    /// The lab's cgroup v2 directory (parent of every node's).
    pub cgroup_dir: PathBuf,
    /// The lab's bpffs directory (parent of every node's).
    #[serde(default)]
    pub bpffs_dir: PathBuf,
    /// How etcd is secured.
    pub etcd_security: EtcdSecurity,
    /// The lab's root CA directory (a `mesh_certs` CA dir), with TLS etcd.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of the clusters' leaf certificates when not the default ([`LabSpec::leaf_lifetime`]).
    #[serde(default)]
    pub leaf_lifetime: Option<Duration>,
    /// How members of different clusters reach each other.
    #[serde(default)]
    pub underlay: Underlay,
    /// The clusters.
    pub clusters: Vec<ClusterInfo>,
}

impl LabPlan {
    /// Lays out a lab. `spec` must be valid ([`LabSpec::validate`]), `octet` in [`OCTETS`].
    pub fn new(spec: &LabSpec, octet: u8, cgroup_root: &Path) -> Result<LabPlan> {
        spec.validate()?;
        if !OCTETS.contains(&octet) {
            return Err(LabError::Spec(format!(
                "address octet {octet} outside {OCTETS:?}"
            )));
        }
        let p = &spec.prefix;
        let state_dir = spec.state_root.join(p);
        let cgroup_dir = lab_cgroup_dir(cgroup_root, p);
        let bpffs_dir = lab_bpffs_dir(p);
        let tls = spec.etcd == EtcdSecurity::Tls;
        let clusters = (1..=spec.clusters)
            .map(|c| -> Result<ClusterInfo> {
                let c8 = c as u8; // c <= MAX_CLUSTERS < 256
                let base = Ipv4Addr::new(10, octet, c8, 0);
                let member = |index: usize, name: String, host: u8| NodeInfo {
                    cluster: c,
                    index,
                    netns: format!("{p}-c{c}-{name}"),
                    addr: Ipv4Addr::new(10, octet, c8, host),
                    router_port: format!("c{c}{name}"),
                    cgroup: cgroup_dir.join(format!("c{c}-{name}")),
                    bpffs: bpffs_dir.join(format!("c{c}-{name}")),
                    pod: None,
                    name,
                };
                let pod_octet = POD_RANGE_BASE + c8; // c <= MAX_CLUSTERS = 64: 191..=254
                let cp = member(0, "cp".into(), 2);
                let name = spec.cluster_name(c);
                let scheme = if tls { "https" } else { "http" };
                let cdir = state_dir.join(format!("c{c}"));
                let k = spec.members_of(c);
                let members: Vec<EtcdMember> = if k == 1 {
                    Vec::new()
                } else {
                    (1..=k)
                        .map(|m| {
                            let addr = Ipv4Addr::new(10, octet, c8, 1 + m as u8);
                            let (mname, data, log) = if m == 1 {
                                (
                                    name.clone(),
                                    "etcd-data".to_string(),
                                    "etcd.log".to_string(),
                                )
                            } else {
                                (
                                    format!("{name}-m{m}"),
                                    format!("etcd-data-m{m}"),
                                    format!("etcd-m{m}.log"),
                                )
                            };
                            EtcdMember {
                                index: m,
                                name: mname,
                                addr,
                                client_url: format!("{scheme}://{addr}:{ETCD_CLIENT_PORT}"),
                                peer_url: format!("{scheme}://{addr}:{ETCD_PEER_PORT}"),
                                data_dir: cdir.join(data),
                                log_file: cdir.join(log),
                            }
                        })
                        .collect()
                };
                let client_url = if members.is_empty() {
                    format!("{scheme}://{}:{ETCD_CLIENT_PORT}", cp.addr)
                } else {
                    members
                        .iter()
                        .map(|m| m.client_url.clone())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let etcd = EtcdInfo {
                    client_url,
                    members,
                    peer_url: format!("{scheme}://{}:{ETCD_PEER_PORT}", cp.addr),
                    data_dir: cdir.join("etcd-data"),
                    log_file: cdir.join("etcd.log"),
                    tls: match tls {
                        true => Some(LabEtcdTls {
                            client_trust_cluster: spec.etcd_client_trust_cluster,
                            ..LabEtcdTls::of(&cluster_cert_dir(p, &name, c, cdir.join("certs"))?)
                        }),
                        false => None,
                    },
                    name: name.clone(),
                };
                Ok(ClusterInfo {
                    index: c,
                    name,
                    subnet: base,
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(10, octet, c8, 1),
                    bridge: match spec.underlay {
                        Underlay::Routed => format!("br{c}"),
                        Underlay::Switched => SWITCHED_BRIDGE.to_string(),
                    },
                    nodes: (1..=spec.nodes_per_cluster)
                        .map(|n| {
                            let mut m = member(n, format!("n{n}"), 10 + n as u8);
                            if spec.pods {
                                let default_of = |c: usize, n: usize| {
                                    // c <= MAX_CLUSTERS, n <= MAX_NODES_WITH_PODS (validated)
                                    let o = POD_RANGE_BASE + c as u8;
                                    (
                                        Ipv4Addr::new(10, octet, o, 16 * (n as u8 - 1)),
                                        POD_CIDR_PREFIX,
                                    )
                                };
                                let (net, len) = match spec.pod_cidrs.get(&(c, n)) {
                                    Some(PodCidr::Given(a, l)) => (*a, *l),
                                    Some(PodCidr::SameAs(oc, on)) => default_of(*oc, *on),
                                    None => default_of(c, n),
                                };
                                m.pod = Some(PodInfo::of(format!("{}-pod", m.netns), net, len)?);
                            }
                            Ok(m)
                        })
                        .collect::<Result<Vec<_>>>()?,
                    control_plane: cp,
                    etcd,
                    pod_range: spec.pods.then(|| format!("10.{octet}.{pod_octet}.0/24")),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ca_dir = tls.then(|| state_dir.join("ca"));
        Ok(LabPlan {
            prefix: p.clone(),
            octet,
            router_netns: format!("{p}-router"),
            host_veth: format!("mlh{octet}"),
            host_addr: Ipv4Addr::new(10, octet, 0, 2),
            router_addr: Ipv4Addr::new(10, octet, 0, 1),
            state_dir,
            cgroup_dir,
            bpffs_dir,
            etcd_security: spec.etcd,
            ca_dir,
            leaf_lifetime: spec.leaf_lifetime,
            underlay: spec.underlay,
            clusters,
        })
    }

    /// The lab's whole address range, `10.<octet>.0.0/16`.
    pub fn supernet(&self) -> String {
        format!("10.{}.0.0/16", self.octet)
    }

    /// Every namespace of the lab, router first.
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = vec![self.router_netns.clone()];
        for c in &self.clusters {
            v.push(c.control_plane.netns.clone());
            for n in &c.nodes {
                v.push(n.netns.clone());
                v.extend(n.pod.as_ref().map(|p| p.netns.clone()));
            }
        }
        v
    }

    /// Every cgroup directory of the lab (leaves first, the lab directory last).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for c in &self.clusters {
            v.push(c.control_plane.cgroup.clone());
            v.extend(c.nodes.iter().map(|n| n.cgroup.clone()));
        }
        v.push(self.cgroup_dir.clone());
        v
    }
}

/// The cgroup v2 directory of the lab with `prefix` under `cgroup_root`.
pub fn lab_cgroup_dir(cgroup_root: &Path, prefix: &str) -> PathBuf {
    cgroup_root.join("mesh-lab").join(prefix)
}

/// The bpffs directory of the lab with `prefix`.
pub fn lab_bpffs_dir(prefix: &str) -> PathBuf {
    Path::new(crate::cgroup::BPFFS_MOUNT)
        .join("mesh-lab")
        .join(prefix)
}

/// True when `netns` is a namespace name that a lab with `prefix` creates (`P-router`, `P-c<i>-cp`,
/// `P-c<i>-n<j>`, `P-c<i>-n<j>-pod`). Exact: the lab `a` never claims the namespaces of the lab `a-b`.
pub fn is_lab_netns(prefix: &str, netns: &str) -> bool {
    let Some(rest) = netns.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    if rest == "router" {
        return true;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = rest.strip_prefix('c') else {
        return false;
    };
    let Some((c, member)) = rest.split_once('-') else {
        return false;
    };
    let node = |m: &str| m.strip_prefix('n').is_some_and(digits);
    digits(c) && (member == "cp" || node(member) || member.strip_suffix("-pod").is_some_and(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(prefix: &str, clusters: usize, nodes: usize) -> LabPlan {
        LabPlan::new(
            &LabSpec::new(prefix, clusters, nodes),
            123,
            Path::new("/cg"),
        )
        .unwrap()
    }

    #[test]
    fn layout_of_two_by_two() {
        let spec = LabSpec::new("t1", 2, 2).etcd_security(EtcdSecurity::Tls);
        let p = LabPlan::new(&spec, 123, Path::new("/cg")).unwrap();
        assert_eq!(p.router_netns, "t1-router");
        assert_eq!(p.host_veth, "mlh123");
        assert_eq!(p.host_addr, Ipv4Addr::new(10, 123, 0, 2));
        assert_eq!(p.supernet(), "10.123.0.0/16");
        let c2 = &p.clusters[1];
        assert_eq!(c2.name, "c2");
        assert_eq!(c2.cidr(), "10.123.2.0/24");
        assert_eq!(c2.gateway, Ipv4Addr::new(10, 123, 2, 1));
        assert_eq!(c2.control_plane.addr, Ipv4Addr::new(10, 123, 2, 2));
        assert_eq!(c2.control_plane.netns, "t1-c2-cp");
        assert_eq!(c2.nodes[1].netns, "t1-c2-n2");
        assert_eq!(c2.nodes[1].addr, Ipv4Addr::new(10, 123, 2, 12));
        assert_eq!(c2.nodes[1].router_port, "c2n2");
        assert_eq!(c2.nodes[1].cgroup, Path::new("/cg/mesh-lab/t1/c2-n2"));
        assert_eq!(
            c2.nodes[1].bpffs,
            Path::new("/sys/fs/bpf/mesh-lab/t1/c2-n2")
        );
        assert_eq!(c2.etcd_endpoint(), "https://10.123.2.2:2379");
        let tls = c2.etcd.tls.as_ref().unwrap();
        assert_eq!(tls.dir, Path::new("/run/mesh-lab/t1/c2/certs"));
        assert!(tls.server_cert.starts_with(&tls.dir));
        assert_eq!(p.ca_dir.as_deref(), Some(Path::new("/run/mesh-lab/t1/ca")));
        assert_eq!(p.netns_names().len(), 1 + 2 * 3);
        assert_eq!(
            p.cgroup_dirs().last().unwrap(),
            Path::new("/cg/mesh-lab/t1")
        );
    }

    #[test]
    fn unassigned_third_octets_hold_no_address() {
        let p = plan("t", MAX_CLUSTERS, 3);
        assert!(!UNASSIGNED_THIRD_OCTETS.contains(&p.host_addr.octets()[2]));
        for c in &p.clusters {
            for n in c.nodes.iter().chain([&c.control_plane]) {
                assert!(!UNASSIGNED_THIRD_OCTETS.contains(&n.addr.octets()[2]));
            }
        }
    }

    #[test]
    fn plain_etcd_uses_http_and_no_tls_files() {
        let spec = LabSpec::new("t", 1, 1).etcd_security(EtcdSecurity::Plain);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        assert_eq!(p.clusters[0].etcd.client_url, "http://10.100.1.2:2379");
        assert!(p.clusters[0].etcd.tls.is_none());
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        let p = plan("a-very-long-prefix-name1", MAX_CLUSTERS, MAX_NODES);
        for c in &p.clusters {
            for n in c.nodes.iter().chain([&c.control_plane]) {
                assert!(n.router_port.len() <= 15, "{}", n.router_port);
            }
        }
        assert!(p.host_veth.len() <= 15);
    }

    #[test]
    fn prefix_rules_name_the_rule() {
        for (bad, why) in [
            ("", "empty"),
            ("Lab", "lowercase letter"),
            ("1lab", "lowercase letter"),
            ("la_b", "only lowercase"),
            ("lab-", "end with"),
            ("abcdefghijklmnopqrstuvwxyz", "longer"),
        ] {
            let e = check_prefix(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        check_prefix("lab-2").unwrap();
    }

    #[test]
    fn spec_rules() {
        assert!(LabSpec::new("x", 0, 1).validate().is_err());
        assert!(LabSpec::new("x", 1, 0).validate().is_err());
        assert!(LabSpec::new("x", MAX_CLUSTERS + 1, 1).validate().is_err());
        let e = LabSpec::new("x", 2, 1)
            .cluster_names(["east"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("1 cluster names given for 2"), "{e}");
        let e = LabSpec::new("x", 1, 1)
            .cluster_names(["default"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("\"default\""), "{e}");
        let e = LabSpec::new("x", 2, 1)
            .cluster_names(["a", "a"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let spec = LabSpec::new("x", 2, 1).cluster_names(["east", "west"]);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        assert_eq!(p.clusters[1].name, "west");
        assert_eq!(p.clusters[1].etcd.name, "west");
    }

    #[test]
    fn a_three_member_etcd_gets_three_addresses_every_url_and_one_initial_cluster() {
        let spec = LabSpec::new("t", 2, 1).etcd_members(1, 3);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let e = &p.clusters[0].etcd;
        assert_eq!(e.member_count(), 3);
        assert_eq!(
            e.client_urls(),
            [
                "https://10.100.1.2:2379",
                "https://10.100.1.3:2379",
                "https://10.100.1.4:2379"
            ]
        );
        assert_eq!(
            e.initial_cluster().unwrap(),
            "c1=https://10.100.1.2:2380,c1-m2=https://10.100.1.3:2380,c1-m3=https://10.100.1.4:2380"
        );
        let m1 = e.member(1).unwrap();
        assert_eq!(m1.client_url, "https://10.100.1.2:2379");
        assert_eq!(
            m1.data_dir, e.data_dir,
            "member 1 keeps the single-member paths"
        );
        let m3 = e.member(3).unwrap();
        assert_eq!(m3.name, "c1-m3");
        assert!(m3.data_dir.ends_with("c1/etcd-data-m3"));
        assert!(e.member(4).is_none());
        // the default stays one member, unchanged
        let e2 = &p.clusters[1].etcd;
        assert_eq!(e2.member_count(), 1);
        assert!(e2.members.is_empty() && e2.initial_cluster().is_none());
        assert_eq!(e2.client_urls(), ["https://10.100.2.2:2379"]);
        assert_eq!(e2.member(1).as_ref(), Some(e2));
    }

    #[test]
    fn etcd_member_counts_are_checked() {
        for (c, k, want) in [
            (1, 2, "odd"),
            (1, 7, "odd and 1..=5"),
            (3, 3, "clusters 1..=2"),
        ] {
            let e = LabSpec::new("t", 2, 1)
                .etcd_members(c, k)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{c}={k}: {e}");
        }
        assert_eq!(
            parse_etcd_members("1=3, 2=5,x=1,3"),
            BTreeMap::from([(1, 3), (2, 5)])
        );
    }

    #[test]
    fn pods_get_a_slash_28_of_their_cluster_pod_range_and_a_namespace() {
        let spec = LabSpec::new("t", 2, 2).with_pods();
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let c2 = &p.clusters[1];
        assert_eq!(c2.pod_range.as_deref(), Some("10.100.192.0/24"));
        let pod = c2.nodes[1].pod.as_ref().unwrap();
        assert_eq!(pod.cidr(), "10.100.192.16/28");
        assert_eq!(pod.gateway, Ipv4Addr::new(10, 100, 192, 17));
        assert_eq!(pod.addr, Ipv4Addr::new(10, 100, 192, 18));
        assert_eq!(pod.netns, "t-c2-n2-pod");
        assert!(c2.control_plane.pod.is_none());
        assert_eq!(c2.ranges(), ["10.100.2.0/24", "10.100.192.0/24"]);
        assert!(p.netns_names().contains(&"t-c2-n2-pod".to_string()));
        assert_eq!(p.netns_names().len(), 1 + 2 * 5);
        // the largest lab with pods keeps pods out of the VIPs' octets
        let big = plan_with(LabSpec::new("t", MAX_CLUSTERS, MAX_NODES_WITH_PODS).with_pods());
        for c in &big.clusters {
            for n in &c.nodes {
                let o = n.pod.as_ref().unwrap().addr.octets()[2];
                assert!(o > *UNASSIGNED_THIRD_OCTETS.end(), "{o}");
            }
        }
        // no pods: none
        assert!(plan("t", 1, 1).clusters[0].nodes[0].pod.is_none());
    }

    #[test]
    fn pod_rules_and_a_pod_cidr_given_by_hand() {
        let e = LabSpec::new("t", 1, MAX_NODES_WITH_PODS + 1)
            .with_pods()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("at most 16 nodes"), "{e}");
        let net = Ipv4Addr::new(10, 100, 191, 0);
        let e = LabSpec::new("t", 1, 1)
            .pod_cidr(1, 1, net, 28)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("without pods"), "{e}");
        let e = LabSpec::new("t", 2, 1)
            .with_pods()
            .pod_cidr(2, 2, net, 28)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("node 2 of cluster 2"), "{e}");
        // c2's node 1 takes c1's node 1 CIDR (an overlap on purpose)
        let p = plan_with(LabSpec::new("t", 2, 1).with_pods().pod_cidr(2, 1, net, 28));
        let same = plan_with(
            LabSpec::new("t", 2, 1)
                .with_pods()
                .pod_cidr_same_as(2, 1, 1, 1),
        );
        assert_eq!(same.clusters[1].nodes[0].pod, p.clusters[1].nodes[0].pod);
        assert_eq!(
            p.clusters[1].nodes[0].pod.as_ref().unwrap().cidr(),
            p.clusters[0].nodes[0].pod.as_ref().unwrap().cidr()
        );
        assert_eq!(
            p.clusters[1].ranges(),
            ["10.100.2.0/24", "10.100.192.0/24", "10.100.191.0/28"]
        );
        let bad =
            LabSpec::new("t", 1, 1)
                .with_pods()
                .pod_cidr(1, 1, Ipv4Addr::new(10, 100, 191, 3), 28);
        assert!(LabPlan::new(&bad, 100, Path::new("/cg")).is_err());
    }

    #[test]
    fn a_switched_underlay_has_one_bridge() {
        let p = plan_with(LabSpec::new("t", 3, 1).underlay(Underlay::Switched));
        assert!(p.clusters.iter().all(|c| c.bridge == SWITCHED_BRIDGE));
        assert_eq!(p.underlay, Underlay::Switched);
        assert_eq!(plan("t", 2, 1).clusters[1].bridge, "br2");
    }

    fn plan_with(spec: LabSpec) -> LabPlan {
        LabPlan::new(&spec, 100, Path::new("/cg")).unwrap()
    }

    #[test]
    fn octet_out_of_range_is_refused() {
        assert!(LabPlan::new(&LabSpec::new("x", 1, 1), 99, Path::new("/cg")).is_err());
        assert!(LabPlan::new(&LabSpec::new("x", 1, 1), 250, Path::new("/cg")).is_err());
    }

    #[test]
    fn netns_ownership_is_exact() {
        assert!(is_lab_netns("a", "a-router"));
        assert!(is_lab_netns("a", "a-c1-cp"));
        assert!(is_lab_netns("a", "a-c12-n3"));
        assert!(!is_lab_netns("a", "a-b-router"));
        assert!(!is_lab_netns("a", "a-c1-c1-n1"));
        assert!(!is_lab_netns("a", "ab-router"));
        assert!(!is_lab_netns("a", "a-c1-n"));
        assert!(is_lab_netns("a", "a-c1-n2-pod"));
        assert!(!is_lab_netns("a", "a-c1-cp-pod"));
        assert!(!is_lab_netns("a", "a-c1-n-pod"));
        assert!(!is_lab_netns("a", "a-cx-n1"));
        assert!(!is_lab_netns("a", "other"));
        assert!(is_lab_netns("a-b", "a-b-router"));
        // every namespace of a plan is claimed by its own prefix and no other
        let p = plan("a", 3, 3);
        for ns in p.netns_names() {
            assert!(is_lab_netns("a", &ns), "{ns}");
            assert!(!is_lab_netns("a-c1", &ns), "{ns}");
        }
    }
}
