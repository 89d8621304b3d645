//! `glb-probe`: a client that reports what a socket saw, as one JSON line, for checking the
//! datapath by hand and from the integration tests (run it inside the load-balanced cgroup).
//!
//! - `glb-probe tcp ADDR`: connect, `getpeername`, read the server's reply to EOF.
//! - `glb-probe udp ADDR [--connected]`: send one datagram, receive the reply and its source.
//! - `glb-probe tcp-storm ADDR --connections N --threads T`: N connects from T threads; prints
//!   how many replies each server name got and every error.
//! - `glb-probe hold ...`: many translated sockets open at once (unconnected UDP sockets that
//!   each send to several services, then TCP connections to a service), then every one of them
//!   asked what it sees: `getpeername` for TCP, the source of each queued reply for
//!   UDP. Serves the backends itself. Repeats for `--rounds`, reporting the kernel's slab memory
//!   of memcg-accounted `kmalloc` objects (where socket-local storage lives) before, while open,
//!   and after the close of every round.
//!
//! Failures are reported in the JSON (`ok: false`, `errno`, `error`), with the exit code 0, so a
//! caller can assert on them.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use global_lb_bpf_common::{ConnSlot, SOCK_CONN_MAP};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "glb-probe",
    about = "Report what a client socket sees through the datapath"
)]
struct Args {
    /// Give up on a connect or reply after this long.
    #[arg(long, env = "GLB_PROBE_TIMEOUT_MS", default_value_t = 3000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One TCP connection.
    Tcp {
        /// Where to connect.
        addr: SocketAddr,
    },
    /// One UDP request and reply.
    Udp {
        /// Where to send.
        addr: SocketAddr,
        /// connect() the socket first (otherwise sendto/recvfrom).
        #[arg(long)]
        connected: bool,
    },
    /// Many TCP connections from several threads.
    TcpStorm {
        /// Where to connect.
        addr: SocketAddr,
        /// Total connections.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Concurrent threads.
        #[arg(long, default_value_t = 16)]
        threads: usize,
    },
    /// Many translated sockets open at once, then asked what they see.
    Hold(HoldArgs),
    /// (internal) One process's share of `hold`'s client sockets.
    #[command(hide = true)]
    HoldWorker(WorkerArgs),
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    #[arg(long)]
    tcp: Option<SocketAddr>,
    #[arg(long, default_value_t = 0)]
    tcp_first: usize,
    #[arg(long, default_value_t = 0)]
    tcp_count: usize,
    #[arg(long)]
    udp: Vec<String>,
    #[arg(long, default_value_t = 0)]
    udp_first: usize,
    #[arg(long, default_value_t = 0)]
    udp_count: usize,
    #[arg(long)]
    source: IpAddr,
    #[arg(long, default_value_t = 1)]
    sources: u32,
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    #[arg(long)]
    drop_storage: bool,
}

#[derive(Debug, clap::Args)]
struct HoldArgs {
    /// A TCP service: SERVICE=BACKEND[,...] (the probe listens on the backends itself).
    #[arg(long)]
    tcp: Option<String>,
    /// TCP connections to hold open at once.
    #[arg(long, default_value_t = 0)]
    tcp_sockets: usize,
    /// UDP services, SERVICE=BACKEND each (one backend per service; the probe serves them and
    /// each replies with its own address). Every UDP socket sends one datagram to each.
    #[arg(long, value_delimiter = ' ', num_args = 1..)]
    udp: Vec<String>,
    /// Unconnected UDP sockets to hold open at once.
    #[arg(long, default_value_t = 0)]
    udp_sockets: usize,
    /// First source address client sockets bind to; socket `i` binds to this plus `i % sources`
    /// (so the 4-tuples do not run out of ephemeral ports).
    #[arg(long)]
    source: IpAddr,
    /// How many consecutive source addresses to use (from `--source`).
    #[arg(long, default_value_t = 1)]
    sources: u32,
    /// Open, check and close everything this many times.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The datapath's pin directory: also count where the TCP sockets' state is (the connection
    /// table's live slots, each socket's own storage) while open, and the table's live slots
    /// after they closed.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// After the last round, wait (up to the timeout) for the accounted kmalloc memory to come
    /// back within this many bytes of what it was before the first round.
    #[arg(long, default_value_t = 4 << 20)]
    settle_bytes: u64,
    /// Once everything is open (before the checks), print a JSON line with every socket's local
    /// address and wait for a line on stdin (a test changes the datapath meanwhile).
    #[arg(long)]
    pause: bool,
    /// Once everything is open, delete every socket's reverse-NAT state (its socket-local
    /// storage, and every slot of the connection table; needs `--pin-dir`): what a socket
    /// translated by a build that kept that state elsewhere looks like.
    #[arg(long)]
    drop_storage: bool,
}

