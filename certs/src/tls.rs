//! rustls server and client configurations built from mesh certificate files, re-read when the
//! files change, so a rotated certificate or bundle takes effect on the next handshake without a
//! restart.
//!
//! Every handshake reads the files and compares their SHA-256 with the last load; when one changed,
//! they are loaded and checked again (PEM, key matches certificate). A reload that fails (a half-rotated
//! directory, a corrupt file) is logged with the file it names and the previous, working material
//! is kept. Building a config fails at once when the files are not usable in the first place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::TrustBundle;
use crate::ca::{CertKeyPaths, TlsFiles};
use crate::error::{Error, Result};
use crate::files::KeyedChain;
use crate::inspect::CertInfo;
use crate::spiffe::SpiffeId;

/// The crypto provider every config of this crate uses: rustls' ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// File-stamped reloading cell
// ---------------------------------------------------------------------------------------------

/// What the files hold: a SHA-256 per file (`None`: unreadable). Hashing a few kilobytes per
/// handshake is cheap and, unlike modification times, never misses a change (coarse timestamps
/// and reused inodes can make two versions of a file look alike).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<[u8; 32]>>);

fn stamp(paths: &[PathBuf]) -> Stamp {
    use sha2::Digest as _;
    Stamp(
        paths
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .ok()
                    .map(|b| sha2::Sha256::digest(&b).into())
            })
            .collect(),
    )
}

type Loader<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

/// A value loaded from files and loaded again when any of them changes.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self> {
        let s = stamp(&paths);
        let value = Arc::new(load()?);
        Ok(Self {
            paths,
            load,
            state: Mutex::new((s, value)),
        })
    }

    fn get(&self) -> Arc<T> {
        let now = stamp(&self.paths);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != now {
            match (self.load)() {
                Ok(v) => {
                    tracing::info!(files = ?self.paths, "TLS files changed; reloaded");
                    *state = (now, Arc::new(v));
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but cannot be loaded; keeping the previous ones");
                    // Remember the stamp so a broken file is not re-parsed on every handshake.
                    state.0 = now;
                }
            }
        }
        state.1.clone()
    }
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn certified_key(paths: &CertKeyPaths) -> Result<CertifiedKey> {
    let chain = KeyedChain::load(&paths.cert, &paths.key)?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&chain.key).map_err(|e| Error::BadKey {
            path: paths.key.clone(),
            detail: e.to_string(),
        })?;
    Ok(CertifiedKey::new(chain.chain, key))
}

// ---------------------------------------------------------------------------------------------
// Our own certificate
// ---------------------------------------------------------------------------------------------

/// Presents the certificate of a [`CertKeyPaths`] pair, re-reading it when the files change.
/// Serves as both [`ResolvesServerCert`] and [`ResolvesClientCert`].
#[derive(Debug)]
pub struct ReloadingCertResolver {
    inner: Reloading<Arc<CertifiedKey>>,
}

impl ReloadingCertResolver {
    /// Load the pair now (fails with the file named when it is unusable).
    pub fn new(paths: &CertKeyPaths) -> Result<Self> {
        let p = paths.clone();
        Ok(Self {
            inner: Reloading::new(
                vec![paths.cert.clone(), paths.key.clone()],
                Box::new(move || certified_key(&p).map(Arc::new)),
            )?,
        })
    }

