//! `NvmlSource` against the NVML emulation: the real nvml-wrapper loading the `nvml-emu`
//! cdylib, which reads GPUs emulated by `tracer-emugpu`. No root and no GPU needed.
//!
//! NVML reads `TRACER_EMU_STATE` when it initialises, and the environment is process-wide, so
//! every test holds [`ENV_LOCK`] from start to end (they run one after another) and loads its
//! own copy of the library (separate copies share no state).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc},
    time::{Duration, Instant},
};

use tracer::ledger::DeviceKind;
use tracer::power::{
    PowerError, PowerSource, Reading, monotonic_ns,
    nvml::{DEFAULT_COUNTER_PERIOD, NvmlOptions, NvmlSource},
    spawn_sampler,
};
use tracer_emugpu::{
    GpuSpec, ProcessEntry, STATE_ENV, SensorWriter, Ticker, UtilSample, monotonic_us, spawn_ticker,
};
use tracer_tests::{TempDir, workspace_artifact};

static ENV_LOCK: Mutex<()> = Mutex::new(());

fn env_lock() -> MutexGuard<'static, ()> {
    ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Points NVML at `state` (or at nothing). Callers hold [`ENV_LOCK`].
fn set_state_env(state: Option<&std::path::Path>) {
    // SAFETY: every test of this binary holds ENV_LOCK while it touches or reads the
    // environment (NVML reads it at init), so nothing reads it concurrently.
    unsafe {
        match state {
            Some(p) => std::env::set_var(STATE_ENV, p),
            None => std::env::remove_var(STATE_ENV),
        }
    }
}

/// The built NVML emulation. A dev-dependency, so `cargo test` rebuilds it into `deps/` when
/// its sources change; `target/<profile>/` may hold an older `cargo build` copy, so `deps/` is
/// looked at first.
fn nvml_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps dir");
    let fresh = deps.join("libnvidia_ml.so");
    if fresh.is_file() {
        return fresh;
    }
    workspace_artifact("libnvidia_ml.so", "nvml-emu")
}

/// Emulated GPUs, a ticker publishing their sensors, and a private copy of the library.
struct Emu {
    specs: Vec<GpuSpec>,
    writer: Arc<SensorWriter>,
    lib: PathBuf,
    state: PathBuf,
    _ticker: Ticker,
    dir: TempDir,
    // Last: released after the directory is gone.
    _guard: MutexGuard<'static, ()>,
}

impl Emu {
    fn new(name: &str, gpus: u32) -> Emu {
        let guard = env_lock();
        let dir = TempDir::new(name);
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(nvml_library(), &lib).expect("copy the NVML emulation");
        let state = dir.path().join("state");
        let specs = GpuSpec::h100s(gpus);
        let writer = Arc::new(SensorWriter::create(&state, &specs).expect("sensor writer"));
        let ticker = spawn_ticker(Arc::clone(&writer), Duration::from_millis(1)).expect("ticker");
        set_state_env(Some(&state));
        Emu {
            specs,
            writer,
            lib,
            state,
            _ticker: ticker,
            dir,
            _guard: guard,
        }
    }

    /// Fast options: no period measurement, processes read at every poll.
    fn options(&self) -> NvmlOptions {
        NvmlOptions {
            lib: Some(self.lib.clone()),
            measure_counter_period: false,
            process_interval: Some(Duration::ZERO),
            // Counter read every poll, so each poll's readings are predictable.
            counter_cpu_budget: None,
            // Instant power every poll (the buffered samples have their own tests below).
            power_samples: false,
            ..NvmlOptions::default()
        }
    }
}

/// Opens the emulated GPUs (under the [`Emu`] that set the environment).
fn open(options: &NvmlOptions) -> NvmlSource {
    NvmlSource::open_with(options).expect("open the emulated GPUs")
}

fn poll(source: &mut NvmlSource) -> Vec<Reading> {
    let mut out = Vec::new();
    source.poll(&mut out);
    out
}

fn counter(readings: &[Reading], device: usize) -> Option<(u64, u64)> {
    readings.iter().find_map(|r| match *r {
        Reading::Counter {
            device: d,
            ts_ns,
            energy_uj,
            ..
        } if d == device => Some((ts_ns, energy_uj)),
        _ => None,
    })
}

fn count(readings: &[Reading], pred: impl Fn(&Reading) -> bool) -> usize {
    readings.iter().filter(|r| pred(r)).count()
}

