//! An admin writes garbage and wrong-cluster values into cluster 1's etcd, under the keys every
//! node-sync of the mesh reads (cluster 1's own, and cluster 2's through its remote watch):
//!
//! * an endpoint chunk that is not JSON, a service value of random bytes (new keys);
//! * cluster 2's endpoint chunk (its value names cluster 2, its IPs are cluster 2's) copied under
//!   cluster 1's chunk 1 (a new key) and over cluster 1's chunk 0 (replacing good state).
//!
//! Readers must reject every one of them (counted in node-sync's `badValues`), keep the good state
//! they had, crash nowhere, and the clients see no failed connect. Then cluster 2 is drained, so
//! its nodes select cluster 1's backends: exactly cluster 1's real backends, none of the copied
//! ones. Afterwards the admin restores chunk 0 and deletes the garbage.
//!
//! In KVStoreMesh mode cluster 2's node-syncs read cluster 1 from cluster 2's etcd, where cluster 2's
//! apiserver mirrors it: the mirror refuses each of the four values (counted once each in its
//! `clustermesh_apiserver_remote_bad_values_total{cluster="c1"}`), so cluster 2's node-syncs never see
//! them, and the rest holds as above.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chaos_tests::{ChaosMesh, Published, Traffic, UpOptions, assert_no_failures, settle_budget};
use etcd_client::{Client, GetOptions};
use mesh_certs::Role;

async fn admin(m: &ChaosMesh, c: usize) -> Result<Client> {
    let lab = m.mesh().lab();
    let dir = lab
        .cluster_certs(c)?
        .context("the lab runs plain etcd; the chaos tests need TLS")?;
    Ok(mesh_etcd::connect_as(&dir, Role::Admin, &[lab.etcd_endpoint(c)?]).await?)
}

async fn get(client: &mut Client, key: &str) -> Result<Vec<u8>> {
    let r = client.get(key, None).await?;
    match r.kvs().first() {
        Some(kv) => Ok(kv.value().to_vec()),
        None => {
            let all = client
                .get(
                    "clustermesh/v1/",
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await?;
            let keys: Vec<String> = all
                .kvs()
                .iter()
                .map(|k| String::from_utf8_lossy(k.key()).into_owned())
                .collect();
            bail!("no key {key}; keys there: {keys:?}")
        }
    }
}

fn bad_values(m: &ChaosMesh, c: usize, n: usize) -> Result<u64> {
    let doc = m.mesh().node_sync_status_json(c, n)?;
    Ok(doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["badValues"].as_u64())
        .sum())
}

/// Cluster `c`'s apiserver's count of refused values of cluster `of` (KVStoreMesh).
fn mirror_refused(m: &ChaosMesh, c: usize, of: &str) -> Result<u64> {
    let (_, text) = mesh_lab::mesh::http_get(m.mesh().apiserver_status(c), "/metrics")?;
    let prefix = format!("clustermesh_apiserver_remote_bad_values_total{{cluster=\"{of}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

#[test]
fn garbage_and_wrong_cluster_values_change_nothing() -> Result<()> {
    scenario(UpOptions::new("cx-garbage", 2, 2))
}

#[test]
fn garbage_in_a_remote_etcd_is_refused_by_kvstoremesh_and_changes_nothing() -> Result<()> {
    scenario(UpOptions::new("cx-kvsgarbage", 2, 2).kvstoremesh())
}

fn scenario(opts: UpOptions) -> Result<()> {
    let kvstoremesh = opts.kvstoremesh;
    let mut m = ChaosMesh::up(opts)?;
    let budget = settle_budget();
    let (c1, c2) = (m.mesh().cluster_name(1), m.mesh().cluster_name(2));
    let ep = |c: &str, chunk: u32| format!("clustermesh/v1/endpoints/{c}/default/echo/{chunk}");
    let bad_before: Vec<u64> = (1..=2)
        .flat_map(|c| (1..=2).map(move |n| (c, n)))
        .map(|(c, n)| bad_values(&m, c, n))
        .collect::<Result<_>>()?;

    let t = Traffic::start(&m, Duration::from_millis(10))?;
    let good0 = m.block_on(async {
        let mut a1 = admin(&m, 1).await?;
        let mut a2 = admin(&m, 2).await?;
        let good0 = get(&mut a1, &ep(&c1, 0)).await?;
        let foreign = get(&mut a2, &ep(&c2, 0)).await?;
        a1.put(ep(&c1, 7), "{not json", None).await?;
        a1.put(
            format!("clustermesh/v1/services/{c1}/default/junk"),
            vec![0xffu8, 0x00, 0x13, 0x37],
            None,
        )
        .await?;
        a1.put(ep(&c1, 1), foreign.clone(), None).await?;
        a1.put(ep(&c1, 0), foreign, None).await?;
        anyhow::Ok(good0)
    })?;
    // Every reader saw and rejected them: in KVStoreMesh mode cluster 2's mirror, not its nodes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    if kvstoremesh {
        loop {
            let refused = mirror_refused(&m, 2, &c1)?;
            if refused == 4 {
                break;
            }
            ensure!(
                refused < 4 && std::time::Instant::now() < deadline,
                "cluster 2's mirror refused {refused} values of {c1}, expected 4"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for c in 1..=2 {
        for n in 1..=2 {
            let i = (c - 1) * 2 + (n - 1);
            if kvstoremesh && c == 2 {
                continue;
            }
            loop {
                let now = bad_values(&m, c, n)
                    .with_context(|| format!("node-sync {c}/{n} after the garbage (crashed?)"))?;
                if now >= bad_before[i] + 3 {
                    break;
                }
                ensure!(
                    std::time::Instant::now() < deadline,
                    "node-sync {c}/{n} counted {} bad values, expected at least 3 more than {}",
                    now,
                    bad_before[i]
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    m.converge(budget).context("maps after the garbage")?;
    if kvstoremesh {
        // Nothing of it reached cluster 2's node-syncs.
        for n in 1..=2 {
            let now = bad_values(&m, 2, n)?;
            ensure!(
                now == bad_before[2 + (n - 1)],
                "node-sync 2/{n} counted {now} bad values (was {}): the mirror let garbage through",
                bad_before[2 + (n - 1)]
            );
        }
    }

    // Cluster 2 drained: its nodes take exactly cluster 1's real backends.
    m.publish_cluster(2, Published::Terminating)?;
    let c = m.converge(budget)?;
    eprintln!(
        "[chaos] cluster 2 drained with garbage in cluster 1's etcd: maps right in {:?}",
        c.took
    );
    std::thread::sleep(Duration::from_millis(500));
    m.publish_cluster(2, Published::Ready)?;
    m.converge(budget)?;

    m.block_on(async {
        let mut a1 = admin(&m, 1).await?;
        a1.put(ep(&c1, 0), good0, None).await?;
        a1.delete(ep(&c1, 7), None).await?;
        a1.delete(ep(&c1, 1), None).await?;
        a1.delete(format!("clustermesh/v1/services/{c1}/default/junk"), None)
            .await?;
        anyhow::Ok(())
    })?;
    m.converge(budget)
        .context("maps after the admin cleaned up")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&t.stop(), "garbage and wrong-cluster values in etcd")?;
    if kvstoremesh {
        ensure!(
            mirror_refused(&m, 2, &c1)? == 4,
            "the clean-up was refused by the mirror"
        );
    }
    Ok(())
}
