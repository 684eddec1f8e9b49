//! `tracer sensors`: what this host can measure, and how well, before attaching to anything.
//!
//! Opens the same sources the daemon would (NVML GPUs, the chosen CPU source), with the calls
//! [`open_all`](super::open_all) makes, but keeps the `NvmlSource` itself (not a boxed source)
//! for its per-GPU diagnostics and samples every source at the one interval asked for. Prints
//! each device's identity, its energy counter's update period (measured) and MIG state, then
//! samples for a while and prints per device the readings per second, the power from the
//! energy counter against the power from the instantaneous readings, and what sampling cost.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use crate::power::{
    self, PowerDevice, PowerSource, Reading,
    cpu::{self, CpuPowerConfig},
    nvml::{NvmlOptions, NvmlSource},
};

/// What to probe.
#[derive(Debug, Clone)]
pub struct SensorsOptions {
    pub use_nvml: bool,
    pub nvml: NvmlOptions,
    pub cpu: CpuPowerConfig,
    /// How long to sample.
    pub duration: Duration,
    /// Sampling period.
    pub interval: Duration,
}

/// Per-device statistics over the sampling run.
#[derive(Debug, Default, Clone)]
struct DeviceRun {
    counter_first: Option<(u64, u64)>,
    counter_last: Option<(u64, u64)>,
    counter_changes: u64,
    counter_reads: u64,
    /// Counter wraps seen (a lower value than the previous one).
    wraps: u64,
    power_sum: f64,
    power_min: f64,
    power_max: f64,
    power_n: u64,
    lost: u64,
    processes: Option<usize>,
    util_samples: u64,
}

impl DeviceRun {
    fn add(&mut self, r: &Reading, wrap: Option<u64>) {
        match r {
            Reading::Counter {
                ts_ns, energy_uj, ..
            } => {
                self.counter_reads += 1;
                if let Some((_, prev)) = self.counter_last {
                    if *energy_uj != prev {
                        self.counter_changes += 1;
                    }
                    if *energy_uj < prev && wrap.is_some() {
                        self.wraps += 1;
                    }
                }
                if self.counter_first.is_none() {
                    self.counter_first = Some((*ts_ns, *energy_uj));
                }
                self.counter_last = Some((*ts_ns, *energy_uj));
            }
            Reading::Power { watts, .. } => {
                if self.power_n == 0 {
                    self.power_min = *watts;
                    self.power_max = *watts;
                }
                self.power_sum += watts;
                self.power_min = self.power_min.min(*watts);
                self.power_max = self.power_max.max(*watts);
                self.power_n += 1;
            }
            Reading::Processes { pids, .. } => self.processes = Some(pids.len()),
            Reading::ProcessUtil { .. } => self.util_samples += 1,
            Reading::Lost { .. } => self.lost += 1,
        }
    }

    /// Mean power from the counter: energy over time between first and last read (wraps
    /// undone once each).
    fn counter_watts(&self, wrap: Option<u64>) -> Option<f64> {
        let ((t0, e0), (t1, e1)) = (self.counter_first?, self.counter_last?);
        if t1 <= t0 {
            return None;
        }
        let mut de = e1 as f64 - e0 as f64;
        if let Some(w) = wrap {
            de += self.wraps as f64 * w as f64;
        }
        Some(de / 1e6 / ((t1 - t0) as f64 / 1e9))
    }
}

fn device_line(d: &PowerDevice) -> String {
    format!(
        "{} kind={:?}{} minor={} uuid={} pci={}",
        d.name,
        d.kind,
        if d.estimated { " ESTIMATED" } else { "" },
        d.minor.map_or_else(|| "-".into(), |m| m.to_string()),
        d.uuid.as_deref().unwrap_or("-"),
        d.pci_bus_id.as_deref().unwrap_or("-"),
    )
}

