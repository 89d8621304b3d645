//! `clustermesh connect --context A --destination-context B` (and `disconnect`) against two
//! `MockKubeApiServer`s: HTTP servers in this test that speak the Kubernetes core/v1 JSON for the few
//! objects connect uses (GET/POST/PUT/PATCH/DELETE, `resourceVersion`, 404 `Status` objects, 409
//! conflicts). They are not kube-apiservers (none can run here); their shapes follow the API's
//! documented ones. The clusters' certificates come from the real mesh-certs CA code, and the end of
//! the story is real: the Secret connect wrote is laid out as kubelet does, node-sync's remote loader
//! reads it, and node-sync's connection code reaches a real etcd over mTLS with those files.

use mesh_testkit::free_port;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use mesh_certs::{ClusterDir, ClusterRequest, Role, RootCa, TrustDomain, Validity};
use mesh_etcd::{self as etcd, EtcdAuthAdmin, EtcdSpec};
use serde_json::{Value, json};

const NS: &str = "clustermesh";
const MESH_INFO: &str = "clustermesh-mesh-info";
const REMOTE_TLS: &str = "clustermesh-node-sync-tls";
const REMOTES: &str = "clustermesh-node-sync-remotes";
const STATUS_SVC: &str = "clustermesh-apiserver-status";

