//! The publisher: campaigns for leadership; as leader it lists etcd, seeds the index, runs the sources, writes
//! the first full state once every source synced (then the sync canaries), and from then on writes each change
//! as it comes; a heartbeat every second. Losing the lease ends the term: sources stop, nothing more is written,
//! and the replica campaigns again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use mesh_model::ClusterName;
use mesh_model::keys::{KeyKind, MeshKey, ServiceName, SyncKind};
use mesh_model::values::{MeshValue, ServiceSpec, format_time};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::{Backoff, EtcdError, list_prefix};
use crate::index::{IndexConfig, MeshIndex, owned_prefixes};
use crate::leader::{LeaderTerm, campaign};
use crate::source::{Source, SourceEvent};
use crate::status::{Role, Status};
use crate::writer::{EtcdWriter, plan};

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The index settings (cluster name, id, ClusterSet CIDR, ...).
    pub index: IndexConfig,
    /// This replica's id, stored in the leader key.
    pub replica: String,
    /// TTL of the leader lease; a dead leader is replaced after about this long.
    pub lease_ttl: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Read other clusters' `services/` keys from this etcd to allocate ClusterSetIP imports (they are there in
    /// KVStoreMesh mode). Only meaningful with a ClusterSet CIDR.
    pub remote_services: bool,
    /// KVStoreMesh: mirror the remotes listed under `remotes/<self>/` into this etcd (leader only).
    pub kvstoremesh: Option<crate::kvstoremesh::MirrorTls>,
}

impl PublisherConfig {
    /// Defaults: 3 s lease, 1 s heartbeat, imports from local remote keys when a CIDR is set.
    pub fn new(index: IndexConfig, replica: impl Into<String>) -> Self {
        let remote_services = index.clusterset_cidr.is_some();
        Self {
            index,
            replica: replica.into(),
            lease_ttl: Duration::from_secs(3),
            heartbeat: Duration::from_secs(1),
            remote_services,
            kvstoremesh: None,
        }
    }
}

/// Aborts the tasks of a term when dropped.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

enum RemoteEvent {
    Reset(BTreeMap<ClusterName, Vec<ServiceSpec>>),
    Apply(ServiceSpec),
    Delete(ClusterName, ServiceName),
}

