//! The datapath against the real kernel: programs attached to a fresh cgroup v2 directory, a
//! client process (`glb-probe`) in that cgroup, backends as threads, all inside a network
//! namespace private to the test. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{
    Env, GLB, PinGuard, TcpBackend, TestCgroup, UdpBackend, in_netns, ok, pin_dir, probe_in,
    probe_outside, s, unique,
};
use global_lb_bpf::{Backend, Datapath, DatapathConfig, Error, Frontend, Proto, ServiceMaps};

fn backend(addr: &str, cluster: u16) -> Backend {
    let a: SocketAddr = addr.parse().unwrap();
    Backend::new(a.ip(), a.port(), cluster)
}

fn frontend(s: &str) -> Frontend {
    s.parse().unwrap()
}

/// TCP to a service lands on one of its backends (which sees the connection), `getpeername`
/// shows the service address, and a process outside the cgroup reaches the service address
/// itself (here a listener that stands in for "whatever owns that address").
fn tcp_lands_on_backend(
    vip: &'static str,
    b1: &'static str,
    b2: &'static str,
    mapped: Option<&'static str>,
) {
    let mut env = Env::new("tcp");
    let vip_owner = TcpBackend::start(vip, "vip-itself");
    let be1 = TcpBackend::start(b1, "b1");
    let be2 = TcpBackend::start(b2, "b2");
    let f: Frontend = format!("tcp:{vip}").parse().unwrap();
    env.dp()
        .upsert_service(&f, &[backend(b1, 1).with_local(true), backend(b2, 2)])
        .unwrap();

    let mut names = BTreeSet::new();
    let tries = 24;
    for _ in 0..tries {
        let v = env.probe(&["tcp", vip]);
        ok(&v);
        assert_eq!(
            s(&v, "peer"),
            vip,
            "getpeername shows the service address: {v}"
        );
        names.insert(s(&v, "reply").to_owned());
    }
    assert_eq!(
        names,
        BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "random choice reaches both backends"
    );
    assert_eq!(be1.connections() + be2.connections(), tries);
    assert_eq!(vip_owner.connections(), 0);

    let outside = probe_outside(&["tcp", vip]);
    assert_eq!(
        s(ok(&outside), "reply"),
        "vip-itself",
        "outside the cgroup: untouched"
    );
    assert_eq!(vip_owner.connections(), 1);

    let counters = env.dp().counters().unwrap();
    assert_eq!(counters.len(), 2);
    assert_eq!(
        counters.iter().map(|c| c.connections).sum::<u64>(),
        tries as u64
    );
    assert!(counters.iter().any(|c| c.local && c.cluster_id == 1));

    if let Some(mapped) = mapped {
        // A dual-stack socket connecting to the IPv4-mapped service address.
        let v = env.probe(&["tcp", mapped]);
        ok(&v);
        assert!(["b1", "b2"].contains(&s(&v, "reply")), "{v}");
        assert_eq!(s(&v, "peer"), mapped);
    }
}

#[test]
fn tcp_v4_service_lands_on_a_backend_and_outside_is_untouched() {
    in_netns(&["10.96.0.10/32", "10.1.0.1/32", "10.1.0.2/32"], || {
        tcp_lands_on_backend(
            "10.96.0.10:80",
            "10.1.0.1:8080",
            "10.1.0.2:8080",
            Some("[::ffff:10.96.0.10]:80"),
        )
    });
}

#[test]
fn tcp_v6_service_lands_on_a_backend_and_outside_is_untouched() {
    in_netns(
        &["fd00:96::10/128", "fd00:1::1/128", "fd00:1::2/128"],
        || {
            tcp_lands_on_backend(
                "[fd00:96::10]:80",
                "[fd00:1::1]:8080",
                "[fd00:1::2]:8080",
                None,
            )
        },
    );
}

