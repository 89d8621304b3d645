//! Running etcd: its command line for mTLS with `--client-cert-auth` (from a cluster certificate
//! directory), the process, and waiting until it serves.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::{DEFAULT_ETCD_BINARY, connect};
use mesh_certs::spiffe::Role;
use mesh_certs::{CertKeyPaths, ClusterDir, Error as CertError, TlsFiles};

/// Which CAs an etcd accepts client certificates from (`--trusted-ca-file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTrust {
    /// The mesh's bundle: every root (current, not yet retired, federated). A client certificate
    /// from any cluster's intermediate is accepted, and its CN names the user: one compromised
    /// cluster can write `admin-<this cluster>`.
    #[default]
    Mesh,
    /// Only this cluster's own intermediate(s) (`client-ca.pem`): every credential that opens this
    /// etcd was minted by this cluster (the read-only `remote` certificate that `connect
    /// --context` hands to other clusters' nodes included). Another cluster's key, or a federated
    /// mesh's root, opens nothing here.
    Cluster,
}

/// The TLS files of an etcd member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// `--peer-trusted-ca-file`, and `--trusted-ca-file` unless `client_ca` is set: the bundle.
    pub ca_bundle: PathBuf,
    /// `--trusted-ca-file` when not the bundle ([`ClientTrust::Cluster`]: `client-ca.pem`).
    pub client_ca: Option<PathBuf>,
    /// `--cert-file`/`--key-file` (and the peer pair): the etcd-server certificate.
    pub server: CertKeyPaths,
    /// A client certificate [`EtcdSpec::spawn`] uses to probe readiness (any user; `root` by default).
    pub probe_client: CertKeyPaths,
}

impl EtcdTlsFiles {
    /// The files of a cluster directory: its bundle, `etcd-server.{crt,key}`, and `root.{crt,key}` as probe.
    pub fn from_cluster_dir(dir: &ClusterDir) -> Self {
        Self {
            ca_bundle: dir.ca_bundle(),
            client_ca: None,
            server: dir.cert_key(Role::EtcdServer),
            probe_client: dir.cert_key(Role::EtcdRoot),
        }
    }
}

/// One etcd member with mTLS and `--client-cert-auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// The etcd binary (default [`DEFAULT_ETCD_BINARY`]).
    pub binary: PathBuf,
    /// Member name (`--name`).
    pub name: String,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// Client URLs, `https://IP:PORT` (listened on and advertised).
    pub client_urls: Vec<String>,
    /// Peer URLs, `http://` or `https://` (https turns on peer mTLS with the same files).
    pub peer_urls: Vec<String>,
    /// `--initial-cluster`; `None`: this member alone (`<name>=<peer_urls[0]>`).
    pub initial_cluster: Option<String>,
    /// TLS files.
    pub tls: EtcdTlsFiles,
    /// Extra arguments appended verbatim.
    pub extra_args: Vec<String>,
}

