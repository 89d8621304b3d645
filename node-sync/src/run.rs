//! The binary's wiring: open the datapath maps (or in-memory ones with `--fake-maps`), bind the
//! status server, start the agent, the route manager of `--routing` and the optional
//! clusterset.local DNS server, then wait for ctrl-c (or the status server's end) and stop the
//! agent. The pinned maps keep serving, and the routes stay.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::agent::{self, Agent, AgentOptions};
use crate::args::Args;
use crate::lb::{FakeMaps, MapWriter};
use crate::routing::{
    NetlinkRoutes, NetlinkVxlan, RouteManager, RouteOwner, RoutingMode, RoutingStatus, VxlanConfig,
    VxlanRoutes,
};
use crate::status::RoutingView;

/// How often the route manager reconciles with no node change (a route of ours someone deleted comes back).
const ROUTE_RESYNC: Duration = Duration::from_secs(10);

/// `--routing`: starts what carries the mode out, following the agent's remote nodes; what the status server
/// shows of it (`None` for `none`). One branch per mode.
async fn start_routing(args: &Args, agent: &Agent) -> anyhow::Result<Option<RoutingView>> {
    let mode = args.routing;
    match mode {
        RoutingMode::None => Ok(None),
        RoutingMode::Native => {
            let table = NetlinkRoutes::open(RouteOwner::default())
                .context("--routing native: opening the route table")?;
            let (tx, status) = tokio::sync::watch::channel(RoutingStatus::default());
            tokio::spawn(RouteManager::new(table).run(agent.remote_nodes(), tx, ROUTE_RESYNC));
            tracing::info!(
                protocol = crate::routing::CLUSTERMESH_PROTOCOL,
                "routing remote pod CIDRs natively (main table)"
            );
            Ok(Some(RoutingView { mode, status }))
        }
        RoutingMode::Vxlan => {
            let local = match args.vxlan_local_address {
                Some(a) => a,
                None => {
                    NetlinkVxlan::open(RouteOwner::default())
                        .context("--routing vxlan: opening a netlink socket")?
                        .default_route_address()
                        .await?
                }
            };
            let config = VxlanConfig {
                vni: args.vxlan_vni,
                port: args.vxlan_port,
                ..VxlanConfig::new(local)
            };
            tracing::info!(
                device = %config.name,
                vni = config.vni,
                port = config.port,
                local = %config.local,
                protocol = crate::routing::CLUSTERMESH_PROTOCOL,
                "routing remote pod CIDRs through a vxlan overlay"
            );
            let table = VxlanRoutes::open(config, RouteOwner::default())
                .context("--routing vxlan: opening the route table")?;
            let (tx, status) = tokio::sync::watch::channel(RoutingStatus::default());
            tokio::spawn(RouteManager::new(table).run(agent.remote_nodes(), tx, ROUTE_RESYNC));
            Ok(Some(RoutingView { mode, status }))
        }
    }
}

/// Runs node-sync until ctrl-c; logging is set up by the caller.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let opts = AgentOptions::from_args(&args);
    let (maps, events): (Box<dyn MapWriter>, _) = if args.fake_maps {
        tracing::warn!("--fake-maps: backends are kept in memory only, no traffic is steered");
        (Box::new(FakeMaps::new()), None)
    } else {
        crate::datapath::open(
            &args.bpffs,
            &args.cgroup,
            args.max_backends,
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
    status_source.routing = start_routing(&args, &agent).await?;
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
