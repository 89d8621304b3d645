//! Certificate authority, cluster certificates, trust bundles and rustls configs for the mesh.
//!
//! Clusters of a mesh trust each other through certificates this crate issues: a **root CA per
//! mesh** (trust domain), an **intermediate CA per cluster**, and **leaf certificates per role**
//! signed by the intermediate. All keys are ECDSA P-256, stored as PKCS#8 PEM (mode 0600).
//! Every certificate carries a SPIFFE URI SAN, `spiffe://<trust-domain>/cluster/<name>/<role>`
//! (the root: `spiffe://<trust-domain>/ca`). For client certificates the common name (CN) is the
//! etcd user name, because etcd with `--client-cert-auth` takes the user from the CN.
//!
//! | role ([`Role`]) | CN | used by |
//! |---|---|---|
//! | `etcd-server` | `etcd-server.<cluster>` | the cluster's etcd (server + peer; SANs below) |
//! | `apiserver` | `clustermesh-apiserver.<cluster>` | the clustermesh-apiserver gRPC server |
//! | `root` | `root` | etcd's `root` user, only to bootstrap etcd auth (`mesh_etcd::bootstrap_auth`); files `etcd-root.{crt,key}` |
//! | `admin` | `admin-<cluster>` | the apiserver: read-write on its own etcd |
//! | `node` | `node-<cluster>` | the cluster's node-syncs on their own etcd: read `clustermesh/v1/`, write `clustermesh/v1/health/<cluster>/` and `clustermesh/v1/nodestatus/<cluster>/` |
//! | `remote` | `remote-<cluster>` | the cluster's node-syncs on *other* clusters' etcd: read-only `clustermesh/v1/` |
//!
//! Server certificates always get the SANs `localhost`, `127.0.0.1`, `::1` and their CN, plus
//! whatever `--san` adds (DNS names or IP addresses).
//!
//! # On-disk layout
//!
//! A **CA directory** (`clustermesh ca init --trust-domain D --out DIR`):
//!
//! ```text
//! DIR/trust-domain          the trust domain, one line
//! DIR/root.crt              current root CA certificate (signs new cluster intermediates)
//! DIR/root.key              its key (0600)
//! DIR/ca-bundle.pem         every trusted root: current first, then old roots not yet retired,
//!                           then roots of federated meshes
//! DIR/previous/root-<fp12>.{crt,key}   old roots kept after `ca rotate` (fp12 = 12 hex digits of
//!                           the SHA-256 fingerprint)
//! ```
//!
//! A **cluster directory** (`clustermesh ca issue-cluster --ca DIR --cluster NAME --id N --out CDIR`):
//!
//! ```text
//! CDIR/cluster.json         {"name","id","trustDomain"}
//! CDIR/ca-bundle.pem        the roots this cluster trusts (copy of the CA's bundle)
//! CDIR/intermediate.{crt,key}   the cluster's intermediate CA
//! CDIR/client-ca.pem            its own intermediate(s): etcd's client trust with ClientTrust::Cluster
//! CDIR/etcd-server.{crt,key}    \
//! CDIR/apiserver.{crt,key}       |  leaf certificates: `.crt` holds the leaf then the
//! CDIR/etcd-root.{crt,key}       |  intermediate (a full chain for TLS), `.key` the PKCS#8 key
//! CDIR/admin.{crt,key}           |
//! CDIR/node.{crt,key}            |
//! CDIR/remote.{crt,key}         /
//! ```
//!
//! [`ClusterDir`] names every path; other crates should use it rather than spell file names.
//!
//! What to ship where: etcd gets `ca-bundle.pem` and `etcd-server.*`; the clustermesh-apiserver
//! `ca-bundle.pem`, `apiserver.*` and `admin.*`; every node-sync only `ca-bundle.pem`, `node.*` and
//! `remote.*`. `etcd-root.*` (the etcd `root` user's client certificate, not a CA; directories
//! written before this name hold it as `root.*`, which is still read) is needed once, by whoever bootstraps etcd auth (and by `connect` /
//! `disconnect`, which add and remove remote users); `intermediate.key` only to issue more leaves.
//!
//! # Rotation and federation
//!
//! `ca rotate` makes a new root current and keeps the old one in `ca-bundle.pem` (overlap): peers
//! whose bundle holds both accept certificates of either. Re-issue the clusters (`issue-cluster`
//! again) and copy the bundle to every cluster directory ([`ClusterDir::sync_bundle`], or
//! `--cluster-dir` on `rotate`/`retire`), then `ca retire` removes the old root. Meshes that do not
//! share a root federate by adding each other's root to their bundles ([`TrustBundle::merge`]).
//!
//! The rustls configs of [`tls`] re-read certificates and bundles when the files change, so our own
//! servers and clients pick up a rotation on the next handshake (they disable TLS session
//! resumption, so every connection is verified against the current files). etcd 3.4 re-reads its server
//! certificate per handshake but reads `--trusted-ca-file` only at start: **restart etcd after
//! changing its bundle** (the tests do).
//!
//! # etcd
//!
//! The `mesh-etcd` crate runs etcd on these files: the command line for mTLS with
//! `--client-cert-auth`, the process, the least-privilege users and roles (`bootstrap_auth`,
//! `add_remote_user`) and clients with a preflight that turns TLS failures into errors that say
//! what was wrong (`connect`). This crate knows certificates only.

pub mod bundle;
pub mod ca;
pub mod error;
pub mod expiry;
pub mod files;
pub mod inspect;
pub mod renew;
pub mod spiffe;
pub mod tls;

pub use bundle::TrustBundle;
pub use ca::{
    CaDir, CertKeyPaths, ClusterDir, ClusterInfo, ClusterRequest, LeafOptions, RootCa, Rotation,
    San, TlsFiles, Validity,
};
pub use error::{Error, Result};
pub use inspect::{CertInfo, Fingerprint};
pub use renew::{LeafRenewal, RenewWhen};
pub use spiffe::{Role, SpiffeId, TrustDomain};
