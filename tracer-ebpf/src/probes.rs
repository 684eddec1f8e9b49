//! The programs. See the crate docs for the rules they follow.

// eBPF has no real calls between our helpers worth keeping (and the verifier is happier with
// straight-line code), tracepoint contexts are 8-byte aligned by the kernel, and the program
// signature (context by value) is fixed by aya.
#![allow(
    clippy::inline_always,
    clippy::cast_ptr_alignment,
    clippy::needless_pass_by_value
)]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_user,
            bpf_probe_read_user_str,
        },
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::{info, warn};
use tracer_ebpf::abi::{
    CAPTURE_MAX, COMM_LEN, CONFIG_IOCTL_EVENTS, CONFIG_STANDIN_DEVICES, CloseEvent, ConnEvent,
    ConnState, DATA_FLAG_EOF, DATA_HEAD_LEN, DEV_CTL, DEV_MODESET, DEV_OTHER, DEV_PREFIX_MAX,
    DEV_UVM, DataHead, DevOpenEvent, EXEC_FLAG_COMM_MATCH, EXIT_FLAG_THREAD, FdKey,
    GPU_CLIENT_FREED, GPU_CONTEXT_DOWN, GPU_CONTEXT_UP, GPU_FIRST_USE, GPU_MINOR_MAX,
    GPU_UVM_REGISTER, GPU_UVM_UNREGISTER, GpuEvent, GpuKey, GpuUse, HANDLE_COUNTED, HandleKey,
    Header, IOV_WALK_MAX, IoctlEvent, Kind, PATH_CAPTURE, ProbeConfig, ProcEvent, RM_DEV_BASE,
    ROLE_CLIENT, ROLE_SERVER, STAT_SLOTS, Stash, Stat, Syscall, TARGET_CHILD, TARGET_COMM, UvmKey,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
const SOCK_DGRAM: u32 = 2;
/// `SOCK_NONBLOCK | SOCK_CLOEXEC` share the type argument with the type itself.
const SOCK_TYPE_MASK: u32 = 0xf;

/// Overridden by the loader before the programs are loaded (a frozen `.rodata` global).
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig::DEFAULT;

/// Records to userspace. Resized by the loader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Processes to trace: tgid → why (`TARGET_*` bits).
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(32768, 0);

/// cgroup ids whose members are traced.
#[map]
static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(256, 0);

/// Process names whose processes become targets at exec.
#[map]
static COMMS: HashMap<[u8; COMM_LEN], u32> = HashMap::with_max_entries(256, 0);

/// Sockets of targets whose data is captured: (tgid, fd) → connection.
#[map]
static CONNS: HashMap<FdKey, ConnState> = HashMap::with_max_entries(65536, 0);

/// Socket type (`SOCK_STREAM`, `SOCK_DGRAM`...) of targets' sockets created while attached:
/// (tgid, fd) → type. Written at every `socket()` exit, so a reused fd never keeps a stale type;
/// LRU so it needs no cleanup at close. Lets `connect()` skip UDP sockets (DNS) in the kernel.
#[map]
static SOCK_TYPES: LruHashMap<FdKey, u32> = LruHashMap::with_max_entries(16384, 0);

/// Device fds (paths under the device root) of targets: (tgid, fd) → device code (a GPU minor
/// number or a `DEV_*` code, from the node's name).
#[map]
static DEV_FDS: HashMap<FdKey, u32> = HashMap::with_max_entries(8192, 0);

/// Per-(process, device) ioctl counters and live compute contexts; userspace reads them and
/// removes a process's entries when it exits.
#[map]
static GPU_USE: HashMap<GpuKey, GpuUse> = HashMap::with_max_entries(16384, 0);

/// RM objects that lead to a GPU: (process, client, handle) → RM device instance, with
/// `HANDLE_COUNTED` on compute objects. LRU: objects freed implicitly (with their parent or
/// client, or at exit) age out instead of leaking.
#[map]
static RM_HANDLES: LruHashMap<HandleKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// GPUs registered with UVM: (process, GPU UUID) → registrations.
#[map]
static UVM_REGS: HashMap<UvmKey, u32> = HashMap::with_max_entries(4096, 0);

/// Entry arguments per thread (`pid_tgid`) until the syscall exits. LRU so a lost exit cannot
/// leak entries forever.
#[map]
static STASH: LruHashMap<u64, Stash> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU counters (see `Stat` and `Kind::{emitted,dropped}_stat`).
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Per-CPU scratch for data records: twice the capture size so masked offset + clamped length
/// always fit, which is what the verifier needs to see.
#[repr(C)]
struct DataScratch {
    head: DataHead,
    data: [u8; 2 * CAPTURE_MAX],
}

#[map]
static SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch for device-open records (too large for the 512-byte stack with the rest).
#[map]
static PATHBUF: PerCpuArray<DevOpenEvent> = PerCpuArray::with_max_entries(1, 0);

macro_rules! config {
    ($field:ident) => {
        // SAFETY: CONFIG is plain data; volatile so the loader's override is what is read.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$field) }
    };
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn header(kind: Kind, id: u64, flags: u16) -> Header {
    Header {
        ts_ns: now_ns(),
        tgid: (id >> 32) as u32,
        tid: id as u32,
        kind: kind as u16,
        flags,
        pad: 0,
    }
}

/// Submit flags: no wakeup unless the ring is filling up, so a busy server costs no wakeup per
/// event while a stalled consumer still gets woken before records are dropped.
#[inline(always)]
fn submit_flags() -> u64 {
    let threshold: u64 = config!(wakeup_bytes);
    if threshold == 0 {
        return 0;
    }
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= threshold {
        bump(Stat::ForcedWakeups as u32);
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
fn emit<T: 'static>(kind: Kind, record: &T) {
    if EVENTS.output::<T>(record, submit_flags()).is_ok() {
        bump(kind.emitted_stat());
    } else {
        bump(kind.dropped_stat());
    }
}

/// Syscall tracepoint argument `n` (the layout every `syscalls/sys_enter_*` shares).
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: tracepoint context reads within the record, 8-byte aligned.
    unsafe { *(ctx.as_ptr().cast::<u8>().add(16 + 8 * n).cast::<u64>()) }
}

/// A `syscalls/sys_exit_*` tracepoint's return value.
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    arg(ctx, 0) as i64
}

#[inline(always)]
fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper faults safely on bad user pointers.
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(addr as *const T) }.ok()
}

