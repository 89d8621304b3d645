//! The expiry of the certificates a component loads, as `/metrics` exports it and `clustermesh
//! status` warns about it: real certificates issued by the CA code, one cluster's leaves living 20
//! days (under the 30-day warning), another's a year.

mod common;

use common::*;
use mesh_certs::expiry;
use mesh_certs::{ClusterRequest, Role, Validity};
use mesh_model::{ClusterId, MaxConnectedClusters};

#[test]
fn every_loaded_certificate_is_reported_and_short_lived_ones_warn() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let long = issue(&ca, "east", 1, &tmp.path().join("east"));
    let short = ca
        .issue_cluster(&ClusterRequest {
            cluster: name("west"),
            id: ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
            out: tmp.path().join("west"),
            sans: vec![],
            validity: Validity {
                leaf: time::Duration::days(20),
                ..Validity::default()
            },
        })
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    let certs = expiry::in_dir(&long.path, &[Role::Node, Role::Remote]);
    let names: Vec<&str> = certs.iter().map(|c| c.certificate.as_str()).collect();
    assert_eq!(
        names.len(),
        4,
        "node, remote, the intermediate once, the root: {names:?}"
    );
    assert_eq!(&names[..3], ["node", "intermediate", "remote"]);
    assert!(names[3].starts_with("root-"), "{names:?}");
    let node = &certs[0];
    assert!((364..=365).contains(&node.days_left(now)), "{node:?}");
    assert!(expiry::warnings("node-sync", &certs, now).is_empty());

    let text = expiry::prometheus("node-sync", &certs);
    assert!(text.contains("# TYPE clustermesh_certificate_expiry_timestamp_seconds gauge"));
    assert!(text.contains(&format!(
        "clustermesh_certificate_expiry_timestamp_seconds{{component=\"node-sync\",certificate=\"node\"}} {}",
        node.not_after
    )));

    let west = expiry::in_dir(&short.path, &Role::LEAVES);
    assert_eq!(
        west.iter()
            .filter(|c| !c.certificate.starts_with("root-") && c.certificate != "intermediate")
            .count(),
        Role::LEAVES.len()
    );
    let w = expiry::warnings("clustermesh-apiserver", &west, now);
    assert_eq!(
        w.len(),
        Role::LEAVES.len(),
        "every 20-day leaf warns, nothing else: {w:?}"
    );
    assert!(
        w.iter()
            .any(|m| m.contains("certificate admin of clustermesh-apiserver")
                && (m.contains("expires in 19 days") || m.contains("expires in 20 days"))),
        "{w:?}"
    );
    // Expired: the message says so.
    let later = now + 21 * 86_400;
    assert!(
        expiry::warnings("x", &west, later)
            .iter()
            .filter(|m| m.contains("certificate admin"))
            .all(|m| m.contains("has expired"))
    );
    // A directory without certificates reports nothing (no error: the component reports its own).
    assert!(expiry::in_dir(tmp.path(), &Role::LEAVES).is_empty());
}
