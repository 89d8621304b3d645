//! Which clusters to read and whether to believe them: where a cluster's etcd is
//! ([`ClusterSource`], read from `--remote-config-dir` files or `remotes/<local>/` entries), the
//! cluster config rules a remote must pass ([`validate_config`]) and the liveness state machine
//! ([`Liveness`]). Reaching the etcd is `crate::connect`; following its keys, `crate::watch`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_model::values::{ClusterConfig, RemoteCluster};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use serde::Deserialize;

/// Errors of cluster configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A remote config file could not be read.
    #[error("reading remote cluster config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A remote config file is not valid.
    #[error("remote cluster config {path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// TLS material for one etcd connection of node-sync (files, or PEM inline from a `remotes/` entry);
/// `mesh_certs::TlsFiles` is the certificate directory's view of the same (files only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdClientTls {
    /// CA bundle that signs the etcd server certificate (file path), or inline PEM.
    pub ca: CaSource,
    /// Client certificate (PEM file).
    pub cert: PathBuf,
    /// Client key (PEM file).
    pub key: PathBuf,
    /// A client certificate chain given inline, presented instead of `cert` with `key`: the one
    /// the remote cluster issued for this cluster's remote key (a `remotes/` entry's clientCert).
    pub cert_pem: Option<String>,
}

/// Where a CA bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A PEM file.
    File(PathBuf),
    /// Inline PEM (from a `remotes/` entry's caBundle).
    Pem(String),
}

/// How to reach one cluster's etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSource {
    /// The cluster expected behind these endpoints.
    pub name: ClusterName,
    /// Its id, when the registration names one (checked against the cluster config).
    pub expected_id: Option<ClusterId>,
    /// etcd client URLs (`https://` needs `tls`; `http://` is plain, for tests).
    pub endpoints: Vec<String>,
    /// TLS files.
    pub tls: Option<EtcdClientTls>,
}

/// The TLS files of `--tls-dir`. Two layouts are understood:
/// * a mesh-certs cluster directory (`clustermesh ca issue-cluster`): `ca-bundle.pem`, and
///   `node.{crt,key}` for the local etcd or `remote.{crt,key}` for other clusters' etcds;
/// * a Kubernetes TLS secret: `ca.crt`, `tls.crt`, `tls.key` for every connection.
pub fn tls_from_dir(dir: &Path, remote: bool) -> EtcdClientTls {
    if mesh_certs::ClusterDir::is_cluster_dir(dir) {
        let role = if remote {
            mesh_certs::Role::Remote
        } else {
            mesh_certs::Role::Node
        };
        let f = mesh_certs::ClusterDir::tls_files_at(dir, role);
        if let Some(id) = f.identity {
            return EtcdClientTls {
                ca: CaSource::File(f.ca_bundle),
                cert: id.cert,
                key: id.key,
                cert_pem: None,
            };
        }
    }
    EtcdClientTls {
        ca: CaSource::File(dir.join("ca.crt")),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        cert_pem: None,
    }
}

/// One file of `--remote-config-dir`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RemoteFile {
    name: String,
    #[serde(default)]
    id: Option<u32>,
    endpoints: Vec<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
}

/// Parse one remote cluster file:
///
/// ```yaml
/// name: c2
/// id: 2                      # optional, checked against the cluster config
/// endpoints: ["https://10.0.2.1:2379"]
/// ca-file: /etc/clustermesh/c2/ca.crt     # optional; default: the --tls-dir files
/// cert-file: /etc/clustermesh/tls.crt
/// key-file: /etc/clustermesh/tls.key
/// ```
///
/// A relative `ca-file`, `cert-file` or `key-file` is resolved against the directory of the file
/// itself (the config dir): `clustermesh connect --context` writes `c2.yaml` next to `c2.ca-bundle.pem`,
/// `c2.remote.crt` and `c2.remote.key` in one Secret that node-sync mounts as `--remote-config-dir`.
pub fn parse_remote_file(
    path: &Path,
    text: &str,
    tls_dir: Option<&Path>,
) -> Result<ClusterSource, ClusterError> {
    let bad = |detail: String| ClusterError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let f: RemoteFile = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let name = ClusterName::new(&f.name).map_err(|e| bad(format!("name: {e}")))?;
    let expected_id =
        f.id.map(|id| ClusterId::new(id, MaxConnectedClusters::EXTENDED))
            .transpose()
            .map_err(|e| bad(format!("id: {e}")))?;
    if f.endpoints.is_empty() {
        return Err(bad("endpoints: at least one etcd URL is needed".into()));
    }
    for e in &f.endpoints {
        if !(e.starts_with("https://") || e.starts_with("http://")) {
            return Err(bad(format!(
                "endpoint {e:?} must start with https:// (or http:// for plain tests)"
            )));
        }
    }
    let defaults = tls_dir.map(|d| tls_from_dir(d, true));
    let config_dir = path.parent().unwrap_or(Path::new(""));
    let resolve = |p: PathBuf| {
        if p.is_relative() {
            config_dir.join(p)
        } else {
            p
        }
    };
    let tls = if f.endpoints.iter().any(|e| e.starts_with("https://")) {
        let ca = f
            .ca_file
            .map(|p| CaSource::File(resolve(p)))
            .or_else(|| defaults.as_ref().map(|d| d.ca.clone()));
        let cert = f
            .cert_file
            .map(resolve)
            .or_else(|| defaults.as_ref().map(|d| d.cert.clone()));
        let key = f
            .key_file
            .map(resolve)
            .or_else(|| defaults.as_ref().map(|d| d.key.clone()));
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Some(EtcdClientTls {
                ca,
                cert,
                key,
                cert_pem: None,
            }),
            _ => {
                return Err(bad(
                    "https endpoints need ca-file, cert-file and key-file (or --tls-dir)".into(),
                ));
            }
        }
    } else {
        None
    };
    Ok(ClusterSource {
        name,
        expected_id,
        endpoints: f.endpoints,
        tls,
    })
}

