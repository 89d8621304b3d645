//! `glb-probe`: a client that reports what a socket saw, as one JSON line, for checking the
//! datapath by hand and from the integration tests (run it inside the load-balanced cgroup).
//!
//! - `glb-probe tcp ADDR`: connect, `getpeername`, read the server's reply to EOF.
//! - `glb-probe udp ADDR [--connected]`: send one datagram, receive the reply and its source.
//! - `glb-probe tcp-storm ADDR --connections N --threads T`: N connects from T threads; prints
//!   how many replies each server name got and every error.
//!
//! Failures are reported in the JSON (`ok: false`, `errno`, `error`), with the exit code 0, so a
//! caller can assert on them.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
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
    };
    println!("{out}");
    Ok(())
}
