//! The gRPC server: [`MeshService`] over a [`MeshControl`], and [`serve`] on a TCP listener with our
//! rustls config (which re-reads certificates when they change).

use std::sync::Arc;

use mesh_model::ClusterName;
use mesh_model::keys::KeyKind;
use mesh_model::values::RemoteCluster;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::pb::cluster_mesh_server::{ClusterMesh, ClusterMeshServer};
use crate::pb::{
    AddTrustBundleRequest, AddTrustBundleResponse, ClusterInfo, GetClusterInfoRequest,
    GetStatusRequest, GetStatusResponse, IssueRemoteReaderRequest, IssueRemoteReaderResponse,
    RegisterRemoteRequest, RegisterRemoteResponse, UnregisterRemoteRequest,
    UnregisterRemoteResponse,
};
use crate::{ApiError, MeshControl};

/// The tonic service.
pub struct MeshService<C> {
    control: Arc<C>,
    /// Check the caller's certificate on mutating calls (off only for tests without TLS).
    require_admin: bool,
}

impl<C: MeshControl> MeshService<C> {
    /// A service that accepts mutating calls only from `admin-<cluster>`.
    pub fn new(control: Arc<C>) -> Self {
        Self {
            control,
            require_admin: true,
        }
    }

    /// Wrap in the generated server.
    pub fn into_server(self) -> ClusterMeshServer<Self> {
        ClusterMeshServer::new(self)
    }

    fn check_admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        if !self.require_admin {
            return Ok(());
        }
        let want = format!("admin-{}", self.control.cluster_name());
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated(format!(
                "{what}: no client certificate; use the credentials of {want}"
            ))
        })?;
        let cn = certs.first().and_then(|c| common_name(c.as_ref()));
        match cn {
            Some(cn) if cn == want => {
                // The CN names the etcd user; who may act for the cluster is decided by identity:
                // the SPIFFE id and the intermediate the chain really goes through.
                let dir = self.control.cluster_dir();
                let td = mesh_certs::TrustDomain::new(&dir.info.trust_domain)
                    .map_err(|e| Status::internal(format!("trust domain: {e}")))?;
                mesh_certs::tls::check_cluster_identity(
                    &certs,
                    &dir.ca_bundle(),
                    &td,
                    self.control.cluster_name(),
                    mesh_certs::Role::Admin,
                )
                .map_err(|why| {
                    warn!(call = what, cn = %cn, %why, "refused a client certificate that names our admin but is not");
                    Status::permission_denied(format!(
                        "{what}: the client certificate says {want:?} but {why}; only {want:?} issued by this cluster's intermediate may change its registrations"
                    ))
                })
            }
            Some(cn) => Err(Status::permission_denied(format!(
                "{what}: the client certificate is {cn:?}; only {want:?} may change this cluster's registrations"
            ))),
            None => Err(Status::permission_denied(format!(
                "{what}: the client certificate has no common name"
            ))),
        }
    }
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

fn cluster_name(field: &str, s: &str) -> Result<ClusterName, Status> {
    ClusterName::new(s).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl<C: MeshControl> ClusterMesh for MeshService<C> {
    async fn get_cluster_info(
        &self,
        _: Request<GetClusterInfoRequest>,
    ) -> Result<Response<ClusterInfo>, Status> {
        Ok(Response::new(self.control.cluster_info().await?))
    }

    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let s = self.control.status().await?;
        let json = serde_json::to_string(&s).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(GetStatusResponse {
            json,
            healthy: s.healthy,
        }))
    }

    async fn register_remote(
        &self,
        req: Request<RegisterRemoteRequest>,
    ) -> Result<Response<RegisterRemoteResponse>, Status> {
        self.check_admin(&req, "RegisterRemote")?;
        let r = req.into_inner();
        let name = cluster_name("name", &r.name)?;
        let id = mesh_model::ClusterId::new(r.id, mesh_model::MaxConnectedClusters::EXTENDED)
            .map_err(|e| Status::invalid_argument(format!("id: {e}")))?;
        if r.etcd_endpoints.is_empty() {
            return Err(Status::invalid_argument(
                "etcd_endpoints: at least one endpoint is needed",
            ));
        }
        let remote = RemoteCluster {
            name,
            id,
            endpoints: r.etcd_endpoints,
            ca_bundle: r.ca_bundle_pem,
            client_cert: r.client_cert_pem,
        };
        let key = format!(
            "{}{}/{}",
            KeyKind::Remotes.prefix(),
            self.control.cluster_name(),
            remote.name
        );
        let changed = self.control.register_remote(remote).await?;
        info!(%key, changed, "remote cluster registered");
        Ok(Response::new(RegisterRemoteResponse { changed }))
    }

    async fn issue_remote_reader(
        &self,
        req: Request<IssueRemoteReaderRequest>,
    ) -> Result<Response<IssueRemoteReaderResponse>, Status> {
        self.check_admin(&req, "IssueRemoteReader")?;
        let r = req.into_inner();
        let name = cluster_name("name", &r.name)?;
        if r.remote_cert_pem.trim().is_empty() {
            return Err(Status::invalid_argument(
                "remote_cert_pem: the peer's remote certificate is needed (its key is signed)",
            ));
        }
        let (cert_pem, not_after) = self
            .control
            .issue_remote_reader(name.clone(), r.remote_cert_pem)
            .await?;
        info!(peer = %name, %not_after, "issued a reader certificate (remote-{name})");
        Ok(Response::new(IssueRemoteReaderResponse {
            cert_pem,
            not_after,
        }))
    }

    async fn unregister_remote(
        &self,
        req: Request<UnregisterRemoteRequest>,
    ) -> Result<Response<UnregisterRemoteResponse>, Status> {
        self.check_admin(&req, "UnregisterRemote")?;
        let name = cluster_name("name", &req.into_inner().name)?;
        let changed = self.control.unregister_remote(name.clone()).await?;
        info!(remote = %name, changed, "remote cluster unregistered");
        Ok(Response::new(UnregisterRemoteResponse { changed }))
    }

    async fn add_trust_bundle(
        &self,
        req: Request<AddTrustBundleRequest>,
    ) -> Result<Response<AddTrustBundleResponse>, Status> {
        self.check_admin(&req, "AddTrustBundle")?;
        let (changed, ca_fingerprints) = self
            .control
            .add_trust_bundle(req.into_inner().bundle_pem)
            .await?;
        Ok(Response::new(AddTrustBundleResponse {
            changed,
            ca_fingerprints,
        }))
    }
}

/// Serve the API on `listener` with mTLS (`tls` should ask for client certificates: optional is enough,
/// since reads are open to any certificate of the mesh and writes check the admin CN), until `shutdown`
/// resolves. Each handshake runs on its own task so a slow client holds up no other.
pub async fn serve<C: MeshControl>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    control: Arc<C>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(error)) => warn!(%peer, %error, "gRPC TLS handshake failed"),
                    Err(_) => warn!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    // The standard gRPC health service: SERVING for the whole server and for clustermesh.v1.ClusterMesh.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ClusterMeshServer<MeshService<C>>>()
        .await;
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(MeshService::new(control).into_server())
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .map_err(|e| ApiError::Unavailable(format!("gRPC server: {e}")));
    accept.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_of_a_generated_certificate() {
        let mut params = rcgen_params("admin-c1");
        params.is_ca = rcgen::IsCa::NoCa;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), Some("admin-c1".to_owned()));
        assert_eq!(common_name(b"garbage"), None);
    }

    fn rcgen_params(cn: &str) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p
    }
}
