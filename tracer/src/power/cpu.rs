//! CPU and DRAM power: which source to use, and its configuration.
//!
//! Three sources, tried in this order for `source = "auto"`:
//!
//! 1. [`rapl`](super::rapl): RAPL energy counters through the perf `power` PMU — per package,
//!    64-bit, no wrap; needs root or `CAP_PERFMON` (`perf_event_open` system-wide).
//! 2. [`powercap`](super::powercap): the same RAPL counters through
//!    `/sys/class/powercap/intel-rapl:*` — 32-bit-ish ranges that wrap (`max_energy_range_uj`);
//!    `energy_uj` is root-only on current kernels.
//! 3. [`cpumodel`](super::cpumodel): no hardware counter (VMs): power modelled from
//!    `/proc/stat` utilisation between configured idle and busy figures. Marked estimated.
//!
//! The first that opens wins; the log says which one and why the ones before it did not. A
//! measured source only counts as open when a package counter moves within [`LIVENESS_WAIT`]:
//! VMs can expose RAPL that reads 0 forever (seen: a KVM guest whose power PMU has only
//! `energy-psys`, counting nothing).
//! [`probe_report`] lists what every source found, for a `tracer sensors`-style command.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

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

// Sysfs helpers shared by the CPU sources.

/// Reads a small sysfs/procfs file, trimmed.
pub(super) fn read_trimmed(path: &Path) -> Result<String, PowerError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| PowerError::Sysfs {
            path: path.to_owned(),
            source,
        })
}

/// Parses a kernel CPU list (`0,36`, `0-3,8-11`, `5`); `None` on malformed input.
pub(super) fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: usize = lo.trim().parse().ok()?;
            let hi: usize = hi.trim().parse().ok()?;
            if hi < lo {
                return None;
            }
            cpus.extend(lo..=hi);
        } else {
            cpus.push(part.parse().ok()?);
        }
    }
    Some(cpus)
}