/// Whether the current process is traced; returns its `pid_tgid`.
#[inline(always)]
fn current_target() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: the value is not held across helper calls that could free it.
    if unsafe { TARGETS.get(tgid) }.is_some() {
        return Some(id);
    }
    if config!(filter_cgroup) != 0 {
        // SAFETY: helper without arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: as above.
        if unsafe { CGROUPS.get(cgroup) }.is_some() && tgid != config!(self_tgid) {
            return Some(id);
        }
    }
    None
}

/// The (process, fd) key of the connection and device tables.
#[inline(always)]
fn fd_key(id: u64, fd: i64) -> FdKey {
    FdKey {
        tgid: (id >> 32) as u32,
        fd: fd as u32,
    }
}

#[inline(always)]
fn stash(id: u64, entry: &Stash) {
    if STASH.insert(id, entry, u64::from(BPF_ANY)).is_err() {
        bump(Stat::StashFull as u32);
    }
}

/// Takes this thread's stashed entry if it belongs to `syscall`.
#[inline(always)]
fn take(id: u64, syscall: Syscall) -> Option<Stash> {
    // SAFETY: copied out before the entry is removed.
    let entry = unsafe { STASH.get(id) }.copied()?;
    let _ = STASH.remove(id);
    (entry.syscall == syscall as u8).then_some(entry)
}

