//! The aya shell: load the programs, attach them to a cgroup, pin maps and links, and give the
//! maps to [`LbMaps`]. This file is the [`Datapath`] API and the order of a start; each job has
//! its own file:
//! - [`pin`]: load a program, attach it through a BPF link, pin links and maps, lock the pin
//!   directory;
//! - [`layout`]: the shape of every map, and the migration of maps pinned by a build with another
//!   layout (services carried over, pins renamed over);
//! - [`aya_store`]: [`MapStore`](crate::store::MapStore) over the kernel maps, which
//!   [`LbMaps`] writes through.
//!
//! Pin layout under the pin directory (on bpffs):
//! - `GLB_SERVICES`, `GLB_BACKENDS`, `GLB_FILTER`, `GLB_COUNTERS`, `GLB_SOCK_CONN` (the
//!   connection table), `GLB_SOCK_REV_NAT`, `GLB_SOCK_REV_NAT_UDP` (socket-local storage),
//!   `GLB_REV_NAT` (the earlier layouts' reverse NAT, read only) and the signal maps: the maps;
//! - `link_<program>` (e.g. `link_connect4`): one BPF link per program, attached to the cgroup.
//!
//! A pinned link keeps its program attached after the loader exits, and a pinned map keeps its
//! contents, so the datapath never stops: [`Datapath::open`] on a pin directory that is already
//! populated reuses every pinned map and link, reads the services back and rewrites nothing.
//! A link that is missing is created; a link that holds another build's program (an upgrade) is
//! replaced without a gap: the new program is attached next to the old one, then its pin is
//! renamed over the old pin. [`Datapath::remove`] detaches and deletes it all.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::maps::{Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use global_lb_bpf_common as common;
use nix::fcntl::Flock;
use tracing::{info, warn};

use crate::maps::{LbMaps, ServiceMaps};
use crate::mounts::is_cgroup2;
use crate::signals::{KernelSignals, SuspectEvents};
use crate::{BackendCounter, BackendEntry, Error, Frontend, Service};

mod aya_store;
mod layout;
mod pin;

use aya_store::{AyaStore, layout_err};
use layout::{carry_services, replace_maps, spec_of, stale_pins, take_signals};
use pin::{
    attach_and_pin, load_program, lock_pin_dir, prepare_pin_dir, program_identity, remove_pin,
};

/// The compiled eBPF object (built by `build.rs`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/global-lb-bpf"));

/// The programs, in attach (and replace) order: the reverse translations first, so that during an
/// upgrade no socket translated by a new `connect`/`sendmsg` program meets an old
/// `getpeername`/`recvmsg` program that does not know where the new one keeps its state.
/// `sock_ops` (connect outcomes, suspect marks) comes before the connect programs so that every
/// socket they translate is followed, and `sock_release` (which deletes a closed socket's
/// connection-table entry) so that every entry they write is deleted. [`Datapath::remove`]
/// detaches in the opposite order.
pub const PROGRAMS: [&str; 10] = [
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "sock_release",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
];

const MAPS: [&str; 12] = [
    common::OUTCOMES_MAP,
    common::SUSPECT_MAP,
    common::SUSPECT_GATE_MAP,
    common::EVENTS_MAP,
    common::SERVICES_MAP,
    common::BACKENDS_MAP,
    common::REV_NAT_MAP,
    common::SOCK_CONN_MAP,
    common::SOCK_REV_NAT_MAP,
    common::SOCK_REV_NAT_UDP_MAP,
    common::COUNTERS_MAP,
    common::FILTER_MAP,
];

