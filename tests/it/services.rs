//! Two independent services on one GPU, on the emulated host, probes attached for real.
//!
//! Service A is the emulated inference server (API process + engine holding GPUs 0 and 1),
//! attached by port after it started (its GPUs are seeded from /proc). Service B is a second,
//! unrelated CUDA-like process, attached by pid, that creates a context on GPU 0 while A
//! serves requests, then frees it and exits mid-run. The tracer must keep them two services,
//! bind GPU 0 to both while B holds it and release it when B exits. A shared GPU's energy goes
//! to the services with work in flight, weighted by NVML's per-process SM utilisation where it
//! has samples (else equally; the weights are unit-tested in `tracer::pipeline`): B serves
//! nothing, so A keeps its energy and its figures still match the ground truth.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tracer_tests::{EmuEnv, Tracer, client::Client, jsonl, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

#[test]
fn two_services_share_a_gpu_by_sm_utilisation() {
    if !privileged_or_skip("two_services_share_a_gpu_by_sm_utilisation") {
        return;
    }
    let env = EmuEnv::new("services");
    let (dir, emuhost, dev, nvml, state, truth) = (
        &env.dir,
        env.emuhost.clone(),
        env.dev.clone(),
        env.nvml.clone(),
        env.state.clone(),
        env.truth.clone(),
    );
    let (mut host, port) = env.start_host(2);

    let mut other = Command::new(&emuhost)
        .args(["hold", "--gpus", "1", "--device-root"])
        .arg(&dev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn emuhost hold");
    let mut other_in = other.stdin.take().expect("stdin");
    let mut other_out = BufReader::new(other.stdout.take().expect("stdout")).lines();
    let mut expect = |word: &str| {
        let line = other_out.next().expect("line").expect("read");
        assert!(line.starts_with(word), "expected {word}, got {line:?}");
        line
    };
    let other_pid: u32 = expect("ready")
        .trim_start_matches("ready ")
        .parse()
        .expect("pid");

    // `tracer services` sees two services: the server (API + engine) and the other process.
    let out = Command::new(TRACER)
        .args(["services", "--json", "--port", &port.to_string(), "--pid"])
        .arg(other_pid.to_string())
        .arg("--device-root")
        .arg(&dev)
        .output()
        .expect("tracer services");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let discovery: Value = serde_json::from_slice(&out.stdout).expect("services JSON");
    let services = discovery["services"].as_array().expect("services");
    assert_eq!(services.len(), 2, "{discovery:#}");
    let by_name = |name: String| -> &Value {
        services
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name}: {discovery:#}"))
    };
    let server = by_name(format!("port {port}"));
    let a = server["id"].as_u64().expect("id");
    let b = by_name(format!("pid {other_pid}"))["id"]
        .as_u64()
        .expect("id");
    let members = server["members"].as_object().expect("members");
    assert_eq!(members.len(), 2, "API process and engine: {server:#}");
    assert!(
        members
            .values()
            .any(|m| m["reasons"][0]["kind"] == "descendant"),
        "the engine joins as a descendant: {server:#}"
    );

    let records_path = dir.path().join("records.jsonl");
    let tracer = Tracer::start_env(
        TRACER,
        dir.path(),
        &[
            "--port",
            &port.to_string(),
            "--pid",
            &other_pid.to_string(),
            "--device-root",
            dev.to_str().expect("utf8"),
            "--standin-devices",
            "--nvml-lib",
            nvml.to_str().expect("utf8"),
            "--records-out",
            records_path.to_str().expect("utf8"),
            "--gpu-idle-watts",
            "70",
            "--idle-policy",
            "report",
            "--summary-interval-ms",
            "500",
        ],
        false,
        &[("TRACER_EMU_STATE", &state)],
    );
    // B creates its context on GPU 0 while A serves.
    writeln!(other_in, "go").expect("go");
    expect("holding");
    let serve = |n: usize| {
        std::thread::scope(|s| {
            for c in 0..2 {
                s.spawn(move || {
                    let mut client = Client::connect(port).expect("connect");
                    for i in 0..n {
                        let k = c * n + i;
                        let body = format!(
                            r#"{{"model":"emu","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{},"messages":[{{"role":"user","content":"{}"}}]}}"#,
                            40 + 10 * (k % 4),
                            "share the gpu ".repeat(1 + k % 5)
                        );
                        let rid = format!("svc-{c}-{i}-{n}");
                        let ex = client
                            .post("/v1/chat/completions", &body, &[("X-Request-Id", &rid)])
                            .expect("exchange");
                        assert_eq!(ex.status, 200);
                    }
                });
            }
        });
    };
    serve(4);
    // B frees its context and exits mid-run; A goes on.
    writeln!(other_in, "free").expect("free");
    expect("freed");
    writeln!(other_in, "exit").expect("exit");
    let _ = other.wait();
    serve(3);
    std::thread::sleep(Duration::from_secs(3));
    let log = tracer.log_text();
    let _ = tracer.stop();
    // It stops its engine and writes the truth.
    host.stop();

    for (what, needle) in [
        ("A holds GPU 0", format!("gpu0 bound to service {a}")),
        ("A holds GPU 1", format!("gpu1 bound to service {a}")),
        (
            "B holds GPU 0",
            format!("gpu0 bound to service {b} (process {other_pid})"),
        ),
        (
            "B releases GPU 0",
            format!("gpu0 released by service {b} (process {other_pid})"),
        ),
    ] {
        assert!(log.contains(&needle), "{what}: no {needle:?} in\n{log}");
    }
    assert!(
        !log.contains(&format!("gpu1 bound to service {b}")),
        "B never touched GPU 1:\n{log}"
    );

    let records = jsonl(&records_path);
    let truth = jsonl(&truth);
    assert_eq!(records.len(), 14, "{records:#?}");
    let mut errs = Vec::new();
    for r in &records {
        assert_eq!(r["service_name"], format!("port {port}"), "{r}");
        let id = r["external_id"].as_str().expect("request id");
        let t = truth
            .iter()
            .find(|t| t["request_id"] == id)
            .unwrap_or_else(|| panic!("no truth for {id}"));
        let got: f64 = r["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .filter(|d| d["kind"] == "gpu")
            .filter_map(|d| d["dynamic_j"].as_f64())
            .sum();
        let want = t["dynamic_j"].as_f64().expect("truth");
        errs.push((got - want).abs() / want);
    }
    errs.sort_by(f64::total_cmp);
    let median = errs[errs.len() / 2];
    println!(
        "shared GPU: {} requests of service A, median error {:.2}%, max {:.2}%",
        errs.len(),
        median * 100.0,
        errs[errs.len() - 1] * 100.0
    );
    assert!(median <= 0.10, "median error {median}: B took A's energy");
}

/// An engine the server connects to only after the daemon attached is found by a later
/// re-discovery, after passes that found nothing have already spaced out (`rediscover.rs`).
#[test]
fn a_peer_linked_after_attach_is_found_by_rediscovery() {
    if !privileged_or_skip("a_peer_linked_after_attach_is_found_by_rediscovery") {
        return;
    }
    let dir = tracer_tests::TempDir::new("rediscover");
    let sock = dir.path().join("engine.sock");
    // The engine: listens on a Unix socket and holds whatever connects.
    let engine_py = "import socket,sys,time\n\
        s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)\n\
        print('ready', flush=True)\n\
        c,_=s.accept()\n\
        time.sleep(60)\n";
    let mut engine = Command::new("python3")
        .args(["-c", engine_py, sock.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("engine");
    let mut line = String::new();
    BufReader::new(engine.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("engine ready");
    // The server: connects to the engine when told (stdin), then stays.
    let server_py = "import socket,sys,time\n\
        sys.stdin.readline()\n\
        c=socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])\n\
        print('linked', flush=True)\n\
        time.sleep(60)\n";
    let mut server = Command::new("python3")
        .args(["-c", server_py, sock.to_str().expect("utf8")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let server_pid = server.id().to_string();
    let tracer = Tracer::start(
        TRACER,
        dir.path(),
        &[
            "--pid",
            &server_pid,
            "--device-root",
            dir.path().to_str().expect("utf8"),
            "--no-nvml",
            "--rediscover-ms",
            "100",
            "--rediscover-max-ms",
            "400",
            "--summary-interval-ms",
            "0",
        ],
    );
    let gained = format!("gained process {}", engine.id());
    // Quiet passes first: the delay grows to its maximum, and nothing is found.
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(!tracer.log_text().contains(&gained), "not linked yet");
    writeln!(server.stdin.as_mut().expect("stdin"), "go").expect("tell the server");
    let mut linked = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut linked)
        .expect("server linked");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !tracer.log_text().contains(&gained) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = tracer.log_text();
    let _ = tracer.stop();
    let _ = server.kill();
    let _ = engine.kill();
    let _ = server.wait();
    let _ = engine.wait();
    assert!(
        log.contains(&gained),
        "the engine joined the service:\n{log}"
    );
}
