//! connect() latency through the eBPF socket load balancer vs straight to the backend, at 1k,
//! 10k, 30k and 100k services, and through nftables DNAT (one map lookup; one rule per service)
//! at 10k, 30k and 100k services, measured in one run, with a side-by-side summary.
//!
//! Everything happens inside a network namespace private to this process (gone when it exits),
//! with a fresh cgroup v2 directory for the datapath (removed at the end). The client is this
//! binary re-executed as `datapath client ...` inside the cgroup (or outside it, for the rows
//! that need no hook); it times each `connect()`, waits for the backend to accept and close,
//! and closes with RST so no TIME_WAIT piles up on the client side.
//! Rows at one service count are measured in interleaved rounds so drift hits them alike.
//!
//! The nftables rows are measured the same way (the same client, the same connects, in the same
//! namespace): a `nat` table with an output-hook DNAT, either one map lookup
//! (`dnat ip addr . port to ip daddr . tcp dport map @svc`) or one rule per service with the
//! measured service last; the host's ruleset is never touched. Beside the latency, the programs' own cost comes
//! from the kernel's bpf_stats (run_time_ns / run_cnt): connect4 on a non-service connect, on a
//! translated connect (a free connection-table slot), on a UDP socket connecting again (its slot
//! already its own), and with every free slot reserved (the socket-local storage path);
//! sock_ops and sock_release per connect.
//!
//! Needs root: `cargo run --release -p mesh-bench --bin datapath`.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use global_lb_bpf::{
    Backend, ConnTable, Datapath, DatapathConfig, Frontend, Proto, RunStats, ServiceMaps, mounts,
};

#[derive(Debug, Parser)]
#[command(
    name = "datapath",
    about = "connect() latency: eBPF socket LB vs direct vs nftables DNAT"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Connects per row (split over the rounds).
    #[arg(long, env = "BENCH_CONNECTS", default_value_t = 20_000)]
    connects: usize,
    /// Interleaved rounds per service count.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 10)]
    rounds: usize,
    /// Service counts to measure the eBPF path at.
    #[arg(long, env = "BENCH_SERVICES", value_delimiter = ',', default_values_t = [1_000usize, 10_000, 30_000, 100_000])]
    services: Vec<usize>,
    /// Service counts (DNAT rules / map entries) for the nftables rows (0 alone: no nftables rows).
    #[arg(long, env = "BENCH_NFT_SERVICES", value_delimiter = ',', default_values_t = [10_000usize, 30_000, 100_000])]
    nft_services: Vec<usize>,
    /// Connects per nftables row (a chain of 100k rules costs milliseconds per connect, so
    /// these rows get fewer than the others).
    #[arg(long, env = "BENCH_NFT_CONNECTS", default_value_t = 2_000)]
    nft_connects: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// (internal) Time `count` connects to `addr` and print the samples in ns, one per line.
    Client {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Connect one UDP socket `count` times instead (its reverse-NAT state is created by the
        /// first connect and found by the others).
        #[arg(long)]
        udp_reconnect: bool,
    },
}

/// The backend every measured connection ends on.
const BACKEND: &str = "10.1.0.1:8080";
/// The measured service address (eBPF rows) and DNAT target address (nftables rows).
const VIP: &str = "10.100.0.1:80";
const NFT_TABLE: &str = "glb_bench";

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Client {
        addr,
        count,
        udp_reconnect,
    }) = args.command
    {
        return if udp_reconnect {
            client_udp_reconnect(addr, count)
        } else {
            client(addr, count)
        };
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the datapath benchmark needs root (BPF, cgroups, netns, nftables)"
    );
    // The whole run happens on a thread in a private network namespace.
    let worker = std::thread::spawn(move || -> Result<String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET)")?;
        run(&args)
    });
    let table = worker
        .join()
        .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))??;
    print!("{table}");
    Ok(())
}

