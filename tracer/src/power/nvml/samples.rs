//! The driver's buffered power samples (`nvmlDeviceGetSamples` with `NVML_TOTAL_POWER_SAMPLES`):
//! the driver samples each GPU's power on its own clock and keeps the newest ones, so one call
//! every few hundred milliseconds returns what fifty instant-power reads would have shown, for
//! one driver round trip instead of fifty. Called directly (one call into a buffer kept per GPU)
//! rather than through `Device::samples`, which asks the driver twice and allocates each time.
//!
//! Each sample is taken as the mean power since the previous one (`window_ns` = the gap), the
//! first one seen as an instant reading. The counter, read on its own cadence, keeps the total
//! exact whichever they are.

use std::time::Duration;

use nvml_wrapper::{
    Nvml,
    enum_wrappers::device::SampleValueType,
    enums::device::SampleValue,
    error::{NvmlError, nvml_sym, nvml_try},
};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlSample_t, nvmlSamplingType_enum_NVML_TOTAL_POWER_SAMPLES, nvmlValueType_t,
};

use super::{
    Gpu, NvmlSource, Query, device, is_permanent,
    poll::{answering, mark_lost, read_counter},
    stamp::{StampClock, UTIL_TRUST_NS, log_clock, stamp_to_monotonic},
};
use crate::power::{Reading, clock::thread_cpu_ns, monotonic_ns, realtime_ns};

/// One GPU's buffered-sample state.
pub(super) struct PowerSamples {
    /// The driver's buffer capacity (what the count call said); the read buffer's length.
    buf: Vec<nvmlSample_t>,
    /// Newest sample stamp seen (driver µs), passed back so samples are not repeated.
    pub last_seen_us: u64,
    /// How often the buffer is read, ns: the configured interval, longer if reads cost more
    /// than [`SAMPLES_CPU_BUDGET`] allows, never past half what the buffer holds.
    pub interval_ns: u64,
    /// The configured interval (halved when the buffer overflows between reads).
    base_ns: u64,
    /// Average CPU of a read, ns (0 until measured).
    cost_ns: f64,
    /// Time the driver's buffer spans (capacity × the gap between samples), once seen.
    span_ns: Option<u64>,
    /// When the next read is due (`CLOCK_MONOTONIC` ns).
    pub next_ns: u64,
}

/// CPU the buffered-sample reads may use, all GPUs together (fraction of one core). The call's
/// cost on a real driver is not known here (see `tests/nvml-emu/src/cost.rs`): if it is
/// dear, reads are spaced out up to half the buffer's span, where samples would start to be
/// lost, and cost what they must beyond that.
pub(super) const SAMPLES_CPU_BUDGET: f64 = 0.0025;

impl std::fmt::Debug for PowerSamples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerSamples")
            .field("capacity", &self.buf.len())
            .field("last_seen_us", &self.last_seen_us)
            .field("interval_ns", &self.interval_ns)
            .finish_non_exhaustive()
    }
}

/// A view of the samples one read returned.
pub(super) struct SampleBuf<'a>(&'a [nvmlSample_t], SampleValueType);

impl SampleBuf<'_> {
    /// `(driver µs, watts)`, oldest first as the driver returns them.
    pub fn iter(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        self.0.iter().map(|s| {
            let mw = match SampleValue::from_tag_and_union(&self.1, s.sampleValue) {
                SampleValue::U32(v) => f64::from(v),
                SampleValue::U64(v) => v as f64,
                SampleValue::F64(v) => v,
                SampleValue::I64(v) => v as f64,
            };
            (s.timeStamp, mw / 1000.0)
        })
    }
}

/// Calls `nvmlDeviceGetSamples` on `handle` for total power.
///
/// # Safety
/// `handle` is a device handle of `nvml`; `samples` is null (count query) or valid for
/// `*count` writes.
unsafe fn call(
    nvml: &Nvml,
    handle: nvmlDevice_t,
    last_seen_us: u64,
    val_type: &mut nvmlValueType_t,
    count: &mut u32,
    samples: *mut nvmlSample_t,
) -> Result<u32, NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetSamples.as_ref())?;
    // SAFETY: per the caller.
    let code = unsafe {
        sym(
            handle,
            nvmlSamplingType_enum_NVML_TOTAL_POWER_SAMPLES,
            last_seen_us,
            val_type,
            count,
            samples,
        )
    };
    nvml_try(code).map(|()| code)
}

