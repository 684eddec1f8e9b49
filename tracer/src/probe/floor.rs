//! The empty-program floor: one program that returns at once, attached to every tracepoint in
//! [`TRACEPOINTS`]. What a process pays with it attached is what any eBPF tracer on those
//! tracepoints costs (the kernel's tracepoint and program dispatch); the benchmark holds the
//! probes' tax for processes that are not targets to this floor, measured in the same run.

use aya::EbpfLoader;

use super::{PROBES_OBJECT, ProbeError, TRACEPOINTS, ensure_tracefs, loaded_tracepoint};

/// The floor program, attached until dropped.
pub struct Floor {
    _ebpf: aya::Ebpf,
}

impl Floor {
    /// Loads the object's empty program and attaches it to every tracepoint the daemon uses.
    pub fn attach() -> Result<Self, ProbeError> {
        ensure_tracefs()?;
        let mut ebpf = EbpfLoader::new().load(PROBES_OBJECT)?;
        let name = "floor";
        let program = loaded_tracepoint(&mut ebpf, name)?;
        for &(category, tracepoint) in TRACEPOINTS {
            program
                .attach(category, tracepoint)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { _ebpf: ebpf })
    }
}
