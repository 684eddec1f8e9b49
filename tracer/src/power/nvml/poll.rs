//! One poll of a GPU: its energy counter and power every poll (one combined field-values call
//! where the driver allows), its processes and their utilisation at the slower cadence, and
//! the bookkeeping of queries that fail and GPUs that stop answering.

use nvml_wrapper::{
    Device, enums::device::SampleValue, error::NvmlError,
    struct_wrappers::device::FieldValueSample, structs::device::FieldId,
};

use super::{
    FIELD_POWER_INSTANT, FIELD_TOTAL_ENERGY, Gpu, NvmlSource, Query, device, is_permanent,
    stamp::{TRUST_NS, UTIL_TRUST_NS, log_clock, stamp_to_monotonic},
};
use crate::power::{Reading, monotonic_ns, realtime_ns};

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

/// Window of `nvmlDeviceGetPowerUsage`'s average on A100/H100.
const POWER_USAGE_WINDOW_NS: u64 = 25_000_000;

impl NvmlSource {
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
        let (e_ts, held) = gpu
            .energy_stamps
            .read_time(e_stamp, e_ts.map(|c| c.0), mono);
        if held {
            tracing::warn!(
                "NVML gpu{index}: the energy field is stamped with the counter's last update, \
                 not the query; read times are used instead"
            );
        }
        log_clock(&mut self.field_clock_logged, "field", p_ts.map(|c| c.1));
        out.push(Reading::Counter {
            device: index,
            ts_ns: e_ts,
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
    pub(super) fn poll_energy(&mut self, index: usize, out: &mut Vec<Reading>) {
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
            answering(&mut self.gpus[index], index);
            return;
        }
        let gpu = &mut self.gpus[index];
        let dev = match device(&self.nvml, gpu, index) {
            Ok(d) => d,
            Err(e) => return mark_lost(gpu, index, mono, &e, out),
        };
        let start = out.len();
        if gpu.counter != Query::Off
            && due
            && let Err(e) = read_counter(&dev, gpu, index, mono, out)
        {
            return mark_lost(gpu, index, mono, &e, out);
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
        answering(gpu, index);
    }

    /// Reads one GPU's running processes and new utilisation samples.
    pub(super) fn poll_processes(&mut self, index: usize, out: &mut Vec<Reading>) {
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

/// Reads the total-energy counter into `out`, stamped `mono`. A counter the GPU does not have
/// is switched off (warned once; `Ok`); `Err` is a failure that may pass (a lost GPU).
pub(super) fn read_counter(
    dev: &Device<'_>,
    gpu: &mut Gpu,
    index: usize,
    mono: u64,
    out: &mut Vec<Reading>,
) -> Result<(), NvmlError> {
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
                "NVML gpu{index}: no total-energy counter ({e}); its energy comes from power \
                 readings alone"
            );
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The GPU answered: say so if it had been lost.
pub(super) fn answering(gpu: &mut Gpu, index: usize) {
    if gpu.lost {
        gpu.lost = false;
        tracing::info!("NVML gpu{index} answers again; its readings resume");
    }
}

/// Reports a GPU lost, once per loss.
pub(super) fn mark_lost(
    gpu: &mut Gpu,
    index: usize,
    ts_ns: u64,
    e: &NvmlError,
    out: &mut Vec<Reading>,
) {
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
