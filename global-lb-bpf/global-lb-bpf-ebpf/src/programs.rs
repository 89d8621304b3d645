//! The cgroup `sock_addr` programs and their maps.
//!
//! - `connect4`/`connect6`: TCP and connected UDP. A (service address, port, protocol) found in
//!   the services map is rewritten to a backend chosen at random among the service's slots; the
//!   socket then talks to the backend directly, with no per-packet work. A service with no
//!   backends fails the `connect()` with `ECONNREFUSED` at once (`bpf_set_retval`).
//! - `sendmsg4`/`sendmsg6`: the same per datagram for unconnected UDP.
//! - `recvmsg4`/`recvmsg6`, `getpeername4`/`getpeername6`: translate a backend address back to the
//!   service address the socket asked for. A connected socket's state is in the connection table
//!   (`GLB_SOCK_CONN`, an array: the slot of the socket's cookie, claimed with a
//!   compare-and-swap; a connect allocates nothing and takes no lock), freed by `sock_release`
//!   when the socket is closed; when its slot is held by another live socket, in socket-local
//!   storage (`SK_STORAGE`, allocated, freed with the socket). An unconnected UDP socket's is in
//!   socket-local storage. Nothing evicts the state of a live socket.
//! - `sock_release`: frees a closed socket's slot of the connection table.
//!
//! Anything not in the services map is left alone; that costs an array read (the pre-filter)
//! and, for the few non-services whose filter bit is shared with a service, one lookup. A
//! translated connect costs one services lookup for a one-backend service (slot 0 carries slot
//! 1's backend), two otherwise, and a compare-and-swap and a 64-byte write into the connection
//! table (see `bench --bin datapath`).

use core::ffi::c_void;
use core::marker::PhantomData;

