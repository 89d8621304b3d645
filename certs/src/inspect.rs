//! What a certificate says, in words a person reads: subject, issuer, SANs, SPIFFE id, validity,
//! SHA-256 fingerprint.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;

/// A SHA-256 fingerprint of a certificate's DER encoding (what `openssl x509 -fingerprint -sha256` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of DER bytes.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Lowercase hex without separators (64 characters), the form used in etcd values and file names.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, enough to tell CAs apart in a listing.
    pub fn short(&self) -> String {
        self.hex()[..12].to_owned()
    }

    /// Parse the [`Fingerprint::hex`] form or the colon-separated form (either case).
    pub fn parse(s: &str) -> Option<Self> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(clean.to_ascii_lowercase()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// True when `prefix` (hex, colons allowed) is a prefix of this fingerprint.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        let clean: String = prefix
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        !clean.is_empty() && self.hex().starts_with(&clean)
    }
}

/// Colon-separated uppercase hex, `AB:CD:...`.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// The facts of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name (`CN=admin-east`).
    pub subject: String,
    /// Subject common name, when present.
    pub common_name: Option<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    /// True when the subject and issuer are the same (a root).
    pub self_issued: bool,
    /// True when basicConstraints says CA:TRUE.
    pub is_ca: bool,
    /// Extended key usage: server authentication.
    pub server_auth: bool,
    /// Extended key usage: client authentication.
    pub client_auth: bool,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// URI subject alternative names.
    pub uris: Vec<String>,
    /// The first `spiffe://` URI SAN, parsed.
    pub spiffe_id: Option<SpiffeId>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number, colon hex.
    pub serial: String,
    /// SHA-256 of the DER certificate.
    pub fingerprint: Fingerprint,
}

impl CertInfo {
    /// Read the facts of a DER certificate; `path` is only used in error messages.
    pub fn from_der(path: &Path, der: &CertificateDer<'_>) -> Result<Self> {
        let bad = |detail: String| Error::BadCertificate {
            path: path.to_owned(),
            detail,
        };
        let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
        let mut info = CertInfo {
            subject: x.subject().to_string(),
            common_name: x
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            issuer: x.issuer().to_string(),
            self_issued: x.subject().as_raw() == x.issuer().as_raw(),
            is_ca: x.is_ca(),
            server_auth: false,
            client_auth: false,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            spiffe_id: None,
            not_before: x.validity().not_before.to_datetime(),
            not_after: x.validity().not_after.to_datetime(),
            serial: x.raw_serial_as_string(),
            fingerprint: Fingerprint::of(der),
        };
        for ext in x.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => info.dns_names.push((*d).to_owned()),
                            GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                            GeneralName::IPAddress(b) => {
                                if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                                    info.ip_addresses.push(IpAddr::from(v4));
                                } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                                    info.ip_addresses.push(IpAddr::from(v6));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    info.server_auth = eku.server_auth;
                    info.client_auth = eku.client_auth;
                }
                _ => {}
            }
        }
        info.spiffe_id = info
            .uris
            .iter()
            .find(|u| u.starts_with("spiffe://"))
            .and_then(|u| SpiffeId::parse(u).ok());
        Ok(info)
    }

    /// Read every certificate of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<Vec<Self>> {
        crate::files::load_certs(path)?
            .iter()
            .map(|der| Self::from_der(path, der))
            .collect()
    }

    /// Fail when `now` is outside the validity period; `path` names the file in the error.
    pub fn check_valid_at(&self, path: &Path, now: OffsetDateTime) -> Result<()> {
        if now > self.not_after {
            return Err(Error::Expired {
                path: path.to_owned(),
                not_after: rfc3339(self.not_after),
                now: rfc3339(now),
            });
        }
        if now < self.not_before {
            return Err(Error::NotYetValid {
                path: path.to_owned(),
                not_before: rfc3339(self.not_before),
                now: rfc3339(now),
            });
        }
        Ok(())
    }

    /// What kind of certificate this is, in words.
    pub fn kind(&self) -> String {
        if self.is_ca {
            return if self.self_issued {
                "root CA certificate (self-signed)".to_owned()
            } else {
                "intermediate CA certificate".to_owned()
            };
        }
        match (self.server_auth, self.client_auth) {
            (true, true) => "server and client certificate".to_owned(),
            (true, false) => "server certificate".to_owned(),
            (false, true) => match &self.common_name {
                Some(cn) => format!("client certificate (etcd user \"{cn}\")"),
                None => "client certificate".to_owned(),
            },
            (false, false) => "certificate without extended key usage".to_owned(),
        }
    }

    /// A multi-line description for people, as printed by `clustermesh certs inspect`.
    pub fn describe(&self, now: OffsetDateTime) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let none = || "(none)".to_owned();
        let _ = writeln!(s, "  Kind:                {}", self.kind());
        let _ = writeln!(s, "  Subject:             {}", self.subject);
        let _ = writeln!(s, "  Issuer:              {}", self.issuer);
        let spiffe = match &self.spiffe_id {
            Some(id) => match id.cluster_role() {
                Some((c, r)) => format!("{id} (cluster {c}, role {r})"),
                None => id.to_string(),
            },
            None => none(),
        };
        let _ = writeln!(s, "  SPIFFE id:           {spiffe}");
        let join = |v: Vec<String>| if v.is_empty() { none() } else { v.join(", ") };
        let _ = writeln!(s, "  DNS names:           {}", join(self.dns_names.clone()));
        let ips = self.ip_addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "  IP addresses:        {}", join(ips));
        let others: Vec<String> = self
            .uris
            .iter()
            .filter(|u| !u.starts_with("spiffe://"))
            .cloned()
            .collect();
        if !others.is_empty() {
            let _ = writeln!(s, "  Other URIs:          {}", others.join(", "));
        }
        let _ = writeln!(s, "  Valid from:          {}", human_time(self.not_before));
        let status = if now > self.not_after {
            format!("EXPIRED {} ago", human_duration(now - self.not_after))
        } else if now < self.not_before {
            format!(
                "NOT YET VALID, starts in {}",
                human_duration(self.not_before - now)
            )
        } else {
            format!("valid, expires in {}", human_duration(self.not_after - now))
        };
        let _ = writeln!(
            s,
            "  Valid until:         {} ({status})",
            human_time(self.not_after)
        );
        let _ = writeln!(s, "  Serial:              {}", self.serial);
        let _ = writeln!(s, "  SHA-256 fingerprint: {}", self.fingerprint);
        s
    }
}

/// RFC 3339 form of a time.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn human_time(t: OffsetDateTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.to_string())
}

fn human_duration(d: time::Duration) -> String {
    let secs = d.whole_seconds().unsigned_abs();
    let days = secs / 86_400;
    if days >= 2 {
        format!("{days} days")
    } else if secs >= 7_200 {
        format!("{} hours", secs / 3_600)
    } else if secs >= 120 {
        format!("{} minutes", secs / 60)
    } else {
        format!("{secs} seconds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse() {
        let fp = Fingerprint::of(b"hello");
        let colon = fp.to_string();
        assert_eq!(colon.len(), 32 * 3 - 1);
        assert_eq!(Fingerprint::parse(&colon), Some(fp));
        assert_eq!(Fingerprint::parse(&fp.hex()), Some(fp));
        assert!(fp.matches_prefix(&colon[..8]));
        assert!(!fp.matches_prefix(""));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(time::Duration::days(365)), "365 days");
        assert_eq!(human_duration(time::Duration::minutes(5)), "5 minutes");
    }
}