#[inline(always)]
fn stash_entry(fd: u64, ptr: u64, arg: u64, conn_id: u64, syscall: Syscall) -> Stash {
    Stash {
        fd: fd as i64,
        ptr,
        arg,
        conn_id,
        syscall: syscall as u8,
        pad: [0; 7],
    }
}

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
    let (fd, listen_fd, role) = if syscall == Syscall::Connect {
        if rv != 0 && rv != -EINPROGRESS {
            return 0;
        }
        let key = fd_key(id, entry.fd);
        // SAFETY: copied out immediately.
        if unsafe { SOCK_TYPES.get(key) }.copied() == Some(SOCK_DGRAM) {
            // A connected UDP socket (a resolver): not HTTP.
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
            // Unix sockets are reported (IPC peers) but their data is not captured.
            AF_UNIX => {
                emit(Kind::Conn, &ev);
                return 0;
            }
            0 => {}
            // Netlink, packet, vsock...: not HTTP.
            _ => return 0,
        }
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
    let kind = entry.arg as u32 & SOCK_TYPE_MASK;
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
    let Some(conn_id) = (unsafe { CONNS.get(key) }).map(|c| c.conn_id) else {
        return 0;
    };
    // (fd, buf|iov|msg, count|iovcnt|flags)
    stash(
        id,
        &stash_entry(fd, arg(ctx, 1), arg(ctx, 2), conn_id, syscall),
    );
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
    emit_data(id, &entry, syscall, rv as u64);
    0
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

/// Walks up to `IOV_WALK_MAX` iovecs, copying until `want` bytes. Returns (copied, segments).
#[inline(always)]
fn copy_iov(buf: &mut [u8; 2 * CAPTURE_MAX], iov: u64, iovcnt: u64, want: u64) -> (u32, u16) {
    let mut off: u32 = 0;
    let mut segs: u16 = 0;
    for i in 0..IOV_WALK_MAX as u64 {
        if i >= iovcnt || u64::from(off) >= want {
            break;
        }
        let Some(base) = read_user::<u64>(iov + i * 16) else {
            bump(Stat::UserReadFailed as u32);
            break;
        };
        let Some(seg_len) = read_user::<u64>(iov + i * 16 + 8) else {
            bump(Stat::UserReadFailed as u32);
            break;
        };
        let remaining = want - u64::from(off);
        let n = if seg_len < remaining {
            seg_len
        } else {
            remaining
        };
        off += copy_user(buf, off, base, n);
        segs += 1;
    }
    if iovcnt > IOV_WALK_MAX as u64 && u64::from(off) < want {
        bump(Stat::IovTruncated as u32);
    }
    (off, segs)
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
        Syscall::Readv | Syscall::Writev => copy_iov(&mut scratch.data, entry.ptr, entry.arg, want),
        Syscall::Recvmsg | Syscall::Sendmsg => {
            // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
            let iov = read_user::<u64>(entry.ptr + 16).unwrap_or(0);
            let iovcnt = read_user::<u64>(entry.ptr + 24).unwrap_or(0);
            copy_iov(&mut scratch.data, iov, iovcnt, want)
        }
        _ => (copy_user(&mut scratch.data, 0, entry.ptr, want), 0),
    };
    if u64::from(cap) < total {
        bump(Stat::CaptureTruncated as u32);
    }
    scratch.head = DataHead {
        hdr: header(Kind::Data, id, if total == 0 { DATA_FLAG_EOF } else { 0 }),
        conn_id: entry.conn_id,
        total_len: total,
        fd: entry.fd as i32,
        cap_len: cap,
        syscall: syscall as u8,
        pad1: 0,
        iov_segs: segs,
        pad2: 0,
    };
    if cap > CAPTURE_MAX as u32 {
        cap = CAPTURE_MAX as u32;
    }
    let len = DATA_HEAD_LEN + cap as usize;
    // SAFETY: len <= DATA_HEAD_LEN + CAPTURE_MAX < size_of::<DataScratch>().
    let bytes =
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(scratch).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(bytes, submit_flags()).is_ok() {
        bump(Kind::Data.emitted_stat());
    } else {
        bump(Kind::Data.dropped_stat());
    }
}

