//! Targets' fds leaving (close of a connection or device node) and device nodes being opened.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_probe_read_user_str},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_ebpf::abi::{
    CloseEvent, DEV_CTL, DEV_MODESET, DEV_OTHER, DEV_PREFIX_MAX, DEV_UVM, FdKey, GPU_MINOR_MAX,
    Kind, PATH_CAPTURE, Stat, Syscall,
};

use super::{
    CONFIG, CONNS, DEV_FDS, PATHBUF, arg, bump, current_target, emit, fd_key, header,
    may_be_traced, ret, stash, stash_entry, take,
};

// ---------------------------------------------------------------------------------------------
// close

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !may_be_traced((id >> 32) as u32) {
        return 0;
    }
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
// Device nodes (their ioctls: `nvidia.rs`)

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
