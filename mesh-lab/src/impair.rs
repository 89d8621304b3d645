//! Latency and loss between clusters, in user space.
//!
//! The kernels this lab runs on may lack `sch_netem`, so the lab delays packets itself: the router namespace gets a
//! TUN device ([`TUN_NAME`]); a policy-routing rule per impaired direction (`iif br<from> from <from subnet> to <to
//! subnet> lookup` [`TABLE`]) sends that traffic into the TUN device; the [`Impairer`] reads each packet, drops it
//! with the configured probability, holds it for the configured delay and writes it back, and the router forwards
//! it on to the destination bridge. Packets keep their order per pair (one delay per pair, FIFO by due time).
//!
//! The impairer runs on two threads of the process that owns the [`crate::Lab`]; if that process dies, the TUN
//! device goes with it and the rules no longer match anything (the table is empty), so traffic flows unimpaired.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::state::Impairment;

/// Name of the TUN device in the router namespace.
pub const TUN_NAME: &str = "imp0";
/// Routing table that sends traffic into the TUN device.
pub const TABLE: &str = "100";

/// A packet waiting for its due time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    due: Instant,
    seq: u64,
    packet: Vec<u8>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Impairment per (from cluster, to cluster), by third address octet (= cluster index).
    table: Mutex<HashMap<(u8, u8), Impairment>>,
    queue: Mutex<BinaryHeap<Reverse<Delayed>>>,
    wake: Condvar,
    stop: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the impairer decides for one packet.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Forward after this delay (zero: at once).
    Delay(Duration),
    /// Drop it.
    Drop,
}

/// Decides a packet's fate: `roll` is a uniform sample in `[0, 1)`.
pub(crate) fn decide(
    packet: &[u8],
    octet: u8,
    table: &HashMap<(u8, u8), Impairment>,
    roll: f64,
) -> Verdict {
    let Some((src, dst)) = ipv4_addrs(packet) else {
        return Verdict::Delay(Duration::ZERO);
    };
    let (s, d) = (src.octets(), dst.octets());
    if s[0] != 10 || s[1] != octet || d[0] != 10 || d[1] != octet {
        return Verdict::Delay(Duration::ZERO);
    }
    match table.get(&(s[2], d[2])) {
        None => Verdict::Delay(Duration::ZERO),
        Some(imp) if roll * 100.0 < imp.loss_percent => Verdict::Drop,
        Some(imp) => Verdict::Delay(imp.delay),
    }
}

fn ipv4_addrs(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let a = |i: usize| Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3]);
    Some((a(12), a(16)))
}

