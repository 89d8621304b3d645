//! The publisher: campaigns for leadership; as leader it lists the store (etcd), seeds the index, runs the
//! sources, writes the first full state once every source synced (then the sync canaries), and from then on
//! writes each change as it comes; a heartbeat every second. Losing the lease ends the term: sources stop,
//! nothing more is written, and the replica campaigns again. Generic over [`KvStore`], so a term is unit-tested
//! on the in-memory store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_kv::{Backoff, Event, Guard, KvError, KvStore, WatchTask, Watcher};
use mesh_model::ClusterName;
use mesh_model::keys::{KeyKind, MeshKey, SyncKind};
use mesh_model::values::{MeshValue, ServiceSpec, format_time};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::etcd::EtcdError;
use crate::index::{IndexConfig, MeshIndex, owned_prefixes};
use crate::leader::{LeaderTerm, campaign};
use crate::source::{Source, SourceEvent};
use crate::status::{Role, Status};
use crate::writer::{Op, StoreWriter, plan};

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

/// Other clusters' shared service specs in this store (there in KVStoreMesh mode), decoded.
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

/// Resolves once `shutdown` holds `true` (holding no borrow of it, so the future stays `Send`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// How a term ended.
enum TermEnd {
    Shutdown,
    Lost,
}

/// Runs the publisher until `shutdown` turns true (then resigns leadership).
pub async fn run<S: KvStore>(
    store: S,
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
            t = campaign(&store, &leader_key, &cfg.replica, cfg.lease_ttl) => t?,
            _ = stopped(&mut shutdown) => return Ok(()),
        };
        status.update(|s| {
            s.role = Role::Leader;
            s.ready = false;
            s.leader_terms_total += 1;
        });
        let mut errors_in_term = 0;
        let r = run_term(
            &store,
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
                term.resign(&store).await;
                info!("resigned leadership, shutting down");
                return Ok(());
            }
            Ok(TermEnd::Lost) | Err(TermError::Store(EtcdError::LostLeadership)) => {
                warn!("lost leadership; standing by");
            }
            Err(e) => {
                warn!(error = %e, "leader term failed; resigning and campaigning again");
                status.update(|s| {
                    s.etcd_errors_total += 1;
                    s.last_error = Some(e.to_string());
                });
                term.resign(&store).await;
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

/// Why a term stops early.
#[derive(Debug, thiserror::Error)]
enum TermError {
    /// Every source stopped: nothing more can be published.
    #[error("every source stopped")]
    SourcesGone,
    /// A store request failed.
    #[error(transparent)]
    Store(#[from] EtcdError),
}

#[allow(clippy::too_many_arguments)]
async fn run_term<S: KvStore>(
    store: &S,
    cfg: &PublisherConfig,
    sources: &[Arc<dyn Source>],
    status: &Arc<Status>,
    leader: &LeaderTerm,
    shutdown: &mut watch::Receiver<bool>,
    errors_base: u64,
    errors_in_term: &mut u64,
) -> Result<TermEnd, TermError> {
    let cluster = cfg.index.cluster.clone();
    let guard = leader.guard();
    let canaries = canary_keys(&cluster);
    let mut exact = vec![
        MeshKey::ClusterConfig {
            cluster: cluster.clone(),
        }
        .to_string(),
    ];
    exact.extend(canaries.iter().cloned());
    // Watch what we own, so a change made by someone else (a deleted or overwritten key, a stray key under our
    // prefixes) is repaired; events of our own writes are recognised by revision and ignored.
    let (writer, existing, own_watch) =
        StoreWriter::load(store.clone(), &owned_prefixes(&cluster), &exact).await?;
    info!(keys = existing.len(), "listed this cluster's keys in etcd");
    let mut index = MeshIndex::new(cfg.index.clone());
    index.seed(&existing);
    let watch_backoff = || Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut own_watch = WatchTask::spawn(own_watch, watch_backoff(), 1024);

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
    let wants_remote = cfg.remote_services && cfg.index.clusterset_cidr.is_some();
    let mut remote_watch = wants_remote.then(|| {
        let w = Watcher::new(store.clone(), &KeyKind::Services.prefix());
        WatchTask::spawn(w, watch_backoff(), 1024)
    });
    if let Some(dial) = &cfg.kvstoremesh {
        tasks.push(tokio::spawn(crate::kvstoremesh::run(
            store.clone(),
            cluster.clone(),
            dial.clone(),
            guard.clone(),
            Some(status.clone()),
        )));
    }
    let _tasks = Tasks(tasks);

    let heartbeat_key = MeshKey::Heartbeat {
        cluster: cluster.clone(),
    }
    .to_string();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut t = Term {
        status,
        guard,
        writer,
        index,
        canaries,
        unsynced,
        remote: RemoteServices {
            synced: !wants_remote,
            ..Default::default()
        },
        source_errors: BTreeMap::new(),
        source_errors_total: 0,
        errors_base,
        synced_once: false,
        pending: BTreeSet::new(),
        retry_at: None,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        first_event: None,
        repair_canaries: false,
    };
    let r: Result<TermEnd, TermError> = async {
        loop {
            let mut got_event = false;
            tokio::select! {
                biased;
                _ = stopped(shutdown) => return Ok(TermEnd::Shutdown),
                _ = leader.lost() => return Ok(TermEnd::Lost),
                _ = heartbeat.tick() => t.heartbeat(&heartbeat_key).await?,
                _ = async { match t.retry_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending::<()>().await } } => {
                    t.retry_at = None;
                }
                ev = rx.recv() => {
                    t.on_sources(ev.ok_or(TermError::SourcesGone)?, &mut rx);
                    got_event = true;
                }
                Some(ev) = own_watch.recv() => t.on_own(ev),
                Some(ev) = async { match &mut remote_watch { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    got_event = t.on_remote(&cluster, ev);
                }
            }
            if got_event {
                *errors_in_term = t.errors_in_term();
                t.report();
            }
            t.flush().await?;
        }
    }
    .await;
    *errors_in_term = t.errors_in_term();
    r
}

/// What the term knows of other clusters' shared services (for ClusterSetIP imports).
#[derive(Default)]
struct RemoteServices {
    /// The first listing is in.
    synced: bool,
    /// Clusters with specs in the index.
    clusters: BTreeSet<ClusterName>,
    /// A (re)listing in progress.
    listing: Option<BTreeMap<ClusterName, Vec<ServiceSpec>>>,
}

/// The state of one leader term: the index, the writer, what is pending, what is synced.
struct Term<'a, S> {
    status: &'a Arc<Status>,
    guard: Guard,
    writer: StoreWriter<S>,
    index: MeshIndex,
    canaries: Vec<String>,
    /// Sources that have not synced yet.
    unsynced: BTreeSet<String>,
    remote: RemoteServices,
    source_errors: BTreeMap<String, String>,
    source_errors_total: u64,
    /// Errors counted in earlier terms.
    errors_base: u64,
    /// The first full state and the canaries are written.
    synced_once: bool,
    /// Keys to bring to their desired state.
    pending: BTreeSet<String>,
    /// A failed write waits until then.
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    /// When the first event not yet written arrived (the reconcile latency).
    first_event: Option<Instant>,
    /// A canary was changed by someone else.
    repair_canaries: bool,
}

impl<S: KvStore> Term<'_, S> {
    async fn heartbeat(&mut self, key: &str) -> Result<(), TermError> {
        let now = format_time(OffsetDateTime::now_utc()).into_bytes();
        match self.writer.put_untracked(key, now, &self.guard).await {
            Err(EtcdError::LostLeadership) => return Err(EtcdError::LostLeadership.into()),
            Err(e) => {
                warn!(error = %e, "heartbeat");
                self.store_error(&e);
            }
            Ok(()) => {}
        }
        Ok(())
    }

    fn store_error(&self, e: &dyn std::fmt::Display) {
        self.status.update(|s| {
            s.etcd_errors_total += 1;
            s.last_error = Some(e.to_string());
        });
    }

    /// Takes `first` and whatever else the sources have queued (up to 10,000 events).
    fn on_sources(&mut self, first: SourceEvent, rx: &mut mpsc::Receiver<SourceEvent>) {
        self.first_event.get_or_insert_with(Instant::now);
        let mut next = Some(first);
        let mut n = 0;
        while let Some(ev) = next.take() {
            match ev {
                SourceEvent::Apply(o) => self.index.apply(o),
                SourceEvent::Delete(r) => self.index.delete(&r),
                SourceEvent::Reset { kind, objects } => self.index.reset(kind, objects),
                SourceEvent::Synced { source } => {
                    info!(source = %source, "source synced");
                    self.unsynced.remove(&source);
                    self.status.update(|s| {
                        s.sources.insert(source, true);
                    });
                }
                SourceEvent::Error { origin, message } => {
                    self.source_errors_total += 1;
                    self.source_errors.insert(origin, message);
                }
                SourceEvent::ErrorCleared { origin } => {
                    self.source_errors.remove(&origin);
                }
            }
            n += 1;
            if n < 10_000 {
                next = rx.try_recv().ok();
            }
        }
    }

    /// A change of our own keys: someone else's is repaired once the first full state is written.
    fn on_own(&mut self, ev: Result<Event, KvError>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // The watcher resumes (or relists) by itself.
                warn!(error = %e, "watch of this cluster's keys");
                self.store_error(&e);
                return;
            }
        };
        for (key, deleted) in self.writer.on_event(ev) {
            if !self.synced_once {
                continue;
            }
            warn!(key = %key, deleted, "key changed outside the apiserver; repairing");
            if self.canaries.contains(&key) {
                self.repair_canaries = true;
            } else {
                self.pending.insert(key);
            }
        }
    }

    /// Another cluster's service spec; whether the index may have changed.
    fn on_remote(&mut self, own: &ClusterName, ev: Result<Event, KvError>) -> bool {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, "watching remote services");
                return false;
            }
        };
        self.first_event.get_or_insert_with(Instant::now);
        match ev {
            Event::Init { .. } => {
                self.remote.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(kv) => {
                if let (Some(l), Some(spec)) = (
                    &mut self.remote.listing,
                    decode_remote(own, &kv.key, &kv.value),
                ) {
                    l.entry(spec.cluster.clone()).or_default().push(spec);
                }
                false
            }
            Event::InitDone { .. } => {
                let all = self.remote.listing.take().unwrap_or_default();
                for c in &self.remote.clusters {
                    if !all.contains_key(c) {
                        self.index.set_remote_services(c, Vec::new());
                    }
                }
                self.remote.clusters = all.keys().cloned().collect();
                for (c, specs) in all {
                    self.index.set_remote_services(&c, specs);
                }
                self.remote.synced = true;
                true
            }
            Event::Apply(kv) => match decode_remote(own, &kv.key, &kv.value) {
                Some(spec) => {
                    self.remote.clusters.insert(spec.cluster.clone());
                    self.index.apply_remote_service(spec);
                    true
                }
                None => false,
            },
            Event::Delete { key, .. } => match MeshKey::parse(&key) {
                Ok(MeshKey::Service { cluster, service }) if &cluster != own => {
                    self.index.delete_remote_service(&cluster, &service);
                    true
                }
                _ => false,
            },
        }
    }

    fn errors_in_term(&self) -> u64 {
        self.source_errors_total + self.index.errors_total()
    }

    /// Errors and desired keys into the status.
    fn report(&self) {
        let mut errs = self.source_errors.clone();
        for e in self.index.errors() {
            errs.insert(e.object.to_string(), e.message);
        }
        let desired = self.index.desired().len() as u64;
        let total = self.errors_base + self.errors_in_term();
        self.status.update(|s| {
            s.source_errors = errs;
            s.source_errors_total = total;
            s.desired_keys = desired;
        });
    }

    /// The canaries not in the store, dated now.
    fn missing_canaries(&self) -> Vec<Op> {
        let now = format_time(OffsetDateTime::now_utc()).into_bytes();
        self.canaries
            .iter()
            .filter(|k| !self.writer.current().contains_key(*k))
            .map(|k| Op {
                key: k.clone(),
                value: Some(now.clone()),
            })
            .collect()
    }

    /// Writes what is pending: nothing until every source (and the remote services) synced; then
    /// the first full state (everything desired, and everything under our prefixes that is not)
    /// and the canaries; from then on each change. A failed write waits out a backoff.
    async fn flush(&mut self) -> Result<(), TermError> {
        if !self.synced_once {
            if !self.unsynced.is_empty() || !self.remote.synced {
                return Ok(());
            }
            self.pending.extend(self.index.take_dirty());
            self.pending.extend(self.index.desired().keys().cloned());
            let stray: Vec<String> = self
                .writer
                .current()
                .keys()
                .filter(|k| !self.canaries.contains(k))
                .cloned()
                .collect();
            self.pending.extend(stray);
        } else {
            self.pending.extend(self.index.take_dirty());
            if self.repair_canaries {
                self.repair_canaries = false;
                match self
                    .writer
                    .write(self.missing_canaries(), &self.guard)
                    .await
                {
                    Ok(_) => {}
                    Err(EtcdError::LostLeadership) => return Err(EtcdError::LostLeadership.into()),
                    Err(e) => {
                        warn!(error = %e, "rewriting sync canaries");
                        self.repair_canaries = true;
                    }
                }
            }
        }
        if self.pending.is_empty() || self.retry_at.is_some() {
            return Ok(());
        }
        let ops = plan(
            self.pending.iter(),
            self.index.desired(),
            self.writer.current(),
            true,
        );
        let started = self.first_event.take();
        let st = match self.writer.write(ops, &self.guard).await {
            Ok(st) => st,
            Err(EtcdError::LostLeadership) => return Err(EtcdError::LostLeadership.into()),
            Err(e) => {
                let d = self.backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "etcd write failed; retrying");
                self.store_error(&e);
                self.retry_at = Some(tokio::time::Instant::now() + d);
                return Ok(());
            }
        };
        self.pending.clear();
        self.backoff.reset();
        if self.synced_once {
            self.index.compact_unpublished();
        }
        self.status.update(|s| {
            s.keys_put_total += st.puts;
            s.keys_deleted_total += st.deletes;
            s.txns_total += st.txns;
        });
        if let Some(t) = started
            && (st.puts + st.deletes) > 0
        {
            self.status.observe_reconcile(t.elapsed());
        }
        if self.synced_once {
            return Ok(());
        }
        // Canaries only after the whole first write.
        match self
            .writer
            .write(self.missing_canaries(), &self.guard)
            .await
        {
            Ok(cst) => {
                self.synced_once = true;
                self.index.compact();
                info!(
                    puts = st.puts,
                    deletes = st.deletes,
                    canaries = cst.puts,
                    keys = self.index.desired().len(),
                    "initial sync written"
                );
                self.status.update(|s| {
                    s.ready = true;
                    s.keys_put_total += cst.puts;
                    s.txns_total += cst.txns;
                    s.last_full_sync = Some(format_time(OffsetDateTime::now_utc()));
                });
            }
            Err(EtcdError::LostLeadership) => return Err(EtcdError::LostLeadership.into()),
            Err(e) => {
                warn!(error = %e, "writing sync canaries");
                self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! A term on the in-memory store: the first write waits for the sources, changes follow,
    //! someone else's change is repaired (also across a compaction of the watch), and a lost lease
    //! ends the term and the replica leads again.

    use std::sync::Mutex;

    use mesh_kv::MemStore;
    use mesh_model::{ClusterId, MaxConnectedClusters};

    use super::*;
    use crate::objects::{ObjectKind, ObjectRef};
    use crate::source::SourceFuture;
    use crate::source::manifests::parse_manifests;

    /// A source that sends its objects and `Synced` at each term, then whatever the test pushes.
    #[derive(Clone, Default)]
    struct TestSource {
        objects: Vec<crate::objects::SourceObject>,
        push: Arc<Mutex<Option<mpsc::Sender<SourceEvent>>>>,
    }

    impl Source for TestSource {
        fn name(&self) -> String {
            "test".into()
        }
        fn run(&self, tx: mpsc::Sender<SourceEvent>) -> SourceFuture {
            let objects = self.objects.clone();
            *self.push.lock().unwrap() = Some(tx.clone());
            Box::pin(async move {
                for o in objects {
                    let _ = tx.send(SourceEvent::Apply(o)).await;
                }
                let synced = SourceEvent::Synced {
                    source: "test".into(),
                };
                let _ = tx.send(synced).await;
                tx.closed().await;
                Ok(())
            })
        }
    }

    impl TestSource {
        async fn push(&self, ev: SourceEvent) {
            let tx = self.push.lock().unwrap().clone().expect("a term runs");
            tx.send(ev).await.unwrap();
        }
    }

    const WEB: &str = "clustermesh/v1/services/c1/shop/web";
    const LEADER: &str = "clustermesh/v1/leader/c1";

    fn web() -> Vec<crate::objects::SourceObject> {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    clustermesh.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n";
        parse_manifests("web.yaml", text).unwrap()
    }

    fn start(store: &MemStore, source: &TestSource) -> (Arc<Status>, watch::Sender<bool>) {
        let c1 = ClusterName::new("c1").unwrap();
        let index = IndexConfig::new(
            c1,
            ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
        );
        let mut cfg = PublisherConfig::new(index, "replica-0");
        cfg.heartbeat = Duration::from_secs(3600);
        let status = Status::new("c1", 1, "replica-0");
        let (tx, rx) = watch::channel(false);
        let sources: Vec<Arc<dyn Source>> = vec![Arc::new(source.clone())];
        tokio::spawn(run(store.clone(), cfg, sources, status.clone(), rx));
        (status, tx)
    }

    async fn synced(store: &MemStore) {
        store
            .until("clustermesh/v1/synced/c1/", |k| {
                k.len() == SyncKind::ALL.len()
            })
            .await;
    }

    #[tokio::test]
    async fn writes_once_every_source_synced_then_the_canaries_then_each_change() {
        let store = MemStore::new();
        // A stray key under our prefix from an earlier life: deleted by the first full write.
        store
            .put("clustermesh/v1/services/c1/shop/gone", b"{}")
            .await
            .unwrap();
        let source = TestSource {
            objects: web(),
            ..Default::default()
        };
        let (status, _stop) = start(&store, &source);
        synced(&store).await;
        let services = store.until("clustermesh/v1/services/c1/", |_| true).await;
        assert_eq!(services.keys().collect::<Vec<_>>(), [WEB]);
        assert!(
            store
                .get("clustermesh/v1/cluster-config/c1")
                .await
                .unwrap()
                .is_some()
        );
        let hb = "clustermesh/v1/heartbeat/c1";
        store.until(hb, |k| k.contains_key(hb)).await;
        assert!(status.snapshot().ready);

        source
            .push(SourceEvent::Delete(ObjectRef::new(
                ObjectKind::Service,
                "shop",
                "web",
            )))
            .await;
        store
            .until("clustermesh/v1/services/c1/", |k| k.is_empty())
            .await;
    }

    #[tokio::test]
    async fn a_key_changed_by_someone_else_is_repaired_across_a_compaction() {
        let store = MemStore::new();
        let source = TestSource {
            objects: web(),
            ..Default::default()
        };
        let (_status, _stop) = start(&store, &source);
        synced(&store).await;
        let published = store.get(WEB).await.unwrap().unwrap().value;

        // Overwritten: put back.
        store.put(WEB, b"{\"tampered\":true}").await.unwrap();
        store.until(WEB, |k| k.get(WEB) == Some(&published)).await;

        // Deleted while the publisher's watch is down, and the store compacts past the delete:
        // the watch relists, sees the key gone, and puts it back. So is a deleted canary.
        store.break_watches();
        store.delete(WEB).await.unwrap();
        store
            .delete("clustermesh/v1/synced/c1/services")
            .await
            .unwrap();
        store.compact(store.revision());
        store.until(WEB, |k| k.get(WEB) == Some(&published)).await;
        synced(&store).await;
    }

    #[tokio::test]
    async fn a_lost_lease_ends_the_term_and_the_replica_leads_and_publishes_again() {
        let store = MemStore::new();
        let source = TestSource {
            objects: web(),
            ..Default::default()
        };
        let (status, stop) = start(&store, &source);
        synced(&store).await;
        let first = store.get(LEADER).await.unwrap().unwrap();
        // The lease ends (as when etcd did not hear from the replica for a TTL): the key goes
        // with it, and so would anything else under the lease.
        let lease = (1..=16)
            .find(|l| futures::executor::block_on(store.lease_keep_alive(*l)).unwrap_or(0) > 0)
            .expect("the leader's lease");
        store.delete(WEB).await.unwrap();
        store.expire_lease(lease);
        // A new term: a new leader key, and the deleted key is published again.
        let again = store.until(LEADER, |k| k.contains_key(LEADER)).await;
        assert_ne!(
            store.get(LEADER).await.unwrap().unwrap().create_revision,
            first.create_revision,
            "{again:?}"
        );
        store.until(WEB, |k| k.contains_key(WEB)).await;
        assert_eq!(status.snapshot().leader_terms_total, 2);

        // Shutdown resigns: the leader key goes at once.
        stop.send(true).unwrap();
        store.until(LEADER, |k| k.is_empty()).await;
    }
}
