//! The CUDA step clock: uprobes on the CUDA driver API (`libcuda.so`), attached per (library,
//! process). Launches are counted in the kernel; a synchronisation after launches is one
//! [`Kind::CudaSync`](tracer_ebpf::abi::Kind::CudaSync) record.

use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::programs::{
    UProbe,
    uprobe::{UProbeLinkId, UProbeScope},
};
use tracer_ebpf::abi::CudaCounts;

use super::{ProbeError, Probes};
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

/// The uprobe programs, each loaded once (on the first attach).
const CUDA_PROGRAMS: [&str; 5] = [
    "cuda_launch",
    "cuda_graph_launch",
    "cuda_sync_stream",
    "cuda_sync_event",
    "cuda_sync_context",
];

/// A library and the process it is probed for (`None`: every process).
type Site = (PathBuf, Option<Pid>);

/// The step clock's uprobes, per library and process.
#[derive(Debug, Default)]
pub(super) struct CudaLinks {
    /// (library, process) → (program, link) per attached symbol.
    attached: std::collections::BTreeMap<Site, Vec<(&'static str, UProbeLinkId)>>,
    loaded: bool,
}

impl Probes {
    fn uprobe(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        self.ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram(name))?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })
    }

    /// Attaches the step clock to every driver API symbol `library` exports, for `pid` (or
    /// every process using the library when `None`; the programs still keep to targets).
    /// Symbols the library lacks are skipped; returns how many were attached. Attaching the
    /// same (library, process) twice is a no-op that returns 0.
    pub fn attach_cuda(&mut self, library: &Path, pid: Option<Pid>) -> Result<usize, ProbeError> {
        let key = (library.to_path_buf(), pid);
        if self.cuda.attached.contains_key(&key) {
            return Ok(0);
        }
        if !self.cuda.loaded {
            for name in CUDA_PROGRAMS {
                self.uprobe(name)?
                    .load()
                    .map_err(|source| ProbeError::Program { name, source })?;
            }
            self.cuda.loaded = true;
        }
        let scope = match pid.and_then(|p| NonZeroU32::new(p.0)) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        let mut last_error = None;
        for &(symbol, name) in CUDA_SYMBOLS {
            match self.uprobe(name)?.attach(symbol, library, scope) {
                Ok(link) => links.push((name, link)),
                Err(e) => {
                    tracing::debug!("{}: {symbol} not attached: {e}", library.display());
                    last_error = Some((name, e));
                }
            }
        }
        if links.is_empty() {
            return Err(match last_error {
                Some((name, source)) => ProbeError::CudaLibrary {
                    library: library.to_path_buf(),
                    source: Box::new(ProbeError::Program { name, source }),
                },
                None => ProbeError::MissingProgram("cuda_launch"),
            });
        }
        let n = links.len();
        self.cuda.attached.insert(key, links);
        Ok(n)
    }

    /// Detaches the step clock from a process (every library), e.g. when it exited. Returns
    /// how many uprobes were detached.
    pub fn detach_cuda(&mut self, pid: Pid) -> Result<usize, ProbeError> {
        let keys: Vec<Site> = self
            .cuda
            .attached
            .keys()
            .filter(|(_, p)| *p == Some(pid))
            .cloned()
            .collect();
        let mut n = 0;
        for key in keys {
            for (name, link) in self.cuda.attached.remove(&key).unwrap_or_default() {
                self.uprobe(name)?
                    .detach(link)
                    .map_err(|source| ProbeError::Program { name, source })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The (library, process) pairs the step clock is attached to.
    pub fn cuda_attached(&self) -> Vec<Site> {
        self.cuda.attached.keys().cloned().collect()
    }

    /// A process's launch counters since its last reported synchronisation, if it has any.
    pub fn cuda_counts(&mut self, tgid: u32) -> Result<Option<CudaCounts>, ProbeError> {
        let map = self.hash::<u32, CudaCounts>("CUDA_COUNTS")?;
        Ok(map.get(&tgid, 0).ok())
    }
}
