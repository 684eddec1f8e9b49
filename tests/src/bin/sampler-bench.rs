//! Measures what the power sampler costs: the real `NvmlSource` and `spawn_sampler` reading
//! emulated GPUs through the real NVML emulation library (`nvml-emu`), for a while, per case.
//!
//! Usage: `sampler-bench --lib <libnvidia_ml.so> [--gpus 8] [--hz 100] [--seconds 10]`
//! (`cargo xtask bench-sampler` builds everything in release and runs it). Prints a markdown
//! table: polls per second achieved, the sampler thread's CPU time as a share of one core
//! (`CLOCK_THREAD_CPUTIME_ID`, accounted by the thread itself), CPU and wall time per poll.
//!
//! The emulation's driver calls are cheaper than a real driver's (no ioctl into the kernel
//! module), so these figures are the sampler's own cost plus a lower bound on the driver's.

use std::{
    path::PathBuf,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tracer::power::{
    PowerDevice, PowerSource, Reading, SamplerStats,
    nvml::{NvmlOptions, NvmlSource},
    spawn_sampler,
};
use tracer_emugpu::{
    GpuSpec, ProcessEntry, STATE_ENV, SensorWriter, UtilSample, monotonic_us, spawn_ticker,
};

/// The daemon's event-loop tick (`probe.poll_interval_ms` default), at which it drains readings.
const DRAIN_TICK: Duration = Duration::from_millis(100);

struct Args {
    lib: PathBuf,
    gpus: u32,
    hz: u32,
    seconds: u64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        lib: PathBuf::new(),
        gpus: 8,
        hz: 100,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--lib" => args.lib = PathBuf::from(value),
            "--gpus" => args.gpus = value.parse().context("--gpus")?,
            "--hz" => args.hz = value.parse().context("--hz")?,
            "--seconds" => args.seconds = value.parse().context("--seconds")?,
            _ => bail!("unknown argument {flag}"),
        }
    }
    if args.lib.as_os_str().is_empty() {
        bail!("usage: sampler-bench --lib <libnvidia_ml.so> [--gpus N] [--hz N] [--seconds N]");
    }
    if args.hz == 0 || args.gpus == 0 {
        bail!("--hz and --gpus must be at least 1");
    }
    Ok(args)
}

/// One case's figures.
struct Row {
    name: String,
    elapsed: Duration,
    polls: u64,
    cpu_ns: u64,
    poll_wall_ns: u64,
    max_poll_wall_ns: u64,
    late: u64,
    readings: u64,
    process_readings: u64,
}

fn run_case(
    name: &str,
    source: Box<dyn PowerSource>,
    period: Duration,
    seconds: u64,
) -> Result<Row> {
    let (tx, rx) = mpsc::channel::<Vec<Reading>>();
    let started = Instant::now();
    let (handle, stats): (_, Arc<SamplerStats>) =
        spawn_sampler(source, period, tx).context("spawning the sampler")?;
    let deadline = started + Duration::from_secs(seconds);
    let (mut readings, mut process_readings) = (0_u64, 0_u64);
    // Drained as the daemon does: `try_recv` on its own 10 ms tick, so the sampler's sends
    // never have to wake a parked receiver.
    while Instant::now() < deadline {
        std::thread::sleep(DRAIN_TICK);
        while let Ok(batch) = rx.try_recv() {
            readings += batch.len() as u64;
            process_readings += batch
                .iter()
                .filter(|r| matches!(r, Reading::Processes { .. } | Reading::ProcessUtil { .. }))
                .count() as u64;
        }
    }
    drop(rx);
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?;
    let elapsed = started.elapsed();
    Ok(Row {
        name: name.to_owned(),
        elapsed,
        polls: stats.polls(),
        cpu_ns: stats.cpu_ns(),
        poll_wall_ns: stats.poll_wall_ns(),
        max_poll_wall_ns: stats.max_poll_wall_ns(),
        late: stats.late(),
        readings,
        process_readings,
    })
}

/// A source with nothing to read: what the sampler loop itself costs (waking at the period,
/// sending a batch), the floor under every other case.
struct Nothing;

impl PowerSource for Nothing {
    fn devices(&self) -> &[PowerDevice] {
        &[]
    }

    fn poll(&mut self, _out: &mut Vec<Reading>) {}
}

