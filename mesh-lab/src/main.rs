//! `mesh-lab`: bring a multi-cluster lab up on this host, tear it down, show what runs. Needs root.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_lab::{EtcdSecurity, Lab, LabSpec, LabStatus};
use mesh_logging::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-lab",
    version,
    about = "A multi-cluster lab on one Linux host (network namespaces, real etcd)"
)]
struct Cli {
    /// Directory holding lab state files.
    #[arg(long, env = "MESH_LAB_STATE_ROOT", default_value = mesh_lab::plan::DEFAULT_STATE_ROOT, global = true)]
    state_root: PathBuf,
    /// Log format.
    #[arg(long, env = "MESH_LAB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Security {
    /// Plain HTTP etcd.
    Plain,
    /// TLS etcd with client-certificate auth.
    Tls,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum UnderlayArg {
    /// One bridge per cluster, routed between clusters.
    Routed,
    /// One bridge for every cluster.
    Switched,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a lab (a crashed lab with the same prefix is cleaned up first) and leave it running.
    Up {
        /// Number of clusters.
        #[arg(long, env = "MESH_LAB_CLUSTERS", default_value_t = 2)]
        clusters: usize,
        /// Nodes per cluster.
        #[arg(long, env = "MESH_LAB_NODES", default_value_t = 2)]
        nodes: usize,
        /// Lab prefix (names namespaces, cgroups and the state directory).
        #[arg(long, env = "MESH_LAB_PREFIX", default_value = "lab")]
        prefix: String,
        /// Cluster names, comma separated (default c1,c2,...).
        #[arg(long, env = "MESH_LAB_CLUSTER_NAMES", value_delimiter = ',')]
        names: Vec<String>,
        /// How etcd is secured (tls: a per-lab CA, mTLS, client-cert auth and etcd users).
        #[arg(long, env = "MESH_LAB_ETCD", value_enum, default_value_t = Security::Tls)]
        etcd: Security,
        /// Give every node a pod CIDR (a /28 of its cluster's 10.X.<190+c>.0/24) and a pod: a network
        /// namespace <prefix>-c<c>-n<n>-pod behind the node. The router never routes pod CIDRs: another
        /// cluster's pods are reached only through node-sync's --routing. At most 16 nodes per cluster.
        #[arg(long, env = "MESH_LAB_PODS")]
        pods: bool,
        /// How clusters reach each other. routed: one bridge per cluster, the router routes between them
        /// (partitions, latency and loss apply). switched: every cluster on one bridge, nodes on-link to each
        /// other as kind's nodes on one Docker network, which node-sync --routing native needs (partitions
        /// apply; latency and loss are refused).
        #[arg(long, env = "MESH_LAB_UNDERLAY", value_enum, default_value_t = UnderlayArg::Routed)]
        underlay: UnderlayArg,
    },
    /// Remove a lab: processes, namespaces, cgroups, state.
    Down {
        /// Lab prefix.
        #[arg(long, env = "MESH_LAB_PREFIX", default_value = "lab")]
        prefix: String,
    },
    /// Drop all traffic between two clusters of an idle lab (one built by `mesh-lab up`).
    Partition {
        /// Lab prefix.
        #[arg(long, env = "MESH_LAB_PREFIX", default_value = "lab")]
        prefix: String,
        /// A cluster (name or 1-based index).
        a: String,
        /// The other cluster.
        b: String,
    },
    /// Remove the partition between two clusters of an idle lab.
    Heal {
        /// Lab prefix.
        #[arg(long, env = "MESH_LAB_PREFIX", default_value = "lab")]
        prefix: String,
        /// A cluster (name or 1-based index).
        a: String,
        /// The other cluster.
        b: String,
    },
    /// List labs, their clusters, etcd endpoints and processes.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    mesh_logging::init(cli.log_format, mesh_logging::filter_from_env("info"));
    match cli.command {
        Cmd::Up {
            clusters,
            nodes,
            prefix,
            names,
            etcd,
            pods,
            underlay,
        } => {
            let mut spec = LabSpec::new(&prefix, clusters, nodes)
                .cluster_names(names)
                .etcd_security(match etcd {
                    Security::Plain => EtcdSecurity::Plain,
                    Security::Tls => EtcdSecurity::Tls,
                })
                .underlay(match underlay {
                    UnderlayArg::Routed => mesh_lab::Underlay::Routed,
                    UnderlayArg::Switched => mesh_lab::Underlay::Switched,
                });
            spec.pods = pods;
            spec.state_root = cli.state_root.clone();
            let lab = Lab::up(spec).with_context(|| format!("mesh-lab up --prefix {prefix}"))?;
            println!("lab {prefix} up");
            print_plan(lab.plan());
            lab.keep();
        }
        Cmd::Down { prefix } => {
            let found = Lab::down_in(&cli.state_root, &prefix)
                .with_context(|| format!("mesh-lab down --prefix {prefix}"))?;
            if found {
                println!("lab {prefix} removed");
            } else {
                println!("no lab {prefix}: nothing to remove");
            }
        }
        Cmd::Partition { prefix, a, b } => {
            Lab::set_partition_in(&cli.state_root, &prefix, &a, &b, false)
                .with_context(|| format!("mesh-lab partition --prefix {prefix} {a} {b}"))?;
            println!("lab {prefix}: {a} and {b} partitioned");
        }
        Cmd::Heal { prefix, a, b } => {
            Lab::set_partition_in(&cli.state_root, &prefix, &a, &b, true)
                .with_context(|| format!("mesh-lab heal --prefix {prefix} {a} {b}"))?;
            println!("lab {prefix}: {a} and {b} healed");
        }
        Cmd::Status { output } => {
            let labs = Lab::status_in(&cli.state_root).context("mesh-lab status")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&labs)?),
                Output::Text => print_status(&labs),
            }
        }
    }
    Ok(())
}

