//! `clustermesh connect | disconnect | status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use clustermesh_cli::connect::{ConnectOptions, Side, connect, disconnect, render_status, status};
use clustermesh_cli::kube_connect::{self, KubeOptions};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Words for a person.
    Text,
    /// One JSON object.
    Json,
}

/// Kubernetes mode: the clusters are kubeconfig contexts, and the registration is written as
/// Secrets through the Kubernetes API (instead of the gRPC addresses A B and their TLS dirs).
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// Kubernetes mode: kubeconfig context of cluster A (replaces A, B, --tls-dir, --destination-tls-dir).
    #[arg(long, requires = "destination_context")]
    pub context: Option<String>,
    /// Kubernetes mode: kubeconfig context of cluster B.
    #[arg(long, requires = "context")]
    pub destination_context: Option<String>,
    #[command(flatten)]
    pub install: KubeInstall,
}

/// Where the chart is, in the Kubernetes mode.
#[derive(Debug, Args)]
pub struct KubeInstall {
    /// Kubeconfig file [default: $KUBECONFIG (a list of files is merged), else ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace the clustermesh chart is installed in (in every cluster named).
    #[arg(
        short = 'n',
        long,
        env = "CLUSTERMESH_NAMESPACE",
        default_value = "clustermesh"
    )]
    pub namespace: String,
    /// Helm release name of the chart (object names derive from it).
    #[arg(long, env = "CLUSTERMESH_RELEASE", default_value = "clustermesh")]
    pub release: String,
}

impl KubeInstall {
    fn options(&self) -> KubeOptions {
        KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            namespace: self.namespace.clone(),
            release: self.release.clone(),
        }
    }
}

impl KubeArgs {
    fn contexts(&self) -> Option<(&str, &str)> {
        Some((
            self.context.as_deref()?,
            self.destination_context.as_deref()?,
        ))
    }

    fn options(&self) -> KubeOptions {
        self.install.options()
    }
}

/// The two clusters: gRPC addresses with admin credentials, or (Kubernetes mode) contexts.
#[derive(Debug, Args)]
pub struct PairArgs {
    /// gRPC address of cluster A's clustermesh-apiserver (HOST:PORT).
    #[arg(required_unless_present = "context", conflicts_with = "context")]
    pub a: Option<SocketAddr>,
    /// gRPC address of cluster B's clustermesh-apiserver (HOST:PORT).
    #[arg(required_unless_present = "context", conflicts_with = "context")]
    pub b: Option<SocketAddr>,
    /// Cluster A's certificate directory (admin.crt/key and ca-bundle.pem; from `clustermesh ca issue-cluster`).
    #[arg(long, env = "CLUSTERMESH_TLS_DIR", required_unless_present = "context")]
    pub tls_dir: Option<PathBuf>,
    /// Cluster B's certificate directory.
    #[arg(
        long,
        env = "CLUSTERMESH_DESTINATION_TLS_DIR",
        required_unless_present = "context"
    )]
    pub destination_tls_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

impl PairArgs {
    /// The two gRPC sides of the address mode (clap makes them present outside the Kubernetes mode).
    fn grpc_sides(&self) -> anyhow::Result<(Side, Side)> {
        Ok((
            Side {
                addr: self.a.context("cluster A's address is missing")?,
                tls_dir: self.tls_dir.clone().context("--tls-dir is missing")?,
            },
            Side {
                addr: self.b.context("cluster B's address is missing")?,
                tls_dir: self
                    .destination_tls_dir
                    .clone()
                    .context("--destination-tls-dir is missing")?,
            },
        ))
    }
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    /// Only let A's nodes reach B (register B at A), not the reverse.
    #[arg(long)]
    pub unidirectional: bool,
    /// Exchange trust bundles when the clusters do not share a root CA (federation).
    #[arg(long)]
    pub federate: bool,
    /// Wait until every node of each side reports the other connected and synced (in the
    /// Kubernetes mode, read from each apiserver's status through the API server's service proxy).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = mesh_logging::parse_duration)]
    pub wait_timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct DisconnectArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    /// Only remove B from A.
    #[arg(long)]
    pub unidirectional: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// gRPC address of the cluster's clustermesh-apiserver.
    #[arg(
        long,
        env = "CLUSTERMESH_SERVER",
        required_unless_present = "context",
        conflicts_with = "context"
    )]
    pub server: Option<SocketAddr>,
    /// The cluster's certificate directory.
    #[arg(long, env = "CLUSTERMESH_TLS_DIR", required_unless_present = "context")]
    pub tls_dir: Option<PathBuf>,
    /// Kubernetes mode: kubeconfig context of the cluster (the apiserver's status is read through
    /// the Kubernetes API server's service proxy; replaces --server and --tls-dir).
    #[arg(long)]
    pub context: Option<String>,
    #[command(flatten)]
    pub install: KubeInstall,
    /// Wait until the mesh is healthy.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = mesh_logging::parse_duration)]
    pub wait_timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn run_connect(a: ConnectArgs) -> anyhow::Result<ExitCode> {
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
    let report = match a.pair.kube.contexts() {
        Some((ca, cb)) => {
            kube_connect::connect(ca, cb, &a.pair.kube.options(), &opts, &mut progress).await?
        }
        None => {
            let (sa, sb) = a.pair.grpc_sides()?;
            connect(&sa, &sb, &opts, &mut progress).await?
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("connected");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_disconnect(a: DisconnectArgs) -> anyhow::Result<ExitCode> {
    let lines = match a.pair.kube.contexts() {
        Some((ca, cb)) => {
            kube_connect::disconnect(ca, cb, &a.pair.kube.options(), a.unidirectional).await?
        }
        None => {
            let (sa, sb) = a.pair.grpc_sides()?;
            disconnect(&sa, &sb, a.unidirectional).await?
        }
    };
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let wait = a.wait.then_some(a.wait_timeout);
    let s = match &a.context {
        Some(ctx) => kube_connect::status(&a.install.options(), ctx, wait).await?,
        None => {
            let side = Side {
                addr: a.server.context("--server is missing")?,
                tls_dir: a.tls_dir.context("--tls-dir is missing")?,
            };
            status(&side, wait).await?
        }
    };
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
