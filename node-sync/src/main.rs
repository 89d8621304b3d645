//! `node-sync`: the node agent binary. See the library docs.

use anyhow::Context as _;
use clap::Parser as _;
use node_sync::agent::{self, AgentOptions};
use node_sync::args::Args;
use node_sync::lb::{FakeMaps, MapWriter};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_logging::init(args.log_format, mesh_logging::filter_from_env("info"));
    let opts = AgentOptions::from_args(&args);
    let (maps, events): (Box<dyn MapWriter>, _) = if args.fake_maps {
        tracing::warn!("--fake-maps: backends are kept in memory only, no traffic is steered");
        (Box::new(FakeMaps::new()), None)
    } else {
        node_sync::datapath::open(
            &args.bpffs,
            &args.cgroup,
            args.cluster_name.clone(),
            opts.cluster_ids.clone(),
        )
        .with_context(|| format!("opening the datapath maps under {}", args.bpffs.display()))?
    };
    let listener = tokio::net::TcpListener::bind(args.status_listen)
        .await
        .with_context(|| format!("binding the status server to {}", args.status_listen))?;
    let agent = agent::start_with_events(opts, maps, events);
    let _dns = match args.dns_listen {
        Some(listen) => {
            let metrics = std::sync::Arc::new(clusterset_dns::DnsMetrics::default());
            node_sync::agent::lock(&agent.shared()).dns_metrics = Some(metrics.clone());
            let config = clusterset_dns::DnsConfig {
                ttl: args.dns_ttl,
                forward: args.dns_forward,
                ..Default::default()
            };
            let server = clusterset_dns::DnsServer::bind(listen, agent.dns_zone(), config, metrics)
                .await
                .with_context(|| format!("binding the clusterset.local DNS server to {listen}"))?;
            tracing::info!(listen = %server.local_addr, "serving clusterset.local");
            Some(server)
        }
        None => None,
    };
    let status = tokio::spawn(node_sync::status::serve(listener, agent.shared()));
    tracing::info!(cluster = %args.cluster_name, node = %args.node_name, status = %args.status_listen, "node-sync started");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; the pinned maps keep serving"),
        r = status => { r.context("status server task")?.context("status server")?; }
    }
    agent.stop();
    Ok(())
}
