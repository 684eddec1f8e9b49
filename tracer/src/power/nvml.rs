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

use std::{
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Device, Nvml, enums::device::SampleValue, error::NvmlError,
    struct_wrappers::device::FieldValueSample, structs::device::FieldId,
};

use super::{
    PowerDevice, PowerError, PowerSource, Reading, monotonic_ns, realtime_ns, thread_cpu_ns,
};
use crate::ledger::DeviceKind;

/// The energy counter's update period on A100 and H100 (NVIDIA documents the counter as
/// updated every 100 ms there), assumed when it cannot be measured.
pub const DEFAULT_COUNTER_PERIOD: Duration = Duration::from_millis(100);
/// Power stamps further than this from both clocks are not trusted.
const TRUST_NS: u64 = 1_000_000_000;
/// Utilisation samples older than this (or stamped on neither clock) are dropped.
const UTIL_TRUST_NS: u64 = 60_000_000_000;
/// `NVML_FI_DEV_POWER_INSTANT`.
const FIELD_POWER_INSTANT: u32 = 186;
/// `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ, the same counter as
/// `nvmlDeviceGetTotalEnergyConsumption`).
const FIELD_TOTAL_ENERGY: u32 = 83;

/// What one kind of NVML query costs on a GPU (see [`NvmlSource::call_costs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CallCost {
    pub call: &'static str,
    /// The calling thread's CPU time per call (the driver may spin while the GPU answers).
    pub cpu_us: f64,
    pub wall_us: f64,
    pub ok: bool,
}

/// Watts from a power field or `power_usage` value (mW).
fn field_watts(value: &SampleValue) -> f64 {
    match *value {
        SampleValue::U32(mw) => f64::from(mw) / 1000.0,
        SampleValue::U64(mw) => mw as f64 / 1000.0,
        SampleValue::F64(mw) => mw / 1000.0,
        SampleValue::I64(mw) => mw as f64 / 1000.0,
    }
}

/// Millijoules from an energy field value.
fn field_mj(value: &SampleValue) -> Option<u64> {
    match *value {
        SampleValue::U64(v) => Some(v),
        SampleValue::U32(v) => Some(u64::from(v)),
        SampleValue::I64(v) => u64::try_from(v).ok(),
        SampleValue::F64(v) => (v >= 0.0).then_some(v as u64),
    }
}

/// `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLE: u32 = 1;
/// Counter changes to wait for while measuring the period: three intervals for the median.
const CHANGES_WANTED: usize = 4;
/// Fewest intervals a measured period may rest on.
const MIN_INTERVALS: usize = 2;
/// Window of `nvmlDeviceGetPowerUsage`'s average on A100/H100.
const POWER_USAGE_WINDOW_NS: u64 = 25_000_000;

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
    /// CPU (fraction of one core, per GPU) the energy-counter reads may use. On GSP-based GPUs
    /// one read costs milliseconds of CPU (3–4 ms measured on an H200), so the counter is read
    /// every `max(period / 2, cost / budget)`, at least once a second, while the cheap instant
    /// power field is read every poll. With the default, 0.5 %, a GPU's whole sampler took 1.2 %
    /// of a core on the H200 (instant power at 50 Hz is another 0.5 %). `None`: the counter is
    /// read every poll.
    pub counter_cpu_budget: Option<f64>,
}

