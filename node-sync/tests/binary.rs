//! The `node-sync` binary against real etcd processes: flags, the status server's endpoints, the
//! node summary in etcd, and a clear error for bad flags.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_model::keys::MeshKey;
use mesh_model::values::{Affinity, MeshValue};
use support::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_status_and_writes_its_node_summary() {
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", Affinity::Local)],
        vec![chunk("c1", 0, vec![endpoint("127.0.0.1", 1, "other-node")])],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::Local)],
        vec![chunk("c2", 0, vec![endpoint("127.0.0.2", 8080, "m1")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .args([
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
        ])
        .args(["--etcd-endpoints", &e1.url()])
        .arg("--remote-config-dir")
        .arg(dir.path())
        .args(["--status-listen", &format!("127.0.0.1:{port}")])
        .args(["--fake-maps", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn node-sync");
    let _p = Proc(child);

    // Ready once both clusters synced.
    let t0 = std::time::Instant::now();
    loop {
        if let Some((200, _)) = http_get(port, "/readyz").await {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node-sync never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
    let (code, body) = http_get(port, "/api/v1/status").await.unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["ready"], true);
    let svc = &doc["services"][0];
    assert_eq!(svc["service"], "default/web");
    // The local backend (not probed by this node) is preferred.
    assert_eq!(svc["frontends"][0]["backends"][0], "127.0.0.1:1@c1");
    assert!(
        svc["frontends"][0]["why"]
            .as_str()
            .unwrap()
            .contains("preferred"),
        "{svc}"
    );
    let remotes: Vec<&str> = doc["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(remotes, ["c1", "c2"]);
    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    for needle in [
        "nodesync_remote_connected{cluster=\"c2\"} 1",
        "nodesync_remote_synced{cluster=\"c2\"} 1",
        "nodesync_service_backends{service=\"default/web\",frontend=\"10.96.0.10:80/TCP\",cluster=\"c1\"} 1",
        "nodesync_failovers_total 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // The node summary lands in the local etcd for `clustermesh status`.
    let key = MeshKey::NodeStatus {
        cluster: c("c1"),
        node: "n1".into(),
    };
    let mut client = e1.client().await;
    let t0 = std::time::Instant::now();
    let status = loop {
        let r = client.get(key.to_string(), None).await.unwrap();
        if let Some(kv) = r.kvs().first() {
            break MeshValue::decode(&key, kv.value()).unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "no {key} written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let MeshValue::NodeStatus(s) = status else {
        panic!("not a node status")
    };
    assert_eq!(s.remotes.len(), 1);
    assert!(s.remotes[0].connected && s.remotes[0].synced);
    assert_eq!(s.service_states.len(), 1);
    assert!(s.service_states[0].reason.contains("preferred"));
}

#[test]
fn bad_flags_are_refused_with_the_rule() {
    let out = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .args([
            "--cluster-name",
            "default",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
        ])
        .args(["--etcd-endpoints", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--cluster-name",
        "--cluster-id",
        "--node-name",
        "--etcd-endpoints",
        "--tls-dir",
        "--remote-config-dir",
        "--cgroup",
        "--bpffs",
        "--health-interval",
        "--health-failures",
        "--stale-grace",
        "--sync-timeout",
        "--kvstoremesh",
        "--status-listen",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(
        help.contains("CLUSTERMESH_STALE_GRACE"),
        "env fallbacks shown"
    );
}

/// `node-sync ... > node-sync.log 2>&1`, as a shell redirect or a systemd unit does: the file holds
/// plain text, no terminal colour codes (the user reads it with less, grep or journald).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_logs_written_to_a_file_carry_no_colour_codes() {
    let e1 = Etcd::start().await;
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    w1.publish_all(
        vec![spec("c1", Affinity::Local)],
        vec![chunk("c1", 0, vec![endpoint("127.0.0.1", 1, "other-node")])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node-sync.log");
    let f = std::fs::File::create(&log).unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_node-sync"))
        .args(["--cluster-name", "c1", "--cluster-id", "1"])
        .args(["--node-name", "n1", "--etcd-endpoints", &e1.url()])
        .args(["--status-listen", &format!("127.0.0.1:{port}")])
        .arg("--fake-maps")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("spawn node-sync");
    let mut p = Proc(child);
    let t0 = std::time::Instant::now();
    while !matches!(http_get(port, "/readyz").await, Some((200, _))) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node-sync never became ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = p.0.kill();
    let _ = p.0.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains(" INFO ")).count();
    assert!(lines >= 3, "expected start-up INFO lines, got:\n{text}");
    let escapes = text.bytes().filter(|&b| b == 0x1b).count();
    assert_eq!(escapes, 0, "escape bytes in a log file:\n{text:?}");
}
