//! The DNS server over real UDP and TCP sockets, queried with real DNS packets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clusterset_dns::{DnsConfig, DnsEndpoint, DnsMetrics, DnsServer, DnsService, Zone};
use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};
use mesh_model::ClusterName;
use mesh_model::keys::ServiceName;
use mesh_model::values::{EndpointPort, Protocol, ServicePort};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn ep(ip: &str, cluster: &str, host: Option<&str>, local: bool) -> DnsEndpoint {
    DnsEndpoint {
        ip: ip.parse().unwrap(),
        cluster: c(cluster),
        hostname: host.map(Into::into),
        local,
        ports: vec![EndpointPort {
            name: Some("pg".into()),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
    }
}

fn zone(local_pg_up: bool) -> Zone {
    let mut z = Zone::default();
    z.insert(DnsService {
        name: ServiceName::new("default", "web").unwrap(),
        cluster_set_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
        headless: false,
        ports: vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![],
    });
    let mut eps = vec![];
    if local_pg_up {
        eps.push(ep("10.1.0.5", "c1", Some("pg-0"), true));
    }
    eps.push(ep("10.2.0.5", "c2", Some("pg-1"), false));
    z.insert(DnsService {
        name: ServiceName::new("db", "pg").unwrap(),
        cluster_set_ips: vec![],
        headless: true,
        ports: vec![ServicePort {
            name: Some("pg".into()),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
        endpoints: eps,
    });
    z
}

fn question(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

async fn udp(server: SocketAddr, packet: &[u8]) -> Option<Message> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buf[..n]).expect("server sent a parseable DNS message"))
}

async fn tcp(server: SocketAddr, packet: &[u8]) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

struct Harness {
    addr: SocketAddr,
    tx: watch::Sender<Arc<Zone>>,
    metrics: Arc<DnsMetrics>,
    _server: DnsServer,
}

async fn start(config: DnsConfig) -> Harness {
    let (tx, rx) = watch::channel(Arc::new(zone(true)));
    let metrics = Arc::new(DnsMetrics::default());
    let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), rx, config, metrics.clone())
        .await
        .unwrap();
    Harness {
        addr: server.local_addr,
        tx,
        metrics,
        _server: server,
    }
}

