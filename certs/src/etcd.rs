//! Secure etcd: the command line for mTLS with `--client-cert-auth`, starting etcd and waiting until
//! it serves, least-privilege users and roles, and clients whose connection errors say what was wrong.
//!
//! Users (etcd takes the user from the client certificate's CN):
//!
//! | user | role's permissions |
//! |---|---|
//! | `root` | etcd's root role (user and role management); only used to bootstrap |
//! | `admin-<cluster>` | read-write on every key |
//! | `node-<cluster>` | read `clustermesh/v1/`; read-write `clustermesh/v1/health/<cluster>/` and `clustermesh/v1/nodestatus/<cluster>/` |
//! | `remote-<peer>` | read `clustermesh/v1/` (added by [`add_remote_user`] when a peer connects) |
//! | `remote-<cluster>` | read `clustermesh/v1/`: the cluster's own remote certificate, which `clustermesh connect --context` hands to the peers it registers (Kubernetes mode: no etcd access to add per-peer users); created by [`EtcdAuthAdmin::bootstrap`] |
//!
//! etcd 3.4 reads `--trusted-ca-file` only at start: after the bundle changes (rotation, retirement,
//! federation), restart etcd. Its server certificate is re-read on each handshake.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use mesh_model::ClusterName;
use rustls::AlertDescription;
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::bundle::TrustBundle;
use crate::ca::{CertKeyPaths, ClusterDir, TlsFiles};
use crate::error::{Error, Result};
use crate::files::{self, KeyedChain};
use crate::inspect::CertInfo;
use crate::spiffe::{Role, etcd_user};

/// Debian's etcd.
pub const DEFAULT_ETCD_BINARY: &str = "/usr/bin/etcd";

/// The key prefix every mesh key lives under.
pub const MESH_PREFIX: &str = mesh_model::keys::PREFIX;

/// The prefix a cluster's node-syncs may write their health verdicts under: `clustermesh/v1/health/<cluster>/`.
pub fn health_prefix(cluster: &ClusterName) -> String {
    format!("{MESH_PREFIX}health/{cluster}/")
}

/// The prefix a cluster's node-syncs write their summaries under (read by `clustermesh status`):
/// `clustermesh/v1/nodestatus/<cluster>/`.
pub fn nodestatus_prefix(cluster: &ClusterName) -> String {
    format!("{MESH_PREFIX}nodestatus/{cluster}/")
}

