//! Command-line interface: parse arguments, layer them over the config file, call the library.

// Doc comments here are clap help text, shown verbatim: no Markdown backticks.
#![allow(clippy::doc_markdown)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

/// Per-request energy attribution for LLM inference servers, measured in the kernel.
#[derive(Debug, Parser)]
#[command(name = "tracer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the probes to the target processes and trace them until SIGINT/SIGTERM.
    Run(RunArgs),
    /// As run, recording every attribution input (raw probe records, power readings,
    /// discoveries) to a file that `tracer replay` recomputes every figure from.
    Record(RecordArgs),
    /// Recompute the energy records of a recording, with its settings or other split and idle
    /// policies.
    Replay(ReplayArgs),
    /// Show the services of the given targets: their processes, why each belongs (target,
    /// descendant, cgroup, IPC peer), and the GPUs they hold.
    Services(ServicesArgs),
    /// List the power sensors this host has (NVML GPUs, RAPL, powercap, or the CPU model),
    /// measure their update periods, and sample them for a while.
    Sensors(SensorsArgs),
}

/// `tracer services` flags.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Directory holding the NVIDIA device nodes.
    #[arg(long, default_value = "/dev")]
    pub device_root: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tracer sensors` flags.
#[derive(Debug, Args)]
pub struct SensorsArgs {
    /// TOML configuration file (its [power] table is used).
    #[arg(long, short = 'c', env = "TRACER_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long to sample, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Sampling period in milliseconds (default: power.interval_ms).
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// Path of libnvidia-ml.so.1.
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
    /// Do not open NVML.
    #[arg(long)]
    pub no_nvml: bool,
    /// CPU package/DRAM power source.
    #[arg(long, value_parser = ["auto", "rapl", "powercap", "model", "off"])]
    pub cpu_power: Option<String>,
}

/// `tracer record` flags: `tracer run`'s, plus where to record.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The recording to write.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `tracer replay` flags.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A recording written by `tracer record` (or `run --record`).
    pub recording: PathBuf,
    /// Split policy for requests sharing a device: auto, equal, tokens or bytes (default: the
    /// recording's).
    #[arg(long, value_parser = ["auto", "equal", "tokens", "bytes"])]
    pub split: Option<String>,
    /// Idle policy: amortize or report (default: the recording's).
    #[arg(long, value_parser = ["amortize", "report"])]
    pub idle_policy: Option<String>,
    /// Write the records as JSON lines here (default: standard output).
    #[arg(long)]
    pub records_out: Option<PathBuf>,
    /// Write every decoded probe event as a JSON line here (the audit view of the raw data).
    #[arg(long)]
    pub events_out: Option<PathBuf>,
}

/// What to trace, shared by `run`, `record` and `services`: each flag is one target (a root of a
/// service).
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// This process and its descendants (repeatable). [config: targets.pids]
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// The processes listening on this TCP port (repeatable). [config: targets.ports]
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Every process in this cgroup v2 directory (repeatable). [config: targets.cgroups]
    #[arg(long = "cgroup")]
    pub cgroups: Vec<PathBuf>,
    /// Processes with this name, now and at later execs (repeatable). [config: targets.comms]
    #[arg(long = "comm")]
    pub comms: Vec<String>,
}

/// `tracer run` flags. Each one overrides the same setting from `--config`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (every flag below has a key there).
    #[arg(long, short = 'c', env = "TRACER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Directory holding the NVIDIA device nodes. [config: probe.device_root]
    #[arg(long)]
    pub device_root: Option<PathBuf>,
    /// Ring-buffer size in bytes (power of two). [config: probe.ring_bytes]
    #[arg(long)]
    pub ring_bytes: Option<u32>,
    /// Payload bytes copied per socket syscall (≤ 4096). [config: probe.capture_bytes]
    #[arg(long)]
    pub capture_bytes: Option<u32>,
    /// Ring-buffer drain period in milliseconds. [config: probe.poll_interval_ms]
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Activity summary period in milliseconds, 0 = off. [config: output.summary_interval_ms]
    #[arg(long)]
    pub summary_interval_ms: Option<u64>,
    /// Write every decoded probe event as a JSON line to this file. [config: output.events_out]
    #[arg(long)]
    pub events_out: Option<PathBuf>,
    /// Write every finished HTTP request as a JSON line to this file. [config: output.requests_out]
    #[arg(long)]
    pub requests_out: Option<PathBuf>,
    /// Write every request's energy record as a JSON line to this file. [config: output.records_out]
    #[arg(long)]
    pub records_out: Option<PathBuf>,
    /// Path of libnvidia-ml.so.1. [config: power.nvml_lib]
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
    /// Do not sample GPUs through NVML. [config: power.nvml = false]
    #[arg(long)]
    pub no_nvml: bool,
    /// Power sampling period in milliseconds. [config: power.interval_ms]
    #[arg(long)]
    pub power_interval_ms: Option<u64>,
    /// GPU idle power in watts (default: learned). [config: power.gpu_idle_watts]
    #[arg(long)]
    pub gpu_idle_watts: Option<f64>,
    /// Idle energy while requests run: amortize (shared by them) or report (kept on the
    /// device). [config: ledger.idle]
    #[arg(long, value_parser = ["amortize", "report"])]
    pub idle_policy: Option<String>,
    /// Also report every ioctl on an NVIDIA fd as an event. [config: probe.ioctl_events]
    #[arg(long)]
    pub ioctl_events: bool,
    /// The device nodes are stand-in files of an emulated host (tests, demo): decode their
    /// ioctls although the kernel rejects them. [config: probe.standin_devices]
    #[arg(long)]
    pub standin_devices: bool,
    /// Re-discover services from /proc this often in milliseconds, 0 = at attach only.
    /// [config: probe.rediscover_ms]
    #[arg(long)]
    pub rediscover_ms: Option<u64>,
    /// Record every attribution input to this file for `tracer replay`. [config: output.record]
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// CPU package/DRAM power source. [config: power.cpu.source]
    #[arg(long, value_parser = ["auto", "rapl", "powercap", "model", "off"])]
    pub cpu_power: Option<String>,
}

impl RunArgs {
    /// The file configuration (or defaults) with these flags applied.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        c.targets.pids.extend(self.targets.pids);
        c.targets.ports.extend(self.targets.ports);
        c.targets.cgroups.extend(self.targets.cgroups);
        c.targets.comms.extend(self.targets.comms);
        if let Some(v) = self.device_root {
            c.probe.device_root = v;
        }
        if let Some(v) = self.ring_bytes {
            c.probe.ring_bytes = v;
        }
        if let Some(v) = self.capture_bytes {
            c.probe.capture_bytes = v;
        }
        if let Some(v) = self.poll_interval_ms {
            c.probe.poll_interval_ms = v;
        }
        c.probe.ioctl_events |= self.ioctl_events;
        c.probe.standin_devices |= self.standin_devices;
        if let Some(v) = self.rediscover_ms {
            c.probe.rediscover_ms = v;
        }
        if self.record.is_some() {
            c.output.record = self.record;
        }
        if let Some(v) = self.cpu_power.as_deref() {
            c.power.cpu.source = cpu_source(v);
        }
        if let Some(v) = self.summary_interval_ms {
            c.output.summary_interval_ms = v;
        }
        if self.events_out.is_some() {
            c.output.events_out = self.events_out;
        }
        if self.requests_out.is_some() {
            c.output.requests_out = self.requests_out;
        }
        if self.records_out.is_some() {
            c.output.records_out = self.records_out;
        }
        if self.nvml_lib.is_some() {
            c.power.nvml_lib = self.nvml_lib;
        }
        if self.no_nvml {
            c.power.nvml = false;
        }
        if let Some(v) = self.power_interval_ms {
            c.power.interval_ms = v;
        }
        if self.gpu_idle_watts.is_some() {
            c.power.gpu_idle_watts = self.gpu_idle_watts;
        }
        match self.idle_policy.as_deref() {
            Some("report") => c.ledger.idle = crate::ledger::IdlePolicy::Report,
            Some("amortize") => c.ledger.idle = crate::ledger::IdlePolicy::Amortize,
            _ => {}
        }
        c.validate()?;
        Ok(c)
    }
}

fn cpu_source(v: &str) -> crate::power::cpu::CpuSource {
    use crate::power::cpu::CpuSource;
    match v {
        "rapl" => CpuSource::Rapl,
        "powercap" => CpuSource::Powercap,
        "model" => CpuSource::Model,
        "off" => CpuSource::Off,
        _ => CpuSource::Auto,
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // try_init: a second call (tests) is not an error worth dying for.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the `tracer` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let daemon = |config: Config| -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(crate::daemon::run(config))?;
        Ok(())
    };
    match cli.command {
        Command::Run(args) => daemon(args.into_config()?),
        Command::Record(args) => {
            let mut config = args.run.into_config()?;
            config.output.record = Some(args.out);
            daemon(config)
        }
        Command::Services(args) => {
            use crate::{service, target};
            let spec = target::TargetSpec {
                pids: args.targets.pids,
                ports: args.targets.ports,
                cgroups: args.targets.cgroups,
                comms: args.targets.comms,
            };
            if spec.is_empty() {
                anyhow::bail!("give --pid, --port, --cgroup or --comm");
            }
            let procfs = target::ProcFs::default();
            let self_pid = std::process::id();
            let roots = service::roots_from_spec(&procfs, &spec, self_pid)?;
            let discovery = service::discover(
                &procfs,
                &roots,
                &service::DiscoverOptions {
                    self_pid,
                    device_root: args.device_root,
                    ..service::DiscoverOptions::default()
                },
            )?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&discovery)?);
            } else {
                print!("{}", service::render_text(&discovery));
            }
            Ok(())
        }
        Command::Sensors(args) => {
            let mut c = match &args.config {
                Some(path) => Config::from_file(path)?,
                None => Config::default(),
            };
            if args.nvml_lib.is_some() {
                c.power.nvml_lib = args.nvml_lib;
            }
            if let Some(v) = args.cpu_power.as_deref() {
                c.power.cpu.source = cpu_source(v);
            }
            let report = crate::sensors::run(&crate::sensors::SensorsOptions {
                use_nvml: c.power.nvml && !args.no_nvml,
                nvml: crate::power::nvml::NvmlOptions {
                    lib: c.power.nvml_lib.clone(),
                    ..crate::power::nvml::NvmlOptions::default()
                },
                cpu: c.power.cpu.clone(),
                duration: std::time::Duration::from_secs_f64(args.seconds.clamp(0.1, 3600.0)),
                interval: std::time::Duration::from_millis(
                    args.interval_ms.unwrap_or(c.power.interval_ms).max(1),
                ),
            });
            print!("{report}");
            Ok(())
        }
        Command::Replay(args) => {
            let split = match args.split.as_deref() {
                Some("equal") => Some(crate::ledger::SplitPolicy::Equal),
                Some("tokens") => Some(crate::ledger::SplitPolicy::Tokens),
                Some("bytes") => Some(crate::ledger::SplitPolicy::Bytes),
                Some("auto") => Some(crate::ledger::SplitPolicy::Auto),
                _ => None,
            };
            let idle = match args.idle_policy.as_deref() {
                Some("report") => Some(crate::ledger::IdlePolicy::Report),
                Some("amortize") => Some(crate::ledger::IdlePolicy::Amortize),
                _ => None,
            };
            let summary = crate::replay::replay(&crate::replay::ReplayOptions {
                recording: args.recording,
                split,
                idle,
                records_out: args.records_out,
                events_out: args.events_out,
            })?;
            eprintln!("{summary}");
            Ok(())
        }
    }
}
