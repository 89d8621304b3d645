//! The map writes after a batch: the initial reconcile once every cluster synced (or the sync
//! timeout passed), the full sweep once the local cluster synced after a degraded start, else the
//! frontends whose backends changed; then the failover records, timed to the map write. What to
//! do is [`Readiness::plan`]'s decision; this file carries it out on the task's own map writer.

use std::collections::HashMap;
use std::time::SystemTime;

use mesh_model::values::FailoverEvent;

use super::passive_events::spawn_destroy;
use super::state::AgentState;
use crate::lb::{MapError, MapWriter};
use crate::readiness::Plan;

/// After a batch of events (received at `received`) or a liveness tick: write what changed into
/// the maps, then record the moves of traffic between cluster groups, timed to the map write.
pub(super) fn after_batch(st: &mut AgentState, received: SystemTime) {
    let failed = st.index.take_newly_failed();
    if !failed.is_empty() && st.opts.destroy_sockets {
        spawn_destroy(st, failed, "backend failed");
    }
    let groups = st.index.take_group_changes();
    // Moves while the initial sync runs are not failovers: only a ready node records them.
    let was_ready = st.readiness.is_ready();
    write_changes(st);
    if !was_ready {
        return;
    }
    let written = time::OffsetDateTime::now_utc();
    let at = mesh_model::values::format_time(written);
    for g in groups {
        // How long the move took on this node, from its first signal to the map write: the
        // endpoint change received (a graceful drain), the failure of the last usable backend of
        // the clusters traffic left (a failover on probes), or the latest recovery in the clusters
        // it went to (a failback). A liveness move (a cluster stale by timer) has no such signal.
        use crate::index::MoveCause;
        use mesh_model::values::Verdict;
        let started = match g.cause {
            MoveCause::Endpoints => Some(time::OffsetDateTime::from(received)),
            MoveCause::Health => st
                .index
                .verdict_since(&g.service, &g.from, Verdict::Failing)
                .into_iter()
                .chain(st.index.verdict_since(&g.service, &g.to, Verdict::Healthy))
                .filter(|t| *t <= written)
                .max(),
            MoveCause::Liveness => None,
            // From the kernel's mark: the first connect that failed.
            MoveCause::Passive => st
                .passive
                .last_signal
                .map(time::OffsetDateTime::from)
                .or(Some(time::OffsetDateTime::from(received))),
            // From the first silent probe of the clusters traffic left, or the answer of the
            // clusters it went back to.
            MoveCause::Reachability => g
                .from
                .iter()
                .filter_map(|c| st.clusters.get(c).and_then(|c| c.unreachable_since))
                .min()
                .map(time::OffsetDateTime::from)
                .or(Some(time::OffsetDateTime::from(received))),
        };
        let duration_ms = started
            .map(|t| (written - t).whole_milliseconds())
            .filter(|ms| (0..60_000).contains(ms))
            .map(|ms| ms as u64);
        tracing::info!(service = %g.service, from = ?g.from, to = ?g.to, cause = g.cause.as_str(), ?duration_ms, "service traffic moved");
        let ev = FailoverEvent {
            service: g.service.to_string(),
            from: g.from.iter().map(|c| c.to_string()).collect(),
            to: g.to.iter().map(|c| c.to_string()).collect(),
            at: at.clone(),
            duration_ms,
            node: Some(st.opts.node.clone()),
            cause: Some(g.cause.as_str().to_owned()),
        };
        st.record_failover(ev);
    }
}

