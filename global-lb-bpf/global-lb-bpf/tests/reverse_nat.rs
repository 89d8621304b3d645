//! Reverse NAT that lives and dies with the socket: far more translated sockets open at once than
//! the old cookie-keyed LRU could hold (65,536 entries), and every one of them, the oldest
//! included, still sees the service address (its state in the connection table, or in its
//! socket-local storage when its slot is taken); nothing is left behind when they close; state
//! survives loader restarts, and sockets translated under the LRU layout keep their service
//! address across the upgrade. Real programs, real sockets, in a private netns. Needs root.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use common::{Env, PROBE, in_netns, ok, pin_dir, unique};
use global_lb_bpf::{Backend, ConnTable, Datapath, DatapathConfig, Frontend, ServiceMaps};
use global_lb_bpf_common::{MAX_SOCK_CONN, REV_NAT_MAP, RevNatKey, RevNatValue, v4_mapped};
use serde_json::Value;

fn backend(addr: &str) -> Backend {
    let a: SocketAddr = addr.parse().unwrap();
    Backend::new(a.ip(), a.port(), 1)
}

fn frontend(s: &str) -> Frontend {
    s.parse().unwrap()
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// 10k unconnected UDP sockets (each sending to three services), then 100k TCP connections, open
/// at once: 130k translated (socket, backend) pairs, twice the old LRU's capacity and more than
/// the connection table's 65,536 slots. Every socket, the oldest (the UDP ones, their replies
/// read last) included, answers getpeername()/recvfrom() with its service; every TCP socket's
/// state is in the table or in its own storage while open, and the table's slots and the storage
/// are given back once they close, round after round. (Against the LRU layout 34,640 TCP sockets
/// and all 30k UDP replies showed the backend.)
#[test]
fn more_live_sockets_than_the_old_lru_held_all_keep_their_service() {
    in_netns(&[], || {
        let mut env = Env::new("revnat-many");
        let tcp_vip = "10.96.0.10:80";
        let tcp_backends = ["127.0.0.2:8080", "127.0.0.3:8080"];
        env.dp()
            .upsert_service(
                &frontend(&format!("tcp:{tcp_vip}")),
                &tcp_backends.map(backend),
            )
            .unwrap();
        let udp = [
            ("10.96.0.53:53", "127.0.0.53:5353"),
            ("10.96.0.54:53", "127.0.0.54:5353"),
            ("10.96.0.55:53", "127.0.0.55:5353"),
        ];
        for (vip, be) in udp {
            env.dp()
                .upsert_service(&frontend(&format!("udp:{vip}")), &[backend(be)])
                .unwrap();
        }
        let tcp_sockets = 100_000u64;
        let udp_sockets = 10_000u64;
        let rounds = 2;
        let pins = env.config.pin_dir.to_str().unwrap().to_owned();
        let tcp_arg = format!("{tcp_vip}={}", tcp_backends.join(","));
        let udp_args: Vec<String> = udp.iter().map(|(v, b)| format!("{v}={b}")).collect();
        let mut args = vec![
            "hold",
            "--tcp",
            &tcp_arg,
            "--tcp-sockets",
            "100000",
            "--udp-sockets",
            "10000",
            // 64 source addresses: the 4-tuples never run short of ephemeral ports.
            "--source",
            "127.1.0.1",
            "--sources",
            "64",
            "--rounds",
            "2",
            "--pin-dir",
            &pins,
            "--udp",
        ];
        args.extend(udp_args.iter().map(String::as_str));
        let v = env.probe(&args);
        eprintln!("glb-probe hold: {v}");
        ok(&v);
        let rounds_out = v["rounds"].as_array().expect("rounds");
        assert_eq!(rounds_out.len(), rounds, "{v}");
        let mut growth = Vec::new();
        for r in rounds_out {
            assert_eq!(n(r, "tcp_sockets"), tcp_sockets, "{r}");
            assert_eq!(
                n(r, "tcp_wrong_peer"),
                0,
                "getpeername() of a live socket shows something else than the service: {r}"
            );
            let (in_table, in_storage) = (n(r, "table_slots_open"), n(r, "tcp_in_storage"));
            assert_eq!(
                in_table + in_storage,
                tcp_sockets,
                "every live TCP socket has its state in the table or in its storage: {r}"
            );
            assert!(
                in_table > 0 && in_table <= u64::from(MAX_SOCK_CONN),
                "the table holds some, at most its size: {r}"
            );
            assert_eq!(
                n(r, "table_slots_closed"),
                0,
                "table slots still held once every socket closed: {r}"
            );
            assert_eq!(n(r, "udp_sockets"), udp_sockets, "{r}");
            assert_eq!(n(r, "udp_replies_missing"), 0, "{r}");
            assert_eq!(
                n(r, "udp_replies_wrong_source"),
                0,
                "recvfrom() of a live socket shows something else than the service: {r}"
            );
            growth.push((
                n(r, "kmalloc_cg_open").saturating_sub(n(r, "kmalloc_cg_before")),
                in_storage + udp_sockets,
            ));
        }
        // The storage is on the sockets: accounted kernel memory grows with the sockets that
        // have some (at least ~100 bytes each)...
        let growth_floor = |with_storage: u64| 100 * with_storage;
        assert!(
            growth.iter().all(|(g, with)| *g >= growth_floor(*with)),
            "storage while open: {growth:?} (bytes, sockets with storage), expected >= 100 bytes \
             per socket with storage: {v}"
        );
        // ...and is given back when they close: after two rounds of 110k sockets the memory is
        // within 4 MiB (the probe's --settle-bytes) of where it started, not rounds x growth.
        let baseline = n(&v, "kmalloc_cg_baseline");
        let after = n(&v, "kmalloc_cg_after");
        assert!(
            after <= baseline + (4 << 20),
            "state left behind after the sockets closed: {baseline} -> {after} bytes \
             (growth per round while open, sockets with storage: {growth:?}): {v}"
        );
        // The old map is not written any more.
        let lru = MapData::from_pin(env.config.pin_dir.join(REV_NAT_MAP)).unwrap();
        let lru: AyaHashMap<_, RevNatKey, RevNatValue> =
            AyaHashMap::try_from(Map::LruHashMap(lru)).unwrap();
        assert_eq!(lru.keys().count(), 0);
    });
}

/// IPv6: TCP connections and unconnected UDP sockets sending to two services each.
#[test]
fn ipv6_sockets_keep_their_service_and_udp_sockets_tell_services_apart() {
    in_netns(
        &["fd00:96::1/128", "fd00:1::1/128", "fd00:1::2/128"],
        || {
            let mut env = Env::new("revnat-v6");
            env.dp()
                .upsert_service(
                    &frontend("tcp:[fd00:96::10]:80"),
                    &[backend("[fd00:1::1]:8080")],
                )
                .unwrap();
            for (vip, be) in [
                ("[fd00:96::53]:53", "[fd00:1::1]:5353"),
                ("[fd00:96::54]:53", "[fd00:1::2]:5353"),
            ] {
                env.dp()
                    .upsert_service(&frontend(&format!("udp:{vip}")), &[backend(be)])
                    .unwrap();
            }
            let pins = env.config.pin_dir.to_str().unwrap().to_owned();
            let v = env.probe(&[
                "hold",
                "--tcp",
                "[fd00:96::10]:80=[fd00:1::1]:8080",
                "--tcp-sockets",
                "2000",
                "--udp-sockets",
                "2000",
                "--source",
                "fd00:96::1",
                "--pin-dir",
                &pins,
                "--udp",
                "[fd00:96::53]:53=[fd00:1::1]:5353",
                "[fd00:96::54]:53=[fd00:1::2]:5353",
            ]);
            ok(&v);
            let r = &v["rounds"][0];
            assert_eq!(n(r, "tcp_wrong_peer"), 0, "{r}");
            assert_eq!(
                n(r, "table_slots_open") + n(r, "tcp_in_storage"),
                2000,
                "{r}"
            );
            assert_eq!(n(r, "table_slots_closed"), 0, "{r}");
            assert_eq!(n(r, "udp_replies_missing"), 0, "{r}");
            assert_eq!(n(r, "udp_replies_wrong_source"), 0, "{r}");
        },
    );
}

/// `ss -e` in this netns: socket cookie of each socket by local address.
fn cookies(proto_flag: &str) -> std::collections::HashMap<String, u64> {
    let out = Command::new("ss")
        .args([proto_flag, "-a", "-n", "-e", "-H"])
        .output()
        .expect("ss (iproute2)");
    assert!(out.status.success());
    let mut map = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(cookie) = cols.iter().find_map(|c| c.strip_prefix("sk:")) else {
            continue;
        };
        // State, Recv-Q, Send-Q, Local, Peer (UDP: State is UNCONN).
        if let Some(local) = cols.get(3) {
            map.insert(
                (*local).to_owned(),
                u64::from_str_radix(cookie, 16).unwrap(),
            );
        }
    }
    map
}

