//! Project tasks: `cargo xtask setup | test | run | demo`.
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
    /// setup, then the no-GPU demo: a local HTTP server, the tracer attached to it by port, a
    /// short load, and what the tracer saw.
    Demo {
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
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
        io::{Read as _, Write as _},
        net::TcpStream,
        time::{Duration, Instant},
    };
    let bin = build_release()?;
    let dir = env::temp_dir().join(format!("tracer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("index.html"),
        "hello from the demo server\n".repeat(64),
    )?;
    let port = 18_181;
    eprintln!("demo: starting a Python HTTP server on 127.0.0.1:{port}");
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting python3 -m http.server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("demo server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = dir.join("events.jsonl");
    eprintln!("demo: attaching tracer to port {port}");
    let mut tracer = privileged(&bin.to_string_lossy())
        .args(["run", "--port", &port.to_string(), "--events-out"])
        .arg(&events)
        .spawn()
        .context("starting tracer")?;
    while !events.exists() {
        if let Some(status) = tracer.try_wait()? {
            let _ = server.kill();
            bail!("tracer exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut requests = 0u64;
    while Instant::now() < end {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\nHost: demo\r\n\r\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            requests += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sh(privileged("kill").args(["-INT", &tracer.id().to_string()]))?;
    let status = tracer.wait()?;
    let _ = server.kill();
    let _ = server.wait();
    let lines = std::fs::read_to_string(&events).unwrap_or_default();
    eprintln!(
        "demo: the client made {requests} requests; the tracer wrote {} events to {} (tracer exit: {status})",
        lines.lines().count(),
        events.display()
    );
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