fn udp_request_reply(vip: &'static str, b1: &'static str) {
    let mut env = Env::new("udp");
    let _vip_owner = UdpBackend::start(vip, "vip-itself");
    let be = UdpBackend::start(b1, "b1");
    let f: Frontend = format!("udp:{vip}").parse().unwrap();
    env.dp().upsert_service(&f, &[backend(b1, 1)]).unwrap();

    let unconnected = env.probe(&["udp", vip]);
    ok(&unconnected);
    assert_eq!(s(&unconnected, "reply"), "b1", "{unconnected}");
    assert_eq!(
        s(&unconnected, "from"),
        vip,
        "the reply's source is the service address"
    );

    let connected = env.probe(&["udp", vip, "--connected"]);
    ok(&connected);
    assert_eq!(s(&connected, "reply"), "b1", "{connected}");
    assert_eq!(s(&connected, "peer"), vip, "getpeername: {connected}");
    assert_eq!(s(&connected, "from"), vip, "recvfrom source: {connected}");
    assert_eq!(be.seen.lock().unwrap().len(), 2);

    let outside = probe_outside(&["udp", vip]);
    assert_eq!(s(ok(&outside), "reply"), "vip-itself");
}

#[test]
fn udp_v4_connected_and_unconnected_replies_come_from_the_service() {
    in_netns(&["10.96.0.53/32", "10.1.0.53/32"], || {
        udp_request_reply("10.96.0.53:53", "10.1.0.53:5353")
    });
}

#[test]
fn udp_v6_connected_and_unconnected_replies_come_from_the_service() {
    in_netns(&["fd00:96::53/128", "fd00:1::53/128"], || {
        udp_request_reply("[fd00:96::53]:53", "[fd00:1::53]:5353")
    });
}

#[test]
fn a_service_without_backends_refuses_at_once() {
    in_netns(
        &["10.96.0.20/32", "fd00:96::20/128", "10.1.0.20/32"],
        || {
            let mut env = Env::new("refuse");
            // Something listens on the service addresses themselves: an untranslated connect would
            // succeed, so a refusal can only come from the datapath.
            let _v4_owner = TcpBackend::start("10.96.0.20:80", "vip-itself");
            let _v6_owner = TcpBackend::start("[fd00:96::20]:80", "vip-itself");
            for vip in ["10.96.0.20:80", "[fd00:96::20]:80"] {
                let f = frontend(&format!("tcp:{vip}"));
                env.dp().upsert_service(&f, &[]).unwrap();
                let v = env.probe(&["--timeout-ms", "10000", "tcp", vip]);
                assert_eq!(v["ok"], false, "{v}");
                assert_eq!(v["errno"], 111, "ECONNREFUSED: {v}");
                let elapsed_us = v["elapsed_us"].as_u64().unwrap();
                assert!(
                    elapsed_us < 100_000,
                    "refused at once, took {elapsed_us} us"
                );
                assert_eq!(s(ok(&probe_outside(&["tcp", vip])), "reply"), "vip-itself");
            }
            // UDP too: an unconnected datagram and a connect() of a UDP socket are refused.
            let _udp_owner = UdpBackend::start("10.96.0.20:53", "vip-itself");
            env.dp()
                .upsert_service(&frontend("udp:10.96.0.20:53"), &[])
                .unwrap();
            for args in [
                &["udp", "10.96.0.20:53"][..],
                &["udp", "10.96.0.20:53", "--connected"][..],
            ] {
                let v = env.probe(args);
                assert_eq!(v["errno"], 111, "ECONNREFUSED for {args:?}: {v}");
            }
            // A service that gets a backend again works again.
            let _be = TcpBackend::start("10.1.0.20:8080", "b1");
            env.dp()
                .upsert_service(
                    &frontend("tcp:10.96.0.20:80"),
                    &[backend("10.1.0.20:8080", 1)],
                )
                .unwrap();
            assert_eq!(s(ok(&env.probe(&["tcp", "10.96.0.20:80"])), "reply"), "b1");
            // After delete, connects are left alone.
            assert!(
                env.dp()
                    .delete_service(&frontend("tcp:10.96.0.20:80"))
                    .unwrap()
            );
            assert_eq!(
                s(ok(&env.probe(&["tcp", "10.96.0.20:80"])), "reply"),
                "vip-itself"
            );
        },
    );
}

