//! The kernel side of the route manager: routes read, added, replaced and deleted over rtnetlink
//! (`rtnetlink` crate), in the main table, each marked with node-sync's routing protocol id. Nothing here
//! decides anything: `plan.rs` does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::plan::{DesiredRoute, GatewayFamily, InstalledRoute};

/// A route table failure, naming the operation and the route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A routing mode node-sync cannot carry out yet.
    #[error("{0}")]
    NotAvailable(&'static str),
    /// The netlink socket could not be opened.
    #[error("open a netlink route socket: {0}")]
    Open(#[source] std::io::Error),
    /// `--routing vxlan`'s device cannot be made or kept (a link of another kind has its name, the underlay
    /// address is on no device, ...).
    #[error("{0}")]
    Device(String),
    /// The kernel refused or failed a request.
    #[error("{op} {what}: {source}")]
    Netlink {
        /// `add`, `replace`, `delete`, `dump`.
        op: &'static str,
        /// The route (or `routes`).
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// Where node-sync's routes live and how they are marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOwner {
    /// The routing protocol id on every route node-sync makes (`ip route show proto <id>`), and the only thing
    /// that makes a route node-sync's.
    pub protocol: u8,
    /// The routing table (254 = main, so no policy rule is needed).
    pub table: u8,
}

/// node-sync's routing protocol id: 157, unassigned in iproute2's `rt_protos` (and in `rt_protos.d` of the
/// common distributions); an operator may name it with `echo "157 clustermesh" >> /etc/iproute2/rt_protos`.
pub const CLUSTERMESH_PROTOCOL: u8 = 157;

impl Default for RouteOwner {
    fn default() -> Self {
        RouteOwner {
            protocol: CLUSTERMESH_PROTOCOL,
            table: RouteHeader::RT_TABLE_MAIN,
        }
    }
}

/// The routes of one table, as the manager sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableView {
    /// Routes with our protocol id.
    pub ours: Vec<InstalledRoute>,
    /// Destinations of every other unicast route of the table (default routes included; the plan ignores them).
    pub foreign: Vec<IpNet>,
}

/// The route table behind the manager: the kernel's, or a fake in unit tests.
pub trait RouteTable {
    /// Reads the table.
    fn read(&self) -> impl Future<Output = Result<TableView, RouteError>> + Send;
    /// Adds a route (fails if one with the same destination and metric exists).
    fn add(&self, r: &DesiredRoute) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Replaces our route to `r.dst` in place.
    fn replace(&self, r: &DesiredRoute) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Deletes our route.
    fn delete(&self, r: &InstalledRoute) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Before each sync: what the routes need in place (`--routing vxlan`: the device). A failure ends the
    /// sync before anything is read or changed.
    fn prepare(&self) -> impl Future<Output = Result<(), RouteError>> + Send {
        async { Ok(()) }
    }
    /// After each sync, with the routes wanted and whether every cluster is synced (`prune`): what no route
    /// needs any more goes (`--routing vxlan`: forwarding entries). Returns how many things went.
    fn settle(
        &self,
        _routes: &[DesiredRoute],
        _prune: bool,
    ) -> impl Future<Output = Result<usize, RouteError>> + Send {
        async { Ok(0) }
    }
    /// Which of a remote node's addresses its routes go through (the CIDR's family for native routes; the
    /// underlay's for vxlan).
    fn gateway_family(&self) -> GatewayFamily {
        GatewayFamily::OfCidr
    }
    /// The overlay device the routes go through, if any (`--routing vxlan`), for the status.
    fn device(&self) -> Option<super::vxlan::OverlayDevice> {
        None
    }
}

/// The kernel's routing table over an rtnetlink socket opened in the calling thread's network namespace.
#[derive(Clone)]
pub struct NetlinkRoutes {
    handle: Handle,
    owner: RouteOwner,
}

impl NetlinkRoutes {
    /// Opens the socket and spawns its connection task on the current tokio runtime.
    pub fn open(owner: RouteOwner) -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Open)?;
        tokio::spawn(conn);
        Ok(NetlinkRoutes { handle, owner })
    }

    /// The owner marks.
    pub fn owner(&self) -> RouteOwner {
        self.owner
    }

    fn message(&self, r: &DesiredRoute) -> RouteMessage {
        // The plan only makes routes whose gateway has the destination's family.
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .expect("a destination of one family")
            .gateway(r.gateway)
            .expect("a gateway of the destination's family")
            .table_id(u32::from(self.owner.table))
            .protocol(RouteProtocol::Other(self.owner.protocol))
            .kind(RouteType::Unicast)
            .build()
    }

    fn family_message(&self, family: AddressFamily) -> RouteMessage {
        match family {
            AddressFamily::Inet6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            _ => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        }
    }
}

pub(super) fn addr_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The table of a dumped route (`RTA_TABLE` when present, else the header's).
pub(super) fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Destination and gateway of a dumped unicast route.
pub(super) fn decode(m: &RouteMessage) -> Option<(IpNet, Option<IpAddr>)> {
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr_of(d),
            RouteAttribute::Gateway(g) => gw = addr_of(g),
            _ => {}
        }
    }
    let dst = match (dst, m.header.address_family) {
        (Some(d), _) => d,
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let net = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    Some((net, gw))
}

impl RouteTable for NetlinkRoutes {
    async fn read(&self) -> Result<TableView, RouteError> {
        let mut view = TableView::default();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut s = self
                .handle
                .route()
                .get(self.family_message(family))
                .execute();
            while let Some(m) = s.try_next().await.map_err(|source| RouteError::Netlink {
                op: "dump",
                what: "routes".into(),
                source,
            })? {
                if table_of(&m) != u32::from(self.owner.table)
                    || m.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let Some((dst, gateway)) = decode(&m) else {
                    continue;
                };
                if m.header.protocol == RouteProtocol::Other(self.owner.protocol) {
                    view.ours.push(InstalledRoute { dst, gateway });
                } else {
                    view.foreign.push(dst);
                }
            }
        }
        view.ours.sort();
        view.foreign.sort();
        Ok(view)
    }

    async fn add(&self, r: &DesiredRoute) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(self.message(r))
            .execute()
            .await
            .map_err(|source| RouteError::Netlink {
                op: "add",
                what: format!("route {} via {}", r.dst, r.gateway),
                source,
            })
    }

    async fn replace(&self, r: &DesiredRoute) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(self.message(r))
            .replace()
            .execute()
            .await
            .map_err(|source| RouteError::Netlink {
                op: "replace",
                what: format!("route {} via {}", r.dst, r.gateway),
                source,
            })
    }

    async fn delete(&self, r: &InstalledRoute) -> Result<(), RouteError> {
        // The kernel matches a delete on every attribute given: destination, table and our protocol id, so a
        // route of another protocol to the same destination is never the one deleted.
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .expect("a destination of one family")
            .table_id(u32::from(self.owner.table))
            .protocol(RouteProtocol::Other(self.owner.protocol));
        if let Some(gw) = r.gateway {
            b = b
                .gateway(gw)
                .expect("a gateway of the destination's family");
        }
        self.handle
            .route()
            .del(b.build())
            .execute()
            .await
            .map_err(|source| RouteError::Netlink {
                op: "delete",
                what: format!("route {}", r.dst),
                source,
            })
    }
}
