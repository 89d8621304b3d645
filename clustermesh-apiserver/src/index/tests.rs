//! Unit tests of the index, driven by object builders.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress as K8sNodeAddress, NodeStatus, Pod, PodIP, PodSpec, PodStatus,
    Service, ServicePort as K8sServicePort, ServiceSpec as K8sServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointPort as K8sEndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use mesh_model::values::{Conditions, Protocol, ServicePort};

pub(crate) fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: (!ns.is_empty()).then(|| ns.to_owned()),
        name: Some(name.to_owned()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..Default::default()
    }
}

/// A ClusterIP Service with the given annotations and TCP ports (named p<port> when several).
pub(crate) fn mk_service(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[u16],
    ann: &[(&str, &str)],
) -> SourceObject {
    let mut m = meta(ns, name, &[]);
    m.annotations = Some(
        ann.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    SourceObject::Service(Service {
        metadata: m,
        spec: Some(K8sServiceSpec {
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ports: Some(
                ports
                    .iter()
                    .map(|p| K8sServicePort {
                        name: (ports.len() > 1).then(|| format!("p{p}")),
                        port: i32::from(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    })
}

/// A global Service (clustermesh.io/global: "true") with one port 80.
pub(crate) fn mk_global(ns: &str, name: &str, cluster_ip: &str) -> SourceObject {
    mk_service(
        ns,
        name,
        cluster_ip,
        &[80],
        &[("clustermesh.io/global", "true")],
    )
}

/// An IPv4 EndpointSlice of `svc` with ready endpoints on port 8080.
pub(crate) fn mk_slice(ns: &str, name: &str, svc: &str, ips: &[&str]) -> SourceObject {
    mk_slice_cond(ns, name, svc, ips, None)
}

pub(crate) fn mk_slice_cond(
    ns: &str,
    name: &str,
    svc: &str,
    ips: &[&str],
    conditions: Option<EndpointConditions>,
) -> SourceObject {
    SourceObject::EndpointSlice(EndpointSlice {
        metadata: meta(ns, name, &[(SERVICE_NAME_LABEL, svc)]),
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| K8sEndpoint {
                addresses: vec![ip.to_string()],
                conditions: conditions.clone(),
                node_name: Some("node-1".into()),
                zone: Some("z1".into()),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![K8sEndpointPort {
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    })
}

pub(crate) fn mk_pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> SourceObject {
    SourceObject::Pod(Pod {
        metadata: meta(ns, name, labels),
        spec: Some(PodSpec::default()),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.to_owned()),
            pod_ips: Some(vec![PodIP { ip: ip.to_owned() }]),
            ..Default::default()
        }),
    })
}

pub(crate) fn mk_ns(name: &str, labels: &[(&str, &str)]) -> SourceObject {
    SourceObject::Namespace(Namespace {
        metadata: meta("", name, labels),
        ..Default::default()
    })
}

pub(crate) fn mk_node(name: &str, ip: &str, zone: &str) -> SourceObject {
    SourceObject::Node(Node {
        metadata: meta("", name, &[(ZONE_LABEL, zone), (REGION_LABEL, "r1")]),
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![
                K8sNodeAddress {
                    address: ip.to_owned(),
                    type_: "InternalIP".into(),
                },
                K8sNodeAddress {
                    address: name.to_owned(),
                    type_: "Hostname".into(),
                },
            ]),
            ..Default::default()
        }),
    })
}

pub(crate) fn mk_export(ns: &str, name: &str) -> SourceObject {
    SourceObject::ServiceExport(ServiceExport {
        metadata: meta(ns, name, &[]),
        status: None,
    })
}

fn cfg() -> IndexConfig {
    let mcc = MaxConnectedClusters::DEFAULT;
    IndexConfig {
        cluster: ClusterName::new("c1").unwrap(),
        cluster_id: ClusterId::new(3, mcc).unwrap(),
        max_connected_clusters: mcc,
        clusterset_cidr: Some("10.250.0.0/30".parse().unwrap()),
        ca_fingerprints: vec![],
        cached: false,
    }
}

fn keys(ix: &MeshIndex) -> Vec<String> {
    ix.desired().keys().cloned().collect()
}

fn decode(ix: &MeshIndex, key: &str) -> MeshValue {
    let k = MeshKey::parse(key).unwrap();
    MeshValue::decode(&k, &ix.desired()[key]).unwrap()
}

const CC: &str = "clustermesh/v1/cluster-config/c1";

#[test]
fn a_global_service_with_endpoints_yields_spec_and_one_chunk() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    ix.apply(mk_slice(
        "default",
        "web-abc",
        "web",
        &["10.0.0.1", "10.0.0.2"],
    ));
    assert_eq!(
        keys(&ix),
        [
            CC,
            "clustermesh/v1/endpoints/c1/default/web/0",
            "clustermesh/v1/services/c1/default/web",
        ]
    );
    let MeshValue::EndpointChunk(c) = decode(&ix, "clustermesh/v1/endpoints/c1/default/web/0")
    else {
        panic!()
    };
    assert_eq!(c.endpoints.len(), 2);
    assert_eq!(c.endpoints[0].ports[0].port, 8080);
    assert_eq!(c.endpoints[0].node.as_deref(), Some("node-1"));
    let MeshValue::Service(s) = decode(&ix, "clustermesh/v1/services/c1/default/web") else {
        panic!()
    };
    assert_eq!(s.frontends, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
}

#[test]
fn a_service_that_is_not_global_is_not_published() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_service("default", "web", "10.96.0.10", &[80], &[]));
    ix.apply(mk_slice("default", "web-abc", "web", &["10.0.0.1"]));
    assert_eq!(keys(&ix), [CC]);
    // A ServiceExport makes it global.
    ix.apply(mk_export("default", "web"));
    assert_eq!(keys(&ix).len(), 3);
    ix.delete(&ObjectRef::new(ObjectKind::ServiceExport, "default", "web"));
    assert_eq!(keys(&ix), [CC]);
}

#[test]
fn cilium_annotations_are_accepted() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_service(
        "default",
        "web",
        "10.96.0.10",
        &[80],
        &[
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "local"),
        ],
    ));
    let MeshValue::Service(s) = decode(&ix, "clustermesh/v1/services/c1/default/web") else {
        panic!()
    };
    assert_eq!(s.affinity, mesh_model::values::Affinity::Local);
}

