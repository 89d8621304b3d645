//! The aya shell: load the programs, attach them to a cgroup, pin maps and links, and give the
//! maps to [`LbMaps`].
//!
//! Pin layout under the pin directory (on bpffs):
//! - `GLB_SERVICES`, `GLB_BACKENDS`, `GLB_FILTER`, `GLB_COUNTERS`, `GLB_SOCK_REV_NAT`,
//!   `GLB_SOCK_REV_NAT_UDP` (socket-local storage) and `GLB_REV_NAT` (the earlier layouts'
//!   reverse NAT, read only): the maps;
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

use aya::maps::{
    Array, HashMap as AyaHashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
    PerCpuValues,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramInfo, SockOps};
use aya::{Ebpf, EbpfLoader};
use global_lb_bpf_common::{self as common, ServiceKey, ServiceValue};
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

use crate::maps::{LbMaps, ServiceMaps};
use crate::mounts::{is_bpffs, is_cgroup2};
use crate::signals::{KernelSignals, SuspectEvents};
use crate::store::MapStore;
use crate::{BackendCounter, Error, Frontend, Service};

/// The compiled eBPF object (built by `build.rs`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/global-lb-bpf"));

/// The programs, in attach (and replace) order: the reverse translations first, so that during an
/// upgrade no socket translated by a new `connect`/`sendmsg` program meets an old
/// `getpeername`/`recvmsg` program that does not know where the new one keeps its state.
/// `sock_ops` (connect outcomes, suspect marks) comes before the connect programs so that every
/// socket they translate is followed.
pub const PROGRAMS: [&str; 9] = [
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
];

const MAPS: [&str; 11] = [
    common::OUTCOMES_MAP,
    common::SUSPECT_MAP,
    common::SUSPECT_GATE_MAP,
    common::EVENTS_MAP,
    common::SERVICES_MAP,
    common::BACKENDS_MAP,
    common::REV_NAT_MAP,
    common::SOCK_REV_NAT_MAP,
    common::SOCK_REV_NAT_UDP_MAP,
    common::COUNTERS_MAP,
    common::FILTER_MAP,
];

/// Where to attach and where to pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes (and descendants) are load-balanced.
    pub cgroup: PathBuf,
    /// Directory on bpffs for the pinned maps and links; one per cgroup.
    pub pin_dir: PathBuf,
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
        prepare_pin_dir(&config.pin_dir)?;
        let lock = lock_pin_dir(&config.pin_dir)?;

        // Pinned maps of another layout (an older build) are not reused as they are: the
        // programs would misread them. They are replaced by maps of this layout, the services
        // carried over, before this build's programs are attached.
        let stale = stale_pins(&config.pin_dir)?;
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
            let (_, want) = spec_of(name);
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
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| Error::Load {
            pin_dir: config.pin_dir.clone(),
            source: Box::new(source),
        })?;

        let maps = if replaced_maps.is_empty() {
            LbMaps::recover(AyaStore::take(&mut ebpf)?)?
        } else {
            replace_maps(&mut ebpf, &config.pin_dir, &replaced_maps, carried)?
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

    /// Reads the services and counters pinned under `pin_dir` without attaching, locking or
    /// changing anything (safe while another process owns the datapath).
    pub fn inspect(pin_dir: &Path) -> Result<DatapathView, Error> {
        if let Some((map, found)) = stale_pins(pin_dir)?.into_iter().next() {
            let (_, want) = spec_of(map);
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
        for program in PROGRAMS {
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

    /// How many pinned program links were kept as they were (8 after a restart of the same
    /// build, 0 on a first start).
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
}

fn prepare_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if !(is_bpffs(pin_dir) || is_bpffs(parent)) {
        return Err(Error::NotBpffs {
            path: pin_dir.into(),
        });
    }
    fs::create_dir_all(pin_dir).map_err(|source| Error::Io {
        what: "creating pin directory",
        path: pin_dir.into(),
        source,
    })
}

fn lock_pin_dir(pin_dir: &Path) -> Result<Flock<File>, Error> {
    let dir = File::open(pin_dir).map_err(|source| Error::Io {
        what: "opening pin directory",
        path: pin_dir.into(),
        source,
    })?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::Busy {
                pin_dir: pin_dir.into(),
            }
        } else {
            Error::Io {
                what: "locking pin directory",
                path: pin_dir.into(),
                source: errno.into(),
            }
        }
    })
}

