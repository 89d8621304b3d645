//! Real lab tests: root, network namespaces, etcd. Each test uses its own lab prefix.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_lab::{EtcdSecurity, Lab, LabError, LabSpec};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn node_reaches_remote_etcd_partition_blocks_heal_restores_teardown_leaves_nothing() {
    let lab = lab("mlt-part", 2, 2);
    assert!(
        reaches_etcd(&lab, 1, 1, 2, 3 * SECOND),
        "c1/n1 cannot reach c2's etcd at {}",
        lab.etcd_endpoint(2).unwrap()
    );

    // a long-running process in c1/n1 sits in the node's namespace and cgroup
    let mut sleeper = lab
        .spawn_in_node(1, 1, Command::new("sleep").arg("1000"))
        .unwrap();
    let node = lab.node(1, 1).unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.pid())).unwrap();
    let rel = node
        .cgroup
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(cg.contains(&format!("/mesh-lab/mlt-part/{rel}")), "{cg}");
    let ident = Command::new("ip")
        .args(["netns", "identify", &sleeper.pid().to_string()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ident.stdout).trim(), node.netns);

    let footprint = Footprint::of(&lab, &[sleeper.pid()]);
    footprint.assert_present();

    // partition: the next request fails within a second; inside c1 and host -> c2 still work
    lab.partition(1, 2).unwrap();
    let t = Instant::now();
    assert!(
        !reaches_etcd(&lab, 1, 1, 2, SECOND),
        "partition did not block c1 -> c2"
    );
    assert!(t.elapsed() < 2 * SECOND);
    assert!(
        !reaches_etcd(&lab, 2, 2, 1, SECOND),
        "partition did not block c2 -> c1"
    );
    assert!(
        reaches_etcd(&lab, 1, 2, 1, 3 * SECOND),
        "partition broke traffic inside c1"
    );
    assert!(lab.etcd_healthy(2).unwrap(), "partition broke host -> c2");
    assert_eq!(lab.partitions(), vec![(1, 2)]);

    // heal: restored at once
    lab.heal(2, 1).unwrap();
    assert!(
        reaches_etcd(&lab, 1, 1, 2, 3 * SECOND),
        "heal did not restore c1 -> c2"
    );
    assert!(lab.partitions().is_empty());
    lab.heal(1, 2).unwrap(); // healing twice is fine

    // isolate cuts a cluster from all others; heal_all undoes every partition
    lab.isolate(2).unwrap();
    assert!(
        !reaches_etcd(&lab, 1, 2, 2, SECOND),
        "isolate(2) let c1 through"
    );
    lab.heal_all().unwrap();
    assert!(
        reaches_etcd(&lab, 1, 2, 2, 3 * SECOND),
        "heal_all did not restore c1 -> c2"
    );

    // a node crash kills what runs on that node and nothing else
    let mut victim = lab
        .spawn_in_node(1, 2, Command::new("sleep").arg("1000"))
        .unwrap();
    lab.crash_node(1, 2).unwrap();
    use std::os::unix::process::ExitStatusExt;
    let st = victim
        .wait_timeout(SECOND)
        .unwrap()
        .expect("crashed node's process exited");
    assert_eq!(st.signal(), Some(9));
    assert!(sleeper.is_running(), "crash of c1/n2 hit c1/n1");

    assert!(sleeper.is_running());
    lab.teardown().unwrap();
    assert!(
        !sleeper.is_running(),
        "teardown left the node's process running"
    );
    footprint.assert_gone();
}

