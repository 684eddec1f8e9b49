//! Sockets of targets: creation (its type), accept/connect, duplicated fds, and the
//! read/write family (payload copied out by `capture.rs`).

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid, macros::tracepoint,
    programs::TracePointContext,
};
use tracer_ebpf::abi::{
    CONFIG_IPC, ConnEvent, ConnState, DATA_FLAG_EOF, DATA_FLAG_IPC, DataHead, FdKey, Kind,
    ROLE_CLIENT, ROLE_IPC, ROLE_SERVER, ROLE_UNIX_UNDECIDED, Stash, Stat, Syscall,
};

use super::{
    CONNS, SOCK_TYPES, arg, bump, capture::emit_data, current_target, emit, fd_key, header,
    insert_conn, may_be_traced, read_user, ret, stash, stash_entry, take,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
const SOCK_DGRAM: u32 = 2;
/// `SOCK_NONBLOCK | SOCK_CLOEXEC` share the type argument with the type itself.
const SOCK_TYPE_MASK: u32 = 0xf;
/// `SOCK_TYPES` values: the type in the low 16 bits, the address family above.
const SOCK_FAMILY_SHIFT: u32 = 16;

// ---------------------------------------------------------------------------------------------
// Connections

#[inline(always)]
fn conn_enter(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    // accept(fd, upeer_sockaddr, upeer_addrlen) / connect(fd, uservaddr, addrlen)
    stash(
        id,
        &stash_entry(arg(ctx, 0), arg(ctx, 1), arg(ctx, 2), 0, syscall),
    );
    0
}

#[inline(always)]
fn conn_exit(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let rv = ret(ctx);
    let entry = match take(id, syscall) {
        Some(e) => e,
        // Entered before the probes were attached (a server idle in a blocking accept): the
        // new fd is known, its listener and peer address are not.
        None if syscall != Syscall::Connect && rv >= 0 && current_target().is_some() => {
            bump(Stat::AcceptEntryUnseen as u32);
            stash_entry(u64::MAX, 0, 0, 0, syscall)
        }
        None => return 0,
    };
    // The socket (connect) or listener (accept), if it was created while attached; 0 when
    // unknown (a plain integer: an `Option` here spills an uninitialised register, which the
    // verifier rejects).
    // SAFETY: copied out immediately.
    let sock: u32 = unsafe { SOCK_TYPES.get(fd_key(id, entry.fd)) }
        .copied()
        .unwrap_or(0);
    let (fd, listen_fd, mut role) = if syscall == Syscall::Connect {
        if rv != 0 && rv != -EINPROGRESS {
            return 0;
        }
        if sock & SOCK_TYPE_MASK == SOCK_DGRAM {
            // A connected datagram socket (a resolver, a logger): not a connection.
            return 0;
        }
        (entry.fd as i32, -1, ROLE_CLIENT)
    } else {
        if rv < 0 {
            return 0;
        }
        (rv as i32, entry.fd as i32, ROLE_SERVER)
    };

    let mut ev = ConnEvent {
        hdr: header(Kind::Conn, id, 0),
        conn_id: 0,
        fd,
        listen_fd,
        family: 0,
        port: 0,
        syscall: syscall as u8,
        pad: [0; 3],
        addr: [0; 16],
    };
    if entry.ptr != 0 {
        ev.family = read_user::<u16>(entry.ptr).unwrap_or(0);
        let port = read_user::<u16>(entry.ptr + 2).unwrap_or(0);
        match ev.family {
            AF_INET => {
                ev.port = u16::from_be(port);
                if let Some(a) = read_user::<[u8; 4]>(entry.ptr + 4) {
                    ev.addr[..4].copy_from_slice(&a);
                }
            }
            AF_INET6 => {
                ev.port = u16::from_be(port);
                if let Some(a) = read_user::<[u8; 16]>(entry.ptr + 8) {
                    ev.addr = a;
                }
            }
            AF_UNIX | 0 => {}
            // Netlink, packet, vsock...: not HTTP.
            _ => return 0,
        }
    }
    if ev.family == 0 {
        // No address buffer: the family the socket (or listener) was created with, if seen.
        ev.family = (sock >> SOCK_FAMILY_SHIFT) as u16;
    }
    if ev.family == AF_UNIX {
        // Unix sockets are IPC peers, or a proxy's HTTP hop to its engine: followed when asked
        // (their first bytes tell which), else only reported.
        if config!(flags) & CONFIG_IPC == 0 {
            emit(Kind::Conn, &ev);
            return 0;
        }
        role = ROLE_UNIX_UNDECIDED;
    }
    // The connection generation: monotonic time is unique per (tgid, fd) lifetime.
    ev.conn_id = ev.hdr.ts_ns;
    let key = fd_key(id, i64::from(fd));
    let state = ConnState {
        conn_id: ev.conn_id,
        family: ev.family,
        role,
        pad: [0; 5],
    };
    insert_conn(key, state);
    emit(Kind::Conn, &ev);
    0
}

#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    // socket(family, type, protocol): keep the type for the exit.
    stash(
        id,
        &stash_entry(0, arg(&ctx, 0), arg(&ctx, 1), 0, Syscall::Socket),
    );
    0
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = take(id, Syscall::Socket) else {
        return 0;
    };
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let key = fd_key(id, fd);
    let kind = (entry.arg as u32 & SOCK_TYPE_MASK) | ((entry.ptr as u32) << SOCK_FAMILY_SHIFT);
    let _ = SOCK_TYPES.insert(key, kind, u64::from(BPF_ANY));
    0
}

