//! The cgroup `sock_addr` programs and their maps.
//!
//! - `connect4`/`connect6`: TCP and connected UDP. A (service address, port, protocol) found in
//!   the services map is rewritten to a backend chosen at random among the service's slots; the
//!   socket then talks to the backend directly, with no per-packet work. A service with no
//!   backends fails the `connect()` with `ECONNREFUSED` at once (`bpf_set_retval`).
//! - `sendmsg4`/`sendmsg6`: the same per datagram for unconnected UDP.
//! - `recvmsg4`/`recvmsg6`, `getpeername4`/`getpeername6`: translate a backend address back to the
//!   service address the socket asked for, through socket-local storage (`SK_STORAGE`): the
//!   state lives on the socket and is freed with it, so it has no capacity and nothing evicts
//!   the state of a live socket.
//!
//! Anything not in the services map is left alone; that costs an array read (the pre-filter)
//! and, for the few non-services whose filter bit is shared with a service, one lookup. A
//! translated connect costs one services lookup for a one-backend service (slot 0 carries slot
//! 1's backend), two otherwise, and the creation of the socket's storage (see
//! `bench --bin datapath`).

use core::ffi::c_void;
use core::marker::PhantomData;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock_addr},
    helpers::generated::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval, bpf_sk_storage_get,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use global_lb_bpf_common::{
    BPF_F_NO_PREALLOC, BPF_MAP_TYPE_SK_STORAGE, ECONNREFUSED, FAMILY_V4, FAMILY_V6, FILTER_WORDS,
    MAX_BACKENDS, MAX_REV_NAT_ENTRIES, MAX_SERVICE_ENTRIES, PROTO_TCP, PROTO_UDP, RevNatKey,
    RevNatValue, SOCK_REV_NAT_UDP_SLOTS, ServiceKey, ServiceValue, SockRevNat, SockRevNatUdp,
    filter_bit, is_v4_mapped, v4_mapped,
};

#[map(name = "GLB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);

/// Not read by the programs (slots carry the backend); declared so the loader pins it with the
/// rest and the object describes every map.
#[map(name = "GLB_BACKENDS")]
static BACKENDS: HashMap<u32, global_lb_bpf_common::Backend> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// One bit per frontend (`filter_bit`): clear means "not a service", no hash lookup needed.
#[map(name = "GLB_FILTER")]
static FILTER: Array<u64> = Array::with_max_entries(FILTER_WORDS, 0);

/// The reverse-NAT map of the first layouts (cookie-keyed LRU). Never written by this build: read
/// as a fallback, for one release, so sockets an older build translated before an upgrade keep
/// seeing their service address. The loader creates it with one entry when none is pinned.
#[map(name = "GLB_REV_NAT")]
static REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::with_max_entries(MAX_REV_NAT_ENTRIES, 0);

/// Named so that bpf-linker leaves the struct holding it anonymous in BTF (what libbpf-style BTF
/// map definitions look like).
#[repr(transparent)]
struct AyaBtfMapMarker(PhantomData<()>);

/// A BTF-defined `BPF_MAP_TYPE_SK_STORAGE` map (the kernel wants BTF for its key and value, so it
/// cannot be a legacy `maps` definition): the fields only carry types for BTF, the way libbpf's
/// `__uint`/`__type` macros do.
#[repr(C)]
struct SkStorageDef<V> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    _anon: AyaBtfMapMarker,
}

// SAFETY: never read or written by the program; only its address is passed to helpers.
unsafe impl<V> Sync for SkStorageDef<V> {}

impl<V> SkStorageDef<V> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            _anon: AyaBtfMapMarker(PhantomData),
        }
    }

    /// The socket's storage in this map; created (zeroed) first when `create` and absent.
    #[inline(always)]
    fn get(&self, ctx: &SockAddrContext, create: bool) -> Option<*mut V> {
        // SAFETY: `ctx.sock_addr` is the program context; its `sk` is the socket (never NULL in
        // sock_addr programs), which bpf_sk_storage_get accepts.
        let p = unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            bpf_sk_storage_get(
                (self as *const Self).cast_mut().cast::<c_void>(),
                sk.cast(),
                core::ptr::null_mut(),
                if create {
                    u64::from(BPF_SK_STORAGE_GET_F_CREATE)
                } else {
                    0
                },
            )
        };
        if p.is_null() { None } else { Some(p.cast()) }
    }
}

