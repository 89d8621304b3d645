//! The mesh status as one cluster sees it: what `clustermesh status` prints, what the apiserver serves
//! at `/api/v1/status` (and through gRPC `GetStatus`), and what the status web page draws.
//!
//! It is computed (purely) from the cluster's config, its remote registrations, the summaries its
//! node-syncs write under `nodestatus/<cluster>/<node>`, and the apiserver's own state. The JSON schema is
//! [`MeshStatus::json_schema`].

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::values::{ClusterConfig, FailoverEvent, GoldenSignal, NodeStatus, RemoteCluster};

/// How stale a node summary may be before the node counts as not reporting.
pub const NODE_REPORT_MAX_AGE_MS: u64 = 10_000;

/// The apiserver's own state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiserverState {
    /// The replica that answered.
    pub replica: String,
    /// The current leader (replica name), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// This replica is the leader.
    pub is_leader: bool,
    /// Every source synced once and the first full write is done.
    pub ready: bool,
    /// The cluster's etcd answered.
    pub etcd_healthy: bool,
    /// Keys this cluster publishes.
    pub keys: u64,
    /// Errors from the sources since start (bad annotations, broken files, ...).
    pub source_errors: u64,
}

/// One remote cluster and how this cluster's nodes see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteSummary {
    /// Remote cluster name.
    pub name: String,
    /// Remote cluster id, when registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u16>,
    /// Registered under `remotes/` (the gRPC mode of `clustermesh connect`); `false`: known only
    /// from the nodes' reports (a `--remote-config-dir` entry: a static remote, or `clustermesh
    /// connect --context`). Both count for health.
    pub registered: bool,
    /// Nodes reporting.
    pub nodes: u64,
    /// Nodes whose watch of this remote is up.
    pub nodes_connected: u64,
    /// Nodes that saw every canary of this remote.
    pub nodes_synced: u64,
    /// Oldest heartbeat age any node reports, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_heartbeat_age_ms: Option<u64>,
    /// The earliest time a node marked the remote stale, if any does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<String>,
    /// Most keys any node holds from it.
    pub keys: u64,
    /// Errors nodes report for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl RemoteSummary {
    /// Every reporting node is connected and synced.
    pub fn healthy(&self) -> bool {
        self.nodes > 0 && self.nodes_connected == self.nodes && self.nodes_synced == self.nodes
    }
}

/// A backend of a global service across this cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendSummary {
    /// `ip:port`.
    pub address: String,
    /// Cluster it runs in.
    pub cluster: String,
    /// Runs in this cluster.
    pub local: bool,
    /// Nodes that program it now.
    pub selected_on: u64,
    /// Why it is unusable, if a node says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
    /// Connections sent to it, summed over nodes.
    pub connections: u64,
}

