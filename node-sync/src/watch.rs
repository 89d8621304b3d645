//! The watcher of one cluster connection ([`watch_cluster`]): connect, read and check the cluster
//! config, then follow the cluster's keys through [`mesh_kv::Watcher`] (list at one revision, the
//! sync canaries, watch from the next revision), forwarding what changed as [`ConnEvent`]s; after
//! an error, reconnect with the mesh's backoff, list again and delete only what the new list
//! lacks ([`mesh_kv::Known`]). [`follow`] is the part after the connect, over any
//! [`KvStore`], so it is unit-tested on the in-memory store.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mesh_kv::{EtcdStore, Event, KeyValue, Known, KvStore, Watcher, backoff_delay};
use mesh_model::ClusterName;
use mesh_model::keys::{KeyKind, MeshKey, PREFIX, SyncKind};
use mesh_model::values::{ClusterConfig, MeshValue};
use tokio::sync::mpsc;

use crate::cluster::ClusterSource;
use crate::connect::{connect, explain};

/// Which keys a connection reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyScope {
    /// The keys of one cluster (a remote's etcd, or the local one).
    Cluster(ClusterName),
    /// The local etcd: the local cluster's keys and `remotes/<local>/` entries.
    Local(ClusterName),
    /// KVStoreMesh: the local etcd holds every cluster's keys.
    All(ClusterName),
}

impl KeyScope {
    fn wants(&self, key: &MeshKey) -> bool {
        let kind_ok = matches!(
            key.kind(),
            KeyKind::ClusterConfig
                | KeyKind::Heartbeat
                | KeyKind::Synced
                | KeyKind::Services
                | KeyKind::Endpoints
                | KeyKind::Health
                | KeyKind::Imports
        );
        // A remote cluster's nodes (their addresses and pod CIDRs feed `--routing`); the local cluster's own
        // nodes are not routed by node-sync, so the local scopes leave them out.
        let remote_node =
            |home: &ClusterName| key.kind() == KeyKind::Nodes && key.cluster() != home;
        match self {
            KeyScope::Cluster(c) => {
                (kind_ok || key.kind() == KeyKind::Nodes)
                    && key.cluster() == c
                    && key.kind() != KeyKind::Imports
            }
            KeyScope::Local(c) => key.cluster() == c && (kind_ok || key.kind() == KeyKind::Remotes),
            KeyScope::All(c) => {
                kind_ok && (key.kind() != KeyKind::Imports || key.cluster() == c)
                    || (key.kind() == KeyKind::Remotes && key.cluster() == c)
                    || remote_node(c)
            }
        }
    }

    fn home(&self) -> &ClusterName {
        match self {
            KeyScope::Cluster(c) | KeyScope::Local(c) | KeyScope::All(c) => c,
        }
    }
}

/// What a connection lists and watches. A remote's etcd may hold other clusters' keys (a peer
/// that runs KVStoreMesh holds every one of its peers'), so a remote connection follows only its
/// cluster's prefixes; listing the whole keyspace made each of N remotes cost the whole mesh
/// (issue 19: 255 clusters, 65 s and 2.4 GiB to sync). The local etcd is followed whole.
fn watcher_for<S: KvStore>(store: S, scope: &KeyScope) -> Watcher<S> {
    match scope {
        KeyScope::Cluster(c) => Watcher::multi(
            store,
            vec![
                // Exact keys (they also match `c10` for `c1`: `wants` drops those).
                format!("{}{c}", KeyKind::ClusterConfig.prefix()),
                format!("{}{c}", KeyKind::Heartbeat.prefix()),
                KeyKind::Synced.cluster_prefix(c),
                KeyKind::Services.cluster_prefix(c),
                KeyKind::Endpoints.cluster_prefix(c),
                KeyKind::Health.cluster_prefix(c),
                KeyKind::Nodes.cluster_prefix(c),
            ],
        ),
        KeyScope::Local(_) | KeyScope::All(_) => Watcher::new(store, PREFIX),
    }
}