fn remove_pin(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: "unpinning",
            path: path.into(),
            source,
        }),
    }
}

/// Loads `program` into the kernel (the verifier's complaint, if any, names it).
/// A loaded program of either kind this datapath attaches to a cgroup.
enum Loaded<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    SockOps(&'a mut SockOps),
}

impl Loaded<'_> {
    fn info(&self) -> Result<ProgramInfo, ProgramError> {
        match self {
            Loaded::SockAddr(p) => p.info(),
            Loaded::SockOps(p) => p.info(),
        }
    }
}

fn load_program<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<Loaded<'a>, Error> {
    let refused = |source: ProgramError| Error::ProgramRefused {
        program,
        source: Box::new(source),
    };
    let prog = ebpf.program_mut(program).ok_or_else(|| Error::MapLayout {
        map: "(program)",
        reason: format!("program {program} is missing from the eBPF object"),
    })?;
    if program == "sock_ops" {
        let prog: &mut SockOps = prog.try_into().map_err(refused)?;
        prog.load().map_err(refused)?;
        Ok(Loaded::SockOps(prog))
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into().map_err(refused)?;
        prog.load().map_err(refused)?;
        Ok(Loaded::SockAddr(prog))
    }
}

/// The tag (hash of the instructions) of the loaded program with this id.
/// The tag and the (sorted) map ids of the loaded program `id`.
fn program_identity(id: u32) -> Option<(u64, Vec<u32>)> {
    let p = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)?;
    let mut maps = p.map_ids().ok().flatten()?;
    maps.sort_unstable();
    Some((p.tag(), maps))
}

/// Attaches a loaded program to the cgroup through a BPF link and pins the link at `path`.
fn attach_and_pin(
    prog: Loaded<'_>,
    program: &'static str,
    cgroup: &File,
    cgroup_path: &Path,
    path: &Path,
) -> Result<FdLink, Error> {
    let attach_err = |source: ProgramError| Error::Attach {
        program,
        cgroup: cgroup_path.into(),
        source: Box::new(source),
    };
    let link_err = |e: aya::programs::links::LinkError| Error::Link {
        program,
        path: path.into(),
        reason: e.to_string(),
    };
    // Cgroup links always allow several programs; link_create wants no attach flags.
    let link = match prog {
        Loaded::SockAddr(prog) => {
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            FdLink::try_from(prog.take_link(id).map_err(attach_err)?).map_err(link_err)?
        }
        Loaded::SockOps(prog) => {
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            FdLink::try_from(prog.take_link(id).map_err(attach_err)?).map_err(link_err)?
        }
    };
    let pinned = link.pin(path).map_err(|e| Error::Link {
        program,
        path: path.into(),
        reason: e.to_string(),
    })?;
    debug!(program, path = %path.display(), "program attached and link pinned");
    Ok(pinned.into())
}

/// Pins `map` at `pin_dir/name` in place of what is pinned there (staged, then renamed over).
fn pin_over(pin_dir: &Path, name: &'static str, map: &MapData) -> Result<(), Error> {
    let path = pin_dir.join(name);
    let staging = pin_dir.join(format!("{name}_new"));
    remove_pin(&staging)?;
    map.pin(&staging).map_err(|e| Error::MapLayout {
        map: name,
        reason: format!("pinning at {}: {e}", staging.display()),
    })?;
    fs::rename(&staging, &path).map_err(|source| Error::Io {
        what: "replacing pinned map",
        path: path.clone(),
        source,
    })?;
    info!(map = name, path = %path.display(), "pinned map replaced by this layout's");
    Ok(())
}

/// The maps of [`crate::signals`].
const SIGNAL_MAPS: [&str; 4] = [
    common::OUTCOMES_MAP,
    common::SUSPECT_MAP,
    common::SUSPECT_GATE_MAP,
    common::EVENTS_MAP,
];

/// Takes the signal maps out of the object; a replaced one (another layout was pinned) is pinned
/// over the old pin.
fn take_signals(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    replaced: &[&'static str],
) -> Result<(KernelSignals, SuspectEvents), Error> {
    let mut take = |name: &'static str| -> Result<Map, Error> {
        let map = take_map(ebpf, name)?;
        if replaced.contains(&name) {
            pin_over(pin_dir, name, map_data(&map))?;
        }
        Ok(map)
    };
    let outcomes = PerCpuArray::try_from(take(common::OUTCOMES_MAP)?)
        .map_err(layout_err(common::OUTCOMES_MAP))?;
    let suspect = AyaHashMap::try_from(take(common::SUSPECT_MAP)?)
        .map_err(layout_err(common::SUSPECT_MAP))?;
    let gate = Array::try_from(take(common::SUSPECT_GATE_MAP)?)
        .map_err(layout_err(common::SUSPECT_GATE_MAP))?;
    let ring = aya::maps::RingBuf::try_from(take(common::EVENTS_MAP)?)
        .map_err(layout_err(common::EVENTS_MAP))?;
    Ok((
        KernelSignals::new(outcomes, suspect, gate),
        SuspectEvents::new(ring),
    ))
}

