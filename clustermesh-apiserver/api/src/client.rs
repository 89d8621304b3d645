//! An mTLS client of the API from a cluster certificate directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_certs::{ClusterDir, Role, TlsFiles};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::cluster_mesh_client::ClusterMeshClient;

/// Why the client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The certificate files are unusable.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The server could not be reached or the handshake failed.
    #[error("cannot reach the clustermesh-apiserver at {addr}: {detail}")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
}

/// Connect to the apiserver at `addr` presenting `role`'s certificate from `dir` (usually
/// [`Role::Admin`]) and trusting the directory's bundle. The server certificate must carry `addr`'s IP.
pub async fn connect(
    addr: SocketAddr,
    dir: &ClusterDir,
    role: Role,
) -> Result<ClusterMeshClient<Channel>, ClientError> {
    connect_with(addr, &dir.tls_files(role)).await
}

/// [`connect`] from explicit files.
pub async fn connect_with(
    addr: SocketAddr,
    files: &TlsFiles,
) -> Result<ClusterMeshClient<Channel>, ClientError> {
    Ok(ClusterMeshClient::new(channel(addr, files).await?))
}

/// An mTLS channel to the apiserver (for the gRPC health service or other clients).
pub async fn channel(addr: SocketAddr, files: &TlsFiles) -> Result<Channel, ClientError> {
    mesh_etcd::check_client_files(files).map_err(|e| ClientError::Credentials(e.to_string()))?;
    let cfg = mesh_certs::tls::grpc_client_config(files)
        .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let connector = TlsConnector::from(Arc::new(cfg));
    let server_name = ServerName::IpAddress(addr.ip().into());
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Connect {
            addr,
            detail: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            addr,
            detail: error_chain(&e),
        })?;
    Ok(channel)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}
