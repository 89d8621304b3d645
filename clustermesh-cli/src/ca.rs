//! `clustermesh ca ...` and `clustermesh certs ...`: the mesh CA and certificate inspection,
//! thin shells over `mesh-certs`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use mesh_certs::{
    CaDir, CertInfo, ClusterDir, ClusterRequest, RenewWhen, Role, RootCa, San, TrustBundle,
    TrustDomain, Validity,
};
use time::{Duration, OffsetDateTime};

/// Manage the mesh certificate authority.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new mesh CA: a root certificate and key for one trust domain, and a trust bundle.
    ///
    /// Writes DIR/trust-domain, DIR/root.crt, DIR/root.key (mode 0600) and DIR/ca-bundle.pem.
    /// Refuses to overwrite an existing CA.
    Init(InitArgs),
    /// Issue (or re-issue) the certificates of one cluster, signed by the CA's current root.
    ///
    /// Writes OUT/cluster.json, OUT/ca-bundle.pem, the cluster's intermediate CA
    /// (OUT/intermediate.{crt,key}) and one certificate + key per role: etcd-server, apiserver,
    /// etcd-root (etcd's root user; not a CA), admin (admin-<cluster>), node (node-<cluster>) and remote
    /// (remote-<cluster>). Server certificates get the SANs localhost, 127.0.0.1, ::1 and every --san.
    IssueCluster(IssueClusterArgs),
    /// Start a root rotation: a new root becomes current, the old one stays in the bundle.
    ///
    /// While the bundle holds both roots, certificates of either are accepted. Then re-issue every
    /// cluster (`ca issue-cluster` again), push the bundle to the clusters (--cluster-dir), restart
    /// etcd (etcd 3.4 reads its CA file at start only), and finally `ca retire`.
    Rotate(RotateArgs),
    /// Finish a rotation: remove old roots from the bundle, so their certificates are refused.
    ///
    /// Without --fingerprint, removes every root replaced by `ca rotate`; federated roots stay.
    /// The current root can not be retired.
    Retire(RetireArgs),
    /// Trust the roots of another mesh (federation without a shared root): add them to the bundle.
    Federate(FederateArgs),
    /// Renew a cluster's leaf certificates in place, from its intermediate, before they expire.
    ///
    /// A renewed leaf keeps its key, SANs, identity and lifetime; only the .crt file is replaced
    /// (atomically, keeping its mode and owner), so etcd, the apiserver and node-sync pick it up
    /// on their next handshake without a restart. Renews the leaves that are due: less than a
    /// third of their lifetime left (--within changes that, --force renews all); prints one line
    /// per leaf. Run it periodically (the chart's CronJob does); it needs the cluster's
    /// intermediate.{crt,key} and the leaves' keys, and renews whichever leaves the directory holds.
    Renew(RenewArgs),
}

/// Arguments of `ca renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The cluster directory (made by `ca issue-cluster`).
    #[arg(
        long = "cluster-dir",
        value_name = "DIR",
        env = "CLUSTERMESH_CLUSTER_DIR"
    )]
    pub cluster_dir: PathBuf,
    /// Renew leaves with less than this left (e.g. 30d, 40s) instead of a third of their lifetime.
    #[arg(long, value_parser = mesh_logging::parse_duration, conflicts_with = "force")]
    pub within: Option<std::time::Duration>,
    /// Renew every leaf now.
    #[arg(long)]
    pub force: bool,
    /// Lifetime of the renewed leaves (e.g. 365d); default: each leaf's own lifetime.
    #[arg(long, value_parser = mesh_logging::parse_duration)]
    pub lifetime: Option<std::time::Duration>,
}

/// Work with certificate files.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Show what a certificate file says: kind, subject, issuer, SPIFFE id, SANs, validity and
    /// SHA-256 fingerprint, for every certificate in the file (a chain or a bundle).
    Inspect(InspectArgs),
    /// Check a certificate the way its peer will: it chains to a CA of the bundle, it is valid now,
    /// and (with --key) the key belongs to it. Exits non-zero and says why when it does not.
    Verify(VerifyArgs),
}