#[test]
fn swapping_backend_sets_under_thousands_of_connects_never_fails() {
    in_netns(
        &[
            "10.96.0.30/32",
            "10.2.0.1/32",
            "10.2.0.2/32",
            "10.2.0.3/32",
            "10.3.0.1/32",
            "10.3.0.2/32",
        ],
        || {
            let mut env = Env::new("swap");
            let set_a: Vec<&str> = vec!["10.2.0.1:80", "10.2.0.2:80", "10.2.0.3:80"];
            let set_b: Vec<&str> = vec!["10.3.0.1:80", "10.3.0.2:80"];
            let _servers: Vec<TcpBackend> = set_a
                .iter()
                .map(|a| TcpBackend::start(a, &format!("a:{a}")))
                .chain(
                    set_b
                        .iter()
                        .map(|a| TcpBackend::start(a, &format!("b:{a}"))),
                )
                .collect();
            let f = frontend("tcp:10.96.0.30:80");
            let a: Vec<Backend> = set_a.iter().map(|x| backend(x, 1)).collect();
            let b: Vec<Backend> = set_b.iter().map(|x| backend(x, 2)).collect();
            env.dp().upsert_service(&f, &a).unwrap();

            let connections = 20_000;
            let done = Arc::new(AtomicBool::new(false));
            let storm = {
                let cgroup = env.cgroup.path.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let v = probe_in(
                        &cgroup,
                        &[
                            "tcp-storm",
                            "10.96.0.30:80",
                            "--connections",
                            &connections.to_string(),
                            "--threads",
                            "16",
                        ],
                    );
                    done.store(true, Ordering::SeqCst);
                    v
                })
            };
            let mut swaps = 0u64;
            while !done.load(Ordering::SeqCst) {
                let next = if swaps.is_multiple_of(2) { &b } else { &a };
                env.dp().upsert_service(&f, next).unwrap();
                swaps += 1;
            }
            let v = storm.join().unwrap();
            assert_eq!(v["errors"], serde_json::json!({}), "no connect failed: {v}");
            let replies = v["replies"].as_object().unwrap();
            let total: u64 = replies.values().map(|n| n.as_u64().unwrap()).sum();
            assert_eq!(total, connections as u64, "{v}");
            for name in replies.keys() {
                assert!(
                    (name.starts_with("a:") || name.starts_with("b:")) && !name.contains("(peer"),
                    "every connect landed on a backend of one of the two sets, \
                     with the service address as peer: {name}"
                );
            }
            assert!(
                swaps >= 2000,
                "only {swaps} swaps happened during the storm"
            );
            eprintln!("{connections} connects during {swaps} swaps: {v}");
        },
    );
}

fn glb(config: &DatapathConfig, args: &[&str]) -> String {
    let out = Command::new(GLB)
        .arg("--cgroup")
        .arg(&config.cgroup)
        .arg("--pin-dir")
        .arg(&config.pin_dir)
        .args(args)
        .output()
        .expect("spawning glb");
    assert!(
        out.status.success(),
        "glb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn services_keep_working_across_loader_restarts() {
    in_netns(&["10.96.0.40/32", "10.1.0.40/32"], || {
        let name = unique("restart");
        let cgroup = TestCgroup::new(&name);
        let config = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
        let _pins = PinGuard(config.pin_dir.clone());
        let be = TcpBackend::start("10.1.0.40:8080", "b1");
        let _vip_owner = TcpBackend::start("10.96.0.40:80", "vip-itself");

        // Loader process 1 attaches, writes the service and exits.
        glb(
            &config,
            &["upsert", "tcp:10.96.0.40:80", "10.1.0.40:8080@1,local"],
        );
        // No loader runs now; the pinned links and maps carry on.
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.40:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1");

        // Loader process 2 starts on the same pins (reusing them), then a reader lists.
        glb(&config, &["attach"]);
        let listed: serde_json::Value = serde_json::from_str(&glb(&config, &["list"])).unwrap();
        assert_eq!(listed[0]["frontend"]["port"], 80, "{listed}");
        assert_eq!(listed[0]["backends"][0]["port"], 8080, "{listed}");
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.40:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1");

        // And an in-process loader reuses the pinned links instead of attaching again.
        let dp = Datapath::open(&config).unwrap();
        assert_eq!(dp.reused_links(), global_lb_bpf::PROGRAMS.len());
        let counters = dp.counters().unwrap();
        assert_eq!(counters.len(), 1);
        assert_eq!(counters[0].connections, 2, "counters survived too");
        assert_eq!(be.connections(), 2);
        drop(dp);
        let attached = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&config.cgroup)
            .output()
            .expect("bpftool");
        let attached = String::from_utf8_lossy(&attached.stdout);
        assert_eq!(
            attached.matches("connect4").count(),
            1,
            "one connect4 attached after four loader runs:\n{attached}"
        );

        let mut dp = Datapath::open(&config).unwrap();
        dp.delete_service(&frontend("tcp:10.96.0.40:80")).unwrap();
        drop(dp);
        Datapath::remove(&config.pin_dir).unwrap();
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.40:80"]);
        assert_eq!(s(ok(&v), "reply"), "vip-itself", "removed: untouched again");
    });
}

