//! The Kubernetes source against `MockKubeApiServer`: an HTTP server in this test that speaks the Kubernetes
//! list/watch JSON (list objects with `metadata.resourceVersion`, watch streams of `{"type","object"}` lines,
//! BOOKMARK events, `ERROR` events carrying a 410 `Status`, 404 for a resource the cluster does not serve). It is
//! not a kube-apiserver (none can run here); its shapes follow the API's documented ones.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clustermesh_apiserver::index::{IndexConfig, MeshIndex};
use clustermesh_apiserver::source::kubernetes::KubernetesSource;
use clustermesh_apiserver::source::{Source, SourceEvent};
use mesh_model::{ClusterId, ClusterName, MaxConnectedClusters};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

#[derive(Default)]
struct Resource {
    list_kind: String,
    api_version: String,
    objects: BTreeMap<String, Value>,
    pending: Vec<String>,
    watch: Option<mpsc::UnboundedSender<Result<Bytes, Infallible>>>,
    list_calls: usize,
    watch_rvs: Vec<String>,
}

#[derive(Default)]
struct MockState {
    rv: u64,
    resources: BTreeMap<String, Resource>,
}

/// Serves Kubernetes list/watch JSON for a few resources; the test drives what happens.
#[derive(Clone)]
struct MockKubeApiServer {
    state: Arc<Mutex<MockState>>,
    url: String,
}

fn query_param(q: &str, name: &str) -> Option<String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

async fn handle(State(st): State<Arc<Mutex<MockState>>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut s = st.lock().unwrap();
    let rv = s.rv;
    let Some(r) = s.resources.get_mut(&path) else {
        let status = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
            "message":format!("the server could not find the requested resource ({path})"),
            "reason":"NotFound","code":404});
        return (StatusCode::NOT_FOUND, axum::Json(status)).into_response();
    };
    let watching = matches!(query_param(&query, "watch").as_deref(), Some("true" | "1"));
    if watching {
        r.watch_rvs
            .push(query_param(&query, "resourceVersion").unwrap_or_default());
        let (tx, rx) = mpsc::unbounded_channel();
        for line in r.pending.drain(..) {
            let _ = tx.send(Ok(Bytes::from(line)));
        }
        r.watch = Some(tx);
        let body = Body::from_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        return Response::builder()
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
    }
    r.list_calls += 1;
    let list = json!({
        "kind": r.list_kind, "apiVersion": r.api_version,
        "metadata": {"resourceVersion": rv.to_string()},
        "items": r.objects.values().cloned().collect::<Vec<_>>(),
    });
    axum::Json(list).into_response()
}

