//! KVStoreMesh: c1's apiserver mirrors c2's keys from c2's etcd into c1's etcd (cluster config marked cached,
//! canaries of its own), follows changes, allocates ClusterSetIP imports for c2's global services, and deletes
//! the mirror when the remote is removed.

mod common;

use std::time::Duration;

use common::*;
use mesh_model::keys::MeshKey;
use mesh_model::values::{MeshValue, RemoteCluster};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_a_remote_follows_it_imports_its_services_and_forgets_it() {
    let etcd_a = Etcd::start().await;
    let etcd_b = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir_a = tmp.path().join("a");
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    std::fs::write(
        dir_a.join("svc.yaml"),
        global_service_yaml("shop", "local", "10.96.0.1"),
    )
    .unwrap();
    std::fs::write(
        dir_b.join("svc.yaml"),
        global_service_yaml("shop", "web", "10.97.0.10")
            + &slice_yaml("shop", "web-a", "web", &ips(1, 3), &[]),
    )
    .unwrap();
    let c2 = Apiserver::start(&ApiserverOpts {
        cluster: "c2".into(),
        cluster_id: 2,
        etcd: etcd_b.url(),
        manifest_dir: dir_b.clone(),
        replica: "c2-r1".into(),
        extra: vec![],
        log_dir: tmp.path().to_path_buf(),
    });
    let c1 = Apiserver::start(&ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: etcd_a.url(),
        manifest_dir: dir_a.clone(),
        replica: "c1-r1".into(),
        extra: vec![
            "--kvstoremesh".into(),
            "--clusterset-cidr".into(),
            "10.250.0.0/24".into(),
            "--data-dir".into(),
            tmp.path().join("data").display().to_string(),
        ],
        log_dir: tmp.path().to_path_buf(),
    });
    c2.wait_ready_leader(T).await;
    c1.wait_ready_leader(T).await;

    // Register c2 as a remote of c1 (what `clustermesh connect` stores).
    let mut a = etcd_a.client().await;
    let key = MeshKey::Remote {
        cluster: ClusterName::new("c1").unwrap(),
        remote: ClusterName::new("c2").unwrap(),
    };
    let value = MeshValue::Remote(RemoteCluster {
        name: ClusterName::new("c2").unwrap(),
        id: ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
        endpoints: vec![etcd_b.url()],
        ca_bundle: String::new(),
        client_cert: String::new(),
    });
    a.put(key.to_string(), value.encode(), None).await.unwrap();

    let mut b = etcd_b.client().await;
    let theirs = data_keys(&mut b, "c2").await;
    let theirs_len = theirs.len();
    assert_eq!(
        theirs_len, 3,
        "c2 publishes its config, one service and one chunk"
    );
    let mirrored = eventually(T, "c2's keys in c1's etcd with canaries", || {
        let mut a = a.clone();
        async move {
            let ours = data_keys(&mut a, "c2").await;
            let canaries = snapshot(&mut a, "clustermesh/v1/synced/c2/").await;
            (ours.len() == theirs_len && canaries.len() == 6).then_some(ours)
        }
    })
    .await;
    assert_eq!(
        mirrored.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let cc = String::from_utf8_lossy(&mirrored["clustermesh/v1/cluster-config/c2"].0).into_owned();
    assert!(cc.contains("\"cached\":true"), "{cc}");
    assert_eq!(
        mirrored["clustermesh/v1/services/c2/shop/web"].0,
        theirs["clustermesh/v1/services/c2/shop/web"].0
    );
    // c2's heartbeat is passed through.
    assert!(
        snapshot(&mut a, "clustermesh/v1/heartbeat/c2")
            .await
            .contains_key("clustermesh/v1/heartbeat/c2")
    );
    // c2's global service has no Service in c1: an import with a ClusterSetIP from the CIDR.
    let import = eventually(T, "the import of shop/web", || {
        let mut a = a.clone();
        async move {
            snapshot(&mut a, "clustermesh/v1/imports/c1/shop/web")
                .await
                .remove("clustermesh/v1/imports/c1/shop/web")
        }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&import.0).contains("10.250.0."),
        "{:?}",
        import
    );

    // A change in c2 follows.
    std::fs::write(
        dir_b.join("svc.yaml"),
        global_service_yaml("shop", "web", "10.97.0.10")
            + &slice_yaml("shop", "web-a", "web", &ips(1, 3), &[1])
            + &global_service_yaml("shop", "api", "10.97.0.11"),
    )
    .unwrap();
    eventually(T, "c2's change mirrored", || {
        let mut a = a.clone();
        let mut b = b.clone();
        async move {
            let ours: Vec<(String, Vec<u8>)> = data_keys(&mut a, "c2")
                .await
                .into_iter()
                .filter(|(k, _)| !k.contains("cluster-config"))
                .map(|(k, v)| (k, v.0))
                .collect();
            let theirs: Vec<(String, Vec<u8>)> = data_keys(&mut b, "c2")
                .await
                .into_iter()
                .filter(|(k, _)| !k.contains("cluster-config"))
                .map(|(k, v)| (k, v.0))
                .collect();
            (ours == theirs && ours.iter().any(|(k, _)| k.ends_with("/shop/api"))).then_some(())
        }
    })
    .await;

    // Removing the remote deletes the mirror (and the imports that depended on it).
    a.delete(key.to_string(), None).await.unwrap();
    eventually(T, "c2's mirror gone", || {
        let mut a = a.clone();
        async move {
            let left = data_keys(&mut a, "c2").await.len()
                + snapshot(&mut a, "clustermesh/v1/synced/c2/").await.len()
                + snapshot(&mut a, "clustermesh/v1/imports/c1/").await.len();
            (left == 0).then_some(())
        }
    })
    .await;
    // c1's own state is untouched.
    assert!(
        data_keys(&mut a, "c1")
            .await
            .contains_key("clustermesh/v1/services/c1/shop/local")
    );
    drop(c1);
    drop(c2);
}

