//! The one list-then-watch loop, as an explicit state machine.
//!
//! ```text
//!   Empty ──list ok──▶ Listing ──items done──▶ WatchFrom(rev) ──watch ok──▶ Watching(rev)
//!     ▲  ▲                 (Init, InitApply…,     │  ▲                         │
//!     │  └──list error──┘   InitDone)             │  └──stream broken/closed───┘  (Err; resume
//!     │                                           │                               from rev + 1)
//!     └────────── compacted (Err) ────────────────┴───────────────────────────────┘  (relist)
//! ```
//!
//! A list reads every prefix at the revision of the first, so the watch from the next revision
//! misses no change made while listing. A broken stream resumes from the last revision seen,
//! with no relist; a compacted revision (the store forgot what the watch needs) relists, and the
//! consumer learns what vanished by comparing the new Init..InitDone with what it had
//! ([`crate::Known`]). Errors are returned, never retried here: the caller decides whether to
//! back off, reconnect, or report; the next call to [`Watcher::next`] goes on from the state
//! the error left.

use std::collections::VecDeque;

use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::store::{KeyValue, KvError, KvStore, Page, WatchEvent};

/// What a [`Watcher`] emits (the events of kube-rs's `watcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A (re)list begins: the `InitApply`s up to `InitDone` are the whole state at `revision`.
    Init { revision: i64 },
    /// One key of the listing.
    InitApply(KeyValue),
    /// The listing is complete; keys a consumer had that were not in it are gone.
    InitDone { revision: i64 },
    /// A key was put after the listing.
    Apply(KeyValue),
    /// A key was deleted after the listing.
    Delete { key: String, mod_revision: i64 },
}

enum State {
    Empty,
    /// A listing at `revision`, read a page at a time: `items` is what is left of the page, then
    /// the page from `next` of list prefix `prefix`, then the next prefix's.
    Listing {
        items: VecDeque<KeyValue>,
        revision: i64,
        prefix: usize,
        next: Option<String>,
    },
    /// Open the watches, each from the revision after its own last one.
    WatchFrom {
        revisions: Vec<i64>,
    },
    Watching {
        streams: SelectAll<Tagged>,
        /// Per watch prefix: the last revision delivered.
        revisions: Vec<i64>,
        pending: VecDeque<(usize, WatchEvent)>,
    },
}

/// A watch stream whose items carry the index of their prefix.
type Tagged = BoxStream<'static, (usize, Result<Vec<WatchEvent>, KvError>)>;

/// List-then-watch over a [`KvStore`].
pub struct Watcher<S> {
    store: S,
    list_prefixes: Vec<String>,
    watch_prefixes: Vec<String>,
    state: State,
    lists: u64,
}

impl<S: KvStore> Watcher<S> {
    /// Follow every key under `prefix`.
    pub fn new(store: S, prefix: &str) -> Self {
        Self::with_prefixes(store, vec![prefix.to_owned()], prefix)
    }

    /// List only `list_prefixes` (at one revision) and watch `watch_prefix`, which must cover
    /// them; the consumer drops watched keys it does not want.
    pub fn with_prefixes(store: S, list_prefixes: Vec<String>, watch_prefix: &str) -> Self {
        Self::with_watches(store, list_prefixes, vec![watch_prefix.to_owned()])
    }

    /// Follow every key under each of `prefixes` (listed at one revision, one watch each): for
    /// keys of several kinds that share no narrower prefix than the whole keyspace. The prefixes
    /// must not overlap. A prefix that is an exact key matches the keys it begins too (`a/c1` is
    /// a prefix of `a/c10`): the consumer drops what it does not want.
    pub fn multi(store: S, prefixes: Vec<String>) -> Self {
        Self::with_watches(store, prefixes.clone(), prefixes)
    }

    fn with_watches(store: S, list_prefixes: Vec<String>, watch_prefixes: Vec<String>) -> Self {
        Self {
            store,
            list_prefixes,
            watch_prefixes,
            state: State::Empty,
            lists: 0,
        }
    }

    /// Lists made so far (1 after the first; each relist adds one).
    pub fn lists(&self) -> u64 {
        self.lists
    }