// ---------------------------------------------------------------------------------------------
// close

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let fd = arg(&ctx, 0) as u32;
    let key = FdKey {
        tgid: (id >> 32) as u32,
        fd,
    };
    // SAFETY: copied out immediately.
    if let Some(conn_id) = unsafe { CONNS.get(key) }.map(|c| c.conn_id) {
        let _ = CONNS.remove(key);
        let ev = CloseEvent {
            hdr: header(Kind::Close, id, 0),
            conn_id,
            fd: fd as i32,
            pad: 0,
        };
        emit(Kind::Close, &ev);
    // SAFETY: as above.
    } else if unsafe { DEV_FDS.get(key) }.is_some() {
        let _ = DEV_FDS.remove(key);
        let ev = CloseEvent {
            hdr: header(Kind::DevClose, id, 0),
            conn_id: 0,
            fd: fd as i32,
            pad: 0,
        };
        emit(Kind::DevClose, &ev);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Device nodes and ioctls

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    let prefix_len = config!(dev_prefix_len) as usize;
    if prefix_len == 0 {
        return 0;
    }
    let Some(id) = current_target() else {
        return 0;
    };
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU map value, exclusively ours while this program runs.
    let buf = unsafe { &mut *buf };
    let filename = arg(&ctx, 1);
    // SAFETY: bounded by the destination size.
    let n = unsafe {
        bpf_probe_read_user_str(
            buf.path.as_mut_ptr().cast::<c_void>(),
            PATH_CAPTURE as u32,
            filename as *const c_void,
        )
    };
    if n <= 0 || (n as usize) <= prefix_len {
        return 0;
    }
    for i in 0..DEV_PREFIX_MAX {
        if i >= prefix_len || i >= PATH_CAPTURE {
            break;
        }
        // SAFETY: CONFIG is plain data.
        let want = unsafe { core::ptr::read_volatile(&raw const CONFIG.dev_prefix[i]) };
        if buf.path[i] != want {
            return 0;
        }
    }
    // (dfd, filename, flags)
    stash(
        id,
        &stash_entry(arg(&ctx, 0), filename, arg(&ctx, 2), 0, Syscall::Openat),
    );
    0
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = take(id, Syscall::Openat) else {
        return 0;
    };
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU map value, exclusively ours while this program runs.
    let buf = unsafe { &mut *buf };
    // SAFETY: bounded by the destination size.
    let n = unsafe {
        bpf_probe_read_user_str(
            buf.path.as_mut_ptr().cast::<c_void>(),
            PATH_CAPTURE as u32,
            entry.ptr as *const c_void,
        )
    };
    let code = if n > 0 {
        dev_code(
            &buf.path,
            config!(dev_prefix_len) as usize,
            (n - 1) as usize,
        )
    } else {
        DEV_OTHER
    };
    let key = fd_key(id, fd);
    if DEV_FDS.insert(key, code, u64::from(BPF_ANY)).is_err() {
        bump(Stat::DevTableFull as u32);
    }
    buf.hdr = header(Kind::DevOpen, id, 0);
    buf.fd = fd as i32;
    buf.flags = entry.arg as i32;
    buf.path_len = if n > 0 { (n - 1) as u32 } else { 0 };
    buf.pad = 0;
    emit(Kind::DevOpen, buf);
    0
}

/// The device code of a node from the part of its path after the prefix (`<root>/nvidia`):
/// `0`..`247` → that GPU minor, `ctl`, `-uvm`, `-modeset`, anything else [`DEV_OTHER`].
#[inline(always)]
fn dev_code(path: &[u8; PATH_CAPTURE], start: usize, len: usize) -> u32 {
    let rest = len.saturating_sub(start);
    let at = |i: usize| path[(start + i) & (PATH_CAPTURE - 1)];
    if rest == 3 && at(0) == b'c' && at(1) == b't' && at(2) == b'l' {
        return DEV_CTL;
    }
    if rest == 4 && at(0) == b'-' && at(1) == b'u' && at(2) == b'v' && at(3) == b'm' {
        return DEV_UVM;
    }
    if rest == 8 && at(0) == b'-' && at(1) == b'm' && at(2) == b'o' {
        return DEV_MODESET;
    }
    if rest == 0 || rest > 3 {
        return DEV_OTHER;
    }
    let mut minor = 0u32;
    for i in 0..3 {
        if i >= rest {
            break;
        }
        let c = at(i);
        if !c.is_ascii_digit() {
            return DEV_OTHER;
        }
        minor = minor * 10 + u32::from(c - b'0');
    }
    if minor > GPU_MINOR_MAX {
        return DEV_OTHER;
    }
    minor
}