/// `value` (JSON) with its field `field` set to `to`.
fn with_field(value: &[u8], field: &str, to: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(value).unwrap();
    v[field] = serde_json::Value::String(to.into());
    serde_json::to_vec(&v).unwrap()
}

/// Garbage in a remote's etcd (a value that is not JSON, a chunk claiming another cluster, a key that
/// does not parse, a config with another id than registered) is refused by the mirror, logged with its
/// key and counted in /metrics; the remote's good keys are mirrored, and a good local copy stays when
/// the remote overwrites it with garbage. Keys of other clusters in the remote's etcd are not the
/// remote's to publish: ignored, not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_and_counts_garbage_of_a_remote_and_mirrors_the_rest() {
    let etcd_a = Etcd::start().await;
    let etcd_b = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir_a = tmp.path().join("a");
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    std::fs::write(
        dir_b.join("svc.yaml"),
        global_service_yaml("shop", "web", "10.97.0.10")
            + &slice_yaml("shop", "web-a", "web", &ips(1, 3), &[]),
    )
    .unwrap();
    // c2's apiserver publishes its state, then stops (else it would repair the garbage below).
    let mut c2 = Apiserver::start(&ApiserverOpts {
        cluster: "c2".into(),
        cluster_id: 2,
        etcd: etcd_b.url(),
        manifest_dir: dir_b.clone(),
        replica: "c2-r1".into(),
        extra: vec![],
        log_dir: tmp.path().to_path_buf(),
    });
    c2.wait_ready_leader(T).await;
    c2.terminate();
    let mut b = etcd_b.client().await;
    let good = data_keys(&mut b, "c2").await;
    assert_eq!(good.len(), 3, "config, one service and one chunk");
    let web = "clustermesh/v1/services/c2/shop/web";
    let chunk0 = "clustermesh/v1/endpoints/c2/shop/web/0";
    // A chunk under c2's key whose value claims cluster c3.
    let mut wrong_cluster: serde_json::Value = serde_json::from_slice(&good[chunk0].0).unwrap();
    wrong_cluster["cluster"] = "c3".into();
    wrong_cluster["chunk"] = 1.into();
    let garbage = [
        // Not JSON.
        ("clustermesh/v1/services/c2/shop/bad", b"{not json".to_vec()),
        (
            "clustermesh/v1/endpoints/c2/shop/web/1",
            serde_json::to_vec(&wrong_cluster).unwrap(),
        ),
        // A key under c2's services that does not parse (no service name).
        ("clustermesh/v1/services/c2/shop", good[web].0.clone()),
    ];
    for (k, v) in &garbage {
        b.put(*k, v.clone(), None).await.unwrap();
    }
    // A valid key of another cluster (a KVStoreMesh peer holds its peers' keys): not c2's to publish.
    let other = "clustermesh/v1/services/c3/shop/web";
    b.put(other, with_field(&good[web].0, "cluster", "c3"), None)
        .await
        .unwrap();

    let c1 = Apiserver::start(&ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: etcd_a.url(),
        manifest_dir: dir_a.clone(),
        replica: "c1-r1".into(),
        extra: vec![
            "--kvstoremesh".into(),
            "--data-dir".into(),
            tmp.path().join("data").display().to_string(),
        ],
        log_dir: tmp.path().to_path_buf(),
    });
    c1.wait_ready_leader(T).await;
    let mut a = etcd_a.client().await;
    let key = MeshKey::Remote {
        cluster: ClusterName::new("c1").unwrap(),
        remote: ClusterName::new("c2").unwrap(),
    };
    let value = MeshValue::Remote(RemoteCluster {
        name: ClusterName::new("c2").unwrap(),
        id: ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
        endpoints: vec![etcd_b.url()],
        ca_bundle: String::new(),
        client_cert: String::new(),
    });
    a.put(key.to_string(), value.encode(), None).await.unwrap();

    let bad_values = r#"clustermesh_apiserver_remote_bad_values_total{cluster="c2"}"#;
    eventually(T, "c2's good keys mirrored with canaries", || {
        let mut a = a.clone();
        async move {
            let canaries = snapshot(&mut a, "clustermesh/v1/synced/c2/").await;
            (canaries.len() == 6).then_some(())
        }
    })
    .await;
    let mirrored = data_keys(&mut a, "c2").await;
    assert_eq!(
        mirrored.keys().collect::<Vec<_>>(),
        good.keys().collect::<Vec<_>>(),
        "exactly c2's good keys are mirrored"
    );
    assert_eq!(mirrored[web].0, good[web].0);
    assert!(
        snapshot(&mut a, "clustermesh/v1/services/c3/")
            .await
            .is_empty()
    );
    assert_eq!(c1.metric(bad_values).await, Some(3.0));
    let log = c1.log_text();
    for (k, _) in &garbage {
        assert!(
            log.lines()
                .any(|l| l.contains("refused") && l.contains(&format!("key=\"{k}\""))),
            "no refusal naming {k} in:\n{log}"
        );
    }
    assert!(
        !log.contains(other),
        "{other} was not c2's to publish:\n{log}"
    );

    // While mirroring: c2 overwrites its good service with garbage and its config with another id,
    // then changes its chunk. The change is mirrored; the good copies stay.
    let cc = "clustermesh/v1/cluster-config/c2";
    let local_cc = mirrored[cc].0.clone();
    b.put(web, b"[]".to_vec(), None).await.unwrap();
    let mut other_id: serde_json::Value = serde_json::from_slice(&good[cc].0).unwrap();
    other_id["id"] = 3.into();
    b.put(cc, serde_json::to_vec(&other_id).unwrap(), None)
        .await
        .unwrap();
    let mut changed: serde_json::Value = serde_json::from_slice(&good[chunk0].0).unwrap();
    changed["endpoints"].as_array_mut().unwrap().pop();
    let changed = serde_json::to_vec(&changed).unwrap();
    b.put(chunk0, changed.clone(), None).await.unwrap();
    eventually(T, "c2's chunk change mirrored", || {
        let mut a = a.clone();
        let changed = changed.clone();
        async move {
            let now = snapshot(&mut a, chunk0).await;
            (now.get(chunk0).map(|v| &v.0) == Some(&changed)).then_some(())
        }
    })
    .await;
    let now = data_keys(&mut a, "c2").await;
    assert_eq!(now[web].0, good[web].0, "the good copy of {web} stays");
    assert_eq!(now[cc].0, local_cc, "the good copy of {cc} stays");
    assert_eq!(c1.metric(bad_values).await, Some(5.0));
    let log = c1.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused")
            && l.contains(&format!("key=\"{cc}\""))
            && l.contains("id 3")),
        "no refusal of the config's id in:\n{log}"
    );
    drop(c1);
}
