//! A CPU-only engine's share of the host's CPU energy is its CPU time: beside it, a process
//! that is not traced burns a core, and that share goes to "other" (unattributed), not to the
//! engine's requests. The engine's true share is read from `/proc` by this test over the same
//! time; the CPU source is the `/proc/stat` model (this VM has no RAPL), whose dynamic power
//! follows the host's utilisation.

use std::{
    process::Command,
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

fn busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let v: Vec<u64> = stat.lines().next().expect("cpu line")[4..]
        .split_whitespace()
        .map(|x| x.parse().expect("ticks"))
        .collect();
    v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
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

#[test]
fn a_cpu_engine_pays_for_its_cpu_time_and_other_load_goes_to_other() {
    if !privileged_or_skip("a_cpu_engine_pays_for_its_cpu_time_and_other_load_goes_to_other") {
        return;
    }
    let dir = TempDir::new("cpu-share");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    let (mut server, port) = listening(Command::new("python3").arg(script));
    // Not traced: a core of someone else's work.
    let mut hog = Command::new("python3")
        .args(["-c", "while True: pass"])
        .spawn()
        .expect("hog");
    let tracer = Tracer::start_with(
        TRACER,
        dir.path(),
        &[
            "--port",
            &port.to_string(),
            "--cpu-power",
            "model",
            "--no-nvml",
            "--idle-policy",
            "report",
            "--cpu-time-interval-ms",
            "200",
            "--summary-interval-ms",
            "500",
        ],
        false,
    );
    let (t0, b0) = (ticks(server.id()), busy());
    let mut client = Client::connect(port).expect("connect");
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(6) {
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
    std::thread::sleep(Duration::from_secs(2));
    // Over the daemon's whole watch, as its totals are.
    let (t1, b1) = (ticks(server.id()), busy());
    let log = tracer.log_text();
    let _ = tracer.stop();
    let _ = hog.kill();
    let _ = hog.wait();
    let _ = server.kill();
    let _ = server.wait();

    let last = log
        .lines()
        .rfind(|l| l.contains(" unattributed="))
        .expect("a summary");
    let (requests, other) = (joules(last, "requests"), joules(last, "unattributed"));
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
    assert!(
        (got - want).abs() < 0.08,
        "requests got {got:.3} of the CPU's dynamic energy, the engine used {want:.3} of the busy time: {last}"
    );
}