#[test]
fn one_endpoint_change_dirties_exactly_one_chunk() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    let ips: Vec<String> = (0..200)
        .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    ix.apply(mk_slice("default", "web-a", "web", &refs[..100]));
    ix.apply(mk_slice("default", "web-b", "web", &refs[100..]));
    ix.take_dirty();
    assert_eq!(
        keys(&ix)
            .iter()
            .filter(|k| k.starts_with("clustermesh/v1/endpoints/"))
            .count(),
        4
    );
    // One endpoint of slice b becomes not ready.
    let mut changed = mk_slice("default", "web-b", "web", &refs[100..]);
    if let SourceObject::EndpointSlice(s) = &mut changed {
        s.endpoints[7].conditions = Some(EndpointConditions {
            ready: Some(false),
            serving: Some(false),
            terminating: Some(true),
        });
    }
    ix.apply(changed);
    let dirty = ix.take_dirty();
    assert_eq!(dirty.len(), 1, "{dirty:?}");
    assert!(
        dirty
            .iter()
            .next()
            .unwrap()
            .starts_with("clustermesh/v1/endpoints/c1/default/web/")
    );
    // Applying the same object again changes nothing.
    let again = ix.desired().clone();
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    assert!(ix.take_dirty().is_empty());
    assert_eq!(&again, ix.desired());
}

#[test]
fn deleting_a_service_removes_all_its_keys() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    let ips: Vec<String> = (0..100).map(|i| format!("10.0.0.{}", i + 1)).collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    ix.apply(mk_slice("default", "web-a", "web", &refs));
    assert_eq!(keys(&ix).len(), 4);
    ix.take_dirty();
    ix.delete(&ObjectRef::new(ObjectKind::Service, "default", "web"));
    assert_eq!(keys(&ix), [CC]);
    assert_eq!(ix.take_dirty().len(), 3);
}

