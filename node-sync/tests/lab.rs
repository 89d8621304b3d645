//! End to end on the mesh-lab: two clusters of two nodes (network namespaces, TLS etcd with RBAC
//! per cluster), the real node-sync binary on every node of cluster 1 attached to the node's cgroup
//! with the real eBPF datapath, backends and a client as processes in the nodes. Keys are written
//! as the clustermesh-apiserver writes them. Needs root.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_certs::Role;
use mesh_etcd::connect_as;
use mesh_lab::{Lab, LabProcess, LabSpec};
use mesh_model::values::Affinity;
use support::*;

const BACKEND: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.sendall(sys.argv[1].encode())
    finally:
        c.close()
"#;

fn backend(lab: &Lab, cluster: usize, node: usize, name: &str) -> LabProcess {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", BACKEND, name]);
    let p = lab
        .spawn_in_node(cluster, node, &cmd)
        .expect("start a backend");
    // Wait until it listens.
    let addr = lab.node(cluster, node).unwrap().addr;
    let t0 = Instant::now();
    loop {
        let out = lab
            .output_in_node(
                cluster,
                node,
                Command::new("bash").args([
                    "-c",
                    &format!("exec 3<>/dev/tcp/{addr}/8080 && timeout 2 cat <&3"),
                ]),
            )
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == name {
            return p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "backend {name} did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connect to `vip:80` from node `n` of cluster 1 (its cgroup): the backend's name, or "".
fn connect(lab: &Lab, node: usize, vip: &str) -> String {
    let out = lab
        .output_in_node(
            1,
            node,
            Command::new("bash").args([
                "-c",
                &format!("exec 3<>/dev/tcp/{vip}/80 && timeout 2 cat <&3"),
            ]),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_lands(lab: &Lab, vip: &str, want: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = connect(lab, 1, vip);
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "connects from c1/n1 did not land on {want:?} within {limit:?} (last: {got:?})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn node_sync(lab: &Lab, node: usize, remote_dir: &Path) -> LabProcess {
    let n = lab.node(1, node).unwrap().clone();
    let certs = lab.cluster_certs(1).unwrap().expect("TLS lab");
    let mut cmd = lab
        .node_command(1, node, env!("CARGO_BIN_EXE_node-sync"))
        .unwrap();
    cmd.args([
        "--cluster-name",
        "c1",
        "--cluster-id",
        "1",
        "--node-name",
        &n.name,
    ])
    .args(["--etcd-endpoints", &lab.etcd_endpoint(1).unwrap()])
    .arg("--tls-dir")
    .arg(&certs.path)
    .arg("--remote-config-dir")
    .arg(remote_dir)
    .arg("--cgroup")
    .arg(&n.cgroup)
    .arg("--bpffs")
    .arg(&n.bpffs)
    .args(["--stale-grace", "3s"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    lab.spawn(cmd).expect("start node-sync")
}

#[test]
fn lab_local_preferred_failover_on_sigkill_failback_and_partition() {
    let prefix = format!("nse2e{}", std::process::id() % 100_000);
    let lab = Lab::up(LabSpec::new(prefix, 2, 2)).expect("lab up (needs root)");
    lab.add_all_remote_users().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vip = "10.96.77.10";
    let c1n2 = lab.node(1, 2).unwrap().addr.to_string();
    let c2n1 = lab.node(2, 1).unwrap().addr.to_string();
    let mut spec1 = spec("c1", Affinity::Local);
    spec1.frontends = vec![vip.parse().unwrap()];
    let mut spec2 = spec("c2", Affinity::Local);
    spec2.frontends = vec!["10.96.88.10".parse().unwrap()];
    let (mut w1, _w2) = rt.block_on(async {
        let d1 = lab.cluster_certs(1).unwrap().unwrap();
        let d2 = lab.cluster_certs(2).unwrap().unwrap();
        let mut w1 = ApiWriter::from_client(
            connect_as(&d1, Role::Admin, &[lab.etcd_endpoint(1).unwrap()])
                .await
                .unwrap(),
            "c1",
            1,
        );
        let mut w2 = ApiWriter::from_client(
            connect_as(&d2, Role::Admin, &[lab.etcd_endpoint(2).unwrap()])
                .await
                .unwrap(),
            "c2",
            2,
        );
        w1.publish_all(
            vec![spec1],
            vec![chunk("c1", 0, vec![endpoint(&c1n2, 8080, "n2")])],
        )
        .await;
        w2.publish_all(
            vec![spec2],
            vec![chunk("c2", 0, vec![endpoint(&c2n1, 8080, "n1")])],
        )
        .await;
        (w1, w2)
    });
    let b1 = backend(&lab, 1, 2, "c1");
    let _b2 = backend(&lab, 2, 1, "c2");

    let remotes = tempfile::tempdir().unwrap();
    std::fs::write(
        remotes.path().join("c2.yaml"),
        format!(
            "name: c2\nid: 2\nendpoints: [\"{}\"]\n",
            lab.etcd_endpoint(2).unwrap()
        ),
    )
    .unwrap();
    let _ns1 = node_sync(&lab, 1, remotes.path());
    let _ns2 = node_sync(&lab, 2, remotes.path());

    // A client in cluster 1 reaches only cluster 1's backend.
    wait_lands(&lab, vip, "c1", Duration::from_secs(30));
    for _ in 0..20 {
        assert_eq!(connect(&lab, 1, vip), "c1");
    }

    // SIGKILL the backend: new connects land in cluster 2.
    drop(b1);
    let took = wait_lands(&lab, vip, "c2", Duration::from_secs(5));
    println!("lab failover after SIGKILL: {took:?}");

    // Restart it: connects return to cluster 1.
    let b1 = backend(&lab, 1, 2, "c1");
    let took = wait_lands(&lab, vip, "c1", Duration::from_secs(5));
    println!("lab failback: {took:?}");

    // Affinity remote: cluster 2 first; none: both clusters.
    let mut with = |a: Affinity| {
        let mut s = spec("c1", a);
        s.frontends = vec![vip.parse().unwrap()];
        rt.block_on(w1.service(s));
    };
    with(Affinity::Remote);
    wait_lands(&lab, vip, "c2", Duration::from_secs(5));
    with(Affinity::None);
    let t0 = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        seen.insert(connect(&lab, 1, vip));
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "affinity none: saw only {seen:?}"
        );
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["c1", "c2"]);
    with(Affinity::Local);
    wait_lands(&lab, vip, "c1", Duration::from_secs(5));
    for _ in 0..10 {
        assert_eq!(connect(&lab, 1, vip), "c1");
    }

    // Partition cluster 2 away: local traffic sees no error.
    lab.partition(1, 2).unwrap();
    for _ in 0..30 {
        assert_eq!(
            connect(&lab, 1, vip),
            "c1",
            "local traffic during a partition"
        );
    }
    // After the grace (3 s) c2 is stale: with the local backend gone nothing is left (fail fast).
    std::thread::sleep(Duration::from_secs(5));
    drop(b1);
    wait_lands(&lab, vip, "", Duration::from_secs(10));
    // Heal: c2's backend returns.
    lab.heal(1, 2).unwrap();
    let took = wait_lands(&lab, vip, "c2", Duration::from_secs(20));
    println!("lab: c2 back {took:?} after the heal");
}
