//! The mesh's seam to its key-value store.
//!
//! Everything the mesh reads from etcd it reads the same way: list a set of prefixes at one
//! revision, then watch from the next revision, relisting when the store has compacted the
//! revision the watch needed. That loop was written six times by hand (issue 18); here it is
//! written once, as an explicit state machine ([`Watcher`]) emitting the events of kube-rs's
//! `watcher` (init, init-apply, init-done, apply, delete), over a small trait ([`KvStore`]) with two
//! implementations: [`EtcdStore`] (the real thing) and [`MemStore`] (an in-memory store with
//! revisions, compaction and breakable watch streams, for unit tests that need no etcd).
//! [`Known`] turns a relist into the changes a consumer has not seen, and [`Backoff`] is the one
//! backoff (exponential, full jitter).
//!
//! ```
//! # async fn demo() -> Result<(), mesh_kv::KvError> {
//! use mesh_kv::{Event, KvStore, MemStore, Watcher};
//! let store = MemStore::new();
//! store.put("cilium/state/a", b"1").await?;
//! let mut w = Watcher::new(store.clone(), "cilium/state/");
//! assert!(matches!(w.next().await?, Event::Init { .. }));
//! assert!(matches!(w.next().await?, Event::InitApply(kv) if kv.key == "cilium/state/a"));
//! assert!(matches!(w.next().await?, Event::InitDone { .. }));
//! # Ok(()) }
//! ```

mod backoff;
mod etcd;
mod known;
mod memory;
mod store;
mod watcher;

pub use backoff::{Backoff, backoff_delay};
pub use etcd::{EtcdStore, is_auth_old_revision, retry_auth_old_revision};
pub use known::{Change, Known};
pub use memory::MemStore;
pub use store::{
    Guard, KeyValue, KvError, KvStore, Listing, Op, Page, WatchEvent, WatchStream, prefix_end,
};
pub use watcher::{Event, WatchTask, Watcher};