mod mock_kube {
    //! `MockKubeApiServer`: a stand-in for a kube-apiserver, serving core/v1 objects from memory.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::body::to_bytes;
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};

    /// (resource, namespace, name); namespace "" for cluster-scoped objects.
    type Key = (String, String, String);

    #[derive(Default)]
    struct MockState {
        rv: u64,
        objects: BTreeMap<Key, Value>,
        writes: Vec<String>,
        /// Objects another writer changes right after the next GET of them (the next PUT made
        /// from that GET then answers 409).
        race: Vec<Key>,
        /// Service proxy: (namespace, service, port name) -> the loopback port of its endpoint.
        endpoints: BTreeMap<(String, String, String), u16>,
    }

    /// `/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy{rest}` -> (ns, svc, port, rest).
    fn proxy_route(path: &str) -> Option<(String, String, String, String)> {
        let rest = path.strip_prefix("/api/v1/namespaces/")?;
        let (ns, rest) = rest.split_once("/services/")?;
        let (target, rest) = rest.split_once("/proxy")?;
        let (svc, port) = target.split_once(':')?;
        let rest = if rest.is_empty() { "/" } else { rest };
        Some((ns.into(), svc.into(), port.into(), rest.into()))
    }

    /// The API server's service proxy: GET forwarded to the service's endpoint; 503 with the
    /// real message when it has none.
    async fn proxy(
        st: &Arc<Mutex<MockState>>,
        ns: String,
        svc: String,
        port: String,
        rest: &str,
    ) -> Response {
        let upstream = st
            .lock()
            .unwrap()
            .endpoints
            .get(&(ns, svc.clone(), port))
            .copied();
        let Some(upstream) = upstream else {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("no endpoints available for service \"{svc}\""),
            );
        };
        match mesh_testkit::http_get(upstream, rest).await {
            Some((code, body)) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                [("content-type", "application/json")],
                body,
            )
                .into_response(),
            None => status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "error trying to reach service: dial tcp 127.0.0.1:{upstream}: connection refused"
                ),
            ),
        }
    }

    /// Serves GET (one object or a list), POST, PUT, PATCH (JSON merge patch) and DELETE for
    /// `/api/v1/namespaces/{ns}/{resource}[/{name}]` and `/api/v1/{resource}[/{name}]`.
    #[derive(Clone)]
    pub struct MockKubeApiServer {
        state: Arc<Mutex<MockState>>,
        /// `http://127.0.0.1:PORT`.
        pub url: String,
    }

    fn kind_of(resource: &str) -> &'static str {
        match resource {
            "configmaps" => "ConfigMap",
            "secrets" => "Secret",
            "services" => "Service",
            "nodes" => "Node",
            _ => "Unknown",
        }
    }

    fn status(code: StatusCode, reason: &str, message: String) -> Response {
        let body = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
            "message":message,"reason":reason,"code":code.as_u16()});
        (code, axum::Json(body)).into_response()
    }

    fn not_found(resource: &str, name: &str) -> Response {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
        )
    }

    /// (resource, namespace, name) of a request path.
    fn route(path: &str) -> Option<(String, String, Option<String>)> {
        let rest = path.strip_prefix("/api/v1/")?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        match parts.as_slice() {
            ["namespaces", ns, res] => Some(((*res).into(), (*ns).into(), None)),
            ["namespaces", ns, res, name] => {
                Some(((*res).into(), (*ns).into(), Some((*name).into())))
            }
            [res] => Some(((*res).into(), String::new(), None)),
            [res, name] => Some(((*res).into(), String::new(), Some((*name).into()))),
            _ => None,
        }
    }

    /// RFC 7386 JSON merge patch.
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    async fn handle(State(st): State<Arc<Mutex<MockState>>>, req: Request) -> Response {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = to_bytes(req.into_body(), 16 << 20)
            .await
            .unwrap_or_default();
        if let Some((ns, svc, port, rest)) = proxy_route(&path) {
            return proxy(&st, ns, svc, port, &rest).await;
        }
        let Some((res, ns, name)) = route(&path) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            );
        };
        let kind = kind_of(&res);
        let mut s = st.lock().unwrap();
        if method != Method::GET {
            s.writes.push(format!(
                "{method} {res} {ns}/{}",
                name.clone().unwrap_or_default()
            ));
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string());
                }
            }
        };
        match (method, name) {
            (Method::GET, None) => {
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((r, n, _), _)| *r == res && (ns.is_empty() || *n == ns))
                    .map(|(_, v)| v.clone())
                    .collect();
                axum::Json(json!({"kind": format!("{kind}List"), "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}))
                .into_response()
            }
            (Method::GET, Some(name)) => {
                let key = (res.clone(), ns, name.clone());
                let Some(o) = s.objects.get(&key).cloned() else {
                    return not_found(&res, &name);
                };
                if let Some(i) = s.race.iter().position(|k| *k == key) {
                    s.race.remove(i);
                    s.rv += 1;
                    let rv = s.rv.to_string();
                    let other = s.objects.get_mut(&key).unwrap();
                    other["metadata"]["resourceVersion"] = json!(rv);
                    other["metadata"]["annotations"] = json!({"touched-by": "someone else"});
                }
                axum::Json(o).into_response()
            }
            (Method::POST, None) => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value".into(),
                    );
                };
                let key = (res.clone(), ns.clone(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{res} \"{name}\" already exists"),
                    );
                }
                s.rv += 1;
                let mut obj = body;
                obj["metadata"]["namespace"] = json!(ns);
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                obj["metadata"]["uid"] = json!(format!("uid-{}", s.rv));
                obj["kind"] = json!(kind);
                obj["apiVersion"] = json!("v1");
                s.objects.insert(key, obj.clone());
                (StatusCode::CREATED, axum::Json(obj)).into_response()
            }
            (Method::PUT, Some(name)) => {
                let key = (res.clone(), ns.clone(), name.clone());
                let Some(cur) = s.objects.get(&key) else {
                    return not_found(&res, &name);
                };
                let want = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !want.is_empty() && Some(want) != cur["metadata"]["resourceVersion"].as_str() {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {res} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let uid = cur["metadata"]["uid"].clone();
                s.rv += 1;
                let mut obj = body;
                obj["metadata"]["namespace"] = json!(ns);
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                obj["metadata"]["uid"] = uid;
                s.objects.insert(key, obj.clone());
                axum::Json(obj).into_response()
            }
            (Method::PATCH, Some(name)) => {
                let key = (res.clone(), ns.clone(), name.clone());
                let Some(mut obj) = s.objects.get(&key).cloned() else {
                    return not_found(&res, &name);
                };
                merge(&mut obj, &body);
                s.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.objects.insert(key, obj.clone());
                axum::Json(obj).into_response()
            }
            (Method::DELETE, Some(name)) => {
                match s.objects.remove(&(res.clone(), ns, name.clone())) {
                    Some(_) => axum::Json(json!({"kind":"Status","apiVersion":"v1",
                        "metadata":{},"status":"Success","details":{"name":name,"kind":res}}))
                    .into_response(),
                    None => not_found(&res, &name),
                }
            }
            (m, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{m} is not supported on {path}"),
            ),
        }
    }

    impl MockKubeApiServer {
        pub async fn start() -> Self {
            let state = Arc::new(Mutex::new(MockState {
                rv: 1000,
                ..Default::default()
            }));
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

        /// Put an object in place (as `kubectl apply` before the test) without counting a write.
        pub fn seed(&self, resource: &str, mut obj: Value) {
            let mut s = self.state.lock().unwrap();
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            obj["apiVersion"] = json!("v1");
            obj["kind"] = json!(kind_of(resource));
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
            s.objects.insert((resource.into(), ns, name), obj);
        }

        pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
            let s = self.state.lock().unwrap();
            s.objects
                .get(&(resource.into(), ns.into(), name.into()))
                .cloned()
        }

        /// Another writer changes the object right after the next GET of it.
        pub fn race_next_get(&self, resource: &str, ns: &str, name: &str) {
            self.state
                .lock()
                .unwrap()
                .race
                .push((resource.into(), ns.into(), name.into()));
        }

        /// Give a Service's port an endpoint (a server on 127.0.0.1:`port`) for the service proxy.
        pub fn endpoint(&self, ns: &str, svc: &str, port_name: &str, port: u16) {
            self.state
                .lock()
                .unwrap()
                .endpoints
                .insert((ns.into(), svc.into(), port_name.into()), port);
        }

        /// Every non-GET request so far, as `METHOD resource ns/name`.
        pub fn writes(&self) -> Vec<String> {
            self.state.lock().unwrap().writes.clone()
        }
    }
}