/// Arguments of `certs verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The certificate file (leaf first, then intermediates, as `issue-cluster` writes them).
    pub cert: PathBuf,
    /// The CA bundle the peer trusts, e.g. the other cluster's ca-bundle.pem.
    #[arg(long)]
    pub bundle: PathBuf,
    /// The private key that should belong to the certificate.
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// Arguments of `ca init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The mesh's trust domain (SPIFFE): lowercase letters, digits, '.', '-', '_'. Example: mesh.example.org
    #[arg(long, env = "CLUSTERMESH_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Directory to create the CA in.
    #[arg(long, env = "CLUSTERMESH_CA_DIR")]
    pub out: PathBuf,
    /// Lifetime of the root certificate, in days.
    #[arg(long, default_value_t = 3650)]
    pub root_days: i64,
}

/// Arguments of `ca issue-cluster`.
#[derive(Debug, Args)]
pub struct IssueClusterArgs {
    /// The CA directory made by `ca init`.
    #[arg(long, env = "CLUSTERMESH_CA_DIR")]
    pub ca: PathBuf,
    /// Cluster name: 1-32 characters of lowercase letters, digits and '-', not "default".
    #[arg(long)]
    pub cluster: String,
    /// Cluster id, 1..=255.
    #[arg(long)]
    pub id: u32,
    /// Directory to write the cluster's certificates to (created if missing; files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Extra subject alternative name for the server certificates (etcd, apiserver): a DNS name or
    /// an IP address. Repeat for several.
    #[arg(long = "san", value_name = "DNS|IP")]
    pub sans: Vec<String>,
    /// Lifetime of the leaf certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
}

/// Arguments of `ca rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The CA directory.
    #[arg(long, env = "CLUSTERMESH_CA_DIR")]
    pub ca: PathBuf,
    /// Cluster directory whose ca-bundle.pem gets the new bundle (repeat for several).
    #[arg(long = "cluster-dir", value_name = "DIR")]
    pub cluster_dirs: Vec<PathBuf>,
    /// Lifetime of the new root, in days.
    #[arg(long, default_value_t = 3650)]
    pub root_days: i64,
}

/// Arguments of `ca retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The CA directory.
    #[arg(long, env = "CLUSTERMESH_CA_DIR")]
    pub ca: PathBuf,
    /// Retire only the CA whose SHA-256 fingerprint starts with this (hex, colons allowed).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Cluster directory whose ca-bundle.pem gets the new bundle (repeat for several).
    #[arg(long = "cluster-dir", value_name = "DIR")]
    pub cluster_dirs: Vec<PathBuf>,
}

/// Arguments of `ca federate`.
#[derive(Debug, Args)]
pub struct FederateArgs {
    /// The CA directory.
    #[arg(long, env = "CLUSTERMESH_CA_DIR")]
    pub ca: PathBuf,
    /// The other mesh's root certificate or bundle (PEM), e.g. its CA's ca-bundle.pem.
    #[arg(long, value_name = "FILE")]
    pub peer_bundle: PathBuf,
    /// Cluster directory whose ca-bundle.pem gets the new bundle (repeat for several).
    #[arg(long = "cluster-dir", value_name = "DIR")]
    pub cluster_dirs: Vec<PathBuf>,
}

/// Arguments of `certs inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A PEM file holding one or more certificates.
    pub file: PathBuf,
}

/// Run a `ca` subcommand.
pub fn run_ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Init(a) => init(a),
        CaCommand::IssueCluster(a) => issue_cluster(a),
        CaCommand::Rotate(a) => rotate(a),
        CaCommand::Retire(a) => retire(a),
        CaCommand::Federate(a) => federate(a),
        CaCommand::Renew(a) => renew(a),
    }
}

/// Run a `certs` subcommand.
pub fn run_certs(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Inspect(a) => inspect(a),
        CertsCommand::Verify(a) => verify(a),
    }
}

fn renew(a: RenewArgs) -> Result<()> {
    let dir = ClusterDir::open(&a.cluster_dir)?;
    let to_time = |d: std::time::Duration, flag: &str| -> Result<Duration> {
        Duration::try_from(d).with_context(|| format!("{flag} is too long"))
    };
    let when = match (a.force, a.within) {
        (true, _) => RenewWhen::Now,
        (false, Some(d)) => RenewWhen::Within(to_time(d, "--within")?),
        (false, None) => RenewWhen::LastThird,
    };
    let lifetime = a.lifetime.map(|d| to_time(d, "--lifetime")).transpose()?;
    let done = dir
        .renew(when, lifetime)
        .with_context(|| format!("renewing the leaves of {}", a.cluster_dir.display()))?;
    if done.is_empty() {
        bail!(
            "{} holds no leaf certificate to renew",
            a.cluster_dir.display()
        );
    }
    let renewed = done.iter().filter(|r| r.renewed).count();
    for r in &done {
        let (verb, then) = if r.renewed {
            ("renewed", format!("(was {})", date(r.was_not_after)))
        } else {
            ("kept   ", format!("due {}", date(r.due_at)))
        };
        println!(
            "{verb} {:<12} {}  valid until {} {then}",
            r.role.as_str(),
            r.cert.display(),
            date(r.not_after),
        );
    }
    println!(
        "{renewed} of {} leaves of cluster {} renewed",
        done.len(),
        dir.info.name
    );
    Ok(())
}

