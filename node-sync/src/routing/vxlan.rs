//! `--routing vxlan`: the overlay device `clustermesh0` and its forwarding entries, behind the same
//! `RouteTable` as `--routing native`, so the plan, the diff and the ownership of routes (protocol id 157) are
//! shared and only the gateway and the device differ.
//!
//! Per remote node (flannel's vxlan backend, unicast only, no learning):
//! - an FDB entry `<mac> dst <node ip> self permanent` on `clustermesh0`, the MAC derived from the node's
//!   address (`mac_for`);
//! - per pod CIDR, a permanent neighbour entry `<overlay address> lladdr <mac>` (the overlay address is the
//!   CIDR's first address, `overlay_addr`) and the route `<cidr> via <overlay address> dev clustermesh0
//!   onlink proto 157`.
//!
//! The device is made with this node's MAC (`mac_for` of its own underlay address), so a frame a peer sends to
//! it is taken in. Reading the table back, a route of ours counts as going to a node only when the whole chain
//! is there (route via the overlay address on our device, neighbour entry, FDB entry to that node); anything
//! less reads as "no gateway", so the manager replaces it and the chain is made whole again. FDB and
//! neighbour entries are ours by device: `sweep` removes those no route calls for.
//!
//! Split as the native side is: the decisions are pure functions here (unit-tested), the kernel is behind
//! `VxlanKernel` (`NetlinkVxlan` over rtnetlink, tested in network namespaces in
//! `node-sync/tests/routing_vxlan.rs`), and `VxlanRoutes` joins them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tracing::{info, warn};

use super::netlink::{RouteError, RouteOwner, RouteTable, TableView, decode, table_of};
use super::plan::{DesiredRoute, GatewayFamily, InstalledRoute};

/// The overlay device's name.
pub const VXLAN_DEVICE: &str = "clustermesh0";
/// `--vxlan-vni`'s default.
pub const DEFAULT_VNI: u32 = 2;
/// `--vxlan-port`'s default (Cilium's and flannel's, not IANA's 4789).
pub const DEFAULT_PORT: u16 = 8472;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// A MAC address.
pub type Mac = [u8; 6];

/// The overlay MAC of a node: locally administered and unicast, `0a:` + the four octets of its IPv4 address
/// (the last four of an IPv6 one) + `:00`. Every node derives the same MAC for a peer, so no MAC is exchanged.
/// Two IPv6 nodes sharing their last four octets would share a MAC: the underlay's addresses must differ there.
pub fn mac_for(node: IpAddr) -> Mac {
    let o = match node {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let b = a.octets();
            [b[12], b[13], b[14], b[15]]
        }
    };
    [0x0a, o[0], o[1], o[2], o[3], 0x00]
}

/// The overlay address of a pod CIDR (its first address), the gateway of its route and the key of its
/// neighbour entry.
pub fn overlay_addr(cidr: &IpNet) -> IpAddr {
    cidr.network()
}

/// What VXLAN adds to a packet on this underlay: outer IP + UDP (8) + VXLAN (8) + inner Ethernet (14); 50 bytes
/// over IPv4, 70 over IPv6.
pub fn overhead(local: IpAddr) -> u32 {
    if local.is_ipv4() { 50 } else { 70 }
}

fn show_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `--routing vxlan` is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// The device's name (`clustermesh0`).
    pub name: String,
    /// `--vxlan-vni`.
    pub vni: u32,
    /// `--vxlan-port` (UDP, both ends).
    pub port: u16,
    /// This node's address on the underlay: the tunnel's local end; the underlay device is the one that holds
    /// it, and the overlay's MTU follows that device's.
    pub local: IpAddr,
}

impl VxlanConfig {
    /// The defaults with this node's underlay address.
    pub fn new(local: IpAddr) -> Self {
        VxlanConfig {
            name: VXLAN_DEVICE.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            local,
        }
    }

    /// The remote nodes' addresses the tunnels go to: those of the underlay's family.
    pub fn gateway_family(&self) -> GatewayFamily {
        if self.local.is_ipv4() {
            GatewayFamily::Ipv4
        } else {
            GatewayFamily::Ipv6
        }
    }
}

/// The device as the kernel has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Interface index.
    pub index: u32,
    /// Link kind (`vxlan`, `veth`, ...), if it has one.
    pub kind: Option<String>,
    /// VNI.
    pub vni: Option<u32>,
    /// UDP port.
    pub port: Option<u16>,
    /// Local address.
    pub local: Option<IpAddr>,
    /// Whether it learns source MACs.
    pub learning: Option<bool>,
    /// MTU.
    pub mtu: u32,
    /// MAC.
    pub mac: Option<Mac>,
    /// Administratively up.
    pub up: bool,
}

/// The device as node-sync wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Name.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Local address.
    pub local: IpAddr,
    /// MTU: the underlay device's minus `overhead`.
    pub mtu: u32,
    /// `mac_for(local)`.
    pub mac: Mac,
}

/// What to do with a device found by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// It is as wanted.
    Keep,
    /// Parameters the kernel changes in place (MTU, MAC, local address, learning, up), listed.
    Modify(Vec<String>),
    /// Parameters the kernel cannot change on a vxlan device (VNI, port, address family), listed: delete and
    /// make it again.
    Recreate(Vec<String>),
    /// A link of another kind has the name: not ours, left alone.
    Foreign(String),
}