#[test]
fn open_errors_name_the_cgroup_or_pin_directory() {
    let name = unique("errors");
    let missing = DatapathConfig::new(
        format!("/sys/fs/cgroup/unified/{name}-missing"),
        pin_dir(&name),
    );
    let err = Datapath::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Cgroup { .. }), "{err}");
    assert!(err.to_string().contains("-missing"), "{err}");

    let cgroup = TestCgroup::new(&name);
    let _pins = PinGuard(pin_dir(&name));
    let tmp = tempfile::tempdir().unwrap();
    let err = Datapath::open(&DatapathConfig::new(
        cgroup.path.clone(),
        tmp.path().join("pins"),
    ))
    .unwrap_err();
    assert!(matches!(err, Error::NotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("bpf filesystem"), "{err}");

    let err = Datapath::open(&DatapathConfig::new(tmp.path(), pin_dir(&name))).unwrap_err();
    assert!(matches!(err, Error::NotCgroup2 { .. }), "{err}");

    let mut dp = Datapath::open(&DatapathConfig::new(cgroup.path.clone(), pin_dir(&name))).unwrap();
    let err = dp
        .upsert_service(
            &Frontend::new("10.96.0.1".parse().unwrap(), 80, Proto::Udp),
            &[backend("[fd00::1]:80", 1)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("address family"), "{err}");
    drop(dp);
    Datapath::remove(&pin_dir(&name)).unwrap();
}

#[test]
fn one_writer_per_pin_directory_and_readers_alongside() {
    let name = unique("busy");
    let cgroup = TestCgroup::new(&name);
    let config = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
    let _pins = PinGuard(config.pin_dir.clone());
    let mut dp = Datapath::open(&config).unwrap();
    dp.upsert_service(
        &frontend("tcp:10.96.0.50:80"),
        &[backend("10.1.0.50:80", 3)],
    )
    .unwrap();
    let err = Datapath::open(&config).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    // A reader sees the writer's services and changes nothing.
    let view = Datapath::inspect(&config.pin_dir).unwrap();
    let services = view.services().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].backends[0].cluster_id, 3);
    drop(view);
    drop(dp);
    // Once the writer is gone the next one gets in.
    let dp = Datapath::open(&config).unwrap();
    assert_eq!(dp.services().unwrap().len(), 1);
    drop(dp);
    Datapath::remove(&config.pin_dir).unwrap();
}

#[test]
fn a_pinned_program_of_another_build_is_replaced_without_a_gap() {
    in_netns(&["10.96.0.60/32", "10.1.0.60/32"], || {
        let mut env = Env::new("upgrade");
        let _be = TcpBackend::start("10.1.0.60:8080", "b1");
        let _vip_owner = TcpBackend::start("10.96.0.60:80", "vip-itself");
        env.dp()
            .upsert_service(
                &frontend("tcp:10.96.0.60:80"),
                &[backend("10.1.0.60:8080", 1)],
            )
            .unwrap();
        env.dp.take();
        // Stand-in for "an older build": the link pinned as connect4 now holds another program
        // (sendmsg4's), and the sendmsg4 pin is gone.
        let pins = env.config.pin_dir.clone();
        std::fs::rename(pins.join("link_sendmsg4"), pins.join("link_connect4")).unwrap();
        // The replaced pin's link is released after an RCU grace period (bpffs frees its inodes
        // that way), so the old connect4 stays attached for a moment: wait until the kernel no
        // longer lists it (it has no event to wait on), at most 10 s.
        let attached = |program: &str| {
            let shown = Command::new("bpftool")
                .args(["cgroup", "show"])
                .arg(&env.config.cgroup)
                .output()
                .expect("bpftool");
            String::from_utf8_lossy(&shown.stdout)
                .matches(&format!(" {program} "))
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while attached("connect4") > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the replaced connect4 link is still attached after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Until a loader runs again, TCP connects are not translated.
        assert_eq!(
            s(ok(&env.probe(&["tcp", "10.96.0.60:80"])), "reply"),
            "vip-itself"
        );

        let dp = Datapath::open(&env.config).unwrap();
        assert_eq!(dp.replaced_links(), 1);
        assert_eq!(dp.reused_links(), global_lb_bpf::PROGRAMS.len() - 2);
        env.dp = Some(dp);
        assert_eq!(s(ok(&env.probe(&["tcp", "10.96.0.60:80"])), "reply"), "b1");
        let shown = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&env.config.cgroup)
            .output()
            .expect("bpftool");
        let shown = String::from_utf8_lossy(&shown.stdout);
        for program in global_lb_bpf::PROGRAMS {
            assert_eq!(
                shown.matches(&format!(" {program} ")).count(),
                1,
                "exactly one {program} attached:\n{shown}"
            );
        }
        assert!(!pins.join("link_connect4_new").exists());
    });
}

