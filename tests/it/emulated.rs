//! End to end on the emulated inference host: an OpenAI-style API process forwarding to an
//! engine process that holds two emulated GPUs (stand-in device nodes, NVIDIA ioctls, honest
//! sensors read through the NVML emulation). The tracer attaches by port with the real probes;
//! each request's energy must come from both GPUs and match the engine's ground truth.

use std::{process::Command, time::Duration};

use serde_json::Value;
use tracer_tests::{EmuEnv, Tracer, client::Client, jsonl, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

#[test]
fn requests_get_energy_from_both_gpus_matching_ground_truth() {
    if !privileged_or_skip("requests_get_energy_from_both_gpus_matching_ground_truth") {
        return;
    }
    let env = EmuEnv::new("emulated");
    let (dir, dev, nvml, state, truth) = (
        &env.dir,
        env.dev.clone(),
        env.nvml.clone(),
        env.state.clone(),
        env.truth.clone(),
    );
    let (mut host, port) = env.start_host(2);
    let records_path = dir.path().join("records.jsonl");
    let recording = dir.path().join("run.rec");
    let tracer = Tracer::start_env(
        TRACER,
        dir.path(),
        &[
            "--port",
            &port.to_string(),
            "--device-root",
            dev.to_str().expect("utf8"),
            "--standin-devices",
            "--nvml-lib",
            nvml.to_str().expect("utf8"),
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
        false,
        &[("TRACER_EMU_STATE", &state)],
    );

    // 4 concurrent clients × 5 requests, streaming and not, 1–3 s each.
    std::thread::scope(|s| {
        for c in 0..4 {
            s.spawn(move || {
                let mut client = Client::connect(port).expect("connect");
                for i in 0..5 {
                    let n = c * 5 + i;
                    let body = format!(
                        r#"{{"model":"emu","stream":{},"stream_options":{{"include_usage":true}},"max_tokens":{},"messages":[{{"role":"user","content":"{}"}}]}}"#,
                        n % 2 == 0,
                        40 + 10 * (n % 5),
                        "tell me about energy ".repeat(1 + n % 7)
                    );
                    let rid = format!("e2e-{n}");
                    let ex = client
                        .post("/v1/chat/completions", &body, &[("X-Request-Id", &rid)])
                        .expect("exchange");
                    assert_eq!(ex.status, 200);
                }
            });
        }
    });
    std::thread::sleep(Duration::from_secs(4));
    let log = tracer.log_text();
    let _ = tracer.stop();
    // It stops its engine and writes the truth summary.
    host.stop();

    // The API process holds no GPU: the binding came from the engine.
    assert!(
        log.contains("bound to service") && !log.contains(&format!("(process {})", host.id())),
        "{log}"
    );
    let records = jsonl(&records_path);
    let truth = jsonl(&truth);
    assert_eq!(
        records.len(),
        20,
        "one energy record per request: {records:#?}"
    );
    let mut errs = Vec::new();
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
        let got: f64 = gpus.iter().filter_map(|d| d["dynamic_j"].as_f64()).sum();
        let want = t["dynamic_j"].as_f64().expect("truth");
        errs.push((got - want).abs() / want);
    }
    errs.sort_by(f64::total_cmp);
    let median = errs[errs.len() / 2];
    println!(
        "emulated host: {} requests, median error {:.2}%, max {:.2}%",
        errs.len(),
        median * 100.0,
        errs[errs.len() - 1] * 100.0
    );
    assert!(median <= 0.10, "median error {median}");

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
    let out = Command::new(TRACER)
        .arg("replay")
        .arg(&recording)
        .args(["--split", "equal"])
        .output()
        .expect("replay equal");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let equal: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("record JSON"))
        .collect();
    assert_eq!(equal.len(), records.len());
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
