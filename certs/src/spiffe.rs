//! SPIFFE identities of mesh certificates: `spiffe://<trust-domain>/cluster/<name>/<role>`.

use std::fmt;

use mesh_model::ClusterName;

use crate::error::{Error, Result};

/// A SPIFFE trust domain: the name of one mesh (`example.org`, `mesh.local`).
///
/// Rules (SPIFFE ID spec): 1 to 255 characters of lowercase letters, digits, `.`, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validate `domain` against the SPIFFE trust domain rules.
    pub fn new(domain: &str) -> Result<Self> {
        let bad = |rule| {
            Err(Error::TrustDomain {
                domain: domain.to_owned(),
                rule,
            })
        };
        if domain.is_empty() {
            return bad("it is empty");
        }
        if domain.len() > 255 {
            return bad("it is longer than 255 characters");
        }
        if !domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        {
            return bad("only lowercase letters, digits, '.', '-' and '_' are allowed");
        }
        Ok(Self(domain.to_owned()))
    }

    /// The trust domain as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a certificate is for. The role decides the file names, the CN and the key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The cluster's intermediate CA.
    Intermediate,
    /// The etcd server certificate (server auth).
    EtcdServer,
    /// The clustermesh-apiserver gRPC server certificate (server auth).
    Apiserver,
    /// The etcd `root` user (CN `root`), used to bootstrap etcd auth.
    EtcdRoot,
    /// `admin-<cluster>`: read-write on the cluster's own etcd (the apiserver uses it).
    Admin,
    /// `node-<cluster>`: what the cluster's node-syncs present to their own etcd.
    Node,
    /// `remote-<cluster>`: what the cluster's node-syncs present to other clusters' etcd.
    Remote,
}

impl Role {
    /// Every leaf role, in the order `issue-cluster` writes them.
    pub const LEAVES: [Role; 6] = [
        Role::EtcdServer,
        Role::Apiserver,
        Role::EtcdRoot,
        Role::Admin,
        Role::Node,
        Role::Remote,
    ];

    /// The role's name in SPIFFE ids and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Intermediate => "intermediate",
            Role::EtcdServer => "etcd-server",
            Role::Apiserver => "apiserver",
            Role::EtcdRoot => "root",
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Remote => "remote",
        }
    }

    /// Parse a role name as written by [`Role::as_str`].
    pub fn parse(s: &str) -> Option<Role> {
        [Role::Intermediate]
            .into_iter()
            .chain(Role::LEAVES)
            .find(|r| r.as_str() == s)
    }

    /// The file stem of the role's certificate and key in a cluster directory: the role's name,
    /// except the etcd `root` user's, `etcd-root` (a file named `root.crt` beside a CA is taken
    /// for the root CA; cluster directories written before hold `root.{crt,key}`, still read).
    pub fn file_stem(self) -> &'static str {
        match self {
            Role::EtcdRoot => "etcd-root",
            other => other.as_str(),
        }
    }

    /// The file stem cluster directories used before [`Role::file_stem`], when it differs.
    pub fn legacy_file_stem(self) -> Option<&'static str> {
        match self {
            Role::EtcdRoot => Some("root"),
            _ => None,
        }
    }

    /// True for server certificates (etcd, apiserver).
    pub fn is_server(self) -> bool {
        matches!(self, Role::EtcdServer | Role::Apiserver)
    }

    /// The certificate's common name. For client roles it is the etcd user name
    /// (etcd's `--client-cert-auth` takes the user from the CN).
    pub fn common_name(self, cluster: &ClusterName) -> String {
        match self {
            Role::Intermediate => format!("clustermesh intermediate CA {cluster}"),
            Role::EtcdServer => format!("etcd-server.{cluster}"),
            Role::Apiserver => format!("clustermesh-apiserver.{cluster}"),
            Role::EtcdRoot => "root".to_owned(),
            Role::Admin => etcd_user(Role::Admin, cluster),
            Role::Node => etcd_user(Role::Node, cluster),
            Role::Remote => etcd_user(Role::Remote, cluster),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The etcd user name of a client role: `admin-<cluster>`, `node-<cluster>`, `remote-<cluster>`, `root`.
pub fn etcd_user(role: Role, cluster: &ClusterName) -> String {
    match role {
        Role::EtcdRoot => "root".to_owned(),
        other => format!("{}-{cluster}", other.as_str()),
    }
}

/// A parsed SPIFFE id. Mesh certificates use `spiffe://<td>/cluster/<name>/<role>`; the root CA uses
/// `spiffe://<td>/ca`. Other paths are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The path, starting with `/` (empty for the trust domain itself).
    pub path: String,
}

impl SpiffeId {
    /// The id of a cluster certificate.
    pub fn for_cluster(td: &TrustDomain, cluster: &ClusterName, role: Role) -> Self {
        Self {
            trust_domain: td.clone(),
            path: format!("/cluster/{cluster}/{}", role.as_str()),
        }
    }

    /// The id carried by the root CA of a trust domain.
    pub fn for_root_ca(td: &TrustDomain) -> Self {
        Self {
            trust_domain: td.clone(),
            path: "/ca".to_owned(),
        }
    }

    /// Parse `spiffe://<td><path>`.
    pub fn parse(id: &str) -> Result<Self> {
        let bad = |rule| {
            Err(Error::SpiffeId {
                id: id.to_owned(),
                rule,
            })
        };
        let Some(rest) = id.strip_prefix("spiffe://") else {
            return bad("it must start with spiffe://");
        };
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let Ok(trust_domain) = TrustDomain::new(td) else {
            return bad("the trust domain must be lowercase letters, digits, '.', '-' and '_'");
        };
        if path.ends_with('/') || path.contains("//") {
            return bad("the path must not have empty segments or a trailing '/'");
        }
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    /// The `(cluster, role)` when this is a mesh cluster certificate id.
    pub fn cluster_role(&self) -> Option<(ClusterName, Role)> {
        let mut parts = self.path.strip_prefix("/cluster/")?.split('/');
        let cluster = ClusterName::new(parts.next()?).ok()?;
        let role = Role::parse(parts.next()?)?;
        parts.next().is_none().then_some((cluster, role))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_round_trip() {
        let td = TrustDomain::new("mesh.example").unwrap();
        let c = ClusterName::new("east-1").unwrap();
        let id = SpiffeId::for_cluster(&td, &c, Role::Remote);
        assert_eq!(
            id.to_string(),
            "spiffe://mesh.example/cluster/east-1/remote"
        );
        let back = SpiffeId::parse(&id.to_string()).unwrap();
        assert_eq!(back, id);
        assert_eq!(back.cluster_role(), Some((c, Role::Remote)));
    }

    #[test]
    fn bad_ids_and_domains_name_the_rule() {
        let e = TrustDomain::new("Mesh").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
        let e = SpiffeId::parse("https://x/y").unwrap_err().to_string();
        assert!(e.contains("spiffe://"), "{e}");
        assert!(SpiffeId::parse("spiffe://td/a//b").is_err());
    }

    #[test]
    fn client_common_names_are_etcd_users() {
        let c = ClusterName::new("b").unwrap();
        assert_eq!(Role::Remote.common_name(&c), "remote-b");
        assert_eq!(Role::Admin.common_name(&c), "admin-b");
        assert_eq!(Role::Node.common_name(&c), "node-b");
        assert_eq!(Role::EtcdRoot.common_name(&c), "root");
    }
}
