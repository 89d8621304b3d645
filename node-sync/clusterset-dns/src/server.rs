//! The DNS server: hickory-server on UDP and TCP, answering from the latest [`Zone`] snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::zone::{Resolution, Zone, resolve};

/// How the server answers.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// TTL of every record (`--dns-ttl`, default 5 s).
    pub ttl: u32,
    /// Where to send questions outside `clusterset.local` (`--dns-forward`); refused when `None`.
    pub forward: Option<SocketAddr>,
    /// How long to wait for the forwarder.
    pub forward_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            ttl: 5,
            forward: None,
            forward_timeout: Duration::from_secs(2),
        }
    }
}

/// Queries answered, by type and result.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    counts: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl DnsMetrics {
    fn count(&self, qtype: &str, result: &'static str) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry((qtype.to_owned(), result)).or_default() += 1;
        }
    }

    /// A snapshot: (query type, result) -> count.
    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Prometheus text lines (`clusterset_dns_queries_total{type="A",result="NOERROR"} 3`).
    pub fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP clusterset_dns_queries_total DNS queries answered, by query type and result.\n\
             # TYPE clusterset_dns_queries_total counter\n",
        );
        for ((t, r), n) in self.snapshot() {
            out.push_str(&format!(
                "clusterset_dns_queries_total{{type=\"{t}\",result=\"{r}\"}} {n}\n"
            ));
        }
        out
    }
}

/// The request handler: one question, one answer from the current zone.
pub struct ClustersetDns {
    zone: watch::Receiver<Arc<Zone>>,
    config: DnsConfig,
    metrics: Arc<DnsMetrics>,
}

impl ClustersetDns {
    /// A handler over a zone channel.
    pub fn new(
        zone: watch::Receiver<Arc<Zone>>,
        config: DnsConfig,
        metrics: Arc<DnsMetrics>,
    ) -> Self {
        Self {
            zone,
            config,
            metrics,
        }
    }

    async fn forward(&self, upstream: SocketAddr, query: &Query, id: u16) -> Option<Message> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let sock = UdpSocket::bind(bind).await.ok()?;
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let bytes = msg.to_vec().ok()?;
        sock.send_to(&bytes, upstream).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let fut = async {
            loop {
                let (n, from) = sock.recv_from(&mut buf).await.ok()?;
                if from != upstream {
                    continue;
                }
                if let Ok(m) = Message::from_vec(&buf[..n])
                    && m.metadata.id == id
                {
                    return Some(m);
                }
            }
        };
        tokio::time::timeout(self.config.forward_timeout, fut)
            .await
            .ok()
            .flatten()
    }
}

#[async_trait::async_trait]
impl RequestHandler for ClustersetDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let meta = &request.metadata;
        let send_error = |code: ResponseCode| builder.error_msg(meta, code);

        if meta.message_type != MessageType::Query || meta.op_code != OpCode::Query {
            self.metrics.count("-", "NOTIMP");
            return send(&mut response_handle, send_error(ResponseCode::NotImp), meta).await;
        }
        let info = match request.request_info() {
            Ok(info) => info,
            Err(_) => {
                // Not exactly one question.
                self.metrics.count("-", "FORMERR");
                let builder = MessageResponseBuilder::from_message_request(request);
                return send(
                    &mut response_handle,
                    builder.error_msg(meta, ResponseCode::FormErr),
                    meta,
                )
                .await;
            }
        };
        let query = info.query.original().clone();
        let qtype = query.query_type();
        let qtype_label = qtype.to_string();
        if query.query_class() != DNSClass::IN {
            self.metrics.count(&qtype_label, "REFUSED");
            let builder = MessageResponseBuilder::from_message_request(request);
            return send(
                &mut response_handle,
                builder.error_msg(meta, ResponseCode::Refused),
                meta,
            )
            .await;
        }

        let zone = self.zone.borrow().clone();
        let mut res: Resolution = resolve(&zone, query.name(), qtype, self.config.ttl);
        let mut authoritative = true;
        if res.out_of_zone
            && let Some(upstream) = self.config.forward
        {
            authoritative = false;
            match self.forward(upstream, &query, meta.id).await {
                Some(m) => {
                    res = Resolution {
                        code: m.metadata.response_code,
                        answers: m.answers,
                        authorities: m.authorities,
                        additionals: m
                            .additionals
                            .into_iter()
                            .filter(|r| r.record_type() != RecordType::OPT)
                            .collect(),
                        out_of_zone: true,
                    };
                }
                None => {
                    warn!(%upstream, name = %query.name(), "DNS forwarder did not answer");
                    res.code = ResponseCode::ServFail;
                }
            }
        }
        self.metrics.count(&qtype_label, res.result_label());
        debug!(name = %query.name(), %qtype, result = res.result_label(), "dns query");

        let mut metadata = Metadata::response_from_request(meta);
        metadata.authoritative = authoritative && !res.out_of_zone;
        metadata.recursion_available = self.config.forward.is_some();
        metadata.response_code = res.code;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, 4096));
            e
        });
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        let response = builder.build(
            metadata,
            res.answers.iter(),
            res.authorities.iter(),
            std::iter::empty::<&Record>(),
            res.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, "failed to send DNS response");
                let mut m = Metadata::response_from_request(meta);
                m.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata: m,
                    counts: Default::default(),
                })
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    meta: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            warn!(%error, "failed to send DNS error response");
            let mut m = Metadata::response_from_request(meta);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata: m,
                counts: Default::default(),
            })
        }
    }
}

/// A running DNS server; dropping it stops it.
pub struct DnsServer {
    /// The address it listens on (UDP and TCP).
    pub local_addr: SocketAddr,
    server: Server<ClustersetDns>,
}

impl DnsServer {
    /// Bind UDP and TCP on `listen` (port 0 picks one free for both) and serve.
    pub async fn bind(
        listen: SocketAddr,
        zone: watch::Receiver<Arc<Zone>>,
        config: DnsConfig,
        metrics: Arc<DnsMetrics>,
    ) -> std::io::Result<Self> {
        let (udp, tcp) = bind_pair(listen).await?;
        let local_addr = udp.local_addr()?;
        let mut server = Server::new(ClustersetDns::new(zone, config, metrics));
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Ok(Self { local_addr, server })
    }

    /// Stop serving.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "DNS server shutdown");
        }
    }
}

async fn bind_pair(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    if listen.port() != 0 {
        return Ok((
            UdpSocket::bind(listen).await?,
            TcpListener::bind(listen).await?,
        ));
    }
    // Port 0: find a port free for both protocols.
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(listen).await?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port for UDP and TCP")))
}
