//! Power samplers as the daemon runs them: each source on its own thread, its readings drained
//! into the pipeline on the event loop.

use std::{sync::Arc, time::Duration};

use super::{DaemonError, io_err};
use crate::{
    ids::DeviceId,
    ledger::DeviceKind,
    pipeline::{DeviceSetup, Input, Pipeline, snapshot::SamplerHealth},
    power::{self, PowerSource, Reading},
};

/// A running power sampler: its readings' device indices start at `offset` in the pipeline.
pub(super) struct SamplerFeed {
    label: String,
    devices: Vec<String>,
    offset: usize,
    rx: std::sync::mpsc::Receiver<Vec<Reading>>,
    _thread: std::thread::JoinHandle<()>,
    /// What the sampler thread has cost (reported in snapshots).
    stats: Arc<power::SamplerStats>,
}

impl SamplerFeed {
    /// Moves the readings sampled so far into the pipeline.
    pub fn drain(&self, pipeline: &mut Pipeline) {
        while let Ok(mut batch) = self.rx.try_recv() {
            if self.offset != 0 {
                for r in &mut batch {
                    *r.device_mut() += self.offset;
                }
            }
            pipeline.apply(Input::Power { readings: batch });
        }
    }

    /// Its health for snapshots.
    pub fn health(&self) -> SamplerHealth {
        SamplerHealth {
            source: self.label.clone(),
            devices: self.devices.clone(),
            polls: self.stats.polls(),
            cpu_ns: self.stats.cpu_ns(),
            late: self.stats.late(),
        }
    }
}

/// Registers `source`'s devices with the pipeline (from index `offset`) and starts sampling it.
pub(super) fn start_source(
    pipeline: &mut Pipeline,
    label: &str,
    source: Box<dyn PowerSource>,
    offset: usize,
    gpu_idle_watts: Option<f64>,
    period: Duration,
) -> Result<SamplerFeed, DaemonError> {
    let mut names = Vec::new();
    for (i, d) in source.devices().iter().enumerate() {
        let id = DeviceId((offset + i) as u32);
        let counter_period_ns = source.counter_period_ns(i);
        tracing::info!(
            "power: {} ({:?}{}) uuid={} minor={:?} pci={} counter period={}",
            d.name,
            d.kind,
            if d.estimated { ", ESTIMATED" } else { "" },
            d.uuid.as_deref().unwrap_or("-"),
            d.minor,
            d.pci_bus_id.as_deref().unwrap_or("-"),
            counter_period_ns.map_or_else(|| "-".into(), |p| format!("{} ms", p / 1_000_000)),
        );
        names.push(d.name.clone());
        pipeline.apply(Input::Device {
            id,
            setup: DeviceSetup {
                name: d.name.clone(),
                kind: d.kind,
                estimated: d.estimated,
                idle_watts: if d.kind == DeviceKind::Gpu {
                    gpu_idle_watts
                } else {
                    None
                },
                counter_period_ns,
                minor: d.minor,
                uuid: d.uuid.clone(),
            },
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, stats) =
        power::spawn_sampler(source, period, tx).map_err(io_err("starting a power sampler"))?;
    Ok(SamplerFeed {
        label: label.to_string(),
        devices: names,
        offset,
        rx,
        _thread: thread,
        stats,
    })
}

/// Opens every power source the configuration allows (NVML GPUs, then the CPU) and starts
/// sampling each. Without them the daemon still traces requests.
pub(super) fn start_all(
    pipeline: &mut Pipeline,
    config: &crate::config::PowerConfig,
) -> Result<Vec<SamplerFeed>, DaemonError> {
    let period = Duration::from_millis(config.interval_ms);
    let mut feeds = Vec::new();
    let mut next_device = 0usize;
    if config.nvml {
        let options = power::nvml::NvmlOptions {
            lib: config.nvml_lib.clone(),
            measure_counter_period: config.measure_counter_period,
            process_interval: (config.gpu_process_interval_ms > 0)
                .then(|| Duration::from_millis(config.gpu_process_interval_ms)),
            ..power::nvml::NvmlOptions::default()
        };
        match power::nvml::NvmlSource::open_with(&options) {
            Ok(source) => {
                let n = source.devices().len();
                feeds.push(start_source(
                    pipeline,
                    "nvml",
                    Box::new(source),
                    next_device,
                    config.gpu_idle_watts,
                    period,
                )?);
                next_device += n;
            }
            Err(e) => tracing::warn!("{e}; GPU energy will not be attributed"),
        }
    }
    match power::cpu::open(&config.cpu) {
        Ok((source, kind)) => {
            tracing::info!("power: CPU source {kind}");
            // The model reads /proc/stat: 10 Hz is plenty for a utilisation estimate.
            let cpu_period = if kind == power::cpu::CpuSourceKind::Model {
                period.max(Duration::from_millis(100))
            } else {
                period
            };
            feeds.push(start_source(
                pipeline,
                &format!("cpu:{}", kind.as_str()),
                source,
                next_device,
                config.gpu_idle_watts,
                cpu_period,
            )?);
        }
        Err(e) => tracing::warn!("{e}; CPU energy will not be attributed"),
    }
    Ok(feeds)
}
