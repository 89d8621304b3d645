//! Map layouts shared by the eBPF programs and the loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so a key never carries
//! uninitialised bytes into a hash map. Addresses are kept exactly as the kernel keeps them in
//! `struct bpf_sock_addr`: four 32-bit words in network byte order (the bytes of the address in
//! memory order). An IPv4 address is stored as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so
//! one services map serves both families and a dual-stack socket connecting to `::ffff:a.b.c.d`
//! finds the IPv4 service. Ports are in network byte order too.
//!
//! Map contents:
//! - [`SERVICES_MAP`]: [`ServiceKey`] -> [`ServiceValue`]. Slot 0 of a frontend holds the backend
//!   count and the service id; slots `1..=count` hold one backend each. A backend with weight
//!   `w` fills `w` slots; the programs pick a slot at random. Every slot value carries its
//!   backend's address, port and family (fixed for a backend id), and slot 0 carries slot 1's
//!   backend too, so a connect costs one lookup for a one-backend service (and for a `1/count`
//!   share of the others) and two otherwise, and never a backends-map lookup.
//! - [`FILTER_MAP`]: array of [`FILTER_WORDS`] `u64` words, one bit per [`filter_bit`] of a
//!   frontend (address, port, protocol): a connect whose bit is clear is not a service, without
//!   a hash lookup (the common case, a connect to anything else, costs an array read).
//! - [`BACKENDS_MAP`]: backend id (`u32`) -> [`Backend`]. For the loader (cluster id, flags,
//!   restarts); the programs do not read it.
//! - [`SOCK_CONN_MAP`]: array of [`ConnSlot`]s, the [`SockConn`] of a live translated
//!   connected socket in the slot of its cookie (freed when the socket is closed), and
//!   [`SOCK_REV_NAT_MAP`] (socket-local storage) for those whose slot is taken; [`SOCK_REV_NAT_UDP_MAP`] (socket-local storage) for
//!   unconnected UDP sockets: so replies and `getpeername` show the service address.
//! - [`REV_NAT_MAP`]: the first layouts' reverse NAT ([`RevNatKey`] (socket cookie + backend
//!   address) -> [`RevNatValue`]), read only, for sockets an older build translated.
//! - [`COUNTERS_MAP`]: per-CPU array of `u64` indexed by backend id: connections (TCP connects,
//!   connected UDP sockets and unconnected UDP datagrams) sent to that backend.
#![cfg_attr(not(test), no_std)]

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// `AF_INET`, as stored in [`Backend::family`].
pub const FAMILY_V4: u8 = 4;
/// `AF_INET6`, as stored in [`Backend::family`].
pub const FAMILY_V6: u8 = 6;

/// Backend flag: the backend runs in the local cluster (for the status page's local/remote split).
pub const BACKEND_FLAG_LOCAL: u8 = 1;

