//! `clustermesh connect | disconnect | status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use clustermesh_cli::connect::{ConnectOptions, Side, connect, disconnect, render_status, status};

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (like 30s, 2m): {e}"))
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Words for a person.
    Text,
    /// One JSON object.
    Json,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// gRPC address of cluster A's clustermesh-apiserver (HOST:PORT).
    pub a: SocketAddr,
    /// gRPC address of cluster B's clustermesh-apiserver (HOST:PORT).
    pub b: SocketAddr,
    /// Cluster A's certificate directory (admin.crt/key and ca-bundle.pem; from `clustermesh ca issue-cluster`).
    #[arg(long, env = "CLUSTERMESH_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Cluster B's certificate directory.
    #[arg(long, env = "CLUSTERMESH_DESTINATION_TLS_DIR")]
    pub destination_tls_dir: PathBuf,
    /// Only let A's nodes reach B (register B at A), not the reverse.
    #[arg(long)]
    pub unidirectional: bool,
    /// Exchange trust bundles when the clusters do not share a root CA (federation).
    #[arg(long)]
    pub federate: bool,
    /// Wait until every node of each side reports the other connected and synced.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub wait_timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct DisconnectArgs {
    /// gRPC address of cluster A's clustermesh-apiserver.
    pub a: SocketAddr,
    /// gRPC address of cluster B's clustermesh-apiserver.
    pub b: SocketAddr,
    /// Cluster A's certificate directory.
    #[arg(long, env = "CLUSTERMESH_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Cluster B's certificate directory.
    #[arg(long, env = "CLUSTERMESH_DESTINATION_TLS_DIR")]
    pub destination_tls_dir: PathBuf,
    /// Only remove B from A.
    #[arg(long)]
    pub unidirectional: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// gRPC address of the cluster's clustermesh-apiserver.
    #[arg(long, env = "CLUSTERMESH_SERVER")]
    pub server: SocketAddr,
    /// The cluster's certificate directory.
    #[arg(long, env = "CLUSTERMESH_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Wait until the mesh is healthy.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub wait_timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn run_connect(a: ConnectArgs) -> anyhow::Result<ExitCode> {
    let sa = Side {
        addr: a.a,
        tls_dir: a.tls_dir,
    };
    let sb = Side {
        addr: a.b,
        tls_dir: a.destination_tls_dir,
    };
    let opts = ConnectOptions {
        unidirectional: a.unidirectional,
        federate: a.federate,
        wait: a.wait.then_some(a.wait_timeout),
    };
    let json = a.output == Output::Json;
    let mut progress = |l: &str| {
        if json {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    };
    let report = connect(&sa, &sb, &opts, &mut progress).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("connected");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_disconnect(a: DisconnectArgs) -> anyhow::Result<ExitCode> {
    let sa = Side {
        addr: a.a,
        tls_dir: a.tls_dir,
    };
    let sb = Side {
        addr: a.b,
        tls_dir: a.destination_tls_dir,
    };
    for l in disconnect(&sa, &sb, a.unidirectional).await? {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let side = Side {
        addr: a.server,
        tls_dir: a.tls_dir,
    };
    let s = status(&side, a.wait.then_some(a.wait_timeout)).await?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Text => print!("{}", render_status(&s)),
    }
    Ok(if s.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