/// What a watcher reports to the agent.
#[derive(Debug, Clone)]
pub enum ConnEvent {
    /// Connecting (attempt number, from 1).
    Connecting(u32),
    /// The cluster config was read and accepted.
    Accepted(ClusterConfig),
    /// The cluster config was refused; the watcher retries later.
    Refused(String),
    /// The stream is up (after the list).
    Connected,
    /// A good key/value.
    Put(MeshKey, MeshValue),
    /// A key was deleted (or vanished between two lists).
    Delete(MeshKey),
    /// A value that did not decode or validate; the previous good state is kept.
    BadValue {
        /// The key.
        key: String,
        /// Why.
        error: String,
    },
    /// The initial list is done and every sync canary was seen.
    Synced,
    /// A heartbeat of the cluster was seen.
    Heartbeat(ClusterName),
    /// The stream broke or could not be opened.
    Disconnected(String),
}

/// Validates a cluster config (the agent's registry); `Err` is the refusal shown on the status page.
pub type Validator =
    std::sync::Arc<dyn Fn(&ClusterSource, &ClusterConfig) -> Result<(), String> + Send + Sync>;

/// Watcher settings.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// First backoff step.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
    /// Timeout of connect and list.
    pub request_timeout: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What a cluster's watcher carries from one connection to the next.
#[derive(Debug, Default)]
pub struct WatchState {
    /// Keys forwarded and not deleted since.
    known: Known,
    /// `Synced` was sent (once per watcher).
    synced_sent: bool,
}

impl WatchState {
    /// A watcher taking over from one that forwarded `known` (its source changed): the first
    /// list re-sends them and deletes those it lacks, as after a reconnect.
    pub fn taking_over(known: HashSet<String>) -> Self {
        Self {
            known: Known::with_keys(known),
            synced_sent: false,
        }
    }
}

/// Run the watcher of one connection until the receiver is dropped or the task is aborted.
/// `known` are the keys a previous watcher of the same cluster forwarded (its source changed):
/// the first list re-sends them and deletes those it lacks, as after a reconnect.
pub async fn watch_cluster(
    source: ClusterSource,
    scope: KeyScope,
    settings: WatchSettings,
    validate: Validator,
    tx: mpsc::UnboundedSender<(ClusterName, ConnEvent)>,
    known: HashSet<String>,
) {
    let me = source.name.clone();
    let mut state = WatchState::taking_over(known);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if tx
            .send((me.clone(), ConnEvent::Connecting(attempt)))
            .is_err()
        {
            return;
        }
        let started = Instant::now();
        let err = match connect(&source, settings.request_timeout).await {
            Ok(client) => {
                let store = EtcdStore::new(client, settings.request_timeout);
                follow(&store, &source, &scope, &validate, &tx, &mut state).await
            }
            Err(e) => e.to_string(),
        };
        let err = explain(&source, &err);
        if tx.is_closed() {
            return;
        }
        let _ = tx.send((me.clone(), ConnEvent::Disconnected(err.clone())));
        tracing::warn!(cluster = %me, error = %err, attempt, "cluster connection lost");
        // A session that stayed up a while resets the backoff.
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 1;
        }
        let delay = backoff_delay(
            attempt - 1,
            settings.backoff_base,
            settings.backoff_cap,
            rand::random::<f64>(),
        );
        tokio::time::sleep(delay).await;
    }
}

/// The sync canaries a cluster's listing must hold before it counts as complete.
fn canaries_needed() -> [SyncKind; 2] {
    [SyncKind::Services, SyncKind::Endpoints]
}

