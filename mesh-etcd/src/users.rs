//! etcd users and roles: the least-privilege users of the mesh (see the crate doc), bootstrapped
//! once per cluster and added or removed per remote peer.

use etcd_client::{Client, Permission};
use mesh_model::ClusterName;

use crate::error::{Error, Result};
use crate::{MESH_PREFIX, connect, health_prefix, nodestatus_prefix};
use mesh_certs::TlsFiles;
use mesh_certs::spiffe::{Role, etcd_user};
use mesh_kv::retry_auth_old_revision;

/// Manages etcd users and roles as `root` (client certificate with CN `root`).
#[derive(Clone)]
pub struct EtcdAuthAdmin {
    client: Client,
}

impl std::fmt::Debug for EtcdAuthAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuthAdmin").finish_non_exhaustive()
    }
}

impl EtcdAuthAdmin {
    /// Connect with the `root` certificate of `root_files`.
    pub async fn connect(endpoints: &[String], root_files: &TlsFiles) -> Result<Self> {
        Ok(Self {
            client: connect(endpoints, root_files).await?,
        })
    }

    /// Wrap a client already connected as `root`.
    pub fn from_client(client: Client) -> Self {
        Self { client }
    }

    /// Create `root`, `admin-<cluster>`, `node-<cluster>` and `remote-<cluster>` (read-only, for
    /// peers given this cluster's own remote certificate) with their roles, and enable auth.
    /// Idempotent: running it again on a bootstrapped etcd changes nothing.
    pub async fn bootstrap(&mut self, cluster: &ClusterName) -> Result<()> {
        let users = self.user_names().await?;
        let roles = self.role_names().await?;
        if !roles.iter().any(|r| r == "root") {
            self.ensure_role_named("root", &roles).await?;
        }
        self.ensure_user("root", &users).await?;
        self.grant_role("root", "root").await?;

        let admin = etcd_user(Role::Admin, cluster);
        self.ensure_role_named(&admin, &roles).await?;
        self.grant(&admin, Permission::read_write(vec![0u8]).with_from_key())
            .await?;
        self.ensure_user(&admin, &users).await?;
        self.grant_role(&admin, &admin).await?;

        let node = etcd_user(Role::Node, cluster);
        self.ensure_role_named(&node, &roles).await?;
        self.grant(&node, Permission::read(MESH_PREFIX).with_prefix())
            .await?;
        self.grant(
            &node,
            Permission::read_write(health_prefix(cluster)).with_prefix(),
        )
        .await?;
        self.grant(
            &node,
            Permission::read_write(nodestatus_prefix(cluster)).with_prefix(),
        )
        .await?;
        self.ensure_user(&node, &users).await?;
        self.grant_role(&node, &node).await?;

        let remote = etcd_user(Role::Remote, cluster);
        self.ensure_role_named(&remote, &roles).await?;
        self.grant(&remote, Permission::read(MESH_PREFIX).with_prefix())
            .await?;
        self.ensure_user(&remote, &users).await?;
        self.grant_role(&remote, &remote).await?;

        self.client
            .auth_enable()
            .await
            .map_err(|e| Error::etcd("auth enable", e))?;
        tracing::info!(%cluster, "etcd auth bootstrapped");
        Ok(())
    }

    /// Create `remote-<peer>`, read-only on `clustermesh/v1/`. Idempotent.
    pub async fn add_remote_user(&mut self, peer: &ClusterName) -> Result<()> {
        let users = self.user_names().await?;
        let roles = self.role_names().await?;
        let name = etcd_user(Role::Remote, peer);
        self.ensure_role_named(&name, &roles).await?;
        self.grant(&name, Permission::read(MESH_PREFIX).with_prefix())
            .await?;
        self.ensure_user(&name, &users).await?;
        self.grant_role(&name, &name).await?;
        tracing::info!(%peer, user = %name, "added remote etcd user");
        Ok(())
    }

