//! NVIDIA GPUs through NVML (nvml-wrapper): the total energy counter (mJ) and the instant power
//! field, per GPU, with identity (index, UUID, minor number, PCI bus id); at a slower cadence the
//! running compute processes and their SM utilisation samples.
//!
//! **Every poll** reads, per GPU, the total-energy counter ([`Reading::Counter`]) and the instant
//! power field ([`Reading::Power`], window 0), or `nvmlDeviceGetPowerUsage` (the sensor's 25 ms
//! average) where the field is not supported. A GPU whose counter is not supported (pre-Volta)
//! still gets its power readings.
//!
//! **Every [`NvmlOptions::process_interval`]** (default 1 s: these calls walk the driver's
//! process tables and cost far more than a counter read) it reads the running compute processes
//! ([`Reading::Processes`]) and the utilisation samples the driver buffered since the last
//! sample seen ([`Reading::ProcessUtil`]; NVML's `NOT_FOUND` there means "no new samples").
//! These queries failing (containers, permissions, old drivers) never stops the energy readings:
//! a permanent failure (not supported) switches the query off with one warning, a transient
//! one is warned about once and retried at the next cadence.
//!
//! **Counter period.** NVML's energy counter does not count continuously: it moves in steps
//! (every 100 ms on A100/H100). [`NvmlSource::open`] measures each GPU's step period by reading
//! the counters every 2 ms for up to a second and taking the median interval between changes,
//! because the ledger pins each counter step in time with it and because sampling must be at
//! least twice as fast as the counter to see every step ([`NvmlSource::recommended_interval`]).
//! When it cannot be measured (no counter change seen, errors, or measurement switched off in
//! [`NvmlOptions`]) the A100/H100 figure, [`DEFAULT_COUNTER_PERIOD`], is assumed and logged.
//!
//! **MIG.** With MIG enabled a GPU's energy is still measured for the whole physical GPU: NVML
//! has no per-instance energy. [`NvmlSource::mig_enabled`] says so per GPU, and opening logs a
//! warning, so that attribution across instances is known to be a split, not a measurement.
//!
//! **Clocks.** Counter readings are stamped with `CLOCK_MONOTONIC` at the read. NVML stamps
//! field values and utilisation samples in microseconds — Unix time on real drivers — so each
//! poll reads both `CLOCK_REALTIME` and `CLOCK_MONOTONIC` and converts; a stamp that is closer to
//! the monotonic clock than to wall time is taken as monotonic already (emulations), and the
//! first conversion logs which one was seen. Power stamps further than a second from both clocks
//! are not trusted: the read time is used instead. Utilisation samples can be older (they are
//! buffered between queries), so they are trusted up to a minute and dropped beyond.
//!
//! **Lost GPUs.** A GPU that stops answering (fell off the bus, driver reset) gives exactly one
//! [`Reading::Lost`] and then nothing until it answers again, when its readings resume.

mod cadence;
mod period;
mod poll;
mod samples;
mod stamp;
#[cfg(test)]
mod tests;

