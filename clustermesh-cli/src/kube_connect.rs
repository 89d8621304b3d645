//! `clustermesh connect --context A --destination-context B` (and `disconnect`): the registration of
//! the gRPC mode ([`crate::connect`]) written as Secrets through the Kubernetes API, as Cilium's
//! `cilium clustermesh connect --context --destination-context` does.
//!
//! What each cluster publishes (the chart renders it; `templates/mesh-info.yaml`): the ConfigMap
//! `<fullname>-mesh-info` in the release namespace, with
//!
//! | key | meaning |
//! |---|---|
//! | `cluster-name`, `cluster-id`, `max-connected-clusters` | the cluster's identity |
//! | `etcd-endpoints` | comma-separated etcd URLs remote nodes use (external etcd); empty: derive them from `etcd-service` |
//! | `etcd-service`, `etcd-service-port` | the Service in front of the managed etcd and its port name: a LoadBalancer's ingress addresses, or every node's InternalIP with the NodePort |
//! | `remote-tls-secret`, `remote-tls-keys` | the Secret with the cluster's read-only `remote` client certificate and the keys of its CA bundle, certificate and key |
//! | `remotes-secret` | the Secret node-sync mounts (with the static-remotes ConfigMap) as `--remote-config-dir` |
//! | `status-service`, `status-service-port` | the Service and port name of the apiserver's status endpoint, read through the Kubernetes API server's service proxy (`connect --wait`, `status --context`) |
//!
//! Connecting A to B reads both, runs the same [`preflight`] as the gRPC mode, and (when it passes)
//! writes into A's remotes Secret the entry of B: `B.yaml` (a node-sync remote file: name, id,
//! endpoints and TLS file names relative to the config dir), `B.ca-bundle.pem`, `B.remote.crt` and
//! `B.remote.key` (B's read-only remote certificate, user `remote-B` of B's etcd, which every etcd
//! bootstrap creates read-only); and the reverse into B's unless `--unidirectional`. Each entry carries its cluster's own CA bundle and
//! certificate, so no trust has to be installed elsewhere; `--federate` only lets the preflight pass
//! without a shared root. A Secret whose entries already hold these bytes is not written (running
//! connect twice changes nothing); a conflicting concurrent write (409) is retried from a fresh read.
//! With `--wait`, connect then polls each side's mesh status (the apiserver's `/api/v1/status`
//! through `GET /api/v1/namespaces/<ns>/services/<status-service>:<port>/proxy/api/v1/status`)
//! until every node reports the other cluster connected and synced.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clustermesh_api::pb::ClusterInfo;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mesh_certs::TrustBundle;
pub use mesh_model::remotes::{RemoteTls, entry_keys};
use mesh_model::status::MeshStatus;

use crate::connect::{
    Check, ConnectOptions, ConnectReport, StatusSource, Verdict, preflight, status_of,
    wait_all_connected,
};

/// Where the chart is installed and which kubeconfig to read.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// kubeconfig file; `None`: `$KUBECONFIG` (a list of files is merged), else `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the clustermesh release in both clusters.
    pub namespace: String,
    /// Helm release name in both clusters (object names derive from it as the chart's `clustermesh.fullname`).
    pub release: String,
}

