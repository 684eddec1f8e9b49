//! `tracer run`: load the probes, select targets, drain the ring buffer into the pipeline, feed
//! it power readings and discoveries, publish snapshots, shut down cleanly.
//!
//! The daemon owns the clock and the I/O; the pipeline stays pure. Setup is in [`attach`]
//! (targets, probes, existing connections), [`feeds`] (power samplers), [`discovery`]
//! (services from `/proc`) and [`outputs`] (the subscribers the configuration asks for).

mod attach;
mod discovery;
mod feeds;
pub mod host;
pub mod memory;
mod notify;
mod outputs;
pub mod privilege;
mod rediscover;
pub mod reload;
mod storage;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::Config,
    ledger,
    occupancy::{
        service::{self, DiscoverOptions, ServiceError},
        workload::kubelet::Kubelet,
    },
    output::summary,
    pipeline::{Input, Pipeline, PipelineConfig, snapshot::Extras},
    power::{self, monotonic_ns},
    probe::{ProbeError, Probes, TRACEPOINTS, targets::TargetError},
    procfs::ProcFs,
    record::format::RecordError,
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
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened, recovered or closed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The local-socket API could not start.
    #[error("the API: {0}")]
    Api(#[from] crate::api::ApiError),
    /// The kubelet client could not be set up (`[workload]`).
    #[error("workload identity: {0}")]
    Kubelet(#[from] crate::occupancy::workload::kubelet::KubeletError),
    /// The OTLP exporter could not start.
    #[error(transparent)]
    Otlp(#[from] crate::output::otlp::OtlpError),
    /// The kernel is older than the daemon supports (checked at start).
    #[error("tracer needs Linux {need} or later; this kernel is {release}")]
    Kernel { release: String, need: String },
    /// The daemon lacks the privileges it needs (checked before anything else).
    #[error(
        "tracer needs root, or the capabilities {missing}: it loads eBPF programs and reads \
         other processes' /proc entries (running as uid {uid})"
    )]
    Privilege { uid: u32, missing: String },
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io {
        what: what.to_string(),
        source,
    }
}

