//! The daemon's configuration: a TOML file (every field optional, unknown keys rejected) with
//! command-line flags layered on top.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are errors).
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything `tracer run` can be told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub targets: crate::probe::targets::TargetSpec,
    pub probe: ProbeFileConfig,
    pub output: OutputConfig,
    /// The HTTP tracker (head size limit, tenant header and hash key).
    pub http: crate::wire::TrackerConfig,
    /// Power sources.
    pub power: crate::power::PowerConfig,
    /// Attribution (split and idle policies, grace, uncertainty factors).
    pub ledger: crate::ledger::LedgerConfig,
    /// The local-socket API.
    pub api: crate::api::ApiConfig,
    /// The durable store.
    pub store: crate::store::StoreConfig,
    /// The tariff records are priced at (none: no cost on records).
    pub bill: crate::bill::BillConfig,
    /// The daemon as a system service (privileges).
    pub daemon: DaemonConfig,
    /// Workload identity: the kubelet that names pods and containers.
    pub workload: crate::occupancy::workload::kubelet::KubeletConfig,
    /// OTLP export of records and counters to a collector (off unless an endpoint is set).
    pub otlp: crate::output::otlp::OtlpConfig,
}

/// The daemon as a system service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Before loading anything, give up every capability but those the daemon uses for its
    /// whole life (`CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_PTRACE`, `CAP_DAC_READ_SEARCH`, and
    /// `CAP_SYS_ADMIN` while a uprobe step clock is on; see `daemon::privilege`), from every
    /// set including the bounding set, and set no-new-privs.
    pub drop_privileges: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            drop_privileges: true,
        }
    }
}

/// Probe and ring-buffer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each a config key"
)]
pub struct ProbeFileConfig {
    /// Ring-buffer size in bytes (power of two, at least one page).
    pub ring_bytes: u32,
    /// Payload bytes copied per socket syscall (256 to 4096).
    pub capture_bytes: u32,
    /// Bytes copied per read of a request on a server connection, in records of
    /// `capture_bytes` (at most 65536): long heads (cookies, tokens) and the metadata of long
    /// bodies. Responses and client connections stay at `capture_bytes`.
    pub request_capture_bytes: u32,
    /// Directory holding the NVIDIA device nodes.
    pub device_root: PathBuf,
    /// How often the ring buffer is drained when no forced wakeup arrives (one fills a
    /// quarter of the ring), the ledger advanced and the journal written. Each tick has a
    /// fixed cost whatever the load: at 10 ms it was a third of the daemon's CPU on a
    /// streaming server (BENCHMARKS.md); records wait seconds for the power data anyway.
    pub poll_interval_ms: u64,
    /// Also report every ioctl on an NVIDIA fd (debugging; state changes are always reported).
    pub ioctl_events: bool,
    /// The device nodes under `device_root` are stand-in files of an emulated host: decode
    /// their ioctls although the kernel rejects them (`ENOTTY`). Never set on a real host.
    pub standin_devices: bool,
    /// Follow the Unix-socket IPC of service processes in other network namespaces (a
    /// server's engine in a container, a pod's sidecar): discovery dumps each namespace's
    /// sockets from inside it, so the daemon keeps `CAP_SYS_ADMIN`.
    pub other_netns_peers: bool,
    /// How often services are re-discovered from /proc (new IPC peers); 0 = only at attach.
    pub rediscover_ms: u64,
    /// Passes that find nothing new space out, doubling up to this (an exec or exit among
    /// the traced processes brings them back to `rediscover_ms`).
    pub rediscover_max_ms: u64,
    /// The CUDA step clock: uprobes on the CUDA driver API of every service member that maps
    /// `libcuda.so*` (launches counted in the kernel, one record per synchronisation after
    /// launches).
    pub cuda_clock: bool,
    /// Attach the CUDA step clock to this library for every member, mapped or not (a process
    /// that loads the driver later, a library under an unusual name).
    pub cuda_library: Option<PathBuf>,
    /// Follow Unix-socket connections between service members (vLLM's ZMQ, TGI's gRPC) as IPC:
    /// timing, direction and length of their data, never payload.
    pub ipc_clock: bool,
    /// TLS terminated by a member itself: uprobes on OpenSSL's `SSL_read`/`SSL_write` (and
    /// `_ex`) in the `libssl*` it maps, or in its executable when that exports them, so its
    /// HTTPS traffic is read in plaintext.
    pub tls_uprobes: bool,
}

impl Default for ProbeFileConfig {
    fn default() -> Self {
        Self {
            ring_bytes: 8 << 20,
            capture_bytes: 4096,
            request_capture_bytes: 65_536,
            device_root: PathBuf::from("/dev"),
            poll_interval_ms: 100,
            ioctl_events: false,
            standin_devices: false,
            other_netns_peers: true,
            rediscover_ms: 5000,
            rediscover_max_ms: 60_000,
            cuda_clock: true,
            cuda_library: None,
            ipc_clock: true,
            tls_uprobes: true,
        }
    }
}

