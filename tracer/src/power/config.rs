//! The `[power]` table of the configuration: which sources to open and how to sample them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cpu::CpuPowerConfig;

/// Power sources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowerConfig {
    /// Sample NVIDIA GPUs through NVML.
    pub nvml: bool,
    /// Path of `libnvidia-ml.so.1` (default: the system's).
    pub nvml_lib: Option<PathBuf>,
    /// Sampling period; at least twice as fast as the sensors update (NVML: 100 ms).
    pub interval_ms: u64,
    /// GPU idle (static) power in watts; unset: learned from quiet periods (a server that is
    /// never quiet needs this for an accurate idle/dynamic split).
    pub gpu_idle_watts: Option<f64>,
    /// Measure each GPU's energy-counter update period at start (about a second); off: assume
    /// 100 ms (A100/H100).
    pub measure_counter_period: bool,
    /// How often NVML's running processes and per-process utilisation are read (they are
    /// slow calls); 0 = never (GPUs are then shared equally between services).
    pub gpu_process_interval_ms: u64,
    /// Read each GPU's power from the driver's buffered samples (`nvmlDeviceGetSamples`),
    /// one call per `gpu_samples_interval_ms`, where the driver keeps them; off (or not
    /// kept): the instant power field every `interval_ms`.
    pub gpu_power_samples: bool,
    /// How often the buffered power samples are read (shortened by itself if the driver's
    /// buffer overflows between reads).
    pub gpu_samples_interval_ms: u64,
    /// CPU the GPUs' energy-counter reads may use, all GPUs together, in percent of one core
    /// (one read costs 3–4 ms of CPU on GSP-based GPUs); 0 = read every poll, whatever it
    /// costs.
    pub gpu_counter_cpu_percent: f64,
    /// CPU package and DRAM power: RAPL (perf), powercap, or a model (labelled estimated).
    pub cpu: CpuPowerConfig,
}

impl Default for PowerConfig {
    fn default() -> Self {
        Self {
            nvml: true,
            nvml_lib: None,
            interval_ms: 20,
            gpu_idle_watts: None,
            measure_counter_period: true,
            gpu_process_interval_ms: 1000,
            gpu_power_samples: true,
            gpu_samples_interval_ms: 500,
            gpu_counter_cpu_percent: 0.5,
            cpu: CpuPowerConfig::default(),
        }
    }
}