/// Read every `*.yaml`/`*.yml` file of the directory. Bad files are returned as errors next to
/// the good sources, so one bad file does not disconnect the others.
pub fn read_remote_dir(
    dir: &Path,
    tls_dir: Option<&Path>,
) -> (BTreeMap<ClusterName, ClusterSource>, Vec<ClusterError>) {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(source) => {
            errors.push(ClusterError::Read {
                path: dir.to_owned(),
                source,
            });
            return (out, errors);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            )
        })
        .collect();
    paths.sort();
    for p in paths {
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(source) => {
                errors.push(ClusterError::Read { path: p, source });
                continue;
            }
        };
        match parse_remote_file(&p, &text, tls_dir) {
            Ok(s) => {
                if out.contains_key(&s.name) {
                    errors.push(ClusterError::Invalid {
                        path: p,
                        detail: format!("cluster {} is configured by another file too", s.name),
                    });
                } else {
                    out.insert(s.name.clone(), s);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (out, errors)
}

/// A source from a `remotes/<local>/<remote>` entry of the local etcd.
pub fn source_from_entry(r: &RemoteCluster, tls_dir: Option<&Path>) -> ClusterSource {
    let tls = if r.endpoints.iter().any(|e| e.starts_with("https://")) {
        tls_dir.map(|d| {
            let mut t = tls_from_dir(d, true);
            if !r.ca_bundle.is_empty() {
                t.ca = CaSource::Pem(r.ca_bundle.clone());
            }
            if !r.client_cert.is_empty() {
                t.cert_pem = Some(r.client_cert.clone());
            }
            t
        })
    } else {
        None
    };
    ClusterSource {
        name: r.name.clone(),
        expected_id: Some(r.id),
        endpoints: r.endpoints.clone(),
        tls,
    }
}

/// Why a cluster config is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigRefusal {
    /// The config names another cluster than the one expected.
    #[error("cluster config names cluster {found:?}, but this connection is for {expected:?}")]
    WrongName {
        /// Expected.
        expected: String,
        /// Found.
        found: String,
    },
    /// The id differs from the registered one.
    #[error("cluster {name} has id {found}, but it was registered with id {expected}")]
    WrongId {
        /// Cluster.
        name: String,
        /// Registered.
        expected: u16,
        /// Found.
        found: u16,
    },
    /// Another connected cluster already has this id.
    #[error(
        "cluster {name} has id {id}, which cluster {other} already uses: ids must be unique in a mesh"
    )]
    DuplicateId {
        /// Cluster.
        name: String,
        /// Id.
        id: u16,
        /// The other cluster.
        other: String,
    },
    /// maxConnectedClusters differs from the local cluster's.
    #[error(
        "cluster {name} runs with maxConnectedClusters={found}, this cluster with {local}: they must match"
    )]
    MaxConnectedClusters {
        /// Cluster.
        name: String,
        /// Remote setting.
        found: u16,
        /// Local setting.
        local: u16,
    },
    /// The id is out of range for the local setting.
    #[error("cluster {name}: {detail}")]
    IdRange {
        /// Cluster.
        name: String,
        /// Rule broken.
        detail: String,
    },
}