impl EtcdSpec {
    /// A single-member etcd of a cluster directory: client on `client_url`, peer on `peer_url`.
    pub fn for_cluster(
        dir: &ClusterDir,
        data_dir: impl Into<PathBuf>,
        client_url: impl Into<String>,
        peer_url: impl Into<String>,
    ) -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_ETCD_BINARY),
            name: format!("etcd-{}", dir.info.name),
            data_dir: data_dir.into(),
            client_urls: vec![client_url.into()],
            peer_urls: vec![peer_url.into()],
            initial_cluster: None,
            tls: EtcdTlsFiles::from_cluster_dir(dir),
            extra_args: Vec::new(),
        }
    }

    /// Accept client certificates per `trust`: with [`ClientTrust::Cluster`] only those of the
    /// cluster's own intermediates (`client-ca.pem` of `dir`, written by `ca issue-cluster`; a
    /// directory issued before it has none, and is refused here naming the file).
    pub fn client_trust(mut self, dir: &ClusterDir, trust: ClientTrust) -> Result<Self> {
        self.tls.client_ca = match trust {
            ClientTrust::Mesh => None,
            ClientTrust::Cluster => {
                let f = dir.client_ca();
                if !f.is_file() {
                    return Err(CertError::MissingFile {
                        what: "client CA file (the cluster's own intermediates; re-issue the cluster with `clustermesh ca issue-cluster` to write it)",
                        path: f,
                    }
                    .into());
                }
                Some(f)
            }
        };
        Ok(self)
    }

    /// The arguments after the binary name (for `ip netns exec NS etcd ARGS...`).
    pub fn args(&self) -> Vec<String> {
        let clients = self.client_urls.join(",");
        let peers = self.peer_urls.join(",");
        let initial = self.initial_cluster.clone().unwrap_or_else(|| {
            format!(
                "{}={}",
                self.name,
                self.peer_urls.first().map(String::as_str).unwrap_or("")
            )
        });
        let p = |p: &Path| p.display().to_string();
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", p(&self.data_dir)),
            format!("--listen-client-urls={clients}"),
            format!("--advertise-client-urls={clients}"),
            format!("--listen-peer-urls={peers}"),
            format!("--initial-advertise-peer-urls={peers}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".to_owned(),
            format!("--initial-cluster-token=clustermesh-{}", self.name),
            format!("--cert-file={}", p(&self.tls.server.cert)),
            format!("--key-file={}", p(&self.tls.server.key)),
            "--client-cert-auth=true".to_owned(),
            format!(
                "--trusted-ca-file={}",
                p(self.tls.client_ca.as_ref().unwrap_or(&self.tls.ca_bundle))
            ),
            "--logger=zap".to_owned(),
            "--log-outputs=stderr".to_owned(),
        ];
        if self.peer_urls.iter().any(|u| u.starts_with("https://")) {
            a.extend([
                format!("--peer-cert-file={}", p(&self.tls.server.cert)),
                format!("--peer-key-file={}", p(&self.tls.server.key)),
                "--peer-client-cert-auth=true".to_owned(),
                format!("--peer-trusted-ca-file={}", p(&self.tls.ca_bundle)),
            ]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// The log file [`EtcdSpec::spawn`] writes: `<data_dir>.log`.
    pub fn log_file(&self) -> PathBuf {
        let mut s = self.data_dir.clone().into_os_string();
        s.push(".log");
        PathBuf::from(s)
    }

    /// Start `binary` directly (not in a namespace) and wait until it answers a status request
    /// over mTLS with the probe certificate, at most `timeout`.
    pub async fn spawn(&self, timeout: Duration) -> Result<EtcdProcess> {
        let log = self.log_file();
        if let Some(parent) = log.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| CertError::io("creating directory", parent, e))?;
        }
        let out = std::fs::File::create(&log).map_err(|e| CertError::io("creating", &log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| CertError::io("creating", &log, e))?;
        let child = Command::new(&self.binary)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::EtcdSpawn {
                binary: self.binary.clone(),
                source,
            })?;
        tracing::info!(name = %self.name, pid = child.id(), urls = ?self.client_urls, "started etcd");
        let mut proc = EtcdProcess {
            child: Some(child),
            spec: self.clone(),
        };
        proc.wait_ready(timeout).await?;
        Ok(proc)
    }
}

/// A running etcd started by [`EtcdSpec::spawn`]; killed (by its PID) when dropped.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Option<Child>,
    spec: EtcdSpec,
}

impl EtcdProcess {
    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &EtcdSpec {
        &self.spec
    }

