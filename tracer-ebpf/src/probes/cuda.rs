//! CUDA driver API uprobes (`libcuda.so`, attached per process by the loader): kernel and graph
//! launches are counted per process in the kernel; a synchronisation, when it returns (the GPU
//! finished what it waited for: the step's end, not the moment the host started waiting), reports the counts since
//! the process's previous reported one, and only when something was launched in between, so an
//! engine step costs one ring record, whatever its kernel count.
//!
//! The counters are plain increments of a shared map value: two threads of one process
//! launching at the same instant can lose a count (the bpf target has no atomic add here).
//! Engines launch from one thread per process, so that is accepted.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_ebpf::abi::{
    CUDA_SYNC_CONTEXT, CUDA_SYNC_EVENT, CUDA_SYNC_STREAM, CudaCounts, CudaSyncEvent, Kind, Stat,
};

use super::{CUDA_COUNTS, bump, current_target, emit, header};

/// Counts one launch (`graph`: a graph launch) of the current process.
#[inline(always)]
fn launched(graph: bool) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    let tgid = (id >> 32) as u32;
    if let Some(c) = CUDA_COUNTS.get_ptr_mut(tgid) {
        // SAFETY: a map value; a lost increment under a same-instant race is accepted (module
        // docs).
        unsafe {
            if graph {
                (*c).graph_launches += 1;
            } else {
                (*c).launches += 1;
            }
        }
        return 0;
    }
    let first = CudaCounts {
        launches: u32::from(!graph),
        graph_launches: u32::from(graph),
    };
    if CUDA_COUNTS
        .insert(tgid, first, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another thread created it meanwhile (its count stands), or the map is full.
        // SAFETY: presence check only.
        if unsafe { CUDA_COUNTS.get(tgid) }.is_none() {
            bump(Stat::CudaTableFull as u32);
        }
    }
    0
}

/// A synchronisation: reports and resets the counters if anything was launched.
#[inline(always)]
fn synchronised(sync: u8) -> u32 {
    let Some(id) = current_target() else {
        return 0;
    };
    let tgid = (id >> 32) as u32;
    let Some(c) = CUDA_COUNTS.get_ptr_mut(tgid) else {
        bump(Stat::CudaSyncEmpty as u32);
        return 0;
    };
    // SAFETY: a map value of this process; read and reset in one go.
    let counts = unsafe { core::ptr::replace(c, CudaCounts::default()) };
    if counts.launches == 0 && counts.graph_launches == 0 {
        bump(Stat::CudaSyncEmpty as u32);
        return 0;
    }
    let ev = CudaSyncEvent {
        hdr: header(Kind::CudaSync, id, 0),
        launches: counts.launches,
        graph_launches: counts.graph_launches,
        sync,
        pad: [0; 7],
    };
    emit(Kind::CudaSync, &ev);
    0
}

/// `cuLaunchKernel`, `cuLaunchKernel_ptsz`, `cuLaunchKernelEx`, `cuLaunchKernelEx_ptsz`,
/// `cuLaunchCooperativeKernel`.
#[uprobe]
pub fn cuda_launch(_ctx: ProbeContext) -> u32 {
    launched(false)
}

/// `cuGraphLaunch`, `cuGraphLaunch_ptsz`.
#[uprobe]
pub fn cuda_graph_launch(_ctx: ProbeContext) -> u32 {
    launched(true)
}

/// `cuStreamSynchronize`, `cuStreamSynchronize_ptsz`.
#[uretprobe]
pub fn cuda_sync_stream(_ctx: RetProbeContext) -> u32 {
    synchronised(CUDA_SYNC_STREAM)
}

/// `cuEventSynchronize`.
#[uretprobe]
pub fn cuda_sync_event(_ctx: RetProbeContext) -> u32 {
    synchronised(CUDA_SYNC_EVENT)
}

/// `cuCtxSynchronize`.
#[uretprobe]
pub fn cuda_sync_context(_ctx: RetProbeContext) -> u32 {
    synchronised(CUDA_SYNC_CONTEXT)
}
