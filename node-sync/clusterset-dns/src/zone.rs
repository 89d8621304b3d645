//! The zone: what node-sync knows about global services, and the pure resolver over it.
//!
//! [`Zone`] is a plain snapshot that node-sync rebuilds from its merge index (usable endpoints only,
//! local ones marked). [`resolve`] answers one question against it; it has no I/O, so every rule of the
//! Multi-Cluster Services DNS specification is unit-tested here, and the server in [`crate::server`]
//! only moves packets.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use mesh_model::ClusterName;
use mesh_model::keys::ServiceName;
use mesh_model::values::{EndpointPort, Protocol, ServicePort};

/// The zone this server is authoritative for.
pub const ZONE: &str = "clusterset.local.";
/// The version the `dns-version.clusterset.local` TXT record announces (MCS DNS specification).
pub const SPEC_VERSION: &str = "1.0.0";
/// SRV priority of local endpoints of a headless service.
pub const LOCAL_PRIORITY: u16 = 0;
/// SRV priority of remote endpoints of a headless service.
pub const REMOTE_PRIORITY: u16 = 10;

/// A usable endpoint of a global service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    /// Address.
    pub ip: IpAddr,
    /// Cluster it runs in (the MCS `<clusterid>` label).
    pub cluster: ClusterName,
    /// Hostname from the EndpointSlice, if any.
    pub hostname: Option<String>,
    /// It runs in this node's cluster.
    pub local: bool,
    /// Its ports.
    pub ports: Vec<EndpointPort>,
}

impl DnsEndpoint {
    /// The first label of `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`: the hostname, or,
    /// when the endpoint has none, its address with `.` and `:` turned into `-` (as CoreDNS names pods).
    pub fn host_label(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => self.ip.to_string().replace(['.', ':'], "-"),
        }
    }
}

/// A global service as DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsService {
    /// Namespace and name.
    pub name: ServiceName,
    /// ClusterSetIPs (the local frontend, or the import allocated here); empty for headless services.
    pub cluster_set_ips: Vec<IpAddr>,
    /// Headless: names resolve to endpoints.
    pub headless: bool,
    /// Ports (named ports get SRV records).
    pub ports: Vec<ServicePort>,
    /// Usable endpoints across clusters (headless services), local ones first.
    pub endpoints: Vec<DnsEndpoint>,
}

/// Everything the server answers from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// Global services by name.
    pub services: BTreeMap<ServiceName, DnsService>,
}

impl Zone {
    /// Add a service (replacing one of the same name).
    pub fn insert(&mut self, svc: DnsService) {
        self.services.insert(svc.name.clone(), svc);
    }
}

/// What a question gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Response code.
    pub code: ResponseCode,
    /// Answer records.
    pub answers: Vec<Record>,
    /// Authority records (the SOA on NXDOMAIN and NODATA).
    pub authorities: Vec<Record>,
    /// Additional records (addresses of SRV targets).
    pub additionals: Vec<Record>,
    /// The name is outside the zone.
    pub out_of_zone: bool,
}

impl Resolution {
    fn code(code: ResponseCode) -> Self {
        Self {
            code,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            out_of_zone: false,
        }
    }

    /// A short word for metrics: `NOERROR`, `NODATA`, `NXDOMAIN`, `REFUSED`, ...
    pub fn result_label(&self) -> &'static str {
        match self.code {
            ResponseCode::NoError if self.answers.is_empty() => "NODATA",
            ResponseCode::NoError => "NOERROR",
            ResponseCode::NXDomain => "NXDOMAIN",
            ResponseCode::Refused => "REFUSED",
            ResponseCode::NotImp => "NOTIMP",
            ResponseCode::FormErr => "FORMERR",
            ResponseCode::ServFail => "SERVFAIL",
            _ => "OTHER",
        }
    }
}

fn zone_name() -> Name {
    // A constant, valid name.
    Name::from_ascii(ZONE).unwrap_or_else(|_| Name::root())
}