/// Where to attach and where to pin, and how many backends the maps hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes (and descendants) are load-balanced.
    pub cgroup: PathBuf,
    /// Directory on bpffs for the pinned maps and links; one per cgroup.
    pub pin_dir: PathBuf,
    /// Capacity of the backends map, and of the maps indexed by backend id (connection
    /// counters, connect outcomes, suspect marks): at most `max_backends - 1` distinct backends
    /// are programmed. Between [`common::MIN_MAX_BACKENDS`] and [`common::LIMIT_MAX_BACKENDS`];
    /// the two per-CPU arrays among them are preallocated
    /// ([`DatapathConfig::per_cpu_map_bytes`]). Maps pinned with another capacity are replaced
    /// by maps of this one at [`Datapath::open`], their services carried over (a capacity too
    /// small for them is refused, and the pinned maps keep serving).
    pub max_backends: u32,
}

impl DatapathConfig {
    /// Attach to `cgroup`, pin under `pin_dir`, maps of the default capacity
    /// ([`common::DEFAULT_MAX_BACKENDS`]).
    pub fn new(cgroup: impl Into<PathBuf>, pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            cgroup: cgroup.into(),
            pin_dir: pin_dir.into(),
            max_backends: common::DEFAULT_MAX_BACKENDS,
        }
    }

    /// The same, with a backends map of `max_backends` entries.
    pub fn with_max_backends(mut self, max_backends: u32) -> Self {
        self.max_backends = max_backends;
        self
    }

    /// Kernel memory of the preallocated per-CPU maps indexed by backend id, per CPU (the
    /// hash maps sized by `max_backends` allocate per entry used).
    pub fn per_cpu_map_bytes(&self) -> u64 {
        u64::from(self.max_backends) * u64::from(common::per_cpu_bytes_per_backend())
    }

    /// `max_backends` if the loader accepts it, else why not.
    pub fn check_max_backends(max_backends: u32) -> Result<u32, String> {
        if (common::MIN_MAX_BACKENDS..=common::LIMIT_MAX_BACKENDS).contains(&max_backends) {
            Ok(max_backends)
        } else {
            Err(format!(
                "{max_backends} is outside {}..={} (the backends map's capacity)",
                common::MIN_MAX_BACKENDS,
                common::LIMIT_MAX_BACKENDS
            ))
        }
    }
}

/// The loaded, attached datapath and its typed map API.
///
/// One `Datapath` per pin directory at a time: [`Datapath::open`] holds an exclusive lock on the
/// pin directory until dropped (a second writer would race the first one's slot updates). To
/// look at a running datapath from elsewhere use [`Datapath::inspect`].
pub struct Datapath {
    config: DatapathConfig,
    maps: LbMaps<AyaStore>,
    links: Vec<FdLink>,
    reused_links: usize,
    replaced_links: usize,
    signals: Option<(KernelSignals, SuspectEvents)>,
    _lock: Flock<File>,
}

/// A read-only view of the maps of a running datapath (see [`Datapath::inspect`]).
pub struct DatapathView {
    maps: LbMaps<AyaStore>,
}

impl DatapathView {
    /// Every service, sorted by frontend.
    pub fn services(&self) -> Result<Vec<Service>, Error> {
        self.maps.services()
    }

    /// Connection counters of every backend, sorted by backend id.
    pub fn counters(&self) -> Result<Vec<BackendCounter>, Error> {
        self.maps.counters()
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("config", &self.config)
            .field("links", &self.links.len())
            .field("reused_links", &self.reused_links)
            .finish()
    }
}

