//! Unix socket table from the kernel over `NETLINK_SOCK_DIAG` (what `ss -x` shows): each
//! socket's inode, type, state, bound name and peer inode.
//!
//! The request and the replies are built and read byte by byte (native endian, as netlink is);
//! every length is checked against the buffer before use.
//!
//! The kernel answers for the network namespace the netlink socket was created in. To see a
//! container's sockets, [`dump_in`] creates the socket on a short-lived thread that first
//! joins the container's namespace (`setns`, which needs `CAP_SYS_ADMIN`); the socket keeps
//! that namespace, so the dump itself runs here, and no thread of the daemon stays moved.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use serde::Serialize;

/// `NETLINK_SOCK_DIAG` (`linux/netlink.h`).
pub const NETLINK_SOCK_DIAG: i32 = 4;
/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLM_F_REQUEST | NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_REQUEST_DUMP: u16 = 0x0001 | 0x0100 | 0x0200;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `UDIAG_SHOW_NAME` (`linux/unix_diag.h`).
pub const UDIAG_SHOW_NAME: u32 = 0x1;
/// `UDIAG_SHOW_PEER`.
pub const UDIAG_SHOW_PEER: u32 = 0x4;
/// Attribute `UNIX_DIAG_NAME`: the bound address (`sun_path` bytes, abstract ones start with
/// a NUL).
pub const UNIX_DIAG_NAME: u16 = 0;
/// Attribute `UNIX_DIAG_PEER`: the peer's inode (u32).
pub const UNIX_DIAG_PEER: u16 = 2;
/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct unix_diag_req)`.
pub const UNIX_DIAG_REQ_LEN: usize = 24;
/// `sizeof(struct unix_diag_msg)`.
pub const UNIX_DIAG_MSG_LEN: usize = 16;
/// Socket types.
pub const SOCK_STREAM: u8 = 1;
pub const SOCK_DGRAM: u8 = 2;
pub const SOCK_SEQPACKET: u8 = 5;

/// Receive buffer: the kernel caps a dump message batch at about 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Give up on a dump larger than this many sockets.
const MAX_SOCKETS: usize = 4_000_000;
/// Sequence number of our one request.
const SEQ: u32 = 0x7472_6163;

/// One Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnixSocket {
    pub inode: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: u8,
    /// TCP-like state (1 established, 10 listen).
    pub state: u8,
    /// The other end's inode, for a connected socket.
    pub peer: Option<u64>,
    /// The bound name: a path, or `@…` for an abstract name.
    pub name: Option<String>,
}

impl UnixSocket {
    /// Stream or seqpacket (connection-oriented, so the peer is a conversation partner).
    pub fn is_stream(&self) -> bool {
        self.kind == SOCK_STREAM || self.kind == SOCK_SEQPACKET
    }
}

/// Errors from the dump.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag: kernel answered {0}")]
    Kernel(io::Error),
    #[error("sock_diag: malformed reply: {0}")]
    Malformed(&'static str),
    #[error("sock_diag: a reply of {0} bytes does not fit the receive buffer")]
    Truncated(usize),
    #[error("sock_diag: more than {MAX_SOCKETS} sockets")]
    TooMany,
    /// Joining another network namespace failed (`EPERM`: the daemon lacks `CAP_SYS_ADMIN`).
    #[error("joining network namespace {ns}: {source}")]
    Setns {
        ns: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> DiagError {
    DiagError::Io {
        op,
        source: io::Error::last_os_error(),
    }
}

/// The request: `nlmsghdr` + `unix_diag_req` for every state, with names and peers.
pub fn request() -> Vec<u8> {
    let len = (NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_ne_bytes()); // nlmsg_len
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    b.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes()); // nlmsg_flags
    b.extend_from_slice(&SEQ.to_ne_bytes()); // nlmsg_seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    b.push(libc::AF_UNIX as u8); // sdiag_family
    b.push(0); // sdiag_protocol
    b.extend_from_slice(&0u16.to_ne_bytes()); // pad
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    b.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    b.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes()); // udiag_show
    b.extend_from_slice(&[0u8; 8]); // udiag_cookie
    b
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn decode_name(raw: &[u8]) -> String {
    // Abstract: leading NUL, the rest is the name (may contain NULs; shown as is).
    if let Some((0, rest)) = raw.split_first() {
        return format!("@{}", String::from_utf8_lossy(rest));
    }
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Parses one `unix_diag_msg` with its attributes.
pub fn parse_message(payload: &[u8]) -> Result<UnixSocket, DiagError> {
    if payload.len() < UNIX_DIAG_MSG_LEN {
        return Err(DiagError::Malformed("short unix_diag_msg"));
    }
    let inode = u32_at(payload, 4).ok_or(DiagError::Malformed("inode"))?;
    let mut sock = UnixSocket {
        inode: u64::from(inode),
        kind: payload[1],
        state: payload[2],
        peer: None,
        name: None,
    };
    let mut off = UNIX_DIAG_MSG_LEN;
    while off + 4 <= payload.len() {
        let len = usize::from(u16_at(payload, off).ok_or(DiagError::Malformed("rtattr"))?);
        let kind = u16_at(payload, off + 2).ok_or(DiagError::Malformed("rtattr"))?;
        if len < 4 || off + len > payload.len() {
            return Err(DiagError::Malformed("rtattr length"));
        }
        let data = &payload[off + 4..off + len];
        match kind {
            UNIX_DIAG_NAME if !data.is_empty() => sock.name = Some(decode_name(data)),
            UNIX_DIAG_PEER => {
                let peer = u32_at(data, 0).ok_or(DiagError::Malformed("peer attribute"))?;
                if peer != 0 {
                    sock.peer = Some(u64::from(peer));
                }
            }
            _ => {}
        }
        off += align4(len);
    }
    Ok(sock)
}

/// Parses one datagram of the dump into `out`. Returns whether the dump is done.
pub fn parse_batch(buf: &[u8], out: &mut Vec<UnixSocket>) -> Result<bool, DiagError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off).ok_or(DiagError::Malformed("nlmsghdr"))? as usize;
        let kind = u16_at(buf, off + 4).ok_or(DiagError::Malformed("nlmsghdr"))?;
        let seq = u32_at(buf, off + 8).ok_or(DiagError::Malformed("nlmsghdr"))?;
        if len < NLMSG_HDRLEN || len > buf.len() - off {
            return Err(DiagError::Malformed("nlmsg_len"));
        }
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        off += align4(len);
        if seq != SEQ {
            continue;
        }
        match kind {
            NLMSG_DONE => {
                // A dump's DONE carries an int; negative is an error of the dump.
                if let Some(code) = u32_at(payload, 0).map(|c| c as i32)
                    && code < 0
                {
                    return Err(DiagError::Kernel(io::Error::from_raw_os_error(-code)));
                }
                return Ok(true);
            }
            NLMSG_ERROR => {
                let code = u32_at(payload, 0).ok_or(DiagError::Malformed("nlmsgerr"))? as i32;
                if code != 0 {
                    return Err(DiagError::Kernel(io::Error::from_raw_os_error(
                        code.saturating_neg(),
                    )));
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if out.len() >= MAX_SOCKETS {
                    return Err(DiagError::TooMany);
                }
                out.push(parse_message(payload)?);
            }
            _ => {}
        }
    }
    Ok(false)
}

/// Dumps every Unix socket of the caller's network namespace. Best effort: a dump the
/// kernel marks inconsistent (`NLM_F_DUMP_INTR`, sockets changed meanwhile) is taken as is.
pub fn dump() -> Result<Vec<UnixSocket>, DiagError> {
    dump_on(&diag_socket()?)
}

/// Dumps every Unix socket of the network namespace `ns` names (`/proc/<pid>/ns/net`).
pub fn dump_in(ns: &Path) -> Result<Vec<UnixSocket>, DiagError> {
    let setns = |source| DiagError::Setns {
        ns: ns.display().to_string(),
        source,
    };
    let file = std::fs::File::open(ns).map_err(setns)?;
    // The namespace change is the thread's own and ends with it.
    let fd = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns with a namespace fd that lives for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(setns(io::Error::last_os_error()));
            }
            diag_socket()
        })
        .join()
        .unwrap_or_else(|_| Err(DiagError::Malformed("the namespace thread panicked")))
    })?;
    dump_on(&fd)
}

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace.
fn diag_socket() -> Result<OwnedFd, DiagError> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io_err("socket"));
    }
    // SAFETY: `raw` is a valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn dump_on(fd: &OwnedFd) -> Result<Vec<UnixSocket>, DiagError> {
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: the option value points to a live timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io_err("setsockopt"));
    }
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0: the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    let req = request();
    // SAFETY: buffer and address are live for the call, with their true lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io_err("sendto"));
    }
    if sent as usize != req.len() {
        return Err(DiagError::Malformed("short send"));
    }
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::new();
    loop {
        // SAFETY: `buf` is live and writable for its length. MSG_TRUNC makes the call return
        // the datagram's real length, so a truncation is seen.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DiagError::Io {
                op: "recv",
                source: e,
            });
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(DiagError::Truncated(n));
        }
        if n == 0 {
            return Err(DiagError::Malformed("empty reply"));
        }
        if parse_batch(&buf[..n], &mut out)? {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests;