impl MockKubeApiServer {
    async fn start() -> Self {
        let mut st = MockState {
            rv: 100,
            ..Default::default()
        };
        for (path, kind, api) in [
            (SERVICES, "ServiceList", "v1"),
            ("/api/v1/pods", "PodList", "v1"),
            ("/api/v1/namespaces", "NamespaceList", "v1"),
            ("/api/v1/nodes", "NodeList", "v1"),
            (SLICES, "EndpointSliceList", "discovery.k8s.io/v1"),
            // No ServiceExport CRD: that path answers 404.
        ] {
            st.resources.insert(
                path.to_owned(),
                Resource {
                    list_kind: kind.into(),
                    api_version: api.into(),
                    ..Default::default()
                },
            );
        }
        let state = Arc::new(Mutex::new(st));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { state, url }
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: {}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: u\ncurrent-context: mock\nusers:\n- name: u\n  user:\n    token: test\n",
                self.url
            ),
        )
        .unwrap();
        p
    }

    fn key(obj: &Value) -> String {
        format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap()
        )
    }

    fn push(r: &mut Resource, line: String) {
        let ok = match &r.watch {
            Some(tx) => tx.send(Ok(Bytes::from(line.clone()))).is_ok(),
            None => false,
        };
        if !ok {
            r.watch = None;
            r.pending.push(line);
        }
    }

    /// Changes an object; with `event`, the watch sees ADDED/MODIFIED/DELETED, without it only a relist does.
    fn change(&self, path: &str, mut obj: Value, event: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let r = s.resources.get_mut(path).unwrap();
        let k = Self::key(&obj);
        if event == Some("DELETED") {
            r.objects.remove(&k);
        } else {
            r.objects.insert(k.clone(), obj.clone());
        }
        if let Some(t) = event {
            Self::push(r, format!("{}\n", json!({"type": t, "object": obj})));
        }
    }

    fn remove_silently(&self, path: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        s.resources
            .get_mut(path)
            .unwrap()
            .objects
            .remove(&format!("{ns}/{name}"));
    }

    fn bookmark(&self, path: &str, kind: &str, api: &str) -> String {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv.to_string();
        let r = s.resources.get_mut(path).unwrap();
        Self::push(
            r,
            format!(
                "{}\n",
                json!({"type":"BOOKMARK","object":{"kind":kind,"apiVersion":api,"metadata":{"resourceVersion":rv}}})
            ),
        );
        rv
    }

    fn end_watch(&self, path: &str) {
        self.state
            .lock()
            .unwrap()
            .resources
            .get_mut(path)
            .unwrap()
            .watch = None;
    }

    fn gone(&self, path: &str) {
        let mut s = self.state.lock().unwrap();
        let r = s.resources.get_mut(path).unwrap();
        let status = json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},
            "status":"Failure","message":"too old resource version: 1 (150)","reason":"Expired","code":410}});
        Self::push(r, format!("{status}\n"));
        r.watch = None;
    }

    fn list_calls(&self, path: &str) -> usize {
        self.state.lock().unwrap().resources[path].list_calls
    }

    fn watch_rvs(&self, path: &str) -> Vec<String> {
        self.state.lock().unwrap().resources[path].watch_rvs.clone()
    }
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Service",
        "metadata":{"name":name,"namespace":"shop","annotations":{"clustermesh.io/global":"true"}},
        "spec":{"clusterIP":ip,"clusterIPs":[ip],"ports":[{"name":"http","port":80,"protocol":"TCP"}]}})
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> Value {
    json!({"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
        "metadata":{"name":name,"namespace":"shop","labels":{"kubernetes.io/service-name":svc}},
        "addressType":"IPv4",
        "endpoints": ips.iter().map(|ip| json!({"addresses":[ip],"conditions":{"ready":true},"nodeName":"n1"})).collect::<Vec<_>>(),
        "ports":[{"name":"http","port":8080,"protocol":"TCP"}]})
}

struct Driver {
    rx: mpsc::Receiver<SourceEvent>,
    index: MeshIndex,
    synced: bool,
}

impl Driver {
    /// Applies source events until `pred` holds on the index.
    async fn until(&mut self, what: &str, pred: impl Fn(&MeshIndex, bool) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pred(&self.index, self.synced) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("source stopped");
            match ev {
                SourceEvent::Apply(o) => self.index.apply(o),
                SourceEvent::Delete(r) => self.index.delete(&r),
                SourceEvent::Reset { kind, objects } => self.index.reset(kind, objects),
                SourceEvent::Synced { .. } => self.synced = true,
                SourceEvent::Error { origin, message } => {
                    eprintln!("source error {origin}: {message}")
                }
                SourceEvent::ErrorCleared { .. } => {}
            }
        }
    }
}