#[test]
fn open_gives_the_emulated_identities() {
    let emu = Emu::new("nvml-identity", 2);
    let source = open(&emu.options());
    let devices = source.devices();
    assert_eq!(devices.len(), 2);
    for (i, (d, spec)) in devices.iter().zip(&emu.specs).enumerate() {
        assert_eq!(d.name, format!("gpu{i}"));
        assert_eq!(d.kind, DeviceKind::Gpu);
        assert!(!d.estimated);
        assert_eq!(d.uuid.as_deref(), Some(spec.uuid.as_str()));
        assert_eq!(d.minor, Some(spec.minor));
        assert_eq!(d.pci_bus_id.as_deref(), Some(spec.pci_bus_id.as_str()));
        assert_eq!(d.wrap_uj, None);
        assert!(!source.mig_enabled(i));
    }
    assert_ne!(devices[0].uuid, devices[1].uuid);
}

#[test]
fn counter_readings_follow_the_emulated_power() {
    let emu = Emu::new("nvml-counter", 2);
    let mut source = open(&NvmlOptions {
        process_interval: None,
        ..emu.options()
    });
    emu.writer
        .set_power(0, monotonic_us(), 300.0)
        .expect("power");
    let first = poll(&mut source);
    std::thread::sleep(Duration::from_millis(1000));
    let second = poll(&mut source);
    for (device, watts) in [(0, 300.0), (1, 70.0)] {
        let (t0, e0) = counter(&first, device).expect("first counter");
        let (t1, e1) = counter(&second, device).expect("second counter");
        assert!(t1 > t0);
        assert!(e1 > e0, "gpu{device}: {e0} then {e1}");
        // The counter moves in 100 ms steps, so over ~1 s it is right within ~10 %.
        let mean = (e1 - e0) as f64 / ((t1 - t0) as f64 / 1e3);
        assert!(
            (mean - watts).abs() < watts * 0.2,
            "gpu{device}: {mean:.1} W, expected about {watts} W"
        );
    }
    // No process readings when they are switched off.
    assert_eq!(
        count(&second, |r| matches!(
            r,
            Reading::Processes { .. } | Reading::ProcessUtil { .. }
        )),
        0
    );
}

#[test]
fn counter_period_is_measured_as_the_emulations() {
    let emu = Emu::new("nvml-period", 2);
    let started = Instant::now();
    let source = open(&NvmlOptions {
        measure_counter_period: true,
        ..emu.options()
    });
    // Four changes of a 100 ms counter take at most about half a second.
    assert!(started.elapsed() < Duration::from_millis(1500));
    for device in 0..2 {
        let p = source.counter_period(device).expect("a counter");
        assert!(p.measured, "gpu{device} not measured");
        let ms = p.period.as_millis();
        assert!((95..=105).contains(&ms), "gpu{device}: {ms} ms");
        assert_eq!(
            source.counter_period_ns(device),
            Some(p.period.as_nanos() as u64)
        );
    }
    let interval = source.recommended_interval().as_millis();
    assert!((47..=53).contains(&interval), "{interval} ms");
}

#[test]
fn counter_period_defaults_to_100_ms_when_not_measured() {
    let emu = Emu::new("nvml-period-default", 1);
    let source = open(&emu.options());
    let p = source.counter_period(0).expect("a counter");
    assert!(!p.measured);
    assert_eq!(p.period, DEFAULT_COUNTER_PERIOD);
    assert_eq!(source.counter_period_ns(0), Some(100_000_000));
    assert_eq!(source.counter_period_ns(1), None);
    assert_eq!(source.recommended_interval(), Duration::from_millis(50));
}

#[test]
fn instant_power_is_stamped_on_the_monotonic_clock() {
    let emu = Emu::new("nvml-instant", 2);
    let mut source = open(&emu.options());
    emu.writer
        .set_power(0, monotonic_us(), 412.5)
        .expect("power");
    let readings = poll(&mut source);
    let now = monotonic_ns();
    for (device, watts) in [(0, 412.5), (1, 70.0)] {
        let (ts, w, window) = *powers(&readings, device).first().expect("a power reading");
        assert_eq!(window, 0, "instant power");
        assert!((w - watts).abs() < 1e-9, "{w} W");
        assert!(now.abs_diff(ts) < 1_000_000_000, "stamp {ts}, now {now}");
        let (counter_ts, _) = counter(&readings, device).expect("counter");
        assert!(now.abs_diff(counter_ts) < 1_000_000_000);
    }
}