    /// The client endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.spec.client_urls.clone()
    }

    /// Kill the process and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            tracing::info!(name = %self.spec.name, "stopped etcd");
        }
    }

    /// Stop and start again with the same spec and data (etcd re-reads `--trusted-ca-file`).
    pub async fn restart(&mut self, timeout: Duration) -> Result<()> {
        self.stop();
        let fresh = self.spec.spawn(timeout).await?;
        *self = fresh;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.spec.log_file()) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let endpoint = self.spec.client_urls.first().cloned().unwrap_or_default();
        let files = TlsFiles {
            ca_bundle: self.spec.tls.ca_bundle.clone(),
            identity: Some(self.spec.tls.probe_client.clone()),
        };
        let name = self.spec.name.clone();
        let child = self.child.as_mut();
        let outcome = wait_ready_inner(&name, &endpoint, &files, timeout, child).await;
        if outcome.is_err() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Err(Error::EtcdNotHealthy {
                name,
                endpoint,
                detail,
            }) = outcome
            {
                return Err(Error::EtcdNotHealthy {
                    name,
                    endpoint,
                    detail: format!(
                        "{detail}; last log lines ({}):\n{}",
                        self.spec.log_file().display(),
                        self.log_tail()
                    ),
                });
            }
        }
        outcome
    }
}

/// Wait until the etcd at `endpoint` answers a status request over mTLS with `files`, polling
/// (no event announces readiness) until `timeout`. For an etcd started elsewhere, e.g. inside a
/// network namespace from [`EtcdSpec::args`].
pub async fn wait_healthy(endpoint: &str, files: &TlsFiles, timeout: Duration) -> Result<()> {
    wait_ready_inner("etcd", endpoint, files, timeout, None).await
}

async fn wait_ready_inner(
    name: &str,
    endpoint: &str,
    files: &TlsFiles,
    timeout: Duration,
    mut child: Option<&mut Child>,
) -> Result<()> {
    let not_healthy = |detail: String| Error::EtcdNotHealthy {
        name: name.to_owned(),
        endpoint: endpoint.to_owned(),
        detail,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(not_healthy(format!("etcd exited with {status}")));
        }
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = connect(&[endpoint.to_owned()], files).await?;
            c.status()
                .await
                .map_err(|e| Error::etcd("status", e))
                .map(|_| ())
        })
        .await;
        let last = match attempt {
            Ok(Ok(())) => return Ok(()),
            // Our own files are broken: waiting will not help.
            Ok(Err(
                e @ Error::Certs(
                    CertError::MissingFile { .. }
                    | CertError::CorruptPem { .. }
                    | CertError::KeyMismatch { .. }
                    | CertError::Expired { .. },
                ),
            )) => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "status request timed out".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(not_healthy(format!(
                "not ready after {timeout:?}; last error: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(peer: &str) -> EtcdSpec {
        let ck = |n: &str| CertKeyPaths {
            cert: PathBuf::from(format!("/c/{n}.crt")),
            key: PathBuf::from(format!("/c/{n}.key")),
        };
        EtcdSpec {
            binary: PathBuf::from(DEFAULT_ETCD_BINARY),
            name: "etcd-east".into(),
            data_dir: PathBuf::from("/d/east"),
            client_urls: vec!["https://127.0.0.1:2379".into()],
            peer_urls: vec![peer.into()],
            initial_cluster: None,
            tls: EtcdTlsFiles {
                client_ca: None,
                ca_bundle: PathBuf::from("/c/ca-bundle.pem"),
                server: ck("etcd-server"),
                probe_client: ck("root"),
            },
            extra_args: vec![],
        }
    }

    #[test]
    fn args_turn_on_client_cert_auth() {
        let a = spec("http://127.0.0.1:2380").args();
        for want in [
            "--client-cert-auth=true",
            "--trusted-ca-file=/c/ca-bundle.pem",
            "--cert-file=/c/etcd-server.crt",
            "--key-file=/c/etcd-server.key",
            "--listen-client-urls=https://127.0.0.1:2379",
            "--initial-cluster=etcd-east=http://127.0.0.1:2380",
        ] {
            assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--peer-cert-file")));
        let a = spec("https://10.0.0.1:2380").args();
        assert!(a.iter().any(|x| x == "--peer-client-cert-auth=true"));
    }
}