/// Compares a found device with the wanted one.
pub fn device_action(have: &DeviceState, want: &DeviceSpec) -> DeviceAction {
    if have.kind.as_deref() != Some("vxlan") {
        return DeviceAction::Foreign(have.kind.clone().unwrap_or_else(|| "unknown".into()));
    }
    let mut recreate = Vec::new();
    if have.vni != Some(want.vni) {
        recreate.push(format!("VNI {:?} -> {}", have.vni, want.vni));
    }
    if have.port != Some(want.port) {
        recreate.push(format!("port {:?} -> {}", have.port, want.port));
    }
    if have.local.map(|l| l.is_ipv4()) != Some(want.local.is_ipv4()) {
        recreate.push(format!("local address {:?} -> {}", have.local, want.local));
    }
    if !recreate.is_empty() {
        return DeviceAction::Recreate(recreate);
    }
    let mut modify = Vec::new();
    if have.local != Some(want.local) {
        modify.push(format!("local address {:?} -> {}", have.local, want.local));
    }
    if have.learning != Some(false) {
        modify.push("learning -> off".into());
    }
    if have.mtu != want.mtu {
        modify.push(format!("MTU {} -> {}", have.mtu, want.mtu));
    }
    if have.mac != Some(want.mac) {
        modify.push(format!(
            "MAC {} -> {}",
            have.mac.as_ref().map(show_mac).unwrap_or_default(),
            show_mac(&want.mac)
        ));
    }
    if !have.up {
        modify.push("down -> up".into());
    }
    if modify.is_empty() {
        DeviceAction::Keep
    } else {
        DeviceAction::Modify(modify)
    }
}

/// The forwarding entries of the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// Permanent neighbour entries: overlay address -> MAC.
    pub neighbours: BTreeMap<IpAddr, Mac>,
    /// FDB entries with a destination: (MAC, node address).
    pub fdb: BTreeSet<(Mac, IpAddr)>,
}

/// A route with node-sync's protocol id as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayRoute {
    /// Destination.
    pub dst: IpNet,
    /// Gateway, if any.
    pub via: Option<IpAddr>,
    /// Output interface, if any.
    pub oif: Option<u32>,
}

/// The main table split as the manager needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayTable {
    /// Routes with our protocol id.
    pub ours: Vec<OverlayRoute>,
    /// Destinations of the other unicast routes.
    pub foreign: Vec<IpNet>,
}

/// Our routes as the manager sees them: a route's gateway is the node its whole chain leads to (route via the
/// overlay address on `index`, neighbour entry, FDB entry to a node whose MAC it is), or none when any link is
/// missing or wrong (a route left by `--routing native`, an entry someone deleted): the manager then replaces
/// the route, and `VxlanRoutes::replace` makes the chain whole.
pub fn resolve(ours: &[OverlayRoute], index: u32, entries: &Entries) -> Vec<InstalledRoute> {
    let mut out: Vec<InstalledRoute> = ours
        .iter()
        .map(|r| {
            let node = (|| {
                if index == 0 || r.oif != Some(index) {
                    return None;
                }
                let via = r.via?;
                if via != overlay_addr(&r.dst) {
                    return None;
                }
                let mac = entries.neighbours.get(&via)?;
                entries
                    .fdb
                    .iter()
                    .find(|(m, ip)| m == mac && mac_for(*ip) == *mac)
                    .map(|(_, ip)| *ip)
            })();
            InstalledRoute {
                dst: r.dst,
                gateway: node,
            }
        })
        .collect();
    out.sort();
    out
}

/// The entries no wanted route calls for: neighbour entries for an address that is no route's overlay
/// address, FDB entries to no wanted node (or with another MAC than the node's).
pub fn stale_entries(
    entries: &Entries,
    routes: &[DesiredRoute],
) -> (Vec<IpAddr>, Vec<(Mac, IpAddr)>) {
    let neigh: BTreeSet<IpAddr> = routes.iter().map(|r| overlay_addr(&r.dst)).collect();
    let fdb: BTreeSet<(Mac, IpAddr)> = routes
        .iter()
        .map(|r| (mac_for(r.gateway), r.gateway))
        .collect();
    (
        entries
            .neighbours
            .keys()
            .filter(|a| !neigh.contains(a))
            .copied()
            .collect(),
        entries
            .fdb
            .iter()
            .filter(|e| !fdb.contains(e))
            .copied()
            .collect(),
    )
}

/// The overlay device as last made or found, for the status (`routing.device` in `/api/v1/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDevice {
    /// `clustermesh0`.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Local address (this node's on the underlay).
    pub local: IpAddr,
    /// The underlay device (the one holding `local`).
    pub underlay: String,
    /// MTU (the underlay's minus `overhead`).
    pub mtu: u32,
}

/// The device the underlay address is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
}

