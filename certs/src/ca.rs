//! The mesh CA: a root per trust domain, an intermediate per cluster, leaf certificates per role,
//! rotation with overlap and retirement of old roots.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use mesh_model::{ClusterId, ClusterName};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::bundle::TrustBundle;
use crate::error::{Error, Result};
use crate::files;
use crate::inspect::{CertInfo, Fingerprint};
use crate::spiffe::{Role, SpiffeId, TrustDomain};

/// How long new certificates live.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Root CA lifetime (default 10 years).
    pub root: Duration,
    /// Intermediate CA lifetime (default 5 years; never beyond the root's end).
    pub intermediate: Duration,
    /// Leaf lifetime (default 1 year; never beyond the intermediate's end).
    pub leaf: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Self {
            root: Duration::days(3650),
            intermediate: Duration::days(1825),
            leaf: Duration::days(365),
        }
    }
}

/// Certificates start this long before "now", so a peer with a slightly slow clock accepts them.
pub(crate) const BACKDATE: Duration = Duration::minutes(5);

// ---------------------------------------------------------------------------------------------
// Subject alternative names
// ---------------------------------------------------------------------------------------------

/// A subject alternative name for a server certificate: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    /// A DNS name (`etcd.east.example`, `*.mesh.local`).
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

impl FromStr for San {
    type Err = Error;
    /// An IP address if it parses as one, else a DNS name (letters, digits, `-`, `.`, a leading `*.`).
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(San::Ip(ip));
        }
        let bad = |reason: &str| {
            Err(Error::BadSan {
                value: s.to_owned(),
                reason: reason.to_owned(),
            })
        };
        let body = s.strip_prefix("*.").unwrap_or(s);
        if body.is_empty() || s.len() > 253 {
            return bad("a DNS name must be 1 to 253 characters");
        }
        for label in body.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("every DNS label must be 1 to 63 characters");
            }
            if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return bad(
                    "not an IP address, and a DNS name may only hold letters, digits, '-' and '.'",
                );
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a DNS label must not start or end with '-'");
            }
        }
        Ok(San::Dns(s.to_ascii_lowercase()))
    }
}

impl San {
    fn to_rcgen(&self) -> Result<SanType> {
        Ok(match self {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(d) => SanType::DnsName(d.as_str().try_into().map_err(|_| Error::BadSan {
                value: d.clone(),
                reason: "not ASCII".to_owned(),
            })?),
        })
    }
}

