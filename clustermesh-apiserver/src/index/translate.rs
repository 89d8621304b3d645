//! Translation: from the Kubernetes objects the index holds to the mesh's keys and values (service
//! specs, endpoint chunks, identities and IPs, nodes, imports), recomputing only what an object
//! touches.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_model::annotations;
use mesh_model::keys::{KeyKind, MeshKey, ServiceName};
use mesh_model::values::{
    Conditions, Endpoint, EndpointChunk, EndpointPort, Identity, IpIdentity, MeshValue,
    NodeAddress, NodeInfo, Protocol, ServiceImport, ServicePort, ServiceSpec, identity_id,
};
use tracing::debug;

use super::*;
use crate::objects::{ObjectKind, ObjectRef};

// ---- recomputation ----

pub(super) fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    let p = p.unwrap_or("TCP");
    Protocol::parse(p).ok_or_else(|| format!("unknown protocol {p:?}"))
}

pub(super) fn port_u16(p: i32, what: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{what} {p} is not a port number (1-65535)"))
}

impl MeshIndex {
    pub(super) fn reindex_slice(&mut self, ns: &str, name: &str, old: Option<&EndpointSlice>) {
        if let Some(svc) = old.and_then(|o| slice_service(ns, o))
            && let Some(set) = self.slices_of.get_mut(&svc)
        {
            set.remove(name);
        }
        if let Some(new) = self.slices.get(&(ns.to_owned(), name.to_owned()))
            && let Some(svc) = slice_service(ns, new)
        {
            self.slices_of
                .entry(svc)
                .or_default()
                .insert(name.to_owned());
        }
        self.slices_of.retain(|_, s| !s.is_empty());
    }

