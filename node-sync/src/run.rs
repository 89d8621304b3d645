//! The binary's wiring: open the datapath maps (or in-memory ones with `--fake-maps`), bind the
//! status server, start the agent and the optional clusterset.local DNS server, then wait for
//! ctrl-c (or the status server's end) and stop the agent. The pinned maps keep serving.

use std::sync::Arc;

use anyhow::Context as _;

use crate::agent::{self, AgentOptions};
use crate::args::Args;
use crate::lb::{FakeMaps, MapWriter};

/// Runs node-sync until ctrl-c; logging is set up by the caller.
pub async fn run(args: Args) -> anyhow::Result<()> {
    crate::routing::refuse_unwired(args.routing)?;
    let opts = AgentOptions::from_args(&args);
    let (maps, events): (Box<dyn MapWriter>, _) = if args.fake_maps {
        tracing::warn!("--fake-maps: backends are kept in memory only, no traffic is steered");
        (Box::new(FakeMaps::new()), None)
    } else {
        crate::datapath::open(
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
    let mut status_source = agent.status_source();
    let _dns = match args.dns_listen {
        Some(listen) => {
            let metrics = Arc::new(clusterset_dns::DnsMetrics::default());
            status_source.dns_metrics = Some(metrics.clone());
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
    let status = tokio::spawn(crate::status::serve(listener, status_source));
    tracing::info!(cluster = %args.cluster_name, node = %args.node_name, status = %args.status_listen, "node-sync started");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; the pinned maps keep serving"),
        r = status => { r.context("status server task")?.context("status server")?; }
    }
    agent.stop();
    Ok(())
}
