//! Workloads for drills and the lab: a backend that tells who it is, and a probe that opens a new
//! connection at a steady rate and records where each one landed.
//!
//! They run inside lab nodes (`clustermesh workload backend|probe`), so what they measure is what an
//! application in that node sees: the eBPF socket load balancer steers their `connect()`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

/// One attempt of the probe, as printed (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// Milliseconds since the probe started.
    pub t_ms: f64,
    /// Milliseconds since the Unix epoch (to line up with events seen elsewhere).
    pub unix_ms: u128,
    /// The backend answered.
    pub ok: bool,
    /// The backend's name, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The error, when it did not (`connection refused`, `timed out`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the attempt took, in microseconds.
    pub latency_us: u64,
}

/// A backend's HTTP health endpoint (what `clustermesh.io/health-check: http:/path` probes): every
/// request is answered from the mode in `mode_file`, read at each request: `ok` (or no file) 200,
/// `fail` 503, `flap` 200 and 503 in turn (a backend failing every other probe).
#[derive(Debug, Clone)]
pub struct HealthEndpoint {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The mode file.
    pub mode_file: std::path::PathBuf,
}

/// The status code a health request gets in `mode` (`n`: requests answered before it).
pub fn health_status(mode: &str, n: usize) -> u16 {
    match mode.trim() {
        "fail" => 503,
        "flap" if n % 2 == 1 => 503,
        _ => 200,
    }
}

async fn serve_health(listener: TcpListener, mode_file: std::path::PathBuf) {
    let answered = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let mode_file = mode_file.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
            let mode = std::fs::read_to_string(&mode_file).unwrap_or_default();
            let code = health_status(&mode, answered.fetch_add(1, Ordering::SeqCst));
            let reason = if code == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let _ = sock
                .write_all(
                    format!("HTTP/1.0 {code} {reason}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                )
                .await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Serve `name` on every address: a TCP connection gets `name\n`; a UDP datagram gets `name\n` back;
/// with `health`, an HTTP health endpoint too. SIGTERM stops accepting, lets connections in flight
/// finish, and returns.
pub async fn run_backend(
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    health: Option<HealthEndpoint>,
) -> anyhow::Result<()> {
    let name = Arc::new(format!("{name}\n"));
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(h) = health {
        let listener = TcpListener::bind(h.listen)
            .await
            .map_err(|e| anyhow::anyhow!("backend: bind health {}: {e}", h.listen))?;
        tasks.spawn(serve_health(listener, h.mode_file));
    }
    for addr in tcp {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("backend: bind tcp {addr}: {e}"))?;
        let name = name.clone();
        let inflight = inflight.clone();
        tasks.spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                let inflight = inflight.clone();
                inflight.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = sock.write_all(name.as_bytes()).await;
                    let _ = sock.shutdown().await;
                    inflight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    for addr in udp {
        let sock = UdpSocket::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("backend: bind udp {addr}: {e}"))?;
        let name = name.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                if let Ok((_, from)) = sock.recv_from(&mut buf).await {
                    let _ = sock.send_to(name.as_bytes(), from).await;
                }
            }
        });
    }
    println!("ready");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Graceful: stop accepting, finish what is in flight.
    tasks.abort_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    while inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// What the probe does.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Service address to connect to.
    pub target: SocketAddr,
    /// Time between the starts of two attempts.
    pub interval: Duration,
    /// Give up on one attempt after this long.
    pub timeout: Duration,
    /// Stop after this long (`None`: until SIGTERM).
    pub duration: Option<Duration>,
    /// Use UDP instead of TCP.
    pub udp: bool,
}

/// One attempt: connect (or send), read the backend's name.
pub async fn probe_once(cfg: &ProbeConfig) -> Result<String, String> {
    let attempt = async {
        if cfg.udp {
            let bind: SocketAddr = if cfg.target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(|e| format!("{e}"))?;
            let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
            sock.connect(cfg.target).await.map_err(|e| e.to_string())?;
            sock.send(b"who\n").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 256];
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        } else {
            let sock = TcpStream::connect(cfg.target)
                .await
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(sock)
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("connection closed before the backend answered".to_owned());
            }
            Ok(line.trim().to_owned())
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {} ms", cfg.timeout.as_millis())),
    }
}

/// Probe at a steady rate, printing a [`ProbeSample`] per attempt as a JSON line, until the duration
/// ends or SIGTERM arrives. Attempts do not wait for each other: a hanging connect shows as a timeout,
/// not as a gap.
pub async fn run_probe(cfg: ProbeConfig) -> anyhow::Result<()> {
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProbeSample>();
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(s) = rx.recv().await {
            let mut line = serde_json::to_vec(&s).unwrap_or_default();
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cfg = Arc::new(cfg);
    let mut attempts = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = ticker.tick() => {}
        }
        if cfg.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let cfg = cfg.clone();
        let tx = tx.clone();
        attempts.spawn(async move {
            let began = Instant::now();
            let t_ms = began.duration_since(start).as_secs_f64() * 1000.0;
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default();
            let r = probe_once(&cfg).await;
            let latency_us = began.elapsed().as_micros() as u64;
            let (ok, backend, error) = match r {
                Ok(b) => (true, Some(b), None),
                Err(e) => (false, None, Some(e)),
            };
            let _ = tx.send(ProbeSample {
                t_ms,
                unix_ms,
                ok,
                backend,
                error,
                latency_us,
            });
        });
        while attempts.try_join_next().is_some() {}
    }
    while attempts.join_next().await.is_some() {}
    drop(tx);
    let _ = printer.await;
    Ok(())
}
