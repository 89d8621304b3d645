//! The mesh-facing side of the apiserver: the gRPC API (`clustermesh.v1.ClusterMesh`, from the
//! `clustermesh-api` crate) on `--grpc-listen`, and the mesh status behind `/api/v1/status` and the
//! status web page at `/`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clustermesh_api::control::EtcdMeshControl;
use mesh_certs::tls::ClientAuth;
use mesh_certs::{ClusterDir, Role};
use mesh_model::status::ApiserverState;
use mesh_model::values::{Capabilities, ClusterConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::args::Args;
use crate::index::IndexConfig;
use crate::status::{Role as ReplicaRole, Status, StatusSnapshot};

/// The status web page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// Where the status endpoint finds the mesh control once it runs.
#[derive(Default)]
pub struct MeshSlot(OnceLock<Arc<EtcdMeshControl>>);

impl MeshSlot {
    /// Install the control (once).
    pub fn set(&self, control: Arc<EtcdMeshControl>) {
        let _ = self.0.set(control);
    }

    /// The control, if installed.
    pub fn get(&self) -> Option<Arc<EtcdMeshControl>> {
        self.0.get().cloned()
    }
}

impl std::fmt::Debug for MeshSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "MeshSlot(set)"
        } else {
            "MeshSlot(unset)"
        })
    }
}

/// The apiserver's own state, as the mesh status reports it.
pub fn apiserver_state(s: &StatusSnapshot) -> ApiserverState {
    ApiserverState {
        replica: s.replica.clone(),
        leader: (s.role == ReplicaRole::Leader).then(|| s.replica.clone()),
        is_leader: s.role == ReplicaRole::Leader,
        ready: s.ready,
        etcd_healthy: s.last_error.is_none() || s.role != ReplicaRole::Starting,
        keys: s.desired_keys,
        source_errors: s.source_errors_total,
    }
}

/// Start the gRPC API (needs `--tls-dir`: the server presents `apiserver.crt` and requires client
/// certificates of the mesh) and install the mesh control into `status`.
pub async fn start(args: &Args, index: &IndexConfig, status: Arc<Status>) -> anyhow::Result<()> {
    let Some(tls_dir) = args.etcd.tls_dir.as_deref() else {
        warn!("no --tls-dir: the gRPC API (connect, disconnect, status) is off");
        return Ok(());
    };
    if !ClusterDir::is_cluster_dir(tls_dir) {
        warn!(dir = %tls_dir.display(), "--tls-dir is not a cluster certificate directory (no cluster.json): the gRPC API is off");
        return Ok(());
    }
    let dir =
        ClusterDir::open(tls_dir).with_context(|| format!("--tls-dir {}", tls_dir.display()))?;
    let config = ClusterConfig {
        name: index.cluster.clone(),
        id: index.cluster_id,
        max_connected_clusters: index.max_connected_clusters,
        capabilities: Capabilities::v1(index.cached),
        ca_fingerprints: index.ca_fingerprints.clone(),
    };
    let (tx, rx) = watch::channel(apiserver_state(&status.snapshot()));
    {
        let status = status.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if tx.send(apiserver_state(&status.snapshot())).is_err() {
                    break;
                }
            }
        });
    }
    let mut control = EtcdMeshControl::new(
        config,
        dir.clone(),
        args.etcd.endpoints.clone(),
        if args.advertise_etcd_endpoints.is_empty() {
            args.etcd.endpoints.clone()
        } else {
            args.advertise_etcd_endpoints.clone()
        },
        rx,
    );
    if args.etcd.endpoints.is_empty() {
        // Managed etcd: this apiserver knows whom it trusts for clients.
        Arc::get_mut(&mut control)
            .expect("the control is not shared yet")
            .etcd_client_trust = match args.managed_etcd_client_trust {
            crate::args::EtcdClientTrust::Mesh => "mesh",
            crate::args::EtcdClientTrust::Cluster => "cluster",
        }
        .to_owned();
    }
    status.mesh.set(control.clone());
    let tls =
        mesh_certs::tls::grpc_server_config(&dir.tls_files(Role::Apiserver), ClientAuth::Required)
            .context("gRPC server TLS")?;
    let listener = TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("gRPC listen on {}", args.grpc_listen))?;
    info!(addr = %args.grpc_listen, "gRPC API listening");
    tokio::spawn(async move {
        if let Err(error) =
            clustermesh_api::server::serve(listener, tls, control, std::future::pending()).await
        {
            warn!(%error, "gRPC API stopped");
        }
    });
    Ok(())
}