/// Lists and watches other clusters' service specs in this etcd.
async fn feed_remote_services(mut client: Client, own: ClusterName, tx: mpsc::Sender<RemoteEvent>) {
    let prefix = KeyKind::Services.prefix();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let r: Result<(), EtcdError> = async {
            let (kvs, rev) = list_prefix(&mut client, &prefix).await?;
            let mut all: BTreeMap<ClusterName, Vec<ServiceSpec>> = BTreeMap::new();
            for (k, (v, _)) in kvs {
                if let Some(spec) = decode_remote(&own, &k, &v) {
                    all.entry(spec.cluster.clone()).or_default().push(spec);
                }
            }
            if tx.send(RemoteEvent::Reset(all)).await.is_err() {
                return Ok(());
            }
            backoff.reset();
            let mut stream = client
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
            while let Some(resp) = stream
                .message()
                .await
                .map_err(|e| EtcdError::request(format!("watch {prefix}"), e))?
            {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let msg = match ev.event_type() {
                        EventType::Put => {
                            decode_remote(&own, &key, kv.value()).map(RemoteEvent::Apply)
                        }
                        EventType::Delete => match MeshKey::parse(&key) {
                            Ok(MeshKey::Service { cluster, service }) if cluster != own => {
                                Some(RemoteEvent::Delete(cluster, service))
                            }
                            _ => None,
                        },
                    };
                    if let Some(m) = msg
                        && tx.send(m).await.is_err()
                    {
                        return Ok(());
                    }
                }
                if resp.canceled() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        if tx.is_closed() {
            return;
        }
        if let Err(e) = r {
            warn!(error = %e, "watching remote services");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn decode_remote(own: &ClusterName, key: &str, value: &[u8]) -> Option<ServiceSpec> {
    let k = MeshKey::parse(key).ok()?;
    if k.cluster() == own {
        return None;
    }
    match MeshValue::decode(&k, value) {
        Ok(MeshValue::Service(s)) if s.shared => Some(s),
        Ok(_) => None,
        Err(e) => {
            warn!(key, error = %e, "ignoring a remote service that does not decode");
            None
        }
    }
}

/// How a term ended.
enum TermEnd {
    Shutdown,
    Lost,
}

/// Runs the publisher until `shutdown` turns true (then resigns leadership).
pub async fn run(
    client: Client,
    cfg: PublisherConfig,
    sources: Vec<Arc<dyn Source>>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), EtcdError> {
    let leader_key = MeshKey::Leader {
        cluster: cfg.index.cluster.clone(),
    }
    .to_string();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut errors_base = 0u64;
    loop {
        status.update(|s| {
            s.role = Role::Standby;
            s.ready = true;
            s.sources = sources.iter().map(|s| (s.name(), false)).collect();
        });
        let term = tokio::select! {
            t = campaign(&client, &leader_key, &cfg.replica, cfg.lease_ttl) => t?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        status.update(|s| {
            s.role = Role::Leader;
            s.ready = false;
            s.leader_terms_total += 1;
        });
        let mut errors_in_term = 0;
        let r = run_term(
            &client,
            &cfg,
            &sources,
            &status,
            &term,
            &mut shutdown,
            errors_base,
            &mut errors_in_term,
        )
        .await;
        errors_base += errors_in_term;
        status.update(|s| {
            s.role = Role::Standby;
            s.ready = false;
        });
        match r {
            Ok(TermEnd::Shutdown) => {
                let mut c = client.clone();
                term.resign(&mut c).await;
                info!("resigned leadership, shutting down");
                return Ok(());
            }
            Ok(TermEnd::Lost) | Err(EtcdError::LostLeadership) => {
                warn!("lost leadership; standing by");
            }
            Err(e) => {
                warn!(error = %e, "leader term failed; resigning and campaigning again");
                status.update(|s| {
                    s.etcd_errors_total += 1;
                    s.last_error = Some(e.to_string());
                });
                let mut c = client.clone();
                term.resign(&mut c).await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

fn canary_keys(cluster: &ClusterName) -> Vec<String> {
    SyncKind::ALL
        .into_iter()
        .map(|kind| {
            MeshKey::Synced {
                cluster: cluster.clone(),
                kind,
            }
            .to_string()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run_term(
    client: &Client,
    cfg: &PublisherConfig,
    sources: &[Arc<dyn Source>],
    status: &Arc<Status>,
    term: &LeaderTerm,
    shutdown: &mut watch::Receiver<bool>,
    errors_base: u64,
    errors_in_term: &mut u64,
) -> Result<TermEnd, EtcdError> {
    let cluster = cfg.index.cluster.clone();
    let guard = term.guard();
    let prefixes = owned_prefixes(&cluster);
    let cc_key = MeshKey::ClusterConfig {
        cluster: cluster.clone(),
    }
    .to_string();
    let canaries = canary_keys(&cluster);
    let mut exact = vec![cc_key.clone()];
    exact.extend(canaries.iter().cloned());
    let (mut writer, existing) = EtcdWriter::load(client.clone(), &prefixes, &exact).await?;
    info!(keys = existing.len(), "listed this cluster's keys in etcd");
    let mut index = MeshIndex::new(cfg.index.clone());
    index.seed(&existing);

    // Sources.
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(4096);
    let mut tasks = Vec::new();
    let mut unsynced: BTreeSet<String> = BTreeSet::new();
    for s in sources {
        let name = s.name();
        unsynced.insert(name.clone());
        let fut = s.run(tx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = fut.await {
                warn!(source = %name, error = %e, "source stopped");
            }
        }));
    }
    drop(tx);
    let (rtx, mut rrx) = mpsc::channel::<RemoteEvent>(1024);
    let mut remote_synced = !(cfg.remote_services && cfg.index.clusterset_cidr.is_some());
    if !remote_synced {
        tasks.push(tokio::spawn(feed_remote_services(
            client.clone(),
            cluster.clone(),
            rtx,
        )));
    } else {
        drop(rtx);
    }
    if let Some(tls) = &cfg.kvstoremesh {
        tasks.push(tokio::spawn(crate::kvstoremesh::run(
            client.clone(),
            cluster.clone(),
            tls.clone(),
            guard.clone(),
            Some(status.clone()),
        )));
    }
    let _tasks = Tasks(tasks);
    let mut remote_clusters: BTreeSet<ClusterName> = BTreeSet::new();

    // Watch what we own, so a change made by someone else (a deleted or overwritten key, a stray key under our
    // prefixes) is repaired; events of our own writes are recognised by revision and ignored.
    let mut own_watch = {
        let mut c = client.clone();
        let start = writer.listed_at() + 1;
        let opts = || WatchOptions::new().with_prefix().with_start_revision(start);
        let mut watched: Vec<String> = prefixes.clone();
        watched.push(KeyKind::Synced.cluster_prefix(&cluster));
        let mut w = c
            .watch(
                cc_key.as_str(),
                Some(WatchOptions::new().with_start_revision(start)),
            )
            .await
            .map_err(|e| EtcdError::request(format!("watch {cc_key}"), e))?;
        for p in &watched {
            w.watch(p.as_str(), Some(opts()))
                .await
                .map_err(|e| EtcdError::request(format!("watch {p}"), e))?;
        }
        w
    };

    let heartbeat_key = MeshKey::Heartbeat {
        cluster: cluster.clone(),
    }
    .to_string();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut source_errors: BTreeMap<String, String> = BTreeMap::new();
    let mut source_errors_total = 0u64;
    let mut synced_once = false;
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut first_event: Option<Instant> = None;
    let mut repair_canaries = false;

    loop {
        let mut got_event = false;
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ok(TermEnd::Shutdown),
            _ = term.lost() => return Ok(TermEnd::Lost),
            _ = heartbeat.tick() => {
                let now = format_time(OffsetDateTime::now_utc()).into_bytes();
                if let Err(e) = writer.put_untracked(&heartbeat_key, now, &guard).await {
                    if matches!(e, EtcdError::LostLeadership) {
                        return Ok(TermEnd::Lost);
                    }
                    warn!(error = %e, "heartbeat");
                    status.update(|s| { s.etcd_errors_total += 1; s.last_error = Some(e.to_string()); });
                }
            }
            _ = async { match retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending::<()>().await } } => {
                retry_at = None;
            }
            ev = rx.recv() => {
                let Some(ev) = ev else {
                    return Err(EtcdError::request("sources", etcd_client::Error::InvalidArgs("every source stopped".into())));
                };
                first_event.get_or_insert_with(Instant::now);
                got_event = true;
                let mut next = Some(ev);
                let mut n = 0;
                while let Some(ev) = next.take() {
                    match ev {
                        SourceEvent::Apply(o) => index.apply(o),
                        SourceEvent::Delete(r) => index.delete(&r),
                        SourceEvent::Reset { kind, objects } => index.reset(kind, objects),
                        SourceEvent::Synced { source } => {
                            info!(source = %source, "source synced");
                            unsynced.remove(&source);
                            status.update(|s| { s.sources.insert(source, true); });
                        }
                        SourceEvent::Error { origin, message } => {
                            source_errors_total += 1;
                            source_errors.insert(origin, message);
                        }
                        SourceEvent::ErrorCleared { origin } => {
                            source_errors.remove(&origin);
                        }
                    }
                    n += 1;
                    if n < 10_000 {
                        next = rx.try_recv().ok();
                    }
                }
            }
            msg = own_watch.message() => {
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return Err(EtcdError::request("watch of own keys", etcd_client::Error::WatchError("stream ended".into()))),
                    Err(e) => return Err(EtcdError::request("watch of own keys", e)),
                };
                if resp.canceled() {
                    return Err(EtcdError::request("watch of own keys", etcd_client::Error::WatchError(resp.cancel_reason().to_owned())));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let value = match ev.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    if writer.observe(&key, value, kv.mod_revision()) && synced_once {
                        warn!(key = %key, deleted = value.is_none(), "key changed outside the apiserver; repairing");
                        if canaries.contains(&key) {
                            repair_canaries = true;
                        } else {
                            pending.insert(key);
                        }
                    }
                }
            }
            rev = rrx.recv(), if !remote_synced || !rrx.is_closed() => {
                if let Some(rev) = rev {
                    first_event.get_or_insert_with(Instant::now);
                    got_event = true;
                    match rev {
                        RemoteEvent::Reset(all) => {
                            for c in remote_clusters.clone() {
                                if !all.contains_key(&c) {
                                    index.set_remote_services(&c, Vec::new());
                                }
                            }
                            remote_clusters = all.keys().cloned().collect();
                            for (c, specs) in all {
                                index.set_remote_services(&c, specs);
                            }
                            remote_synced = true;
                        }
                        RemoteEvent::Apply(spec) => {
                            remote_clusters.insert(spec.cluster.clone());
                            index.apply_remote_service(spec);
                        }
                        RemoteEvent::Delete(c, s) => index.delete_remote_service(&c, &s),
                    }
                }
            }
        }
        if got_event {
            *errors_in_term = source_errors_total + index.errors_total();
            let mut errs = source_errors.clone();
            for e in index.errors() {
                errs.insert(e.object.to_string(), e.message);
            }
            let desired = index.desired().len() as u64;
            status.update(|s| {
                s.source_errors = errs;
                s.source_errors_total = errors_base + *errors_in_term;
                s.desired_keys = desired;
            });
        }
        if !synced_once {
            if !unsynced.is_empty() || !remote_synced {
                continue;
            }
            // First full write: everything desired, and everything under our prefixes that is not.
            pending.extend(index.take_dirty());
            pending.extend(index.desired().keys().cloned());
            pending.extend(
                writer
                    .current()
                    .keys()
                    .filter(|k| !canaries.contains(k))
                    .cloned(),
            );
        } else {
            pending.extend(index.take_dirty());
            if repair_canaries {
                repair_canaries = false;
                let missing: Vec<crate::writer::Op> = canaries
                    .iter()
                    .filter(|k| !writer.current().contains_key(*k))
                    .map(|k| crate::writer::Op {
                        key: k.clone(),
                        value: Some(format_time(OffsetDateTime::now_utc()).into_bytes()),
                    })
                    .collect();
                match writer.write(missing, &guard).await {
                    Ok(_) => {}
                    Err(EtcdError::LostLeadership) => return Ok(TermEnd::Lost),
                    Err(e) => {
                        warn!(error = %e, "rewriting sync canaries");
                        repair_canaries = true;
                    }
                }
            }
        }
        if pending.is_empty() || retry_at.is_some() {
            continue;
        }
        let ops = plan(pending.iter(), index.desired(), writer.current(), true);
        let started = first_event.take();
        match writer.write(ops, &guard).await {
            Ok(st) => {
                pending.clear();
                backoff.reset();
                if synced_once {
                    index.compact_unpublished();
                }
                status.update(|s| {
                    s.keys_put_total += st.puts;
                    s.keys_deleted_total += st.deletes;
                    s.txns_total += st.txns;
                });
                if let Some(t) = started
                    && (st.puts + st.deletes) > 0
                {
                    status.observe_reconcile(t.elapsed());
                }
                if !synced_once {
                    // Canaries only after the whole first write.
                    let missing: Vec<crate::writer::Op> = canaries
                        .iter()
                        .filter(|k| !writer.current().contains_key(*k))
                        .map(|k| crate::writer::Op {
                            key: k.clone(),
                            value: Some(format_time(OffsetDateTime::now_utc()).into_bytes()),
                        })
                        .collect();
                    match writer.write(missing, &guard).await {
                        Ok(cst) => {
                            synced_once = true;
                            index.compact();
                            info!(
                                puts = st.puts,
                                deletes = st.deletes,
                                canaries = cst.puts,
                                keys = index.desired().len(),
                                "initial sync written"
                            );
                            status.update(|s| {
                                s.ready = true;
                                s.keys_put_total += cst.puts;
                                s.txns_total += cst.txns;
                                s.last_full_sync = Some(format_time(OffsetDateTime::now_utc()));
                            });
                        }
                        Err(EtcdError::LostLeadership) => return Ok(TermEnd::Lost),
                        Err(e) => {
                            warn!(error = %e, "writing sync canaries");
                            retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                        }
                    }
                }
            }
            Err(EtcdError::LostLeadership) => return Ok(TermEnd::Lost),
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "etcd write failed; retrying");
                status.update(|s| {
                    s.etcd_errors_total += 1;
                    s.last_error = Some(e.to_string());
                });
                retry_at = Some(tokio::time::Instant::now() + d);
            }
        }
    }
}