/// The SANs of a server leaf (`role` is `etcd-server` or `apiserver`): the defaults, the role's CN,
/// the apiserver's in-cluster names, then `extra`.
pub fn server_sans(role: Role, cluster: &ClusterName, extra: &[San]) -> Vec<San> {
    let mut sans = default_server_sans();
    sans.push(San::Dns(role.common_name(cluster)));
    if role == Role::Apiserver {
        sans.push(San::Dns("clustermesh-apiserver".to_owned()));
        sans.push(San::Dns("clustermesh-apiserver.kube-system.svc".to_owned()));
    }
    for s in extra {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

/// The DNS subtrees a cluster's intermediate permits: every DNS name of its server leaves
/// (a wildcard `*.d` permits `d` and below).
pub fn permitted_dns(cluster: &ClusterName, extra: &[San]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for role in [Role::EtcdServer, Role::Apiserver] {
        for s in server_sans(role, cluster, extra) {
            if let San::Dns(d) = s {
                let d = d.strip_prefix("*.").unwrap_or(&d).to_ascii_lowercase();
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// The permitted DNS subtrees of a CA certificate's name constraints; `None` without constraints.
pub fn permitted_dns_of(der: &CertificateDer<'_>) -> Option<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let nc = cert.name_constraints().ok()??;
    let permitted = nc.value.permitted_subtrees.as_ref()?;
    Some(
        permitted
            .iter()
            .filter_map(|s| match &s.base {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
    )
}

/// Whether DNS name `name` lies in the subtree `base` (RFC 5280: `base` itself or below it).
fn dns_within(name: &str, base: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let name = name.strip_prefix("*.").unwrap_or(&name);
    let base = base.trim_start_matches('.');
    name == base || name.ends_with(&format!(".{base}"))
}

/// The SANs every server certificate gets: `localhost`, `127.0.0.1`, `::1`.
pub fn default_server_sans() -> Vec<San> {
    vec![
        San::Dns("localhost".to_owned()),
        San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

// ---------------------------------------------------------------------------------------------
// CA directory
// ---------------------------------------------------------------------------------------------

/// The files of a CA directory (see the crate docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaDir {
    /// The directory.
    pub path: PathBuf,
}

impl CaDir {
    /// A CA directory at `path` (nothing is read).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
    /// `trust-domain`: the trust domain, one line.
    pub fn trust_domain_file(&self) -> PathBuf {
        self.path.join("trust-domain")
    }
    /// `root.crt`: the current root CA certificate (the one that signs new intermediates).
    pub fn root_cert(&self) -> PathBuf {
        self.path.join("root.crt")
    }
    /// `root.key`: its private key (mode 0600).
    pub fn root_key(&self) -> PathBuf {
        self.path.join("root.key")
    }
    /// `ca-bundle.pem`: every root the mesh trusts (current first, then not-yet-retired old roots,
    /// then federated roots of other meshes).
    pub fn bundle(&self) -> PathBuf {
        self.path.join("ca-bundle.pem")
    }
    /// `previous/`: old roots kept after a rotation (`root-<fingerprint12>.{crt,key}`).
    pub fn previous_dir(&self) -> PathBuf {
        self.path.join("previous")
    }
}

/// The result of a root rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The root that signed until now (still in the bundle).
    pub old: Fingerprint,
    /// The new current root.
    pub new: Fingerprint,
    /// Every root the bundle now holds.
    pub bundle: Vec<Fingerprint>,
}

/// A loaded root CA, able to issue cluster intermediates.
pub struct RootCa {
    dir: CaDir,
    trust_domain: TrustDomain,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    info: CertInfo,
    key: KeyPair,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.info.fingerprint.to_string())
            .finish_non_exhaustive()
    }
}

impl RootCa {
    /// Create a new CA in `dir`: a fresh root key and self-signed certificate, and a bundle holding it.
    /// Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, trust_domain: &TrustDomain, validity: &Validity) -> Result<Self> {
        let ca = CaDir::new(dir);
        if ca.root_key().exists() {
            return Err(Error::NotADirectoryOf {
                what: "new CA",
                path: dir.to_owned(),
                detail: format!(
                    "{} already exists; refusing to overwrite a CA (use `ca rotate` to replace its root)",
                    ca.root_key().display()
                ),
            });
        }
        let (cert_pem, key_pem) = new_root(trust_domain, validity)?;
        files::write_atomic(
            &ca.trust_domain_file(),
            format!("{trust_domain}\n").as_bytes(),
            false,
        )?;
        files::write_atomic(&ca.root_key(), key_pem.as_bytes(), true)?;
        files::write_atomic(&ca.root_cert(), cert_pem.as_bytes(), false)?;
        files::write_atomic(&ca.bundle(), cert_pem.as_bytes(), false)?;
        tracing::info!(dir = %dir.display(), %trust_domain, "created mesh root CA");
        Self::load(dir)
    }

    /// Load the CA of `dir`, checking that the key belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Self> {
        let ca = CaDir::new(dir);
        let td_text = files::read(&ca.trust_domain_file(), "trust domain file")?;
        let trust_domain = TrustDomain::new(String::from_utf8_lossy(&td_text).trim())?;
        let chain = files::KeyedChain::load(&ca.root_cert(), &ca.root_key())?;
        let cert_der = chain.chain[0].clone();
        let info = CertInfo::from_der(&ca.root_cert(), &cert_der)?;
        if !info.is_ca {
            return Err(Error::NotACa {
                path: ca.root_cert(),
            });
        }
        let key_pem = files::read(&ca.root_key(), "private key file")?;
        let key =
            KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| Error::BadKey {
                path: ca.root_key(),
                detail: e.to_string(),
            })?;
        let cert_pem = pem_of(&cert_der);
        Ok(Self {
            dir: ca,
            trust_domain,
            cert_pem,
            cert_der,
            info,
            key,
        })
    }

    /// The CA directory.
    pub fn dir(&self) -> &CaDir {
        &self.dir
    }
    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    /// SHA-256 fingerprint of the current root certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint
    }
    /// Facts of the current root certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issue (or re-issue) a cluster: a new intermediate CA signed by the current root, every leaf of
    /// [`Role::LEAVES`], the CA bundle and `cluster.json`, written into `req.out`.
    pub fn issue_cluster(&self, req: &ClusterRequest) -> Result<ClusterDir> {
        let now = OffsetDateTime::now_utc();
        let cluster = &req.cluster;
        if let Ok(existing) = ClusterDir::open(&req.out)
            && existing.info.name != *cluster
        {
            return Err(Error::NotADirectoryOf {
                what: "cluster certificate",
                path: req.out.clone(),
                detail: format!(
                    "it holds cluster {}; refusing to overwrite it with cluster {cluster} \
                     (re-issuing is only allowed for the same cluster)",
                    existing.info.name
                ),
            });
        }
        let mut params = base_params(
            &format!(
                "{} {}",
                Role::Intermediate.common_name(cluster),
                generation_tag()
            ),
            &SpiffeId::for_cluster(&self.trust_domain, cluster, Role::Intermediate),
            now,
            (now + req.validity.intermediate).min(self.info.not_after),
        )?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The intermediate may only vouch for its own cluster's server names (etcd's Go verifier
        // and rustls-webpki enforce DNS constraints; URI constraints cannot express a SPIFFE path
        // and webpki rejects them, so the cluster of a SPIFFE id is checked in code instead:
        // `tls::check_cluster_identity`). IP addresses stay unconstrained (etcd members, node
        // ports and load balancers get addresses after the cluster is issued).
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted_dns(cluster, &req.sans)
                .into_iter()
                .map(GeneralSubtree::DnsName)
                .collect(),
            excluded_subtrees: Vec::new(),
        });
        let key = KeyPair::generate().map_err(|e| issue_err("intermediate key", e))?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| issue_err("root issuer", e))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| issue_err(format!("intermediate CA of {cluster}"), e))?;

        // The intermediate this re-issue replaces stays in client-ca.pem (clients holding its
        // leaves, e.g. other clusters' nodes with this cluster's remote certificate, keep working
        // until they get the new ones); an expired one is dropped.
        let previous = files::load_certs(&req.out.join("intermediate.crt"))
            .ok()
            .and_then(|c| c.into_iter().next())
            .filter(|c| {
                CertInfo::from_der(&req.out, c)
                    .is_ok_and(|i| i.check_valid_at(&req.out, now).is_ok())
            });
        let dir = ClusterDir {
            path: req.out.clone(),
            info: ClusterInfo {
                name: cluster.clone(),
                id: req.id,
                trust_domain: self.trust_domain.to_string(),
            },
        };
        std::fs::create_dir_all(&dir.path)
            .map_err(|e| Error::io("creating directory", &dir.path, e))?;
        files::write_atomic(
            &dir.key(Role::Intermediate),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        files::write_atomic(&dir.cert(Role::Intermediate), cert.pem().as_bytes(), false)?;
        let mut client_ca = cert.pem();
        if let Some(prev) = previous {
            client_ca.push_str(&pem_of(&prev));
        }
        files::write_atomic(&dir.client_ca(), client_ca.as_bytes(), false)?;
        let bundle = files::read(&self.dir.bundle(), "CA bundle")?;
        files::write_atomic(&dir.ca_bundle(), &bundle, false)?;
        let json = serde_json::to_vec_pretty(&dir.info).unwrap_or_default();
        files::write_atomic(&dir.info_file(), &json, false)?;

        let opts = LeafOptions {
            validity: req.validity.leaf,
            extra_sans: req.sans.clone(),
            ..LeafOptions::default()
        };
        for role in Role::LEAVES {
            dir.issue_leaf(role, &opts)?;
        }
        tracing::info!(cluster = %cluster, dir = %dir.path.display(), "issued cluster certificates");
        Ok(dir)
    }

    /// Rotate the root of the CA in `dir`: a new root becomes current, the old one moves to
    /// `previous/` and stays in the bundle (overlap) until [`RootCa::retire`] removes it.
    /// Clusters issued before keep working as long as their peers' bundles hold the old root.
    pub fn rotate(dir: &Path, validity: &Validity) -> Result<Rotation> {
        let old = Self::load(dir)?;
        let ca = &old.dir;
        let (cert_pem, key_pem) = new_root(&old.trust_domain, validity)?;
        let prev = ca.previous_dir();
        let stem = format!("root-{}", old.fingerprint().short());
        files::write_atomic(
            &prev.join(format!("{stem}.crt")),
            old.cert_pem.as_bytes(),
            false,
        )?;
        let old_key = files::read(&ca.root_key(), "private key file")?;
        files::write_atomic(&prev.join(format!("{stem}.key")), &old_key, true)?;

        let mut bundle = TrustBundle::load(&ca.bundle())?;
        let new_der = files::parse_certs(&ca.root_cert(), cert_pem.as_bytes())?.remove(0);
        bundle.insert_first(new_der.clone());
        files::write_atomic(&ca.root_key(), key_pem.as_bytes(), true)?;
        files::write_atomic(&ca.root_cert(), cert_pem.as_bytes(), false)?;
        bundle.save(&ca.bundle())?;
        let rotation = Rotation {
            old: old.fingerprint(),
            new: Fingerprint::of(&new_der),
            bundle: bundle.fingerprints(),
        };
        tracing::info!(old = %rotation.old.short(), new = %rotation.new.short(), "rotated mesh root CA");
        Ok(rotation)
    }

    /// Remove old roots from the bundle of the CA in `dir`: the one whose fingerprint starts with
    /// `which`, or every root but the current one when `which` is `None`. The current root can not
    /// be retired. Returns the fingerprints removed.
    pub fn retire(dir: &Path, which: Option<&str>) -> Result<Vec<Fingerprint>> {
        let root = Self::load(dir)?;
        let path = root.dir.bundle();
        let mut bundle = TrustBundle::load(&path)?;
        let current = root.fingerprint();
        let victims: Vec<Fingerprint> = match which {
            None => bundle
                .fingerprints()
                .into_iter()
                .filter(|fp| *fp != current && previous_root_exists(&root.dir, fp))
                .collect(),
            Some(prefix) => {
                let hits: Vec<Fingerprint> = bundle
                    .fingerprints()
                    .into_iter()
                    .filter(|fp| fp.matches_prefix(prefix))
                    .collect();
                if hits.is_empty() {
                    return Err(Error::Bundle {
                        path,
                        detail: format!("no CA with a fingerprint starting with {prefix:?}"),
                    });
                }
                if hits.len() > 1 {
                    return Err(Error::Bundle {
                        path,
                        detail: format!("{prefix:?} matches {} CAs; give more digits", hits.len()),
                    });
                }
                hits
            }
        };
        if victims.contains(&current) {
            return Err(Error::Bundle {
                path,
                detail: format!(
                    "refusing to retire the current root {} (it signs new clusters); rotate first",
                    current.short()
                ),
            });
        }
        for fp in &victims {
            bundle.remove(fp);
        }
        bundle.save(&path)?;
        Ok(victims)
    }
}

