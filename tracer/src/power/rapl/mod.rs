//! RAPL energy counters through the perf `power` PMU (`<sysfs_root>/bus/event_source/devices/
//! power`): one system-wide counter per package and domain, opened on the CPU the PMU's
//! `cpumask` names for that package. Counts × the event's `.scale` (joules per count) give
//! energy; the kernel accumulates them in 64 bits, so they do not wrap in practice.
//!
//! Domains: `energy-pkg` (device `cpuP`, [`DeviceKind::CpuPackage`]), `energy-ram` (`dramP`,
//! [`DeviceKind::Dram`]) and `energy-psys` (`psys`, [`DeviceKind::Other`], opened once: it is
//! the whole platform and *includes* the packages and DRAM, so it must not be added to them).
//! `energy-cores` and `energy-gpu` are skipped: both are inside their package's counter.
//!
//! The sysfs files are parsed in `pmu` (not by perf-event2's `DynamicBuilder`) so the root is
//! configurable and the tests run against fake trees; the counter itself is opened here with
//! perf-event2's [`Builder`] and a [`Raw`] event whose type is set to the PMU's.
//!
//! [`DeviceKind::CpuPackage`]: crate::ledger::DeviceKind::CpuPackage
//! [`DeviceKind::Dram`]: crate::ledger::DeviceKind::Dram
//! [`DeviceKind::Other`]: crate::ledger::DeviceKind::Other

mod pmu;

use std::{io, path::Path};

use perf_event::{Builder, events::Raw};

pub use pmu::{PMU_DIR, PlannedCounter, PmuEvent, PowerPmu, parse_pmu, plan};

use super::{PowerDevice, PowerError, PowerSource, Reading, counter_or_lost, monotonic_ns};

/// RAPL counters update about every millisecond.
pub const RAPL_PERIOD_NS: u64 = 1_000_000;

/// A cumulative energy counter in the PMU's counts.
pub trait CountReader: Send {
    fn read_count(&mut self) -> io::Result<u64>;
}

impl CountReader for perf_event::Counter {
    fn read_count(&mut self) -> io::Result<u64> {
        self.read()
    }
}

/// `EACCES`-style name of an errno, for log lines.
fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES".to_owned(),
        Some(libc::EPERM) => "EPERM".to_owned(),
        Some(libc::ENOENT) => "ENOENT".to_owned(),
        Some(libc::ENODEV) => "ENODEV".to_owned(),
        Some(libc::EINVAL) => "EINVAL".to_owned(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".to_owned(),
        Some(libc::EBUSY) => "EBUSY".to_owned(),
        _ => e.to_string(),
    }
}

/// Opens one system-wide counter (pid −1) for `event` of PMU type `ty` on `cpu`, enabled.
fn open_perf(ty: u32, event: &PmuEvent, cpu: usize) -> Result<perf_event::Counter, PowerError> {
    let mut b = Builder::new(
        Raw::new(event.config)
            .config1(event.config1)
            .config2(event.config2),
    );
    b.attrs_mut().type_ = ty;
    // The RAPL PMU rejects events that exclude any mode.
    b.one_cpu(cpu)
        .any_pid()
        .exclude_kernel(false)
        .exclude_hv(false);
    let what = |e: &io::Error| {
        PowerError::Rapl(format!(
            "perf_event_open({}, type {ty}, config {:#x}, cpu {cpu}): {} ({e})",
            event.name,
            event.config,
            errno_name(e)
        ))
    };
    let mut counter = b.build().map_err(|e| what(&e))?;
    counter.enable().map_err(|e| what(&e))?;
    Ok(counter)
}

struct Channel {
    reader: Box<dyn CountReader>,
    /// Microjoules per count.
    uj_per_count: f64,
    lost: bool,
}

/// The RAPL (perf) power source.
pub struct RaplSource {
    devices: Vec<PowerDevice>,
    channels: Vec<Channel>,
}

impl std::fmt::Debug for RaplSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaplSource")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl RaplSource {
    /// Parses the power PMU under `sysfs_root` and opens its counters (root or
    /// `CAP_PERFMON`). A package counter that fails to open fails the source; DRAM and psys
    /// counters that fail are skipped with a warning.
    pub fn open(sysfs_root: &Path) -> Result<Self, PowerError> {
        let pmu = parse_pmu(sysfs_root)?;
        let planned = plan(&pmu, sysfs_root)?;
        let mut opened = Vec::new();
        for p in planned {
            match open_perf(pmu.ty, &p.event, p.cpu) {
                Ok(counter) => opened.push((p, Box::new(counter) as Box<dyn CountReader>)),
                Err(e) if !p.required => {
                    tracing::warn!("RAPL {}: skipped: {e}", p.device.name);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Self::from_readers(opened))
    }

    /// A source over already-open readers (the tests' fakes).
    pub fn from_readers(opened: Vec<(PlannedCounter, Box<dyn CountReader>)>) -> Self {
        let mut devices = Vec::new();
        let mut channels = Vec::new();
        for (p, reader) in opened {
            channels.push(Channel {
                reader,
                uj_per_count: p.event.scale * 1e6,
                lost: false,
            });
            devices.push(p.device);
        }
        Self { devices, channels }
    }
}

impl PowerSource for RaplSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    fn poll(&mut self, out: &mut Vec<Reading>) {
        for (index, ch) in self.channels.iter_mut().enumerate() {
            let ts_ns = monotonic_ns();
            let read = ch
                .reader
                .read_count()
                .map(|count| (count as f64 * ch.uj_per_count).round() as u64)
                .map_err(|e| e.to_string());
            counter_or_lost(
                out,
                &mut ch.lost,
                index,
                ts_ns,
                read,
                None,
                &format!("RAPL {}", self.devices[index].name),
            );
        }
    }

    fn counter_period_ns(&self, device: usize) -> Option<u64> {
        (device < self.devices.len()).then_some(RAPL_PERIOD_NS)
    }
}

#[cfg(test)]
mod tests;