/// Probes and samples; returns the report.
pub fn run(opts: &SensorsOptions) -> String {
    let mut out = String::new();
    let mut sources: Vec<Box<dyn PowerSource>> = Vec::new();
    let _ = writeln!(out, "== GPUs (NVML)");
    if opts.use_nvml {
        let started = Instant::now();
        match NvmlSource::open_with(&opts.nvml) {
            Ok(src) => {
                let _ = writeln!(
                    out,
                    "opened in {:.0} ms; recommended sampling interval {} ms",
                    started.elapsed().as_secs_f64() * 1e3,
                    src.recommended_interval().as_millis()
                );
                for (i, d) in src.devices().iter().enumerate() {
                    let period = src.counter_period(i).map_or_else(
                        || "no energy counter".into(),
                        |p| {
                            format!(
                                "counter period {:.1} ms ({}), read every {}",
                                p.period.as_secs_f64() * 1e3,
                                if p.measured { "measured" } else { "assumed" },
                                src.counter_interval(i).map_or_else(
                                    || "poll".into(),
                                    |d| format!("{} ms", d.as_millis())
                                )
                            )
                        },
                    );
                    let _ = writeln!(
                        out,
                        "{}; {period}; MIG {}",
                        device_line(d),
                        if src.mig_enabled(i) {
                            "ON: energy is per physical GPU, not attributable per instance"
                        } else {
                            "off"
                        }
                    );
                    for c in src.call_costs(i, 20) {
                        let _ = writeln!(
                            out,
                            "  {:<44} {:>9.1} µs CPU {:>9.1} µs wall{}",
                            c.call,
                            c.cpu_us,
                            c.wall_us,
                            if c.ok { "" } else { "  (failed)" }
                        );
                    }
                }
                sources.push(Box::new(src));
            }
            Err(e) => {
                let _ = writeln!(out, "unavailable: {e}");
            }
        }
    } else {
        let _ = writeln!(out, "off");
    }
    let _ = writeln!(out, "== CPU / DRAM");
    for line in cpu::probe_report(&opts.cpu) {
        let _ = writeln!(out, "{line}");
    }
    match cpu::open(&opts.cpu) {
        Ok((src, kind)) => {
            let _ = writeln!(out, "using {kind}");
            for d in src.devices() {
                let _ = writeln!(out, "{}", device_line(d));
            }
            sources.push(src);
        }
        Err(e) => {
            let _ = writeln!(out, "no CPU source: {e}");
        }
    }

    // Sample every source on its own thread, as the daemon does.
    let mut names = Vec::new();
    let mut feeds = Vec::new();
    for (s, src) in sources.into_iter().enumerate() {
        for d in src.devices() {
            names.push((s, d.name.clone(), d.wrap_uj));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        match power::spawn_sampler(src, opts.interval, tx) {
            Ok((thread, stats)) => feeds.push((s, rx, thread, stats)),
            Err(e) => {
                let _ = writeln!(out, "could not start a sampler: {e}");
            }
        }
    }
    let started = Instant::now();
    let mut runs: BTreeMap<(usize, usize), DeviceRun> = BTreeMap::new();
    let wraps: BTreeMap<(usize, usize), Option<u64>> = {
        let mut per_source: BTreeMap<usize, usize> = BTreeMap::new();
        names
            .iter()
            .map(|(s, _, w)| {
                let i = per_source.entry(*s).or_default();
                *i += 1;
                ((*s, *i - 1), *w)
            })
            .collect()
    };
    while started.elapsed() < opts.duration {
        std::thread::sleep(Duration::from_millis(50));
        for (s, rx, _, _) in &feeds {
            while let Ok(batch) = rx.try_recv() {
                for r in &batch {
                    let dev = r.device();
                    let wrap = wraps.get(&(*s, dev)).copied().flatten();
                    runs.entry((*s, dev)).or_default().add(r, wrap);
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "== sampled {secs:.1} s every {} ms",
        opts.interval.as_millis()
    );
    let _ = writeln!(
        out,
        "| device | reads/s | counter changes/s | W from counter | W readings mean (min–max) | lost | processes | util samples |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let mut per_source: BTreeMap<usize, usize> = BTreeMap::new();
    for (s, name, wrap) in &names {
        let i = per_source.entry(*s).or_default();
        let key = (*s, *i);
        *i += 1;
        let r = runs.get(&key).cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            r.counter_reads.max(r.power_n) as f64 / secs,
            r.counter_changes as f64 / secs,
            r.counter_watts(*wrap)
                .map_or_else(|| "-".into(), |w| format!("{w:.1}")),
            if r.power_n > 0 {
                format!(
                    "{:.1} ({:.1}–{:.1})",
                    r.power_sum / r.power_n as f64,
                    r.power_min,
                    r.power_max
                )
            } else {
                "-".into()
            },
            r.lost,
            r.processes.map_or_else(|| "-".into(), |n| n.to_string()),
            r.util_samples,
        );
    }
    for (s, _, _, stats) in &feeds {
        let polls = stats.polls();
        let _ = writeln!(
            out,
            "sampler {s}: {polls} polls, CPU {:.3}% of a core, mean poll {:.1} µs (max {:.1} µs), late {}",
            stats.cpu_ns() as f64 / (secs * 1e9) * 100.0,
            stats.poll_wall_ns() as f64 / polls.max(1) as f64 / 1e3,
            stats.max_poll_wall_ns() as f64 / 1e3,
            stats.late()
        );
    }
    // Dropping the receivers ends the sampler threads at their next send.
    drop(feeds);
    out
}
