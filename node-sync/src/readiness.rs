//! Readiness: one state for "do the maps follow the index yet", and the pure rule that moves it.
//!
//! Nothing is written to the maps until every cluster finished its initial sync (list and
//! canaries), or the sync timeout passed; then one full reconcile brings the pinned maps to the
//! desired state and the node is ready. A reconcile at the timeout without some clusters' sync is
//! `Degraded`: the maps serve what is known; without the local cluster's sync, services the maps
//! hold and the index lacks are kept (never flushed) until it syncs, and then swept. The map writer
//! asks [`Readiness::plan`] what to do before its writes and takes [`Readiness::after`] as the
//! new state once that is done; `/readyz`, `/metrics` and the status read the state from the
//! agent's snapshot.

use std::fmt;

use mesh_model::ClusterName;
use serde::Serialize;

/// Where the node stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Readiness {
    /// The agent has not registered its clusters yet.
    Starting,
    /// Waiting for the initial sync of these clusters (nothing written to the maps yet).
    Syncing {
        /// Clusters whose initial sync is not done (refused ones are not waited for).
        waiting: Vec<ClusterName>,
    },
    /// The initial reconcile is done and every cluster synced: the maps follow the index.
    Ready,
    /// Ready (the maps follow the index), but the initial reconcile ran at the sync timeout
    /// without these clusters' initial sync.
    Degraded {
        /// Clusters still not synced (the local one among them while `sweep_pending`).
        unsynced: Vec<ClusterName>,
        /// The local cluster was not synced at the reconcile: services the maps hold and the
        /// index lacks are kept until it is, then swept.
        sweep_pending: bool,
    },
}

/// What the clusters' initial syncs look like now (built by the agent from its clusters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncView {
    /// Clusters whose initial sync is not done and whose config was not refused.
    pub unsynced: Vec<ClusterName>,
    /// The local cluster finished its initial sync.
    pub local_synced: bool,
    /// The sync timeout has passed since the start.
    pub timed_out: bool,
}

/// What the map writer does before its incremental writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Write nothing yet.
    Wait,
    /// Read the maps back and reconcile them with the index; `delete_unknown`: also delete the
    /// services the index lacks (only when the local cluster synced).
    InitialReconcile {
        /// See above.
        delete_unknown: bool,
    },
    /// The local cluster synced after a degraded start: reconcile everything, deleting what the
    /// index lacks.
    LocalSweep,
    /// Write the frontends that changed.
    Incremental,
}

