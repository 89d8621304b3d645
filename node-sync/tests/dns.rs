//! clusterset.local served from node-sync's view of two real etcd clusters: the ClusterSetIP of a
//! global service, the usable endpoints of a headless one (a failing health verdict removes one).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clusterset_dns::{DnsConfig, DnsMetrics, DnsServer};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use mesh_model::keys::MeshKey;
use mesh_model::values::{
    Affinity, BackendVerdict, EndpointChunk, HealthReport, MeshValue, Protocol, ServiceSpec,
    Verdict,
};
use node_sync::lb::FakeMaps;
use support::*;

fn pg(mut s: ServiceSpec) -> ServiceSpec {
    s.namespace = "db".into();
    s.name = "pg".into();
    s.headless = true;
    s.frontends.clear();
    s
}

fn pg_chunk(mut ch: EndpointChunk) -> EndpointChunk {
    ch.namespace = "db".into();
    ch.name = "pg".into();
    ch
}

async fn ask(server: SocketAddr, name: &str) -> Vec<IpAddr> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .expect("DNS answer within 2 s")
        .unwrap();
    let reply = Message::from_vec(&buf[..n]).unwrap();
    let mut ips: Vec<IpAddr> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterset_local_follows_the_index() {
    let (e1, e2) = tokio::join!(Etcd::start(), Etcd::start());
    let mut w1 = ApiWriter::new(&e1, "c1", 1).await;
    let mut w2 = ApiWriter::new(&e2, "c2", 2).await;
    w1.publish_all(
        vec![spec("c1", Affinity::Local), pg(spec("c1", Affinity::Local))],
        vec![pg_chunk(chunk(
            "c1",
            0,
            vec![endpoint("10.1.0.5", 5432, "other")],
        ))],
    )
    .await;
    w2.publish_all(
        vec![spec("c2", Affinity::Local), pg(spec("c2", Affinity::Local))],
        vec![pg_chunk(chunk(
            "c2",
            0,
            vec![endpoint("10.2.0.5", 5432, "m1")],
        ))],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    remote_file(dir.path(), "c2", &e2);
    let maps = FakeMaps::new();
    let agent = start_agent(options(&e1, "c1", 1, Some(dir.path())), &maps);
    let server = DnsServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        agent.dns_zone(),
        DnsConfig::default(),
        Arc::new(DnsMetrics::default()),
    )
    .await
    .unwrap();
    let addr = server.local_addr;
    let v = |s: &str| -> IpAddr { s.parse().unwrap() };

    let t0 = std::time::Instant::now();
    loop {
        let web = ask(addr, "web.default.svc.clusterset.local.").await;
        let pg = ask(addr, "pg.db.svc.clusterset.local.").await;
        if web == [v(VIP)] && pg == [v("10.1.0.5"), v("10.2.0.5")] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "clusterset.local not answered: web {web:?}, pg {pg:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Another node of c1 reports the local pg endpoint failing: it leaves the answers.
    let report = HealthReport {
        cluster: c("c1"),
        node: "other".into(),
        verdicts: vec![BackendVerdict {
            ip: v("10.1.0.5"),
            port: 5432,
            protocol: Protocol::Tcp,
            verdict: Verdict::Failing,
            since: None,
        }],
    };
    w1.put(
        MeshKey::Health {
            cluster: c("c1"),
            node: "other".into(),
        },
        MeshValue::Health(report),
    )
    .await;
    let t0 = std::time::Instant::now();
    while ask(addr, "pg.db.svc.clusterset.local.").await != [v("10.2.0.5")] {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "failing endpoint still answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}