/// The chart's `clustermesh.fullname`: the release name when it contains the chart name, else
/// `<release>-clustermesh`; at most 40 characters, no trailing `-`.
pub fn fullname(release: &str) -> String {
    let s = if release.contains("clustermesh") {
        release.to_owned()
    } else {
        format!("{release}-clustermesh")
    };
    s.chars()
        .take(40)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

/// Name of the ConfigMap a cluster publishes for `connect --context`.
pub fn mesh_info_name(release: &str) -> String {
    format!("{}-mesh-info", fullname(release))
}

/// What a cluster publishes in its mesh-info ConfigMap (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshInfo {
    /// Cluster name.
    pub cluster_name: String,
    /// Cluster id.
    pub cluster_id: u32,
    /// maxConnectedClusters.
    pub max_connected_clusters: u32,
    /// Explicit etcd URLs for remote nodes (external etcd); empty: derived from the Service.
    pub etcd_endpoints: Vec<String>,
    /// The Service in front of the managed etcd.
    pub etcd_service: Option<String>,
    /// Name of the etcd port of that Service.
    pub etcd_service_port: String,
    /// Secret holding the read-only remote client certificate.
    pub remote_tls_secret: String,
    /// Its keys: CA bundle, certificate, key.
    pub remote_tls_keys: [String; 3],
    /// The Secret node-sync mounts at `--remote-config-dir` (written by connect).
    pub remotes_secret: String,
    /// The Service in front of the apiserver's status endpoint (`None`: status not reachable
    /// through Kubernetes).
    pub status_service: Option<String>,
    /// Name of its port.
    pub status_service_port: String,
}

impl MeshInfo {
    /// Parse the ConfigMap's data; the error names the key.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| {
            data.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("key {k:?} is missing or empty"))
        };
        let num = |k: &str| -> Result<u32, String> {
            let v = get(k)?;
            v.parse()
                .map_err(|_| format!("key {k:?}: {v:?} is not a number"))
        };
        let keys: Vec<String> = get("remote-tls-keys")?
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        let remote_tls_keys: [String; 3] = keys.try_into().map_err(|k: Vec<String>| {
            format!(
                "key \"remote-tls-keys\": want 3 comma-separated keys (CA bundle, certificate, key), got {}",
                k.len()
            )
        })?;
        let etcd_endpoints: Vec<String> = data
            .get("etcd-endpoints")
            .map(|s| {
                s.split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let etcd_service = data
            .get("etcd-service")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if etcd_endpoints.is_empty() && etcd_service.is_none() {
            return Err("neither \"etcd-endpoints\" nor \"etcd-service\" is set".into());
        }
        Ok(Self {
            cluster_name: get("cluster-name")?,
            cluster_id: num("cluster-id")?,
            max_connected_clusters: num("max-connected-clusters")?,
            etcd_endpoints,
            etcd_service,
            etcd_service_port: data
                .get("etcd-service-port")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "etcd".to_owned()),
            remote_tls_secret: get("remote-tls-secret")?,
            remote_tls_keys,
            remotes_secret: get("remotes-secret")?,
            status_service: data
                .get("status-service")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            status_service_port: data
                .get("status-service-port")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "status".to_owned()),
        })
    }
}

/// One side, read through its kubeconfig context.
pub struct KubeCluster {
    /// The kubeconfig context.
    pub context: String,
    /// The release namespace.
    pub namespace: String,
    /// What the mesh-info ConfigMap says.
    pub mesh: MeshInfo,
    /// The same facts as the gRPC mode's `GetClusterInfo`, for [`preflight`].
    pub info: ClusterInfo,
    /// The cluster's read-only remote credentials.
    pub remote_tls: RemoteTls,
    client: Client,
}

/// A Kubernetes client for one context of the kubeconfig.
pub async fn client_for(opts: &KubeOptions, context: &str) -> Result<Client> {
    let kc = match &opts.kubeconfig {
        Some(p) => Kubeconfig::read_from(p)
            .with_context(|| format!("reading kubeconfig {}", p.display()))?,
        None => Kubeconfig::read()
            .context("reading the kubeconfig ($KUBECONFIG, else ~/.kube/config)")?,
    };
    if !kc.contexts.iter().any(|c| c.name == context) {
        let have: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "context {context}: not in the kubeconfig (contexts: {})",
            have.join(", ")
        );
    }
    let mut config = Config::from_custom_kubeconfig(
        kc,
        &KubeConfigOptions {
            context: Some(context.to_owned()),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("context {context}"))?;
    // kube's default retries 429/503/504 up to 15 times with backoff growing to minutes: a
    // command would sit silent for minutes on a "no endpoints available" 503. Errors are
    // reported at once instead; `--wait` polls again until its own deadline.
    config.default_retry = false;
    Client::try_from(config).with_context(|| format!("context {context}: building the client"))
}