#[test]
fn processes_and_utilisation_readings_appear() {
    let emu = Emu::new("nvml-processes", 2);
    let mut source = open(&emu.options());
    let entry = |pid| ProcessEntry {
        pid,
        used_gpu_memory: 1 << 30,
    };
    emu.writer
        .set_processes(0, &[entry(4343), entry(4242)])
        .expect("processes");
    let t = monotonic_us();
    for (pid, ts, sm) in [
        (4242, t - 2000, 55),
        (4343, t - 2000, 30),
        (4242, t - 1000, 65),
    ] {
        emu.writer
            .push_utilisation(
                0,
                UtilSample {
                    pid,
                    timestamp_us: ts,
                    sm_util: sm,
                    mem_util: 10,
                },
            )
            .expect("utilisation");
    }

    let readings = poll(&mut source);
    let pids = |device| {
        readings.iter().find_map(|r| match r {
            Reading::Processes {
                device: d, pids, ..
            } if *d == device => Some(pids.clone()),
            _ => None,
        })
    };
    assert_eq!(pids(0), Some(vec![4242, 4343]));
    assert_eq!(pids(1), Some(vec![]));
    let util: Vec<(usize, u64, u32, u32, u64)> = readings
        .iter()
        .filter_map(|r| match *r {
            Reading::ProcessUtil {
                device,
                ts_ns,
                pid,
                sm_percent,
                window_ns,
            } => Some((device, ts_ns, pid, sm_percent, window_ns)),
            _ => None,
        })
        .collect();
    assert_eq!(util.len(), 3, "{util:?}");
    assert!(util.iter().all(|u| u.0 == 0));
    let mut seen: Vec<(u32, u32)> = util.iter().map(|u| (u.2, u.3)).collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![(4242, 55), (4242, 65), (4343, 30)]);
    // Monotonic stamps come through unchanged; the newest sample covers the millisecond since
    // the previous sampling moment, the first ones have no known start.
    let newest = util.iter().max_by_key(|u| u.1).expect("samples");
    assert_eq!(newest.1, (t - 1000) * 1000);
    assert_eq!(newest.4, 1_000_000);
    assert!(util.iter().filter(|u| u.1 < newest.1).all(|u| u.4 == 0));

    // Samples are not repeated; a new one comes alone.
    let again = poll(&mut source);
    assert_eq!(
        count(&again, |r| matches!(r, Reading::ProcessUtil { .. })),
        0
    );
    assert_eq!(count(&again, |r| matches!(r, Reading::Processes { .. })), 2);
    emu.writer
        .push_utilisation(
            0,
            UtilSample {
                pid: 4343,
                timestamp_us: t,
                sm_util: 90,
                mem_util: 10,
            },
        )
        .expect("utilisation");
    let third = poll(&mut source);
    let fresh: Vec<&Reading> = third
        .iter()
        .filter(|r| matches!(r, Reading::ProcessUtil { .. }))
        .collect();
    assert_eq!(
        fresh,
        vec![&Reading::ProcessUtil {
            device: 0,
            ts_ns: t * 1000,
            pid: 4343,
            sm_percent: 90,
            window_ns: 1_000_000,
        }]
    );
}

#[test]
fn processes_are_read_at_their_own_cadence() {
    let emu = Emu::new("nvml-cadence", 1);
    let mut source = open(&NvmlOptions {
        process_interval: Some(Duration::from_secs(5)),
        ..emu.options()
    });
    let first = poll(&mut source);
    let second = poll(&mut source);
    let procs = |r: &Reading| matches!(r, Reading::Processes { .. });
    assert_eq!(count(&first, procs), 1);
    assert_eq!(count(&second, procs), 0);
    assert!(counter(&second, 0).is_some(), "energy every poll");
}

