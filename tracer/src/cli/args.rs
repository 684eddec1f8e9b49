//! The binary's flags. Each `run` flag overrides the same key of the configuration file.

#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are clap help text, shown verbatim: no Markdown backticks"
)]

use std::path::PathBuf;

use clap::Args;

use crate::{
    config::Config,
    ledger::{IdlePolicy, SplitPolicy, StepClockPolicy},
    power::cpu::CpuSource,
    probe::targets::TargetSpec,
};

/// `tracer services` flags.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub targets: TargetSpec,
    /// Directory holding the NVIDIA device nodes.
    #[arg(long, default_value = "/dev")]
    pub device_root: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// TOML configuration file: its `[workload]` section names pods and containers.
    #[arg(long, short = 'c', env = "TRACER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `tracer sensors` flags.
#[derive(Debug, Args)]
pub struct SensorsArgs {
    /// TOML configuration file (its power table is used).
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
    #[arg(long, value_enum)]
    pub cpu_power: Option<CpuSource>,
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
    /// A recording written by `tracer record` (or `run --record`), or consecutive segments of
    /// a journal (`<store>/journal/run-3.4.rec run-3.5.rec`): a segment after a run's first
    /// starts from the checkpoint it holds, so it replays without the ones before it.
    #[arg(required = true, num_args = 1.., value_name = "RECORDING")]
    pub recordings: Vec<PathBuf>,
    /// Split policy for requests sharing a device: auto, equal, tokens or bytes (default: the
    /// recording's).
    #[arg(long, value_enum)]
    pub split: Option<SplitPolicy>,
    /// Idle policy: amortize or report (default: the recording's).
    #[arg(long, value_enum)]
    pub idle_policy: Option<IdlePolicy>,
    /// Engine step clock: auto, ipc, cuda or writes (default: the recording's).
    #[arg(long, value_enum)]
    pub step_clock: Option<StepClockPolicy>,
    /// Write the records as JSON lines here (default: standard output).
    #[arg(long)]
    pub records_out: Option<PathBuf>,
    /// Write every decoded probe event as a JSON line here (the audit view of the raw data).
    #[arg(long)]
    pub events_out: Option<PathBuf>,
    /// Also write the recording again to this file with prompts, completions and credentials
    /// redacted (for a recording made with --record-payloads, or by an older tracer).
    #[arg(long, value_name = "FILE")]
    pub redact_to: Option<PathBuf>,
}

