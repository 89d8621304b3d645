//! Cluster names and ids, with the same rules as Cilium ClusterMesh.
//!
//! * a cluster id is `1..=255`, or `1..=511` when the mesh runs with `maxConnectedClusters=511`;
//! * a cluster name is 1 to 32 characters of `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$` and is not `default`.
//!
//! Every refusal says which rule failed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest cluster name accepted.
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

/// A rule for cluster names or ids that a value breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterRuleError {
    /// The name is empty.
    #[error("cluster name is empty")]
    EmptyName,
    /// The name is longer than 32 characters.
    #[error(
        "cluster name {name:?} is {len} characters long; at most {MAX_CLUSTER_NAME_LEN} are allowed"
    )]
    NameTooLong {
        /// The offending name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name holds a character outside `[a-z0-9-]`.
    #[error(
        "cluster name {name:?} contains {ch:?}; only lowercase letters, digits and '-' are allowed"
    )]
    NameBadChar {
        /// The offending name.
        name: String,
        /// The first character that breaks the rule.
        ch: char,
    },
    /// The name starts or ends with `-`.
    #[error("cluster name {name:?} must start and end with a lowercase letter or digit")]
    NameBadEdge {
        /// The offending name.
        name: String,
    },
    /// The name is `default`, which Cilium reserves for an unconfigured cluster.
    #[error("cluster name \"default\" is reserved: give the cluster a name of its own")]
    NameReserved,
    /// The id is outside the range allowed by `maxConnectedClusters`.
    #[error(
        "cluster id {id} is out of range: it must be 1..={max} with maxConnectedClusters={mcc}"
    )]
    IdOutOfRange {
        /// The offending id.
        id: u32,
        /// Highest id allowed.
        max: u16,
        /// The maxConnectedClusters setting in force.
        mcc: u16,
    },
    /// maxConnectedClusters is neither 255 nor 511.
    #[error("maxConnectedClusters {0} is not supported: use 255 (the default) or 511")]
    BadMaxConnectedClusters(u32),
}

/// A validated cluster name. Shared, not copied: a clone is a reference count (a 255-cluster mesh
/// names every cluster in every service's selection, status and group, thousands of times a
/// second under churn), and two clones compare equal without reading the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(std::sync::Arc<str>);

