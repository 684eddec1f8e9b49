//! End to end on the emulated inference host: an OpenAI-style API process forwarding to an
//! engine process that holds two emulated GPUs (stand-in device nodes, NVIDIA ioctls, honest
//! sensors read through the NVML emulation). The tracer attaches by port with the real probes;
//! each request's energy must come from both GPUs and match the engine's ground truth.
//!
//! The host behaves like a real one: the API process writes each step's chunks one request at
//! a time (40 µs of CPU each), the engine tells it about every step over its Unix socket and
//! calls the stand-in CUDA driver every step, and at most 4 requests run at once while 6
//! clients send: requests queue. A second run gives the engine a KV cache too small for its
//! batch, so it preempts requests and recomputes them later: a preempted request must not
//! share the steps it sat out.

use std::{ffi::OsStr, path::Path, process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::{EmuEnv, jsonl, privileged_or_skip, workspace_artifact};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

/// Per record: its dynamic energy on the GPUs, its error bar there, and the truth's `field`.
fn paired(records: &[Value], truth: &[Value], field: &str) -> Vec<(f64, f64, f64)> {
    records
        .iter()
        .map(|r| {
            let id = r["external_id"].as_str().expect("request id kept");
            let t = truth
                .iter()
                .find(|t| t["request_id"] == id)
                .unwrap_or_else(|| panic!("no truth for {id}"));
            let gpus = r["devices"].as_array().expect("devices");
            let gpus = gpus.iter().filter(|d| d["kind"] == "gpu");
            let (got, bar) = gpus.fold((0.0, 0.0), |(e, u), d| {
                (
                    e + d["dynamic_j"].as_f64().unwrap_or(0.0),
                    u + d["uncertainty_j"].as_f64().unwrap_or(0.0),
                )
            });
            (got, bar, t[field].as_f64().expect("truth"))
        })
        .collect()
}

/// Joules given to the wrong request, as a share of all (half of Σ |tracer − truth|: every
/// joule given to one request too many is missing from another), on the GPUs.
fn misattributed(records: &[Value], truth: &[Value], field: &str) -> f64 {
    let pairs = paired(records, truth, field);
    let off: f64 = pairs.iter().map(|(got, _, want)| (got - want).abs()).sum();
    let all: f64 = pairs.iter().map(|p| p.2).sum();
    off / all / 2.0
}

/// Per request (in `records` order): |dynamic energy on the GPUs / truth field − 1|, and
/// whether the error bar holds the truth.
fn errors(records: &[Value], truth: &[Value], field: &str) -> Vec<(f64, bool)> {
    paired(records, truth, field)
        .into_iter()
        .map(|(got, bar, want)| ((got - want).abs() / want, (got - want).abs() <= bar))
        .collect()
}

/// Median, 95th percentile and mean of the errors, and the share of bars holding the truth.
fn summary(errs: &[(f64, bool)]) -> (f64, f64, f64, f64) {
    let mut e: Vec<f64> = errs.iter().map(|x| x.0).collect();
    e.sort_by(f64::total_cmp);
    let at = |q: f64| e[((e.len() - 1) as f64 * q).round() as usize];
    let mean = e.iter().sum::<f64>() / e.len() as f64;
    let held = errs.iter().filter(|x| x.1).count() as f64 / errs.len() as f64;
    (at(0.5), at(0.95), mean, held)
}

fn replay(recording: &Path, args: &[&str]) -> Vec<Value> {
    let out = Command::new(TRACER)
        .arg("replay")
        .arg(recording)
        .args(args)
        .output()
        .expect("replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("record JSON"))
        .collect()
}

/// One run of the emulated host under the tracer, stopped and read back.
struct Run {
    env: EmuEnv,
    records: Vec<Value>,
    truth: Vec<Value>,
    records_path: std::path::PathBuf,
    recording: std::path::PathBuf,
    log: String,
    host_pid: u32,
}

/// Runs the demo's chat-like load (streamed and not, shared system prompts, prompts up to
/// ~1000 tokens) from 8 clients for `seconds` against the emulated host started with
/// `host_args`, the tracer attached by port with the real probes, recording.
fn run_host(name: &str, seconds: u32, host_args: &[&OsStr]) -> Run {
    let env = EmuEnv::new(name);
    let stub = env.dir.path().join("libcuda.so.1");
    std::fs::copy(workspace_artifact("libcuda.so", "cuda-stub"), &stub).expect("stand-in libcuda");
    let env = env.with_cuda_lib(&stub);
    let (mut host, port) = env.start_host_with(2, host_args);
    let records_path = env.dir.path().join("records.jsonl");
    let recording = env.dir.path().join("run.rec");
    let tracer = env.start_tracer(
        TRACER,
        &[
            "--port",
            &port.to_string(),
            "--records-out",
            records_path.to_str().expect("utf8"),
            "--record",
            recording.to_str().expect("utf8"),
            // The emulated H100's idle power, as an operator would configure it from the
            // datasheet; compare dynamic energy (what requests cause) with the truth.
            "--gpu-idle-watts",
            "70",
            "--idle-policy",
            "report",
        ],
        &[],
    );
    let load = Command::new(workspace_artifact("emuload", "tracer-emuhost"))
        .args([
            "--port",
            &port.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--concurrency",
            "8",
        ])
        .args(["--max-tokens-max", "160", "--fail-on-error"])
        .output()
        .expect("emuload");
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    std::thread::sleep(Duration::from_secs(4));
    let log = tracer.log_text();
    let _ = tracer.stop();
    // It stops its engine and writes the truth summary.
    let host_pid = host.id();
    host.stop();
    let records = jsonl(&records_path);
    let truth = jsonl(&env.truth);
    Run {
        env,
        records,
        truth,
        records_path,
        recording,
        log,
        host_pid,
    }
}

/// One emulated host at a time: two hosts and two daemons on this VM's two cores disturb the
/// emulation's own step timing, which is what the accuracy bounds are about (a CI run with
/// both at once put the preempted requests' median at 13 %, 5-6 % alone).
static ONE_HOST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_host_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_HOST_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn requests_get_energy_from_both_gpus_matching_ground_truth() {
    if !privileged_or_skip("requests_get_energy_from_both_gpus_matching_ground_truth") {
        return;
    }
    let _host = one_host_at_a_time();
    // More clients (8) than the 4 requests the engine runs at once: requests queue.
    let run = run_host("emulated", 8, &[OsStr::new("--max-seqs"), OsStr::new("4")]);
    let Run {
        env,
        records,
        truth,
        records_path,
        recording,
        log,
        host_pid,
    } = run;
    let dir = &env.dir;
    // The API process holds no GPU: the binding came from the engine.
    assert!(
        log.contains("bound to service") && !log.contains(&format!("(process {host_pid})")),
        "{log}"
    );
    // The engine's CUDA calls were found in its maps and probed.
    assert!(log.contains("CUDA step clock:"), "{log}");
    let served = truth.iter().filter(|t| t["request_id"].is_string()).count();
    assert!(served >= 20, "{served} requests");
    assert_eq!(
        records.len(),
        served,
        "one energy record per request: {records:#?}"
    );
    let queued = truth
        .iter()
        .filter(|t| {
            let (a, s) = (t["arrive_us"].as_u64(), t["scheduled_us"].as_u64());
            a.zip(s).is_some_and(|(a, s)| s > a + 50_000)
        })
        .count();
    assert!(queued > 0, "nothing waited in the engine's queue");
    for r in &records {
        let id = r["external_id"].as_str().expect("request id kept");
        let t = truth
            .iter()
            .find(|t| t["request_id"] == id)
            .unwrap_or_else(|| panic!("no truth for {id}"));
        let shares = r["devices"].as_array().expect("devices");
        let gpus: Vec<&Value> = shares.iter().filter(|d| d["kind"] == "gpu").collect();
        let devices: Vec<&str> = gpus
            .iter()
            .filter(|d| d["dynamic_j"].as_f64().unwrap_or(0.0) > 0.0)
            .filter_map(|d| d["name"].as_str())
            .collect();
        assert_eq!(devices, vec!["gpu0", "gpu1"], "energy from both GPUs: {r}");
        // This VM has no RAPL: the CPU share is modelled and must say so.
        for d in shares.iter().filter(|d| d["kind"] != "gpu") {
            assert_eq!(
                d["estimated"], true,
                "host share not labelled estimated: {d}"
            );
        }
        assert!(t["dynamic_j"].as_f64().is_some(), "truth for {id}");
        // Time to first byte travels from the wire to the energy record.
        let (a, f, e) = (
            r["arrive_ns"].as_u64().expect("arrive"),
            r["first_byte_ns"]
                .as_u64()
                .expect("first byte in the energy record"),
            r["end_ns"].as_u64().expect("end"),
        );
        assert!(a <= f && f <= e, "first byte outside the request: {r}");
    }
    // Against what each request caused (the engine's ground truth), the default split.
    let (median, p95, mean, held) = summary(&errors(&records, &truth, "dynamic_j"));
    println!(
        "emulated host: {} requests ({queued} queued), caused truth: median {:.2} %, p95 {:.2} %, mean {:.2} %, bar holds {:.0} %",
        records.len(),
        median * 100.0,
        p95 * 100.0,
        mean * 100.0,
        held * 100.0
    );
    // Bounds with room for a noisy CI machine: three runs gave median 1.1-2.0 %, p95 6-21 %
    // (~58 requests, so p95 is the third worst), bars 90-100 % (BENCHMARKS.md, issue 12).
    assert!(median <= 0.08, "median error {median}");
    assert!(p95 <= 0.35, "p95 error {p95}");
    assert!(held >= 0.80, "error bars hold the truth for {held}");

    // The recording recomputes the bill exactly: same records, byte for byte.
    let replayed = dir.path().join("replayed.jsonl");
    let out = Command::new(TRACER)
        .arg("replay")
        .arg(&recording)
        .arg("--records-out")
        .arg(&replayed)
        .output()
        .expect("replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let original = std::fs::read_to_string(&records_path).expect("records");
    let again = std::fs::read_to_string(&replayed).expect("replayed");
    assert_eq!(original, again, "replay differs from the run");
    println!("replay: {}", String::from_utf8_lossy(&out.stderr).trim());

    // Another policy from the same raw data: per-request figures change, the measured total
    // and its conservation do not.
    let equal = replay(&recording, &["--split", "equal"]);
    assert_eq!(equal.len(), records.len());
    // Time sharing among the requests in the engine matches the time-sharing truth: who was
    // in which step (queue-aware presence on the engine's step clock) is right.
    let (ts_median, ts_p95, _, _) = summary(&errors(&equal, &truth, "timeshare_dynamic_j"));
    println!(
        "time sharing vs its truth: median {:.2} %, p95 {:.2} %",
        ts_median * 100.0,
        ts_p95 * 100.0
    );
    assert!(ts_median <= 0.05, "time-sharing median {ts_median}");
    assert!(ts_p95 <= 0.20, "time-sharing p95 {ts_p95}");
    // On the caused truth the default split beats time sharing: fewer joules billed to the
    // wrong request.
    let (_, _, eq_mean, _) = summary(&errors(&equal, &truth, "dynamic_j"));
    let (off, eq_off) = (
        misattributed(&records, &truth, "dynamic_j"),
        misattributed(&equal, &truth, "dynamic_j"),
    );
    println!(
        "caused truth: mean error default {:.2} %, time sharing {:.2} %; joules misattributed default {:.2} %, time sharing {:.2} %",
        mean * 100.0,
        eq_mean * 100.0,
        off * 100.0,
        eq_off * 100.0
    );
    assert!(
        off < eq_off,
        "misattributed: default {off} vs time sharing {eq_off}"
    );
    let total = |rs: &[Value]| -> f64 {
        rs.iter()
            .map(|r| r["total_j"].as_f64().expect("total"))
            .sum()
    };
    let differs = records
        .iter()
        .zip(&equal)
        .any(|(a, b)| a["dynamic_j"].as_f64() != b["dynamic_j"].as_f64());
    assert!(differs, "the equal split gave the same figures as tokens");
    let (a, b) = (total(&records), total(&equal));
    assert!((a - b).abs() <= 1e-6 * a.max(1.0), "totals {a} vs {b}");
}

#[test]
fn preempted_requests_do_not_share_the_steps_they_sat_out() {
    if !privileged_or_skip("preempted_requests_do_not_share_the_steps_they_sat_out") {
        return;
    }
    let _host = one_host_at_a_time();
    // A KV cache of 2,000 tokens for 8 running requests of up to ~1,200: the engine preempts
    // the latest-scheduled ones and recomputes them later (vLLM's recompute preemption).
    // 16 s: the preempted ones' median is over a few dozen requests; over 8 s (15-19 of them)
    // it ranged 2.5-12.6 % from run to run.
    let run = run_host(
        "emulated-preempt",
        16,
        &[
            OsStr::new("--max-seqs"),
            OsStr::new("8"),
            OsStr::new("--kv-tokens"),
            OsStr::new("2000"),
        ],
    );
    let preempted: Vec<&Value> = run
        .truth
        .iter()
        .filter(|t| t["preemptions"].as_u64().is_some_and(|p| p > 0))
        .collect();
    assert!(preempted.len() >= 3, "{} preempted", preempted.len());
    assert_eq!(
        run.records.len(),
        run.truth
            .iter()
            .filter(|t| t["request_id"].is_string())
            .count()
    );
    // Time sharing among the requests in the engine against the time-sharing truth: a
    // preempted request is out of the steps between its last token and its recomputation.
    let equal = replay(&run.recording, &["--split", "equal"]);
    let (median, p95, _, _) = summary(&errors(&equal, &run.truth, "timeshare_dynamic_j"));
    let ids: Vec<&str> = preempted
        .iter()
        .filter_map(|t| t["request_id"].as_str())
        .collect();
    // The streamed preempted ones' signed errors (a response that is not streamed shows no
    // gap: its pauses are not seen).
    let signed: Vec<f64> = equal
        .iter()
        .zip(paired(&equal, &run.truth, "timeshare_dynamic_j"))
        .filter(|(r, _)| r["events"].as_u64().is_some_and(|n| n > 0))
        .filter(|(r, _)| {
            r["external_id"]
                .as_str()
                .is_some_and(|id| ids.contains(&id))
        })
        .map(|(_, (got, _, want))| got / want - 1.0)
        .collect();
    let mut abs: Vec<f64> = signed.iter().map(|e| e.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let pre_median = abs[abs.len() / 2];
    let pre_bias = signed.iter().sum::<f64>() / signed.len() as f64;
    println!(
        "preemption: {} of {} requests preempted; time sharing vs its truth: median {:.2} %, p95 {:.2} %; {} streamed preempted ones: median {:.2} %, mean {:+.2} %",
        preempted.len(),
        run.records.len(),
        median * 100.0,
        p95 * 100.0,
        signed.len(),
        pre_median * 100.0,
        pre_bias * 100.0
    );
    // Sharing the steps they sat out, the streamed preempted ones came out at median 22 %,
    // mean +48 % on a recording of this test (median 6 %, mean +11 % with the pauses seen;
    // BENCHMARKS.md). The live run varies with the machine's load: six runs on 2026-12-05 gave
    // medians of 2.5-10.9 % alone and 12.7 % beside the other test of this file (the same
    // inputs replay to the same records: the spread is in the inputs).
    assert!(signed.len() >= 3, "{} streamed preempted", signed.len());
    assert!(median <= 0.08, "time-sharing median {median}");
    assert!(
        pre_median <= 0.16,
        "preempted requests' median {pre_median}"
    );
    assert!(
        pre_bias <= 0.25,
        "preempted requests over-charged by {pre_bias}"
    );
}