/// The kernel behind `VxlanRoutes`: `NetlinkVxlan`, or a fake in unit tests.
pub trait VxlanKernel: Send + Sync {
    /// The device holding `local`.
    fn underlay(&self, local: IpAddr) -> impl Future<Output = Result<Underlay, RouteError>> + Send;
    /// The link named `name`, if there is one.
    fn device(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<DeviceState>, RouteError>> + Send;
    /// Makes the device (up); returns its index.
    fn create(&self, spec: &DeviceSpec) -> impl Future<Output = Result<u32, RouteError>> + Send;
    /// Changes the in-place parameters of the device `have` that differ from `spec`'s, and only those (a MAC
    /// set, even to the same value, flushes the device's neighbour entries).
    fn modify(
        &self,
        have: &DeviceState,
        spec: &DeviceSpec,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Deletes device `index`.
    fn delete(&self, index: u32) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// The main table: routes with our protocol id (with gateway and device) and the others' destinations.
    fn routes(&self) -> impl Future<Output = Result<OverlayTable, RouteError>> + Send;
    /// The permanent neighbour entries and the FDB entries with a destination of device `index`.
    fn entries(&self, index: u32) -> impl Future<Output = Result<Entries, RouteError>> + Send;
    /// Adds or replaces the FDB entry `mac dst node`.
    fn set_fdb(
        &self,
        index: u32,
        mac: Mac,
        node: IpAddr,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Deletes that FDB entry (gone already is fine).
    fn del_fdb(
        &self,
        index: u32,
        mac: Mac,
        node: IpAddr,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Adds or replaces the permanent neighbour entry `addr lladdr mac`.
    fn set_neighbour(
        &self,
        index: u32,
        addr: IpAddr,
        mac: Mac,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Deletes that neighbour entry (gone already is fine).
    fn del_neighbour(
        &self,
        index: u32,
        addr: IpAddr,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Adds (or replaces in place) `dst via <via> dev <index> onlink` with our protocol id.
    fn set_route(
        &self,
        dst: IpNet,
        via: IpAddr,
        index: u32,
        replace: bool,
    ) -> impl Future<Output = Result<(), RouteError>> + Send;
    /// Deletes our route to `dst`.
    fn del_route(&self, dst: IpNet) -> impl Future<Output = Result<(), RouteError>> + Send;
}

/// `--routing vxlan`'s route table: the device (`ensure_device`, before each sync), the routes and their
/// forwarding entries (`RouteTable`), and the entries no route needs any more (`sweep`, after a sync).
#[derive(Clone)]
pub struct VxlanRoutes<K> {
    kernel: K,
    config: VxlanConfig,
    /// The device's index as of the last `ensure_device` (0: none).
    index: Arc<AtomicU32>,
    /// The device as of the last successful `ensure_device`.
    device: Arc<Mutex<Option<OverlayDevice>>>,
}

impl VxlanRoutes<NetlinkVxlan> {
    /// Over rtnetlink in the calling thread's network namespace (its connection task on the current runtime).
    pub fn open(config: VxlanConfig, owner: RouteOwner) -> Result<Self, RouteError> {
        Ok(VxlanRoutes::new(NetlinkVxlan::open(owner)?, config))
    }
}

impl<K: VxlanKernel> VxlanRoutes<K> {
    /// Over `kernel`; nothing is read or written until `ensure_device`.
    pub fn new(kernel: K, config: VxlanConfig) -> Self {
        VxlanRoutes {
            kernel,
            config,
            index: Arc::new(AtomicU32::new(0)),
            device: Arc::new(Mutex::new(None)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VxlanConfig {
        &self.config
    }

    fn require_index(&self) -> Result<u32, RouteError> {
        match self.index.load(Ordering::Relaxed) {
            0 => Err(RouteError::Device(format!(
                "device {} is not set up (see the previous error)",
                self.config.name
            ))),
            i => Ok(i),
        }
    }

    /// Finds the device by name and kind and brings it to the configuration: made if missing; MTU (the
    /// underlay device's minus `overhead`), MAC, local address, learning and up changed in place; made again
    /// when its VNI, port or address family differ (the kernel changes none of them in place; the routes
    /// through it go with it and the next sync adds them back). A link of another kind with the name is an
    /// error naming it, and left alone. Returns the device's index.
    pub async fn ensure_device(&self) -> Result<u32, RouteError> {
        let r = self.ensure().await;
        let (index, device) = match r {
            Ok((index, ref d)) => (index, Some(d.clone())),
            Err(_) => (0, None),
        };
        self.index.store(index, Ordering::Relaxed);
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = device;
        r.map(|(index, _)| index)
    }

    async fn ensure(&self) -> Result<(u32, OverlayDevice), RouteError> {
        let c = &self.config;
        let u = self.kernel.underlay(c.local).await?;
        let spec = DeviceSpec {
            name: c.name.clone(),
            vni: c.vni,
            port: c.port,
            local: c.local,
            mtu: u.mtu.saturating_sub(overhead(c.local)),
            mac: mac_for(c.local),
        };
        let summary = OverlayDevice {
            name: c.name.clone(),
            vni: c.vni,
            port: c.port,
            local: c.local,
            underlay: u.name.clone(),
            mtu: spec.mtu,
        };
        let Some(have) = self.kernel.device(&c.name).await? else {
            let index = self.kernel.create(&spec).await?;
            info!(device = %c.name, vni = c.vni, port = c.port, local = %c.local, mtu = spec.mtu, underlay = %u.name, "vxlan device created");
            return Ok((index, summary));
        };
        match device_action(&have, &spec) {
            DeviceAction::Keep => Ok((have.index, summary)),
            DeviceAction::Modify(changes) => {
                self.kernel.modify(&have, &spec).await?;
                info!(device = %c.name, changes = %changes.join(", "), underlay = %u.name, "vxlan device corrected in place");
                Ok((have.index, summary))
            }
            DeviceAction::Recreate(changes) => {
                warn!(device = %c.name, changes = %changes.join(", "), "vxlan device made again: the kernel cannot change these in place; its routes are added back");
                self.kernel.delete(have.index).await?;
                let index = self.kernel.create(&spec).await?;
                Ok((index, summary))
            }
            DeviceAction::Foreign(kind) => Err(RouteError::Device(format!(
                "a link named {} of kind {kind} exists: --routing vxlan makes {} as its vxlan device and does not \
                 take over another's; rename or delete that link",
                c.name, c.name
            ))),
        }
    }

    /// Removes the forwarding entries of the device that no route of `routes` (what the manager wants)
    /// calls for. Call it only once every cluster is synced, as the manager removes routes. Every stale entry
    /// is tried; returns how many went, or the first failure.
    pub async fn sweep(&self, routes: &[DesiredRoute]) -> Result<usize, RouteError> {
        let index = self.require_index()?;
        let entries = self.kernel.entries(index).await?;
        let (neigh, fdb) = stale_entries(&entries, routes);
        let mut removed = 0;
        let mut first = None;
        for a in neigh {
            match self.kernel.del_neighbour(index, a).await {
                Ok(()) => {
                    removed += 1;
                    info!(overlay = %a, "vxlan neighbour entry removed");
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        for (mac, node) in fdb {
            match self.kernel.del_fdb(index, mac, node).await {
                Ok(()) => {
                    removed += 1;
                    info!(mac = %show_mac(&mac), node = %node, "vxlan FDB entry removed");
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    async fn put(&self, r: &DesiredRoute, replace: bool) -> Result<(), RouteError> {
        let index = self.require_index()?;
        if r.gateway.is_ipv4() != self.config.local.is_ipv4() {
            return Err(RouteError::Device(format!(
                "route {} via node address {}: not of the underlay's family (local {})",
                r.dst, r.gateway, self.config.local
            )));
        }
        let mac = mac_for(r.gateway);
        let via = overlay_addr(&r.dst);
        self.kernel.set_fdb(index, mac, r.gateway).await?;
        self.kernel.set_neighbour(index, via, mac).await?;
        self.kernel.set_route(r.dst, via, index, replace).await
    }
}

impl<K: VxlanKernel> RouteTable for VxlanRoutes<K> {
    async fn read(&self) -> Result<TableView, RouteError> {
        let table = self.kernel.routes().await?;
        let index = self.index.load(Ordering::Relaxed);
        let entries = if index == 0 {
            Entries::default()
        } else {
            self.kernel.entries(index).await?
        };
        Ok(TableView {
            ours: resolve(&table.ours, index, &entries),
            foreign: table.foreign,
        })
    }

    async fn add(&self, r: &DesiredRoute) -> Result<(), RouteError> {
        self.put(r, false).await
    }

    async fn replace(&self, r: &DesiredRoute) -> Result<(), RouteError> {
        self.put(r, true).await
    }

    async fn prepare(&self) -> Result<(), RouteError> {
        self.ensure_device().await.map(|_| ())
    }

    async fn settle(&self, routes: &[DesiredRoute], prune: bool) -> Result<usize, RouteError> {
        if prune {
            self.sweep(routes).await
        } else {
            Ok(0)
        }
    }

    fn gateway_family(&self) -> GatewayFamily {
        self.config.gateway_family()
    }

    fn device(&self) -> Option<OverlayDevice> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn delete(&self, r: &InstalledRoute) -> Result<(), RouteError> {
        self.kernel.del_route(r.dst).await?;
        // The FDB entry may serve another CIDR of the same node: `sweep` takes it when nothing does.
        if let Ok(index) = self.require_index() {
            self.kernel
                .del_neighbour(index, overlay_addr(&r.dst))
                .await?;
        }
        Ok(())
    }
}

/// The kernel's side over an rtnetlink socket opened in the calling thread's network namespace.
#[derive(Clone)]
pub struct NetlinkVxlan {
    handle: Handle,
    owner: RouteOwner,
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(op: &'static str, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    let what = what.into();
    move |source| RouteError::Netlink { op, what, source }
}

/// Ok when the error says the thing is gone already.
fn gone_is_fine(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV)) => Ok(()),
        r => r,
    }
}

fn neighbour_address(a: IpAddr) -> NeighbourAddress {
    match a {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// The address of a dumped neighbour or FDB entry (an FDB entry's `NDA_DST` comes as raw bytes: the message's
/// family is AF_BRIDGE, not the address's).
fn neighbour_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn device_state(m: &LinkMessage) -> DeviceState {
    let mut d = DeviceState {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => d.mtu = *v,
            LinkAttribute::Address(a) => d.mac = a.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => d.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(n) => d.vni = Some(*n),
                                    InfoVxlan::Port(p) => d.port = Some(*p),
                                    InfoVxlan::Local(a) => d.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => d.local = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Learning(b) => d.learning = Some(*b),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    d
}

impl NetlinkVxlan {
    /// Opens the socket and spawns its connection task on the current tokio runtime.
    pub fn open(owner: RouteOwner) -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Open)?;
        tokio::spawn(conn);
        Ok(NetlinkVxlan { handle, owner })
    }

    /// This node's underlay address when none is configured: the preferred source of the default route
    /// (IPv4 first, then IPv6), else the first global address of the default route's device (flannel's
    /// choice). An error says to configure it when there is none.
    pub async fn default_route_address(&self) -> Result<IpAddr, RouteError> {
        for m in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let family = m.header.address_family;
            let mut s = self.handle.route().get(m).execute();
            let mut found = None;
            while let Some(m) = s.try_next().await.map_err(nl("dump", "routes"))? {
                if table_of(&m) != u32::from(self.owner.table)
                    || m.header.kind != RouteType::Unicast
                    || m.header.destination_prefix_length != 0
                {
                    continue;
                }
                let src = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::PrefSource(a) => super::netlink::addr_of(a),
                    _ => None,
                });
                if let Some(src) = src {
                    return Ok(src);
                }
                if let Some(oif) = oif_of(&m) {
                    found = Some(oif);
                    break;
                }
            }
            drop(s);
            let Some(oif) = found else { continue };
            let mut s = self
                .handle
                .address()
                .get()
                .set_link_index_filter(oif)
                .execute();
            while let Some(a) = s.try_next().await.map_err(nl("dump", "addresses"))? {
                if a.header.family != family || a.header.scope != AddressScope::Universe {
                    continue;
                }
                if let Some(ip) = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                }) {
                    return Ok(ip);
                }
            }
        }
        Err(RouteError::Device(
            "--routing vxlan: no --vxlan-local-address given and no default route with an address on its \
             device: give this node's underlay address"
                .into(),
        ))
    }

    async fn link_by_index(&self, index: u32) -> Result<LinkMessage, RouteError> {
        self.handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(nl("get", format!("link {index}")))?
            .ok_or_else(|| RouteError::Device(format!("link {index} vanished")))
    }

    /// The vxlan data node-sync sets on a device: no learning, the local address.
    fn with_vxlan_data(
        b: LinkMessageBuilder<LinkVxlan>,
        spec: &DeviceSpec,
    ) -> LinkMessageBuilder<LinkVxlan> {
        let b = b.learning(false);
        match spec.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        }
    }

    fn neighbour_message(index: u32, family: AddressFamily) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = index;
        m
    }
}

impl VxlanKernel for NetlinkVxlan {
    async fn underlay(&self, local: IpAddr) -> Result<Underlay, RouteError> {
        let mut s = self.handle.address().get().execute();
        let mut index = None;
        while let Some(m) = s.try_next().await.map_err(nl("dump", "addresses"))? {
            if m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == local)
            }) {
                index = Some(m.header.index);
            }
        }
        let Some(index) = index else {
            return Err(RouteError::Device(format!(
                "the vxlan local address {local} is on no device of this node (it must be this node's address \
                 on the underlay)"
            )));
        };
        let link = self.link_by_index(index).await?;
        let d = device_state(&link);
        let name = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| index.to_string());
        Ok(Underlay {
            index,
            name,
            mtu: d.mtu,
        })
    }

    async fn device(&self, name: &str) -> Result<Option<DeviceState>, RouteError> {
        match self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m.as_ref().map(device_state)),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl("get", format!("link {name}"))(e)),
        }
    }

    async fn create(&self, spec: &DeviceSpec) -> Result<u32, RouteError> {
        let msg = Self::with_vxlan_data(LinkVxlan::new(&spec.name, spec.vni).port(spec.port), spec)
            .mtu(spec.mtu)
            .address(spec.mac.to_vec())
            .up()
            .build();
        self.handle.link().add(msg).execute().await.map_err(nl(
            "add",
            format!(
                "vxlan device {} (VNI {}, port {}, local {})",
                spec.name, spec.vni, spec.port, spec.local
            ),
        ))?;
        match self.device(&spec.name).await? {
            Some(d) => Ok(d.index),
            None => Err(RouteError::Device(format!(
                "vxlan device {} vanished right after it was made",
                spec.name
            ))),
        }
    }

    async fn modify(&self, have: &DeviceState, spec: &DeviceSpec) -> Result<(), RouteError> {
        // Up to two requests: the kernel's vxlan changelink (RTM_NEWLINK on an existing index) takes the vxlan
        // data (learning, local address; no VNI or port, those cannot change) but refuses an MTU, so the MTU,
        // MAC and up go in an RTM_SETLINK. Only what differs is sent.
        let index = have.index;
        if have.local != Some(spec.local) || have.learning != Some(false) {
            let data = Self::with_vxlan_data(
                LinkMessageBuilder::<LinkVxlan>::new_with_info_kind(InfoKind::Vxlan),
                spec,
            )
            .index(index)
            .build();
            self.handle
                .link()
                .change(data)
                .execute()
                .await
                .map_err(nl("change", format!("vxlan data of device {}", spec.name)))?;
        }
        let mut link = LinkUnspec::new_with_index(index);
        let mut any = false;
        if have.mtu != spec.mtu {
            link = link.mtu(spec.mtu);
            any = true;
        }
        if have.mac != Some(spec.mac) {
            link = link.address(spec.mac.to_vec());
            any = true;
        }
        if !have.up {
            link = link.up();
            any = true;
        }
        if !any {
            return Ok(());
        }
        self.handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(nl(
                "set",
                format!("MTU {}, MAC or up of device {}", spec.mtu, spec.name),
            ))
    }

    async fn delete(&self, index: u32) -> Result<(), RouteError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl("delete", format!("link {index}")))
    }

    async fn routes(&self) -> Result<OverlayTable, RouteError> {
        let mut t = OverlayTable::default();
        for m in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(m).execute();
            while let Some(m) = s.try_next().await.map_err(nl("dump", "routes"))? {
                if table_of(&m) != u32::from(self.owner.table)
                    || m.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let Some((dst, via)) = decode(&m) else {
                    continue;
                };
                if m.header.protocol == RouteProtocol::Other(self.owner.protocol) {
                    t.ours.push(OverlayRoute {
                        dst,
                        via,
                        oif: oif_of(&m),
                    });
                } else {
                    t.foreign.push(dst);
                }
            }
        }
        t.foreign.sort();
        Ok(t)
    }

    async fn entries(&self, index: u32) -> Result<Entries, RouteError> {
        let mut e = Entries::default();
        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            let mut s = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(m) = s.try_next().await.map_err(nl("dump", "neighbours"))? {
                if m.header.ifindex != index {
                    continue;
                }
                let mut dst = None;
                let mut mac: Option<Mac> = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(d) => dst = neighbour_ip(d),
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = l.as_slice().try_into().ok()
                        }
                        _ => {}
                    }
                }
                let (Some(dst), Some(mac)) = (dst, mac) else {
                    continue;
                };
                if m.header.family == AddressFamily::Bridge {
                    e.fdb.insert((mac, dst));
                } else if m.header.state == NeighbourState::Permanent {
                    e.neighbours.insert(dst, mac);
                }
            }
        }
        Ok(e)
    }

    async fn set_fdb(&self, index: u32, mac: Mac, node: IpAddr) -> Result<(), RouteError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .destination(node)
            .replace()
            .execute()
            .await
            .map_err(nl(
                "add",
                format!("FDB entry {} dst {node}", show_mac(&mac)),
            ))
    }

    async fn del_fdb(&self, index: u32, mac: Mac, node: IpAddr) -> Result<(), RouteError> {
        let mut m = Self::neighbour_message(index, AddressFamily::Bridge);
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(node)));
        gone_is_fine(self.handle.neighbours().del(m).execute().await).map_err(nl(
            "delete",
            format!("FDB entry {} dst {node}", show_mac(&mac)),
        ))
    }

    async fn set_neighbour(&self, index: u32, addr: IpAddr, mac: Mac) -> Result<(), RouteError> {
        self.handle
            .neighbours()
            .add(index, addr)
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl(
                "add",
                format!("neighbour {addr} lladdr {}", show_mac(&mac)),
            ))
    }

    async fn del_neighbour(&self, index: u32, addr: IpAddr) -> Result<(), RouteError> {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut m = Self::neighbour_message(index, family);
        m.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(addr)));
        gone_is_fine(self.handle.neighbours().del(m).execute().await)
            .map_err(nl("delete", format!("neighbour {addr}")))
    }

    async fn set_route(
        &self,
        dst: IpNet,
        via: IpAddr,
        index: u32,
        replace: bool,
    ) -> Result<(), RouteError> {
        let m = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .expect("a destination of one family")
            .gateway(via)
            .expect("the overlay address is of the destination's family")
            .output_interface(index)
            .onlink()
            .table_id(u32::from(self.owner.table))
            .protocol(RouteProtocol::Other(self.owner.protocol))
            .kind(RouteType::Unicast)
            .build();
        let req = self.handle.route().add(m);
        let req = if replace { req.replace() } else { req };
        req.execute().await.map_err(nl(
            if replace { "replace" } else { "add" },
            format!("route {dst} via {via} onlink (device {index})"),
        ))
    }

    async fn del_route(&self, dst: IpNet) -> Result<(), RouteError> {
        // Destination, table and our protocol id: the kernel deletes only ours.
        let m = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .expect("a destination of one family")
            .table_id(u32::from(self.owner.table))
            .protocol(RouteProtocol::Other(self.owner.protocol))
            .build();
        gone_is_fine(self.handle.route().del(m).execute().await)
            .map_err(nl("delete", format!("route {dst}")))
    }
}

