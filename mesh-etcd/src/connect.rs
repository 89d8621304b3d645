//! Connecting to etcd with diagnosis: a refused or failed TLS connection says what was wrong
//! (untrusted server, missing or refused client certificate and why), member tracking and probes.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::AlertDescription;
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::error::{Error, Result};
use mesh_certs::CertInfo;
use mesh_certs::TrustBundle;
use mesh_certs::files::{self, KeyedChain};
use mesh_certs::spiffe::Role;
use mesh_certs::{CertKeyPaths, ClusterDir, Error as CertError, TlsFiles};

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
    let verifier = Arc::new(mesh_certs::tls::ReloadingServerVerifier::new(
        &files.ca_bundle,
    )?);
    let builder = rustls::ClientConfig::builder_with_provider(mesh_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Tls {
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
                    rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
                        cert: id.cert.clone(),
                        key: id.key.clone(),
                    },
                    other => CertError::Tls {
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
                mesh_certs::tls::provider(),
            )
            .build()
            .ok()
        })
        .map(|v| v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()));
    match chains_locally {
        Some(Err(e @ rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_)))) => {
            format!(": {}", mesh_certs::bundle::explain_verify_error(&e))
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
