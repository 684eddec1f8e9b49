//! Power sources: where measured energy comes from.
//!
//! Every source sits behind [`PowerSource`] so the daemon (and the tests) run without hardware.
//! Sources block (NVML calls take milliseconds), so each runs on a dedicated thread
//! ([`spawn_sampler`]) and sends [`Reading`]s to the event loop; nothing blocks the runtime.
//! Every reading is stamped in `CLOCK_MONOTONIC` nanoseconds, the probes' clock.

mod clock;
mod config;
pub mod cpu;
pub mod cpumodel;
pub mod nvml;
pub mod open;
pub mod powercap;
pub mod rapl;
mod sampler;
pub mod survey;
mod sysfs;
#[cfg(test)]
mod testutil;

use serde::Serialize;

pub use clock::{monotonic_ns, realtime_ns};
pub use config::PowerConfig;
pub use open::{OpenedSource, OpenedSources, SourceKind, open_all};
pub use sampler::{SamplerStats, spawn_sampler};

use crate::ledger::DeviceKind;

/// Errors from power sources.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// The NVML library could not be loaded or initialised (no driver, wrong path).
    #[error("NVML unavailable: {0}")]
    NvmlUnavailable(String),
    /// An NVML call failed for a device.
    #[error("NVML device {index}: {detail}")]
    Nvml { index: u32, detail: String },
    /// The hardware interface a source needs is not on this host (e.g. no `power` PMU in a VM):
    /// the chooser moves on to the next source.
    #[error("{what} at {}", path.display())]
    NotPresent {
        what: &'static str,
        path: std::path::PathBuf,
    },
    /// RAPL through perf-event failed (bad PMU description, `perf_event_open` refused).
    #[error("RAPL (perf): {0}")]
    Rapl(String),
    /// RAPL through powercap failed (no usable zone, unreadable `energy_uj`).
    #[error("powercap: {0}")]
    Powercap(String),
    /// The modelled CPU source could not read utilisation.
    #[error("CPU model: {0}")]
    CpuModel(String),
    /// A sysfs or procfs file could not be read.
    #[error("{}: {source}", path.display())]
    Sysfs {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The source is switched off in the configuration.
    #[error("{0} is off in the configuration")]
    Disabled(&'static str),
}

/// A power-measured device as a source describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerDevice {
    /// Stable name, e.g. `gpu0`.
    pub name: String,
    pub kind: DeviceKind,
    /// Figures are modelled rather than measured.
    pub estimated: bool,
    /// GPU identity (NVML): device minor number, UUID, PCI bus id.
    pub minor: Option<u32>,
    pub uuid: Option<String>,
    pub pci_bus_id: Option<String>,
    /// Counter range when the energy counter wraps.
    pub wrap_uj: Option<u64>,
}

/// One observation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "reading", rename_all = "snake_case")]
pub enum Reading {
    /// Cumulative energy counter value, read at `ts_ns`.
    Counter {
        device: usize,
        ts_ns: u64,
        energy_uj: u64,
        wrap_uj: Option<u64>,
    },
    /// Average power over `[ts_ns − window_ns, ts_ns]` (0 = instantaneous).
    Power {
        device: usize,
        ts_ns: u64,
        watts: f64,
        window_ns: u64,
    },
    /// The compute processes running on a GPU (NVML's running-process list), for binding
    /// processes the probes did not see open the device.
    Processes {
        device: usize,
        ts_ns: u64,
        pids: Vec<u32>,
    },
    /// A process's share of a GPU's SM time over `[ts_ns − window_ns, ts_ns]` (NVML process
    /// utilisation samples), for splitting a GPU between services.
    ProcessUtil {
        device: usize,
        ts_ns: u64,
        pid: u32,
        sm_percent: u32,
        window_ns: u64,
    },
    /// The device stopped answering (e.g. fell off the bus): a visible gap from here.
    Lost {
        device: usize,
        ts_ns: u64,
        reason: String,
    },
}

impl Reading {
    /// The index of the device it is about (in its source's [`PowerSource::devices`]).
    pub fn device(&self) -> usize {
        match self {
            Reading::Counter { device, .. }
            | Reading::Power { device, .. }
            | Reading::Processes { device, .. }
            | Reading::ProcessUtil { device, .. }
            | Reading::Lost { device, .. } => *device,
        }
    }

    /// The device index, to renumber readings when several sources feed one pipeline.
    pub fn device_mut(&mut self) -> &mut usize {
        match self {
            Reading::Counter { device, .. }
            | Reading::Power { device, .. }
            | Reading::Processes { device, .. }
            | Reading::ProcessUtil { device, .. }
            | Reading::Lost { device, .. } => device,
        }
    }
}

/// Pushes a counter reading, or — once per outage — a [`Reading::Lost`]: a counter that fails
/// to read is a visible gap, not a stream of errors. `lost` is the device's outage flag.
pub(crate) fn counter_or_lost(
    out: &mut Vec<Reading>,
    lost: &mut bool,
    device: usize,
    ts_ns: u64,
    read: Result<u64, String>,
    wrap_uj: Option<u64>,
    name: &str,
) {
    match read {
        Ok(energy_uj) => {
            *lost = false;
            out.push(Reading::Counter {
                device,
                ts_ns,
                energy_uj,
                wrap_uj,
            });
        }
        Err(reason) => {
            if !*lost {
                *lost = true;
                tracing::warn!("{name}: {reason}; a gap until it reads again");
                out.push(Reading::Lost {
                    device,
                    ts_ns,
                    reason,
                });
            }
        }
    }
}

/// A source of power readings.
pub trait PowerSource: Send {
    /// What it measures; `Reading::device` indexes this list.
    fn devices(&self) -> &[PowerDevice];
    /// Reads every device once, appending to `out`.
    fn poll(&mut self, out: &mut Vec<Reading>);
    /// How often `device`'s energy counter changes, measured or known (`None`: unknown or no
    /// counter). The ledger pins each counter update in time with it.
    fn counter_period_ns(&self, device: usize) -> Option<u64> {
        let _ = device;
        None
    }
}