fn client(addr: SocketAddr, count: usize) -> Result<()> {
    let mut out = String::with_capacity(count * 8);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for _ in 0..count {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        let ns = started.elapsed().as_nanos();
        // Wait for the backend to accept and close, so its accept queue never overflows (a
        // dropped SYN would cost a 1 s retransmit and say nothing about the datapath).
        let _ = stream.read(&mut [0u8; 1]);
        // RST on close: no TIME_WAIT, so ports never run out across rows.
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
            .context("SO_LINGER")?;
        drop(stream);
        writeln!(out, "{ns}").expect("write to String");
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Times `count` connect()s of one UDP socket to `addr` (no datagram is sent).
fn client_udp_reconnect(addr: SocketAddr, count: usize) -> Result<()> {
    let mut out = String::with_capacity(count * 8);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    for _ in 0..count {
        let started = Instant::now();
        socket
            .connect(addr)
            .with_context(|| format!("UDP connect {addr}"))?;
        let ns = started.elapsed().as_nanos();
        writeln!(out, "{ns}").expect("write to String");
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn nft(ruleset: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (nftables)")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A cgroup directory for the benchmark; removed on drop (after the datapath is removed).
struct BenchCgroup(PathBuf);

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs the client `count` times-worth of connects to `addr`, inside `cgroup` if given.
fn measure(cgroup: Option<&Path>, addr: &str, count: usize) -> Result<Vec<u64>> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut cmd = match cgroup {
        Some(cg) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(cg)
                .arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let (addr, mode): (&str, &[&str]) = match addr.strip_prefix("udp-reconnect:") {
        Some(a) => (a, &["--udp-reconnect"]),
        None => (addr, &[]),
    };
    let out = cmd
        .args(["client", addr, "--count", &count.to_string()])
        .args(mode)
        .output()
        .context("running the client")?;
    if !out.status.success() {
        bail!(
            "client to {addr} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse::<u64>().context("client sample"))
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

struct Row {
    path: String,
    services: String,
    p50: f64,
    p99: f64,
    baseline_p50: Option<f64>,
}

fn summarize(path: &str, services: &str, mut samples: Vec<u64>, baseline: Option<f64>) -> Row {
    samples.sort_unstable();
    Row {
        path: path.into(),
        services: services.into(),
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        baseline_p50: baseline,
    }
}

/// Runs of the `connect4` program, nanoseconds spent in them, and nanoseconds spent in the
/// `sock_ops` program (every callback of the same sockets: SYN, established, state changes), and
/// the time of the `sock_release` program (once per closed socket) (kernel bpf_stats).
type ProgRuns = (u64, u64, u64, u64);

/// Runs (count, time) of the `connect4` program and the time of `sock_ops`, from bpf_stats.
fn connect4_stats(dp: Option<&Datapath>) -> Result<ProgRuns> {
    let Some(dp) = dp else {
        return Ok((0, 0, 0, 0));
    };
    let stats = dp.program_stats()?;
    let c4 = stats
        .iter()
        .find(|s| s.program == "connect4")
        .context("connect4 is not attached")?;
    let ops = stats
        .iter()
        .find(|s| s.program == "sock_ops")
        .context("sock_ops is not attached")?;
    let release = stats
        .iter()
        .find(|s| s.program == "sock_release")
        .context("sock_release is not attached")?;
    Ok((
        c4.run_count,
        c4.run_time_ns,
        ops.run_time_ns,
        release.run_time_ns,
    ))
}

/// Measures each target in `targets` (label, cgroup, address) in `rounds` interleaved rounds.
/// With `dp`, also returns per target the `connect4` runs and nanoseconds spent in them.
fn interleaved(
    targets: &[(&str, Option<&Path>, &str)],
    connects: usize,
    rounds: usize,
    dp: Option<&Datapath>,
) -> Result<(Vec<Vec<u64>>, Vec<ProgRuns>)> {
    let per_round = connects.div_ceil(rounds.max(1));
    let mut all = vec![Vec::with_capacity(connects); targets.len()];
    let mut prog = vec![(0u64, 0u64, 0u64, 0u64); targets.len()];
    // Warm-up: first connects pay for page faults and cold caches.
    for (_, cg, addr) in targets {
        measure(*cg, addr, 200)?;
    }
    for _ in 0..rounds.max(1) {
        for (i, (_, cg, addr)) in targets.iter().enumerate() {
            let before = connect4_stats(dp)?;
            all[i].extend(measure(*cg, addr, per_round)?);
            let after = connect4_stats(dp)?;
            prog[i].0 += after.0 - before.0;
            prog[i].1 += after.1 - before.1;
            prog[i].2 += after.2 - before.2;
            prog[i].3 += after.3 - before.3;
        }
    }
    Ok((all, prog))
}

/// The `i`-th filler service address (never the measured one).
fn filler_vip(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::from(0x0a60_0000u32 + i as u32).into()
}

fn run(args: &Args) -> Result<String> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", "10.1.0.1/32", "dev", "lo"])?;
    // The VIP is a local address too, so the DNAT rows route; the eBPF rows rewrite it before
    // routing.
    ip(&["addr", "add", "10.100.0.1/32", "dev", "lo"])?;

    let backend_addr: SocketAddr = BACKEND.parse()?;
    let listener = TcpListener::bind(backend_addr).context("binding the backend")?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });

    mounts::ensure_bpffs(Path::new(mounts::DEFAULT_BPFFS))?;
    let cg_root = mounts::ensure_cgroup2()?;
    let name = format!("glb-bench-{}", std::process::id());
    let cgroup = BenchCgroup(cg_root.join(&name));
    std::fs::create_dir(&cgroup.0).with_context(|| format!("mkdir {}", cgroup.0.display()))?;
    let config = DatapathConfig::new(
        cgroup.0.clone(),
        Path::new(mounts::DEFAULT_BPFFS).join(&name),
    );
    let result = measure_all(args, &config, backend_addr);
    Datapath::remove(&config.pin_dir)?;
    let _ = Command::new("nft")
        .args(["delete", "table", "ip", NFT_TABLE])
        .output();
    result
}

fn measure_all(args: &Args, config: &DatapathConfig, backend_addr: SocketAddr) -> Result<String> {
    let mut dp = Datapath::open(config)?;
    let vip: Frontend = format!("tcp:{VIP}").parse().map_err(anyhow::Error::msg)?;
    let backend = Backend::new(backend_addr.ip(), backend_addr.port(), 1).with_local(true);
    // Filler services: two backends each, drawn from a pool of 1000 (backends are shared).
    let pool: Vec<Backend> = (0..1000u32)
        .map(|i| Backend::new(std::net::Ipv4Addr::from(0x0a02_0000 + i).into(), 8080, 2))
        .collect();
    let cg = Some(config.cgroup.as_path());
    let mut rows = Vec::new();
    // (services, connect4 runs/ns on direct connects, on VIP connects, on UDP reconnects to the
    // VIP, on VIP connects whose table slot is taken), from bpf_stats.
    let mut hook_rows: Vec<(String, ProgRuns, ProgRuns, ProgRuns, ProgRuns)> = Vec::new();
    // The kernel counts program runs only while statistics are on; off again when this drops.
    let _stats = RunStats::enable()?;

    // No hook at all: the floor.
    let (floor, _) = interleaved(
        &[("direct", None, BACKEND)],
        args.connects,
        args.rounds,
        None,
    )?;
    rows.push(summarize(
        "direct to backend, outside the cgroup",
        "-",
        floor.into_iter().next().unwrap_or_default(),
        None,
    ));

    dp.upsert_service(&vip, &[backend])?;
    // The same service address over UDP: a connected UDP socket connecting again finds its
    // reverse-NAT state instead of creating it, which shows what the creation costs.
    let vip_udp: Frontend = format!("udp:{VIP}").parse().map_err(anyhow::Error::msg)?;
    dp.upsert_service(&vip_udp, &[backend])?;
    let udp_reconnect = format!("udp-reconnect:{VIP}");
    let mut filled = 2usize;
    let mut fill_times = Vec::new();
    for &n in &args.services {
        let started = Instant::now();
        while filled < n {
            let i = filled;
            let f = Frontend::new(filler_vip(i), 80, Proto::Tcp);
            dp.upsert_service(&f, &[pool[i % pool.len()], pool[(i * 7 + 1) % pool.len()]])?;
            filled += 1;
        }
        fill_times.push((n, started.elapsed()));
        let label = human(n);
        let (samples, prog) = interleaved(
            &[
                ("direct", cg, BACKEND),
                ("vip", cg, VIP),
                ("vip-udp-reconnect", cg, &udp_reconnect),
            ],
            args.connects,
            args.rounds,
            Some(&dp),
        )?;
        // The other path: every free slot of the connection table reserved, so each translated
        // connect keeps its state in newly allocated socket-local storage.
        let mut table = ConnTable::open(&config.pin_dir)?;
        table.reserve_free_slots()?;
        let (_, taken) = interleaved(&[("vip", cg, VIP)], args.connects, args.rounds, Some(&dp))?;
        table.release_reserved()?;
        hook_rows.push((label.clone(), prog[0], prog[1], prog[2], taken[0]));
        let mut it = samples.into_iter();
        let direct = summarize(
            "direct to backend, in the cgroup",
            &label,
            it.next().unwrap_or_default(),
            None,
        );
        let base = direct.p50;
        rows.push(direct);
        rows.push(summarize(
            "eBPF socket LB via service address",
            &label,
            it.next().unwrap_or_default(),
            Some(base),
        ));
    }
    let services_in_maps = dp.services()?.len();
    drop(dp);
    Datapath::remove(&config.pin_dir)?;

    for &n in args.nft_services.iter().filter(|n| **n > 0) {
        nft_rows(args, n, &mut rows)?;
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "connect() latency over loopback in a private netns, {} connects per row in {} interleaved rounds",
        args.connects, args.rounds
    );
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>9} {:>9} {:>16} {:>12}",
        "path", "services", "p50 us", "p99 us", "p50 vs direct*", "p50 vs floor"
    );
    let floor = rows.first().map(|r| r.p50).unwrap_or(f64::NAN);
    let pct = |v: f64, b: f64| format!("{:+.1}%", (v - b) / b * 100.0);
    for r in &rows {
        let delta = r.baseline_p50.map(|b| pct(r.p50, b)).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<52} {:>9} {:>9.1} {:>9.1} {:>16} {:>12}",
            r.path,
            r.services,
            r.p50,
            r.p99,
            delta,
            pct(r.p50, floor)
        );
    }
    let _ = writeln!(
        out,
        "* direct = straight to the backend in the same interleaved rounds and setup (same cgroup,\n  \
         same nft ruleset loaded); floor = first row, no cgroup hook and no nft rules. With one nat\n  \
         rule per service every new connection walks the chain, direct ones included."
    );
    side_by_side(&mut out, args, &rows);
    let _ = writeln!(
        out,
        "\nconnect4 program's own cost (kernel bpf_stats run_time_ns / run_cnt, same rounds as above)"
    );
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>9} {:>12}",
        "connect() to", "services", "runs", "ns per run"
    );
    let per_run = |(n, ns, _, _): ProgRuns| {
        if n == 0 {
            f64::NAN
        } else {
            ns as f64 / n as f64
        }
    };
    // sock_ops time per connect (connect4 runs once per connect).
    let ops_per_connect = |(n, _, ops, _): ProgRuns| {
        if n == 0 {
            f64::NAN
        } else {
            ops as f64 / n as f64
        }
    };
    // sock_release time per connect (each measured connect closes its socket).
    let release_per_connect = |(n, _, _, release): ProgRuns| {
        if n == 0 {
            f64::NAN
        } else {
            release as f64 / n as f64
        }
    };
    for (label, direct, vip, reconnect, taken) in &hook_rows {
        for (what, v) in [
            ("a non-service address (direct to backend)", direct),
            ("the service address (translated)", vip),
            (
                "the service, UDP socket reconnecting (state found)",
                reconnect,
            ),
            ("the service, its table slot taken (sk storage)", taken),
        ] {
            let _ = writeln!(
                out,
                "{:<52} {:>9} {:>9} {:>12.0}",
                what,
                label,
                v.0,
                per_run(*v)
            );
        }
    }
    let _ = writeln!(
        out,
        "pieces of a translated connect (from the rows above): the pre-filter and the run itself \
         (a non-service connect); the selection, rewrite and a rewrite of the socket's own table \
         slot (a UDP reconnect, minus that); claiming a free table slot (a translated TCP \
         connect, minus a UDP reconnect); and, on the other path, allocating socket-local \
         storage when the slot is taken (that row minus a UDP reconnect)"
    );
    for (label, direct, vip, reconnect, taken) in &hook_rows {
        let (d, v, r, t) = (
            per_run(*direct),
            per_run(*vip),
            per_run(*reconnect),
            per_run(*taken),
        );
        // (scripts/bench.sh reads this line: "state creation" is the slot claim.)
        let _ = writeln!(
            out,
            "  {label:>5} services: pre-filter+run {d:.0} ns, selection+rewrite {:.0} ns, state creation {:.0} ns",
            r - d,
            v - r
        );
        let _ = writeln!(
            out,
            "  {label:>5} services, table slot taken: socket-local storage creation {:.0} ns",
            t - r
        );
    }
    let _ = writeln!(
        out,
        "\nsock_ops (connect outcomes, passive detection) per connect, and the translated connect's \
         total (connect4 + sock_ops), same rounds (bpf_stats)"
    );
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>12} {:>12}",
        "connect() to", "services", "sock_ops ns", "total ns"
    );
    for (label, direct, vip, _, _) in &hook_rows {
        for (what, v) in [
            ("a non-service address (direct to backend)", direct),
            ("the service address (translated)", vip),
        ] {
            let _ = writeln!(
                out,
                "{:<52} {:>9} {:>12.0} {:>12.0}",
                what,
                label,
                ops_per_connect(*v),
                per_run(*v) + ops_per_connect(*v)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nsock_release (frees the socket's table slot) per closed socket, and the translated \
         connect's total with it (connect4 + sock_ops + sock_release), same rounds (bpf_stats)"
    );
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>12} {:>12}",
        "socket closed after", "services", "release ns", "total ns"
    );
    for (label, direct, vip, _, _) in &hook_rows {
        for (what, v) in [
            ("a connect to a non-service", direct),
            ("a translated connect", vip),
        ] {
            let _ = writeln!(
                out,
                "{:<52} {:>9} {:>12.0} {:>12.0}",
                what,
                label,
                release_per_connect(*v),
                per_run(*v) + ops_per_connect(*v) + release_per_connect(*v)
            );
        }
    }
    for (n, t) in fill_times {
        let _ = writeln!(
            out,
            "(filling the maps up to {} services took {:.2} s)",
            human(n),
            t.as_secs_f64()
        );
    }
    let _ = writeln!(out, "(services in the maps at the end: {services_in_maps})");
    Ok(out)
}