/// Name of the services map in the eBPF object (and of its pin under the pin directory).
pub const SERVICES_MAP: &str = "GLB_SERVICES";
/// Name of the backends map.
pub const BACKENDS_MAP: &str = "GLB_BACKENDS";
/// Name of the reverse-NAT map of the first layouts (an LRU hash keyed by socket cookie). No
/// longer written; read as a fallback, for one release, for sockets translated by an older build
/// before an upgrade (see [`SOCK_REV_NAT_MAP`]).
pub const REV_NAT_MAP: &str = "GLB_REV_NAT";
/// Name of the socket-local reverse-NAT storage of connected sockets (TCP, connected UDP):
/// `BPF_MAP_TYPE_SK_STORAGE` with a [`SockRevNat`] per translated socket.
pub const SOCK_REV_NAT_MAP: &str = "GLB_SOCK_REV_NAT";
/// Name of the connection table: an array of [`MAX_SOCK_CONN`] [`ConnSlot`]s holding the state
/// of live translated connected sockets (TCP, connected UDP). A socket's slot is its cookie
/// modulo [`MAX_SOCK_CONN`] (cookies are handed out in sequence, so consecutive sockets use
/// consecutive slots); `connect4/6` claim it with a compare-and-swap of its cookie into a free
/// slot and write the state there: no allocation, no lock, no helper call. The `sock_release`
/// program frees the slot when the socket is closed. A connect whose slot is held by another
/// live socket keeps its state in [`SOCK_REV_NAT_MAP`] instead: nothing is ever evicted, and
/// cookies are never reused, so a slot never answers for another socket.
pub const SOCK_CONN_MAP: &str = "GLB_SOCK_CONN";
/// Name of the socket-local reverse-NAT storage of unconnected UDP sockets (`sendmsg`):
/// `BPF_MAP_TYPE_SK_STORAGE` with a [`SockRevNatUdp`] per socket that sent to a service.
pub const SOCK_REV_NAT_UDP_MAP: &str = "GLB_SOCK_REV_NAT_UDP";
/// Name of the frontend pre-filter map.
pub const FILTER_MAP: &str = "GLB_FILTER";
/// Per-backend connect outcomes, per CPU ([`ConnOutcome`]).
pub const OUTCOMES_MAP: &str = "GLB_OUTCOMES";
/// Backends the kernel saw fail a connect: backend id -> until when (ns, CLOCK_MONOTONIC).
pub const SUSPECT_MAP: &str = "GLB_SUSPECT";
/// One word: the latest expiry of any suspect mark (0: none); connect4 reads the suspect map only
/// before it.
pub const SUSPECT_GATE_MAP: &str = "GLB_SUSPECT_GATE";
/// Ring buffer of [`SuspectEvent`]s for node-sync.
pub const EVENTS_MAP: &str = "GLB_EVENTS";
/// Size of the events ring buffer.
pub const EVENTS_BYTES: u32 = 1 << 16;

/// The pre-filter has `1 << FILTER_BITS_LOG2` bits (512 KiB): with 100k frontends about 2.4 % of
/// the bits are set, so about 97.6 % of connects to non-services skip the services lookup
/// (2^20 bits would leave 9 % paying the lookup as well as the array read).
pub const FILTER_BITS_LOG2: u32 = 22;
/// Number of `u64` words of the pre-filter.
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);

/// The pre-filter bit of a frontend (services-map key fields, network byte order). The same
/// function runs in the programs and in the loader.
#[inline(always)]
pub const fn filter_bit(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    let mut h = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ (port as u32)
        ^ ((proto as u32) << 16);
    h = h.wrapping_mul(0x9E37_79B1);
    h ^= h >> 15;
    h = h.wrapping_mul(0x85EB_CA77);
    h >> (32 - FILTER_BITS_LOG2)
}
/// Name of the per-backend connection counters map.
pub const COUNTERS_MAP: &str = "GLB_COUNTERS";