/// `_IOC_TYPE` of the NVIDIA driver's ioctls.
const NV_IOCTL_MAGIC: u64 = b'F' as u64;
/// `NV_ESC_IOCTL_XFER_CMD`: wraps `{cmd, size, ptr}` for large parameter blocks.
const NV_ESC_IOCTL_XFER_CMD: u64 = 211;
/// `NV_ESC_RM_FREE` (`NVOS00_PARAMETERS`).
const NV_ESC_RM_FREE: u64 = 0x29;
/// `NV_ESC_RM_ALLOC` (`NVOS64_PARAMETERS`, or the older 32-byte `NVOS21_PARAMETERS`).
const NV_ESC_RM_ALLOC: u64 = 0x2B;
/// `sizeof(NVOS64_PARAMETERS)`; its `status` is at offset 40 (`NVOS21`'s at 24).
const NVOS64_SIZE: u64 = 48;
/// `NV01_DEVICE_0`: its allocation parameters start with the device instance.
const CLASS_DEVICE: u32 = 0x80;
const UVM_REGISTER_GPU: u64 = 37;
const UVM_UNREGISTER_GPU: u64 = 38;

/// Compute engine classes (`*_COMPUTE_A/B`: 0xA0C0 Kepler … 0xCBC0 Hopper, 0xCDC0 Blackwell).
#[inline(always)]
fn is_compute_class(class: u32) -> bool {
    class & 0xFF == 0xC0 && (0xA0C0..=0xFFC0).contains(&class)
}

/// Classes a compute object can hang under, so their handles lead back to a device:
/// subdevice, channel group (TSG), GPFIFO channels, VA space.
#[inline(always)]
fn is_path_class(class: u32) -> bool {
    class == 0x2080
        || class == 0xA06C
        || class == 0x90F1
        || (class & 0xFF == 0x6F && (0xA06F..=0xFF6F).contains(&class))
}

#[tracepoint]
pub fn sys_enter_ioctl(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let fd = arg(&ctx, 0);
    let key = fd_key(id, fd as i64);
    // One lookup for everybody: only targets' device fds are in DEV_FDS.
    // SAFETY: copied out immediately.
    let Some(dev) = (unsafe { DEV_FDS.get(key) }).copied() else {
        return 0;
    };
    let cmd = arg(&ctx, 1) & 0xFFFF_FFFF;
    let mut ptr = arg(&ctx, 2);
    // What to decode at the exit: (nr, parameter size), 0 = nothing.
    let mut nr = 0u64;
    let mut size = 0u64;
    if dev == DEV_UVM {
        // UVM uses raw request numbers, not _IOC encodings.
        if cmd == UVM_REGISTER_GPU || cmd == UVM_UNREGISTER_GPU {
            nr = cmd;
        }
    } else if (cmd >> 8) & 0xFF == NV_IOCTL_MAGIC {
        nr = cmd & 0xFF;
        size = (cmd >> 16) & 0x3FFF;
        if nr == NV_ESC_IOCTL_XFER_CMD {
            // nv_ioctl_xfer_t { u32 cmd; u32 size; u64 ptr }
            if let Some(x) = read_user::<[u64; 2]>(ptr) {
                nr = x[0] & 0xFF;
                size = (x[0] >> 32) & 0x3FFF;
                ptr = x[1];
            } else {
                bump(Stat::UserReadFailed as u32);
                nr = 0;
            }
        }
        if nr != NV_ESC_RM_ALLOC && nr != NV_ESC_RM_FREE {
            nr = 0;
        }
    }
    // (fd, cmd, arg): the parameter block in `ptr`, the command in `arg`, and the device code,
    // the escape to decode and its size packed in `conn_id`.
    stash(
        id,
        &stash_entry(
            fd,
            ptr,
            cmd,
            u64::from(dev) | (nr << 32) | (size << 48),
            Syscall::Ioctl,
        ),
    );
    0
}