    /// The certificate chain currently presented.
    pub fn current(&self) -> Arc<CertifiedKey> {
        (*self.inner.get()).clone()
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Peer verification against a reloading bundle
// ---------------------------------------------------------------------------------------------

fn load_bundle(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let bundle = TrustBundle::load(path)?;
    Ok(Arc::new(bundle.root_store(path)?))
}

/// Verifies client certificates against a CA bundle file, re-read when it changes.
#[derive(Debug)]
pub struct ReloadingClientVerifier {
    inner: Reloading<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
}

impl ReloadingClientVerifier {
    /// Load the bundle now. `mandatory`: refuse clients that present no certificate.
    pub fn new(bundle: &Path, mandatory: bool) -> Result<Self> {
        let path = bundle.to_owned();
        let load = move || -> Result<Arc<dyn ClientCertVerifier>> {
            let roots = load_bundle(&path)?;
            let b = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let b = if mandatory {
                b
            } else {
                b.allow_unauthenticated()
            };
            b.build().map_err(|e| Error::Tls {
                what: format!("client verifier from {}", path.display()),
                source: rustls::Error::General(e.to_string()),
            })
        };
        Ok(Self {
            inner: Reloading::new(vec![bundle.to_owned()], Box::new(load))?,
            mandatory,
        })
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to outlive a reload; clients of this mesh present their one certificate anyway.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .get()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.get().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.get().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.get().supported_verify_schemes()
    }
}

/// Verifies server certificates against a CA bundle file, re-read when it changes.
#[derive(Debug)]
pub struct ReloadingServerVerifier {
    inner: Reloading<Arc<WebPkiServerVerifier>>,
}

impl ReloadingServerVerifier {
    /// Load the bundle now.
    pub fn new(bundle: &Path) -> Result<Self> {
        let path = bundle.to_owned();
        let load = move || -> Result<Arc<WebPkiServerVerifier>> {
            let roots = load_bundle(&path)?;
            WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| Error::Tls {
                    what: format!("server verifier from {}", path.display()),
                    source: rustls::Error::General(e.to_string()),
                })
        };
        Ok(Self {
            inner: Reloading::new(vec![bundle.to_owned()], Box::new(load))?,
        })
    }
}

impl ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.get().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.get().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.get().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.get().supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Config builders
// ---------------------------------------------------------------------------------------------

/// Whether a server asks clients for certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Refuse clients without a certificate from the bundle (mTLS).
    Required,
    /// Verify a certificate when one is presented, accept clients without one.
    Optional,
    /// Do not ask for client certificates.
    Off,
}

/// A rustls server config presenting `files.identity` and (unless [`ClientAuth::Off`]) verifying
/// clients against `files.ca_bundle`; both re-read on change. Set ALPN (`h2` for gRPC) on the result.
pub fn server_config(files: &TlsFiles, client_auth: ClientAuth) -> Result<ServerConfig> {
    let identity = files.identity.as_ref().ok_or_else(|| Error::Tls {
        what: "server config".to_owned(),
        source: rustls::Error::General("a server needs a certificate and key".to_owned()),
    })?;
    let resolver = Arc::new(ReloadingCertResolver::new(identity)?);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            what: "server config".to_owned(),
            source: e,
        })?;
    let cfg = match client_auth {
        ClientAuth::Off => builder.with_no_client_auth(),
        ClientAuth::Required | ClientAuth::Optional => {
            let v = ReloadingClientVerifier::new(
                &files.ca_bundle,
                client_auth == ClientAuth::Required,
            )?;
            builder.with_client_cert_verifier(Arc::new(v))
        }
    };
    let mut cfg = cfg.with_cert_resolver(resolver);
    // No resumption: every connection presents and verifies certificates against the current
    // files, so a retired root or a replaced certificate takes effect on the next connection.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A rustls client config verifying servers against `files.ca_bundle` and presenting
/// `files.identity` when set; both re-read on change. Set ALPN on the result if needed.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig> {
    let verifier = Arc::new(ReloadingServerVerifier::new(&files.ca_bundle)?);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            what: "client config".to_owned(),
            source: e,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match &files.identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(ReloadingCertResolver::new(id)?)),
        None => builder.with_no_client_auth(),
    };
    // No resumption, so each connection verifies the server against the current bundle.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// [`server_config`] with ALPN `h2`, for gRPC (tonic) servers: wrap it in a