impl Default for NvmlOptions {
    fn default() -> Self {
        Self {
            lib: None,
            measure_counter_period: true,
            measure_timeout: Duration::from_secs(1),
            measure_step: Duration::from_millis(2),
            process_interval: Some(Duration::from_secs(1)),
            counter_cpu_budget: Some(0.005),
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

/// Which clock NVML's µs stamps were found to be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StampClock {
    Wall,
    Monotonic,
}

/// Converts an NVML stamp (µs; wall-clock on real drivers, monotonic on emulations) to
/// `CLOCK_MONOTONIC` ns, given both clocks read at about the same moment. `None` when the stamp
/// is further than `trust_ns` from both: garbage, or a clock we do not know.
fn stamp_to_monotonic(
    stamp_us: u64,
    mono_now: u64,
    real_now: u64,
    trust_ns: u64,
) -> Option<(u64, StampClock)> {
    let stamp = stamp_us.saturating_mul(1000);
    let from_real = stamp.abs_diff(real_now);
    let from_mono = stamp.abs_diff(mono_now);
    if from_real <= from_mono && from_real < trust_ns {
        let ts = i128::from(mono_now) + i128::from(stamp) - i128::from(real_now);
        Some((u64::try_from(ts).unwrap_or(0), StampClock::Wall))
    } else if from_mono < trust_ns {
        Some((stamp, StampClock::Monotonic))
    } else {
        None
    }
}

/// Logs once which clock a kind of NVML stamp is on.
fn log_clock(logged: &mut bool, what: &str, clock: Option<StampClock>) {
    if !*logged {
        *logged = true;
        let which = match clock {
            Some(StampClock::Wall) => "wall-clock",
            Some(StampClock::Monotonic) => "monotonic",
            None => "on neither clock (not trusted)",
        };
        tracing::info!("NVML {what} timestamps are {which}");
    }
}

/// The counter period from the times (ns) at which a counter was seen to change: the median
/// interval, rounded to whole milliseconds (the reads are a couple of milliseconds apart, so
/// finer digits are noise). `None` with fewer than [`MIN_INTERVALS`] intervals or an absurd
/// result.
fn period_from_changes(changes_ns: &[u64]) -> Option<Duration> {
    let mut intervals: Vec<u64> = changes_ns
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    if intervals.len() < MIN_INTERVALS {
        return None;
    }
    intervals.sort_unstable();
    let mid = intervals.len() / 2;
    let median = if intervals.len().is_multiple_of(2) {
        u64::midpoint(intervals[mid - 1], intervals[mid])
    } else {
        intervals[mid]
    };
    let ms = (median + 500_000) / 1_000_000;
    (ms >= 1).then(|| Duration::from_millis(ms))
}

/// Per GPU, the times a counter was seen to change, or why it could not be watched.
type Changes = Result<Vec<u64>, String>;

/// Reads every GPU's energy counter each `step` until each has changed [`CHANGES_WANTED`]
/// times or `timeout` passes. All GPUs are watched together so that opening eight GPUs costs
/// no more than opening one. A change is dated midway between the read that saw it and the one
/// before, which halves the error of dating it at either.
fn watch_counters(
    nvml: &Nvml,
    gpus: &mut [Gpu],
    step: Duration,
    timeout: Duration,
) -> Vec<Changes> {
    struct Watch {
        last: Option<(u64, u64)>,
        changes: Changes,
    }
    let mut watches: Vec<Watch> = gpus
        .iter()
        .map(|g| Watch {
            last: None,
            changes: if g.counter == Query::Off {
                Err("no energy counter".to_owned())
            } else {
                Ok(Vec::new())
            },
        })
        .collect();
    let start = Instant::now();
    loop {
        for (index, (gpu, w)) in gpus.iter_mut().zip(&mut watches).enumerate() {
            let Ok(changes) = &mut w.changes else {
                continue;
            };
            if changes.len() >= CHANGES_WANTED {
                continue;
            }
            let read = device(nvml, gpu, index).and_then(|d| d.total_energy_consumption());
            let now = monotonic_ns();
            match read {
                Ok(mj) => {
                    if let Some((prev_mj, prev_ns)) = w.last
                        && mj != prev_mj
                    {
                        changes.push(u64::midpoint(prev_ns, now));
                    }
                    w.last = Some((mj, now));
                }
                Err(e) => w.changes = Err(e.to_string()),
            }
        }
        let done = watches.iter().all(|w| {
            w.changes
                .as_ref()
                .map_or(true, |c| c.len() >= CHANGES_WANTED)
        });
        if done || start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(step);
    }
    watches.into_iter().map(|w| w.changes).collect()
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
        Self::set_counter_periods(&nvml, &mut gpus, options);
        if let Some(budget) = options.counter_cpu_budget {
            Self::set_counter_cadence(&nvml, &mut gpus, budget);
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
        })
    }