#[inline(always)]
fn gpu_event(id: u64, ioctls: u64, what: u32, dev: u32, contexts: u32, class: u32) -> GpuEvent {
    GpuEvent {
        hdr: header(Kind::Gpu, id, 0),
        ioctls,
        what,
        dev,
        contexts,
        class,
        uuid: [0; 16],
    }
}

/// Counts an ioctl on (process, device); the first one is a state change worth reporting.
#[inline(always)]
fn count_ioctl(id: u64, dev: u32, failed: bool) -> u64 {
    let key = GpuKey {
        tgid: (id >> 32) as u32,
        dev,
    };
    if let Some(u) = GPU_USE.get_ptr_mut(key) {
        // SAFETY: map value; concurrent threads of the process may race on the counters, an
        // approximate count is fine.
        unsafe {
            (*u).ioctls += 1;
            (*u).errors += u64::from(failed);
            (*u).last_ns = now_ns();
            return (*u).ioctls;
        }
    }
    let fresh = GpuUse {
        ioctls: 1,
        errors: u64::from(failed),
        last_ns: now_ns(),
        contexts: 0,
        pad: 0,
    };
    if GPU_USE.insert(key, fresh, u64::from(BPF_NOEXIST)).is_err() {
        bump(Stat::GpuTableFull as u32);
        return 1;
    }
    let ev = gpu_event(id, 1, GPU_FIRST_USE, dev, 0, 0);
    emit(Kind::Gpu, &ev);
    1
}

/// Adds `delta` to the live compute objects of (process, RM device instance); returns the
/// count after the change.
#[inline(always)]
fn add_context(tgid: u32, instance: u32, delta: i32) -> u32 {
    let key = GpuKey {
        tgid,
        dev: RM_DEV_BASE + instance,
    };
    if let Some(u) = GPU_USE.get_ptr_mut(key) {
        // SAFETY: map value (see count_ioctl).
        unsafe {
            (*u).contexts = (*u).contexts.saturating_add_signed(delta);
            return (*u).contexts;
        }
    }
    if delta <= 0 {
        return 0;
    }
    let fresh = GpuUse {
        ioctls: 0,
        errors: 0,
        last_ns: now_ns(),
        contexts: delta as u32,
        pad: 0,
    };
    if GPU_USE.insert(key, fresh, u64::from(BPF_ANY)).is_err() {
        bump(Stat::GpuTableFull as u32);
    }
    delta as u32
}

#[tracepoint]
pub fn sys_exit_ioctl(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(entry) = take(id, Syscall::Ioctl) else {
        return 0;
    };
    let rv = ret(&ctx);
    let flags: u32 = config!(flags);
    let standin = flags & CONFIG_STANDIN_DEVICES != 0;
    let dev = entry.conn_id as u32;
    let nr = (entry.conn_id >> 32) & 0xFFFF;
    let size = entry.conn_id >> 48;
    let ok = rv == 0 || standin;
    let ioctls = count_ioctl(id, dev, !ok);
    if flags & CONFIG_IOCTL_EVENTS != 0 {
        let ev = IoctlEvent {
            hdr: header(Kind::Ioctl, id, 0),
            ret: rv,
            arg: entry.ptr,
            fd: entry.fd as i32,
            cmd: entry.arg as u32,
        };
        emit(Kind::Ioctl, &ev);
    }
    if nr == 0 || !ok {
        return 0;
    }
    bump(Stat::IoctlsDecoded as u32);
    let tgid = (id >> 32) as u32;
    if dev == DEV_UVM {
        uvm_exit(id, nr, entry.ptr, ioctls);
    } else if nr == NV_ESC_RM_ALLOC {
        rm_alloc_exit(id, tgid, entry.ptr, size, standin, ioctls);
    } else if nr == NV_ESC_RM_FREE {
        rm_free_exit(id, tgid, entry.ptr, standin, ioctls);
    }
    0
}

