//! Power samplers as the daemon runs them: each source on its own thread, its readings drained
//! into the pipeline on the event loop.

use std::sync::Arc;

use super::{DaemonError, io_err};
use crate::{
    ids::DeviceId,
    pipeline::{DeviceSetup, Input, Pipeline, snapshot::SamplerHealth},
    power::{self, Reading},
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

/// Registers an opened source's devices with the pipeline (from index `offset`) and starts
/// sampling it.
fn start_source(
    pipeline: &mut Pipeline,
    opened: power::OpenedSource,
    offset: usize,
) -> Result<SamplerFeed, DaemonError> {
    let source = &opened.source;
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
                idle_watts: opened.idle_watts(i),
                counter_period_ns,
                minor: d.minor,
                uuid: d.uuid.clone(),
            },
        });
    }
    let label = opened.label().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, stats) = power::spawn_sampler(opened.source, opened.period, tx)
        .map_err(io_err("starting a power sampler"))?;
    Ok(SamplerFeed {
        label,
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
    config: &power::PowerConfig,
) -> Result<Vec<SamplerFeed>, DaemonError> {
    let opened = power::open_all(config);
    for w in &opened.warnings {
        tracing::warn!("{w}");
    }
    let mut feeds = Vec::new();
    let mut next_device = 0usize;
    for o in opened.sources {
        if let power::SourceKind::Cpu(kind) = o.kind {
            tracing::info!("power: CPU source {kind}");
        }
        let n = o.source.devices().len();
        feeds.push(start_source(pipeline, o, next_device)?);
        next_device += n;
    }
    Ok(feeds)
}
