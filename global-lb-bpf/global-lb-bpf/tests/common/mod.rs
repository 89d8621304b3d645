//! Test harness: a private network namespace per test, a fresh cgroup v2 directory with the
//! datapath attached, pins under a unique bpffs directory, backends as threads, and `glb-probe`
//! run inside the cgroup as the client. Needs root; fails (never skips) when something is missing.
#![allow(dead_code)]

use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use global_lb_bpf::{Datapath, DatapathConfig, mounts};
use serde_json::Value;

pub const PROBE: &str = env!("CARGO_BIN_EXE_glb-probe");
pub const GLB: &str = env!("CARGO_BIN_EXE_glb");

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static BPFFS: Once = Once::new();

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests attach eBPF programs and need root"
    );
}

/// A unique name for this test's cgroup and pin directory.
pub fn unique(tag: &str) -> String {
    format!(
        "glb-test-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `f` on a thread of its own inside a new network namespace with `lo` up and `addrs`
/// (CIDR strings) on `lo`. Processes spawned from `f` inherit the namespace.
pub fn in_netns<F: FnOnce() + Send + 'static>(addrs: &[&str], f: F) {
    require_root();
    let addrs: Vec<String> = addrs.iter().map(|s| s.to_string()).collect();
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) for a private network namespace");
        ip(&["link", "set", "lo", "up"]);
        for a in &addrs {
            if a.contains(':') {
                ip(&["-6", "addr", "add", a, "dev", "lo", "nodad"]);
            } else {
                ip(&["addr", "add", a, "dev", "lo"]);
            }
        }
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cgroup v2 directory made for one test, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_root();
        let root = mounts::ensure_cgroup2().expect("a cgroup v2 hierarchy");
        let path = root.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The bpffs pin directory for `name` (bpffs mounted if needed).
pub fn pin_dir(name: &str) -> PathBuf {
    require_root();
    BPFFS.call_once(|| {
        mounts::ensure_bpffs(Path::new(mounts::DEFAULT_BPFFS)).expect("bpffs at /sys/fs/bpf")
    });
    Path::new(mounts::DEFAULT_BPFFS).join(name)
}

/// Removes the datapath pinned at the path on drop (for tests that open it themselves).
pub struct PinGuard(pub PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = Datapath::remove(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A cgroup with the datapath attached; detached and removed on drop.
pub struct Env {
    pub dp: Option<Datapath>,
    pub config: DatapathConfig,
    pub cgroup: TestCgroup,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let cgroup = TestCgroup::new(&name);
        let config = DatapathConfig::new(cgroup.path.clone(), pin_dir(&name));
        let dp = Datapath::open(&config).unwrap_or_else(|e| panic!("opening the datapath: {e}"));
        Self {
            dp: Some(dp),
            config,
            cgroup,
        }
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath open")
    }

    /// Runs `glb-probe ARGS` inside the cgroup and returns its JSON line.
    pub fn probe(&self, args: &[&str]) -> Value {
        probe_in(&self.cgroup.path, args)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.dp.take();
        if let Err(e) = Datapath::remove(&self.config.pin_dir) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn parse_probe(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{what} printed {stdout:?}, not JSON: {e}"))
}

/// Runs `glb-probe ARGS` as a process moved into `cgroup` before it starts.
pub fn probe_in(cgroup: &Path, args: &[&str]) -> Value {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup)
        .arg(PROBE)
        .args(args)
        .output()
        .expect("spawning glb-probe");
    parse_probe(out, &format!("glb-probe {args:?} in {}", cgroup.display()))
}

/// Runs `glb-probe ARGS` outside the load-balanced cgroup.
pub fn probe_outside(args: &[&str]) -> Value {
    let out = Command::new(PROBE)
        .args(args)
        .output()
        .expect("spawning glb-probe");
    parse_probe(out, &format!("glb-probe {args:?} outside the cgroup"))
}

/// A TCP server thread that writes its name to every connection and records the peers it saw.
pub struct TcpBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl TcpBackend {
    pub fn start(addr: &str, name: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("backend address");
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (seen, stop, name) = (seen.clone(), stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    if let Ok(peer) = conn.peer_addr() {
                        seen.lock().expect("lock").push(peer);
                    }
                    let _ = conn.write_all(format!("{name}\n").as_bytes());
                }
            })
        };
        Self {
            addr,
            name: name.to_owned(),
            seen,
            stop,
            handle: Some(handle),
        }
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop (from this thread, outside the load-balanced cgroup).
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A UDP server thread that answers every datagram with its name.
pub struct UdpBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpBackend {
    pub fn start(addr: &str, name: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("backend address");
        let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (seen, stop, name) = (seen.clone(), stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                loop {
                    match socket.recv_from(&mut buf) {
                        Ok((_, from)) => {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            seen.lock().expect("lock").push(from);
                            let _ = socket.send_to(name.as_bytes(), from);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            })
        };
        Self {
            addr,
            seen,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let bind = if self.addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        if let Ok(s) = UdpSocket::bind(bind) {
            let _ = s.send_to(b"stop", self.addr);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `v["key"]` as a string, with a readable failure.
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("probe output has no string {key:?}: {v}"))
}

/// Asserts the probe succeeded.
pub fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], Value::Bool(true), "probe failed: {v}");
    v
}
