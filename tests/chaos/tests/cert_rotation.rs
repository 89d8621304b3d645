//! Certificate rotation while traffic flows: cluster 1's node and remote client certificates are
//! re-issued in place (new keys, new serials, same identities), the way an operator or cert
//! manager rotates them. Then cluster 1's etcd is restarted, so every node-sync of cluster 1 must
//! open new TLS connections with the rotated files (and cluster 2's node-syncs reconnect to it).
//! No connect may fail; the control plane must come back and a change must reach every node's
//! maps within the settle budget afterwards.
//!
//! What this does not show: that the reconnects presented the new certificate rather than a copy
//! kept in memory (the old one is still valid, so both work). Rotation of the roots (CA rotate and
//! retire) and of the server certificates is not covered here.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chaos_tests::{ChaosMesh, Traffic, UpOptions, assert_no_failures, settle_budget};
use mesh_certs::Role;
use mesh_certs::ca::LeafOptions;

#[test]
fn rotated_client_certificates_are_used_on_reconnect() -> Result<()> {
    let mut m = ChaosMesh::up(UpOptions::new("cx-certrot", 2, 2))?;
    let budget = settle_budget();
    let dir = m
        .mesh()
        .lab()
        .cluster_certs(1)?
        .context("the lab runs plain etcd; the chaos tests need TLS")?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    for role in [Role::Node, Role::Remote] {
        let path = dir.cert(role);
        let before = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        dir.issue_leaf(role, &LeafOptions::default())
            .with_context(|| format!("re-issue the {role:?} certificate"))?;
        let after = std::fs::read(&path)?;
        ensure!(before != after, "{} did not change", path.display());
    }
    eprintln!("[chaos] cluster 1's node and remote certificates re-issued");
    // New keys: under per-cluster trust cluster 2 must sign a reader certificate for cluster 1's
    // new remote key before cluster 1's node-syncs can open cluster 2's etcd again; `connect`
    // again does that (idempotent for everything else).
    m.connect_all()?;
    // Force new handshakes with the rotated files.
    m.kill_etcd(1)?;
    std::thread::sleep(Duration::from_millis(500));
    m.start_etcd(1)?;
    let back = m.wait_control_plane(1, Duration::from_secs(20))?;
    eprintln!(
        "[chaos] after the rotation every node-sync reconnected {back:?} after etcd was healthy"
    );
    m.converge(budget)?;
    m.drain_and_restore(1, budget, "after rotation")?;
    assert_no_failures(&t.stop(), "certificate rotation")?;
    Ok(())
}