fn soa(ttl: u32) -> Record {
    let zone = zone_name();
    let mname = Name::from_ascii("ns.dns.clusterset.local.").unwrap_or_else(|_| zone.clone());
    let rname = Name::from_ascii("hostmaster.clusterset.local.").unwrap_or_else(|_| zone.clone());
    Record::from_rdata(
        zone,
        ttl,
        RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, ttl)),
    )
}

fn addr_record(name: &Name, ip: IpAddr, ttl: u32) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

fn family_matches(ip: &IpAddr, qtype: RecordType) -> bool {
    matches!(
        (ip, qtype),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

fn name_of(labels: &[&str]) -> Option<Name> {
    let mut s = labels.join(".");
    s.push('.');
    s.push_str(ZONE);
    Name::from_ascii(&s).ok()
}

/// Answer one question.
///
/// `qname` is matched case-insensitively. Out-of-zone names get `REFUSED` with `out_of_zone` set, so
/// the server can forward them when told to.
pub fn resolve(zone: &Zone, qname: &Name, qtype: RecordType, ttl: u32) -> Resolution {
    let lower = qname.to_lowercase();
    let labels: Vec<String> = lower
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let n = labels.len();
    if n < 2 || labels[n - 2] != "clusterset" || labels[n - 1] != "local" {
        let mut r = Resolution::code(ResponseCode::Refused);
        r.out_of_zone = true;
        return r;
    }
    if matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR) {
        return Resolution::code(ResponseCode::NotImp);
    }
    let rel: Vec<&str> = labels[..n - 2].iter().map(String::as_str).collect();
    let nodata = || Resolution {
        authorities: vec![soa(ttl)],
        ..Resolution::code(ResponseCode::NoError)
    };
    let nxdomain = || Resolution {
        authorities: vec![soa(ttl)],
        ..Resolution::code(ResponseCode::NXDomain)
    };
    let answer = |answers: Vec<Record>, additionals: Vec<Record>| {
        if answers.is_empty() {
            nodata()
        } else {
            Resolution {
                answers,
                additionals,
                ..Resolution::code(ResponseCode::NoError)
            }
        }
    };
    let owner = qname.clone();

    match rel.as_slice() {
        // The apex.
        [] => match qtype {
            RecordType::SOA => answer(vec![soa(ttl)], vec![]),
            RecordType::NS => {
                let ns =
                    Name::from_ascii("ns.dns.clusterset.local.").unwrap_or_else(|_| zone_name());
                answer(
                    vec![Record::from_rdata(owner, ttl, RData::NS(NS(ns)))],
                    vec![],
                )
            }
            _ => nodata(),
        },
        ["dns-version"] => match qtype {
            RecordType::TXT => answer(
                vec![Record::from_rdata(
                    owner,
                    ttl,
                    RData::TXT(TXT::new(vec![SPEC_VERSION.to_owned()])),
                )],
                vec![],
            ),
            _ => nodata(),
        },
        // Empty non-terminals: `svc` and `<ns>.svc`.
        ["svc"] => nodata(),
        [ns, "svc"] => {
            if zone.services.keys().any(|s| s.namespace == *ns) {
                nodata()
            } else {
                nxdomain()
            }
        }
        [svc, ns, "svc"] => {
            let Some(s) = lookup(zone, ns, svc) else {
                return nxdomain();
            };
            if s.headless {
                if s.endpoints.is_empty() {
                    return nxdomain();
                }
                if !matches!(qtype, RecordType::A | RecordType::AAAA) {
                    return nodata();
                }
                let answers = s
                    .endpoints
                    .iter()
                    .filter(|e| family_matches(&e.ip, qtype))
                    .map(|e| addr_record(&owner, e.ip, ttl))
                    .collect();
                answer(answers, vec![])
            } else {
                if !matches!(qtype, RecordType::A | RecordType::AAAA) {
                    return nodata();
                }
                let answers = s
                    .cluster_set_ips
                    .iter()
                    .filter(|ip| family_matches(ip, qtype))
                    .map(|ip| addr_record(&owner, *ip, ttl))
                    .collect();
                answer(answers, vec![])
            }
        }
        // `_<proto>.<svc>.<ns>.svc`: an empty non-terminal when some named port uses that protocol.
        [proto, svc, ns, "svc"] if proto.starts_with('_') => match lookup(zone, ns, svc) {
            Some(s)
                if s.ports
                    .iter()
                    .any(|p| p.name.is_some() && format!("_{}", p.protocol.lower()) == *proto) =>
            {
                nodata()
            }
            _ => nxdomain(),
        },
        // `<clusterid>.<svc>.<ns>.svc`: reserved; exists only for headless services, as the parent of
        // their endpoint names.
        [cluster, svc, ns, "svc"] => match lookup(zone, ns, svc) {
            Some(s) if s.headless && s.endpoints.iter().any(|e| e.cluster.as_str() == *cluster) => {
                nodata()
            }
            _ => nxdomain(),
        },
        // `_<port>._<proto>.<svc>.<ns>.svc`: SRV.
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            let Some(s) = lookup(zone, ns, svc) else {
                return nxdomain();
            };
            let Some(sp) = s.ports.iter().find(|p| {
                p.name.as_deref().is_some_and(|n| format!("_{n}") == *port)
                    && format!("_{}", p.protocol.lower()) == *proto
            }) else {
                return nxdomain();
            };
            if qtype != RecordType::SRV {
                return nodata();
            }
            srv_answer(s, sp, &owner, ttl, &answer, &nxdomain)
        }
        // `<hostname>.<clusterid>.<svc>.<ns>.svc`: one endpoint of a headless service.
        [host, cluster, svc, ns, "svc"] => {
            let Some(s) = lookup(zone, ns, svc).filter(|s| s.headless) else {
                return nxdomain();
            };
            let eps: Vec<&DnsEndpoint> = s
                .endpoints
                .iter()
                .filter(|e| e.cluster.as_str() == *cluster && e.host_label() == *host)
                .collect();
            if eps.is_empty() {
                return nxdomain();
            }
            let answers = eps
                .iter()
                .filter(|e| family_matches(&e.ip, qtype))
                .map(|e| addr_record(&owner, e.ip, ttl))
                .collect();
            answer(answers, vec![])
        }
        _ => nxdomain(),
    }
}