/// Read the cluster config at `store` (refusing a bad one before reading anything else), then
/// follow the cluster's keys, sending what changed on `tx`, until an error, which is returned.
pub async fn follow<S: KvStore>(
    store: &S,
    source: &ClusterSource,
    scope: &KeyScope,
    validate: &Validator,
    tx: &mpsc::UnboundedSender<(ClusterName, ConnEvent)>,
    state: &mut WatchState,
) -> String {
    let me = &source.name;
    let send = |e: ConnEvent| {
        let _ = tx.send((me.clone(), e));
    };
    let cfg_key = MeshKey::ClusterConfig {
        cluster: scope.home().clone(),
    };
    let cfg = match store.get(&cfg_key.to_string()).await {
        Err(e) => return e.to_string(),
        Ok(None) => {
            let msg = format!(
                "no cluster config at {cfg_key} (is the cluster's clustermesh-apiserver running?)"
            );
            send(ConnEvent::Refused(msg.clone()));
            return msg;
        }
        Ok(Some(kv)) => match MeshValue::decode(&cfg_key, &kv.value) {
            Ok(MeshValue::ClusterConfig(c)) => c,
            Ok(_) => return format!("{cfg_key}: unexpected value kind"),
            Err(e) => {
                let msg = e.to_string();
                send(ConnEvent::BadValue {
                    key: cfg_key.to_string(),
                    error: msg.clone(),
                });
                send(ConnEvent::Refused(msg.clone()));
                return msg;
            }
        },
    };
    if let Err(why) = validate(source, &cfg) {
        send(ConnEvent::Refused(why.clone()));
        return why;
    }
    send(ConnEvent::Accepted(cfg.clone()));

    let canaries_ok = |seen: &HashSet<SyncKind>| {
        !cfg.capabilities.sync_canaries || canaries_needed().iter().all(|k| seen.contains(k))
    };
    let mut seen_canaries: HashSet<SyncKind> = HashSet::new();
    let saw_canary = |parsed: &MeshKey, seen: &mut HashSet<SyncKind>| {
        if let MeshKey::Synced { kind, cluster } = parsed
            && cluster == scope.home()
        {
            seen.insert(*kind);
        }
    };
    let wanted = |key: &str| MeshKey::parse(key).ok().filter(|k| scope.wants(k));
    let mut watcher = watcher_for(store.clone(), scope);
    loop {
        let ev = match watcher.next().await {
            Ok(ev) => ev,
            Err(e) => return e.to_string(),
        };
        match ev {
            Event::Init { .. } => {
                state.known.init();
                seen_canaries.clear();
            }
            Event::InitApply(kv) => {
                let Some(parsed) = wanted(&kv.key) else {
                    continue;
                };
                saw_canary(&parsed, &mut seen_canaries);
                if state.known.put(&kv) {
                    forward(&parsed, &kv, &send);
                }
            }
            Event::InitDone { .. } => {
                for k in state.known.init_done() {
                    if let Ok(parsed) = MeshKey::parse(&k) {
                        send(ConnEvent::Delete(parsed));
                    }
                }
                send(ConnEvent::Connected);
                if canaries_ok(&seen_canaries) {
                    state.synced_sent = true;
                    send(ConnEvent::Synced);
                }
            }
            Event::Apply(kv) => {
                let Some(parsed) = wanted(&kv.key) else {
                    continue;
                };
                state.known.put(&kv);
                // Only the watched cluster's own config is checked against the source: in
                // KVStoreMesh mode the local etcd also holds every peer's (mirrored) config.
                if let MeshKey::ClusterConfig { cluster } = &parsed
                    && cluster == scope.home()
                    && let Ok(MeshValue::ClusterConfig(c)) = MeshValue::decode(&parsed, &kv.value)
                    && let Err(why) = validate(source, &c)
                {
                    send(ConnEvent::Refused(why.clone()));
                    return why;
                }
                saw_canary(&parsed, &mut seen_canaries);
                if !state.synced_sent && canaries_ok(&seen_canaries) {
                    state.synced_sent = true;
                    send(ConnEvent::Synced);
                }
                forward(&parsed, &kv, &send);
            }
            Event::Delete { key, .. } => {
                let Some(parsed) = wanted(&key) else {
                    continue;
                };
                state.known.delete(&key);
                send(ConnEvent::Delete(parsed));
            }
        }
    }
}