    /// Measures (or assumes) each GPU's counter period and logs which.
    fn set_counter_periods(nvml: &Nvml, gpus: &mut [Gpu], options: &NvmlOptions) {
        let default_ms = DEFAULT_COUNTER_PERIOD.as_millis();
        if !options.measure_counter_period {
            if !gpus.is_empty() {
                tracing::info!(
                    "NVML: energy counter periods not measured (switched off); assuming \
                     {default_ms} ms (A100/H100)"
                );
            }
            return;
        }
        let watched = watch_counters(nvml, gpus, options.measure_step, options.measure_timeout);
        for (index, (gpu, changes)) in gpus.iter_mut().zip(watched).enumerate() {
            let measured = match &changes {
                Ok(c) => period_from_changes(c)
                    .ok_or_else(|| format!("{} changes in {:?}", c.len(), options.measure_timeout)),
                Err(e) => Err(e.clone()),
            };
            match measured {
                Ok(period) => {
                    gpu.period = CounterPeriod {
                        period,
                        measured: true,
                    };
                    tracing::info!(
                        "NVML gpu{index}: energy counter updates every {} ms (measured)",
                        period.as_millis()
                    );
                }
                Err(why) => tracing::warn!(
                    "NVML gpu{index}: could not measure the energy counter's period ({why}); \
                     assuming {default_ms} ms (A100/H100)"
                ),
            }
        }
    }

    /// Chooses how often each GPU's energy counter is read: twice per update period, unless
    /// that costs more CPU than `budget` (a fraction of one core), then as often as the budget
    /// allows but at least once a second. The instant power field, read every poll, shapes the
    /// energy between counter reads; the counter keeps the total exact.
    fn set_counter_cadence(nvml: &Nvml, gpus: &mut [Gpu], budget: f64) {
        let budget = budget.clamp(1e-4, 1.0);
        for (index, gpu) in gpus.iter_mut().enumerate() {
            if gpu.counter == Query::Off {
                continue;
            }
            let Ok(dev) = device(nvml, gpu, index) else {
                continue;
            };
            // The cheapest of a few reads: the first ones after the period measurement run
            // long (7-8 ms against 3.4-4.3 ms in steady state on the H200).
            let cost_ns = (0..5)
                .map(|_| {
                    let c0 = thread_cpu_ns();
                    let _ = dev.total_energy_consumption();
                    thread_cpu_ns() - c0
                })
                .min()
                .unwrap_or(0);
            let half_period = u64::try_from(gpu.period.period.as_nanos() / 2).unwrap_or(u64::MAX);
            let affordable = (cost_ns as f64 / budget) as u64;
            let interval = half_period.max(affordable).min(1_000_000_000);
            gpu.counter_interval_ns = interval;
            gpu.counter_cost_ns = cost_ns as f64;
            let level = if interval > half_period {
                tracing::Level::WARN
            } else {
                tracing::Level::INFO
            };
            let msg = format!(
                "NVML gpu{index}: an energy-counter read costs {:.0} µs of CPU; reading it every \
                 {} ms to start with ({}% of a core budget; adjusted to what reads really \
                 cost), instant power every poll",
                cost_ns as f64 / 1e3,
                interval / 1_000_000,
                budget * 100.0
            );
            if level == tracing::Level::WARN {
                tracing::warn!("{msg}");
            } else {
                tracing::info!("{msg}");
            }
        }
    }