    /// Delete `remote-<peer>` and its role; requests made with its certificate fail from now on.
    /// Idempotent.
    pub async fn remove_remote_user(&mut self, peer: &ClusterName) -> Result<()> {
        let name = etcd_user(Role::Remote, peer);
        if self.user_names().await?.contains(&name) {
            self.client
                .user_delete(name.clone())
                .await
                .map_err(|e| Error::etcd(format!("user delete {name}"), e))?;
        }
        if self.role_names().await?.contains(&name) {
            self.client
                .role_delete(name.clone())
                .await
                .map_err(|e| Error::etcd(format!("role delete {name}"), e))?;
        }
        tracing::info!(%peer, user = %name, "removed remote etcd user");
        Ok(())
    }

    /// Every etcd user name.
    pub async fn user_names(&mut self) -> Result<Vec<String>> {
        Ok(self
            .client
            .user_list()
            .await
            .map_err(|e| Error::etcd("user list", e))?
            .users()
            .to_vec())
    }

    /// Every etcd role name.
    pub async fn role_names(&mut self) -> Result<Vec<String>> {
        Ok(self
            .client
            .role_list()
            .await
            .map_err(|e| Error::etcd("role list", e))?
            .roles()
            .to_vec())
    }

    async fn ensure_role_named(&mut self, name: &str, existing: &[String]) -> Result<()> {
        if existing.iter().any(|r| r == name) {
            return Ok(());
        }
        let c = self.client.clone();
        match retry_auth_old_revision("role add", || {
            let mut c = c.clone();
            async move { c.role_add(name).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) => Err(Error::etcd(format!("role add {name}"), e)),
        }
    }

    async fn ensure_user(&mut self, name: &str, existing: &[String]) -> Result<()> {
        if existing.iter().any(|u| u == name) {
            return Ok(());
        }
        // No password: these users can only authenticate with a client certificate.
        let opts = etcd_client::UserAddOptions::new().with_no_pwd();
        let c = self.client.clone();
        match retry_auth_old_revision("user add", || {
            let (mut c, opts) = (c.clone(), opts.clone());
            async move { c.user_add(name, "", Some(opts)).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) => Err(Error::etcd(format!("user add {name}"), e)),
        }
    }

    async fn grant(&mut self, role: &str, perm: Permission) -> Result<()> {
        let what = format!(
            "role grant-permission {role} {:?}",
            String::from_utf8_lossy(perm.key())
        );
        let c = self.client.clone();
        retry_auth_old_revision("role grant-permission", || {
            let (mut c, perm) = (c.clone(), perm.clone());
            async move { c.role_grant_permission(role, perm).await }
        })
        .await
        .map(|_| ())
        .map_err(|e| Error::etcd(what, e))
    }

    async fn grant_role(&mut self, user: &str, role: &str) -> Result<()> {
        let has = self
            .client
            .user_get(user)
            .await
            .map_err(|e| Error::etcd(format!("user get {user}"), e))?
            .roles()
            .iter()
            .any(|r| r == role);
        if has {
            return Ok(());
        }
        let c = self.client.clone();
        retry_auth_old_revision("user grant-role", || {
            let mut c = c.clone();
            async move { c.user_grant_role(user, role).await }
        })
        .await
        .map(|_| ())
        .map_err(|e| Error::etcd(format!("user grant-role {user} {role}"), e))
    }
}

/// Create `root`, `admin-<cluster>`, `node-<cluster>` and their roles, and enable auth, connecting
/// with the `root` certificate of `root_files`. Idempotent.
pub async fn bootstrap_auth(
    endpoints: &[String],
    root_files: &TlsFiles,
    cluster: &ClusterName,
) -> Result<()> {
    EtcdAuthAdmin::connect(endpoints, root_files)
        .await?
        .bootstrap(cluster)
        .await
}

/// Create `remote-<peer>` (read-only on `clustermesh/v1/`) in the etcd at `endpoints`. Idempotent.
pub async fn add_remote_user(
    endpoints: &[String],
    root_files: &TlsFiles,
    peer: &ClusterName,
) -> Result<()> {
    EtcdAuthAdmin::connect(endpoints, root_files)
        .await?
        .add_remote_user(peer)
        .await
}

/// Delete `remote-<peer>` from the etcd at `endpoints`. Idempotent.
pub async fn remove_remote_user(
    endpoints: &[String],
    root_files: &TlsFiles,
    peer: &ClusterName,
) -> Result<()> {
    EtcdAuthAdmin::connect(endpoints, root_files)
        .await?
        .remove_remote_user(peer)
        .await
}