/// Capacity of the services map (slot 0 entries plus backend slots, all services together).
pub const MAX_SERVICE_ENTRIES: u32 = 1 << 19;
/// Capacity of the backends map the object declares, and the loader's default: backend ids are
/// `1..capacity` (0 is never used), so a node programs up to `capacity - 1` distinct backends.
/// The loader sets another capacity ([`map_specs`], `DatapathConfig::max_backends`); it sizes
/// the maps indexed by backend id too ([`BACKEND_SIZED_MAPS`]).
pub const DEFAULT_MAX_BACKENDS: u32 = 1 << 16;
/// Smallest backends-map capacity the loader accepts.
pub const MIN_MAX_BACKENDS: u32 = 1 << 10;
/// Largest backends-map capacity the loader accepts (2^22: 4,194,303 backends; the two per-CPU
/// arrays indexed by backend id then take 288 MiB of kernel memory per CPU, see
/// [`per_cpu_bytes_per_backend`]).
pub const LIMIT_MAX_BACKENDS: u32 = 1 << 22;
/// Kernel memory the per-CPU maps indexed by backend id ([`COUNTERS_MAP`], [`OUTCOMES_MAP`],
/// both preallocated) take per backend-map entry and per CPU.
pub const fn per_cpu_bytes_per_backend() -> u32 {
    (core::mem::size_of::<u64>() + core::mem::size_of::<ConnOutcome>()) as u32
}
/// Capacity of the reverse-NAT LRU map of the first layouts, as they created it. This build never
/// writes that map; it creates it with one entry when none is pinned (see [`REV_NAT_MAP`]).
pub const MAX_REV_NAT_ENTRIES: u32 = 1 << 16;
/// Slots of the connection table ([`SOCK_CONN_MAP`], 64 bytes each: 4 MiB); a power of two.
pub const MAX_SOCK_CONN: u32 = 1 << 16;
/// How many (backend -> service) pairs an unconnected UDP socket remembers: the last
/// `SOCK_REV_NAT_UDP_SLOTS` distinct backends it sent a datagram to (through any services).
pub const SOCK_REV_NAT_UDP_SLOTS: usize = 8;
/// `BPF_MAP_TYPE_SK_STORAGE`.
pub const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
/// Largest number of slots one service may use (sum of its backends' weights).
pub const MAX_SLOTS_PER_SERVICE: u32 = 1 << 16;

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so a big, mostly empty map is cheap.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// `ECONNREFUSED` on Linux: what `connect()` returns for a service with no backends.
pub const ECONNREFUSED: i32 = 111;

/// The second-to-last word of an IPv4-mapped IPv6 address (`0000:ffff`), as stored in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The four address words of the IPv4-mapped form of `ip4` (network byte order, as in
/// `bpf_sock_addr::user_ip4`).
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether `addr` is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Key of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    /// Service address (IPv4-mapped for IPv4), network byte order.
    pub addr: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
    /// 0 for the service entry, `1..=count` for backend slots.
    pub slot: u32,
}

/// Value of the services map.
///
/// The first 16 bytes are the whole value of the first layout ([`ServiceValueV1`]), which held
/// no address (the programs looked the backend id up in the backends map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceValue {
    /// Backend id of this slot; in slot 0, slot 1's (0 when `count` is 0).
    pub backend_id: u32,
    /// Number of backend slots (slot 0 only); 0 means "refuse connections".
    pub count: u32,
    /// Service id, the same in every slot of a service.
    pub service_id: u32,
    /// Reserved, 0.
    pub flags: u32,
    /// Address of `backend_id` (IPv4-mapped for IPv4), network byte order.
    pub addr: [u32; 4],
    /// Port of `backend_id`, network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] of `backend_id`; 0 when there is no backend.
    pub family: u8,
    /// Always 0.
    pub pad: u8,
}

/// Value of the services map in the first layout (16 bytes; the programs then looked every slot's
/// backend id up in the backends map). Only read, when maps pinned by such a build are carried
/// over to the current layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValueV1 {
    /// Backend id in a backend slot; 0 in slot 0.
    pub backend_id: u32,
    /// Number of backend slots (slot 0 only).
    pub count: u32,
    /// Service id.
    pub service_id: u32,
    /// Reserved.
    pub flags: u32,
}

/// Value of the backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Backend {
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// Cluster the backend runs in.
    pub cluster_id: u16,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Always 0.
    pub pad: [u8; 2],
}

/// Key of the reverse-NAT map: which socket talked to which backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie` of the client socket.
    pub cookie: u64,
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// Always 0.
    pub pad: [u8; 6],
}

/// Value of the reverse-NAT map: the service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RevNatValue {
    /// Service address (IPv4-mapped for IPv4), network byte order.
    pub addr: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// Always 0.
    pub pad: [u8; 2],
    /// Service id.
    pub service_id: u32,
}

