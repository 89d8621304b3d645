//! How node-sync reaches a cluster's etcd: the client for a [`ClusterSource`] (its TLS files, the
//! certificate the remote issued us when it fits our key, the first member that answers) and the
//! error text that says which side's files are at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::cluster::{CaSource, ClusterSource};

/// Why a cluster's etcd could not be reached. Each names the file or the endpoints.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file could not be read.
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        /// Which file (CA bundle, client key, client certificate).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The one endpoint did not answer in time.
    #[error("connecting to {endpoints}: timed out after {after:?}")]
    Timeout {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// How long we waited.
        after: Duration,
    },
    /// The client refused or failed to connect.
    #[error("connecting to {endpoints}: {source}")]
    Etcd {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// No member of a multi-member etcd answered.
    #[error(transparent)]
    NoMember(#[from] mesh_etcd::Error),
}

/// Why a certificate a remote issued us cannot be used with our key.
#[derive(Debug, thiserror::Error)]
enum NotIssuedForKey {
    #[error("no certificate in it")]
    Empty,
    #[error(transparent)]
    Certs(#[from] mesh_certs::Error),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Build an etcd client for a source.
pub async fn connect(source: &ClusterSource, timeout: Duration) -> Result<Client, ConnectError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    if let Some(tls) = &source.tls {
        let ca = match &tls.ca {
            CaSource::File(p) => read("CA bundle", p)?,
            CaSource::Pem(s) => s.clone().into_bytes(),
        };
        let key = read("client key", &tls.key)?;
        let read_own = || read("client certificate", &tls.cert);
        let cert = match &tls.cert_pem {
            Some(pem) => match issued_for_key(pem, &tls.key) {
                Ok(()) => pem.clone().into_bytes(),
                Err(why) => {
                    // Our remote key was replaced (issue-cluster again) after the remote signed
                    // the old one: its certificate cannot be used; ours may still be trusted
                    // there (mesh trust). `connect` again gets a new one.
                    tracing::warn!(
                        endpoints = ?source.endpoints,
                        %why,
                        fallback = %tls.cert.display(),
                        "the client certificate the remote cluster issued us does not fit our key; \
                         presenting our own (run clustermesh connect again to have it re-issued)"
                    );
                    read_own()?
                }
            },
            None => read_own()?,
        };
        opts = opts.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        );
    }
    let endpoints = || source.endpoints.join(",");
    if source.endpoints.len() <= 1 {
        return tokio::time::timeout(timeout, Client::connect(&source.endpoints, Some(opts)))
            .await
            .map_err(|_| ConnectError::Timeout {
                endpoints: endpoints(),
                after: timeout,
            })?
            .map_err(|source| ConnectError::Etcd {
                endpoints: endpoints(),
                source,
            });
    }
    Ok(mesh_etcd::connect_any_member(&source.endpoints, &opts, timeout).await?)
}

/// Whether the certificate chain `pem` (one a remote cluster issued) certifies the private key
/// in `key_path`.
fn issued_for_key(pem: &str, key_path: &Path) -> Result<(), NotIssuedForKey> {
    let what = Path::new("<clientCert of the remotes/ entry>");
    let certs = mesh_certs::files::parse_certs(what, pem.as_bytes())?;
    let leaf = certs.first().ok_or(NotIssuedForKey::Empty)?;
    let key = mesh_certs::files::load_key(key_path)?;
    Ok(mesh_certs::files::check_key_matches(
        what, leaf, key_path, &key,
    )?)
}

/// Name the endpoints and, for TLS failures, say which side's files are at fault.
pub fn explain(source: &ClusterSource, err: &str) -> String {
    let mut msg = format!("etcd {}: {err}", source.endpoints.join(","));
    if let Some(tls) = &source.tls {
        let ca = match &tls.ca {
            CaSource::File(p) => p.display().to_string(),
            CaSource::Pem(_) => "the caBundle of the remotes/ entry".to_owned(),
        };
        if err.contains("UnknownIssuer") || err.contains("unknown issuer") {
            msg.push_str(&format!(
                " (the etcd server's certificate is not signed by a CA of our bundle {ca})"
            ));
        } else if err.contains("certificate required")
            || err.contains("bad certificate")
            || err.contains("unknown ca")
            || err.contains("UnknownCA")
        {
            match &tls.cert_pem {
                Some(_) => msg.push_str(&format!(
                    " (the etcd server refused the client certificate it issued for our key {}: \
                     disconnected, or its intermediate was re-issued; run clustermesh connect again)",
                    tls.key.display()
                )),
                None => msg.push_str(&format!(
                    " (the etcd server refused our client certificate {})",
                    tls.cert.display()
                )),
            }
        } else if err.contains("NotValidForName") || err.contains("not valid for name") {
            msg.push_str(" (the etcd server's certificate does not name this address)");
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    /// The certificate a remote issued us is used only with the key it certifies: after our
    /// remote key was replaced it is not a fit, and connect falls back to our own certificate.
    #[test]
    fn an_issued_client_certificate_fits_only_the_key_it_certifies() {
        use mesh_certs::{ClusterRequest, Role, RootCa, TrustDomain, Validity};
        let tmp = tempfile::tempdir().unwrap();
        let ca = RootCa::init(
            &tmp.path().join("ca"),
            &TrustDomain::new("fit.test").unwrap(),
            &Validity::default(),
        )
        .unwrap();
        let dir = |n: &str, id: u32| {
            ca.issue_cluster(&ClusterRequest {
                cluster: c(n),
                id: ClusterId::new(id, MaxConnectedClusters::DEFAULT).unwrap(),
                out: tmp.path().join(n),
                sans: vec![],
                validity: Validity::default(),
            })
            .unwrap()
        };
        let (east, west) = (dir("east", 1), dir("west", 2));
        let pem = east
            .issue_remote_reader(&c("west"), &std::fs::read(west.cert(Role::Remote)).unwrap())
            .unwrap();
        issued_for_key(&pem, &west.key(Role::Remote)).expect("west's own key fits");
        let e = issued_for_key(&pem, &east.key(Role::Remote))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match") || e.contains("key"), "{e}");
        assert!(issued_for_key("garbage", &west.key(Role::Remote)).is_err());
    }
}