#[test]
fn failing_process_queries_leave_energy_alone() {
    let emu = Emu::new("nvml-process-fail", 2);
    let mut source = open(&emu.options());
    emu.writer
        .set_process_queries_failing(0, true)
        .expect("fail");
    for _ in 0..3 {
        let readings = poll(&mut source);
        assert!(counter(&readings, 0).is_some());
        assert!(counter(&readings, 1).is_some());
        assert_eq!(count(&readings, |r| matches!(r, Reading::Lost { .. })), 0);
        let devices: Vec<usize> = readings
            .iter()
            .filter_map(|r| match r {
                Reading::Processes { device, .. } => Some(*device),
                _ => None,
            })
            .collect();
        assert_eq!(devices, vec![1]);
    }
    emu.writer
        .set_process_queries_failing(0, false)
        .expect("answer");
    let readings = poll(&mut source);
    assert_eq!(
        count(&readings, |r| matches!(r, Reading::Processes { .. })),
        2,
        "the failing query is retried"
    );
}

#[test]
fn lost_gpu_gives_one_lost_then_readings_resume() {
    let emu = Emu::new("nvml-lost", 2);
    let mut source = open(&emu.options());
    assert!(counter(&poll(&mut source), 1).is_some());
    emu.writer.set_lost(1, true).expect("lose gpu1");
    let mut lost = Vec::new();
    for _ in 0..4 {
        let readings = poll(&mut source);
        assert!(counter(&readings, 0).is_some(), "gpu0 keeps answering");
        assert!(
            readings.iter().all(|r| !matches!(
                r,
                Reading::Counter { device: 1, .. }
                    | Reading::Power { device: 1, .. }
                    | Reading::Processes { device: 1, .. }
            )),
            "{readings:?}"
        );
        lost.extend(readings.into_iter().filter_map(|r| match r {
            Reading::Lost { device, reason, .. } => Some((device, reason)),
            _ => None,
        }));
    }
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, 1);
    assert!(lost[0].1.contains("fell off the bus"), "{}", lost[0].1);

    emu.writer.set_lost(1, false).expect("gpu1 back");
    let readings = poll(&mut source);
    assert!(counter(&readings, 1).is_some(), "{readings:?}");
    assert_eq!(
        count(&readings, |r| matches!(r, Reading::Power { device: 1, .. })),
        1
    );
    assert_eq!(count(&readings, |r| matches!(r, Reading::Lost { .. })), 0);
}

#[test]
fn mig_mode_is_detected_per_gpu() {
    let emu = Emu::new("nvml-mig", 2);
    emu.writer.set_mig(1, true).expect("mig");
    let source = open(&emu.options());
    assert!(!source.mig_enabled(0));
    assert!(source.mig_enabled(1));
    assert!(!source.mig_enabled(7), "no such GPU");
}

#[test]
fn missing_library_is_nvml_unavailable() {
    let emu = Emu::new("nvml-nolib", 1);
    let lib = emu.dir.path().join("no-such-libnvidia-ml.so.1");
    let err = NvmlSource::open_with(&NvmlOptions {
        lib: Some(lib.clone()),
        ..emu.options()
    })
    .expect_err("no library");
    let PowerError::NvmlUnavailable(msg) = err else {
        panic!("expected NvmlUnavailable, got {err:?}");
    };
    assert!(msg.contains(&lib.display().to_string()), "{msg}");
    assert!(msg.contains("cannot load"), "{msg}");
}

#[test]
fn missing_state_file_is_a_clear_error() {
    let emu = Emu::new("nvml-nostate", 1);
    for state in [Some(emu.dir.path().join("missing-state")), None] {
        set_state_env(state.as_deref());
        let err = NvmlSource::open_with(&emu.options()).expect_err("no driver");
        let PowerError::NvmlUnavailable(msg) = err else {
            panic!("expected NvmlUnavailable, got {err:?}");
        };
        assert!(msg.contains("driver is not loaded"), "{msg}");
    }
    // And with the state back, the same library opens.
    set_state_env(Some(&emu.state));
    assert_eq!(open(&emu.options()).devices().len(), 1);
}

#[test]
fn sampler_counts_its_polls_and_cpu_time() {
    let emu = Emu::new("nvml-sampler", 2);
    let source = open(&emu.options());
    let (tx, rx) = mpsc::channel();
    let (handle, stats) =
        spawn_sampler(Box::new(source), Duration::from_millis(10), tx).expect("spawn sampler");
    let deadline = Instant::now() + Duration::from_millis(400);
    let mut counters = 0;
    while Instant::now() < deadline {
        if let Ok(batch) = rx.recv_timeout(Duration::from_millis(50)) {
            counters += count(&batch, |r| matches!(r, Reading::Counter { .. }));
        }
    }
    drop(rx);
    handle.join().expect("sampler thread");
    let polls = stats.polls();
    assert!(polls >= 10, "{polls} polls in 400 ms at 100 Hz");
    assert!(counters >= 20, "{counters} counter readings");
    assert!(stats.cpu_ns() > 0);
    assert!(stats.poll_wall_ns() > 0);
    assert!(stats.max_poll_wall_ns() <= stats.poll_wall_ns());
    // The thread is done: its figures no longer move.
    assert_eq!(stats.polls(), polls);
}