#[test]
fn weights_share_connections_by_slot_replication() {
    in_netns(&["10.96.0.70/32", "10.1.0.71/32", "10.1.0.72/32"], || {
        let mut env = Env::new("weights");
        let _heavy = TcpBackend::start("10.1.0.71:80", "heavy");
        let _light = TcpBackend::start("10.1.0.72:80", "light");
        env.dp()
            .upsert_service(
                &frontend("tcp:10.96.0.70:80"),
                &[
                    backend("10.1.0.71:80", 1).with_weight(3),
                    backend("10.1.0.72:80", 1),
                ],
            )
            .unwrap();
        let v = env.probe(&[
            "tcp-storm",
            "10.96.0.70:80",
            "--connections",
            "2000",
            "--threads",
            "4",
        ]);
        ok(&v);
        let heavy = v["replies"]["heavy"].as_u64().unwrap_or(0) as f64;
        let light = v["replies"]["light"].as_u64().unwrap_or(0) as f64;
        assert_eq!(heavy + light, 2000.0, "{v}");
        // Expected share 0.75; 2000 draws put 6 standard deviations within +-0.06.
        let share = heavy / 2000.0;
        assert!((0.69..=0.81).contains(&share), "heavy share {share}: {v}");
    });
}

/// `bpftool` with `args`; panics with its stderr when it fails.
fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool (needed to create maps of another layout)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes as `bpftool` wants them: `hex 0a 60 ...`.
fn hex(bytes: &[u8]) -> Vec<String> {
    std::iter::once("hex".to_owned())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect()
}

/// A services-map key (the layout of `global-lb-bpf-common`): IPv4-mapped address, port in
/// network order, protocol, pad, slot.
fn key_bytes(ip: [u8; 4], port: u16, proto: u8, slot: u32) -> Vec<u8> {
    let mut k = vec![0u8; 10];
    k.extend([0xff, 0xff]);
    k.extend(ip);
    k.extend(port.to_be_bytes());
    k.extend([proto, 0]);
    k.extend(slot.to_ne_bytes());
    k
}

fn map_update(path: &std::path::Path, key: &[u8], value: &[u8]) {
    let path = path.to_str().unwrap();
    let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into(), path.into()];
    args.push("key".into());
    args.extend(hex(key));
    args.push("value".into());
    args.extend(hex(value));
    bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Pinned maps of the first layout (16-byte slot values, programs looked backends up by id):