/// The services' CPU time and the host's now (`Input::CpuTime`).
fn cpu_time_sample(procfs: &ProcFs, pipeline: &Pipeline) -> Input {
    let processes = pipeline
        .service_processes()
        .into_iter()
        .filter_map(|pid| Some((crate::ids::Pid(pid), procfs.process_cpu_ticks(pid)?)))
        .collect();
    Input::CpuTime {
        ts_ns: monotonic_ns(),
        busy_ticks: procfs.busy_ticks().unwrap_or(0),
        processes,
    }
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

/// What the daemon adds to a snapshot.
fn extras(probes: &mut Probes, feeds: &[feeds::SamplerFeed]) -> Result<Extras, DaemonError> {
    Ok(Extras {
        kernel: Some(probes.stats()?),
        samplers: feeds.iter().map(feeds::SamplerFeed::health).collect(),
        targets: Some(probes.targets()?.len()),
    })
}

/// Runs the daemon until SIGINT or SIGTERM; SIGHUP re-reads the configuration with `reload`
/// (see [`reload`]).
pub async fn run(mut config: Config, reload: reload::Reader) -> Result<(), DaemonError> {
    // Handlers first: a SIGHUP (logrotate, `systemctl reload`) during start-up must not kill
    // the daemon with the signal's default action. tokio starts no thread for them.
    let mut sighup = signal(SignalKind::hangup()).map_err(io_err("installing SIGHUP handler"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(io_err("installing SIGINT handler"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(io_err("installing SIGTERM handler"))?;
    privilege::check()?;
    host::check()?;
    // Mounting tracefs needs CAP_SYS_ADMIN, which the drop below gives up.
    crate::probe::ensure_tracefs()?;
    if config.daemon.drop_privileges {
        let threads = privilege::threads();
        if threads > 1 {
            tracing::warn!("dropping privileges with {threads} threads: only this one drops");
        }
        let d = privilege::drop_unneeded(
            config.probe.cuda_clock || config.probe.tls_uprobes || config.probe.other_netns_peers,
        )?;
        tracing::info!(
            "privileges: kept {} and gave up {} others ({}), no-new-privs set",
            d.kept.join(", "),
            d.dropped,
            if d.bounding {
                "from the bounding set too"
            } else {
                "the bounding set was already limited: no CAP_SETPCAP to change it"
            }
        );
    }
    let procfs = ProcFs::default();
    let self_pid = std::process::id();
    let (mut probes, resolved) = attach::load(&config, &procfs, self_pid)?;
    let loaded = reload::Loaded {
        cgroups: !resolved.cgroup_ids.is_empty(),
        comms: !config.targets.comms.is_empty(),
    };
    let mut ebpf_log = probes.take_logger();
    let ring = probes.take_events()?;
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
            DaemonError::Io {
                what: "registering the ring buffer".into(),
                source: e.into_parts().1,
            }
        })?;

    let mut opened = storage::open(&config)?;
    let mut http = config.http.clone();
    if !config.output.record_payloads {
        http.redaction_key = Some(storage::redaction_key(opened.as_ref().map(|o| &o.store))?);
    }
    let pipeline_config = PipelineConfig {
        http,
        ledger: config.ledger.clone(),
        wall_offset_ns: (i128::from(power::realtime_ns()) - i128::from(monotonic_ns())) as i64,
        first_request_id: opened.as_ref().map_or(1, |o| o.run.first_request_id),
        tariff: config.bill.tariff().map_err(|e| DaemonError::Io {
            what: "reading the tariff".into(),
            source: std::io::Error::other(e),
        })?,
    };
    let journal = opened.as_ref().and_then(|o| o.journal.clone());
    let learned = opened
        .as_mut()
        .map(|o| std::mem::take(&mut o.learned))
        .unwrap_or_default();
    let learned_idle = opened
        .as_mut()
        .map(|o| std::mem::take(&mut o.learned_idle))
        .unwrap_or_default();
    let (mut bus, journal_written) = outputs::bus(&config, &pipeline_config, journal.as_deref())?;
    let otlp_metrics = config.otlp.enabled().is_some() && config.otlp.metrics;
    let api_state =
        (config.api.socket.is_some() || config.api.metrics_listen.is_some() || otlp_metrics)
            .then(|| crate::api::Shared::new(config.api.memory_records));
    if let Some(state) = &api_state {
        state.limit_tenants(config.api.metrics_tenants);
        if let Some(o) = opened.as_mut() {
            state.report_recoveries(std::mem::take(&mut o.recoveries));
        }
        bus.subscribe(Box::new(crate::api::Feed {
            shared: Arc::clone(state),
            records: opened.is_none(),
        }));
    }
    let families = api_state
        .clone()
        .map(|s| Box::new(move || s.families()) as crate::output::otlp::Families);
    let otlp = crate::output::otlp::Otlp::start(&config.otlp, &mut bus, families)?;
    if let Some(o) = &otlp {
        let c = &config.otlp;
        tracing::info!(
            "OTLP/HTTP export to {}: logs {}, metrics {} (every {} ms); queue {} records",
            c.endpoint.as_deref().unwrap_or_default(),
            if c.logs { "on" } else { "off" },
            if c.metrics { "on" } else { "off" },
            c.metrics_interval_ms,
            c.queue_records
        );
        if let Some(state) = &api_state {
            let stats = o.stats();
            state.add_families(crate::api::FamilySource(Box::new(move || stats.families())));
        }
    }
    // With a store, records reach the API once committed (what anyone sees as final is
    // stored).
    let writer = match opened {
        Some(o) => {
            let on_commit: crate::store::writer::OnCommit = match &api_state {
                Some(state) => {
                    let loaded = state.attach_store(
                        crate::store::Store::open_reader(o.store.dir())?,
                        o.run.first_request_id,
                    )?;
                    tracing::info!("API: {loaded} stored records in memory");
                    let state = Arc::clone(state);
                    Box::new(move |records| {
                        for r in records {
                            state.add_record(r);
                        }
                    })
                }
                None => Box::new(|_| {}),
            };
            let run = o.run.run;
            let w = crate::store::StoreWriter::start(o.store, run, config.store.clone(), on_commit)
                .map_err(io_err("starting the store's writer"))?;
            bus.subscribe(Box::new(w.feed()));
            if let Some(state) = &api_state {
                state.watch_writer(w.stats());
            }
            Some((w, run))
        }
        None => None,
    };
    let mut pipeline = Pipeline::new(&pipeline_config, bus).map_err(DaemonError::Ledger)?;
    let mut segments = journal_written
        .zip(writer.as_ref())
        .and_then(|(w, (_, run))| storage::Segments::new(&config.store, w, *run, monotonic_ns()));
    let feeds = feeds::start_all(&mut pipeline, &config.power)?;

    // Services: each target is a root; roots linked through shared processes or IPC are one
    // service. IPC peers become kernel targets too (their GPU ioctls and exits matter).
    let roots = service::roots_from_spec(&procfs, &config.targets, self_pid)?;
    let opts = DiscoverOptions {
        self_pid,
        device_root: config.probe.device_root.clone(),
        kubelet: Kubelet::new(&config.workload)?.map(|k| Arc::new(Mutex::new(k))),
        other_netns: config.probe.other_netns_peers,
        ..DiscoverOptions::default()
    };
    let clocks = discovery::Clocks {
        cuda: config.probe.cuda_clock,
        cuda_library: config.probe.cuda_library.clone(),
        ipc: config.probe.ipc_clock,
        tls: config.probe.tls_uprobes,
    };
    let (mut services, mut rediscovered) =
        discovery::Services::new(procfs.clone(), roots, opts, clocks);
    services.attach(&mut pipeline, &mut probes)?;
    if !learned.is_empty() {
        let n = storage::restore_learned(&mut pipeline, learned);
        tracing::info!("store: restored {n} learned cost models (device, service)");
    }
    if !learned_idle.is_empty() {
        let n = storage::restore_idle(&mut pipeline, learned_idle);
        tracing::info!("store: restored the idle power learned from quiet time of {n} devices");
    }
    let seeded = attach::seed_connections(&procfs, &resolved, &mut probes, &mut pipeline)?;
    tracing::info!(
        "attached {} probes; tracing {} processes {:?}, {} cgroups, {} names, {seeded} open connections; device root {}{}",
        TRACEPOINTS.len(),
        resolved.processes.len(),
        resolved.processes.keys().collect::<Vec<_>>(),
        resolved.cgroup_ids.len(),
        config.targets.comms.len(),
        config.probe.device_root.display(),
        if config.probe.standin_devices {
            " (stand-in nodes)"
        } else {
            ""
        },
    );

    let _api = match (&config.api.socket, api_state.clone()) {
        (Some(path), Some(state)) => {
            let api = crate::api::Api::start(&config.api, path, state, procfs.proc_root.clone())?;
            tracing::info!("API on {} (mode {:o})", path.display(), config.api.mode);
            Some(api)
        }
        _ => None,
    };
    let _metrics = match config.api.metrics_listen {
        Some(addr) => {
            let state = api_state
                .clone()
                .unwrap_or_else(|| crate::api::Shared::new(config.api.memory_records));
            let m = crate::api::MetricsListener::start(addr, state).await?;
            tracing::info!("metrics on http://{}/metrics", m.addr);
            Some(m)
        }
        None => None,
    };

    let notifier = notify::Notifier::from_env();
    if let Some(n) = &notifier {
        n.ready(&format!("tracing {} processes", resolved.processes.len()));
    }
    let every = |ms: u64| {
        let mut i = tokio::time::interval(Duration::from_millis(ms.max(1)));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    };
    let mut poll = every(config.probe.poll_interval_ms);
    let mut report = every(config.output.summary_interval_ms);
    report.tick().await;
    let mut backoff =
        rediscover::Backoff::new(config.probe.rediscover_ms, config.probe.rediscover_max_ms);
    let rediscover = tokio::time::sleep(backoff.delay());
    tokio::pin!(rediscover);
    let cpu_time_ms = config.power.cpu.cpu_time_interval_ms;
    let mut cpu_time = every(cpu_time_ms);

    let mut quiet = memory::Quiet::default();
    let mut drained = 0;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io_err("waiting on the ring buffer"))?;
                drained += drain(&mut pipeline, guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = poll.tick() => {
                drained += drain(&mut pipeline, ring.get_mut());
                quiet.tick(std::mem::take(&mut drained));
                for feed in &feeds {
                    feed.drain(&mut pipeline);
                }
                pipeline.apply(Input::Advance { now_ns: monotonic_ns() });
                if let Some(s) = &mut segments {
                    s.tick(&mut pipeline, monotonic_ns());
                }
                // The journal and files reach the kernel every tick: a kill loses one tick.
                pipeline.flush();
                if let Some(log) = &mut ebpf_log {
                    log.flush();
                }
                // While a pass runs, the change is remembered for when it ends (`passed`).
                if pipeline.take_process_changes() > 0
                    && let Some(d) = backoff.processes_changed()
                    && !services.in_flight()
                {
                    let sooner = tokio::time::Instant::now() + d;
                    if sooner < rediscover.deadline() {
                        rediscover.as_mut().reset(sooner);
                    }
                }
                for pid in pipeline.take_exited() {
                    services.forget(pid);
                    if let Err(e) = probes.forget_process(pid) {
                        tracing::warn!("cleaning up after process {pid}: {e}");
                    }
                }
            }
            _ = cpu_time.tick(), if cpu_time_ms > 0 => {
                pipeline.apply(cpu_time_sample(&procfs, &pipeline));
            }
            _ = report.tick(), if config.output.summary_interval_ms > 0 => {
                // Connections silent for 10 minutes lost their close somewhere: end them.
                pipeline.apply(Input::EvictIdle { now_ns: monotonic_ns(), idle_ns: IDLE_CONNECTION_NS });
                pipeline.flush();
                let extras = extras(&mut probes, &feeds)?;
                pipeline.publish_snapshot(monotonic_ns(), extras);
            }
            () = &mut rediscover, if config.probe.rediscover_ms > 0 => {
                services.start_refresh();
                backoff.started();
                // The next pass is timed from this one's end.
                rediscover.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(86_400));
            }
            Some(found) = rediscovered.recv() => {
                let changed = services.refreshed(found, &mut pipeline, &mut probes)?;
                rediscover.as_mut().reset(tokio::time::Instant::now() + backoff.passed(changed));
            }
            _ = sighup.recv() => {
                if let Some(n) = &notifier {
                    n.reloading();
                }
                reload::on_hangup(&reload, &mut reload::Daemon {
                    config: &mut config,
                    loaded,
                    procfs: &procfs,
                    self_pid,
                    probes: &mut probes,
                    services: &mut services,
                    pipeline: &mut pipeline,
                });
                if let Some(n) = &notifier {
                    // Best effort: a map read that fails must not end the daemon here.
                    let traced = probes.targets().map_or(0, |t| t.len());
                    n.ready(&format!("tracing {traced} processes"));
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    if let Some(n) = &notifier {
        n.stopping();
    }

    // Final drain so nothing already in the ring is lost, then every request is finalised,
    // then detach by dropping the probes.
    drain(&mut pipeline, ring.get_mut());
    for feed in &feeds {
        feed.drain(&mut pipeline);
    }
    pipeline.apply(Input::Finish);
    pipeline.flush();
    let last = pipeline.snapshot(monotonic_ns(), extras(&mut probes, &feeds)?);
    tracing::info!("shutting down: {}", summary::render(&last, None));
    if let Some((w, run)) = writer {
        let stats = w.stats();
        let failed = stats.failed.load(std::sync::atomic::Ordering::Relaxed);
        if failed > 0 {
            // Left open on purpose: the next start replays the journal and stores them.
            tracing::warn!(
                "store: {failed} records failed to commit; run {run} stays open so the next start recovers them from its journal"
            );
            let _ = w.stop();
        } else if let Some(mut store) = w.stop() {
            store.close_run(
                run,
                (power::realtime_ns() / 1_000_000) as i64,
                pipeline.next_request_id(),
            )?;
            tracing::info!(
                "store: run {run} closed, {} records stored ({} failed)",
                stats.committed.load(std::sync::atomic::Ordering::Relaxed),
                stats.failed.load(std::sync::atomic::Ordering::Relaxed)
            );
        } else {
            tracing::warn!(
                "store: the writer stopped abnormally; run {run} stays open (recovered at next start)"
            );
        }
    }
    // After the store's last commit: the metrics' last export has every record.
    if let Some(o) = otlp {
        o.finish(Duration::from_millis(config.otlp.timeout_ms.min(10_000)));
    }
    drop(ring);
    drop(probes);
    tracing::info!("probes detached");
    Ok(())
}
