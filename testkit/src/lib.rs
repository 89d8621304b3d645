//! Test support shared by the integration tests of several crates (a dev-dependency only).
//!
//! - [`free_port`]: a loopback TCP port that was free a moment ago;
//! - [`Etcd`]: a real single-member etcd on plain HTTP, killed by its PID on drop, that can be
//!   killed and restarted on the same ports (with or without its data);
//! - [`tls_etcd`]: a real etcd with mutual TLS for a cluster's certificate directory, started
//!   as production starts it ([`mesh_etcd::EtcdSpec`]);
//! - [`http_get`]: one HTTP/1.0 GET on loopback, for status endpoints;
//! - [`mint_leaf`]: a leaf signed with a cluster's intermediate key directly, past every check of
//!   `mesh_certs` (what whoever holds that key can do), for tests of what verifiers refuse.
//!
//! A missing etcd binary fails the test with the package to install; nothing here skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use mesh_certs::ClusterDir;
use mesh_etcd::{EtcdProcess, EtcdSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where Debian's `etcd-server` installs etcd.
pub const ETCD: &str = mesh_etcd::DEFAULT_ETCD_BINARY;

/// How long an etcd may take to answer after its start.
const ETCD_START: Duration = Duration::from_secs(30);

/// A loopback TCP port that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 for a free port: {e}"))
}

/// Fails the test, naming the package, when etcd is not installed.
pub fn require_etcd() {
    assert!(
        Path::new(ETCD).exists(),
        "{ETCD} is missing: these tests run a real etcd (Debian package etcd-server; \
         scripts/setup.sh installs it)"
    );
}

/// A real single-member etcd on plain HTTP on loopback; killed (by its PID) on drop.
pub struct Etcd {
    child: Option<Child>,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its client port on 127.0.0.1.
    pub client_port: u16,
    peer_port: u16,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    /// Starts one and waits until it answers.
    pub async fn start() -> Self {
        require_etcd();
        let tmp = tempfile::tempdir().expect("a temporary directory for etcd");
        let mut e = Etcd {
            child: None,
            dir: tmp.path().join("data"),
            client_port: free_port(),
            peer_port: free_port(),
            _tmp: tmp,
        };
        e.spawn().await;
        e
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Where its log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.log_path()).expect("creating the etcd log");
        let child = Command::new(ETCD)
            .arg("--name=t")
            .arg(format!("--data-dir={}", self.dir.display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + ETCD_START;
        loop {
            if let Ok(mut c) = Client::connect([self.url()], None).await
                && c.status().await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd on {} did not answer within {ETCD_START:?} (log: {})",
                self.url(),
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Start it again on the same ports with an empty data directory (a rebuilt cluster).
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.spawn().await;
    }

    /// A client of it.
    pub async fn client(&self) -> Client {
        Client::connect([self.url()], None)
            .await
            .unwrap_or_else(|e| panic!("connecting to etcd at {}: {e}", self.url()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster name (panics on a bad one: tests name their clusters).
pub fn name(s: &str) -> mesh_model::ClusterName {
    mesh_model::ClusterName::new(s).expect("valid cluster name")
}

/// A mesh root CA in `dir` for trust domain `td`, default validity.
pub fn init_ca(dir: &Path, td: &str) -> mesh_certs::RootCa {
    mesh_certs::RootCa::init(
        dir,
        &mesh_certs::TrustDomain::new(td).unwrap(),
        &mesh_certs::Validity::default(),
    )
    .expect("ca init")
}

/// Cluster `cluster` (id `id`) issued by `ca` into `out`: its intermediate and every leaf.
pub fn issue(ca: &mesh_certs::RootCa, cluster: &str, id: u32, out: &Path) -> ClusterDir {
    ca.issue_cluster(&mesh_certs::ClusterRequest {
        cluster: name(cluster),
        id: mesh_model::ClusterId::new(id, mesh_model::MaxConnectedClusters::DEFAULT).unwrap(),
        out: out.to_owned(),
        sans: vec![],
        validity: mesh_certs::Validity::default(),
    })
    .expect("issue cluster")
}

/// A real etcd for cluster `dir` with mutual TLS (clients need a certificate of the cluster's
/// CA), data under `work`, on free loopback ports.
pub async fn tls_etcd(dir: &ClusterDir, work: &Path) -> EtcdProcess {
    require_etcd();
    let client = format!("https://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let data = work.join(format!("etcd-{}", dir.info.name));
    EtcdSpec::for_cluster(dir, data, client, peer)
        .spawn(ETCD_START)
        .await
        .unwrap_or_else(|e| panic!("etcd for {} with TLS did not start: {e}", dir.info.name))
}

/// `GET path` on 127.0.0.1:`port` over HTTP/1.0: the status code and the body, or `None` when
/// nothing answers (within 5 s) or the answer is not HTTP.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn etcd_survives_kill_and_restart_with_its_data_and_loses_it_when_emptied() {
        let mut e = Etcd::start().await;
        e.client().await.put("k", "v", None).await.unwrap();
        e.restart().await;
        let got = e.client().await.get("k", None).await.unwrap();
        assert_eq!(got.kvs().len(), 1, "data kept across a restart");
        e.restart_empty().await;
        let got = e.client().await.get("k", None).await.unwrap();
        assert!(got.kvs().is_empty(), "data gone after restart_empty");
    }

    #[tokio::test]
    async fn http_get_reads_code_and_body_and_none_when_nothing_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 256];
            let _ = s.read(&mut req).await;
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nx: y\r\n\r\nnot ready")
                .await
                .unwrap();
        });
        assert_eq!(
            http_get(port, "/readyz").await,
            Some((503, "not ready".into()))
        );
        assert_eq!(http_get(free_port(), "/").await, None);
    }
}

/// What [`mint_leaf`] puts into a certificate.
#[derive(Debug, Clone, Default)]
pub struct Minted<'a> {
    /// Subject common name.
    pub cn: &'a str,
    /// URI SAN (a SPIFFE id), if any.
    pub spiffe: Option<&'a str>,
    /// DNS SANs.
    pub dns: &'a [&'a str],
    /// IP SANs.
    pub ips: &'a [std::net::IpAddr],
    /// A server certificate (serverAuth and clientAuth) rather than a client one.
    pub server: bool,
}

/// Sign a leaf with the intermediate of `signer` (its key file) directly with rcgen, past every
/// check of `mesh_certs` (name constraints, roles): what whoever holds that intermediate key can
/// do. Writes `<out>.crt` (leaf, then the intermediate) and `<out>.key`.
pub fn mint_leaf(signer: &ClusterDir, what: &Minted<'_>, out: &Path) -> mesh_certs::CertKeyPaths {
    use mesh_certs::Role;
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let inter = std::fs::read_to_string(signer.cert(Role::Intermediate)).expect("intermediate");
    let inter_key =
        KeyPair::from_pem(&std::fs::read_to_string(signer.key(Role::Intermediate)).unwrap())
            .expect("intermediate key");
    let issuer = Issuer::from_ca_cert_pem(&inter, inter_key).expect("issuer");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, what.cn);
    if let Some(id) = what.spiffe {
        p.subject_alt_names
            .push(SanType::URI(id.try_into().expect("URI")));
    }
    for d in what.dns {
        p.subject_alt_names
            .push(SanType::DnsName((*d).try_into().expect("DNS name")));
    }
    for ip in what.ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = if what.server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &issuer).expect("sign");
    let paths = mesh_certs::CertKeyPaths {
        cert: out.with_extension("crt"),
        key: out.with_extension("key"),
    };
    std::fs::write(&paths.cert, format!("{}{inter}", cert.pem())).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    paths
}