#[test]
fn bad_objects_are_skipped_and_reported_while_the_rest_stays() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "good", "10.96.0.1"));
    ix.apply(mk_service(
        "default",
        "badann",
        "10.96.0.2",
        &[80],
        &[("clustermesh.io/global", "yes-please")],
    ));
    ix.apply(mk_service(
        "default",
        "noports",
        "10.96.0.3",
        &[],
        &[("clustermesh.io/global", "true")],
    ));
    assert_eq!(keys(&ix), [CC, "clustermesh/v1/services/c1/default/good"]);
    let errs: Vec<ObjectError> = ix.errors().collect();
    assert_eq!(errs.len(), 2);
    assert!(
        errs[0].message.contains("clustermesh.io/global"),
        "{errs:?}"
    );
    assert!(errs[0].message.contains("yes-please"));
    assert!(errs[1].message.contains("no ports"));
    assert_eq!(ix.errors_total(), 2);
    // Fixing the object clears the error.
    ix.apply(mk_global("default", "badann", "10.96.0.2"));
    assert_eq!(ix.error_count(), 1);
    // A broken fix of a published service unpublishes it (and says why).
    ix.apply(mk_service(
        "default",
        "good",
        "10.96.0.1",
        &[80],
        &[
            ("clustermesh.io/affinity", "sideways"),
            ("clustermesh.io/global", "true"),
        ],
    ));
    assert!(
        !ix.desired()
            .contains_key("clustermesh/v1/services/c1/default/good")
    );
    assert_eq!(ix.error_count(), 2);
}

#[test]
fn endpoint_conditions_follow_kubernetes_defaults() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    ix.apply(mk_slice_cond(
        "default",
        "web-a",
        "web",
        &["10.0.0.1"],
        Some(EndpointConditions {
            ready: Some(false),
            serving: Some(true),
            terminating: Some(true),
        }),
    ));
    let MeshValue::EndpointChunk(c) = decode(&ix, "clustermesh/v1/endpoints/c1/default/web/0")
    else {
        panic!()
    };
    assert_eq!(
        c.endpoints[0].conditions,
        Conditions {
            ready: false,
            serving: true,
            terminating: true
        }
    );
}

#[test]
fn identities_are_shared_by_label_set_and_survive_a_restart() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_ns("shop", &[("team", "a")]));
    ix.apply(mk_pod(
        "shop",
        "web-1",
        "10.0.0.1",
        &[("app", "web"), ("pod-template-hash", "x1")],
    ));
    ix.apply(mk_pod(
        "shop",
        "web-2",
        "10.0.0.2",
        &[("app", "web"), ("pod-template-hash", "x2")],
    ));
    ix.apply(mk_pod("shop", "db-1", "10.0.0.3", &[("app", "db")]));
    let ids: Vec<String> = keys(&ix)
        .into_iter()
        .filter(|k| k.starts_with("clustermesh/v1/identities/"))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let MeshValue::Ip(a) = decode(&ix, "clustermesh/v1/ips/c1/10.0.0.1") else {
        panic!()
    };
    let MeshValue::Ip(b) = decode(&ix, "clustermesh/v1/ips/c1/10.0.0.2") else {
        panic!()
    };
    let MeshValue::Ip(c) = decode(&ix, "clustermesh/v1/ips/c1/10.0.0.3") else {
        panic!()
    };
    assert_eq!(a.identity, b.identity);
    assert_ne!(a.identity, c.identity);
    assert_eq!(a.identity >> 16, 3, "cluster id in the high bits");
    let MeshValue::Identity(i) =
        decode(&ix, &format!("clustermesh/v1/identities/c1/{}", a.identity))
    else {
        panic!()
    };
    assert_eq!(i.labels["k8s:app"], "web");
    assert_eq!(i.labels["k8s:io.cilium.k8s.namespace.labels.team"], "a");
    assert!(!i.labels.contains_key("k8s:pod-template-hash"));

    // Restart: a new index seeded from the old desired state gives the same numbers even when pods come in
    // another order.
    let before = ix.desired().clone();
    let mut ix2 = MeshIndex::new(cfg());
    ix2.seed(&before);
    ix2.apply(mk_pod("shop", "db-1", "10.0.0.3", &[("app", "db")]));
    ix2.apply(mk_ns("shop", &[("team", "a")]));
    ix2.apply(mk_pod("shop", "web-2", "10.0.0.2", &[("app", "web")]));
    ix2.apply(mk_pod("shop", "web-1", "10.0.0.1", &[("app", "web")]));
    assert_eq!(ix2.desired(), &before);

    // A namespace label change moves its pods to a new identity; the old one vanishes.
    ix2.take_dirty();
    ix2.apply(mk_ns("shop", &[("team", "b")]));
    let MeshValue::Ip(a2) = decode(&ix2, "clustermesh/v1/ips/c1/10.0.0.1") else {
        panic!()
    };
    assert_ne!(a2.identity, a.identity);
    assert!(
        !ix2.desired()
            .contains_key(&format!("clustermesh/v1/identities/c1/{}", a.identity))
    );
    // Deleting every pod removes every identity and ip key.
    for p in ["web-1", "web-2", "db-1"] {
        ix2.delete(&ObjectRef::new(ObjectKind::Pod, "shop", p));
    }
    assert_eq!(keys(&ix2), [CC]);
}

