//! KVStoreMesh: the leader also mirrors every remote cluster's keys into the local etcd, so the cluster's
//! node-syncs watch only their local etcd (remote watchers then scale with clusters, not with nodes).
//!
//! Remotes are the `clustermesh/v1/remotes/<self>/<peer>` keys of the local etcd (written by `clustermesh
//! connect` through the gRPC API). For each peer: list its keys in its etcd, write what differs locally and delete
//! local copies it no longer has (mark and sweep, so a reconnect never leaves an empty window), then write
//! `synced/<peer>/<kind>` canaries of our own, then follow its watch. The peer's cluster config is stored with
//! `capabilities.cached = true`. The peer's own canaries, leader key, remotes and node status are not mirrored.
//! A removed remote's mirrored keys are deleted. Every write carries the leader's fencing comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_kv::{Backoff, EtcdStore, Event, Guard, KvError, KvStore, WatchTask, Watcher};
use mesh_model::ClusterName;
use mesh_model::keys::{KeyKind, MeshKey, SyncKind};
use mesh_model::values::{MeshValue, RemoteCluster, format_time};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::etcd::EtcdError;
use crate::status::Status;
use crate::writer::{MAX_TXN_BYTES, MAX_TXN_OPS, Op, batches, send_guarded};

/// Kinds of a peer's keys that are mirrored.
pub const MIRRORED: [KeyKind; 9] = [
    KeyKind::ClusterConfig,
    KeyKind::Heartbeat,
    KeyKind::Services,
    KeyKind::Endpoints,
    KeyKind::Health,
    KeyKind::Identities,
    KeyKind::Ips,
    KeyKind::Nodes,
    KeyKind::Imports,
];

/// How the mirror reaches remote etcds.
#[derive(Debug, Clone, Default)]
pub struct MirrorTls {
    /// Our cluster certificate directory: its `remote` certificate is presented to peers.
    pub cluster_dir: Option<mesh_certs::ClusterDir>,
    /// Where peers' CA bundles (from their remote entries) are written.
    pub work_dir: PathBuf,
}

fn mirrored_prefixes(peer: &ClusterName) -> Vec<String> {
    MIRRORED
        .iter()
        .map(|k| match k {
            KeyKind::ClusterConfig | KeyKind::Heartbeat => {
                // Exact keys; the trailing-slash prefix form would miss them.
                format!("{}{peer}", k.prefix())
            }
            _ => k.cluster_prefix(peer),
        })
        .collect()
}

/// Whether `key` is a mirrored key of `peer`.
fn is_mirrored(key: &str, peer: &ClusterName) -> bool {
    match MeshKey::parse(key) {
        Ok(k) => k.cluster() == peer && MIRRORED.contains(&k.kind()),
        Err(_) => false,
    }
}

/// Whether `key` lies under one of `peer`'s mirrored prefixes (whether or not it parses): such a key is
/// the peer's to publish, so one that does not parse is refused, not skipped. Keys of other clusters in
/// the peer's etcd (a peer that runs KVStoreMesh itself holds its peers' keys) are skipped.
fn claimed_by(key: &str, peer: &ClusterName) -> bool {
    MIRRORED.iter().any(|k| match k {
        KeyKind::ClusterConfig | KeyKind::Heartbeat => key == format!("{}{peer}", k.prefix()),
        _ => key.starts_with(&k.cluster_prefix(peer)),
    })
}

/// What the mirror does with one key of the peer's etcd.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// Not the peer's mirrored key: ignored.
    Skip,
    /// The peer's key, with a value that must not be copied (why).
    Refuse(String),
    /// The value to store locally (cluster configs are marked cached).
    Mirror(Vec<u8>),
}

/// Validates a key and value of `peer`'s etcd as node-sync validates what it reads: the key parses
/// and belongs to the peer, the value decodes and validates against its key (`MeshValue::decode`),
/// and the peer's cluster config carries the id it was registered with.
fn judge(peer: &RemoteCluster, key: &str, value: &[u8]) -> Judged {
    if !claimed_by(key, &peer.name) {
        return Judged::Skip;
    }
    let k = match MeshKey::parse(key) {
        Ok(k) => k,
        Err(e) => return Judged::Refuse(format!("the key does not parse: {e}")),
    };
    if k.cluster() != &peer.name || !MIRRORED.contains(&k.kind()) {
        return Judged::Refuse(format!("not a mirrored key of cluster {}", peer.name));
    }
    match MeshValue::decode(&k, value) {
        Err(e) => Judged::Refuse(e.to_string()),
        Ok(MeshValue::ClusterConfig(mut c)) => {
            if c.id.get() != peer.id.get() {
                return Judged::Refuse(format!(
                    "cluster id {} differs from the id {} the remote was registered with",
                    c.id.get(),
                    peer.id.get()
                ));
            }
            c.capabilities.cached = true;
            Judged::Mirror(MeshValue::ClusterConfig(c).encode())
        }
        Ok(_) => Judged::Mirror(value.to_vec()),
    }
}

/// The refused values of one peer, so that each is logged and counted once (a reconnect lists it again).
struct Refusals {
    peer: ClusterName,
    status: Option<Arc<Status>>,
    /// Key -> mod revision of the refused value.
    seen: HashMap<String, i64>,
}