/// Connected sockets (TCP, connected UDP): the backend `connect()` was sent to and the service.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "GLB_SOCK_REV_NAT")]
static GLB_SOCK_REV_NAT: SkStorageDef<SockRevNat> = SkStorageDef::new();

/// Unconnected UDP sockets: the last few backends they sent to (`sendmsg`) and their services.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "GLB_SOCK_REV_NAT_UDP")]
static GLB_SOCK_REV_NAT_UDP: SkStorageDef<SockRevNatUdp> = SkStorageDef::new();

#[map(name = "GLB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Allow the operation (the only value `recvmsg`/`getpeername` programs may return).
const ALLOW: i32 = 1;
/// Reject the operation; the syscall returns what `bpf_set_retval` set (EPERM if nothing).
const REJECT: i32 = 0;

/// How often a lookup is retried when a concurrent service update removed the slot this program
/// was about to use (it then re-reads the service's slot 0).
const SELECT_ATTEMPTS: u32 = 3;

/// The backend a slot sends to.
#[derive(Clone, Copy)]
struct Chosen {
    backend_id: u32,
    service_id: u32,
    addr: [u32; 4],
    port: u16,
    family: u8,
}

/// Outcome of a service lookup.
enum Selection {
    /// Not a service: leave the socket alone.
    NotAService,
    /// A service with no usable backend: refuse.
    NoBackend,
    /// Send the socket to this backend.
    Backend(Chosen),
}

/// Picks a backend for (addr, port, proto). Slot 0 gives the slot count and slot 1's backend; a
/// random slot in `1..=count` other than 1 costs a second lookup. The loader writes new slots
/// before the count and removes stale slots after it, so a miss here means an update raced with
/// us: read slot 0 again.
#[inline(always)]
fn select(addr: [u32; 4], port: u16, proto: u8) -> Selection {
    let mut key = ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
        slot: 0,
    };
    // The pre-filter: an array read (inlined by the verifier) instead of a hash lookup for the
    // common case, a connect to something that is not a service. The loader sets a frontend's
    // bit before writing its slot 0 and clears it after removing it.
    let bit = filter_bit(&addr, port, proto);
    match FILTER.get(bit >> 6) {
        Some(word) if *word & (1u64 << (bit & 63)) != 0 => {}
        _ => return Selection::NotAService,
    }
    let mut attempt = 0;
    while attempt < SELECT_ATTEMPTS {
        attempt += 1;
        key.slot = 0;
        let Some(svc) = SERVICES.get_ptr(&key) else {
            // Deleted (or never there): a service that vanished mid-update is "not a service".
            return Selection::NotAService;
        };
        // SAFETY: the pointer comes from a successful map lookup and is read at once (the map is
        // not preallocated: a replaced element stays intact until this program is done).
        let svc = unsafe { core::ptr::read(svc) };
        if svc.count == 0 {
            return Selection::NoBackend;
        }
        // SAFETY: a helper without arguments.
        let rnd = unsafe { bpf_get_prandom_u32() };
        let slot = rnd % svc.count + 1;
        let chosen = if slot == 1 {
            svc
        } else {
            key.slot = slot;
            let Some(v) = SERVICES.get_ptr(&key) else {
                continue;
            };
            // SAFETY: as above.
            unsafe { core::ptr::read(v) }
        };
        return Selection::Backend(Chosen {
            backend_id: chosen.backend_id,
            service_id: svc.service_id,
            addr: chosen.addr,
            port: chosen.port,
            family: chosen.family,
        });
    }
    Selection::NoBackend
}

#[inline(always)]
fn count_connection(backend_id: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot of an array map; programs on this CPU do not run concurrently.
        unsafe { *counter += 1 };
    }
}

/// Where a forward translation keeps what the reverse translations need.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remember {
    /// `connect()`: the socket has one peer from now on.
    Connected,
    /// `sendmsg()` with an address: one datagram; the socket may send to several services.
    Datagram,
}

