//! NVIDIA ioctls on targets' device fds: counts per (process, device), RM object allocation
//! and free (compute contexts up/down), UVM GPU (un)registration.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_ebpf::abi::{
    CONFIG_IOCTL_EVENTS, CONFIG_STANDIN_DEVICES, DEV_UVM, GPU_CLIENT_FREED, GPU_CONTEXT_DOWN,
    GPU_CONTEXT_UP, GPU_FIRST_USE, GPU_UVM_REGISTER, GPU_UVM_UNREGISTER, GpuEvent, GpuKey, GpuUse,
    HANDLE_COUNTED, HandleKey, IoctlEvent, Kind, RM_DEV_BASE, Stat, Syscall, UvmKey,
};

use super::{
    DEV_FDS, GPU_USE, RM_HANDLES, UVM_REGS, arg, bump, emit, fd_key, header, may_be_traced, now_ns,
    read_user, ret, stash, stash_entry, take,
};

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
    // Every other process on the host stops at its byte; targets' device fds are in DEV_FDS.
    if !may_be_traced((id >> 32) as u32) {
        return 0;
    }
    let fd = arg(&ctx, 0);
    let key = fd_key(id, fd as i64);
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