#[test]
fn two_labs_run_side_by_side_without_seeing_each_other() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| lab("mlt-par-a", 1, 1));
        let b = s.spawn(|| lab("mlt-par-b", 1, 1));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.plan().octet, b.plan().octet);
    assert_ne!(a.etcd_endpoint(1).unwrap(), b.etcd_endpoint(1).unwrap());
    assert!(reaches_etcd(&a, 1, 1, 1, 3 * SECOND));
    assert!(reaches_etcd(&b, 1, 1, 1, 3 * SECOND));
    // traffic stays inside each lab: a node of A has no way to B's addresses
    let (ok, text) = curl_from(
        &a,
        1,
        1,
        &format!("{}/health", b.etcd_endpoint(1).unwrap()),
        SECOND,
    );
    assert!(!ok, "lab A reached lab B: {text}");

    let fa = Footprint::of(&a, &[]);
    drop(a);
    fa.assert_gone();
    assert!(b.etcd_healthy(1).unwrap(), "tearing down A hurt B");
    assert!(reaches_etcd(&b, 1, 1, 1, 3 * SECOND));
}

#[test]
fn latency_grows_round_trip_by_twice_the_delay_and_loss_drops() {
    let lab = lab("mlt-lat", 2, 1);
    let base = median((0..5).map(|_| connect_time(&lab, 1, 1, 2)).collect());
    assert!(base < 0.1, "baseline connect time {base}s");

    let delay = Duration::from_millis(100);
    lab.set_latency_loss(1, 2, delay, 0.0).unwrap();
    let slow = median((0..5).map(|_| connect_time(&lab, 1, 1, 2)).collect());
    let grew = slow - base;
    eprintln!(
        "connect time: base {:.1} ms, with 100 ms each way {:.1} ms",
        base * 1e3,
        slow * 1e3
    );
    assert!(
        (0.19..0.35).contains(&grew),
        "round trip grew by {grew}s, want about 2 x {delay:?}"
    );
    // inside a cluster and host -> cluster stay fast (well under the 200 ms an impaired round trip takes)
    let inside = median((0..3).map(|_| connect_time(&lab, 1, 1, 1)).collect());
    assert!(inside < 0.1, "connect time inside c1 {inside}s");
    let cp2 = std::net::SocketAddr::from((lab.control_plane(2).unwrap().addr, 2379));
    let host = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                std::net::TcpStream::connect_timeout(&cp2, SECOND).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    assert!(host < 0.1, "connect time host -> c2 {host}s");

    // total loss: nothing gets through
    lab.set_latency_loss(1, 2, Duration::ZERO, 100.0).unwrap();
    assert!(
        !reaches_etcd(&lab, 1, 1, 2, SECOND),
        "100% loss let traffic through"
    );
    let (_, dropped) = lab.impairer_counters();
    assert!(dropped > 0);

    lab.clear_impairment(2, 1).unwrap();
    assert!(lab.impairments().is_empty());
    let after = median((0..5).map(|_| connect_time(&lab, 1, 1, 2)).collect());
    assert!(after < 0.1, "connect time after clearing {after}s");

    let e = lab
        .set_latency_loss(1, 2, Duration::ZERO, 120.0)
        .unwrap_err();
    assert!(e.to_string().contains("120"), "{e}");
    let e = lab.partition(1, 1).unwrap_err();
    assert!(e.to_string().contains("two different clusters"), "{e}");
    let e = lab.partition(1, 3).unwrap_err();
    assert!(matches!(e, LabError::NoSuchCluster { .. }), "{e}");
}