    /// The spec to publish for a Service: `Ok(None)` when it is not global.
    pub(super) fn service_spec(
        &self,
        svc: &ServiceName,
        s: &Service,
    ) -> Result<Option<ServiceSpec>, String> {
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let a = annotations::parse(&ann).map_err(|e| e.to_string())?;
        if !a.global && !self.exports.contains(svc) {
            return Ok(None);
        }
        let spec = s.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err("an ExternalName Service cannot be global".into());
        }
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            ports.push(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: port_u16(p.port, "port")?,
                protocol: protocol(p.protocol.as_deref())?,
            });
        }
        if ports.is_empty() {
            return Err("the Service has no ports".into());
        }
        let cluster_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(v), _) if !v.is_empty() => v.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => Vec::new(),
        };
        let headless = cluster_ips.iter().any(|ip| ip == "None");
        let mut frontends = Vec::new();
        if !headless {
            for ip in &cluster_ips {
                frontends.push(
                    ip.parse::<IpAddr>()
                        .map_err(|_| format!("clusterIP {ip:?} is not an IP address"))?,
                );
            }
            if frontends.is_empty() {
                return Err("the Service has no clusterIP yet".into());
            }
        }
        let spec = ServiceSpec {
            cluster: self.config.cluster.clone(),
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            ports,
            frontends,
            headless,
            shared: a.shared,
            affinity: a.affinity,
            failover_order: a.failover_order,
            health_check: a.health_check,
            health_check_port: a.health_check_port,
        };
        let key = MeshKey::Service {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        };
        MeshValue::Service(spec.clone())
            .validate(&key)
            .map_err(|e| e.to_string())?;
        Ok(Some(spec))
    }

    /// Endpoints of a service, merged over its slices (an address in two slices gets the union of their ports).
    pub(super) fn service_endpoints(&mut self, svc: &ServiceName) -> Vec<Endpoint> {
        let mut out: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        let names: Vec<String> = self
            .slices_of
            .get(svc)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let key = (svc.namespace.clone(), name.clone());
            let Some(sl) = self.slices.get(&key) else {
                continue;
            };
            let r = ObjectRef::new(ObjectKind::EndpointSlice, &svc.namespace, &name);
            match slice_endpoints(sl) {
                Ok(eps) => {
                    self.set_error(r, None);
                    for e in eps {
                        match out.get_mut(&e.ip) {
                            Some(have) => {
                                let mut ports = have.ports.to_vec();
                                for p in e.ports.iter() {
                                    if !ports.contains(p) {
                                        ports.push(p.clone());
                                    }
                                }
                                ports.sort();
                                have.ports = ports.into();
                            }
                            None => {
                                out.insert(e.ip, e);
                            }
                        }
                    }
                }
                Err(m) => self.set_error(r, Some(m)),
            }
        }
        out.into_values().collect()
    }

    pub(super) fn recompute_service(&mut self, svc: &ServiceName) {
        let r = ObjectRef::new(ObjectKind::Service, &svc.namespace, &svc.name);
        let spec = match self.services.get(svc) {
            Some(s) => match self.service_spec(svc, s) {
                Ok(spec) => {
                    self.set_error(r, None);
                    spec
                }
                Err(m) => {
                    self.set_error(r, Some(m));
                    None
                }
            },
            None => {
                self.set_error(r, None);
                None
            }
        };
        let key = MeshKey::Service {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        }
        .to_string();
        let publish_endpoints = matches!(&spec, Some(s) if s.shared);
        let endpoints = if publish_endpoints {
            self.service_endpoints(svc)
        } else {
            Vec::new()
        };
        self.set(
            key,
            spec.as_ref()
                .map(|s| MeshValue::Service(s.clone()).encode()),
        );
        // Endpoint chunks: stable assignment, then (re)publish changed or not yet published chunks. While the
        // service is not published its assignment is kept (objects may arrive in any order after a restart, and
        // the assignment seeded from etcd must survive until the Service is there); `compact` drops it later.
        let published = self.published_chunks.remove(svc).unwrap_or_default();
        let mut writes: Vec<(u32, Option<Vec<Endpoint>>)> = Vec::new();
        let mut now: BTreeSet<u32> = BTreeSet::new();
        if publish_endpoints {
            let chunker = self.chunks.entry(svc.clone()).or_default();
            let changed = chunker.set_all(endpoints);
            now = chunker.chunk_numbers().collect();
            for n in &now {
                if changed.contains(n) || !published.contains(n) {
                    writes.push((*n, chunker.chunk(*n)));
                }
            }
            if chunker.is_empty() {
                self.chunks.remove(svc);
            }
            self.unpublished.remove(svc);
        } else if self.chunks.contains_key(svc) {
            self.unpublished.insert(svc.clone());
        }
        for n in published.difference(&now) {
            writes.push((*n, None));
        }
        for (n, eps) in writes {
            let key = MeshKey::EndpointChunk {
                cluster: self.config.cluster.clone(),
                service: svc.clone(),
                chunk: n,
            }
            .to_string();
            let value = eps.map(|endpoints| {
                MeshValue::EndpointChunk(EndpointChunk {
                    cluster: self.config.cluster.clone(),
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    chunk: n,
                    endpoints,
                })
                .encode()
            });
            self.set(key, value);
        }
        if !now.is_empty() {
            self.published_chunks.insert(svc.clone(), now);
        }
    }

    pub(super) fn recompute_import(&mut self, svc: &ServiceName) {
        let Some(alloc) = &mut self.imports else {
            return;
        };
        let key = MeshKey::Import {
            cluster: self.config.cluster.clone(),
            service: svc.clone(),
        }
        .to_string();
        let remote = self.remote_services.get(svc).filter(|m| !m.is_empty());
        let wanted = match remote {
            Some(m) if !self.services.contains_key(svc) => m,
            _ => {
                alloc.release(svc);
                self.set(key, None);
                return;
            }
        };
        // Ports: those of the first cluster (by name) that shares the service.
        let ports = wanted
            .values()
            .next()
            .map(|s| s.ports.clone())
            .unwrap_or_default();
        let Some(ip) = alloc.get_or_allocate(svc) else {
            let r = ObjectRef::new(ObjectKind::Service, &svc.namespace, &svc.name);
            let m = format!(
                "no free ClusterSetIP left in {} for the import of {svc}",
                alloc.net
            );
            self.set_error(r, Some(m));
            self.set(key, None);
            return;
        };
        let v = MeshValue::Import(ServiceImport {
            cluster: self.config.cluster.clone(),
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            ips: vec![ip],
            ports,
        });
        self.set(key, Some(v.encode()));
    }

    pub(super) fn identity_labels(&self, ns: &str, pod: &Pod) -> Labels {
        let mut l = Labels::new();
        for (k, v) in pod.metadata.labels.iter().flatten() {
            if !IGNORED_POD_LABELS.contains(&k.as_str()) {
                l.insert(format!("k8s:{k}"), v.clone());
            }
        }
        if let Some(n) = self.namespaces.get(ns) {
            for (k, v) in n.metadata.labels.iter().flatten() {
                l.insert(format!("k8s:io.cilium.k8s.namespace.labels.{k}"), v.clone());
            }
        }
        l.insert("k8s:io.kubernetes.pod.namespace".into(), ns.to_owned());
        l.insert(
            "k8s:io.cilium.k8s.policy.cluster".into(),
            self.config.cluster.to_string(),
        );
        l
    }

    pub(super) fn recompute_namespace(&mut self, ns: &str) {
        let pods: Vec<String> = self
            .pods_of_ns
            .get(ns)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for p in pods {
            self.recompute_pod(&(ns.to_owned(), p));
        }
    }

    pub(super) fn full_identity(&self, local: u32) -> Option<u32> {
        identity_id(
            self.config.cluster_id,
            local,
            self.config.max_connected_clusters,
        )
    }

    pub(super) fn recompute_pod(&mut self, key: &(String, String)) {
        let r = ObjectRef::new(ObjectKind::Pod, &key.0, &key.1);
        let old = self.pod_entries.remove(key);
        // What the pod should hold now.
        let mut new = PodEntry {
            identity: None,
            ips: Vec::new(),
        };
        let mut error = None;
        if let Some(pod) = self.pods.get(key) {
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let status = pod.status.clone().unwrap_or_default();
            let done = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            let mut ips: Vec<String> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.clone())
                .collect();
            if ips.is_empty()
                && let Some(ip) = &status.pod_ip
            {
                ips.push(ip.clone());
            }
            if !host_network && !done {
                for ip in ips {
                    match ip.parse::<IpAddr>() {
                        Ok(ip) => {
                            if !new.ips.contains(&ip) {
                                new.ips.push(ip);
                            }
                        }
                        Err(_) => error = Some(format!("pod IP {ip:?} is not an IP address")),
                    }
                }
                if error.is_none() && !new.ips.is_empty() {
                    let labels = self.identity_labels(&key.0, pod);
                    // Acquire first, release the old one after, so an unchanged label set keeps its number.
                    match self
                        .identities
                        .acquire(&labels, self.config.max_connected_clusters)
                    {
                        Some(id) => new.identity = Some(id),
                        None => error = Some("the cluster's identity space is full".into()),
                    }
                }
                if error.is_some() {
                    new.ips.clear();
                }
            }
        }
        self.set_error(r, error);
        let mut touched_ids = BTreeSet::new();
        let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(old) = &old {
            if let Some(id) = old.identity {
                self.identities.release(id);
                touched_ids.insert(id);
            }
            for ip in &old.ips {
                if let Some(c) = self.ip_claims.get_mut(ip) {
                    c.remove(key);
                    if c.is_empty() {
                        self.ip_claims.remove(ip);
                    }
                }
                touched_ips.insert(*ip);
            }
        }
        if let Some(id) = new.identity {
            touched_ids.insert(id);
        }
        for ip in &new.ips {
            self.ip_claims.entry(*ip).or_default().insert(key.clone());
            touched_ips.insert(*ip);
        }
        if new.identity.is_some() || !new.ips.is_empty() {
            self.pod_entries.insert(key.clone(), new);
        }
        for id in touched_ids {
            self.publish_identity(id);
        }
        for ip in touched_ips {
            self.publish_ip(ip);
        }
    }

    pub(super) fn publish_identity(&mut self, local: u32) {
        let Some(full) = self.full_identity(local) else {
            return;
        };
        let key = MeshKey::Identity {
            cluster: self.config.cluster.clone(),
            id: full,
        }
        .to_string();
        let value = if self.identities.in_use(local) {
            self.identities.labels_of(local).map(|labels| {
                MeshValue::Identity(Identity {
                    id: full,
                    labels: labels.clone(),
                })
                .encode()
            })
        } else {
            None
        };
        self.set(key, value);
    }

    pub(super) fn publish_ip(&mut self, ip: IpAddr) {
        let key = MeshKey::Ip {
            cluster: self.config.cluster.clone(),
            ip,
        }
        .to_string();
        let owner = self
            .ip_claims
            .get(&ip)
            .and_then(|c| c.iter().next().cloned());
        let value = owner.and_then(|pk| {
            let local = self.pod_entries.get(&pk)?.identity?;
            let full = self.full_identity(local)?;
            Some(
                MeshValue::Ip(IpIdentity {
                    ip,
                    identity: full,
                    namespace: Some(pk.0.clone()),
                    pod: Some(pk.1.clone()),
                })
                .encode(),
            )
        });
        self.set(key, value);
    }

    pub(super) fn recompute_node(&mut self, name: &str) {
        let r = ObjectRef::new(ObjectKind::Node, "", name);
        let key_ok = mesh_model::keys::check_node_name(name);
        let value = match (self.nodes.get(name), key_ok) {
            (None, _) => {
                self.set_error(r, None);
                None
            }
            (Some(_), Err(e)) => {
                self.set_error(r, Some(e.to_string()));
                None
            }
            (Some(n), Ok(())) => {
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let mut addresses = Vec::new();
                let mut error = None;
                for a in n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                {
                    if a.type_ == "Hostname" || a.type_ == "InternalDNS" || a.type_ == "ExternalDNS"
                    {
                        continue;
                    }
                    match a.address.parse::<IpAddr>() {
                        Ok(ip) => addresses.push(NodeAddress {
                            kind: a.type_.clone(),
                            ip,
                        }),
                        Err(_) => {
                            error = Some(format!(
                                "node address {:?} ({}) is not an IP address",
                                a.address, a.type_
                            ))
                        }
                    }
                }
                let (pod_cidrs, bad_cidrs) = node_pod_cidrs(n);
                if error.is_some() {
                    self.set_error(r, error);
                    None
                } else {
                    // A bad pod CIDR does not hide the node (its addresses and zone are still good): it
                    // is published without that CIDR, and the CIDR reported and counted.
                    if bad_cidrs.is_empty() {
                        self.set_error(r, None);
                    } else {
                        self.set_partial_error(
                            r,
                            format!(
                                "{}; the node is published without {}",
                                bad_cidrs.join("; "),
                                if bad_cidrs.len() == 1 { "it" } else { "them" }
                            ),
                        );
                    }
                    Some(
                        MeshValue::Node(NodeInfo {
                            cluster: self.config.cluster.clone(),
                            name: name.to_owned(),
                            addresses,
                            zone: labels.get(ZONE_LABEL).cloned(),
                            region: labels.get(REGION_LABEL).cloned(),
                            pod_cidrs,
                        })
                        .encode(),
                    )
                }
            }
        };
        let key = format!(
            "{}{name}",
            KeyKind::Nodes.cluster_prefix(&self.config.cluster)
        );
        debug!(node = name, published = value.is_some(), "node recomputed");
        self.set(key, value);
    }
}