#[inline(always)]
fn uvm_exit(id: u64, nr: u64, ptr: u64, ioctls: u64) {
    let Some(uuid) = read_user::<[u8; 16]>(ptr) else {
        bump(Stat::UserReadFailed as u32);
        return;
    };
    let key = UvmKey {
        tgid: (id >> 32) as u32,
        pad: 0,
        uuid,
    };
    // SAFETY: copied out immediately.
    let count = unsafe { UVM_REGS.get(key) }.copied().unwrap_or(0);
    let what = if nr == UVM_REGISTER_GPU {
        if UVM_REGS.insert(key, count + 1, u64::from(BPF_ANY)).is_err() {
            bump(Stat::GpuTableFull as u32);
        }
        if count != 0 {
            return;
        }
        GPU_UVM_REGISTER
    } else {
        if count == 0 {
            return;
        }
        if count == 1 {
            let _ = UVM_REGS.remove(key);
        } else {
            let _ = UVM_REGS.insert(key, count - 1, u64::from(BPF_ANY));
            return;
        }
        GPU_UVM_UNREGISTER
    };
    let mut ev = gpu_event(id, ioctls, what, DEV_UVM, 0, 0);
    ev.uuid = uuid;
    emit(Kind::Gpu, &ev);
}

#[inline(always)]
fn rm_alloc_exit(id: u64, tgid: u32, ptr: u64, size: u64, standin: bool, ioctls: u64) {
    // NVOS64/NVOS21: { hRoot, hObjectParent, hObjectNew, hClass, pAllocParms, ... status }.
    let Some(p) = read_user::<[u32; 6]>(ptr) else {
        bump(Stat::UserReadFailed as u32);
        return;
    };
    let (client, parent, new, class) = (p[0], p[1], p[2], p[3]);
    if !standin {
        let status_at = if size == NVOS64_SIZE { 40 } else { 24 };
        if read_user::<u32>(ptr + status_at) != Some(0) {
            return;
        }
    }
    let handle = |h: u32| HandleKey {
        tgid,
        client,
        handle: h,
        pad: 0,
    };
    if class == CLASS_DEVICE {
        // NV0080_ALLOC_PARAMETERS starts with deviceId.
        let params = u64::from(p[4]) | (u64::from(p[5]) << 32);
        let Some(instance) = read_user::<u32>(params) else {
            bump(Stat::UserReadFailed as u32);
            return;
        };
        if RM_HANDLES
            .insert(handle(new), instance & 0xFF, u64::from(BPF_ANY))
            .is_err()
        {
            bump(Stat::HandleTableFull as u32);
        }
        return;
    }
    let compute = is_compute_class(class);
    if !compute && !is_path_class(class) {
        return;
    }
    // SAFETY: copied out immediately.
    let Some(instance) = (unsafe { RM_HANDLES.get(handle(parent)) }).map(|v| v & 0xFF) else {
        return;
    };
    let value = if compute {
        instance | HANDLE_COUNTED
    } else {
        instance
    };
    if RM_HANDLES
        .insert(handle(new), value, u64::from(BPF_ANY))
        .is_err()
    {
        bump(Stat::HandleTableFull as u32);
        return;
    }
    if compute {
        let contexts = add_context(tgid, instance, 1);
        if contexts == 1 {
            let ev = gpu_event(id, ioctls, GPU_CONTEXT_UP, instance, contexts, class);
            emit(Kind::Gpu, &ev);
        }
    }
}

