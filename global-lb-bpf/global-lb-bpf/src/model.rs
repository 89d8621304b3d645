//! The typed view of the maps: frontends, backends, services and counters.
//!
//! These are what callers (node-sync, the `glb` command) hand to [`crate::ServiceMaps`]; the
//! conversions to the raw `#[repr(C)]` layouts of `global-lb-bpf-common` live here too.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use global_lb_bpf_common as common;
use serde::{Deserialize, Serialize};

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (translated at `connect()`).
    Tcp,
    /// UDP (translated at `connect()` for connected sockets, per datagram otherwise).
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => common::PROTO_TCP,
            Proto::Udp => common::PROTO_UDP,
        }
    }

    /// The protocol with this IP protocol number, if it is one we balance.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            common::PROTO_TCP => Some(Proto::Tcp),
            common::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// A service address: what clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    /// Service (virtual) address, IPv4 or IPv6.
    pub addr: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl Frontend {
    /// A frontend from its parts.
    pub fn new(addr: IpAddr, port: u16, proto: Proto) -> Self {
        Self { addr, port, proto }
    }

    /// The frontend as a socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.socket_addr())
    }
}

impl FromStr for Frontend {
    type Err = String;
    /// Parses `tcp:127.10.0.1:80` or `udp:[fd00::1]:53`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (proto, addr) = s
            .split_once(':')
            .ok_or_else(|| format!("frontend {s:?}: expected PROTO:ADDR:PORT"))?;
        let proto: Proto = proto.parse().map_err(|e| format!("frontend {s:?}: {e}"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("frontend {s:?}: {addr:?} is not ADDR:PORT: {e}"))?;
        Ok(Frontend::new(addr.ip(), addr.port(), proto))
    }
}

/// One backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    /// Backend address; must be of the same family as the frontend.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Cluster the backend runs in.
    pub cluster_id: u16,
    /// Whether the backend runs in the local cluster (shown by [`crate::ServiceMaps::counters`]).
    pub local: bool,
    /// Relative weight: the backend fills this many slots of the service. 0 drains it (kept out
    /// of new connections).
    pub weight: u16,
}

impl Backend {
    /// A backend with weight 1, not marked local.
    pub fn new(addr: IpAddr, port: u16, cluster_id: u16) -> Self {
        Self {
            addr,
            port,
            cluster_id,
            local: false,
            weight: 1,
        }
    }

    /// The same backend with `local` set.
    pub fn with_local(mut self, local: bool) -> Self {
        self.local = local;
        self
    }

    /// The same backend with another weight.
    pub fn with_weight(mut self, weight: u16) -> Self {
        self.weight = weight;
        self
    }

    /// The backend as a socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// What identifies a backend in the backends map (weight aside).
    pub(crate) fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            addr: self.addr,
            port: self.port,
            cluster_id: self.cluster_id,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.socket_addr(), self.cluster_id)?;
        if self.local {
            f.write_str("(local)")?;
        }
        if self.weight != 1 {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

impl FromStr for Backend {
    type Err = String;
    /// Parses `ADDR:PORT[@CLUSTER][*WEIGHT][,local]`, e.g. `127.0.0.2:8080@1*2,local`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, local) = match s.strip_suffix(",local") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let (rest, weight) = match rest.rsplit_once('*') {
            Some((rest, w)) => (
                rest,
                w.parse::<u16>()
                    .map_err(|e| format!("backend {s:?}: weight {w:?}: {e}"))?,
            ),
            None => (rest, 1),
        };
        let (addr, cluster_id) = match rest.rsplit_once('@') {
            Some((addr, c)) => (
                addr,
                c.parse::<u16>()
                    .map_err(|e| format!("backend {s:?}: cluster id {c:?}: {e}"))?,
            ),
            None => (rest, 0),
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("backend {s:?}: {addr:?} is not ADDR:PORT: {e}"))?;
        Ok(Backend {
            addr: addr.ip(),
            port: addr.port(),
            cluster_id,
            local,
            weight,
        })
    }
}

/// A backend's identity in the backends map: two services with the same backend share one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct BackendIdentity {
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    pub(crate) cluster_id: u16,
}

/// A service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The service address.
    pub frontend: Frontend,
    /// Id of the service in the maps (stable while the service exists).
    pub service_id: u32,
    /// Its backends, weights counted from the slots; sorted by address. Empty: connects are
    /// refused.
    pub backends: Vec<Backend>,
}

/// One backend in the maps: its id, address and cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendEntry {
    /// Id of the backend in the maps.
    pub backend_id: u32,
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Cluster of the backend.
    pub cluster_id: u16,
    /// Whether the backend is in the local cluster.
    pub local: bool,
}

