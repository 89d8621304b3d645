//! `clustermesh workload backend|probe`: the processes a drill runs inside lab nodes.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use mesh_lab::workload::{ProbeConfig, run_backend, run_probe};

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Answer every TCP connection and UDP datagram with this backend's name; SIGTERM stops gracefully.
    Backend(BackendArgs),
    /// Open a new connection to TARGET at a steady rate; print one JSON line per attempt.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Name to answer with (e.g. `c1-n1`).
    #[arg(long)]
    pub name: String,
    /// TCP addresses to listen on.
    #[arg(long = "tcp")]
    pub tcp: Vec<SocketAddr>,
    /// UDP addresses to listen on.
    #[arg(long = "udp")]
    pub udp: Vec<SocketAddr>,
    /// Also serve an HTTP health endpoint here, answering from --health-mode-file.
    #[arg(long, requires = "health_mode_file")]
    pub health: Option<SocketAddr>,
    /// `ok` (or absent): 200; `fail`: 503; `flap`: 200 and 503 in turn. Read at every request.
    #[arg(long)]
    pub health_mode_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Service address (VIP:port).
    #[arg(long)]
    pub target: SocketAddr,
    /// Time between two attempts.
    #[arg(long, default_value = "10ms", value_parser = mesh_logging::parse_duration)]
    pub interval: Duration,
    /// Timeout of one attempt.
    #[arg(long, default_value = "1s", value_parser = mesh_logging::parse_duration)]
    pub timeout: Duration,
    /// Stop after this long (default: until SIGTERM).
    #[arg(long, value_parser = mesh_logging::parse_duration)]
    pub duration: Option<Duration>,
    /// Probe over UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
}

pub async fn run(cmd: WorkloadCommand) -> anyhow::Result<()> {
    match cmd {
        WorkloadCommand::Backend(a) => {
            if a.tcp.is_empty() && a.udp.is_empty() {
                anyhow::bail!("backend: give at least one --tcp or --udp address");
            }
            let health = a.health.zip(a.health_mode_file).map(|(listen, mode_file)| {
                mesh_lab::workload::HealthEndpoint { listen, mode_file }
            });
            run_backend(a.name, a.tcp, a.udp, health).await
        }
        WorkloadCommand::Probe(a) => {
            run_probe(ProbeConfig {
                target: a.target,
                interval: a.interval,
                timeout: a.timeout,
                duration: a.duration,
                udp: a.udp,
            })
            .await
        }
    }
}
