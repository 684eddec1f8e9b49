//! Sensor state: update schedule, averaging window, seqlock consistency, cross-process reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracer_emugpu::{
    COUNTER_PERIOD_US, GpuSpec, MAX_UTIL_SAMPLES, POWER_AVG_PERIOD_US, POWER_AVG_WINDOW_US,
    ProcessEntry, SensorReader, SensorWriter, UtilSample, monotonic_us, spawn_ticker,
};

const T0: u64 = 5_000_000_000;

fn state_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("emugpu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Piecewise-constant power of the synthetic workload: changes every 3 ms.
fn power_at(t: u64) -> f64 {
    let step = (t - T0) / 3_000;
    70.0 + 53.0 * (step % 11) as f64 + if step.is_multiple_of(17) { 400.0 } else { 0.0 }
}

/// Exact energy (J) of the synthetic workload from T0 to `t`.
fn energy_to(t: u64) -> f64 {
    let mut e = 0.0;
    let mut a = T0;
    while a < t {
        let b = (T0 + ((a - T0) / 3_000 + 1) * 3_000).min(t);
        e += power_at(a) * (b - a) as f64 / 1e6;
        a = b;
    }
    e
}

#[test]
fn counter_moves_every_100ms_and_floors_true_energy() {
    let path = state_path("counter");
    let specs = GpuSpec::h100s(2);
    let w = SensorWriter::create_at(&path, &specs, T0).expect("create");
    w.set_power(0, T0, power_at(T0)).expect("set_power");
    let r = SensorReader::open(&path).expect("open");
    assert_eq!(r.count(), 2);
    let mut last = r.snapshot(0).expect("snapshot");
    assert_eq!(last.energy_mj, specs[0].energy_offset_mj);
    let mut updates = Vec::new();
    for ms in 1..=1_000_u64 {
        let t = T0 + ms * 1_000;
        // The engine reports power changes; ticks happen every millisecond in between.
        if (t - T0).is_multiple_of(3_000) {
            w.set_power(0, t, power_at(t)).expect("set_power");
        } else {
            w.tick(t);
        }
        let s = r.snapshot(0).expect("snapshot");
        assert!(s.energy_mj >= last.energy_mj, "counter went backwards");
        if s.energy_mj != last.energy_mj || s.counter_update_us != last.counter_update_us {
            assert_eq!(s.counter_update_us, t, "counter published late");
            updates.push((s.counter_update_us, s.energy_mj));
        }
        last = s;
        let truth = w.true_energy_j(0).expect("truth");
        assert!(
            (truth - energy_to(t)).abs() < 1e-6,
            "{truth} vs {}",
            energy_to(t)
        );
    }
    assert!(updates.len() >= 9, "{updates:?}");
    for pair in updates.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, COUNTER_PERIOD_US);
    }
    for (t, mj) in &updates {
        // floor(true mJ); the writer allows 1e-6 mJ of f64 rounding noise.
        let expect = specs[0].energy_offset_mj + (energy_to(*t) * 1000.0 + 1e-6).floor() as u64;
        assert_eq!(*mj, expect, "counter at {t}");
    }
    // GPU 1 stayed idle, on its own phase.
    let s1 = r.snapshot(1).expect("snapshot 1");
    assert_ne!(
        s1.counter_update_us % COUNTER_PERIOD_US,
        last.counter_update_us % COUNTER_PERIOD_US
    );
    let idle_mj = (s1.counter_update_us - T0) as f64 * specs[1].idle_w / 1000.0;
    assert_eq!(
        s1.energy_mj,
        specs[1].energy_offset_mj + idle_mj.floor() as u64
    );
}