/// Socket-local reverse NAT: the backend a translated socket was sent to and the service it asked
/// for. One per connected socket ([`SOCK_REV_NAT_MAP`]); lives and dies with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SockRevNat {
    /// Backend address (IPv4-mapped for IPv4), network byte order.
    pub backend: [u32; 4],
    /// Service address (IPv4-mapped for IPv4), network byte order.
    pub service: [u32; 4],
    /// Backend port, network byte order; 0 marks an unused slot.
    pub backend_port: u16,
    /// Service port, network byte order.
    pub service_port: u16,
    /// Service id.
    pub service_id: u32,
}

/// Socket-local reverse NAT of an unconnected UDP socket ([`SOCK_REV_NAT_UDP_MAP`]): one slot per
/// backend it sent to, the last [`SOCK_REV_NAT_UDP_SLOTS`] distinct ones. A datagram to a backend
/// already in a slot rewrites that slot's service; another backend takes slot `next % SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SockRevNatUdp {
    /// Slot the next new backend takes (modulo [`SOCK_REV_NAT_UDP_SLOTS`]).
    pub next: u32,
    /// Always 0.
    pub pad: u32,
    /// The pairs.
    pub slots: [SockRevNat; SOCK_REV_NAT_UDP_SLOTS],
}

/// The maps whose capacity is the backends map's (they are indexed by backend id).
pub const BACKEND_SIZED_MAPS: [&str; 4] = [BACKENDS_MAP, COUNTERS_MAP, OUTCOMES_MAP, SUSPECT_MAP];

