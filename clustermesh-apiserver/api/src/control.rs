//! [`EtcdMeshControl`]: the API over the cluster's etcd and certificate directory.
//!
//! Registrations live under `clustermesh/v1/remotes/<self>/<remote>` (node-syncs watch them and connect);
//! the remote's etcd user `remote-<remote>` (read-only on `clustermesh/v1/`) is created with the cluster's
//! `root` certificate. The status is computed from the cluster config, the registrations and the node
//! summaries under `nodestatus/<self>/`.

use std::sync::Arc;

use mesh_certs::{ClusterDir, Role, TrustBundle};
use mesh_kv::{EtcdStore, KvStore};
use mesh_model::keys::{KeyKind, MeshKey};
use mesh_model::status::{ApiserverState, MeshStatus};
use mesh_model::values::{ClusterConfig, MeshValue, NodeStatus, RemoteCluster, format_time};
use mesh_model::{ClusterId, ClusterName};
use tokio::sync::{Mutex, watch};
use tracing::warn;

use crate::pb::ClusterInfo;
use crate::{ApiError, MeshControl};

/// The capability a cluster advertises when its apiserver holds the intermediate key and so can
/// answer `IssueRemoteReader`.
pub const ISSUE_REMOTE_READER: &str = "issue-remote-reader";

/// How long one etcd request of the API may take.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The API over etcd.
pub struct EtcdMeshControl {
    config: ClusterConfig,
    dir: ClusterDir,
    /// The endpoints this apiserver uses for its etcd.
    etcd_endpoints: Vec<String>,
    /// The endpoints remote node-syncs should use (often the same).
    advertised_endpoints: Vec<String>,
    state: watch::Receiver<ApiserverState>,
    client: Mutex<Option<EtcdStore>>,
    /// Service CIDRs of the cluster, for the overlap check of `connect`.
    pub service_cidrs: Vec<String>,
    /// Pod CIDRs of the cluster.
    pub pod_cidrs: Vec<String>,
    /// Whom the cluster's etcd trusts for clients (`cluster`, `mesh`), when this apiserver runs
    /// it; empty when not known (an external etcd).
    pub etcd_client_trust: String,
}

