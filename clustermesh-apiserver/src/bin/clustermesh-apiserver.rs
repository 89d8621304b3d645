//! clustermesh-apiserver: publishes this cluster's part of the mesh into etcd.

use clap::Parser;
use clustermesh_apiserver::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    clustermesh_apiserver::run::init_logging(args.log_format);
    clustermesh_apiserver::run::run(args).await
}
