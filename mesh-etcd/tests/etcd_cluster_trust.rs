//! One cluster's compromise stays in that cluster (issue 17), against a real etcd with
//! client-certificate auth: with `ClientTrust::Cluster` east's etcd trusts for its clients only
//! east's own intermediate. A certificate with CN `admin-east` or `root` minted with west's
//! intermediate key (same mesh root), or by a federated mesh's root, opens nothing; west's nodes
//! still read east with the read-only credential east issued (east's `remote` certificate, what
//! `connect --context` hands them) and cannot write with it. The control: the default mesh trust
//! accepts the minted `admin-east`, which is what the mode closes.

mod common;

use common::*;
use mesh_certs::{CertKeyPaths, Role, TlsFiles, TrustBundle};
use mesh_etcd::{self as etcd, ClientTrust, EtcdSpec};
use mesh_testkit::{Minted, mint_leaf};

async fn spawn(
    dir: &mesh_certs::ClusterDir,
    work: &std::path::Path,
    trust: ClientTrust,
) -> etcd::EtcdProcess {
    EtcdSpec::for_cluster(
        dir,
        work.join(format!("etcd-{trust:?}")),
        format!("https://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    )
    .client_trust(dir, trust)
    .unwrap()
    .spawn(std::time::Duration::from_secs(30))
    .await
    .unwrap()
}

/// Whether `id` can put a key into the etcd at `eps` (an error: refused at the handshake or by auth).
async fn can_write(
    eps: &[String],
    bundle: &std::path::Path,
    id: &CertKeyPaths,
) -> Result<(), String> {
    let files = TlsFiles {
        ca_bundle: bundle.to_owned(),
        identity: Some(id.clone()),
    };
    let mut c = etcd::connect(eps, &files)
        .await
        .map_err(|e| e.to_string())?;
    c.put("clustermesh/v1/services/east/default/x", "forged", None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn another_clusters_key_or_a_federated_root_opens_nothing_in_this_clusters_etcd() {
    require_etcd();
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"), "mesh.test");
    let east = issue(&ca, "east", 1, &tmp.path().join("east"));
    let west = issue(&ca, "west", 2, &tmp.path().join("west"));
    assert!(
        east.client_ca().is_file(),
        "issue-cluster writes client-ca.pem"
    );

    // A federated mesh: east's bundle trusts its root (as `ca federate` / `connect --federate` do).
    let other = init_ca(&tmp.path().join("other"), "other.test");
    let other_east = issue(&other, "east", 1, &tmp.path().join("other-east"));
    let mut bundle = TrustBundle::load(&east.ca_bundle()).unwrap();
    bundle.merge(&TrustBundle::load(&other_east.ca_bundle()).unwrap());
    bundle.save(&east.ca_bundle()).unwrap();

    let forge = |signer: &mesh_certs::ClusterDir, cn: &str, name: &str| {
        mint_leaf(
            signer,
            &Minted {
                cn,
                spiffe: Some(&format!(
                    "spiffe://mesh.test/cluster/east/{}",
                    if cn == "root" { "root" } else { "admin" }
                )),
                ..Minted::default()
            },
            &tmp.path().join(name),
        )
    };
    let admin_by_west = forge(&west, "admin-east", "admin-east-by-west");
    let root_by_west = forge(&west, "root", "root-by-west");
    let admin_by_other_mesh = forge(&other_east, "admin-east", "admin-east-by-other-mesh");

    // The control: east's etcd under the mesh trust takes west's forgery as admin-east.
    let mesh = spawn(&east, tmp.path(), ClientTrust::Mesh).await;
    etcd::bootstrap_auth(
        &mesh.endpoints(),
        &east.tls_files(Role::EtcdRoot),
        &east.info.name,
    )
    .await
    .unwrap();
    can_write(&mesh.endpoints(), &east.ca_bundle(), &admin_by_west)
        .await
        .expect("under the mesh trust, any cluster's intermediate speaks for admin-east");
    drop(mesh);

    // East's etcd trusting only east's intermediate.
    let own = spawn(&east, tmp.path(), ClientTrust::Cluster).await;
    let eps = own.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .expect("east's own root user is trusted");
    for (id, what) in [
        (
            &admin_by_west,
            "CN=admin-east signed by west's intermediate",
        ),
        (&root_by_west, "CN=root signed by west's intermediate"),
        (
            &admin_by_other_mesh,
            "CN=admin-east signed under a federated mesh's root",
        ),
    ] {
        let e = can_write(&eps, &east.ca_bundle(), id)
            .await
            .expect_err(what);
        eprintln!("{what}: {e}");
        assert!(e.contains("refused the client certificate"), "{what}: {e}");
    }

    // East's own clients work; west's nodes read east with east's read-only remote credential,
    // and cannot write with it.
    can_write(&eps, &east.ca_bundle(), &east.cert_key(Role::Admin))
        .await
        .expect("east's admin writes");
    let remote = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(east.cert_key(Role::Remote)),
    };
    let mut reader = etcd::connect(&eps, &remote).await.unwrap();
    let got = reader
        .get("clustermesh/v1/services/east/default/x", None)
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1, "remote-east reads east's keys");
    let e = reader
        .put("clustermesh/v1/services/east/default/x", "evil", None)
        .await
        .expect_err("remote-east is read-only");
    assert!(e.to_string().contains("permission denied"), "{e}");
    // West's own remote certificate (the gRPC connect's credential today) is not east's to accept.
    let e = can_write(&eps, &west.ca_bundle(), &west.cert_key(Role::Remote))
        .await
        .expect_err("west's remote-west certificate is refused by east's own-cluster trust");
    assert!(e.contains("refused the client certificate"), "{e}");

    // What the gRPC connect hands west's nodes: east signs west's own remote key as remote-west
    // (the key never leaves west). With the user east creates at registration, west reads east
    // with it; it cannot write; without the user (disconnect) it opens nothing.
    let west_remote = std::fs::read(west.cert(Role::Remote)).unwrap();
    let reader_pem = east
        .issue_remote_reader(&west.info.name, &west_remote)
        .expect("east issues west's reader certificate");
    let reader_crt = tmp.path().join("west-reads-east.crt");
    std::fs::write(&reader_crt, &reader_pem).unwrap();
    let info = mesh_certs::CertInfo::from_pem_file(&reader_crt)
        .unwrap()
        .remove(0);
    assert_eq!(info.common_name.as_deref(), Some("remote-west"));
    assert_eq!(
        info.not_after,
        east.intermediate_info().unwrap().not_after,
        "a reader certificate lives as long as the intermediate that signed it"
    );
    let minted = CertKeyPaths {
        cert: reader_crt,
        key: west.key(Role::Remote),
    };
    etcd::add_remote_user(&eps, &east.tls_files(Role::EtcdRoot), &west.info.name)
        .await
        .unwrap();
    let files = TlsFiles {
        ca_bundle: east.ca_bundle(),
        identity: Some(minted.clone()),
    };
    let mut west_reader = etcd::connect(&eps, &files)
        .await
        .expect("west's key certified by east opens east's etcd");
    let got = west_reader
        .get("clustermesh/v1/services/east/default/x", None)
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1, "remote-west reads east's keys");
    let e = can_write(&eps, &east.ca_bundle(), &minted)
        .await
        .expect_err("remote-west is read-only");
    assert!(e.contains("permission denied"), "{e}");
    etcd::remove_remote_user(&eps, &east.tls_files(Role::EtcdRoot), &west.info.name)
        .await
        .unwrap();
    let e = west_reader
        .get("clustermesh/v1/services/east/default/x", None)
        .await
        .expect_err("a disconnected peer's reader certificate opens nothing");
    eprintln!("after disconnect: {e}");
    // Only a certificate is taken: a key or garbage is refused, naming what it is.
    let e = east
        .issue_remote_reader(
            &west.info.name,
            &std::fs::read(west.key(Role::Remote)).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("remote certificate of cluster west") && e.contains("private key"),
        "{e}"
    );

    // A directory issued before client-ca.pem existed is refused with the file named.
    std::fs::remove_file(east.client_ca()).unwrap();
    let e = EtcdSpec::for_cluster(
        &east,
        tmp.path().join("x"),
        "https://127.0.0.1:1",
        "http://127.0.0.1:2",
    )
    .client_trust(&east, ClientTrust::Cluster)
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("client-ca.pem") && e.contains("issue-cluster"),
        "{e}"
    );
}