    /// The next event. Cancel-safe: dropping the future loses nothing but, at worst, a list in
    /// flight (made again at the next call). A consumer that may cancel often (a `select!` with a
    /// short timer beside it) runs the watcher in its own task instead ([`WatchTask`]), so a long
    /// relist is never cut short forever.
    pub async fn next(&mut self) -> Result<Event, KvError> {
        loop {
            match &mut self.state {
                State::Empty => {
                    // The first page fixes the revision every later page is read at.
                    let (page, revision) = match self.list_prefixes.first() {
                        Some(p) => {
                            let page = self.store.list_page(p, None, None).await?;
                            let r = page.revision;
                            (page, r)
                        }
                        None => (Page::default(), 0),
                    };
                    self.lists += 1;
                    self.state = State::Listing {
                        items: page.kvs.into(),
                        revision,
                        prefix: 0,
                        next: page.next,
                    };
                    return Ok(Event::Init { revision });
                }
                State::Listing {
                    items,
                    revision,
                    prefix,
                    next,
                } => {
                    if let Some(kv) = items.pop_front() {
                        return Ok(Event::InitApply(kv));
                    }
                    // The next page: the rest of this prefix, else the next prefix. The state
                    // moves only once it is read (a cancelled read is read again).
                    let (p, start) = match next {
                        Some(n) => (*prefix, Some(n.as_str())),
                        None => (*prefix + 1, None),
                    };
                    if let Some(pfx) = self.list_prefixes.get(p) {
                        match self.store.list_page(pfx, start, Some(*revision)).await {
                            Ok(page) => {
                                *items = page.kvs.into();
                                *prefix = p;
                                *next = page.next;
                                continue;
                            }
                            Err(e) => {
                                // Part of a listing is no listing: the next call lists again.
                                self.state = State::Empty;
                                return Err(e);
                            }
                        }
                    }
                    let revision = *revision;
                    self.state = State::WatchFrom {
                        revisions: vec![revision; self.watch_prefixes.len()],
                    };
                    return Ok(Event::InitDone { revision });
                }
                State::WatchFrom { revisions } => {
                    let revisions = std::mem::take(revisions);
                    let mut streams = SelectAll::new();
                    let mut failed = None;
                    for (i, p) in self.watch_prefixes.iter().enumerate() {
                        match self.store.watch(p, revisions[i] + 1).await {
                            Ok(s) => streams.push(s.map(move |r| (i, r)).boxed()),
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = failed {
                        self.state = if e.is_compacted() {
                            State::Empty
                        } else {
                            State::WatchFrom { revisions }
                        };
                        return Err(e);
                    }
                    self.state = State::Watching {
                        streams,
                        revisions,
                        pending: VecDeque::new(),
                    };
                }
                State::Watching {
                    streams,
                    revisions,
                    pending,
                } => {
                    if let Some((i, ev)) = pending.pop_front() {
                        revisions[i] = revisions[i].max(ev.revision());
                        return Ok(match ev {
                            WatchEvent::Put(kv) => Event::Apply(kv),
                            WatchEvent::Delete { key, mod_revision } => {
                                Event::Delete { key, mod_revision }
                            }
                        });
                    }
                    let err = match streams.next().await {
                        Some((i, Ok(evs))) => {
                            pending.extend(evs.into_iter().map(|e| (i, e)));
                            continue;
                        }
                        Some((_, Err(e))) => e,
                        None => KvError::Closed {
                            what: format!("watching {}", self.watch_prefixes.join(", ")),
                        },
                    };
                    // Every watch is opened again, each from its own last revision.
                    let revisions = std::mem::take(revisions);
                    self.state = if err.is_compacted() {
                        State::Empty
                    } else {
                        State::WatchFrom { revisions }
                    };
                    return Err(err);
                }
            }
        }
    }

    /// Whether an event is ready without waiting (the rest of a store response, or of a listing):
    /// a consumer that batches its writes per response takes events while this holds.
    pub fn has_ready(&self) -> bool {
        match &self.state {
            State::Listing { .. } => true,
            State::Watching { pending, .. } => !pending.is_empty(),
            _ => false,
        }
    }
}

/// A [`Watcher`] run in its own task: every event and every error is sent on a channel, and after
/// an error the task waits out a [`Backoff`] before going on (a broken stream resumes, a
/// compaction relists). The task ends when the receiver is dropped, and is aborted when the
/// `WatchTask` is.
pub struct WatchTask {
    rx: mpsc::Receiver<Result<Event, KvError>>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchTask {
    /// Start `watcher` in a task; `buffer` events may wait for the consumer.
    pub fn spawn<S: KvStore>(mut watcher: Watcher<S>, mut backoff: Backoff, buffer: usize) -> Self {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let task = tokio::spawn(async move {
            loop {
                let r = watcher.next().await;
                let failed = r.is_err();
                if tx.send(r).await.is_err() {
                    return;
                }
                if failed {
                    tokio::time::sleep(backoff.next_delay()).await;
                } else {
                    backoff.reset();
                }
            }
        });
        Self { rx, task }
    }

    /// The next event or error (`None` only if the task died).
    pub async fn recv(&mut self) -> Option<Result<Event, KvError>> {
        self.rx.recv().await
    }
}

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn key(e: &Event) -> Option<&str> {
        match e {
            Event::InitApply(kv) | Event::Apply(kv) => Some(&kv.key),
            Event::Delete { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Events up to and including the first that matches `stop`.
    async fn until(
        w: &mut Watcher<MemStore>,
        stop: impl Fn(&Event) -> bool,
    ) -> Result<Vec<Event>, KvError> {
        let mut out = Vec::new();
        loop {
            let e = w.next().await?;
            let done = stop(&e);
            out.push(e);
            if done {
                return Ok(out);
            }
        }
    }

    #[tokio::test]
    async fn lists_then_watches_from_the_next_revision() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        s.put("q/x", b"other prefix").await.unwrap();
        let mut w = Watcher::new(s.clone(), "p/");
        let init = until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        assert_eq!(init.len(), 3, "{init:?}");
        assert_eq!(key(&init[1]), Some("p/a"));
        s.put("p/b", b"2").await.unwrap();
        s.delete("p/a").await.unwrap();
        assert!(matches!(w.next().await.unwrap(), Event::Apply(kv) if kv.key == "p/b"));
        assert!(matches!(w.next().await.unwrap(), Event::Delete { key, .. } if key == "p/a"));
        assert_eq!(w.lists(), 1);
    }

    #[tokio::test]
    async fn a_change_during_the_listing_is_not_lost() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        let mut w = Watcher::new(s.clone(), "p/");
        assert!(matches!(w.next().await.unwrap(), Event::Init { .. }));
        // Listed; the watch is not open yet. Changes now must arrive after InitDone.
        s.put("p/a", b"2").await.unwrap();
        s.put("p/b", b"3").await.unwrap();
        let evs = until(&mut w, |e| matches!(e, Event::Apply(kv) if kv.key == "p/b"))
            .await
            .unwrap();
        let kinds: Vec<_> = evs
            .iter()
            .map(|e| match e {
                Event::InitApply(kv) => format!("init {}={}", kv.key, kv.value[0] as char),
                Event::InitDone { .. } => "done".into(),
                Event::Apply(kv) => format!("apply {}={}", kv.key, kv.value[0] as char),
                e => format!("{e:?}"),
            })
            .collect();
        assert_eq!(kinds, ["init p/a=1", "done", "apply p/a=2", "apply p/b=3"]);
    }

    #[tokio::test]
    async fn a_broken_stream_resumes_without_a_relist_and_loses_nothing() {
        let s = MemStore::new();
        let mut w = Watcher::new(s.clone(), "p/");
        until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        s.put("p/a", b"1").await.unwrap();
        assert!(matches!(w.next().await.unwrap(), Event::Apply(_)));
        s.break_watches();
        s.put("p/b", b"2").await.unwrap(); // while the stream is down
        let err = w.next().await.unwrap_err();
        assert!(matches!(err, KvError::Unavailable { .. }), "{err}");
        assert!(matches!(w.next().await.unwrap(), Event::Apply(kv) if kv.key == "p/b"));
        assert_eq!(w.lists(), 1, "a broken stream needs no relist");
    }

    #[tokio::test]
    async fn a_compacted_revision_relists_and_the_relist_is_the_whole_state() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        s.put("p/b", b"1").await.unwrap();
        let mut w = Watcher::new(s.clone(), "p/");
        until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        s.put("p/x", b"1").await.unwrap();
        assert!(matches!(w.next().await.unwrap(), Event::Apply(_))); // the watch is open
        // The stream breaks; meanwhile a key goes and the store compacts past what we saw.
        s.break_watches();
        s.delete("p/a").await.unwrap();
        s.put("p/c", b"1").await.unwrap();
        s.compact(s.revision());
        assert!(!w.next().await.unwrap_err().is_compacted()); // the broken stream
        let err = w.next().await.unwrap_err(); // resuming finds the revision gone
        assert!(err.is_compacted(), "{err}");
        let relist = until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        let keys: Vec<_> = relist.iter().filter_map(key).collect();
        assert_eq!(keys, ["p/b", "p/c", "p/x"]);
        assert_eq!(w.lists(), 2);
    }

    #[tokio::test]
    async fn several_prefixes_are_listed_at_one_revision() {
        let s = MemStore::new();
        s.put("p/a/1", b"1").await.unwrap();
        s.put("p/b/1", b"1").await.unwrap();
        s.put("p/c/1", b"not listed").await.unwrap();
        let mut w = Watcher::with_prefixes(s.clone(), vec!["p/a/".into(), "p/b/".into()], "p/");
        let init = until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        let keys: Vec<_> = init.iter().filter_map(key).collect();
        assert_eq!(keys, ["p/a/1", "p/b/1"]);
        let Event::Init { revision } = init[0] else {
            panic!("{init:?}")
        };
        assert_eq!(revision, s.revision());
    }

    #[tokio::test]
    async fn several_watches_resume_each_from_its_own_revision() {
        let s = MemStore::new();
        let mut w = Watcher::multi(s.clone(), vec!["a/".into(), "b/".into()]);
        until(&mut w, |e| matches!(e, Event::InitDone { .. }))
            .await
            .unwrap();
        s.put("a/1", b"1").await.unwrap();
        s.put("b/1", b"1").await.unwrap();
        s.put("c/1", b"not watched").await.unwrap();
        let mut seen = vec![];
        for _ in 0..2 {
            seen.push(key(&w.next().await.unwrap()).unwrap().to_owned());
        }
        seen.sort();
        assert_eq!(seen, ["a/1", "b/1"]);
        s.break_watches();
        s.put("a/2", b"2").await.unwrap(); // while both streams are down
        assert!(w.next().await.is_err());
        assert!(matches!(w.next().await.unwrap(), Event::Apply(kv) if kv.key == "a/2"));
        assert_eq!(w.lists(), 1);
    }

    #[tokio::test]
    async fn a_watch_task_sends_the_error_then_goes_on() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        let backoff = Backoff::new(
            std::time::Duration::from_millis(1),
            std::time::Duration::from_millis(5),
        );
        let mut t = WatchTask::spawn(Watcher::new(s.clone(), "p/"), backoff, 16);
        assert!(matches!(t.recv().await, Some(Ok(Event::Init { .. }))));
        assert!(matches!(t.recv().await, Some(Ok(Event::InitApply(_)))));
        assert!(matches!(t.recv().await, Some(Ok(Event::InitDone { .. }))));
        s.break_watches();
        s.put("p/b", b"2").await.unwrap();
        assert!(matches!(t.recv().await, Some(Err(_))));
        assert!(matches!(t.recv().await, Some(Ok(Event::Apply(kv))) if kv.key == "p/b"));
    }

    #[tokio::test]
    async fn an_outage_during_the_list_is_an_error_then_a_list() {
        let s = MemStore::new();
        s.put("p/a", b"1").await.unwrap();
        s.set_outage(Some("etcd down"));
        let mut w = Watcher::new(s.clone(), "p/");
        assert!(matches!(
            w.next().await.unwrap_err(),
            KvError::Unavailable { .. }
        ));
        s.set_outage(None);
        assert!(matches!(w.next().await.unwrap(), Event::Init { .. }));
    }
}
