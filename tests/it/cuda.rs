//! The CUDA step clock and the IPC clock, against a CUDA-like process (`cuda-steps`) running on
//! the stand-in driver (`tests/cuda-stub`, a real `libcuda.so` that does nothing).
//!
//! - The stand-in itself: every export can take a uprobe (no `lock`-prefixed first
//!   instruction; the probed ones start with a `push`, which the kernel emulates) and has its
//!   own address.
//! - The probes, loaded here: exactly one record per step with the step's launch count, none
//!   for synchronisations with nothing launched (counted in a statistic), the per-process
//!   counters reset at every record, nothing once detached, nothing left after the exit.
//! - The daemon: finds the library in the process's maps and attaches by itself; the Unix
//!   socketpair the process had before the attach (seeded from service discovery) and the Unix
//!   connection it made afterwards are followed as IPC: lengths, no payload; a read a thread
//!   was already blocked in at attach is reported when it returns.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use tracer::{
    ids::Pid,
    probe::{
        CUDA_SYMBOLS, ProbeSettings, Probes,
        decode::{self, Body, CudaSyncKind},
    },
};
use tracer_ebpf::abi::{CudaCounts, Stat, TARGET_PID};
use tracer_tests::{TempDir, Tracer, events_of, privileged_or_skip, workspace_artifact};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const STEPS_BIN: &str = env!("CARGO_BIN_EXE_cuda-steps");
const STEPS: u32 = 6;
const LAUNCHES: u32 = 9;
const EMPTY_PER_STEP: u32 = 2;

/// The stand-in driver, copied as `libcuda.so.1` (the name a real driver has) into `dir`.
fn stub_library(dir: &Path) -> PathBuf {
    let built = workspace_artifact("libcuda.so", "cuda-stub");
    let lib = dir.join("libcuda.so.1");
    std::fs::copy(&built, &lib).expect("copy libcuda stand-in");
    lib
}

/// A running `cuda-steps steps`, waiting for its go.
struct Steps {
    child: Child,
    stdin: ChildStdin,
    lines: Box<dyn Iterator<Item = String>>,
    pid: u32,
}

impl Steps {
    fn start(lib: &Path) -> Steps {
        let mut child = Command::new(STEPS_BIN)
            .arg("steps")
            .arg(lib)
            .args([STEPS, LAUNCHES, EMPTY_PER_STEP].map(|n| n.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cuda-steps");
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = Box::new(
            BufReader::new(child.stdout.take().expect("stdout"))
                .lines()
                .map(|l| l.expect("cuda-steps stdout")),
        );
        let ready = lines.next().expect("ready line");
        let pid = ready
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("cuda-steps said {ready:?}"));
        Steps {
            child,
            stdin,
            lines,
            pid,
        }
    }

    /// Sends `word` and returns the numbers of the `done` line that follows.
    fn run(&mut self, word: &str) -> Vec<i64> {
        writeln!(self.stdin, "{word}").expect("write to cuda-steps");
        let done = self.lines.next().expect("done line");
        let mut parts = done.split_whitespace();
        assert_eq!(parts.next(), Some("done"), "{done:?}");
        parts.map(|p| p.parse().expect("number")).collect()
    }

    fn finish(mut self) {
        let _ = writeln!(self.stdin, "exit");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "cuda-steps failed: {status}");
    }
}

#[test]
fn stub_exports_can_take_uprobes() {
    let dir = TempDir::new("cuda-stub");
    let lib = stub_library(dir.path());
    let data = std::fs::read(&lib).expect("read stand-in");
    let file = object::File::parse(&*data).expect("parse ELF");
    let mut addresses = std::collections::BTreeMap::new();
    for name in cuda::EXPORTS {
        let sym = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("{name} not exported"));
        let section = file
            .section_by_index(sym.section_index().expect("defined"))
            .expect("section");
        let offset = sym.address() - section.address();
        let code = section.data().expect("section data");
        let first = code[usize::try_from(offset).expect("offset")];
        assert_ne!(
            first, 0xF0,
            "{name} starts with a lock prefix: the kernel refuses a uprobe there"
        );
        if CUDA_SYMBOLS.iter().any(|(s, _)| *s == name) {
            // `push %reg` (0x50..=0x57): emulated under a uprobe, the cost the stand-in is meant
            // to show (see its crate docs).
            assert!(
                (0x50..=0x57).contains(&first),
                "{name} starts with {first:#04x}, not a push"
            );
        }
        if let Some(other) = addresses.insert(sym.address(), name) {
            panic!("{name} and {other} share an address: probes would fire for both");
        }
    }
    for (symbol, _) in CUDA_SYMBOLS {
        assert!(
            cuda::EXPORTS.contains(symbol),
            "{symbol} is probed but the stand-in lacks it"
        );
    }
}

fn settings(dev: &Path) -> ProbeSettings {
    ProbeSettings {
        ring_bytes: 1 << 20,
        capture_bytes: 256,
        request_capture_bytes: 256,
        device_root: dev.to_path_buf(),
        filter_cgroup: false,
        filter_comm: false,
        ioctl_events: false,
        standin_devices: false,
        ipc: true,
    }
}

/// The step clock's records of `pid` in the ring now: (launches, graph launches, sync).
fn drain_syncs(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pid: u32,
) -> Vec<(u32, u32, CudaSyncKind)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let Ok(ev) = decode::decode(&item) else {
            continue;
        };
        if let Body::CudaSync {
            launches,
            graph_launches,
            sync,
        } = ev.body
            && ev.tgid == pid
        {
            out.push((launches, graph_launches, sync));
        }
    }
    out
}