impl EtcdMeshControl {
    /// The control for `config`'s cluster, with its certificate directory and etcd.
    pub fn new(
        config: ClusterConfig,
        dir: ClusterDir,
        etcd_endpoints: Vec<String>,
        advertised_endpoints: Vec<String>,
        state: watch::Receiver<ApiserverState>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            dir,
            etcd_endpoints,
            advertised_endpoints,
            state,
            client: Mutex::new(None),
            service_cidrs: Vec::new(),
            pod_cidrs: Vec::new(),
            etcd_client_trust: String::new(),
        })
    }

    async fn client(&self) -> Result<EtcdStore, ApiError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = mesh_etcd::connect_as(&self.dir, Role::Admin, &self.etcd_endpoints)
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!("etcd {}: {e}", self.etcd_endpoints.join(",")))
            })?;
        let store = EtcdStore::new(c, REQUEST_TIMEOUT);
        *guard = Some(store.clone());
        Ok(store)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    async fn list<T>(
        &self,
        prefix: &str,
        pick: impl Fn(MeshValue) -> Option<T>,
    ) -> Result<Vec<T>, ApiError> {
        let c = self.client().await?;
        let listing = match c.list(prefix, None).await {
            Ok(l) => l,
            Err(e) => {
                self.forget_client().await;
                return Err(ApiError::Unavailable(e.to_string()));
            }
        };
        let mut out = Vec::new();
        for kv in listing.kvs {
            let key = kv.key;
            let parsed = MeshKey::parse_for(&key, &self.config.name)
                .map_err(|e| e.to_string())
                .and_then(|k| MeshValue::decode(&k, &kv.value).map_err(|e| e.to_string()));
            match parsed {
                Ok(v) => out.extend(pick(v)),
                Err(error) => warn!(%key, %error, "skipping a value that does not parse"),
            }
        }
        Ok(out)
    }

    async fn remotes(&self) -> Result<Vec<RemoteCluster>, ApiError> {
        self.list(
            &KeyKind::Remotes.cluster_prefix(&self.config.name),
            |v| match v {
                MeshValue::Remote(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    fn root_files(&self) -> mesh_certs::TlsFiles {
        self.dir.tls_files(Role::EtcdRoot)
    }
}

#[tonic::async_trait]
impl MeshControl for EtcdMeshControl {
    fn cluster_name(&self) -> &ClusterName {
        &self.config.name
    }

    fn cluster_dir(&self) -> &ClusterDir {
        &self.dir
    }

    async fn cluster_info(&self) -> Result<ClusterInfo, ApiError> {
        let bundle = std::fs::read_to_string(self.dir.ca_bundle()).map_err(|e| {
            ApiError::Unavailable(format!("read {}: {e}", self.dir.ca_bundle().display()))
        })?;
        let remotes = self.remotes().await.unwrap_or_default();
        Ok(ClusterInfo {
            name: self.config.name.to_string(),
            id: self.config.id.get().into(),
            max_connected_clusters: self.config.max_connected_clusters.get().into(),
            etcd_endpoints: self.advertised_endpoints.clone(),
            ca_fingerprints: self
                .dir
                .ca_fingerprints()
                .map_err(|e| ApiError::Unavailable(e.to_string()))?,
            ca_bundle_pem: bundle,
            capabilities: {
                let mut c = vec!["sync-canaries".to_owned(), "endpoint-chunks".to_owned()];
                if self.dir.can_issue() {
                    c.push(ISSUE_REMOTE_READER.to_owned());
                }
                c
            },
            version: env!("CARGO_PKG_VERSION").into(),
            pod_cidrs: self.pod_cidrs.clone(),
            service_cidrs: self.service_cidrs.clone(),
            trust_domain: self.dir.info.trust_domain.to_string(),
            remotes: remotes.iter().map(|r| r.name.to_string()).collect(),
            remote_cert_pem: std::fs::read_to_string(self.dir.cert(Role::Remote))
                .unwrap_or_default(),
            etcd_client_trust: self.etcd_client_trust.clone(),
        })
    }

    async fn status(&self) -> Result<MeshStatus, ApiError> {
        let mut apiserver = self.state.borrow().clone();
        let remotes = match self.remotes().await {
            Ok(r) => r,
            Err(e) => {
                apiserver.etcd_healthy = false;
                warn!(error = %e, "status: etcd unreachable");
                Vec::new()
            }
        };
        let nodes: Vec<NodeStatus> = self
            .list(
                &KeyKind::NodeStatus.cluster_prefix(&self.config.name),
                |v| match v {
                    MeshValue::NodeStatus(s) => Some(s),
                    _ => None,
                },
            )
            .await
            .unwrap_or_default();
        let expected_nodes = self
            .list(
                &KeyKind::Nodes.cluster_prefix(&self.config.name),
                |v| match v {
                    MeshValue::Node(n) => Some(n.name),
                    _ => None,
                },
            )
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        let now_t = time::OffsetDateTime::now_utc();
        let now = format_time(now_t);
        let mut status = MeshStatus::compute(
            self.config.clone(),
            apiserver,
            &remotes,
            nodes,
            expected_nodes,
            now,
        );
        let certs = mesh_certs::expiry::in_dir(&self.dir.path, &mesh_certs::Role::LEAVES);
        status.warnings.extend(mesh_certs::expiry::warnings(
            "clustermesh-apiserver",
            &certs,
            now_t.unix_timestamp(),
        ));
        Ok(status)
    }

    async fn register_remote(&self, remote: RemoteCluster) -> Result<bool, ApiError> {
        if remote.name == self.config.name {
            return Err(ApiError::Invalid(format!(
                "cluster {} cannot be registered as its own remote",
                remote.name
            )));
        }
        if remote.id == self.config.id {
            return Err(ApiError::Conflict(format!(
                "cluster id {} of {} is this cluster's own id ({}): cluster ids must be unique in a mesh",
                remote.id, remote.name, self.config.name
            )));
        }
        ClusterId::new(remote.id.into(), self.config.max_connected_clusters)
            .map_err(|e| ApiError::Invalid(format!("{}: {e}", remote.name)))?;
        let existing = self.remotes().await?;
        if let Some(other) = existing
            .iter()
            .find(|r| r.id == remote.id && r.name != remote.name)
        {
            return Err(ApiError::Conflict(format!(
                "cluster id {} is already used by registered remote {}",
                remote.id, other.name
            )));
        }
        let key = MeshKey::Remote {
            cluster: self.config.name.clone(),
            remote: remote.name.clone(),
        };
        let value = MeshValue::Remote(remote.clone());
        value
            .validate(&key)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let mut remote = remote;
        if let Some(old) = existing.iter().find(|r| r.name == remote.name)
            && keeps_client_cert(&old.client_cert, &remote.client_cert)
        {
            // `connect` again brings a freshly signed certificate for the same key: the one
            // registered serves as well, so nothing changes (and no node-sync reconnects).
            remote.client_cert = old.client_cert.clone();
        }
        let value = MeshValue::Remote(remote.clone());
        let changed = existing.iter().find(|r| r.name == remote.name) != Some(&remote);
        // The user first: a node-sync that sees the registration can log in at once.
        mesh_etcd::add_remote_user(&self.etcd_endpoints, &self.root_files(), &remote.name)
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!("create etcd user remote-{}: {e}", remote.name))
            })?;
        if changed {
            // The user was just added: a member that has not applied that yet refuses the put
            // for a moment ("revision of auth store is old"); the store sends it again.
            let c = self.client().await?;
            c.put(&key.to_string(), &value.encode())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        }
        Ok(changed)
    }

    async fn issue_remote_reader(
        &self,
        peer: ClusterName,
        remote_cert_pem: String,
    ) -> Result<(String, String), ApiError> {
        if peer == self.config.name {
            return Err(ApiError::Invalid(format!(
                "cluster {peer} cannot be its own remote reader"
            )));
        }
        if !self.dir.can_issue() {
            return Err(ApiError::Unavailable(format!(
                "this apiserver cannot issue certificates: {} is not in its --tls-dir (mount the \
                 cluster's intermediate, or connect with --context, which hands peers this \
                 cluster's own remote certificate)",
                self.dir.key(Role::Intermediate).display()
            )));
        }
        let pem = self
            .dir
            .issue_remote_reader(&peer, remote_cert_pem.as_bytes())
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let not_after = self
            .dir
            .intermediate_info()
            .map(|i| format_time(i.not_after))
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        mesh_etcd::add_remote_user(&self.etcd_endpoints, &self.root_files(), &peer)
            .await
            .map_err(|e| ApiError::Unavailable(format!("create etcd user remote-{peer}: {e}")))?;
        Ok((pem, not_after))
    }

    async fn unregister_remote(&self, name: ClusterName) -> Result<bool, ApiError> {
        let key = MeshKey::Remote {
            cluster: self.config.name.clone(),
            remote: name.clone(),
        };
        let c = self.client().await?;
        let k = key.to_string();
        let unavailable = |e: mesh_kv::KvError| ApiError::Unavailable(e.to_string());
        let existed = c.get(&k).await.map_err(unavailable)?.is_some();
        c.delete(&k).await.map_err(unavailable)?;
        mesh_etcd::remove_remote_user(&self.etcd_endpoints, &self.root_files(), &name)
            .await
            .map_err(|e| ApiError::Unavailable(format!("delete etcd user remote-{name}: {e}")))?;
        Ok(existed)
    }

    async fn add_trust_bundle(&self, pem: String) -> Result<(bool, Vec<String>), ApiError> {
        let tmp = tempfile_path(&self.dir);
        std::fs::write(&tmp, pem.as_bytes()).map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let incoming = TrustBundle::load(&tmp);
        let _ = std::fs::remove_file(&tmp);
        let incoming = incoming.map_err(|e| ApiError::Invalid(format!("bundle: {e}")))?;
        let path = self.dir.ca_bundle();
        let mut bundle =
            TrustBundle::load(&path).map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let before = bundle.fingerprints();
        let own = mesh_certs::TrustDomain::new(&self.dir.info.trust_domain)
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        for fp in bundle.merge_foreign(&incoming, &own) {
            tracing::warn!(
                fingerprint = %fp,
                trust_domain = %own,
                "AddTrustBundle: skipped a root that claims this mesh's trust domain but is not one of ours"
            );
        }
        let after = bundle.fingerprints();
        let changed = before != after;
        if changed {
            bundle
                .save(&path)
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        }
        Ok((changed, after.iter().map(ToString::to_string).collect()))
    }
}