use mock_kube::MockKubeApiServer;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64")
}

fn init_ca(dir: &Path) -> RootCa {
    RootCa::init(
        dir,
        &TrustDomain::new("mesh.test").unwrap(),
        &Validity::default(),
    )
    .expect("ca init")
}

fn issue(ca: &RootCa, name: &str, id: u32, out: &Path) -> ClusterDir {
    ca.issue_cluster(&ClusterRequest::new(name, id, out).unwrap())
        .expect("issue cluster")
}

/// One cluster: its certificates and its mock API with the objects the chart would have made.
struct Cluster {
    dir: ClusterDir,
    mock: MockKubeApiServer,
    /// The etcd NodePort (remote nodes dial `https://127.0.0.1:<node_port>`).
    node_port: u16,
}

async fn cluster(dir: ClusterDir, pod_cidr: &str) -> Cluster {
    let mock = MockKubeApiServer::start().await;
    let node_port = free_port();
    let name = dir.info.name.to_string();
    let id = dir.info.id.get();
    let labels =
        json!({"app.kubernetes.io/part-of": "clustermesh", "clustermesh.io/cluster-name": name});
    mock.seed(
        "configmaps",
        json!({"metadata": {"name": MESH_INFO, "namespace": NS, "labels": labels},
            "data": {
                "cluster-name": name, "cluster-id": id.to_string(), "max-connected-clusters": "255",
                "etcd-service": "clustermesh-apiserver", "etcd-service-port": "etcd", "etcd-endpoints": "",
                "remote-tls-secret": REMOTE_TLS, "remote-tls-keys": "ca-bundle.pem,remote.crt,remote.key",
                "remotes-secret": REMOTES,
                "status-service": STATUS_SVC, "status-service-port": "status"}}),
    );
    // The Secret the certgen Job stores for node-sync (same keys).
    let mut data = serde_json::Map::new();
    for f in [
        "cluster.json",
        "ca-bundle.pem",
        "node.crt",
        "node.key",
        "remote.crt",
        "remote.key",
    ] {
        data.insert(
            f.into(),
            json!(b64(&std::fs::read(dir.path.join(f)).unwrap())),
        );
    }
    mock.seed(
        "secrets",
        json!({"metadata": {"name": REMOTE_TLS, "namespace": NS, "labels": labels},
            "type": "Opaque", "data": data}),
    );
    mock.seed(
        "services",
        json!({"metadata": {"name": "clustermesh-apiserver", "namespace": NS},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
                {"name": "etcd", "port": 2379, "targetPort": "etcd", "protocol": "TCP", "nodePort": node_port},
                {"name": "grpc", "port": 9443, "targetPort": "grpc", "protocol": "TCP", "nodePort": 31443}]},
            "status": {"loadBalancer": {}}}),
    );
    mock.seed(
        "nodes",
        json!({"metadata": {"name": format!("{name}-control-plane")},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": format!("{name}-control-plane")}]}}),
    );
    Cluster {
        dir,
        mock,
        node_port,
    }
}

/// A kubeconfig with one context per cluster, named after the cluster.
fn kubeconfig(dir: &Path, clusters: &[&Cluster]) -> PathBuf {
    let mut s = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for c in clusters {
        s += &format!(
            "- name: {n}\n  cluster:\n    server: {}\n",
            c.mock.url,
            n = c.dir.info.name
        );
    }
    s += "contexts:\n";
    for c in clusters {
        s += &format!(
            "- name: {n}\n  context:\n    cluster: {n}\n    user: {n}-admin\n",
            n = c.dir.info.name
        );
    }
    s += "users:\n";
    for c in clusters {
        s += &format!(
            "- name: {}-admin\n  user:\n    token: test\n",
            c.dir.info.name
        );
    }
    s += &format!("current-context: {}\n", clusters[0].dir.info.name);
    let p = dir.join("kubeconfig");
    std::fs::write(&p, s).unwrap();
    p
}

async fn clustermesh(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("CLUSTERMESH_TLS_DIR")
        .env_remove("CLUSTERMESH_DESTINATION_TLS_DIR")
        .output()
        .await
        .expect("run clustermesh")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn kc(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn remotes_keys(c: &Cluster) -> Vec<String> {
    c.mock
        .get("secrets", NS, REMOTES)
        .map(|s| {
            s["data"]
                .as_object()
                .map(|d| d.keys().cloned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_writes_each_side_once_and_disconnect_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let c1 = cluster(issue(&ca, "c1", 1, &tmp.path().join("c1")), "10.1.0.0/16").await;
    let c2 = cluster(issue(&ca, "c2", 2, &tmp.path().join("c2")), "10.2.0.0/16").await;
    let kcfg = kubeconfig(tmp.path(), &[&c1, &c2]);
    let args = [
        "--kubeconfig",
        kc(&kcfg),
        "--context",
        "c1",
        "--destination-context",
        "c2",
    ];

    let out = clustermesh(&[&["connect"][..], &args].concat()).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "✔ reachable: c1 (id 1) and c2 (id 2) answer",
        "✔ cluster ids: 1 and 2 are distinct",
        "✔ maxConnectedClusters: 255 on both",
        "✔ trust: shared root",
        "✔ cidrs: no overlapping pod or service CIDRs",
        "✔ static remotes: no static remote of the same name",
        &format!(
            "✔ c2 registered at c1 (secret clustermesh/{REMOTES} in context c1: https://127.0.0.1:{})",
            c2.node_port
        ),
        "✔ c1 registered at c2",
        "connected",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // Each side holds the other's entry: remote file plus that cluster's CA bundle and read-only cert.
    assert_eq!(
        remotes_keys(&c1),
        [
            "c2.ca-bundle.pem",
            "c2.remote.crt",
            "c2.remote.key",
            "c2.yaml"
        ]
    );
    assert_eq!(
        remotes_keys(&c2),
        [
            "c1.ca-bundle.pem",
            "c1.remote.crt",
            "c1.remote.key",
            "c1.yaml"
        ]
    );
    let s1 = c1.mock.get("secrets", NS, REMOTES).unwrap();
    assert_eq!(
        unb64(&s1["data"]["c2.remote.crt"]),
        std::fs::read(c2.dir.cert(Role::Remote)).unwrap(),
        "c1 reaches c2 with c2's own read-only remote certificate"
    );
    assert_eq!(
        unb64(&s1["data"]["c2.ca-bundle.pem"]),
        std::fs::read(c2.dir.ca_bundle()).unwrap()
    );
    let yaml = String::from_utf8(unb64(&s1["data"]["c2.yaml"])).unwrap();
    let src = node_sync::cluster::parse_remote_file(
        Path::new("/etc/clustermesh/remotes/c2.yaml"),
        &yaml,
        None,
    )
    .unwrap_or_else(|e| panic!("node-sync refuses the written file: {e}\n{yaml}"));
    assert_eq!(
        src.endpoints,
        [format!("https://127.0.0.1:{}", c2.node_port)]
    );
    assert_eq!(src.expected_id.map(|i| i.get()), Some(2));
    assert_eq!(
        s1["metadata"]["labels"]["app.kubernetes.io/part-of"],
        json!("clustermesh")
    );
    let w1 = c1.mock.writes();
    let w2 = c2.mock.writes();
    assert_eq!(w1, [format!("POST secrets {NS}/")]);
    assert_eq!(w2, [format!("POST secrets {NS}/")]);

    // Twice: every registration unchanged, and no request writes anything.
    let out = clustermesh(&[&["connect"][..], &args].concat()).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches(" unchanged").count(), 2, "{stdout}");
    assert_eq!(c1.mock.writes(), w1, "second connect wrote to c1");
    assert_eq!(c2.mock.writes(), w2, "second connect wrote to c2");

    // JSON output: the same checks and registrations, for scripts.
    let out = clustermesh(&[&["connect", "-o", "json"][..], &args].concat()).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["registrations"][0], json!(["c1 -> c2", false]));
    assert_eq!(report["checks"][2]["verdict"], json!("ok"));

    // A third cluster's entry at c1 survives disconnecting c2.
    let mut s = c1.mock.get("secrets", NS, REMOTES).unwrap();
    s["data"]["c3.yaml"] = json!(b64(b"name: c3\nendpoints: [\"http://127.0.0.1:1\"]\n"));
    c1.mock.seed("secrets", s);

    // Someone else writes c1's Secret between disconnect's read and its write: the 409 is retried
    // from a fresh read, and the other writer's change is kept.
    c1.mock.race_next_get("secrets", NS, REMOTES);
    let before = c1.mock.writes().len();
    let out = clustermesh(&[&["disconnect"][..], &args].concat()).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("✔ c2 unregistered at c1"), "{stdout}");
    assert!(stdout.contains("✔ c1 unregistered at c2"), "{stdout}");
    assert_eq!(remotes_keys(&c1), ["c3.yaml"]);
    assert!(remotes_keys(&c2).is_empty());
    let (w1, w2) = (c1.mock.writes(), c2.mock.writes());
    assert_eq!(
        w1[before..],
        [
            format!("PUT secrets {NS}/{REMOTES}"),
            format!("PUT secrets {NS}/{REMOTES}")
        ],
        "one PUT refused with 409, one retried"
    );
    assert_eq!(
        c1.mock.get("secrets", NS, REMOTES).unwrap()["metadata"]["annotations"]["touched-by"],
        json!("someone else")
    );
    let out = clustermesh(&[&["disconnect"][..], &args].concat()).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert_eq!(
        stdout.matches("(was not registered)").count(),
        2,
        "{stdout}"
    );
    assert_eq!((c1.mock.writes(), c2.mock.writes()), (w1, w2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_preflights_write_nothing_and_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let other_ca = init_ca(&tmp.path().join("other-ca"));
    let c1 = cluster(issue(&ca, "c1", 1, &tmp.path().join("c1")), "10.1.0.0/16").await;
    let c3 = cluster(issue(&ca, "c3", 1, &tmp.path().join("c3")), "10.3.0.0/16").await;
    let c4 = cluster(
        issue(&other_ca, "c4", 4, &tmp.path().join("c4")),
        "10.1.128.0/17",
    )
    .await;
    let kcfg = kubeconfig(tmp.path(), &[&c1, &c3, &c4]);
    // c3 is also a static remote of c1 (chart value clustermesh.config.clusters).
    c1.mock.seed(
        "configmaps",
        json!({"metadata": {"name": REMOTES, "namespace": NS},
            "data": {"c3.yaml": "name: c3\nendpoints: [\"https://127.0.0.1:1\"]\n"}}),
    );
    let connect = |b: &'static str, extra: &'static [&'static str]| {
        let kcfg = kcfg.clone();
        async move {
            let mut a = vec![
                "connect".to_owned(),
                "--kubeconfig".into(),
                kc(&kcfg).into(),
                "--context".into(),
                "c1".into(),
                "--destination-context".into(),
                b.into(),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            clustermesh(&refs).await
        }
    };

    // Duplicate cluster id.
    let out = connect("c3", &[]).await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("✘ cluster ids: c1 and c3 both have cluster id 1; ids must be unique"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("✘ static remotes: c3 is already a static remote of c1 (configmap {NS}/{REMOTES} key c3.yaml")),
        "{stdout}"
    );
    assert!(
        stderr.contains("preflight failed; nothing was changed"),
        "{stderr}"
    );
    // No shared root without --federate (and overlapping pod CIDRs are warned about).
    let out = connect("c4", &[]).await;
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    assert!(
        stdout.contains("✘ trust: no shared root") && stdout.contains("--federate"),
        "{stdout}"
    );
    assert!(
        stdout.contains("! cidrs: overlapping CIDRs 10.1.0.0/16~10.1.128.0/17"),
        "{stdout}"
    );
    for c in [&c1, &c3, &c4] {
        assert!(
            c.mock.writes().is_empty(),
            "{}: {:?}",
            c.dir.info.name,
            c.mock.writes()
        );
    }
    // With --federate and --unidirectional: only c1 learns c4 (each entry carries c4's own bundle).
    let out = connect("c4", &["--federate", "--unidirectional"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("! trust: no shared root"), "{stdout}");
    assert_eq!(remotes_keys(&c1).len(), 4);
    assert!(c4.mock.writes().is_empty(), "{:?}", c4.mock.writes());

    // A cluster without the chart: the error names the context and the object.
    let empty = MockKubeApiServer::start().await;
    let mut bare = cluster(issue(&ca, "c9", 9, &tmp.path().join("c9")), "10.9.0.0/16").await;
    bare.mock = empty;
    let kcfg9 = kubeconfig(&tmp.path().join("c9"), &[&c1, &bare]);
    let out = clustermesh(&[
        "connect",
        "--kubeconfig",
        kc(&kcfg9),
        "--context",
        "c1",
        "--destination-context",
        "c9",
    ])
    .await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("context c9: configmap clustermesh/clustermesh-mesh-info not found"),
        "{stderr}"
    );
    let out = clustermesh(&[
        "connect",
        "--kubeconfig",
        kc(&kcfg9),
        "--context",
        "c1",
        "--destination-context",
        "nope",
    ])
    .await;
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("context nope: not in the kubeconfig (contexts: c1, c9)"),
        "{stderr}"
    );
}

/// Lay out a Secret's data as kubelet does for a volume: the files in a timestamped directory,
/// `..data` pointing at it, and one symlink per key at the top.
fn materialize_like_kubelet(secret: &Value, dir: &Path) {
    let stamp = dir.join("..2026_11_23_18_00_00.000000001");
    std::fs::create_dir_all(&stamp).unwrap();
    for (k, v) in secret["data"].as_object().unwrap() {
        std::fs::write(stamp.join(k), unb64(v)).unwrap();
    }
    std::os::unix::fs::symlink(stamp.file_name().unwrap(), dir.join("..data")).unwrap();
    for k in secret["data"].as_object().unwrap().keys() {
        std::os::unix::fs::symlink(Path::new("..data").join(k), dir.join(k)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_written_secret_lets_node_sync_reach_the_remote_etcd_over_mtls() {
    assert!(
        Path::new(etcd::DEFAULT_ETCD_BINARY).exists(),
        "this test needs etcd at {} (Debian package etcd-server)",
        etcd::DEFAULT_ETCD_BINARY
    );
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let c1 = cluster(issue(&ca, "c1", 1, &tmp.path().join("c1")), "10.1.0.0/16").await;
    let c2 = cluster(issue(&ca, "c2", 2, &tmp.path().join("c2")), "10.2.0.0/16").await;
    // c2's etcd listens where c2's NodePort says (kind: node address + node port).
    let url = format!("https://127.0.0.1:{}", c2.node_port);
    let mut etcd2 = EtcdSpec::for_cluster(
        &c2.dir,
        tmp.path().join("etcd-c2"),
        url.clone(),
        format!("http://127.0.0.1:{}", free_port()),
    )
    .spawn(Duration::from_secs(30))
    .await
    .expect("etcd of c2 starts with TLS and --client-cert-auth");
    let eps = etcd2.endpoints();
    // The apiserver's secure bootstrap; it creates the read-only user of c2's own remote
    // certificate, which connect hands to c1.
    let mut root = EtcdAuthAdmin::connect(&eps, &c2.dir.tls_files(Role::EtcdRoot))
        .await
        .unwrap();
    root.bootstrap(&c2.dir.info.name).await.unwrap();
    let mut admin = etcd::connect_as(&c2.dir, Role::Admin, &eps).await.unwrap();
    admin
        .put(
            "clustermesh/v1/cluster-config/c2",
            "{\"name\":\"c2\"}",
            None,
        )
        .await
        .unwrap();

    let kcfg = kubeconfig(tmp.path(), &[&c1, &c2]);
    let out = clustermesh(&[
        "connect",
        "--kubeconfig",
        kc(&kcfg),
        "--context",
        "c1",
        "--destination-context",
        "c2",
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // c1's remotes Secret as node-sync sees it at --remote-config-dir.
    let remotes = tmp.path().join("remotes");
    std::fs::create_dir_all(&remotes).unwrap();
    materialize_like_kubelet(&c1.mock.get("secrets", NS, REMOTES).unwrap(), &remotes);
    let (sources, errors) = node_sync::cluster::read_remote_dir(&remotes, None);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<String> = sources.keys().map(ToString::to_string).collect();
    assert_eq!(names, ["c2"]);
    let src = sources.values().next().unwrap();
    assert_eq!(src.endpoints, [url]);
    let tls = src.tls.as_ref().expect("https endpoints carry TLS files");
    assert_eq!(tls.cert, remotes.join("c2.remote.crt"));

    // Real mTLS with those files: c2's etcd accepts c2's read-only certificate and refuses writes.
    let mut client = node_sync::connect::connect(src, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| {
            panic!("node-sync cannot reach c2's etcd with the Secret's files: {e}")
        });
    let got = client
        .get("clustermesh/v1/cluster-config/c2", None)
        .await
        .expect("the remote certificate reads the mesh prefix");
    assert_eq!(got.kvs()[0].value_str().unwrap(), "{\"name\":\"c2\"}");
    let e = client
        .put("clustermesh/v1/services/c2/x", "{}", None)
        .await
        .expect_err("the remote certificate is read-only");
    assert!(e.to_string().contains("permission denied"), "{e}");
    // The files carry no one else's identity: without them, c2's etcd refuses the handshake.
    let mut foreign = src.clone();
    if let Some(t) = foreign.tls.as_mut() {
        t.cert = c1.dir.cert(Role::Node);
        t.key = c1.dir.key(Role::Node);
    }
    let refused = async {
        let mut c = node_sync::connect::connect(&foreign, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        c.get("clustermesh/v1/cluster-config/c2", None)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(
        refused.is_err(),
        "node-c1 has no user in c2's etcd: {refused:?}"
    );
    etcd2.stop();
}

/// A cluster's apiserver status endpoint as node-sync would make it look: its `nodes` nodes report
/// a remote connected and synced once that remote's entry is in the cluster's remotes Secret (as
/// node-sync picks up its --remote-config-dir), unless `stuck`. The status is the real
/// `MeshStatus::compute` of mesh-model, served at `/api/v1/status` like the apiserver's.
async fn status_endpoint(c: &Cluster, nodes: usize, stuck: bool) -> u16 {
    use mesh_model::status::{ApiserverState, MeshStatus};
    use mesh_model::values::{Capabilities, ClusterConfig, NodeStatus, RemoteState};
    let mock = c.mock.clone();
    let name = c.dir.info.name.clone();
    let id = c.dir.info.id;
    let app = axum::Router::new().route(
        "/api/v1/status",
        axum::routing::get(move || {
            let mock = mock.clone();
            let name = name.clone();
            async move {
                let registered: Vec<String> = mock
                    .get("secrets", NS, REMOTES)
                    .and_then(|s| s["data"].as_object().cloned())
                    .map(|d| {
                        d.keys()
                            .filter_map(|k| k.strip_suffix(".yaml").map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let now = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                let node_reports = (0..nodes)
                    .map(|i| NodeStatus {
                        cluster: name.clone(),
                        node: format!("{name}-n{i}"),
                        updated_at: now.clone(),
                        remotes: registered
                            .iter()
                            .map(|r| RemoteState {
                                name: mesh_model::ClusterName::new(r).unwrap(),
                                connected: !stuck,
                                synced: !stuck,
                                heartbeat_age_ms: Some(200),
                                stale_since: None,
                                keys: 4,
                                error: stuck.then(|| "connection refused".to_owned()),
                            })
                            .collect(),
                        services: 0,
                        service_states: vec![],
                        failovers: vec![],
                        golden_signals: vec![],
                        cert_warnings: vec![],
                    })
                    .collect();
                let st = MeshStatus::compute(
                    ClusterConfig {
                        name: name.clone(),
                        id,
                        max_connected_clusters: Default::default(),
                        capabilities: Capabilities::default(),
                        ca_fingerprints: vec![],
                    },
                    ApiserverState {
                        replica: format!("{name}-apiserver-0"),
                        is_leader: true,
                        ready: true,
                        etcd_healthy: true,
                        ..Default::default()
                    },
                    &[],
                    node_reports,
                    nodes,
                    now,
                );
                axum::Json(st)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    c.mock.endpoint(NS, STATUS_SVC, "status", port);
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_and_status_read_each_apiserver_through_the_service_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_ca(&tmp.path().join("ca"));
    let c1 = cluster(issue(&ca, "c1", 1, &tmp.path().join("c1")), "10.1.0.0/16").await;
    let c2 = cluster(issue(&ca, "c2", 2, &tmp.path().join("c2")), "10.2.0.0/16").await;
    let c3 = cluster(issue(&ca, "c3", 3, &tmp.path().join("c3")), "10.3.0.0/16").await;
    let kcfg = kubeconfig(tmp.path(), &[&c1, &c2, &c3]);
    status_endpoint(&c1, 2, false).await;
    status_endpoint(&c2, 3, false).await;
    status_endpoint(&c3, 2, true).await;

    // Before connect, c1's status has no remote: healthy, exit 0, read through the proxy.
    let out = clustermesh(&[
        "status",
        "--kubeconfig",
        kc(&kcfg),
        "--context",
        "c1",
        "-o",
        "json",
    ])
    .await;
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let st: Value = serde_json::from_str(&o).unwrap();
    assert_eq!(st["cluster"]["name"], "c1");
    assert_eq!(st["remotes"].as_array().unwrap().len(), 0);

    // connect --wait: the nodes pick the Secret up; connect reports every node of each side.
    let out = clustermesh(&[
        "connect",
        "--kubeconfig",
        kc(&kcfg),
        "--context",
        "c1",
        "--destination-context",
        "c2",
        "--wait",
        "--wait-timeout",
        "20s",
    ])
    .await;
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        o.contains("✔ c1: 2/2 nodes connected to c2, 2/2 synced"),
        "{o}"
    );
    assert!(
        o.contains("✔ c2: 3/3 nodes connected to c1, 3/3 synced"),
        "{o}"
    );
    let out = clustermesh(&["status", "--kubeconfig", kc(&kcfg), "--context", "c2"]).await;
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        o.contains("All 3 nodes are connected to all clusters [1 remotes]"),
        "{o}"
    );

    // c3's nodes never connect: --wait gives up at its timeout, says so, exits non-zero; the
    // registration stays (it is not undone), and status names the problem with exit 2.
    let out = clustermesh(&[
        "connect",
        "--kubeconfig",
        kc(&kcfg),
        "--context",
        "c3",
        "--destination-context",
        "c1",
        "--unidirectional",
        "--wait",
        "--wait-timeout",
        "2s",
    ])
    .await;
    let (o, e) = text(&out);
    assert!(!out.status.success(), "{o}\n{e}");
    assert!(
        o.contains("… c3: 0/2 nodes connected to c1, 0/2 synced"),
        "{o}"
    );
    assert!(e.contains("timed out after 2s"), "{e}");
    let out = clustermesh(&["status", "--kubeconfig", kc(&kcfg), "--context", "c3"]).await;
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(o.contains("connection refused"), "{o}");

    // A cluster whose status Service has no endpoint: the error names the context and service.
    let c4 = cluster(issue(&ca, "c4", 4, &tmp.path().join("c4")), "10.4.0.0/16").await;
    let kcfg = kubeconfig(tmp.path(), &[&c1, &c4]);
    let out = clustermesh(&["status", "--kubeconfig", kc(&kcfg), "--context", "c4"]).await;
    let (o, e) = text(&out);
    assert!(!out.status.success(), "{o}\n{e}");
    assert!(
        e.contains("context c4") && e.contains(STATUS_SVC) && e.contains("no endpoints available"),
        "{e}"
    );
}
