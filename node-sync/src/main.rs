//! `node-sync`: the node agent binary. Parses the flags, sets up logging and hands over to
//! [`node_sync::run`]; see the library docs.

use clap::Parser as _;
use node_sync::args::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_logging::init(args.log_format, mesh_logging::filter_from_env("info"));
    node_sync::run(args).await
}