fn previous_root_exists(ca: &CaDir, fp: &Fingerprint) -> bool {
    ca.previous_dir()
        .join(format!("root-{}.crt", fp.short()))
        .exists()
}

fn new_root(td: &TrustDomain, validity: &Validity) -> Result<(String, String)> {
    let now = OffsetDateTime::now_utc();
    let mut params = base_params(
        &format!("clustermesh root CA {td} {}", generation_tag()),
        &SpiffeId::for_root_ca(td),
        now,
        now + validity.root,
    )?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = false;
    let key = KeyPair::generate().map_err(|e| issue_err("root key", e))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| issue_err(format!("root CA of {td}"), e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A short random tag that keeps the subject of every CA unique: two CAs with one subject
/// (a root rotated within a second, a cluster re-issued) would make verifiers try the wrong key.
fn generation_tag() -> String {
    let tag: [u8; 3] = rand::random();
    format!("#{}", hex::encode(tag))
}

fn base_params(
    cn: &str,
    spiffe: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = not_before - BACKDATE;
    params.not_after = not_after;
    let uri = spiffe
        .to_string()
        .try_into()
        .map_err(|e| issue_err(format!("SPIFFE URI {spiffe}"), e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.use_authority_key_identifier_extension = true;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

fn issue_err(what: impl Into<String>, source: rcgen::Error) -> Error {
    Error::Issue {
        what: what.into(),
        source,
    }
}

/// PEM text of a DER certificate.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    let b64 = base64_encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------------------------
// Cluster directory
// ---------------------------------------------------------------------------------------------

/// What to issue for one cluster.
#[derive(Debug, Clone)]
pub struct ClusterRequest {
    /// The cluster's name (validated).
    pub cluster: ClusterName,
    /// The cluster's id.
    pub id: ClusterId,
    /// The directory to write.
    pub out: PathBuf,
    /// Extra SANs for the server certificates (besides the defaults).
    pub sans: Vec<San>,
    /// Lifetimes.
    pub validity: Validity,
}

impl ClusterRequest {
    /// Validate a cluster name and id (maxConnectedClusters 255) for output directory `out`,
    /// with the default SANs and lifetimes.
    pub fn new(name: &str, id: u32, out: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self {
            cluster: ClusterName::new(name)?,
            id: ClusterId::new(id, mesh_model::MaxConnectedClusters::DEFAULT)?,
            out: out.into(),
            sans: Vec::new(),
            validity: Validity::default(),
        })
    }
}

/// `cluster.json`: who the cluster directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// Cluster name.
    pub name: ClusterName,
    /// Cluster id.
    pub id: ClusterId,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

/// Options for one leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// Lifetime from now (ignored when `not_before`/`not_after` are set).
    pub validity: Duration,
    /// Explicit start of validity (tests use it to make expired certificates).
    pub not_before: Option<OffsetDateTime>,
    /// Explicit end of validity.
    pub not_after: Option<OffsetDateTime>,
    /// Extra SANs for server roles.
    pub extra_sans: Vec<San>,
    /// Write to these paths instead of the role's files in the cluster directory.
    pub out: Option<CertKeyPaths>,
}

impl Default for LeafOptions {
    fn default() -> Self {
        Self {
            validity: Validity::default().leaf,
            not_before: None,
            not_after: None,
            extra_sans: Vec::new(),
            out: None,
        }
    }
}

/// A certificate file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// Certificate chain (leaf first, then the intermediate), PEM.
    pub cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub key: PathBuf,
}

/// The TLS files one party uses: the CA bundle it trusts, and optionally its own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Roots to verify the peer with.
    pub ca_bundle: PathBuf,
    /// Our certificate and key (`None`: present no certificate).
    pub identity: Option<CertKeyPaths>,
}

/// A cluster certificate directory (see the crate docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDir {
    /// The directory.
    pub path: PathBuf,
    /// Contents of `cluster.json`.
    pub info: ClusterInfo,
}

