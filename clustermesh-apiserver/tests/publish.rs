//! The apiserver binary against a real etcd: what a manifest directory publishes, diffs, restarts, crashes,
//! bad input and leader failover.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn opts(etcd: &Etcd, dir: &Path, logs: &Path, replica: &str) -> ApiserverOpts {
    ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: etcd.url(),
        manifest_dir: dir.to_path_buf(),
        replica: replica.into(),
        extra: vec![],
        log_dir: logs.to_path_buf(),
    }
}

/// Web (global, 100 endpoints = 2 chunks), api (global via Cilium annotation, 3 endpoints), internal (not
/// global), a namespace, two pods with the same labels and a node.
fn base_manifests(dir: &Path) {
    let mut svc = global_service_yaml("shop", "web", "10.96.0.10");
    svc.push_str(&service_yaml(
        "shop",
        "api",
        "10.96.0.11",
        &[("service.cilium.io/global", "true")],
    ));
    svc.push_str(&service_yaml("shop", "internal", "10.96.0.12", &[]));
    std::fs::write(dir.join("services.yaml"), svc).unwrap();
    let mut eps = slice_yaml("shop", "web-a", "web", &ips(1, 100), &[]);
    eps.push_str(&slice_yaml("shop", "api-a", "api", &ips(2, 3), &[]));
    eps.push_str(&slice_yaml(
        "shop",
        "internal-a",
        "internal",
        &ips(3, 2),
        &[],
    ));
    std::fs::write(dir.join("endpoints.yaml"), eps).unwrap();
    std::fs::write(
        dir.join("cluster.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    team: a\n---\n\
apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  labels:\n    app: web\nstatus:\n  phase: Running\n  podIP: 10.1.0.1\n---\n\
apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2\n  namespace: shop\n  labels:\n    app: web\nstatus:\n  phase: Running\n  podIP: 10.1.0.2\n---\n\
apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels:\n    topology.kubernetes.io/zone: z1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.1\n",
    )
    .unwrap();
}

async fn canaries(c: &mut etcd_client::Client) -> BTreeSet<String> {
    snapshot(c, "clustermesh/v1/synced/c1/")
        .await
        .into_keys()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_exactly_the_expected_keys_then_diffs_one_chunk_and_deletes_a_service() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    base_manifests(dir.path());
    let ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    ap.wait_ready_leader(T).await;
    let mut c = etcd.client().await;

    let keys: BTreeSet<String> = data_keys(&mut c, "c1").await.into_keys().collect();
    let ids: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("clustermesh/v1/identities/c1/"))
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "two pods with one label set share an identity: {keys:?}"
    );
    let expected: BTreeSet<String> = [
        "clustermesh/v1/cluster-config/c1",
        "clustermesh/v1/services/c1/shop/web",
        "clustermesh/v1/services/c1/shop/api",
        "clustermesh/v1/endpoints/c1/shop/web/0",
        "clustermesh/v1/endpoints/c1/shop/web/1",
        "clustermesh/v1/endpoints/c1/shop/api/0",
        "clustermesh/v1/ips/c1/10.1.0.1",
        "clustermesh/v1/ips/c1/10.1.0.2",
        "clustermesh/v1/nodes/c1/node-1",
        ids[0].as_str(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys, expected);
    assert_eq!(canaries(&mut c).await.len(), 6, "one canary per kind");
    assert!(
        snapshot(&mut c, "clustermesh/v1/heartbeat/c1")
            .await
            .contains_key("clustermesh/v1/heartbeat/c1")
    );

    // One endpoint of web turns not ready: exactly one chunk key is rewritten.
    let before = data_keys(&mut c, "c1").await;
    let puts_before = ap
        .metric("clustermesh_apiserver_keys_written_total{op=\"put\"}")
        .await
        .unwrap();
    let mut eps = slice_yaml("shop", "web-a", "web", &ips(1, 100), &[70]);
    eps.push_str(&slice_yaml("shop", "api-a", "api", &ips(2, 3), &[]));
    eps.push_str(&slice_yaml(
        "shop",
        "internal-a",
        "internal",
        &ips(3, 2),
        &[],
    ));
    std::fs::write(dir.path().join("endpoints.yaml"), eps).unwrap();
    let after = eventually(T, "the endpoint change in etcd", || {
        let mut c = c.clone();
        let before = before.clone();
        async move {
            let now = data_keys(&mut c, "c1").await;
            (now != before).then_some(now)
        }
    })
    .await;
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k).map(|b| b.1) != Some(v.1))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].starts_with("clustermesh/v1/endpoints/c1/shop/web/"));
    let puts_after = ap
        .metric("clustermesh_apiserver_keys_written_total{op=\"put\"}")
        .await
        .unwrap();
    assert_eq!(puts_after - puts_before, 1.0, "exactly one put");

    // Deleting the Service removes every key it had.
    let svc = global_service_yaml("shop", "api", "10.96.0.11")
        + &service_yaml("shop", "internal", "10.96.0.12", &[]);
    std::fs::write(dir.path().join("services.yaml"), svc).unwrap();
    eventually(T, "web's keys to vanish", || {
        let mut c = c.clone();
        async move {
            let now = data_keys(&mut c, "c1").await;
            (!now.keys().any(|k| k.contains("/shop/web"))).then_some(())
        }
    })
    .await;
    let now = data_keys(&mut c, "c1").await;
    assert!(now.contains_key("clustermesh/v1/services/c1/shop/api"));
    assert!(now.contains_key("clustermesh/v1/endpoints/c1/shop/api/0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rewrites_nothing_and_deletes_nothing_before_sync() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    base_manifests(dir.path());
    let mut ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    ap.wait_ready_leader(T).await;
    let mut c = etcd.client().await;
    let before = data_keys(&mut c, "c1").await;
    let canaries_before = snapshot(&mut c, "clustermesh/v1/synced/c1/").await;
    ap.terminate();

    // Restart on the same directory: nothing rewritten.
    let ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r2"));
    ap.wait_ready_leader(T).await;
    assert_eq!(data_keys(&mut c, "c1").await, before, "revisions unchanged");
    assert_eq!(
        snapshot(&mut c, "clustermesh/v1/synced/c1/").await,
        canaries_before
    );
    assert_eq!(
        ap.metric("clustermesh_apiserver_keys_written_total{op=\"put\"}")
            .await,
        Some(0.0)
    );
    drop(ap);

    // Start on a directory that does not exist yet: the source never syncs, so nothing is deleted although
    // nothing is desired; once the directory appears, leftovers go.
    let later = dir.path().join("later");
    let ap = Apiserver::start(&opts(&etcd, &later, logs.path(), "r3"));
    let hb_before = snapshot(&mut c, "clustermesh/v1/heartbeat/c1").await;
    eventually(T, "the new leader's heartbeat", || {
        let mut c = c.clone();
        let hb_before = hb_before.clone();
        async move { (snapshot(&mut c, "clustermesh/v1/heartbeat/c1").await != hb_before).then_some(()) }
    })
    .await;
    let s = ap.status().await.unwrap();
    assert_eq!(s["role"], "leader");
    assert_eq!(s["ready"], false);
    assert!(s["sourceErrors"].to_string().contains("later"), "{s}");
    assert_eq!(
        data_keys(&mut c, "c1").await,
        before,
        "nothing deleted before sync"
    );
    std::fs::create_dir(&later).unwrap();
    std::fs::write(
        later.join("one.yaml"),
        global_service_yaml("shop", "api", "10.96.0.11"),
    )
    .unwrap();
    ap.wait_ready_leader(T).await;
    let keys: BTreeSet<String> = data_keys(&mut c, "c1").await.into_keys().collect();
    assert_eq!(
        keys,
        [
            "clustermesh/v1/cluster-config/c1",
            "clustermesh/v1/services/c1/shop/api"
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_initial_sync_leaves_no_canary() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // 3000 services x 10 endpoints: 6000 keys, many transactions.
    let mut text = String::new();
    for i in 0..3000u32 {
        let name = format!("s{i}");
        text.push_str(&global_service_yaml(
            "big",
            &name,
            &std::net::Ipv4Addr::from(0x0a60_0000 + i + 1).to_string(),
        ));
        text.push_str(&slice_yaml(
            "big",
            &format!("{name}-a"),
            &name,
            &ips(10 + i, 10),
            &[],
        ));
    }
    std::fs::write(dir.path().join("big.yaml"), text).unwrap();
    let mut c = etcd.client().await;
    let mut ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    let mut w = c
        .watch(
            "clustermesh/v1/services/c1/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(T, async {
        loop {
            match w.message().await {
                Ok(Some(m)) if !m.events().is_empty() => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    ap.kill9();
    assert_eq!(first, Ok(true), "no write seen");
    let partial = data_keys(&mut c, "c1").await.len();
    assert!(
        partial > 0 && partial < 6001,
        "killed mid-sync: {partial} keys"
    );
    assert!(
        canaries(&mut c).await.is_empty(),
        "no canary after a killed sync"
    );

    // The next start completes it.
    let ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r2"));
    ap.wait_ready_leader(Duration::from_secs(60)).await;
    assert_eq!(data_keys(&mut c, "c1").await.len(), 6001);
    assert_eq!(canaries(&mut c).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_and_skipped_while_the_rest_stays_published() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.yaml"),
        global_service_yaml("shop", "good", "10.96.0.1"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("later-broken.yaml"),
        global_service_yaml("shop", "kept", "10.96.0.2"),
    )
    .unwrap();
    let mut bad = service_yaml(
        "shop",
        "badann",
        "10.96.0.3",
        &[
            ("clustermesh.io/global", "true"),
            ("clustermesh.io/affinity", "sideways"),
        ],
    );
    bad.push_str(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: noports\n  namespace: shop\n  annotations:\n    clustermesh.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.4\n",
    );
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    ap.wait_ready_leader(T).await;
    let c = etcd.client().await;
    let services = || {
        let mut c = c.clone();
        async move {
            data_keys(&mut c, "c1")
                .await
                .into_keys()
                .filter(|k| k.starts_with("clustermesh/v1/services/"))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        services().await,
        [
            "clustermesh/v1/services/c1/shop/good",
            "clustermesh/v1/services/c1/shop/kept"
        ]
    );
    // Break a file that was good: its objects stay, the error names file and line.
    std::fs::write(
        dir.path().join("later-broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: kept\n  labels: [unclosed\n",
    )
    .unwrap();
    let s = eventually(T, "the broken file reported", || async {
        let s = ap.status().await?;
        s["sourceErrors"]
            .to_string()
            .contains("later-broken.yaml:")
            .then_some(s)
    })
    .await;
    let errs = s["sourceErrors"].as_object().unwrap();
    assert!(
        errs["Service shop/badann"]
            .as_str()
            .unwrap()
            .contains("clustermesh.io/affinity"),
        "{s}"
    );
    assert!(
        errs["Service shop/noports"]
            .as_str()
            .unwrap()
            .contains("no ports")
    );
    let file_err = errs
        .iter()
        .find(|(k, _)| k.ends_with("later-broken.yaml"))
        .unwrap()
        .1
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        file_err.contains("later-broken.yaml:6: column 1: invalid YAML"),
        "{file_err}"
    );
    assert_eq!(
        ap.metric("clustermesh_apiserver_source_errors ").await,
        Some(3.0)
    );
    assert!(
        ap.metric("clustermesh_apiserver_source_errors_total")
            .await
            .unwrap()
            >= 3.0
    );
    let log = ap.log_text();
    assert!(
        log.contains("badann") && log.contains("later-broken.yaml"),
        "{log}"
    );
    // The rest is still published, and a new object in a good file is picked up.
    std::fs::write(
        dir.path().join("good.yaml"),
        global_service_yaml("shop", "good", "10.96.0.1")
            + &global_service_yaml("shop", "new", "10.96.0.5"),
    )
    .unwrap();
    eventually(T, "the new service", || async {
        services()
            .await
            .contains(&"clustermesh/v1/services/c1/shop/new".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(services().await.len(), 3, "good, kept and new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_the_standby_takes_over_when_the_leader_dies() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    base_manifests(dir.path());
    let mut a = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "ra"));
    a.wait_ready_leader(T).await;
    let b = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "rb"));
    eventually(T, "b standing by", || async {
        let s = b.status().await?;
        (s["role"] == "standby").then_some(())
    })
    .await;
    let mut c = etcd.client().await;
    let before = data_keys(&mut c, "c1").await;
    assert_eq!(
        String::from_utf8_lossy(
            &snapshot(&mut c, "clustermesh/v1/leader/c1").await["clustermesh/v1/leader/c1"].0
        ),
        "ra"
    );

    a.kill9();
    let killed = Instant::now();
    b.wait_ready_leader(T).await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(8),
        "takeover took {takeover:?}"
    );
    assert_eq!(
        data_keys(&mut c, "c1").await,
        before,
        "the new leader rewrote nothing"
    );
    // And it publishes changes.
    std::fs::write(
        dir.path().join("more.yaml"),
        global_service_yaml("shop", "more", "10.96.0.99"),
    )
    .unwrap();
    eventually(T, "the new leader publishing", || {
        let mut c = c.clone();
        async move {
            data_keys(&mut c, "c1")
                .await
                .contains_key("clustermesh/v1/services/c1/shop/more")
                .then_some(())
        }
    })
    .await;
    eprintln!("takeover after leader kill: {takeover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_changed_by_someone_else_are_repaired() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    base_manifests(dir.path());
    let ap = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    ap.wait_ready_leader(T).await;
    let mut c = etcd.client().await;
    let good = data_keys(&mut c, "c1").await;
    // Delete a service, overwrite a chunk, add a stray key, delete a canary.
    c.delete("clustermesh/v1/services/c1/shop/web", None)
        .await
        .unwrap();
    c.put("clustermesh/v1/endpoints/c1/shop/api/0", "garbage", None)
        .await
        .unwrap();
    c.put("clustermesh/v1/services/c1/shop/stray", "{}", None)
        .await
        .unwrap();
    c.delete("clustermesh/v1/synced/c1/services", None)
        .await
        .unwrap();
    eventually(T, "the state repaired", || {
        let mut c = c.clone();
        let good = good.clone();
        async move {
            let now = data_keys(&mut c, "c1").await;
            let values = |m: &std::collections::BTreeMap<String, (Vec<u8>, i64)>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect::<Vec<_>>()
            };
            (values(&now) == values(&good) && canaries(&mut c).await.len() == 6).then_some(())
        }
    })
    .await;
    let log = ap.log_text();
    assert!(log.contains("changed outside the apiserver"), "{log}");
}

/// `clustermesh-apiserver ... > apiserver.log 2>&1`: plain log lines in a file carry no terminal colour
/// codes (journald, less and log shippers would show them as garbage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_logs_written_to_a_file_carry_no_colour_codes() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    base_manifests(dir.path());
    let mut a = Apiserver::start(&opts(&etcd, dir.path(), logs.path(), "r1"));
    a.wait_ready_leader(T).await;
    a.terminate();
    let text = a.log_text();
    let lines = text.lines().filter(|l| l.contains(" INFO ")).count();
    assert!(lines >= 3, "expected INFO lines, got:\n{text}");
    let escapes = text.bytes().filter(|&b| b == 0x1b).count();
    assert_eq!(escapes, 0, "escape bytes in a log file:\n{text:?}");
}