fn has(ix: &MeshIndex, key: &str) -> bool {
    ix.desired().contains_key(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_bookmark_watch_end_and_410_gone() {
    let mock = MockKubeApiServer::start().await;
    mock.change(SERVICES, service("web", "10.96.0.10"), None);
    mock.change(SERVICES, service("old", "10.96.0.11"), None);
    let dir = tempfile::tempdir().unwrap();
    let source = KubernetesSource::new(Some(mock.kubeconfig(dir.path())));
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(source.run(tx));
    let mcc = MaxConnectedClusters::DEFAULT;
    let mut d = Driver {
        rx,
        index: MeshIndex::new(IndexConfig::new(
            ClusterName::new("c1").unwrap(),
            ClusterId::new(1, mcc).unwrap(),
        )),
        synced: false,
    };
    // Initial list of every kind (ServiceExport's 404 counts as empty) -> synced.
    d.until("the initial sync", |ix, synced| {
        synced && has(ix, "clustermesh/v1/services/c1/shop/web")
    })
    .await;
    assert!(has(&d.index, "clustermesh/v1/services/c1/shop/old"));

    // ADDED
    mock.change(SLICES, slice("web-1", "web", &["10.0.0.1"]), Some("ADDED"));
    d.until("ADDED slice", |ix, _| {
        has(ix, "clustermesh/v1/endpoints/c1/shop/web/0")
    })
    .await;
    // MODIFIED
    mock.change(
        SLICES,
        slice("web-1", "web", &["10.0.0.1", "10.0.0.2"]),
        Some("MODIFIED"),
    );
    d.until("MODIFIED slice", |ix, _| {
        ix.desired()
            .get("clustermesh/v1/endpoints/c1/shop/web/0")
            .is_some_and(|v| String::from_utf8_lossy(v).contains("10.0.0.2"))
    })
    .await;
    // BOOKMARK, then the watch ends: the re-watch resumes from the bookmark's resourceVersion, no relist.
    let lists = mock.list_calls(SLICES);
    let bm = mock.bookmark(SLICES, "EndpointSlice", "discovery.k8s.io/v1");
    // The bookmark has no visible effect; a following event proves it was consumed.
    mock.change(SERVICES, service("api", "10.96.0.12"), Some("ADDED"));
    d.until("ADDED service", |ix, _| {
        has(ix, "clustermesh/v1/services/c1/shop/api")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    mock.end_watch(SLICES);
    while !mock.watch_rvs(SLICES).contains(&bm) {
        assert!(
            Instant::now() < deadline,
            "no re-watch from the bookmark {bm}: {:?}",
            mock.watch_rvs(SLICES)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        mock.list_calls(SLICES),
        lists,
        "a watch that ends is resumed, not relisted"
    );
    mock.change(SLICES, slice("api-1", "api", &["10.0.1.1"]), Some("ADDED"));
    d.until("event after the re-watch", |ix, _| {
        has(ix, "clustermesh/v1/endpoints/c1/shop/api/0")
    })
    .await;

    // DELETED
    mock.change(SERVICES, service("api", "10.96.0.12"), Some("DELETED"));
    d.until("DELETED service", |ix, _| {
        !has(ix, "clustermesh/v1/services/c1/shop/api")
            && !has(ix, "clustermesh/v1/endpoints/c1/shop/api/0")
    })
    .await;

    // 410 Gone: the watcher relists; what was deleted meanwhile (without an event) disappears.
    let lists = mock.list_calls(SERVICES);
    mock.remove_silently(SERVICES, "shop", "old");
    mock.change(SERVICES, service("new", "10.96.0.13"), None);
    mock.gone(SERVICES);
    d.until("the relist after 410", |ix, _| {
        !has(ix, "clustermesh/v1/services/c1/shop/old")
            && has(ix, "clustermesh/v1/services/c1/shop/new")
    })
    .await;
    assert!(mock.list_calls(SERVICES) > lists, "410 Gone made it relist");
    assert!(has(&d.index, "clustermesh/v1/services/c1/shop/web"));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_publishes_what_the_kubernetes_api_serves() {
    let mock = MockKubeApiServer::start().await;
    mock.change(SERVICES, service("web", "10.96.0.10"), None);
    mock.change(
        SLICES,
        slice("web-1", "web", &["10.0.0.1", "10.0.0.2"]),
        None,
    );
    let etcd = common::Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = mock.kubeconfig(dir.path());
    let ap = common::Apiserver::start(&common::ApiserverOpts {
        cluster: "c1".into(),
        cluster_id: 1,
        etcd: etcd.url(),
        manifest_dir: dir.path().join("unused"),
        replica: "r1".into(),
        extra: vec![
            "--source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ],
        log_dir: dir.path().to_path_buf(),
    });
    ap.wait_ready_leader(Duration::from_secs(30)).await;
    let mut c = etcd.client().await;
    let keys = common::data_keys(&mut c, "c1").await;
    assert!(
        keys.contains_key("clustermesh/v1/services/c1/shop/web"),
        "{keys:?}"
    );
    assert!(keys.contains_key("clustermesh/v1/endpoints/c1/shop/web/0"));
    // A watch event reaches etcd.
    mock.change(SERVICES, service("web", "10.96.0.10"), Some("DELETED"));
    common::eventually(Duration::from_secs(30), "the deletion in etcd", || {
        let mut c = c.clone();
        async move {
            let keys = common::data_keys(&mut c, "c1").await;
            (!keys.keys().any(|k| k.contains("/shop/web"))).then_some(())
        }
    })
    .await;
}
