//! What can go wrong running, reaching and administering etcd, each naming the endpoint, file or
//! request.

use std::path::PathBuf;

/// etcd errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate, key or bundle could not be used.
    #[error(transparent)]
    Certs(#[from] mesh_certs::Error),
    /// The etcd binary could not be started.
    #[error("starting {}: {source}", binary.display())]
    EtcdSpawn {
        /// The etcd binary.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not become healthy in time, or exited.
    #[error("etcd {name} at {endpoint} did not become healthy: {detail}")]
    EtcdNotHealthy {
        /// The etcd member name.
        name: String,
        /// The client URL probed.
        endpoint: String,
        /// What happened (exit status, last error, log tail).
        detail: String,
    },
    /// No member of a multi-member etcd answered.
    #[error("no etcd member of {endpoints} answers: {tried}")]
    NoEtcdMember {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What each one said.
        tried: String,
    },
    /// The TCP connection to etcd failed.
    #[error("cannot reach etcd at {endpoint}: {detail}")]
    EtcdUnreachable {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// The etcd server's certificate is not trusted by our CA bundle.
    #[error(
        "etcd at {endpoint} presented a server certificate that our CA bundle {} does not trust: {detail}",
        bundle.display()
    )]
    EtcdServerUntrusted {
        /// The endpoint.
        endpoint: String,
        /// The CA bundle used to verify it.
        bundle: PathBuf,
        /// The verifier's complaint.
        detail: String,
    },
    /// etcd requires a client certificate and none was presented.
    #[error(
        "etcd at {endpoint} requires a client certificate (it runs with --client-cert-auth) and none was presented"
    )]
    EtcdClientCertRequired {
        /// The endpoint.
        endpoint: String,
    },
    /// etcd refused the client certificate during the TLS handshake.
    #[error("etcd at {endpoint} refused the client certificate {}: {reason}", cert.display())]
    EtcdClientCertRefused {
        /// The endpoint.
        endpoint: String,
        /// The client certificate file.
        cert: PathBuf,
        /// Why, in words (from the TLS alert the server sent).
        reason: String,
    },
    /// An etcd request failed.
    #[error("etcd {op}: {source}")]
    Etcd {
        /// The request, with its key or user ("put clustermesh/v1/x", "user add remote-b").
        op: String,
        /// The underlying error.
        #[source]
        source: etcd_client::Error,
    },
}

impl Error {
    pub(crate) fn etcd(op: impl Into<String>, source: etcd_client::Error) -> Self {
        Error::Etcd {
            op: op.into(),
            source,
        }
    }

    /// True when this is etcd refusing a request for lack of permission.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => source.to_string().contains("permission denied"),
            _ => false,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