impl ClusterDir {
    /// Open a cluster directory written by [`RootCa::issue_cluster`].
    pub fn open(path: &Path) -> Result<Self> {
        let info_file = path.join("cluster.json");
        if !path.is_dir() {
            return Err(Error::MissingFile {
                what: "cluster certificate directory",
                path: path.to_owned(),
            });
        }
        let raw = files::read(
            &info_file,
            "cluster description (written by `clustermesh ca issue-cluster`)",
        )?;
        let info: ClusterInfo =
            serde_json::from_slice(&raw).map_err(|e| Error::NotADirectoryOf {
                what: "cluster certificate",
                path: path.to_owned(),
                detail: format!("{}: {e}", info_file.display()),
            })?;
        Ok(Self {
            path: path.to_owned(),
            info,
        })
    }

    /// Whether `path` holds a cluster directory (its `cluster.json`), without reading it: for programs
    /// that accept either this layout or a Kubernetes TLS secret (`ca.crt`, `tls.crt`, `tls.key`).
    pub fn is_cluster_dir(path: &Path) -> bool {
        path.join("cluster.json").is_file()
    }

    /// The TLS files of `role` in the cluster directory at `path`, without reading anything (so the
    /// layout is spelled in one place; a missing file is reported when it is used).
    ///
    /// A role whose file name changed ([`Role::legacy_file_stem`]) is read under its old name when
    /// only that exists (a directory written by an older release, or a Secret mounted that way).
    pub fn tls_files_at(path: &Path, role: Role) -> TlsFiles {
        let at = |stem: &str| CertKeyPaths {
            cert: path.join(format!("{stem}.crt")),
            key: path.join(format!("{stem}.key")),
        };
        let mut identity = at(role.file_stem());
        if let Some(old) = role.legacy_file_stem().map(at)
            && !identity.cert.exists()
            && old.cert.exists()
        {
            identity = old;
        }
        TlsFiles {
            ca_bundle: path.join("ca-bundle.pem"),
            identity: Some(identity),
        }
    }

