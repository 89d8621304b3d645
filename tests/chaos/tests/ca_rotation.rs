//! Rotation of the mesh's root CA and of every cluster's certificates (etcd's server certificate
//! included) while traffic flows, the way DESIGN.md and `clustermesh ca --help` tell an operator to:
//!
//! 1. `clustermesh ca rotate --ca <lab CA> --cluster-dir <c1> --cluster-dir <c2>`: a new root, the
//!    bundle of every cluster holds old + new; etcd of both clusters restarted (etcd 3.4 reads its
//!    CA file at start only);
//! 2. every cluster re-issued from the new root (new intermediates, new keys for every leaf: etcd
//!    server, apiserver, admin, node, remote, root); the apiservers restarted (they load their
//!    etcd client certificate at start; node-syncs re-read theirs on every reconnect);
//! 3. `clustermesh ca retire ...`: the bundles hold the new root only; etcd restarted again, so
//!    every client must reconnect with its re-issued certificate and trust etcd's new server
//!    certificate.
//!
//! Asserted: no connect fails; after each step the apiserver leads and every node-sync is connected
//! again, and the maps equal the model within the settle budget; a change reaches every node
//! afterwards; a client certificate of the retired root is refused by etcd, and a client that
//! trusts only the retired root refuses etcd's (rotated) server certificate.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};
use mesh_certs::{CertKeyPaths, Role, TlsFiles};

fn cli(m: &ChaosMesh, args: &[String]) -> Result<String> {
    let bin = m.mesh().spec().bin_dir.join("clustermesh");
    let out = Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "clustermesh {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ca_args(m: &ChaosMesh, verb: &str) -> Result<Vec<String>> {
    let lab = m.mesh().lab();
    let ca = lab.ca_dir().context("the lab runs plain etcd")?;
    let mut a = vec!["ca".into(), verb.into(), format!("--ca={}", ca.display())];
    for c in 1..=m.model.clusters {
        a.push(format!("--cluster-dir={}", m.mesh().cert_dir(c)?.display()));
    }
    Ok(a)
}

/// Restart every cluster's etcd (SIGTERM, start on the same data), then wait until every
/// apiserver leads again and every node-sync is connected, and the maps equal the model.
fn restart_etcds(m: &mut ChaosMesh, what: &str) -> Result<()> {
    let started = Instant::now();
    for c in 1..=m.model.clusters {
        m.mesh().lab().restart_etcd(c)?;
    }
    for c in 1..=m.model.clusters {
        m.wait_control_plane(c, Duration::from_secs(20))
            .with_context(|| {
                let name = m.mesh().cluster_name(c);
                format!(
                    "{what}: control plane of cluster {c}; apiserver log:\n{}",
                    m.mesh().log_tail(&format!("apiserver-{name}"), 15)
                )
            })?;
    }
    let c = m.converge(settle_budget())?;
    eprintln!(
        "[chaos] {what}: etcd restarted, every apiserver leads and every node-sync reconnected {:?} after the restart; maps right {:?} later",
        started.elapsed(),
        c.took
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))
}

/// Under the mesh bundle's client trust (`etcd.clientTrust=mesh`, certManager's default).
#[test]
fn root_ca_and_server_certificates_rotate_under_traffic() -> Result<()> {
    let mut opts = UpOptions::new("cx-carot", 2, 2);
    opts.cluster_trust = false;
    scenario(opts)
}

/// The same under per-cluster trust (every etcd trusts only its own intermediates, the clusters
/// joined by the gRPC connect with reader certificates each signed for the other). A re-issue
/// makes new keys, so two steps are added after it: restart etcd (it reads the new
/// intermediate from `client-ca.pem` at start) and run `connect` again (each cluster signs the
/// other's new remote key). `ca retire` then also drops the old intermediates from `client-ca.pem`.
#[test]
fn root_ca_rotates_under_traffic_on_per_cluster_trust() -> Result<()> {
    let mut opts = UpOptions::new("cx-carot-ct", 2, 2);
    opts.cluster_trust = true;
    scenario(opts)
}