/// the loader replaces them by maps of this layout, carries the service over (it keeps
/// working), and says so; maps of a layout it cannot read are replaced empty, never misread.
#[test]
fn pinned_maps_of_another_layout_are_replaced_and_services_carried_over() {
    in_netns(&["10.96.0.80/32", "10.96.0.81/32", "10.1.0.80/32"], || {
        let name = unique("layout");
        let cgroup = TestCgroup::new(&name);
        let config = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
        let _pins = PinGuard(config.pin_dir.clone());
        std::fs::create_dir_all(&config.pin_dir).unwrap();
        let _be = TcpBackend::start("10.1.0.80:8080", "b1");
        let _vip_owner = TcpBackend::start("10.96.0.80:80", "vip-itself");

        // The first layout, as an older build pinned it: tcp:10.96.0.80:80 -> backend 7.
        let services = config.pin_dir.join("GLB_SERVICES");
        let backends = config.pin_dir.join("GLB_BACKENDS");
        for (path, key, value, entries) in [
            (&services, "24", "16", "524288"),
            (&backends, "4", "24", "65536"),
        ] {
            let name = path.file_name().unwrap().to_str().unwrap();
            bpftool(&[
                "map",
                "create",
                path.to_str().unwrap(),
                "type",
                "hash",
                "key",
                key,
                "value",
                value,
                "entries",
                entries,
                "name",
                name,
                "flags",
                "1",
            ]);
        }
        let word = |v: u32| v.to_ne_bytes();
        let slot0: Vec<u8> = [word(0), word(1), word(42), word(0)].concat();
        let slot1: Vec<u8> = [word(7), word(0), word(42), word(0)].concat();
        map_update(&services, &key_bytes([10, 96, 0, 80], 80, 6, 0), &slot0);
        map_update(&services, &key_bytes([10, 96, 0, 80], 80, 6, 1), &slot1);
        let mut value = vec![0u8; 10];
        value.extend([0xff, 0xff, 10, 1, 0, 80]);
        value.extend(8080u16.to_be_bytes());
        value.extend(3u16.to_ne_bytes()); // cluster id
        value.extend([1, 4, 0, 0]); // local, IPv4, pad
        map_update(&backends, &7u32.to_ne_bytes(), &value);

        // A reader of this build refuses the old layout, saying what to do.
        let err = Datapath::inspect(&config.pin_dir)
            .err()
            .expect("old layout refused");
        assert!(matches!(err, Error::MapLayout { .. }), "{err}");
        assert!(err.to_string().contains("another layout"), "{err}");

        let dp = Datapath::open(&config).unwrap();
        let listed = dp.services().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].frontend, frontend("tcp:10.96.0.80:80"));
        assert_eq!(
            listed[0].backends,
            vec![backend("10.1.0.80:8080", 3).with_local(true)]
        );
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.80:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1", "carried over: {v}");
        assert_eq!(s(&v, "peer"), "10.96.0.80:80");
        let info = aya::maps::MapInfo::from_pin(&services).unwrap();
        assert_eq!(
            info.value_size() as usize,
            std::mem::size_of::<global_lb_bpf_common::ServiceValue>()
        );
        drop(dp);
        // The next start finds this layout and reuses it as it is.
        let dp = Datapath::open(&config).unwrap();
        assert_eq!(dp.reused_links(), global_lb_bpf::PROGRAMS.len());
        assert_eq!(dp.services().unwrap(), listed);
        drop(dp);

        // A map pin gone (as after an upgrade from a build without the pre-filter map): a new
        // one is made and filled, and the programs that use it (connect and sendmsg, v4 and
        // v6), though of this build, are replaced so they use it; those that do not (recvmsg,
        // getpeername) keep running: a service written afterwards works.
        std::fs::remove_file(config.pin_dir.join("GLB_FILTER")).unwrap();
        let mut dp = Datapath::open(&config).unwrap();
        assert_eq!(dp.replaced_links(), 4);
        assert_eq!(dp.reused_links(), global_lb_bpf::PROGRAMS.len() - 4);
        assert_eq!(
            s(
                ok(&probe_in(&cgroup.path, &["tcp", "10.96.0.80:80"])),
                "reply"
            ),
            "b1"
        );
        let _vip2_owner = TcpBackend::start("10.96.0.81:80", "vip2-itself");
        dp.upsert_service(
            &frontend("tcp:10.96.0.81:80"),
            &[backend("10.1.0.80:8080", 3)],
        )
        .unwrap();
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.81:80"]);
        assert_eq!(
            s(ok(&v), "reply"),
            "b1",
            "new service through the new filter: {v}"
        );
        drop(dp);

        // A layout nobody can read (20-byte slot values): replaced, empty.
        Datapath::remove(&config.pin_dir).unwrap();
        std::fs::create_dir_all(&config.pin_dir).unwrap();
        bpftool(&[
            "map",
            "create",
            services.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "24",
            "value",
            "20",
            "entries",
            "16",
            "name",
            "GLB_SERVICES",
        ]);
        map_update(&services, &key_bytes([10, 96, 0, 80], 80, 6, 0), &[0u8; 20]);
        let dp = Datapath::open(&config).unwrap();
        assert!(dp.services().unwrap().is_empty());
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.80:80"]);
        assert_eq!(s(ok(&v), "reply"), "vip-itself", "nothing misread: {v}");
    });
}

