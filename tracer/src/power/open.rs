//! Opening every configured power source in one place: NVML's GPUs, then the CPU source the
//! chooser picks, each with the period to sample it at, and a warning for each source that
//! could not open (what will then not be attributed). The daemon samples what this returns;
//! without any source it still traces requests.

use std::{fmt, time::Duration};

use super::{
    PowerConfig, PowerSource,
    cpu::{self, CpuSourceKind},
    nvml::{NvmlOptions, NvmlSource},
};
use crate::ledger::DeviceKind;

/// The utilisation model's shortest sampling period: it reads `/proc/stat`, and 10 Hz is plenty
/// for a utilisation estimate.
pub const MODEL_MIN_PERIOD: Duration = Duration::from_millis(100);

/// Which source an [`OpenedSource`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// NVIDIA GPUs through NVML.
    Nvml,
    /// CPU packages and DRAM, through the source the chooser picked.
    Cpu(CpuSourceKind),
}

impl SourceKind {
    /// `nvml`, `cpu:rapl`, `cpu:powercap` or `cpu:model`, for logs and reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::Cpu(CpuSourceKind::Rapl) => "cpu:rapl",
            Self::Cpu(CpuSourceKind::Powercap) => "cpu:powercap",
            Self::Cpu(CpuSourceKind::Model) => "cpu:model",
        }
    }

    /// The period to sample this source at, given the configured one: the model at most at
    /// 10 Hz ([`MODEL_MIN_PERIOD`]), every measured source at the configured period.
    pub fn sampling_period(self, configured: Duration) -> Duration {
        if self == Self::Cpu(CpuSourceKind::Model) {
            configured.max(MODEL_MIN_PERIOD)
        } else {
            configured
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A source that opened, ready to be sampled.
pub struct OpenedSource {
    pub source: Box<dyn PowerSource>,
    pub kind: SourceKind,
    /// The period to sample it at ([`SourceKind::sampling_period`] of `power.interval_ms`).
    pub period: Duration,
    /// `power.gpu_idle_watts`, for this source's GPUs.
    gpu_idle_watts: Option<f64>,
    /// The CPU model's idle watts per package: known by construction, not learned (a host
    /// never idle while watched would otherwise read its load as idle).
    model_idle_watts: Option<f64>,
}

impl fmt::Debug for OpenedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedSource")
            .field("kind", &self.kind)
            .field("devices", &self.source.devices())
            .field("period", &self.period)
            .field("gpu_idle_watts", &self.gpu_idle_watts)
            .finish_non_exhaustive()
    }
}

impl OpenedSource {
    /// See [`SourceKind::label`].
    pub fn label(&self) -> &'static str {
        self.kind.label()
    }

    /// The configured idle watts of `device` (an index into the source's devices):
    /// `power.gpu_idle_watts` for a GPU, the model's idle watts for a modelled CPU package;
    /// `None` for other devices, and for GPUs when unset (then the idle power is learned from
    /// quiet periods).
    pub fn idle_watts(&self, device: usize) -> Option<f64> {
        let d = self.source.devices().get(device)?;
        match d.kind {
            DeviceKind::Gpu => self.gpu_idle_watts,
            DeviceKind::CpuPackage => self.model_idle_watts,
            _ => None,
        }
    }
}

/// What [`open_all`] opened.
#[derive(Debug, Default)]
pub struct OpenedSources {
    /// NVML first, then the CPU source: the order their devices are numbered in.
    pub sources: Vec<OpenedSource>,
    /// One line per source that could not open, ending with what will not be attributed
    /// (e.g. `NVML unavailable: ...; GPU energy will not be attributed`), to log as warnings.
    pub warnings: Vec<String>,
}

/// The NVML options the configuration asks for (library, counter-period measurement, process
/// cadence, power samples, the counter's CPU budget; measurement timing is the default).
pub fn nvml_options(cfg: &PowerConfig) -> NvmlOptions {
    NvmlOptions {
        lib: cfg.nvml_lib.clone(),
        measure_counter_period: cfg.measure_counter_period,
        process_interval: (cfg.gpu_process_interval_ms > 0)
            .then(|| Duration::from_millis(cfg.gpu_process_interval_ms)),
        counter_cpu_budget: (cfg.gpu_counter_cpu_percent > 0.0)
            .then_some(cfg.gpu_counter_cpu_percent / 100.0),
        power_samples: cfg.gpu_power_samples,
        samples_interval: Duration::from_millis(cfg.gpu_samples_interval_ms.max(1)),
        ..NvmlOptions::default()
    }
}