// Whether etcd refused a request because its auth store moved under it, and the retry that sends
// it again: the store crate's (every etcd request of the mesh goes through it).
pub use mesh_kv::{is_auth_old_revision, retry_auth_old_revision};

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

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
                    return Err(Error::MissingFile {
                        what: "client CA file (the cluster's own intermediates; re-issue the cluster with `clustermesh ca issue-cluster` to write it)",
                        path: f,
                    });
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
                .map_err(|e| Error::io("creating directory", parent, e))?;
        }
        let out = std::fs::File::create(&log).map_err(|e| Error::io("creating", &log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("creating", &log, e))?;
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
                e @ (Error::MissingFile { .. }
                | Error::CorruptPem { .. }
                | Error::KeyMismatch { .. }
                | Error::Expired { .. }),
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

// ---------------------------------------------------------------------------------------------
// Connecting with diagnosis
// ---------------------------------------------------------------------------------------------

/// Check our own client files before connecting: the bundle parses, the key belongs to the
/// certificate, and the certificate is within its validity period. Each failure names the file.
pub fn check_client_files(files: &TlsFiles) -> Result<()> {
    TrustBundle::load(&files.ca_bundle)?;
    if let Some(id) = &files.identity {
        let chain = KeyedChain::load(&id.cert, &id.key)?;
        chain.check_validity(time::OffsetDateTime::now_utc())?;
    }
    Ok(())
}

/// Connect to etcd over mTLS with the files of `files`.
///
/// Before handing back a client this checks the local files ([`check_client_files`]) and makes one
/// TLS handshake to the first endpoint ([`probe`]), so a refusal comes back as an error that says
/// which: no certificate, a certificate from a CA the server does not trust, an expired
/// certificate, a key that does not match, or a server we do not trust.
pub async fn connect(endpoints: &[String], files: &TlsFiles) -> Result<Client> {
    check_client_files(files)?;
    // The first member that completes a handshake answers for all; when none is reachable, the
    // first one's error is the answer. A refusal (trust, certificate) is returned at once.
    let mut unreachable = None;
    for ep in endpoints {
        match probe(ep, files).await {
            Ok(()) => {
                unreachable = None;
                break;
            }
            Err(e @ Error::EtcdUnreachable { .. }) => {
                unreachable.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = unreachable {
        return Err(e);
    }
    connect_unchecked(endpoints, files).await
}

/// Connect with the role's certificate of a cluster directory ([`ClusterDir::tls_files`]).
pub async fn connect_as(dir: &ClusterDir, role: Role, endpoints: &[String]) -> Result<Client> {
    connect(endpoints, &dir.tls_files(role)).await
}

/// etcd-client's TLS options (tonic, rustls with ring) from our files: the bundle as CA
/// certificates, the identity as client certificate chain and key. For callers that build their
/// own `ConnectOptions`; [`connect`] is the checked way.
pub fn tls_options(files: &TlsFiles) -> Result<TlsOptions> {
    let bundle = files::read(&files.ca_bundle, "CA bundle")?;
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(bundle));
    if let Some(id) = &files.identity {
        let cert = files::read(&id.cert, "certificate file")?;
        let key = files::read(&id.key, "private key file")?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

/// The connect options of [`connect`]: mTLS with `files`, connect timeout, keepalive.
pub fn client_options(files: &TlsFiles) -> Result<ConnectOptions> {
    Ok(ConnectOptions::new()
        .with_tls(tls_options(files)?)
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5)))
}

/// Build the etcd client without any check (errors then surface on the first request). With
/// several endpoints, the client talks to one member that answers ([`connect_any_member`]).
pub async fn connect_unchecked(endpoints: &[String], files: &TlsFiles) -> Result<Client> {
    let opts = client_options(files)?;
    if endpoints.len() > 1 {
        return connect_any_member(endpoints, &opts, Duration::from_secs(5)).await;
    }
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| Error::etcd(format!("connect {}", endpoints.join(",")), e))
}

/// Whether the member at `endpoint` answers a status request within `timeout` and knows a
/// leader (a member cut off from the others answers without one).
async fn member_answers(
    endpoint: &str,
    opts: &ConnectOptions,
    timeout: Duration,
) -> std::result::Result<Client, String> {
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(opts.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let st = c.status().await.map_err(|e| e.to_string())?;
        if st.leader() == 0 {
            return Err("no leader (cut off from the other members?)".to_owned());
        }
        Ok(c)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Keeps the balanced channel of a long-lived client of a multi-member etcd on the members that
/// answer (see [`connect_tracked`]); stops when dropped.
#[derive(Debug)]
pub struct MemberTracker {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MemberTracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Whether the member behind `c` (a client of that one member) answers a status request within
/// `timeout` with a leader.
async fn still_answers(c: &mut Client, timeout: Duration) -> std::result::Result<(), String> {
    match tokio::time::timeout(timeout, c.status()).await {
        Ok(Ok(st)) if st.leader() != 0 => Ok(()),
        Ok(Ok(_)) => Err("no leader (cut off from the other members?)".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// A long-lived client of a multi-member etcd: its balanced channel holds the members that
/// answer (a status request within `timeout`, with a leader), checked before it is handed back
/// and then every `every` by the returned [`MemberTracker`], which removes a member that stops
/// answering (its streams break; requests go to the others) and adds it back when it answers
/// again. The last member is never removed. etcd-client alone keeps sending a share of the
/// requests to a dead member (etcdv3/etcd-client#39). Each member is probed by a task of its
/// own over a client of that member kept between probes (one TLS handshake per member, not
/// per probe), so a member that does not answer delays nobody else's probe.
pub async fn connect_tracked(
    endpoints: &[String],
    opts: &ConnectOptions,
    timeout: Duration,
    every: Duration,
) -> Result<(Client, MemberTracker)> {
    let mut live = Vec::new();
    let mut probes: Vec<(String, Option<Client>)> = Vec::new();
    let mut tried = Vec::new();
    for ep in endpoints {
        match member_answers(ep, opts, timeout).await {
            Ok(c) => {
                live.push(ep.clone());
                probes.push((ep.clone(), Some(c)));
            }
            Err(e) => {
                tried.push(format!("{ep}: {e}"));
                probes.push((ep.clone(), None));
            }
        }
    }
    if live.is_empty() {
        return Err(Error::NoEtcdMember {
            endpoints: endpoints.join(","),
            tried: tried.join("; "),
        });
    }
    if !tried.is_empty() {
        tracing::warn!(down = %tried.join("; "), "etcd members not answering; left out until they do");
    }
    let client = Client::connect(&live, Some(opts.clone()))
        .await
        .map_err(|e| Error::etcd(format!("connect {}", live.join(",")), e))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, std::result::Result<(), String>)>(
        probes.len().max(1),
    );
    let mut tasks = Vec::new();
    for (ep, mut cached) in probes {
        let (tx, opts) = (tx.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let answer = match cached.as_mut() {
                    Some(c) => still_answers(c, timeout).await,
                    None => member_answers(&ep, &opts, timeout).await.map(|c| {
                        cached = Some(c);
                    }),
                };
                if answer.is_err() {
                    cached = None;
                }
                if tx.send((ep.clone(), answer)).await.is_err() {
                    return;
                }
            }
        }));
    }
    let tracked = client.clone();
    tasks.push(tokio::spawn(async move {
        let mut in_set: std::collections::BTreeSet<String> = live.into_iter().collect();
        while let Some((ep, answer)) = rx.recv().await {
            let known = in_set.contains(&ep);
            match answer {
                Ok(()) if !known && tracked.add_endpoint(&ep).await.is_ok() => {
                    tracing::info!(endpoint = %ep, "etcd member answers again; using it");
                    in_set.insert(ep);
                }
                Err(e)
                    if known && in_set.len() > 1 && tracked.remove_endpoint(&ep).await.is_ok() =>
                {
                    tracing::warn!(endpoint = %ep, error = %e, "etcd member stopped answering; left out");
                    in_set.remove(&ep);
                }
                _ => {}
            }
        }
    }));
    Ok((client, MemberTracker { tasks }))
}

/// A client of one member of a multi-member etcd: the first, from a random start (so clients
/// spread over the members), that answers a status request within `timeout` and knows a leader.
///
/// etcd-client balances requests over every endpoint it is given and keeps sending to one that
/// refuses connections (etcdv3/etcd-client#39): with one member of three down, a client of all
/// three fails a share of its requests until that member returns. A client of one member fails
/// only when that member does; callers reconnect, and the reconnect picks a member that answers.
pub async fn connect_any_member(
    endpoints: &[String],
    opts: &ConnectOptions,
    timeout: Duration,
) -> Result<Client> {
    let n = endpoints.len();
    if n == 0 {
        return Err(Error::NoEtcdMember {
            endpoints: String::new(),
            tried: "no endpoint given".into(),
        });
    }
    let start = rand::random_range(0..n);
    let mut tried = Vec::with_capacity(n);
    for i in 0..n {
        let ep = &endpoints[(start + i) % n];
        match member_answers(ep, opts, timeout).await {
            Ok(c) => {
                tracing::debug!(endpoint = %ep, "connected to etcd member");
                return Ok(c);
            }
            Err(e) => tried.push(format!("{ep}: {e}")),
        }
    }
    Err(Error::NoEtcdMember {
        endpoints: endpoints.join(","),
        tried: tried.join("; "),
    })
}

/// One TLS handshake to `endpoint` (`https://host:port`) with our files, then an HTTP/2 preface,
/// to learn whether the server accepts us. TLS 1.3 servers refuse a client certificate after the
/// handshake, so the answer is read from the first bytes the server sends.
pub async fn probe(endpoint: &str, files: &TlsFiles) -> Result<()> {
    let unreachable = |detail: String| Error::EtcdUnreachable {
        endpoint: endpoint.to_owned(),
        detail,
    };
    let hostport = endpoint
        .strip_prefix("https://")
        .ok_or_else(|| unreachable("the endpoint must start with https://".to_owned()))?
        .trim_end_matches('/');
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => hostport,
    };
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|e| unreachable(format!("bad host {host:?}: {e}")))?;

    // Our client config, without the key-match check (the server decides; we explain after).
    let verifier = Arc::new(crate::tls::ReloadingServerVerifier::new(&files.ca_bundle)?);
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            what: "probe".to_owned(),
            source: e,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match &files.identity {
        Some(id) => {
            let chain = files::load_certs(&id.cert)?;
            let key = files::load_key(&id.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => Error::KeyMismatch {
                        cert: id.cert.clone(),
                        key: id.key.clone(),
                    },
                    other => Error::Tls {
                        what: format!("client certificate {}", id.cert.display()),
                        source: other,
                    },
                })?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));

    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    .map_err(|_| unreachable("TCP connect timed out after 5s".to_owned()))?
    .map_err(|e| unreachable(format!("TCP connect: {e}")))?;

    let refused = |e: std::io::Error| -> Error {
        let tls_err = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        match tls_err {
            Some(rustls::Error::InvalidCertificate(ce)) => Error::EtcdServerUntrusted {
                endpoint: endpoint.to_owned(),
                bundle: files.ca_bundle.clone(),
                detail: format!("{ce:?}"),
            },
            Some(rustls::Error::AlertReceived(alert)) => explain_alert(endpoint, files, alert),
            Some(other) => unreachable(format!("TLS: {other}")),
            None => unreachable(format!("TLS: {e}")),
        }
    };
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| unreachable("TLS handshake timed out after 5s".to_owned()))?
        .map_err(refused)?;
    // HTTP/2 client preface and an empty SETTINGS frame; the server answers with its SETTINGS.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello).await.map_err(refused)?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .map_err(|_| unreachable("no answer after the TLS handshake within 5s".to_owned()))?
        .map_err(refused)?;
    if n == 0 {
        return Err(match &files.identity {
            None => Error::EtcdClientCertRequired {
                endpoint: endpoint.to_owned(),
            },
            Some(id) => Error::EtcdClientCertRefused {
                endpoint: endpoint.to_owned(),
                cert: id.cert.clone(),
                reason: "the server closed the connection right after the handshake".to_owned(),
            },
        });
    }
    let _ = tls.shutdown().await;
    Ok(())
}