/// A global service across this cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    /// `namespace/name`.
    pub service: String,
    /// Frontends.
    pub frontends: Vec<String>,
    /// Backends.
    pub backends: Vec<BackendSummary>,
    /// Backends per cluster.
    pub backends_by_cluster: BTreeMap<String, u64>,
    /// Connections to local backends.
    pub connections_local: u64,
    /// Connections to remote backends.
    pub connections_remote: u64,
    /// Reasons the nodes give (distinct).
    pub reasons: Vec<String>,
    /// Golden signals by backend cluster, every node's connects over the last minute together
    /// (connects and errors summed, the window the longest, p50/p99 the worst node's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenSignal>,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// This cluster.
    pub cluster: ClusterConfig,
    /// When this was computed (RFC 3339).
    pub generated_at: String,
    /// The apiserver.
    pub apiserver: ApiserverState,
    /// Nodes reporting.
    pub nodes: Vec<NodeStatus>,
    /// Remote clusters.
    pub remotes: Vec<RemoteSummary>,
    /// Global services.
    pub services: Vec<ServiceSummary>,
    /// Recent failovers across nodes, newest last.
    pub failovers: Vec<FailoverEvent>,
    /// Healthy: apiserver ready, etcd healthy, every remote connected and synced on every node.
    pub healthy: bool,
    /// Why not, in words.
    pub problems: Vec<String>,
    /// What needs attention without being a problem yet: certificates expiring within 30 days.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl MeshStatus {
    /// Aggregate. `expected_nodes` is how many nodes the cluster has (its published `nodes/` keys); a
    /// node that has not reported counts as not connected.
    pub fn compute(
        cluster: ClusterConfig,
        apiserver: ApiserverState,
        remotes: &[RemoteCluster],
        nodes: Vec<NodeStatus>,
        expected_nodes: usize,
        generated_at: String,
    ) -> Self {
        let mut summaries: BTreeMap<String, RemoteSummary> = remotes
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    RemoteSummary {
                        name: r.name.to_string(),
                        id: Some(r.id.get()),
                        registered: true,
                        nodes: 0,
                        nodes_connected: 0,
                        nodes_synced: 0,
                        max_heartbeat_age_ms: None,
                        stale_since: None,
                        keys: 0,
                        errors: vec![],
                    },
                )
            })
            .collect();
        let node_count = nodes.len().max(expected_nodes) as u64;
        for s in summaries.values_mut() {
            s.nodes = node_count;
        }
        let mut services: BTreeMap<String, ServiceSummary> = BTreeMap::new();
        // Per service: where each listed backend address is in its summary, and the most
        // backends per cluster any one node knows (listed and unlisted).
        let mut listed_at: HashMap<(String, String), usize> = HashMap::new();
        let mut node_most: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut failovers = Vec::new();
        let mut warnings: Vec<String> = Vec::new();
        for n in &nodes {
            for r in &n.remotes {
                let s = summaries
                    .entry(r.name.to_string())
                    .or_insert_with(|| RemoteSummary {
                        name: r.name.to_string(),
                        id: None,
                        registered: false,
                        nodes: node_count,
                        nodes_connected: 0,
                        nodes_synced: 0,
                        max_heartbeat_age_ms: None,
                        stale_since: None,
                        keys: 0,
                        errors: vec![],
                    });
                s.nodes_connected += u64::from(r.connected);
                s.nodes_synced += u64::from(r.synced);
                if let Some(age) = r.heartbeat_age_ms {
                    s.max_heartbeat_age_ms =
                        Some(s.max_heartbeat_age_ms.map_or(age, |m| m.max(age)));
                }
                if let Some(since) = &r.stale_since
                    && s.stale_since.as_ref().is_none_or(|cur| since < cur)
                {
                    s.stale_since = Some(since.clone());
                }
                s.keys = s.keys.max(r.keys);
                if let Some(e) = &r.error
                    && !s.errors.contains(e)
                {
                    s.errors.push(e.clone());
                }
            }
            for st in &n.service_states {
                let sum = services
                    .entry(st.service.clone())
                    .or_insert_with(|| ServiceSummary {
                        service: st.service.clone(),
                        frontends: vec![],
                        backends: vec![],
                        backends_by_cluster: BTreeMap::new(),
                        connections_local: 0,
                        connections_remote: 0,
                        reasons: vec![],
                        golden: vec![],
                    });
                for f in &st.frontends {
                    if !sum.frontends.contains(f) {
                        sum.frontends.push(f.clone());
                    }
                }
                if !sum.reasons.contains(&st.reason) {
                    sum.reasons.push(st.reason.clone());
                }
                let unlisted = st.unlisted.clone().unwrap_or_default();
                sum.connections_local += unlisted.connections_local;
                sum.connections_remote += unlisted.connections_remote;
                let mut known: BTreeMap<String, u64> = unlisted.by_cluster;
                for b in &st.backends {
                    *known.entry(b.cluster.to_string()).or_default() += 1;
                    let address = format!("{}", std::net::SocketAddr::new(b.ip, b.port));
                    let at = *listed_at
                        .entry((st.service.clone(), address.clone()))
                        .or_insert_with(|| {
                            sum.backends.push(BackendSummary {
                                address,
                                cluster: b.cluster.to_string(),
                                local: b.local,
                                selected_on: 0,
                                unusable: None,
                                connections: 0,
                            });
                            sum.backends.len() - 1
                        });
                    let entry = &mut sum.backends[at];
                    entry.selected_on += u64::from(b.selected);
                    entry.connections += b.connections;
                    if entry.unusable.is_none() {
                        entry.unusable = b.unusable.clone();
                    }
                    if b.local {
                        sum.connections_local += b.connections;
                    } else {
                        sum.connections_remote += b.connections;
                    }
                }
                let most = node_most.entry(st.service.clone()).or_default();
                for (cluster, n) in known {
                    let m = most.entry(cluster).or_default();
                    *m = (*m).max(n);
                }
            }
            failovers.extend(n.failovers.iter().cloned());
            for w in &n.cert_warnings {
                let w = format!("{}: {w}", n.node);
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            for g in &n.golden_signals {
                let Some(sum) = services.get_mut(&g.service) else {
                    continue;
                };
                match sum.golden.iter_mut().find(|x| x.cluster == g.cluster) {
                    Some(x) => {
                        x.connects += g.connects;
                        x.errors += g.errors;
                        x.window_ms = x.window_ms.max(g.window_ms);
                        x.p50_us = x.p50_us.max(g.p50_us);
                        x.p99_us = x.p99_us.max(g.p99_us);
                    }
                    None => sum.golden.push(g.clone()),
                }
            }
        }
        for sum in services.values_mut() {
            sum.backends.sort_by(|a, b| {
                (!a.local, &a.cluster, &a.address).cmp(&(!b.local, &b.cluster, &b.address))
            });
            sum.backends_by_cluster.clear();
            for b in &sum.backends {
                *sum.backends_by_cluster
                    .entry(b.cluster.clone())
                    .or_default() += 1;
            }
            // A node that lists only some of a large service's backends counts the rest.
            for (cluster, n) in node_most.remove(&sum.service).unwrap_or_default() {
                let c = sum.backends_by_cluster.entry(cluster).or_default();
                *c = (*c).max(n);
            }
        }
        failovers.sort_by(|a, b| a.at.cmp(&b.at));
        let keep_from = failovers.len().saturating_sub(50);
        let failovers = failovers.split_off(keep_from);

        let mut problems = Vec::new();
        if !apiserver.etcd_healthy {
            problems.push("the cluster's etcd does not answer".to_owned());
        }
        if !apiserver.ready {
            problems.push("the apiserver has not finished its first full sync".to_owned());
        }
        let remotes: Vec<RemoteSummary> = summaries.into_values().collect();
        for r in &remotes {
            if r.nodes == 0 {
                problems.push(format!("no node reports its connection to {}", r.name));
            } else if !r.healthy() {
                problems.push(format!(
                    "{}: {}/{} nodes connected, {}/{} synced{}",
                    r.name,
                    r.nodes_connected,
                    r.nodes,
                    r.nodes_synced,
                    r.nodes,
                    if r.errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", r.errors.join("; "))
                    }
                ));
            }
        }
        MeshStatus {
            cluster,
            generated_at,
            apiserver,
            nodes,
            healthy: problems.is_empty(),
            problems,
            remotes,
            services: services.into_values().collect(),
            failovers,
            warnings,
        }
    }

    /// One line in Cilium's words: "All 2 nodes are connected to all clusters [1 remotes]".
    pub fn connectivity_line(&self) -> String {
        let registered: Vec<&RemoteSummary> = self.remotes.iter().collect();
        let n = registered
            .iter()
            .map(|r| r.nodes)
            .max()
            .unwrap_or(self.nodes.len() as u64);
        if registered.is_empty() {
            return format!("{n} nodes, no remote cluster connected");
        }
        let all = registered.iter().all(|r| r.healthy());
        if all {
            format!(
                "All {n} nodes are connected to all clusters [{} remotes]",
                registered.len()
            )
        } else {
            let worst = registered
                .iter()
                .map(|r| r.nodes_connected.min(r.nodes_synced))
                .min()
                .unwrap_or(0);
            format!(
                "{worst}/{n} nodes are connected to all clusters [{} remotes]",
                registered.len()
            )
        }
    }

    /// The JSON schema of this document (draft 2020-12), served at `/api/v1/status/schema`.
    pub fn json_schema() -> &'static str {
        include_str!("status.schema.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterId, ClusterName, MaxConnectedClusters};
    use crate::values::{BackendState, Capabilities, RemoteState, ServiceState, Unlisted};

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }
    fn config() -> ClusterConfig {
        ClusterConfig {
            name: c("c1"),
            id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
            max_connected_clusters: MaxConnectedClusters::DEFAULT,
            capabilities: Capabilities::default(),
            ca_fingerprints: vec![],
        }
    }
    fn node(name: &str, connected: bool, conns: u64) -> NodeStatus {
        NodeStatus {
            cluster: c("c1"),
            node: name.into(),
            updated_at: "2026-11-23T15:00:00Z".into(),
            remotes: vec![RemoteState {
                name: c("c2"),
                connected,
                synced: connected,
                heartbeat_age_ms: Some(if connected { 300 } else { 9000 }),
                stale_since: (!connected).then(|| "2026-11-23T14:59:00Z".into()),
                keys: 12,
                error: (!connected).then(|| "connection refused".into()),
            }],
            services: 1,
            service_states: vec![ServiceState {
                service: "default/echo".into(),
                frontends: vec!["10.96.0.10:80/TCP".into()],
                backends: vec![
                    BackendState {
                        ip: "10.1.1.1".parse().unwrap(),
                        port: 8080,
                        cluster: c("c1"),
                        local: true,
                        selected: true,
                        unusable: None,
                        connections: conns,
                    },
                    BackendState {
                        ip: "10.2.1.1".parse().unwrap(),
                        port: 8080,
                        cluster: c("c2"),
                        local: false,
                        selected: false,
                        unusable: None,
                        connections: 1,
                    },
                ],
                reason: "local backends usable".into(),
                unlisted: None,
            }],
            failovers: vec![],
            golden_signals: vec![],
            cert_warnings: vec![],
        }
    }
    fn remote() -> RemoteCluster {
        RemoteCluster {
            name: c("c2"),
            id: ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
            endpoints: vec!["https://10.0.2.1:2379".into()],
            ca_bundle: String::new(),
            client_cert: String::new(),
        }
    }
    fn api() -> ApiserverState {
        ApiserverState {
            ready: true,
            etcd_healthy: true,
            is_leader: true,
            ..Default::default()
        }
    }

    #[test]
    fn golden_signals_of_every_node_add_up_per_service_and_cluster() {
        let g = |connects, errors, window_ms, p99| GoldenSignal {
            service: "default/echo".into(),
            cluster: "c1".into(),
            window_ms,
            connects,
            errors,
            p50_us: Some(100),
            p99_us: Some(p99),
        };
        let mut a = node("n1", true, 5);
        a.golden_signals = vec![g(600, 6, 60_000, 250)];
        let mut b = node("n2", true, 5);
        b.golden_signals = vec![g(300, 0, 30_000, 1000)];
        let s = MeshStatus::compute(config(), api(), &[remote()], vec![a, b], 2, "now".into());
        let svc = &s.services[0];
        assert_eq!(svc.golden.len(), 1);
        let c1 = &svc.golden[0];
        assert_eq!((c1.connects, c1.errors, c1.window_ms), (900, 6, 60_000));
        assert_eq!(c1.p99_us, Some(1000), "the worst node's");
        assert!((c1.rate() - 15.0).abs() < 1e-9);
        assert!((c1.error_ratio() - 6.0 / 900.0).abs() < 1e-12);
        // The JSON names it as the schema does.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["services"][0]["golden"][0]["p99Us"], 1000);
    }

    /// Nodes of a large mesh list only some backends of a service and count the rest: the
    /// per-cluster counts are the most any node knows, the list is the listed ones.
    #[test]
    fn backends_a_node_counts_without_listing_them_are_in_the_per_cluster_counts() {
        let mut a = node("n1", true, 5);
        a.service_states[0].unlisted = Some(Unlisted {
            by_cluster: BTreeMap::from([("c2".to_owned(), 300)]),
            selected: 0,
            connections_local: 0,
            connections_remote: 2,
        });
        let mut b = node("n2", true, 5);
        b.service_states[0].unlisted = Some(Unlisted {
            by_cluster: BTreeMap::from([("c2".to_owned(), 299), ("c3".to_owned(), 4)]),
            selected: 4,
            connections_local: 0,
            connections_remote: 3,
        });
        let listed_remote = MeshStatus::compute(
            config(),
            api(),
            &[remote()],
            vec![node("n1", true, 5), node("n2", true, 5)],
            2,
            "now".into(),
        )
        .services[0]
            .connections_remote;
        let s = MeshStatus::compute(config(), api(), &[remote()], vec![a, b], 2, "now".into());
        let svc = &s.services[0];
        assert_eq!(svc.backends.len(), 2, "the listed ones: {:?}", svc.backends);
        assert_eq!(
            svc.backends_by_cluster,
            BTreeMap::from([
                ("c1".to_owned(), 1),
                ("c2".to_owned(), 301),
                ("c3".to_owned(), 4)
            ])
        );
        assert_eq!(
            svc.connections_remote,
            listed_remote + 5,
            "the unlisted backends' connections count"
        );
    }

    #[test]
    fn nodes_certificate_warnings_are_the_status_warnings_and_not_problems() {
        let mut a = node("n1", true, 5);
        a.cert_warnings =
            vec!["certificate node of node-sync (/d/node.crt) expires in 12 days".into()];
        let mut b = node("n2", true, 5);
        b.cert_warnings = a.cert_warnings.clone();
        let s = MeshStatus::compute(config(), api(), &[remote()], vec![a, b], 2, "now".into());
        assert_eq!(
            s.warnings,
            vec![
                "n1: certificate node of node-sync (/d/node.crt) expires in 12 days".to_owned(),
                "n2: certificate node of node-sync (/d/node.crt) expires in 12 days".to_owned()
            ]
        );
        assert!(s.healthy, "a warning is not a problem: {:?}", s.problems);
    }

    #[test]
    fn all_nodes_connected() {
        let s = MeshStatus::compute(
            config(),
            api(),
            &[remote()],
            vec![node("n1", true, 5), node("n2", true, 7)],
            2,
            "t".into(),
        );
        assert!(s.healthy, "{:?}", s.problems);
        assert_eq!(
            s.connectivity_line(),
            "All 2 nodes are connected to all clusters [1 remotes]"
        );
        let svc = &s.services[0];
        assert_eq!(svc.connections_local, 12);
        assert_eq!(svc.connections_remote, 2);
        assert_eq!(svc.backends[0].selected_on, 2);
        assert_eq!(svc.backends_by_cluster.get("c2"), Some(&1));
    }

    #[test]
    fn a_remote_known_only_from_the_nodes_config_dir_counts_for_health() {
        // No `remotes/` entry (clustermesh connect --context writes a Secret node-sync mounts).
        let down = MeshStatus::compute(
            config(),
            api(),
            &[],
            vec![node("n1", true, 0), node("n2", false, 0)],
            2,
            "t".into(),
        );
        assert!(!down.healthy);
        assert!(!down.remotes[0].registered);
        assert!(
            down.problems[0].contains("c2: 1/2 nodes connected"),
            "{:?}",
            down.problems
        );
        assert_eq!(
            down.connectivity_line(),
            "1/2 nodes are connected to all clusters [1 remotes]"
        );
        let up = MeshStatus::compute(
            config(),
            api(),
            &[],
            vec![node("n1", true, 0), node("n2", true, 0)],
            2,
            "t".into(),
        );
        assert!(up.healthy, "{:?}", up.problems);
    }

    #[test]
    fn a_disconnected_node_is_a_problem_named_in_words() {
        let s = MeshStatus::compute(
            config(),
            api(),
            &[remote()],
            vec![node("n1", true, 0), node("n2", false, 0)],
            2,
            "t".into(),
        );
        assert!(!s.healthy);
        assert_eq!(
            s.connectivity_line(),
            "1/2 nodes are connected to all clusters [1 remotes]"
        );
        assert!(
            s.problems[0].contains("c2: 1/2 nodes connected")
                && s.problems[0].contains("connection refused"),
            "{:?}",
            s.problems
        );
        assert_eq!(
            s.remotes[0].stale_since.as_deref(),
            Some("2026-11-23T14:59:00Z")
        );
        assert_eq!(s.remotes[0].max_heartbeat_age_ms, Some(9000));
    }

    #[test]
    fn a_node_that_has_not_reported_yet_is_not_connected() {
        let s = MeshStatus::compute(
            config(),
            api(),
            &[remote()],
            vec![node("n1", true, 1)],
            2,
            "t".into(),
        );
        assert!(!s.healthy);
        assert_eq!(s.remotes[0].nodes, 2);
        assert_eq!(
            s.connectivity_line(),
            "1/2 nodes are connected to all clusters [1 remotes]"
        );
    }

    #[test]
    fn no_nodes_and_unready_apiserver_are_problems() {
        let s = MeshStatus::compute(
            config(),
            ApiserverState::default(),
            &[remote()],
            vec![],
            0,
            "t".into(),
        );
        assert!(!s.healthy);
        assert_eq!(s.problems.len(), 3, "{:?}", s.problems);
    }

    #[test]
    fn schema_is_valid_json_naming_every_top_level_field() {
        let schema: serde_json::Value = serde_json::from_str(MeshStatus::json_schema()).unwrap();
        let s = MeshStatus::compute(
            config(),
            api(),
            &[remote()],
            vec![node("n1", true, 1)],
            1,
            "t".into(),
        );
        let doc = serde_json::to_value(&s).unwrap();
        let props = schema["properties"].as_object().unwrap();
        for k in doc.as_object().unwrap().keys() {
            assert!(props.contains_key(k), "schema lacks {k}");
        }
        for k in schema["required"].as_array().unwrap() {
            assert!(
                doc.get(k.as_str().unwrap()).is_some(),
                "document lacks required {k}"
            );
        }
    }
}