#[test]
fn average_power_matches_its_window() {
    let path = state_path("average");
    let w = SensorWriter::create_at(&path, &GpuSpec::h100s(1), T0).expect("create");
    w.set_power(0, T0, power_at(T0)).expect("set_power");
    let r = SensorReader::open(&path).expect("open");
    let mut seen = Vec::new();
    let mut last_avg_us = 0;
    for ms in 1..=800_u64 {
        let t = T0 + ms * 1_000;
        if (t - T0).is_multiple_of(3_000) {
            w.set_power(0, t, power_at(t)).expect("set_power");
        }
        // Ticks land on sub-millisecond offsets too: updates must still use exact times.
        w.tick(t + 137);
        let s = r.snapshot(0).expect("snapshot");
        assert_eq!(s.power_usage_mw, s.power_avg_mw);
        if s.power_avg_us != last_avg_us {
            last_avg_us = s.power_avg_us;
            seen.push((s.power_avg_us, s.power_avg_mw));
        }
        assert_eq!(
            s.power_instant_mw,
            (power_at(T0 + (t - T0) / 3_000 * 3_000) * 1000.0) as u64
        );
    }
    // Drop the initial (creation) value.
    let seen = &seen[1..];
    assert!(seen.len() >= 7, "{seen:?}");
    for pair in seen.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, POWER_AVG_PERIOD_US);
    }
    for (t, mw) in seen {
        let joules = energy_to(*t) - energy_to(t - POWER_AVG_WINDOW_US);
        let expect = joules / (POWER_AVG_WINDOW_US as f64 / 1e6) * 1000.0;
        assert!(
            (*mw as f64 - expect).abs() <= 1.0,
            "avg at {t}: {mw} vs {expect}"
        );
    }
}

