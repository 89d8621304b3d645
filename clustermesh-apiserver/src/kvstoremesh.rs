//! KVStoreMesh: the leader also mirrors every remote cluster's keys into the local etcd, so the cluster's
//! node-syncs watch only their local etcd (remote watchers then scale with clusters, not with nodes).
//!
//! Remotes are the `clustermesh/v1/remotes/<self>/<peer>` keys of the local etcd (written by `clustermesh
//! connect` through the gRPC API). For each peer: list its keys in its etcd, write what differs locally and delete
//! local copies it no longer has (mark and sweep, so a reconnect never leaves an empty window), then write
//! `synced/<peer>/<kind>` canaries of our own, then follow its watch. The peer's cluster config is stored with
//! `capabilities.cached = true`. The peer's own canaries, leader key, remotes and node status are not mirrored.
//! A removed remote's mirrored keys are deleted. Every write carries the leader's fencing comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, EventType, WatchOptions};
use mesh_model::ClusterName;
use mesh_model::keys::{KeyKind, MeshKey, SyncKind};
use mesh_model::values::{MeshValue, RemoteCluster, format_time};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::{Backoff, EtcdError, list_prefix, list_prefix_at};
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

/// Every key under `peer`'s mirrored prefixes, with its value and mod revision, and the revision of
/// the snapshot. Every prefix is read at the revision of the first list: one snapshot, so the watch
/// from the next revision misses no change made while the later prefixes were listed.
async fn list_claimed(
    c: &mut Client,
    peer: &ClusterName,
) -> Result<(BTreeMap<String, (Vec<u8>, i64)>, i64), EtcdError> {
    let mut out = BTreeMap::new();
    let mut rev = 0;
    for p in mirrored_prefixes(peer) {
        let (kvs, r) = list_prefix_at(c, &p, rev).await?;
        rev = r;
        out.extend(kvs.into_iter().filter(|(k, _)| claimed_by(k, peer)));
    }
    Ok((out, rev))
}

/// The local copies of `peer`'s keys.
async fn list_mirrored(
    c: &mut Client,
    peer: &ClusterName,
) -> Result<(BTreeMap<String, Vec<u8>>, i64), EtcdError> {
    let (kvs, rev) = list_claimed(c, peer).await?;
    let out = kvs
        .into_iter()
        .filter(|(k, _)| is_mirrored(k, peer))
        .map(|(k, (v, _))| (k, v))
        .collect();
    Ok((out, rev))
}

async fn write(local: &mut Client, ops: Vec<Op>, guard: &Compare) -> Result<usize, EtcdError> {
    let mut n = 0;
    for batch in batches(ops, MAX_TXN_OPS, MAX_TXN_BYTES) {
        send_guarded(local, &batch, guard).await?;
        n += batch.len();
    }
    Ok(n)
}

async fn connect_peer(remote: &RemoteCluster, tls: &MirrorTls) -> Result<Client, String> {
    let https = remote.endpoints.iter().any(|e| e.starts_with("https://"));
    if !https {
        return crate::etcd::connect(&remote.endpoints, None)
            .await
            .map_err(|e| e.to_string());
    }
    let dir = tls.cluster_dir.as_ref().ok_or_else(|| {
        format!(
            "remote {} uses https but this apiserver has no cluster certificate directory (--tls-dir)",
            remote.name.as_str()
        )
    })?;
    let ca_bundle = if remote.ca_bundle.trim().is_empty() {
        dir.ca_bundle()
    } else {
        let p = tls
            .work_dir
            .join(format!("remote-{}-ca-bundle.pem", remote.name.as_str()));
        std::fs::create_dir_all(&tls.work_dir)
            .and_then(|()| std::fs::write(&p, &remote.ca_bundle))
            .map_err(|e| format!("writing {}: {e}", p.display()))?;
        p
    };
    // The certificate the remote issued for our remote key, when it did (its etcd may trust
    // only its own intermediate); else our own remote certificate.
    let mut identity = dir.cert_key(mesh_certs::Role::Remote);
    if !remote.client_cert.trim().is_empty() {
        let p = tls
            .work_dir
            .join(format!("remote-{}-client.crt", remote.name.as_str()));
        std::fs::create_dir_all(&tls.work_dir)
            .and_then(|()| std::fs::write(&p, &remote.client_cert))
            .map_err(|e| format!("writing {}: {e}", p.display()))?;
        identity.cert = p;
    }
    let files = mesh_certs::TlsFiles {
        ca_bundle,
        identity: Some(identity),
    };
    mesh_certs::etcd::connect(&remote.endpoints, &files)
        .await
        .map_err(|e| e.to_string())
}

