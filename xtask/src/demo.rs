//! `cargo xtask demo`: the emulated inference host, the tracer attached to it by port, a
//! chat-like load, and per-request attribution beside the ground truth; with `--clocks`, the
//! recording replayed under each step clock and split, scored against the truth.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::score::{self, Score, read_jsonl};
use crate::{build_release, privileged, sh};

/// Options of `cargo xtask demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOpts {
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Most requests the engine runs at once (more wait in its queue).
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// CPU the API process spends per request per step before its write, µs (default: the
    /// host's, 40).
    #[arg(long)]
    pub write_cost_us: Option<u64>,
    /// CUDA driver library for the engine to call every step (default: the stand-in
    /// `tests/cuda-stub`, so the CUDA step clock is exercised).
    #[arg(long)]
    pub cuda_lib: Option<PathBuf>,
    /// The engine calls no CUDA library (the tracer then sees only IPC and write bursts).
    #[arg(long, conflicts_with = "cuda_lib")]
    pub no_cuda: bool,
    /// KV-cache capacity of the engine in tokens (default unlimited): below what the batch
    /// needs, the engine preempts requests and recomputes them later.
    #[arg(long)]
    pub kv_tokens: Option<u64>,
    /// Record the run, replay it under each step clock and split, and score each against the
    /// truth.
    #[arg(long)]
    pub clocks: bool,
    /// Fraction of requests that start with one of the shared system prompts (emuload's
    /// default, 0.3, when not given).
    #[arg(long)]
    pub shared_prefix_fraction: Option<f64>,
    /// Keep everything (store, records, logs) in this directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A configuration file for the daemon (`tracer run --config`), e.g. to compare a
    /// sampler setting on the same code; the demo's flags override what it says.
    #[arg(long)]
    pub tracer_config: Option<PathBuf>,
}

/// The replays scored by `--clocks`: row name and `tracer replay` flags.
const VARIANTS: &[(&str, &[&str])] = &[
    ("default", &[]),
    ("split equal", &["--split", "equal"]),
    ("ipc clock only", &["--step-clock", "ipc"]),
    ("cuda clock only", &["--step-clock", "cuda"]),
    ("write bursts only", &["--step-clock", "writes"]),
];

pub fn demo(opts: &DemoOpts) -> Result<PathBuf> {
    let seconds = opts.seconds;
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
        "-p",
        "cuda-stub",
    ]))?;
    let release = PathBuf::from("target/release");
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| env::temp_dir().join(format!("tracer-demo-{}", std::process::id())));
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
    // The daemon appends to its outputs: a directory left by an earlier run starts empty.
    for old in [&records, &requests] {
        let _ = std::fs::remove_file(old);
    }
    let write_log = dir.join("write-log.jsonl");
    let recording = dir.join("run.rec");

    eprintln!(
        "demo: starting the emulated inference host (API process + engine on 2 GPUs, max-seqs {})",
        opts.max_seqs
    );
    let mut host_cmd = Command::new(release.join("emuhost"));
    host_cmd
        .args(["serve", "--port", "0", "--gpus", "2"])
        .arg("--state")
        .arg(&state)
        .arg("--device-root")
        .arg(&dev)
        .arg("--truth")
        .arg(&truth)
        .arg("--write-log")
        .arg(&write_log)
        .arg("--step-log")
        .arg(dir.join("steps.jsonl"))
        .args(["--max-seqs", &opts.max_seqs.to_string()]);
    if let Some(w) = opts.write_cost_us {
        host_cmd.args(["--write-cost-us", &w.to_string()]);
    }
    if let Some(kv) = opts.kv_tokens {
        host_cmd.args(["--kv-tokens", &kv.to_string()]);
    }
    // The engine maps it under its real name, where the tracer looks for it.
    let stub = lib_dir.join("libcuda.so.1");
    std::fs::copy(release.join("libcuda.so"), &stub).context("copying the stand-in libcuda")?;
    let cuda_lib = opts.cuda_lib.clone().unwrap_or(stub);
    if !opts.no_cuda {
        host_cmd.arg("--cuda-lib").arg(&cuda_lib);
    }
    let mut host = host_cmd
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
    let mut tracer_cmd = privileged("env");
    tracer_cmd
        .arg(format!("TRACER_EMU_STATE={}", state.display()))
        .arg(release.join("tracer"))
        .args(["run", "--port", &port.to_string()])
        .arg("--store")
        .arg(dir.join("store"))
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
        .args(["--gpu-idle-watts", "70", "--idle-policy", "report"]);
    if opts.clocks {
        tracer_cmd.arg("--record").arg(&recording);
    }
    if let Some(config) = &opts.tracer_config {
        tracer_cmd.arg("--config").arg(std::path::absolute(config)?);
    }
    let mut tracer = tracer_cmd
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

    eprintln!(
        "demo: {seconds} s of chat-like load at concurrency {}",
        opts.concurrency
    );
    sh(Command::new(release.join("emuload"))
        .args([
            "--port",
            &port.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--concurrency", &opts.concurrency.to_string()])
        .args(
            opts.shared_prefix_fraction
                .map(|f| vec!["--shared-prefix-fraction".to_string(), f.to_string()])
                .unwrap_or_default(),
        ))?;
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
    compare(&records, &truth)?;
    let truth_lines = read_jsonl(&truth)?;
    score::print_queueing(&truth_lines);
    score::print_write_spread(&write_log);
    if opts.clocks {
        clocks(&release.join("tracer"), &recording, &dir, &truth_lines);
    }
    Ok(dir)
}

/// Replays the recording under each variant and prints one table scoring them all.
fn clocks(tracer: &Path, recording: &Path, dir: &Path, truth: &[serde_json::Value]) {
    println!("\nEvery completed request against the caused truth (and the time-sharing one):\n");
    println!("{}", score::TABLE_HEAD);
    for (i, (name, flags)) in VARIANTS.iter().enumerate() {
        let out_path = dir.join(format!("replay-{i}.jsonl"));
        let out = Command::new(tracer)
            .arg("replay")
            .arg(recording)
            .arg("--records-out")
            .arg(&out_path)
            .args(*flags)
            .output();
        let failure = match &out {
            Err(e) => Some(format!("n/a (replay did not start: {e})")),
            Ok(o) if !o.status.success() => {
                let err = String::from_utf8_lossy(&o.stderr);
                Some(
                    if err.contains("unexpected argument") || err.contains("invalid value") {
                        "n/a (flag unsupported)".to_owned()
                    } else {
                        format!("n/a (replay failed: {})", err.lines().next().unwrap_or(""))
                    },
                )
            }
            Ok(_) => None,
        };
        if let Some(why) = failure {
            println!("| {name} | {why} | | | | | | |");
            continue;
        }
        match read_jsonl(&out_path) {
            Ok(records) => println!("{}", Score::of(&records, truth).row(name)),
            Err(e) => println!("| {name} | n/a ({e:#}) | | | | | | |"),
        }
    }
}

/// SIGTERM to a child (the emulated host then stops its engine and writes the truth summary).
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
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