fn v4_words(addr: &SocketAddr) -> ([u32; 4], u16) {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    (
        v4_mapped(u32::from_ne_bytes(a.ip().octets())),
        a.port().to_be(),
    )
}

/// A live socket keeps answering with its service across a loader restart (the connection table
/// and the storage maps are pinned and reused), whether its state is in the table or in
/// socket-local storage (where the build before the table kept it), and across the upgrade
/// from the cookie-keyed LRU layout: sockets whose state an older build left in the pinned LRU
/// map (made here by taking their state away and writing the LRU entries an older build wrote)
/// are answered from it; one socket left without either shows its backend, which proves it is
/// that map that answers.
#[test]
fn live_sockets_keep_their_service_across_restarts_and_the_upgrade_from_the_lru_layout() {
    in_netns(&[], || {
        let name = unique("revnat-upgrade");
        let cgroup = common::TestCgroup::new(&name);
        let config = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
        let _pins = common::PinGuard(config.pin_dir.clone());
        std::fs::create_dir_all(&config.pin_dir).unwrap();
        // The reverse-NAT map as the LRU layout pinned it (65,536 entries).
        let lru_path = config.pin_dir.join(REV_NAT_MAP);
        let st = Command::new("bpftool")
            .args(["map", "create", lru_path.to_str().unwrap()])
            .args(["type", "lru_hash", "key", "32", "value", "24"])
            .args(["entries", "65536", "name", REV_NAT_MAP])
            .status()
            .expect("bpftool");
        assert!(st.success());

        let mut dp = Datapath::open(&config).unwrap();
        let tcp_vip = "10.96.0.10:80";
        let tcp_be = "127.0.0.2:8080";
        let udp_vip = "10.96.0.53:53";
        let udp_be = "127.0.0.53:5353";
        dp.upsert_service(&frontend(&format!("tcp:{tcp_vip}")), &[backend(tcp_be)])
            .unwrap();
        dp.upsert_service(&frontend(&format!("udp:{udp_vip}")), &[backend(udp_be)])
            .unwrap();
        let info = aya::maps::MapInfo::from_pin(&lru_path).unwrap();
        assert_eq!(info.max_entries(), 65536, "the pinned LRU map is kept");

        let pins = config.pin_dir.to_str().unwrap().to_owned();
        let tcp_arg = format!("{tcp_vip}={tcp_be}");
        let udp_arg = format!("{udp_vip}={udp_be}");
        let hold = |extra: &[&str]| {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(&cgroup.path)
                .arg(PROBE)
                .args(["hold", "--tcp", &tcp_arg, "--tcp-sockets", "20"])
                .args(["--udp-sockets", "20", "--source", "127.1.0.1"])
                .args(["--pin-dir", &pins, "--pause", "--udp", &udp_arg])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut child = cmd.spawn().expect("glb-probe");
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let opened: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe said {line:?}: {e}"));
            (child, out, opened)
        };
        let finish = |mut child: std::process::Child, mut out: BufReader<_>| -> Value {
            writeln!(child.stdin.take().unwrap(), "go").unwrap();
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert!(child.wait().unwrap().success());
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe said {line:?}: {e}"))
        };

        // 1. A restart with live sockets: same build, pins reused.
        let (child, out, _) = hold(&[]);
        drop(dp);
        let dp = Datapath::open(&config).unwrap();
        assert_eq!(dp.reused_links(), global_lb_bpf::PROGRAMS.len());
        let v = finish(child, out);
        let r = &ok(&v)["rounds"][0];
        assert_eq!(n(r, "tcp_wrong_peer"), 0, "after a restart: {r}");
        assert_eq!(n(r, "udp_replies_wrong_source"), 0, "after a restart: {r}");
        assert_eq!(n(r, "udp_replies_missing"), 0, "{r}");
        assert_eq!(n(r, "tcp_in_storage"), 0, "in the connection table: {r}");

        // 1b. Sockets whose state is in socket-local storage, where the build before the
        // connection table kept it (and where a connect whose slot is taken keeps it): every
        // free slot reserved while they connect, then a restart.
        let mut table = ConnTable::open(&config.pin_dir).unwrap();
        table.reserve_free_slots().unwrap();
        let (child, out, _) = hold(&[]);
        drop(dp);
        let dp = Datapath::open(&config).unwrap();
        let v = finish(child, out);
        table.release_reserved().unwrap();
        let r = &ok(&v)["rounds"][0];
        assert_eq!(n(r, "tcp_in_storage"), 20, "in socket-local storage: {r}");
        assert_eq!(n(r, "tcp_wrong_peer"), 0, "after a restart: {r}");
        assert_eq!(n(r, "udp_replies_wrong_source"), 0, "after a restart: {r}");
        assert_eq!(n(r, "udp_replies_missing"), 0, "{r}");
        assert_eq!(
            table.live_slots().unwrap(),
            0,
            "no slot held once they closed"
        );

        // 2. Sockets an older build translated: their state is in the LRU map only.
        let (child, out, opened) = hold(&["--drop-storage"]);
        let tcp_cookies = cookies("-t");
        let udp_cookies = cookies("-u");
        let lru = MapData::from_pin(&lru_path).unwrap();
        let mut lru: AyaHashMap<_, RevNatKey, RevNatValue> =
            AyaHashMap::try_from(Map::LruHashMap(lru)).unwrap();
        let entry = |cookie: u64, be: &str, vip: &str| {
            let (addr, port) = v4_words(&be.parse().unwrap());
            let (saddr, sport) = v4_words(&vip.parse().unwrap());
            (
                RevNatKey {
                    cookie,
                    addr,
                    port,
                    pad: [0; 6],
                },
                RevNatValue {
                    addr: saddr,
                    port: sport,
                    pad: [0; 2],
                    service_id: 0,
                },
            )
        };
        let tcp_local = opened["tcp_local"].as_array().unwrap();
        // The last TCP socket gets no entry: the control.
        for l in &tcp_local[..tcp_local.len() - 1] {
            let cookie = tcp_cookies[l.as_str().unwrap()];
            let (k, v) = entry(cookie, tcp_be, tcp_vip);
            lru.insert(k, v, 0).unwrap();
        }
        for l in opened["udp_local"].as_array().unwrap() {
            let cookie = udp_cookies[l.as_str().unwrap()];
            let (k, v) = entry(cookie, udp_be, udp_vip);
            lru.insert(k, v, 0).unwrap();
        }
        // The upgrade's restart: the pinned LRU map is reused as it is.
        drop(dp);
        let dp = Datapath::open(&config).unwrap();
        let v = finish(child, out);
        let r = &ok(&v)["rounds"][0];
        assert_eq!(
            n(r, "tcp_wrong_peer"),
            1,
            "all but the control answered from the LRU map: {r}"
        );
        assert_eq!(r["tcp_example"]["socket"], 19, "{r}");
        assert!(
            r["tcp_example"]["peer"].as_str().unwrap().contains(tcp_be),
            "{r}"
        );
        assert_eq!(n(r, "udp_replies_wrong_source"), 0, "{r}");
        assert_eq!(n(r, "udp_replies_missing"), 0, "{r}");
        drop(dp);
    });
}