fn lookup<'z>(zone: &'z Zone, ns: &str, svc: &str) -> Option<&'z DnsService> {
    zone.services.get(&ServiceName {
        namespace: ns.to_owned(),
        name: svc.to_owned(),
    })
}

fn srv_answer(
    s: &DnsService,
    sp: &ServicePort,
    owner: &Name,
    ttl: u32,
    answer: &dyn Fn(Vec<Record>, Vec<Record>) -> Resolution,
    nxdomain: &dyn Fn() -> Resolution,
) -> Resolution {
    let svc_labels = [s.name.name.as_str(), s.name.namespace.as_str(), "svc"];
    if !s.headless {
        let Some(target) = name_of(&svc_labels) else {
            return nxdomain();
        };
        let answers = vec![Record::from_rdata(
            owner.clone(),
            ttl,
            RData::SRV(SRV::new(0, 100, sp.port, target.clone())),
        )];
        let additionals = s
            .cluster_set_ips
            .iter()
            .map(|ip| addr_record(&target, *ip, ttl))
            .collect();
        return answer(answers, additionals);
    }
    if s.endpoints.is_empty() {
        return nxdomain();
    }
    // One SRV per endpoint that serves this port; locality in the priority, the weight spread evenly
    // within a priority so that together they add up to about 100.
    let serving: Vec<(&DnsEndpoint, u16)> = s
        .endpoints
        .iter()
        .filter_map(|e| {
            e.ports
                .iter()
                .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                .map(|p| (e, p.port))
        })
        .collect();
    let local_count = serving.iter().filter(|(e, _)| e.local).count().max(1);
    let remote_count = serving.iter().filter(|(e, _)| !e.local).count().max(1);
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    for (e, port) in serving {
        let host = e.host_label();
        let mut labels = vec![host.as_str(), e.cluster.as_str()];
        labels.extend_from_slice(&svc_labels);
        let Some(target) = name_of(&labels) else {
            continue;
        };
        let (priority, count) = if e.local {
            (LOCAL_PRIORITY, local_count)
        } else {
            (REMOTE_PRIORITY, remote_count)
        };
        let weight = (100 / count).max(1) as u16;
        answers.push(Record::from_rdata(
            owner.clone(),
            ttl,
            RData::SRV(SRV::new(priority, weight, port, target.clone())),
        ));
        additionals.push(addr_record(&target, e.ip, ttl));
    }
    answer(answers, additionals)
}