/// Mirrors one peer until aborted or leadership is lost.
async fn mirror_peer(
    mut local: Client,
    own: ClusterName,
    remote: RemoteCluster,
    tls: MirrorTls,
    guard: Compare,
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
        let r: Result<(), String> = async {
            let mut rc = connect_peer(&remote, &tls).await?;
            let (listed, rev) = list_claimed(&mut rc, &peer)
                .await
                .map_err(|e| e.to_string())?;
            let (ours, _) = list_mirrored(&mut local, &peer)
                .await
                .map_err(|e| e.to_string())?;
            // A refused value is neither copied nor a reason to delete the local copy.
            let mut theirs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut refused: BTreeSet<String> = BTreeSet::new();
            for (k, (v, mod_rev)) in listed {
                match judge(&remote, &k, &v) {
                    Judged::Skip => {}
                    Judged::Refuse(why) => {
                        refusals.refuse(&k, mod_rev, &why);
                        refused.insert(k);
                    }
                    Judged::Mirror(lv) => {
                        refusals.accepted(&k);
                        theirs.insert(k, lv);
                    }
                }
            }
            let mut ops = Vec::new();
            for (k, lv) in &theirs {
                if ours.get(k) != Some(lv) {
                    ops.push(Op {
                        key: k.clone(),
                        value: Some(lv.clone()),
                    });
                }
            }
            for k in ours.keys() {
                if !theirs.contains_key(k) && !refused.contains(k) {
                    ops.push(Op {
                        key: k.clone(),
                        value: None,
                    });
                }
            }
            let n = write(&mut local, ops, &guard)
                .await
                .map_err(|e| e.to_string())?;
            // Our canaries for the peer, once its full state is here.
            let (canaries, _) = list_prefix(&mut local, &KeyKind::Synced.cluster_prefix(&peer))
                .await
                .map_err(|e| e.to_string())?;
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
                .filter(|k| !canaries.contains_key(k))
                .map(|key| Op {
                    key,
                    value: Some(now.clone()),
                })
                .collect();
            write(&mut local, missing, &guard)
                .await
                .map_err(|e| e.to_string())?;
            info!(%own, %peer, keys = theirs.len(), refused = refused.len(), written = n, "remote mirrored");
            backoff.reset();
            let mut w = rc
                .watch(
                    mesh_model::keys::PREFIX,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
                .map_err(|e| e.to_string())?;
            while let Some(resp) = w.message().await.map_err(|e| e.to_string())? {
                if resp.canceled() {
                    return Err(format!(
                        "watch of {peer} canceled: {}",
                        resp.cancel_reason()
                    ));
                }
                let mut ops = Vec::new();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match ev.event_type() {
                        EventType::Put => match judge(&remote, &key, kv.value()) {
                            Judged::Skip => {}
                            Judged::Refuse(why) => refusals.refuse(&key, kv.mod_revision(), &why),
                            Judged::Mirror(lv) => {
                                refusals.accepted(&key);
                                ops.push(Op {
                                    key,
                                    value: Some(lv),
                                });
                            }
                        },
                        EventType::Delete => {
                            refusals.accepted(&key);
                            if is_mirrored(&key, &peer) {
                                ops.push(Op { key, value: None });
                            }
                        }
                    }
                }
                if !ops.is_empty() {
                    write(&mut local, ops, &guard)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Err(format!("watch of {peer} ended"))
        }
        .await;
        if let Err(e) = r {
            if e.contains("leadership lost") {
                return;
            }
            let d = backoff.next_delay();
            warn!(%peer, error = %e, retry_in = ?d, "kvstoremesh mirror");
            tokio::time::sleep(d).await;
        }
    }
}

/// Deletes every mirrored key and canary of `peer` from the local etcd.
async fn forget_peer(
    local: &mut Client,
    peer: &ClusterName,
    guard: &Compare,
) -> Result<(), EtcdError> {
    let (ours, _) = list_mirrored(local, peer).await?;
    let (canaries, _) = list_prefix(local, &KeyKind::Synced.cluster_prefix(peer)).await?;
    let ops: Vec<Op> = ours
        .into_keys()
        .chain(canaries.into_keys())
        .map(|key| Op { key, value: None })
        .collect();
    write(local, ops, guard).await.map(|_| ())
}

/// Follows `remotes/<own>/` in the local etcd and runs one mirror per peer. Runs until aborted.
/// Values refused are counted in `status` (`remote_bad_values`, by peer).
pub async fn run(
    local: Client,
    own: ClusterName,
    tls: MirrorTls,
    guard: Compare,
    status: Option<Arc<Status>>,
) {
    let prefix = KeyKind::Remotes.cluster_prefix(&own);
    let mut mirrors: HashMap<ClusterName, (RemoteCluster, JoinHandle<()>)> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut c = local.clone();
    loop {
        let r: Result<(), EtcdError> = async {
            let (kvs, rev) = list_prefix(&mut c, &prefix).await?;
            let mut wanted: BTreeMap<ClusterName, RemoteCluster> = BTreeMap::new();
            for (k, (v, _)) in kvs {
                if let Some(rcl) = decode_remote(&own, &k, &v) {
                    wanted.insert(rcl.name.clone(), rcl);
                }
            }
            reconcile(&local, &own, &tls, &guard, &status, &mut mirrors, &wanted).await?;
            backoff.reset();
            let mut w = c
                .watch(
                    prefix.as_str(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
                .map_err(|e| EtcdError::request(format!("watch {prefix}"), e))?;
            while let Some(resp) = w
                .message()
                .await
                .map_err(|e| EtcdError::request(format!("watch {prefix}"), e))?
            {
                if resp.events().is_empty() {
                    continue;
                }
                let mut wanted: BTreeMap<ClusterName, RemoteCluster> = mirrors
                    .iter()
                    .map(|(n, (r, _))| (n.clone(), r.clone()))
                    .collect();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match ev.event_type() {
                        EventType::Put => {
                            if let Some(rcl) = decode_remote(&own, &key, kv.value()) {
                                wanted.insert(rcl.name.clone(), rcl);
                            }
                        }
                        EventType::Delete => {
                            if let Ok(MeshKey::Remote { remote, .. }) = MeshKey::parse(&key) {
                                wanted.remove(&remote);
                            }
                        }
                    }
                }
                reconcile(&local, &own, &tls, &guard, &status, &mut mirrors, &wanted).await?;
            }
            Ok(())
        }
        .await;
        match r {
            Err(EtcdError::LostLeadership) => break,
            Err(e) => warn!(error = %e, "kvstoremesh remotes"),
            Ok(()) => {}
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    for (_, (_, h)) in mirrors {
        h.abort();
    }
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

async fn reconcile(
    local: &Client,
    own: &ClusterName,
    tls: &MirrorTls,
    guard: &Compare,
    status: &Option<Arc<Status>>,
    mirrors: &mut HashMap<ClusterName, (RemoteCluster, JoinHandle<()>)>,
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
        forget_peer(&mut local.clone(), &peer, guard).await?;
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
            tls.clone(),
            guard.clone(),
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
}