/// Where results and logs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Period of the activity summary in the log; 0 disables it.
    pub summary_interval_ms: u64,
    /// Write every decoded probe event as a JSON line here (debugging and tests).
    pub events_out: Option<PathBuf>,
    /// Keep the captured payload (the bytes sent and received: prompts, completions,
    /// credentials) in `events_out`. Off: events carry lengths and timing only.
    pub events_payload: bool,
    /// Keep prompts, completions and credentials in the recording and the journal, as
    /// captured. Off: the tracker reads, and they keep, redacted bytes (`wire::redact`).
    pub record_payloads: bool,
    /// Write every finished HTTP request as a JSON line here.
    pub requests_out: Option<PathBuf>,
    /// Write every request's final energy record as a JSON line here.
    pub records_out: Option<PathBuf>,
    /// Record every input of attribution (probe records, power readings, discoveries) here,
    /// for `tracer replay`: the audit trail a bill can be recomputed from.
    pub record: Option<PathBuf>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            summary_interval_ms: 1000,
            events_out: None,
            events_payload: false,
            record_payloads: false,
            requests_out: None,
            records_out: None,
            record: None,
        }
    }
}

impl Config {
    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses configuration text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ring = self.probe.ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(ConfigError::Invalid(format!(
                "probe.ring_bytes = {ring}: must be a power of two of at least 4096"
            )));
        }
        if !(256..=4096).contains(&self.probe.capture_bytes) {
            return Err(ConfigError::Invalid(format!(
                "probe.capture_bytes = {}: between 256 (a request line and the headers that \
                 frame it) and 4096",
                self.probe.capture_bytes
            )));
        }
        let req = self.probe.request_capture_bytes;
        if !(self.probe.capture_bytes..=65_536).contains(&req) {
            return Err(ConfigError::Invalid(format!(
                "probe.request_capture_bytes = {req}: between probe.capture_bytes ({}) and 65536",
                self.probe.capture_bytes
            )));
        }
        if self.power.interval_ms == 0 {
            return Err(ConfigError::Invalid("power.interval_ms must be > 0".into()));
        }
        if self.probe.poll_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "probe.poll_interval_ms must be > 0".into(),
            ));
        }
        self.otlp.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration block is a valid file, every key in it known, and its
    /// commented-out keys too once uncommented (unknown keys are refused).
    #[test]
    fn the_readme_configuration_block_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n[targets]")
            .expect("the README's config block");
        let block = &readme[start + 8..];
        let block = &block[..block.find("```").expect("closed")];
        let c = Config::from_toml(block).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.store, crate::store::StoreConfig::default());
        // Uncommented: `# key = value` and `# [table]` lines become settings.
        let uncommented: String = block
            .lines()
            .map(|l| {
                let t = l.trim_start();
                match t.strip_prefix("# ") {
                    Some(rest)
                        if rest.contains(" = ")
                            || (rest.starts_with('[') && rest.trim_end().ends_with(']')) =>
                    {
                        format!("{rest}\n")
                    }
                    _ => format!("{l}\n"),
                }
            })
            .collect();
        toml::from_str::<Config>(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    }

    /// The example the release tarball installs as /etc/tracer/tracer.toml.
    #[test]
    fn the_shipped_configuration_parses() {
        let c = Config::from_toml(include_str!("../dist/tracer.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.daemon.drop_privileges);
        assert_eq!(c.api.group.as_deref(), Some("tracer"));
    }

    /// The configuration the Kubernetes manifest carries (its `ConfigMap`).
    #[test]
    fn the_kubernetes_configuration_parses() {
        let yaml = include_str!("../dist/kubernetes/tracer.yaml");
        let start = yaml.find("tracer.toml: |\n").expect("the ConfigMap's file") + 15;
        let block: String = yaml[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .flat_map(|l| [l.get(4..).unwrap_or(""), "\n"])
            .collect();
        let c = Config::from_toml(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert_eq!(c.probe.device_root, Path::new("/host/dev"));
        assert!(c.api.metrics_listen.is_some() && !c.targets.comms.is_empty());
    }

    #[test]
    fn defaults_and_partial_files() {
        let c = Config::from_toml("[targets]\nports = [8000]\n").expect("parses");
        assert_eq!(c.targets.ports, vec![8000]);
        assert_eq!(c.probe, ProbeFileConfig::default());
        assert_eq!(Config::from_toml("").expect("empty ok"), Config::default());
    }

    #[test]
    fn step_clocks_are_on_by_default_and_can_be_set() {
        let d = ProbeFileConfig::default();
        assert!(d.cuda_clock && d.ipc_clock && d.cuda_library.is_none());
        let c = Config::from_toml(
            "[probe]\ncuda_clock = false\nipc_clock = false\ncuda_library = \"/opt/libcuda.so.1\"\n",
        )
        .expect("parses");
        assert!(!c.probe.cuda_clock && !c.probe.ipc_clock);
        assert_eq!(
            c.probe.cuda_library.as_deref(),
            Some(Path::new("/opt/libcuda.so.1"))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(matches!(
            Config::from_toml("[targets]\nport = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml("[probe]\nring_bytes = 1000\n"),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::from_toml("[probe]\ncapture_bytes = 9000\n"),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::from_toml("[otlp]\nendpoint = \"https://collector:4318\"\n"),
            Err(ConfigError::Invalid(_))
        ));
    }
}