/// Check a cluster config read from `source`'s etcd against the mesh rules: the expected name and
/// id, the id range and maxConnectedClusters of the local cluster, and id uniqueness among the
/// clusters already accepted (`accepted`: name -> id).
pub fn validate_config(
    source: &ClusterSource,
    cfg: &ClusterConfig,
    local_mcc: Option<MaxConnectedClusters>,
    accepted: &HashMap<ClusterName, ClusterId>,
) -> Result<(), ConfigRefusal> {
    if cfg.name != source.name {
        return Err(ConfigRefusal::WrongName {
            expected: source.name.to_string(),
            found: cfg.name.to_string(),
        });
    }
    if let Some(id) = source.expected_id
        && id != cfg.id
    {
        return Err(ConfigRefusal::WrongId {
            name: cfg.name.to_string(),
            expected: id.get(),
            found: cfg.id.get(),
        });
    }
    if let Some(mcc) = local_mcc {
        if mcc != cfg.max_connected_clusters {
            return Err(ConfigRefusal::MaxConnectedClusters {
                name: cfg.name.to_string(),
                found: cfg.max_connected_clusters.get(),
                local: mcc.get(),
            });
        }
        ClusterId::new(cfg.id.get().into(), mcc).map_err(|e| ConfigRefusal::IdRange {
            name: cfg.name.to_string(),
            detail: e.to_string(),
        })?;
    }
    if let Some((other, _)) = accepted
        .iter()
        .find(|(n, id)| **n != cfg.name && **id == cfg.id)
    {
        return Err(ConfigRefusal::DuplicateId {
            name: cfg.name.to_string(),
            id: cfg.id.get(),
            other: other.to_string(),
        });
    }
    Ok(())
}

// ---- liveness -------------------------------------------------------------------------------------

/// Liveness of one cluster: live while connected and its heartbeat is fresh; once not live, its
/// backends stay selectable for the grace period and are then stale.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    connected: bool,
    last_heartbeat: Option<Instant>,
    not_live_since: Option<Instant>,
}

/// What [`Liveness::evaluate`] concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    /// Connected, heartbeat fresh.
    Live,
    /// Not live since the instant, still within the grace.
    Grace(Instant),
    /// Not live for longer than the grace: left out of selection.
    Stale(Instant),
}

impl Liveness {
    /// A cluster not yet connected (its grace starts now).
    pub fn new(now: Instant) -> Self {
        Self {
            connected: false,
            last_heartbeat: None,
            not_live_since: Some(now),
        }
    }

    /// The watch stream came up or went down.
    pub fn set_connected(&mut self, connected: bool) {
        self.connected = connected;
    }