#[test]
fn host_network_and_finished_pods_get_no_identity() {
    let mut ix = MeshIndex::new(cfg());
    let mut p = mk_pod("kube-system", "proxy", "192.168.1.1", &[("app", "proxy")]);
    if let SourceObject::Pod(p) = &mut p {
        p.spec.as_mut().unwrap().host_network = Some(true);
    }
    ix.apply(p);
    let mut d = mk_pod("default", "job", "10.0.0.9", &[("app", "job")]);
    if let SourceObject::Pod(p) = &mut d {
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    }
    ix.apply(d);
    assert_eq!(keys(&ix), [CC]);
}

#[test]
fn nodes_are_published_with_zone_and_region() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_node("node-1", "192.168.0.1", "z1"));
    let MeshValue::Node(n) = decode(&ix, "clustermesh/v1/nodes/c1/node-1") else {
        panic!()
    };
    assert_eq!(n.zone.as_deref(), Some("z1"));
    assert_eq!(n.region.as_deref(), Some("r1"));
    assert_eq!(n.addresses.len(), 1);
    ix.reset(
        ObjectKind::Node,
        vec![mk_node("node-2", "192.168.0.2", "z2")],
    );
    assert_eq!(keys(&ix), [CC, "clustermesh/v1/nodes/c1/node-2"]);
}

/// A node with `spec.podCIDRs` and `spec.podCIDR` as given.
fn node_with_cidrs(name: &str, pod_cidrs: Option<&[&str]>, pod_cidr: Option<&str>) -> SourceObject {
    let mut n = mk_node(name, "192.168.0.1", "z1");
    if let SourceObject::Node(n) = &mut n {
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidrs: pod_cidrs.map(|v| v.iter().map(|s| s.to_string()).collect()),
            pod_cidr: pod_cidr.map(str::to_owned),
            ..Default::default()
        });
    }
    n
}

fn published_cidrs(ix: &MeshIndex, name: &str) -> Vec<String> {
    let MeshValue::Node(n) = decode(ix, &format!("clustermesh/v1/nodes/c1/{name}")) else {
        panic!("not a node")
    };
    n.pod_cidrs.iter().map(|c| c.to_string()).collect()
}

