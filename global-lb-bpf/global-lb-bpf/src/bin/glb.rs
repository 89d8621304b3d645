//! `glb`: load, inspect and edit the global service socket load balancer by hand.
//!
//! Every command opens the datapath (attaching and pinning on first use, reusing the pins
//! afterwards), does its work and exits; the datapath keeps running.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use global_lb_bpf::{Backend, Datapath, DatapathConfig, Frontend, ServiceMaps, mounts};
use mesh_logging::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "glb", about = "eBPF socket load balancer for global services")]
struct Args {
    /// cgroup v2 directory whose processes are load-balanced (needed by attach, upsert, delete).
    #[arg(long, env = "GLB_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Directory on bpffs for the pinned maps and links (one per cgroup).
    #[arg(long, env = "GLB_PIN_DIR", default_value = "/sys/fs/bpf/clustermesh")]
    pin_dir: PathBuf,
    /// Capacity of the backends map (attach, upsert, delete): the maps are resized to it, their
    /// services carried over. Default: the capacity of the maps already pinned (so a datapath
    /// node-sync opened with --max-backends keeps its size), else 65536.
    #[arg(long, env = "GLB_MAX_BACKENDS")]
    max_backends: Option<u32>,
    /// Mount bpffs at /sys/fs/bpf first if it is not mounted.
    #[arg(long, env = "GLB_MOUNT_BPFFS")]
    mount_bpffs: bool,
    /// Log format on stderr.
    #[arg(long, env = "GLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the programs (or check the pinned ones) and exit.
    Attach,
    /// Create or replace a service: `glb upsert tcp:10.96.0.10:80 10.1.0.5:8080@1,local ...`.
    Upsert {
        #[arg(help = "PROTO:ADDR:PORT, e.g. tcp:10.96.0.10:80 or udp:[fd00::10]:53")]
        frontend: Frontend,
        #[arg(
            help = "ADDR:PORT[@CLUSTER][*WEIGHT][,local]; none makes connects fail with ECONNREFUSED"
        )]
        backends: Vec<Backend>,
    },
    /// Delete a service.
    Delete {
        /// PROTO:ADDR:PORT.
        frontend: Frontend,
    },
    /// Print the services as JSON (read-only; works while another process owns the datapath).
    List,
    /// Print the per-backend connection counters as JSON (read-only).
    Counters,
    /// Detach the programs and delete the pinned maps.
    Remove,
}

fn main() -> Result<()> {
    let args = Args::parse();
    mesh_logging::init(args.log_format, mesh_logging::filter_from_env("info"));
    if args.mount_bpffs {
        mounts::ensure_bpffs(std::path::Path::new(mounts::DEFAULT_BPFFS))?;
    }
    match args.command {
        Command::Remove => {
            Datapath::remove(&args.pin_dir)
                .with_context(|| format!("removing {}", args.pin_dir.display()))?;
        }
        Command::List => {
            let view = Datapath::inspect(&args.pin_dir)?;
            println!("{}", serde_json::to_string_pretty(&view.services()?)?);
        }
        Command::Counters => {
            let view = Datapath::inspect(&args.pin_dir)?;
            println!("{}", serde_json::to_string_pretty(&view.counters()?)?);
        }
        Command::Attach | Command::Upsert { .. } | Command::Delete { .. } => {
            let cgroup = args
                .cgroup
                .clone()
                .context("--cgroup (or GLB_CGROUP) is required to attach or write services")?;
            let max_backends = match args.max_backends {
                Some(n) => n,
                None => Datapath::pinned_max_backends(&args.pin_dir)?
                    .unwrap_or(global_lb_bpf::DEFAULT_MAX_BACKENDS),
            };
            let mut dp = Datapath::open(
                &DatapathConfig::new(cgroup, args.pin_dir.clone()).with_max_backends(max_backends),
            )?;
            match args.command {
                Command::Upsert { frontend, backends } => {
                    let id = dp.upsert_service(&frontend, &backends)?;
                    println!(
                        "{}",
                        serde_json::json!({ "frontend": frontend, "service_id": id })
                    );
                }
                Command::Delete { frontend } => {
                    let existed = dp.delete_service(&frontend)?;
                    println!(
                        "{}",
                        serde_json::json!({ "frontend": frontend, "deleted": existed })
                    );
                }
                _ => {}
            }
        }
    }
    Ok(())
}