struct NvmlSummary {
    gpus: usize,
    period_ms: Option<(u128, bool)>,
    recommended: Duration,
    /// How often GPU 0's counter is read, as opened (the budget adjusts it to real costs).
    counter_every: Option<Duration>,
    samples_every: Option<Duration>,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = std::env::temp_dir().join(format!("tracer-sampler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let state = dir.join("state");
    // SAFETY: single-threaded here (no thread started yet); NVML reads it at init.
    unsafe { std::env::set_var(STATE_ENV, &state) };

    // The GPUs: busy at different powers, two compute processes each, utilisation samples
    // arriving every 100 ms per process (what the 1 Hz query then collects).
    let writer =
        Arc::new(SensorWriter::create(&state, &GpuSpec::h100s(args.gpus)).context("sensor state")?);
    let now = monotonic_us();
    for gpu in 0..args.gpus as usize {
        writer.set_power(gpu, now, 200.0 + 50.0 * gpu as f64)?;
        let pid = 10_000 + 10 * gpu as u32;
        writer.set_processes(
            gpu,
            &[
                ProcessEntry {
                    pid,
                    used_gpu_memory: 20 << 30,
                },
                ProcessEntry {
                    pid: pid + 1,
                    used_gpu_memory: 10 << 30,
                },
            ],
        )?;
    }
    let ticker = spawn_ticker(Arc::clone(&writer), Duration::from_millis(1))?;
    let feeder_writer = Arc::clone(&writer);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder_stop = Arc::clone(&stop);
    let gpus = args.gpus as usize;
    let feeder = std::thread::spawn(move || {
        while !feeder_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ts = monotonic_us();
            for gpu in 0..gpus {
                for k in 0..2 {
                    let _ = feeder_writer.push_utilisation(
                        gpu,
                        UtilSample {
                            pid: 10_000 + 10 * gpu as u32 + k,
                            timestamp_us: ts,
                            sm_util: 40 + 10 * k,
                            mem_util: 20,
                        },
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let period = Duration::from_secs(1) / args.hz;
    let base = NvmlOptions {
        lib: Some(args.lib.clone()),
        measure_counter_period: true,
        process_interval: None,
        ..NvmlOptions::default()
    };
    // (name, processes and utilisation every ..., buffered power samples)
    let cases = [
        (
            "energy + instant power every poll (before)".to_owned(),
            None,
            false,
        ),
        ("energy + buffered power samples".to_owned(), None, true),
        (
            "the default: buffered samples, processes + utilisation at 1 Hz".to_owned(),
            Some(Duration::from_secs(1)),
            true,
        ),
        (
            format!(
                "buffered samples, processes + utilisation every poll ({} Hz)",
                args.hz
            ),
            Some(Duration::ZERO),
            true,
        ),
    ];
    eprintln!("sampler-bench: sampler loop alone, {} s", args.seconds);
    let mut rows = vec![run_case(
        "sampler loop alone (no GPUs)",
        Box::new(Nothing),
        period,
        args.seconds,
    )?];
    let mut summary = None;
    for (name, process_interval, power_samples) in cases {
        eprintln!("sampler-bench: {name}, {} s", args.seconds);
        let source = NvmlSource::open_with(&NvmlOptions {
            process_interval,
            power_samples,
            ..base.clone()
        })
        .context("opening the emulated GPUs")?;
        if power_samples {
            summary.get_or_insert_with(|| NvmlSummary {
                gpus: source.devices().len(),
                period_ms: source
                    .counter_period(0)
                    .map(|p| (p.period.as_millis(), p.measured)),
                recommended: source.recommended_interval(),
                counter_every: source.counter_interval(0),
                samples_every: source.samples_interval(0),
            });
        }
        rows.push(run_case(&name, Box::new(source), period, args.seconds)?);
    }
    // The CPU source the daemon would choose here, on its own thread as in the daemon (the
    // utilisation model is sampled at 10 Hz; RAPL/powercap at the GPU rate).
    match tracer::power::cpu::open(&tracer::power::cpu::CpuPowerConfig::default()) {
        Ok((source, kind)) => {
            let cpu_period = if kind == tracer::power::cpu::CpuSourceKind::Model {
                period.max(Duration::from_millis(100))
            } else {
                period
            };
            let name = format!(
                "CPU source ({kind}) at {} Hz, its own thread",
                Duration::from_secs(1).as_millis() / cpu_period.as_millis().max(1)
            );
            eprintln!("sampler-bench: {name}, {} s", args.seconds);
            rows.push(run_case(&name, source, cpu_period, args.seconds)?);
        }
        Err(e) => eprintln!("sampler-bench: no CPU source: {e}"),
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = feeder.join();
    ticker.stop();
    let _ = std::fs::remove_dir_all(&dir);

    if let Some(s) = summary {
        let period = s.period_ms.map_or_else(
            || "none".to_owned(),
            |(ms, measured)| {
                format!(
                    "{ms} ms ({})",
                    if measured { "measured" } else { "assumed" }
                )
            },
        );
        println!(
            "{} emulated GPUs through the NVML emulation, sampled at {} Hz for {} s per case; \
             counter period {period}, recommended interval {} ms; with samples, gpu0's counter \
             read every {} ms at open, its samples every {} ms; {}",
            s.gpus,
            args.hz,
            args.seconds,
            s.recommended.as_millis(),
            s.counter_every.map_or(0, |d| d.as_millis()),
            s.samples_every.map_or(0, |d| d.as_millis()),
            cpu_model()
        );
        println!();
    }
    println!(
        "| case | polls/s | sampler CPU, % of a core | CPU per poll, µs | poll wall mean / max, µs | late polls | readings/s | process readings/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let secs = r.elapsed.as_secs_f64();
        let polls = r.polls.max(1) as f64;
        println!(
            "| {} | {:.1} | {:.3} | {:.1} | {:.1} / {:.0} | {} | {:.0} | {:.1} |",
            r.name,
            r.polls as f64 / secs,
            r.cpu_ns as f64 / 1e9 / secs * 100.0,
            r.cpu_ns as f64 / 1e3 / polls,
            r.poll_wall_ns as f64 / 1e3 / polls,
            r.max_poll_wall_ns as f64 / 1e3,
            r.late,
            r.readings as f64 / secs,
            r.process_readings as f64 / secs,
        );
    }
    Ok(())
}