impl PowerSamples {
    /// Asks the driver for its buffer's capacity; `Err` when it keeps no power samples (old
    /// drivers, GPUs without the sensor: the caller falls back to instant power).
    ///
    /// # Safety
    /// `handle` is a device handle of `nvml`.
    pub unsafe fn open(
        nvml: &Nvml,
        handle: nvmlDevice_t,
        interval_ns: u64,
    ) -> Result<Self, NvmlError> {
        let (mut ty, mut count) = (0, 0);
        // SAFETY: per the caller; null samples asks for the count.
        match unsafe { call(nvml, handle, 0, &mut ty, &mut count, std::ptr::null_mut()) } {
            Ok(_) | Err(NvmlError::InsufficientSize(_)) => {}
            Err(e) => return Err(e),
        }
        if count == 0 {
            return Err(NvmlError::NotSupported);
        }
        Ok(Self::with_capacity(count as usize, interval_ns))
    }

    /// A buffer of `capacity` samples, read every `interval_ns` to start with.
    fn with_capacity(capacity: usize, interval_ns: u64) -> Self {
        let zero = nvmlSample_t {
            timeStamp: 0,
            sampleValue: nvml_wrapper_sys::bindings::nvmlValue_t { ullVal: 0 },
        };
        Self {
            buf: vec![zero; capacity],
            last_seen_us: 0,
            interval_ns,
            base_ns: interval_ns,
            cost_ns: 0.0,
            span_ns: None,
            next_ns: 0,
        }
    }

    /// The driver's buffer capacity, samples.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Accounts one read (`cpu_ns`; `gap_us`: the typical gap between the samples it
    /// returned; `overran`: the buffer overflowed since the last read) and sets the interval:
    /// the configured one, or what `budget` (this GPU's share of [`SAMPLES_CPU_BUDGET`])
    /// affords, never longer than half the buffer's span.
    pub fn account(&mut self, cpu_ns: u64, gap_us: Option<u64>, overran: bool, budget: f64) {
        self.cost_ns = if self.cost_ns > 0.0 {
            0.8 * self.cost_ns + 0.2 * cpu_ns as f64
        } else {
            cpu_ns as f64
        };
        if let Some(gap) = gap_us {
            self.span_ns = Some(
                gap.saturating_mul(1000)
                    .saturating_mul(self.buf.len() as u64),
            );
        }
        if overran {
            self.base_ns = (self.base_ns / 2).max(20_000_000);
        }
        let affordable = (self.cost_ns / budget.max(1e-9)) as u64;
        let limit = self.span_ns.map_or(u64::MAX, |s| (s / 2).max(self.base_ns));
        let interval = self.base_ns.max(affordable).min(limit);
        // Move the next read with the new interval (it was scheduled with the old one).
        self.next_ns = self
            .next_ns
            .saturating_sub(self.interval_ns)
            .saturating_add(interval);
        self.interval_ns = interval;
    }

    /// Reads the samples newer than [`Self::last_seen_us`] (advancing it). `Ok` with none when
    /// the driver has nothing new (its `NOT_FOUND`).
    ///
    /// # Safety
    /// `handle` is a device handle of `nvml`.
    pub unsafe fn read(
        &mut self,
        nvml: &Nvml,
        handle: nvmlDevice_t,
    ) -> Result<SampleBuf<'_>, NvmlError> {
        let mut ty = 0;
        let mut count = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        // SAFETY: per the caller; the buffer holds `count` samples.
        let got = unsafe {
            call(
                nvml,
                handle,
                self.last_seen_us,
                &mut ty,
                &mut count,
                self.buf.as_mut_ptr(),
            )
        };
        match got {
            Ok(_) => {}
            Err(NvmlError::NotFound) => count = 0,
            Err(e) => return Err(e),
        }
        let n = (count as usize).min(self.buf.len());
        let tag = SampleValueType::try_from(ty).unwrap_or(SampleValueType::UnsignedInt);
        if let Some(newest) = self.buf[..n].iter().map(|s| s.timeStamp).max() {
            self.last_seen_us = self.last_seen_us.max(newest);
        }
        Ok(SampleBuf(&self.buf[..n], tag))
    }
}