/// Connections sent to one backend since it entered the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounter {
    /// Id of the backend in the maps.
    pub backend_id: u32,
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Cluster of the backend.
    pub cluster_id: u16,
    /// Whether the backend is in the local cluster.
    pub local: bool,
    /// TCP connects, connected UDP sockets and unconnected UDP datagrams sent to it.
    pub connections: u64,
}

// ---- conversions to the raw map layouts ----

/// Address words as the kernel keeps them (IPv4 as IPv4-mapped IPv6).
pub(crate) fn addr_words(addr: IpAddr) -> [u32; 4] {
    let v6 = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// The address of map words; IPv4-mapped words give an IPv4 address.
pub(crate) fn words_addr(words: &[u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if common::is_v4_mapped(words) {
        IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// Port in network byte order, as the map holds it.
pub(crate) fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// Port from network byte order.
pub(crate) fn port_host(port: u16) -> u16 {
    u16::from_be(port)
}

impl Frontend {
    /// The services-map key of `slot` of this frontend.
    pub(crate) fn key(&self, slot: u32) -> common::ServiceKey {
        common::ServiceKey {
            addr: addr_words(self.addr),
            port: port_be(self.port),
            proto: self.proto.number(),
            pad: 0,
            slot,
        }
    }

    /// The frontend of a services-map key (None for a protocol we do not write).
    pub(crate) fn from_key(key: &common::ServiceKey) -> Option<Self> {
        Some(Frontend {
            addr: words_addr(&key.addr),
            port: port_host(key.port),
            proto: Proto::from_number(key.proto)?,
        })
    }
}

/// The backends-map value of a backend.
pub(crate) fn backend_value(b: &Backend) -> common::Backend {
    common::Backend {
        addr: addr_words(b.addr),
        port: port_be(b.port),
        cluster_id: b.cluster_id,
        flags: if b.local {
            common::BACKEND_FLAG_LOCAL
        } else {
            0
        },
        family: if b.addr.is_ipv4() {
            common::FAMILY_V4
        } else {
            common::FAMILY_V6
        },
        pad: [0; 2],
    }
}

/// The backend of a backends-map value (weight 1; weights come from slots).
pub(crate) fn backend_from_value(v: &common::Backend) -> Backend {
    Backend {
        addr: words_addr(&v.addr),
        port: port_host(v.port),
        cluster_id: v.cluster_id,
        local: v.flags & common::BACKEND_FLAG_LOCAL != 0,
        weight: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_parses_and_round_trips_through_the_key() {
        let f: Frontend = "tcp:127.10.0.1:80".parse().unwrap();
        assert_eq!(f.proto, Proto::Tcp);
        assert_eq!(f.port, 80);
        let key = f.key(0);
        assert_eq!(key.port, 80u16.to_be());
        assert_eq!(Frontend::from_key(&key), Some(f));

        let f6: Frontend = "udp:[fd00::1]:53".parse().unwrap();
        assert_eq!(Frontend::from_key(&f6.key(3)), Some(f6));
        assert!(
            "sctp:1.2.3.4:5"
                .parse::<Frontend>()
                .unwrap_err()
                .contains("sctp")
        );
        assert!("tcp:1.2.3.4".parse::<Frontend>().is_err());
    }

    #[test]
    fn backend_parses_cluster_weight_and_local() {
        let b: Backend = "127.0.0.2:8080@3*2,local".parse().unwrap();
        assert_eq!(b.socket_addr(), "127.0.0.2:8080".parse().unwrap());
        assert_eq!((b.cluster_id, b.weight, b.local), (3, 2, true));
        let b: Backend = "[fd00::2]:80".parse().unwrap();
        assert_eq!((b.cluster_id, b.weight, b.local), (0, 1, false));
        assert!(
            "[fd00::2]:80@x"
                .parse::<Backend>()
                .unwrap_err()
                .contains("cluster id")
        );
    }

    #[test]
    fn ipv4_is_stored_as_ipv4_mapped_in_network_order() {
        let w = addr_words("127.10.0.1".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [127, 10, 0, 1]);
        assert!(common::is_v4_mapped(&w));
        assert_eq!(words_addr(&w), "127.10.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(words_addr(&addr_words(v6)), v6);
    }

    #[test]
    fn backend_value_round_trips() {
        let b = Backend::new("fd00::2".parse().unwrap(), 8080, 7).with_local(true);
        let v = backend_value(&b);
        assert_eq!(v.family, common::FAMILY_V6);
        assert_eq!(backend_from_value(&v), b);
    }
}
