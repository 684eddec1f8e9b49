//! Command-line interface: parse arguments, layer them over the config file, call the library.

// Doc comments on the commands are clap help text, shown verbatim: no Markdown backticks.

mod args;
mod query;
mod report;
mod top;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use self::args::{
    QueryArgs, RecordArgs, ReplayArgs, ReportArgs, ReportFormat, RunArgs, SensorsArgs,
    ServicesArgs, SummaryArgs, TopArgs,
};
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
    /// Ask the running daemon (its API socket) for requests' energy records, newest first.
    Query(QueryArgs),
    /// Ask the running daemon for energy per model, service or tenant.
    Summary(SummaryArgs),
    /// A live view of the running daemon: watts per device, services and their requests in
    /// flight, the latest requests' energy, losses (q to quit).
    Top(TopArgs),
    /// The bill: energy cost per request, model, service or tenant at a tariff (PUE, overhead,
    /// emissions, idle policy), beside a per-token bill, from the store or a recording; as a
    /// table, JSON, CSV, or HTML/SVG with plots.
    Report(ReportArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // try_init: a second call (tests) is not an error worth dying for.
    // Colour only for a person at a terminal, not in files or journals.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The error and its causes, each once: an error that already quotes its cause (`reading
/// /x: No such file`) does not repeat it.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Entry point of the `tracer` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The reader makes the configuration at start, and again on each SIGHUP.
    let daemon = |read: crate::daemon::reload::Reader| -> anyhow::Result<()> {
        let config = read().map_err(anyhow::Error::msg)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(crate::daemon::run(config, read))?;
        Ok(())
    };
    match cli.command {
        Command::Run(args) => daemon(Box::new(move || {
            args.clone().into_config().map_err(|e| report(&e))
        })),
        Command::Query(args) => query::requests(&args),
        Command::Summary(args) => query::summary(&args),
        Command::Top(args) => top::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Record(args) => daemon(Box::new(move || {
            let mut c = args.run.clone().into_config().map_err(|e| report(&e))?;
            c.output.record = Some(args.out.clone());
            Ok(c)
        })),
        Command::Services(args) => {
            use crate::{occupancy::service, procfs::ProcFs};
            if args.targets.is_empty() {
                anyhow::bail!("give --pid, --port, --cgroup or --comm");
            }
            crate::daemon::privilege::check()?;
            let procfs = ProcFs::default();
            let self_pid = std::process::id();
            let roots = service::roots_from_spec(&procfs, &args.targets, self_pid)?;
            let workload = match &args.config {
                Some(path) => Config::from_file(path)?.workload,
                None => crate::occupancy::workload::kubelet::KubeletConfig::default(),
            };
            let kubelet = crate::occupancy::workload::kubelet::Kubelet::new(&workload)?;
            let discovery = service::discover(
                &procfs,
                &roots,
                &service::DiscoverOptions {
                    self_pid,
                    device_root: args.device_root,
                    kubelet: kubelet.map(|k| std::sync::Arc::new(std::sync::Mutex::new(k))),
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
            if let Some(v) = args.cpu_power {
                c.power.cpu.source = v;
            }
            let report = crate::power::survey::run(&crate::power::survey::SensorsOptions {
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
            let mut recordings = args.recordings.into_iter();
            let summary = crate::record::replay::replay(&crate::record::replay::ReplayOptions {
                recording: recordings.next().unwrap_or_default(),
                continued: recordings.collect(),
                finish_continued: false,
                split: args.split,
                idle: args.idle_policy,
                step_clock: args.step_clock,
                records_out: args.records_out,
                events_out: args.events_out,
                redact_to: args.redact_to,
            })?;
            eprintln!("{summary}");
            Ok(())
        }
    }
}
