//! Starting a cluster's etcd in its control-plane namespace and waiting until it serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::plan::{ClusterInfo, ETCD_CLIENT_PORT, EtcdInfo};
use crate::process::{LabProcess, poll_until};

/// Command-line flags of a cluster's etcd (a single member, or member `member` of a multi-member one). Plain: our
/// own flags; TLS: `mesh_etcd::EtcdSpec::args` (mTLS, `--client-cert-auth`, peer mTLS with https peer URLs)
/// over the cluster's certificate directory. The data directory is reused across restarts; the initial-cluster
/// flags are ignored by etcd once it holds data.
pub fn member_args(prefix: &str, cluster: &EtcdInfo, member: usize) -> Result<Vec<String>> {
    let etcd = cluster.member(member).ok_or_else(|| {
        LabError::Spec(format!(
            "etcd {} has {} member(s), no member {member}",
            cluster.name,
            cluster.member_count()
        ))
    })?;
    let mut a = etcd_args(prefix, &etcd)?;
    if let Some(initial) = cluster.initial_cluster() {
        // Later flags win: every member lists every peer and shares one token.
        a.push(format!("--initial-cluster={initial}"));
        a.push(format!("--initial-cluster-token={prefix}-{}", cluster.name));
    }
    Ok(a)
}

/// Command-line flags of a single-member etcd (see [`member_args`]).
pub fn etcd_args(prefix: &str, etcd: &EtcdInfo) -> Result<Vec<String>> {
    if let Some(tls) = &etcd.tls {
        let dir = mesh_certs::ClusterDir::open(&tls.dir).map_err(|e| LabError::Certs {
            prefix: prefix.to_string(),
            detail: format!("certificate directory of etcd {}: {e}", etcd.name),
        })?;
        let mut spec = mesh_etcd::EtcdSpec::for_cluster(
            &dir,
            &etcd.data_dir,
            &etcd.client_url,
            &etcd.peer_url,
        );
        spec.name = etcd.name.clone();
        let trust = if tls.client_trust_cluster {
            mesh_etcd::ClientTrust::Cluster
        } else {
            mesh_etcd::ClientTrust::Mesh
        };
        let spec = spec
            .client_trust(&dir, trust)
            .map_err(|e| LabError::Certs {
                prefix: prefix.to_string(),
                detail: format!("client trust of etcd {}: {e}", etcd.name),
            })?;
        return Ok(spec.args());
    }
    Ok(vec![
        format!("--name={}", etcd.name),
        format!("--data-dir={}", etcd.data_dir.display()),
        format!("--listen-client-urls={}", etcd.client_url),
        format!("--advertise-client-urls={}", etcd.client_url),
        format!("--listen-peer-urls={}", etcd.peer_url),
        format!("--initial-advertise-peer-urls={}", etcd.peer_url),
        format!("--initial-cluster={}={}", etcd.name, etcd.peer_url),
        "--initial-cluster-state=new".into(),
        format!("--initial-cluster-token={prefix}-{}", etcd.name),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ])
}

/// Issues the lab's certificates: a root CA in `ca_dir` (trust domain `<prefix>.mesh-lab`) and, per cluster, an
/// intermediate and every leaf of `mesh_certs` (etcd server with the control-plane address and every etcd member's
/// address as SANs, apiserver, root, admin, node, remote) into the cluster's certificate directory.
pub fn issue_certs(plan: &crate::plan::LabPlan, ca_dir: &Path) -> Result<()> {
    let err = |detail: String| LabError::Certs {
        prefix: plan.prefix.clone(),
        detail,
    };
    let td = mesh_certs::TrustDomain::new(&crate::plan::trust_domain(&plan.prefix))
        .map_err(|e| err(e.to_string()))?;
    let ca = mesh_certs::RootCa::init(ca_dir, &td, &mesh_certs::Validity::default())
        .map_err(|e| err(format!("CA in {}: {e}", ca_dir.display())))?;
    for c in &plan.clusters {
        issue_cluster(plan, &ca, c)?;
    }
    Ok(())
}