/// `tokio_rustls::TlsAcceptor` and serve the accepted streams with `serve_with_incoming`.
pub fn grpc_server_config(files: &TlsFiles, client_auth: ClientAuth) -> Result<ServerConfig> {
    let mut cfg = server_config(files, client_auth)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// [`client_config`] with ALPN `h2`, for gRPC clients.
pub fn grpc_client_config(files: &TlsFiles) -> Result<ClientConfig> {
    let mut cfg = client_config(files)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The SPIFFE id of a peer certificate (e.g. from `ServerConnection::peer_certificates()`).
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    CertInfo::from_der(Path::new("<peer certificate>"), cert)
        .ok()?
        .spiffe_id
}

// ---------------------------------------------------------------------------------------------
// Authorization by identity
// ---------------------------------------------------------------------------------------------

/// Whether a verified peer chain speaks for `role` of `cluster` in this mesh: its leaf carries
/// the SPIFFE id `spiffe://<td>/cluster/<cluster>/<role>`, and the intermediate that signed it
/// (found by verifying the chain again, against only the roots of trust domain `td` in `bundle`)
/// is `cluster`'s own, `spiffe://<td>/cluster/<cluster>/intermediate`.
///
/// A common name alone is not enough: any intermediate chaining to a trusted root (another
/// cluster's, or a federated mesh's) can write `CN=admin-c1` and any SPIFFE id into a leaf. Only
/// the root signs intermediates and intermediates cannot sign CAs (path length 0), so the
/// verified path's intermediate is the cluster the leaf really belongs to. The error says why, in
/// words an operator can act on.
pub fn check_cluster_identity(
    chain: &[CertificateDer<'_>],
    bundle: &Path,
    td: &crate::spiffe::TrustDomain,
    cluster: &mesh_model::ClusterName,
    role: crate::spiffe::Role,
) -> std::result::Result<(), String> {
    let peer = Path::new("<peer certificate>");
    let leaf = chain.first().ok_or("no client certificate")?;
    let info = CertInfo::from_der(peer, leaf).map_err(|e| e.to_string())?;
    let want = SpiffeId::for_cluster(td, cluster, role);
    match &info.spiffe_id {
        Some(id) if *id == want => {}
        Some(id) => return Err(format!("its SPIFFE id is {id}, not {want}")),
        None => return Err(format!("it carries no SPIFFE id (want {want})")),
    }
    // Our roots carry `spiffe://<td>/ca` (`ca init`). A bundle whose roots carry no SPIFFE id
    // (an issuer of cert-manager's that is not ours) has no way to tell; then every root that does
    // not claim another trust domain counts as ours.
    let root_id = SpiffeId::for_root_ca(td);
    let roots: Vec<(CertificateDer<'static>, Option<SpiffeId>)> = TrustBundle::load(bundle)
        .map_err(|e| e.to_string())?
        .certs()
        .iter()
        .map(|c| {
            let id = CertInfo::from_der(bundle, c).ok().and_then(|i| i.spiffe_id);
            (c.clone(), id)
        })
        .collect();
    let identified = roots.iter().any(|(_, id)| id.as_ref() == Some(&root_id));
    let own: Vec<CertificateDer<'static>> = roots
        .into_iter()
        .filter(|(_, id)| match id {
            Some(id) => *id == root_id,
            None => !identified,
        })
        .map(|(c, _)| c)
        .collect();
    if own.is_empty() {
        return Err(format!(
            "{} holds no root of trust domain {td}",
            bundle.display()
        ));
    }
    let anchors = own
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("a root of {}: {e:?}", bundle.display()))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    let path = ee
        .verify_for_usage(
            provider().signature_verification_algorithms.all,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            format!("it does not chain to a root of trust domain {td} ({e:?}): it was issued outside this mesh")
        })?;
    let issuer = path
        .intermediate_certificates()
        .next()
        .ok_or("it is signed by a root directly, not by a cluster's intermediate")?;
    let issuer_info = CertInfo::from_der(peer, &issuer.der()).map_err(|e| e.to_string())?;
    let want_issuer = SpiffeId::for_cluster(td, cluster, crate::spiffe::Role::Intermediate);
    if issuer_info.spiffe_id.as_ref() != Some(&want_issuer) {
        let by = issuer_info
            .spiffe_id
            .map(|id| id.to_string())
            .unwrap_or_else(|| "no SPIFFE id".to_owned());
        return Err(format!(
            "it is signed by {} ({by}), not by cluster {cluster}'s intermediate",
            issuer_info.subject
        ));
    }
    Ok(())
}