fn kube_err(context: &str, what: &str, ns: &str, name: &str, e: kube::Error) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 => {
            anyhow!("context {context}: {what} {ns}/{name} not found")
        }
        _ => anyhow!("context {context}: {what} {ns}/{name}: {e}"),
    }
}

fn secret_key<'a>(
    context: &str,
    s: &'a Secret,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<&'a [u8]> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| anyhow!("context {context}: secret {ns}/{name} has no key {key:?}"))
}

/// A cluster's client and mesh-info ConfigMap, through `context`.
async fn open_mesh_info(opts: &KubeOptions, context: &str) -> Result<(Client, MeshInfo)> {
    let client = client_for(opts, context).await?;
    let ns = opts.namespace.as_str();
    let cm_name = mesh_info_name(&opts.release);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms
        .get(&cm_name)
        .await
        .map_err(|e| kube_err(context, "configmap", ns, &cm_name, e))?;
    let mesh = MeshInfo::from_data(&cm.data.unwrap_or_default())
        .map_err(|e| anyhow!("context {context}: configmap {ns}/{cm_name}: {e}"))?;
    Ok((client, mesh))
}

/// The mesh status of a cluster: its apiserver's `/api/v1/status`, through the Kubernetes API
/// server's service proxy to the `status-service` of its mesh-info.
async fn proxied_status(
    client: &Client,
    context: &str,
    ns: &str,
    mesh: &MeshInfo,
) -> Result<MeshStatus> {
    let svc = mesh.status_service.as_deref().ok_or_else(|| {
        anyhow!(
            "context {context}: the mesh-info ConfigMap names no status-service (chart too old?)"
        )
    })?;
    let path = format!(
        "/api/v1/namespaces/{ns}/services/{svc}:{}/proxy/api/v1/status",
        mesh.status_service_port
    );
    let req = http::Request::get(&path)
        .body(Vec::new())
        .with_context(|| format!("context {context}: GET {path}"))?;
    let text = client
        .request_text(req)
        .await
        .map_err(|e| kube_err(context, "status through service", ns, svc, e))?;
    serde_json::from_str(&text).with_context(|| {
        format!("context {context}: service {ns}/{svc}: the answer of {path} is not a mesh status")
    })
}

/// A cluster's mesh status through `context` (`clustermesh status --context`); with `wait`,
/// polled until healthy or until `wait` passes.
pub async fn status(
    opts: &KubeOptions,
    context: &str,
    wait: Option<Duration>,
) -> Result<MeshStatus> {
    let (client, mesh) = open_mesh_info(opts, context).await?;
    let mut source = ProxiedStatus {
        client,
        context: context.to_owned(),
        namespace: opts.namespace.clone(),
        mesh,
    };
    status_of(&mut source, wait).await
}

/// A cluster's status through the service proxy, as a [`StatusSource`].
struct ProxiedStatus {
    client: Client,
    context: String,
    namespace: String,
    mesh: MeshInfo,
}

impl StatusSource for ProxiedStatus {
    fn cluster_name(&self) -> &str {
        &self.mesh.cluster_name
    }
    async fn mesh_status(&mut self) -> Result<MeshStatus> {
        proxied_status(&self.client, &self.context, &self.namespace, &self.mesh).await
    }
}

impl StatusSource for &KubeCluster {
    fn cluster_name(&self) -> &str {
        &self.info.name
    }
    async fn mesh_status(&mut self) -> Result<MeshStatus> {
        proxied_status(&self.client, &self.context, &self.namespace, &self.mesh).await
    }
}