use std::{
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use nvml_wrapper::{Device, Nvml, error::NvmlError};

pub use cadence::CallCost;

use super::{PowerDevice, PowerError, PowerSource, Reading, clock::thread_cpu_ns, monotonic_ns};
use crate::ledger::DeviceKind;

/// The energy counter's update period on A100 and H100 (NVIDIA documents the counter as
/// updated every 100 ms there), assumed when it cannot be measured.
pub const DEFAULT_COUNTER_PERIOD: Duration = Duration::from_millis(100);
/// `NVML_FI_DEV_POWER_INSTANT`.
const FIELD_POWER_INSTANT: u32 = 186;
/// `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ, the same counter as
/// `nvmlDeviceGetTotalEnergyConsumption`).
const FIELD_TOTAL_ENERGY: u32 = 83;

/// `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLE: u32 = 1;

/// How [`NvmlSource::open_with`] sets itself up.
#[derive(Debug, Clone)]
pub struct NvmlOptions {
    /// Path of `libnvidia-ml.so.1`; `None`: the system's (dynamic loader search path).
    pub lib: Option<PathBuf>,
    /// Measure each GPU's counter update period at open (blocks up to `measure_timeout`).
    /// `false` assumes [`DEFAULT_COUNTER_PERIOD`], for tests and fast starts.
    pub measure_counter_period: bool,
    /// How long the measurement may take at most.
    pub measure_timeout: Duration,
    /// Gap between counter reads while measuring: the measurement's resolution.
    pub measure_step: Duration,
    /// How often to read running processes and utilisation samples; `None`: never.
    pub process_interval: Option<Duration>,
    /// CPU (fraction of one core, all GPUs together) the energy-counter reads may use. On
    /// GSP-based GPUs one read costs milliseconds of CPU (3–4 ms measured on an H200), so each
    /// GPU's counter is read every `max(period / 2, cost × GPUs / budget)`, at least every
    /// [`MAX_COUNTER_INTERVAL`], and the GPUs' reads are spread over that interval rather than
    /// bunched in one poll. Power samples shape the energy between counter reads; the counter
    /// keeps the total exact. `None`: the counter is read every poll.
    pub counter_cpu_budget: Option<f64>,
    /// Read the driver's buffered power samples (`nvmlDeviceGetSamples`) every
    /// `samples_interval` instead of the instant power field every poll, where the driver
    /// keeps them (else instant power, as before). One call per GPU per interval replaces
    /// fifty reads a second.
    pub power_samples: bool,
    /// How often the buffered samples are read; shortened by itself if the driver's buffer
    /// overflows between reads.
    pub samples_interval: Duration,
}

/// The longest gap between two reads of a GPU's energy counter, whatever the budget: records
/// are final only once the counter has been read past their end.
pub const MAX_COUNTER_INTERVAL: Duration = Duration::from_secs(10);

impl Default for NvmlOptions {
    fn default() -> Self {
        Self {
            lib: None,
            measure_counter_period: true,
            measure_timeout: Duration::from_secs(1),
            measure_step: Duration::from_millis(2),
            process_interval: Some(Duration::from_secs(1)),
            counter_cpu_budget: Some(0.005),
            power_samples: true,
            samples_interval: Duration::from_millis(500),
        }
    }
}

/// How often a GPU's energy counter changes value, and how that is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterPeriod {
    pub period: Duration,
    /// Measured at open; `false`: [`DEFAULT_COUNTER_PERIOD`] assumed.
    pub measured: bool,
}

/// The state of a query that may be unsupported or failing on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    Answering,
    /// Failed last time (warned once); retried.
    Failing,
    /// Not supported by this GPU or driver (warned once); not asked again.
    Off,
}

/// One GPU's state between polls.
#[derive(Debug)]
struct Gpu {
    /// The NVML handle's address (see [`device`]); `None` until a lookup succeeds.
    handle: Option<usize>,
    lost: bool,
    mig: bool,
    /// The total-energy counter (only ever `Answering` or `Off`: a failing read is a loss).
    counter: Query,
    /// The instant power field (`Off`: the averaged power is read instead).
    instant: Query,
    /// Energy and instant power in one `nvmlDeviceGetFieldValues` call (one driver round trip
    /// instead of two); `Off` after it fails once, then the separate calls are used.
    combined: Query,
    period: CounterPeriod,
    /// How often the energy counter is read (see [`NvmlOptions::counter_cpu_budget`]); 0: every
    /// poll.
    counter_interval_ns: u64,
    /// When the next counter read is due (`CLOCK_MONOTONIC` ns).
    next_counter_ns: u64,
    /// Average CPU cost of a counter-reading poll, ns (0 until measured).
    counter_cost_ns: f64,
    processes: Query,
    utilisation: Query,
    /// Newest utilisation sample stamp seen (NVML µs), passed back so samples are not repeated.
    util_last_seen_us: u64,
    /// The energy field's stamps: whether they hold across reads (see [`stamp::EnergyStamps`]).
    energy_stamps: stamp::EnergyStamps,
    /// The driver's buffered power samples, where used (see [`NvmlOptions::power_samples`]).
    samples: Option<samples::PowerSamples>,
}

/// The NVML power source.
pub struct NvmlSource {
    nvml: Nvml,
    devices: Vec<PowerDevice>,
    gpus: Vec<Gpu>,
    process_interval_ns: Option<u64>,
    /// See [`NvmlOptions::counter_cpu_budget`].
    counter_cpu_budget: Option<f64>,
    /// When the next process/utilisation query is due (`CLOCK_MONOTONIC` ns).
    next_process_ns: u64,
    field_clock_logged: bool,
    util_clock_logged: bool,
    samples_clock_logged: bool,
}

impl fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmlSource")
            .field("devices", &self.devices)
            .field("gpus", &self.gpus)
            .finish_non_exhaustive()
    }
}

