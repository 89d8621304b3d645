//! The Kubernetes API source.

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::{Source, SourceError, SourceEvent, SourceFuture};

/// Watches Services, EndpointSlices, Pods, Namespaces, Nodes and ServiceExports through the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubernetesSource {
    /// kubeconfig path; in-cluster config when `None`.
    pub kubeconfig: Option<PathBuf>,
}

impl KubernetesSource {
    /// A source using `kubeconfig` (or the in-cluster config).
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self { kubeconfig }
    }
}

impl Source for KubernetesSource {
    fn name(&self) -> String {
        "kubernetes".into()
    }

    fn run(&self, _tx: mpsc::Sender<SourceEvent>) -> SourceFuture {
        Box::pin(async { Err(SourceError::Kube("not built yet".into())) })
    }
}