/// The map writes of a batch, as [`crate::readiness::Readiness::plan`] says.
fn write_changes(st: &mut AgentState) {
    let view = st.sync_view();
    let plan = st.readiness.plan(&view);
    match plan {
        Plan::Wait => {}
        Plan::InitialReconcile { delete_unknown } => {
            if view.timed_out && !view.unsynced.is_empty() {
                let waiting: Vec<String> = view.unsynced.iter().map(|n| n.to_string()).collect();
                tracing::warn!(
                    ?waiting,
                    "sync timeout: reconciling without these clusters' initial sync"
                );
            }
            let Some(mut r) = st.reconciler.take() else {
                return;
            };
            if !delete_unknown {
                tracing::warn!(
                    "sync timeout without the local cluster's sync: programming what is known, keeping the other services in the maps"
                );
            }
            let reloaded = r.reload();
            if let Err(e) = &reloaded {
                tracing::error!(error = %e, "reading the maps failed; retrying");
            } else {
                st.index.take_changes();
                let w = r.reconcile(st.index.desired().iter(), delete_unknown);
                st.map_writes.0 += w.upserts;
                st.map_writes.1 += w.deletes;
                tracing::info!(
                    services = st.index.desired().len(),
                    upserts = w.upserts,
                    deletes = w.deletes,
                    "initial reconcile done"
                );
            }
            st.reconciler = Some(r);
            if reloaded.is_err() {
                // Still syncing: the next batch or tick tries again.
                st.readiness = st.readiness.after(&view, Plan::Wait);
                return;
            }
        }
        Plan::LocalSweep => {
            if let Some(r) = st.reconciler.as_mut() {
                st.index.take_changes();
                let w = r.reconcile_all(st.index.desired().iter());
                st.map_writes.0 += w.upserts;
                st.map_writes.1 += w.deletes;
                tracing::info!(
                    upserts = w.upserts,
                    deletes = w.deletes,
                    "local cluster synced: full reconcile done"
                );
            }
        }
        Plan::Incremental => {
            if st.index.has_changes() {
                let changes = st.index.take_changes();
                if let Some(r) = st.reconciler.as_mut() {
                    for (fe, b) in changes {
                        let w = r.set(&fe, b);
                        st.map_writes.0 += w.upserts;
                        st.map_writes.1 += w.deletes;
                    }
                }
            }
        }
    }
    let next = st.readiness.after(&view, plan);
    if next != st.readiness {
        if next.is_ready() || matches!(st.readiness, crate::readiness::Readiness::Starting) {
            tracing::info!(readiness = %next, "readiness");
        }
        st.readiness = next;
    }
}

// ---- the task's map writer is a boxed one ---------------------------------------------------

impl MapWriter for Box<dyn MapWriter> {
    fn upsert_service(
        &mut self,
        frontend: &crate::lb::Frontend,
        backends: &[crate::lb::Backend],
    ) -> Result<(), MapError> {
        (**self).upsert_service(frontend, backends)
    }
    fn update_service(
        &mut self,
        frontend: &crate::lb::Frontend,
        old: &[crate::lb::Backend],
        new: &[crate::lb::Backend],
    ) -> Result<(), MapError> {
        (**self).update_service(frontend, old, new)
    }
    fn delete_service(&mut self, frontend: &crate::lb::Frontend) -> Result<(), MapError> {
        (**self).delete_service(frontend)
    }
    fn services(
        &mut self,
    ) -> Result<HashMap<crate::lb::Frontend, Vec<crate::lb::Backend>>, MapError> {
        (**self).services()
    }
    fn connect_outcome(&mut self, id: u32) -> Option<global_lb_bpf::signals::Outcomes> {
        (**self).connect_outcome(id)
    }
    fn backend_by_id(&mut self, id: u32) -> Option<crate::lb::Backend> {
        (**self).backend_by_id(id)
    }
    fn backend_ids(&mut self) -> Vec<(u32, crate::lb::Backend)> {
        (**self).backend_ids()
    }
    fn connections_to(&mut self, id: u32) -> Option<u64> {
        (**self).connections_to(id)
    }
    fn free_backends(&self) -> Option<usize> {
        (**self).free_backends()
    }
    fn clear_suspect(&mut self, id: u32) {
        (**self).clear_suspect(id)
    }
    fn sweep_suspects(&mut self) {
        (**self).sweep_suspects()
    }
}
