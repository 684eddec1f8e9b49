//! `cargo xtask bench-probes` and `bench-sampler`: what the probes and the power sampler cost.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{privileged, sh};

/// What is attached while a benchmark process runs.
#[derive(Clone, Copy)]
enum Attach {
    /// Nothing.
    None,
    /// The daemon, tracing the benchmark (`true`) or a decoy process (`false`).
    Tracer { target: bool },
    /// The empty-program floor (`probe-floor`) on the daemon's tracepoints.
    Floor,
}

/// One benchmark process run: spawn `bench` with `args` (it prints `ready <pid>` and waits for
/// a line), attach what `attach` says (the daemon with `tracer_args`), say go and read the
/// figures `names` in order.
fn bench_case(
    bench: &Path,
    args: &[String],
    tracer: &Path,
    dir: &Path,
    attach: Attach,
    tracer_args: &[String],
    names: &[&str],
) -> Result<Vec<f64>> {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::Stdio,
        time::{Duration, Instant},
    };
    let mut child = Command::new(bench)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bench.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = lines.next().context("the benchmark said nothing")??;
    let pid: u32 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .context("bad ready line")?;
    let mut decoy = None;
    let log = dir.join(format!("tracer-{pid}.log"));
    let daemon = match attach {
        Attach::None => None,
        Attach::Floor => {
            let floor = tracer.with_file_name("probe-floor");
            Some(
                privileged(&floor.to_string_lossy())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting probe-floor")?,
            )
        }
        Attach::Tracer { target: is_target } => {
            let target_pid = if is_target {
                pid
            } else {
                let d = Command::new("sleep").arg("600").spawn()?;
                let id = d.id();
                decoy = Some(d);
                id
            };
            let events = dir.join(format!("events-{pid}.jsonl"));
            Some(
                privileged(&tracer.to_string_lossy())
                    .args([
                        "run",
                        "--pid",
                        &target_pid.to_string(),
                        "--summary-interval-ms",
                        "0",
                    ])
                    .arg("--store")
                    .arg(dir.join(format!("store-{pid}")))
                    .arg("--device-root")
                    .arg(dir)
                    .arg("--standin-devices")
                    .arg("--events-out")
                    .arg(&events)
                    .args(tracer_args)
                    .env("RUST_LOG", "info")
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting tracer")?,
            )
        }
    };
    if daemon.is_some() {
        // The daemon's last attach step (services, step clocks, connections) logs "attached",
        // as does the floor once its programs are.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("attached")) {
            if Instant::now() > deadline {
                bail!("the probes did not attach: {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    let mut values = Vec::with_capacity(names.len());
    for name in names {
        let line = lines.next().context("the benchmark ended early")??;
        let v = line
            .strip_prefix(name)
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("expected {name}, got {line:?}"))?;
        values.push(v);
    }
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
    Ok(values)
}

/// Builds, release, the `tracer` package's binaries `tracer_bins` and the test package's
/// `test_bins`.
pub(crate) fn build_release(tracer_bins: &[&str], test_bins: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--release", "-p", "tracer"]);
    for b in tracer_bins {
        cmd.args(["--bin", b]);
    }
    cmd.args(["-p", "tracer-tests"]);
    for b in test_bins {
        cmd.args(["--bin", b]);
    }
    sh(&mut cmd)
}

/// What `bench-probes` compares.
pub struct ProbesBench {
    /// Iterations per measurement (each the best of 3 rounds of them).
    pub iterations: u32,
    /// Rounds of every case, alternated; each case's median is reported.
    pub rounds: u32,
    /// Another daemon binary (the build before a change), measured as a not-a-target case in
    /// the same rounds.
    pub baseline: Option<PathBuf>,
}

pub fn bench_probes(opts: &ProbesBench) -> Result<()> {
    build_release(&["tracer"], &["syscall-bench", "probe-floor", "cuda-steps"])?;
    // Apart: with a `--bin` filter the stand-in driver would be built only as a dependency,
    // and not copied to target/release.
    sh(Command::new("cargo").args(["build", "--release", "-p", "cuda-stub", "--lib"]))?;
    let release = target_dir().join("release");
    let tracer = release.join("tracer");
    let bench = release.join("syscall-bench");
    let dir = env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cases = vec![
        ("no tracer".to_string(), Attach::None, &tracer),
        (
            "floor: an empty program on each of the same tracepoints".to_string(),
            Attach::Floor,
            &tracer,
        ),
    ];
    if let Some(b) = &opts.baseline {
        cases.push((
            format!("baseline `{}` attached, caller not a target", b.display()),
            Attach::Tracer { target: false },
            b,
        ));
    }
    cases.push((
        "tracer attached, caller not a target".to_string(),
        Attach::Tracer { target: false },
        &tracer,
    ));
    cases.push((
        "tracer attached, caller is the target (data captured, ioctl recorded)".to_string(),
        Attach::Tracer { target: true },
        &tracer,
    ));
    let args = [
        dir.to_string_lossy().into_owned(),
        opts.iterations.to_string(),
    ];
    // Every case once per round, so that a drift of the VM moves them all alike.
    let mut runs: Vec<Vec<Vec<f64>>> = vec![Vec::new(); cases.len()];
    for _ in 0..opts.rounds.max(1) {
        for (i, (_, attach, daemon)) in cases.iter().enumerate() {
            runs[i].push(bench_case(
                &bench,
                &args,
                daemon,
                &dir,
                *attach,
                &[],
                &["write_read_ns", "ioctl_ns", "getppid_ns"],
            )?);
        }
    }
    let rows: Vec<(String, Vec<f64>)> = cases
        .iter()
        .zip(&runs)
        .map(|((name, _, _), r)| {
            let per_figure = (0..3)
                .map(|k| crate::stats::median(&r.iter().map(|v| v[k]).collect::<Vec<_>>()))
                .collect();
            (name.clone(), per_figure)
        })
        .collect();
    // Added ns over no tracer; the floor's added ns is what the not-a-target tax is held to.
    let base = rows[0].1.clone();
    let floor = rows[1].1.clone();
    println!(
        "| case | 64 B write + read, ns | added | ioctl, ns | added | getppid (not hooked), ns | added | added / floor's (write+read, ioctl) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, v) in rows {
        let ratio = |i: usize| {
            let floor_added = floor[i] - base[i];
            if floor_added > 0.0 {
                format!("{:.2}", (v[i] - base[i]) / floor_added)
            } else {
                "-".to_string()
            }
        };
        println!(
            "| {name} | {:.0} | {:+.0} | {:.0} | {:+.0} | {:.1} | {:+.1} | {}, {} |",
            v[0],
            v[0] - base[0],
            v[1],
            v[1] - base[1],
            v[2],
            v[2] - base[2],
            ratio(0),
            ratio(1),
        );
    }
    bench_cuda(&release, &tracer, &dir, opts.iterations)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The CUDA step clock: `cuda-steps bench` on the stand-in driver, ns per launch, per
/// synchronisation with nothing launched, and per step (10 launches + a synchronisation).
fn bench_cuda(release: &Path, tracer: &Path, dir: &Path, iterations: u32) -> Result<()> {
    let lib = release.join("libcuda.so");
    let bench = release.join("cuda-steps");
    let args = [
        "bench".to_string(),
        lib.to_string_lossy().into_owned(),
        iterations.to_string(),
    ];
    // Not a target: the decoy gets the uprobes (forced library), the benchmark uses the same
    // library file.
    let forced = ["--cuda-lib".to_string(), lib.to_string_lossy().into_owned()];
    let cases: [(&str, Attach, &[String]); 3] = [
        ("no tracer", Attach::None, &[]),
        (
            "tracer attached, uprobes on the library for another process",
            Attach::Tracer { target: false },
            &forced,
        ),
        (
            "tracer attached, caller is the target (found in its maps)",
            Attach::Tracer { target: true },
            &[],
        ),
    ];
    let mut rows = Vec::new();
    for (name, target, extra) in cases {
        let v = bench_case(
            &bench,
            &args,
            tracer,
            dir,
            target,
            extra,
            &["launch_ns", "sync_ns", "step_ns"],
        )?;
        rows.push((name, v));
    }
    let base = rows[0].1.clone();
    println!();
    println!(
        "| case | cuLaunchKernel, ns | added | empty sync, ns | added | step (10 launches + sync), ns | added |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, v) in rows {
        println!(
            "| {name} | {:.0} | {:+.0} | {:.0} | {:+.0} | {:.0} | {:+.0} |",
            v[0],
            v[0] - base[0],
            v[1],
            v[1] - base[1],
            v[2],
            v[2] - base[2]
        );
    }
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the workspace root, the
/// current directory here), else `target`.
pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

/// `costs`: the NVML emulation's per-call cost model (`none`, or `h200`: the CPU a real
/// H200 driver takes per call, spent spinning as the driver does).
pub fn bench_sampler(gpus: u32, hz: u32, seconds: u64, costs: &str) -> Result<()> {
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
        .args(["--seconds", &seconds.to_string()])
        .env("TRACER_EMU_NVML_COSTS", costs))
}