    /// Keeps the counter cadence within the budget as the driver's cost drifts: an average of
    /// what counter-reading polls really cost, and the interval that it affords.
    fn account_counter_read(&mut self, index: usize, cpu_ns: u64) {
        let gpu = &mut self.gpus[index];
        let Some(budget) = self.counter_cpu_budget else {
            return;
        };
        gpu.counter_cost_ns = if gpu.counter_cost_ns > 0.0 {
            0.8 * gpu.counter_cost_ns + 0.2 * cpu_ns as f64
        } else {
            cpu_ns as f64
        };
        let half_period = u64::try_from(gpu.period.period.as_nanos() / 2).unwrap_or(u64::MAX);
        let affordable = (gpu.counter_cost_ns / budget) as u64;
        let interval = half_period.max(affordable).min(1_000_000_000);
        // Move the next read with the new interval (it was scheduled with the old one).
        gpu.next_counter_ns = gpu
            .next_counter_ns
            .saturating_sub(gpu.counter_interval_ns)
            .saturating_add(interval);
        gpu.counter_interval_ns = interval;
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

    /// Whether `device` runs in MIG mode: its energy covers the physical GPU, all instances.
    pub fn mig_enabled(&self, device: usize) -> bool {
        self.gpus.get(device).is_some_and(|g| g.mig)
    }

    /// What each query costs on `device`, measured over `n` calls each (diagnostics for
    /// `tracer sensors`: on GSP-based GPUs a power query can cost milliseconds of CPU).
    pub fn call_costs(&self, device: usize, n: u32) -> Vec<CallCost> {
        let Ok(dev) = self.nvml.device_by_index(device as u32) else {
            return Vec::new();
        };
        let n = n.max(1);
        let mut costs = Vec::new();
        let mut time = |call: &'static str, f: &dyn Fn() -> bool| {
            let (c0, w0) = (thread_cpu_ns(), Instant::now());
            let mut ok = true;
            for _ in 0..n {
                ok &= f();
            }
            costs.push(CallCost {
                call,
                cpu_us: (thread_cpu_ns() - c0) as f64 / f64::from(n) / 1e3,
                wall_us: w0.elapsed().as_secs_f64() * 1e6 / f64::from(n),
                ok,
            });
        };
        time("total_energy_consumption", &|| {
            dev.total_energy_consumption().is_ok()
        });
        time("field_values[POWER_INSTANT]", &|| {
            dev.field_values_for(&[FieldId(FIELD_POWER_INSTANT)])
                .is_ok()
        });
        time("field_values[TOTAL_ENERGY, POWER_INSTANT]", &|| {
            dev.field_values_for(&[FieldId(FIELD_TOTAL_ENERGY), FieldId(FIELD_POWER_INSTANT)])
                .is_ok()
        });
        time("power_usage", &|| dev.power_usage().is_ok());
        time("running_compute_processes", &|| {
            dev.running_compute_processes().is_ok()
        });
        costs
    }

    /// Energy and instant power in one field-values call. `true` when both came back (and were
    /// pushed); `false` leaves the separate calls to do the work.
    fn poll_combined(
        &mut self,
        index: usize,
        mono: u64,
        real: u64,
        out: &mut Vec<Reading>,
    ) -> bool {
        let gpu = &mut self.gpus[index];
        if gpu.combined == Query::Off || gpu.counter == Query::Off || gpu.instant == Query::Off {
            return false;
        }
        let Ok(dev) = device(&self.nvml, gpu, index) else {
            return false;
        };
        let fields = [FieldId(FIELD_TOTAL_ENERGY), FieldId(FIELD_POWER_INSTANT)];
        let samples = match dev.field_values_for(&fields) {
            Ok(s) => s,
            Err(e) => {
                if is_permanent(&e) {
                    gpu.combined = Query::Off;
                }
                // Transient (a lost GPU): the separate calls report it.
                return false;
            }
        };
        let mut values = samples.into_iter().map(|s| {
            s.and_then(
                |FieldValueSample {
                     timestamp, value, ..
                 }| Ok((timestamp, value?)),
            )
        });
        let (Some(Ok((e_stamp, e_value))), Some(Ok((p_stamp, p_value)))) =
            (values.next(), values.next())
        else {
            gpu.combined = Query::Off;
            tracing::info!(
                "NVML gpu{index}: energy and power not readable in one call; reading them apart"
            );
            return false;
        };
        let Some(energy_mj) = field_mj(&e_value) else {
            gpu.combined = Query::Off;
            return false;
        };
        let stamp = |us: i64| {
            u64::try_from(us)
                .ok()
                .and_then(|s| stamp_to_monotonic(s, mono, real, TRUST_NS))
        };
        let (e_ts, p_ts) = (stamp(e_stamp), stamp(p_stamp));
        log_clock(&mut self.field_clock_logged, "field", p_ts.map(|c| c.1));
        out.push(Reading::Counter {
            device: index,
            ts_ns: e_ts.map_or(mono, |c| c.0),
            energy_uj: energy_mj.saturating_mul(1000),
            wrap_uj: None,
        });
        out.push(Reading::Power {
            device: index,
            ts_ns: p_ts.map_or(mono, |c| c.0),
            watts: field_watts(&p_value),
            window_ns: 0,
        });
        true
    }

