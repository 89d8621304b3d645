//! Least-privilege etcd users against a real etcd 3.4 with --client-cert-auth.

mod common;

use common::*;
use mesh_certs::Role;
use mesh_etcd::{self as etcd, EtcdAuthAdmin};

#[tokio::test]
async fn admin_node_and_remote_users_get_exactly_their_rights() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let west = issue(&ca, "west", 2, &tmp.path().join("west"));
    let etcd_east = start_etcd(&east, tmp.path()).await;
    let eps = etcd_east.endpoints();

    // Bootstrap twice: the second run must change nothing and not fail.
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .expect("bootstrap");
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .expect("bootstrap is idempotent");
    let mut admin_api = EtcdAuthAdmin::connect(&eps, &east.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    admin_api.add_remote_user(&west.info.name).await.unwrap();
    admin_api.add_remote_user(&west.info.name).await.unwrap();
    let users = admin_api.user_names().await.unwrap();
    for u in [
        "root",
        "admin-east",
        "node-east",
        "remote-east",
        "remote-west",
    ] {
        assert!(
            users.contains(&u.to_string()),
            "user {u} missing: {users:?}"
        );
    }

    // admin-east reads and writes anything.
    let mut admin = etcd::connect_as(&east, Role::Admin, &eps).await.unwrap();
    admin
        .put("clustermesh/v1/services/east/default/web", "{}", None)
        .await
        .expect("admin writes services");
    admin
        .put("other/key", "x", None)
        .await
        .expect("admin writes outside the mesh prefix");
    let got = admin
        .get("clustermesh/v1/services/east/default/web", None)
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1);

    // node-east writes only its health prefix, reads the mesh prefix.
    let mut node = etcd::connect_as(&east, Role::Node, &eps).await.unwrap();
    node.put("clustermesh/v1/health/east/node-1", "ok", None)
        .await
        .expect("node writes its health prefix");
    node.put("clustermesh/v1/nodestatus/east/node-1", "{}", None)
        .await
        .expect("node writes its node summary");
    assert!(
        node.put("clustermesh/v1/nodestatus/west/node-1", "{}", None)
            .await
            .is_err(),
        "node-east must not write another cluster's node summaries"
    );
    let lease = node
        .lease_grant(10, None)
        .await
        .expect("node grants a lease");
    node.put(
        "clustermesh/v1/health/east/node-2",
        "ok",
        Some(etcd_client::PutOptions::new().with_lease(lease.id())),
    )
    .await
    .expect("node writes health under a lease");
    let r = node
        .get(
            "clustermesh/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("node reads the mesh prefix");
    assert!(r.kvs().len() >= 3);
    for key in [
        "clustermesh/v1/health/west/node-1",
        "clustermesh/v1/services/east/default/web",
        "clustermesh/v1/heartbeat/east",
        "other/key",
    ] {
        let e = node.put(key, "x", None).await.expect_err(key);
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    let e = node
        .delete("clustermesh/v1/services/east/default/web", None)
        .await
        .expect_err("node deletes a service");
    assert!(e.to_string().contains("permission denied"), "{e}");

    // remote-west (west's node-syncs, presenting west's remote cert to east's etcd) reads, writes nothing.
    let mut remote = etcd::connect_as(&west, Role::Remote, &eps).await.unwrap();
    let r = remote
        .get(
            "clustermesh/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("remote reads the mesh prefix");
    assert!(r.kvs().len() >= 3);
    let mut stream = remote
        .watch(
            "clustermesh/v1/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("remote watches the mesh prefix");
    admin
        .put("clustermesh/v1/heartbeat/east", "now", None)
        .await
        .unwrap();
    let ev = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let msg = stream.message().await.expect("watch stream").expect("open");
            if let Some(ev) = msg.events().first() {
                break ev.kv().map(|kv| kv.key_str().unwrap().to_owned());
            }
        }
    })
    .await
    .expect("remote sees the admin's put");
    assert_eq!(ev.as_deref(), Some("clustermesh/v1/heartbeat/east"));
    for key in [
        "clustermesh/v1/services/east/default/web",
        "clustermesh/v1/health/west/node-1",
        "clustermesh/v1/health/east/node-1",
        "other/key",
    ] {
        let e = remote.put(key, "x", None).await.expect_err(key);
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    let e = remote
        .get("other/key", None)
        .await
        .expect_err("read outside prefix");
    assert!(e.to_string().contains("permission denied"), "{e}");
    let e = remote
        .delete(
            "clustermesh/v1/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect_err("remote deletes");
    assert!(e.to_string().contains("permission denied"), "{e}");

    // remote-east (east's own remote certificate, which `connect --context` hands to peers)
    // reads the mesh prefix on east's etcd and writes nothing.
    let mut own_remote = etcd::connect_as(&east, Role::Remote, &eps).await.unwrap();
    own_remote
        .get(
            "clustermesh/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("east's own remote certificate reads the mesh prefix");
    let e = own_remote
        .put("clustermesh/v1/services/east/default/web", "x", None)
        .await
        .expect_err("east's own remote certificate writes");
    assert!(e.to_string().contains("permission denied"), "{e}");

    // Disconnect: the remote user is gone and its certificate reads nothing any more.
    admin_api.remove_remote_user(&west.info.name).await.unwrap();
    admin_api.remove_remote_user(&west.info.name).await.unwrap();
    let e = remote
        .get(
            "clustermesh/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect_err("removed remote user reads");
    let msg = e.to_string();
    assert!(
        msg.contains("permission denied") || msg.contains("user name not found"),
        "{msg}"
    );
}