/// `n` backends at 10.200.0.0 onwards, port 80, cluster 2 (never connected to).
fn filler(from: u32, n: u32) -> Vec<Backend> {
    (from..from + n)
        .map(|i| Backend::new(std::net::Ipv4Addr::from(0x0ac8_0000 + i).into(), 80, 2))
        .collect()
}

/// A backends map bigger than the default (node-sync --max-backends): more backends than the
/// default holds are programmed, a connect reaches a backend whose id is past the default
/// capacity and is counted there; reopening with a capacity too small for them is refused with
/// the reason while the pinned maps keep serving; a bigger one resizes them, services carried.
#[test]
fn a_bigger_backends_map_holds_more_and_is_resized_across_restarts() {
    in_netns(&["10.96.0.90/32", "10.1.0.90/32"], || {
        let name = unique("capacity");
        let cgroup = TestCgroup::new(&name);
        let big = global_lb_bpf::DEFAULT_MAX_BACKENDS * 2;
        let config =
            DatapathConfig::new(cgroup.path.clone(), pin_dir(&name)).with_max_backends(big);
        let _pins = PinGuard(config.pin_dir.clone());
        let be = TcpBackend::start("10.1.0.90:8080", "b1");
        let vip = frontend("tcp:10.96.0.90:80");

        let mut dp = Datapath::open(&config).unwrap();
        let half = global_lb_bpf::DEFAULT_MAX_BACKENDS / 2;
        dp.upsert_service(&frontend("tcp:10.96.1.1:80"), &filler(0, half))
            .unwrap();
        dp.upsert_service(&frontend("tcp:10.96.1.2:80"), &filler(half, half))
            .unwrap();
        // The 65,537th backend: its id (and counter index) is past the default capacity.
        dp.upsert_service(&vip, &[backend("10.1.0.90:8080", 1).with_local(true)])
            .unwrap();
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.90:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1");
        assert_eq!(be.connections(), 1);
        let counted: Vec<_> = dp
            .counters()
            .unwrap()
            .into_iter()
            .filter(|c| c.connections > 0)
            .collect();
        assert_eq!(counted.len(), 1, "{counted:?}");
        assert!(
            counted[0].backend_id > global_lb_bpf::DEFAULT_MAX_BACKENDS,
            "{counted:?}"
        );
        drop(dp);

        // Back to the default capacity: the programmed backends do not fit.
        let small = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
        let err = Datapath::open(&small).unwrap_err();
        assert!(
            matches!(&err, Error::MapLayout { map, .. } if *map == "GLB_BACKENDS"),
            "{err}"
        );
        assert!(err.to_string().contains("keep serving"), "{err}");
        assert_eq!(
            Datapath::pinned_max_backends(&config.pin_dir).unwrap(),
            Some(big)
        );
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.90:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1", "the pinned maps still serve");

        // Bigger again: resized, every service carried over.
        let bigger = config.clone().with_max_backends(big * 2);
        let dp = Datapath::open(&bigger).unwrap();
        assert_eq!(
            Datapath::pinned_max_backends(&config.pin_dir).unwrap(),
            Some(big * 2)
        );
        let services = dp.services().unwrap();
        assert_eq!(services.len(), 3);
        assert_eq!(
            services.iter().map(|s| s.backends.len()).sum::<usize>(),
            2 * half as usize + 1
        );
        let v = probe_in(&cgroup.path, &["tcp", "10.96.0.90:80"]);
        assert_eq!(s(ok(&v), "reply"), "b1", "served by the resized maps");
        assert_eq!(be.connections(), 3);
        // A reader (`glb list`) finds the capacity the datapath was opened with, and `glb
        // attach` without --max-backends keeps it.
        assert_eq!(
            Datapath::inspect(&config.pin_dir)
                .unwrap()
                .services()
                .unwrap()
                .len(),
            3
        );
        drop(dp);
        glb(&config, &["attach"]);
        assert_eq!(
            Datapath::pinned_max_backends(&config.pin_dir).unwrap(),
            Some(big * 2)
        );
    });
}
