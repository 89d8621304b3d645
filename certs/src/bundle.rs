//! Trust bundles: a PEM file holding every CA a party trusts. Several roots at once allow rotation
//! with overlap (old and new root) and federation of meshes that do not share a root.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};
use crate::files;
use crate::inspect::{CertInfo, Fingerprint};

/// An ordered, duplicate-free list of CA certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of the given certificates (duplicates dropped).
    pub fn new(certs: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        let mut b = Self::default();
        for c in certs {
            b.push(c);
        }
        b
    }

    /// Load a bundle file; every block must be a CA certificate.
    pub fn load(path: &Path) -> Result<Self> {
        let pem = files::read(path, "CA bundle")?;
        let certs = files::parse_certs(path, &pem)?;
        for c in &certs {
            if !CertInfo::from_der(path, c)?.is_ca {
                return Err(Error::NotACa {
                    path: path.to_owned(),
                });
            }
        }
        Ok(Self::new(certs))
    }

    /// Write the bundle atomically. An empty bundle is refused: it would trust nobody.
    pub fn save(&self, path: &Path) -> Result<()> {
        if self.certs.is_empty() {
            return Err(Error::Bundle {
                path: path.to_owned(),
                detail: "refusing to write an empty bundle (it would trust nobody)".to_owned(),
            });
        }
        let pem: String = self.certs.iter().map(crate::ca::pem_of).collect();
        files::write_atomic(path, pem.as_bytes(), false)
    }

    /// Append a CA unless already present.
    pub fn push(&mut self, cert: CertificateDer<'static>) {
        if !self.certs.contains(&cert) {
            self.certs.push(cert);
        }
    }

    /// Put a CA first (moving it there if present).
    pub fn insert_first(&mut self, cert: CertificateDer<'static>) {
        self.certs.retain(|c| *c != cert);
        self.certs.insert(0, cert);
    }

    /// Add every CA of another bundle (federation).
    pub fn merge(&mut self, other: &TrustBundle) {
        for c in &other.certs {
            self.push(c.clone());
        }
    }

    /// Add the CAs of another mesh's bundle (federation), except those claiming our own trust
    /// domain `own` (SPIFFE id `spiffe://<own>/...`) that we do not hold already: a foreign mesh
    /// cannot speak for this trust domain (the identity checks rely on it), and a root of ours it
    /// still holds after we retired it must not come back. Returns the fingerprints skipped.
    pub fn merge_foreign(
        &mut self,
        other: &TrustBundle,
        own: &crate::spiffe::TrustDomain,
    ) -> Vec<Fingerprint> {
        let mut skipped = Vec::new();
        for c in &other.certs {
            if self.certs.contains(c) {
                continue;
            }
            let claims_own = CertInfo::from_der(Path::new("<bundle>"), c)
                .ok()
                .and_then(|i| i.spiffe_id)
                .is_some_and(|id| id.trust_domain == *own);
            if claims_own {
                skipped.push(Fingerprint::of(c));
            } else {
                self.push(c.clone());
            }
        }
        skipped
    }

    /// Remove the CA with this fingerprint; true when one was removed.
    pub fn remove(&mut self, fp: &Fingerprint) -> bool {
        let before = self.certs.len();
        self.certs.retain(|c| Fingerprint::of(c) != *fp);
        before != self.certs.len()
    }

    /// The certificates, in order.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Fingerprints of the certificates, in order.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.certs.iter().map(|c| Fingerprint::of(c)).collect()
    }

    /// True when the bundle holds no CA.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Check that the certificate chain in `cert_path` (leaf first, then intermediates) chains to a
    /// CA of this bundle and is valid now, for the use its extended key usage names (client
    /// certificates as a server would check them, server certificates as a client would).
    /// Returns the fingerprint of the bundle CA it chains to. `bundle_path` names the bundle in errors.
    pub fn verify(&self, bundle_path: &Path, cert_path: &Path) -> Result<Fingerprint> {
        use rustls::pki_types::UnixTime;
        let chain = files::load_certs(cert_path)?;
        let info = CertInfo::from_der(cert_path, &chain[0])?;
        let not_trusted = |detail: String| Error::NotTrusted {
            cert: cert_path.to_owned(),
            bundle: bundle_path.to_owned(),
            detail,
        };
        if info.is_ca {
            return if self.certs.contains(&chain[0]) {
                Ok(info.fingerprint)
            } else {
                Err(not_trusted(
                    "it is a CA certificate that the bundle does not hold".to_owned(),
                ))
            };
        }
        info.check_valid_at(cert_path, time::OffsetDateTime::now_utc())?;
        let roots = std::sync::Arc::new(self.root_store(bundle_path)?);
        let provider = crate::tls::provider();
        let now = UnixTime::now();
        let result = if info.client_auth {
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| not_trusted(e.to_string()))?
                .verify_client_cert(&chain[0], &chain[1..], now)
                .map(|_| ())
        } else {
            let parsed = rustls::server::ParsedCertificate::try_from(&chain[0])
                .map_err(|e| not_trusted(e.to_string()))?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &chain[1..],
                now,
                provider.signature_verification_algorithms.all,
            )
        };
        result.map_err(|e| not_trusted(explain_verify_error(&e)))?;
        // Which bundle CA is the anchor: the one whose subject is the issuer of the chain's top.
        let top = CertInfo::from_der(cert_path, chain.last().unwrap_or(&chain[0]))?;
        let anchor = self
            .certs
            .iter()
            .filter_map(|c| CertInfo::from_der(bundle_path, c).ok())
            .find(|ca| ca.subject == top.issuer)
            .map(|ca| ca.fingerprint)
            .unwrap_or(info.fingerprint);
        Ok(anchor)
    }

    /// A rustls root store of these CAs; `path` names the file in errors.
    pub fn root_store(&self, path: &Path) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        for c in &self.certs {
            store.add(c.clone()).map_err(|e| Error::Tls {
                what: format!("CA bundle {}", path.display()),
                source: e,
            })?;
        }
        Ok(store)
    }
}

/// A rustls verification error in words (what to check), for messages about a refused peer.
pub fn explain_verify_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::Other(o))
            if format!("{o:?}").contains("NameConstraintViolation") =>
        {
            "it carries a name outside the name constraints of the intermediate that signed it \
             (an intermediate vouches only for its own cluster's names; name constraint violation)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "it was not issued by a CA in the bundle (foreign CA, retired root, or missing intermediate)".to_owned()
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "its signature does not verify with the CA the bundle names as its issuer".to_owned()
        }
        rustls::Error::InvalidCertificate(C::Expired) => "it expired".to_owned(),
        rustls::Error::InvalidCertificate(C::NotValidYet) => "it is not valid yet".to_owned(),
        rustls::Error::InvalidCertificate(C::InvalidPurpose) => {
            "its extended key usage does not allow this use".to_owned()
        }
        other => other.to_string(),
    }
}