fn tempfile_path(dir: &ClusterDir) -> std::path::PathBuf {
    let base = dir.ca_bundle();
    let parent = base
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    parent.join(format!(".incoming-bundle-{}.pem", std::process::id()))
}

/// Whether a registered client certificate may stay when a registration brings `new`: both are
/// certificates of the same key by the same issuer, and the registered one has more than a third
/// of its life left (the renewal rule of `ca renew`). An empty `new` (a peer that cannot issue)
/// keeps nothing.
fn keeps_client_cert(old: &str, new: &str) -> bool {
    if old.is_empty() || new.is_empty() || old == new {
        return false;
    }
    let parse = |pem: &str| {
        let p = std::path::Path::new("<clientCert>");
        let certs = mesh_certs::files::parse_certs(p, pem.as_bytes()).ok()?;
        let leaf = certs.first()?;
        let info = mesh_certs::CertInfo::from_der(p, leaf).ok()?;
        let spki = mesh_certs::files::cert_spki(p, leaf).ok()?;
        let issuer = certs.get(1).map(|c| c.to_vec());
        Some((info, spki, issuer))
    };
    let (Some((o, ospki, oiss)), Some((_, nspki, niss))) = (parse(old), parse(new)) else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc();
    let life = o.not_after - o.not_before;
    ospki == nspki && oiss == niss && o.not_before <= now && now < o.not_after - life / 3
}