/// (Re-)issues cluster `c`'s certificate directory with the current root of the CA in `ca_dir`: a new
/// intermediate, every leaf (new keys), the CA's bundle. What an operator does after `clustermesh ca rotate`. No-op
/// for plain etcd.
pub fn reissue_cluster(plan: &crate::plan::LabPlan, ca_dir: &Path, c: &ClusterInfo) -> Result<()> {
    let ca = mesh_certs::RootCa::load(ca_dir).map_err(|e| LabError::Certs {
        prefix: plan.prefix.clone(),
        detail: format!("CA in {}: {e}", ca_dir.display()),
    })?;
    issue_cluster(plan, &ca, c)
}

fn issue_cluster(
    plan: &crate::plan::LabPlan,
    ca: &mesh_certs::RootCa,
    c: &ClusterInfo,
) -> Result<()> {
    let err = |detail: String| LabError::Certs {
        prefix: plan.prefix.clone(),
        detail,
    };
    let Some(tls) = &c.etcd.tls else {
        return Ok(());
    };
    let mut req = mesh_certs::ClusterRequest::new(&c.name, c.index as u32, &tls.dir)
        .map_err(|e| err(format!("cluster {}: {e}", c.name)))?;
    req.sans.push(mesh_certs::San::Ip(std::net::IpAddr::V4(
        c.control_plane.addr,
    )));
    if let Some(l) = plan.leaf_lifetime {
        req.validity.leaf = l
            .try_into()
            .map_err(|e| err(format!("leaf lifetime {l:?}: {e}")))?;
    }
    for m in c
        .etcd
        .members
        .iter()
        .filter(|m| m.addr != c.control_plane.addr)
    {
        req.sans
            .push(mesh_certs::San::Ip(std::net::IpAddr::V4(m.addr)));
    }
    ca.issue_cluster(&req)
        .map_err(|e| err(format!("cluster {}: {e}", c.name)))?;
    Ok(())
}

/// Creates etcd's users and roles (`root`, `admin-<cluster>`, `node-<cluster>`) and enables auth on every TLS etcd
/// of `plan` (`mesh_etcd::bootstrap_auth`).
pub fn bootstrap_auth(plan: &crate::plan::LabPlan) -> Result<()> {
    for c in &plan.clusters {
        let Some(tls) = &c.etcd.tls else { continue };
        let files = root_files(tls);
        let urls = c.etcd.client_urls();
        let name = c.name.clone();
        on_runtime(|| async move {
            let cluster = cluster_name(&name)?;
            Ok(mesh_etcd::bootstrap_auth(&urls, &files, &cluster).await?)
        })
        .map_err(|detail| LabError::Certs {
            prefix: plan.prefix.clone(),
            detail: format!(
                "etcd auth bootstrap of {} ({}): {detail}",
                c.name, c.etcd.client_url
            ),
        })?;
    }
    Ok(())
}

/// Why a call to a lab etcd, or a health probe of one, failed (the caller names the cluster and
/// member in its [`LabError`]).
#[derive(Debug, thiserror::Error)]
pub enum EtcdCallError {
    /// The plain-HTTP health request failed.
    #[error("GET http://{addr}/health: {source}")]
    Http {
        /// The member's client address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The member answered, but not healthy.
    #[error("GET /health answered {0:?}")]
    Unhealthy(String),
    /// The member has no leader yet.
    #[error("{0}: no leader yet")]
    NoLeader(String),
    /// The member did not answer in time.
    #[error("etcd status {url}: no answer within {after:?}")]
    Timeout {
        /// The member's client URL.
        url: String,
        /// How long we waited.
        after: Duration,
    },
    /// Connecting or administering failed (the error says what was refused).
    #[error(transparent)]
    Etcd(#[from] mesh_etcd::Error),
    /// A request failed.
    #[error("etcd status: {0}")]
    Request(#[from] etcd_client::Error),
    /// The cluster's name in the plan is not a valid cluster name.
    #[error("cluster name: {0}")]
    Name(String),
    /// No runtime for the client could be built.
    #[error("tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The client's thread panicked.
    #[error("the etcd client thread panicked")]
    Panicked,
}

/// Runs the future made by `make` on a fresh current-thread runtime on its own thread, so callers inside a tokio
/// runtime are fine.
pub(crate) fn on_runtime<T, F>(
    make: impl FnOnce() -> F + Send,
) -> std::result::Result<T, EtcdCallError>
where
    F: std::future::Future<Output = std::result::Result<T, EtcdCallError>>,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(EtcdCallError::Runtime)?;
            rt.block_on(make())
        })
        .join()
        .unwrap_or(Err(EtcdCallError::Panicked))
    })
}

