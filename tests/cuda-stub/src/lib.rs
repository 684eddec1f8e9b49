//! A stand-in for the CUDA driver (`libcuda.so`): the entry points tracer's step clock probes,
//! with the driver's C signatures, each returning `CUDA_SUCCESS` and doing nothing else.
//!
//! Three rules keep it a fair target for uprobes:
//! - every function's body differs (it passes its own tag to [`note`]), so the linker cannot
//!   fold them into one address, which would fire a launch probe on a synchronisation;
//! - no function starts with a `lock`-prefixed instruction (the kernel refuses a uprobe there,
//!   `ENOTSUPP`) or a RIP-relative one (which costs the probe several microseconds more): no
//!   atomics, no statics;
//! - every function starts with a `push` (it calls [`note`] and returns after it, so it aligns
//!   the stack first), as compiled driver entry points that call into the driver do: the kernel
//!   emulates a `push` under a uprobe instead of single-stepping it out of line, and the cost
//!   measured on the stand-in is the common one.
//!
//! The integration tests check the first byte of every export.

use std::{
    ffi::{c_int, c_uint, c_void},
    hint::black_box,
};

/// `CUresult`.
pub type CUresult = c_int;
/// `CUfunction`.
pub type CUfunction = *mut c_void;
/// `CUstream`.
pub type CUstream = *mut c_void;
/// `CUevent`.
pub type CUevent = *mut c_void;
/// `CUgraphExec`.
pub type CUgraphExec = *mut c_void;
/// `CUlaunchConfig` (opaque here).
pub type CUlaunchConfig = c_void;

/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CUresult = 0;
/// `CUDA_ERROR_INVALID_VALUE`.
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
/// The driver version this stand-in reports (12.8).
pub const DRIVER_VERSION: c_int = 12080;

/// Every entry point this library exports.
pub const EXPORTS: [&str; 13] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
    "cuStreamSynchronize",
    "cuStreamSynchronize_ptsz",
    "cuEventSynchronize",
    "cuCtxSynchronize",
];

/// Where every entry point goes: an opaque use of its tag (not inlined, so each caller keeps
/// its own code and its `push` prologue).
#[inline(never)]
extern "C" fn note(tag: u32) -> u32 {
    black_box(tag)
}

/// The body of every entry point: its tag noted, then success.
#[inline]
fn done(tag: u32) -> CUresult {
    let _ = note(tag);
    CUDA_SUCCESS
}

/// `cuInit`.
#[unsafe(no_mangle)]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    black_box(flags);
    done(1)
}

/// `cuDriverGetVersion`.
///
/// # Safety
/// `version` is null or valid for a write of a `c_int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    if version.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null, valid per the contract.
    unsafe { version.write(DRIVER_VERSION) };
    done(2)
}

/// `cuLaunchKernel`.
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernel(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let _ = (f, grid_x, grid_y, grid_z, block_x, block_y, block_z);
    let _ = (shared_bytes, stream, params, extra);
    done(3)
}

/// `cuLaunchKernel_ptsz` (per-thread default stream).
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernel_ptsz(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let _ = (f, grid_x, grid_y, grid_z, block_x, block_y, block_z);
    let _ = (shared_bytes, stream, params, extra);
    done(4)
}

/// `cuLaunchKernelEx`.
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let _ = (config, f, params, extra);
    done(5)
}

/// `cuLaunchKernelEx_ptsz`.
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let _ = (config, f, params, extra);
    done(6)
}

/// `cuLaunchCooperativeKernel`.
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
) -> CUresult {
    let _ = (f, grid_x, grid_y, grid_z, block_x, block_y, block_z);
    let _ = (shared_bytes, stream, params);
    done(7)
}

/// `cuGraphLaunch`.
#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch(exec: CUgraphExec, stream: CUstream) -> CUresult {
    let _ = (exec, stream);
    done(8)
}

/// `cuGraphLaunch_ptsz`.
#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch_ptsz(exec: CUgraphExec, stream: CUstream) -> CUresult {
    let _ = (exec, stream);
    done(9)
}

/// `cuStreamSynchronize`.
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    let _ = stream;
    done(10)
}

/// `cuStreamSynchronize_ptsz`.
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize_ptsz(stream: CUstream) -> CUresult {
    let _ = stream;
    done(11)
}

/// `cuEventSynchronize`.
#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(event: CUevent) -> CUresult {
    let _ = event;
    done(12)
}

/// `cuCtxSynchronize`.
#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    done(13)
}