fn error_json(e: &std::io::Error, started: Instant) -> Value {
    json!({
        "ok": false,
        "errno": e.raw_os_error(),
        "error": e.to_string(),
        "elapsed_us": started.elapsed().as_micros() as u64,
    })
}

fn tcp_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((peer, reply.trim().to_owned()))
}

fn tcp(addr: SocketAddr, timeout: Duration) -> Value {
    let started = Instant::now();
    match tcp_once(addr, timeout) {
        Ok((peer, reply)) => json!({
            "ok": true,
            "peer": peer.to_string(),
            "reply": reply,
            "elapsed_us": started.elapsed().as_micros() as u64,
        }),
        Err(e) => error_json(&e, started),
    }
}

fn udp(addr: SocketAddr, connected: bool, timeout: Duration) -> Value {
    let started = Instant::now();
    let run = || -> std::io::Result<Value> {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(timeout))?;
        let mut peer = None;
        if connected {
            s.connect(addr)?;
            peer = Some(s.peer_addr()?.to_string());
            s.send(b"ping")?;
        } else {
            s.send_to(b"ping", addr)?;
        }
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(json!({
            "ok": true,
            "peer": peer,
            "from": from.to_string(),
            "reply": String::from_utf8_lossy(&buf[..n]).trim(),
            "elapsed_us": started.elapsed().as_micros() as u64,
        }))
    };
    run().unwrap_or_else(|e| error_json(&e, started))
}

fn tcp_storm(addr: SocketAddr, connections: usize, threads: usize, timeout: Duration) -> Value {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let replies: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, replies, errors) = (next.clone(), replies.clone(), errors.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < connections {
                    let outcome = tcp_once(addr, timeout);
                    match outcome {
                        Ok((peer, reply)) => {
                            let key = if peer == addr {
                                reply
                            } else {
                                format!("{reply} (peer {peer})")
                            };
                            *replies.lock().expect("lock").entry(key).or_default() += 1;
                        }
                        Err(e) => {
                            let key = match e.kind() {
                                ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                                    format!("timeout: {e}")
                                }
                                _ => e.to_string(),
                            };
                            *errors.lock().expect("lock").entry(key).or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let replies = replies.lock().expect("lock").clone();
    let errors = errors.lock().expect("lock").clone();
    json!({
        "ok": errors.is_empty(),
        "replies": replies,
        "errors": errors,
        "elapsed_us": started.elapsed().as_micros() as u64,
    })
}

/// `base + i` in the address's low bits.
fn nth_addr(base: IpAddr, i: u32) -> IpAddr {
    match base {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + i).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(i)).into()),
    }
}

fn parse_pair(s: &str) -> Result<(SocketAddr, Vec<SocketAddr>)> {
    let (svc, backends) = s
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{s:?}: want SERVICE=BACKEND[,BACKEND...]"))?;
    let backends = backends
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    Ok((svc.parse()?, backends))
}

fn family(addr: &IpAddr) -> nix::sys::socket::AddressFamily {
    if addr.is_ipv4() {
        nix::sys::socket::AddressFamily::Inet
    } else {
        nix::sys::socket::AddressFamily::Inet6
    }
}

/// A socket of `kind` bound to `source` (port chosen by the kernel).
fn bound_socket(source: IpAddr, kind: nix::sys::socket::SockType) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{SockFlag, SockaddrStorage, bind, socket};
    let fd = socket(family(&source), kind, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )?;
    Ok(fd)
}

/// The connection table pinned under `pin_dir`.
fn conn_table(pin_dir: &Path) -> Result<aya::maps::Array<aya::maps::MapData, ConnSlot>> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(SOCK_CONN_MAP))?;
    Ok(aya::maps::Array::try_from(aya::maps::Map::Array(data))?)
}

/// Slots of the connection table held by a socket.
fn live_slots(pin_dir: &Path) -> Result<u64> {
    let table = conn_table(pin_dir)?;
    let mut live = 0;
    for slot in table.iter() {
        if slot?.cookie != 0 {
            live += 1;
        }
    }
    Ok(live)
}

