//! Command-line flags (each with an environment fallback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

pub use mesh_logging::LogFormat;

fn parse_cluster_name(s: &str) -> Result<ClusterName, String> {
    ClusterName::new(s).map_err(|e| e.to_string())
}

fn parse_max_backends(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|e| format!("--max-backends {s:?} is not a number: {e}"))?;
    global_lb_bpf::DatapathConfig::check_max_backends(n)
}

fn parse_cluster_id(s: &str) -> Result<ClusterId, String> {
    let n: u32 = s
        .parse()
        .map_err(|e| format!("cluster id {s:?} is not a number: {e}"))?;
    ClusterId::new(n, MaxConnectedClusters::EXTENDED).map_err(|e| e.to_string())
}

/// node-sync: keeps the eBPF socket load-balancer maps of this node right for every global
/// service, preferring local backends and failing over to other clusters.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "node-sync",
    version,
    about,
    long_about = None,
    mut_arg("etcd_endpoints", |a| a
        .required(true)
        .help("Client URLs of the local cluster's etcd (comma-separated; https:// uses --tls-dir)")),
    mut_arg("tls_dir", |a| a.help("Directory with this node's client certificate: ca.crt, tls.crt, tls.key"))
)]
pub struct Args {
    /// Name of the cluster this node belongs to.
    #[arg(long, env = "CLUSTERMESH_CLUSTER_NAME", value_parser = parse_cluster_name)]
    pub cluster_name: ClusterName,

    /// Id of the cluster this node belongs to (1..=255, or 511 with maxConnectedClusters=511).
    #[arg(long, env = "CLUSTERMESH_CLUSTER_ID", value_parser = parse_cluster_id)]
    pub cluster_id: ClusterId,

    /// Name of this node (as in the endpoints' `node` field).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// --etcd-endpoints (required here) and --tls-dir: the flags every binary shares.
    #[command(flatten)]
    pub etcd: mesh_etcd::EtcdFlags,

    /// Directory of remote cluster files (one YAML per cluster: name, endpoints, TLS files);
    /// added, changed and removed files take effect without a restart.
    #[arg(long, env = "CLUSTERMESH_REMOTE_CONFIG_DIR")]
    pub remote_config_dir: Option<PathBuf>,

    /// cgroup v2 directory the socket load-balancer programs attach to.
    #[arg(long, env = "CLUSTERMESH_CGROUP", default_value = "/sys/fs/cgroup")]
    pub cgroup: PathBuf,

