//! The CUDA step clock: uprobes on the CUDA driver API (`libcuda.so`), attached per (library,
//! process). Launches are counted in the kernel; a synchronisation after launches is one
//! [`Kind::CudaSync`](tracer_ebpf::abi::Kind::CudaSync) record.

use std::path::Path;

use tracer_ebpf::abi::CudaCounts;

use super::{
    ProbeError, Probes,
    uprobes::{Family, Site},
};
use crate::ids::Pid;

/// Every driver API symbol the step clock hooks, with the program attached to it.
pub const CUDA_SYMBOLS: &[(&str, &str)] = &[
    ("cuLaunchKernel", "cuda_launch"),
    ("cuLaunchKernel_ptsz", "cuda_launch"),
    ("cuLaunchKernelEx", "cuda_launch"),
    ("cuLaunchKernelEx_ptsz", "cuda_launch"),
    ("cuLaunchCooperativeKernel", "cuda_launch"),
    ("cuGraphLaunch", "cuda_graph_launch"),
    ("cuGraphLaunch_ptsz", "cuda_graph_launch"),
    ("cuStreamSynchronize", "cuda_sync_stream"),
    ("cuStreamSynchronize_ptsz", "cuda_sync_stream"),
    ("cuEventSynchronize", "cuda_sync_event"),
    ("cuCtxSynchronize", "cuda_sync_context"),
];

static CUDA: Family = Family {
    name: "CUDA",
    symbols: CUDA_SYMBOLS,
    programs: &[
        "cuda_launch",
        "cuda_graph_launch",
        "cuda_sync_stream",
        "cuda_sync_event",
        "cuda_sync_context",
    ],
};

impl Probes {
    /// Attaches the step clock to every driver API symbol `library` exports, for `pid` (or
    /// every process using the library when `None`; the programs still keep to targets).
    /// Symbols the library lacks are skipped; returns how many were attached. Attaching the
    /// same (library, process) twice is a no-op that returns 0.
    pub fn attach_cuda(&mut self, library: &Path, pid: Option<Pid>) -> Result<usize, ProbeError> {
        self.attach_family(&CUDA, library, pid)
    }

    /// Detaches the step clock from a process (every library), e.g. when it exited. Returns
    /// how many uprobes were detached.
    pub fn detach_cuda(&mut self, pid: Pid) -> Result<usize, ProbeError> {
        self.detach_family(&CUDA, pid)
    }

    /// The (library, process) pairs the step clock is attached to.
    pub fn cuda_attached(&self) -> Vec<Site> {
        self.family_attached(&CUDA)
    }

    /// A process's launch counters since its last reported synchronisation, if it has any.
    pub fn cuda_counts(&mut self, tgid: u32) -> Result<Option<CudaCounts>, ProbeError> {
        let map = self.hash::<u32, CudaCounts>("CUDA_COUNTS")?;
        Ok(map.get(&tgid, 0).ok())
    }
}