/// Bytes of memcg-accounted kmalloc objects in use (`kmalloc-cg-*` in /proc/slabinfo): where the
/// kernel allocates socket-local storage.
fn kmalloc_cg_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo")?;
    let mut total = 0u64;
    for line in text.lines().filter(|l| l.starts_with("kmalloc-cg-")) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let (Some(active), Some(size)) = (cols.get(1), cols.get(3)) {
            total += active.parse::<u64>()? * size.parse::<u64>()?;
        }
    }
    Ok(total)
}

/// A listener on `addr` that never accepts: connections complete their handshake and wait in its
/// accept queue (4096 at most), costing this process no descriptor. Several share the address
/// (`SO_REUSEPORT`) when more connections must wait at once.
fn queue_listener(addr: SocketAddr) -> Result<OwnedFd> {
    use nix::sys::socket::{Backlog, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt};
    let fd = nix::sys::socket::socket(
        family(&addr.ip()),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix::sys::socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(fd)
}

/// A UDP backend on `addr` that answers every datagram with its own address, until `stop`.
fn udp_echo(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    // Room for every client's datagrams at once: the clients send faster than one thread echoes.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))?;
    let name = addr.to_string();
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), from);
            }
        }
    }))
}

/// Sockets one `hold-worker` process holds (a process may not have more than the hard
/// RLIMIT_NOFILE descriptors open, and raising that needs CAP_SYS_RESOURCE).
const PER_WORKER: usize = 15_000;

/// Coordinates `hold`: serves the backends, runs the workers that hold the client sockets (one
/// after the other, so the first worker's sockets are the oldest), collects what they saw.
fn hold(args: &HoldArgs, timeout: Duration) -> Result<Value> {
    let started = Instant::now();
    let tcp = args.tcp.as_deref().map(parse_pair).transpose()?;
    let udp = args
        .udp
        .iter()
        .map(|s| parse_pair(s))
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut servers = Vec::new();
    for (_, backends) in &udp {
        for b in backends {
            servers.push(udp_echo(*b, stop.clone())?);
        }
    }
    let exe = std::env::current_exe()?;
    let mut rounds = Vec::new();
    let baseline = kmalloc_cg_bytes()?;
    for _ in 0..args.rounds.max(1) {
        // Listeners per round: what waits in their queues goes with them.
        let mut listeners = Vec::new();
        if let Some((_, backends)) = &tcp {
            let per_backend = args.tcp_sockets.div_ceil(backends.len().max(1));
            // 3000 per queue on average leaves room for an uneven SO_REUSEPORT spread.
            for b in backends {
                for _ in 0..per_backend.div_ceil(3000).max(1) {
                    listeners.push(queue_listener(*b)?);
                }
            }
        }
        let before = kmalloc_cg_bytes()?;
        let round_started = Instant::now();
        let mut workers = Vec::new();
        let mut tcp_local = Vec::new();
        let mut udp_local = Vec::new();
        let (mut tcp_next, mut udp_next) = (0usize, 0usize);
        while tcp_next < args.tcp_sockets || udp_next < args.udp_sockets {
            // UDP sockets first: they are the oldest, with 100k TCP connections opened after them.
            let udp_n = (args.udp_sockets - udp_next).min(PER_WORKER);
            let tcp_n = (args.tcp_sockets - tcp_next).min(PER_WORKER - udp_n);
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--timeout-ms")
                .arg(timeout.as_millis().to_string())
                .arg("hold-worker")
                .args(["--source", &args.source.to_string()])
                .args(["--sources", &args.sources.to_string()])
                .args(["--tcp-first", &tcp_next.to_string()])
                .args(["--tcp-count", &tcp_n.to_string()])
                .args(["--udp-first", &udp_next.to_string()])
                .args(["--udp-count", &udp_n.to_string()]);
            if let Some((svc, _)) = &tcp {
                cmd.args(["--tcp", &svc.to_string()]);
            }
            for (svc, backends) in &udp {
                let b = backends.iter().map(ToString::to_string).collect::<Vec<_>>();
                cmd.args(["--udp", &format!("{svc}={}", b.join(","))]);
            }
            if let Some(dir) = &args.pin_dir {
                cmd.arg("--pin-dir").arg(dir);
            }
            if args.drop_storage {
                cmd.arg("--drop-storage");
            }
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            let mut child = cmd.spawn()?;
            let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line)?;
            let opened: Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("hold-worker said {line:?}: {e}"))?;
            anyhow::ensure!(opened["opened"] == json!(true), "hold-worker: {opened}");
            for (key, all) in [("tcp_local", &mut tcp_local), ("udp_local", &mut udp_local)] {
                all.extend(opened[key].as_array().cloned().unwrap_or_default());
            }
            workers.push((child, out));
            tcp_next += tcp_n;
            udp_next += udp_n;
        }
        let opened_ms = round_started.elapsed().as_millis() as u64;
        let while_open = kmalloc_cg_bytes()?;
        let table_open = args.pin_dir.as_deref().map(live_slots).transpose()?;
        if args.pause {
            println!(
                "{}",
                json!({"opened": true, "tcp_local": tcp_local, "udp_local": udp_local})
            );
            std::io::Write::flush(&mut std::io::stdout())?;
            let mut go = String::new();
            std::io::stdin().read_line(&mut go)?;
        }
        // Oldest first: what each socket sees now that all the others exist.
        let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
        let mut examples = serde_json::Map::new();
        for (child, out) in &mut workers {
            let stdin = child.stdin.as_mut().expect("piped");
            std::io::Write::write_all(stdin, b"check\n")?;
            let mut line = String::new();
            std::io::BufRead::read_line(out, &mut line)?;
            let r: Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("hold-worker said {line:?}: {e}"))?;
            anyhow::ensure!(r["ok"] == json!(true), "hold-worker: {r}");
            for key in [
                "tcp_wrong_peer",
                "tcp_in_storage",
                "udp_replies_wrong_source",
                "udp_replies_missing",
            ] {
                *sums.entry(key).or_default() += r[key].as_u64().unwrap_or(0);
            }
            for key in ["tcp_example", "udp_example"] {
                if !examples.contains_key(key) && !r[key].is_null() {
                    examples.insert(key.to_owned(), r[key].clone());
                }
            }
        }
        let checked_ms = round_started.elapsed().as_millis() as u64;
        for (mut child, _) in workers {
            drop(child.stdin.take());
            let status = child.wait()?;
            anyhow::ensure!(status.success(), "hold-worker exited with {status}");
        }
        drop(listeners);
        // Every worker has exited: its sockets are closed and sock_release has run for each.
        let table_closed = args.pin_dir.as_deref().map(live_slots).transpose()?;
        let mut round = json!({
            "tcp_sockets": args.tcp_sockets,
            "udp_sockets": args.udp_sockets,
            "opened_ms": opened_ms,
            "checked_ms": checked_ms,
            "kmalloc_cg_before": before,
            "kmalloc_cg_open": while_open,
            "table_slots_open": table_open,
            "table_slots_closed": table_closed,
        });
        for (k, v) in sums {
            round[k] = json!(v);
        }
        for (k, v) in examples {
            round[k] = v;
        }
        rounds.push(round);
    }
    stop.store(true, Ordering::SeqCst);
    for s in servers {
        let _ = s.join();
    }
    // Socket memory is freed after an RCU grace period: wait (up to the timeout) for the
    // accounted kmalloc memory to come back within `--settle-bytes` of what it was before the
    // first round; report what it is then.
    let deadline = Instant::now() + timeout;
    let mut after = kmalloc_cg_bytes()?;
    while after > baseline + args.settle_bytes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = kmalloc_cg_bytes()?;
    }
    Ok(json!({
        "ok": true,
        "rounds": rounds,
        "kmalloc_cg_baseline": baseline,
        "kmalloc_cg_after": after,
        "elapsed_us": started.elapsed().as_micros() as u64,
    }))
}

