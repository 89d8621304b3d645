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