fn scenario(opts: UpOptions) -> Result<()> {
    let cluster_trust = opts.cluster_trust;
    let mut m = ChaosMesh::up(opts)?;
    let budget = settle_budget();
    let lab = m.mesh().lab();
    let dir = lab
        .cluster_certs(1)?
        .context("the lab runs plain etcd; the chaos tests need TLS")?;
    // What the old root issued, kept for the checks at the end.
    let old = lab.state_dir().join("old-certs");
    std::fs::create_dir_all(&old).with_context(|| format!("create {}", old.display()))?;
    copy(&dir.ca_bundle(), &old.join("bundle.pem"))?;
    copy(&dir.cert(Role::Admin), &old.join("admin.crt"))?;
    copy(&dir.key(Role::Admin), &old.join("admin.key"))?;
    let before = dir.ca_fingerprints()?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let out = cli(&m, &ca_args(&m, "rotate")?)?;
    let during = dir.ca_fingerprints()?;
    ensure!(
        during.len() == 2 && during.contains(&before[0]),
        "after rotate the bundle should hold the new and the old root: {during:?}\n{out}"
    );
    eprintln!(
        "[chaos] root rotated: cluster bundles hold {} roots",
        during.len()
    );
    restart_etcds(&mut m, "bundle with old + new root")?;

    for c in 1..=m.model.clusters {
        m.mesh().lab().reissue_certs(c)?;
    }
    eprintln!(
        "[chaos] every cluster re-issued from the new root (etcd server certificates included)"
    );
    if cluster_trust {
        let started = Instant::now();
        for c in 1..=m.model.clusters {
            m.mesh().lab().restart_etcd(c)?;
        }
        // Until connect runs again each cluster's nodes present, to the other's etcd, a reader
        // certificate for their old remote key: node-sync falls back to the re-issued own
        // certificate, which that etcd does not trust. So connect first, then wait.
        m.connect_all()
            .context("connect again: reader certificates for the re-issued remote keys")?;
        for c in 1..=m.model.clusters {
            m.wait_control_plane(c, Duration::from_secs(20))?;
        }
        eprintln!(
            "[chaos] per-cluster trust: etcds restarted on the new client-ca.pem and clusters connected again {:?} later",
            started.elapsed()
        );
    }
    m.converge(budget)?;
    // The apiserver loads its etcd client certificate at start (node-sync re-reads its files on
    // every reconnect), so it is rolled to pick the re-issued one up, as a Kubernetes Secret
    // change rolls the Deployment; without this it is refused once the old root is retired (seen:
    // not leading 20 s after the restart).
    let rolled = Instant::now();
    for c in 1..=m.model.clusters {
        m.start_apiserver(c)?;
    }
    for c in 1..=m.model.clusters {
        m.wait_control_plane(c, Duration::from_secs(20))?;
    }
    eprintln!(
        "[chaos] apiservers restarted with the re-issued certificates: leading again {:?} later",
        rolled.elapsed()
    );
    m.converge(budget)?;

    let out = cli(&m, &ca_args(&m, "retire")?)?;
    let after = dir.ca_fingerprints()?;
    ensure!(
        after.len() == 1 && !after.contains(&before[0]),
        "after retire the bundle should hold the new root only: {after:?}\n{out}"
    );
    restart_etcds(&mut m, "old root retired")?;

    m.publish_cluster(1, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] drain after the rotation reached every node in {:?}",
        c.took
    );
    std::thread::sleep(Duration::from_millis(300));
    m.publish_cluster(1, Published::Ready)?;
    m.converge(budget)?;

    // What a user of the retired root sees now.
    let endpoints = m.mesh().lab().etcd_endpoints(1)?;
    let old_admin = TlsFiles {
        ca_bundle: dir.ca_bundle(),
        identity: Some(CertKeyPaths {
            cert: old.join("admin.crt"),
            key: old.join("admin.key"),
        }),
    };
    let old_trust = TlsFiles {
        ca_bundle: old.join("bundle.pem"),
        identity: Some(dir.cert_key(Role::Admin)),
    };
    let (refused, distrusted, fresh) = m.block_on(async {
        let try_get = |files: TlsFiles| {
            let endpoints = endpoints.clone();
            async move {
                let mut c = mesh_etcd::connect(&endpoints, &files).await?;
                c.get("clustermesh/v1/cluster-config/c1", None).await?;
                anyhow::Ok(())
            }
        };
        (
            tokio::time::timeout(Duration::from_secs(10), try_get(old_admin)).await,
            tokio::time::timeout(Duration::from_secs(10), try_get(old_trust)).await,
            tokio::time::timeout(Duration::from_secs(10), try_get(dir.tls_files(Role::Admin)))
                .await,
        )
    });
    ensure!(
        matches!(refused, Ok(Err(_))),
        "etcd should refuse a client certificate of the retired root: {refused:?}"
    );
    ensure!(
        matches!(distrusted, Ok(Err(_))),
        "a client trusting only the retired root should refuse etcd's rotated server certificate: {distrusted:?}"
    );
    ensure!(
        matches!(fresh, Ok(Ok(()))),
        "the re-issued admin certificate should work: {fresh:?}"
    );
    eprintln!(
        "[chaos] retired root: its client certificate is refused ({}); trusting only it refuses etcd's new server certificate ({})",
        refused.map_or_else(
            |e| e.to_string(),
            |r| r.map_or_else(|e| format!("{e:#}"), |_| "ok".into())
        ),
        distrusted.map_or_else(
            |e| e.to_string(),
            |r| r.map_or_else(|e| format!("{e:#}"), |_| "ok".into())
        )
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "root CA and server certificate rotation")?;
    Ok(())
}
