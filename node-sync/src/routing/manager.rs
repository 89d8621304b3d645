//! The route manager: brings the kernel's routes of node-sync's protocol id to what the remote nodes call for,
//! with the fewest changes, and keeps a status (routes, refusals, counters) for the status endpoint.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::netlink::{RouteError, RouteTable};
use super::plan::{DesiredRoute, Refusal, RemoteNode, diff_routes, plan_routes_via};
use super::vxlan::OverlayDevice;

/// The remote nodes as the agent knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSet {
    /// Every node of every connected remote cluster (the local cluster's own nodes are not in it).
    pub nodes: Vec<RemoteNode>,
    /// Every connected cluster finished its initial sync: routes not called for may be removed. Until then the
    /// manager only adds and replaces, so a restart withdraws nothing it is not sure of.
    pub complete: bool,
}

/// What the manager did last, for `/api/v1/status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingStatus {
    /// The routes node-sync wants and has: those whose add or move failed in the last sync are left out
    /// (counted in `errors_total`, the first in `last_error`) and retried at the next.
    pub routes: Vec<DesiredRoute>,
    /// The pod CIDRs refused, with the reason.
    pub refused: Vec<Refusal>,
    /// Refusals seen, each counted once when it appears (`nodesync_routing_refused_total`).
    pub refused_total: u64,
    /// Routes added, replaced and removed since start.
    pub changes_total: u64,
    /// Failed route operations since start (`nodesync_routing_errors_total`).
    pub errors_total: u64,
    /// The last failure, if the last sync had one.
    pub last_error: Option<String>,
    /// `--routing vxlan`'s device as the last sync made or found it (`None` for native, or when it could
    /// not be set up: see `last_error`).
    pub device: Option<OverlayDevice>,
}

/// Owns node-sync's routes in one table (see `RouteOwner`).
pub struct RouteManager<T> {
    table: T,
    status: RoutingStatus,
}

impl<T: RouteTable> RouteManager<T> {
    /// A manager over `table`; nothing is read or written until the first `sync`.
    pub fn new(table: T) -> Self {
        RouteManager {
            table,
            status: RoutingStatus::default(),
        }
    }

    /// The status after the last sync.
    pub fn status(&self) -> &RoutingStatus {
        &self.status
    }

    /// One reconcile: reads the table (our routes, and every other route's destination), plans, and applies
    /// the difference. Never touches a route without our protocol id. A failed operation is logged, counted
    /// and the rest still applied; the first failure is returned.
    pub async fn sync(&mut self, set: &NodeSet) -> Result<&RoutingStatus, RouteError> {
        let prepared = self.table.prepare().await;
        self.status.device = self.table.device();
        if let Err(e) = prepared {
            warn!(error = %e, "routing not ready: no route changed");
            self.status.errors_total += 1;
            self.status.last_error = Some(e.to_string());
            return Err(e);
        }
        let view = match self.table.read().await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "reading the route table failed: no route changed");
                self.status.errors_total += 1;
                self.status.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        let plan = plan_routes_via(&set.nodes, &view.foreign, self.table.gateway_family());
        let diff = diff_routes(&plan.routes, &view.ours, set.complete);

        let before: BTreeSet<&Refusal> = self.status.refused.iter().collect();
        let mut new_refusals = 0u64;
        for r in &plan.refused {
            if !before.contains(r) {
                new_refusals += 1;
                warn!(cidr = %r.cidr, cluster = %r.cluster, node = %r.node, reason = %r.reason, "pod CIDR refused: no route installed");
            }
        }

        let mut first_error = None;
        let mut changes = 0u64;
        let mut errors = 0u64;
        let mut note = |res: Result<(), RouteError>, first_error: &mut Option<RouteError>| match res
        {
            Ok(()) => {
                changes += 1;
                true
            }
            Err(e) => {
                errors += 1;
                warn!(error = %e, "route change failed");
                first_error.get_or_insert(e);
                false
            }
        };
        // Routes whose add or move failed: not reported as installed.
        let mut failed = BTreeSet::new();
        for r in &diff.replace {
            info!(dst = %r.dst, via = %r.gateway, cluster = %r.cluster, node = %r.node, "route moved");
            if !note(self.table.replace(r).await, &mut first_error) {
                failed.insert(r.dst);
            }
        }
        for r in &diff.add {
            info!(dst = %r.dst, via = %r.gateway, cluster = %r.cluster, node = %r.node, "route added");
            if !note(self.table.add(r).await, &mut first_error) {
                failed.insert(r.dst);
            }
        }
        for r in &diff.remove {
            // Whose it was, if this run made or found it wanted; a leftover from before a restart is named by
            // its destination and gateway only.
            let owner = self.status.routes.iter().find(|w| w.dst == r.dst);
            let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            match owner {
                Some(w) => {
                    info!(dst = %r.dst, via, cluster = %w.cluster, node = %w.node, "route removed")
                }
                None => info!(dst = %r.dst, via, "route removed (no node calls for it)"),
            }
            note(self.table.delete(r).await, &mut first_error);
        }
        match self.table.settle(&plan.routes, set.complete).await {
            Ok(n) => changes += n as u64,
            Err(e) => {
                errors += 1;
                warn!(error = %e, "clean-up after the route sync failed");
                first_error.get_or_insert(e);
            }
        }