/// A node's pod CIDRs: `spec.podCIDRs`, or `spec.podCIDR` when that list is absent or empty (clusters older
/// than dual-stack set only the latter); each normalised (host bits cleared) and listed once. The second list
/// names the entries that are not CIDRs, which are left out.
pub(super) fn node_pod_cidrs(n: &Node) -> (Vec<IpNet>, Vec<String>) {
    let spec = n.spec.as_ref();
    let listed: Vec<String> = match (
        spec.and_then(|s| s.pod_cidrs.as_ref()),
        spec.and_then(|s| s.pod_cidr.as_ref()),
    ) {
        (Some(v), _) if !v.is_empty() => v.clone(),
        (_, Some(one)) if !one.is_empty() => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut cidrs = Vec::new();
    let mut bad = Vec::new();
    for s in listed {
        match s.trim().parse::<IpNet>() {
            Ok(net) => {
                let net = net.trunc();
                if !cidrs.contains(&net) {
                    cidrs.push(net);
                }
            }
            Err(_) => bad.push(format!(
                "pod CIDR {s:?} is not a CIDR (address/prefix length)"
            )),
        }
    }
    (cidrs, bad)
}

/// The endpoints of one EndpointSlice (FQDN slices and addresses that do not parse are errors).
pub(super) fn slice_endpoints(sl: &EndpointSlice) -> Result<Vec<Endpoint>, String> {
    if sl.address_type == "FQDN" {
        return Err("FQDN EndpointSlices are not supported".into());
    }
    let mut ports = Vec::new();
    for p in sl.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: port_u16(port, "endpoint port")?,
            protocol: protocol(p.protocol.as_deref())?,
        });
    }
    ports.sort();
    let mut out = Vec::new();
    for e in &sl.endpoints {
        let c = e.conditions.clone().unwrap_or_default();
        // Kubernetes: a missing ready means ready; a missing serving means as ready; terminating defaults false.
        let ready = c.ready.unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        };
        for a in &e.addresses {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("endpoint address {a:?} is not an IP address"))?;
            out.push(Endpoint {
                ip,
                ports: ports.clone().into(),
                node: e.node_name.as_deref().map(Into::into),
                zone: e.zone.clone(),
                hostname: e.hostname.clone(),
                conditions,
            });
        }
    }
    Ok(out)
}
