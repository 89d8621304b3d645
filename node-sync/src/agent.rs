//! The agent: one task owns the merge index and the map writer, and wires the cluster watchers,
//! the health checker, the publisher and passive detection to them. It applies watcher events in
//! batches, evaluates cluster liveness on a tick, writes only the frontends that changed, and after
//! every batch publishes an immutable [`Snapshot`] on a watch channel; the status server, the
//! tests and the bench read that, never the task's state. Readiness is one [`Readiness`] state.
//! At start nothing is written until every cluster finished its initial sync (bounded by the sync
//! timeout); then one full reconcile brings the pinned maps to the desired state.
//!
//! Files: this one holds the options and the handle ([`Agent`], [`StatusSource`]); `agent/state.rs`
//! the task's state, how a watcher event changes it and how it becomes a snapshot;
//! `agent/event_loop.rs` the task; `agent/writes.rs` the map writes after a batch;
//! `agent/connections.rs` the watchers of remote clusters; `agent/passive_events.rs` the kernel's
//! suspect marks; `agent/nodes.rs` the remote clusters' nodes, handed to the route manager
//! (`--routing`) as a [`crate::routing::NodeSet`].

mod connections;
mod event_loop;
mod nodes;
mod passive_events;
mod state;
#[cfg(test)]
mod tests;
mod writes;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_model::{ClusterId, ClusterName};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::Args;
use crate::cluster::{self, ClusterSource};
use crate::datapath::ClusterIds;
use crate::lb::MapWriter;
pub use crate::readiness::Readiness;
pub use crate::snapshot::{DestroyStats, Snapshot};
use crate::watch::WatchSettings;

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Local cluster.
    pub cluster: ClusterName,
    /// Local cluster id.
    pub cluster_id: ClusterId,
    /// This node.
    pub node: String,
    /// Local etcd URLs.
    pub etcd_endpoints: Vec<String>,
    /// Client certificate directory.
    pub tls_dir: Option<PathBuf>,
    /// Remote cluster files.
    pub remote_config_dir: Option<PathBuf>,
    /// Grace before a non-live cluster is stale.
    pub stale_grace: Duration,
    /// Longest wait for the initial sync.
    pub sync_timeout: Duration,
    /// A heartbeat older than this makes a cluster not live.
    pub heartbeat_timeout: Duration,
    /// Read only the local etcd.
    pub kvstoremesh: bool,
    /// Probe interval.
    pub health_interval: Duration,
    /// Failed probes before failing.
    pub health_failures: u32,
    /// Good probes in a row before a failing backend is healthy again.
    pub health_rise: u32,
    /// Timeout of the probes that check, from this node, that remote clusters' selected backends
    /// answer (`None`: not checked).
    pub remote_probe_timeout: Option<Duration>,
    /// Watcher settings.
    pub watch: WatchSettings,
    /// How often the remote config dir is re-read.
    pub remote_dir_poll: Duration,
    /// How often nodestatus is written.
    pub status_every: Duration,
    /// Run the health checker and the publisher.
    pub publish: bool,
    /// Abort this node's sockets to backends that failed (`crate::sockdestroy`).
    pub destroy_sockets: bool,
    /// Cluster ids learnt from accepted configs (shared with the datapath writer).
    pub cluster_ids: ClusterIds,
}

impl AgentOptions {
    /// Options from the command line.
    pub fn from_args(a: &Args) -> Self {
        Self {
            cluster: a.cluster_name.clone(),
            cluster_id: a.cluster_id,
            node: a.node_name.clone(),
            etcd_endpoints: a.etcd.endpoints.clone(),
            tls_dir: a.etcd.tls_dir.clone(),
            remote_config_dir: a.remote_config_dir.clone(),
            stale_grace: a.stale_grace,
            sync_timeout: a.sync_timeout,
            heartbeat_timeout: Duration::from_secs(5),
            kvstoremesh: a.kvstoremesh,
            health_interval: a.health_interval,
            health_failures: a.health_failures,
            health_rise: a.health_rise,
            remote_probe_timeout: (!a.remote_probe_timeout.is_zero())
                .then_some(a.remote_probe_timeout),
            destroy_sockets: !a.keep_failed_sockets,
            watch: WatchSettings::default(),
            remote_dir_poll: Duration::from_secs(1),
            status_every: Duration::from_secs(5),
            publish: true,
            cluster_ids: ClusterIds::default(),
        }
    }

