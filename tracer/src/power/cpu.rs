//! CPU and DRAM power: which source to use, and its configuration.
//!
//! Three sources, tried in this order for `source = "auto"`:
//!
//! 1. [`rapl`]: RAPL energy counters through the perf `power` PMU — per package,
//!    64-bit, no wrap; needs root or `CAP_PERFMON` (`perf_event_open` system-wide).
//! 2. [`powercap`]: the same RAPL counters through
//!    `/sys/class/powercap/intel-rapl:*` — 32-bit-ish ranges that wrap (`max_energy_range_uj`);
//!    `energy_uj` is root-only on current kernels.
//! 3. [`cpumodel`]: no hardware counter (VMs): power modelled from
//!    `/proc/stat` utilisation between configured idle and busy figures. Marked estimated.
//!
//! The first that opens wins; the log says which one and why the ones before it did not. A
//! measured source only counts as open when a package counter moves within [`LIVENESS_WAIT`]:
//! VMs can expose RAPL that reads 0 forever (seen: a KVM guest whose power PMU has only
//! `energy-psys`, counting nothing).
//! [`probe_report`] lists what every source found, for a `tracer sensors`-style command.

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{PowerError, PowerSource, Reading, cpumodel, powercap, rapl};
use crate::ledger::DeviceKind;

/// Which CPU power source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CpuSource {
    /// RAPL (perf), then powercap, then the model: the first that opens.
    #[default]
    Auto,
    /// RAPL through the perf `power` PMU only.
    Rapl,
    /// RAPL through powercap sysfs only.
    Powercap,
    /// The utilisation model only (estimated figures).
    Model,
    /// No CPU power source.
    Off,
}

/// The source [`open`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuSourceKind {
    Rapl,
    Powercap,
    Model,
}

impl CpuSourceKind {
    /// The configuration name (`rapl`, `powercap`, `model`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rapl => "rapl",
            Self::Powercap => "powercap",
            Self::Model => "model",
        }
    }
}

