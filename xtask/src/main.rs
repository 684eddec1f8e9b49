//! Project tasks: `cargo xtask setup | test | run | demo | bench-probes | bench-sampler`.
//!
//! `setup` makes a fresh machine able to build and load the probes, and is idempotent: every step
//! first checks whether it is needed and says what it found or did. `test` and `run` call it first.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The nightly that compiles the eBPF crate: its LLVM (22) must match bpf-linker's (Debian's
/// llvm-22-dev). Never a floating `nightly`: newer ones ship LLVM 23. Keep in sync with
/// tracer/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// Debian package providing the LLVM that bpf-linker links against.
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Parser)]
#[command(about = "tracer project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and load the probes (idempotent).
    Setup,
    /// setup, then fmt check, clippy (-D warnings, userspace and eBPF), unit and integration
    /// tests (as root: the integration tests load the real probes).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// setup, build the daemon (release) and run `tracer run <ARGS>` as root.
    Run {
        /// Arguments for `tracer run`, e.g. `-- --port 8000`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// setup, then measure what the probes cost a process (not a target / a target) and print a
    /// table for BENCHMARKS.md.
    BenchProbes {
        /// Iterations per measurement (best of 3 rounds is reported).
        #[arg(long, default_value_t = 200_000)]
        iterations: u32,
    },
    /// setup, then measure what the power sampler costs: the real NVML source on emulated GPUs
    /// through the NVML emulation library, per case (energy only, with processes at 1 Hz, with
    /// processes every poll), and print a table for BENCHMARKS.md.
    BenchSampler {
        /// Emulated GPUs.
        #[arg(long, default_value_t = 8)]
        gpus: u32,
        /// Sampling rate.
        #[arg(long, default_value_t = 100)]
        hz: u32,
        /// Seconds per case.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// setup, then the no-GPU demo: the emulated inference host (API process, engine on two
    /// emulated GPUs with honest sensors, NVML emulation), the tracer attached to it by port, a
    /// chat-like load, and per-request attribution beside the ground truth.
    Demo {
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    // What `setup` installs with cargo (bpf-linker) must be found by the eBPF build even when
    // the caller's PATH lacks cargo's bin directory.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    let bin = cargo_bin_dir();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin);
        // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
        unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    }
    match cli.command {
        Task::Setup => setup(),
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
        Task::Run { args } => {
            setup()?;
            run(&args)
        }
        Task::BenchProbes { iterations } => {
            setup()?;
            bench_probes(iterations)
        }
        Task::BenchSampler { gpus, hz, seconds } => {
            setup()?;
            bench_sampler(gpus, hz, seconds)
        }
        Task::Demo { seconds } => {
            setup()?;
            demo(seconds)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a command, failing with its name if it fails.
fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Prefix for commands that need root: nothing when root, `sudo` otherwise.
fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map_or_else(
            || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
            PathBuf::from,
        )
        .join("bin")
}

fn setup() -> Result<()> {
    // 1. LLVM 22 development files for bpf-linker.
    if Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        eprintln!("setup: {LLVM_PACKAGE} present");
    } else {
        eprintln!("setup: installing {LLVM_PACKAGE} (apt)");
        sh(privileged("apt-get").arg("update"))?;
        sh(privileged("apt-get")
            .args(["install", "-y", "--no-install-recommends", LLVM_PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // 2. The pinned nightly with rust-src (build-std) and clippy (eBPF lints).
    let have_nightly = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    match have_nightly {
        Some(list) if list.contains("rust-src") && list.contains("clippy") => {
            eprintln!("setup: {EBPF_TOOLCHAIN} with rust-src and clippy present");
        }
        _ => {
            eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src, clippy");
            sh(Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ]))?;
        }
    }

    // 3. Stable components used by `test`.
    for (component, probe) in [("clippy", "clippy-driver"), ("rustfmt", "rustfmt")] {
        if succeeds(probe, &["--version"]) {
            eprintln!("setup: {component} present");
        } else {
            eprintln!("setup: installing {component}");
            sh(Command::new("rustup").args(["component", "add", component]))?;
        }
    }

    // 4. bpf-linker, built against LLVM 22.
    let linker = cargo_bin_dir().join("bpf-linker");
    if succeeds("bpf-linker", &["--version"]) || linker.exists() {
        eprintln!("setup: bpf-linker present");
    } else {
        eprintln!("setup: building bpf-linker against LLVM 22 (about 2 minutes)");
        let path = format!("{LLVM_PREFIX}/bin:{}", env::var("PATH").unwrap_or_default());
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }

    // 5. tracefs (the daemon also mounts it itself if needed).
    if Path::new(TRACEFS).join("events").is_dir() {
        eprintln!("setup: tracefs mounted");
    } else {
        eprintln!("setup: mounting tracefs at {TRACEFS}");
        if let Err(e) = sh(privileged("mount").args(["-t", "tracefs", "nodev", TRACEFS])) {
            eprintln!("setup: could not mount tracefs ({e}); the daemon will try again as root");
        }
    }
    Ok(())
}

/// Environment for cargo commands that run test binaries needing root.
fn root_runner(cmd: &mut Command) {
    if !is_root() {
        // Test binaries load eBPF: run them under sudo (cargo's target runner), keep the env.
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
}

fn test(extra: &[String]) -> Result<()> {
    sh(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    sh(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The probes, linted for the target they run on.
    sh(Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "cargo", "clippy"])
        .args([
            "-p",
            "tracer-ebpf",
            "--bins",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir", "target/ebpf-clippy"])
        .args(["--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--workspace"]).args(extra);
    root_runner(&mut cmd);
    sh(&mut cmd)
}

fn build_release() -> Result<PathBuf> {
    sh(Command::new("cargo").args(["build", "--release", "-p", "tracer", "--bin", "tracer"]))?;
    Ok(PathBuf::from("target/release/tracer"))
}

fn run(args: &[String]) -> Result<()> {
    let bin = build_release()?;
    sh(privileged(&bin.to_string_lossy()).arg("run").args(args))
}

fn demo(seconds: u64) -> Result<()> {
    use std::{
        io::{BufRead as _, BufReader},
        process::Stdio,
        time::{Duration, Instant},
    };
    // Separate builds: `--bin` would narrow every package to binaries, and the NVML emulation
    // is a cdylib.
    build_release()?;
    sh(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "tracer-emuhost",
        "-p",
        "nvml-emu",
    ]))?;
    let release = PathBuf::from("target/release");
    let dir = env::temp_dir().join(format!("tracer-demo-{}", std::process::id()));
    let dev = dir.join("dev");
    std::fs::create_dir_all(&dev)?;
    let lib_dir = dir.join("nvml");
    std::fs::create_dir_all(&lib_dir)?;
    let nvml = lib_dir.join("libnvidia-ml.so.1");
    std::fs::copy(release.join("libnvidia_ml.so"), &nvml).context("copying the NVML emulation")?;
    let state = dir.join("gpu-state");
    let truth = dir.join("truth.jsonl");
    let records = dir.join("records.jsonl");
    let requests = dir.join("requests.jsonl");

    eprintln!("demo: starting the emulated inference host (API process + engine on 2 GPUs)");
    let mut host = Command::new(release.join("emuhost"))
        .args(["serve", "--port", "0", "--gpus", "2"])
        .arg("--state")
        .arg(&state)
        .arg("--device-root")
        .arg(&dev)
        .arg("--truth")
        .arg(&truth)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting emuhost")?;
    let mut line = String::new();
    BufReader::new(host.stdout.take().context("emuhost stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("emuhost said {line:?}"))?;

    eprintln!("demo: attaching tracer to port {port} (NVML: the emulation's libnvidia-ml.so.1)");
    let log = dir.join("tracer.log");
    // `env` carries the emulation's state path through sudo, which drops the environment.
    let mut tracer = privileged("env")
        .arg(format!("TRACER_EMU_STATE={}", state.display()))
        .arg(release.join("tracer"))
        .args(["run", "--port", &port.to_string()])
        .arg("--device-root")
        .arg(&dev)
        .arg("--standin-devices")
        .arg("--nvml-lib")
        .arg(&nvml)
        .arg("--records-out")
        .arg(&records)
        .arg("--requests-out")
        .arg(&requests)
        // The emulated H100's idle power, as an operator would set it from the datasheet; the
        // comparison is on dynamic energy, what each request caused.
        .args(["--gpu-idle-watts", "70", "--idle-policy", "report"])
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting tracer")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("attached")
    {
        if tracer.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = host.kill();
            bail!("tracer did not attach:\n{}", std::fs::read_to_string(&log)?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    eprintln!("demo: {seconds} s of chat-like load at concurrency 8");
    sh(Command::new(release.join("emuload"))
        .args([
            "--port",
            &port.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--concurrency", "8"]))?;
    // Let the grace period pass so every request's energy is final, then stop everything.
    std::thread::sleep(Duration::from_secs(4));
    sh(privileged("kill").args(["-INT", &tracer.id().to_string()]))?;
    tracer.wait()?;
    terminate(host.id());
    let _ = host.wait();
    eprintln!(
        "{}",
        std::fs::read_to_string(&log)?
            .lines()
            .rev()
            .find(|l| l.contains("shutting down"))
            .unwrap_or("")
    );
    compare(&records, &truth)
}

/// SIGTERM to a child (the emulated host then stops its engine and writes the truth summary).
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Prints per-request attribution beside the ground truth, and the totals.
fn compare(records: &Path, truth: &Path) -> Result<()> {
    let records = read_jsonl(records)?;
    let truth = read_jsonl(truth)?;
    let by_id: std::collections::BTreeMap<&str, &serde_json::Value> = truth
        .iter()
        .filter_map(|t| Some((t["request_id"].as_str()?, t)))
        .collect();
    println!(
        "| request | tokens in/cached/out | tracer dynamic J (± bar) | truth dynamic J | error |"
    );
    println!("|---|---|---|---|---|");
    let mut errs = Vec::new();
    let mut inside = 0usize;
    let (mut sum_rec, mut sum_truth) = (0.0, 0.0);
    for (i, r) in records.iter().enumerate() {
        let Some(t) = r["external_id"].as_str().and_then(|id| by_id.get(id)) else {
            continue;
        };
        // The truth is the GPUs' energy; the host's CPU share (modelled here, labelled
        // estimated) is reported beside it.
        let gpu_sum = |field: &str| -> f64 {
            r["devices"].as_array().map_or(0.0, |ds| {
                ds.iter()
                    .filter(|d| d["kind"] == "gpu")
                    .filter_map(|d| d[field].as_f64())
                    .sum()
            })
        };
        let got = gpu_sum("dynamic_j");
        let bar = gpu_sum("uncertainty_j");
        let want = t["dynamic_j"].as_f64().unwrap_or(0.0);
        sum_rec += got;
        sum_truth += want;
        if want > 0.0 {
            errs.push((got - want).abs() / want);
        }
        if (got - want).abs() <= bar {
            inside += 1;
        }
        if i < 12 {
            println!(
                "| {} | {}/{}/{} | {got:.1} (± {bar:.1}) | {want:.1} | {:+.1}% |",
                r["external_id"].as_str().unwrap_or("?"),
                t["prompt_tokens"],
                t["cached_tokens"],
                t["completion_tokens"],
                (got - want) / want.max(1e-9) * 100.0
            );
        }
    }
    errs.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        errs.get(((errs.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
            * 100.0
    };
    let summary = truth.iter().find(|t| t["summary"] == true);
    println!(
        "\n{} requests matched to ground truth ({} records): median error {:.2}%, p95 {:.2}%, error bar holds the truth for {:.0}%; \
         requests' dynamic energy: tracer {sum_rec:.0} J vs truth {sum_truth:.0} J",
        errs.len(),
        records.len(),
        pct(0.5),
        pct(0.95),
        inside as f64 / errs.len().max(1) as f64 * 100.0
    );
    if let Some(s) = summary {
        println!(
            "GPU energy over the run (true counters): {} J",
            s["energy_j_per_gpu"]
        );
    }
    if errs.is_empty() {
        bail!("no request records matched the ground truth");
    }
    Ok(())
}

/// One `syscall-bench` run: spawn it, optionally attach the tracer (to it or to a decoy), read its
/// figures.
fn bench_case(
    bench: &Path,
    tracer: &Path,
    dir: &Path,
    iterations: u32,
    target: Option<bool>,
) -> Result<(f64, f64)> {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::Stdio,
        time::{Duration, Instant},
    };
    let mut child = Command::new(bench)
        .arg(dir)
        .arg(iterations.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting syscall-bench")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = lines.next().context("syscall-bench said nothing")??;
    let pid: u32 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .context("bad ready line")?;
    let mut decoy = None;
    let mut daemon = None;
    if let Some(is_target) = target {
        let target_pid = if is_target {
            pid
        } else {
            let d = Command::new("sleep").arg("600").spawn()?;
            let id = d.id();
            decoy = Some(d);
            id
        };
        let events = dir.join(format!("events-{pid}.jsonl"));
        let d = privileged(&tracer.to_string_lossy())
            .args([
                "run",
                "--pid",
                &target_pid.to_string(),
                "--summary-interval-ms",
                "0",
            ])
            .arg("--device-root")
            .arg(dir)
            .arg("--standin-devices")
            .arg("--events-out")
            .arg(&events)
            .stderr(Stdio::null())
            .spawn()
            .context("starting tracer")?;
        daemon = Some(d);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !events.exists() {
            if Instant::now() > deadline {
                bail!("tracer did not attach");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    let mut value = |name: &str| -> Result<f64> {
        let line = lines.next().context("syscall-bench ended early")??;
        line.strip_prefix(name)
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("expected {name}, got {line:?}"))
    };
    let rw = value("write_read_ns")?;
    let ioctl = value("ioctl_ns")?;
    let _ = child.wait();
    if let Some(d) = daemon {
        sh(privileged("kill").args(["-INT", &d.id().to_string()]))?;
        let mut d = d;
        let _ = d.wait();
    }
    if let Some(mut d) = decoy {
        let _ = d.kill();
        let _ = d.wait();
    }
    Ok((rw, ioctl))
}

fn bench_probes(iterations: u32) -> Result<()> {
    sh(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "tracer",
        "--bin",
        "tracer",
        "-p",
        "tracer-tests",
        "--bin",
        "syscall-bench",
    ]))?;
    let tracer = PathBuf::from("target/release/tracer");
    let bench = PathBuf::from("target/release/syscall-bench");
    let dir = env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases = [
        ("no tracer", None),
        ("tracer attached, caller not a target", Some(false)),
        (
            "tracer attached, caller is the target (data captured, ioctl recorded)",
            Some(true),
        ),
    ];
    let mut rows = Vec::new();
    for (name, target) in cases {
        let (rw, ioctl) = bench_case(&bench, &tracer, &dir, iterations, target)?;
        rows.push((name, rw, ioctl));
    }
    let (base_rw, base_ioctl) = (rows[0].1, rows[0].2);
    println!("| case | 64 B write + read, ns | added | ioctl, ns | added |");
    println!("|---|---|---|---|---|");
    for (name, rw, ioctl) in rows {
        println!(
            "| {name} | {rw:.0} | {:+.0} | {ioctl:.0} | {:+.0} |",
            rw - base_rw,
            ioctl - base_ioctl
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the workspace root, the
/// current directory here), else `target`.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

fn bench_sampler(gpus: u32, hz: u32, seconds: u64) -> Result<()> {
    // Two builds: with a `--bin` filter the library of nvml-emu would be built only as a
    // dependency, and not copied to target/release where the bench loads it from.
    sh(Command::new("cargo").args(["build", "--release", "-p", "nvml-emu", "--lib"]))?;
    sh(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "tracer-tests",
        "--bin",
        "sampler-bench",
    ]))?;
    let release = target_dir().join("release");
    sh(Command::new(release.join("sampler-bench"))
        .arg("--lib")
        .arg(release.join("libnvidia_ml.so"))
        .args(["--gpus", &gpus.to_string()])
        .args(["--hz", &hz.to_string()])
        .args(["--seconds", &seconds.to_string()]))
}