fn etcd_put(lab: &Lab, c: usize, key: &str, value: &str) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        base64_lite(key),
        base64_lite(value)
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "3", "-X", "POST", "-d", &body])
        .arg(format!("{}/v3/kv/put", lab.etcd_endpoint(c).unwrap()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn etcd_get(lab: &Lab, c: usize, key: &str) -> String {
    let body = format!(r#"{{"key":"{}"}}"#, base64_lite(key));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "3", "-X", "POST", "-d", &body])
        .arg(format!("{}/v3/kv/range", lab.etcd_endpoint(c).unwrap()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn base64_lite(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for ch in b.chunks(3) {
        let n = (u32::from(ch[0]) << 16)
            | (u32::from(*ch.get(1).unwrap_or(&0)) << 8)
            | u32::from(*ch.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= ch.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn etcd_restarts_with_its_data_and_a_killed_etcd_is_unreachable() {
    let lab = lab("mlt-etcd", 1, 1);
    etcd_put(&lab, 1, "clustermesh/v1/test", "kept");
    let before = lab.etcd_pid(1).unwrap().unwrap();
    lab.restart_etcd(1).unwrap();
    let after = lab.etcd_pid(1).unwrap().unwrap();
    assert_ne!(before, after);
    assert!(
        etcd_get(&lab, 1, "clustermesh/v1/test").contains(&base64_lite("kept")),
        "value lost across restart"
    );

    lab.kill_etcd(1).unwrap();
    assert_eq!(lab.etcd_pid(1).unwrap(), None);
    assert!(!lab.etcd_healthy(1).unwrap());
    assert!(!reaches_etcd(&lab, 1, 1, 1, SECOND));
    lab.start_etcd(1).unwrap();
    assert!(reaches_etcd(&lab, 1, 1, 1, 3 * SECOND));
    assert!(etcd_get(&lab, 1, "clustermesh/v1/test").contains(&base64_lite("kept")));
}

#[test]
fn a_crashed_lab_is_cleaned_up_by_the_next_up() {
    // a lab whose owner "crashed": kept running, nobody tore it down
    let first = lab("mlt-crash", 1, 2);
    let mut orphan = first
        .node_command(1, 2, "sleep")
        .unwrap()
        .arg("1000")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let old = Footprint::of(&first, &[orphan.id()]);
    first.keep();
    old.assert_present();

    let second = lab("mlt-crash", 1, 2);
    for p in &old.pids {
        assert!(
            !p.is_alive(),
            "pid {} ({}) of the crashed lab survived",
            p.pid,
            p.what
        );
    }
    let _ = orphan.wait();
    assert!(reaches_etcd(&second, 1, 1, 1, 3 * SECOND));

    // while this process holds the lab, another `down` is refused
    let e = Lab::down("mlt-crash");
    assert!(matches!(e, Err(LabError::Busy { .. })), "{e:?}");
    let f = Footprint::of(&second, &[]);
    drop(second);
    f.assert_gone();
    assert!(!Lab::down("mlt-crash").unwrap(), "nothing left to remove");
}

#[test]
fn the_cli_brings_a_lab_up_shows_it_and_takes_it_down() {
    let bin = env!("CARGO_BIN_EXE_mesh-lab");
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "mesh-lab {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let up = run(&[
        "up",
        "--prefix",
        "mlt-cli",
        "--clusters",
        "2",
        "--nodes",
        "1",
        "--etcd",
        "plain",
    ]);
    assert!(up.contains("cluster c2"), "{up}");
    let status = run(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let me = v
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["prefix"] == "mlt-cli")
        .expect("status lists the lab");
    let url = me["state"]["plan"]["clusters"][1]["etcd"]["client_url"]
        .as_str()
        .unwrap()
        .to_string();
    let health = Command::new("curl")
        .args(["-sS", "--max-time", "3", &format!("{url}/health")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&health.stdout).contains("true"));
    let pids: Vec<i32> = me["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0]["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2, "two etcd processes: {me}");

    // partition and heal from the CLI, observed from a node of c1
    let c2_health = format!("{url}/health");
    let from_c1 = |max: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                "mlt-cli-c1-n1",
                "curl",
                "-sS",
                "--max-time",
                max,
                &c2_health,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(from_c1("3"));
    assert!(run(&["partition", "--prefix", "mlt-cli", "c1", "2"]).contains("partitioned"));
    assert!(!from_c1("1"), "CLI partition did not block c1 -> c2");
    let status = run(&["status"]);
    assert!(status.contains("partitions: [(1, 2)]"), "{status}");
    assert!(run(&["heal", "--prefix", "mlt-cli", "2", "c1"]).contains("healed"));
    assert!(from_c1("3"), "CLI heal did not restore c1 -> c2");

    let down = run(&["down", "--prefix", "mlt-cli"]);
    assert!(down.contains("removed"), "{down}");
    assert!(!netns_list().iter().any(|n| n.starts_with("mlt-cli-")));
    for pid in pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false);
        assert!(!alive, "etcd {pid} survived mesh-lab down");
    }
    assert!(run(&["down", "--prefix", "mlt-cli"]).contains("nothing to remove"));
}

#[test]
fn bad_specs_are_refused_with_the_rule() {
    let e = Lab::up(LabSpec::new("Bad", 1, 1)).unwrap_err();
    assert!(e.to_string().contains("lowercase"), "{e}");
    let e = Lab::up(LabSpec::new("ok", 0, 1)).unwrap_err();
    assert!(e.to_string().contains("clusters must be"), "{e}");
    let mut spec = LabSpec::new("mlt-noetcd", 1, 1).etcd_security(EtcdSecurity::Plain);
    spec.etcd_binary = "/nonexistent/etcd".into();
    let e = Lab::up(spec).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/etcd"), "{e}");
}

#[test]
fn tls_etcd_by_default_needs_a_client_certificate_and_has_users() {
    use mesh_certs::Role;
    let lab = Lab::up(LabSpec::new("mlt-tls", 2, 1)).expect("TLS lab up");
    let url = lab.etcd_endpoint(2).unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let tls = lab.etcd_tls(2).unwrap().expect("TLS files").clone();

    // from a node of c1, with the root client certificate: healthy
    let with_cert = lab
        .output_in_node(
            1,
            1,
            Command::new("curl")
                .args(["-sS", "--max-time", "3", "--cacert"])
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key)
                .arg(format!("{url}/health")),
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&with_cert.stdout).contains("\"health\":\"true\""),
        "{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );
    // without one: refused
    let without = lab
        .output_in_node(
            1,
            1,
            Command::new("curl")
                .args(["-sS", "--max-time", "3", "--cacert"])
                .arg(&tls.ca)
                .arg(format!("{url}/health")),
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&without.stdout).contains("true"));

    // users exist: admin writes, node may not write outside its health prefix
    let dir = lab.cluster_certs(2).unwrap().expect("cert dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut admin = mesh_etcd::connect_as(&dir, Role::Admin, std::slice::from_ref(&url))
            .await
            .expect("admin connects");
        admin
            .put("clustermesh/v1/lab-test", "x", None)
            .await
            .expect("admin put");
        let mut node = mesh_etcd::connect_as(&dir, Role::Node, std::slice::from_ref(&url))
            .await
            .expect("node connects");
        let got = node
            .get("clustermesh/v1/lab-test", None)
            .await
            .expect("node reads");
        assert_eq!(got.kvs()[0].value(), b"x");
        let denied = node.put("clustermesh/v1/lab-test", "y", None).await;
        assert!(denied.is_err(), "node wrote outside its health prefix");
    });

    // cluster 1's node-syncs read cluster 2's etcd as remote-c1 once the lab added that user
    lab.add_all_remote_users().unwrap();
    let c1 = lab.cluster_certs(1).unwrap().expect("cert dir of c1");
    rt.block_on(async {
        let mut remote = mesh_etcd::connect_as(&c1, Role::Remote, std::slice::from_ref(&url))
            .await
            .expect("remote-c1 connects to c2");
        let got = remote
            .get("clustermesh/v1/lab-test", None)
            .await
            .expect("remote reads");
        assert_eq!(got.kvs()[0].value(), b"x");
        assert!(
            remote
                .put("clustermesh/v1/lab-test", "z", None)
                .await
                .is_err()
        );
    });

    // a restart keeps TLS and auth
    lab.restart_etcd(2).unwrap();
    assert!(lab.etcd_healthy(2).unwrap());
    let f = Footprint::of(&lab, &[]);
    drop(lab);
    f.assert_gone();
}

/// Not a test on its own: the child process of `a_killed_owner_leaves_a_lab_the_next_up_removes` (it returns at once
/// unless that test started it).
#[test]
fn crash_helper_holds_a_lab_until_killed() {
    if std::env::var_os("MESH_LAB_CRASH_HELPER").is_none() {
        return;
    }
    let lab = lab("mlt-kill", 2, 1);
    let p = lab
        .spawn_in_node(1, 1, Command::new("sleep").arg("1000"))
        .unwrap();
    lab.set_latency_loss(1, 2, Duration::from_millis(50), 0.0)
        .unwrap();
    lab.partition(1, 2).unwrap();
    println!("READY {}", p.pid());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_owner_leaves_a_lab_the_next_up_removes() {
    use std::io::BufRead;
    let mut owner = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_helper_holds_a_lab_until_killed",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MESH_LAB_CRASH_HELPER", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(owner.stdout.take().unwrap()).lines();
    let sleeper: i32 = loop {
        let line = lines
            .next()
            .expect("the owner process ended before its lab was up")
            .unwrap();
        // libtest prints "test <name> ... " without a newline before the test's own output
        if let Some((_, pid)) = line.split_once("READY ") {
            break pid.trim().parse().unwrap();
        }
    };
    // while the owner lives, nobody else may take the lab down
    assert!(matches!(Lab::down("mlt-kill"), Err(LabError::Busy { .. })));

    owner.kill().unwrap(); // SIGKILL: no Drop, no teardown
    owner.wait().unwrap();
    let state = mesh_lab::state::LabState::load(std::path::Path::new("/run/mesh-lab/mlt-kill"))
        .unwrap()
        .expect("the killed owner left its state file");
    let sleeper = mesh_lab::process::ProcRecord::of(sleeper, "sleeper").expect("orphan still runs");
    let etcds: Vec<_> = state.etcd.iter().flatten().cloned().collect();
    assert_eq!(etcds.len(), 2);
    assert!(etcds.iter().all(|r| r.is_alive()));
    assert_eq!(state.partitions, vec![(1, 2)]);

    let lab = lab("mlt-kill", 2, 1);
    assert!(
        !sleeper.is_alive(),
        "the orphan of the killed owner survived the next up"
    );
    for r in &etcds {
        assert!(!r.is_alive(), "etcd {} of the killed owner survived", r.pid);
    }
    // a fresh lab: no partition, no delay carried over
    assert!(lab.partitions().is_empty());
    assert!(reaches_etcd(&lab, 1, 1, 2, 3 * SECOND));
    let t = median((0..3).map(|_| connect_time(&lab, 1, 1, 2)).collect());
    assert!(t < 0.1, "connect time c1 -> c2 in the fresh lab {t}s");
}

#[test]
fn a_cut_off_node_neither_reaches_nor_is_reached_until_healed_and_its_processes_keep_running() {
    let lab = lab("mlt-iso", 1, 2);
    assert!(reaches_etcd(&lab, 1, 1, 1, 3 * SECOND));
    let mut sleeper = lab
        .spawn_in_node(1, 1, Command::new("sleep").arg("1000"))
        .unwrap();
    let peer = lab.node(1, 1).unwrap().addr;
    lab.isolate_node(1, 1).unwrap();
    lab.isolate_node(1, 1).unwrap(); // idempotent
    assert_eq!(lab.isolated_nodes(), [(1, 1)]);
    assert!(
        !reaches_etcd(&lab, 1, 1, 1, SECOND),
        "the cut-off node still reaches etcd"
    );
    // nothing reaches it either, from its own cluster or the host
    let (ok, text) = curl_from(&lab, 1, 2, &format!("http://{peer}:2379/health"), SECOND);
    assert!(!ok, "c1/n2 reached the cut-off node: {text}");
    assert!(
        std::net::TcpStream::connect_timeout(&(peer, 22).into(), SECOND).is_err(),
        "the host reached the cut-off node"
    );
    // its processes keep running, loopback inside works
    assert!(sleeper.try_wait().unwrap().is_none());
    // (a closed port on loopback is refused at once, not dropped)
    let (ok, text) = curl_from(&lab, 1, 1, "http://127.0.0.1:1/", SECOND);
    assert!(
        !ok && (text.contains("refused") || text.contains("Couldn't connect")),
        "loopback inside the cut-off node: {text}"
    );
    // the other node is untouched
    assert!(reaches_etcd(&lab, 1, 2, 1, 3 * SECOND));
    lab.heal_node(1, 1).unwrap();
    lab.heal_node(1, 1).unwrap(); // idempotent
    assert!(lab.isolated_nodes().is_empty());
    assert!(
        reaches_etcd(&lab, 1, 1, 1, 3 * SECOND),
        "healed node reaches etcd"
    );
    let _ = sleeper.kill();
    lab.teardown().unwrap();
}

#[test]
fn a_three_member_etcd_elects_a_new_leader_when_its_leader_dies_and_the_old_one_rejoins() {
    let lab = Lab::up(LabSpec::new("mlt-etcd3", 2, 1).etcd_members(1, 3))
        .unwrap_or_else(|e| panic!("lab up: {e}"));
    assert_eq!(lab.etcd_members(1).unwrap(), 3);
    assert_eq!(lab.etcd_members(2).unwrap(), 1);
    assert_eq!(lab.etcd_endpoints(1).unwrap().len(), 3);
    let leader_of = |not: Option<usize>| {
        let started = Instant::now();
        loop {
            if let Some(l) = lab.etcd_leader(1).unwrap()
                && Some(l) != not
            {
                return (l, started.elapsed());
            }
            assert!(
                started.elapsed() < 10 * SECOND,
                "no leader other than {not:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (leader, _) = leader_of(None);
    assert!(lab.etcd_member_pid(1, leader).unwrap().is_some());
    lab.kill_etcd_member(1, leader).unwrap();
    assert!(lab.etcd_member_pid(1, leader).unwrap().is_none());
    let (new, took) = leader_of(Some(leader));
    assert_ne!(new, leader);
    eprintln!("member {leader} killed: member {new} leads {took:?} later");
    // the cluster still serves through the others (root client, every endpoint but the dead one)
    let dir = lab.cluster_certs(1).unwrap().unwrap();
    let live: Vec<String> = lab
        .etcd_endpoints(1)
        .unwrap()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i + 1 != leader)
        .map(|(_, u)| u)
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = mesh_etcd::connect_as(&dir, mesh_certs::Role::EtcdRoot, &live)
            .await
            .unwrap();
        c.put("mlt/k", "v", None).await.unwrap();
    });
    lab.start_etcd_member(1, leader).unwrap();
    let st = lab.etcd_member_status(1, leader).unwrap();
    assert!(st.leader != 0 && st.leader != st.member_id, "{st:?}");
    // the rejoined member has the write made while it was down
    let only: Vec<String> = vec![lab.etcd_endpoints(1).unwrap()[leader - 1].clone()];
    rt.block_on(async {
        let mut c = mesh_etcd::connect_as(&dir, mesh_certs::Role::EtcdRoot, &only)
            .await
            .unwrap();
        let started = Instant::now();
        loop {
            let r = c.get("mlt/k", None).await.unwrap();
            if r.kvs().first().is_some_and(|kv| kv.value() == b"v") {
                break;
            }
            assert!(
                started.elapsed() < 5 * SECOND,
                "rejoined member lacks the write"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // a whole-cluster restart brings every member back
    lab.kill_etcd(1).unwrap();
    lab.start_etcd(1).unwrap();
    assert!(lab.etcd_healthy(1).unwrap());
    lab.teardown().unwrap();
}
