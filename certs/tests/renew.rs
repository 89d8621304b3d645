//! `ClusterDir::renew` (what `clustermesh ca renew` and the chart's CronJob run): a renewed leaf
//! keeps its key, identity and SANs, only its validity moves; leaves that are not due are left
//! alone; the key files are not touched and the certificate keeps its mode; a directory written
//! before the etcd root user's files were renamed (`root.crt`) is still read and renewed in place.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use mesh_certs::{CertInfo, ClusterRequest, LeafOptions, RenewWhen, Role, San, Validity};
use mesh_model::{ClusterId, MaxConnectedClusters};
use time::{Duration, OffsetDateTime};

fn leaf(path: &std::path::Path) -> CertInfo {
    CertInfo::from_pem_file(path).unwrap().remove(0)
}

#[test]
fn renewal_moves_validity_and_keeps_key_identity_sans_and_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let dir = ca
        .issue_cluster(&ClusterRequest {
            cluster: name("east"),
            id: ClusterId::new(1, MaxConnectedClusters::DEFAULT).unwrap(),
            out: tmp.path().join("east"),
            sans: vec![San::Dns("etcd.east.example".into())],
            validity: Validity {
                leaf: Duration::minutes(2),
                ..Validity::default()
            },
        })
        .unwrap();
    let server = dir.cert(Role::EtcdServer);
    std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = leaf(&server);
    let key_before = std::fs::read(dir.key(Role::EtcdServer)).unwrap();

    // Two-minute leaves, just issued: a third of their lifetime is 40 s, not due yet.
    let kept = dir.renew(RenewWhen::LastThird, None).unwrap();
    assert_eq!(kept.len(), Role::LEAVES.len(), "{kept:?}");
    assert!(kept.iter().all(|r| !r.renewed), "{kept:?}");
    let due = kept[0].due_at;
    assert!(
        (kept[0].not_after - due - Duration::seconds(40)).abs() < Duration::seconds(2),
        "due 40 s before the end: {kept:?}"
    );
    assert_eq!(leaf(&server).serial, before.serial, "nothing rewritten");

    // Due with 3 minutes' margin: all renewed, same key, same SANs and identity.
    let done = dir
        .renew(RenewWhen::Within(Duration::minutes(3)), None)
        .unwrap();
    assert!(done.iter().all(|r| r.renewed), "{done:?}");
    let after = leaf(&server);
    assert_ne!(after.serial, before.serial);
    assert_eq!(after.subject, before.subject);
    assert_eq!(after.spiffe_id, before.spiffe_id);
    assert_eq!(after.dns_names, before.dns_names);
    assert!(after.dns_names.iter().any(|d| d == "etcd.east.example"));
    assert_eq!(after.ip_addresses, before.ip_addresses);
    assert_eq!(
        after.not_after - after.not_before,
        before.not_after - before.not_before,
        "same lifetime"
    );
    assert!(after.not_after >= before.not_after);
    assert_eq!(
        std::fs::read(dir.key(Role::EtcdServer)).unwrap(),
        key_before
    );
    assert_eq!(
        std::fs::metadata(&server).unwrap().permissions().mode() & 0o777,
        0o640,
        "mode kept"
    );
    assert_eq!(
        std::fs::metadata(dir.key(Role::EtcdServer))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The renewed chain still loads as the role's TLS identity (leaf matches key).
    mesh_certs::tls::client_config(&dir.tls_files(Role::Node)).unwrap();
    mesh_certs::tls::server_config(
        &dir.tls_files(Role::EtcdServer),
        mesh_certs::tls::ClientAuth::Required,
    )
    .unwrap();

    // A lifetime override, capped by the intermediate.
    let done = dir
        .renew(RenewWhen::Now, Some(Duration::days(100_000)))
        .unwrap();
    let inter = leaf(&dir.cert(Role::Intermediate));
    assert!(
        done.iter().all(|r| r.not_after == inter.not_after),
        "{done:?}"
    );
}

#[test]
fn expired_leaves_are_renewed_and_the_old_root_file_name_is_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let dir = issue(&ca, "west", 2, &tmp.path().join("west"));
    assert!(dir.path.join("etcd-root.crt").exists());
    assert!(!dir.path.join("root.crt").exists());

    // A directory from before the rename: the etcd root user's files are root.{crt,key}.
    for ext in ["crt", "key"] {
        std::fs::rename(
            dir.path.join(format!("etcd-root.{ext}")),
            dir.path.join(format!("root.{ext}")),
        )
        .unwrap();
    }
    assert_eq!(dir.cert(Role::EtcdRoot), dir.path.join("root.crt"));

    // An expired node leaf.
    let now = OffsetDateTime::now_utc();
    dir.issue_leaf(
        Role::Node,
        &LeafOptions {
            not_before: Some(now - Duration::days(2)),
            not_after: Some(now - Duration::days(1)),
            ..LeafOptions::default()
        },
    )
    .unwrap();
    let done = dir.renew(RenewWhen::LastThird, None).unwrap();
    let node = done.iter().find(|r| r.role == Role::Node).unwrap();
    assert!(node.renewed && node.not_after > now, "{node:?}");
    let root = done.iter().find(|r| r.role == Role::EtcdRoot).unwrap();
    assert!(!root.renewed, "a fresh year-long leaf is not due");
    assert_eq!(root.cert, dir.path.join("root.crt"));
    let forced = dir.renew(RenewWhen::Now, None).unwrap();
    let root = forced.iter().find(|r| r.role == Role::EtcdRoot).unwrap();
    assert!(root.renewed);
    assert_eq!(root.cert, dir.path.join("root.crt"), "renewed where it was");
    assert_eq!(
        leaf(&dir.path.join("root.crt")).common_name.as_deref(),
        Some("root")
    );

    // Issuing the leaf anew writes the new name and removes the misleading old one.
    dir.issue_leaf(Role::EtcdRoot, &LeafOptions::default())
        .unwrap();
    assert!(dir.path.join("etcd-root.crt").exists());
    assert!(!dir.path.join("root.crt").exists() && !dir.path.join("root.key").exists());
}

#[test]
fn renewal_without_the_intermediate_key_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let dir = issue(&ca, "north", 3, &tmp.path().join("north"));
    let before = leaf(&dir.cert(Role::Node)).serial;
    std::fs::remove_file(dir.key(Role::Intermediate)).unwrap();
    let e = dir.renew(RenewWhen::Now, None).unwrap_err().to_string();
    assert!(e.contains("intermediate.key"), "{e}");
    assert_eq!(leaf(&dir.cert(Role::Node)).serial, before, "nothing lost");
}