impl Datapath {
    /// Loads (or reuses) the maps and programs pinned under `config.pin_dir` and makes sure every
    /// program is attached to `config.cgroup`. Services already in pinned maps keep working
    /// throughout and are read back, not rewritten.
    pub fn open(config: &DatapathConfig) -> Result<Self, Error> {
        let cgroup = File::open(&config.cgroup).map_err(|source| Error::Cgroup {
            path: config.cgroup.clone(),
            source,
        })?;
        if !is_cgroup2(&config.cgroup) {
            return Err(Error::NotCgroup2 {
                path: config.cgroup.clone(),
            });
        }
        DatapathConfig::check_max_backends(config.max_backends).map_err(|reason| {
            Error::MapLayout {
                map: common::BACKENDS_MAP,
                reason,
            }
        })?;
        prepare_pin_dir(&config.pin_dir)?;
        let lock = lock_pin_dir(&config.pin_dir)?;

        // Pinned maps of another layout (an older build) are not reused as they are: the
        // programs would misread them. They are replaced by maps of this layout, the services
        // carried over, before this build's programs are attached.
        let stale = stale_pins(&config.pin_dir, config.max_backends)?;
        let carried = if stale
            .iter()
            .any(|(name, _)| *name == common::SERVICES_MAP || *name == common::BACKENDS_MAP)
        {
            Some(carry_services(&config.pin_dir, &stale)?)
        } else {
            None
        };
        let mut replaced_maps: Vec<&'static str> = stale.iter().map(|(name, _)| *name).collect();
        if carried.is_some() {
            // The services and backends maps go together: slots name backend ids.
            for name in [common::SERVICES_MAP, common::BACKENDS_MAP] {
                if !replaced_maps.contains(&name) {
                    replaced_maps.push(name);
                }
            }
        }
        for (name, found) in &stale {
            let (_, want) = spec_of(name, config.max_backends);
            warn!(
                map = name,
                pinned = ?found,
                wanted = ?want,
                "pinned map has another layout (another build): replacing it"
            );
        }

        let map_pins: Vec<(&str, PathBuf)> = MAPS
            .iter()
            .filter(|name| !replaced_maps.contains(name))
            .map(|name| (*name, config.pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        // The first layouts' reverse-NAT LRU is only read (sockets an older build translated
        // before an upgrade): kept as pinned when there is one, else made as small as can be.
        if !config.pin_dir.join(common::REV_NAT_MAP).exists() {
            loader.map_max_entries(common::REV_NAT_MAP, 1);
        }
        for name in common::BACKEND_SIZED_MAPS {
            loader.map_max_entries(name, config.max_backends);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| Error::Load {
            pin_dir: config.pin_dir.clone(),
            source: Box::new(source),
        })?;

        let maps = if replaced_maps.is_empty() {
            LbMaps::recover(AyaStore::take(&mut ebpf)?)?
        } else {
            replace_maps(
                &mut ebpf,
                &config.pin_dir,
                &replaced_maps,
                carried,
                config.max_backends,
            )?
        };
        let signals = take_signals(&mut ebpf, &config.pin_dir, &replaced_maps)?;

        let mut links = Vec::with_capacity(PROGRAMS.len());
        let mut reused_links = 0;
        let mut replaced_links = 0;
        for program in PROGRAMS {
            let path = config.pin_dir.join(format!("link_{program}"));
            // Loaded every time: proves this kernel accepts the program, and gives its tag.
            let prog = load_program(&mut ebpf, program)?;
            if !path.exists() {
                links.push(attach_and_pin(
                    prog,
                    program,
                    &cgroup,
                    &config.cgroup,
                    &path,
                )?);
                continue;
            }
            let link: FdLink = PinnedLink::from_pin(&path)
                .map_err(|e| Error::Link {
                    program,
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .into();
            // Reused only when it runs this build's code over these very maps: the same tag and
            // the same map ids as the program just loaded over the pins. A program of this build
            // still bound to maps that were replaced or re-created (an earlier start that died
            // before it swapped the links) is replaced too.
            let pinned = link
                .info()
                .ok()
                .and_then(|info| program_identity(info.program_id()));
            let ours = prog.info().ok().and_then(|info| {
                let mut maps = info.map_ids().ok().flatten()?;
                maps.sort_unstable();
                Some((info.tag(), maps))
            });
            if pinned.is_some() && pinned == ours {
                reused_links += 1;
                links.push(link);
                continue;
            }
            // Another build's program: attach ours next to it (running both for a moment is
            // harmless, the second one sees an address the first already translated), then
            // move our pin over the old one, which detaches the old program.
            let staging = config.pin_dir.join(format!("link_{program}_new"));
            remove_pin(&staging)?;
            let new_link = attach_and_pin(prog, program, &cgroup, &config.cgroup, &staging)?;
            fs::rename(&staging, &path).map_err(|source| Error::Io {
                what: "replacing pinned link",
                path: path.clone(),
                source,
            })?;
            drop(link);
            info!(program, "replaced the pinned program of another build");
            replaced_links += 1;
            links.push(new_link);
        }

        info!(
            cgroup = %config.cgroup.display(),
            pin_dir = %config.pin_dir.display(),
            reused_links,
            replaced_links,
            replaced_maps = replaced_maps.len(),
            services = maps.services().map(|s| s.len()).unwrap_or(0),
            max_backends = config.max_backends,
            per_cpu_map_mib = config.per_cpu_map_bytes() / (1 << 20),
            "datapath ready"
        );
        Ok(Self {
            config: config.clone(),
            maps,
            links,
            reused_links,
            replaced_links,
            signals: Some(signals),
            _lock: lock,
        })
    }

    /// The connect-outcome counters and suspect marks, and the ring buffer of suspect events
    /// (see [`crate::signals`]); `None` after the first call (one owner each).
    pub fn take_signals(&mut self) -> Option<(KernelSignals, SuspectEvents)> {
        self.signals.take()
    }

    /// The capacity of the backends map pinned under `pin_dir` (what the datapath there was
    /// opened with), if one is pinned.
    pub fn pinned_max_backends(pin_dir: &Path) -> Result<Option<u32>, Error> {
        Ok(
            layout::pinned_spec(common::BACKENDS_MAP, &pin_dir.join(common::BACKENDS_MAP))?
                .map(|s| s.max_entries),
        )
    }

    /// Reads the services and counters pinned under `pin_dir` without attaching, locking or
    /// changing anything (safe while another process owns the datapath).
    pub fn inspect(pin_dir: &Path) -> Result<DatapathView, Error> {
        // Whatever backends capacity the running datapath was opened with.
        let max_backends =
            Self::pinned_max_backends(pin_dir)?.unwrap_or(common::DEFAULT_MAX_BACKENDS);
        if let Some((map, found)) = stale_pins(pin_dir, max_backends)?.into_iter().next() {
            let (_, want) = spec_of(map, max_backends);
            return Err(Error::MapLayout {
                map,
                reason: format!(
                    "pinned by a build with another layout ({found:?}; this build's is \
                     {want:?}): not read; opening the datapath with this build (`glb attach`) \
                     converts it"
                ),
            });
        }
        let open = |name: &'static str| -> Result<Map, Error> {
            let path = pin_dir.join(name);
            if !path.exists() {
                return Err(Error::MapLayout {
                    map: name,
                    reason: format!(
                        "not pinned at {} (no datapath there yet: attach first)",
                        path.display()
                    ),
                });
            }
            let data = MapData::from_pin(&path).map_err(|e| Error::MapLayout {
                map: name,
                reason: format!("opening the pin {}: {e}", path.display()),
            })?;
            Map::from_map_data(data).map_err(layout_err(name))
        };
        let store = AyaStore::from_maps(
            open(common::SERVICES_MAP)?,
            open(common::BACKENDS_MAP)?,
            open(common::COUNTERS_MAP)?,
        )?;
        Ok(DatapathView {
            maps: LbMaps::read_only(store)?,
        })
    }

    /// Detaches the programs attached through `pin_dir` and deletes its maps: connections made
    /// afterwards are no longer translated. Missing pins are skipped.
    pub fn remove(pin_dir: &Path) -> Result<(), Error> {
        for program in PROGRAMS.iter().rev() {
            remove_pin(&pin_dir.join(format!("link_{program}")))?;
        }
        for map in MAPS {
            remove_pin(&pin_dir.join(map))?;
        }
        match fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                what: "removing",
                path: pin_dir.into(),
                source,
            }),
        }
    }