impl Refusals {
    fn refuse(&mut self, key: &str, mod_revision: i64, why: &str) {
        if self.seen.insert(key.to_owned(), mod_revision) == Some(mod_revision) {
            return;
        }
        warn!(peer = %self.peer, key, reason = why, "kvstoremesh refused a value of the remote; its local copy (if any) is kept");
        if let Some(s) = &self.status {
            s.update(|g| {
                *g.remote_bad_values
                    .entry(self.peer.to_string())
                    .or_default() += 1
            });
        }
    }

    fn accepted(&mut self, key: &str) {
        self.seen.remove(key);
    }
}

/// The local copies of `peer`'s keys and canaries.
async fn list_local<L: KvStore>(
    local: &L,
    peer: &ClusterName,
) -> Result<(BTreeMap<String, Vec<u8>>, BTreeSet<String>), KvError> {
    let mut ours = BTreeMap::new();
    let mut revision = None;
    for p in mirrored_prefixes(peer) {
        let l = local.list(&p, revision).await?;
        revision = Some(l.revision);
        ours.extend(
            l.kvs
                .into_iter()
                .filter(|kv| is_mirrored(&kv.key, peer))
                .map(|kv| (kv.key, kv.value)),
        );
    }
    let canaries = local
        .list(&KeyKind::Synced.cluster_prefix(peer), revision)
        .await?
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    Ok((ours, canaries))
}

async fn write<L: KvStore>(local: &L, ops: Vec<Op>, guard: &Guard) -> Result<usize, EtcdError> {
    let mut n = 0;
    for batch in batches(ops, MAX_TXN_OPS, MAX_TXN_BYTES) {
        send_guarded(local, &batch, guard).await?;
        n += batch.len();
    }
    Ok(n)
}

/// A write request of one mirror: its changes, and where the outcome goes.
type WriteRequest = (Vec<Op>, oneshot::Sender<Result<usize, WriteFailed>>);

/// Why a coalesced write failed (the error itself stays with the writer's log).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteFailed {
    /// The leader key changed: this replica no longer writes.
    #[error("leadership lost")]
    LostLeadership,
    /// The local store refused or did not answer.
    #[error("writing to the local etcd: {0}")]
    Store(String),
}

/// Transactions the [`MirrorWriter`] keeps in flight at once.
pub const MAX_WRITES_IN_FLIGHT: usize = 4;

/// One writer for every peer's mirror: it takes the changes all mirrors send and writes them in
/// as few guarded transactions as fit (128 operations, ~1 MiB), so many peers' changes become one
/// transaction per burst instead of one per peer and watch response. Up to
/// [`MAX_WRITES_IN_FLIGHT`] transactions are in flight at once (etcd commits concurrent proposals
/// together, so a few in flight commit about as fast as one); while all are, the changes queued
/// meanwhile gather into the next. Order: a mirror waits for its own outcome before it sends
/// more, different peers' keys never overlap, and a batch that names a key still in flight (a
/// peer's new mirror while its aborted one's write is out) waits for that write first. Every
/// transaction carries the leadership guard.
#[derive(Clone)]
pub struct MirrorWriter {
    tx: mpsc::Sender<WriteRequest>,
}

impl MirrorWriter {
    /// Start the writer on `local`, every transaction guarded by `guard`. It stops when every
    /// handle is dropped (after the writes in flight).
    pub fn spawn<L: KvStore>(local: L, guard: Guard) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<WriteRequest>(1024);
        let task = tokio::spawn(async move {
            // Writes in flight, each with the keys it names.
            let mut in_flight: JoinSet<()> = JoinSet::new();
            let mut busy: HashMap<tokio::task::Id, HashSet<String>> = HashMap::new();
            let done = |r: Result<(tokio::task::Id, ()), tokio::task::JoinError>| match r {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            };
            loop {
                let first = tokio::select! {
                    biased;
                    Some(r) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                        busy.remove(&done(r));
                        continue;
                    }
                    r = rx.recv(), if in_flight.len() < MAX_WRITES_IN_FLIGHT => match r {
                        Some(r) => r,
                        None => break,
                    },
                };
                let mut n = first.0.len();
                let mut reqs = vec![first];
                while n < MAX_TXN_OPS {
                    let Ok(r) = rx.try_recv() else { break };
                    n += r.0.len();
                    reqs.push(r);
                }
                let ops = coalesce(&reqs);
                let keys: HashSet<String> = ops.iter().map(|op| op.key.clone()).collect();
                // Per-key order: a key still being written is written again only after.
                while busy.values().any(|b| !b.is_disjoint(&keys)) {
                    let Some(r) = in_flight.join_next_with_id().await else {
                        break;
                    };
                    busy.remove(&done(r));
                }
                let (local, guard) = (local.clone(), guard.clone());
                let handle = in_flight.spawn(async move {
                    let outcome = match write(&local, ops, &guard).await {
                        Ok(_) => Ok(()),
                        Err(EtcdError::LostLeadership) => Err(WriteFailed::LostLeadership),
                        Err(e) => Err(WriteFailed::Store(e.to_string())),
                    };
                    for (ops, reply) in reqs {
                        let _ = reply.send(outcome.clone().map(|()| ops.len()));
                    }
                });
                busy.insert(handle.id(), keys);
            }
            while in_flight.join_next().await.is_some() {}
        });
        (Self { tx }, task)
    }

    /// Write `ops` (with whatever other mirrors have queued); the number written.
    pub async fn write(&self, ops: Vec<Op>) -> Result<usize, WriteFailed> {
        if ops.is_empty() {
            return Ok(0);
        }
        let (reply, outcome) = oneshot::channel();
        let gone = || WriteFailed::Store("the mirror writer stopped".into());
        self.tx.send((ops, reply)).await.map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

/// The changes of `reqs` in order, the last change of a key winning (a transaction may not name
/// a key twice).
fn coalesce(reqs: &[WriteRequest]) -> Vec<Op> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    let all: Vec<&Op> = reqs.iter().flat_map(|(ops, _)| ops).collect();
    for (i, op) in all.iter().enumerate() {
        last.insert(op.key.as_str(), i);
    }
    all.iter()
        .enumerate()
        .filter(|(i, op)| last.get(op.key.as_str()) == Some(i))
        .map(|(_, op)| (*op).clone())
        .collect()
}

