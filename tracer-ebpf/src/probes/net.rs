//! Sockets of targets: creation (its type), accept/connect, duplicated fds, and the
//! read/write family whose payload is copied out (iovecs included).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_loop, bpf_probe_read_user},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_ebpf::abi::{
    CAPTURE_MAX, CONFIG_IPC, ConnEvent, ConnState, DATA_FLAG_CONT, DATA_FLAG_EOF, DATA_FLAG_IPC,
    DATA_FLAG_MORE, DATA_HEAD_LEN, DataHead, FdKey, IOV_WALK_MAX, Kind, REQUEST_CAPTURE_MAX,
    ROLE_CLIENT, ROLE_IPC, ROLE_SERVER, Stash, Stat, Syscall,
};

use super::{
    CONNS, DataScratch, EVENTS, SCRATCH, SOCK_TYPES, arg, bump, current_target, emit, fd_key,
    header, read_user, ret, stash, stash_entry, submit_flags, take,
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
    let Some(entry) = take(id, syscall) else {
        return 0;
    };
    let rv = ret(ctx);
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
        // Unix sockets are IPC peers: followed as IPC (no payload) when asked, else only
        // reported.
        if config!(flags) & CONFIG_IPC == 0 {
            emit(Kind::Conn, &ev);
            return 0;
        }
        role = ROLE_IPC;
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
    if CONNS.insert(key, state, u64::from(BPF_ANY)).is_err() {
        bump(Stat::ConnTableFull as u32);
    }
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
    if CONNS.insert(new, state, u64::from(BPF_ANY)).is_err() {
        bump(Stat::ConnTableFull as u32);
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
    let fd = arg(ctx, 0);
    let key = fd_key(id, fd as i64);
    // One lookup for everybody: only targets' sockets are in CONNS.
    // SAFETY: copied out immediately.
    let Some((conn_id, role)) = (unsafe { CONNS.get(key) }).map(|c| (c.conn_id, c.role)) else {
        return 0;
    };
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
    if entry.role == ROLE_IPC {
        emit_ipc(id, &entry, syscall, rv as u64);
    } else {
        emit_data(id, &entry, syscall, rv as u64);
    }
    0
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

/// Copies `len` user bytes to `buf[off..]`, with the offset masked and the length clamped so
/// the verifier can bound the write. Returns the bytes copied.
#[inline(always)]
fn copy_user(buf: &mut [u8; 2 * CAPTURE_MAX], off: u32, src: u64, len: u64) -> u32 {
    let off = (off as usize) & (CAPTURE_MAX - 1);
    // Clamp in 64 bits: the helper's size is a u32, and LLVM passes the untruncated register,
    // so a 32-bit clamp would leave the verifier looking at an unbounded 64-bit value.
    let n: u64 = if len > CAPTURE_MAX as u64 {
        CAPTURE_MAX as u64
    } else {
        len
    };
    if n == 0 {
        return 0;
    }
    // SAFETY: off < CAPTURE_MAX and n <= CAPTURE_MAX, so the write stays inside `buf`.
    let rc = unsafe {
        bpf_probe_read_user(
            buf.as_mut_ptr().add(off).cast::<c_void>(),
            n as u32,
            src as *const c_void,
        )
    };
    if rc < 0 {
        bump(Stat::UserReadFailed as u32);
        return 0;
    }
    n as u32
}

/// State of an iovec walk, shared with [`iov_segment`] through `bpf_loop`.
#[repr(C)]
struct IovWalk {
    /// User address of the iovec array.
    iov: u64,
    /// Segments in it (at most `IOV_WALK_MAX`).
    count: u64,
    /// Bytes wanted, bytes copied so far.
    want: u64,
    off: u64,
    segs: u64,
}

/// One iovec segment: copies its bytes after those already copied. `bpf_loop` calls it with
/// the segment's index; returning 1 stops the walk. Verified once, however many segments are
/// walked (an unrolled walk of more than 8 segments is too long for the verifier).
#[inline(never)]
extern "C" fn iov_segment(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `IovWalk` on `copy_iov`'s stack, passed to `bpf_loop`.
    let w = unsafe { &mut *ctx.cast::<IovWalk>() };
    if i >= w.count || w.off >= w.want {
        return 1;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU map value, exclusively ours while this program runs.
    let scratch = unsafe { &mut *scratch };
    let at = w.iov + i * 16;
    let (Some(base), Some(seg_len)) = (read_user::<u64>(at), read_user::<u64>(at + 8)) else {
        bump(Stat::UserReadFailed as u32);
        return 1;
    };
    let remaining = w.want - w.off;
    let n = if seg_len < remaining {
        seg_len
    } else {
        remaining
    };
    w.off += u64::from(copy_user(&mut scratch.data, w.off as u32, base, n));
    w.segs += 1;
    0
}

/// Walks up to `IOV_WALK_MAX` iovecs, copying until `want` bytes. Returns (copied, segments).
#[inline(always)]
fn copy_iov(iov: u64, iovcnt: u64, want: u64) -> (u32, u16) {
    let mut w = IovWalk {
        iov,
        count: if iovcnt < IOV_WALK_MAX as u64 {
            iovcnt
        } else {
            IOV_WALK_MAX as u64
        },
        want,
        off: 0,
        segs: 0,
    };
    // SAFETY: the callback and its context are valid for the call; the helper bounds the loop.
    unsafe {
        bpf_loop(
            w.count as u32,
            iov_segment as *mut c_void,
            (&raw mut w).cast::<c_void>(),
            0,
        );
    }
    if iovcnt > IOV_WALK_MAX as u64 && w.off < want {
        bump(Stat::IovTruncated as u32);
    }
    (w.off as u32, w.segs as u16)
}

#[inline(always)]
fn emit_data(id: u64, entry: &Stash, syscall: Syscall, total: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map value, exclusively ours while this program runs.
    let scratch = unsafe { &mut *scratch };
    let limit = u64::from(config!(capture_bytes));
    let mut want = if total < limit { total } else { limit };
    if want > CAPTURE_MAX as u64 {
        want = CAPTURE_MAX as u64;
    }
    let (mut cap, segs) = match syscall {
        Syscall::Readv | Syscall::Writev => copy_iov(entry.ptr, entry.arg, want),
        Syscall::Recvmsg | Syscall::Sendmsg => {
            // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
            let iov = read_user::<u64>(entry.ptr + 16).unwrap_or(0);
            let iovcnt = read_user::<u64>(entry.ptr + 24).unwrap_or(0);
            copy_iov(iov, iovcnt, want)
        }
        _ => (copy_user(&mut scratch.data, 0, entry.ptr, want), 0),
    };
    if cap > CAPTURE_MAX as u32 {
        cap = CAPTURE_MAX as u32;
    }
    // A request read into one buffer is copied further, in continuation records.
    let flat = segs == 0 && matches!(syscall, Syscall::Read | Syscall::Recvfrom);
    let mut end = u64::from(cap);
    if flat && entry.role == ROLE_SERVER && u64::from(cap) == want && want > 0 {
        let more = u64::from(config!(request_capture_bytes));
        end = if total < more { total } else { more };
        if end > REQUEST_CAPTURE_MAX as u64 {
            end = REQUEST_CAPTURE_MAX as u64;
        }
        if end < u64::from(cap) {
            end = u64::from(cap);
        }
    }
    if end < total {
        bump(Stat::CaptureTruncated as u32);
    }
    let mut flags = if total == 0 { DATA_FLAG_EOF } else { 0 };
    if end > u64::from(cap) {
        flags |= DATA_FLAG_MORE;
    }
    scratch.head = DataHead {
        hdr: header(Kind::Data, id, flags),
        conn_id: entry.conn_id,
        total_len: total,
        fd: entry.fd as i32,
        cap_len: cap,
        syscall: syscall as u8,
        pad1: 0,
        iov_segs: segs,
        offset: 0,
    };
    output_data(scratch, cap);
    if end > u64::from(cap) {
        let mut c = Pieces {
            src: entry.ptr,
            from: u64::from(cap),
            end,
        };
        // Records of `CAPTURE_MAX`.
        #[expect(
            clippy::manual_div_ceil,
            reason = "div_ceil keeps a division-by-zero panic path the verifier rejects"
        )]
        let pieces = (end - u64::from(cap) + CAPTURE_MAX as u64 - 1) / CAPTURE_MAX as u64;
        // SAFETY: the callback and its context are valid for the call; the helper bounds it.
        unsafe {
            bpf_loop(
                pieces as u32,
                data_piece as *mut c_void,
                (&raw mut c).cast::<c_void>(),
                0,
            );
        }
    }
}

/// Sends the data record in `scratch` with `cap` payload bytes.
#[inline(always)]
fn output_data(scratch: &DataScratch, cap: u32) {
    let cap = (cap as usize) & (2 * CAPTURE_MAX - 1);
    let len = DATA_HEAD_LEN + if cap > CAPTURE_MAX { CAPTURE_MAX } else { cap };
    // SAFETY: len <= DATA_HEAD_LEN + CAPTURE_MAX < size_of::<DataScratch>().
    let bytes =
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(scratch).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(bytes, submit_flags()).is_ok() {
        bump(Kind::Data.emitted_stat());
    } else {
        bump(Kind::Data.dropped_stat());
    }
}

/// The rest of a request read, shared with [`data_piece`] through `bpf_loop`.
#[repr(C)]
struct Pieces {
    /// The user buffer read into.
    src: u64,
    /// Next offset to copy, end of what is copied.
    from: u64,
    end: u64,
}

/// One continuation record (see [`DATA_FLAG_CONT`]), re-using the head left in the scratch by
/// the first record. Returning 1 stops the loop.
#[inline(never)]
extern "C" fn data_piece(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Pieces` on `emit_data`'s stack, passed to `bpf_loop`.
    let p = unsafe { &mut *ctx.cast::<Pieces>() };
    if p.from >= p.end {
        return 1;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU map value, exclusively ours while this program runs.
    let scratch = unsafe { &mut *scratch };
    let left = p.end - p.from;
    let n = if left < CAPTURE_MAX as u64 {
        left
    } else {
        CAPTURE_MAX as u64
    };
    let got = copy_user(&mut scratch.data, 0, p.src + p.from, n);
    let last = p.from + n >= p.end;
    let mut flags = DATA_FLAG_CONT;
    if !last {
        flags |= DATA_FLAG_MORE;
    }
    scratch.head.hdr.flags = flags;
    scratch.head.offset = p.from as u32;
    scratch.head.cap_len = got;
    output_data(scratch, got);
    p.from += n;
    i64::from(got == 0 || last)
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