    /// Reads one GPU's energy and power.
    fn poll_energy(&mut self, index: usize, out: &mut Vec<Reading>) {
        let mono = monotonic_ns();
        let real = realtime_ns();
        let due = {
            let gpu = &mut self.gpus[index];
            let due = mono >= gpu.next_counter_ns;
            if due {
                gpu.next_counter_ns = mono.saturating_add(gpu.counter_interval_ns);
            }
            due
        };
        if due && self.poll_combined(index, mono, real, out) {
            let gpu = &mut self.gpus[index];
            if gpu.lost {
                gpu.lost = false;
                tracing::info!("NVML gpu{index} answers again; its readings resume");
            }
            return;
        }
        let gpu = &mut self.gpus[index];
        let dev = match device(&self.nvml, gpu, index) {
            Ok(d) => d,
            Err(e) => return mark_lost(gpu, index, mono, &e, out),
        };
        let start = out.len();
        if gpu.counter != Query::Off && due {
            match dev.total_energy_consumption() {
                Ok(energy_mj) => out.push(Reading::Counter {
                    device: index,
                    ts_ns: mono,
                    energy_uj: energy_mj.saturating_mul(1000),
                    wrap_uj: None,
                }),
                Err(e) if is_permanent(&e) => {
                    gpu.counter = Query::Off;
                    tracing::warn!(
                        "NVML gpu{index}: no total-energy counter ({e}); its energy comes from \
                         power readings alone"
                    );
                }
                Err(e) => return mark_lost(gpu, index, mono, &e, out),
            }
        }
        let mut power_err = None;
        if gpu.instant != Query::Off {
            match dev.field_values_for(&[FieldId(FIELD_POWER_INSTANT)]) {
                Ok(samples) => {
                    for sample in samples {
                        match sample.and_then(
                            |FieldValueSample {
                                 timestamp, value, ..
                             }| { Ok((timestamp, value?)) },
                        ) {
                            Ok((stamp_us, value)) => {
                                let watts = field_watts(&value);
                                let converted = u64::try_from(stamp_us)
                                    .ok()
                                    .and_then(|s| stamp_to_monotonic(s, mono, real, TRUST_NS));
                                log_clock(
                                    &mut self.field_clock_logged,
                                    "field",
                                    converted.map(|c| c.1),
                                );
                                out.push(Reading::Power {
                                    device: index,
                                    ts_ns: converted.map_or(mono, |c| c.0),
                                    watts,
                                    window_ns: 0,
                                });
                            }
                            Err(e) if is_permanent(&e) => gpu.instant = Query::Off,
                            Err(e) => power_err = Some(e),
                        }
                    }
                }
                Err(e) if is_permanent(&e) => gpu.instant = Query::Off,
                Err(e) => power_err = Some(e),
            }
        }
        let got_power = out[start..]
            .iter()
            .any(|r| matches!(r, Reading::Power { .. }));
        if !got_power {
            match dev.power_usage() {
                // power_usage: the sensor's short average (25 ms on A100/H100).
                Ok(mw) => out.push(Reading::Power {
                    device: index,
                    ts_ns: mono,
                    watts: f64::from(mw) / 1000.0,
                    window_ns: POWER_USAGE_WINDOW_NS,
                }),
                Err(e) if !is_permanent(&e) => power_err = Some(e),
                Err(_) => {}
            }
        }
        if out.len() == start {
            // Neither counter nor power: the GPU does not answer.
            let e = power_err.unwrap_or(NvmlError::NotSupported);
            return mark_lost(gpu, index, mono, &e, out);
        }
        if gpu.lost {
            gpu.lost = false;
            tracing::info!("NVML gpu{index} answers again; its readings resume");
        }
    }