    /// Whether the stream is up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// A heartbeat was seen at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = Some(now);
    }

    /// Age of the last heartbeat.
    pub fn heartbeat_age(&self, now: Instant) -> Option<Duration> {
        self.last_heartbeat
            .map(|t| now.saturating_duration_since(t))
    }

    /// Evaluate at `now`. A cluster that never wrote a heartbeat is judged by its stream alone.
    pub fn evaluate(
        &mut self,
        now: Instant,
        grace: Duration,
        heartbeat_timeout: Duration,
    ) -> LiveState {
        let fresh = self
            .last_heartbeat
            .is_none_or(|t| now.saturating_duration_since(t) <= heartbeat_timeout);
        if self.connected && fresh {
            self.not_live_since = None;
            return LiveState::Live;
        }
        let since = *self.not_live_since.get_or_insert_with(|| {
            // Not live since the heartbeat went stale, or now when the stream broke.
            match self.last_heartbeat {
                Some(t) if !fresh => t + heartbeat_timeout,
                _ => now,
            }
        });
        if now.saturating_duration_since(since) > grace {
            LiveState::Stale(since)
        } else {
            LiveState::Grace(since)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::values::Capabilities;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    fn src(name: &str, id: Option<u32>) -> ClusterSource {
        ClusterSource {
            name: c(name),
            expected_id: id.map(|i| ClusterId::new(i, MaxConnectedClusters::DEFAULT).unwrap()),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            tls: None,
        }
    }

    fn cfg(name: &str, id: u32, mcc: u32) -> ClusterConfig {
        let mcc = MaxConnectedClusters::new(mcc).unwrap();
        ClusterConfig {
            name: c(name),
            id: ClusterId::new(id, mcc).unwrap(),
            max_connected_clusters: mcc,
            capabilities: Capabilities::default(),
            ca_fingerprints: vec![],
        }
    }

    #[test]
    fn config_rules() {
        let d = Some(MaxConnectedClusters::DEFAULT);
        let none = HashMap::new();
        assert!(validate_config(&src("c2", Some(2)), &cfg("c2", 2, 255), d, &none).is_ok());
        assert!(matches!(
            validate_config(&src("c2", None), &cfg("c3", 2, 255), d, &none),
            Err(ConfigRefusal::WrongName { .. })
        ));
        assert!(matches!(
            validate_config(&src("c2", Some(3)), &cfg("c2", 2, 255), d, &none),
            Err(ConfigRefusal::WrongId { .. })
        ));
        let e = validate_config(&src("c2", None), &cfg("c2", 300, 511), d, &none).unwrap_err();
        assert!(e.to_string().contains("maxConnectedClusters=511"), "{e}");
        let taken = HashMap::from([(
            c("c1"),
            ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
        )]);
        let e = validate_config(&src("c2", None), &cfg("c2", 2, 255), d, &taken).unwrap_err();
        assert_eq!(
            e,
            ConfigRefusal::DuplicateId {
                name: "c2".into(),
                id: 2,
                other: "c1".into()
            }
        );
        // Re-validating the same cluster against itself is fine.
        let me = HashMap::from([(
            c("c2"),
            ClusterId::new(2, MaxConnectedClusters::DEFAULT).unwrap(),
        )]);
        assert!(validate_config(&src("c2", None), &cfg("c2", 2, 255), d, &me).is_ok());
    }

    #[test]
    fn remote_file_parsing() {
        let p = Path::new("/etc/remotes/c2.yaml");
        let s = parse_remote_file(
            p,
            "name: c2\nid: 2\nendpoints: [\"https://10.0.0.2:2379\"]\n",
            Some(Path::new("/tls")),
        )
        .unwrap();
        assert_eq!(s.name, c("c2"));
        assert_eq!(s.tls.unwrap().cert, Path::new("/tls/tls.crt"));
        let plain =
            parse_remote_file(p, "name: c2\nendpoints: [\"http://127.0.0.1:1\"]\n", None).unwrap();
        assert!(plain.tls.is_none());
        for (text, needle) in [
            ("name: Bad\nendpoints: [\"http://x\"]\n", "name"),
            ("name: c2\nendpoints: []\n", "endpoints"),
            ("name: c2\nendpoints: [\"tcp://x\"]\n", "https://"),
            ("name: c2\nendpoints: [\"https://x\"]\n", "cert-file"),
            ("name: c2\nendpoint: [\"http://x\"]\n", "unknown field"),
        ] {
            let e = parse_remote_file(p, text, None).unwrap_err().to_string();
            assert!(e.contains("c2.yaml") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn relative_tls_paths_resolve_against_the_config_dir() {
        let p = Path::new("/etc/clustermesh/remotes/c2.yaml");
        let s = parse_remote_file(
            p,
            "name: c2\nendpoints: [\"https://10.0.0.2:2379\"]\nca-file: c2.ca-bundle.pem\ncert-file: c2.remote.crt\nkey-file: /abs/remote.key\n",
            Some(Path::new("/tls")),
        )
        .unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(
            tls.ca,
            CaSource::File("/etc/clustermesh/remotes/c2.ca-bundle.pem".into())
        );
        assert_eq!(
            tls.cert,
            Path::new("/etc/clustermesh/remotes/c2.remote.crt")
        );
        assert_eq!(tls.key, Path::new("/abs/remote.key"), "absolute paths stay");
    }

    #[test]
    fn remote_dir_keeps_good_files_when_one_is_bad() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("c2.yaml"),
            "name: c2\nendpoints: [\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        std::fs::write(d.path().join("c3.yaml"), "name: C3\n").unwrap();
        std::fs::write(d.path().join("README"), "not yaml").unwrap();
        let (good, bad) = read_remote_dir(d.path(), None);
        assert_eq!(good.keys().cloned().collect::<Vec<_>>(), vec![c("c2")]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("c3.yaml"));
    }

    #[test]
    fn liveness_grace_then_stale_then_live_again() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        let hb = Duration::from_secs(3);
        let mut l = Liveness::new(t0);
        l.set_connected(true);
        l.heartbeat(t0);
        assert_eq!(l.evaluate(t0, grace, hb), LiveState::Live);
        // Heartbeat stops: live until it is 3 s old, then grace, then stale.
        assert_eq!(
            l.evaluate(t0 + Duration::from_secs(2), grace, hb),
            LiveState::Live
        );
        assert!(matches!(
            l.evaluate(t0 + Duration::from_secs(10), grace, hb),
            LiveState::Grace(_)
        ));
        assert!(matches!(
            l.evaluate(t0 + Duration::from_secs(34), grace, hb),
            LiveState::Stale(_)
        ));
        // A fresh heartbeat makes it live at once.
        l.heartbeat(t0 + Duration::from_secs(40));
        assert_eq!(
            l.evaluate(t0 + Duration::from_secs(40), grace, hb),
            LiveState::Live
        );
        // A broken stream starts the grace now.
        l.set_connected(false);
        assert!(matches!(
            l.evaluate(t0 + Duration::from_secs(41), grace, hb),
            LiveState::Grace(_)
        ));
        assert!(matches!(
            l.evaluate(t0 + Duration::from_secs(72), grace, hb),
            LiveState::Stale(_)
        ));
    }
}
