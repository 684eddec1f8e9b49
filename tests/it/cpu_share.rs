//! A CPU-only engine's share of the host's CPU energy is its CPU time: beside it, a process
//! that is not traced burns a core, and that share goes to "other" (unattributed), not to the
//! engine's requests. The engine's true share is read from `/proc` by this test over the same
//! time. Two sources: the `/proc/stat` model (this VM has no RAPL), and an emulated powercap
//! tree (a package and its DRAM zone) whose counters this test advances with the host's real
//! utilisation, so the daemon reads them through the same sysfs files a RAPL host has.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracer_tests::{TempDir, Tracer, client::Client, listening, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest: Vec<&str> = stat[stat.rfind(')').expect("comm") + 1..]
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().expect("utime") + rest[12].parse::<u64>().expect("stime")
}

/// The host's (busy, total) ticks.
fn host_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let v: Vec<u64> = stat.lines().next().expect("cpu line")[4..]
        .split_whitespace()
        .map(|x| x.parse().expect("ticks"))
        .collect();
    (
        v[0] + v[1] + v[2] + v[5] + v[6] + v[7],
        v.iter().take(8).sum(),
    )
}

fn busy() -> u64 {
    host_ticks().0
}

/// The summary line's `requests=` and `unattributed=` joules.
fn joules(line: &str, key: &str) -> f64 {
    let at = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    line[at..]
        .split('J')
        .next()
        .expect("J")
        .parse()
        .expect("joules")
}