#[test]
fn counter_is_read_twice_per_period_and_power_every_poll() {
    let emu = Emu::new("nvml-cadence", 1);
    let mut source = open(&NvmlOptions {
        counter_cpu_budget: Some(0.01),
        process_interval: None,
        ..emu.options()
    });
    // The emulated counter read is cheap: twice per 100 ms period fits any budget.
    assert_eq!(source.counter_interval(0), Some(Duration::from_millis(50)));
    let first = poll(&mut source);
    let second = poll(&mut source);
    let power = |r: &Reading| matches!(r, Reading::Power { device: 0, .. });
    assert!(counter(&first, 0).is_some(), "first poll reads the counter");
    assert!(counter(&second, 0).is_none(), "not due again within 50 ms");
    assert_eq!(count(&second, power), 1, "instant power every poll");
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        counter(&poll(&mut source), 0).is_some(),
        "due again after 50 ms"
    );
}

/// The power readings of `device`, in order: (stamp ns, watts, window ns).
fn powers(readings: &[Reading], device: usize) -> Vec<(u64, f64, u64)> {
    readings
        .iter()
        .filter_map(|r| match *r {
            Reading::Power {
                device: d,
                ts_ns,
                watts,
                window_ns,
            } if d == device => Some((ts_ns, watts, window_ns)),
            _ => None,
        })
        .collect()
}

#[test]
fn buffered_power_samples_tile_time_and_integrate_to_the_true_energy() {
    let emu = Emu::new("nvml-samples", 2);
    let opened_us = monotonic_us();
    let mut source = open(&NvmlOptions {
        power_samples: true,
        samples_interval: Duration::from_millis(100),
        process_interval: None,
        ..emu.options()
    });
    assert_eq!(source.samples_interval(0), Some(Duration::from_millis(100)));
    // Power moves every 7 ms (not a multiple of the driver's 20 ms sampling period).
    let mut schedule = vec![(0, emu.specs[0].idle_w)];
    let mut readings = Vec::new();
    let mut polls = 0;
    for k in 0..120_u64 {
        let (t, w) = (monotonic_us(), 150.0 + 40.0 * (k % 5) as f64);
        emu.writer.set_power(0, t, w).expect("power");
        schedule.push((t, w));
        std::thread::sleep(Duration::from_millis(7));
        readings.extend(poll(&mut source));
        polls += 1;
    }
    std::thread::sleep(Duration::from_millis(120));
    readings.extend(poll(&mut source));
    let p = powers(&readings, 0);
    // One driver read per 100 ms returns ~5 samples each: far fewer readings than polls, and
    // nothing from before the source opened.
    assert!(
        p.len() > 30 && p.len() < polls,
        "{} samples, {polls} polls",
        p.len()
    );
    assert!(
        p[0].0 > opened_us * 1000,
        "{:?} before open {opened_us}",
        p[0]
    );
    // Each sample after the first is the mean since the one before: the windows tile time.
    assert_eq!(p[0].2, 0, "the first one seen is an instant reading");
    for w in p.windows(2) {
        assert_eq!(w[1].2, 20_000_000, "{w:?}");
        assert_eq!(w[1].0 - w[1].2, w[0].0, "{w:?}");
    }
    // Integrated, they are the emulated GPU's true energy over the same span.
    let (first_ns, last_ns) = (p[0].0, p[p.len() - 1].0);
    let measured_j: f64 = p[1..].iter().map(|&(_, w, win)| w * win as f64 / 1e9).sum();
    let true_j = schedule_energy_j(&schedule, first_ns / 1000, last_ns / 1000);
    assert!(
        (measured_j - true_j).abs() < 0.002 * true_j + 0.05,
        "samples {measured_j} J, true {true_j} J"
    );
    // The second GPU, idle, gets its samples too, at the idle power.
    let idle = powers(&readings, 1);
    assert!(idle.len() > 30, "{idle:?}");
    assert!(
        idle.iter().all(|&(_, w, _)| (w - 70.0).abs() < 0.01),
        "{idle:?}"
    );
    // The counter is still read, on its own cadence.
    assert!(counter(&readings, 0).is_some());
}

