//! Tell the applications at once: terminate this node's sockets to a backend that failed.
//!
//! When a backend leaves the selection because it *failed* (a failing health verdict, a connect the
//! kernel saw fail and a probe confirmed, its cluster unreachable from this node), the client
//! sockets on this node still connected or connecting to it would otherwise wait for TCP's
//! timeouts (minutes for an idle connection, ~2 min for a connect) or, for connected UDP, forever.
//! node-sync asks the kernel to abort them: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`
//! (`CONFIG_INET_DIAG_DESTROY`), the same `tcp_abort`/`udp_abort` that `bpf_sock_destroy` calls
//! from a BPF socket iterator (the suggestion; aya 0.14 cannot load kfunc calls yet). The
//! application's next `recv`/`send` fails with `ECONNABORTED`, a pending `connect` with
//! `ECONNABORTED`, so it reconnects now, through the datapath, to a backend that works.
//!
//! Only sockets whose *remote* address is the failed backend are touched: the node's own server
//! sockets (a backend on this node) have it as their local address. Graceful removals
//! (terminating endpoints, scale-downs) never come here: established connections finish.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// TCP states that have (or are getting) a peer: everything but LISTEN and CLOSE.
const TCP_STATES: u32 = 0xffff & !(1 << 10) & !(1 << 7);
/// Connected UDP sockets are in TCP_ESTABLISHED.
const UDP_STATES: u32 = 1 << 1;

/// What [`destroy_sockets_to`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Destroyed {
    /// TCP sockets aborted.
    pub tcp: usize,
    /// Connected UDP sockets aborted.
    pub udp: usize,
}

/// The 48-byte `inet_diag_sockid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SockId {
    raw: [u8; 48],
}

impl SockId {
    fn dst(&self, family: u8) -> Option<SocketAddr> {
        let port = u16::from_be_bytes([self.raw[2], self.raw[3]]);
        let ip: IpAddr = if family == libc::AF_INET as u8 {
            let b: [u8; 4] = self.raw[20..24].try_into().ok()?;
            IpAddr::from(b)
        } else {
            let b: [u8; 16] = self.raw[20..36].try_into().ok()?;
            let v6 = std::net::Ipv6Addr::from(b);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        };
        Some(SocketAddr::new(ip, port))
    }
}

fn request(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    proto: u8,
    states: u32,
    id: &[u8; 48],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + 56);
    m.extend_from_slice(&(16u32 + 56).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, proto, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn netlink() -> io::Result<std::os::fd::OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, 0),
    )?;
    Ok(fd)
}

fn send(fd: &std::os::fd::OwnedFd, msg: &[u8]) -> io::Result<()> {
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(fd),
        msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    Ok(())
}

/// Every netlink message of the answer to request `seq`, until DONE (dump) or the first ACK/error
/// (single request): `(type, payload)`.
fn answers(fd: &std::os::fd::OwnedFd, dump: bool) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            &mut buf,
            MsgFlags::empty(),
        )?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < 16 || off + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            let payload = buf[off + 16..off + len].to_vec();
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(
                        payload
                            .get(0..4)
                            .and_then(|b| b.try_into().ok())
                            .unwrap_or_default(),
                    );
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    if !dump {
                        return Ok(out);
                    }
                }
                _ => out.push((kind, payload)),
            }
            off += (len + 3) & !3;
        }
        if !dump && n == 0 {
            return Ok(out);
        }
    }
}

/// Abort every TCP socket (connecting or connected) and connected UDP socket of this network
/// namespace whose remote address is one of `backends`. Needs `CAP_NET_ADMIN`.
pub fn destroy_sockets_to(backends: &[SocketAddr]) -> io::Result<Destroyed> {
    let wanted: HashSet<SocketAddr> = backends.iter().copied().collect();
    let mut done = Destroyed::default();
    if wanted.is_empty() {
        return Ok(done);
    }
    let fd = netlink()?;
    let mut seq = 1;
    for (proto, states) in [(IPPROTO_TCP, TCP_STATES), (IPPROTO_UDP, UDP_STATES)] {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            send(
                &fd,
                &request(
                    SOCK_DIAG_BY_FAMILY,
                    NLM_F_REQUEST | NLM_F_DUMP,
                    seq,
                    family,
                    proto,
                    states,
                    &[0; 48],
                ),
            )?;
            seq += 1;
            let victims: Vec<SockId> = answers(&fd, true)?
                .into_iter()
                .filter(|(kind, p)| *kind == SOCK_DIAG_BY_FAMILY && p.len() >= 52)
                .filter_map(|(_, p)| {
                    let id = SockId {
                        raw: p[4..52].try_into().ok()?,
                    };
                    id.dst(p[0]).filter(|d| wanted.contains(d)).map(|_| id)
                })
                .collect();
            for id in victims {
                send(
                    &fd,
                    &request(
                        SOCK_DESTROY,
                        NLM_F_REQUEST | NLM_F_ACK,
                        seq,
                        family,
                        proto,
                        states,
                        &id.raw,
                    ),
                )?;
                seq += 1;
                match answers(&fd, false) {
                    Ok(_) => {
                        if proto == IPPROTO_TCP {
                            done.tcp += 1;
                        } else {
                            done.udp += 1;
                        }
                    }
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;

    /// Real sockets in this test's network namespace (the host's loopback, addresses of its own):
    /// an established TCP connection and a connected UDP socket to the "backend", another TCP
    /// connection to a second address. Destroying the backend's sockets aborts exactly those two:
    /// the client's next recv/send fails at once; the other connection still works.
    #[test]
    fn sockets_to_the_failed_backend_are_aborted_and_others_left_alone() {
        let backend = TcpListener::bind("127.0.0.71:0").expect("bind");
        let other = TcpListener::bind("127.0.0.72:0").expect("bind");
        let (b_addr, o_addr) = (backend.local_addr().unwrap(), other.local_addr().unwrap());
        let mut c1 = TcpStream::connect(b_addr).unwrap();
        let (mut s1, _) = backend.accept().unwrap();
        let mut c2 = TcpStream::connect(o_addr).unwrap();
        let (mut s2, _) = other.accept().unwrap();
        let udp_server = UdpSocket::bind(b_addr).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(b_addr).unwrap();
        udp.send(b"x").unwrap();
        let mut b = [0u8; 8];
        udp_server.recv(&mut b).unwrap();

        let done = destroy_sockets_to(&[b_addr]).expect("SOCK_DESTROY (needs root)");
        assert_eq!(
            done,
            Destroyed { tcp: 1, udp: 1 },
            "the client's TCP and UDP sockets only"
        );

        c1.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let e = c1
            .read(&mut b)
            .expect_err("the aborted connection reports an error");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        udp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let e = udp
            .recv(&mut b)
            .expect_err("the aborted UDP socket reports an error");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        // The backend's own side (local address = backend) was not touched: it sees the reset.
        let _ = s1.read(&mut b);
        // The other connection works.
        c2.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(destroy_sockets_to(&[]).unwrap(), Destroyed::default());
    }
}