/// Why a peer's store could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The remote uses https and this apiserver has no certificates to present.
    #[error(
        "remote {0} uses https but this apiserver has no cluster certificate directory (--tls-dir)"
    )]
    NoCertificates(ClusterName),
    /// A file the connection needs could not be written.
    #[error("writing {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("connecting to remote {peer}: {message}")]
    Connect {
        /// The remote.
        peer: ClusterName,
        /// What the connect said (certificate diagnosis included).
        message: String,
    },
}

/// How the mirror reaches a peer's store: [`MirrorTls`] connects to its etcd; tests hand out
/// in-memory stores.
pub trait Dial: Send + Sync + 'static {
    /// The peer's store.
    type Store: KvStore;
    /// Connect to `remote`'s store.
    fn dial(
        &self,
        remote: &RemoteCluster,
    ) -> impl Future<Output = Result<Self::Store, DialError>> + Send;
}

/// Request timeout on a peer's etcd.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Dial for MirrorTls {
    type Store = EtcdStore;

    async fn dial(&self, remote: &RemoteCluster) -> Result<EtcdStore, DialError> {
        let connect_err = |message: String| DialError::Connect {
            peer: remote.name.clone(),
            message,
        };
        let https = remote.endpoints.iter().any(|e| e.starts_with("https://"));
        if !https {
            let c = crate::etcd::connect(&remote.endpoints)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            return Ok(EtcdStore::new(c, PEER_REQUEST_TIMEOUT));
        }
        let dir = self
            .cluster_dir
            .as_ref()
            .ok_or_else(|| DialError::NoCertificates(remote.name.clone()))?;
        let save = |name: String, text: &str| -> Result<PathBuf, DialError> {
            let path = self.work_dir.join(name);
            std::fs::create_dir_all(&self.work_dir)
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|source| DialError::File {
                    path: path.clone(),
                    source,
                })?;
            Ok(path)
        };
        let ca_bundle = if remote.ca_bundle.trim().is_empty() {
            dir.ca_bundle()
        } else {
            save(
                format!("remote-{}-ca-bundle.pem", remote.name.as_str()),
                &remote.ca_bundle,
            )?
        };
        // The certificate the remote issued for our remote key, when it did (its etcd may trust
        // only its own intermediate); else our own remote certificate.
        let mut identity = dir.cert_key(mesh_certs::Role::Remote);
        if !remote.client_cert.trim().is_empty() {
            identity.cert = save(
                format!("remote-{}-client.crt", remote.name.as_str()),
                &remote.client_cert,
            )?;
        }
        let files = mesh_certs::TlsFiles {
            ca_bundle,
            identity: Some(identity),
        };
        let c = mesh_etcd::connect(&remote.endpoints, &files)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        Ok(EtcdStore::new(c, PEER_REQUEST_TIMEOUT))
    }
}

