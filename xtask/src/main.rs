//! Project tasks: `cargo xtask setup | test | layout | run | dist | demo | bench | bench-probes |
//! bench-sampler | gpu-check | reference`.
//!
//! `setup` makes a fresh machine able to build and load the probes, and is idempotent: every step
//! first checks whether it is needed and says what it found or did. `test` and `run` call it first.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

mod bench;
mod bench_load;
mod demo;
mod dist;
mod layout;
mod reference;
mod report_demo;
mod score;
mod setup;
mod stats;
mod thirdparty;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::setup::{EBPF_TOOLCHAIN, setup};

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
    /// setup, then the layout check, fmt check, clippy (-D warnings, userspace and eBPF), unit and
    /// integration tests (as root: the integration tests load the real probes).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check that no source file is over 800 lines and no modules import each other in a cycle.
    Layout,
    /// setup, build the daemon (release) and run `tracer run <ARGS>` as root.
    Run {
        /// Arguments for `tracer run`, e.g. `-- --port 8000`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// setup, then everything tracer costs, alternated with and without it in one run:
    /// throughput, p99 and the daemon's CPU per request and per SSE event (axum and uvicorn,
    /// streamed and not), its RSS with 1k/10k connections, the host-wide tax and the sampler.
    Bench {
        /// One short round per case, no timing judged: fails on any request not recorded (CI).
        #[arg(long)]
        quick: bool,
    },
    /// setup, then measure what the probes cost a process (not a target / a target) and print a
    /// table for BENCHMARKS.md.
    BenchProbes {
        /// Iterations per measurement (best of 3 rounds is reported).
        #[arg(long, default_value_t = 200_000)]
        iterations: u32,
        /// Rounds of every case, alternated; each case's median is reported.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Another daemon binary (the build before a change), measured as a not-a-target case
        /// in the same rounds.
        #[arg(long)]
        baseline: Option<PathBuf>,
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
        /// NVML calls cost what a real driver's do (`h200`: the per-call CPU measured on a lent
        /// H200) instead of nothing (`none`).
        #[arg(long, default_value = "none")]
        costs: String,
    },
    /// setup, then the daemon's RSS (default configuration, fresh store) attached to the axum
    /// server, idle and with 1k and 10k keep-alive connections each served once.
    BenchRss {
        /// Appended to the daemon's configuration file (e.g. a setting to compare).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// setup, then the no-GPU demo: the emulated inference host (API process, engine on two
    /// emulated GPUs with honest sensors, NVML emulation), the tracer attached to it by port, a
    /// chat-like load, and per-request attribution beside the ground truth.
    Demo(demo::DemoOpts),
    /// setup, then the demo twice (30 % and 80 % of requests sharing a system prompt) and
    /// `tracer report` on each store: the energy bill beside the per-token bill, with plots
    /// (target/report-demo/).
    ReportDemo {
        /// Seconds of load per run.
        #[arg(long, default_value_t = 40)]
        seconds: u64,
    },
    /// setup, then the release tarball (`target/dist/`): the binary with its probes, the
    /// systemd unit, an example configuration, the README with every command's help,
    /// checksums; `--check` also unpacks it in a clean directory and runs it from there.
    Dist {
        /// Unpack and run it (checksums, `systemd-analyze verify`, attach to a test server).
        #[arg(long)]
        check: bool,
    },
    /// The physical reference's tables (issue 18) from a folder `tests/device/reference.sh`
    /// wrote (unpacked `reference.tgz`): the two-class Shapley split from the independent
    /// counter beside tracer's class sums, the sequential per-request errors, tokens/s ratio.
    Reference {
        /// The run's folder.
        dir: PathBuf,
    },
    /// Stage the reference run for a GPU host (release tracer at `.devbin/tracer`, serving
    /// wheels at `.whl/`); with `--dry-run PYTHON`, also run it here on the CPU with that
    /// Python (which must have torch and transformers) and make its tables.
    GpuCheck {
        /// A Python with torch and transformers, for a dry run on this machine's CPU.
        #[arg(long)]
        dry_run: Option<PathBuf>,
    },
    /// setup, then the third-party check at scale on a release build: Node's `http`, uvicorn,
    /// llama.cpp's `llama-server` (built from source, a generated tiny model), an Ollama-shaped
    /// NDJSON front with its engine, and HTTPS through OpenSSL, each request compared with the
    /// client's own counts; prints the table BENCHMARKS.md quotes.
    Thirdparty {
        /// Requests per server.
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        /// Connections at once.
        #[arg(long, default_value_t = 32)]
        concurrency: u64,
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
        Task::Layout => layout::check(&root),
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
        Task::Run { args } => {
            setup()?;
            run(&args)
        }
        Task::Bench { quick } => {
            setup()?;
            bench_load::bench(quick)
        }
        Task::BenchProbes {
            iterations,
            rounds,
            baseline,
        } => {
            setup()?;
            bench::bench_probes(&bench::ProbesBench {
                iterations,
                rounds,
                baseline,
            })
        }
        Task::BenchSampler {
            gpus,
            hz,
            seconds,
            costs,
        } => {
            setup()?;
            bench::bench_sampler(gpus, hz, seconds, &costs)
        }
        Task::BenchRss { config } => {
            setup()?;
            bench_load::bench_rss(config.as_deref())
        }
        Task::Demo(opts) => {
            setup()?;
            demo::demo(&opts).map(|_| ())
        }
        Task::ReportDemo { seconds } => {
            setup()?;
            report_demo::run(seconds)
        }
        Task::Dist { check } => {
            setup()?;
            let tarball = dist::dist()?;
            if check { dist::check(&tarball) } else { Ok(()) }
        }
        Task::Reference { dir } => reference::run(&dir),
        Task::GpuCheck { dry_run } => {
            setup()?;
            gpu_check(dry_run.as_deref())
        }
        Task::Thirdparty {
            requests,
            concurrency,
        } => {
            setup()?;
            thirdparty::thirdparty(requests, concurrency)
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

pub(crate) fn is_root() -> bool {
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

/// Environment for cargo commands that run test binaries needing root.
fn root_runner(cmd: &mut Command) {
    if !is_root() {
        // Test binaries load eBPF: run them under sudo (cargo's target runner), keep the env.
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
}

fn test(extra: &[String]) -> Result<()> {
    layout::check(&workspace_root()?)?;
    if env::var_os("CI").is_some() {
        // A clean clone gains nothing from incremental state, which doubled the target's size.
        // SAFETY: single-threaded here, before any command is spawned.
        unsafe { env::set_var("CARGO_INCREMENTAL", "0") };
    }
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
    sh(&mut cmd)?;
    if extra.is_empty() {
        // The overhead benchmark's correctness pass: every request recorded, nothing timed.
        bench_load::bench(true)?;
        // The release tarball, unpacked in a clean directory and run with no toolchain.
        dist::check(&dist::dist()?)?;
    }
    Ok(())
}

fn build_release() -> Result<PathBuf> {
    sh(Command::new("cargo").args(["build", "--release", "-p", "tracer", "--bin", "tracer"]))?;
    Ok(PathBuf::from("target/release/tracer"))
}

fn run(args: &[String]) -> Result<()> {
    let bin = build_release()?;
    sh(privileged(&bin.to_string_lossy()).arg("run").args(args))
}

/// Stages the physical reference for a GPU host and, given a Python with torch and
/// transformers, dry-runs it here on the CPU and makes its tables (`target/reference-dry/`).
fn gpu_check(dry_run: Option<&Path>) -> Result<()> {
    let mut stage = Command::new("bash");
    stage.arg("tests/device/reference/stage.sh");
    if let Some(py) = dry_run {
        // The wheels must suit the Python that installs them.
        let v = Command::new(py)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .with_context(|| format!("running {}", py.display()))?;
        stage.env("PYVER", String::from_utf8_lossy(&v.stdout).trim());
    }
    sh(&mut stage)?;
    let Some(py) = dry_run else {
        eprintln!(
            "staged: on the GPU host run `bash tests/device/reference.sh` from the repository \
             root, carrying .devbin and .whl; then `cargo xtask reference DIR` on its unpacked \
             reference.tgz"
        );
        return Ok(());
    };
    let out = env::current_dir()?
        .join(bench::target_dir())
        .join("reference-dry");
    let work = out.join("work");
    sh(privileged("env")
        .arg("DRY=1")
        .arg(format!("PY={}", py.display()))
        .arg(format!("OUT={}", out.display()))
        .arg(format!("W={}", work.display()))
        .args(["bash", "tests/device/reference.sh"]))?;
    reference::run(&work)
}
