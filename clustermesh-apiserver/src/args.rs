//! Command-line flags (clap derive); every flag has an environment-variable fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

use crate::index::IndexConfig;

/// Where Kubernetes objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Watch the Kubernetes API (in-cluster config, or --kubeconfig).
    Kubernetes,
    /// Read Kubernetes YAML from --manifest-dir and watch it for changes.
    Manifests,
}

pub use mesh_logging::LogFormat;

/// Flags of `clustermesh-apiserver`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Publishes this cluster's global services, endpoints, identities and nodes into etcd for the mesh.",
    long_about = "Publishes this cluster's global services, endpoints, identities and nodes into etcd under \
clustermesh/v1/, keeping them exactly right: it puts only what changed, deletes only what vanished (and only after \
every source synced once), writes sync canaries and a heartbeat. Several replicas elect a leader through an etcd \
lease; only the leader writes.",
    mut_arg("etcd_endpoints", |a| a.help(
        "etcd client URLs, comma-separated. Without them the apiserver starts and supervises its own etcd \
         (managed etcd) with data under --data-dir"
    )),
    mut_arg("tls_dir", |a| a.help(
        "TLS directory: a cluster certificate directory from `clustermesh ca issue-cluster` (cluster.json, \
         ca-bundle.pem, admin.crt/key, ...; the apiserver connects to etcd as admin-<cluster> and publishes the CA \
         fingerprints), or a directory with ca.crt, tls.crt, tls.key. Plain HTTP to etcd without it"
    ))
)]
pub struct Args {
    /// Name of this cluster (at most 32 characters of [a-z0-9-], not "default"); unique in the mesh.
    #[arg(long, env = "CLUSTERMESH_CLUSTER_NAME")]
    pub cluster_name: String,

    /// Numeric id of this cluster, 1..=255 (1..=511 with --max-connected-clusters 511); unique in the mesh.
    #[arg(long, env = "CLUSTERMESH_CLUSTER_ID")]
    pub cluster_id: u32,

    /// 255 or 511: how many clusters the mesh may hold (decides the identity bits).
    #[arg(
        long,
        env = "CLUSTERMESH_MAX_CONNECTED_CLUSTERS",
        default_value_t = 255
    )]
    pub max_connected_clusters: u32,

    /// --etcd-endpoints and --tls-dir (the flags every binary shares; their help here says what the
    /// apiserver does with them).
    #[command(flatten)]
    pub etcd: mesh_etcd::EtcdFlags,

    /// etcd client URLs that other clusters' node-syncs should use (what `clustermesh connect`
    /// registers), comma-separated: e.g. the NodePort or LoadBalancer address of the etcd Service.
    /// Default: the endpoints this apiserver uses. They must be on the etcd server certificate.
    #[arg(
        long,
        env = "CLUSTERMESH_ADVERTISE_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub advertise_etcd_endpoints: Vec<String>,

    /// Client URL of the managed etcd (without --etcd-endpoints).
    #[arg(
        long,
        env = "CLUSTERMESH_MANAGED_ETCD_CLIENT_URL",
        default_value = "https://127.0.0.1:2379"
    )]
    pub managed_etcd_client_url: String,

    /// Peer URL of the managed etcd.
    #[arg(
        long,
        env = "CLUSTERMESH_MANAGED_ETCD_PEER_URL",
        default_value = "http://127.0.0.1:2380"
    )]
    pub managed_etcd_peer_url: String,

    /// Which client certificates the managed etcd accepts. `cluster` (default): only this
    /// cluster's own intermediates (client-ca.pem of --tls-dir, written by `clustermesh ca
    /// issue-cluster`): every credential that opens this etcd was issued by this cluster, so
    /// another cluster's keys or a federated mesh's root open nothing here. Other clusters read it
    /// with credentials this cluster issued: the reader certificate this apiserver signs for their
    /// remote key during the gRPC `connect` (needs intermediate.crt/.key in --tls-dir; without them
    /// the gRPC connect to this cluster fails its preflight, saying so), or its remote
    /// certificate, which `clustermesh connect --context` hands them. `mesh`: any certificate
    /// chaining to the mesh's bundle (every cluster's intermediate, federated roots included; the
    /// CN names the user, so one compromised cluster can write here).
    #[arg(
        long,
        env = "CLUSTERMESH_MANAGED_ETCD_CLIENT_TRUST",
        value_enum,
        default_value_t = EtcdClientTrust::Cluster
    )]
    pub managed_etcd_client_trust: EtcdClientTrust,

    /// Where Kubernetes objects come from.
    #[arg(
        long,
        env = "CLUSTERMESH_SOURCE",
        value_enum,
        default_value = "kubernetes"
    )]
    pub source: SourceKind,

    /// Directory of Kubernetes YAML (Service, EndpointSlice, Pod, Namespace, Node, ServiceExport; several
    /// documents per file), read recursively and watched; required with --source manifests.
    #[arg(long, env = "CLUSTERMESH_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,

    /// kubeconfig for --source kubernetes (default: in-cluster config, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// CIDR from which ClusterSetIPs are allocated for global services of other clusters that have no Service
    /// here (e.g. 10.250.0.0/16). No imports without it.
    #[arg(long, env = "CLUSTERMESH_CLUSTERSET_CIDR")]
    pub clusterset_cidr: Option<IpNet>,

    /// KVStoreMesh mode: also mirror every remote cluster's keys into the local etcd.
    #[arg(long, env = "CLUSTERMESH_KVSTOREMESH")]
    pub kvstoremesh: bool,

    /// Address of the gRPC service clustermesh.v1.ClusterMesh.
    #[arg(long, env = "CLUSTERMESH_GRPC_LISTEN", default_value = "0.0.0.0:9443")]
    pub grpc_listen: SocketAddr,

    /// Address of the status endpoint (/healthz, /readyz, /metrics, /api/v1/status).
    #[arg(
        long,
        env = "CLUSTERMESH_STATUS_LISTEN",
        default_value = "0.0.0.0:9880"
    )]
    pub status_listen: SocketAddr,

    /// Data directory (managed etcd's data and certificates).
    #[arg(
        long,
        env = "CLUSTERMESH_DATA_DIR",
        default_value = "/var/lib/clustermesh-apiserver"
    )]
    pub data_dir: PathBuf,

    /// Log format.
    #[arg(
        long,
        env = "CLUSTERMESH_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,

    /// Id of this replica in leader election (default: hostname and process id).
    #[arg(long, env = "CLUSTERMESH_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// How often the TLS files (--tls-dir) are checked for a change; on a change this replica
    /// resigns, reconnects to etcd with the new certificate and campaigns again.
    #[arg(long, env = "CLUSTERMESH_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = mesh_logging::parse_duration)]
    pub tls_reload_interval: Duration,

    /// TTL of the leader lease: a dead leader is replaced after about this long.
    #[arg(long, env = "CLUSTERMESH_LEADER_LEASE_TTL", default_value = "3s", value_parser = mesh_logging::parse_duration)]
    pub leader_lease_ttl: Duration,

    /// How often the manifest directory is rescanned for changes.
    #[arg(long, env = "CLUSTERMESH_MANIFEST_POLL_INTERVAL", default_value = "200ms", value_parser = mesh_logging::parse_duration)]
    pub manifest_poll_interval: Duration,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// Cluster name, id or max-connected-clusters break the cluster rules.
    #[error("{0}")]
    Cluster(#[from] mesh_model::ClusterRuleError),
    /// --source manifests without --manifest-dir.
    #[error("--source manifests needs --manifest-dir")]
    NoManifestDir,
}