/// Read what a cluster publishes through `context`.
pub async fn open_context(opts: &KubeOptions, context: &str) -> Result<KubeCluster> {
    let (client, mesh) = open_mesh_info(opts, context).await?;
    let ns = opts.namespace.as_str();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let tls_name = &mesh.remote_tls_secret;
    let s = secrets
        .get(tls_name)
        .await
        .map_err(|e| kube_err(context, "secret", ns, tls_name, e))?;
    let [ca_k, cert_k, key_k] = &mesh.remote_tls_keys;
    let remote_tls = RemoteTls {
        ca_bundle: secret_key(context, &s, ns, tls_name, ca_k)?.to_vec(),
        cert: secret_key(context, &s, ns, tls_name, cert_k)?.to_vec(),
        key: secret_key(context, &s, ns, tls_name, key_k)?.to_vec(),
    };
    let bundle_path = PathBuf::from(format!("secret {ns}/{tls_name} key {ca_k}"));
    let roots = mesh_certs::files::parse_certs(&bundle_path, &remote_tls.ca_bundle)
        .map_err(|e| anyhow!("context {context}: {e}"))?;
    let ca_fingerprints = TrustBundle::new(roots)
        .fingerprints()
        .iter()
        .map(mesh_certs::Fingerprint::hex)
        .collect();
    let (etcd_endpoints, pod_cidrs) = endpoints_and_cidrs(&client, context, ns, &mesh).await?;
    let info = ClusterInfo {
        name: mesh.cluster_name.clone(),
        id: mesh.cluster_id,
        max_connected_clusters: mesh.max_connected_clusters,
        etcd_endpoints,
        ca_fingerprints,
        ca_bundle_pem: String::from_utf8_lossy(&remote_tls.ca_bundle).into_owned(),
        pod_cidrs,
        ..Default::default()
    };
    Ok(KubeCluster {
        context: context.to_owned(),
        namespace: ns.to_owned(),
        mesh,
        info,
        remote_tls,
        client,
    })
}

/// The etcd URLs remote nodes use, and the nodes' pod CIDRs (for the overlap warning). Nodes are
/// read only when a NodePort needs their addresses; otherwise a refused node list leaves the CIDRs
/// unknown.
async fn endpoints_and_cidrs(
    client: &Client,
    context: &str,
    ns: &str,
    mesh: &MeshInfo,
) -> Result<(Vec<String>, Vec<String>)> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&ListParams::default()).await;
    let pod_cidrs = match &node_list {
        Ok(l) => {
            let mut v: Vec<String> = l
                .items
                .iter()
                .filter_map(|n| n.spec.as_ref())
                .flat_map(|s| {
                    s.pod_cidrs
                        .clone()
                        .unwrap_or_else(|| s.pod_cidr.clone().into_iter().collect())
                })
                .collect();
            v.sort();
            v.dedup();
            v
        }
        Err(_) => Vec::new(),
    };
    if !mesh.etcd_endpoints.is_empty() {
        return Ok((mesh.etcd_endpoints.clone(), pod_cidrs));
    }
    let svc_name = mesh.etcd_service.as_deref().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc = services
        .get(svc_name)
        .await
        .map_err(|e| kube_err(context, "service", ns, svc_name, e))?;
    let spec = svc.spec.unwrap_or_default();
    let ty = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
    let port = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some(mesh.etcd_service_port.as_str()))
        .ok_or_else(|| {
            anyhow!(
                "context {context}: service {ns}/{svc_name} has no port named {:?}",
                mesh.etcd_service_port
            )
        })?;
    let url = |host: &str, port: i32| {
        if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    };
    let endpoints: Vec<String> = match ty.as_str() {
        "LoadBalancer" => svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
            .map(|h| url(&h, port.port))
            .collect(),
        "NodePort" => {
            let node_port = port.node_port.ok_or_else(|| {
                anyhow!(
                    "context {context}: service {ns}/{svc_name}: port {:?} has no nodePort yet",
                    port.name
                )
            })?;
            let list = node_list.map_err(|e| kube_err(context, "nodes", "", "(list)", e))?;
            let mut v: Vec<String> = Vec::new();
            for n in &list.items {
                let addrs = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.clone())
                    .unwrap_or_default();
                let pick = addrs
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .or_else(|| addrs.iter().find(|a| a.type_ == "ExternalIP"));
                if let Some(a) = pick {
                    v.push(url(&a.address, node_port));
                }
            }
            v
        }
        other => bail!(
            "context {context}: service {ns}/{svc_name} is of type {other}: remote clusters cannot reach it \
             (install with apiserver.service.type=NodePort or LoadBalancer)"
        ),
    };
    if endpoints.is_empty() {
        bail!(
            "context {context}: service {ns}/{svc_name} ({ty}) has no address yet (no load balancer ingress or no node with an InternalIP)"
        );
    }
    Ok((endpoints, pod_cidrs))
}