        self.status.routes = plan
            .routes
            .into_iter()
            .filter(|r| !failed.contains(&r.dst))
            .collect();
        self.status.refused = plan.refused;
        self.status.refused_total += new_refusals;
        self.status.changes_total += changes;
        self.status.errors_total += errors;
        self.status.last_error = first_error.as_ref().map(|e| e.to_string());
        match first_error {
            Some(e) => Err(e),
            None => Ok(&self.status),
        }
    }

    /// Follows `nodes`: a sync at each change, and every `resync` (a route someone deleted comes back).
    /// Publishes the status after each sync; ends when `nodes`' sender is dropped.
    pub async fn run(
        mut self,
        mut nodes: watch::Receiver<NodeSet>,
        status: watch::Sender<RoutingStatus>,
        resync: Duration,
    ) {
        loop {
            let set = nodes.borrow_and_update().clone();
            if let Err(e) = self.sync(&set).await {
                warn!(error = %e, "route sync incomplete; retried at the next change or resync");
            }
            status.send_replace(self.status.clone());
            tokio::select! {
                changed = nodes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(resync) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ipnet::IpNet;
    use mesh_model::ClusterName;

    use super::super::netlink::TableView;
    use super::super::plan::InstalledRoute;
    use super::*;

    /// A table in memory that records every change and fails adds to the destinations in `fail`.
    #[derive(Default)]
    struct FakeTable {
        view: Mutex<TableView>,
        log: Mutex<Vec<String>>,
        fail: Vec<IpNet>,
    }

    impl RouteTable for &FakeTable {
        async fn read(&self) -> Result<TableView, RouteError> {
            Ok(self.view.lock().unwrap().clone())
        }
        async fn add(&self, r: &DesiredRoute) -> Result<(), RouteError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("add {} via {}", r.dst, r.gateway));
            if self.fail.contains(&r.dst) {
                return Err(RouteError::NotAvailable("refused by the fake"));
            }
            self.view.lock().unwrap().ours.push(InstalledRoute {
                dst: r.dst,
                gateway: Some(r.gateway),
            });
            Ok(())
        }
        async fn replace(&self, r: &DesiredRoute) -> Result<(), RouteError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("replace {} via {}", r.dst, r.gateway));
            let mut v = self.view.lock().unwrap();
            v.ours.retain(|o| o.dst != r.dst);
            v.ours.push(InstalledRoute {
                dst: r.dst,
                gateway: Some(r.gateway),
            });
            Ok(())
        }
        async fn delete(&self, r: &InstalledRoute) -> Result<(), RouteError> {
            self.log.lock().unwrap().push(format!("delete {}", r.dst));
            self.view.lock().unwrap().ours.retain(|o| o.dst != r.dst);
            Ok(())
        }
    }

    fn node(cluster: &str, name: &str, ip: &str, cidr: &str) -> RemoteNode {
        RemoteNode {
            cluster: ClusterName::new(cluster).unwrap(),
            name: name.into(),
            addresses: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn a_failed_add_is_counted_and_reported_and_the_other_routes_still_go_in() {
        let table = FakeTable {
            fail: vec!["10.2.1.0/24".parse().unwrap()],
            ..Default::default()
        };
        let mut m = RouteManager::new(&table);
        let set = NodeSet {
            nodes: vec![
                node("c2", "n1", "192.0.2.11", "10.2.1.0/24"),
                node("c2", "n2", "192.0.2.12", "10.2.2.0/24"),
            ],
            complete: true,
        };
        let e = m.sync(&set).await.unwrap_err();
        assert_eq!(e.to_string(), "refused by the fake");
        assert_eq!(m.status().errors_total, 1);
        assert_eq!(m.status().changes_total, 1);
        let installed: Vec<String> = m
            .status()
            .routes
            .iter()
            .map(|r| r.dst.to_string())
            .collect();
        assert_eq!(
            installed,
            ["10.2.2.0/24"],
            "the failed route is not reported as installed"
        );
        assert_eq!(
            m.status().last_error.as_deref(),
            Some("refused by the fake")
        );
        assert_eq!(
            *table.log.lock().unwrap(),
            [
                "add 10.2.1.0/24 via 192.0.2.11",
                "add 10.2.2.0/24 via 192.0.2.12"
            ]
        );
    }

    #[tokio::test]
    async fn before_every_cluster_is_synced_nothing_is_removed_then_the_leftovers_go() {
        let table = FakeTable::default();
        table.view.lock().unwrap().ours.push(InstalledRoute {
            dst: "10.3.0.0/24".parse().unwrap(),
            gateway: Some("192.0.2.30".parse().unwrap()),
        });
        let mut m = RouteManager::new(&table);
        let mut set = NodeSet {
            nodes: vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")],
            complete: false,
        };
        m.sync(&set).await.unwrap();
        assert_eq!(
            *table.log.lock().unwrap(),
            ["add 10.2.1.0/24 via 192.0.2.11"]
        );
        set.complete = true;
        m.sync(&set).await.unwrap();
        assert_eq!(
            table.log.lock().unwrap().last().unwrap(),
            "delete 10.3.0.0/24"
        );
        // A third sync of the same set changes nothing.
        let before = table.log.lock().unwrap().len();
        m.sync(&set).await.unwrap();
        assert_eq!(table.log.lock().unwrap().len(), before);
        assert_eq!(m.status().changes_total, 2);
    }

    #[tokio::test]
    async fn run_follows_the_node_set_and_publishes_the_status() {
        let table = Box::leak(Box::new(FakeTable::default()));
        let (nodes_tx, nodes_rx) = watch::channel(NodeSet::default());
        let (status_tx, mut status_rx) = watch::channel(RoutingStatus::default());
        let task = tokio::spawn(RouteManager::new(&*table).run(
            nodes_rx,
            status_tx,
            Duration::from_secs(60),
        ));
        status_rx.changed().await.unwrap();
        nodes_tx.send_replace(NodeSet {
            nodes: vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")],
            complete: true,
        });
        status_rx.changed().await.unwrap();
        assert_eq!(status_rx.borrow().routes.len(), 1);
        drop(nodes_tx);
        task.await.unwrap();
    }
}
