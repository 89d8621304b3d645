//! The agent's published view: an immutable [`Snapshot`] of everything the status server,
//! `/metrics`, `/api/v1/status` and the tests read, sent on a `tokio::sync::watch` channel after
//! every batch of changes.
//!
//! The agent's task owns the merge index and the map writer alone; readers take the latest
//! `Arc<Snapshot>` (the channel's lock is held only to clone the `Arc`) and render from it, so a
//! scrape never waits for a map write and a map write never waits for a scrape. The large parts
//! are shared between snapshots and rebuilt only when they changed: the service selections are the
//! index's own `Arc`s, taken again only when the index's generation moved, and left unsorted (a
//! reader sorts its copy). During a burst the loop publishes at most one snapshot per
//! [`PUBLISH_EVERY`] (the first change after a quiet spell at once, the last one of the burst at
//! most that much later), so a burst costs the loop a pointer copy per service every few
//! milliseconds, not per event.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use mesh_model::ClusterName;
use mesh_model::keys::ServiceName;
use mesh_model::values::{FailoverEvent, Protocol};

use crate::cluster::{ClusterSource, LiveState, Liveness};
use crate::index::ServiceStatus;
use crate::lb::Frontend;
use crate::passive::{GoldenRow, TotalsByService};
use crate::readiness::Readiness;

/// The shortest time between two snapshots while changes keep coming.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(5);

/// One cluster as the agent saw it at the snapshot.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// How it is reached (none for clusters only seen through KVStoreMesh).
    /// Shared with the agent's state: a snapshot (up to 200 a second) copies no endpoint list.
    pub source: Option<std::sync::Arc<ClusterSource>>,
    /// Connection and heartbeat.
    pub liveness: Liveness,
    /// Last evaluated state.
    pub state: LiveState,
    /// Initial sync done (list and canaries).
    pub synced: bool,
    /// The id of its accepted cluster config.
    pub id: Option<u16>,
    /// Refusal or connection error.
    pub error: Option<String>,
    /// Whether its config was refused.
    pub refused: bool,
    /// Keys held from it.
    pub keys: usize,
    /// Endpoints held from it (in every chunk read, usable or not).
    pub endpoints: usize,
    /// Reconnects.
    pub reconnects: u64,
    /// Values refused because they did not decode or validate.
    pub bad_values: u64,
    /// When it went stale (wall clock).
    pub stale_since: Option<SystemTime>,
    /// Since when its backends do not answer from this node, while they do not.
    pub unreachable_since: Option<SystemTime>,
    /// Left out of selection (stale, or not synced yet).
    pub excluded: bool,
}

/// Map operations since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapWrites {
    /// Frontends written.
    pub upserts: u64,
    /// Frontends deleted.
    pub deletes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Frontends not programmed for lack of room in the maps, waiting for room.
    pub waiting_for_room: u64,
}

/// Passive failure detection's counters (see [`crate::passive`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassiveCounts {
    /// Marks received.
    pub marks: u64,
    /// Marks a probe confirmed.
    pub confirmed: u64,
    /// Marks a probe contradicted.
    pub cleared: u64,
    /// Backends brought back by good probes after a confirmed failure.
    pub recovered: u64,
    /// Kernel mark to node-sync reading it: the latest.
    pub last_delay: Duration,
    /// The largest.
    pub max_delay: Duration,
}

/// The golden signals as last read from the kernel's connect outcomes.
#[derive(Debug, Clone, Default)]
pub struct GoldenView {
    /// Totals by (service, cluster) since the start.
    pub totals: TotalsByService,
    /// The last-minute summary at the read.
    pub summary: Vec<GoldenRow>,
}

/// Counts of [`crate::sockdestroy`] runs (bumped by the tasks that abort sockets, off the loop).
#[derive(Debug, Default)]
pub struct DestroyStats {
    /// TCP sockets aborted.
    pub tcp: AtomicU64,
    /// Connected UDP sockets aborted.
    pub udp: AtomicU64,
    /// Runs that failed (permission, kernel without SOCK_DESTROY).
    pub errors: AtomicU64,
}

