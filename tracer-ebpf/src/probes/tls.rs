//! TLS terminated by the server itself: uprobes on OpenSSL's `SSL_read`/`SSL_write` and their
//! `_ex` variants (attached by the loader to the `libssl` a target maps, or to a binary that
//! exports them). The plaintext goes out as data records of the connection under it, with
//! `Syscall::SslRead`/`SslWrite`, so the same HTTP tracker reads it.
//!
//! The socket under an `SSL *` is learned from the socket syscalls a call makes (`net.rs`
//! notes the fd in the thread's call: OpenSSL's socket BIO) and remembered per `SSL *` until
//! `SSL_free`, for calls served from the library's buffer. Libraries that give OpenSSL the
//! bytes through a memory BIO (Node's `tls`, Python's asyncio) read the socket themselves, then
//! call `SSL_read` on the same thread: an `SSL *` not known yet, read on a thread that has just
//! read a target's socket, is that socket's (`LAST_READ`; its writes are known from then on).
//! A call whose socket is still unknown (a client's first write through a memory BIO, a
//! connection that predates the probes) is counted (`Stat::TlsNoSocket`).

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_get_current_pid_tgid,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_ebpf::abi::{ROLE_IPC, SslCall, SslKey, Stat, Syscall, TARGET_TLS};

use super::{
    CONNS, LAST_READ, SSL_CALLS, SSL_FDS, TARGETS, bump, capture::emit_data, current_target,
    fd_key, read_user, stash_entry,
};

/// `SSL_read(ssl, buf, num)`, `SSL_read_ex(ssl, buf, num, &readbytes)` and the writes alike.
#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, syscall: Syscall, ex: bool) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let len_ptr = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    let key = SslKey {
        tgid: (id >> 32) as u32,
        pad: 0,
        ssl,
    };
    // SAFETY: copied out immediately.
    let mut fd = unsafe { SSL_FDS.get(key) }.copied().unwrap_or(-1);
    if fd < 0 && syscall == Syscall::SslRead {
        // A memory BIO's bytes come from the socket this thread read last (module docs).
        // SAFETY: copied out immediately.
        if let Some(&last) = unsafe { LAST_READ.get(id) } {
            fd = last;
            let _ = SSL_FDS.insert(key, fd, u64::from(BPF_ANY));
        }
    }
    let call = SslCall {
        ssl,
        buf,
        len_ptr,
        fd,
        syscall: syscall as u8,
        pad: [0; 7],
    };
    let _ = SSL_CALLS.insert(id, call, u64::from(BPF_ANY));
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, Syscall::SslRead, false)
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, Syscall::SslRead, true)
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, Syscall::SslWrite, false)
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, Syscall::SslWrite, true)
}

/// Every variant's return: `SSL_read`/`SSL_write` return the bytes moved (≤ 0: none), the
/// `_ex` variants 1 on success with the count written through their last argument.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(call) = (unsafe { SSL_CALLS.get(id) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(id);
    let rv = i64::from(ctx.ret::<i32>());
    let n = if call.len_ptr != 0 {
        if rv != 1 {
            return 0;
        }
        read_user::<u64>(call.len_ptr).unwrap_or(0)
    } else if rv > 0 {
        rv as u64
    } else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    if call.fd < 0 {
        bump(Stat::TlsNoSocket as u32);
        return 0;
    }
    // SAFETY: copied out immediately.
    let Some(state) = (unsafe { CONNS.get(fd_key(id, call.fd)) }).copied() else {
        bump(Stat::TlsNoSocket as u32);
        return 0;
    };
    if state.role == ROLE_IPC {
        return 0;
    }
    let syscall = if call.syscall == Syscall::SslWrite as u8 {
        Syscall::SslWrite
    } else {
        Syscall::SslRead
    };
    let mut entry = stash_entry(call.fd as u64, call.buf, 0, state.conn_id, syscall);
    entry.role = state.role;
    emit_data(id, &entry, syscall, n);
    0
}

/// Called by the socket syscalls of a target's connection: if the thread is inside an OpenSSL
/// call, that call's socket is `fd` (and so is its `SSL *`'s from now on).
#[inline(always)]
pub(super) fn note_socket(id: u64, fd: u64) {
    let Some(call) = SSL_CALLS.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: this thread's own entry; the uretprobe that removes it runs on this thread.
    let call = unsafe { &mut *call };
    if call.fd == fd as i64 {
        return;
    }
    call.fd = fd as i64;
    let key = SslKey {
        tgid: (id >> 32) as u32,
        pad: 0,
        ssl: call.ssl,
    };
    let _ = SSL_FDS.insert(key, fd as i64, u64::from(BPF_ANY));
}

/// `SSL_free(ssl)`: its socket is forgotten (the next `SSL *` at that address is another
/// connection's).
#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let key = SslKey {
        tgid: (id >> 32) as u32,
        pad: 0,
        ssl,
    };
    let _ = SSL_FDS.remove(key);
    0
}

/// A target's thread read bytes from socket `fd` (see `LAST_READ`): remembered only in
/// processes whose OpenSSL is probed, so no other target pays for the map update on each read.
#[inline(always)]
pub(super) fn read_socket(id: u64, fd: i64) {
    // SAFETY: copied out immediately.
    let tls = unsafe { TARGETS.get((id >> 32) as u32) }.is_some_and(|r| r & TARGET_TLS != 0);
    if tls {
        let _ = LAST_READ.insert(id, fd, u64::from(BPF_ANY));
    }
}