    /// `cluster.json`.
    pub fn info_file(&self) -> PathBuf {
        self.path.join("cluster.json")
    }
    /// `client-ca.pem`: the cluster's own intermediate(s), what its etcd trusts for clients with
    /// `ClientTrust::Cluster` (after a re-issue: the new one and the one before, until the next).
    pub fn client_ca(&self) -> PathBuf {
        self.path.join("client-ca.pem")
    }
    /// `ca-bundle.pem`: the roots this cluster trusts.
    pub fn ca_bundle(&self) -> PathBuf {
        Self::tls_files_at(&self.path, Role::Admin).ca_bundle
    }
    /// `<role>.crt`: leaf first, then the intermediate (for [`Role::Intermediate`]: the intermediate alone).
    pub fn cert(&self, role: Role) -> PathBuf {
        self.cert_key(role).cert
    }
    /// `<role>.key`: PKCS#8 PEM, mode 0600.
    pub fn key(&self, role: Role) -> PathBuf {
        self.cert_key(role).key
    }
    /// Certificate and key paths of a role.
    pub fn cert_key(&self, role: Role) -> CertKeyPaths {
        self.tls_files(role)
            .identity
            .unwrap_or_else(|| unreachable!("tls_files_at always names an identity"))
    }
    /// The TLS files of a role: this cluster's bundle plus the role's certificate.
    pub fn tls_files(&self, role: Role) -> TlsFiles {
        Self::tls_files_at(&self.path, role)
    }
    /// The etcd user name of a client role in this cluster.
    pub fn etcd_user(&self, role: Role) -> String {
        crate::spiffe::etcd_user(role, &self.info.name)
    }

