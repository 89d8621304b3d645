//! `tls::check_cluster_identity`, the gRPC API's authorization: who speaks for a cluster is decided
//! by the SPIFFE id and the intermediate the verified chain goes through, not by the CN; a bundle
//! whose root carries no SPIFFE id (an issuer of cert-manager's that `ca init` did not make) still
//! works, every root not claiming another trust domain counting as ours.

mod common;

use common::*;
use mesh_certs::tls::check_cluster_identity;
use mesh_certs::{ClusterDir, Role, TrustDomain, files};
use mesh_testkit::{Minted, mint_leaf};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

fn chain(path: &std::path::Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    files::load_certs(path).unwrap()
}

fn admin(signer: &ClusterDir, tmp: &std::path::Path, name: &str) -> std::path::PathBuf {
    mint_leaf(
        signer,
        &Minted {
            cn: "admin-east",
            spiffe: Some("spiffe://mesh.test/cluster/east/admin"),
            ..Minted::default()
        },
        &tmp.join(name),
    )
    .cert
}

#[test]
fn the_verified_intermediate_decides_not_the_common_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let west = issue(&ca, "west", 2, &tmp.path().join("west"));
    let td = TrustDomain::new("mesh.test").unwrap();
    let check = |cert: &std::path::Path, role| {
        check_cluster_identity(&chain(cert), &east.ca_bundle(), &td, &name("east"), role)
    };
    check(&east.cert(Role::Admin), Role::Admin).expect("east's own admin");
    let e = check(&east.cert(Role::Node), Role::Admin).unwrap_err();
    assert!(
        e.contains("/cluster/east/node") && e.contains("not spiffe://mesh.test/cluster/east/admin"),
        "{e}"
    );
    let e = check(&admin(&west, tmp.path(), "by-west"), Role::Admin).unwrap_err();
    assert!(
        e.contains("signed by CN=clustermesh intermediate CA west"),
        "{e}"
    );
    // The forger presents east's real intermediate too: the verified path still goes through west's.
    let forged = admin(&west, tmp.path(), "by-west-with-east-intermediate");
    let mut presented = chain(&forged);
    presented.insert(1, chain(&east.cert(Role::Intermediate))[0].clone());
    let e = check_cluster_identity(
        &presented,
        &east.ca_bundle(),
        &td,
        &name("east"),
        Role::Admin,
    )
    .unwrap_err();
    assert!(e.contains("intermediate CA west"), "{e}");
}

#[test]
fn a_root_without_spiffe_id_counts_as_ours() {
    let tmp = tempfile::tempdir().unwrap();
    // A root and a cluster intermediate as cert-manager would make them over a plain CA issuer.
    let root_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "corporate root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = p.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "clustermesh intermediate east");
    p.subject_alt_names.push(SanType::URI(
        "spiffe://mesh.test/cluster/east/intermediate"
            .try_into()
            .unwrap(),
    ));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
    let inter = p.signed_by(&inter_key, &issuer).unwrap();
    let dir = tmp.path().join("east");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca-bundle.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("intermediate.crt"), inter.pem()).unwrap();
    std::fs::write(dir.join("intermediate.key"), inter_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("cluster.json"),
        r#"{"name":"east","id":1,"trustDomain":"mesh.test"}"#,
    )
    .unwrap();
    let east = ClusterDir::open(&dir).unwrap();
    let td = TrustDomain::new("mesh.test").unwrap();
    let cert = admin(&east, tmp.path(), "admin");
    check_cluster_identity(
        &chain(&cert),
        &east.ca_bundle(),
        &td,
        &name("east"),
        Role::Admin,
    )
    .expect("the only root, without a SPIFFE id, is ours");

    // A federated mesh's root beside it (it claims its own trust domain) is not ours.
    let other = init_ca(&tmp.path().join("other"), "other.test");
    let other_east = issue(&other, "east", 1, &tmp.path().join("other-east"));
    let bundle = format!(
        "{}{}",
        root.pem(),
        std::fs::read_to_string(other.dir().bundle()).unwrap()
    );
    std::fs::write(dir.join("ca-bundle.pem"), bundle).unwrap();
    let forged = mint_leaf(
        &other_east,
        &Minted {
            cn: "admin-east",
            spiffe: Some("spiffe://mesh.test/cluster/east/admin"),
            ..Minted::default()
        },
        &tmp.path().join("forged"),
    );
    let e = check_cluster_identity(
        &chain(&forged.cert),
        &east.ca_bundle(),
        &td,
        &name("east"),
        Role::Admin,
    )
    .unwrap_err();
    assert!(
        e.contains("does not chain to a root of trust domain mesh.test"),
        "{e}"
    );
}
