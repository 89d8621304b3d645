//! The clustermesh-apiserver gRPC API, `clustermesh.v1.ClusterMesh`.
//!
//! * [`pb`]: the protocol (`proto/clustermesh.proto`);
//! * [`client`]: an mTLS client from a cluster certificate directory (what `clustermesh connect`,
//!   `disconnect` and `status` use);
//! * [`server`]: the tonic service over any [`MeshControl`], served on our reloading rustls config, with
//!   mutating calls accepted only from the cluster's own admin certificate;
//! * [`control`]: [`control::EtcdMeshControl`], the implementation over the cluster's etcd.

pub mod client;
pub mod control;
pub mod server;

/// Generated protocol types.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("clustermesh.v1");
}

use mesh_model::ClusterName;
use mesh_model::status::MeshStatus;
use mesh_model::values::RemoteCluster;

/// Errors of the API, mapped onto gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a rule (name, id, own cluster).
    #[error("{0}")]
    Invalid(String),
    /// The caller is not allowed to do this.
    #[error("{0}")]
    Denied(String),
    /// The request conflicts with the state (an id taken by another cluster).
    #[error("{0}")]
    Conflict(String),
    /// etcd or a file could not be used.
    #[error("{0}")]
    Unavailable(String),
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(m) => tonic::Status::invalid_argument(m),
            ApiError::Denied(m) => tonic::Status::permission_denied(m),
            ApiError::Conflict(m) => tonic::Status::already_exists(m),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

/// What the service does, behind a trait so the server is tested without etcd and the apiserver
/// can plug its own state in.
#[tonic::async_trait]
pub trait MeshControl: Send + Sync + 'static {
    /// This cluster's name (mutating calls need the certificate `admin-<name>`).
    fn cluster_name(&self) -> &ClusterName;
    /// This cluster's certificate directory: its trust domain and bundle decide who speaks for
    /// the cluster (`mesh_certs::tls::check_cluster_identity`).
    fn cluster_dir(&self) -> &mesh_certs::ClusterDir;
    /// Who this cluster is.
    async fn cluster_info(&self) -> Result<pb::ClusterInfo, ApiError>;
    /// The mesh as this cluster sees it.
    async fn status(&self) -> Result<MeshStatus, ApiError>;
    /// Register a remote cluster; `Ok(false)` when it already was, exactly so.
    async fn register_remote(&self, remote: RemoteCluster) -> Result<bool, ApiError>;
    /// Let `peer`'s node-syncs read this cluster: create the etcd user `remote-<peer>` and sign the
    /// key of `remote_cert_pem` (the peer's own remote certificate) with this cluster's
    /// intermediate. Returns the chain (PEM) and its end of validity (RFC 3339).
    async fn issue_remote_reader(
        &self,
        peer: ClusterName,
        remote_cert_pem: String,
    ) -> Result<(String, String), ApiError>;
    /// Remove a remote cluster's registration; `Ok(false)` when there was none.
    async fn unregister_remote(&self, name: ClusterName) -> Result<bool, ApiError>;
    /// Add roots to the trust bundle; returns whether it changed and the fingerprints now trusted.
    async fn add_trust_bundle(&self, pem: String) -> Result<(bool, Vec<String>), ApiError>;
}
