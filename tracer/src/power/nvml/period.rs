//! Measuring how often each GPU's energy counter changes: read every counter every few
//! milliseconds at open and take the median interval between changes.

use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;

use super::{CounterPeriod, DEFAULT_COUNTER_PERIOD, Gpu, NvmlOptions, Query, device};
use crate::power::monotonic_ns;

/// Counter changes to wait for while measuring the period: three intervals for the median.
const CHANGES_WANTED: usize = 4;
/// Fewest intervals a measured period may rest on.
const MIN_INTERVALS: usize = 2;

/// The counter period from the times (ns) at which a counter was seen to change: the median
/// interval, rounded to whole milliseconds (the reads are a couple of milliseconds apart, so
/// finer digits are noise). `None` with fewer than [`MIN_INTERVALS`] intervals or an absurd
/// result.
pub(super) fn period_from_changes(changes_ns: &[u64]) -> Option<Duration> {
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

/// Measures (or assumes) each GPU's counter period and logs which.
pub(super) fn set_counter_periods(nvml: &Nvml, gpus: &mut [Gpu], options: &NvmlOptions) {
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
