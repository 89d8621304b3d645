//! What the lab tests of the `clustermesh` command share.

use mesh_lab::mesh::{LabMesh, default_bin_dir, preflight};

/// Fail loudly, naming what is missing, when this machine cannot run the lab or the binaries the
/// lab runs were not built next to the tests.
pub fn require_lab() {
    let missing = preflight();
    assert!(
        missing.is_empty(),
        "this test needs the lab; missing: {missing:?}"
    );
    for b in ["clustermesh-apiserver", "node-sync", "clustermesh"] {
        assert!(
            default_bin_dir().join(b).is_file(),
            "{b} is not built next to the tests ({}): run `cargo build --bins` (nextest --workspace builds it)",
            default_bin_dir().display()
        );
    }
}

/// Cluster ids of the demo service's backends programmed in the pinned maps of node `n` of
/// cluster `c` (sorted, deduplicated): what that node's clients are sent to.
pub fn programmed_cluster_ids(mesh: &LabMesh, c: usize, n: usize) -> Vec<u16> {
    let node = mesh.lab().node(c, n).unwrap();
    let view = global_lb_bpf::Datapath::inspect(&node.bpffs).expect("pinned maps of the node");
    let vip = std::net::IpAddr::V4(mesh.vip(c));
    let mut ids: Vec<u16> = view
        .services()
        .unwrap()
        .into_iter()
        .filter(|s| s.frontend.addr == vip)
        .flat_map(|s| s.backends.into_iter().map(|b| b.cluster_id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