/// One `hold` worker: opens its share of the client sockets, says so (with their local
/// addresses), waits for a line on stdin, then checks every one, oldest first, and reports.
fn hold_worker(args: &WorkerArgs, timeout: Duration) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::socket::{SockType, SockaddrStorage, connect};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let udp = args
        .udp
        .iter()
        .map(|s| parse_pair(s))
        .collect::<Result<Vec<_>>>()?;
    let (mut storage, mut udp_storage) = match &args.pin_dir {
        Some(dir) => {
            use global_lb_bpf_common::{
                SOCK_REV_NAT_MAP, SOCK_REV_NAT_UDP_MAP, SockConn, SockRevNatUdp,
            };
            let open = |name: &str| -> Result<aya::maps::Map> {
                Ok(aya::maps::Map::SkStorage(aya::maps::MapData::from_pin(
                    dir.join(name),
                )?))
            };
            (
                Some(aya::maps::SkStorage::<_, SockConn>::try_from(open(
                    SOCK_REV_NAT_MAP,
                )?)?),
                Some(aya::maps::SkStorage::<_, SockRevNatUdp>::try_from(open(
                    SOCK_REV_NAT_UDP_MAP,
                )?)?),
            )
        }
        None => (None, None),
    };
    anyhow::ensure!(
        !args.drop_storage || storage.is_some(),
        "--drop-storage needs --pin-dir"
    );
    let source = |i: usize| nth_addr(args.source, (i as u32) % args.sources.max(1));
    let mut udp_socks = Vec::with_capacity(args.udp_count);
    for i in args.udp_first..args.udp_first + args.udp_count {
        let s = UdpSocket::from(bound_socket(source(i), SockType::Datagram)?);
        s.set_read_timeout(Some(timeout))?;
        for (svc, _) in &udp {
            s.send_to(b"ping", svc)?;
        }
        udp_socks.push(s);
    }
    let mut tcp_socks = Vec::with_capacity(args.tcp_count);
    if let Some(svc) = &args.tcp {
        for i in args.tcp_first..args.tcp_first + args.tcp_count {
            let fd = bound_socket(source(i), SockType::Stream)?;
            connect(fd.as_raw_fd(), &SockaddrStorage::from(*svc))
                .map_err(|e| anyhow::anyhow!("connect #{i} to {svc}: {e}"))?;
            tcp_socks.push(TcpStream::from(fd));
        }
    }
    if args.drop_storage
        && let (Some(st), Some(ust), Some(dir)) = (&mut storage, &mut udp_storage, &args.pin_dir)
    {
        for s in &tcp_socks {
            // A socket whose state is in the table has no storage.
            let _ = st.remove(s);
        }
        for s in &udp_socks {
            ust.remove(s)?;
        }
        let mut table = conn_table(dir)?;
        for i in 0..global_lb_bpf_common::MAX_SOCK_CONN {
            table.set(i, ConnSlot::default(), 0)?;
        }
    }
    let local = |a: std::io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    println!(
        "{}",
        json!({
            "opened": true,
            "tcp_local": tcp_socks.iter().map(|s| local(s.local_addr())).collect::<Vec<_>>(),
            "udp_local": udp_socks.iter().map(|s| local(s.local_addr())).collect::<Vec<_>>(),
        })
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;

    let mut tcp_wrong = 0usize;
    let mut tcp_example = Value::Null;
    let mut in_storage = 0usize;
    if let Some(svc) = &args.tcp {
        for (i, s) in tcp_socks.iter().enumerate() {
            let peer = s.peer_addr();
            if peer.as_ref().ok() != Some(svc) {
                tcp_wrong += 1;
                if tcp_example.is_null() {
                    tcp_example =
                        json!({"socket": args.tcp_first + i, "peer": format!("{peer:?}")});
                }
            }
            if let Some(st) = &storage
                && st.get(s, 0).is_ok()
            {
                in_storage += 1;
            }
        }
    }
    let service_of: BTreeMap<String, SocketAddr> = udp
        .iter()
        .flat_map(|(svc, bs)| bs.iter().map(move |b| (b.to_string(), *svc)))
        .collect();
    let mut udp_wrong = 0usize;
    let mut udp_missing = 0usize;
    let mut udp_example = Value::Null;
    let mut buf = [0u8; 64];
    for (i, s) in udp_socks.iter().enumerate() {
        for _ in 0..udp.len() {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let backend = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if service_of.get(&backend) != Some(&from) {
                        udp_wrong += 1;
                        if udp_example.is_null() {
                            udp_example = json!({"socket": args.udp_first + i,
                                                 "reply_from_backend": backend,
                                                 "source_seen": from.to_string()});
                        }
                    }
                }
                Err(_) => udp_missing += 1,
            }
        }
    }
    println!(
        "{}",
        json!({
            "ok": true,
            "tcp_wrong_peer": tcp_wrong,
            "tcp_example": tcp_example,
            "tcp_in_storage": in_storage,
            "udp_replies_wrong_source": udp_wrong,
            "udp_replies_missing": udp_missing,
            "udp_example": udp_example,
        })
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    // Closes every socket on the way out once the coordinator is done with this worker.
    let mut done = String::new();
    std::io::stdin().read_line(&mut done)?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms);
    let out = match args.command {
        Command::Tcp { addr } => tcp(addr, timeout),
        Command::Udp { addr, connected } => udp(addr, connected, timeout),
        Command::TcpStorm {
            addr,
            connections,
            threads,
        } => tcp_storm(addr, connections, threads, timeout),
        Command::Hold(hold_args) => hold(&hold_args, timeout)
            .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")})),
        Command::HoldWorker(worker) => {
            if let Err(e) = hold_worker(&worker, timeout) {
                println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            }
            return Ok(());
        }
    };
    println!("{out}");
    Ok(())
}
