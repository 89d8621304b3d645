//! The Kubernetes API source: one kube watcher per kind (Services, EndpointSlices, Pods, Namespaces, Nodes and
//! MCS ServiceExports). A watcher's (re)list becomes one [`SourceEvent::Reset`] of its kind, so objects deleted
//! while the watch was down (410 Gone, a watch that ended) disappear; ADDED/MODIFIED become `Apply`, DELETED
//! `Delete`; bookmarks only move the resume point. The source is synced once every kind listed once. A cluster
//! without the ServiceExport CRD (404) counts as having no ServiceExports.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Source, SourceError, SourceEvent, SourceFuture};
use crate::objects::{ObjectKind, ServiceExport, SourceObject};

/// Watches Services, EndpointSlices, Pods, Namespaces, Nodes and ServiceExports through the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubernetesSource {
    /// kubeconfig path; the inferred config (in-cluster, then `~/.kube/config`) when `None`.
    pub kubeconfig: Option<PathBuf>,
}

impl KubernetesSource {
    /// A source using `kubeconfig` (or the inferred config).
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self { kubeconfig }
    }

    async fn client(&self) -> Result<Client, SourceError> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    SourceError::Kube(format!("reading kubeconfig {}: {e}", path.display()))
                })?;
                Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| SourceError::Kube(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => Config::infer()
                .await
                .map_err(|e| SourceError::Kube(format!("no Kubernetes config: {e}")))?,
        };
        Client::try_from(config).map_err(|e| SourceError::Kube(e.to_string()))
    }
}

/// Shared by the per-kind tasks: how many kinds have listed once.
struct SyncCounter {
    listed: AtomicUsize,
    kinds: usize,
}

fn is_not_found(e: &watcher::Error) -> bool {
    let api_code = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 404);
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => api_code(e),
        _ => false,
    }
}

async fn pump<K, S>(
    kind: ObjectKind,
    stream: S,
    convert: fn(K) -> SourceObject,
    tx: mpsc::Sender<SourceEvent>,
    sync: Arc<SyncCounter>,
    missing_ok: bool,
) -> Result<(), SourceError>
where
    K: Debug + Send,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let origin = format!("kubernetes watch of {kind}s");
    let mut buffer: Vec<SourceObject> = Vec::new();
    let mut listed = false;
    let mut in_error = false;
    let send = |ev: SourceEvent| {
        let tx = tx.clone();
        async move { tx.send(ev).await.map_err(|_| SourceError::Closed) }
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let ev = match item {
            Ok(ev) => ev,
            Err(e) => {
                if missing_ok && is_not_found(&e) {
                    // No CRD: no objects of this kind.
                    send(SourceEvent::Reset {
                        kind,
                        objects: Vec::new(),
                    })
                    .await?;
                    if !listed {
                        listed = true;
                        info!(%kind, "resource not served by this cluster; taking it as empty");
                        mark_listed(&sync, &send).await?;
                    }
                    continue;
                }
                warn!(%kind, error = %e, "kubernetes watch failed; retrying");
                in_error = true;
                send(SourceEvent::Error {
                    origin: origin.clone(),
                    message: e.to_string(),
                })
                .await?;
                continue;
            }
        };
        if in_error {
            in_error = false;
            send(SourceEvent::ErrorCleared {
                origin: origin.clone(),
            })
            .await?;
        }
        match ev {
            Event::Init => buffer.clear(),
            Event::InitApply(o) => buffer.push(convert(o)),
            Event::InitDone => {
                send(SourceEvent::Reset {
                    kind,
                    objects: std::mem::take(&mut buffer),
                })
                .await?;
                if !listed {
                    listed = true;
                    mark_listed(&sync, &send).await?;
                }
            }
            Event::Apply(o) => send(SourceEvent::Apply(convert(o))).await?,
            Event::Delete(o) => {
                send(SourceEvent::Delete(convert(o).object_ref())).await?;
            }
        }
    }
    Ok(())
}

async fn mark_listed<F, Fut>(sync: &SyncCounter, send: &F) -> Result<(), SourceError>
where
    F: Fn(SourceEvent) -> Fut,
    Fut: std::future::Future<Output = Result<(), SourceError>>,
{
    if sync.listed.fetch_add(1, Ordering::SeqCst) + 1 == sync.kinds {
        send(SourceEvent::Synced {
            source: "kubernetes".into(),
        })
        .await?;
    }
    Ok(())
}

fn export_of(o: DynamicObject) -> SourceObject {
    SourceObject::ServiceExport(ServiceExport {
        metadata: o.metadata,
        status: o.data.get("status").cloned(),
    })
}

impl Source for KubernetesSource {
    fn name(&self) -> String {
        "kubernetes".into()
    }

    fn run(&self, tx: mpsc::Sender<SourceEvent>) -> SourceFuture {
        let me = self.clone();
        Box::pin(async move {
            let client = me.client().await?;
            let sync = Arc::new(SyncCounter {
                listed: AtomicUsize::new(0),
                kinds: 6,
            });
            let cfg = watcher::Config::default;
            let mut tasks = tokio::task::JoinSet::new();
            macro_rules! watch_kind {
                ($ty:ty, $kind:expr, $variant:path) => {{
                    let s =
                        watcher::watcher(Api::<$ty>::all(client.clone()), cfg()).default_backoff();
                    tasks.spawn(pump($kind, s, $variant, tx.clone(), sync.clone(), false));
                }};
            }
            watch_kind!(Namespace, ObjectKind::Namespace, SourceObject::Namespace);
            watch_kind!(Node, ObjectKind::Node, SourceObject::Node);
            watch_kind!(Service, ObjectKind::Service, SourceObject::Service);
            watch_kind!(
                EndpointSlice,
                ObjectKind::EndpointSlice,
                SourceObject::EndpointSlice
            );
            watch_kind!(Pod, ObjectKind::Pod, SourceObject::Pod);
            let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
                crate::objects::MCS_GROUP,
                "v1alpha1",
                "ServiceExport",
            ));
            let exports =
                watcher::watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), cfg())
                    .default_backoff();
            tasks.spawn(pump(
                ObjectKind::ServiceExport,
                exports,
                export_of,
                tx.clone(),
                sync.clone(),
                true,
            ));
            drop(tx);
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(SourceError::Kube(format!("watch task: {e}"))),
                }
            }
            Ok(())
        })
    }
}