fn print_plan(p: &mesh_lab::LabPlan) {
    println!(
        "  range {} (host {} on {}), cgroups under {}",
        p.supernet(),
        p.host_addr,
        p.host_veth,
        p.cgroup_dir.display()
    );
    if let Some(ca) = &p.ca_dir {
        println!("  CA {}", ca.display());
    }
    for c in &p.clusters {
        println!(
            "  cluster {} (id {}) {}  etcd {}",
            c.name,
            c.index,
            c.cidr(),
            c.etcd.client_url
        );
        if let Some(t) = &c.etcd.tls {
            println!("    certs {}", t.dir.display());
            println!(
                "    curl --cacert {} --cert {} --key {} {}/health",
                t.ca.display(),
                t.client_cert.display(),
                t.client_key.display(),
                c.etcd.client_url
            );
        }
        for n in std::iter::once(&c.control_plane).chain(&c.nodes) {
            println!(
                "    {:<3} {:<15} netns {:<20} cgroup .../{}",
                n.name,
                n.addr,
                n.netns,
                n.cgroup
                    .file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default()
            );
            if let Some(pod) = &n.pod {
                println!(
                    "        pod {:<15} on {:<18} netns {}",
                    pod.addr,
                    pod.cidr(),
                    pod.netns
                );
            }
        }
    }
}

fn print_status(labs: &[LabStatus]) {
    if labs.is_empty() {
        println!("no labs");
    }
    for l in labs {
        let use_ = if l.in_use {
            "in use by a live process"
        } else {
            "idle"
        };
        match &l.state {
            Some(s) => {
                let done = if s.complete {
                    ""
                } else {
                    ", incomplete (crashed during up?)"
                };
                println!("lab {} ({use_}{done})", l.prefix);
                print_plan(&s.plan);
                if !s.partitions.is_empty() {
                    println!("  partitions: {:?}", s.partitions);
                }
                for i in &s.impairments {
                    println!(
                        "  impairment c{} -> c{}: delay {:?} loss {}%",
                        i.from, i.to, i.impairment.delay, i.impairment.loss_percent
                    );
                }
            }
            None => println!("lab {} ({use_}): no readable state file", l.prefix),
        }
        println!("  namespaces present: {}", l.netns.len());
        for (r, alive) in &l.processes {
            println!(
                "  pid {:<7} {:<5} {}",
                r.pid,
                if *alive { "up" } else { "gone" },
                r.what
            );
        }
    }
}