/// What a user would run instead, beside the socket LB, at the nftables service counts: the p50
/// of a connect() to the service and what it adds over a straight connect with no DNAT rules
/// loaded (the eBPF section's direct connect at that count, in the cgroup: the hook's pre-filter
/// only), and what a connect to anything else pays in the same setup: a chain of DNAT rules is
/// walked by every new connection.
fn side_by_side(out: &mut String, args: &Args, rows: &[Row]) {
    let floor = rows.first().map(|r| r.p50).unwrap_or(f64::NAN);
    let p50 = |path: &str, services: &str| {
        rows.iter()
            .find(|r| r.path == path && r.services == services)
            .map(|r| r.p50)
    };
    let sizes: Vec<String> = args
        .nft_services
        .iter()
        .filter(|n| **n > 0)
        .map(|n| human(*n))
        .collect();
    if sizes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nside by side, same run: a connect() to the service vs a straight one with no DNAT rules loaded (base), and what a connect to anything else pays in that setup"
    );
    let _ = writeln!(
        out,
        "{:<40} {:>9} {:>9} {:>9} {:>10} {:>9} {:>16}",
        "path", "services", "base us", "p50 us", "added us", "added", "others added"
    );
    for n in &sizes {
        let base = p50("direct to backend, in the cgroup", n).unwrap_or(floor);
        for (label, path, others) in [
            (
                "socket LB (eBPF)",
                "eBPF socket LB via service address",
                "direct to backend, in the cgroup",
            ),
            (
                "nft DNAT, one map lookup",
                "nftables DNAT, one map lookup",
                "direct to backend, nft map loaded",
            ),
            (
                "nft DNAT, one rule per service",
                "nftables DNAT, one rule per service (matched last)",
                "direct to backend, nft table loaded",
            ),
        ] {
            match p50(path, n) {
                Some(v) => {
                    let others = p50(others, n)
                        .map(|o| format!("{:+.1}%", (o - base) / base * 100.0))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "{label:<40} {n:>9} {base:>9.1} {v:>9.1} {:>+10.1} {:>9} {others:>16}",
                        v - base,
                        format!("{:+.1}%", (v - base) / base * 100.0)
                    );
                }
                None => {
                    let _ = writeln!(out, "{label:<40} {n:>9} {:>9}", "not run");
                }
            }
        }
    }
}

