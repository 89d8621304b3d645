//! Loading and pinning: the pin directory (on bpffs, locked while a [`Datapath`](super::Datapath)
//! owns it), each program loaded and attached to the cgroup through a BPF link pinned as
//! `link_<program>`, and a map pinned over another layout's pin without a gap (staged next to
//! it, then renamed over).

use std::fs::{self, File};
use std::path::Path;

use aya::Ebpf;
use aya::maps::MapData;
use aya::programs::links::FdLink;
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramInfo, SockOps,
};
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info};

use crate::Error;
use crate::mounts::is_bpffs;

pub(super) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), Error> {
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

pub(super) fn lock_pin_dir(pin_dir: &Path) -> Result<Flock<File>, Error> {
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

pub(super) fn remove_pin(path: &Path) -> Result<(), Error> {
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

/// A loaded program of either kind this datapath attaches to a cgroup.
pub(super) enum Loaded<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    SockOps(&'a mut SockOps),
    Sock(&'a mut CgroupSock),
}

impl Loaded<'_> {
    pub(super) fn info(&self) -> Result<ProgramInfo, ProgramError> {
        match self {
            Loaded::SockAddr(p) => p.info(),
            Loaded::SockOps(p) => p.info(),
            Loaded::Sock(p) => p.info(),
        }
    }
}

/// Loads `program` into the kernel (the verifier's complaint, if any, names it).
pub(super) fn load_program<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<Loaded<'a>, Error> {
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
    } else if program == "sock_release" {
        let prog: &mut CgroupSock = prog.try_into().map_err(refused)?;
        prog.load().map_err(refused)?;
        Ok(Loaded::Sock(prog))
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into().map_err(refused)?;
        prog.load().map_err(refused)?;
        Ok(Loaded::SockAddr(prog))
    }
}

/// The tag (hash of the instructions) and the (sorted) map ids of the loaded program `id`.
pub(super) fn program_identity(id: u32) -> Option<(u64, Vec<u32>)> {
    let p = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)?;
    let mut maps = p.map_ids().ok().flatten()?;
    maps.sort_unstable();
    Some((p.tag(), maps))
}

/// Attaches a loaded program to the cgroup through a BPF link and pins the link at `path`.
pub(super) fn attach_and_pin(
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
        Loaded::Sock(prog) => {
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
pub(super) fn pin_over(pin_dir: &Path, name: &'static str, map: &MapData) -> Result<(), Error> {
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