/// Why one mirror pass of a peer ended.
#[derive(Debug, thiserror::Error)]
enum MirrorError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Local(#[from] EtcdError),
    #[error(transparent)]
    Write(#[from] WriteFailed),
    #[error("remote: {0}")]
    Remote(#[from] KvError),
}

/// Watch errors in a row on one connection before the peer is dialled again.
const MAX_STREAM_FAILURES: u32 = 3;

/// Events of a watch taken at once, at most this many per local write.
const MAX_BATCH: usize = 4096;

/// Mirrors one peer until aborted or leadership is lost.
async fn mirror_peer<L: KvStore, D: Dial>(
    local: L,
    own: ClusterName,
    remote: RemoteCluster,
    dial: Arc<D>,
    writer: MirrorWriter,
    status: Option<Arc<Status>>,
) {
    let peer = remote.name.clone();
    let mut refusals = Refusals {
        peer: peer.clone(),
        status,
        seen: HashMap::new(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let r = mirror_once(
            &local,
            &own,
            &remote,
            &*dial,
            &writer,
            &mut refusals,
            &mut backoff,
        )
        .await;
        match r {
            Err(MirrorError::Local(EtcdError::LostLeadership))
            | Err(MirrorError::Write(WriteFailed::LostLeadership)) => return,
            Err(e) => {
                let d = backoff.next_delay();
                warn!(%peer, error = %e, retry_in = ?d, "kvstoremesh mirror");
                tokio::time::sleep(d).await;
            }
            Ok(()) => {}
        }
    }
}

/// One connection to a peer: list its keys (one snapshot), make the local copies equal to them
/// (mark and sweep: a refused value is neither copied nor a reason to delete the local copy),
/// write our canaries, then follow its watch, one local write per batch of changes. A broken
/// stream resumes, a compaction relists (and sweeps again); only a failed connect, a local write
/// error or lost leadership ends it.
async fn mirror_once<L: KvStore, D: Dial>(
    local: &L,
    own: &ClusterName,
    remote: &RemoteCluster,
    dial: &D,
    writer: &MirrorWriter,
    refusals: &mut Refusals,
    backoff: &mut Backoff,
) -> Result<(), MirrorError> {
    let peer = &remote.name;
    let rc = dial.dial(remote).await?;
    // One watch per mirrored prefix of the peer, not the whole keyspace: a peer's etcd may hold
    // other clusters' keys (a peer that runs KVStoreMesh holds all its peers'), and a whole-prefix
    // watch would deliver every one of their changes to every mirror (`judge` still skips the
    // keys of a cluster whose name begins with the peer's, `c20` under `c2`'s exact keys).
    let mut watcher = Watcher::multi(rc, mirrored_prefixes(peer));
    // Keys of the listing in progress: what they judge to (a refused key is `None`).
    let mut listing: Option<BTreeMap<String, Option<Vec<u8>>>> = None;
    let mut ops = Vec::new();
    let mut failures = 0;
    loop {
        // `ops` is written before the watcher runs dry, so an error never strands it. A broken
        // stream resumes from the last revision (a compaction relists) on the same connection;
        // after a few failures in a row the peer is dialled again (its entry or our certificates
        // may have changed).
        let ev = match watcher.next().await {
            Ok(ev) => {
                failures = 0;
                ev
            }
            Err(e) if failures < MAX_STREAM_FAILURES => {
                failures += 1;
                let d = backoff.next_delay();
                warn!(%peer, error = %e, retry_in = ?d, "kvstoremesh: the remote's watch broke; resuming");
                tokio::time::sleep(d).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        {
            match ev {
                Event::Init { .. } => listing = Some(BTreeMap::new()),
                Event::InitApply(kv) => {
                    let judged = match judge(remote, &kv.key, &kv.value) {
                        Judged::Skip => continue,
                        Judged::Refuse(why) => {
                            refusals.refuse(&kv.key, kv.mod_revision, &why);
                            None
                        }
                        Judged::Mirror(lv) => {
                            refusals.accepted(&kv.key);
                            Some(lv)
                        }
                    };
                    if let Some(l) = &mut listing {
                        l.insert(kv.key, judged);
                    }
                }
                Event::InitDone { .. } => {
                    let theirs = listing.take().unwrap_or_default();
                    let (ours, canaries) =
                        list_local(local, peer).await.map_err(EtcdError::from)?;
                    let mut sweep = Vec::new();
                    for (k, lv) in &theirs {
                        if let Some(lv) = lv
                            && ours.get(k) != Some(lv)
                        {
                            sweep.push(Op {
                                key: k.clone(),
                                value: Some(lv.clone()),
                            });
                        }
                    }
                    for k in ours.keys() {
                        if !theirs.contains_key(k) {
                            sweep.push(Op {
                                key: k.clone(),
                                value: None,
                            });
                        }
                    }
                    let n = writer.write(sweep).await?;
                    // Our canaries for the peer, once its full state is here.
                    let now = format_time(OffsetDateTime::now_utc()).into_bytes();
                    let missing: Vec<Op> = SyncKind::ALL
                        .into_iter()
                        .map(|kind| {
                            MeshKey::Synced {
                                cluster: peer.clone(),
                                kind,
                            }
                            .to_string()
                        })
                        .filter(|k| !canaries.contains(k))
                        .map(|key| Op {
                            key,
                            value: Some(now.clone()),
                        })
                        .collect();
                    writer.write(missing).await?;
                    let refused = theirs.values().filter(|v| v.is_none()).count();
                    info!(%own, %peer, keys = theirs.len() - refused, refused, written = n, "remote mirrored");
                    backoff.reset();
                }
                Event::Apply(kv) => match judge(remote, &kv.key, &kv.value) {
                    Judged::Skip => {}
                    Judged::Refuse(why) => refusals.refuse(&kv.key, kv.mod_revision, &why),
                    Judged::Mirror(lv) => {
                        refusals.accepted(&kv.key);
                        ops.push(Op {
                            key: kv.key,
                            value: Some(lv),
                        });
                    }
                },
                Event::Delete { key, .. } => {
                    refusals.accepted(&key);
                    if is_mirrored(&key, peer) {
                        ops.push(Op { key, value: None });
                    }
                }
            }
        }
        // One local write per store response (at most MAX_BATCH changes).
        if !ops.is_empty() && (!watcher.has_ready() || ops.len() >= MAX_BATCH) {
            writer.write(std::mem::take(&mut ops)).await?;
        }
    }
}

/// Deletes every mirrored key and canary of `peer` from the local store.
async fn forget_peer<L: KvStore>(
    local: &L,
    peer: &ClusterName,
    guard: &Guard,
) -> Result<(), EtcdError> {
    let (ours, canaries) = list_local(local, peer).await?;
    let ops: Vec<Op> = ours
        .into_keys()
        .chain(canaries)
        .map(|key| Op { key, value: None })
        .collect();
    write(local, ops, guard).await.map(|_| ())
}

/// The mirrors running, by peer, with the remote entry each was started for.
type Mirrors = HashMap<ClusterName, (RemoteCluster, JoinHandle<()>)>;

/// Follows `remotes/<own>/` in the local store and runs one mirror per peer, reaching peers
/// through `dial`. Runs until aborted or leadership is lost. Values refused are counted in
/// `status` (`remote_bad_values`, by peer).
pub async fn run<L: KvStore, D: Dial>(
    local: L,
    own: ClusterName,
    dial: D,
    guard: Guard,
    status: Option<Arc<Status>>,
) {
    let dial = Arc::new(dial);
    let prefix = KeyKind::Remotes.cluster_prefix(&own);
    let mut mirrors: Mirrors = HashMap::new();
    let (writer, writer_task) = MirrorWriter::spawn(local.clone(), guard.clone());
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut remotes = WatchTask::spawn(Watcher::new(local.clone(), &prefix), backoff, 256);
    // The remotes wanted; during a (re)list, the ones listed so far.
    let mut wanted: BTreeMap<ClusterName, RemoteCluster> = BTreeMap::new();
    let mut listing: Option<BTreeMap<ClusterName, RemoteCluster>> = None;
    while let Some(ev) = remotes.recv().await {
        let changed = match ev {
            Err(e) => {
                warn!(error = %e, "kvstoremesh remotes");
                false
            }
            Ok(Event::Init { .. }) => {
                listing = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(kv)) => {
                if let (Some(l), Some(r)) = (&mut listing, decode_remote(&own, &kv.key, &kv.value))
                {
                    l.insert(r.name.clone(), r);
                }
                false
            }
            Ok(Event::InitDone { .. }) => {
                wanted = listing.take().unwrap_or_default();
                true
            }
            Ok(Event::Apply(kv)) => match decode_remote(&own, &kv.key, &kv.value) {
                Some(r) => {
                    wanted.insert(r.name.clone(), r);
                    true
                }
                None => false,
            },
            Ok(Event::Delete { key, .. }) => match MeshKey::parse(&key) {
                Ok(MeshKey::Remote { remote, .. }) => wanted.remove(&remote).is_some(),
                _ => false,
            },
        };
        if !changed {
            continue;
        }
        let r = reconcile(
            &local,
            &own,
            &dial,
            &guard,
            &writer,
            &status,
            &mut mirrors,
            &wanted,
        )
        .await;
        match r {
            Err(EtcdError::LostLeadership) => break,
            Err(e) => warn!(error = %e, "kvstoremesh remotes"),
            Ok(()) => {}
        }
    }
    for (_, (_, h)) in mirrors {
        h.abort();
    }
    writer_task.abort();
}

fn decode_remote(own: &ClusterName, key: &str, value: &[u8]) -> Option<RemoteCluster> {
    let k = MeshKey::parse_for(key, own).ok()?;
    match MeshValue::decode(&k, value) {
        Ok(MeshValue::Remote(r)) => Some(r),
        Ok(_) => None,
        Err(e) => {
            warn!(key, error = %e, "ignoring a remote entry that does not decode");
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn reconcile<L: KvStore, D: Dial>(
    local: &L,
    own: &ClusterName,
    dial: &Arc<D>,
    guard: &Guard,
    writer: &MirrorWriter,
    status: &Option<Arc<Status>>,
    mirrors: &mut Mirrors,
    wanted: &BTreeMap<ClusterName, RemoteCluster>,
) -> Result<(), EtcdError> {
    let gone: Vec<ClusterName> = mirrors
        .keys()
        .filter(|n| !wanted.contains_key(*n))
        .cloned()
        .collect();
    for peer in gone {
        if let Some((_, h)) = mirrors.remove(&peer) {
            h.abort();
        }
        info!(%peer, "remote removed; deleting its mirrored keys");
        forget_peer(local, &peer, guard).await?;
    }
    for (peer, rcl) in wanted {
        let same = mirrors.get(peer).is_some_and(|(r, _)| r == rcl);
        if same {
            continue;
        }
        if let Some((_, h)) = mirrors.remove(peer) {
            h.abort();
        }
        info!(%peer, endpoints = ?rcl.endpoints, "mirroring remote");
        let h = tokio::spawn(mirror_peer(
            local.clone(),
            own.clone(),
            rcl.clone(),
            dial.clone(),
            writer.clone(),
            status.clone(),
        ));
        mirrors.insert(peer.clone(), (rcl.clone(), h));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::values::{Capabilities, ClusterConfig};
    use mesh_model::{ClusterId, MaxConnectedClusters};

    fn remote(name: &str, id: u32) -> RemoteCluster {
        RemoteCluster {
            name: ClusterName::new(name).unwrap(),
            id: ClusterId::new(id, MaxConnectedClusters::DEFAULT).unwrap(),
            endpoints: vec![],
            ca_bundle: String::new(),
            client_cert: String::new(),
        }
    }

    fn config(name: &str, id: u32) -> Vec<u8> {
        let mcc = MaxConnectedClusters::DEFAULT;
        MeshValue::ClusterConfig(ClusterConfig {
            name: ClusterName::new(name).unwrap(),
            id: ClusterId::new(id, mcc).unwrap(),
            max_connected_clusters: mcc,
            capabilities: Capabilities::default(),
            ca_fingerprints: vec![],
        })
        .encode()
    }

    #[test]
    fn judges_a_peers_keys_and_skips_other_clusters() {
        let c2 = remote("c2", 2);
        let cc = "clustermesh/v1/cluster-config/c2";
        let Judged::Mirror(v) = judge(&c2, cc, &config("c2", 2)) else {
            panic!("a good config is mirrored");
        };
        assert!(String::from_utf8_lossy(&v).contains("\"cached\":true"));
        // c20 shares c2's exact-key prefix: another cluster's key, skipped.
        assert_eq!(
            judge(&c2, "clustermesh/v1/cluster-config/c20", &config("c20", 20)),
            Judged::Skip
        );
        assert_eq!(
            judge(&c2, "clustermesh/v1/services/c3/ns/web", b"{"),
            Judged::Skip
        );
        // The peer's own canaries, leader key and node status are not mirrored.
        assert_eq!(judge(&c2, "clustermesh/v1/leader/c2", b"r1"), Judged::Skip);
        let refused = |key: &str, value: &[u8]| match judge(&c2, key, value) {
            Judged::Refuse(why) => why,
            other => panic!("{key}: {other:?}"),
        };
        assert!(refused(cc, &config("c2", 3)).contains("id 3 differs"));
        assert!(refused(cc, b"{}").contains("not a valid"));
        assert!(refused("clustermesh/v1/heartbeat/c2", b"yesterday").contains("RFC 3339"));
        assert!(refused("clustermesh/v1/services/c2/ns", b"{}").contains("does not parse"));
    }

    // --- The mirror on in-memory stores: no etcd, every fault on demand. ---

    use mesh_kv::MemStore;

    /// Peers by name, each an in-memory store.
    #[derive(Clone, Default)]
    struct MemDial(Arc<std::sync::Mutex<HashMap<ClusterName, MemStore>>>);

    impl Dial for MemDial {
        type Store = MemStore;
        async fn dial(&self, remote: &RemoteCluster) -> Result<MemStore, DialError> {
            self.0
                .lock()
                .unwrap()
                .get(&remote.name)
                .cloned()
                .ok_or_else(|| DialError::Connect {
                    peer: remote.name.clone(),
                    message: "no such peer".into(),
                })
        }
    }

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    fn service(cluster: &str, name: &str) -> (String, Vec<u8>) {
        let key = format!("clustermesh/v1/services/{cluster}/ns/{name}");
        let value = format!(
            r#"{{"cluster":"{cluster}","namespace":"ns","name":"{name}","ports":[{{"port":80}}],"headless":true}}"#
        );
        let judged = judge(&remote(cluster, 9), &key, value.as_bytes());
        assert!(matches!(judged, Judged::Mirror(_)), "{key}: {judged:?}");
        (key, value.into_bytes())
    }

    /// A leader key in `local` and the guard of its term.
    async fn lead(local: &MemStore) -> Guard {
        let key = "clustermesh/v1/leader/c1";
        local.put(key, b"replica-0").await.unwrap();
        Guard {
            key: key.into(),
            create_revision: local.get(key).await.unwrap().unwrap().create_revision,
        }
    }

    async fn register(local: &MemStore, peer: &RemoteCluster) {
        let mut peer = peer.clone();
        // An endpoint the in-memory dial ignores (a remote needs one to be valid).
        peer.endpoints = vec!["http://127.0.0.1:2379".into()];
        let key = MeshKey::Remote {
            cluster: c("c1"),
            remote: peer.name.clone(),
        }
        .to_string();
        local
            .put(&key, &MeshValue::Remote(peer).encode())
            .await
            .unwrap();
    }

    fn remote_key() -> String {
        MeshKey::Remote {
            cluster: c("c1"),
            remote: c("c2"),
        }
        .to_string()
    }

    /// c1's KVStoreMesh, leading, with c2 (`peer`) registered as its remote.
    async fn mirror_c2(
        local: &MemStore,
        peer: &MemStore,
        status: Option<Arc<Status>>,
    ) -> JoinHandle<()> {
        let dial = MemDial::default();
        dial.0.lock().unwrap().insert(c("c2"), peer.clone());
        let guard = lead(local).await;
        register(local, &remote("c2", 2)).await;
        tokio::spawn(run(local.clone(), c("c1"), dial, guard, status))
    }

    #[tokio::test]
    async fn mirrors_a_peer_follows_it_and_refuses_what_is_not_its_own() {
        let (local, peer) = (MemStore::new(), MemStore::new());
        peer.put("clustermesh/v1/cluster-config/c2", &config("c2", 2))
            .await
            .unwrap();
        let (web, web_v) = service("c2", "web");
        peer.put(&web, &web_v).await.unwrap();
        // Another cluster's key in the peer's etcd (it runs KVStoreMesh too): not mirrored.
        let (other, other_v) = service("c3", "web");
        peer.put(&other, &other_v).await.unwrap();
        // A value of the peer's that does not decode: refused, counted.
        peer.put("clustermesh/v1/services/c2/ns/bad", b"{")
            .await
            .unwrap();
        let status = Status::new("c1", 1, "replica-0");
        let mirror = mirror_c2(&local, &peer, Some(status.clone())).await;

        // The listing lands, then the canaries.
        local
            .until("clustermesh/v1/synced/c2/", |k| {
                k.len() == SyncKind::ALL.len()
            })
            .await;
        let cc = local
            .get("clustermesh/v1/cluster-config/c2")
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&cc.value).contains(r#""cached":true"#));
        let services = local.until("clustermesh/v1/services/", |_| true).await;
        assert_eq!(services.keys().collect::<Vec<_>>(), [&web]);
        assert_eq!(status.snapshot().remote_bad_values.get("c2"), Some(&1));

        // Changes follow, batched per response.
        let (api, api_v) = service("c2", "api");
        peer.put(&api, &api_v).await.unwrap();
        peer.delete(&web).await.unwrap();
        local
            .until("clustermesh/v1/services/", |k| {
                k.contains_key(&api) && !k.contains_key(&web)
            })
            .await;
        mirror.abort();
    }

    #[tokio::test]
    async fn a_broken_stream_resumes_and_a_compaction_relists_and_sweeps() {
        let (local, peer) = (MemStore::new(), MemStore::new());
        let (web, web_v) = service("c2", "web");
        let (api, api_v) = service("c2", "api");
        peer.put(&web, &web_v).await.unwrap();
        peer.put(&api, &api_v).await.unwrap();
        let mirror = mirror_c2(&local, &peer, None).await;
        local
            .until("clustermesh/v1/services/c2/", |k| k.len() == 2)
            .await;

        // A change while the stream is down arrives when it resumes.
        peer.break_watches();
        let (db, db_v) = service("c2", "db");
        peer.put(&db, &db_v).await.unwrap();
        local
            .until("clustermesh/v1/services/c2/", |k| k.contains_key(&db))
            .await;

        // A delete the watch never saw (the stream broke, then the peer compacted past it): the
        // relist sweeps the local copy.
        peer.break_watches();
        peer.delete(&web).await.unwrap();
        peer.compact(peer.revision());
        let left = local
            .until("clustermesh/v1/services/c2/", |k| !k.contains_key(&web))
            .await;
        assert_eq!(left.keys().collect::<Vec<_>>(), [&api, &db]);
        mirror.abort();
    }

    #[tokio::test]
    async fn lost_leadership_stops_every_write_of_the_mirror() {
        let (local, peer) = (MemStore::new(), MemStore::new());
        let (web, web_v) = service("c2", "web");
        peer.put(&web, &web_v).await.unwrap();
        let mirror = mirror_c2(&local, &peer, None).await;
        local
            .until("clustermesh/v1/synced/c2/", |k| !k.is_empty())
            .await;

        // Leadership moves: the leader key is recreated by another replica. The mirror writes
        // nothing more, and the run ends at its next local write.
        local.delete("clustermesh/v1/leader/c1").await.unwrap();
        local
            .put("clustermesh/v1/leader/c1", b"replica-1")
            .await
            .unwrap();
        let (api, api_v) = service("c2", "api");
        peer.put(&api, &api_v).await.unwrap();
        let before = local.revision();
        // The remote entry goes: forgetting it is a guarded write too, which fails: run returns.
        local.delete(&remote_key()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), mirror)
            .await
            .expect("run ends once leadership is lost")
            .unwrap();
        assert!(
            local.get(&api).await.unwrap().is_none(),
            "not written after the loss"
        );
        assert!(
            local.get(&web).await.unwrap().is_some(),
            "not deleted after the loss either"
        );
        assert_eq!(
            local.revision(),
            before + 1,
            "only the remote entry's delete"
        );
    }

    #[tokio::test]
    async fn a_removed_remote_loses_its_mirrored_keys_and_canaries() {
        let (local, peer) = (MemStore::new(), MemStore::new());
        let (web, web_v) = service("c2", "web");
        peer.put(&web, &web_v).await.unwrap();
        let mirror = mirror_c2(&local, &peer, None).await;
        local
            .until("clustermesh/v1/synced/c2/", |k| !k.is_empty())
            .await;
        local.delete(&remote_key()).await.unwrap();
        local
            .until("clustermesh/v1/synced/c2/", |k| k.is_empty())
            .await;
        local
            .until("clustermesh/v1/services/c2/", |k| k.is_empty())
            .await;
        mirror.abort();
    }

    #[tokio::test]
    async fn the_writer_coalesces_many_mirrors_writes_into_few_transactions() {
        let local = MemStore::new();
        let guard = lead(&local).await;
        let (writer, _task) = MirrorWriter::spawn(local.clone(), guard);
        let before = local.revision();
        let writes = (0..50).map(|i| {
            let w = writer.clone();
            tokio::spawn(async move {
                let op = Op {
                    key: format!("clustermesh/v1/services/p{i}/ns/web"),
                    value: Some(b"v".to_vec()),
                };
                w.write(vec![op]).await
            })
        });
        let writes: Vec<_> = writes.collect();
        for w in writes {
            assert_eq!(w.await.unwrap().unwrap(), 1);
        }
        let txns = local.revision() - before;
        assert!(
            (1..50).contains(&txns),
            "50 writes took {txns} transactions"
        );
        let listed = local.list("clustermesh/v1/services/", None).await.unwrap();
        assert_eq!(listed.kvs.len(), 50);

        // A key changed twice in one batch: the last change wins (etcd refuses a key twice).
        let key = "clustermesh/v1/services/p0/ns/web".to_string();
        let twice = vec![
            Op {
                key: key.clone(),
                value: Some(b"1".to_vec()),
            },
            Op {
                key: key.clone(),
                value: Some(b"2".to_vec()),
            },
        ];
        writer.write(twice).await.unwrap();
        assert_eq!(local.get(&key).await.unwrap().unwrap().value, b"2");

        // Leadership moves: every waiting mirror learns it.
        local.delete("clustermesh/v1/leader/c1").await.unwrap();
        let op = Op { key, value: None };
        assert!(matches!(
            writer.write(vec![op]).await,
            Err(WriteFailed::LostLeadership)
        ));
    }

    /// A store whose transactions that put `held` wait for [`Gated::release`]; it counts the
    /// transactions in flight at once.
    #[derive(Clone)]
    struct Gated {
        inner: MemStore,
        held: Vec<u8>,
        gate: Arc<tokio::sync::Semaphore>,
        now: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
        entered: Arc<tokio::sync::Notify>,
    }

    impl Gated {
        fn new(inner: MemStore, held: &[u8]) -> Self {
            Self {
                inner,
                held: held.to_vec(),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
                now: Arc::default(),
                most: Arc::default(),
                entered: Arc::default(),
            }
        }

        fn in_flight(&self) -> usize {
            self.now.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// Wait until `n` transactions are in flight.
        async fn until_in_flight(&self, n: usize) {
            let wait = async {
                loop {
                    let entered = self.entered.notified();
                    if self.in_flight() >= n {
                        return;
                    }
                    entered.await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} transactions in flight after 10 s, wanted {n}",
                        self.in_flight()
                    )
                });
        }

        fn release(&self, n: usize) {
            self.gate.add_permits(n);
        }
    }

    impl KvStore for Gated {
        async fn get(&self, key: &str) -> Result<Option<mesh_kv::KeyValue>, KvError> {
            self.inner.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
            revision: Option<i64>,
        ) -> Result<mesh_kv::Listing, KvError> {
            self.inner.list(prefix, revision).await
        }
        async fn watch(&self, prefix: &str, from: i64) -> Result<mesh_kv::WatchStream, KvError> {
            self.inner.watch(prefix, from).await
        }
        async fn txn(
            &self,
            guard: Option<&Guard>,
            ops: Vec<mesh_kv::Op>,
        ) -> Result<Option<i64>, KvError> {
            use std::sync::atomic::Ordering::SeqCst;
            let hold = ops
                .iter()
                .any(|op| matches!(op, mesh_kv::Op::Put { value, .. } if *value == self.held));
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(n, SeqCst);
            self.entered.notify_waiters();
            if hold {
                self.gate.acquire().await.expect("gate").forget();
            }
            let r = self.inner.txn(guard, ops).await;
            self.now.fetch_sub(1, SeqCst);
            r
        }
        async fn lease_grant(&self, ttl: i64) -> Result<i64, KvError> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
            self.inner.lease_keep_alive(id).await
        }
        async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
            self.inner.lease_revoke(id).await
        }
    }

    fn put_op(key: &str, value: &[u8]) -> Op {
        Op {
            key: key.into(),
            value: Some(value.to_vec()),
        }
    }

    #[tokio::test]
    async fn the_writer_keeps_several_transactions_in_flight() {
        let local = MemStore::new();
        let guard = lead(&local).await;
        let gated = Gated::new(local.clone(), b"slow");
        let (writer, _task) = MirrorWriter::spawn(gated.clone(), guard);
        // Peers whose writes the store holds, one after another: the writer does not wait for
        // one to send the next, up to MAX_WRITES_IN_FLIGHT; the rest wait, gathered into one.
        let write = |i: usize| {
            let w = writer.clone();
            tokio::spawn(async move {
                w.write(vec![put_op(
                    &format!("clustermesh/v1/services/p{i}/ns/a"),
                    b"slow",
                )])
                .await
            })
        };
        let mut slow = Vec::new();
        for i in 0..MAX_WRITES_IN_FLIGHT {
            slow.push(write(i));
            gated.until_in_flight(i + 1).await;
        }
        slow.push(write(MAX_WRITES_IN_FLIGHT));
        slow.push(write(MAX_WRITES_IN_FLIGHT + 1));
        gated.release(slow.len());
        for w in slow {
            assert_eq!(w.await.unwrap().unwrap(), 1);
        }
        let most = gated.most.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            most, MAX_WRITES_IN_FLIGHT,
            "transactions in flight at once (at most {MAX_WRITES_IN_FLIGHT})"
        );
        let listed = local.list("clustermesh/v1/services/", None).await.unwrap();
        assert_eq!(listed.kvs.len(), MAX_WRITES_IN_FLIGHT + 2);
    }

    #[tokio::test]
    async fn a_key_in_flight_is_written_again_only_after() {
        let local = MemStore::new();
        let guard = lead(&local).await;
        let gated = Gated::new(local.clone(), b"old");
        let (writer, _task) = MirrorWriter::spawn(gated.clone(), guard);
        let key = "clustermesh/v1/services/c2/ns/web";
        // A peer's aborted mirror left a write in flight; its new mirror writes the same key.
        let old = {
            let w = writer.clone();
            tokio::spawn(async move { w.write(vec![put_op(key, b"old")]).await })
        };
        gated.until_in_flight(1).await;
        let new = {
            let w = writer.clone();
            tokio::spawn(async move { w.write(vec![put_op(key, b"new")]).await })
        };
        // Let the writer take the new write and decide (an unheld transaction would commit now).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gated.in_flight(), 1, "the new write waits for the old one");
        assert!(local.get(key).await.unwrap().is_none());
        gated.release(1);
        old.await.unwrap().unwrap();
        new.await.unwrap().unwrap();
        assert_eq!(local.get(key).await.unwrap().unwrap().value, b"new");
    }
}