    /// Issue one leaf certificate of `role` with the cluster's intermediate (a new key).
    pub fn issue_leaf(&self, role: Role, opts: &LeafOptions) -> Result<CertKeyPaths> {
        if role == Role::Intermediate {
            return Err(issue_err("a leaf", rcgen::Error::UnsupportedExtension));
        }
        let cluster = &self.info.name;
        let now = OffsetDateTime::now_utc();
        let inter_end = self.intermediate_info()?.not_after;
        let not_after = opts
            .not_after
            .unwrap_or((now + opts.validity).min(inter_end));
        let sans = if role.is_server() {
            server_sans(role, cluster, &opts.extra_sans)
        } else {
            Vec::new()
        };
        self.check_name_constraints(role, &sans)?;
        let key = KeyPair::generate().map_err(|e| issue_err("leaf key", e))?;
        let chain_pem = self.sign_leaf(
            role,
            opts.not_before.unwrap_or(now - BACKDATE),
            not_after,
            &sans,
            &key,
        )?;
        let paths = opts.out.clone().unwrap_or_else(|| CertKeyPaths {
            cert: self.path.join(format!("{}.crt", role.file_stem())),
            key: self.path.join(format!("{}.key", role.file_stem())),
        });
        files::write_atomic(&paths.key, key.serialize_pem().as_bytes(), true)?;
        files::write_atomic(&paths.cert, chain_pem.as_bytes(), false)?;
        if opts.out.is_none()
            && let Some(old) = role.legacy_file_stem()
        {
            // Written under the new name: the old files would only mislead (and be read by nobody).
            for ext in ["crt", "key"] {
                let _ = std::fs::remove_file(self.path.join(format!("{old}.{ext}")));
            }
        }
        Ok(paths)
    }