/// `(map type, key size, value size, max entries, flags)` of every map, as this build creates
/// them with a backends map of `max_backends` entries; a pinned map that differs was made by
/// another layout (or for another capacity) and is not reused as it is.
pub const fn map_specs(max_backends: u32) -> [(&'static str, MapSpec); 12] {
    [
        (
            SERVICES_MAP,
            MapSpec {
                map_type: 1, // BPF_MAP_TYPE_HASH
                key_size: core::mem::size_of::<ServiceKey>() as u32,
                value_size: core::mem::size_of::<ServiceValue>() as u32,
                max_entries: MAX_SERVICE_ENTRIES,
                flags: BPF_F_NO_PREALLOC,
            },
        ),
        (
            BACKENDS_MAP,
            MapSpec {
                map_type: 1, // BPF_MAP_TYPE_HASH
                key_size: 4,
                value_size: core::mem::size_of::<Backend>() as u32,
                max_entries: max_backends,
                flags: BPF_F_NO_PREALLOC,
            },
        ),
        (
            REV_NAT_MAP,
            MapSpec {
                map_type: 9, // BPF_MAP_TYPE_LRU_HASH
                key_size: core::mem::size_of::<RevNatKey>() as u32,
                value_size: core::mem::size_of::<RevNatValue>() as u32,
                max_entries: MAX_REV_NAT_ENTRIES,
                flags: 0,
            },
        ),
        (
            SOCK_REV_NAT_MAP,
            MapSpec {
                map_type: BPF_MAP_TYPE_SK_STORAGE,
                key_size: 4,
                value_size: core::mem::size_of::<SockConn>() as u32,
                max_entries: 0,
                flags: BPF_F_NO_PREALLOC,
            },
        ),
        (
            SOCK_CONN_MAP,
            MapSpec {
                map_type: 2, // BPF_MAP_TYPE_ARRAY
                key_size: 4,
                value_size: core::mem::size_of::<ConnSlot>() as u32,
                max_entries: MAX_SOCK_CONN,
                flags: 0,
            },
        ),
        (
            SOCK_REV_NAT_UDP_MAP,
            MapSpec {
                map_type: BPF_MAP_TYPE_SK_STORAGE,
                key_size: 4,
                value_size: core::mem::size_of::<SockRevNatUdp>() as u32,
                max_entries: 0,
                flags: BPF_F_NO_PREALLOC,
            },
        ),
        (
            FILTER_MAP,
            MapSpec {
                map_type: 2, // BPF_MAP_TYPE_ARRAY
                key_size: 4,
                value_size: 8,
                max_entries: FILTER_WORDS,
                flags: 0,
            },
        ),
        (
            COUNTERS_MAP,
            MapSpec {
                map_type: 6, // BPF_MAP_TYPE_PERCPU_ARRAY
                key_size: 4,
                value_size: 8,
                max_entries: max_backends,
                flags: 0,
            },
        ),
        (
            OUTCOMES_MAP,
            MapSpec {
                map_type: 6, // BPF_MAP_TYPE_PERCPU_ARRAY
                key_size: 4,
                value_size: core::mem::size_of::<ConnOutcome>() as u32,
                max_entries: max_backends,
                flags: 0,
            },
        ),
        (
            SUSPECT_MAP,
            MapSpec {
                map_type: 1, // BPF_MAP_TYPE_HASH
                key_size: 4,
                value_size: 8,
                max_entries: max_backends,
                flags: BPF_F_NO_PREALLOC,
            },
        ),
        (
            SUSPECT_GATE_MAP,
            MapSpec {
                map_type: 2, // BPF_MAP_TYPE_ARRAY
                key_size: 4,
                value_size: 8,
                max_entries: 1,
                flags: 0,
            },
        ),
        (
            EVENTS_MAP,
            MapSpec {
                map_type: 27, // BPF_MAP_TYPE_RINGBUF
                key_size: 0,
                value_size: 0,
                max_entries: EVENTS_BYTES,
                flags: 0,
            },
        ),
    ]
}

/// Per-backend connect outcomes of translated TCP sockets, per CPU ([`OUTCOMES_MAP`], indexed by
/// backend id), written by the `sock_ops` program: what the kernel saw of each connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConnOutcome {
    /// Connects that reached ESTABLISHED.
    pub established: u64,
    /// Connects refused (an RST answered the SYN).
    pub refused: u64,
    /// Connects whose SYN was not answered before its first retransmission timeout.
    pub timeout: u64,
    /// Sum of the SYN-to-established times of `established`, in nanoseconds.
    pub connect_ns_sum: u64,
    /// SYN-to-established times by bucket ([`CONNECT_BUCKETS_NS`] upper bounds, the last bucket
    /// open-ended); u32 per CPU, read as wrapping deltas.
    pub buckets: [u32; CONNECT_BUCKETS],
}

/// Number of connect-time buckets in [`ConnOutcome`].
pub const CONNECT_BUCKETS: usize = 8;

/// Upper bounds (inclusive, ns) of the first `CONNECT_BUCKETS - 1` connect-time buckets.
pub const CONNECT_BUCKETS_NS: [u64; CONNECT_BUCKETS - 1] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    5_000_000,
    25_000_000,
    100_000_000,
];

/// The bucket of a connect time.
#[inline(always)]
pub const fn connect_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < CONNECT_BUCKETS - 1 {
        if ns <= CONNECT_BUCKETS_NS[i] {
            return i;
        }
        i += 1;
    }
    CONNECT_BUCKETS - 1
}

/// Why the kernel marked a backend suspect ([`SuspectEvent::kind`]).
pub const SUSPECT_REFUSED: u32 = 1;
/// The SYN of a connect to it went unanswered until its first retransmission timeout.
pub const SUSPECT_TIMEOUT: u32 = 2;

/// How long a suspect mark holds when nobody clears it (node-sync confirms or clears it at once;
/// this bounds what a mark costs when node-sync is not running).
pub const SUSPECT_TTL_NS: u64 = 2_000_000_000;

