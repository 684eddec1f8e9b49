//! `tracer run`: load the probes, select targets, drain the ring buffer, report, shut down cleanly.

use std::{path::PathBuf, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracer_ebpf::abi::{Kind, Stat};

use crate::{
    config::Config,
    ledger::{self, DeviceKind},
    occupancy::service::{self, DiscoverOptions, Discovery, ServiceError},
    pipeline::{DeviceSetup, Input, Outputs, Pipeline, PipelineConfig, Sink, UserStats, file_sink},
    power::{self, PowerSource, Reading, monotonic_ns},
    probe::targets::{self, TargetError},
    probe::{KernelStats, ProbeError, ProbeSettings, Probes, TRACEPOINTS},
    procfs::ProcFs,
    record::format::{RecordError, RecordHeader, Recorder},
};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The ledger configuration is invalid.
    #[error(transparent)]
    Ledger(ledger::LedgerError),
    /// No `--pid`, `--port`, `--cgroup` or `--comm` was given.
    #[error(
        "nothing to trace: give --pid, --port, --cgroup or --comm (or [targets] in the config)"
    )]
    NoTargets,
    /// Resolving targets failed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Service discovery failed.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The probes could not be loaded or driven.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The recording could not be created.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An I/O error on an output or the event loop.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// Connections without traffic for this long are ended (their close was never seen).
const IDLE_CONNECTION_NS: u64 = 600_000_000_000;

fn drain(pipeline: &mut Pipeline, ring: &mut RingBuf<MapData>) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        pipeline.probe(&item);
        n += 1;
    }
    n
}

fn summary(k: &KernelStats, u: &UserStats, targets: usize, secs: f64, http: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("events");
    for kind in Kind::ALL {
        let n = u.decoded[kind as usize];
        if n > 0 {
            let _ = write!(s, " {}={n}", kind.name());
        }
    }
    let _ = write!(
        s,
        " | bytes in={} out={} | dropped ring={} decode={} stash={} conn_table={} | truncated={} wakeups={} | {http} | targets={targets} over {secs:.1}s",
        u.bytes_in,
        u.bytes_out,
        k.dropped_total(),
        u.decode_errors,
        k.get(Stat::StashFull),
        k.get(Stat::ConnTableFull),
        k.get(Stat::CaptureTruncated),
        k.get(Stat::ForcedWakeups),
    );
    s
}

/// Opens an output file if configured.
fn create(path: Option<&PathBuf>, what: &'static str) -> Result<Option<Sink>, DaemonError> {
    path.map(|p| file_sink(p).map_err(|source| DaemonError::Io { what, source }))
        .transpose()
}

/// A running power sampler: its readings' device indices start at `offset` in the pipeline.
struct SamplerFeed {
    offset: usize,
    rx: std::sync::mpsc::Receiver<Vec<Reading>>,
    _thread: std::thread::JoinHandle<()>,
    /// What the sampler thread has cost (reported in the summary).
    stats: std::sync::Arc<power::SamplerStats>,
}

impl SamplerFeed {
    fn drain(&self, pipeline: &mut Pipeline) {
        while let Ok(mut batch) = self.rx.try_recv() {
            if self.offset != 0 {
                for r in &mut batch {
                    *r.device_mut() += self.offset;
                }
            }
            pipeline.apply(Input::Power { readings: batch });
        }
    }
}