/// The SRV protocol label of a protocol (`_tcp`, `_udp`, `_sctp`).
pub fn proto_label(p: Protocol) -> String {
    format!("_{}", p.lower())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::values::Protocol;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }
    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }
    fn port(name: &str, port: u16) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            protocol: Protocol::Tcp,
        }
    }
    fn ep(ip: &str, cluster: &str, host: Option<&str>, local: bool) -> DnsEndpoint {
        DnsEndpoint {
            ip: ip.parse().unwrap(),
            cluster: c(cluster),
            hostname: host.map(Into::into),
            local,
            ports: vec![EndpointPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        }
    }
    fn zone() -> Zone {
        let mut z = Zone::default();
        z.insert(DnsService {
            name: ServiceName::new("default", "web").unwrap(),
            cluster_set_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            headless: false,
            ports: vec![port("http", 80)],
            endpoints: vec![],
        });
        z.insert(DnsService {
            name: ServiceName::new("db", "pg").unwrap(),
            cluster_set_ips: vec![],
            headless: true,
            ports: vec![port("http", 8080)],
            endpoints: vec![
                ep("10.1.0.5", "c1", Some("pg-0"), true),
                ep("10.2.0.5", "c2", None, false),
                ep("10.2.0.6", "c2", Some("pg-2"), false),
            ],
        });
        z
    }
    fn ips(r: &Resolution) -> Vec<String> {
        r.answers
            .iter()
            .map(|rec| match &rec.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }
    fn q(z: &Zone, n: &str, t: RecordType) -> Resolution {
        resolve(z, &name(n), t, 5)
    }

    #[test]
    fn clusterset_ip_service_answers_both_families() {
        let z = zone();
        let r = q(&z, "web.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.code, ResponseCode::NoError);
        assert_eq!(ips(&r), ["10.96.0.10"]);
        assert_eq!(r.answers[0].ttl, 5);
        let r = q(&z, "WEB.Default.svc.clusterset.local.", RecordType::AAAA);
        assert_eq!(ips(&r), ["fd00::10"]);
    }

    #[test]
    fn headless_service_answers_usable_endpoints_local_first() {
        let z = zone();
        let r = q(&z, "pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(ips(&r), ["10.1.0.5", "10.2.0.5", "10.2.0.6"]);
        let r = q(&z, "pg.db.svc.clusterset.local.", RecordType::AAAA);
        assert_eq!(r.code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.result_label(), "NODATA");
    }

    #[test]
    fn headless_with_nothing_usable_is_nxdomain() {
        let mut z = zone();
        z.services
            .get_mut(&ServiceName::new("db", "pg").unwrap())
            .unwrap()
            .endpoints
            .clear();
        let r = q(&z, "pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.code, ResponseCode::NXDomain);
        assert_eq!(r.authorities.len(), 1, "SOA in authority");
    }

    #[test]
    fn endpoint_names_of_headless_services() {
        let z = zone();
        let r = q(&z, "pg-0.c1.pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(ips(&r), ["10.1.0.5"]);
        let r = q(&z, "10-2-0-5.c2.pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(ips(&r), ["10.2.0.5"]);
        let r = q(&z, "pg-0.c2.pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.code, ResponseCode::NXDomain);
        // The cluster level exists as an empty non-terminal for headless services...
        let r = q(&z, "c2.pg.db.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.result_label(), "NODATA");
        // ... and the reserved form does not exist for ClusterSetIP services.
        let r = q(&z, "c1.web.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.code, ResponseCode::NXDomain);
    }

    #[test]
    fn srv_for_clusterset_ip_service() {
        let z = zone();
        let r = q(
            &z,
            "_http._tcp.web.default.svc.clusterset.local.",
            RecordType::SRV,
        );
        assert_eq!(r.answers.len(), 1);
        let RData::SRV(srv) = &r.answers[0].data else {
            panic!()
        };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target.to_ascii(), "web.default.svc.clusterset.local.");
        assert_eq!(r.additionals.len(), 2);
        assert_eq!(
            q(
                &z,
                "_http._udp.web.default.svc.clusterset.local.",
                RecordType::SRV
            )
            .code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            q(
                &z,
                "_grpc._tcp.web.default.svc.clusterset.local.",
                RecordType::SRV
            )
            .code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            q(
                &z,
                "_tcp.web.default.svc.clusterset.local.",
                RecordType::SRV
            )
            .result_label(),
            "NODATA"
        );
    }

    #[test]
    fn srv_for_headless_service_expresses_locality() {
        let z = zone();
        let r = q(
            &z,
            "_http._tcp.pg.db.svc.clusterset.local.",
            RecordType::SRV,
        );
        let srvs: Vec<(u16, u16, u16, String)> = r
            .answers
            .iter()
            .map(|rec| {
                let RData::SRV(s) = &rec.data else { panic!() };
                (s.priority, s.weight, s.port, s.target.to_ascii())
            })
            .collect();
        assert_eq!(
            srvs,
            [
                (
                    0,
                    100,
                    8080,
                    "pg-0.c1.pg.db.svc.clusterset.local.".to_string()
                ),
                (
                    10,
                    50,
                    8080,
                    "10-2-0-5.c2.pg.db.svc.clusterset.local.".to_string()
                ),
                (
                    10,
                    50,
                    8080,
                    "pg-2.c2.pg.db.svc.clusterset.local.".to_string()
                ),
            ]
        );
        assert_eq!(r.additionals.len(), 3);
    }

    #[test]
    fn version_apex_and_unknown_names() {
        let z = zone();
        let r = q(&z, "dns-version.clusterset.local.", RecordType::TXT);
        let RData::TXT(t) = &r.answers[0].data else {
            panic!()
        };
        assert_eq!(t.to_string(), "1.0.0");
        assert_eq!(q(&z, "clusterset.local.", RecordType::SOA).answers.len(), 1);
        assert_eq!(q(&z, "clusterset.local.", RecordType::NS).answers.len(), 1);
        assert_eq!(
            q(&z, "clusterset.local.", RecordType::A).result_label(),
            "NODATA"
        );
        assert_eq!(
            q(&z, "nope.default.svc.clusterset.local.", RecordType::A).code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            q(&z, "default.svc.clusterset.local.", RecordType::A).result_label(),
            "NODATA"
        );
        assert_eq!(
            q(&z, "other.svc.clusterset.local.", RecordType::A).code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            q(&z, "a.b.c.d.e.f.svc.clusterset.local.", RecordType::A).code,
            ResponseCode::NXDomain
        );
        // A type the zone does not hold, on a name that exists: NODATA.
        assert_eq!(
            q(&z, "web.default.svc.clusterset.local.", RecordType::MX).result_label(),
            "NODATA"
        );
        assert_eq!(
            q(&z, "web.default.svc.clusterset.local.", RecordType::ANY).code,
            ResponseCode::NotImp
        );
    }

    #[test]
    fn out_of_zone_is_refused() {
        let z = zone();
        let r = q(&z, "example.com.", RecordType::A);
        assert_eq!(r.code, ResponseCode::Refused);
        assert!(r.out_of_zone);
        let r = q(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert!(r.out_of_zone);
    }
}