#[inline(always)]
fn remember_service(ctx: &SockAddrContext, how: Remember, entry: &SockRevNat) {
    // If the storage cannot be created (memory), only getpeername/recvmsg translation is lost,
    // the connection itself still works.
    match how {
        Remember::Connected => {
            if let Some(slot) = GLB_SOCK_REV_NAT.get(ctx, true) {
                // SAFETY: the storage of this socket in this map, valid for the program run.
                unsafe { core::ptr::write(slot, *entry) };
            }
        }
        Remember::Datagram => {
            let Some(udp) = GLB_SOCK_REV_NAT_UDP.get(ctx, true) else {
                return;
            };
            // SAFETY: as above. Two threads sending on one socket at once may race here; the
            // worst outcome is one reply that shows the backend address.
            let udp = unsafe { &mut *udp };
            let mut i = 0;
            while i < SOCK_REV_NAT_UDP_SLOTS {
                let slot = &mut udp.slots[i];
                if slot.backend_port == entry.backend_port && slot.backend == entry.backend {
                    *slot = *entry;
                    return;
                }
                i += 1;
            }
            let at = (udp.next as usize) % SOCK_REV_NAT_UDP_SLOTS;
            udp.slots[at] = *entry;
            udp.next = udp.next.wrapping_add(1);
        }
    }
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: a helper that sets the syscall's return value; allowed for connect/sendmsg hooks.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Reads the four words of `user_ip6`.
#[inline(always)]
fn read_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the program context; 4-byte loads of user_ip6 are allowed.
    unsafe {
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes the four words of `user_ip6` (one 4-byte store each, as the verifier wants).
#[inline(always)]
fn write_ip6(sa: *mut bpf_sock_addr, addr: &[u32; 4]) {
    // SAFETY: `sa` is the program context; 4-byte stores to user_ip6 are allowed in these hooks.
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr[3]);
    }
}

#[inline(always)]
fn read_port(sa: *const bpf_sock_addr) -> u16 {
    // SAFETY: `sa` is the program context; user_port holds a network-order u16 in a u32.
    unsafe { core::ptr::read_volatile(&(*sa).user_port) as u16 }
}

#[inline(always)]
fn write_port(sa: *mut bpf_sock_addr, port: u16) {
    // SAFETY: `sa` is the program context.
    unsafe { core::ptr::write_volatile(&mut (*sa).user_port, u32::from(port)) }
}

