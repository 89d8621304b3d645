//! Per-cluster trust in the lab (issue 17): every etcd trusts for its clients only its own
//! cluster's intermediate, and the other cluster is read with credentials it issued: in one run
//! every node-sync reads it through its read-only `remote` certificate (the `--remote-config-dir`
//! entries `clustermesh connect --context` writes); in the other the clusters are joined by the
//! gRPC connect, which has each cluster sign the other's remote key, and KVStoreMesh mirrors with
//! those reader certificates. Asserted in both: the mesh works across clusters under it (affinity none:
//! every node's maps hold both clusters' backends, clients land in both, a drain of cluster 1
//! fails no connect); a certificate with CN `admin-c1` minted with cluster 2's intermediate key, and
//! cluster 2's own `remote` certificate, are refused by cluster 1's etcd; cluster 1's remote
//! certificate reads it and cannot write.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chaos_tests::{ChaosMesh, Traffic, UpOptions, assert_no_failures, settle_budget};
use mesh_certs::{Role, TlsFiles};
use mesh_testkit::{Minted, mint_leaf};

#[test]
fn the_mesh_runs_on_per_cluster_trust_and_another_clusters_key_opens_nothing() -> Result<()> {
    let mut opts = UpOptions::new("cx-trust", 2, 2).affinity_none();
    opts.cluster_trust = true;
    opts.static_remotes = true;
    scenario(opts).map(drop)
}

#[test]
fn the_grpc_connect_mints_reader_certificates_that_kvstoremesh_mirrors_with() -> Result<()> {
    let mut opts = UpOptions::new("cx-trust-g", 2, 2)
        .affinity_none()
        .kvstoremesh();
    opts.cluster_trust = true;
    let m = scenario(opts)?;
    // What made it work: c2's registration of c1 carries the certificate c1 signed for c2's
    // remote key (CN remote-c2, issued by c1's intermediate), not c2's own.
    let lab = m.mesh().lab();
    let d1 = lab.cluster_certs(1)?.context("TLS lab")?;
    let d2 = lab.cluster_certs(2)?.context("TLS lab")?;
    let eps2 = lab.clusters()[1].etcd.client_urls();
    let mut admin2 = m.block_on(mesh_etcd::connect_as(&d2, Role::Admin, &eps2))?;
    let got = m.block_on(admin2.get("clustermesh/v1/remotes/c2/c1", None))?;
    let kv = got.kvs().first().context("c2 has registered c1")?;
    let entry: serde_json::Value = serde_json::from_slice(kv.value())?;
    let pem = entry["clientCert"]
        .as_str()
        .context("the registration carries a clientCert")?;
    let p = lab.state_dir().join("c2-reads-c1.crt");
    std::fs::write(&p, pem)?;
    let info = mesh_certs::CertInfo::from_pem_file(&p)?.remove(0);
    ensure!(
        info.common_name.as_deref() == Some("remote-c2"),
        "{:?}",
        info.common_name
    );
    let c1_intermediate = d1.intermediate_info()?;
    ensure!(
        info.issuer == c1_intermediate.subject,
        "issued by c1's intermediate ({}), not {}",
        c1_intermediate.subject,
        info.issuer
    );
    Ok(())
}

fn scenario(opts: UpOptions) -> Result<ChaosMesh> {
    let mut m = ChaosMesh::up(opts)?;
    let budget = settle_budget();
    let t = Traffic::start(&m, Duration::from_millis(10))?;
    for (c, other) in [(1, "c2-"), (2, "c1-")] {
        m.mesh()
            .wait_for_landings(c, 1, Duration::from_secs(10), |b| b.starts_with(other), 1)
            .with_context(|| format!("the client in cluster {c} reaches the other cluster"))?;
    }

    let lab = m.mesh().lab();
    let d1 = lab.cluster_certs(1)?.context("TLS lab")?;
    let d2 = lab.cluster_certs(2)?.context("TLS lab")?;
    let eps1 = lab.clusters()[0].etcd.client_urls();
    let spiffe = format!("spiffe://{}/cluster/c1/admin", d1.info.trust_domain);
    let forged = mint_leaf(
        &d2,
        &Minted {
            cn: "admin-c1",
            spiffe: Some(&spiffe),
            ..Minted::default()
        },
        &lab.state_dir().join("admin-c1-by-c2"),
    );
    let files = |bundle: &std::path::Path, id| TlsFiles {
        ca_bundle: bundle.to_owned(),
        identity: Some(id),
    };
    for (id, what) in [
        (forged, "CN=admin-c1 minted with c2's intermediate"),
        (d2.cert_key(Role::Remote), "c2's own remote certificate"),
    ] {
        let r = m.block_on(mesh_etcd::connect(&eps1, &files(&d1.ca_bundle(), id)));
        let e = r
            .err()
            .with_context(|| format!("{what} must be refused by c1's etcd"))?;
        eprintln!("[chaos] {what}: {e}");
        ensure!(
            e.to_string().contains("refused the client certificate"),
            "{what}: {e}"
        );
    }
    let mut reader = m.block_on(mesh_etcd::connect(
        &eps1,
        &files(&d1.ca_bundle(), d1.cert_key(Role::Remote)),
    ))?;
    let listed = m.block_on(
        reader.get(
            "clustermesh/v1/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        ),
    )?;
    ensure!(!listed.kvs().is_empty(), "c1's remote certificate reads c1");
    let w = m.block_on(reader.put("clustermesh/v1/forged", "x", None));
    ensure!(
        w.as_ref()
            .is_err_and(|e| e.to_string().contains("permission denied")),
        "c1's remote certificate must not write: {w:?}"
    );

    m.drain_and_restore(1, budget, "per-cluster trust")?;
    assert_no_failures(&t.stop(), "per-cluster trust")?;
    Ok(m)
}
