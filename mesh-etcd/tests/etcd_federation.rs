//! Federation of two meshes that do not share a root: each adds the other's root to its bundle,
//! and a remote user of the other mesh reads (and only reads) this mesh's etcd. The etcd here runs
//! with peer TLS too (https peer URL), so the peer flags of `EtcdSpec::args` are exercised.

mod common;

use std::time::Duration;

use common::*;
use mesh_certs::{Role, TlsFiles, TrustBundle};
use mesh_etcd::Error;
use mesh_etcd::{self as etcd, EtcdSpec};

#[tokio::test]
async fn federated_meshes_trust_each_other_after_bundle_exchange() {
    require_etcd();
    let tmp = tempfile::tempdir().unwrap();
    let ca_a = init_ca(&tmp.path().join("ca-a"), "a.test");
    let ca_b = init_ca(&tmp.path().join("ca-b"), "b.test");
    let east = issue(&ca_a, "east", 1, &tmp.path().join("east"));
    let west = issue(&ca_b, "west", 2, &tmp.path().join("west"));

    let spec = EtcdSpec::for_cluster(
        &east,
        tmp.path().join("etcd-east"),
        format!("https://127.0.0.1:{}", free_port()),
        format!("https://127.0.0.1:{}", free_port()),
    );
    assert!(
        spec.args()
            .iter()
            .any(|a| a == "--peer-client-cert-auth=true")
    );
    let mut etcd_east = spec
        .spawn(Duration::from_secs(30))
        .await
        .expect("etcd with peer TLS");
    let eps = etcd_east.endpoints();
    etcd::bootstrap_auth(&eps, &east.tls_files(Role::EtcdRoot), &east.info.name)
        .await
        .unwrap();
    etcd::add_remote_user(&eps, &east.tls_files(Role::EtcdRoot), &west.info.name)
        .await
        .unwrap();
    let mut admin = etcd::connect_as(&east, Role::Admin, &eps).await.unwrap();
    admin
        .put("clustermesh/v1/services/east/default/web", "{}", None)
        .await
        .unwrap();

    // Before federation west does not trust east's server.
    let e = match etcd::connect_as(&west, Role::Remote, &eps).await {
        Ok(_) => panic!("west trusted east without federation"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::EtcdServerUntrusted { .. }), "{e:?}");
    // Nor does east's etcd trust west's certificate (west trusting east's root for this probe).
    let both = tmp.path().join("both.pem");
    let mut b = TrustBundle::load(&west.ca_bundle()).unwrap();
    b.merge(&TrustBundle::load(&east.ca_bundle()).unwrap());
    b.save(&both).unwrap();
    let probe_files = TlsFiles {
        ca_bundle: both.clone(),
        identity: Some(west.cert_key(Role::Remote)),
    };
    let e = match etcd::connect(&eps, &probe_files).await {
        Ok(_) => panic!("east's etcd accepted a foreign mesh's certificate"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::EtcdClientCertRefused { .. }), "{e:?}");

    // Federate: each mesh's bundle gets the other's root; clusters get the bundles; etcd restarts.
    for (ca, other) in [(&ca_a, &ca_b), (&ca_b, &ca_a)] {
        let mut bundle = TrustBundle::load(&ca.dir().bundle()).unwrap();
        bundle.merge(&TrustBundle::load(&other.dir().bundle()).unwrap());
        bundle.save(&ca.dir().bundle()).unwrap();
    }
    east.sync_bundle(ca_a.dir()).unwrap();
    west.sync_bundle(ca_b.dir()).unwrap();
    etcd_east.restart(Duration::from_secs(30)).await.unwrap();

    let mut remote = etcd::connect_as(&west, Role::Remote, &eps)
        .await
        .expect("federated remote connects");
    let got = remote
        .get("clustermesh/v1/services/east/default/web", None)
        .await
        .expect("federated remote reads");
    assert_eq!(got.kvs().len(), 1);
    let e = remote
        .put("clustermesh/v1/services/east/default/web", "x", None)
        .await
        .expect_err("federated remote writes");
    assert!(e.to_string().contains("permission denied"), "{e}");
}

/// A federated mesh's bundle may not speak for our trust domain: a root in it that claims our
/// trust domain (and is not one we hold) is skipped by the merge, its genuine roots are added.
#[test]
fn a_foreign_bundle_cannot_add_a_root_of_our_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = init_ca(&tmp.path().join("ours"), "a.test");
    let theirs = init_ca(&tmp.path().join("theirs"), "b.test");
    let impostor = init_ca(&tmp.path().join("impostor"), "a.test");
    let mut foreign = TrustBundle::load(&theirs.dir().bundle()).unwrap();
    foreign.merge(&TrustBundle::load(&impostor.dir().bundle()).unwrap());
    // Ours as the foreign mesh holds it after an earlier exchange: already present, not skipped.
    foreign.merge(&TrustBundle::load(&ours.dir().bundle()).unwrap());
    let mut bundle = TrustBundle::load(&ours.dir().bundle()).unwrap();
    let td = mesh_certs::TrustDomain::new("a.test").unwrap();
    let skipped = bundle.merge_foreign(&foreign, &td);
    assert_eq!(skipped, vec![impostor.fingerprint()]);
    assert_eq!(
        bundle.fingerprints(),
        vec![ours.fingerprint(), theirs.fingerprint()]
    );
}