/// xorshift64*: plenty for loss sampling, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The user-space delay line of one lab (see the module docs).
#[derive(Debug)]
pub struct Impairer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Impairer {
    /// Creates the TUN device inside `router_netns` (a reader thread enters that namespace) and starts the reader
    /// and writer threads. `octet` is the lab's second address octet.
    pub fn start(router_netns: &str, octet: u8) -> Result<Impairer> {
        let shared = Arc::new(Shared::default());
        let ns_path = std::path::Path::new("/run/netns").join(router_netns);
        let (tx, rx) = mpsc::channel::<std::result::Result<Arc<tun::Device>, String>>();
        let sh = shared.clone();
        let reader = std::thread::Builder::new()
            .name("mesh-lab-impair-rx".into())
            .spawn(move || {
                let dev = match open_tun_in(&ns_path) {
                    Ok(d) => Arc::new(d),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(dev.clone()));
                read_loop(&dev, &sh, octet);
            })
            .map_err(|e| LabError::io("thread mesh-lab-impair-rx", e))?;
        let dev = match rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = reader.join();
                return Err(LabError::Prerequisite(format!(
                    "a TUN device in {router_netns} for latency/loss (CONFIG_TUN, /dev/net/tun): {e}"
                )));
            }
            Err(_) => {
                let _ = reader.join();
                return Err(LabError::Prerequisite(format!(
                    "a TUN device in {router_netns}: the impairer thread died"
                )));
            }
        };
        let sh = shared.clone();
        let writer = std::thread::Builder::new()
            .name("mesh-lab-impair-tx".into())
            .spawn(move || write_loop(&dev, &sh))
            .map_err(|e| LabError::io("thread mesh-lab-impair-tx", e))?;
        Ok(Impairer {
            shared,
            threads: vec![reader, writer],
        })
    }

    /// Sets the impairment of packets from cluster `from` to cluster `to`.
    pub fn set(&self, from: usize, to: usize, imp: Impairment) {
        lock(&self.shared.table).insert((from as u8, to as u8), imp);
    }

    /// Removes the impairment from `from` to `to`.
    pub fn remove(&self, from: usize, to: usize) {
        lock(&self.shared.table).remove(&(from as u8, to as u8));
    }

    /// Packets forwarded and dropped so far.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.shared.forwarded.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Impairer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open_tun_in(ns_path: &std::path::Path) -> std::result::Result<tun::Device, String> {
    let ns = std::fs::File::open(ns_path).map_err(|e| format!("{}: {e}", ns_path.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {}: {e}", ns_path.display()))?;
    let mut cfg = tun::Configuration::default();
    cfg.tun_name(TUN_NAME).up();
    tun::create(&cfg).map_err(|e| format!("create TUN {TUN_NAME}: {e}"))
}

fn read_loop(dev: &tun::Device, sh: &Shared, octet: u8) {
    let mut buf = vec![0u8; 65536];
    let mut rng = Rng::seeded();
    let mut seq = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        let n = match dev.recv_timeout(&mut buf, Duration::from_millis(100)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "impairer: reading the TUN device failed; stopping");
                return;
            }
        };
        let packet = &buf[..n];
        let verdict = decide(packet, octet, &lock(&sh.table), rng.next_f64());
        match verdict {
            Verdict::Drop => {
                sh.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Delay(d) => {
                seq += 1;
                lock(&sh.queue).push(Reverse(Delayed {
                    due: Instant::now() + d,
                    seq,
                    packet: packet.to_vec(),
                }));
                sh.wake.notify_one();
            }
        }
    }
}

fn write_loop(dev: &tun::Device, sh: &Shared) {
    let mut q = lock(&sh.queue);
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let wait = match q.peek() {
            Some(Reverse(top)) if top.due <= now => {
                let Some(Reverse(p)) = q.pop() else { continue };
                drop(q);
                if let Err(e) = dev.send(&p.packet) {
                    tracing::debug!(error = %e, "impairer: writing a packet back failed");
                } else {
                    sh.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                q = lock(&sh.queue);
                continue;
            }
            Some(Reverse(top)) => top.due - now,
            None => Duration::from_millis(100),
        };
        q = sh
            .wake
            .wait_timeout(q, wait)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn table() -> HashMap<(u8, u8), Impairment> {
        HashMap::from([(
            (1, 2),
            Impairment {
                delay: Duration::from_millis(100),
                loss_percent: 10.0,
            },
        )])
    }

    #[test]
    fn impaired_pair_is_delayed_or_dropped_by_the_roll() {
        let p = packet([10, 150, 1, 11], [10, 150, 2, 2]);
        assert_eq!(
            decide(&p, 150, &table(), 0.5),
            Verdict::Delay(Duration::from_millis(100))
        );
        assert_eq!(decide(&p, 150, &table(), 0.05), Verdict::Drop);
    }

    #[test]
    fn other_traffic_passes_at_once() {
        let t = table();
        let back = packet([10, 150, 2, 2], [10, 150, 1, 11]);
        assert_eq!(decide(&back, 150, &t, 0.0), Verdict::Delay(Duration::ZERO));
        let other_lab = packet([10, 151, 1, 11], [10, 151, 2, 2]);
        assert_eq!(
            decide(&other_lab, 150, &t, 0.0),
            Verdict::Delay(Duration::ZERO)
        );
        assert_eq!(
            decide(&[0x60; 40], 150, &t, 0.0),
            Verdict::Delay(Duration::ZERO)
        );
        assert_eq!(
            decide(&[0x45; 3], 150, &t, 0.0),
            Verdict::Delay(Duration::ZERO)
        );
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::seeded();
        let n = 100_000;
        let below = (0..n).filter(|_| r.next_f64() < 0.05).count();
        assert!((4000..6000).contains(&below), "{below}");
    }
}