#[test]
fn concurrent_reader_sees_consistent_snapshots() {
    let path = state_path("concurrent");
    let w = Arc::new(SensorWriter::create(&path, &GpuSpec::h100s(1)).expect("create"));
    let r = SensorReader::open(&path).expect("open");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let w = Arc::clone(&w);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut k = 0_u32;
            while !done.load(Ordering::Relaxed) {
                k += 1;
                // Every snapshot must show all entries of one generation `k`.
                let n = (k % 7 + 1) as usize;
                let procs: Vec<_> = (0..n)
                    .map(|_| ProcessEntry {
                        pid: k,
                        used_gpu_memory: u64::from(k) * 4096,
                    })
                    .collect();
                w.set_processes(0, &procs).expect("set_processes");
                w.set_power(0, monotonic_us(), 100.0 + f64::from(k % 500))
                    .expect("set_power");
                w.tick(monotonic_us());
            }
            k
        })
    };
    let mut last_seq = 0;
    let mut last_energy = 0;
    let mut checked = 0_u32;
    let deadline = monotonic_us() + 300_000;
    while monotonic_us() < deadline {
        let s = r.snapshot(0).expect("snapshot");
        assert_eq!(s.seq % 2, 0);
        assert!(s.seq >= last_seq);
        assert!(s.energy_mj >= last_energy);
        last_seq = s.seq;
        last_energy = s.energy_mj;
        if let Some(first) = s.processes.first() {
            let k = first.pid;
            assert_eq!(
                s.processes.len(),
                (k % 7 + 1) as usize,
                "torn process table"
            );
            for p in &s.processes {
                assert_eq!(
                    (p.pid, p.used_gpu_memory),
                    (k, u64::from(k) * 4096),
                    "torn entry"
                );
            }
            checked += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    let generations = writer.join().expect("writer thread");
    assert!(
        generations > 100 && checked > 100,
        "{generations} {checked}"
    );
}

#[test]
fn ticker_publishes_in_real_time() {
    let path = state_path("ticker");
    let w = Arc::new(SensorWriter::create(&path, &GpuSpec::h100s(2)).expect("create"));
    w.set_power(1, monotonic_us(), 400.0).expect("set_power");
    let ticker = spawn_ticker(Arc::clone(&w), Duration::from_millis(1)).expect("ticker");
    let r = SensorReader::open(&path).expect("open");
    // Let the counter update at least once at 400 W, then watch whole periods.
    std::thread::sleep(Duration::from_millis(150));
    let before = r.snapshot(1).expect("snapshot");
    std::thread::sleep(Duration::from_millis(450));
    let after = r.snapshot(1).expect("snapshot");
    ticker.stop();
    let dt = after.counter_update_us - before.counter_update_us;
    assert!(
        dt >= 2 * COUNTER_PERIOD_US && dt.is_multiple_of(COUNTER_PERIOD_US),
        "{dt} us"
    );
    let expect_mj = 400.0 * dt as f64 / 1000.0;
    let got_mj = (after.energy_mj - before.energy_mj) as f64;
    assert!(
        (got_mj - expect_mj).abs() <= 1.0,
        "{got_mj} mJ vs {expect_mj}"
    );
    assert_eq!(after.power_avg_mw, 400_000);
    let truth_mj = w.true_energy_j(1).expect("truth") * 1000.0;
    assert!(truth_mj >= (after.energy_mj - GpuSpec::h100(1).energy_offset_mj) as f64);
}

#[test]
fn lost_flag_processes_and_utilisation_ring() {
    let path = state_path("misc");
    let specs = GpuSpec::h100s(2);
    let w = SensorWriter::create_at(&path, &specs, T0).expect("create");
    let r = SensorReader::open(&path).expect("open");
    let id = r.identity(1).expect("identity");
    assert_eq!(id.uuid, specs[1].uuid);
    assert_eq!(id.name, specs[1].name);
    assert_eq!(id.pci_bus_id, specs[1].pci_bus_id);
    assert_eq!(id.pci_bus, 0x40);
    assert!(r.identity(2).is_err() && r.snapshot(2).is_err());

    assert!(!r.snapshot(1).expect("snapshot").lost);
    w.set_lost(1, true).expect("lost");
    assert!(r.snapshot(1).expect("snapshot").lost && r.is_lost(1).expect("lost"));
    assert!(!r.snapshot(0).expect("snapshot").lost);

    for k in 0..(MAX_UTIL_SAMPLES as u64 + 5) {
        w.push_utilisation(
            0,
            UtilSample {
                pid: 42,
                timestamp_us: T0 + k,
                sm_util: 50,
                mem_util: 20,
            },
        )
        .expect("push");
    }
    let u = r.snapshot(0).expect("snapshot").utilisation;
    assert_eq!(u.len(), MAX_UTIL_SAMPLES);
    assert_eq!(u[0].timestamp_us, T0 + 5);
    assert!(u.windows(2).all(|p| p[0].timestamp_us < p[1].timestamp_us));
    w.set_utilisation(0, &[]).expect("clear");
    assert!(r.snapshot(0).expect("snapshot").utilisation.is_empty());
    assert!(
        w.set_processes(0, &[ProcessEntry::default(); 1000])
            .is_err()
    );
}

#[test]
fn bad_files_are_refused() {
    let path = state_path("garbage");
    std::fs::write(&path, vec![7_u8; 4096]).expect("write");
    assert!(SensorReader::open(&path).is_err());
    std::fs::write(&path, b"short").expect("write");
    assert!(SensorReader::open(&path).is_err());
    assert!(SensorReader::open(state_path("does-not-exist")).is_err());
}

/// Runs only as a child of `another_process_reads_the_state`.
#[test]
fn child_reader() {
    let Some(path) = std::env::var_os("EMUGPU_TEST_CHILD_STATE") else {
        return;
    };
    let r = SensorReader::open(&path).expect("child open");
    let first = r.snapshot(0).expect("child snapshot");
    let deadline = monotonic_us() + 2_000_000;
    loop {
        let s = r.snapshot(0).expect("child snapshot");
        if s.energy_mj > first.energy_mj {
            assert_eq!(r.identity(0).expect("identity").uuid, GpuSpec::h100(0).uuid);
            println!("CHILD-SAW {} {}", s.energy_mj, s.power_instant_mw);
            return;
        }
        assert!(monotonic_us() < deadline, "child saw no counter update");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn another_process_reads_the_state() {
    let path = state_path("cross-process");
    let w = Arc::new(SensorWriter::create(&path, &GpuSpec::h100s(1)).expect("create"));
    w.set_power(0, monotonic_us(), 321.0).expect("set_power");
    let ticker = spawn_ticker(Arc::clone(&w), Duration::from_millis(1)).expect("ticker");
    let out = std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "child_reader", "--nocapture", "--test-threads=1"])
        .env("EMUGPU_TEST_CHILD_STATE", &path)
        .output()
        .expect("spawn child");
    ticker.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("CHILD-SAW") && stdout.contains(" 321000"),
        "{stdout}"
    );
}
