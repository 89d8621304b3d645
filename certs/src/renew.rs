//! Leaf renewal in place: `clustermesh ca renew`, what the chart's CronJob runs.
//!
//! A renewed leaf keeps its key, subject, SPIFFE id, SANs and lifetime; only its validity window
//! moves (and its serial changes). Only the `.crt` file is replaced, atomically and with the mode
//! and owner it had, so a reader never sees a certificate that does not match its key, and the
//! key files are not touched at all. Every component re-reads its certificate files on the next
//! handshake (etcd per handshake, our TLS configs when the files change), so a renewal needs no
//! restart: connections open at the time keep working, new ones present the renewed certificate.
//!
//! When to renew: by default once less than a third of the leaf's lifetime remains (what
//! cert-manager does), so a daily job renews year-long leaves about four months ahead and a job
//! every 10 s renews two-minute leaves 40 s ahead.

use std::path::PathBuf;

use rcgen::KeyPair;
use time::{Duration, OffsetDateTime};

use crate::ca::{BACKDATE, ClusterDir, San};
use crate::error::{Error, Result};
use crate::files;
use crate::inspect::CertInfo;
use crate::spiffe::Role;

/// When a leaf is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RenewWhen {
    /// Once less than a third of its lifetime remains (the default).
    #[default]
    LastThird,
    /// Once less than this remains.
    Within(Duration),
    /// Always.
    Now,
}

/// What renewal did with one leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRenewal {
    /// The leaf's role.
    pub role: Role,
    /// Its certificate file.
    pub cert: PathBuf,
    /// Its end of validity before.
    pub was_not_after: OffsetDateTime,
    /// Its end of validity now (the same when it was kept).
    pub not_after: OffsetDateTime,
    /// True when it was re-issued.
    pub renewed: bool,
    /// When the leaf becomes due under the policy (for a kept leaf).
    pub due_at: OffsetDateTime,
}

impl ClusterDir {
    /// Renew the leaves of this directory that are due under `when` (every role of
    /// [`Role::LEAVES`] whose files exist; a directory may hold only some, as a component's
    /// mounted Secret does). `lifetime` overrides each leaf's own lifetime.
    pub fn renew(&self, when: RenewWhen, lifetime: Option<Duration>) -> Result<Vec<LeafRenewal>> {
        let now = OffsetDateTime::now_utc();
        let inter = self.intermediate_info()?;
        inter.check_valid_at(&self.cert(Role::Intermediate), now)?;
        let mut out = Vec::new();
        for role in Role::LEAVES {
            let paths = self.cert_key(role);
            if !paths.cert.exists() {
                continue;
            }
            let chain = files::KeyedChain::load(&paths.cert, &paths.key)?;
            let info = CertInfo::from_der(&paths.cert, &chain.chain[0])?;
            let own_lifetime = info.not_after - (info.not_before + BACKDATE);
            let life = lifetime.unwrap_or(own_lifetime).max(Duration::seconds(1));
            let due_at = match when {
                RenewWhen::LastThird => info.not_after - own_lifetime / 3,
                RenewWhen::Within(d) => info.not_after - d,
                RenewWhen::Now => now,
            };
            if now < due_at {
                out.push(LeafRenewal {
                    role,
                    cert: paths.cert,
                    was_not_after: info.not_after,
                    not_after: info.not_after,
                    renewed: false,
                    due_at,
                });
                continue;
            }
            let key_pem = files::read(&paths.key, "private key file")?;
            let key = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| {
                Error::BadKey {
                    path: paths.key.clone(),
                    detail: e.to_string(),
                }
            })?;
            let sans: Vec<San> = if role.is_server() {
                info.dns_names
                    .iter()
                    .cloned()
                    .map(San::Dns)
                    .chain(info.ip_addresses.iter().copied().map(San::Ip))
                    .collect()
            } else {
                Vec::new()
            };
            self.check_name_constraints(role, &sans)?;
            let not_after = (now + life).min(inter.not_after);
            let chain_pem = self.sign_leaf(role, now - BACKDATE, not_after, &sans, &key)?;
            files::write_atomic_like(&paths.cert, chain_pem.as_bytes())?;
            tracing::info!(
                cluster = %self.info.name,
                %role,
                cert = %paths.cert.display(),
                was = %info.not_after,
                until = %not_after,
                "renewed certificate (same key)"
            );
            out.push(LeafRenewal {
                role,
                cert: paths.cert,
                was_not_after: info.not_after,
                not_after,
                renewed: true,
                due_at,
            });
        }
        Ok(out)
    }
}