/// `tracer run` flags. Each one overrides the same setting from `--config`.
#[derive(Debug, Clone, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each a config key"
)]
pub struct RunArgs {
    /// TOML configuration file (every flag below has a key there).
    #[arg(long, short = 'c', env = "TRACER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub targets: TargetSpec,
    /// Directory holding the NVIDIA device nodes. [config: probe.device_root]
    #[arg(long)]
    pub device_root: Option<PathBuf>,
    /// Ring-buffer size in bytes (power of two). [config: probe.ring_bytes]
    #[arg(long)]
    pub ring_bytes: Option<u32>,
    /// Payload bytes copied per socket syscall (256 to 4096). [config: probe.capture_bytes]
    #[arg(long)]
    pub capture_bytes: Option<u32>,
    /// Bytes copied per read of a request on a server connection (≤ 65536).
    /// [config: probe.request_capture_bytes]
    #[arg(long)]
    pub request_capture_bytes: Option<u32>,
    /// Ring-buffer drain period in milliseconds. [config: probe.poll_interval_ms]
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Activity summary period in milliseconds, 0 = off. [config: output.summary_interval_ms]
    #[arg(long)]
    pub summary_interval_ms: Option<u64>,
    /// Write every decoded probe event as a JSON line to this file. [config: output.events_out]
    #[arg(long)]
    pub events_out: Option<PathBuf>,
    /// Keep captured payloads (prompts, completions, credentials) in --events-out; without it
    /// events carry lengths and timing only. [config: output.events_payload]
    #[arg(long)]
    pub events_payload: bool,
    /// Keep prompts, completions and credentials as captured in the recording and the
    /// journal (by default they hold redacted bytes only). [config: output.record_payloads]
    #[arg(long)]
    pub record_payloads: bool,
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
    /// How requests sharing a device split its energy. [config: ledger.split]
    #[arg(long, value_enum)]
    pub split: Option<SplitPolicy>,
    /// Idle energy while requests run: amortize (shared by them) or report (kept on the
    /// device). [config: ledger.idle]
    #[arg(long, value_enum)]
    pub idle_policy: Option<IdlePolicy>,
    /// Which engine step clock splits a batch: auto (IPC, else CUDA, else write bursts), ipc,
    /// cuda or writes. [config: ledger.step_clock]
    #[arg(long, value_enum)]
    pub step_clock: Option<StepClockPolicy>,
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
    /// Longest delay between re-discoveries that found nothing new, in milliseconds.
    /// [config: probe.rediscover_max_ms]
    #[arg(long)]
    pub rediscover_max_ms: Option<u64>,
    /// Do not attach the CUDA step clock (driver API uprobes) to members that map libcuda.
    /// [config: probe.cuda_clock = false]
    #[arg(long)]
    pub no_cuda_clock: bool,
    /// Attach the CUDA step clock to this library for every member, whether it maps it yet
    /// or not. [config: probe.cuda_library]
    #[arg(long, value_name = "PATH")]
    pub cuda_lib: Option<PathBuf>,
    /// Do not follow Unix-socket IPC between service members. [config: probe.ipc_clock = false]
    #[arg(long)]
    pub no_ipc_clock: bool,
    /// Serve the local-socket API on this Unix socket. [config: api.socket]
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serve no API. [config: api.socket unset]
    #[arg(long, conflicts_with = "api_socket")]
    pub no_api: bool,
    /// Also serve /metrics on this TCP address (e.g. 127.0.0.1:9464) for Prometheus.
    /// [config: api.metrics_listen]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Send every final record (OTLP logs) and the /metrics counters (OTLP metrics) to this
    /// collector's OTLP/HTTP receiver, e.g. http://127.0.0.1:4318 (http:// only).
    /// [config: otlp.endpoint]
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Members of this group see every service through the API, as root does.
    /// [config: api.group]
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Do not attach the OpenSSL uprobes that read members' HTTPS in plaintext.
    /// [config: probe.tls_uprobes = false]
    #[arg(long)]
    pub no_tls_uprobes: bool,
    /// Keep final records, services and device totals in this directory's database, with
    /// each run's journal (default /var/lib/tracer). [config: store.path]
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Keep nothing across restarts (no database, no journal). [config: store.path unset]
    #[arg(long, conflicts_with = "store")]
    pub no_store: bool,
    /// Do not journal the inputs (a crash then loses requests not yet final).
    /// [config: store.journal = false]
    #[arg(long)]
    pub no_journal: bool,
    /// Delete stored records older than this many days (0 = keep by size only).
    /// [config: store.retention_days]
    #[arg(long)]
    pub retention_days: Option<u32>,
    /// Keep the database under this many bytes, oldest records first (0 = no limit).
    /// [config: store.max_bytes]
    #[arg(long)]
    pub store_max_bytes: Option<u64>,
    /// Record every attribution input to this file for `tracer replay`. [config: output.record]
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// CPU package/DRAM power source. [config: power.cpu.source]
    #[arg(long, value_enum)]
    pub cpu_power: Option<CpuSource>,
    /// How often services' CPU time is read to split CPU/DRAM energy by it (0 = equally).
    /// [config: power.cpu.cpu_time_interval_ms]
    #[arg(long)]
    pub cpu_time_interval_ms: Option<u64>,
    /// Keep every capability the daemon was started with (by default it gives up all but
    /// CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, and CAP_SYS_ADMIN while a
    /// uprobe step clock is on, before loading anything).
    /// [config: daemon.drop_privileges = false]
    #[arg(long)]
    pub keep_privileges: bool,
}