    fn local_source(&self) -> ClusterSource {
        let tls = if self
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"))
        {
            self.tls_dir
                .as_deref()
                .map(|d| cluster::tls_from_dir(d, false))
        } else {
            None
        };
        ClusterSource {
            name: self.cluster.clone(),
            expected_id: Some(self.cluster_id),
            endpoints: self.etcd_endpoints.clone(),
            tls,
        }
    }
}

/// What the status server reads: the agent's snapshots, and a flag asking the agent to read the
/// kernel's connect counters again (it does, at most once a second, on its own loop).
#[derive(Clone)]
pub struct StatusSource {
    /// The latest snapshot.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Set by a scrape; the agent refreshes the golden signals and clears it.
    pub counters_wanted: Arc<AtomicBool>,
    /// Query counters of the clusterset.local DNS server, when one runs (shown in /metrics).
    pub dns_metrics: Option<Arc<clusterset_dns::DnsMetrics>>,
    /// The route manager's status, when `--routing` is not `none` (shown in /api/v1/status and /metrics).
    pub routing: Option<crate::status::RoutingView>,
}

impl StatusSource {
    /// The latest snapshot (the channel's lock is held only to clone the `Arc`).
    pub fn latest(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// The latest snapshot, and ask for fresh connect counters in the next ones.
    pub fn latest_with_fresh_counters(&self) -> Arc<Snapshot> {
        self.counters_wanted.store(true, Ordering::Relaxed);
        self.latest()
    }
}

/// Handle on a running agent.
pub struct Agent {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    counters_wanted: Arc<AtomicBool>,
    dns_zone: watch::Sender<Arc<clusterset_dns::Zone>>,
    nodes: watch::Receiver<crate::routing::NodeSet>,
    task: JoinHandle<()>,
}

impl Agent {
    /// The latest snapshot of the agent's state.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver of the snapshots (`changed()` resolves at the next one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Wait until a snapshot satisfies `f` (or the agent stopped: then `None`).
    pub async fn wait_until(&self, mut f: impl FnMut(&Snapshot) -> bool) -> Option<Arc<Snapshot>> {
        let mut rx = self.snapshots.clone();
        let found = rx.wait_for(|s| f(s)).await.ok()?.clone();
        Some(found)
    }

    /// What the status server reads.
    pub fn status_source(&self) -> StatusSource {
        StatusSource {
            snapshots: self.snapshots.clone(),
            counters_wanted: self.counters_wanted.clone(),
            dns_metrics: None,
            routing: None,
        }
    }

    /// The clusterset.local zone, kept current while someone holds a receiver (for
    /// `clusterset_dns::DnsServer`).
    pub fn dns_zone(&self) -> watch::Receiver<Arc<clusterset_dns::Zone>> {
        self.dns_zone.subscribe()
    }

    /// The remote clusters' nodes, sent after each batch that changed them (or completed the initial sync of
    /// every cluster); the channel closes when the agent stops. What `--routing` follows.
    pub fn remote_nodes(&self) -> watch::Receiver<crate::routing::NodeSet> {
        self.nodes.clone()
    }

    /// Stop the agent and its tasks.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start the agent on the current tokio runtime.
pub fn start(opts: AgentOptions, maps: Box<dyn MapWriter>) -> Agent {
    start_with_events(opts, maps, None)
}

/// Start the agent with the datapath's ring buffer of suspect marks (passive failure detection,
/// see [`crate::passive`]).
pub fn start_with_events(
    opts: AgentOptions,
    maps: Box<dyn MapWriter>,
    events: Option<global_lb_bpf::signals::SuspectEvents>,
) -> Agent {
    let first = Snapshot::starting(
        opts.cluster.clone(),
        opts.node.clone(),
        opts.tls_dir.clone(),
    );
    let (snap_tx, snapshots) = watch::channel(Arc::new(first));
    let dns_zone = watch::channel(Arc::new(clusterset_dns::Zone::default())).0;
    let counters_wanted = Arc::new(AtomicBool::new(false));
    let state = state::AgentState::new(
        opts,
        maps,
        snap_tx,
        dns_zone.clone(),
        counters_wanted.clone(),
    );
    let nodes = state.nodes.subscribe();
    let task = tokio::spawn(event_loop::run(state, events));
    Agent {
        snapshots,
        counters_wanted,
        dns_zone,
        nodes,
        task,
    }
}