/// Opens NVML (when `cfg.nvml`; measuring counter periods blocks up to a second) and then the
/// CPU source (`cfg.cpu`, through [`cpu::open`], which logs its choice). A source that does not
/// open is a warning, not an error: a CPU source that is off in the configuration is warned
/// about too, NVML switched off is not.
pub fn open_all(cfg: &PowerConfig) -> OpenedSources {
    let configured = Duration::from_millis(cfg.interval_ms);
    let mut opened = OpenedSources::default();
    let mut push = |source: Box<dyn PowerSource>, kind: SourceKind| {
        opened.sources.push(OpenedSource {
            source,
            kind,
            period: kind.sampling_period(configured),
            gpu_idle_watts: cfg.gpu_idle_watts,
            model_idle_watts: (kind == SourceKind::Cpu(CpuSourceKind::Model))
                .then_some(cfg.cpu.model_idle_watts),
        });
    };
    let mut warnings = Vec::new();
    if cfg.nvml {
        match NvmlSource::open_with(&nvml_options(cfg)) {
            Ok(source) => push(Box::new(source), SourceKind::Nvml),
            Err(e) => warnings.push(format!("{e}; GPU energy will not be attributed")),
        }
    }
    match cpu::open(&cfg.cpu) {
        Ok((source, kind)) => push(source, SourceKind::Cpu(kind)),
        Err(e) => warnings.push(format!("{e}; CPU energy will not be attributed")),
    }
    opened.warnings = warnings;
    opened
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{
        cpu::{CpuPowerConfig, CpuSource, DEFAULT_MODEL_IDLE_WATTS},
        testutil::TempTree,
    };

    /// A host with no NVML library and only `/proc/stat`: the model is all that opens.
    fn model_host(t: &TempTree, nvml: bool, source: CpuSource) -> PowerConfig {
        t.write(
            "proc/stat",
            "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 10 0 10 80 0 0 0 0 0 0\n",
        );
        PowerConfig {
            nvml,
            nvml_lib: Some(t.path().join("no/libnvidia-ml.so.1")),
            interval_ms: 20,
            gpu_idle_watts: Some(55.0),
            cpu: CpuPowerConfig {
                source,
                sysfs_root: t.path().join("sys"),
                proc_root: t.path().join("proc"),
                ..CpuPowerConfig::default()
            },
            ..PowerConfig::default()
        }
    }

    #[test]
    fn labels_and_periods() {
        let ms = Duration::from_millis;
        assert_eq!(SourceKind::Nvml.label(), "nvml");
        assert_eq!(SourceKind::Cpu(CpuSourceKind::Rapl).to_string(), "cpu:rapl");
        assert_eq!(
            SourceKind::Cpu(CpuSourceKind::Powercap).label(),
            "cpu:powercap"
        );
        let model = SourceKind::Cpu(CpuSourceKind::Model);
        assert_eq!(model.label(), "cpu:model");
        assert_eq!(model.sampling_period(ms(20)), ms(100));
        assert_eq!(model.sampling_period(ms(250)), ms(250));
        assert_eq!(SourceKind::Nvml.sampling_period(ms(20)), ms(20));
        assert_eq!(
            SourceKind::Cpu(CpuSourceKind::Rapl).sampling_period(ms(20)),
            ms(20)
        );
    }

    #[test]
    fn nvml_options_follow_the_config() {
        let cfg = PowerConfig {
            nvml_lib: Some("/x/libnvidia-ml.so.1".into()),
            measure_counter_period: false,
            gpu_process_interval_ms: 0,
            ..PowerConfig::default()
        };
        let o = nvml_options(&cfg);
        assert_eq!(o.lib, cfg.nvml_lib);
        assert!(!o.measure_counter_period);
        assert_eq!(o.process_interval, None);
        assert_eq!(
            o.counter_cpu_budget,
            NvmlOptions::default().counter_cpu_budget
        );
        let o = nvml_options(&PowerConfig::default());
        assert!(o.measure_counter_period);
        assert_eq!(o.process_interval, Some(Duration::from_secs(1)));
        assert!(o.power_samples);
        assert_eq!(o.samples_interval, Duration::from_millis(500));
        let o = nvml_options(&PowerConfig {
            gpu_power_samples: false,
            gpu_samples_interval_ms: 250,
            gpu_counter_cpu_percent: 0.0,
            ..PowerConfig::default()
        });
        assert!(!o.power_samples);
        assert_eq!(o.samples_interval, Duration::from_millis(250));
        assert_eq!(o.counter_cpu_budget, None);
    }

    #[test]
    fn missing_nvml_is_a_warning_and_the_model_opens() {
        let t = TempTree::new("open-all");
        let opened = open_all(&model_host(&t, true, CpuSource::Auto));
        assert_eq!(opened.warnings.len(), 1, "{:?}", opened.warnings);
        let w = &opened.warnings[0];
        assert!(w.starts_with("NVML unavailable: cannot load "), "{w}");
        assert!(w.ends_with("; GPU energy will not be attributed"), "{w}");
        assert_eq!(opened.sources.len(), 1);
        let cpu = &opened.sources[0];
        assert_eq!(cpu.kind, SourceKind::Cpu(CpuSourceKind::Model));
        assert_eq!(cpu.label(), "cpu:model");
        assert_eq!(cpu.period, MODEL_MIN_PERIOD);
        assert_eq!(cpu.source.devices()[0].name, "cpu0-model");
        // GPU idle watts are for GPUs only; the model's package idles at its configured watts.
        assert_eq!(cpu.idle_watts(0), Some(DEFAULT_MODEL_IDLE_WATTS));
        assert_eq!(cpu.idle_watts(7), None);
    }

    #[test]
    fn nvml_off_is_silent_and_cpu_off_is_a_warning() {
        let t = TempTree::new("open-all-off");
        let opened = open_all(&model_host(&t, false, CpuSource::Off));
        assert!(opened.sources.is_empty());
        assert_eq!(
            opened.warnings,
            ["CPU power is off in the configuration; CPU energy will not be attributed"]
        );
    }
}