/// Turn the alert a server sent into an error that says what is wrong with our certificate,
/// checking our own files to tell the cases apart (Go's TLS stack answers `bad_certificate` to
/// an unknown CA and to an expired certificate alike).
fn explain_alert(endpoint: &str, files: &TlsFiles, alert: AlertDescription) -> Error {
    let Some(id) = &files.identity else {
        return Error::EtcdClientCertRequired {
            endpoint: endpoint.to_owned(),
        };
    };
    if alert == AlertDescription::CertificateRequired {
        return Error::EtcdClientCertRequired {
            endpoint: endpoint.to_owned(),
        };
    }
    let local = diagnose_own_cert(files, id);
    let reason = match alert {
        AlertDescription::UnknownCA => {
            format!("the server does not know the CA that issued it (TLS alert unknown_ca){local}")
        }
        AlertDescription::CertificateExpired => {
            format!("the server says it expired (TLS alert certificate_expired){local}")
        }
        AlertDescription::DecryptError => format!(
            "the handshake signature did not verify: the private key {} does not match the certificate \
             (TLS alert decrypt_error){local}",
            id.key.display()
        ),
        AlertDescription::BadCertificate => {
            format!("the server could not verify it (TLS alert bad_certificate){local}")
        }
        other => format!("TLS alert {other:?}{local}"),
    };
    Error::EtcdClientCertRefused {
        endpoint: endpoint.to_owned(),
        cert: id.cert.clone(),
        reason,
    }
}

