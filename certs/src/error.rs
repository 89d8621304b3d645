//! The one error type of this crate. Every message names the file, the rule or the endpoint involved.

use std::path::PathBuf;

/// Everything that can go wrong while issuing, loading or using mesh certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should exist is missing.
    #[error("{what} {} does not exist", path.display())]
    MissingFile {
        /// What the file should have held ("certificate", "private key", "CA bundle", ...).
        what: &'static str,
        /// The missing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed for a reason other than absence.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// "reading", "writing", "creating directory", ...
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not well-formed PEM, or holds no PEM block of the expected kind.
    #[error("{}: corrupt PEM: {detail}", path.display())]
    CorruptPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A PEM block holds bytes that are not an X.509 certificate.
    #[error("{}: not a valid X.509 certificate: {detail}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// A PEM block holds bytes that are not a usable private key.
    #[error("{}: not a usable private key: {detail}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "the private key in {} does not match the certificate in {} (its public key differs): \
         the pair was mixed up or one of them was replaced",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate's validity period ended.
    #[error("certificate {} expired at {not_after} (it is now {now}): issue a new one", path.display())]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// End of validity (RFC 3339).
        not_after: String,
        /// The current time (RFC 3339).
        now: String,
    },
    /// The certificate's validity period has not started yet.
    #[error("certificate {} is not valid before {not_before} (it is now {now}): check the clock", path.display())]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// Start of validity (RFC 3339).
        not_before: String,
        /// The current time (RFC 3339).
        now: String,
    },
    /// A cluster name or id breaks the cluster rules (the message names the rule).
    #[error(transparent)]
    ClusterRule(#[from] mesh_model::ClusterRuleError),
    /// A trust domain breaks the SPIFFE trust domain rules.
    #[error("bad trust domain {domain:?}: {rule}")]
    TrustDomain {
        /// The offending trust domain.
        domain: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A SPIFFE ID could not be parsed.
    #[error("bad SPIFFE id {id:?}: {rule}")]
    SpiffeId {
        /// The offending id.
        id: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A subject alternative name given by the user is not a DNS name or IP address.
    #[error("bad subject alternative name {value:?}: {reason}")]
    BadSan {
        /// The offending value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A certificate does not chain to any CA of a bundle (or is otherwise invalid for it).
    #[error("certificate {} is not trusted by the CA bundle {}: {detail}", cert.display(), bundle.display())]
    NotTrusted {
        /// The certificate file.
        cert: PathBuf,
        /// The bundle file.
        bundle: PathBuf,
        /// Why, in words.
        detail: String,
    },
    /// A certificate that should be a CA is not one.
    #[error("{} is not a CA certificate (basicConstraints CA:FALSE or missing)", path.display())]
    NotACa {
        /// The file.
        path: PathBuf,
    },
    /// A directory lacks the files of the expected layout.
    #[error("{} is not a {what} directory: {detail}", path.display())]
    NotADirectoryOf {
        /// "CA" or "cluster certificate".
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// A trust bundle would become empty, or would lose the CA that signs current certificates.
    #[error("trust bundle {}: {detail}", path.display())]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// The rule that was about to be broken.
        detail: String,
    },
    /// A leaf would carry a DNS name its intermediate's name constraints do not permit.
    #[error(
        "{role} certificate of cluster {cluster}: the DNS name {name:?} is outside the name constraints of the cluster's intermediate {} (it permits {permitted}); re-issue the cluster with --san {name} to add it",
        intermediate.display()
    )]
    OutsideNameConstraints {
        /// The leaf's role.
        role: String,
        /// The cluster.
        cluster: String,
        /// The name.
        name: String,
        /// The intermediate certificate file.
        intermediate: PathBuf,
        /// The permitted DNS subtrees.
        permitted: String,
    },
    /// rcgen failed to issue a certificate.
    #[error("issuing {what}: {source}")]
    Issue {
        /// The certificate being issued.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused a configuration built from the files.
    #[error("building TLS config from {what}: {source}")]
    Tls {
        /// The files or role involved.
        what: String,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
}

impl Error {
    /// A failed file operation `op` ("reading", "creating") on `path` (a missing file read is
    /// [`Error::MissingFile`]).
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound && op == "reading" {
            return Error::MissingFile { what: "file", path };
        }
        Error::Io { op, path, source }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