impl RunArgs {
    /// The file configuration (or defaults) with these flags applied.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        c.targets.extend(self.targets);
        if let Some(v) = self.device_root {
            c.probe.device_root = v;
        }
        if let Some(v) = self.ring_bytes {
            c.probe.ring_bytes = v;
        }
        if let Some(v) = self.capture_bytes {
            c.probe.capture_bytes = v;
        }
        if let Some(v) = self.request_capture_bytes {
            c.probe.request_capture_bytes = v;
        }
        if let Some(v) = self.poll_interval_ms {
            c.probe.poll_interval_ms = v;
        }
        c.probe.ioctl_events |= self.ioctl_events;
        c.probe.standin_devices |= self.standin_devices;
        if let Some(v) = self.rediscover_ms {
            c.probe.rediscover_ms = v;
        }
        if let Some(v) = self.rediscover_max_ms {
            c.probe.rediscover_max_ms = v;
        }
        if self.no_cuda_clock {
            c.probe.cuda_clock = false;
        }
        if self.no_tls_uprobes {
            c.probe.tls_uprobes = false;
        }
        if let Some(p) = self.api_socket {
            c.api.socket = Some(p);
        }
        if self.no_api {
            c.api.socket = None;
        }
        if let Some(a) = self.metrics_listen {
            c.api.metrics_listen = Some(a);
        }
        if self.otlp_endpoint.is_some() {
            c.otlp.endpoint = self.otlp_endpoint;
        }
        if let Some(g) = self.api_group {
            c.api.group = Some(g);
        }
        if self.cuda_lib.is_some() {
            c.probe.cuda_library = self.cuda_lib;
        }
        if self.no_ipc_clock {
            c.probe.ipc_clock = false;
        }
        if self.record.is_some() {
            c.output.record = self.record;
        }
        if let Some(p) = self.store {
            c.store.path = Some(p);
        }
        if self.no_store {
            c.store.path = None;
        }
        if self.no_journal {
            c.store.journal = false;
        }
        if let Some(v) = self.retention_days {
            c.store.retention_days = v;
        }
        if let Some(v) = self.store_max_bytes {
            c.store.max_bytes = v;
        }
        if let Some(v) = self.cpu_time_interval_ms {
            c.power.cpu.cpu_time_interval_ms = v;
        }
        if self.keep_privileges {
            c.daemon.drop_privileges = false;
        }
        if let Some(v) = self.cpu_power {
            c.power.cpu.source = v;
        }
        if let Some(v) = self.summary_interval_ms {
            c.output.summary_interval_ms = v;
        }
        if self.events_payload {
            c.output.events_payload = true;
        }
        if self.record_payloads {
            c.output.record_payloads = true;
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
        if let Some(v) = self.split {
            c.ledger.split = v;
        }
        if let Some(v) = self.idle_policy {
            c.ledger.idle = v;
        }
        if let Some(v) = self.step_clock {
            c.ledger.step_clock = v;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `tracer query` flags.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The daemon's API socket.
    #[arg(long, default_value = "/run/tracer/tracer.sock")]
    pub socket: PathBuf,
    /// Only this service (its name, e.g. "port 8000").
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Only this tenant (the keyed hash records carry).
    #[arg(long)]
    pub tenant: Option<String>,
    /// complete, closed_early, truncated, aborted or incomplete.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Ended at or after this time (Unix milliseconds or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Ended before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// The newest this many.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON record per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tracer summary` flags.
#[derive(Debug, clap::Args)]
pub struct SummaryArgs {
    /// The daemon's API socket.
    #[arg(long, default_value = "/run/tracer/tracer.sock")]
    pub socket: PathBuf,
    /// Group by model, service or tenant.
    #[arg(long, default_value = "model")]
    pub by: String,
    /// From this time (Unix milliseconds or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time.
    #[arg(long)]
    pub until: Option<String>,
    /// The API's JSON, as it answers (every quantile), instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tracer top` flags.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The daemon's API socket.
    #[arg(long, default_value = "/run/tracer/tracer.sock")]
    pub socket: PathBuf,
    /// Refresh period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Print one frame as text and exit (also what happens when standard output is not a
    /// terminal).
    #[arg(long)]
    pub once: bool,
}

/// What `tracer report` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
    Html,
    Svg,
}

/// `tracer report` flags.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// TOML configuration file: its [bill] table is the tariff (the flags below override it).
    #[arg(long, short = 'c', env = "TRACER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The store to bill from. [config: store.path]
    #[arg(long, value_name = "DIR", conflicts_with = "recording")]
    pub store: Option<PathBuf>,
    /// Bill a recording instead (replayed; its devices' energy as one interval), or
    /// consecutive segments of a journal (a segment after a run's first starts from its
    /// checkpoint).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub recording: Vec<PathBuf>,
    /// From this time (request ends; Unix milliseconds or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Group by model, service, tenant, or time (hour, day; UTC).
    #[arg(long, value_enum, default_value = "model")]
    pub by: crate::report::By,
    /// Flat price per kWh. [config: bill.price_per_kwh]
    #[arg(long)]
    pub price: Option<rust_decimal::Decimal>,
    /// Time-of-use prices: a CSV of `from, price`. [config: bill.price_csv]
    #[arg(long, value_name = "FILE")]
    pub price_csv: Option<PathBuf>,
    /// ISO 4217 currency of the prices. [config: bill.currency]
    #[arg(long)]
    pub currency: Option<String>,
    /// Power usage effectiveness (≥ 1). [config: bill.pue]
    #[arg(long)]
    pub pue: Option<rust_decimal::Decimal>,
    /// Added to each request's cost. [config: bill.overhead_per_request]
    #[arg(long)]
    pub overhead: Option<rust_decimal::Decimal>,
    /// Carbon intensity, gCO2e per kWh. [config: bill.carbon_g_per_kwh]
    #[arg(long)]
    pub carbon: Option<rust_decimal::Decimal>,
    /// Idle energy: its own line (none) or spread over requests (pro-rata). [config: bill.idle]
    #[arg(long, value_enum)]
    pub idle: Option<crate::bill::IdleAllocation>,
    /// Per-token prices (TOML: currency, [models."name"] input/cached_input/output per million
    /// tokens, [default]) for the comparison.
    #[arg(long, value_name = "FILE")]
    pub per_token_prices: Option<PathBuf>,
    /// table, json, csv (one line per request), html (self-contained, with the plots) or svg
    /// (the plots, one file each, into --out as a directory).
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Write here instead of standard output (a directory for svg).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}