/// The energy of a piecewise-constant power schedule (`(from µs, watts)`, in order) between
/// two times: the truth the test itself set, independent of the emulation's bookkeeping.
fn schedule_energy_j(schedule: &[(u64, f64)], from_us: u64, to_us: u64) -> f64 {
    let mut j = 0.0;
    for (k, &(t, w)) in schedule.iter().enumerate() {
        let end = schedule.get(k + 1).map_or(u64::MAX, |n| n.0);
        let (a, b) = (t.max(from_us), end.min(to_us));
        if b > a {
            j += w * (b - a) as f64 / 1e6;
        }
    }
    j
}

/// `nvml_emu::COSTS_ENV` (not linked in: the library is loaded as the driver would be).
const COSTS_ENV: &str = "TRACER_EMU_NVML_COSTS";

/// Sets (or clears) the emulation's per-call cost model. Callers hold [`ENV_LOCK`] (through an
/// [`Emu`]); a library copy reads it at its first call.
fn set_costs_env(model: Option<&str>) {
    // SAFETY: as in `set_state_env`.
    unsafe {
        match model {
            Some(m) => std::env::set_var(COSTS_ENV, m),
            None => std::env::remove_var(COSTS_ENV),
        }
    }
}

#[test]
fn the_counter_budget_is_shared_by_the_gpus_and_their_reads_are_spread() {
    // With the H200's per-call costs (4.3 ms of CPU per counter read) and the default budget
    // (0.5 % of a core for all GPUs), one GPU's counter is read every ~0.85 s, each of four
    // GPUs' every ~3.4 s.
    let interval = |gpus: u32| {
        let emu = Emu::new("nvml-budget", gpus);
        set_costs_env(Some("h200"));
        let mut source = open(&NvmlOptions {
            counter_cpu_budget: Some(0.005),
            process_interval: None,
            power_samples: true,
            ..emu.options()
        });
        set_costs_env(None);
        let first = poll(&mut source);
        let read: Vec<usize> = (0..gpus as usize)
            .filter(|&d| counter(&first, d).is_some())
            .collect();
        (source.counter_interval(0).expect("rationed"), read)
    };
    let (one, read_one) = interval(1);
    let (four, read_four) = interval(4);
    assert!(
        one > Duration::from_millis(400) && one < Duration::from_millis(2000),
        "{one:?}"
    );
    let ratio = four.as_secs_f64() / one.as_secs_f64();
    assert!(
        (2.5..6.0).contains(&ratio),
        "1 GPU {one:?}, 4 GPUs {four:?}"
    );
    assert_eq!(read_one, [0]);
    // Spread: the first poll reads one GPU's counter, not all four (the rest follow at a
    // quarter of the interval each).
    assert_eq!(read_four, [0], "{four:?}");
}

#[test]
fn a_lost_gpu_reading_buffered_samples_gives_one_lost_then_samples_resume() {
    let emu = Emu::new("nvml-samples-lost", 2);
    let mut source = open(&NvmlOptions {
        power_samples: true,
        samples_interval: Duration::from_millis(40),
        process_interval: None,
        ..emu.options()
    });
    let mut run = |ms: u64| {
        let mut all = Vec::new();
        for _ in 0..ms / 10 {
            std::thread::sleep(Duration::from_millis(10));
            all.extend(poll(&mut source));
        }
        all
    };
    assert!(!powers(&run(200), 1).is_empty());
    emu.writer.set_lost(1, true).expect("lose gpu1");
    let lost = run(300);
    assert!(powers(&lost, 1).is_empty(), "{lost:?}");
    assert!(!powers(&lost, 0).is_empty(), "gpu0 keeps answering");
    assert_eq!(
        count(&lost, |r| matches!(r, Reading::Lost { device: 1, .. })),
        1,
        "{lost:?}"
    );
    emu.writer.set_lost(1, false).expect("gpu1 back");
    let back = run(300);
    assert!(!powers(&back, 1).is_empty(), "{back:?}");
    assert_eq!(count(&back, |r| matches!(r, Reading::Lost { .. })), 0);
}