/// The entry registering `remote` (pure): its remote file and credentials, keyed as in [`entry_keys`].
pub fn remote_entry(remote: &ClusterInfo, tls: &RemoteTls) -> BTreeMap<String, Vec<u8>> {
    mesh_model::remotes::entry(&remote.name, remote.id, &remote.etcd_endpoints, tls)
}

/// Replace `remote`'s entry in `data` with `entry` (`None`: remove it). Returns whether anything changed.
pub fn apply_entry(
    data: &mut BTreeMap<String, ByteString>,
    remote: &str,
    entry: Option<&BTreeMap<String, Vec<u8>>>,
) -> bool {
    let before = data.clone();
    for k in entry_keys(remote) {
        data.remove(&k);
    }
    if let Some(e) = entry {
        for (k, v) in e {
            data.insert(k.clone(), ByteString(v.clone()));
        }
    }
    *data != before
}

impl KubeCluster {
    /// Whether `remote` is already a static remote of this cluster (a `<remote>.yaml` key of the chart's
    /// static-remotes ConfigMap, which has the remotes Secret's name and shares its directory).
    pub async fn static_remote(&self, remote: &str) -> Result<Option<String>> {
        let ns = self.namespace.as_str();
        let name = self.mesh.remotes_secret.as_str();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let cm = api
            .get_opt(name)
            .await
            .map_err(|e| kube_err(&self.context, "configmap", ns, name, e))?;
        let key = format!("{remote}.yaml");
        Ok(cm
            .and_then(|c| c.data)
            .filter(|d| d.contains_key(&key))
            .map(|_| format!("configmap {ns}/{name} key {key}")))
    }

    /// Write (`Some`) or remove (`None`) `remote`'s entry in this cluster's remotes Secret; returns
    /// whether the Secret changed. Reads first and writes only a difference; a 409 (someone else
    /// wrote in between) is retried from a fresh read.
    pub async fn set_entry(
        &self,
        remote: &str,
        entry: Option<&BTreeMap<String, Vec<u8>>>,
    ) -> Result<bool> {
        let ns = self.namespace.as_str();
        let name = self.mesh.remotes_secret.as_str();
        let ctx = self.context.as_str();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        for _ in 0..5 {
            let current = api
                .get_opt(name)
                .await
                .map_err(|e| kube_err(ctx, "secret", ns, name, e))?;
            let result = match current {
                None => {
                    let mut data = BTreeMap::new();
                    if !apply_entry(&mut data, remote, entry) {
                        return Ok(false);
                    }
                    let s = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.to_owned()),
                            namespace: Some(ns.to_owned()),
                            labels: Some(BTreeMap::from([
                                ("app.kubernetes.io/part-of".into(), "clustermesh".into()),
                                ("app.kubernetes.io/component".into(), "node-sync".into()),
                                (
                                    "app.kubernetes.io/managed-by".into(),
                                    "clustermesh-connect".into(),
                                ),
                                (
                                    "clustermesh.io/cluster-name".into(),
                                    self.mesh.cluster_name.clone(),
                                ),
                            ])),
                            ..Default::default()
                        },
                        type_: Some("Opaque".into()),
                        data: Some(data),
                        ..Default::default()
                    };
                    api.create(&PostParams::default(), &s).await
                }
                Some(mut s) => {
                    let mut data = s.data.take().unwrap_or_default();
                    if !apply_entry(&mut data, remote, entry) {
                        return Ok(false);
                    }
                    s.data = Some(data);
                    // replace carries metadata.resourceVersion: a concurrent write answers 409.
                    api.replace(name, &PostParams::default(), &s).await
                }
            };
            match result {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(st)) if st.code == 409 => continue,
                Err(e) => return Err(kube_err(ctx, "writing secret", ns, name, e)),
            }
        }
        bail!("context {ctx}: secret {ns}/{name}: still conflicting after 5 attempts")
    }
}

