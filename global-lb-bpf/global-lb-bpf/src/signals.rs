//! What the kernel saw of each translated TCP connect, and the backends it marked suspect.
//!
//! The `sock_ops` program follows every TCP socket `connect4`/`connect6` translated, from its SYN
//! to the connect's outcome, and counts per backend and CPU: established (with the SYN to
//! established time in buckets), refused (an RST answered the SYN), timed out (the SYN's first
//! retransmission timeout). A refused or timed-out connect also marks its backend *suspect* at
//! once, inside the kernel, before the `connect()` returns: the next connects on this node pass
//! it over while the service has another backend, for [`common::SUSPECT_TTL_NS`] unless node-sync
//! clears the mark sooner; and it tells node-sync through a ring buffer ([`SuspectEvents`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf};
use global_lb_bpf_common::{self as common, ConnOutcome};

use crate::Error;

pub use global_lb_bpf_common::{
    CONNECT_BUCKETS, CONNECT_BUCKETS_NS, SUSPECT_REFUSED, SUSPECT_TIMEOUT, SUSPECT_TTL_NS,
    SuspectEvent,
};

/// A backend's connect outcomes, summed over CPUs, since its id was last given out (counters
/// only grow; read them as deltas).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Connects that reached ESTABLISHED.
    pub established: u64,
    /// Connects refused (RST to the SYN).
    pub refused: u64,
    /// Connects whose SYN went unanswered until its first retransmission timeout.
    pub timeout: u64,
    /// Sum of the SYN-to-established times, ns.
    pub connect_ns_sum: u64,
    /// SYN-to-established times by bucket (upper bounds [`common::CONNECT_BUCKETS_NS`], the last
    /// open-ended), each a wrapping 32-bit count per CPU summed here.
    pub buckets: [u64; CONNECT_BUCKETS],
}

/// The outcome counters and the suspect marks (see the module docs).
pub struct KernelSignals {
    outcomes: PerCpuArray<MapData, ConnOutcome>,
    suspect: AyaHashMap<MapData, u32, u64>,
    gate: Array<MapData, u64>,
}

impl std::fmt::Debug for KernelSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSignals").finish_non_exhaustive()
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        op,
        source: Box::new(e),
    }
}

impl KernelSignals {
    pub(crate) fn new(
        outcomes: PerCpuArray<MapData, ConnOutcome>,
        suspect: AyaHashMap<MapData, u32, u64>,
        gate: Array<MapData, u64>,
    ) -> Self {
        Self {
            outcomes,
            suspect,
            gate,
        }
    }

    /// Backend `id`'s outcomes, summed over CPUs.
    pub fn outcomes(&self, id: u32) -> Result<Outcomes, Error> {
        let per_cpu = self
            .outcomes
            .get(&id, 0)
            .map_err(map_err(common::OUTCOMES_MAP, "lookup"))?;
        let mut o = Outcomes::default();
        for c in per_cpu.iter() {
            o.established += c.established;
            o.refused += c.refused;
            o.timeout += c.timeout;
            o.connect_ns_sum += c.connect_ns_sum;
            for (sum, b) in o.buckets.iter_mut().zip(c.buckets) {
                *sum += u64::from(b);
            }
        }
        Ok(o)
    }

    /// Backends marked suspect, with the mark's expiry (ns, CLOCK_MONOTONIC); expired marks
    /// included until cleared.
    pub fn suspects(&self) -> Vec<(u32, u64)> {
        self.suspect.iter().filter_map(Result::ok).collect()
    }

    /// Clears backend `id`'s suspect mark (a probe found it answering); absent is not an error.
    /// Returns whether there was one.
    pub fn clear_suspect(&mut self, id: u32) -> Result<bool, Error> {
        match self.suspect.remove(&id) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_err(common::SUSPECT_MAP, "delete")(e)),
        }
    }

    /// Removes expired marks (and resets the gate when none is left), so connect4 stops looking
    /// marks up. `now_ns` is CLOCK_MONOTONIC.
    pub fn sweep(&mut self, now_ns: u64) -> Result<usize, Error> {
        let all = self.suspects();
        let mut removed = 0;
        for (id, until) in &all {
            if *until <= now_ns && self.clear_suspect(*id)? {
                removed += 1;
            }
        }
        if removed == all.len() {
            let gate = self
                .gate
                .get(&0, 0)
                .map_err(map_err(common::SUSPECT_GATE_MAP, "lookup"))?;
            if gate != 0 && gate <= now_ns {
                self.gate
                    .set(0, 0, 0)
                    .map_err(map_err(common::SUSPECT_GATE_MAP, "update"))?;
            }
        }
        Ok(removed)
    }
}

/// The kernel's suspect marks as they happen (a ring buffer; poll its fd, then drain).
pub struct SuspectEvents {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for SuspectEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuspectEvents").finish_non_exhaustive()
    }
}

impl SuspectEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event, if one is waiting.
    pub fn next_event(&mut self) -> Option<SuspectEvent> {
        let item = self.ring.next()?;
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(
                item.get(i * 4..i * 4 + 4)?.try_into().ok()?,
            ))
        };
        Some(SuspectEvent {
            backend_id: word(0)?,
            service_id: word(1)?,
            kind: word(2)?,
            pad: 0,
            at_ns: u64::from_ne_bytes(item.get(16..24)?.try_into().ok()?),
        })
    }
}

impl AsFd for SuspectEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for SuspectEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// CLOCK_MONOTONIC in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}
