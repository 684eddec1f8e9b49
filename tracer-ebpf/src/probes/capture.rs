//! Copying a socket syscall's payload out: plain buffers, iovec arrays of any length
//! (`bpf_loop`), and a request read beyond one record in continuation records.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_user};
use tracer_ebpf::abi::{
    CAPTURE_MAX, DATA_FLAG_CONT, DATA_FLAG_EOF, DATA_FLAG_MORE, DATA_HEAD_LEN, DataHead,
    IOV_WALK_MAX, Kind, REQUEST_CAPTURE_MAX, ROLE_SERVER, Stash, Stat, Syscall,
};

use super::{DataScratch, EVENTS, SCRATCH, bump, header, read_user, submit_flags};

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
pub(super) fn emit_data(id: u64, entry: &Stash, syscall: Syscall, total: u64) {
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
    let flat = segs == 0
        && matches!(
            syscall,
            Syscall::Read | Syscall::Recvfrom | Syscall::SslRead
        );
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
