//! `tracer run`: load the probes, select targets, drain the ring buffer, report, shut down cleanly.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracer_ebpf::abi::{Kind, Stat};

use crate::{
    config::Config,
    event::{self, Body, Event},
    probe::{KernelStats, ProbeError, ProbeSettings, Probes, TRACEPOINTS},
    target::{self, ProcFs, TargetError, TargetSpec},
};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No `--pid`, `--port`, `--cgroup` or `--comm` was given.
    #[error(
        "nothing to trace: give --pid, --port, --cgroup or --comm (or [targets] in the config)"
    )]
    NoTargets,
    /// Resolving targets failed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The probes could not be loaded or driven.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// An I/O error on an output or the event loop.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Counters kept in userspace, next to the kernel's.
#[derive(Debug, Default, Clone, Copy)]
pub struct UserStats {
    /// Records decoded, by kind (indexed by `Kind as usize`).
    pub decoded: [u64; 16],
    /// Records that failed to decode.
    pub decode_errors: u64,
    /// Socket bytes reported, inbound and outbound.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl UserStats {
    fn record(&mut self, ev: &Event<'_>) {
        self.decoded[ev.body.kind() as usize] += 1;
        if let Body::Data {
            inbound, total_len, ..
        } = ev.body
        {
            if inbound {
                self.bytes_in += total_len;
            } else {
                self.bytes_out += total_len;
            }
        }
    }

    fn since(&self, earlier: &UserStats) -> UserStats {
        let mut d = *self;
        for (i, v) in d.decoded.iter_mut().enumerate() {
            *v -= earlier.decoded[i];
        }
        d.decode_errors -= earlier.decode_errors;
        d.bytes_in -= earlier.bytes_in;
        d.bytes_out -= earlier.bytes_out;
        d
    }
}

/// The part of the daemon that consumes events; owned by the event loop, no locking.
struct Pipeline {
    stats: UserStats,
    sink: Option<BufWriter<File>>,
    exited: Vec<u32>,
}

impl Pipeline {
    fn handle(&mut self, bytes: &[u8]) {
        let ev = match event::decode(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                self.stats.decode_errors += 1;
                tracing::debug!("undecodable record: {e}");
                return;
            }
        };
        self.stats.record(&ev);
        if let Body::Exit { pid, .. } = ev.body {
            self.exited.push(pid);
        }
        if let Some(sink) = &mut self.sink {
            // A failing debug sink must not stop tracing; it is dropped with a warning below.
            if serde_json::to_writer(&mut *sink, &ev).is_err() || sink.write_all(b"\n").is_err() {
                tracing::warn!("events output failed; no longer writing it");
                self.sink = None;
            }
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut n = 0;
        while let Some(item) = ring.next() {
            self.handle(&item);
            n += 1;
        }
        n
    }

    fn flush(&mut self) {
        if let Some(sink) = &mut self.sink
            && sink.flush().is_err()
        {
            tracing::warn!("events output failed; no longer writing it");
            self.sink = None;
        }
    }
}

fn summary(k: &KernelStats, u: &UserStats, targets: usize, secs: f64) -> String {
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
        " | bytes in={} out={} | dropped ring={} decode={} stash={} conn_table={} | truncated={} wakeups={} | targets={targets} over {secs:.1}s",
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

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let spec = TargetSpec {
        pids: config.targets.pids.clone(),
        ports: config.targets.ports.clone(),
        cgroups: config.targets.cgroups.clone(),
        comms: config.targets.comms.clone(),
    };
    if spec.is_empty() {
        return Err(DaemonError::NoTargets);
    }
    let procfs = ProcFs::default();
    let self_pid = std::process::id();
    let resolved = target::resolve(&procfs, &spec, self_pid)?;

    let settings = ProbeSettings {
        ring_bytes: config.probe.ring_bytes,
        capture_bytes: config.probe.capture_bytes,
        device_root: config.probe.device_root.clone(),
        filter_cgroup: !resolved.cgroup_ids.is_empty(),
        filter_comm: !spec.comms.is_empty(),
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

    let sink = match &config.output.events_out {
        Some(path) => Some(BufWriter::new(File::create(path).map_err(|source| {
            DaemonError::Io {
                what: "creating the events output",
                source,
            }
        })?)),
        None => None,
    };
    let mut pipeline = Pipeline {
        stats: UserStats::default(),
        sink,
        exited: Vec::new(),
    };
    tracing::info!(
        "attached {} probes; tracing {} processes {:?}, {} cgroups, {} names; device root {}",
        TRACEPOINTS.len(),
        resolved.processes.len(),
        resolved.processes.keys().collect::<Vec<_>>(),
        resolved.cgroup_ids.len(),
        spec.comms.len(),
        config.probe.device_root.display()
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

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("waiting on the ring buffer"))?;
                pipeline.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = poll.tick() => {
                pipeline.drain(ring.get_mut());
                if let Some(log) = &mut ebpf_log {
                    log.flush();
                }
                for pid in std::mem::take(&mut pipeline.exited) {
                    if let Err(e) = probes.forget_process(pid) {
                        tracing::warn!("cleaning up after process {pid}: {e}");
                    }
                }
            }
            _ = report.tick(), if config.output.summary_interval_ms > 0 => {
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
                        now.duration_since(last_report).as_secs_f64()
                    )
                );
                last_kernel = kernel;
                last_user = pipeline.stats;
                last_report = now;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    // Final drain so nothing already in the ring is lost, then detach by dropping the probes.
    pipeline.drain(ring.get_mut());
    pipeline.flush();
    let kernel = probes.stats()?;
    tracing::info!(
        "shutting down: {}",
        summary(&kernel, &pipeline.stats, probes.targets()?.len(), 0.0)
    );
    drop(ring);
    drop(probes);
    tracing::info!("probes detached");
    Ok(())
}
