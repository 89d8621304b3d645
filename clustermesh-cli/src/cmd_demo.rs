//! `clustermesh demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clustermesh_cli::connect::GrpcConnect;
use mesh_lab::demo::{DemoOptions, fmt_ms, run};

use crate::cmd_mesh::Output;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stay up after the drills, with the status page served, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Print no progress; with `-o json` print only the result object.
    #[arg(long)]
    pub non_interactive: bool,
    /// Output format of the result.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Lab prefix (namespaces and cgroups are named after it).
    #[arg(long, default_value = "cmdemo")]
    pub prefix: String,
    /// Directory of the clustermesh-apiserver, node-sync and clustermesh binaries (default: next to this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// KVStoreMesh mode: each cluster's apiserver mirrors the other cluster's keys into its own etcd and
    /// every node-sync reads only its local etcd (`--kvstoremesh` on both).
    #[arg(long)]
    pub kvstoremesh: bool,
}

pub async fn run_demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut opts = DemoOptions {
        prefix: a.prefix,
        kvstoremesh: a.kvstoremesh,
        ..DemoOptions::default()
    };
    if let Some(d) = a.bin_dir {
        opts.bin_dir = d;
    }
    let quiet = a.non_interactive;
    let mut progress = |l: &str| {
        if !quiet {
            eprintln!("{l}");
        }
    };
    let (report, mesh) = run(&opts, &GrpcConnect, &mut progress).await?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string(&report)?),
        Output::Text => {
            println!(
                "ClusterMesh demo: 2 clusters x 2 nodes{}, service default/echo, client in c1/n1",
                if report.kvstoremesh {
                    " (KVStoreMesh)"
                } else {
                    ""
                }
            );
            println!("                     failover   failback   failed connects");
            for (name, d) in [
                ("graceful", &report.graceful),
                ("hard kill", &report.hard_kill),
            ] {
                println!(
                    "  {name:<16} {:>7} ms {:>7} ms   {}/{}",
                    fmt_ms(d.failover_ms),
                    fmt_ms(d.failback_ms),
                    d.failed_connects,
                    d.total_connects
                );
            }
            println!("status page: {}", report.status_url);
        }
    }
    if a.keep {
        eprintln!(
            "the mesh stays up; status page at {} (from this host); Ctrl-C ends it",
            report.status_url
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    tokio::task::block_in_place(|| mesh.teardown())?;
    // The drill succeeded when traffic moved and came back, and the graceful path lost nothing.
    let ok = report.graceful.failover_ms.is_some()
        && report.graceful.failback_ms.is_some()
        && report.hard_kill.failover_ms.is_some()
        && report.failed_connects == 0;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