fn forward(parsed: &MeshKey, kv: &KeyValue, send: &impl Fn(ConnEvent)) {
    let key = kv.key.as_str();
    if let MeshKey::Heartbeat { cluster } = parsed {
        send(ConnEvent::Heartbeat(cluster.clone()));
        return;
    }
    match MeshValue::decode(parsed, &kv.value) {
        Ok(v) => send(ConnEvent::Put(parsed.clone(), v)),
        Err(e) => {
            tracing::warn!(key, error = %e, "refused a bad value; keeping the previous state");
            send(ConnEvent::BadValue {
                key: key.to_owned(),
                error: e.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kv::MemStore;
    use mesh_model::values::{Capabilities, format_time};
    use mesh_model::{ClusterId, MaxConnectedClusters};
    use std::sync::Arc;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    #[test]
    fn scopes() {
        let k = |s: &str| MeshKey::parse(s).unwrap();
        let remote = KeyScope::Cluster(c("c2"));
        assert!(remote.wants(&k("clustermesh/v1/endpoints/c2/default/web/0")));
        assert!(!remote.wants(&k("clustermesh/v1/endpoints/c3/default/web/0")));
        assert!(!remote.wants(&k("clustermesh/v1/imports/c2/default/web")));
        assert!(!remote.wants(&k("clustermesh/v1/nodestatus/c2/n1")));
        let local = KeyScope::Local(c("c1"));
        assert!(local.wants(&k("clustermesh/v1/remotes/c1/c2")));
        assert!(local.wants(&k("clustermesh/v1/imports/c1/default/web")));
        assert!(!local.wants(&k("clustermesh/v1/services/c2/default/web")));
        let all = KeyScope::All(c("c1"));
        assert!(all.wants(&k("clustermesh/v1/services/c2/default/web")));
        assert!(!all.wants(&k("clustermesh/v1/imports/c2/default/web")));
        // Nodes (for `--routing`): a remote's own, and every mirrored peer's through KVStoreMesh; never the
        // local cluster's.
        assert!(remote.wants(&k("clustermesh/v1/nodes/c2/n1")));
        assert!(!remote.wants(&k("clustermesh/v1/nodes/c3/n1")));
        assert!(!local.wants(&k("clustermesh/v1/nodes/c1/n1")));
        assert!(all.wants(&k("clustermesh/v1/nodes/c2/n1")));
        assert!(!all.wants(&k("clustermesh/v1/nodes/c1/n1")));
    }

    /// A remote connection lists and watches its cluster's `nodes/` prefix (and not another cluster's that
    /// shares the etcd).
    #[tokio::test]
    async fn a_remote_connection_delivers_its_cluster_nodes() {
        let s = MemStore::new();
        s.put(&cfg_key(), &config(2)).await.unwrap();
        let node = |cluster: &str, name: &str| {
            let key = MeshKey::Node {
                cluster: c(cluster),
                node: name.into(),
            };
            let v = MeshValue::Node(mesh_model::values::NodeInfo {
                cluster: c(cluster),
                name: name.into(),
                addresses: vec![],
                zone: None,
                region: None,
                pod_cidrs: vec!["10.2.1.0/24".parse().unwrap()],
            });
            (key.to_string(), v.encode())
        };
        let (k1, v1) = node("c2", "n1");
        s.put(&k1, &v1).await.unwrap();
        let (k9, v9) = node("c9", "x1");
        s.put(&k9, &v9).await.unwrap();
        let (h, mut rx) = start(&s, WatchState::default());
        assert_eq!(
            names_until(&mut rx, "connected").await,
            ["accepted", "put cluster-config", "put nodes", "connected"]
        );
        let (k2, v2) = node("c2", "n2");
        s.put(&k2, &v2).await.unwrap();
        s.put(&k9, &v9).await.unwrap();
        s.delete(&k1).await.unwrap();
        assert_eq!(
            names_until(&mut rx, "delete nodes").await,
            ["put nodes", "delete nodes"]
        );
        h.abort();
    }

    fn config(id: u32) -> Vec<u8> {
        let mcc = MaxConnectedClusters::DEFAULT;
        MeshValue::ClusterConfig(ClusterConfig {
            name: c("c2"),
            id: ClusterId::new(id, mcc).unwrap(),
            max_connected_clusters: mcc,
            capabilities: Capabilities::v1(false),
            ca_fingerprints: vec![],
        })
        .encode()
    }

    fn cfg_key() -> String {
        MeshKey::ClusterConfig { cluster: c("c2") }.to_string()
    }

    fn canary(kind: SyncKind) -> String {
        MeshKey::Synced {
            cluster: c("c2"),
            kind,
        }
        .to_string()
    }

    fn now() -> Vec<u8> {
        format_time(time::OffsetDateTime::now_utc()).into_bytes()
    }

    type Rx = mpsc::UnboundedReceiver<(ClusterName, ConnEvent)>;

    /// Run `follow` for c2 on `store` in a task; it returns its error and the state it leaves.
    fn start(
        store: &MemStore,
        state: WatchState,
    ) -> (tokio::task::JoinHandle<(String, WatchState)>, Rx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = store.clone();
        let validate: Validator = Arc::new(|_, cfg: &ClusterConfig| {
            if cfg.id.get() == 2 {
                Ok(())
            } else {
                Err(format!(
                    "cluster c2 now claims id {}, expected 2",
                    cfg.id.get()
                ))
            }
        });
        let source = ClusterSource {
            name: c("c2"),
            expected_id: None,
            endpoints: vec!["memory".into()],
            tls: None,
        };
        let h = tokio::spawn(async move {
            let mut state = state;
            let scope = KeyScope::Cluster(c("c2"));
            let err = follow(&store, &source, &scope, &validate, &tx, &mut state).await;
            (err, state)
        });
        (h, rx)
    }

    /// The next events, named, until `last` (a name) is seen.
    async fn names_until(rx: &mut Rx, last: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (_, ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {last} within 5 s; saw {out:?}"))
                .expect("the watcher ended");
            let name = match ev {
                ConnEvent::Accepted(_) => "accepted".into(),
                ConnEvent::Refused(_) => "refused".into(),
                ConnEvent::Connected => "connected".into(),
                ConnEvent::Synced => "synced".into(),
                ConnEvent::Put(k, _) => format!("put {}", k.kind()),
                ConnEvent::Delete(k) => format!("delete {}", k.kind()),
                ConnEvent::Heartbeat(_) => "heartbeat".into(),
                ConnEvent::BadValue { .. } => "bad".into(),
                ConnEvent::Connecting(_) | ConnEvent::Disconnected(_) => "conn".into(),
            };
            let done = name == last;
            out.push(name);
            if done {
                return out;
            }
        }
    }

    /// The whole life of a connection on the in-memory store: synced only once both canaries
    /// are there; after a broken stream (the store compacted meanwhile) the next session's
    /// relist sends only what changed and deletes what vanished.
    #[tokio::test]
    async fn a_relist_after_a_broken_stream_sends_only_the_difference() {
        let s = MemStore::new();
        s.put(&cfg_key(), &config(2)).await.unwrap();
        s.put(&canary(SyncKind::Services), &now()).await.unwrap();
        s.put("clustermesh/v1/services/c9/x/y", b"another cluster's")
            .await
            .unwrap();
        let (h, mut rx) = start(&s, WatchState::default());
        assert_eq!(
            names_until(&mut rx, "connected").await,
            ["accepted", "put cluster-config", "put synced", "connected"],
            "not synced before the endpoints canary"
        );
        s.put(&canary(SyncKind::Endpoints), &now()).await.unwrap();
        assert_eq!(
            names_until(&mut rx, "put synced").await,
            ["synced", "put synced"]
        );

        // The connection breaks; meanwhile a canary goes, a heartbeat comes, etcd compacts.
        s.break_watches();
        let (err, state) = h.await.unwrap();
        assert!(err.contains("connection lost"), "{err}");
        s.delete(&canary(SyncKind::Services)).await.unwrap();
        s.put(&MeshKey::Heartbeat { cluster: c("c2") }.to_string(), &now())
            .await
            .unwrap();
        s.compact(s.revision());

        let (h, mut rx) = start(&s, state);
        assert_eq!(
            names_until(&mut rx, "connected").await,
            ["accepted", "heartbeat", "delete synced", "connected"],
            "the unchanged config and endpoints canary are not sent again"
        );
        h.abort();
    }

    #[tokio::test]
    async fn a_bad_value_is_reported_and_a_wrong_config_ends_the_session() {
        let s = MemStore::new();
        s.put(&cfg_key(), &config(2)).await.unwrap();
        let (h, mut rx) = start(&s, WatchState::default());
        names_until(&mut rx, "connected").await;
        s.put(&canary(SyncKind::Services), b"not a time")
            .await
            .unwrap();
        assert_eq!(names_until(&mut rx, "bad").await, ["bad"]);
        s.put(&canary(SyncKind::Services), &now()).await.unwrap();
        assert_eq!(names_until(&mut rx, "put synced").await, ["put synced"]);
        s.put(&cfg_key(), &config(3)).await.unwrap();
        assert_eq!(names_until(&mut rx, "refused").await, ["refused"]);
        let (err, _) = h.await.unwrap();
        assert!(err.contains("claims id 3"), "{err}");
    }
}