/// Switches every GPU whose driver keeps power samples to reading them every `interval`;
/// the others keep polling instant power. Each GPU's first read starts from the driver's newest
/// sample at open, so nothing from before the daemon started is replayed.
pub(super) fn open_samples(nvml: &Nvml, gpus: &mut [Gpu], interval: Duration) {
    let interval_ns = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1_000_000);
    let n = gpus.len().max(1) as u64;
    let now = monotonic_ns();
    for (index, gpu) in gpus.iter_mut().enumerate() {
        let Ok(dev) = device(nvml, gpu, index) else {
            continue;
        };
        // SAFETY: the handle is `nvml`'s own (just looked up or cached by `device`).
        let handle = unsafe { dev.handle() };
        // SAFETY: as above.
        match unsafe { PowerSamples::open(nvml, handle, interval_ns) } {
            Ok(mut s) => {
                // SAFETY: as above.
                let _ = unsafe { s.read(nvml, handle) };
                // Spread the GPUs' reads over the interval.
                s.next_ns = now + interval_ns * index as u64 / n;
                tracing::info!(
                    "NVML gpu{index}: reading the driver's buffered power samples every {} ms \
                     (buffer of {}) instead of instant power every poll",
                    interval_ns / 1_000_000,
                    s.capacity()
                );
                gpu.samples = Some(s);
            }
            Err(e) => tracing::info!(
                "NVML gpu{index}: no buffered power samples ({e}); instant power every poll"
            ),
        }
    }
}

impl NvmlSource {
    /// One poll of a GPU whose power comes from the driver's buffered samples: the energy
    /// counter when due (its cost accounted against the budget), the samples when due, and
    /// nothing otherwise.
    pub(super) fn poll_buffered(&mut self, index: usize, out: &mut Vec<Reading>) {
        let mono = monotonic_ns();
        let samples_budget = SAMPLES_CPU_BUDGET
            / self
                .gpus
                .iter()
                .filter(|g| g.samples.is_some())
                .count()
                .max(1) as f64;
        let gpu = &mut self.gpus[index];
        let Some(samples_next_ns) = gpu.samples.as_ref().map(|s| s.next_ns) else {
            return;
        };
        let counter_due = gpu.counter != Query::Off && mono >= gpu.next_counter_ns;
        let samples_due = mono >= samples_next_ns;
        if !counter_due && !samples_due {
            return;
        }
        let dev = match device(&self.nvml, gpu, index) {
            Ok(d) => d,
            Err(e) => return mark_lost(gpu, index, mono, &e, out),
        };
        let mut failure = None;
        let mut counter_cost_ns = None;
        if counter_due {
            gpu.next_counter_ns = mono.saturating_add(gpu.counter_interval_ns);
            let c0 = thread_cpu_ns();
            let before = out.len();
            match read_counter(&dev, gpu, index, mono, out) {
                Ok(()) if out.len() > before => {
                    counter_cost_ns = Some(thread_cpu_ns().saturating_sub(c0));
                }
                Ok(()) => {}
                Err(e) => failure = Some(e),
            }
        }
        if samples_due && failure.is_none() {
            let real = realtime_ns();
            // SAFETY: the handle belongs to `self.nvml`.
            let handle = unsafe { dev.handle() };
            let Some(samples) = gpu.samples.as_mut() else {
                return;
            };
            samples.next_ns = mono.saturating_add(samples.interval_ns);
            let before_us = samples.last_seen_us;
            let capacity = samples.capacity();
            let c0 = thread_cpu_ns();
            // SAFETY: as above.
            match unsafe { samples.read(&self.nvml, handle) } {
                Ok(buf) => {
                    let got = push_samples(&buf, before_us, capacity, index, mono, real, out);
                    if let Some(clock) = got.clock {
                        log_clock(&mut self.samples_clock_logged, "power sample", Some(clock));
                    }
                    let old_ns = samples.interval_ns;
                    let cost = thread_cpu_ns().saturating_sub(c0);
                    samples.account(cost, got.gap_us, got.overran, samples_budget);
                    if got.overran {
                        tracing::warn!(
                            "NVML gpu{index}: the driver's power-sample buffer filled between \
                             two reads (some samples lost; the counter keeps the total); \
                             reading it every {} ms now",
                            samples.interval_ns / 1_000_000
                        );
                    } else if samples.interval_ns > 2 * old_ns {
                        tracing::info!(
                            "NVML gpu{index}: a power-sample read costs {} µs of CPU; reading \
                             them every {} ms",
                            cost / 1000,
                            samples.interval_ns / 1_000_000
                        );
                    }
                }
                Err(e) if is_permanent(&e) => {
                    gpu.samples = None;
                    tracing::warn!(
                        "NVML gpu{index}: buffered power samples stopped answering ({e}); \
                         instant power every poll from now on"
                    );
                }
                Err(e) => failure = Some(e),
            }
        }
        let gpu = &mut self.gpus[index];
        if let Some(e) = failure {
            return mark_lost(gpu, index, mono, &e, out);
        }
        answering(gpu, index);
        if let Some(cost) = counter_cost_ns {
            self.account_counter_read(index, cost);
        }
    }
}