fn cluster_name(name: &str) -> std::result::Result<mesh_model::ClusterName, EtcdCallError> {
    mesh_model::ClusterName::new(name).map_err(|e| EtcdCallError::Name(e.to_string()))
}

/// The `root` client files of a TLS etcd.
fn root_files(tls: &crate::plan::LabEtcdTls) -> mesh_certs::TlsFiles {
    mesh_certs::TlsFiles {
        ca_bundle: tls.ca.clone(),
        identity: Some(mesh_certs::CertKeyPaths {
            cert: tls.client_cert.clone(),
            key: tls.client_key.clone(),
        }),
    }
}

/// Creates `remote-<peer>` (read-only on `clustermesh/v1/`) in `target`'s TLS etcd; no-op for plain etcd.
pub fn add_remote_user(prefix: &str, target: &ClusterInfo, peer: &ClusterInfo) -> Result<()> {
    let Some(tls) = &target.etcd.tls else {
        return Ok(());
    };
    let files = root_files(tls);
    let urls = target.etcd.client_urls();
    let peer_name = peer.name.clone();
    on_runtime(|| async move {
        let peer = cluster_name(&peer_name)?;
        Ok(mesh_etcd::add_remote_user(&urls, &files, &peer).await?)
    })
    .map_err(|detail| LabError::Certs {
        prefix: prefix.to_string(),
        detail: format!(
            "add user remote-{} to etcd of {}: {detail}",
            peer.name, target.name
        ),
    })
}