impl Readiness {
    /// Whether the maps follow the index (`/readyz` answers 200).
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready | Readiness::Degraded { .. })
    }

    /// Whether services the index lacks are kept in the maps until the local cluster syncs.
    pub fn sweep_pending(&self) -> bool {
        matches!(
            self,
            Readiness::Degraded {
                sweep_pending: true,
                ..
            }
        )
    }

    /// The state's name (`starting`, `syncing`, `ready`, `degraded`).
    pub fn name(&self) -> &'static str {
        match self {
            Readiness::Starting => "starting",
            Readiness::Syncing { .. } => "syncing",
            Readiness::Ready => "ready",
            Readiness::Degraded { .. } => "degraded",
        }
    }

    /// What to do given `view`.
    pub fn plan(&self, view: &SyncView) -> Plan {
        match self {
            Readiness::Starting | Readiness::Syncing { .. } => {
                let all = view.unsynced.is_empty() && view.local_synced;
                if all || view.timed_out {
                    Plan::InitialReconcile {
                        delete_unknown: view.local_synced,
                    }
                } else {
                    Plan::Wait
                }
            }
            Readiness::Degraded {
                sweep_pending: true,
                ..
            } if view.local_synced => Plan::LocalSweep,
            Readiness::Ready | Readiness::Degraded { .. } => Plan::Incremental,
        }
    }

    /// The state once `done` (what [`Readiness::plan`] asked for) was carried out.
    pub fn after(&self, view: &SyncView, done: Plan) -> Readiness {
        let settle = |sweep_pending: bool| {
            if !sweep_pending && view.unsynced.is_empty() {
                Readiness::Ready
            } else {
                Readiness::Degraded {
                    unsynced: view.unsynced.clone(),
                    sweep_pending,
                }
            }
        };
        match (self, done) {
            (_, Plan::Wait) => Readiness::Syncing {
                waiting: view.unsynced.clone(),
            },
            (_, Plan::InitialReconcile { delete_unknown }) => settle(!delete_unknown),
            (_, Plan::LocalSweep) => settle(false),
            (Readiness::Degraded { sweep_pending, .. }, Plan::Incremental) => {
                settle(*sweep_pending)
            }
            (other, Plan::Incremental) => other.clone(),
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |v: &[ClusterName]| {
            v.iter()
                .map(ClusterName::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Readiness::Starting => write!(f, "starting"),
            Readiness::Syncing { waiting } => {
                write!(f, "waiting for the initial sync of {}", names(waiting))
            }
            Readiness::Ready => write!(f, "ready"),
            Readiness::Degraded {
                unsynced,
                sweep_pending,
            } => {
                write!(
                    f,
                    "ready, degraded: reconciled at the sync timeout without the initial sync of {}",
                    names(unsynced)
                )?;
                if *sweep_pending {
                    write!(
                        f,
                        "; services the maps hold and the index lacks are kept until the local cluster syncs"
                    )?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    fn view(unsynced: &[&str], local_synced: bool, timed_out: bool) -> SyncView {
        SyncView {
            unsynced: unsynced.iter().map(|n| c(n)).collect(),
            local_synced,
            timed_out,
        }
    }

    /// Runs `plan` then `after`, as the map writer does.
    fn step(r: &Readiness, v: &SyncView) -> (Plan, Readiness) {
        let p = r.plan(v);
        (p, r.after(v, p))
    }

    #[test]
    fn nothing_is_written_while_a_cluster_syncs() {
        let (p, r) = step(&Readiness::Starting, &view(&["c1", "c2"], false, false));
        assert_eq!(p, Plan::Wait);
        assert_eq!(
            r,
            Readiness::Syncing {
                waiting: vec![c("c1"), c("c2")]
            }
        );
        assert!(!r.is_ready());
        assert_eq!(
            r.to_string(),
            "waiting for the initial sync of c1, c2",
            "what /readyz says"
        );
        // The local one synced, a remote still not: still waiting.
        let (p, r) = step(&r, &view(&["c2"], true, false));
        assert_eq!(p, Plan::Wait);
        assert_eq!(
            r,
            Readiness::Syncing {
                waiting: vec![c("c2")]
            }
        );
    }

    #[test]
    fn every_cluster_synced_reconciles_once_and_is_ready() {
        let r = Readiness::Syncing {
            waiting: vec![c("c2")],
        };
        let (p, r) = step(&r, &view(&[], true, false));
        assert_eq!(
            p,
            Plan::InitialReconcile {
                delete_unknown: true
            }
        );
        assert_eq!(r, Readiness::Ready);
        assert!(r.is_ready());
        // From then on: incremental writes, ready whatever a new remote does.
        let (p, r) = step(&r, &view(&["c3"], true, false));
        assert_eq!((p, r), (Plan::Incremental, Readiness::Ready));
    }

    #[test]
    fn a_timeout_without_a_remote_is_degraded_until_it_syncs() {
        let r = Readiness::Syncing {
            waiting: vec![c("c2")],
        };
        let (p, r) = step(&r, &view(&["c2"], true, true));
        assert_eq!(
            p,
            Plan::InitialReconcile {
                delete_unknown: true
            }
        );
        assert_eq!(
            r,
            Readiness::Degraded {
                unsynced: vec![c("c2")],
                sweep_pending: false
            }
        );
        assert!(r.is_ready(), "/readyz answers 200 when degraded");
        let (p, r) = step(&r, &view(&[], true, true));
        assert_eq!((p, r), (Plan::Incremental, Readiness::Ready));
    }

    #[test]
    fn a_timeout_without_the_local_cluster_keeps_unknown_services_then_sweeps() {
        let (p, r) = step(&Readiness::Starting, &view(&["c1"], false, true));
        assert_eq!(
            p,
            Plan::InitialReconcile {
                delete_unknown: false
            },
            "nothing deleted while the local cluster is unknown"
        );
        assert!(r.sweep_pending());
        assert!(r.to_string().contains("kept until the local cluster syncs"));
        // Later batches before the local sync: incremental, still pending.
        let (p, r) = step(&r, &view(&["c1"], false, true));
        assert_eq!(p, Plan::Incremental);
        assert!(r.sweep_pending());
        // The local cluster synced: one sweep, then ready.
        let (p, r) = step(&r, &view(&[], true, true));
        assert_eq!((p, r), (Plan::LocalSweep, Readiness::Ready));
    }

    #[test]
    fn a_refused_cluster_is_not_waited_for() {
        // The agent leaves refused clusters out of `unsynced`.
        let (p, r) = step(&Readiness::Starting, &view(&[], true, false));
        assert_eq!(
            p,
            Plan::InitialReconcile {
                delete_unknown: true
            }
        );
        assert_eq!(r, Readiness::Ready);
    }
}
