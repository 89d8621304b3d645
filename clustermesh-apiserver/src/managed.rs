//! Managed etcd (the embedded default): without `--etcd-endpoints` the apiserver starts its own etcd child with
//! the secure bootstrap of `mesh_certs::etcd` (mTLS with `--client-cert-auth`, users and roles, auth enabled),
//! data under `<data-dir>/etcd`, and restarts it when it stops answering.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_certs::{ClusterDir, Role};
use mesh_etcd::{EtcdAuthAdmin, EtcdProcess, EtcdSpec};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// A supervised etcd child; killed (by its PID) when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct ManagedEtcd {
    proc: Arc<Mutex<EtcdProcess>>,
    endpoints: Vec<String>,
}

impl ManagedEtcd {
    /// Starts etcd for `dir`'s cluster with data under `data_dir/etcd`, waits until it serves, and bootstraps
    /// users, roles and auth (idempotent on an existing data directory).
    pub async fn start(
        dir: &ClusterDir,
        data_dir: &Path,
        client_url: &str,
        peer_url: &str,
        trust: mesh_etcd::ClientTrust,
    ) -> Result<Self, mesh_etcd::Error> {
        let spec = EtcdSpec::for_cluster(dir, data_dir.join("etcd"), client_url, peer_url)
            .client_trust(dir, trust)?;
        let proc = spec.spawn(Duration::from_secs(30)).await?;
        let endpoints = proc.endpoints();
        info!(pid = ?proc.pid(), endpoints = ?endpoints, "managed etcd started");
        let mut admin = EtcdAuthAdmin::connect(&endpoints, &dir.tls_files(Role::EtcdRoot)).await?;
        admin.bootstrap(&dir.info.name).await?;
        Ok(Self {
            proc: Arc::new(Mutex::new(proc)),
            endpoints,
        })
    }

    /// Client URLs of the managed etcd.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// PID of the etcd child.
    pub async fn pid(&self) -> Option<u32> {
        self.proc.lock().await.pid()
    }

    /// Checks etcd's health through `client` every `every`; after three misses in a row, restarts the child.
    pub fn supervise(
        &self,
        mut client: etcd_client::Client,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let proc = self.proc.clone();
        tokio::spawn(async move {
            let mut misses = 0;
            loop {
                tokio::time::sleep(every).await;
                match tokio::time::timeout(every, client.status()).await {
                    Ok(Ok(_)) => misses = 0,
                    _ => misses += 1,
                }
                if misses >= 3 {
                    warn!("managed etcd stopped answering; restarting it");
                    let mut p = proc.lock().await;
                    match p.restart(Duration::from_secs(30)).await {
                        Ok(()) => {
                            info!(pid = ?p.pid(), "managed etcd restarted");
                            misses = 0;
                        }
                        Err(e) => warn!(error = %e, "restarting managed etcd"),
                    }
                }
            }
        })
    }
}