#[test]
fn one_record_per_step_with_its_launches() {
    if !privileged_or_skip("one_record_per_step_with_its_launches") {
        return;
    }
    let dir = TempDir::new("cuda-probes");
    let lib = stub_library(dir.path());
    let mut steps = Steps::start(&lib);
    let pid = steps.pid;

    let mut probes = Probes::load(&settings(dir.path())).expect("load probes");
    let mut ring = probes.take_events().expect("ring");
    probes.add_target(pid, TARGET_PID).expect("target");
    let attached = probes
        .attach_cuda(&lib, Some(Pid(pid)))
        .expect("attach the step clock");
    assert_eq!(attached, CUDA_SYMBOLS.len(), "every driver symbol probed");
    assert_eq!(
        probes.attach_cuda(&lib, Some(Pid(pid))).expect("again"),
        0,
        "attaching twice is a no-op"
    );
    let empty_before = probes.stats().expect("stats").get(Stat::CudaSyncEmpty);

    let done = steps.run("go");
    assert_eq!(
        done[..2],
        [i64::from(STEPS), i64::from(STEPS * EMPTY_PER_STEP)]
    );
    let syncs = drain_syncs(&mut ring, pid);
    assert_eq!(
        syncs,
        vec![(LAUNCHES, 0, CudaSyncKind::Stream); STEPS as usize],
        "one record per step, none for the empty synchronisations"
    );
    let stats = probes.stats().expect("stats");
    assert_eq!(
        stats.get(Stat::CudaSyncEmpty) - empty_before,
        u64::from(STEPS * EMPTY_PER_STEP),
        "empty synchronisations counted"
    );
    assert_eq!(stats.get(Stat::CudaTableFull), 0);
    assert_eq!(
        probes.cuda_counts(pid).expect("counts"),
        Some(CudaCounts::default()),
        "counters reset at the last record"
    );

    // Detached: the process runs its steps again and nothing is counted or reported.
    assert_eq!(
        probes.detach_cuda(Pid(pid)).expect("detach"),
        CUDA_SYMBOLS.len()
    );
    assert!(probes.cuda_attached().is_empty());
    steps.run("again");
    assert!(
        drain_syncs(&mut ring, pid).is_empty(),
        "records after detach"
    );
    assert_eq!(
        probes.cuda_counts(pid).expect("counts"),
        Some(CudaCounts::default())
    );

    // The exit: the daemon forgets the process, and its counters go with it.
    steps.finish();
    probes.forget_process(pid).expect("forget");
    assert_eq!(probes.cuda_counts(pid).expect("counts"), None);
}

fn num(v: &serde_json::Value, k: &str) -> i64 {
    v[k].as_i64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn daemon_attaches_the_step_clock_and_follows_ipc() {
    if !privileged_or_skip("daemon_attaches_the_step_clock_and_follows_ipc") {
        return;
    }
    let dir = TempDir::new("cuda-daemon");
    let lib = stub_library(dir.path());
    let mut steps = Steps::start(&lib);
    let pid = steps.pid;
    let pid_s = pid.to_string();
    let tracer = Tracer::start(
        TRACER,
        dir.path(),
        &[
            "--pid",
            &pid_s,
            "--device-root",
            dir.path().to_str().expect("utf8"),
            "--no-nvml",
            "--poll-interval-ms",
            "5",
            "--summary-interval-ms",
            "0",
        ],
    );
    let log = tracer.log_text();
    assert!(
        log.contains(&format!(
            "CUDA step clock: {} uprobes on",
            CUDA_SYMBOLS.len()
        )) && log.contains("libcuda.so.1 for process"),
        "the library was found in the maps and probed:\n{log}"
    );
    let done = steps.run("go");
    let (pair_out, pair_in, client, server, waited) = (done[2], done[3], done[4], done[5], done[6]);
    std::thread::sleep(Duration::from_millis(200));
    let events = tracer.stop();
    steps.finish();

    let syncs = events_of(&events, "cuda_sync", pid);
    assert_eq!(syncs.len(), STEPS as usize, "{syncs:?}");
    for s in &syncs {
        assert_eq!(num(s, "launches"), i64::from(LAUNCHES));
        assert_eq!(num(s, "graph_launches"), 0);
        assert_eq!(s["sync"], "stream");
    }

    let data = events_of(&events, "data", pid);
    for d in &data {
        assert_eq!(d["ipc"], true, "only IPC here: {d}");
        assert_eq!(d["payload"], "", "no payload on IPC: {d}");
    }
    let on = |fd: i64, inbound: bool| -> Vec<i64> {
        data.iter()
            .filter(|d| num(d, "fd") == fd && d["inbound"] == inbound)
            .map(|d| num(d, "total_len"))
            .collect()
    };
    let steps_n = STEPS as usize;
    assert_eq!(
        on(pair_out, false),
        vec![16; steps_n],
        "socketpair (seeded) writes"
    );
    assert_eq!(
        on(pair_in, true),
        vec![16; steps_n],
        "socketpair (seeded) reads"
    );
    assert_eq!(
        on(client, false),
        vec![32; steps_n],
        "connected socket writes"
    );
    assert_eq!(on(server, true), vec![32; steps_n], "accepted socket reads");
    // The read a thread was already blocked in when the daemon attached: reported when it
    // returned (the daemon stashed it from /proc), like any other.
    assert_eq!(
        on(waited, true),
        vec![24],
        "a read in progress at attach is seen"
    );
    let conns = events_of(&events, "conn", pid);
    assert_eq!(
        conns.len(),
        2,
        "connect + accept of the Unix connection: {conns:?}"
    );
    for c in &conns {
        assert_eq!(num(c, "family"), 1);
    }
}