    /// Reads one GPU's running processes and new utilisation samples.
    fn poll_processes(&mut self, index: usize, out: &mut Vec<Reading>) {
        let gpu = &mut self.gpus[index];
        if gpu.lost || (gpu.processes == Query::Off && gpu.utilisation == Query::Off) {
            return;
        }
        let Ok(dev) = device(&self.nvml, gpu, index) else {
            // The energy read reports the GPU lost.
            return;
        };
        if gpu.processes != Query::Off {
            let ts_ns = monotonic_ns();
            match dev.running_compute_processes() {
                Ok(list) => {
                    answered(&mut gpu.processes, index, "process list");
                    // Sorted and unique: MIG lists a process once per instance it runs in.
                    let mut pids: Vec<u32> = list.into_iter().map(|p| p.pid).collect();
                    pids.sort_unstable();
                    pids.dedup();
                    out.push(Reading::Processes {
                        device: index,
                        ts_ns,
                        pids,
                    });
                }
                Err(e) => failed(&mut gpu.processes, index, "process list", &e),
            }
        }
        if gpu.utilisation != Query::Off {
            let mono = monotonic_ns();
            let real = realtime_ns();
            match dev.process_utilization_stats(gpu.util_last_seen_us) {
                Ok(mut samples) => {
                    answered(&mut gpu.utilisation, index, "process utilisation");
                    samples.sort_by_key(|s| s.timestamp);
                    // NVML samples every process at the same moments; a sample covers the time
                    // since the previous sampling moment. The first one seen has no known start.
                    let mut prev_us = gpu.util_last_seen_us;
                    let mut current_us = gpu.util_last_seen_us;
                    for s in samples {
                        if s.timestamp <= gpu.util_last_seen_us {
                            continue;
                        }
                        if s.timestamp != current_us {
                            prev_us = current_us;
                            current_us = s.timestamp;
                        }
                        let converted = stamp_to_monotonic(s.timestamp, mono, real, UTIL_TRUST_NS);
                        log_clock(
                            &mut self.util_clock_logged,
                            "utilisation sample",
                            converted.map(|c| c.1),
                        );
                        let Some((ts_ns, _)) = converted else {
                            continue;
                        };
                        out.push(Reading::ProcessUtil {
                            device: index,
                            ts_ns,
                            pid: s.pid,
                            sm_percent: s.sm_util,
                            window_ns: if prev_us == 0 {
                                0
                            } else {
                                (s.timestamp - prev_us).saturating_mul(1000)
                            },
                        });
                    }
                    gpu.util_last_seen_us = current_us;
                }
                // No samples since the last one seen: the normal answer of an idle GPU.
                Err(NvmlError::NotFound) => {
                    answered(&mut gpu.utilisation, index, "process utilisation");
                }
                Err(e) => failed(&mut gpu.utilisation, index, "process utilisation", &e),
            }
        }
    }
}

/// Reports a GPU lost, once per loss.
fn mark_lost(gpu: &mut Gpu, index: usize, ts_ns: u64, e: &NvmlError, out: &mut Vec<Reading>) {
    if !gpu.lost {
        gpu.lost = true;
        tracing::warn!("NVML gpu{index}: {e}; its energy is a gap until it answers again");
        out.push(Reading::Lost {
            device: index,
            ts_ns,
            reason: e.to_string(),
        });
    }
}

/// A query answered: say so if it had been failing.
fn answered(q: &mut Query, index: usize, what: &str) {
    if *q == Query::Failing {
        tracing::info!("NVML gpu{index}: {what} answers again");
    }
    *q = Query::Answering;
}