/// One event of the ring buffer ([`EVENTS_MAP`]): the kernel marked a backend suspect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SuspectEvent {
    /// Backend id.
    pub backend_id: u32,
    /// Service id of the socket that met the failure.
    pub service_id: u32,
    /// [`SUSPECT_REFUSED`] or [`SUSPECT_TIMEOUT`].
    pub kind: u32,
    /// Always 0.
    pub pad: u32,
    /// `bpf_ktime_get_ns()` when it happened (CLOCK_MONOTONIC).
    pub at_ns: u64,
}

/// State of a translated connected socket ([`SOCK_CONN_MAP`], or [`SOCK_REV_NAT_MAP`] when the
/// table is full): the reverse NAT
/// and what the `sock_ops` program needs to tell the connect's outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SockConn {
    /// Backend and service.
    pub rev: SockRevNat,
    /// Backend id (outcome counters, suspect marks).
    pub backend_id: u32,
    /// [`CONN_DONE`], [`CONN_TRACKED`].
    pub flags: u32,
    /// When the SYN was sent (`bpf_ktime_get_ns()`).
    pub syn_ns: u64,
}

/// One slot of the connection table ([`SOCK_CONN_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConnSlot {
    /// Cookie of the socket that holds the slot; 0 when free.
    pub cookie: u64,
    /// Its state.
    pub conn: SockConn,
}

/// [`SockConn::flags`]: the `sock_ops` program follows this socket's connect.
pub const CONN_TRACKED: u32 = 1;
/// [`SockConn::flags`]: the connect's outcome was counted.
pub const CONN_DONE: u32 = 2;

/// The shape of a map, as the kernel reports it (`bpf_map_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    //! The loader reads and writes these types as raw map bytes.
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers, with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::ServiceValueV1 {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::SockRevNatUdp {}
    unsafe impl aya::Pod for super::SockConn {}
    unsafe impl aya::Pod for super::ConnSlot {}
    unsafe impl aya::Pod for super::ConnOutcome {}
    unsafe impl aya::Pod for super::SuspectEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 36);
        assert_eq!(size_of::<ServiceValueV1>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<SockRevNat>(), 40);
        assert_eq!(size_of::<SockRevNatUdp>(), 8 + 40 * SOCK_REV_NAT_UDP_SLOTS);
        assert_eq!(size_of::<SockConn>(), 56);
        assert_eq!(size_of::<ConnSlot>(), 64);
        assert!(MAX_SOCK_CONN.is_power_of_two());
        assert_eq!(size_of::<ConnOutcome>(), 32 + 4 * CONNECT_BUCKETS);
        assert_eq!(size_of::<SuspectEvent>(), 24);
    }

    #[test]
    fn connect_buckets_are_ordered_and_cover_every_time() {
        assert!(CONNECT_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(connect_bucket(0), 0);
        assert_eq!(connect_bucket(100_000), 0);
        assert_eq!(connect_bucket(100_001), 1);
        assert_eq!(connect_bucket(2_000_000), 4);
        assert_eq!(connect_bucket(u64::MAX), CONNECT_BUCKETS - 1);
    }

    #[test]
    fn filter_bits_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000u32 {
            let bit = filter_bit(
                &v4_mapped((0x0a60_0000 + i).to_be()),
                80u16.to_be(),
                PROTO_TCP,
            );
            assert!(bit < 1 << FILTER_BITS_LOG2);
            seen.insert(bit);
        }
        // 10k frontends in 4M bits: a few collisions at most.
        assert!(seen.len() > 9_950, "{}", seen.len());
        let a = filter_bit(&v4_mapped(1), 80, PROTO_TCP);
        assert_ne!(a, filter_bit(&v4_mapped(1), 80, PROTO_UDP));
        assert_ne!(a, filter_bit(&v4_mapped(1), 81, PROTO_TCP));
    }

    #[test]
    fn v4_mapped_matches_the_ipv6_form() {
        let ip4 = u32::from_ne_bytes([127, 10, 0, 1]);
        let words = v4_mapped(ip4);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 10, 0, 1]
        );
        assert!(is_v4_mapped(&words));
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
    }
}