// ---------------------------------------------------------------------------------------------
// Duplicated connection fds (Rust's try_clone is fcntl(F_DUPFD_CLOEXEC); servers dup too)

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

#[inline(always)]
fn dup_enter(ctx: &TracePointContext, is_fcntl: bool) -> u32 {
    if is_fcntl {
        let cmd = arg(ctx, 1);
        if cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC {
            return 0;
        }
    }
    let id = bpf_get_current_pid_tgid();
    if !may_be_traced((id >> 32) as u32) {
        return 0;
    }
    let fd = arg(ctx, 0);
    let key = fd_key(id, fd as i64);
    // SAFETY: copied out immediately.
    let Some(conn_id) = (unsafe { CONNS.get(key) }).map(|c| c.conn_id) else {
        return 0;
    };
    stash(id, &stash_entry(fd, 0, 0, conn_id, Syscall::Dup));
    0
}

#[inline(always)]
fn dup_exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = take(id, Syscall::Dup) else {
        return 0;
    };
    let newfd = ret(ctx);
    if newfd < 0 || newfd == entry.fd {
        return 0;
    }
    let old = fd_key(id, entry.fd);
    // SAFETY: copied out immediately.
    let Some(state) = (unsafe { CONNS.get(old) }).copied() else {
        return 0;
    };
    let new = FdKey {
        tgid: old.tgid,
        fd: newfd as u32,
    };
    if !insert_conn(new, state) {
        return 0;
    }
    // Reported as a connection record naming the original fd in `listen_fd`.
    let ev = ConnEvent {
        hdr: header(Kind::Conn, id, 0),
        conn_id: state.conn_id,
        fd: newfd as i32,
        listen_fd: entry.fd as i32,
        family: state.family,
        port: 0,
        syscall: Syscall::Dup as u8,
        pad: [0; 3],
        addr: [0; 16],
    };
    emit(Kind::Conn, &ev);
    0
}

#[tracepoint]
pub fn sys_enter_fcntl(ctx: TracePointContext) -> u32 {
    dup_enter(&ctx, true)
}

#[tracepoint]
pub fn sys_exit_fcntl(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup(ctx: TracePointContext) -> u32 {
    dup_enter(&ctx, false)
}

#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup2(ctx: TracePointContext) -> u32 {
    dup_enter(&ctx, false)
}