/// The physical package of `cpu` (`<sysfs_root>/devices/system/cpu/cpuN/topology/
/// physical_package_id`); `None` when the file is missing or unreadable (VMs often lack it).
pub(super) fn package_of(sysfs_root: &Path, cpu: usize) -> Option<u32> {
    let path = sysfs_root.join(format!(
        "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
    ));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
pub(super) mod testutil {
    //! Fake sysfs/procfs trees in unique temporary directories.

    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
    };

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A temporary directory removed on drop.
    pub struct TempTree(pub PathBuf);

    impl TempTree {
        pub fn new(tag: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("tracer-cpu-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        /// Writes `rel` (creating parents) with `contents`.
        pub fn write(&self, rel: &str, contents: &str) {
            let p = self.0.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("create parent");
            }
            std::fs::write(p, contents).expect("write fake file");
        }

        pub fn remove(&self, rel: &str) {
            std::fs::remove_file(self.0.join(rel)).expect("remove fake file");
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::{testutil::TempTree, *};

    #[test]
    fn cpu_list_parsing() {
        assert_eq!(parse_cpu_list("0,36"), Some(vec![0, 36]));
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(
            parse_cpu_list("0-2,8,10-11"),
            Some(vec![0, 1, 2, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn config_defaults_and_keys() {
        let cfg: CpuPowerConfig = toml::from_str("").expect("empty config");
        assert_eq!(cfg, CpuPowerConfig::default());
        assert_eq!(cfg.source, CpuSource::Auto);
        assert_eq!(cfg.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(cfg.proc_root, PathBuf::from("/proc"));
        assert!((cfg.model_idle_watts - 40.0).abs() < f64::EPSILON);
        assert!((cfg.model_max_watts - 200.0).abs() < f64::EPSILON);
        let cfg: CpuPowerConfig = toml::from_str(
            "source = \"powercap\"\nsysfs_root = \"/x\"\nproc_root = \"/y\"\n\
             model_idle_watts = 10.0\nmodel_max_watts = 90.0\n",
        )
        .expect("full config");
        assert_eq!(cfg.source, CpuSource::Powercap);
        for s in ["auto", "rapl", "powercap", "model", "off"] {
            let c: Result<CpuPowerConfig, _> = toml::from_str(&format!("source = \"{s}\""));
            assert!(c.is_ok(), "{s}");
        }
        assert!(toml::from_str::<CpuPowerConfig>("sauce = \"auto\"").is_err());
    }

    fn fake_proc(t: &TempTree) {
        t.write(
            "proc/stat",
            "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 10 0 10 80 0 0 0 0 0 0\n",
        );
    }

    fn cfg_for(t: &TempTree, source: CpuSource) -> CpuPowerConfig {
        CpuPowerConfig {
            source,
            sysfs_root: t.path().join("sys"),
            proc_root: t.path().join("proc"),
            ..CpuPowerConfig::default()
        }
    }

    #[test]
    fn chooser_picks_model_without_rapl_or_powercap() {
        let t = TempTree::new("choose-model");
        fake_proc(&t);
        t.write("sys/devices/system/cpu/online", "0\n");
        let cfg = cfg_for(&t, CpuSource::Auto);
        let (source, kind) = open(&cfg).expect("model opens");
        assert_eq!(kind, CpuSourceKind::Model);
        assert_eq!(source.devices().len(), 1);
        assert!(source.devices()[0].estimated);
        assert_eq!(source.devices()[0].name, "cpu0-model");
        let report = probe_report(&cfg);
        println!("{}", report.join("\n"));
        assert!(report[0].starts_with("rapl: unavailable: no power PMU at "));
        assert!(report[1].starts_with("powercap: unavailable: "));
        assert!(report[2].starts_with("model: ok: cpu0-model (CpuPackage, estimated)"));
        assert_eq!(report[3], "chosen: model");
    }

    /// Advances a fake `energy_uj` every millisecond (atomic rename) until dropped.
    struct Ticker {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Ticker {
        fn new(file: PathBuf) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                let tmp = file.with_extension("tmp");
                let mut uj = 1000u64;
                while !flag.load(Ordering::Relaxed) {
                    uj += 5000;
                    if std::fs::write(&tmp, format!("{uj}\n")).is_ok() {
                        let _ = std::fs::rename(&tmp, &file);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            Self {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Ticker {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    const ZONE: &str = "sys/class/powercap/intel-rapl:0";

    fn fake_powercap(t: &TempTree) {
        t.write(&format!("{ZONE}/name"), "package-0\n");
        t.write(&format!("{ZONE}/energy_uj"), "1000\n");
        t.write(&format!("{ZONE}/max_energy_range_uj"), "262143328850\n");
    }

    #[test]
    fn chooser_picks_powercap_when_only_powercap_exists() {
        let t = TempTree::new("choose-powercap");
        fake_proc(&t);
        fake_powercap(&t);
        let _tick = Ticker::new(t.path().join(ZONE).join("energy_uj"));
        let (source, kind) = open(&cfg_for(&t, CpuSource::Auto)).expect("powercap opens");
        assert_eq!(kind, CpuSourceKind::Powercap);
        assert_eq!(source.devices()[0].name, "cpu0");
        assert_eq!(source.devices()[0].kind, DeviceKind::CpuPackage);
        assert!(!source.devices()[0].estimated);
        let report = probe_report(&cfg_for(&t, CpuSource::Auto));
        assert_eq!(report.last().map(String::as_str), Some("chosen: powercap"));
    }

    #[test]
    fn chooser_skips_counters_that_do_not_move() {
        let t = TempTree::new("choose-dead");
        fake_proc(&t);
        fake_powercap(&t); // energy_uj never changes: emulated
        let (source, kind) = open(&cfg_for(&t, CpuSource::Auto)).expect("model opens");
        assert_eq!(kind, CpuSourceKind::Model);
        assert!(source.devices()[0].estimated);
        let e = open(&cfg_for(&t, CpuSource::Powercap))
            .err()
            .expect("dead powercap");
        assert!(matches!(e, PowerError::Powercap(_)), "{e}");
        assert!(e.to_string().contains("did not advance"), "{e}");
    }

    /// This host: every source is reported; the model always opens on Linux, so `auto` always
    /// chooses something. Printed for the record (which source this machine would use).
    #[test]
    fn real_host_probe_report() {
        let report = probe_report(&CpuPowerConfig::default());
        println!("CPU power probe on this host:\n  {}", report.join("\n  "));
        assert_eq!(report.len(), 4, "{report:?}");
        assert!(report[0].starts_with("rapl: "));
        assert!(report[1].starts_with("powercap: "));
        assert!(report[2].starts_with("model: ok: cpu"), "{report:?}");
        assert!(report[3].starts_with("chosen: "));
        assert_ne!(report[3], "chosen: none (no allowed source opened)");
    }

    #[test]
    fn chooser_respects_explicit_source_and_off() {
        let t = TempTree::new("choose-explicit");
        fake_proc(&t);
        // Only the model is possible: asking for powercap must fail rather than fall back.
        let e = open(&cfg_for(&t, CpuSource::Powercap))
            .err()
            .expect("no powercap here");
        assert!(matches!(e, PowerError::NotPresent { .. }), "{e}");
        let e = open(&cfg_for(&t, CpuSource::Off)).err().expect("off");
        assert!(matches!(e, PowerError::Disabled(_)), "{e}");
        let (_, kind) = open(&cfg_for(&t, CpuSource::Model)).expect("model");
        assert_eq!(kind, CpuSourceKind::Model);
        let report = probe_report(&cfg_for(&t, CpuSource::Off));
        assert_eq!(
            report.last().map(String::as_str),
            Some("chosen: none (source = off)")
        );
    }
}