fn human(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// With `ruleset` loaded: a direct connect and one through the VIP, interleaved, as two rows
/// (the second compared with the first); the table is removed afterwards.
fn nft_pair(
    args: &Args,
    n: usize,
    rows: &mut Vec<Row>,
    ruleset: &str,
    direct_label: &str,
    dnat_label: &str,
) -> Result<()> {
    nft(ruleset)?;
    let (samples, _) = interleaved(
        &[("direct", None, BACKEND), ("dnat", None, VIP)],
        args.nft_connects,
        args.rounds,
        None,
    )?;
    let services = human(n);
    let mut it = samples.into_iter();
    let direct = summarize(direct_label, &services, it.next().unwrap_or_default(), None);
    let base = direct.p50;
    rows.push(direct);
    rows.push(summarize(
        dnat_label,
        &services,
        it.next().unwrap_or_default(),
        Some(base),
    ));
    nft(&format!("delete table ip {NFT_TABLE}\n"))
}

/// The nftables DNAT rows (no eBPF datapath loaded).
fn nft_rows(args: &Args, n: usize, rows: &mut Vec<Row>) -> Result<()> {
    // nftables DNAT, kube-proxy style: one rule per service, the measured one last.
    let mut linear = format!(
        "table ip {NFT_TABLE} {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n"
    );
    for i in 1..n {
        let _ = writeln!(
            linear,
            "  ip daddr {} tcp dport 80 dnat to 10.2.0.1:8080",
            filler_vip(i)
        );
    }
    let _ = writeln!(
        linear,
        "  ip daddr 10.100.0.1 tcp dport 80 dnat to {BACKEND}"
    );
    linear.push_str(" }\n}\n");
    nft_pair(
        args,
        n,
        rows,
        &linear,
        "direct to backend, nft table loaded",
        "nftables DNAT, one rule per service (matched last)",
    )?;

    // nftables DNAT through one verdict map (the best nftables can do).
    let mut mapped = format!(
        "table ip {NFT_TABLE} {{\n map svc {{\n  type ipv4_addr . inet_service : ipv4_addr . inet_service\n  elements = {{\n"
    );
    for i in 1..n {
        let _ = writeln!(mapped, "   {} . 80 : 10.2.0.1 . 8080,", filler_vip(i));
    }
    mapped.push_str("   10.100.0.1 . 80 : 10.1.0.1 . 8080\n  }\n }\n");
    mapped.push_str(
        " chain out {\n  type nat hook output priority -100; policy accept;\n  dnat ip addr . port to ip daddr . tcp dport map @svc\n }\n}\n",
    );
    nft_pair(
        args,
        n,
        rows,
        &mapped,
        "direct to backend, nft map loaded",
        "nftables DNAT, one map lookup",
    )?;

    Ok(())
}