#[tracepoint]
pub fn sys_exit_dup2(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup3(ctx: TracePointContext) -> u32 {
    dup_enter(&ctx, false)
}

#[tracepoint]
pub fn sys_exit_dup3(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

// ---------------------------------------------------------------------------------------------
// Socket data

#[inline(always)]
fn io_enter(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // Every other process on the host stops at its byte; targets' sockets are in CONNS.
    if !may_be_traced((id >> 32) as u32) {
        return 0;
    }
    let fd = arg(ctx, 0);
    let key = fd_key(id, fd as i64);
    // SAFETY: copied out immediately.
    let Some((conn_id, role)) = (unsafe { CONNS.get(key) }).map(|c| (c.conn_id, c.role)) else {
        return 0;
    };
    // Inside an OpenSSL call: this is its socket.
    super::tls::note_socket(id, fd);
    // (fd, buf|iov|msg, count|iovcnt|flags)
    let mut entry = stash_entry(fd, arg(ctx, 1), arg(ctx, 2), conn_id, syscall);
    entry.role = role;
    stash(id, &entry);
    0
}

#[inline(always)]
fn io_exit(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = take(id, syscall) else {
        return 0;
    };
    let rv = ret(ctx);
    if rv < 0 || (rv == 0 && !syscall.is_inbound()) {
        return 0;
    }
    let mut entry = entry;
    if entry.role == ROLE_UNIX_UNDECIDED {
        if rv == 0 {
            return 0;
        }
        entry.role = unix_role(id, &entry, syscall);
    }
    if entry.role == ROLE_IPC {
        emit_ipc(id, &entry, syscall, rv as u64);
    } else {
        if rv > 0 && syscall.is_inbound() {
            super::tls::read_socket(id, entry.fd);
        }
        emit_data(id, &entry, syscall, rv as u64);
    }
    0
}

/// A Unix-socket connection's first bytes decide what it is: an HTTP request line makes it an
/// HTTP connection (the side that reads it serves), anything else IPC. Remembered in `CONNS`.
#[inline(always)]
fn unix_role(id: u64, entry: &Stash, syscall: Syscall) -> u8 {
    // Where the bytes are: the buffer, or the first iovec's.
    let buf = match syscall {
        Syscall::Readv | Syscall::Writev => read_user::<u64>(entry.ptr).unwrap_or(0),
        Syscall::Recvmsg | Syscall::Sendmsg => read_user::<u64>(entry.ptr + 16)
            .and_then(read_user::<u64>)
            .unwrap_or(0),
        _ => entry.ptr,
    };
    let first = read_user::<[u8; 4]>(buf).unwrap_or([0; 4]);
    let http = matches!(
        &first,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI"
    );
    let role = match (http, syscall.is_inbound()) {
        (false, _) => ROLE_IPC,
        (true, true) => ROLE_SERVER,
        (true, false) => ROLE_CLIENT,
    };
    let key = fd_key(id, entry.fd);
    if let Some(state) = CONNS.get_ptr_mut(key) {
        // SAFETY: a map value; only this connection's own syscalls write it.
        unsafe { (*state).role = role };
    }
    role
}

/// A data record of an IPC connection: timing, direction and length, no payload.
#[inline(always)]
fn emit_ipc(id: u64, entry: &Stash, syscall: Syscall, total: u64) {
    let eof = if total == 0 { DATA_FLAG_EOF } else { 0 };
    let head = DataHead {
        hdr: header(Kind::Data, id, DATA_FLAG_IPC | eof),
        conn_id: entry.conn_id,
        total_len: total,
        fd: entry.fd as i32,
        cap_len: 0,
        syscall: syscall as u8,
        pad1: 0,
        iov_segs: 0,
        offset: 0,
    };
    emit(Kind::Data, &head);
}

// ---------------------------------------------------------------------------------------------
// The accept/connect and read/write tracepoints, one enter/exit pair per syscall.

macro_rules! pair {
    ($enter:ident, $exit:ident, $on_enter:ident, $on_exit:ident, $syscall:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            $on_enter(&ctx, $syscall)
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            $on_exit(&ctx, $syscall)
        }
    };
}

pair!(
    sys_enter_accept,
    sys_exit_accept,
    conn_enter,
    conn_exit,
    Syscall::Accept
);
pair!(
    sys_enter_accept4,
    sys_exit_accept4,
    conn_enter,
    conn_exit,
    Syscall::Accept4
);
pair!(
    sys_enter_connect,
    sys_exit_connect,
    conn_enter,
    conn_exit,
    Syscall::Connect
);
pair!(
    sys_enter_read,
    sys_exit_read,
    io_enter,
    io_exit,
    Syscall::Read
);
pair!(
    sys_enter_readv,
    sys_exit_readv,
    io_enter,
    io_exit,
    Syscall::Readv
);
pair!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    io_enter,
    io_exit,
    Syscall::Recvfrom
);
pair!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    io_enter,
    io_exit,
    Syscall::Recvmsg
);
pair!(
    sys_enter_write,
    sys_exit_write,
    io_enter,
    io_exit,
    Syscall::Write
);
pair!(
    sys_enter_writev,
    sys_exit_writev,
    io_enter,
    io_exit,
    Syscall::Writev
);
pair!(
    sys_enter_sendto,
    sys_exit_sendto,
    io_enter,
    io_exit,
    Syscall::Sendto
);
pair!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    io_enter,
    io_exit,
    Syscall::Sendmsg
);