/// A clear account of why NVML could not be loaded or initialised.
fn unavailable(lib: Option<&Path>, e: &NvmlError) -> PowerError {
    let which = lib.map_or_else(
        || "libnvidia-ml.so.1 (from the loader's search path)".to_owned(),
        |p| p.display().to_string(),
    );
    let detail = match e {
        NvmlError::LibloadingError(err) => format!(
            "cannot load {which}: {err}; is the NVIDIA driver installed? (point power.nvml_lib \
             or --nvml-lib at libnvidia-ml.so.1)"
        ),
        NvmlError::FailedToLoadSymbol(sym) => {
            format!("{which} lacks an NVML entry point ({sym}): driver too old?")
        }
        NvmlError::DriverNotLoaded => format!(
            "{which} loaded, but nvmlInit says the NVIDIA kernel driver is not loaded (no GPU, \
             or the driver is not running)"
        ),
        NvmlError::NoPermission => {
            format!("{which} loaded, but nvmlInit was refused: no permission to the GPUs")
        }
        other => format!("{which} loaded, but NVML failed: {other}"),
    };
    PowerError::NvmlUnavailable(detail)
}

/// Errors after which asking again is pointless: the GPU or driver cannot do it.
fn is_permanent(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::NoPermission
    )
}

/// The GPU's device wrapper, looking its handle up once and reusing it: handles stay valid
/// while NVML is initialised, and the lookup would otherwise add a driver call per GPU per poll.
fn device<'n>(nvml: &'n Nvml, gpu: &mut Gpu, index: usize) -> Result<Device<'n>, NvmlError> {
    if let Some(addr) = gpu.handle {
        // SAFETY: `addr` is the address of a handle this `Nvml` returned (below), valid until
        // it shuts down, which happens only when `nvml` is dropped. The handle is opaque:
        // only NVML dereferences it.
        return Ok(unsafe { Device::new(std::ptr::with_exposed_provenance_mut(addr), nvml) });
    }
    let d = nvml.device_by_index(index as u32)?;
    // SAFETY: reading the handle only, to store it; it is never dereferenced here.
    gpu.handle = Some(unsafe { d.handle() }.expose_provenance());
    Ok(d)
}

impl NvmlSource {
    /// Loads NVML (`lib`: a path to `libnvidia-ml.so.1`, or the system's) and lists its GPUs,
    /// measuring their counter periods (up to a second) and reading processes every second:
    /// [`NvmlOptions::default`].
    pub fn open(lib: Option<&PathBuf>) -> Result<Self, PowerError> {
        Self::open_with(&NvmlOptions {
            lib: lib.cloned(),
            ..NvmlOptions::default()
        })
    }

    /// Loads NVML and lists its GPUs as `options` say.
    ///
    /// Fails with [`PowerError::NvmlUnavailable`] when the library cannot be loaded or NVML
    /// cannot be initialised (no driver). A GPU that does not answer at open is still listed
    /// (without identity) and reported [`Reading::Lost`] until it answers: dropping it would
    /// shift what the daemon knows about the others.
    pub fn open_with(options: &NvmlOptions) -> Result<Self, PowerError> {
        let lib = options.lib.as_deref();
        let nvml = match lib {
            Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
            None => Nvml::init(),
        }
        .map_err(|e| unavailable(lib, &e))?;
        let count = nvml.device_count().map_err(|e| unavailable(lib, &e))?;
        let mut devices = Vec::new();
        let mut gpus = Vec::new();
        for index in 0..count {
            let mut gpu = Gpu {
                handle: None,
                lost: false,
                mig: false,
                counter: Query::Answering,
                instant: Query::Answering,
                combined: Query::Answering,
                counter_interval_ns: 0,
                next_counter_ns: 0,
                counter_cost_ns: 0.0,
                period: CounterPeriod {
                    period: DEFAULT_COUNTER_PERIOD,
                    measured: false,
                },
                processes: Query::Answering,
                utilisation: Query::Answering,
                util_last_seen_us: 0,
                energy_stamps: stamp::EnergyStamps::default(),
                samples: None,
            };
            let mut dev = PowerDevice {
                name: format!("gpu{index}"),
                kind: DeviceKind::Gpu,
                estimated: false,
                minor: None,
                uuid: None,
                pci_bus_id: None,
                wrap_uj: None,
            };
            match device(&nvml, &mut gpu, index as usize) {
                Ok(d) => {
                    dev.minor = d.minor_number().ok();
                    dev.uuid = d.uuid().ok();
                    dev.pci_bus_id = d.pci_info().ok().map(|p| p.bus_id);
                    // Errors (NotSupported on GPUs without MIG, old drivers): MIG is off.
                    gpu.mig = d.mig_mode().is_ok_and(|m| m.current == MIG_ENABLE);
                    if gpu.mig {
                        tracing::warn!(
                            "MIG enabled on gpu{index}: energy is measured per physical GPU and \
                             cannot be attributed per MIG instance"
                        );
                    }
                    if let Err(e) = d.total_energy_consumption()
                        && is_permanent(&e)
                    {
                        gpu.counter = Query::Off;
                        tracing::warn!(
                            "NVML gpu{index}: no total-energy counter ({e}); its energy comes \
                             from power readings alone"
                        );
                    }
                }
                Err(e) => tracing::warn!(
                    "NVML gpu{index} does not answer at start ({e}); listed without identity, \
                     retried every poll"
                ),
            }
            devices.push(dev);
            gpus.push(gpu);
        }
        period::set_counter_periods(&nvml, &mut gpus, options);
        if options.power_samples {
            samples::open_samples(&nvml, &mut gpus, options.samples_interval);
        }
        if let Some(budget) = options.counter_cpu_budget {
            cadence::set_counter_cadence(&nvml, &mut gpus, budget);
        }
        Ok(Self {
            nvml,
            devices,
            gpus,
            process_interval_ns: options
                .process_interval
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            counter_cpu_budget: options.counter_cpu_budget.map(|b| b.clamp(1e-4, 1.0)),
            next_process_ns: 0,
            field_clock_logged: false,
            util_clock_logged: false,
            samples_clock_logged: false,
        })
    }