/// What [`push_samples`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pushed {
    count: usize,
    /// The median gap between the read's samples (µs), where it had two or more.
    gap_us: Option<u64>,
    /// The driver's buffer overflowed since the last read (a full buffer whose oldest sample
    /// leaves a gap).
    overran: bool,
    /// The clock the stamps were found on (the first one converted).
    clock: Option<StampClock>,
}

/// Pushes one read's samples as power readings, each the mean since the sample before it
/// (the first after `before_us` = 0, or after a gap longer than four of the read's typical
/// gaps, as an instant reading).
fn push_samples(
    buf: &SampleBuf<'_>,
    before_us: u64,
    capacity: usize,
    index: usize,
    mono: u64,
    real: u64,
    out: &mut Vec<Reading>,
) -> Pushed {
    let stamps: Vec<u64> = buf.iter().map(|(us, _)| us).collect();
    let mut gaps: Vec<u64> = stamps
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    gaps.sort_unstable();
    let typical_us = gaps.get(gaps.len() / 2).copied();
    let mut prev_us = (before_us > 0).then_some(before_us);
    let mut pushed = 0;
    let mut overran = false;
    let mut clock = None;
    for (k, (us, watts)) in buf.iter().enumerate() {
        let gap = prev_us.map(|p| us.saturating_sub(p));
        let window_us = match (gap, typical_us) {
            (Some(g), Some(t)) if g > 4 * t.max(1) => {
                overran |= k == 0 && stamps.len() >= capacity;
                0
            }
            (Some(g), _) => g,
            (None, _) => 0,
        };
        prev_us = Some(us);
        let Some((ts_ns, on)) = stamp_to_monotonic(us, mono, real, UTIL_TRUST_NS) else {
            continue;
        };
        clock.get_or_insert(on);
        out.push(Reading::Power {
            device: index,
            ts_ns,
            watts,
            window_ns: window_us.saturating_mul(1000),
        });
        pushed += 1;
    }
    Pushed {
        count: pushed,
        gap_us: typical_us,
        overran,
        clock,
    }
}

#[cfg(test)]
mod tests {
    use nvml_wrapper_sys::bindings::nvmlValue_t;

    use super::*;

    fn buf(stamps_mw: &[(u64, u32)]) -> Vec<nvmlSample_t> {
        stamps_mw
            .iter()
            .map(|&(us, mw)| nvmlSample_t {
                timeStamp: us,
                sampleValue: nvmlValue_t { uiVal: mw },
            })
            .collect()
    }