/// An emulated RAPL powercap tree: `package-0` draws `8 + 30·u` W and its `dram` zone
/// `2 + 6·u` W, `u` the host's busy fraction over the last 20 ms (from `/proc/stat`). Counters
/// are replaced atomically (write, rename), as sysfs reads never see half a number.
struct Powercap {
    root: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Powercap {
    const ZONES: [(&str, &str, f64, f64); 2] = [
        ("intel-rapl:0", "package-0", 8.0, 30.0),
        ("intel-rapl:0/intel-rapl:0:0", "dram", 2.0, 6.0),
    ];

    fn start(dir: &Path) -> Powercap {
        let root = dir.join("sys");
        let class = root.join("class/powercap");
        for (path, name, _, _) in Self::ZONES {
            let zone = class.join(path);
            std::fs::create_dir_all(&zone).expect("zone dir");
            std::fs::write(zone.join("name"), format!("{name}\n")).expect("name");
            std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").expect("range");
            std::fs::write(zone.join("energy_uj"), "0\n").expect("energy");
        }
        // sysfs lists each zone under the class directory too.
        std::os::unix::fs::symlink(
            class.join("intel-rapl:0/intel-rapl:0:0"),
            class.join("intel-rapl:0:0"),
        )
        .expect("link");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut energy_uj = [0.0f64; 2];
            let mut last = (Instant::now(), host_ticks());
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let now = (Instant::now(), host_ticks());
                let dt_s = now.0.duration_since(last.0).as_secs_f64();
                let u = (now.1.0 - last.1.0) as f64 / (now.1.1 - last.1.1).max(1) as f64;
                last = now;
                for (i, (path, _, idle_w, dyn_w)) in Self::ZONES.iter().enumerate() {
                    energy_uj[i] += (idle_w + dyn_w * u.clamp(0.0, 1.0)) * dt_s * 1e6;
                    let zone = class.join(path);
                    let tmp = zone.join(".energy_uj");
                    std::fs::write(&tmp, format!("{}\n", energy_uj[i] as u64)).expect("write");
                    std::fs::rename(&tmp, zone.join("energy_uj")).expect("rename");
                }
            }
        });
        Powercap {
            root,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Powercap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves CPU-burning requests for `load` while a core of untraced work runs beside them;
/// returns the engine's share of the host's busy time and its requests' share of the
/// attributed-or-unattributed dynamic energy, with the daemon's last summary line and its log.
fn share(
    dir: &TempDir,
    args: &[&str],
    quiet: Duration,
    load: Duration,
) -> (f64, f64, String, String) {
    // One at a time: each test's engine and its hog are the other's "other processes".
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    let (mut server, port) = listening(Command::new("python3").arg(script));
    let port_s = port.to_string();
    let mut all = vec![
        "--port",
        &port_s,
        "--no-nvml",
        "--idle-policy",
        "report",
        "--cpu-time-interval-ms",
        "200",
        "--summary-interval-ms",
        "500",
    ];
    all.extend_from_slice(args);
    let tracer = Tracer::start_with(TRACER, dir.path(), &all, false);
    // A quiet host first, as every host has some: where a measured package learns its idle.
    std::thread::sleep(quiet);
    // Not traced: a core of someone else's work.
    let mut hog = Command::new("python3")
        .args(["-c", "while True: pass"])
        .spawn()
        .expect("hog");
    let (t0, b0) = (ticks(server.id()), busy());
    let mut client = Client::connect(port).expect("connect");
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < load {
        let ex = client
            .post(
                "/v1/chat/completions",
                r#"{"model":"cpu","max_tokens":4,"burn_ms":40,"messages":[{"role":"user","content":"hi"}]}"#,
                &[],
            )
            .expect("exchange");
        assert_eq!(ex.status, 200);
        n += 1;
    }
    drop(client);
    // Stop the other load before the engine's window closes, so both are measured alike.
    let _ = hog.kill();
    let _ = hog.wait();
    let (t1, b1) = (ticks(server.id()), busy());
    std::thread::sleep(Duration::from_secs(2));
    let log = tracer.log_text();
    let _ = tracer.stop();
    let _ = server.kill();
    let _ = server.wait();

    let last = log
        .lines()
        .rfind(|l| l.contains(" unattributed="))
        .expect("a summary")
        .to_owned();
    let (requests, other) = (joules(&last, "requests"), joules(&last, "unattributed"));
    let got = requests / (requests + other);
    let want = (t1 - t0) as f64 / (b1 - b0).max(1) as f64;
    println!(
        "cpu share: {n} requests; engine's CPU time {:.1} % of the host's busy time, its requests got {:.1} % of the dynamic CPU energy ({requests:.1} J, other {other:.1} J)",
        100.0 * want,
        100.0 * got
    );
    assert!(
        want > 0.2 && want < 0.8,
        "the engine's share {want}: {last}"
    );
    (got, want, last, log)
}

#[test]
fn a_cpu_engine_pays_for_its_cpu_time_and_other_load_goes_to_other() {
    if !privileged_or_skip("a_cpu_engine_pays_for_its_cpu_time_and_other_load_goes_to_other") {
        return;
    }
    let dir = TempDir::new("cpu-share");
    let (got, want, last, _) = share(
        &dir,
        &["--cpu-power", "model"],
        Duration::ZERO,
        Duration::from_secs(6),
    );
    assert!(
        (got - want).abs() < 0.06,
        "requests got {got:.3} of the CPU's dynamic energy, the engine used {want:.3} of the busy time: {last}"
    );
}

/// The same split read from RAPL counters: the package and its DRAM domain, both host domains.
#[test]
fn a_cpu_engine_pays_for_its_cpu_time_on_a_powercap_tree() {
    if !privileged_or_skip("a_cpu_engine_pays_for_its_cpu_time_on_a_powercap_tree") {
        return;
    }
    let dir = TempDir::new("cpu-share-powercap");
    let tree = Powercap::start(dir.path());
    let config = dir.path().join("tracer.toml");
    std::fs::write(
        &config,
        format!(
            "[power.cpu]\nsource = \"powercap\"\nsysfs_root = \"{}\"\n",
            tree.root.display()
        ),
    )
    .expect("config");
    let (got, want, last, log) = share(
        &dir,
        &["--config", config.to_str().expect("utf-8 path")],
        Duration::from_secs(3),
        Duration::from_secs(6),
    );
    drop(tree);
    for line in [
        "CPU source powercap",
        "power: cpu0 (CpuPackage)",
        "power: dram0 (Dram)",
    ] {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
    assert!(
        (got - want).abs() < 0.06,
        "requests got {got:.3} of the package's and DRAM's dynamic energy, the engine used {want:.3} of the busy time: {last}"
    );
}