impl ClusterName {
    /// Validate `name` against the cluster name rules.
    pub fn new(name: &str) -> Result<Self, ClusterRuleError> {
        if name.is_empty() {
            return Err(ClusterRuleError::EmptyName);
        }
        let len = name.chars().count();
        if len > MAX_CLUSTER_NAME_LEN {
            return Err(ClusterRuleError::NameTooLong {
                name: name.to_owned(),
                len,
            });
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(ClusterRuleError::NameBadChar {
                name: name.to_owned(),
                ch,
            });
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(ClusterRuleError::NameBadEdge {
                name: name.to_owned(),
            });
        }
        if name == "default" {
            return Err(ClusterRuleError::NameReserved);
        }
        Ok(Self(name.into()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClusterName {
    type Err = ClusterRuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = ClusterRuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0.as_ref().to_owned()
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The size of the mesh's cluster id space: 255 (default) or 511.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct MaxConnectedClusters(u16);

impl MaxConnectedClusters {
    /// 255 clusters, the default; identities keep 16 bits of local id.
    pub const DEFAULT: Self = Self(255);
    /// 511 clusters; identities keep 15 bits of local id.
    pub const EXTENDED: Self = Self(511);

    /// Validate a maxConnectedClusters setting.
    pub fn new(v: u32) -> Result<Self, ClusterRuleError> {
        match v {
            255 => Ok(Self::DEFAULT),
            511 => Ok(Self::EXTENDED),
            other => Err(ClusterRuleError::BadMaxConnectedClusters(other)),
        }
    }

    /// The highest cluster id allowed.
    pub fn get(self) -> u16 {
        self.0
    }

    /// How many bits of an identity are left to the cluster-local part.
    pub fn local_identity_bits(self) -> u32 {
        if self.0 == 511 { 15 } else { 16 }
    }
}

impl Default for MaxConnectedClusters {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for MaxConnectedClusters {
    type Error = ClusterRuleError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(v)
    }
}

impl From<MaxConnectedClusters> for u32 {
    fn from(m: MaxConnectedClusters) -> u32 {
        u32::from(m.0)
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A validated cluster id (1..=255, or 1..=511 with maxConnectedClusters=511).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ClusterId(u16);

impl ClusterId {
    /// Validate `id` for a mesh with `mcc` maxConnectedClusters.
    pub fn new(id: u32, mcc: MaxConnectedClusters) -> Result<Self, ClusterRuleError> {
        if id == 0 || id > u32::from(mcc.get()) {
            return Err(ClusterRuleError::IdOutOfRange {
                id,
                max: mcc.get(),
                mcc: mcc.get(),
            });
        }
        Ok(Self(id as u16))
    }

    /// The id as a number.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Accepts the widest range (1..=511); check against the mesh's setting with [`ClusterId::new`].
impl TryFrom<u32> for ClusterId {
    type Error = ClusterRuleError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(v, MaxConnectedClusters::EXTENDED)
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> u32 {
        u32::from(id.0)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        for n in ["a", "c1", "cluster-1", "eu-west-1a", "0", &"a".repeat(32)] {
            assert_eq!(ClusterName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn each_name_rule_is_named() {
        assert_eq!(ClusterName::new(""), Err(ClusterRuleError::EmptyName));
        assert!(matches!(
            ClusterName::new(&"a".repeat(33)),
            Err(ClusterRuleError::NameTooLong { len: 33, .. })
        ));
        assert!(matches!(
            ClusterName::new("Cluster1"),
            Err(ClusterRuleError::NameBadChar { ch: 'C', .. })
        ));
        assert!(matches!(
            ClusterName::new("c_1"),
            Err(ClusterRuleError::NameBadChar { ch: '_', .. })
        ));
        assert!(matches!(
            ClusterName::new("c.1"),
            Err(ClusterRuleError::NameBadChar { ch: '.', .. })
        ));
        assert!(matches!(
            ClusterName::new("-c1"),
            Err(ClusterRuleError::NameBadEdge { .. })
        ));
        assert!(matches!(
            ClusterName::new("c1-"),
            Err(ClusterRuleError::NameBadEdge { .. })
        ));
        assert_eq!(
            ClusterName::new("default"),
            Err(ClusterRuleError::NameReserved)
        );
        let msg = ClusterName::new("c_1").unwrap_err().to_string();
        assert!(msg.contains("c_1") && msg.contains('_'), "{msg}");
    }

    #[test]
    fn name_serde_validates() {
        let n: ClusterName = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(n.as_str(), "c1");
        assert!(serde_json::from_str::<ClusterName>("\"default\"").is_err());
    }

    #[test]
    fn id_ranges() {
        let d = MaxConnectedClusters::DEFAULT;
        let e = MaxConnectedClusters::EXTENDED;
        assert!(ClusterId::new(0, d).is_err());
        assert_eq!(ClusterId::new(1, d).unwrap().get(), 1);
        assert_eq!(ClusterId::new(255, d).unwrap().get(), 255);
        let err = ClusterId::new(256, d).unwrap_err();
        assert_eq!(
            err,
            ClusterRuleError::IdOutOfRange {
                id: 256,
                max: 255,
                mcc: 255
            }
        );
        assert!(err.to_string().contains("1..=255"));
        assert_eq!(ClusterId::new(511, e).unwrap().get(), 511);
        assert!(ClusterId::new(512, e).is_err());
        assert!(ClusterId::new(0, e).is_err());
    }

    #[test]
    fn max_connected_clusters() {
        assert_eq!(MaxConnectedClusters::new(255).unwrap().get(), 255);
        assert_eq!(MaxConnectedClusters::new(511).unwrap().get(), 511);
        assert_eq!(
            MaxConnectedClusters::new(256),
            Err(ClusterRuleError::BadMaxConnectedClusters(256))
        );
        assert_eq!(MaxConnectedClusters::DEFAULT.local_identity_bits(), 16);
        assert_eq!(MaxConnectedClusters::EXTENDED.local_identity_bits(), 15);
    }
}