// ---- map layouts ----

/// This build's shape of map `name`.
fn spec_of(name: &str) -> (&'static str, common::MapSpec) {
    common::MAP_SPECS
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .expect("every map has a spec")
}

/// The shape of the map pinned at `path`, if one is.
fn pinned_spec(name: &'static str, path: &Path) -> Result<Option<common::MapSpec>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| Error::MapLayout {
        map: name,
        reason: format!("reading the pin {}: {e}", path.display()),
    })?;
    Ok(Some(common::MapSpec {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// Whether a map pinned with shape `found` is what this build's programs expect of map `name`.
/// The legacy reverse-NAT LRU is read only, at whatever capacity it was made with.
fn same_shape(name: &str, found: &common::MapSpec, want: &common::MapSpec) -> bool {
    if name == common::REV_NAT_MAP {
        return common::MapSpec {
            max_entries: want.max_entries,
            ..*found
        } == *want;
    }
    found == want
}

/// Pinned maps whose shape differs from this build's, with the shape found.
fn stale_pins(pin_dir: &Path) -> Result<Vec<(&'static str, common::MapSpec)>, Error> {
    let mut out = Vec::new();
    for (name, want) in common::MAP_SPECS {
        if let Some(found) = pinned_spec(name, &pin_dir.join(name))?
            && !same_shape(name, &found, &want)
        {
            out.push((name, found));
        }
    }
    Ok(out)
}

/// The services held by the services and backends maps pinned under `pin_dir`, read in the
/// layout they were written in (the first layout, 16-byte slot values, or this one). A layout
/// this build does not know carries nothing over (and says so): the caller writes its services
/// again. A known layout that cannot be read is an error: nothing is replaced, the old maps and
/// programs keep serving, and the next start tries again.
fn carry_services(
    pin_dir: &Path,
    stale: &[(&'static str, common::MapSpec)],
) -> Result<Vec<Service>, Error> {
    let value_size = stale
        .iter()
        .find(|(n, _)| *n == common::SERVICES_MAP)
        .map_or(std::mem::size_of::<ServiceValue>(), |(_, s)| {
            s.value_size as usize
        });
    let known = value_size == std::mem::size_of::<common::ServiceValueV1>()
        || value_size == std::mem::size_of::<ServiceValue>();
    match read_pinned_services(pin_dir, stale) {
        Ok(services) => {
            info!(
                services = services.len(),
                "carrying the services over to the maps of this layout"
            );
            Ok(services)
        }
        Err(e) if known => Err(e),
        Err(e) => {
            warn!(
                error = %e,
                value_size,
                "the pinned services map has a layout this build does not know; starting with \
                 empty maps (services must be written again)"
            );
            Ok(Vec::new())
        }
    }
}

fn read_pinned_services(
    pin_dir: &Path,
    stale: &[(&'static str, common::MapSpec)],
) -> Result<Vec<Service>, Error> {
    let open = |name: &'static str| -> Result<Option<MapData>, Error> {
        let path = pin_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        MapData::from_pin(&path)
            .map(Some)
            .map_err(|e| Error::MapLayout {
                map: name,
                reason: format!("opening the pin {}: {e}", path.display()),
            })
    };
    let found = |name: &str| {
        stale
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(spec_of(name).1, |(_, s)| *s)
    };
    let (Some(services), Some(backends)) =
        (open(common::SERVICES_MAP)?, open(common::BACKENDS_MAP)?)
    else {
        return Ok(Vec::new());
    };
    let mut mem = crate::store::MemStore::new();
    let backends = AyaHashMap::<_, u32, common::Backend>::try_from(Map::HashMap(backends))
        .map_err(layout_err(common::BACKENDS_MAP))?;
    for entry in backends.iter() {
        let (id, value) = entry.map_err(map_err(common::BACKENDS_MAP, "iterate"))?;
        mem.backends.insert(id, value);
    }
    let services_spec = found(common::SERVICES_MAP);
    if services_spec.value_size as usize == std::mem::size_of::<common::ServiceValueV1>() {
        let services =
            AyaHashMap::<_, ServiceKey, common::ServiceValueV1>::try_from(Map::HashMap(services))
                .map_err(layout_err(common::SERVICES_MAP))?;
        let mut heads = Vec::new();
        for entry in services.iter() {
            let (key, old) = entry.map_err(map_err(common::SERVICES_MAP, "iterate"))?;
            let mut value = ServiceValue {
                backend_id: old.backend_id,
                count: old.count,
                service_id: old.service_id,
                ..ServiceValue::default()
            };
            if let Some(b) = mem.backends.get(&old.backend_id) {
                (value.addr, value.port, value.family) = (b.addr, b.port, b.family);
            }
            if key.slot == 0 {
                heads.push(key);
            }
            mem.slots.insert(key, value);
        }
        // The first layout's slot 0 carried no backend; this one carries slot 1's.
        for key in heads {
            let mut one = key;
            one.slot = 1;
            if let Some(first) = mem.slots.get(&one).copied()
                && let Some(head) = mem.slots.get_mut(&key)
            {
                (head.backend_id, head.addr, head.port, head.family) =
                    (first.backend_id, first.addr, first.port, first.family);
            }
        }
    } else {
        let services = AyaHashMap::<_, ServiceKey, ServiceValue>::try_from(Map::HashMap(services))
            .map_err(layout_err(common::SERVICES_MAP))?;
        for entry in services.iter() {
            let (key, value) = entry.map_err(map_err(common::SERVICES_MAP, "iterate"))?;
            mem.slots.insert(key, value);
        }
    }
    LbMaps::read_only(mem)?.services()
}

/// Replaces the pinned maps `replaced` (created unpinned by the loader) : writes the `carried`
/// services into the new services and backends maps, then pins each new map next to the old
/// one and renames it over the old pin. Programs still attached keep the old maps until their
/// links are replaced.
fn replace_maps(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    replaced: &[&'static str],
    carried: Option<Vec<Service>>,
) -> Result<LbMaps<AyaStore>, Error> {
    let mut taken: Vec<(&'static str, Map)> = Vec::new();
    for name in replaced {
        if *name != common::SERVICES_MAP
            && *name != common::BACKENDS_MAP
            && *name != common::COUNTERS_MAP
            && *name != common::FILTER_MAP
            && !SIGNAL_MAPS.contains(name)
        {
            taken.push((name, take_map(ebpf, name)?));
        }
    }
    let store = AyaStore::take(ebpf)?;
    let mut maps = if carried.is_some() {
        // New, empty services and backends maps (counters are reused or new: zeroed per new
        // backend id either way).
        let mut maps = LbMaps::with_empty_store(store);
        for service in carried.unwrap_or_default() {
            maps.upsert_service(&service.frontend, &service.backends)?;
        }
        maps
    } else {
        LbMaps::recover(store)?
    };
    let pin = |name: &'static str, map: &MapData| pin_over(pin_dir, name, map);
    for (name, map) in &taken {
        pin(name, map_data(map))?;
    }
    let store = maps.store_mut();
    for name in replaced {
        match *name {
            common::SERVICES_MAP => pin(name, store.services.map())?,
            common::BACKENDS_MAP => pin(name, store.backends.map())?,
            common::COUNTERS_MAP => pin(name, store.counters.map())?,
            common::FILTER_MAP => {
                if let Some(filter) = &store.filter {
                    pin(name, filter.map())?;
                }
            }
            _ => {}
        }
    }
    Ok(maps)
}

/// The map data under any kind of map this crate uses.
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::Array(m)
        | Map::SkStorage(m) => m,
        other => unreachable!("no map of this crate is a {other:?}"),
    }
}

// ---- the aya map store ----

/// [`MapStore`] over the kernel maps.
pub struct AyaStore {
    services: AyaHashMap<MapData, ServiceKey, ServiceValue>,
    backends: AyaHashMap<MapData, u32, common::Backend>,
    counters: PerCpuArray<MapData, u64>,
    /// The pre-filter; absent in a read-only view.
    filter: Option<Array<MapData, u64>>,
    nr_cpus: usize,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name).ok_or_else(|| Error::MapLayout {
        map: name,
        reason: "missing from the eBPF object".into(),
    })
}

fn layout_err(map: &'static str) -> impl Fn(MapError) -> Error {
    move |e| Error::MapLayout {
        map,
        reason: format!(
            "{e} (pinned by an incompatible version? remove the pin directory to start afresh)"
        ),
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl Fn(MapError) -> Error {
    move |e| {
        if let MapError::SyscallError(s) = &e
            && s.io_error.raw_os_error() == Some(libc::E2BIG)
        {
            return Error::MapFull {
                map,
                capacity: match map {
                    common::SERVICES_MAP => common::MAX_SERVICE_ENTRIES,
                    common::BACKENDS_MAP => common::MAX_BACKENDS,
                    _ => 0,
                },
            };
        }
        Error::Map {
            map,
            op,
            source: Box::new(e),
        }
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl AyaStore {
    fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut store = Self::from_maps(
            take_map(ebpf, common::SERVICES_MAP)?,
            take_map(ebpf, common::BACKENDS_MAP)?,
            take_map(ebpf, common::COUNTERS_MAP)?,
        )?;
        store.filter = Some(
            Array::try_from(take_map(ebpf, common::FILTER_MAP)?)
                .map_err(layout_err(common::FILTER_MAP))?,
        );
        Ok(store)
    }

    fn from_maps(services: Map, backends: Map, counters: Map) -> Result<Self, Error> {
        let services = AyaHashMap::try_from(services).map_err(layout_err(common::SERVICES_MAP))?;
        let backends = AyaHashMap::try_from(backends).map_err(layout_err(common::BACKENDS_MAP))?;
        let counters = PerCpuArray::try_from(counters).map_err(layout_err(common::COUNTERS_MAP))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| Error::Io {
            what: "reading",
            path: what.into(),
            source: e,
        })?;
        Ok(Self {
            services,
            backends,
            counters,
            filter: None,
            nr_cpus,
        })
    }
}

impl MapStore for AyaStore {
    fn put_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(common::SERVICES_MAP, "insert"))
    }

    fn delete_slot(&mut self, key: &ServiceKey) -> Result<(), Error> {
        match self.services.remove(key) {
            Err(e) if !is_not_found(&e) => Err(map_err(common::SERVICES_MAP, "remove")(e)),
            _ => Ok(()),
        }
    }

    fn put_backend(&mut self, id: u32, value: &common::Backend) -> Result<(), Error> {
        self.backends
            .insert(id, value, 0)
            .map_err(map_err(common::BACKENDS_MAP, "insert"))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), Error> {
        match self.backends.remove(&id) {
            Err(e) if !is_not_found(&e) => Err(map_err(common::BACKENDS_MAP, "remove")(e)),
            _ => Ok(()),
        }
    }

    fn reset_counter(&mut self, id: u32) -> Result<(), Error> {
        let zeros =
            PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(|source| Error::Io {
                what: "sizing per-CPU values for",
                path: common::COUNTERS_MAP.into(),
                source,
            })?;
        self.counters
            .set(id, zeros, 0)
            .map_err(map_err(common::COUNTERS_MAP, "reset"))
    }

    fn counter(&self, id: u32) -> Result<u64, Error> {
        let values = self
            .counters
            .get(&id, 0)
            .map_err(map_err(common::COUNTERS_MAP, "read"))?;
        Ok(values.iter().sum())
    }

    fn slots(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        let mut out = Vec::new();
        for entry in self.services.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(common::SERVICES_MAP, "iterate")(e)),
            }
        }
        Ok(out)
    }

    fn backends(&self) -> Result<Vec<(u32, common::Backend)>, Error> {
        let mut out = Vec::new();
        for entry in self.backends.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(common::BACKENDS_MAP, "iterate")(e)),
            }
        }
        Ok(out)
    }
    fn put_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        let filter = self.filter.as_mut().ok_or_else(|| Error::MapLayout {
            map: common::FILTER_MAP,
            reason: "not opened for writing (read-only view)".into(),
        })?;
        filter
            .set(index, word, 0)
            .map_err(map_err(common::FILTER_MAP, "update"))
    }

    fn filter(&self) -> Result<Vec<u64>, Error> {
        let Some(filter) = &self.filter else {
            return Ok(vec![0; common::FILTER_WORDS as usize]);
        };
        (0..common::FILTER_WORDS)
            .map(|i| {
                filter
                    .get(&i, 0)
                    .map_err(map_err(common::FILTER_MAP, "read"))
            })
            .collect()
    }
}
