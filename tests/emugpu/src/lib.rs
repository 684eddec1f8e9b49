//! Emulated GPUs for tracer's proving ground.
//!
//! CI machines have no GPU, so the proving ground runs an emulated inference engine whose
//! "GPUs" are described here:
//!
//! * [`GpuSpec`]: the static identity of an emulated GPU (UUID, name, PCI bus id, minor number,
//!   idle and maximum power).
//! * [`PowerModel`]: how much energy an engine step costs given its batch, how long it lasts,
//!   and the ground-truth split of that energy across the requests in the step.
//! * [`SensorWriter`] / [`SensorReader`]: sensor state shared through a memory-mapped file.
//!   The engine process owns the writer, feeds it the true instantaneous power and integrates
//!   exact ground-truth energy; the writer publishes what NVML would show (an energy counter that
//!   only moves every 100 ms, a 25 ms power average refreshed every 100 ms, instant power,
//!   running processes and utilisation samples). The `nvml-emu` crate (a `libnvidia-ml.so.1`
//!   built from Rust) reads the same file through a [`SensorReader`].
//!
//! All timestamps are microseconds of `CLOCK_MONOTONIC` (see [`monotonic_us`]).

mod clock;
mod power;
mod reader;
mod shm;
mod spec;
mod writer;

pub use clock::monotonic_us;
pub use power::{PowerModel, StepCost, StepEntry};
pub use reader::{GpuIdentity, GpuSnapshot, PowerSample, SensorReader};
pub use shm::{
    COUNTER_PERIOD_US, MAX_POWER_SAMPLES, MAX_PROCESSES, MAX_UTIL_SAMPLES, POWER_AVG_PERIOD_US,
    POWER_AVG_WINDOW_US, POWER_SAMPLE_PERIOD_US, ProcessEntry, STATE_ENV, STATE_MAGIC,
    STATE_VERSION, UtilSample,
};
pub use spec::GpuSpec;
pub use writer::{SensorWriter, Ticker, spawn_ticker};

use std::fmt;

/// Errors from creating, opening or updating the shared sensor state.
#[derive(Debug)]
pub enum EmuError {
    /// An I/O or mmap failure, with what was being done.
    Io(&'static str, std::io::Error),
    /// The state file is not a sensor state file of this version.
    BadFormat(String),
    /// A GPU index out of range.
    NoSuchGpu(usize),
    /// An invalid argument (for example a spec whose strings do not fit their slots).
    Invalid(String),
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmuError::Io(what, e) => write!(f, "{what}: {e}"),
            EmuError::BadFormat(s) => write!(f, "bad sensor state file: {s}"),
            EmuError::NoSuchGpu(i) => write!(f, "no emulated GPU with index {i}"),
            EmuError::Invalid(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

impl std::error::Error for EmuError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EmuError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}
