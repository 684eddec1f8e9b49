//! The programs. See the crate docs for the rules they follow.
//!
//! This module holds what every family shares: the loader's `CONFIG`, the maps, and the
//! helpers (stats, headers, submission, syscall arguments, the per-thread stash). The
//! programs live in one file per family and reach all of it through `super::`.

// eBPF has no real calls between our helpers worth keeping (and the verifier is happier with
// straight-line code), tracepoint contexts are 8-byte aligned by the kernel, and the program
// signature (context by value) is fixed by aya.
#![expect(
    clippy::inline_always,
    clippy::cast_ptr_alignment,
    clippy::needless_pass_by_value,
    reason = "straight-line code for the verifier, kernel-aligned contexts, aya's fixed signatures"
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tracer_ebpf::abi::{
    CAPTURE_MAX, COMM_LEN, ConnState, CudaCounts, DataHead, DevOpenEvent, FdKey, GpuKey, GpuUse,
    HandleKey, Header, Kind, ProbeConfig, STAT_SLOTS, SslCall, SslKey, Stash, Stat, Syscall,
    UvmKey,
};

macro_rules! config {
    ($field:ident) => {
        // SAFETY: CONFIG is plain data; volatile so the loader's override is what is read.
        unsafe { core::ptr::read_volatile(&raw const crate::probes::CONFIG.$field) }
    };
}

// After `config!`, so the families can use it.
mod capture;
mod cuda;
mod fd;
mod floor;
mod net;
mod nvidia;
mod sched;
mod tls;

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

/// CUDA launches per process (tgid) since its last reported synchronisation; userspace removes
/// a process's entry when it exits.
#[map]
static CUDA_COUNTS: HashMap<u32, CudaCounts> = HashMap::with_max_entries(4096, 0);

/// Entry arguments per thread (`pid_tgid`) until the syscall exits. LRU so a lost exit cannot
/// leak entries forever.
#[map]
static STASH: LruHashMap<u64, Stash> = LruHashMap::with_max_entries(16384, 0);

/// One byte per process (tgid; 8 per value), the not-a-target check: set before the process
/// can have an entry in a table the hot programs look up (a target, a followed socket or device
/// fd, a stashed syscall entry), cleared when it exits. The read/write, ioctl, close and dup
/// entries and every exit read it first, so each other process on the host pays one array
/// read there and nothing else. Set by the probes (a byte store; the bpf target has no atomic
/// read-modify-write, and a byte store never touches its neighbours) and by the daemon through
/// the map's memory (mmapable: a byte store too, where a map update would rewrite 8
/// processes' bytes). Sized to `pid_max` by the loader.
#[map]
static TRACED: Array<u64> = Array::with_max_entries(4096, BPF_F_MMAPABLE);

/// OpenSSL calls in progress per thread (`pid_tgid`), until they return (`tls.rs`). LRU as
/// `STASH`.
#[map]
static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(16384, 0);

/// The socket fd each of a target's `SSL *` was last seen reading or writing. LRU: `SSL`
/// objects are freed without a probe.
#[map]
static SSL_FDS: LruHashMap<SslKey, i64> = LruHashMap::with_max_entries(65536, 0);

/// The socket each of a target's threads last read bytes from (`pid_tgid` → fd): the socket
/// under an `SSL *` whose library reads through a memory BIO (Node, asyncio), which reads the
/// socket itself and then hands the bytes to OpenSSL on the same thread (`tls.rs`).
#[map]
static LAST_READ: LruHashMap<u64, i64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU counters (see `Stat` and `Kind::{emitted,dropped}_stat`), all in one value so the
/// daemon reads them with one syscall.
#[map]
static STATS: PerCpuArray<[u64; STAT_SLOTS as usize]> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's value, no concurrent writer on this CPU while the program runs.
        if let Some(c) = unsafe { (*p).get_mut(slot as usize) } {
            *c += 1;
        }
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

/// Whether the current process is traced; returns its `pid_tgid`. Every `TARGETS` entry's
/// byte is set first, so the byte answers for the rest of the host (but the cgroup filter).
#[inline(always)]
fn current_target() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: the value is not held across helper calls that could free it.
    if may_be_traced(tgid) && unsafe { TARGETS.get(tgid) }.is_some() {
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

/// The `TRACED` byte of process `tgid` (`None`: a tgid beyond the map, never expected).
#[inline(always)]
fn traced_byte(tgid: u32) -> Option<*mut u8> {
    let word = TRACED.get_ptr_mut(tgid >> 3)?;
    // SAFETY: within the 8-byte value (the offset is masked to 0..=7).
    Some(unsafe { word.cast::<u8>().add((tgid & 7) as usize) })
}

/// Whether process `tgid` may be traced: false only when its byte says it is none of what the
/// byte covers (see `TRACED`).
#[inline(always)]
fn may_be_traced(tgid: u32) -> bool {
    // SAFETY: a map value byte, read once.
    traced_byte(tgid).is_none_or(|b| unsafe { core::ptr::read_volatile(b) } != 0)
}

/// Marks process `tgid` before an entry of it is added to a table the byte covers.
#[inline(always)]
fn mark_traced(tgid: u32) {
    if let Some(b) = traced_byte(tgid) {
        // SAFETY: a map value byte; every writer but the exit stores the same value, and the
        // store is skipped when it is already set (no cache line dirtied per syscall).
        unsafe {
            if core::ptr::read_volatile(b) == 0 {
                core::ptr::write_volatile(b, 1);
            }
        }
    }
}

/// Process (or thread id) `tgid` exited: its byte is cleared for whichever process gets the
/// number next.
#[inline(always)]
fn forget_traced(tgid: u32) {
    if let Some(b) = traced_byte(tgid) {
        // SAFETY: a map value byte; the process is gone, nothing else writes it.
        unsafe { core::ptr::write_volatile(b, 0) };
    }
}

/// Adds a target (a followed child, a name match): its byte first, so that its syscalls get
/// past the not-a-target check. False when the table is full or, with `BPF_NOEXIST`, it is
/// there.
#[inline(always)]
fn insert_target(tgid: u32, why: u32, flags: u32) -> bool {
    mark_traced(tgid);
    TARGETS.insert(tgid, why, u64::from(flags)).is_ok()
}

/// Follows a socket of a target: its process's byte first (set already unless the entry was
/// unseen, as a cgroup member's first accept). False, counted, when the table is full.
#[inline(always)]
fn insert_conn(key: FdKey, state: ConnState) -> bool {
    mark_traced(key.tgid);
    if CONNS.insert(key, state, u64::from(BPF_ANY)).is_err() {
        bump(Stat::ConnTableFull as u32);
        return false;
    }
    true
}

#[inline(always)]
fn stash(id: u64, entry: &Stash) {
    mark_traced((id >> 32) as u32);
    if STASH.insert(id, entry, u64::from(BPF_ANY)).is_err() {
        bump(Stat::StashFull as u32);
    }
}

/// Takes this thread's stashed entry if it belongs to `syscall`. A process that is not traced
/// (every other process on the host) is answered from its `TRACED` byte.
#[inline(always)]
fn take(id: u64, syscall: Syscall) -> Option<Stash> {
    if !may_be_traced((id >> 32) as u32) {
        return None;
    }
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
        role: 0,
        pad: [0; 6],
    }
}