/// Connect the clusters of contexts `a` and `b` (see the module docs). `progress` receives the
/// preflight verdicts and each registration as they happen. A failed preflight writes nothing.
pub async fn connect(
    a: &str,
    b: &str,
    opts: &KubeOptions,
    copts: &ConnectOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ConnectReport> {
    let ka = open_context(opts, a).await?;
    let kb = open_context(opts, b).await?;
    let mut checks = preflight(&ka.info, &kb.info, copts.federate);
    let mut pairs = vec![(&ka, &kb)];
    if !copts.unidirectional {
        pairs.push((&kb, &ka));
    }
    // Kubernetes only: a static remote of the same name would be a second file of that name in
    // node-sync's remote config dir.
    let mut statics = Vec::new();
    for (at, other) in &pairs {
        if let Some(found) = at.static_remote(&other.info.name).await? {
            statics.push(format!(
                "{} is already a static remote of {} ({found}, chart value clustermesh.config.clusters): remove it there first",
                other.info.name, at.info.name
            ));
        }
    }
    checks.push(if statics.is_empty() {
        Check::new(
            "static remotes",
            Verdict::Ok,
            "no static remote of the same name",
        )
    } else {
        Check::new("static remotes", Verdict::Fail, statics.join("; "))
    });
    for c in &checks {
        progress(&c.line());
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        bail!("preflight failed; nothing was changed");
    }
    let mut registrations = Vec::new();
    for (at, other) in pairs {
        let entry = remote_entry(&other.info, &other.remote_tls);
        let changed = at.set_entry(&other.info.name, Some(&entry)).await?;
        progress(&format!(
            "✔ {} registered at {} (secret {}/{} in context {}: {}){}",
            other.info.name,
            at.info.name,
            at.namespace,
            at.mesh.remotes_secret,
            at.context,
            other.info.etcd_endpoints.join(","),
            if changed { "" } else { " unchanged" }
        ));
        registrations.push((format!("{} -> {}", at.info.name, other.info.name), changed));
    }
    let mut synced = None;
    if let Some(timeout) = copts.wait {
        let mut sides = vec![(&ka, kb.info.name.clone())];
        if !copts.unidirectional {
            sides.push((&kb, ka.info.name.clone()));
        }
        synced = Some(wait_all_connected(sides, timeout, progress).await?);
    }
    Ok(ConnectReport {
        checks,
        registrations,
        synced,
    })
}

/// Remove each cluster's entry from the other's remotes Secret (only from A's with
/// `unidirectional`). Returns one line per side.
pub async fn disconnect(
    a: &str,
    b: &str,
    opts: &KubeOptions,
    unidirectional: bool,
) -> Result<Vec<String>> {
    let ka = open_context(opts, a).await?;
    let kb = open_context(opts, b).await?;
    let mut pairs = vec![(&ka, &kb)];
    if !unidirectional {
        pairs.push((&kb, &ka));
    }
    let mut lines = Vec::new();
    for (at, other) in pairs {
        let changed = at.set_entry(&other.info.name, None).await?;
        lines.push(format!(
            "✔ {} unregistered at {} (secret {}/{} in context {}){}",
            other.info.name,
            at.info.name,
            at.namespace,
            at.mesh.remotes_secret,
            at.context,
            if changed { "" } else { " (was not registered)" }
        ));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn good() -> BTreeMap<String, String> {
        data(&[
            ("cluster-name", "c1"),
            ("cluster-id", "1"),
            ("max-connected-clusters", "255"),
            ("etcd-service", "clustermesh-apiserver"),
            ("remote-tls-secret", "clustermesh-node-sync-tls"),
            ("remote-tls-keys", "ca-bundle.pem,remote.crt,remote.key"),
            ("remotes-secret", "clustermesh-node-sync-remotes"),
        ])
    }

    #[test]
    fn fullname_follows_the_chart_helper() {
        assert_eq!(fullname("clustermesh"), "clustermesh");
        assert_eq!(fullname("mesh"), "mesh-clustermesh");
        assert_eq!(mesh_info_name("clustermesh"), "clustermesh-mesh-info");
        assert_eq!(fullname(&"x".repeat(50)).len(), 40);
    }

    #[test]
    fn mesh_info_parses_or_names_the_key() {
        let m = MeshInfo::from_data(&good()).unwrap();
        assert_eq!(m.cluster_id, 1);
        assert_eq!(m.etcd_service_port, "etcd");
        assert_eq!(m.remote_tls_keys[1], "remote.crt");
        let mut d = good();
        d.insert("cluster-id".into(), "one".into());
        let e = MeshInfo::from_data(&d).unwrap_err();
        assert!(e.contains("cluster-id") && e.contains("\"one\""), "{e}");
        let mut d = good();
        d.remove("etcd-service");
        assert!(
            MeshInfo::from_data(&d)
                .unwrap_err()
                .contains("etcd-endpoints")
        );
        d.insert(
            "etcd-endpoints".into(),
            "https://a:2379, https://b:2379".into(),
        );
        assert_eq!(
            MeshInfo::from_data(&d).unwrap().etcd_endpoints,
            ["https://a:2379", "https://b:2379"]
        );
        let mut d = good();
        d.insert("remote-tls-keys".into(), "a,b".into());
        assert!(MeshInfo::from_data(&d).unwrap_err().contains("got 2"));
    }

    #[test]
    fn an_entry_is_a_remote_file_node_sync_accepts_with_relative_tls_files() {
        let info = ClusterInfo {
            name: "c2".into(),
            id: 2,
            etcd_endpoints: vec!["https://10.0.0.2:32379".into()],
            ..Default::default()
        };
        let tls = RemoteTls {
            ca_bundle: b"CA".to_vec(),
            cert: b"CRT".to_vec(),
            key: b"KEY".to_vec(),
        };
        let e = remote_entry(&info, &tls);
        assert_eq!(
            e.keys().cloned().collect::<Vec<_>>(),
            [
                "c2.ca-bundle.pem",
                "c2.remote.crt",
                "c2.remote.key",
                "c2.yaml"
            ]
        );
        let yaml = String::from_utf8(e["c2.yaml"].clone()).unwrap();
        assert!(yaml.contains("ca-file: c2.ca-bundle.pem"), "{yaml}");
        let mut d = BTreeMap::new();
        assert!(apply_entry(&mut d, "c2", Some(&e)));
        assert!(
            !apply_entry(&mut d, "c2", Some(&e)),
            "same entry: no change"
        );
        d.insert("c3.yaml".into(), ByteString(b"x".to_vec()));
        assert!(apply_entry(&mut d, "c2", None));
        assert_eq!(d.keys().cloned().collect::<Vec<_>>(), ["c3.yaml"]);
        assert!(!apply_entry(&mut d, "c2", None));
    }
}