#[test]
fn nodes_carry_their_pod_cidrs_from_pod_cidrs_or_else_pod_cidr() {
    let mut ix = MeshIndex::new(cfg());
    // Dual stack: both, in order; `podCIDR` (the first, as Kubernetes sets it) does not add a third.
    ix.apply(node_with_cidrs(
        "n1",
        Some(&["10.1.1.0/24", "fd00:1:1::/64"]),
        Some("10.1.1.0/24"),
    ));
    assert_eq!(published_cidrs(&ix, "n1"), ["10.1.1.0/24", "fd00:1:1::/64"]);
    // Only the older single field.
    ix.apply(node_with_cidrs("n2", None, Some("10.1.2.0/24")));
    assert_eq!(published_cidrs(&ix, "n2"), ["10.1.2.0/24"]);
    // An empty list counts as absent; host bits are cleared.
    ix.apply(node_with_cidrs("n3", Some(&[]), Some("10.1.3.7/24")));
    assert_eq!(published_cidrs(&ix, "n3"), ["10.1.3.0/24"]);
    // None at all (a node the IPAM has not reached yet): no podCIDRs field.
    ix.apply(node_with_cidrs("n4", None, None));
    assert!(published_cidrs(&ix, "n4").is_empty());
    let raw = String::from_utf8(ix.desired()["clustermesh/v1/nodes/c1/n4"].clone()).unwrap();
    assert!(!raw.contains("podCIDRs"), "{raw}");
    assert_eq!(ix.error_count(), 0);
    assert_eq!(ix.errors_total(), 0);
}

#[test]
fn a_bad_pod_cidr_is_reported_and_counted_and_the_node_published_without_it() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(node_with_cidrs(
        "n1",
        Some(&["10.1.1.0/24", "10.1.300.0/24", "fd00::/200"]),
        None,
    ));
    assert_eq!(published_cidrs(&ix, "n1"), ["10.1.1.0/24"]);
    let errors: Vec<ObjectError> = ix.errors().collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].object, ObjectRef::new(ObjectKind::Node, "", "n1"));
    assert_eq!(
        errors[0].message,
        "pod CIDR \"10.1.300.0/24\" is not a CIDR (address/prefix length); \
         pod CIDR \"fd00::/200\" is not a CIDR (address/prefix length); \
         the node is published without them"
    );
    assert_eq!(ix.errors_total(), 1);
    // The same node again: still reported, not counted twice.
    ix.apply(node_with_cidrs(
        "n1",
        Some(&["10.1.1.0/24", "10.1.300.0/24", "fd00::/200"]),
        None,
    ));
    assert_eq!(ix.errors_total(), 1);
    // Fixed: the report goes, the CIDR is published.
    ix.apply(node_with_cidrs(
        "n1",
        Some(&["10.1.1.0/24", "10.1.3.0/24"]),
        None,
    ));
    assert_eq!(published_cidrs(&ix, "n1"), ["10.1.1.0/24", "10.1.3.0/24"]);
    assert_eq!(ix.error_count(), 0);
}

#[test]
fn a_manifest_node_carries_its_pod_cidrs_and_a_bad_one_is_left_out() {
    // `--source manifests` reads Nodes as the Kubernetes API serves them; the same translation applies.
    let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: m1\nspec:\n  podCIDR: 10.1.7.0/24\n  \
                podCIDRs: [10.1.7.0/24, not-a-cidr]\nstatus:\n  addresses:\n  - type: InternalIP\n    \
                address: 192.168.0.7\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: m2\nspec:\n  \
                podCIDR: 10.1.8.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.8\n";
    let objs = crate::source::manifests::parse_manifests("nodes.yaml", text).unwrap();
    let mut ix = MeshIndex::new(cfg());
    for o in objs {
        ix.apply(o);
    }
    assert_eq!(published_cidrs(&ix, "m1"), ["10.1.7.0/24"]);
    assert_eq!(published_cidrs(&ix, "m2"), ["10.1.8.0/24"]);
    let errors: Vec<ObjectError> = ix.errors().collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].message.contains("\"not-a-cidr\""), "{errors:?}");
}

fn remote_spec(cluster: &str, ns: &str, name: &str) -> ServiceSpec {
    ServiceSpec {
        cluster: ClusterName::new(cluster).unwrap(),
        namespace: ns.into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        frontends: vec!["10.96.9.9".parse().unwrap()],
        headless: false,
        shared: true,
        affinity: Default::default(),
        failover_order: vec![],
        health_check: Default::default(),
        health_check_port: None,
    }
}