/// Prepares the data directory (mode 0700, as etcd wants) and opens the log for appending.
pub fn prepare(etcd: &EtcdInfo) -> Result<(Stdio, Stdio)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&etcd.data_dir)
        .map_err(|e| LabError::io(&etcd.data_dir, e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&etcd.log_file)
        .map_err(|e| LabError::io(&etcd.log_file, e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LabError::io(&etcd.log_file, e))?;
    Ok((Stdio::from(log), Stdio::from(log2)))
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One plain-HTTP `GET /health` against `addr`; `Ok(body)` on any HTTP answer.
fn http_health(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// One health probe of a cluster's etcd from the host: `Ok(())` when every member reports healthy, else what the
/// first that did not said.
pub fn probe(cluster: &ClusterInfo) -> std::result::Result<(), EtcdCallError> {
    (1..=cluster.etcd.member_count()).try_for_each(|m| probe_member(cluster, m))
}

/// One health probe of member `m` (1-based) of a cluster's etcd.
pub fn probe_member(cluster: &ClusterInfo, m: usize) -> std::result::Result<(), EtcdCallError> {
    let (ip, url) = match cluster.etcd.members.get(m.wrapping_sub(1)) {
        Some(x) => (x.addr, x.client_url.clone()),
        None => (cluster.control_plane.addr, cluster.etcd.client_url.clone()),
    };
    let addr = SocketAddr::from((ip, ETCD_CLIENT_PORT));
    match &cluster.etcd.tls {
        None => match http_health(addr) {
            Ok(body) if body.contains("\"health\":\"true\"") => Ok(()),
            Ok(body) => Err(EtcdCallError::Unhealthy(
                body.lines().last().unwrap_or("").to_owned(),
            )),
            Err(source) => Err(EtcdCallError::Http { addr, source }),
        },
        Some(tls) => match tls_status(&url, tls)? {
            s if s.leader == 0 => Err(EtcdCallError::NoLeader(url)),
            _ => Ok(()),
        },
    }
}

/// What one member says about itself and its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// This member's id.
    pub member_id: u64,
    /// The leader's id as this member knows it (0: none).
    pub leader: u64,
    /// Raft term.
    pub raft_term: u64,
}

/// One etcd `status` call over mTLS with the `root` client certificate (a maintenance API call: a member answers
/// it without a leader too).
pub fn tls_status(
    url: &str,
    tls: &crate::plan::LabEtcdTls,
) -> std::result::Result<MemberStatus, EtcdCallError> {
    let files = root_files(tls);
    let url = url.to_string();
    on_runtime(|| async move {
        let call = async {
            let mut c = mesh_etcd::connect(std::slice::from_ref(&url), &files).await?;
            let s = c.status().await?;
            Ok(MemberStatus {
                member_id: s.header().map_or(0, |h| h.member_id()),
                leader: s.leader(),
                raft_term: s.raft_term(),
            })
        };
        let after = Duration::from_secs(3);
        tokio::time::timeout(after, call)
            .await
            .map_err(|_| EtcdCallError::Timeout {
                url: url.clone(),
                after,
            })?
    })
}

/// Waits until `proc` (member `m` of the etcd of `cluster`) answers; fails early when it exits.
pub fn wait_member_healthy(
    cluster: &ClusterInfo,
    m: usize,
    proc: &mut LabProcess,
    timeout: Duration,
) -> Result<()> {
    let log = cluster
        .etcd
        .member(m)
        .map_or(cluster.etcd.log_file.clone(), |e| e.log_file);
    let mut last = String::from("no answer yet");
    let mut exited = None;
    let ok = poll_until(timeout, || {
        if let Ok(Some(st)) = proc.try_wait() {
            exited = Some(st);
            return true;
        }
        match probe_member(cluster, m) {
            Ok(()) => true,
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    let fail = |detail: String| LabError::Etcd {
        cluster: cluster.name.clone(),
        detail: format!("member {m}: {detail}; log tail:\n{}", tail(&log, 8)),
        log: log.clone(),
    };
    if let Some(st) = exited {
        return Err(fail(format!("etcd exited ({st})")));
    }
    if !ok {
        return Err(fail(format!("not healthy after {timeout:?}: {last}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{EtcdSecurity, LabPlan, LabSpec};

    #[test]
    fn plain_args_listen_on_the_control_plane_address() {
        let spec = LabSpec::new("t", 1, 1).etcd_security(EtcdSecurity::Plain);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let a = etcd_args("t", &p.clusters[0].etcd).unwrap().join(" ");
        assert!(
            a.contains("--listen-client-urls=http://10.100.1.2:2379"),
            "{a}"
        );
        assert!(
            a.contains("--initial-cluster=c1=http://10.100.1.2:2380"),
            "{a}"
        );
        assert!(!a.contains("--client-cert-auth"), "{a}");
    }

    #[test]
    fn tls_args_come_from_the_issued_certificates() {
        let root = std::env::temp_dir().join(format!("mesh-lab-etcd-args-{}", std::process::id()));
        let mut spec = LabSpec::new("t", 1, 1);
        spec.state_root = root.clone();
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let e = etcd_args("t", &p.clusters[0].etcd).unwrap_err();
        assert!(e.to_string().contains("certificate directory"), "{e}");
        issue_certs(&p, p.ca_dir.as_ref().unwrap()).unwrap();
        let tls = p.clusters[0].etcd.tls.as_ref().unwrap();
        for f in [
            &tls.ca,
            &tls.server_cert,
            &tls.server_key,
            &tls.client_cert,
            &tls.client_key,
        ] {
            assert!(f.is_file(), "{} not issued", f.display());
        }
        let a = etcd_args("t", &p.clusters[0].etcd).unwrap().join(" ");
        assert!(
            a.contains("--listen-client-urls=https://10.100.1.2:2379"),
            "{a}"
        );
        assert!(a.contains("--client-cert-auth"), "{a}");
        assert!(a.contains("--name=c1"), "{a}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