impl fmt::Display for CpuSourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CPU/DRAM power configuration (`[power.cpu]`-style table; every key optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuPowerConfig {
    /// `auto` | `rapl` | `powercap` | `model` | `off` (default `auto`).
    pub source: CpuSource,
    /// Where sysfs is mounted (default `/sys`); tests point it at a fake tree.
    pub sysfs_root: PathBuf,
    /// Where procfs is mounted (default `/proc`).
    pub proc_root: PathBuf,
    /// Model only: watts of one package when idle (default 40). A guess: measure the host
    /// idle, or take it from the CPU's documentation, and configure it.
    pub model_idle_watts: f64,
    /// Model only: watts of one package fully busy (default 200; roughly a server CPU's TDP).
    /// A guess: configure the CPU's TDP.
    pub model_max_watts: f64,
    /// How often the services' CPU time is read (`/proc`) to split CPU package and DRAM energy
    /// by it, the rest to other processes; 0 = equally among the services with requests in
    /// flight.
    pub cpu_time_interval_ms: u64,
}

/// Default modelled idle watts per package (a guess; configure it).
pub const DEFAULT_MODEL_IDLE_WATTS: f64 = 40.0;
/// Default modelled busy watts per package (a guess; configure the TDP).
pub const DEFAULT_MODEL_MAX_WATTS: f64 = 200.0;

impl Default for CpuPowerConfig {
    fn default() -> Self {
        Self {
            source: CpuSource::Auto,
            sysfs_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            model_idle_watts: DEFAULT_MODEL_IDLE_WATTS,
            model_max_watts: DEFAULT_MODEL_MAX_WATTS,
            cpu_time_interval_ms: 500,
        }
    }
}

/// How long [`open`] watches a measured source's package counters for movement.
pub const LIVENESS_WAIT: Duration = Duration::from_millis(25);

/// Polls `source` twice, [`LIVENESS_WAIT`] apart, and checks that some CPU package counter
/// changed. RAPL updates about every millisecond and a package never draws zero, so a counter
/// that stands still is emulated (VMs can expose RAPL registers that always read 0).
fn check_live(source: &mut dyn PowerSource) -> Result<(), String> {
    let counters = |source: &mut dyn PowerSource| {
        let mut out = Vec::new();
        source.poll(&mut out);
        out.into_iter()
            .filter_map(|r| match r {
                Reading::Counter {
                    device, energy_uj, ..
                } => Some((device, energy_uj)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let before = counters(source);
    std::thread::sleep(LIVENESS_WAIT);
    let after = counters(source);
    let packages: Vec<usize> = source
        .devices()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.kind == DeviceKind::CpuPackage)
        .map(|(i, _)| i)
        .collect();
    let moved = packages.iter().any(|p| {
        let a = before.iter().find(|(d, _)| d == p);
        let b = after.iter().find(|(d, _)| d == p);
        matches!((a, b), (Some((_, a)), Some((_, b))) if a != b)
    });
    if moved {
        Ok(())
    } else {
        Err(format!(
            "package energy counters did not advance in {} ms (emulated RAPL?)",
            LIVENESS_WAIT.as_millis()
        ))
    }
}

/// Opens one source of kind `kind`; measured sources must show live package counters.
fn open_kind(
    kind: CpuSourceKind,
    cfg: &CpuPowerConfig,
) -> Result<Box<dyn PowerSource>, PowerError> {
    Ok(match kind {
        CpuSourceKind::Rapl => {
            let mut s = rapl::RaplSource::open(&cfg.sysfs_root)?;
            check_live(&mut s).map_err(PowerError::Rapl)?;
            Box::new(s)
        }
        CpuSourceKind::Powercap => {
            let mut s = powercap::PowercapSource::open(&cfg.sysfs_root)?;
            check_live(&mut s).map_err(PowerError::Powercap)?;
            Box::new(s)
        }
        CpuSourceKind::Model => Box::new(cpumodel::CpuModelSource::open(
            &cfg.sysfs_root,
            &cfg.proc_root,
            cfg.model_idle_watts,
            cfg.model_max_watts,
        )?),
    })
}

/// The sources `source` allows, in the order they are tried.
fn candidates(source: CpuSource) -> &'static [CpuSourceKind] {
    match source {
        CpuSource::Auto => &[
            CpuSourceKind::Rapl,
            CpuSourceKind::Powercap,
            CpuSourceKind::Model,
        ],
        CpuSource::Rapl => &[CpuSourceKind::Rapl],
        CpuSource::Powercap => &[CpuSourceKind::Powercap],
        CpuSource::Model => &[CpuSourceKind::Model],
        CpuSource::Off => &[],
    }
}

/// Opens the configured CPU power source (`auto`: RAPL perf → powercap → model), logging which
/// one was chosen and why the ones before it were not. `source = "off"` gives
/// [`PowerError::Disabled`]; when nothing opens, the last source's error is returned.
pub fn open(cfg: &CpuPowerConfig) -> Result<(Box<dyn PowerSource>, CpuSourceKind), PowerError> {
    let mut skipped: Vec<String> = Vec::new();
    let mut last = PowerError::Disabled("CPU power");
    for &kind in candidates(cfg.source) {
        match open_kind(kind, cfg) {
            Ok(source) => {
                let names: Vec<&str> = source.devices().iter().map(|d| d.name.as_str()).collect();
                let why = if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (not {})", skipped.join("; not "))
                };
                if kind == CpuSourceKind::Model {
                    tracing::warn!(
                        "CPU power: {kind} — ESTIMATED from /proc/stat utilisation between \
                         {} W idle and {} W busy per package, devices [{}]{why}",
                        cfg.model_idle_watts,
                        cfg.model_max_watts,
                        names.join(", ")
                    );
                } else {
                    tracing::info!("CPU power: {kind}, devices [{}]{why}", names.join(", "));
                }
                return Ok((source, kind));
            }
            Err(e) => {
                skipped.push(format!("{kind}: {e}"));
                last = e;
            }
        }
    }
    if cfg.source == CpuSource::Off {
        tracing::info!("CPU power: off in the configuration");
    } else {
        tracing::warn!("CPU power: no source opened ({})", skipped.join("; "));
    }
    Err(last)
}

/// What each CPU power source finds on this host, one line per finding, for a
/// `tracer sensors`-style listing: for each of rapl, powercap and model, either its devices
/// (name, kind, estimated) or why it cannot open, then which source [`open`] would choose
/// under `cfg.source`. Opening is real (perf counters are opened and closed again).
pub fn probe_report(cfg: &CpuPowerConfig) -> Vec<String> {
    let mut lines = Vec::new();
    let mut chosen = None;
    let allowed = candidates(cfg.source);
    for kind in [
        CpuSourceKind::Rapl,
        CpuSourceKind::Powercap,
        CpuSourceKind::Model,
    ] {
        match open_kind(kind, cfg) {
            Ok(source) => {
                let devs: Vec<String> = source
                    .devices()
                    .iter()
                    .map(|d| {
                        format!(
                            "{} ({:?}{})",
                            d.name,
                            d.kind,
                            if d.estimated { ", estimated" } else { "" }
                        )
                    })
                    .collect();
                lines.push(format!("{kind}: ok: {}", devs.join(", ")));
                if chosen.is_none() && allowed.contains(&kind) {
                    chosen = Some(kind);
                }
            }
            Err(e) => lines.push(format!("{kind}: unavailable: {e}")),
        }
    }
    lines.push(match (cfg.source, chosen) {
        (CpuSource::Off, _) => "chosen: none (source = off)".to_owned(),
        (_, Some(kind)) => format!("chosen: {kind}"),
        (_, None) => "chosen: none (no allowed source opened)".to_owned(),
    });
    lines
}

#[cfg(test)]
mod tests;
