//! The clustermesh command: ca, certs, connect, disconnect, status, drill, demo.
//!
//! A thin clap shell: each subcommand's arguments and code live in their own module
//! (`ca.rs` for `ca` and `certs`); add a variant to [`Command`] and a match arm in `main`.

mod ca;
mod cmd_demo;
mod cmd_drill;
mod cmd_mesh;
mod cmd_workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_logging::LogFormat;

/// Multi-cluster mesh control plane: certificates, connecting clusters, status, failover drills.
#[derive(Debug, Parser)]
#[command(name = "clustermesh", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "CLUSTERMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `mesh_certs=debug`.
    #[arg(long, global = true, env = "CLUSTERMESH_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the mesh certificate authority: init, issue-cluster, rotate, retire, federate.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Work with certificate files: inspect.
    #[command(subcommand)]
    Certs(ca::CertsCommand),
    /// Join two clusters (both ways by default) after a preflight: reachability, names, ids,
    /// maxConnectedClusters, trust, CIDR overlap.
    ///
    /// Either `connect A B` with apiserver gRPC addresses
    /// and admin certificates, or `connect --context A --destination-context B` with kubeconfig
    /// contexts, where the registration is written as node-sync's remotes Secret.
    Connect(cmd_mesh::ConnectArgs),
    /// Undo `connect` (same two modes): the other side's backends leave every node's maps.
    Disconnect(cmd_mesh::DisconnectArgs),
    /// The mesh as one cluster sees it: apiserver, etcd, remotes and their nodes, global services.
    /// Exits 2 when unhealthy.
    Status(cmd_mesh::StatusArgs),
    /// A failover drill against a running mesh: steady new connections, a fail hook, a recover hook;
    /// reports failover, failback and failed connects. Exits 1 past --budget.
    Drill(cmd_drill::DrillArgs),
    /// Two clusters of two nodes on this host, every component real (etcd, apiservers, node-syncs,
    /// eBPF, backends, clients): connect them, publish a global service, run failover drills, print the
    /// figures and the status page. Needs root and a kernel with BPF.
    Demo(cmd_demo::DemoArgs),
    /// Drill workloads run inside lab nodes: an identity backend and a steady-rate probe.
    #[command(subcommand, hide = true)]
    Workload(cmd_workload::WorkloadCommand),
}

fn init_tracing(format: LogFormat, filter: &str) {
    mesh_logging::init(format, mesh_logging::filter_from_directive(filter, "warn"));
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log);
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Ca(cmd) => ok(ca::run_ca(cmd)),
        Command::Certs(cmd) => ok(ca::run_certs(cmd)),
        Command::Connect(a) => cmd_mesh::run_connect(a).await,
        Command::Disconnect(a) => cmd_mesh::run_disconnect(a).await,
        Command::Status(a) => cmd_mesh::run_status(a).await,
        Command::Drill(a) => cmd_drill::run_drill(a).await,
        Command::Demo(a) => cmd_demo::run_demo(a).await,
        Command::Workload(cmd) => ok(cmd_workload::run(cmd).await),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message before it
/// already contains (library errors often quote their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn connect_takes_addresses_or_kubernetes_contexts_but_not_both() {
        let cli = Cli::try_parse_from([
            "clustermesh",
            "connect",
            "--context",
            "kind-c1",
            "--destination-context",
            "kind-c2",
            "--kubeconfig",
            "/k",
        ])
        .unwrap();
        match cli.command {
            Command::Connect(a) => {
                assert_eq!(a.pair.kube.context.as_deref(), Some("kind-c1"));
                assert_eq!(a.pair.kube.install.namespace, "clustermesh");
                assert!(a.pair.a.is_none());
            }
            other => panic!("parsed as {other:?}"),
        }
        for bad in [
            &["connect", "--context", "c1"][..],
            &[
                "connect",
                "1.2.3.4:1",
                "--context",
                "c1",
                "--destination-context",
                "c2",
            ],
            &["status", "--context", "c1", "--server", "1.2.3.4:1"],
            &["status"],
            &["connect", "1.2.3.4:1", "1.2.3.4:2"],
            &["disconnect", "--destination-context", "c2"],
        ] {
            let argv: Vec<&str> = std::iter::once("clustermesh")
                .chain(bad.iter().copied())
                .collect();
            assert!(
                Cli::try_parse_from(&argv).is_err(),
                "{argv:?} must be refused"
            );
        }
        assert!(
            Cli::try_parse_from([
                "clustermesh",
                "disconnect",
                "--context",
                "c1",
                "--destination-context",
                "c2"
            ])
            .is_ok()
        );
        for good in [
            &[
                "connect",
                "--context",
                "c1",
                "--destination-context",
                "c2",
                "--wait",
            ][..],
            &["status", "--context", "c1", "-n", "mesh"],
        ] {
            let argv: Vec<&str> = std::iter::once("clustermesh")
                .chain(good.iter().copied())
                .collect();
            assert!(Cli::try_parse_from(&argv).is_ok(), "{good:?} is refused");
        }
    }

    #[test]
    fn issue_cluster_parses_repeated_sans() {
        let cli = Cli::try_parse_from([
            "clustermesh",
            "ca",
            "issue-cluster",
            "--ca",
            "/ca",
            "--cluster",
            "east",
            "--id",
            "3",
            "--out",
            "/east",
            "--san",
            "10.0.0.1",
            "--san",
            "etcd.east",
        ])
        .unwrap();
        match cli.command {
            Command::Ca(ca::CaCommand::IssueCluster(a)) => {
                assert_eq!(a.sans, vec!["10.0.0.1", "etcd.east"]);
                assert_eq!(a.id, 3);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
