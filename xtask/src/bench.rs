//! `cargo xtask bench-probes` and `bench-sampler`: what the probes and the power sampler cost.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{privileged, sh};

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

pub fn bench_probes(iterations: u32) -> Result<()> {
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

pub fn bench_sampler(gpus: u32, hz: u32, seconds: u64) -> Result<()> {
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