#[inline(always)]
fn rm_free_exit(id: u64, tgid: u32, ptr: u64, standin: bool, ioctls: u64) {
    // NVOS00: { hRoot, hObjectParent, hObjectOld, status }.
    let Some(p) = read_user::<[u32; 4]>(ptr) else {
        bump(Stat::UserReadFailed as u32);
        return;
    };
    let (client, old) = (p[0], p[2]);
    if !standin && p[3] != 0 {
        return;
    }
    if old == client {
        let ev = gpu_event(id, ioctls, GPU_CLIENT_FREED, client, 0, 0);
        emit(Kind::Gpu, &ev);
        return;
    }
    let key = HandleKey {
        tgid,
        client,
        handle: old,
        pad: 0,
    };
    // SAFETY: copied out immediately.
    let Some(value) = (unsafe { RM_HANDLES.get(key) }).copied() else {
        return;
    };
    let _ = RM_HANDLES.remove(key);
    if value & HANDLE_COUNTED == 0 {
        return;
    }
    let instance = value & 0xFF;
    let contexts = add_context(tgid, instance, -1);
    if contexts == 0 {
        let ev = gpu_event(id, ioctls, GPU_CONTEXT_DOWN, instance, 0, 0);
        emit(Kind::Gpu, &ev);
    }
}

// ---------------------------------------------------------------------------------------------
// Process lifecycle: follow targets' children, comm matches, exits.

#[inline(always)]
fn proc_event(kind: Kind, id: u64, flags: u16, pid: u32, ppid: u32) {
    let ev = ProcEvent {
        hdr: header(kind, id, flags),
        pid,
        ppid,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    emit(kind, &ev);
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent. Threads fire this too; their entries are removed when they exit.
    let id = bpf_get_current_pid_tgid();
    let parent = (id >> 32) as u32;
    // SAFETY: presence check only.
    if unsafe { TARGETS.get(parent) }.is_none() {
        return 0;
    }
    // SAFETY: sched_process_fork: child_pid at offset 20.
    let child = unsafe { *(ctx.as_ptr().cast::<u8>().add(20).cast::<i32>()) } as u32;
    if TARGETS
        .insert(child, TARGET_CHILD, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // SAFETY: presence check only.
        if unsafe { TARGETS.get(child) }.is_none() {
            bump(Stat::TargetTableFull as u32);
            warn!(
                &ctx,
                "target map full: child {} of {} not followed", child, parent
            );
            return 0;
        }
    }
    proc_event(Kind::ProcFork, id, 0, child, parent);
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if current_target().is_some() {
        proc_event(Kind::ProcExec, id, 0, tgid, 0);
        return 0;
    }
    if config!(filter_comm) == 0 || tgid == config!(self_tgid) {
        return 0;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { COMMS.get(comm) }.is_none() {
        return 0;
    }
    if TARGETS
        .insert(tgid, TARGET_COMM, u64::from(BPF_ANY))
        .is_err()
    {
        bump(Stat::TargetTableFull as u32);
        return 0;
    }
    info!(&ctx, "process {} became a target by its name", tgid);
    proc_event(Kind::ProcExec, id, EXEC_FLAG_COMM_MATCH, tgid, 0);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let tid = id as u32;
    if tid != tgid {
        // A thread: drop the entry its creation added, and say so (userspace followed it too).
        if TARGETS.remove(tid).is_ok() {
            proc_event(Kind::ProcExit, id, EXIT_FLAG_THREAD, tid, 0);
        }
        // It may also be the process's last thread (the leader exited first): go on.
    }
    // SAFETY: sched_process_exit: group_dead (bool) at offset 32.
    let group_dead = unsafe { *(ctx.as_ptr().cast::<u8>().add(32)) };
    if group_dead == 0 || current_target().is_none() {
        return 0;
    }
    let _ = TARGETS.remove(tgid);
    proc_event(Kind::ProcExit, id, 0, tgid, 0);
    0
}

// ---------------------------------------------------------------------------------------------
// The syscall tracepoints, one enter/exit pair per syscall.

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