    fn pushed(samples: &[nvmlSample_t], before_us: u64, capacity: usize) -> (Vec<Reading>, bool) {
        let mut out = Vec::new();
        let b = SampleBuf(samples, SampleValueType::UnsignedInt);
        // Stamps on the monotonic clock (µs), "now" just after the newest.
        let now_ns = samples.last().map_or(0, |s| s.timeStamp * 1000) + 1_000_000;
        let got = push_samples(&b, before_us, capacity, 3, now_ns, 1 << 62, &mut out);
        assert_eq!(got.count, out.len());
        (out, got.overran)
    }

    fn windows(out: &[Reading]) -> Vec<(u64, f64, u64)> {
        out.iter()
            .map(|r| match *r {
                Reading::Power {
                    device: 3,
                    ts_ns,
                    watts,
                    window_ns,
                } => (ts_ns, watts, window_ns),
                ref other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn each_sample_is_the_mean_since_the_one_before() {
        let s = buf(&[(5_020_000, 300_000), (5_040_000, 310_500), (5_060_000, 0)]);
        // Continuing from the last sample seen: the first one's window reaches back to it.
        let (out, overran) = pushed(&s, 5_000_000, 120);
        assert!(!overran);
        assert_eq!(
            windows(&out),
            [
                (5_020_000_000, 300.0, 20_000_000),
                (5_040_000_000, 310.5, 20_000_000),
                (5_060_000_000, 0.0, 20_000_000)
            ]
        );
        // Nothing seen before: the first is an instant reading.
        let (out, _) = pushed(&s, 0, 120);
        assert_eq!(windows(&out)[0].2, 0);
    }

    #[test]
    fn a_full_buffer_after_a_gap_is_an_overrun_and_the_gap_no_window() {
        let s = buf(&[
            (9_000_000, 100_000),
            (9_020_000, 100_000),
            (9_040_000, 100_000),
        ]);
        // Last seen 1 s before the oldest sample returned: what lay between is lost.
        let (out, overran) = pushed(&s, 8_000_000, 3);
        assert!(overran);
        let w = windows(&out);
        assert_eq!(w[0].2, 0, "the gap is not spread over one sample");
        assert_eq!(w[1].2, 20_000_000);
        // The same gap with room left in the buffer: the driver had nothing (idle sensor, a
        // pause), not an overrun.
        let (_, overran) = pushed(&s, 8_000_000, 120);
        assert!(!overran);
    }

    #[test]
    fn dear_reads_are_spaced_out_but_never_past_half_the_buffer() {
        const MS: u64 = 1_000_000;
        // 120 samples 20 ms apart: the buffer spans 2.4 s.
        let mut s = PowerSamples::with_capacity(120, 500 * MS);
        // Cheap reads (111 µs, 8 GPUs sharing 0.25 %): the configured 500 ms holds.
        s.account(111_000, Some(20_000), false, SAMPLES_CPU_BUDGET / 8.0);
        assert_eq!(s.interval_ns, 500 * MS);
        // Reads as dear as a counter read (4.3 ms): what the budget affords is 13.8 s, but
        // samples would be lost past 1.2 s.
        for _ in 0..30 {
            s.account(4_300_000, Some(20_000), false, SAMPLES_CPU_BUDGET / 8.0);
        }
        assert_eq!(s.interval_ns, 1_200 * MS);
        // One GPU with moderately dear reads: spaced within the span.
        let mut one = PowerSamples::with_capacity(120, 500 * MS);
        one.account(2_000_000, Some(20_000), false, SAMPLES_CPU_BUDGET);
        assert_eq!(one.interval_ns, 800 * MS);
        // An overflow halves the configured interval.
        let mut o = PowerSamples::with_capacity(120, 500 * MS);
        o.account(1_000, Some(20_000), true, SAMPLES_CPU_BUDGET);
        assert_eq!(o.interval_ns, 250 * MS);
    }

    #[test]
    fn stamps_on_no_known_clock_are_dropped() {
        let s = buf(&[(1, 100_000), (9_000_000, 100_000)]);
        let mut out = Vec::new();
        let b = SampleBuf(&s, SampleValueType::UnsignedInt);
        // "Now" is 10 minutes after the second stamp on both clocks' reading.
        let got = push_samples(&b, 0, 120, 0, 609_000_000_000, 1 << 62, &mut out);
        assert_eq!(got.count, 0, "{out:?}");
    }
}
