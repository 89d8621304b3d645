//! The etcd implementation against a real etcd: what the in-memory store's unit tests assume of
//! a store holds for etcd too (lists at a past revision, compaction named as such, a guarded
//! write refused once the guard key changes, the watcher relisting after a compaction).

use std::time::Duration;

use mesh_kv::{EtcdStore, Event, Guard, KvError, KvStore, Op, Watcher};
use mesh_testkit::Etcd;

const TIMEOUT: Duration = Duration::from_secs(5);

async fn store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::new(etcd.client().await, TIMEOUT)
}

/// `n` puts of `<prefix><i>` (i zero-padded to `width`), value "v".
fn puts(prefix: &str, n: usize, width: usize) -> Vec<Op> {
    (0..n)
        .map(|i| Op::Put {
            key: format!("{prefix}{i:0width$}"),
            value: b"v".to_vec(),
            lease: None,
        })
        .collect()
}

/// Write `ops` in transactions of 100.
async fn write_all(s: &EtcdStore, ops: &[Op]) {
    for chunk in ops.chunks(100) {
        assert!(s.txn(None, chunk.to_vec()).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn a_compacted_revision_is_named_and_the_watcher_relists() {
    let etcd = Etcd::start().await;
    let s = store(&etcd).await;
    s.put("p/a", b"1").await.unwrap();
    let mut w = Watcher::new(s.clone(), "p/");
    let Event::Init { revision: r0 } = w.next().await.unwrap() else {
        panic!("no Init")
    };
    assert!(matches!(w.next().await.unwrap(), Event::InitApply(kv) if kv.key == "p/a"));
    assert!(matches!(w.next().await.unwrap(), Event::InitDone { .. }));
    // More changes, then compaction past them, before the watch opens: the watch from r0 + 1
    // is refused by etcd as compacted, and the watcher relists.
    s.put("p/a", b"2").await.unwrap();
    s.put("p/b", b"1").await.unwrap();
    s.delete("p/a").await.unwrap();
    let head = s.list("p/", None).await.unwrap().revision;
    etcd.client()
        .await
        .compact(head, None)
        .await
        .expect("compact");
    let listed_then = s.list("p/", Some(r0)).await.unwrap_err();
    assert!(listed_then.is_compacted(), "{listed_then}");
    let err = w.next().await.unwrap_err();
    assert!(err.is_compacted(), "{err}");
    assert!(matches!(w.next().await.unwrap(), Event::Init { revision } if revision == head));
    assert!(matches!(w.next().await.unwrap(), Event::InitApply(kv) if kv.key == "p/b"));
    assert!(matches!(w.next().await.unwrap(), Event::InitDone { .. }));
    s.put("p/c", b"1").await.unwrap();
    assert!(matches!(w.next().await.unwrap(), Event::Apply(kv) if kv.key == "p/c"));
    assert_eq!(w.lists(), 2);
}

#[tokio::test]
async fn lists_page_at_one_revision_and_guarded_writes_follow_the_guard() {
    let etcd = Etcd::start().await;
    let s = store(&etcd).await;
    write_all(&s, &puts("p/", 2500, 5)).await;
    let l = s.list("p/", None).await.unwrap();
    assert_eq!(l.kvs.len(), 2500, "three pages of 1000, one listing");

    let lease = s.lease_grant(30).await.unwrap();
    assert!(s.lease_keep_alive(lease).await.unwrap() > 0);
    s.txn(
        None,
        vec![Op::Put {
            key: "leader".into(),
            value: b"me".to_vec(),
            lease: Some(lease),
        }],
    )
    .await
    .unwrap();
    let created = s.get("leader").await.unwrap().unwrap().mod_revision;
    let guard = Guard {
        key: "leader".into(),
        create_revision: created,
    };
    let put = |v: &str| Op::Put {
        key: "k".into(),
        value: v.as_bytes().to_vec(),
        lease: None,
    };
    assert!(s.txn(Some(&guard), vec![put("1")]).await.unwrap().is_some());
    s.lease_revoke(lease).await.unwrap();
    assert!(
        s.get("leader").await.unwrap().is_none(),
        "revoked with its lease"
    );
    assert_eq!(s.txn(Some(&guard), vec![put("2")]).await.unwrap(), None);
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"1");
}

#[tokio::test]
async fn a_killed_etcd_is_an_error_not_a_hang() {
    let mut etcd = Etcd::start().await;
    let s = store(&etcd).await;
    let mut w = Watcher::new(s.clone(), "p/");
    while !matches!(w.next().await.unwrap(), Event::InitDone { .. }) {}
    s.put("p/a", b"1").await.unwrap();
    assert!(matches!(w.next().await.unwrap(), Event::Apply(_)));
    etcd.kill();
    let err = tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("the watch reports a dead etcd")
        .unwrap_err();
    assert!(!err.is_compacted(), "{err}");
    let got = s.get("p/a").await.unwrap_err();
    assert!(
        matches!(got, KvError::Timeout { .. } | KvError::Etcd { .. }),
        "{got}"
    );
}

/// The watcher reads a listing a page at a time (it holds one page, not the whole prefix) and
/// every page at the first one's revision: a write made while the listing is read is not in it,
/// it comes after InitDone as a watch event; a listing over two prefixes is one snapshot too.
#[tokio::test]
async fn a_listing_read_page_by_page_is_one_snapshot() {
    let etcd = Etcd::start().await;
    let s = store(&etcd).await;
    let mut ops = puts("p/", 2500, 5);
    ops.extend(puts("q/", 10, 2));
    write_all(&s, &ops).await;
    let first = s.list_page("p/", None, None).await.unwrap();
    assert_eq!(first.kvs.len(), 1000, "a page is 1,000 keys");
    assert!(first.next.is_some());

    let mut w = Watcher::multi(s.clone(), vec!["p/".into(), "q/".into()]);
    let Event::Init { revision } = w.next().await.unwrap() else {
        panic!("no Init")
    };
    let mut listed = Vec::new();
    loop {
        match w.next().await.unwrap() {
            Event::InitApply(kv) => {
                assert!(
                    kv.mod_revision <= revision,
                    "{} read past the listing",
                    kv.key
                );
                listed.push(kv.key);
                if listed.len() == 1500 {
                    // Between the second and third page of p/, and before q/ is read.
                    s.put("p/00007", b"changed").await.unwrap();
                    s.put("q/99", b"new").await.unwrap();
                }
            }
            Event::InitDone { revision: r } => {
                assert_eq!(r, revision);
                break;
            }
            other => panic!("{other:?} inside a listing"),
        }
    }
    let expected: Vec<String> = ops
        .iter()
        .map(|o| match o {
            Op::Put { key, .. } => key.clone(),
            Op::Delete { key } => key.clone(),
        })
        .collect();
    assert_eq!(
        listed, expected,
        "every key once, in order, none of the later writes"
    );
    let mut after = Vec::new();
    while after.len() < 2 {
        match tokio::time::timeout(TIMEOUT, w.next())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Apply(kv) => after.push((kv.key, kv.value)),
            other => panic!("{other:?}"),
        }
    }
    after.sort();
    assert_eq!(
        after,
        [
            ("p/00007".to_owned(), b"changed".to_vec()),
            ("q/99".to_owned(), b"new".to_vec())
        ]
    );
}