fn oif_of(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use mesh_model::ClusterName;

    use super::super::manager::{NodeSet, RouteManager};
    use super::super::plan::RemoteNode;
    use super::*;

    #[test]
    fn the_mac_of_a_node_comes_from_its_address_and_the_overlay_address_is_the_cidr_first() {
        assert_eq!(
            show_mac(&mac_for("192.0.2.11".parse().unwrap())),
            "0a:c0:00:02:0b:00"
        );
        assert_eq!(
            show_mac(&mac_for("2001:db8::a:b0c".parse().unwrap())),
            "0a:00:0a:0b:0c:00"
        );
        assert_eq!(
            overlay_addr(&"10.2.1.0/24".parse().unwrap()).to_string(),
            "10.2.1.0"
        );
        assert_eq!(overhead("192.0.2.1".parse().unwrap()), 50);
        assert_eq!(overhead("2001:db8::1".parse().unwrap()), 70);
    }

    fn spec() -> DeviceSpec {
        DeviceSpec {
            name: VXLAN_DEVICE.into(),
            vni: 2,
            port: 8472,
            local: "192.0.2.1".parse().unwrap(),
            mtu: 1450,
            mac: mac_for("192.0.2.1".parse().unwrap()),
        }
    }

    fn as_wanted(s: &DeviceSpec) -> DeviceState {
        DeviceState {
            index: 7,
            kind: Some("vxlan".into()),
            vni: Some(s.vni),
            port: Some(s.port),
            local: Some(s.local),
            learning: Some(false),
            mtu: s.mtu,
            mac: Some(s.mac),
            up: true,
        }
    }

    #[test]
    fn a_device_is_kept_corrected_in_place_made_again_or_refused_as_not_ours() {
        let want = spec();
        assert_eq!(device_action(&as_wanted(&want), &want), DeviceAction::Keep);

        let mut d = as_wanted(&want);
        d.mtu = 1500;
        d.learning = Some(true);
        d.up = false;
        assert_eq!(
            device_action(&d, &want),
            DeviceAction::Modify(vec![
                "learning -> off".into(),
                "MTU 1500 -> 1450".into(),
                "down -> up".into()
            ])
        );
        d.local = Some("192.0.2.9".parse().unwrap());
        assert!(
            matches!(device_action(&d, &want), DeviceAction::Modify(c) if c[0].starts_with("local"))
        );

        let mut d = as_wanted(&want);
        d.vni = Some(7);
        d.port = Some(4789);
        assert_eq!(
            device_action(&d, &want),
            DeviceAction::Recreate(vec![
                "VNI Some(7) -> 2".into(),
                "port Some(4789) -> 8472".into()
            ])
        );
        d = as_wanted(&want);
        d.local = Some("2001:db8::1".parse().unwrap());
        assert!(matches!(
            device_action(&d, &want),
            DeviceAction::Recreate(_)
        ));

        d.kind = Some("veth".into());
        assert_eq!(
            device_action(&d, &want),
            DeviceAction::Foreign("veth".into())
        );
    }

    fn entries(neigh: &[(&str, &str)], fdb: &[&str]) -> Entries {
        Entries {
            neighbours: neigh
                .iter()
                .map(|(a, n)| (a.parse().unwrap(), mac_for(n.parse().unwrap())))
                .collect(),
            fdb: fdb
                .iter()
                .map(|n| (mac_for(n.parse().unwrap()), n.parse().unwrap()))
                .collect(),
        }
    }

    fn oroute(dst: &str, via: &str, oif: u32) -> OverlayRoute {
        OverlayRoute {
            dst: dst.parse().unwrap(),
            via: Some(via.parse().unwrap()),
            oif: Some(oif),
        }
    }

    #[test]
    fn a_route_reads_as_going_to_a_node_only_with_its_whole_chain() {
        let e = entries(&[("10.2.1.0", "192.0.2.11")], &["192.0.2.11"]);
        let got = resolve(
            &[
                oroute("10.2.1.0/24", "10.2.1.0", 7),
                // No neighbour entry.
                oroute("10.2.2.0/24", "10.2.2.0", 7),
                // A native route left behind: via the node, on another device.
                oroute("10.2.3.0/24", "192.0.2.13", 3),
            ],
            7,
            &e,
        );
        let g: Vec<Option<String>> = got
            .iter()
            .map(|r| r.gateway.map(|g| g.to_string()))
            .collect();
        assert_eq!(g, [Some("192.0.2.11".into()), None, None]);
        // The device gone (index 0): nothing resolves.
        assert!(
            resolve(&[oroute("10.2.1.0/24", "10.2.1.0", 7)], 0, &e)[0]
                .gateway
                .is_none()
        );
    }

    fn node(cluster: &str, name: &str, ip: &str, cidr: &str) -> RemoteNode {
        RemoteNode {
            cluster: ClusterName::new(cluster).unwrap(),
            name: name.into(),
            addresses: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    #[test]
    fn entries_no_wanted_route_calls_for_are_stale() {
        let want =
            super::super::plan::plan_routes(&[node("c2", "n1", "192.0.2.11", "10.2.1.0/24")], &[])
                .routes;
        let e = entries(
            &[("10.2.1.0", "192.0.2.11"), ("10.2.2.0", "192.0.2.12")],
            &["192.0.2.11", "192.0.2.12"],
        );
        let (n, f) = stale_entries(&e, &want);
        assert_eq!(n, ["10.2.2.0".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            f,
            [(
                mac_for("192.0.2.12".parse().unwrap()),
                "192.0.2.12".parse().unwrap()
            )]
        );
    }

    /// A kernel in memory: one device at most, an underlay of MTU `underlay_mtu`, and a log of every write.
    struct FakeKernel {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        underlay_mtu: u32,
        device: Option<DeviceState>,
        next_index: u32,
        routes: Vec<OverlayRoute>,
        entries: Entries,
        log: Vec<String>,
    }

    impl FakeKernel {
        fn new() -> Self {
            FakeKernel {
                state: Mutex::new(FakeState {
                    underlay_mtu: 1500,
                    next_index: 10,
                    ..Default::default()
                }),
            }
        }
        fn log(&self) -> Vec<String> {
            self.state.lock().unwrap().log.clone()
        }
    }

    impl VxlanKernel for &FakeKernel {
        async fn underlay(&self, _local: IpAddr) -> Result<Underlay, RouteError> {
            Ok(Underlay {
                index: 2,
                name: "eth0".into(),
                mtu: self.state.lock().unwrap().underlay_mtu,
            })
        }
        async fn device(&self, _name: &str) -> Result<Option<DeviceState>, RouteError> {
            Ok(self.state.lock().unwrap().device.clone())
        }
        async fn create(&self, spec: &DeviceSpec) -> Result<u32, RouteError> {
            let mut s = self.state.lock().unwrap();
            s.next_index += 1;
            let mut d = as_wanted(spec);
            d.index = s.next_index;
            s.device = Some(d);
            s.log.push(format!(
                "create vni {} port {} mtu {}",
                spec.vni, spec.port, spec.mtu
            ));
            Ok(s.next_index)
        }
        async fn modify(&self, have: &DeviceState, spec: &DeviceSpec) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            let mut d = as_wanted(spec);
            d.index = have.index;
            d.vni = s.device.as_ref().unwrap().vni;
            d.port = s.device.as_ref().unwrap().port;
            s.device = Some(d);
            s.log.push(format!("modify mtu {}", spec.mtu));
            Ok(())
        }
        async fn delete(&self, _index: u32) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            // The kernel takes the device's routes and entries with it.
            s.device = None;
            s.routes.clear();
            s.entries = Entries::default();
            s.log.push("delete device".into());
            Ok(())
        }
        async fn routes(&self) -> Result<OverlayTable, RouteError> {
            Ok(OverlayTable {
                ours: self.state.lock().unwrap().routes.clone(),
                foreign: vec![],
            })
        }
        async fn entries(&self, _index: u32) -> Result<Entries, RouteError> {
            Ok(self.state.lock().unwrap().entries.clone())
        }
        async fn set_fdb(&self, _index: u32, mac: Mac, node: IpAddr) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.entries.fdb.retain(|(m, _)| *m != mac);
            s.entries.fdb.insert((mac, node));
            s.log.push(format!("fdb {node}"));
            Ok(())
        }
        async fn del_fdb(&self, _index: u32, mac: Mac, node: IpAddr) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.entries.fdb.remove(&(mac, node));
            s.log.push(format!("del fdb {node}"));
            Ok(())
        }
        async fn set_neighbour(
            &self,
            _index: u32,
            addr: IpAddr,
            mac: Mac,
        ) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.entries.neighbours.insert(addr, mac);
            s.log.push(format!("neigh {addr}"));
            Ok(())
        }
        async fn del_neighbour(&self, _index: u32, addr: IpAddr) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.entries.neighbours.remove(&addr);
            s.log.push(format!("del neigh {addr}"));
            Ok(())
        }
        async fn set_route(
            &self,
            dst: IpNet,
            via: IpAddr,
            index: u32,
            replace: bool,
        ) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.routes.retain(|r| r.dst != dst);
            s.routes
                .push(oroute(&dst.to_string(), &via.to_string(), index));
            s.log.push(format!(
                "{} {dst}",
                if replace { "replace" } else { "route" }
            ));
            Ok(())
        }
        async fn del_route(&self, dst: IpNet) -> Result<(), RouteError> {
            let mut s = self.state.lock().unwrap();
            s.routes.retain(|r| r.dst != dst);
            s.log.push(format!("del route {dst}"));
            Ok(())
        }
    }

    fn set(nodes: Vec<RemoteNode>) -> NodeSet {
        NodeSet {
            nodes,
            complete: true,
        }
    }

    #[tokio::test]
    async fn a_sync_makes_device_fdb_neighbour_and_route_and_a_restart_changes_nothing() {
        let k = FakeKernel::new();
        let vx = VxlanRoutes::new(&k, VxlanConfig::new("192.0.2.1".parse().unwrap()));
        let mut m = RouteManager::new(vx.clone());
        vx.ensure_device().await.unwrap();
        m.sync(&set(vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")]))
            .await
            .unwrap();
        assert_eq!(
            k.log(),
            [
                "create vni 2 port 8472 mtu 1450",
                "fdb 192.0.2.11",
                "neigh 10.2.1.0",
                "route 10.2.1.0/24"
            ]
        );
        // A restart: a new table and manager on the same kernel.
        let vx = VxlanRoutes::new(&k, VxlanConfig::new("192.0.2.1".parse().unwrap()));
        let mut m = RouteManager::new(vx.clone());
        vx.ensure_device().await.unwrap();
        let st = m
            .sync(&set(vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")]))
            .await
            .unwrap();
        assert_eq!(st.changes_total, 0);
        assert_eq!(vx.sweep(&st.routes.clone()).await.unwrap(), 0);
        assert_eq!(k.log().len(), 4, "{:?}", k.log());
    }

    #[tokio::test]
    async fn a_node_gone_takes_its_entries_and_a_missing_entry_is_put_back() {
        let k = FakeKernel::new();
        let vx = VxlanRoutes::new(&k, VxlanConfig::new("192.0.2.1".parse().unwrap()));
        let mut m = RouteManager::new(vx.clone());
        vx.ensure_device().await.unwrap();
        let n1 = node("c2", "n1", "192.0.2.11", "10.2.1.0/24");
        let n2 = node("c2", "n2", "192.0.2.12", "10.2.2.0/24");
        m.sync(&set(vec![n1.clone(), n2])).await.unwrap();
        // Someone deletes n1's neighbour entry: the next sync reads the chain broken and replaces it.
        k.state
            .lock()
            .unwrap()
            .entries
            .neighbours
            .remove(&"10.2.1.0".parse().unwrap());
        m.sync(&set(vec![n1.clone()])).await.unwrap();
        let log = k.log();
        assert!(
            log.ends_with(&[
                "fdb 192.0.2.11".into(),
                "neigh 10.2.1.0".into(),
                "replace 10.2.1.0/24".into(),
                "del route 10.2.2.0/24".into(),
                "del neigh 10.2.2.0".into(),
                // The manager's settle step: n2's FDB entry, which no route needs any more.
                "del fdb 192.0.2.12".into(),
            ]),
            "{log:?}"
        );
        assert_eq!(
            m.status().changes_total,
            2 + 3,
            "two routes added; then n1's replaced, n2's removed and its FDB entry swept"
        );
        let e = k.state.lock().unwrap().entries.clone();
        assert_eq!(e, entries(&[("10.2.1.0", "192.0.2.11")], &["192.0.2.11"]));
    }

    #[tokio::test]
    async fn a_wrong_vni_makes_the_device_again_and_its_routes_come_back_and_the_mtu_follows_the_underlay()
     {
        let k = FakeKernel::new();
        let vx = VxlanRoutes::new(&k, VxlanConfig::new("192.0.2.1".parse().unwrap()));
        let mut m = RouteManager::new(vx.clone());
        vx.ensure_device().await.unwrap();
        let nodes = set(vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")]);
        m.sync(&nodes).await.unwrap();

        let mut c = VxlanConfig::new("192.0.2.1".parse().unwrap());
        c.vni = 7;
        let vx = VxlanRoutes::new(&k, c);
        let mut m = RouteManager::new(vx.clone());
        let index = vx.ensure_device().await.unwrap();
        m.sync(&nodes).await.unwrap();
        assert!(
            k.log().ends_with(&[
                "delete device".into(),
                "create vni 7 port 8472 mtu 1450".into(),
                "fdb 192.0.2.11".into(),
                "neigh 10.2.1.0".into(),
                "route 10.2.1.0/24".into()
            ]),
            "{:?}",
            k.log()
        );

        k.state.lock().unwrap().underlay_mtu = 9000;
        assert_eq!(
            vx.ensure_device().await.unwrap(),
            index,
            "the MTU changes in place"
        );
        assert_eq!(k.log().last().unwrap(), "modify mtu 8950");
    }

    #[tokio::test]
    async fn a_link_of_another_kind_with_the_name_is_an_error_naming_it() {
        let k = FakeKernel::new();
        k.state.lock().unwrap().device = Some(DeviceState {
            index: 3,
            kind: Some("bridge".into()),
            ..Default::default()
        });
        let vx = VxlanRoutes::new(&k, VxlanConfig::new("192.0.2.1".parse().unwrap()));
        let e = vx.ensure_device().await.unwrap_err().to_string();
        assert!(e.contains("clustermesh0 of kind bridge"), "{e}");
        // The manager's sync stops at its prepare step, counts and reports the error.
        let mut m = RouteManager::new(vx.clone());
        let e = m
            .sync(&set(vec![node("c2", "n1", "192.0.2.11", "10.2.1.0/24")]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("of kind bridge"), "{e}");
        assert_eq!(m.status().errors_total, 1);
        assert!(
            m.status()
                .last_error
                .as_deref()
                .unwrap()
                .contains("rename or delete")
        );
        assert!(k.log().is_empty(), "nothing touched: {:?}", k.log());
    }
}
