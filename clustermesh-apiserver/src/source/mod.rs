//! Sources of Kubernetes objects, behind one trait: a manifest directory ([`manifests`]) and the Kubernetes API
//! ([`kubernetes`]). A source sends [`SourceEvent`]s; it says [`SourceEvent::Synced`] once after its first full
//! listing, and the writer deletes nothing before every source said so.

pub mod kubernetes;
pub mod manifests;

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

use crate::objects::{ObjectKind, ObjectRef, SourceObject};

/// What a source tells the index.
#[allow(clippy::large_enum_variant)] // carries the Kubernetes objects as they are
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// An object was added or changed.
    Apply(SourceObject),
    /// An object was deleted.
    Delete(ObjectRef),
    /// Every object of `kind` is now exactly `objects` (a relist).
    Reset {
        /// The kind that was relisted.
        kind: ObjectKind,
        /// All of its objects.
        objects: Vec<SourceObject>,
    },
    /// The source has delivered a full listing once.
    Synced {
        /// Which source (for logs and status).
        source: String,
    },
    /// Something the source read is broken (a file that does not parse, a watch that fails); `origin` names it.
    Error {
        /// The file, resource or URL at fault.
        origin: String,
        /// What is wrong, naming file and line where there are some.
        message: String,
    },
    /// A previously reported error of `origin` is gone.
    ErrorCleared {
        /// The file, resource or URL that is fine again.
        origin: String,
    },
}

/// Errors that stop a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The receiver of the source's events is gone (the apiserver is shutting down or lost leadership).
    #[error("the index stopped listening")]
    Closed,
    /// The Kubernetes client could not be built.
    #[error("kubernetes client: {0}")]
    Kube(String),
}

/// A future a source runs until it fails or its receiver goes away.
pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// A source of Kubernetes objects.
pub trait Source: Send + Sync {
    /// Short name for logs and status (`manifests:/etc/mesh`, `kubernetes`).
    fn name(&self) -> String;
    /// Starts listing and watching; events go to `tx`. Called once per leadership term.
    fn run(&self, tx: mpsc::Sender<SourceEvent>) -> SourceFuture;
}