fn diagnose_own_cert(files: &TlsFiles, id: &CertKeyPaths) -> String {
    let Ok(chain) = files::load_certs(&id.cert) else {
        return String::new();
    };
    let Ok(info) = CertInfo::from_der(&id.cert, &chain[0]) else {
        return String::new();
    };
    let now = time::OffsetDateTime::now_utc();
    if let Err(e) = info.check_valid_at(&id.cert, now) {
        return format!(": {e}");
    }
    if let Ok(key) = files::load_key(&id.key)
        && let Err(e) = files::check_key_matches(&id.cert, &chain[0], &id.key, &key)
    {
        return format!(": {e}");
    }
    let chains_locally = TrustBundle::load(&files.ca_bundle)
        .and_then(|b| b.root_store(&files.ca_bundle))
        .ok()
        .and_then(|roots| {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crate::tls::provider(),
            )
            .build()
            .ok()
        })
        .map(|v| v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()));
    match chains_locally {
        Some(Err(e @ rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_)))) => {
            format!(": {}", crate::bundle::explain_verify_error(&e))
        }
        Some(Err(_)) => format!(
            ": it was issued by {:?}, which does not chain to our own CA bundle {} either: \
             it comes from a foreign CA or from a retired root",
            info.issuer,
            files.ca_bundle.display()
        ),
        Some(Ok(_)) => format!(
            ": it chains to our bundle {}, so the server's --trusted-ca-file lacks its issuer \
             (a root retired after a rotation, etcd not restarted since the bundle changed, or an \
             etcd that trusts only its own cluster's intermediate: use a credential that cluster \
             issued, such as its remote certificate)",
            files.ca_bundle.display()
        ),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Users and roles
// ---------------------------------------------------------------------------------------------

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

    #[test]
    fn health_prefix_is_per_cluster() {
        let c = ClusterName::new("east").unwrap();
        assert_eq!(health_prefix(&c), "clustermesh/v1/health/east/");
    }
}
