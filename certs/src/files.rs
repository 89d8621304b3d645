//! Reading and writing PEM files with errors that name the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// Read a whole file; a missing file is [`Error::MissingFile`] naming `what` it should hold.
pub fn read(path: &Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                what,
                path: path.to_owned(),
            }
        } else {
            Error::Io {
                op: "reading",
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Write a file atomically (temporary file in the same directory, then rename), so a reader that
/// reloads on change never sees half a file. `private` files get mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(|e| Error::io("writing", &tmp, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("writing", path, e))
}

/// Replace an existing file atomically keeping its mode and owner (renewal rewrites certificates
/// that an operator or a chart gave particular permissions); a missing file is written 0644.
pub fn write_atomic_like(path: &Path, contents: &[u8]) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let dir = path.parent().unwrap_or(Path::new("."));
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("writing", &tmp, e))?;
            f.write_all(contents)
                .and_then(|()| f.set_permissions(meta.permissions()))
                .and_then(|()| {
                    // Keep the owner where we may (as root); otherwise the file stays ours.
                    match std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())) {
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
                        other => other,
                    }
                })
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io("writing", &tmp, e))?;
            return std::fs::rename(&tmp, path).map_err(|e| Error::io("writing", path, e));
        }
    }
    write_atomic(path, contents, false)
}

/// Parse every `CERTIFICATE` block of a PEM file, checking that each is an X.509 certificate.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut &pem[..]) {
        let der = item.map_err(|e| Error::CorruptPem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::BadCertificate {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        certs.push(der);
    }
    if certs.is_empty() {
        let text = String::from_utf8_lossy(pem);
        let detail = if text.contains("PRIVATE KEY-----") {
            "no \"-----BEGIN CERTIFICATE-----\" block found: this file holds a private key, not a certificate"
        } else {
            "no \"-----BEGIN CERTIFICATE-----\" block found"
        };
        return Err(Error::CorruptPem {
            path: path.to_owned(),
            detail: detail.to_owned(),
        });
    }
    Ok(certs)
}

/// Load every certificate of a PEM file (a leaf followed by its chain, or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, "certificate file")?;
    parse_certs(path, &pem)
}

/// Load the PKCS#8 (or SEC1 / PKCS#1) private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path, "private key file")?;
    let key = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::CorruptPem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| Error::CorruptPem {
            path: path.to_owned(),
            detail: "no \"-----BEGIN PRIVATE KEY-----\" block found".to_owned(),
        })?;
    Ok(key)
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn cert_spki(path: &Path, cert: &CertificateDer<'_>) -> Result<Vec<u8>> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|e| Error::BadCertificate {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(x.public_key().raw.to_vec())
}

/// Check that `key` is the private key of `cert`; names both files when it is not.
pub fn check_key_matches(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    key_path: &Path,
    key: &PrivateKeyDer<'_>,
) -> Result<()> {
    let signing =
        rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| Error::BadKey {
            path: key_path.to_owned(),
            detail: e.to_string(),
        })?;
    let Some(public) = signing.public_key() else {
        return Ok(());
    };
    if public.as_ref() != cert_spki(cert_path, cert)?.as_slice() {
        return Err(Error::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Ok(())
}

/// A certificate chain and its key, loaded and checked to belong together.
#[derive(Debug)]
pub struct KeyedChain {
    /// The leaf first, then its intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the chain came from.
    pub cert_path: PathBuf,
    /// Where the key came from.
    pub key_path: PathBuf,
}

impl KeyedChain {
    /// Load `cert_path` and `key_path` and check the key belongs to the leaf.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let chain = load_certs(cert_path)?;
        let key = load_key(key_path)?;
        check_key_matches(cert_path, &chain[0], key_path, &key)?;
        Ok(Self {
            chain,
            key,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        })
    }

    /// Fail with [`Error::Expired`] / [`Error::NotYetValid`] when the leaf is outside its validity period.
    pub fn check_validity(&self, now: time::OffsetDateTime) -> Result<()> {
        crate::inspect::CertInfo::from_der(&self.cert_path, &self.chain[0])?
            .check_valid_at(&self.cert_path, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.crt");
        let e = load_certs(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.crt") && e.contains("does not exist"),
            "{e}"
        );

        let bad = dir.path().join("bad.crt");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!notbase64\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_certs(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.crt") && e.contains("corrupt PEM"), "{e}");

        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, "hello").unwrap();
        let e = load_key(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.key") && e.contains("PRIVATE KEY"), "{e}");
    }
}