#[test]
fn imports_get_stable_distinct_clusterset_ips() {
    let c2 = ClusterName::new("c2").unwrap();
    let mut ix = MeshIndex::new(cfg());
    ix.set_remote_services(
        &c2,
        vec![
            remote_spec("c2", "default", "a"),
            remote_spec("c2", "default", "b"),
        ],
    );
    let ip = |ix: &MeshIndex, n: &str| {
        let MeshValue::Import(i) = decode(ix, &format!("clustermesh/v1/imports/c1/default/{n}"))
        else {
            panic!()
        };
        i.ips[0]
    };
    let a = ip(&ix, "a");
    let b = ip(&ix, "b");
    assert_ne!(a, b);
    // A local Service of that name needs no import.
    ix.apply(mk_global("default", "a", "10.96.0.1"));
    assert!(
        !ix.desired()
            .contains_key("clustermesh/v1/imports/c1/default/a")
    );
    // Restart: seeded, b keeps its address; a new service gets a third one; /30 has two usable addresses, so
    // a fourth import finds no free address and is reported.
    let before = ix.desired().clone();
    let mut ix2 = MeshIndex::new(cfg());
    ix2.seed(&before);
    ix2.set_remote_services(
        &c2,
        vec![
            remote_spec("c2", "default", "c"),
            remote_spec("c2", "default", "b"),
        ],
    );
    assert_eq!(ip(&ix2, "b"), b);
    assert_ne!(ip(&ix2, "c"), b);
    ix2.apply_remote_service(remote_spec("c2", "default", "d"));
    assert!(
        !ix2.desired()
            .contains_key("clustermesh/v1/imports/c1/default/d")
    );
    assert_eq!(ix2.error_count(), 1);
    ix2.delete_remote_service(&c2, &ServiceName::new("default", "c").unwrap());
    assert!(
        !ix2.desired()
            .contains_key("clustermesh/v1/imports/c1/default/c")
    );
}

#[test]
fn a_restart_seeded_from_etcd_reproduces_the_same_chunks() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    let ips: Vec<String> = (0..150).map(|i| format!("10.1.0.{}", i + 1)).collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    ix.apply(mk_slice("default", "web-a", "web", &refs[..50]));
    ix.apply(mk_slice("default", "web-b", "web", &refs[50..]));
    // Churn so the assignment is not the one a fresh index would pick.
    ix.apply(mk_slice("default", "web-a", "web", &refs[10..50]));
    ix.apply(mk_slice("default", "web-a", "web", &refs[..50]));
    let before = ix.desired().clone();
    let mut ix2 = MeshIndex::new(cfg());
    ix2.seed(&before);
    ix2.apply(mk_slice("default", "web-b", "web", &refs[50..]));
    ix2.apply(mk_slice("default", "web-a", "web", &refs[..50]));
    ix2.apply(mk_global("default", "web", "10.96.0.10"));
    assert_eq!(ix2.desired(), &before);
}

#[test]
fn every_desired_value_decodes_against_its_key() {
    let mut ix = MeshIndex::new(cfg());
    ix.apply(mk_global("default", "web", "10.96.0.10"));
    ix.apply(mk_slice("default", "web-a", "web", &["10.0.0.1"]));
    ix.apply(mk_pod("default", "p", "10.0.0.1", &[("app", "web")]));
    ix.apply(mk_node("node-1", "192.168.0.1", "z1"));
    ix.set_remote_services(
        &ClusterName::new("c2").unwrap(),
        vec![remote_spec("c2", "default", "other")],
    );
    assert_eq!(ix.desired().len(), 7);
    for (k, v) in ix.desired() {
        let key = MeshKey::parse_for(k, &ClusterName::new("c1").unwrap()).unwrap();
        MeshValue::decode(&key, v).unwrap();
    }
    let _ = BTreeMap::<String, String>::new();
}