fn days(n: i64, flag: &str) -> Result<Duration> {
    if n <= 0 {
        bail!("{flag} must be at least 1 (got {n})");
    }
    Ok(Duration::days(n))
}

fn init(a: InitArgs) -> Result<()> {
    let td = TrustDomain::new(&a.trust_domain)?;
    let validity = Validity {
        root: days(a.root_days, "--root-days")?,
        ..Validity::default()
    };
    let ca = RootCa::init(&a.out, &td, &validity)
        .with_context(|| format!("creating the mesh CA in {}", a.out.display()))?;
    let dir = ca.dir();
    println!(
        "Created the root CA of trust domain {td} in {}",
        a.out.display()
    );
    println!("  root certificate:    {}", dir.root_cert().display());
    println!(
        "  root key:            {} (keep it secret)",
        dir.root_key().display()
    );
    println!("  trust bundle:        {}", dir.bundle().display());
    println!("  SHA-256 fingerprint: {}", ca.fingerprint());
    println!("  valid until:         {}", date(ca.info().not_after));
    println!();
    println!(
        "Next: clustermesh ca issue-cluster --ca {} --cluster NAME --id N --out DIR",
        a.out.display()
    );
    Ok(())
}

fn issue_cluster(a: IssueClusterArgs) -> Result<()> {
    let ca =
        RootCa::load(&a.ca).with_context(|| format!("loading the CA in {}", a.ca.display()))?;
    let mut req = ClusterRequest::new(&a.cluster, a.id, &a.out)?;
    req.sans = a
        .sans
        .iter()
        .map(|s| s.parse::<San>())
        .collect::<Result<_, _>>()?;
    req.validity.leaf = days(a.days, "--days")?;
    let dir = ca
        .issue_cluster(&req)
        .with_context(|| format!("issuing cluster {} into {}", a.cluster, a.out.display()))?;
    println!(
        "Issued cluster {} (id {}) of trust domain {} into {}",
        dir.info.name,
        dir.info.id.get(),
        ca.trust_domain(),
        dir.path.display()
    );
    let mut rows = vec![[
        "role".to_owned(),
        "identity (CN)".to_owned(),
        "SPIFFE id".to_owned(),
        "certificate".to_owned(),
    ]];
    for role in std::iter::once(Role::Intermediate).chain(Role::LEAVES) {
        let info = &CertInfo::from_pem_file(&dir.cert(role))?[0];
        let cn = if role == Role::Intermediate {
            "(cluster CA)".to_owned()
        } else {
            info.common_name.clone().unwrap_or_default()
        };
        rows.push([
            role.as_str().to_owned(),
            cn,
            info.spiffe_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            dir.cert(role).display().to_string(),
        ]);
    }
    let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    for r in &rows {
        println!("  {:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]);
    }
    let server = &CertInfo::from_pem_file(&dir.cert(Role::EtcdServer))?[0];
    let mut sans = server.dns_names.clone();
    sans.extend(server.ip_addresses.iter().map(ToString::to_string));
    println!("  server SANs:  {}", sans.join(", "));
    println!("  trust bundle: {}", dir.ca_bundle().display());
    println!("  valid until:  {}", date(server.not_after));
    Ok(())
}

fn sync_bundles(ca: &CaDir, dirs: &[PathBuf]) -> Result<()> {
    for d in dirs {
        let cd = ClusterDir::open(d)?;
        let dropped = cd
            .sync_bundle(ca)
            .with_context(|| format!("updating the bundle of {}", d.display()))?;
        println!("  updated {}", cd.ca_bundle().display());
        for subject in dropped {
            println!(
                "  dropped {subject} from {} (its root is retired)",
                cd.client_ca().display()
            );
        }
    }
    Ok(())
}

fn print_bundle(path: &Path, current: &mesh_certs::Fingerprint) -> Result<()> {
    let bundle = TrustBundle::load(path)?;
    println!(
        "Trust bundle {} now holds {} CA(s):",
        path.display(),
        bundle.certs().len()
    );
    for c in bundle.certs() {
        let info = CertInfo::from_der(path, c)?;
        let tag = if info.fingerprint == *current {
            "  (current root)"
        } else {
            ""
        };
        println!("  {}  {}{tag}", info.fingerprint.short(), info.subject);
    }
    Ok(())
}

fn rotate(a: RotateArgs) -> Result<()> {
    let validity = Validity {
        root: days(a.root_days, "--root-days")?,
        ..Validity::default()
    };
    let r = RootCa::rotate(&a.ca, &validity)
        .with_context(|| format!("rotating the root of {}", a.ca.display()))?;
    let ca = CaDir::new(&a.ca);
    println!("Rotated the root CA in {}", a.ca.display());
    println!("  old root: {} (kept in the bundle until retired)", r.old);
    println!("  new root: {} (signs clusters issued from now on)", r.new);
    print_bundle(&ca.bundle(), &r.new)?;
    sync_bundles(&ca, &a.cluster_dirs)?;
    println!();
    println!(
        "Next: re-issue every cluster (clustermesh ca issue-cluster ...), make sure every cluster"
    );
    println!(
        "directory has this bundle (--cluster-dir), restart etcd (it reads its CA file at start),"
    );
    println!("then: clustermesh ca retire --ca {}", a.ca.display());
    Ok(())
}

fn retire(a: RetireArgs) -> Result<()> {
    let removed = RootCa::retire(&a.ca, a.fingerprint.as_deref())
        .with_context(|| format!("retiring old roots of {}", a.ca.display()))?;
    let ca = RootCa::load(&a.ca)?;
    if removed.is_empty() {
        println!("No old root to retire in {}", a.ca.display());
    }
    for fp in &removed {
        println!("Retired root {fp}: certificates chaining to it are refused from now on");
    }
    print_bundle(&ca.dir().bundle(), &ca.fingerprint())?;
    sync_bundles(ca.dir(), &a.cluster_dirs)?;
    if !removed.is_empty() {
        println!();
        println!(
            "Restart etcd in the clusters whose bundle changed (etcd reads its CA file at start)."
        );
    }
    Ok(())
}

fn federate(a: FederateArgs) -> Result<()> {
    let ca = RootCa::load(&a.ca)?;
    let peer = TrustBundle::load(&a.peer_bundle)?;
    let path = ca.dir().bundle();
    let mut bundle = TrustBundle::load(&path)?;
    let before = bundle.certs().len();
    let own = ca.trust_domain().clone();
    for fp in bundle.merge_foreign(&peer, &own) {
        eprintln!(
            "warning: skipped CA {} of {}: it claims this mesh's trust domain {own} but is not one of its roots",
            fp.short(),
            a.peer_bundle.display()
        );
    }
    bundle.save(&path)?;
    println!(
        "Added {} CA(s) from {} to the trust bundle",
        bundle.certs().len() - before,
        a.peer_bundle.display()
    );
    print_bundle(&path, &ca.fingerprint())?;
    sync_bundles(ca.dir(), &a.cluster_dirs)?;
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let infos = CertInfo::from_pem_file(&a.file)?;
    let now = OffsetDateTime::now_utc();
    for (i, info) in infos.iter().enumerate() {
        if infos.len() > 1 {
            println!(
                "Certificate {} of {} in {}:",
                i + 1,
                infos.len(),
                a.file.display()
            );
        } else {
            println!("Certificate in {}:", a.file.display());
        }
        print!("{}", info.describe(now));
        if i + 1 < infos.len() {
            println!();
        }
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let info = &CertInfo::from_pem_file(&a.cert)?[0];
    let bundle = TrustBundle::load(&a.bundle)?;
    let anchor = bundle.verify(&a.bundle, &a.cert)?;
    println!("{}: {}", a.cert.display(), info.kind());
    println!("  subject:      {}", info.subject);
    if let Some(id) = &info.spiffe_id {
        println!("  SPIFFE id:    {id}");
    }
    println!(
        "  trusted:      yes, chains to CA {} in {}",
        anchor.short(),
        a.bundle.display()
    );
    println!("  valid until:  {}", date(info.not_after));
    if let Some(key) = &a.key {
        mesh_certs::files::KeyedChain::load(&a.cert, key)?;
        println!("  key:          {} belongs to it", key.display());
    }
    println!("OK");
    Ok(())
}

fn date(t: OffsetDateTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.format(&fmt).unwrap_or_else(|_| t.to_string())
}