    /// Refuse DNS names the intermediate's name constraints do not permit (a certificate carrying
    /// one would be refused by every verifier; better said now, naming the name).
    pub(crate) fn check_name_constraints(&self, role: Role, sans: &[San]) -> Result<()> {
        let path = self.cert(Role::Intermediate);
        let chain = files::load_certs(&path)?;
        let Some(permitted) = permitted_dns_of(&chain[0]) else {
            return Ok(());
        };
        for s in sans {
            if let San::Dns(name) = s
                && !permitted.iter().any(|p| dns_within(name, p))
            {
                return Err(Error::OutsideNameConstraints {
                    role: role.to_string(),
                    cluster: self.info.name.to_string(),
                    name: name.clone(),
                    intermediate: path,
                    permitted: permitted.join(", "),
                });
            }
        }
        Ok(())
    }

    /// Facts of the cluster's intermediate CA certificate.
    pub fn intermediate_info(&self) -> Result<CertInfo> {
        let path = self.cert(Role::Intermediate);
        let chain = files::load_certs(&path)?;
        CertInfo::from_der(&path, &chain[0])
    }

    /// Sign a leaf of `role` for `key` (its public half) with the cluster's intermediate: the
    /// role's CN, SPIFFE id and key usages, `sans` (server roles), valid from `not_before` to
    /// `not_after`. Returns the chain (leaf, then intermediate) as PEM.
    pub(crate) fn sign_leaf(
        &self,
        role: Role,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        sans: &[San],
        key: &KeyPair,
    ) -> Result<String> {
        let td = TrustDomain::new(&self.info.trust_domain)?;
        let cluster = &self.info.name;
        self.sign_for_key(
            &role.common_name(cluster),
            &SpiffeId::for_cluster(&td, cluster, role),
            role,
            not_before,
            not_after,
            sans,
            key,
            &format!("{role} certificate of {cluster}"),
        )
    }

