//! When the certificates a component loads expire: what `/metrics` exports as
//! `clustermesh_certificate_expiry_timestamp_seconds{component,certificate}` and what `clustermesh
//! status` warns about under [`WARN_BEFORE_DAYS`] days.
//!
//! The files are read when asked (a scrape, a status), so a certificate renewed on disk shows its
//! new expiry at once, whether or not the component has reloaded it yet.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inspect::CertInfo;
use crate::spiffe::Role;

/// Warn when a certificate expires in fewer days than this.
pub const WARN_BEFORE_DAYS: i64 = 30;

/// One certificate and its expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertExpiry {
    /// Which one: a role (`node`, `remote`, `admin`, ...), `intermediate`, or `root-<fp12>` for a
    /// root of the trust bundle.
    pub certificate: String,
    /// The file it was read from.
    pub path: String,
    /// Its `notAfter`, in Unix seconds.
    pub not_after: i64,
}

impl CertExpiry {
    /// Whole days left at `now` (negative once expired).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// The certificates of a cluster directory (or a directory laid out like one) that are present:
/// each role's leaf and, once, the intermediate that signed them, and every root of
/// `ca-bundle.pem`. `roles` limits the leaves (what the component loads). Unreadable files are
/// skipped: the component that loads them reports those errors itself.
pub fn in_dir(dir: &Path, roles: &[Role]) -> Vec<CertExpiry> {
    let mut out = Vec::new();
    let mut intermediate = false;
    for role in roles {
        let path = crate::ca::ClusterDir::tls_files_at(dir, *role)
            .identity
            .map(|i| i.cert)
            .unwrap_or_default();
        let Ok(chain) = CertInfo::from_pem_file(&path) else {
            continue;
        };
        if let Some(leaf) = chain.first() {
            out.push(entry(role.as_str().to_owned(), &path, leaf));
        }
        if !intermediate && let Some(int) = chain.get(1) {
            intermediate = true;
            out.push(entry("intermediate".to_owned(), &path, int));
        }
    }
    let bundle: PathBuf = dir.join("ca-bundle.pem");
    if let Ok(roots) = CertInfo::from_pem_file(&bundle) {
        for r in roots {
            out.push(entry(
                format!("root-{}", r.fingerprint.short()),
                &bundle,
                &r,
            ));
        }
    }
    out
}

/// The leaf of a certificate chain held in memory (a reader certificate another cluster issued,
/// from a `remotes/` entry), as `certificate`, with `origin` saying where it came from. `None`
/// when `pem` holds no parsable certificate.
pub fn of_pem(certificate: &str, origin: &str, pem: &str) -> Option<CertExpiry> {
    let p = Path::new(origin);
    let certs = crate::files::parse_certs(p, pem.as_bytes()).ok()?;
    let leaf = CertInfo::from_der(p, certs.first()?).ok()?;
    Some(entry(certificate.to_owned(), p, &leaf))
}

fn entry(certificate: String, path: &Path, info: &CertInfo) -> CertExpiry {
    CertExpiry {
        certificate,
        path: path.display().to_string(),
        not_after: info.not_after.unix_timestamp(),
    }
}

/// The Prometheus lines of `certs` for `component` (the family's HELP/TYPE header included).
pub fn prometheus(component: &str, certs: &[CertExpiry]) -> String {
    let mut o = String::from(
        "# HELP clustermesh_certificate_expiry_timestamp_seconds When each certificate the component loads expires (Unix seconds), read from its file at scrape time.\n\
         # TYPE clustermesh_certificate_expiry_timestamp_seconds gauge\n",
    );
    for c in certs {
        o.push_str(&format!(
            "clustermesh_certificate_expiry_timestamp_seconds{{component=\"{component}\",certificate=\"{}\"}} {}\n",
            c.certificate, c.not_after
        ));
    }
    o
}

/// Warnings for certificates expiring within [`WARN_BEFORE_DAYS`] days of `now` (Unix seconds).
pub fn warnings(component: &str, certs: &[CertExpiry], now: i64) -> Vec<String> {
    certs
        .iter()
        .filter_map(|c| {
            let days = c.days_left(now);
            (days < WARN_BEFORE_DAYS).then(|| {
                if c.not_after <= now {
                    format!("certificate {} of {component} ({}) has expired", c.certificate, c.path)
                } else {
                    format!(
                        "certificate {} of {component} ({}) expires in {days} days: renew it (clustermesh ca issue-cluster)",
                        c.certificate, c.path
                    )
                }
            })
        })
        .collect()
}