use aya_ebpf::{
    bindings::{
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr,
    },
    helpers::generated::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
        bpf_sk_storage_get,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use global_lb_bpf_common::{
    BPF_F_NO_PREALLOC, BPF_MAP_TYPE_SK_STORAGE, CONN_DONE, CONN_TRACKED, ConnOutcome, ConnSlot,
    DEFAULT_MAX_BACKENDS, ECONNREFUSED, EVENTS_BYTES, FAMILY_V4, FAMILY_V6, FILTER_WORDS,
    MAX_REV_NAT_ENTRIES, MAX_SERVICE_ENTRIES, MAX_SOCK_CONN, PROTO_TCP, PROTO_UDP, RevNatKey,
    RevNatValue, SOCK_REV_NAT_UDP_SLOTS, SUSPECT_REFUSED, SUSPECT_TIMEOUT, SUSPECT_TTL_NS,
    ServiceKey, ServiceValue, SockConn, SockRevNat, SockRevNatUdp, SuspectEvent, connect_bucket,
    filter_bit, is_v4_mapped, v4_mapped,
};

#[map(name = "GLB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);

/// Not read by the programs (slots carry the backend); declared so the loader pins it with the
/// rest and the object describes every map.
#[map(name = "GLB_BACKENDS")]
static BACKENDS: HashMap<u32, global_lb_bpf_common::Backend> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

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
        let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
        self.get_sk(sk.cast(), create)
    }

    /// The storage of socket `sk` (a full socket the verifier knows is not NULL).
    #[inline(always)]
    fn get_sk(&self, sk: *mut c_void, create: bool) -> Option<*mut V> {
        // SAFETY: `sk` is a socket pointer of the program context, checked by the caller.
        let p = unsafe {
            bpf_sk_storage_get(
                (self as *const Self).cast_mut().cast::<c_void>(),
                sk,
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

/// Connected sockets (TCP, connected UDP) whose connection-table slot is taken: the backend
/// `connect()` was sent to, the service, and what `sock_ops` needs to tell the connect's outcome.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "GLB_SOCK_REV_NAT")]
static GLB_SOCK_REV_NAT: SkStorageDef<SockConn> = SkStorageDef::new();

/// Unconnected UDP sockets: the last few backends they sent to (`sendmsg`) and their services.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "GLB_SOCK_REV_NAT_UDP")]
static GLB_SOCK_REV_NAT_UDP: SkStorageDef<SockRevNatUdp> = SkStorageDef::new();

/// The connection table: the state of a live translated connected socket in the slot of its
/// cookie (`cookie % MAX_SOCK_CONN`), tagged with the cookie; `sock_release` frees it. A socket
/// whose slot is taken keeps its state in `GLB_SOCK_REV_NAT` instead (never an eviction).
#[map(name = "GLB_SOCK_CONN")]
static SOCK_CONN: Array<ConnSlot> = Array::with_max_entries(MAX_SOCK_CONN, 0);

/// The connection-table slot of the socket with this cookie.
#[inline(always)]
fn slot_of(cookie: u64) -> Option<*mut ConnSlot> {
    SOCK_CONN.get_ptr_mut((cookie as u32) & (MAX_SOCK_CONN - 1))
}

/// The tag of a slot: the cookie of the socket that holds it, 0 when free. (An aligned 8-byte
/// load is atomic; the BPF target has no atomic load before cpu v4.)
#[inline(always)]
fn tag_of(slot: *mut ConnSlot) -> u64 {
    // SAFETY: a map value, valid and 8-byte aligned for the program run.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).cookie)) }
}

/// Sets the tag of `slot` to `new` if it is `old` (BPF_CMPXCHG); whether it did.
#[inline(always)]
fn swap_tag(slot: *mut ConnSlot, old: u64, new: u64) -> bool {
    use core::intrinsics::AtomicOrdering::{Relaxed, SeqCst};
    // SAFETY: as in tag_of.
    unsafe {
        core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { Relaxed }>(
            core::ptr::addr_of_mut!((*slot).cookie),
            old,
            new,
        )
        .1
    }
}

/// The state of the socket with this cookie in the connection table, if it holds its slot.
#[inline(always)]
fn conn_in_table(cookie: u64) -> Option<*mut SockConn> {
    let slot = slot_of(cookie)?;
    if tag_of(slot) == cookie {
        // SAFETY: as in tag_of.
        Some(unsafe { core::ptr::addr_of_mut!((*slot).conn) })
    } else {
        None
    }
}

#[map(name = "GLB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// What the kernel saw of each translated TCP connect, per backend and CPU (`sock_ops`).
#[map(name = "GLB_OUTCOMES")]
static OUTCOMES: PerCpuArray<ConnOutcome> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Backends a connect just failed on (refused, or SYN unanswered): id -> until (ns).
#[map(name = "GLB_SUSPECT")]
static SUSPECT: HashMap<u32, u64> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// The latest expiry of any suspect mark: before it, connect4 looks a chosen backend up in
/// `SUSPECT`; after it (the common case), an array read is all a connect pays.
#[map(name = "GLB_SUSPECT_GATE")]
static SUSPECT_GATE: Array<u64> = Array::with_max_entries(1, 0);

/// Suspect marks, for node-sync (which confirms them with a probe at once).
#[map(name = "GLB_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

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
        let mut chosen = if slot == 1 {
            svc
        } else {
            key.slot = slot;
            let Some(v) = SERVICES.get_ptr(&key) else {
                continue;
            };
            // SAFETY: as above.
            unsafe { core::ptr::read(v) }
        };
        // Passive ejection: a backend the kernel just saw refuse a connect is passed over
        // while the service has another (never down to none: if the next slots are suspect
        // too, the first choice stands).
        if svc.count > 1 && suspects_now() && is_suspect(chosen.backend_id) {
            let mut step = 1;
            while step < SUSPECT_SKIPS && step < svc.count {
                key.slot = (slot - 1 + step) % svc.count + 1;
                step += 1;
                let Some(v) = SERVICES.get_ptr(&key) else {
                    break;
                };
                // SAFETY: as above.
                let next = unsafe { core::ptr::read(v) };
                if !is_suspect(next.backend_id) {
                    chosen = next;
                    break;
                }
            }
        }
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

/// How many slots a connect looks at, the first choice included, to pass over suspect backends.
const SUSPECT_SKIPS: u32 = 4;

/// Whether any suspect mark may still hold (one array read; the clock only after a mark).
#[inline(always)]
fn suspects_now() -> bool {
    match SUSPECT_GATE.get(0) {
        // SAFETY: a helper without arguments.
        Some(until) if *until != 0 => *until > unsafe { bpf_ktime_get_ns() },
        _ => false,
    }
}

/// Whether the kernel marked `backend_id` suspect and the mark still holds.
#[inline(always)]
fn is_suspect(backend_id: u32) -> bool {
    // SAFETY: the value is read at once.
    match unsafe { SUSPECT.get(&backend_id) } {
        // SAFETY: a helper without arguments.
        Some(until) => *until > unsafe { bpf_ktime_get_ns() },
        None => false,
    }
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
fn remember_service(ctx: &SockAddrContext, how: Remember, entry: &SockRevNat, backend_id: u32) {
    // If the storage cannot be created (memory), only getpeername/recvmsg translation is lost,
    // the connection itself still works.
    match how {
        Remember::Connected => {
            let conn = SockConn {
                rev: *entry,
                backend_id,
                flags: 0,
                syn_ns: 0,
            };
            // The table first: the slot of the socket's cookie, if free (or already its own: a
            // UDP socket connecting again). The compare-and-swap settles two sockets racing for
            // one slot; the loser keeps its state in socket-local storage.
            let cookie = cookie_of(ctx);
            if let Some(slot) = slot_of(cookie) {
                if tag_of(slot) == cookie || swap_tag(slot, 0, cookie) {
                    // SAFETY: the slot is this socket's now, as in tag_of.
                    unsafe { core::ptr::write(core::ptr::addr_of_mut!((*slot).conn), conn) };
                    return;
                }
            }
            // Taken by another live socket: socket-local storage (allocated, freed with the
            // socket).
            if let Some(slot) = GLB_SOCK_REV_NAT.get(ctx, true) {
                // SAFETY: the storage of this socket in this map, valid for the program run.
                unsafe { core::ptr::write(slot, conn) };
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

/// The socket's cookie (unique for the boot, never reused).
#[inline(always)]
fn cookie_of(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
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
        backend.backend_id,
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
/// its connection-table entry, its connected storage (a full table, or an older build), then
/// (`recvmsg` only) its unconnected-UDP storage, then the first layouts' cookie-keyed map
/// (sockets translated by an older build before an upgrade).
#[inline(always)]
fn service_of(
    ctx: &SockAddrContext,
    addr: [u32; 4],
    port: u16,
    datagrams: bool,
) -> Option<([u32; 4], u16)> {
    let cookie = cookie_of(ctx);
    if let Some(c) = conn_in_table(cookie) {
        // SAFETY: this socket's slot, read at once (only this socket's own connect rewrites it,
        // and only its close frees it).
        let c = unsafe { &(*c).rev };
        if c.backend_port == port && c.backend == addr {
            return Some((c.service, c.service_port));
        }
    }
    if let Some(c) = GLB_SOCK_REV_NAT.get(ctx, false) {
        // SAFETY: the storage of this socket, valid for the program run.
        let c = unsafe { &(*c).rev };
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

// ---- connect outcomes: sock_ops ----

/// TCP states (`include/net/tcp_states.h`).
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

/// The translated-connect state of the socket of a `sock_ops` callback, if it has one: its
/// connection-table entry, else its socket-local storage.
#[inline(always)]
fn conn_of(ctx: &SockOpsContext) -> Option<*mut SockConn> {
    // SAFETY: the context pointer is valid for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if let Some(c) = conn_in_table(cookie) {
        return Some(c);
    }
    // SAFETY: `ctx.ops` is the program context; `sk` is NULL when it is not a full socket.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    GLB_SOCK_REV_NAT.get_sk(sk.cast(), false)
}

#[inline(always)]
fn outcome(backend_id: u32) -> Option<*mut ConnOutcome> {
    OUTCOMES.get_ptr_mut(backend_id)
}

/// Marks `c`'s backend suspect until `now + SUSPECT_TTL_NS` and tells node-sync.
#[inline(always)]
fn mark_suspect(c: &SockConn, kind: u32, now: u64) {
    let until = now + SUSPECT_TTL_NS;
    let _ = SUSPECT.insert(&c.backend_id, &until, 0);
    if let Some(gate) = SUSPECT_GATE.get_ptr_mut(0) {
        // SAFETY: the one element of an array map. Two CPUs may race; the loser's mark is then
        // read only until the winner's expiry, which is at most a moment earlier.
        unsafe {
            if *gate < until {
                *gate = until;
            }
        }
    }
    let _ = EVENTS.output::<SuspectEvent>(
        &SuspectEvent {
            backend_id: c.backend_id,
            service_id: c.rev.service_id,
            kind,
            pad: 0,
            at_ns: now,
        },
        0,
    );
}

fn try_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_RTO_CB
    {
        return;
    }
    // The socket's state is looked up at the SYN; after it, only for a socket whose callbacks
    // the SYN turned on (a translated one): a connect to anything else pays one lookup.
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && ctx.cb_flags() == 0 {
        return;
    }
    // Only sockets connect4/connect6 translated have state.
    let Some(c) = conn_of(ctx) else { return };
    // SAFETY: the socket's storage, valid for the program run; callbacks of one socket run
    // under its lock, one at a time.
    let c = unsafe { &mut *c };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The SYN is about to leave: follow this connect's state changes and its first RTO.
        c.syn_ns = now;
        c.flags = CONN_TRACKED;
        let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
        return;
    }
    if c.flags & CONN_TRACKED == 0 || c.flags & CONN_DONE != 0 {
        return;
    }
    let Some(o) = outcome(c.backend_id) else {
        return;
    };
    // SAFETY: this CPU's element of a per-CPU array; no other program writes it concurrently.
    let o = unsafe { &mut *o };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        c.flags |= CONN_DONE;
        let took = now.saturating_sub(c.syn_ns);
        o.established += 1;
        o.connect_ns_sum += took;
        let b = connect_bucket(took);
        if b < o.buckets.len() {
            o.buckets[b] = o.buckets[b].wrapping_add(1);
        }
        // Nothing more to learn from this socket: stop the callbacks.
        let _ = ctx.set_cb_flags(0);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        // SAFETY: reading the program context.
        let (old, new, segs_in) = (ctx.arg(0), ctx.arg(1), unsafe { (*ctx.ops).segs_in });
        // SYN_SENT -> CLOSE after a segment came in: the answer to the SYN was an RST. (Without
        // one it is the application giving up, or the SYN retries running out after a timeout
        // that was already counted.)
        if old == TCP_SYN_SENT && new == TCP_CLOSE && segs_in > 0 {
            c.flags |= CONN_DONE;
            o.refused += 1;
            mark_suspect(c, SUSPECT_REFUSED, now);
        }
    // SAFETY: reading the program context.
    } else if unsafe { (*ctx.ops).state } == TCP_SYN_SENT {
        // The first retransmission timeout of the SYN: nobody answered.
        c.flags |= CONN_DONE;
        o.timeout += 1;
        mark_suspect(c, SUSPECT_TIMEOUT, now);
    }
}

// ---- entry points ----

/// A socket of the cgroup is closed: its connection-table slot, if it holds one, is freed.
/// (Callbacks `sock_ops` still gets for the closed socket find no state: nothing left to learn.)
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket, valid for the program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if let Some(slot) = slot_of(cookie) {
        swap_tag(slot, cookie, 0);
    }
    ALLOW
}

/// TCP connect outcomes of translated sockets: established (and SYN-to-established time),
/// refused, timed out; a failed connect marks its backend suspect at once.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

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