    /// Where it is attached and pinned.
    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    /// How many pinned program links were kept as they were (all of [`PROGRAMS`] after a restart
    /// of the same build, 0 on a first start).
    pub fn reused_links(&self) -> usize {
        self.reused_links
    }

    /// How many pinned links held another build's program and were replaced by this build's.
    pub fn replaced_links(&self) -> usize {
        self.replaced_links
    }

    /// The kernel's run statistics of each attached program, in [`PROGRAMS`] order. The kernel
    /// counts only while statistics are enabled (see [`RunStats::enable`]); the figures are
    /// totals since the program was loaded.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, Error> {
        let ids: Vec<(&'static str, u32)> = PROGRAMS
            .iter()
            .zip(&self.links)
            .map(|(program, link)| {
                link.info()
                    .map(|info| (*program, info.program_id()))
                    .map_err(|e| Error::Link {
                        program,
                        path: self.config.pin_dir.join(format!("link_{program}")),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let mut out: Vec<ProgramStats> = ids
            .iter()
            .map(|(program, id)| ProgramStats {
                program,
                id: *id,
                run_count: 0,
                run_time_ns: 0,
            })
            .collect();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            if let Some(s) = out.iter_mut().find(|s| s.id == info.id()) {
                s.run_count = info.run_count();
                s.run_time_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            }
        }
        Ok(out)
    }
}

/// Run statistics of one attached program, from the kernel (`bpftool prog show` shows the same
/// `run_time_ns` and `run_cnt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// Program name, one of [`PROGRAMS`].
    pub program: &'static str,
    /// Kernel program id.
    pub id: u32,
    /// Runs counted while statistics were enabled.
    pub run_count: u64,
    /// Time spent in those runs, in nanoseconds.
    pub run_time_ns: u64,
}

/// The kernel's BPF run-time statistics (`run_time_ns`, `run_cnt`), on while this guard lives:
/// `BPF_ENABLE_STATS`, which leaves `kernel.bpf_stats_enabled` as it was and turns itself off
/// when the guard is dropped or the process dies.
#[derive(Debug)]
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    /// Turns statistics on (kernel 5.8 or later, root).
    pub fn enable() -> Result<Self, Error> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| Self { _fd: fd })
            .map_err(|e| Error::Io {
                what: "enabling BPF run-time statistics (BPF_ENABLE_STATS) for",
                path: "the bpf() syscall".into(),
                source: e.io_error,
            })
    }
}

impl ServiceMaps for Datapath {
    fn upsert_service(
        &mut self,
        frontend: &Frontend,
        backends: &[crate::Backend],
    ) -> Result<u32, Error> {
        self.maps.upsert_service(frontend, backends)
    }

    fn update_backends(
        &mut self,
        frontend: &Frontend,
        add: &[crate::Backend],
        remove: &[crate::Backend],
    ) -> Result<u32, Error> {
        self.maps.update_backends(frontend, add, remove)
    }

    fn delete_service(&mut self, frontend: &Frontend) -> Result<bool, Error> {
        self.maps.delete_service(frontend)
    }

    fn services(&self) -> Result<Vec<Service>, Error> {
        self.maps.services()
    }

    fn counters(&self) -> Result<Vec<BackendCounter>, Error> {
        self.maps.counters()
    }

    fn backend_entries(&self) -> Vec<BackendEntry> {
        self.maps.backend_entries()
    }

    fn backend_entry(&self, id: u32) -> Option<BackendEntry> {
        self.maps.backend_entry(id)
    }

    fn backend_room(&self) -> usize {
        self.maps.backend_room()
    }

    fn counter(&self, id: u32) -> Result<u64, Error> {
        self.maps.counter(id)
    }
}
