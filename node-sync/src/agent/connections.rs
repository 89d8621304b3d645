//! The agent's cluster watchers: one per cluster, started, restarted and stopped so they match
//! the configured remotes (the local etcd's `remotes/` entries and the remote config dir), and the
//! validator that accepts or refuses each cluster's config against the local one and the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mesh_model::values::ClusterConfig;
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::AgentOptions;
use super::state::{AgentState, ClusterStatus};
use crate::cluster::{self, ClusterSource};
use crate::watch::{ConnEvent, KeyScope, Validator, watch_cluster};

/// The clusters' configs accepted so far (read by the validator on the watchers' tasks).
#[derive(Default)]
pub(super) struct Registry {
    local_mcc: Option<MaxConnectedClusters>,
    accepted: HashMap<ClusterName, ClusterId>,
}

/// The tasks the agent started: one watcher per cluster, and the others (health checker,
/// publisher, probers); all aborted when dropped.
pub(super) struct Tasks {
    pub watchers: HashMap<ClusterName, (ClusterSource, JoinHandle<()>)>,
    pub tx: mpsc::UnboundedSender<(ClusterName, ConnEvent)>,
    pub validator: Validator,
    pub registry: Arc<Mutex<Registry>>,
    pub others: Vec<JoinHandle<()>>,
}

impl Tasks {
    /// No tasks yet; watchers will send their events on `tx`.
    pub fn new(opts: &AgentOptions, tx: mpsc::UnboundedSender<(ClusterName, ConnEvent)>) -> Self {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let validator: Validator = {
            let reg = registry.clone();
            let local = opts.cluster.clone();
            Arc::new(move |source: &ClusterSource, cfg: &ClusterConfig| {
                let mut r = lock_registry(&reg);
                let mcc = if source.name == local {
                    None
                } else {
                    r.local_mcc
                };
                cluster::validate_config(source, cfg, mcc, &r.accepted)
                    .map_err(|e| e.to_string())?;
                if source.name == local {
                    r.local_mcc = Some(cfg.max_connected_clusters);
                }
                r.accepted.insert(cfg.name.clone(), cfg.id);
                Ok(())
            })
        };
        Self {
            watchers: HashMap::new(),
            tx,
            validator,
            registry,
            others: Vec::new(),
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, (_, h)) in self.watchers.drain() {
            h.abort();
        }
        for h in self.others.drain(..) {
            h.abort();
        }
    }
}

pub(super) fn spawn_watcher(
    tasks: &mut Tasks,
    source: ClusterSource,
    opts: &AgentOptions,
    known: HashSet<String>,
) {
    let scope = if source.name == opts.cluster {
        if opts.kvstoremesh {
            KeyScope::All(opts.cluster.clone())
        } else {
            KeyScope::Local(opts.cluster.clone())
        }
    } else {
        KeyScope::Cluster(source.name.clone())
    };
    if let Some((_, h)) = tasks.watchers.remove(&source.name) {
        h.abort();
    }
    let h = tokio::spawn(watch_cluster(
        source.clone(),
        scope,
        opts.watch.clone(),
        tasks.validator.clone(),
        tasks.tx.clone(),
        known,
    ));
    tasks.watchers.insert(source.name.clone(), (source, h));
}

/// Re-read the remote config dir; returns whether the set of sources changed.
pub(super) fn reread_remote_dir(st: &mut AgentState) -> bool {
    let Some(dir) = st.opts.remote_config_dir.clone() else {
        return false;
    };
    let (sources, errors) = cluster::read_remote_dir(&dir, st.opts.tls_dir.as_deref());
    let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    if errors != st.dir_errors {
        for e in &errors {
            tracing::warn!(error = %e, "remote cluster config refused");
        }
        st.set_dir_errors(errors);
    }
    if sources != st.dir_sources {
        st.dir_sources = sources;
        return true;
    }
    false
}

/// Start, restart or stop watchers so they match the configured remotes.
pub(super) fn reconcile_connections(st: &mut AgentState, tasks: &mut Tasks) {
    let opts = st.opts.clone();
    let mut desired: BTreeMap<ClusterName, ClusterSource> = BTreeMap::new();
    if !opts.kvstoremesh {
        for (n, r) in &st.remote_entries {
            desired.insert(
                n.clone(),
                cluster::source_from_entry(r, opts.tls_dir.as_deref()),
            );
        }
        for (n, s) in &st.dir_sources {
            desired.insert(n.clone(), s.clone());
        }
    }
    desired.remove(&opts.cluster);
    let running: Vec<ClusterName> = tasks
        .watchers
        .keys()
        .filter(|n| **n != opts.cluster)
        .cloned()
        .collect();
    for n in running {
        if !desired.contains_key(&n) {
            if let Some((_, h)) = tasks.watchers.remove(&n) {
                h.abort();
            }
            tracing::info!(cluster = %n, "remote cluster removed");
            st.index.remove_cluster(&n);
            st.nodes.drop_cluster(&n);
            st.clusters.remove(&n);
            lock_registry(&tasks.registry).accepted.remove(&n);
        }
    }
    // Remotes are validated against the local cluster's config: connect them once it is read.
    if lock_registry(&tasks.registry).local_mcc.is_none() {
        return;
    }
    for (n, src) in desired {
        let same = tasks.watchers.get(&n).is_some_and(|(s, _)| *s == src);
        if same {
            continue;
        }
        tracing::info!(cluster = %n, endpoints = ?src.endpoints, "connecting to remote cluster");
        if !st.clusters.contains_key(&n) {
            // Not trusted until its initial sync is done.
            let mut status = ClusterStatus::new(None, Instant::now());
            status.excluded = true;
            st.clusters.insert(n.clone(), status);
            st.index.set_stale(&n, true);
        }
        if let Some(status) = st.clusters.get_mut(&n) {
            status.source = Some(Arc::new(src.clone()));
        }
        lock_registry(&tasks.registry).accepted.remove(&n);
        let known = st
            .clusters
            .get(&n)
            .map(|c| c.keys.clone())
            .unwrap_or_default();
        spawn_watcher(tasks, src, &opts, known);
    }
}

fn lock_registry(r: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}
