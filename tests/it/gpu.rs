//! GPU binding from the NVIDIA driver's ioctls, decoded and aggregated in the kernel.
//!
//! A CUDA-like process (`emuhost hold`) opens the stand-in device nodes of two emulated GPUs
//! and makes the RM allocations and UVM registrations a CUDA context makes, then frees them.
//! The tracer, attached before, must report exactly the state changes — a compute context up
//! on each GPU, each UUID registered with UVM, then the reverse — and bind then release both
//! GPUs for the process's service.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use tracer_tests::{EmuEnv, Tracer, events_of, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn ioctls_bind_and_release_gpus() {
    if !privileged_or_skip("ioctls_bind_and_release_gpus") {
        return;
    }
    let env = EmuEnv::new("gpu-binding");
    let (dir, emuhost, dev, nvml, state) = (
        &env.dir,
        env.emuhost.clone(),
        env.dev.clone(),
        env.nvml.clone(),
        env.state.clone(),
    );
    let specs = tracer_emugpu::GpuSpec::h100s(2);
    let _sensors = tracer_emugpu::SensorWriter::create(&state, &specs).expect("sensor state");

    let mut hold = Command::new(&emuhost)
        .args(["hold", "--gpus", "2", "--device-root"])
        .arg(&dev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn emuhost hold");
    let mut stdin = hold.stdin.take().expect("stdin");
    let mut lines = BufReader::new(hold.stdout.take().expect("stdout")).lines();
    let mut expect = |word: &str| {
        let line = lines.next().expect("line").expect("read");
        assert!(line.starts_with(word), "expected {word}, got {line:?}");
        line
    };
    let pid: u32 = expect("ready")
        .trim_start_matches("ready ")
        .parse()
        .expect("pid");

    let tracer = Tracer::start_env(
        TRACER,
        dir.path(),
        &[
            "--pid",
            &pid.to_string(),
            "--device-root",
            dev.to_str().expect("utf8"),
            "--standin-devices",
            "--nvml-lib",
            nvml.to_str().expect("utf8"),
            "--summary-interval-ms",
            "200",
        ],
        true,
        &[("TRACER_EMU_STATE", &state)],
    );
    writeln!(stdin, "go").expect("go");
    expect("holding");
    std::thread::sleep(Duration::from_millis(500));
    writeln!(stdin, "free").expect("free");
    expect("freed");
    std::thread::sleep(Duration::from_millis(500));
    let log = tracer.log_text();
    writeln!(stdin, "exit").expect("exit");
    let _ = hold.wait();
    std::thread::sleep(Duration::from_millis(300));
    let events = tracer.stop();

    let gpu = events_of(&events, "gpu", pid);
    let changes = |c: &str| -> Vec<&serde_json::Value> {
        gpu.iter().copied().filter(|e| e["change"] == c).collect()
    };
    // First use of each node: nvidiactl, nvidia-uvm, nvidia0, nvidia1 — one event each, whatever
    // the number of ioctls.
    let mut nodes: Vec<String> = changes("first_use")
        .iter()
        .map(|e| e["node"].to_string())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        vec![r#""ctl""#, r#""uvm""#, r#"{"gpu":0}"#, r#"{"gpu":1}"#],
        "{gpu:#?}"
    );
    // A compute context on each RM device instance (HOPPER_COMPUTE_A), then gone.
    let mut up: Vec<(u64, u64)> = changes("context_up")
        .iter()
        .map(|e| (num(e, "instance"), num(e, "class")))
        .collect();
    up.sort_unstable();
    assert_eq!(up, vec![(0, 0xCBC0), (1, 0xCBC0)], "{gpu:#?}");
    let mut down: Vec<u64> = changes("context_down")
        .iter()
        .map(|e| num(e, "instance"))
        .collect();
    down.sort_unstable();
    assert_eq!(down, vec![0, 1], "{gpu:#?}");
    // Each GPU's UUID registered with UVM and unregistered, as NVML spells it.
    for what in ["uvm_register", "uvm_unregister"] {
        let mut uuids: Vec<String> = changes(what)
            .iter()
            .map(|e| e["uuid"].as_str().expect("uuid").to_owned())
            .collect();
        uuids.sort();
        let mut want: Vec<String> = specs.iter().map(|s| s.uuid.clone()).collect();
        want.sort();
        assert_eq!(uuids, want, "{what}: {gpu:#?}");
    }
    assert_eq!(changes("client_freed").len(), 1, "{gpu:#?}");
    // Aggregated: a handful of state changes for the ~20 ioctls the session made.
    assert_eq!(gpu.len(), 4 + 2 + 2 + 4 + 1, "{gpu:#?}");

    // The pipeline bound both GPUs to the process's service while it held them, then
    // released them when the contexts and registrations were gone.
    for g in ["gpu0", "gpu1"] {
        assert!(
            log.contains(&format!("{g} bound to service 1 (process {pid})")),
            "{g} not bound:\n{log}"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("tracer.log")).expect("log");
    for g in ["gpu0", "gpu1"] {
        assert!(
            log.contains(&format!("{g} released by service 1 (process {pid})")),
            "{g} not released:\n{log}"
        );
    }
}