#[tokio::test]
async fn every_name_form_over_udp_and_tcp() {
    let h = start(DnsConfig::default()).await;
    for via_tcp in [false, true] {
        let ask = |name: &'static str, t: RecordType| {
            let addr = h.addr;
            async move {
                let q = question(7, name, t);
                if via_tcp {
                    tcp(addr, &q).await
                } else {
                    udp(addr, &q).await.expect("an answer")
                }
            }
        };
        let m = ask("web.default.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(addrs(&m), ["10.96.0.10"]);
        assert_eq!(m.answers[0].ttl, 5);
        assert_eq!(
            addrs(&ask("web.default.svc.clusterset.local.", RecordType::AAAA).await),
            ["fd00::a"]
        );

        let m = ask("pg.db.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(addrs(&m), ["10.1.0.5", "10.2.0.5"], "local first");
        let m = ask("pg-1.c2.pg.db.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(addrs(&m), ["10.2.0.5"]);

        let m = ask("_pg._tcp.pg.db.svc.clusterset.local.", RecordType::SRV).await;
        let prio: Vec<u16> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.priority,
                _ => panic!("not SRV"),
            })
            .collect();
        assert_eq!(prio, [0, 10]);
        assert_eq!(
            m.additionals
                .iter()
                .filter(|r| r.record_type() == RecordType::A)
                .count(),
            2
        );
        let m = ask(
            "_http._tcp.web.default.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(m.answers.len(), 1);

        let m = ask("dns-version.clusterset.local.", RecordType::TXT).await;
        match &m.answers[0].data {
            RData::TXT(t) => assert_eq!(t.to_string(), "1.0.0"),
            other => panic!("{other:?}"),
        }
        let m = ask("c1.web.default.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1, "SOA with NXDOMAIN");
        let m = ask("local-only.default.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "non-global services do not exist"
        );
        let m = ask("example.com.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        let m = ask("web.default.svc.clusterset.local.", RecordType::ANY).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        let m = ask("web.default.svc.clusterset.local.", RecordType::CAA).await;
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }
    let snap = h.metrics.snapshot();
    assert_eq!(snap.get(&("A".to_string(), "NXDOMAIN")), Some(&4));
    assert!(
        h.metrics
            .prometheus()
            .contains("clusterset_dns_queries_total{type=\"A\",result=\"NOERROR\"} ")
    );
}

#[tokio::test]
async fn after_local_backends_fail_the_next_answer_holds_only_remote_endpoints() {
    let h = start(DnsConfig::default()).await;
    let q = question(1, "pg.db.svc.clusterset.local.", RecordType::A);
    assert_eq!(
        addrs(&udp(h.addr, &q).await.unwrap()),
        ["10.1.0.5", "10.2.0.5"]
    );
    h.tx.send(Arc::new(zone(false))).unwrap();
    assert_eq!(addrs(&udp(h.addr, &q).await.unwrap()), ["10.2.0.5"]);
    let mut nothing = zone(false);
    nothing
        .services
        .get_mut(&ServiceName::new("db", "pg").unwrap())
        .unwrap()
        .endpoints
        .clear();
    h.tx.send(Arc::new(nothing)).unwrap();
    assert_eq!(
        udp(h.addr, &q).await.unwrap().metadata.response_code,
        ResponseCode::NXDomain
    );
}

#[tokio::test]
async fn ttl_flag_and_forwarding() {
    // An upstream that answers everything with 192.0.2.1, on loopback.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.add_query(q.queries[0].clone());
            r.add_answer(hickory_server::proto::rr::Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(hickory_server::proto::rr::rdata::A(
                    "192.0.2.1".parse().unwrap(),
                )),
            ));
            let _ = upstream.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    let h = start(DnsConfig {
        ttl: 30,
        forward: Some(upstream_addr),
        ..DnsConfig::default()
    })
    .await;
    let m = udp(h.addr, &question(3, "example.com.", RecordType::A))
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(!m.metadata.authoritative);
    assert_eq!(addrs(&m), ["192.0.2.1"]);
    let m = udp(
        h.addr,
        &question(4, "web.default.svc.clusterset.local.", RecordType::A),
    )
    .await
    .unwrap();
    assert_eq!(m.answers[0].ttl, 30);
}

#[tokio::test]
async fn malformed_and_odd_queries_get_dns_errors_not_a_crash() {
    let h = start(DnsConfig::default()).await;
    // Two questions in one message: FORMERR.
    let mut m = Message::new(9, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.default.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("pg.db.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    let r = udp(h.addr, &m.to_vec().unwrap()).await.unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // An UPDATE: NOTIMP.
    let mut m = Message::new(10, MessageType::Query, OpCode::Update);
    m.add_query(Query::query(
        Name::from_ascii("clusterset.local.").unwrap(),
        RecordType::SOA,
    ));
    let r = udp(h.addr, &m.to_vec().unwrap()).await.unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    // Class CH: REFUSED.
    let mut q = Query::query(
        Name::from_ascii("dns-version.clusterset.local.").unwrap(),
        RecordType::TXT,
    );
    q.set_query_class(DNSClass::CH);
    let mut m = Message::new(11, MessageType::Query, OpCode::Query);
    m.add_query(q);
    let r = udp(h.addr, &m.to_vec().unwrap()).await.unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // A header and a truncated question: FORMERR or no answer, and the server lives on.
    let mut broken = question(12, "web.default.svc.clusterset.local.", RecordType::A);
    broken.truncate(20);
    if let Some(r) = udp(h.addr, &broken).await {
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }
    // An oversize name (a label of 64 bytes) written by hand: FORMERR or dropped.
    let mut raw = vec![0, 13, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
    raw.extend(std::iter::repeat_n(b'a', 64));
    raw.extend([0, 0, 1, 0, 1]);
    if let Some(r) = udp(h.addr, &raw).await {
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }
    let r = udp(
        h.addr,
        &question(14, "web.default.svc.clusterset.local.", RecordType::A),
    )
    .await
    .unwrap();
    assert_eq!(addrs(&r), ["10.96.0.10"], "still serving");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Random packets, and valid questions with random bytes flipped, never stop the server: after each
    /// the server still answers a good question.
    #[test]
    fn random_packets_never_crash_the_handler(
        random in proptest::collection::vec(any::<u8>(), 0..600),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = start(DnsConfig::default()).await;
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.send_to(&random, h.addr).await.unwrap();
            let mut mutated = question(5, "_pg._tcp.pg.db.svc.clusterset.local.", RecordType::SRV);
            for (at, byte) in flips {
                let n = mutated.len();
                mutated[at % n] ^= byte;
            }
            sock.send_to(&mutated, h.addr).await.unwrap();
            let good = question(6, "web.default.svc.clusterset.local.", RecordType::A);
            let r = udp(h.addr, &good).await.expect("server still answers");
            assert_eq!(addrs(&r), ["10.96.0.10"]);
        });
    }
}