    /// How often `device`'s energy counter is read (`None`: every poll, or no such device).
    pub fn counter_interval(&self, device: usize) -> Option<Duration> {
        let gpu = self.gpus.get(device)?;
        (gpu.counter_interval_ns > 0).then(|| Duration::from_nanos(gpu.counter_interval_ns))
    }

    /// `device`'s counter period, measured or assumed (`None`: no such device, or it has no
    /// counter).
    pub fn counter_period(&self, device: usize) -> Option<CounterPeriod> {
        let gpu = self.gpus.get(device)?;
        (gpu.counter != Query::Off).then_some(gpu.period)
    }

    /// The sampling period to use: half the fastest counter period (sampling at least twice
    /// per counter step is what lets every step be seen and pinned in time), at least 1 ms.
    /// Half of [`DEFAULT_COUNTER_PERIOD`] when no GPU has a counter.
    pub fn recommended_interval(&self) -> Duration {
        let fastest = (0..self.gpus.len())
            .filter_map(|d| self.counter_period(d))
            .map(|p| p.period)
            .min()
            .unwrap_or(DEFAULT_COUNTER_PERIOD);
        (fastest / 2).max(Duration::from_millis(1))
    }

    /// How often `device`'s buffered power samples are read (`None`: not used, instant power
    /// is polled instead).
    pub fn samples_interval(&self, device: usize) -> Option<Duration> {
        let s = self.gpus.get(device)?.samples.as_ref()?;
        Some(Duration::from_nanos(s.interval_ns))
    }

    /// Whether `device` runs in MIG mode: its energy covers the physical GPU, all instances.
    pub fn mig_enabled(&self, device: usize) -> bool {
        self.gpus.get(device).is_some_and(|g| g.mig)
    }
}

impl PowerSource for NvmlSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    /// Energy and power of every GPU first (their stamps matter most), then, when due,
    /// processes and utilisation.
    fn poll(&mut self, out: &mut Vec<Reading>) {
        for index in 0..self.gpus.len() {
            if self.gpus[index].samples.is_some() {
                // Accounts its own counter reads.
                self.poll_buffered(index, out);
                continue;
            }
            let due = monotonic_ns() >= self.gpus[index].next_counter_ns;
            let c0 = thread_cpu_ns();
            self.poll_energy(index, out);
            if due {
                self.account_counter_read(index, thread_cpu_ns().saturating_sub(c0));
            }
        }
        if let Some(interval) = self.process_interval_ns {
            let now = monotonic_ns();
            if now >= self.next_process_ns {
                self.next_process_ns = now.saturating_add(interval);
                for index in 0..self.gpus.len() {
                    self.poll_processes(index, out);
                }
            }
        }
    }

    fn counter_period_ns(&self, device: usize) -> Option<u64> {
        self.counter_period(device)
            .map(|p| u64::try_from(p.period.as_nanos()).unwrap_or(u64::MAX))
    }
}