/// A query failed: switch it off if it never can answer, else warn once per failure run.
/// A lost GPU is left to the energy read to report.
fn failed(q: &mut Query, index: usize, what: &str, e: &NvmlError) {
    if matches!(e, NvmlError::GpuLost) {
        return;
    }
    if is_permanent(e) {
        *q = Query::Off;
        tracing::warn!("NVML gpu{index}: no {what} ({e}); not asked again, energy unaffected");
    } else if *q == Query::Answering {
        *q = Query::Failing;
        tracing::warn!("NVML gpu{index}: {what} failed ({e}); retrying, energy unaffected");
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn period_is_the_median_interval_in_whole_ms() {
        // One interval stretched by a late read does not move the median.
        let changes = [0, 100 * MS + 300_000, 200 * MS, 330 * MS, 430 * MS];
        assert_eq!(
            period_from_changes(&changes),
            Some(Duration::from_millis(100))
        );
        // Even count: midpoint of the middle two.
        let changes = [0, 20 * MS, 40 * MS, 62 * MS, 84 * MS];
        assert_eq!(
            period_from_changes(&changes),
            Some(Duration::from_millis(21))
        );
    }

    #[test]
    fn period_needs_two_intervals() {
        assert_eq!(period_from_changes(&[]), None);
        assert_eq!(period_from_changes(&[5 * MS, 105 * MS]), None);
        assert!(period_from_changes(&[0, 100 * MS, 200 * MS]).is_some());
        // Sub-millisecond "periods" are not believed.
        assert_eq!(period_from_changes(&[0, 100, 200, 300]), None);
    }

    #[test]
    fn wall_clock_stamps_convert_to_monotonic() {
        let mono = 5_000 * MS;
        let real = 1_700_000_000_000 * MS;
        // 3 ms before now on the wall clock is 3 ms before now on the monotonic clock.
        let stamp_us = (real - 3 * MS) / 1000;
        assert_eq!(
            stamp_to_monotonic(stamp_us, mono, real, TRUST_NS),
            Some((mono - 3 * MS, StampClock::Wall))
        );
        // Slightly in the future (clock skew between the driver and us) stays consistent.
        let stamp_us = (real + 2 * MS) / 1000;
        assert_eq!(
            stamp_to_monotonic(stamp_us, mono, real, TRUST_NS),
            Some((mono + 2 * MS, StampClock::Wall))
        );
    }

    #[test]
    fn monotonic_stamps_pass_and_strays_are_refused() {
        let mono = 5_000 * MS;
        let real = 1_700_000_000_000 * MS;
        assert_eq!(
            stamp_to_monotonic((mono - 7 * MS) / 1000, mono, real, TRUST_NS),
            Some((mono - 7 * MS, StampClock::Monotonic))
        );
        // Two seconds old: not trusted for power, fine for buffered utilisation samples.
        let old_us = (mono - 2_000 * MS) / 1000;
        assert_eq!(stamp_to_monotonic(old_us, mono, real, TRUST_NS), None);
        assert_eq!(
            stamp_to_monotonic(old_us, mono, real, UTIL_TRUST_NS),
            Some((mono - 2_000 * MS, StampClock::Monotonic))
        );
        assert_eq!(stamp_to_monotonic(0, mono, real, TRUST_NS), None);
    }

    #[test]
    fn permanent_errors_are_the_unsupported_ones() {
        assert!(is_permanent(&NvmlError::NotSupported));
        assert!(is_permanent(&NvmlError::FunctionNotFound));
        assert!(!is_permanent(&NvmlError::GpuLost));
        assert!(!is_permanent(&NvmlError::Unknown));
        assert!(!is_permanent(&NvmlError::NotFound));
    }

    #[test]
    fn missing_library_message_says_what_to_do() {
        let e = unavailable(
            Some(Path::new("/nowhere/libnvidia-ml.so.1")),
            &NvmlError::DriverNotLoaded,
        );
        let PowerError::NvmlUnavailable(msg) = e else {
            panic!("wrong variant");
        };
        assert!(msg.contains("/nowhere/libnvidia-ml.so.1"), "{msg}");
        assert!(msg.contains("driver is not loaded"), "{msg}");
    }
}
