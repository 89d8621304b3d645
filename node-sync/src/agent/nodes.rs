//! The remote clusters' nodes, for `--routing` (issue 20): kept apart from the merge index (nodes select no
//! backend), keyed by cluster and node, and handed to the route manager as a [`NodeSet`] on a watch channel
//! after each batch that changed them (or changed whether every cluster finished its initial sync).

use std::collections::BTreeMap;

use mesh_model::ClusterName;
use mesh_model::values::NodeInfo;
use tokio::sync::watch;

use crate::routing::{NodeSet, RemoteNode};

/// The nodes of every cluster but the local one, as the watchers delivered them.
pub(super) struct RemoteNodes {
    local: ClusterName,
    nodes: BTreeMap<(ClusterName, String), NodeInfo>,
    /// Changed since the last send.
    dirty: bool,
    /// `complete` of the last send.
    sent_complete: bool,
    tx: watch::Sender<NodeSet>,
}

impl RemoteNodes {
    /// None yet; `NodeSet::default()` (empty, not complete) on the channel.
    pub fn new(local: ClusterName) -> Self {
        Self {
            local,
            nodes: BTreeMap::new(),
            dirty: false,
            sent_complete: false,
            tx: watch::channel(NodeSet::default()).0,
        }
    }

    /// A receiver of the node sets; it sees the channel closed when the agent's task ends.
    pub fn subscribe(&self) -> watch::Receiver<NodeSet> {
        self.tx.subscribe()
    }

    /// A node was put (by the cluster of its key; in KVStoreMesh mode that is not the connection's).
    pub fn put(&mut self, cluster: &ClusterName, node: &str, info: NodeInfo) {
        if *cluster == self.local {
            return;
        }
        let key = (cluster.clone(), node.to_owned());
        if self.nodes.get(&key) != Some(&info) {
            self.nodes.insert(key, info);
            self.dirty = true;
        }
    }

    /// A node was deleted.
    pub fn delete(&mut self, cluster: &ClusterName, node: &str) {
        if self
            .nodes
            .remove(&(cluster.clone(), node.to_owned()))
            .is_some()
        {
            self.dirty = true;
        }
    }

    /// A cluster left the mesh: its nodes go.
    pub fn drop_cluster(&mut self, cluster: &ClusterName) {
        let before = self.nodes.len();
        self.nodes.retain(|(c, _), _| c != cluster);
        if self.nodes.len() != before {
            tracing::info!(cluster = %cluster, nodes = before - self.nodes.len(), "remote cluster removed: its nodes are forgotten");
            self.dirty = true;
        }
    }

    /// Sends the set if it changed since the last send, or `complete` did.
    pub fn send(&mut self, complete: bool) {
        if !self.dirty && complete == self.sent_complete {
            return;
        }
        self.dirty = false;
        self.sent_complete = complete;
        let set = NodeSet {
            nodes: self.nodes.values().map(remote_node).collect(),
            complete,
        };
        self.tx.send_if_modified(|cur| {
            if *cur != set {
                *cur = set;
                true
            } else {
                false
            }
        });
    }
}

/// What the route manager needs of a node: its addresses, InternalIP first, then ExternalIP, then any other
/// kind (the first of a pod CIDR's family is its gateway), and its pod CIDRs.
fn remote_node(n: &NodeInfo) -> RemoteNode {
    let rank = |kind: &str| match kind {
        "InternalIP" => 0,
        "ExternalIP" => 1,
        _ => 2,
    };
    let mut addrs: Vec<_> = n.addresses.iter().collect();
    addrs.sort_by_key(|a| rank(&a.kind));
    RemoteNode {
        cluster: n.cluster.clone(),
        name: n.name.clone(),
        addresses: addrs.into_iter().map(|a| a.ip).collect(),
        pod_cidrs: n.pod_cidrs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use mesh_model::values::NodeAddress;

    use super::*;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    fn info(cluster: &str, name: &str, cidr: &str) -> NodeInfo {
        NodeInfo {
            cluster: c(cluster),
            name: name.into(),
            addresses: vec![
                NodeAddress {
                    kind: "ExternalIP".into(),
                    ip: "203.0.113.1".parse().unwrap(),
                },
                NodeAddress {
                    kind: "InternalIP".into(),
                    ip: "192.0.2.11".parse().unwrap(),
                },
            ],
            zone: None,
            region: None,
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    #[test]
    fn a_set_is_sent_only_after_a_change_and_the_local_cluster_is_left_out() {
        let mut n = RemoteNodes::new(c("c1"));
        let mut rx = n.subscribe();
        n.put(&c("c1"), "own", info("c1", "own", "10.1.1.0/24"));
        n.send(false);
        assert!(
            !rx.has_changed().unwrap(),
            "the local cluster's node is no change"
        );
        n.put(&c("c2"), "n1", info("c2", "n1", "10.2.1.0/24"));
        n.send(false);
        assert!(rx.has_changed().unwrap());
        let set = rx.borrow_and_update().clone();
        assert!(!set.complete);
        assert_eq!(set.nodes.len(), 1);
        assert_eq!(
            set.nodes[0].addresses[0].to_string(),
            "192.0.2.11",
            "InternalIP first"
        );
        // The same value again: nothing sent.
        n.put(&c("c2"), "n1", info("c2", "n1", "10.2.1.0/24"));
        n.send(false);
        assert!(!rx.has_changed().unwrap());
        // Every cluster synced: sent, although the nodes did not change.
        n.send(true);
        assert!(rx.borrow_and_update().complete);
        n.put(&c("c3"), "m1", info("c3", "m1", "10.3.1.0/24"));
        n.delete(&c("c2"), "n1");
        n.send(true);
        let set = rx.borrow_and_update().clone();
        assert_eq!(set.nodes.len(), 1);
        assert_eq!(set.nodes[0].cluster, c("c3"));
        n.drop_cluster(&c("c3"));
        n.send(true);
        assert!(rx.borrow_and_update().nodes.is_empty());
    }
}