    /// bpffs directory where the datapath's maps are pinned.
    #[arg(
        long,
        env = "CLUSTERMESH_BPFFS",
        default_value = "/sys/fs/bpf/clustermesh"
    )]
    pub bpffs: PathBuf,

    /// Capacity of the datapath's backends map: at most this many minus one distinct backends
    /// (endpoint address and port, across every service and cluster) are programmed on this node;
    /// a service that would need more is refused, named in the log and counted in
    /// nodesync_map_errors_total, and the services already written keep working.
    /// Like Cilium's --bpf-lb-map-max. It also sizes the per-backend connection counters and
    /// connect outcomes, preallocated per CPU: 72 bytes per entry and CPU (4.5 MiB per CPU at the
    /// default, 18 MiB at 262144). Changing it resizes pinned maps at the next start, services
    /// carried over.
    #[arg(
        long,
        env = "CLUSTERMESH_MAX_BACKENDS",
        default_value_t = global_lb_bpf::DEFAULT_MAX_BACKENDS,
        value_parser = parse_max_backends
    )]
    pub max_backends: u32,

    /// How often the backends on this node are probed.
    #[arg(long, env = "CLUSTERMESH_HEALTH_INTERVAL", default_value = "200ms", value_parser = mesh_logging::parse_duration)]
    pub health_interval: Duration,

    /// Probes in a row that must fail before a backend is reported failing.
    #[arg(long, env = "CLUSTERMESH_HEALTH_FAILURES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failures: u32,

    /// Good probes in a row that bring a failing backend back (failback hold-down: a backend that
    /// fails every other probe takes no traffic back until it is steady). After the first good
    /// probe the next comes a quarter interval later.
    #[arg(long, env = "CLUSTERMESH_HEALTH_RISE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_rise: u32,

    /// Timeout of the probes that check, from this node, that the remote backends it sends traffic
    /// to answer (a few per remote cluster every --health-interval). A cluster whose probes all go
    /// unanswered twice in a row leaves this node's selection at once, whatever the affinity, until
    /// one answers. 0 turns the check off.
    #[arg(long, env = "CLUSTERMESH_REMOTE_PROBE_TIMEOUT", default_value = "250ms", value_parser = mesh_logging::parse_duration)]
    pub remote_probe_timeout: Duration,

    /// Do not abort this node's sockets to a backend that failed (a failing verdict, a failed connect
    /// confirmed by a probe). By default they are aborted through SOCK_DESTROY (needs
    /// CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY) so applications reconnect at once instead of
    /// waiting for TCP timeouts; graceful removals never abort anything.
    #[arg(long, env = "CLUSTERMESH_KEEP_FAILED_SOCKETS")]
    pub keep_failed_sockets: bool,

    /// How long a cluster that is not live keeps its backends in selection before they are
    /// marked stale (kept in memory, used again as soon as it is live).
    #[arg(long, env = "CLUSTERMESH_STALE_GRACE", default_value = "30s", value_parser = mesh_logging::parse_duration)]
    pub stale_grace: Duration,

    /// Longest wait at start for the initial sync of every cluster before the maps are reconciled.
    #[arg(long, env = "CLUSTERMESH_SYNC_TIMEOUT", default_value = "30s", value_parser = mesh_logging::parse_duration)]
    pub sync_timeout: Duration,

    /// Read only the local etcd, where KVStoreMesh caches every remote cluster's keys.
    #[arg(long, env = "CLUSTERMESH_KVSTOREMESH")]
    pub kvstoremesh: bool,

    /// Address of the status server (/healthz, /readyz, /metrics, /api/v1/status).
    #[arg(
        long,
        env = "CLUSTERMESH_STATUS_LISTEN",
        default_value = "127.0.0.1:9962"
    )]
    pub status_listen: SocketAddr,

    /// Serve `clusterset.local` (Kubernetes Multi-Cluster Services DNS names) on this address
    /// (UDP and TCP); off when unset.
    #[arg(long, env = "CLUSTERMESH_DNS_LISTEN")]
    pub dns_listen: Option<SocketAddr>,

    /// Forward questions outside `clusterset.local` to this resolver (refused when unset).
    #[arg(long, env = "CLUSTERMESH_DNS_FORWARD")]
    pub dns_forward: Option<SocketAddr>,

    /// TTL of the clusterset.local records, in seconds.
    #[arg(long, env = "CLUSTERMESH_DNS_TTL", default_value_t = 5)]
    pub dns_ttl: u32,

    /// How this node reaches the pod CIDRs of other clusters' nodes (issue 20).
    ///
    /// `none`: no routes (the CNI, the network or the operator routes them); today's behaviour.
    ///
    /// `native`: one route per remote node's pod CIDR via that node's address, for nodes that reach each other
    /// directly; main table, routing protocol id 157 (`ip route show proto 157`), never flushed on restart,
    /// other routes never touched, pod CIDRs overlapping another cluster's or a local route refused (shown in
    /// /api/v1/status `routing` and nodesync_routing_* metrics). The pod CIDRs come from each remote cluster's
    /// nodes/ keys (the apiserver publishes Node.spec.podCIDRs). Needs CAP_NET_ADMIN.
    ///
    /// `vxlan`: an overlay device, clustermesh0, for underlays that route node addresses but not pod CIDRs:
    /// per remote node an FDB entry to its address (of the underlay's family), per pod CIDR a neighbour entry
    /// and the route `<cidr> via <CIDR's first address> dev clustermesh0 onlink proto 157`, with the same
    /// ownership, overlap refusal and status as native. The device (--vxlan-vni, --vxlan-port, no learning,
    /// MTU = the underlay device's - 50 over IPv4, - 70 over IPv6) is kept: corrected in place on restart, made
    /// again only if its VNI or port differ, never deleted on exit. Every node of the mesh needs the same VNI
    /// and port, and UDP to that port open between nodes. Needs CAP_NET_ADMIN.
    #[arg(long, env = "CLUSTERMESH_ROUTING", value_enum, default_value = "none")]
    pub routing: crate::routing::RoutingMode,

    /// With --routing vxlan: the VXLAN network identifier of clustermesh0 (1..=16777215; the same on every
    /// node of the mesh).
    #[arg(long, env = "CLUSTERMESH_VXLAN_VNI", default_value_t = crate::routing::DEFAULT_VNI,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::routing::MAX_VNI)))]
    pub vxlan_vni: u32,

    /// With --routing vxlan: the UDP port of clustermesh0, sent to and listened on (8472 as Cilium and
    /// flannel; the same on every node of the mesh).
    #[arg(long, env = "CLUSTERMESH_VXLAN_PORT", default_value_t = crate::routing::DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: u16,

    /// With --routing vxlan: this node's address on the underlay, the tunnels' local end (its family is the
    /// underlay's: remote nodes are reached at their address of that family). Unset: the preferred source of
    /// the default route, else the first global address of its device (IPv4 first).
    #[arg(long, env = "CLUSTERMESH_VXLAN_LOCAL_ADDRESS")]
    pub vxlan_local_address: Option<std::net::IpAddr>,

    /// Use the in-memory map writer instead of the eBPF maps (tests and demos without BPF).
    #[arg(long, env = "CLUSTERMESH_FAKE_MAPS")]
    pub fake_maps: bool,

    /// Log format.
    #[arg(
        long,
        env = "CLUSTERMESH_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "node-sync",
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
            "--etcd-endpoints",
            "https://10.0.0.1:2379,https://10.0.0.2:2379",
        ]
    }

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(base()).unwrap();
        assert_eq!(a.health_interval, Duration::from_millis(200));
        assert_eq!(a.health_failures, 2);
        assert_eq!(a.health_rise, 2);
        assert_eq!(a.stale_grace, Duration::from_secs(30));
        assert_eq!(a.etcd.endpoints.len(), 2);
        assert!(!a.kvstoremesh);
        assert_eq!(a.log_format, LogFormat::Plain);
        assert_eq!(a.routing, crate::routing::RoutingMode::None);
    }

    #[test]
    fn routing_modes_parse_and_an_unknown_one_is_refused() {
        use crate::routing::RoutingMode;
        for (s, m) in [
            ("none", RoutingMode::None),
            ("native", RoutingMode::Native),
            ("vxlan", RoutingMode::Vxlan),
        ] {
            let mut v = base();
            v.extend(["--routing", s]);
            assert_eq!(Args::try_parse_from(v).unwrap().routing, m);
        }
        let mut v = base();
        v.extend(["--routing", "bgp"]);
        let e = Args::try_parse_from(v).unwrap_err().to_string();
        assert!(e.contains("native") && e.contains("vxlan"), "{e}");
    }

    #[test]
    fn vxlan_flags_default_to_vni_2_port_8472_and_refuse_what_the_kernel_would() {
        let a = Args::try_parse_from(base()).unwrap();
        assert_eq!((a.vxlan_vni, a.vxlan_port), (2, 8472));
        assert_eq!(a.vxlan_local_address, None);
        let mut v = base();
        v.extend([
            "--routing",
            "vxlan",
            "--vxlan-vni",
            "42",
            "--vxlan-port",
            "4789",
            "--vxlan-local-address",
            "192.0.2.1",
        ]);
        let a = Args::try_parse_from(v).unwrap();
        assert_eq!((a.vxlan_vni, a.vxlan_port), (42, 4789));
        assert_eq!(a.vxlan_local_address, Some("192.0.2.1".parse().unwrap()));
        for (flag, bad) in [
            ("--vxlan-vni", "0"),
            ("--vxlan-vni", "16777216"),
            ("--vxlan-port", "0"),
            ("--vxlan-port", "65536"),
            ("--vxlan-local-address", "node1"),
        ] {
            let mut v = base();
            v.extend([flag, bad]);
            let e = Args::try_parse_from(v).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(bad), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_rule() {
        let mut v = base();
        v[2] = "Bad_Name";
        let e = Args::try_parse_from(v).unwrap_err().to_string();
        assert!(e.contains("cluster-name") && e.contains("Bad_Name"), "{e}");
        let mut v = base();
        v[4] = "0";
        let e = Args::try_parse_from(v).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let mut v = base();
        v.extend(["--stale-grace", "soon"]);
        let e = Args::try_parse_from(v).unwrap_err().to_string();
        assert!(e.contains("not a duration"), "{e}");
        let mut v = base();
        v.extend(["--health-failures", "0"]);
        assert!(Args::try_parse_from(v).is_err());
    }

    #[test]
    fn overrides() {
        let mut v = base();
        v.extend([
            "--health-interval",
            "50ms",
            "--kvstoremesh",
            "--log-format",
            "json",
            "--status-listen",
            "0.0.0.0:9000",
        ]);
        let a = Args::try_parse_from(v).unwrap();
        assert_eq!(a.health_interval, Duration::from_millis(50));
        assert!(a.kvstoremesh);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.status_listen.port(), 9000);
    }
}