impl Args {
    /// Checks the flags and builds the index configuration.
    pub fn index_config(&self) -> Result<IndexConfig, ArgsError> {
        let mcc = MaxConnectedClusters::new(self.max_connected_clusters)?;
        let cluster = ClusterName::new(&self.cluster_name)?;
        let id = ClusterId::new(self.cluster_id, mcc)?;
        if self.source == SourceKind::Manifests && self.manifest_dir.is_none() {
            return Err(ArgsError::NoManifestDir);
        }
        Ok(IndexConfig {
            cluster,
            cluster_id: id,
            max_connected_clusters: mcc,
            clusterset_cidr: self.clusterset_cidr,
            ca_fingerprints: Vec::new(),
            cached: false,
        })
    }

    /// The replica id: the flag, else hostname-pid.
    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "apiserver".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_typical_command_line() {
        let a = Args::try_parse_from([
            "clustermesh-apiserver",
            "--cluster-name",
            "c1",
            "--cluster-id",
            "7",
            "--etcd-endpoints",
            "http://127.0.0.1:2379,http://127.0.0.1:2380",
            "--source",
            "manifests",
            "--manifest-dir",
            "/etc/mesh",
            "--clusterset-cidr",
            "10.250.0.0/16",
            "--log-format",
            "json",
            "--leader-lease-ttl",
            "5s",
        ])
        .unwrap();
        assert_eq!(a.etcd.endpoints.len(), 2);
        assert_eq!(a.leader_lease_ttl, Duration::from_secs(5));
        let c = a.index_config().unwrap();
        assert_eq!(c.cluster_id.get(), 7);
    }

    #[test]
    fn bad_combinations_are_named() {
        let a =
            Args::try_parse_from(["x", "--cluster-name", "default", "--cluster-id", "1"]).unwrap();
        assert!(
            a.index_config()
                .unwrap_err()
                .to_string()
                .contains("default")
        );
        let a = Args::try_parse_from([
            "x",
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--source",
            "manifests",
        ])
        .unwrap();
        assert!(
            a.index_config()
                .unwrap_err()
                .to_string()
                .contains("--manifest-dir")
        );
        assert!(Args::try_parse_from(["x", "--cluster-name", "c1", "--cluster-id", "x"]).is_err());
    }
}

/// `--managed-etcd-client-trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EtcdClientTrust {
    /// Every certificate of the mesh's bundle.
    Mesh,
    /// Only this cluster's own intermediates.
    Cluster,
}

impl From<EtcdClientTrust> for mesh_etcd::ClientTrust {
    fn from(t: EtcdClientTrust) -> Self {
        match t {
            EtcdClientTrust::Mesh => Self::Mesh,
            EtcdClientTrust::Cluster => Self::Cluster,
        }
    }
}
