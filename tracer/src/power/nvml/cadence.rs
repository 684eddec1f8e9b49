//! What energy-counter reads cost, and how often the counter is read so that they stay within
//! the CPU budget ([`NvmlOptions::counter_cpu_budget`]); per-call costs for `tracer sensors`.
//!
//! [`NvmlOptions::counter_cpu_budget`]: super::NvmlOptions::counter_cpu_budget

use std::time::Instant;

use nvml_wrapper::{Nvml, structs::device::FieldId};

use super::{
    FIELD_POWER_INSTANT, FIELD_TOTAL_ENERGY, Gpu, MAX_COUNTER_INTERVAL, NvmlSource, Query, device,
    samples::PowerSamples,
};
use crate::power::{clock::thread_cpu_ns, monotonic_ns};

/// What one kind of NVML query costs on a GPU (see [`NvmlSource::call_costs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CallCost {
    pub call: &'static str,
    /// The calling thread's CPU time per call (the driver may spin while the GPU answers).
    pub cpu_us: f64,
    pub wall_us: f64,
    pub ok: bool,
}

/// Chooses how often each GPU's energy counter is read: twice per update period, unless
/// that costs more CPU than its share of `budget` (a fraction of one core for all GPUs
/// together), then as often as the share allows but at least every [`MAX_COUNTER_INTERVAL`].
/// The GPUs' first reads are spread over their interval, so that a poll never reads them all.
/// Power (buffered samples or the instant field) shapes the energy between counter reads; the
/// counter keeps the total exact.
pub(super) fn set_counter_cadence(nvml: &Nvml, gpus: &mut [Gpu], budget: f64) {
    let budget = per_gpu_budget(gpus, budget);
    let with_counter = gpus
        .iter()
        .filter(|g| g.counter != Query::Off)
        .count()
        .max(1) as u64;
    let now = monotonic_ns();
    let mut k = 0;
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
        let interval = counter_interval(gpu, cost_ns as f64, budget);
        gpu.counter_interval_ns = interval;
        gpu.counter_cost_ns = cost_ns as f64;
        gpu.next_counter_ns = now + interval * k / with_counter;
        k += 1;
        let half_period = u64::try_from(gpu.period.period.as_nanos() / 2).unwrap_or(u64::MAX);
        let level = if interval > half_period {
            tracing::Level::WARN
        } else {
            tracing::Level::INFO
        };
        let msg = format!(
            "NVML gpu{index}: an energy-counter read costs {:.0} µs of CPU; reading it every \
             {} ms to start with ({:.3}% of a core for this GPU; adjusted to what reads really \
             cost)",
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

/// Each GPU's share of the host's counter budget: the GPUs with a counter split it evenly.
fn per_gpu_budget(gpus: &[Gpu], budget: f64) -> f64 {
    let n = gpus
        .iter()
        .filter(|g| g.counter != Query::Off)
        .count()
        .max(1);
    (budget / n as f64).clamp(1e-6, 1.0)
}

/// Twice per counter period unless that costs more than `budget` at `cost_ns` per read, then
/// what the budget affords, never longer than [`MAX_COUNTER_INTERVAL`].
fn counter_interval(gpu: &Gpu, cost_ns: f64, budget: f64) -> u64 {
    let half_period = u64::try_from(gpu.period.period.as_nanos() / 2).unwrap_or(u64::MAX);
    let affordable = (cost_ns / budget) as u64;
    let cap = u64::try_from(MAX_COUNTER_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
    half_period.max(affordable).min(cap)
}

impl NvmlSource {
    /// Keeps the counter cadence within the budget as the driver's cost drifts: an average of
    /// what counter-reading polls really cost, and the interval that it affords.
    pub(super) fn account_counter_read(&mut self, index: usize, cpu_ns: u64) {
        let Some(budget) = self.counter_cpu_budget else {
            return;
        };
        let budget = per_gpu_budget(&self.gpus, budget);
        let gpu = &mut self.gpus[index];
        gpu.counter_cost_ns = if gpu.counter_cost_ns > 0.0 {
            0.8 * gpu.counter_cost_ns + 0.2 * cpu_ns as f64
        } else {
            cpu_ns as f64
        };
        let interval = counter_interval(gpu, gpu.counter_cost_ns, budget);
        // Move the next read with the new interval (it was scheduled with the old one).
        gpu.next_counter_ns = gpu
            .next_counter_ns
            .saturating_sub(gpu.counter_interval_ns)
            .saturating_add(interval);
        gpu.counter_interval_ns = interval;
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
        // What one buffered-samples read costs (the sampler's power source where the driver
        // keeps them), in steady state: after a first read, each returns the few new samples.
        // SAFETY: the handle belongs to `self.nvml`.
        let handle = unsafe { dev.handle() };
        // SAFETY: as above.
        if let Ok(mut s) = unsafe { PowerSamples::open(&self.nvml, handle, 0) } {
            // SAFETY: as above.
            let _ = unsafe { s.read(&self.nvml, handle) };
            let s = std::cell::RefCell::new(s);
            time("samples[TOTAL_POWER]", &|| {
                // SAFETY: as above.
                unsafe { s.borrow_mut().read(&self.nvml, handle).is_ok() }
            });
        }
        time("running_compute_processes", &|| {
            dev.running_compute_processes().is_ok()
        });
        costs
    }
}