#[inline(always)]
fn protocol(sa: *const bpf_sock_addr) -> Option<u8> {
    // SAFETY: `sa` is the program context.
    let proto = unsafe { core::ptr::read_volatile(&(*sa).protocol) };
    match proto {
        p if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        p if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

// ---- forward translation: connect and sendmsg ----

/// Forward translation for an IPv4 socket: returns the program's verdict.
#[inline(always)]
fn xlate_fwd4(ctx: &SockAddrContext, proto: u8, how: Remember) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program context.
    let ip4 = unsafe { core::ptr::read_volatile(&(*sa).user_ip4) };
    let port = read_port(sa);
    let vip = v4_mapped(ip4);
    match select(vip, port, proto) {
        Selection::NotAService => ALLOW,
        Selection::NoBackend => refuse(),
        Selection::Backend(backend) => {
            if backend.family != FAMILY_V4 {
                // The loader never pairs an IPv4 service with an IPv6 backend.
                return refuse();
            }
            // SAFETY: `sa` is the program context; user_ip4 is writable in these hooks.
            unsafe { core::ptr::write_volatile(&mut (*sa).user_ip4, backend.addr[3]) };
            write_port(sa, backend.port);
            commit(ctx, how, &backend, vip, port)
        }
    }
}

/// After a socket was rewritten to `backend`: count the connection and remember the service
/// (`vip`, `port`) for the reverse translation.
#[inline(always)]
fn commit(ctx: &SockAddrContext, how: Remember, backend: &Chosen, vip: [u32; 4], port: u16) -> i32 {
    count_connection(backend.backend_id);
    remember_service(
        ctx,
        how,
        &SockRevNat {
            backend: backend.addr,
            service: vip,
            backend_port: backend.port,
            service_port: port,
            service_id: backend.service_id,
        },
    );
    ALLOW
}

/// Forward translation for an IPv6 socket (including IPv4-mapped destinations of dual-stack
/// sockets, which find the IPv4 service and get an IPv4-mapped backend address).
#[inline(always)]
fn xlate_fwd6(ctx: &SockAddrContext, proto: u8, how: Remember) -> i32 {
    let sa = ctx.sock_addr;
    let vip = read_ip6(sa);
    let port = read_port(sa);
    match select(vip, port, proto) {
        Selection::NotAService => ALLOW,
        Selection::NoBackend => refuse(),
        Selection::Backend(backend) => {
            let wanted = if is_v4_mapped(&vip) {
                FAMILY_V4
            } else {
                FAMILY_V6
            };
            if backend.family != wanted {
                return refuse();
            }
            write_ip6(sa, &backend.addr);
            write_port(sa, backend.port);
            commit(ctx, how, &backend, vip, port)
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> i32 {
    match protocol(ctx.sock_addr) {
        Some(proto) => xlate_fwd4(ctx, proto, Remember::Connected),
        None => ALLOW,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> i32 {
    match protocol(ctx.sock_addr) {
        Some(proto) => xlate_fwd6(ctx, proto, Remember::Connected),
        None => ALLOW,
    }
}

fn try_sendmsg4(ctx: &SockAddrContext) -> i32 {
    xlate_fwd4(ctx, PROTO_UDP, Remember::Datagram)
}

fn try_sendmsg6(ctx: &SockAddrContext) -> i32 {
    xlate_fwd6(ctx, PROTO_UDP, Remember::Datagram)
}

// ---- reverse translation: recvmsg and getpeername ----

/// The service address (and port) a socket asked for when it was sent to backend `addr:port`:
/// its connected storage, then (`recvmsg` only) its unconnected-UDP storage, then the first
/// layouts' cookie-keyed map (sockets translated by an older build before an upgrade).
#[inline(always)]
fn service_of(
    ctx: &SockAddrContext,
    addr: [u32; 4],
    port: u16,
    datagrams: bool,
) -> Option<([u32; 4], u16)> {
    if let Some(c) = GLB_SOCK_REV_NAT.get(ctx, false) {
        // SAFETY: the storage of this socket, valid for the program run.
        let c = unsafe { &*c };
        if c.backend_port == port && c.backend == addr {
            return Some((c.service, c.service_port));
        }
    }
    if datagrams && let Some(udp) = GLB_SOCK_REV_NAT_UDP.get(ctx, false) {
        // SAFETY: as above.
        let udp = unsafe { &*udp };
        let mut i = 0;
        while i < SOCK_REV_NAT_UDP_SLOTS {
            let slot = &udp.slots[i];
            if slot.backend_port == port && slot.backend == addr {
                return Some((slot.service, slot.service_port));
            }
            i += 1;
        }
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = RevNatKey {
        cookie,
        addr,
        port,
        pad: [0; 6],
    };
    // SAFETY: the value is copied at once.
    REV_NAT
        .get_ptr(&key)
        .map(|v| unsafe { core::ptr::read(v) })
        .map(|v| (v.addr, v.port))
}

fn try_xlate_rev4(ctx: &SockAddrContext, datagrams: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program context.
    let ip4 = unsafe { core::ptr::read_volatile(&(*sa).user_ip4) };
    let port = read_port(sa);
    if let Some((addr, port)) = service_of(ctx, v4_mapped(ip4), port, datagrams) {
        // SAFETY: `sa` is the program context; user_ip4 is writable in these hooks.
        unsafe { core::ptr::write_volatile(&mut (*sa).user_ip4, addr[3]) };
        write_port(sa, port);
    }
    ALLOW
}

fn try_xlate_rev6(ctx: &SockAddrContext, datagrams: bool) -> i32 {
    let sa = ctx.sock_addr;
    let addr = read_ip6(sa);
    let port = read_port(sa);
    if let Some((addr, port)) = service_of(ctx, addr, port, datagrams) {
        write_ip6(sa, &addr);
        write_port(sa, port);
    }
    ALLOW
}

// ---- entry points ----

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    try_xlate_rev4(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    try_xlate_rev6(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    try_xlate_rev4(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    try_xlate_rev6(&ctx, false)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

// No GPL-only helper is used, so the workspace licence will do.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