    /// Sign a certificate with the cluster's intermediate for any public key: `cn` and `spiffe`
    /// name it, `role` gives its key usages. Returns the chain (leaf, then intermediate) as PEM.
    #[allow(clippy::too_many_arguments)]
    fn sign_for_key(
        &self,
        cn: &str,
        spiffe: &SpiffeId,
        role: Role,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        sans: &[San],
        key: &impl rcgen::PublicKeyData,
        what: &str,
    ) -> Result<String> {
        let inter_path = self.cert(Role::Intermediate);
        let inter = files::KeyedChain::load(&inter_path, &self.key(Role::Intermediate))?;
        let mut params = base_params(cn, spiffe, not_before + BACKDATE, not_after)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::EtcdServer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Apiserver => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        for s in sans {
            params.subject_alt_names.push(s.to_rcgen()?);
        }
        let key_pem = files::read(&self.key(Role::Intermediate), "private key file")?;
        let inter_key =
            KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| Error::BadKey {
                path: self.key(Role::Intermediate),
                detail: e.to_string(),
            })?;
        let issuer = Issuer::from_ca_cert_der(&inter.chain[0], &inter_key)
            .map_err(|e| issue_err("intermediate issuer", e))?;
        let cert = params
            .signed_by(key, &issuer)
            .map_err(|e| issue_err(what, e))?;
        Ok(format!("{}{}", cert.pem(), pem_of(&inter.chain[0])))
    }

    /// True when this directory holds the intermediate's key, so it can issue certificates
    /// (a component's mounted Secret usually does not).
    pub fn can_issue(&self) -> bool {
        self.key(Role::Intermediate).exists() && self.cert(Role::Intermediate).exists()
    }

    /// Issue the credential with which cluster `peer`'s node-syncs read this cluster's etcd
    /// (the gRPC `connect`): CN `remote-<peer>` (the etcd user `mesh_etcd::add_remote_user`
    /// creates), SPIFFE id `spiffe://<our trust domain>/cluster/<peer>/remote`, for the public key
    /// of `peer_cert_pem` (the peer's own `remote` certificate; only its key is used, the private
    /// key never leaves the peer), signed by this cluster's intermediate. So this cluster's etcd
    /// can trust only its own intermediate for clients (`ClientTrust::Cluster`) and still be read
    /// by its peers, and `disconnect` revokes the peer by deleting the user.
    ///
    /// It lives as long as the intermediate that signs it: it is renewed when the intermediate
    /// is (a re-issue is followed by `connect` again), and its expiry is exported where it is used.
    /// Returns the chain (certificate, then intermediate) as PEM.
    pub fn issue_remote_reader(&self, peer: &ClusterName, peer_cert_pem: &[u8]) -> Result<String> {
        let what = format!("remote certificate of cluster {peer}");
        let path = PathBuf::from(format!("<{what}>"));
        let certs = files::parse_certs(&path, peer_cert_pem)?;
        let spki = files::cert_spki(&path, &certs[0])?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(&spki).map_err(|e| issue_err(&what, e))?;
        let now = OffsetDateTime::now_utc();
        let inter = self.intermediate_info()?;
        inter.check_valid_at(&self.cert(Role::Intermediate), now)?;
        let td = TrustDomain::new(&self.info.trust_domain)?;
        self.sign_for_key(
            &Role::Remote.common_name(peer),
            &SpiffeId::for_cluster(&td, peer, Role::Remote),
            Role::Remote,
            now - BACKDATE,
            inter.not_after,
            &[],
            &key,
            &format!("reader certificate of {peer} for {}", self.info.name),
        )
    }

    /// SHA-256 fingerprints (hex) of the roots this cluster trusts, for `cluster-config`'s
    /// `caFingerprints` and for trust checks before connecting clusters.
    pub fn ca_fingerprints(&self) -> Result<Vec<String>> {
        Ok(TrustBundle::load(&self.ca_bundle())?
            .fingerprints()
            .iter()
            .map(Fingerprint::hex)
            .collect())
    }

    /// Replace this cluster's `ca-bundle.pem` with the CA directory's current bundle
    /// (after a rotation or retirement).
    ///
    /// `client-ca.pem` follows: an intermediate kept there from before a re-issue whose root is
    /// no longer in the bundle (retired) is dropped, so an etcd on `ClientTrust::Cluster` stops
    /// accepting the leaves it signed at its next start, as one on the bundle does. The current
    /// intermediate always stays. Returns the subjects of the intermediates dropped.
    pub fn sync_bundle(&self, ca: &CaDir) -> Result<Vec<String>> {
        let bundle = TrustBundle::load(&ca.bundle())?;
        bundle.save(&self.ca_bundle())?;
        self.prune_client_ca(&bundle)
    }

    fn prune_client_ca(&self, bundle: &TrustBundle) -> Result<Vec<String>> {
        let path = self.client_ca();
        if !path.is_file() {
            return Ok(Vec::new());
        }
        let subject = |der: &CertificateDer<'_>| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, x)| (x.subject().as_raw().to_vec(), x.issuer().as_raw().to_vec()))
                .ok()
        };
        let roots: Vec<Vec<u8>> = bundle
            .certs()
            .iter()
            .filter_map(|r| subject(r).map(|(s, _)| s))
            .collect();
        let current = files::load_certs(&self.cert(Role::Intermediate))?
            .into_iter()
            .next();
        let (mut keep, mut dropped) = (String::new(), Vec::new());
        for c in files::load_certs(&path)? {
            let chains = subject(&c).is_some_and(|(_, issuer)| roots.contains(&issuer));
            if chains || current.as_ref() == Some(&c) {
                keep.push_str(&pem_of(&c));
            } else {
                dropped.push(
                    CertInfo::from_der(&path, &c)
                        .map(|i| i.subject)
                        .unwrap_or_else(|_| "an unparsable certificate".to_owned()),
                );
            }
        }
        if !dropped.is_empty() {
            files::write_atomic(&path, keep.as_bytes(), false)?;
            tracing::info!(file = %path.display(), ?dropped, "dropped intermediates of retired roots from the etcd client trust");
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_parse_or_name_the_rule() {
        assert_eq!(
            "10.0.0.1".parse::<San>().unwrap(),
            San::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            "::1".parse::<San>().unwrap(),
            San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(
            "Etcd.East".parse::<San>().unwrap(),
            San::Dns("etcd.east".into())
        );
        assert!("*.mesh.local".parse::<San>().is_ok());
        let e = "bad_name".parse::<San>().unwrap_err().to_string();
        assert!(e.contains("bad_name") && e.contains("DNS name"), "{e}");
        assert!("-x.y".parse::<San>().is_err());
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