/// Registers `source`'s devices with the pipeline (from index `offset`) and starts sampling it.
fn start_source(
    pipeline: &mut Pipeline,
    source: Box<dyn PowerSource>,
    offset: usize,
    idle_watts: Option<f64>,
    period: Duration,
) -> Result<SamplerFeed, DaemonError> {
    for (i, d) in source.devices().iter().enumerate() {
        let id = (offset + i) as u32;
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
        pipeline.apply(Input::Device {
            id,
            setup: DeviceSetup {
                name: d.name.clone(),
                kind: d.kind,
                estimated: d.estimated,
                idle_watts: if d.kind == DeviceKind::Gpu {
                    idle_watts
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
        offset,
        rx,
        _thread: thread,
        stats,
    })
}

/// Runs the daemon until SIGINT or SIGTERM.
#[allow(clippy::too_many_lines)] // one linear setup sequence, then the loop
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let spec = config.targets.clone();
    if spec.is_empty() {
        return Err(DaemonError::NoTargets);
    }
    let procfs = ProcFs::default();
    let self_pid = std::process::id();
    let resolved = targets::resolve(&procfs, &spec, self_pid)?;

    let settings = ProbeSettings {
        ring_bytes: config.probe.ring_bytes,
        capture_bytes: config.probe.capture_bytes,
        device_root: config.probe.device_root.clone(),
        filter_cgroup: !resolved.cgroup_ids.is_empty(),
        filter_comm: !spec.comms.is_empty(),
        ioctl_events: config.probe.ioctl_events,
        standin_devices: config.probe.standin_devices,
    };
    let mut probes = Probes::load(&settings)?;
    for (&pid, &why) in &resolved.processes {
        probes.add_target(pid, why)?;
    }
    for &id in &resolved.cgroup_ids {
        probes.add_cgroup(id)?;
    }
    for comm in &spec.comms {
        probes.add_comm(comm)?;
    }
    let mut ebpf_log = probes.take_logger();
    let ring = probes.take_events()?;
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
            DaemonError::Io {
                what: "registering the ring buffer",
                source: e.into_parts().1,
            }
        })?;

    let pipeline_config = PipelineConfig {
        http: config.http.clone(),
        ledger: config.ledger.clone(),
        wall_offset_ns: (i128::from(power::realtime_ns()) - i128::from(monotonic_ns())) as i64,
    };
    let recorder = match &config.output.record {
        Some(path) => Some(Recorder::create(
            path,
            &RecordHeader {
                version: 1,
                started_unix_ms: (power::realtime_ns() / 1_000_000) as i64,
                tracer_version: env!("CARGO_PKG_VERSION").into(),
                pipeline: pipeline_config.clone(),
            },
        )?),
        None => None,
    };
    let outputs = Outputs {
        events: create(
            config.output.events_out.as_ref(),
            "creating the events output",
        )?,
        requests: create(
            config.output.requests_out.as_ref(),
            "creating the requests output",
        )?,
        records: create(
            config.output.records_out.as_ref(),
            "creating the records output",
        )?,
        recorder,
    };
    let mut pipeline = Pipeline::new(&pipeline_config, outputs).map_err(DaemonError::Ledger)?;

    // Power: NVML GPUs, then the CPU, each on its own sampler thread. Without them the daemon
    // still traces requests.
    let period = Duration::from_millis(config.power.interval_ms);
    let mut feeds = Vec::new();
    let mut next_device = 0usize;
    if config.power.nvml {
        let options = power::nvml::NvmlOptions {
            lib: config.power.nvml_lib.clone(),
            measure_counter_period: config.power.measure_counter_period,
            process_interval: (config.power.gpu_process_interval_ms > 0)
                .then(|| Duration::from_millis(config.power.gpu_process_interval_ms)),
            ..power::nvml::NvmlOptions::default()
        };
        match power::nvml::NvmlSource::open_with(&options) {
            Ok(source) => {
                let n = source.devices().len();
                feeds.push(start_source(
                    &mut pipeline,
                    Box::new(source),
                    next_device,
                    config.power.gpu_idle_watts,
                    period,
                )?);
                next_device += n;
            }
            Err(e) => tracing::warn!("{e}; GPU energy will not be attributed"),
        }
    }
    match power::cpu::open(&config.power.cpu) {
        Ok((source, kind)) => {
            tracing::info!("power: CPU source {kind}");
            // The model reads /proc/stat: 10 Hz is plenty for a utilisation estimate.
            let cpu_period = if kind == power::cpu::CpuSourceKind::Model {
                period.max(Duration::from_millis(100))
            } else {
                period
            };
            feeds.push(start_source(
                &mut pipeline,
                source,
                next_device,
                config.power.gpu_idle_watts,
                cpu_period,
            )?);
        }
        Err(e) => tracing::warn!("{e}; CPU energy will not be attributed"),
    }

    // Services: each target is a root; roots linked through shared processes or IPC are one
    // service. IPC peers become kernel targets too (their GPU ioctls and exits matter).
    let roots = service::roots_from_spec(&procfs, &spec, self_pid)?;
    let discover_opts = DiscoverOptions {
        self_pid,
        device_root: config.probe.device_root.clone(),
        ..DiscoverOptions::default()
    };
    let mut known_members = std::collections::BTreeSet::new();
    let discovery = service::discover(&procfs, &roots, &discover_opts)?;
    apply_discovery(
        &discovery,
        &mut pipeline,
        &mut probes,
        &mut known_members,
        monotonic_ns(),
        true,
    )?;
    // Connections the targets already had: capture them from now on, parsing resyncs at the
    // next request or response.
    let now = monotonic_ns();
    let mut seeded = 0u64;
    for &pid in resolved.processes.keys() {
        for c in procfs.established_connections(pid) {
            let conn_id = now + seeded;
            seeded += 1;
            let state = tracer_ebpf::abi::ConnState {
                conn_id,
                family: if c.v6 { 10 } else { 2 },
                role: tracer_ebpf::abi::ROLE_SEEDED,
                pad: [0; 5],
            };
            probes.seed_connection(pid, c.fd, state)?;
            pipeline.apply(Input::SeedConn {
                tgid: pid,
                fd: c.fd as i32,
                conn_id,
                ts_ns: now,
                server: c.server,
            });
        }
    }
    tracing::info!(
        "attached {} probes; tracing {} processes {:?}, {} cgroups, {} names, {seeded} open connections; device root {}{}",
        TRACEPOINTS.len(),
        resolved.processes.len(),
        resolved.processes.keys().collect::<Vec<_>>(),
        resolved.cgroup_ids.len(),
        spec.comms.len(),
        config.probe.device_root.display(),
        if config.probe.standin_devices {
            " (stand-in nodes)"
        } else {
            ""
        },
    );

    let io = |what| move |source| DaemonError::Io { what, source };
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("installing SIGINT handler"))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io("installing SIGTERM handler"))?;
    let mut poll = tokio::time::interval(Duration::from_millis(config.probe.poll_interval_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let summary_every = Duration::from_millis(config.output.summary_interval_ms.max(1));
    let mut report = tokio::time::interval(summary_every);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    report.tick().await;
    let mut last_kernel = probes.stats()?;
    let mut last_user = pipeline.stats;
    let mut last_report = tokio::time::Instant::now();
    let mut rediscover =
        tokio::time::interval(Duration::from_millis(config.probe.rediscover_ms.max(100)));
    rediscover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rediscover.tick().await;
    let mut last_sampler_cpu = 0u64;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("waiting on the ring buffer"))?;
                drain(&mut pipeline, guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = poll.tick() => {
                drain(&mut pipeline, ring.get_mut());
                for feed in &feeds {
                    feed.drain(&mut pipeline);
                }
                pipeline.apply(Input::Advance { now_ns: monotonic_ns() });
                if let Some(log) = &mut ebpf_log {
                    log.flush();
                }
                for pid in std::mem::take(&mut pipeline.exited) {
                    known_members.remove(&pid);
                    if let Err(e) = probes.forget_process(pid) {
                        tracing::warn!("cleaning up after process {pid}: {e}");
                    }
                }
            }
            _ = report.tick(), if config.output.summary_interval_ms > 0 => {
                // Connections silent for 10 minutes lost their close somewhere: end them.
                pipeline.apply(Input::EvictIdle { now_ns: monotonic_ns(), idle_ns: IDLE_CONNECTION_NS });
                pipeline.flush();
                let kernel = probes.stats()?;
                let targets = probes.targets()?.len();
                let now = tokio::time::Instant::now();
                tracing::info!(
                    "{}",
                    summary(
                        &kernel.since(&last_kernel),
                        &pipeline.stats.since(&last_user),
                        targets,
                        now.duration_since(last_report).as_secs_f64(),
                        &format!(
                            "{} | {} | sampler cpu={:.2}%",
                            pipeline.http_summary(),
                            pipeline.energy_summary(),
                            sampler_cpu_percent(&feeds, &mut last_sampler_cpu, now.duration_since(last_report)),
                        ),
                    )
                );
                last_kernel = kernel;
                last_user = pipeline.stats;
                last_report = now;
            }
            _ = rediscover.tick(), if config.probe.rediscover_ms > 0 => {
                // New IPC peers (an engine started after the API, a worker respawned).
                match service::discover(&procfs, &roots, &discover_opts) {
                    Ok(d) => apply_discovery(
                        &d,
                        &mut pipeline,
                        &mut probes,
                        &mut known_members,
                        monotonic_ns(),
                        false,
                    )?,
                    Err(e) => tracing::warn!("service re-discovery: {e}"),
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    // Final drain so nothing already in the ring is lost, then every request is finalised,
    // then detach by dropping the probes.
    drain(&mut pipeline, ring.get_mut());
    for feed in &feeds {
        feed.drain(&mut pipeline);
    }
    pipeline.apply(Input::Finish);
    let kernel = probes.stats()?;
    tracing::info!(
        "shutting down: {}",
        summary(
            &kernel,
            &pipeline.stats,
            probes.targets()?.len(),
            0.0,
            &format!(
                "{} | {}",
                pipeline.http_summary(),
                pipeline.energy_summary()
            )
        )
    );
    drop(ring);
    drop(probes);
    tracing::info!("probes detached");
    Ok(())
}

/// Feeds a discovery to the pipeline: services, new members (made kernel targets), and at
/// attach (`seed`) the GPUs members already hold. A member's GPUs are the ones it maps (a
/// context); a process that maps none but holds GPU fds (stand-in nodes, or a monitor) is seeded
/// from its fds.
fn apply_discovery(
    discovery: &Discovery,
    pipeline: &mut Pipeline,
    probes: &mut Probes,
    known: &mut std::collections::BTreeSet<u32>,
    ts_ns: u64,
    seed: bool,
) -> Result<(), DaemonError> {
    use tracer_ebpf::abi::TARGET_PEER;
    for w in &discovery.warnings {
        tracing::warn!("service discovery: {w}");
    }
    for s in &discovery.services {
        if seed {
            pipeline.apply(Input::Service {
                id: s.id,
                name: s.name.clone(),
                ts_ns,
            });
        }
        for (&pid, m) in &s.members {
            if !known.insert(pid) {
                continue;
            }
            let reason = m
                .reasons
                .iter()
                .map(service::Reason::text)
                .collect::<Vec<_>>()
                .join("; ");
            if !seed {
                tracing::info!(
                    "service {} gained process {pid} ({}): {reason}",
                    s.name,
                    m.comm
                );
            }
            pipeline.apply(Input::Member {
                pid,
                service: s.id,
                reason,
            });
            // Targets, descendants and cgroup members are traced already; peers join here.
            probes.add_target(pid, TARGET_PEER)?;
            let Some(ev) = s.gpu_evidence.get(&pid).filter(|_| seed) else {
                continue;
            };
            let mapped = ev.mapped();
            let (minors, how) = if mapped.is_empty() {
                (ev.minors.clone(), "open device node")
            } else {
                (mapped, "mapped (context)")
            };
            for minor in minors {
                pipeline.apply(Input::SeedGpu {
                    pid,
                    minor,
                    ts_ns,
                    evidence: how.into(),
                });
            }
        }
    }
    for (minor, pids) in &discovery.others {
        tracing::warn!(
            "GPU minor {minor} is also held by untraced processes {pids:?}: its energy is split by \
             SM utilisation where NVML reports it, else only among the traced services"
        );
    }
    Ok(())
}

/// CPU the sampler threads used since the last call, as a percentage of one core.
fn sampler_cpu_percent(feeds: &[SamplerFeed], last: &mut u64, elapsed: Duration) -> f64 {
    let total: u64 = feeds.iter().map(|f| f.stats.cpu_ns()).sum();
    let used = total.saturating_sub(*last);
    *last = total;
    used as f64 / elapsed.as_nanos().max(1) as f64 * 100.0
}