mod restart_property {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Service(u8, bool),
        Slice(u8, u8, Vec<u8>),
        DeleteSlice(u8, u8),
        Pod(u8, u8),
        DeletePod(u8),
        Ns(u8),
        Remote(u8, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4, any::<bool>()).prop_map(|(s, g)| Step::Service(s, g)),
            (0u8..4, 0u8..2, proptest::collection::vec(0u8..150, 0..100))
                .prop_map(|(s, n, ips)| Step::Slice(s, n, ips)),
            (0u8..4, 0u8..2).prop_map(|(s, n)| Step::DeleteSlice(s, n)),
            (0u8..20, 0u8..3).prop_map(|(p, l)| Step::Pod(p, l)),
            (0u8..20).prop_map(Step::DeletePod),
            (0u8..3).prop_map(Step::Ns),
            (0u8..6, any::<bool>()).prop_map(|(s, on)| Step::Remote(s, on)),
        ]
    }

    fn run(ix: &mut MeshIndex, s: &Step) {
        let c2 = ClusterName::new("c2").unwrap();
        match s {
            Step::Service(i, global) => {
                let ann: &[(&str, &str)] = if *global {
                    &[("clustermesh.io/global", "true")]
                } else {
                    &[]
                };
                ix.apply(mk_service(
                    "default",
                    &format!("s{i}"),
                    &format!("10.96.0.{i}"),
                    &[80],
                    ann,
                ));
            }
            Step::Slice(i, n, ips) => {
                let ips: Vec<String> = ips.iter().map(|x| format!("10.{i}.{n}.{x}")).collect();
                let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                ix.apply(mk_slice(
                    "default",
                    &format!("s{i}-{n}"),
                    &format!("s{i}"),
                    &refs,
                ));
            }
            Step::DeleteSlice(i, n) => ix.delete(&ObjectRef::new(
                ObjectKind::EndpointSlice,
                "default",
                &format!("s{i}-{n}"),
            )),
            Step::Pod(p, l) => ix.apply(mk_pod(
                "default",
                &format!("p{p}"),
                &format!("10.200.0.{p}"),
                &[("app", &format!("a{l}"))],
            )),
            Step::DeletePod(p) => ix.delete(&ObjectRef::new(
                ObjectKind::Pod,
                "default",
                &format!("p{p}"),
            )),
            Step::Ns(l) => ix.apply(mk_ns("default", &[("team", &format!("t{l}"))])),
            Step::Remote(i, on) => {
                let svc = ServiceName::new("default", &format!("r{i}")).unwrap();
                if *on {
                    ix.apply_remote_service(remote_spec("c2", "default", &format!("r{i}")));
                } else {
                    ix.delete_remote_service(&c2, &svc);
                }
            }
        }
    }

    /// What a source would list after these steps: the last state of every object.
    fn objects_of(ix: &MeshIndex) -> (Vec<SourceObject>, BTreeMap<ServiceName, ServiceSpec>) {
        let mut out = Vec::new();
        out.extend(ix.namespaces.values().cloned().map(SourceObject::Namespace));
        out.extend(ix.services.values().cloned().map(SourceObject::Service));
        out.extend(ix.slices.values().cloned().map(SourceObject::EndpointSlice));
        out.extend(ix.pods.values().cloned().map(SourceObject::Pod));
        let remote = ix
            .remote_services
            .iter()
            .filter_map(|(s, m)| m.values().next().map(|v| (s.clone(), v.clone())))
            .collect();
        (out, remote)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A restarted index, seeded from what the old one published and given the same objects in another
        /// order, wants exactly the same keys and values: a restart rewrites nothing.
        #[test]
        fn a_restart_reproduces_the_desired_state(steps in proptest::collection::vec(step(), 1..60)) {
            let mut cfg = cfg();
            cfg.clusterset_cidr = Some("10.250.0.0/24".parse().unwrap());
            let mut ix = MeshIndex::new(cfg.clone());
            for s in &steps {
                run(&mut ix, s);
            }
            let before = ix.desired().clone();
            let (objects, remote) = objects_of(&ix);
            let mut ix2 = MeshIndex::new(cfg);
            ix2.seed(&before);
            for o in objects.into_iter().rev() {
                ix2.apply(o);
            }
            ix2.set_remote_services(&ClusterName::new("c2").unwrap(), remote.into_values().collect());
            let text = |m: &BTreeMap<String, Vec<u8>>| -> Vec<(String, String)> {
                m.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect()
            };
            let (a, b) = (text(ix2.desired()), text(&before));
            let diff: Vec<&(String, String)> = a.iter().filter(|x| !b.contains(x)).chain(b.iter().filter(|x| !a.contains(x))).collect();
            prop_assert!(diff.is_empty(), "differs: {:?}", diff);
        }
    }
}