/// Everything readers need, as of one batch of the agent's loop.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Published snapshots before this one (0: the one made at start).
    pub seq: u64,
    /// When it was made.
    pub at: Instant,
    /// The local cluster.
    pub cluster: ClusterName,
    /// This node.
    pub node: String,
    /// `--tls-dir` (certificate expiries are read from it when rendered).
    pub tls_dir: Option<PathBuf>,
    /// Where the node stands.
    pub readiness: Readiness,
    /// Clusters by name (the local one included).
    pub clusters: BTreeMap<ClusterName, ClusterView>,
    /// The merge index's generation the services were taken at.
    pub generation: u64,
    /// Every global service with its selection, in no order (readers sort: see
    /// [`Snapshot::services_by_name`]; the loop does not spend the time).
    pub services: Arc<[Arc<ServiceStatus>]>,
    /// Frontends failing open, with their service.
    pub fail_open: Arc<[(ServiceName, Frontend)]>,
    /// Frontends moved from their preferred clusters to a failover group, since the start.
    pub failovers: u64,
    /// Endpoints held from every cluster.
    pub endpoints: usize,
    /// The nodes whose health reports are held, by cluster.
    pub health_reporters: Arc<[(ClusterName, String)]>,
    /// Backends out of this node's selection after a confirmed failed connect.
    pub passive_failures: Vec<(ClusterName, (IpAddr, u16, Protocol))>,
    /// Map operations.
    pub map_writes: MapWrites,
    /// Errors in the remote config dir.
    pub remote_config_errors: Arc<[String]>,
    /// Recent failovers and failbacks (newest last).
    pub failover_log: Arc<[FailoverEvent]>,
    /// Connections the datapath sent to each backend, as last read.
    pub connections: Arc<HashMap<(IpAddr, u16), u64>>,
    /// Golden signals, as last read.
    pub golden: Arc<GoldenView>,
    /// Passive detection counters.
    pub passive: PassiveCounts,
    /// Sockets aborted because their backend failed.
    pub destroyed: Arc<DestroyStats>,
}

impl Snapshot {
    /// The snapshot before the agent's first batch.
    pub fn starting(cluster: ClusterName, node: String, tls_dir: Option<PathBuf>) -> Self {
        Self {
            seq: 0,
            at: Instant::now(),
            cluster,
            node,
            tls_dir,
            readiness: Readiness::Starting,
            clusters: BTreeMap::new(),
            generation: u64::MAX,
            services: Arc::from(Vec::new()),
            fail_open: Arc::from(Vec::new()),
            failovers: 0,
            endpoints: 0,
            health_reporters: Arc::from(Vec::new()),
            passive_failures: Vec::new(),
            map_writes: MapWrites::default(),
            remote_config_errors: Arc::from(Vec::new()),
            failover_log: Arc::from(Vec::new()),
            connections: Arc::default(),
            golden: Arc::default(),
            passive: PassiveCounts::default(),
            destroyed: Arc::default(),
        }
    }

    /// Whether the maps follow the index.
    pub fn ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// One service's selection.
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceStatus> {
        self.services
            .iter()
            .find(|s| s.service == *name)
            .map(|s| &**s)
    }

    /// Every global service with its selection, sorted by name.
    pub fn services_by_name(&self) -> Vec<&ServiceStatus> {
        let mut v: Vec<&ServiceStatus> = self.services.iter().map(|s| &**s).collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }

    /// Whether the health report of `node` of `cluster` is held.
    pub fn has_health_report(&self, cluster: &ClusterName, node: &str) -> bool {
        self.health_reporters
            .iter()
            .any(|(c, n)| c == cluster && n == node)
    }

    /// The certificates this node-sync loads and when they expire: the node and remote leaves of
    /// `--tls-dir` (with their intermediate and the bundle's roots) and each reader certificate a
    /// remote cluster issued us (`remote-reader-<cluster>`, from its `remotes/` entry). Reads the
    /// files, so call it off the agent's loop.
    pub fn cert_expiries(&self) -> Vec<mesh_certs::expiry::CertExpiry> {
        cert_expiries(
            self.tls_dir.as_deref(),
            &self.cluster,
            self.clusters.iter().map(|(n, c)| (n, c.source.as_deref())),
        )
    }

    /// Warnings about certificates near their expiry (as in the node summary).
    pub fn cert_warnings(&self) -> Vec<String> {
        if self.tls_dir.is_none() {
            return Vec::new();
        }
        mesh_certs::expiry::warnings(
            "node-sync",
            &self.cert_expiries(),
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
    }
}

/// See [`Snapshot::cert_expiries`]; shared with the node summary the agent publishes.
pub fn cert_expiries<'a>(
    tls_dir: Option<&std::path::Path>,
    local: &ClusterName,
    clusters: impl Iterator<Item = (&'a ClusterName, Option<&'a ClusterSource>)>,
) -> Vec<mesh_certs::expiry::CertExpiry> {
    let Some(dir) = tls_dir else {
        return Vec::new();
    };
    let mut out =
        mesh_certs::expiry::in_dir(dir, &[mesh_certs::Role::Node, mesh_certs::Role::Remote]);
    for (name, source) in clusters {
        let Some(pem) = source
            .and_then(|s| s.tls.as_ref())
            .and_then(|t| t.cert_pem.as_deref())
        else {
            continue;
        };
        let origin = format!(
            "{}remotes/{local}/{name} clientCert",
            mesh_model::keys::PREFIX
        );
        out.extend(mesh_certs::expiry::of_pem(
            &format!("remote-reader-{name}"),
            &origin,
            pem,
        ));
    }
    out
}
