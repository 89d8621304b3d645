//! End to end on the lab (root, real etcd, apiservers, node-syncs, eBPF, backends): `clustermesh connect`
//! (a refused preflight first), `status`, `drill`, the status page in headless Chromium, `disconnect`.
//! Every command is the real binary; the test checks what each printed.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_lab::mesh::{LabMesh, LabMeshSpec, Routing, default_bin_dir};

fn clustermesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clustermesh"))
}

fn run(mut c: Command) -> (Output, String) {
    let out = c.output().expect("run clustermesh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn connect_cmd(mesh: &LabMesh, a: usize, b: usize) -> Command {
    let mut c = clustermesh();
    c.arg("connect")
        .arg(mesh.apiserver_grpc(a).to_string())
        .arg(mesh.apiserver_grpc(b).to_string())
        .arg("--tls-dir")
        .arg(mesh.cert_dir(a).unwrap())
        .arg("--destination-tls-dir")
        .arg(mesh.cert_dir(b).unwrap());
    c
}

fn wait_apiservers(mesh: &LabMesh, clusters: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for &c in clusters {
        loop {
            let mut cmd = clustermesh();
            cmd.args([
                "status",
                "--server",
                &mesh.apiserver_grpc(c).to_string(),
                "--tls-dir",
            ])
            .arg(mesh.cert_dir(c).unwrap());
            let (out, text) = run(cmd);
            if out.status.code() == Some(0) || out.status.code() == Some(2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "apiserver of c{c} never answered: {text}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn chromium() -> PathBuf {
    let p = PathBuf::from("/usr/bin/chromium");
    assert!(
        p.is_file(),
        "the status page test needs Debian's chromium (scripts/setup.sh installs it)"
    );
    p
}

/// Load `url` in headless Chromium: the DOM after scripts ran, the console lines, and a screenshot.
fn load_page(url: &str, screenshot: &Path, size: (u32, u32)) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let common = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={},{}", size.0, size.1));
    };
    let mut dom = Command::new(chromium());
    common(&mut dom);
    dom.arg("--dump-dom").arg(url);
    let out = dom.output().expect("run chromium");
    let html = String::from_utf8_lossy(&out.stdout).into_owned();
    let console: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("CONSOLE"))
        .map(str::to_owned)
        .collect();
    let mut shot = Command::new(chromium());
    common(&mut shot);
    shot.arg(format!("--screenshot={}", screenshot.display()))
        .arg(url);
    let out = shot.output().expect("run chromium for a screenshot");
    assert!(
        screenshot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (html, console)
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn connect_status_drill_page_disconnect() {
    support::require_lab();
    // Backends as pods behind their nodes, reached across clusters through node-sync's routes.
    let mut spec = LabMeshSpec::new("e2ecli", 3, 2).with_pods(Routing::Native);
    spec.bin_dir = default_bin_dir();
    // c3 is installed with c1's id by mistake: connect must refuse it before changing anything.
    spec.cluster_ids.insert(3, 1);
    let mut mesh = LabMesh::up(spec).expect("lab mesh up");
    wait_apiservers(&mesh, &[1, 2, 3]);

    // 1. A failed preflight: duplicate cluster id, clear message, non-zero exit, nothing registered.
    let (out, text) = run(connect_cmd(&mesh, 1, 3));
    assert!(!out.status.success(), "connect c1 c3 must fail:\n{text}");
    assert!(
        text.contains("✘ cluster ids: c1 and c3 both have cluster id 1"),
        "{text}"
    );
    assert!(
        text.contains("preflight failed; nothing was changed"),
        "{text}"
    );

    // 2. connect c1 c2 --wait: every check passes, both registrations, every node synced.
    let mut c = connect_cmd(&mesh, 1, 2);
    c.arg("--wait");
    let (out, text) = run(c);
    assert!(out.status.success(), "connect c1 c2:\n{text}");
    for needle in [
        "✔ cluster ids",
        "✔ trust: shared root",
        "✔ c2 registered at c1",
        "✔ c1 registered at c2",
        "✔ c1: 2/2 nodes connected to c2, 2/2 synced",
    ] {
        assert!(
            text.contains(needle),
            "connect output lacks {needle:?}:\n{text}"
        );
    }
    // Running it twice changes nothing.
    let (out, text) = run(connect_cmd(&mesh, 1, 2));
    assert!(
        out.status.success() && text.contains("(already, unchanged)"),
        "{text}"
    );

    // 3. status: healthy, in Cilium's words and more.
    let mut s = clustermesh();
    s.args([
        "status",
        "--wait",
        "--wait-timeout",
        "60s",
        "--server",
        &mesh.apiserver_grpc(1).to_string(),
        "--tls-dir",
    ])
    .arg(mesh.cert_dir(1).unwrap());
    let (out, text) = run(s);
    assert!(out.status.success(), "status:\n{text}");
    assert!(
        text.contains("All 2 nodes are connected to all clusters [1 remotes]"),
        "{text}"
    );
    assert!(text.contains("default/echo"), "{text}");
    assert!(text.contains("Status: healthy"), "{text}");
    let mut sj = clustermesh();
    sj.args([
        "status",
        "-o",
        "json",
        "--server",
        &mesh.apiserver_grpc(1).to_string(),
        "--tls-dir",
    ])
    .arg(mesh.cert_dir(1).unwrap());
    let (_, json) = run(sj);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("status -o json");
    assert_eq!(v["remotes"][0]["name"], "c2");
    assert_eq!(v["remotes"][0]["nodesSynced"], 2);

    // Traffic from c1 lands on c1 (affinity local): only c1's backends are programmed on c1's nodes.
    mesh.wait_for_landing(1, 1, Duration::from_secs(30), |b| b.starts_with("c1-"))
        .unwrap();
    assert_eq!(support::programmed_cluster_ids(&mesh, 1, 1), vec![1]);

    // 4. The status page before the drill.
    let url = format!("http://{}/", mesh.apiserver_status(1));
    let dir = artifacts();
    let (html, console) = load_page(&url, &dir.join("status-page-wide.png"), (1440, 900));
    let errors: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("Uncaught") || l.contains(":ERROR:"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert!(
        html.contains("data-loaded=\"1\""),
        "the page never loaded its data:\n{html}"
    );
    for needle in [
        "ClusterMesh · c1",
        "default/echo",
        ">c2<",
        "All 2 nodes are connected to all clusters",
    ] {
        assert!(html.contains(needle), "page lacks {needle:?}");
    }
    let failovers_before = html.matches("data-failover=").count();
    let _ = load_page(&url, &dir.join("status-page-phone.png"), (390, 844));

    // 5. clustermesh drill with hooks: a graceful drain of c1's endpoints (as `kubectl` would), from a
    // client inside c1/n1 and its cgroup.
    let manifest = mesh.lab().state_dir().join("manifests/c1/echo.yaml");
    let fail = format!(
        "sed -i 's/ready: true/ready: false/; s/terminating: false/terminating: true/' {m}",
        m = manifest.display()
    );
    let recover = format!(
        "sed -i 's/ready: false/ready: true/; s/terminating: true/terminating: false/' {m}",
        m = manifest.display()
    );
    let node = mesh.lab().node(1, 1).unwrap().clone();
    let mut d = clustermesh();
    d.args([
        "drill",
        "--service",
        "default/echo",
        "--target",
        &mesh.service_addr(1).to_string(),
        "--local-prefix",
        "c1-",
    ])
    .args([
        "--fail",
        &fail,
        "--recover",
        &recover,
        "--netns",
        &node.netns,
    ])
    .arg("--cgroup")
    .arg(&node.cgroup)
    .args(["--budget", "1s", "-o", "json"]);
    let (out, text) = run(d);
    assert!(out.status.success(), "drill over budget or failed:\n{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("drill JSON");
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["failed_connects"], 0, "graceful drill lost connects: {r}");
    assert!(r["failover_ms"].as_f64().unwrap() < 1000.0, "{r}");
    assert!(r["failback_ms"].as_f64().unwrap() < 1000.0, "{r}");
    assert_eq!(r["within_budget"], true);

    // The status tells the truth about that drill: one record per node, naming it, caused by the
    // endpoint change, timed within 100 ms of what the client measured (the client's figure also
    // holds the apiserver's pick-up and publication, which the node does not see).
    for (from, to, key) in [("c1", "c2", "failover_ms"), ("c2", "c1", "failback_ms")] {
        let client_ms = r[key].as_f64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let rec = loop {
            let mut sj = clustermesh();
            sj.args(["status", "-o", "json", "--server"])
                .arg(mesh.apiserver_grpc(1).to_string())
                .arg("--tls-dir")
                .arg(mesh.cert_dir(1).unwrap());
            let (_, json) = run(sj);
            let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_default();
            let found = v["failovers"].as_array().and_then(|fo| {
                fo.iter()
                    .rev()
                    .find(|f| {
                        f["service"] == "default/echo"
                            && f["node"] == node.name.as_str()
                            && f["from"] == serde_json::json!([from])
                            && f["to"] == serde_json::json!([to])
                    })
                    .cloned()
            });
            if let Some(f) = found {
                break f;
            }
            assert!(
                Instant::now() < deadline,
                "no {from} -> {to} record of node {} in the status: {v}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(rec["cause"], "endpoints", "{rec}");
        let took = rec["durationMs"].as_f64().expect("a duration");
        assert!(
            (took - client_ms).abs() <= 100.0,
            "status says {from} -> {to} took {took} ms, the client measured {client_ms} ms: {rec}"
        );
    }

    // The page shows the failover.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (html, _) = load_page(
            &url,
            &dir.join("status-page-after-failover.png"),
            (1440, 900),
        );
        if html.matches("data-failover=").count() > failovers_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page shows no new failover after the drill"
        );
    }

    // 6. disconnect: c2's backends leave every c1 node's maps. Drain c1 first so c1's nodes program c2.
    mesh.write_service(1, mesh_lab::mesh::EndpointState::Terminating)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while [1, 2]
        .iter()
        .any(|&n| support::programmed_cluster_ids(&mesh, 1, n) != vec![2])
    {
        assert!(
            Instant::now() < deadline,
            "c1's nodes did not fail over to c2's backends"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dc = clustermesh();
    dc.arg("disconnect")
        .arg(mesh.apiserver_grpc(1).to_string())
        .arg(mesh.apiserver_grpc(2).to_string())
        .arg("--tls-dir")
        .arg(mesh.cert_dir(1).unwrap())
        .arg("--destination-tls-dir")
        .arg(mesh.cert_dir(2).unwrap());
    let (out, text) = run(dc);
    assert!(out.status.success(), "disconnect:\n{text}");
    assert!(
        text.contains("✔ c2 unregistered at c1") && text.contains("✔ c1 unregistered at c2"),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while [1, 2]
        .iter()
        .any(|&n| support::programmed_cluster_ids(&mesh, 1, n).contains(&2))
    {
        assert!(
            Instant::now() < deadline,
            "c2's backends are still programmed on c1 after disconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mesh.write_service(1, mesh_lab::mesh::EndpointState::Ready)
        .unwrap();
    mesh.teardown().expect("teardown");
}
