//! `tracer run`: load the probes, select targets, drain the ring buffer, report, shut down cleanly.

use std::{
    collections::BTreeMap,
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
    http::{self as wire_http, ConnKey, Direction, Lifecycle, Role, Tracker},
    ledger::{self, Arrival, DeviceId, DeviceInfo, IdleSource, Ledger, RequestId, ServiceId},
    power::{self, PowerSource as _, Reading},
    probe::{KernelStats, ProbeError, ProbeSettings, Probes, TRACEPOINTS},
    requests::RequestCollector,
    target::{self, ProcFs, TargetError, TargetSpec},
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
    tracker: Tracker,
    collector: RequestCollector,
    lifecycle: Vec<Lifecycle>,
    requests_sink: Option<BufWriter<File>>,
    /// Open connections by (process, generation), to map every fd of a connection to one
    /// tracker connection and to end them when the process exits.
    conns: BTreeMap<(u32, u64), OpenConn>,
    requests_done: u64,
    /// Attribution: fed with request lifecycles, power readings and GPU occupancy.
    ledger: Ledger,
    records_sink: Option<BufWriter<File>>,
    records_done: u64,
    /// Power devices by minor number (GPUs), for binding device opens to ledger devices.
    gpu_by_minor: BTreeMap<u32, DeviceId>,
    /// Target processes holding each device.
    holders: BTreeMap<DeviceId, std::collections::BTreeSet<u32>>,
    /// Wall-clock minus monotonic, for records at the API edge.
    wall_offset_ns: i128,
}

/// A traced connection: its tracker key (first fd) and every fd that refers to it.
#[derive(Debug)]
struct OpenConn {
    key: ConnKey,
    fds: Vec<i32>,
}

/// The one service of this daemon run: every target process serves the same endpoint(s).
const SERVICE: ServiceId = ServiceId(0);

/// A device node path's GPU minor: `.../nvidia<N>` (not nvidiactl, nvidia-uvm, modeset).
fn gpu_minor(path: &str) -> Option<u32> {
    let name = path.rsplit('/').next()?;
    name.strip_prefix("nvidia")?.parse().ok()
}

/// A finished request's energy account with its wall-clock end time (the API edge).
#[derive(serde::Serialize)]
struct RecordOut<'a> {
    #[serde(flatten)]
    record: &'a ledger::RequestRecord,
    end_unix_ms: i64,
}

/// Request lifecycle → ledger input.
fn feed_ledger(l: &mut Ledger, lc: &Lifecycle) {
    match lc {
        Lifecycle::Arrive {
            req,
            ts_ns,
            model,
            request_id,
            ..
        } => {
            let _ = l.arrive(
                RequestId(req.id),
                SERVICE,
                Arrival {
                    ts_ns: *ts_ns,
                    model: model.clone(),
                    external_id: request_id.clone(),
                    prompt_tokens: None,
                    cached_tokens: None,
                },
            );
        }
        // Streaming servers send their headers before the first token: the prefill/decode
        // boundary is the first event, which `events` records.
        Lifecycle::FirstByte { .. } | Lifecycle::RequestDone { .. } => {}
        Lifecycle::Event { req, ts_ns } => l.events(RequestId(req.id), *ts_ns, 1),
        Lifecycle::Usage {
            req,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        } => l.usage(
            RequestId(req.id),
            *prompt_tokens,
            *completion_tokens,
            *cached_tokens,
        ),
        Lifecycle::End {
            req,
            ts_ns,
            response_bytes,
            outcome,
            ..
        } => {
            let outcome = match outcome {
                wire_http::Outcome::Complete => ledger::Outcome::Complete,
                wire_http::Outcome::ClosedEarly => ledger::Outcome::ClosedEarly,
                wire_http::Outcome::Truncated => ledger::Outcome::Truncated,
                wire_http::Outcome::Aborted => ledger::Outcome::Aborted,
            };
            l.end(RequestId(req.id), *ts_ns, *response_bytes, outcome);
        }
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// Connections without traffic for this long are ended (their close was never seen).
const IDLE_CONNECTION_NS: u64 = 600_000_000_000;

/// `CLOCK_MONOTONIC` now, the probes' clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes `v` as a JSON line; a failing output is dropped with a warning, tracing goes on.
fn write_line<T: serde::Serialize>(sink: &mut Option<BufWriter<File>>, v: &T, what: &str) {
    if let Some(w) = sink
        && (serde_json::to_writer(&mut *w, v).is_err() || w.write_all(b"\n").is_err())
    {
        tracing::warn!("{what} output failed; no longer writing it");
        *sink = None;
    }
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
        write_line(&mut self.sink, &ev, "events");
        self.track(&ev);
    }

    /// Feeds connection events to the HTTP tracker and turns its output into request records.
    ///
    /// A connection can have several fds (`dup`, `fcntl(F_DUPFD)`): the tracker knows it by its
    /// first fd and generation, and it ends when its last fd closes.
    fn track(&mut self, ev: &Event<'_>) {
        let tgid = ev.tgid;
        match ev.body {
            Body::Conn {
                conn_id,
                fd,
                family,
                syscall,
                ..
            } if family != libc::AF_UNIX as u16 => {
                if syscall == "dup" {
                    if let Some(c) = self.conns.get_mut(&(tgid, conn_id)) {
                        c.fds.push(fd);
                    } else {
                        // Duplicated from a connection we never saw opened: follow it anyway.
                        self.open_conn(tgid, fd, conn_id, ev.ts_ns, Role::Unknown);
                    }
                    return;
                }
                let role = if syscall == "connect" {
                    Role::Client
                } else {
                    Role::Server
                };
                self.open_conn(tgid, fd, conn_id, ev.ts_ns, role);
            }
            Body::Data {
                conn_id,
                fd,
                inbound,
                total_len,
                eof,
                payload,
                ..
            } => {
                let first_fd = self.conns.get(&(tgid, conn_id)).map_or(fd, |c| c.key.fd);
                let key = ConnKey {
                    tgid,
                    fd: first_fd,
                    conn_id,
                };
                let dir = if inbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                };
                if eof {
                    self.tracker.on_eof(key, ev.ts_ns, dir);
                } else {
                    self.tracker.on_data(key, ev.ts_ns, dir, total_len, payload);
                }
            }
            Body::Close { conn_id, fd } => {
                let Some(c) = self.conns.get_mut(&(tgid, conn_id)) else {
                    self.tracker
                        .on_close(ConnKey { tgid, fd, conn_id }, ev.ts_ns);
                    return;
                };
                c.fds.retain(|&f| f != fd);
                if c.fds.is_empty() {
                    let key = c.key;
                    self.conns.remove(&(tgid, conn_id));
                    self.tracker.on_close(key, ev.ts_ns);
                }
            }
            Body::DevOpen { ref path, .. } => {
                self.gpu_opened(tgid, path, ev.ts_ns);
                return;
            }
            Body::Exit { pid, .. } => {
                self.exited.push(pid);
                for (dev, holders) in &mut self.holders {
                    if holders.remove(&pid) && holders.is_empty() {
                        let _ = self.ledger.release(*dev, SERVICE, ev.ts_ns);
                    }
                }
                let gone: Vec<(u32, u64)> = self
                    .conns
                    .range((pid, 0)..=(pid, u64::MAX))
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    if let Some(c) = self.conns.remove(&k) {
                        self.tracker.on_close(c.key, ev.ts_ns);
                    }
                }
            }
            _ => return,
        }
        self.flush_requests();
    }

    fn open_conn(&mut self, tgid: u32, fd: i32, conn_id: u64, ts_ns: u64, role: Role) {
        let key = ConnKey { tgid, fd, conn_id };
        self.tracker.on_open(key, ts_ns, role);
        self.conns
            .insert((tgid, conn_id), OpenConn { key, fds: vec![fd] });
    }

    fn flush_requests(&mut self) {
        self.tracker.drain_into(&mut self.lifecycle);
        for lc in self.lifecycle.drain(..) {
            feed_ledger(&mut self.ledger, &lc);
            if let Some(done) = self.collector.apply(&lc) {
                self.requests_done += 1;
                write_line(&mut self.requests_sink, &done, "requests");
            }
        }
    }

    /// A target opened a device node: a GPU node binds that GPU to the service.
    fn gpu_opened(&mut self, tgid: u32, path: &str, ts_ns: u64) {
        if let Some(dev) = gpu_minor(path).and_then(|m| self.gpu_by_minor.get(&m).copied()) {
            let holders = self.holders.entry(dev).or_default();
            if holders.is_empty() {
                let _ = self.ledger.occupy(dev, SERVICE, ts_ns, None);
                tracing::info!("gpu minor {path} bound to the traced service (process {tgid})");
            }
            holders.insert(tgid);
        }
    }

    /// Power readings from the sampler thread.
    fn power(&mut self, batch: Vec<Reading>) {
        for r in batch {
            let _ = match r {
                Reading::Counter {
                    device,
                    ts_ns,
                    energy_uj,
                    wrap_uj,
                } => self
                    .ledger
                    .counter(DeviceId(device as u32), ts_ns, energy_uj, wrap_uj),
                Reading::Power {
                    device,
                    ts_ns,
                    watts,
                    window_ns,
                } => self
                    .ledger
                    .power(DeviceId(device as u32), ts_ns, watts, window_ns),
                Reading::Lost { .. } | Reading::Processes { .. } | Reading::ProcessUtil { .. } => Ok(()),
            };
        }
    }

    /// Attributes what the grace period allows and writes the final records.
    fn advance(&mut self, now_ns: u64) {
        for rec in self.ledger.advance(now_ns) {
            self.records_done += 1;
            let end_unix_ms = ((i128::from(rec.end_ns) + self.wall_offset_ns) / 1_000_000) as i64;
            write_line(
                &mut self.records_sink,
                &RecordOut {
                    record: &rec,
                    end_unix_ms,
                },
                "records",
            );
        }
    }

    fn energy_summary(&self) -> String {
        let totals = self.ledger.totals();
        let sum = |f: fn(&ledger::DeviceTotals) -> f64| totals.values().map(f).sum::<f64>();
        format!(
            "energy records={} measured={:.1}J requests={:.1}J idle={:.1}J unattributed={:.1}J",
            self.records_done,
            sum(|t| t.measured_j),
            sum(|t| t.request_dynamic_j + t.request_idle_j),
            sum(|t| t.idle_j),
            sum(|t| t.unattributed_j),
        )
    }

    fn http_summary(&self) -> String {
        let t = self.tracker.stats();
        format!(
            "requests done={} in_flight={} conns={} resyncs={} truncated={} unmatched={} errors={}",
            self.requests_done,
            self.collector.in_flight(),
            t.connections_open,
            t.resyncs,
            t.truncated,
            t.unmatched_responses,
            t.parse_errors + t.heads_too_large,
        )
    }

    /// A connection the target had before the daemon attached.
    fn seed(&mut self, conn: ConnKey, ts_ns: u64, role: Role) {
        self.open_conn(conn.tgid, conn.fd, conn.conn_id, ts_ns, role);
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
        for (sink, what) in [
            (&mut self.sink, "events"),
            (&mut self.requests_sink, "requests"),
        ] {
            if let Some(w) = sink
                && w.flush().is_err()
            {
                tracing::warn!("{what} output failed; no longer writing it");
                *sink = None;
            }
        }
    }
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

    let create = |path: &Option<std::path::PathBuf>, what| -> Result<_, DaemonError> {
        path.as_ref()
            .map(|p| {
                File::create(p)
                    .map(BufWriter::new)
                    .map_err(|source| DaemonError::Io { what, source })
            })
            .transpose()
    };
    let mut pipeline = Pipeline {
        stats: UserStats::default(),
        sink: create(&config.output.events_out, "creating the events output")?,
        exited: Vec::new(),
        tracker: Tracker::new(config.http.clone()),
        collector: RequestCollector::default(),
        lifecycle: Vec::new(),
        requests_sink: create(&config.output.requests_out, "creating the requests output")?,
        conns: BTreeMap::new(),
        requests_done: 0,
        ledger: Ledger::new(config.ledger.clone()).map_err(DaemonError::Ledger)?,
        records_sink: create(&config.output.records_out, "creating the records output")?,
        records_done: 0,
        gpu_by_minor: BTreeMap::new(),
        holders: BTreeMap::new(),
        wall_offset_ns: i128::from(power::realtime_ns()) - i128::from(power::monotonic_ns()),
    };
    // Power: NVML GPUs on a sampler thread. Without NVML the daemon still traces requests.
    let (power_tx, power_rx) = std::sync::mpsc::channel();
    let mut _sampler = None;
    if config.power.nvml {
        match power::nvml::NvmlSource::open(config.power.nvml_lib.as_ref()) {
            Ok(source) => {
                for (i, d) in source.devices().iter().enumerate() {
                    let id = DeviceId(i as u32);
                    pipeline.ledger.register_device(
                        id,
                        DeviceInfo {
                            name: d.name.clone(),
                            kind: d.kind,
                            estimated: d.estimated,
                            idle: config
                                .power
                                .gpu_idle_watts
                                .map_or_else(IdleSource::default, |watts| IdleSource::Configured {
                                    watts,
                                }),
                        },
                    );
                    // NVML's energy counter updates every 100 ms on A100/H100: knowing it
                    // pins each update's time far better than the read gaps alone.
                    let _ = pipeline.ledger.set_counter_period(id, Some(100_000_000));
                    if let Some(m) = d.minor {
                        pipeline.gpu_by_minor.insert(m, id);
                    }
                    tracing::info!(
                        "power: {} uuid={} minor={:?} pci={}",
                        d.name,
                        d.uuid.as_deref().unwrap_or("?"),
                        d.minor,
                        d.pci_bus_id.as_deref().unwrap_or("?")
                    );
                }
                let period = Duration::from_millis(config.power.interval_ms);
                _sampler = Some(
                    power::spawn_sampler(Box::new(source), period, power_tx)
                        .map_err(io_err("starting the power sampler"))?,
                );
            }
            Err(e) => tracing::warn!("{e}; GPU energy will not be attributed"),
        }
    }
    // GPUs the targets already hold (opened before the daemon attached).
    let seed_ts = monotonic_ns();
    for &pid in resolved.processes.keys() {
        for (_, path) in procfs.fds_under(pid, &config.probe.device_root) {
            pipeline.gpu_opened(pid, &path.to_string_lossy(), seed_ts);
        }
    }
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
            let role = if c.server { Role::Server } else { Role::Client };
            pipeline.seed(
                ConnKey {
                    tgid: pid,
                    fd: c.fd as i32,
                    conn_id,
                },
                now,
                role,
            );
        }
    }
    tracing::info!(
        "attached {} probes; tracing {} processes {:?}, {} cgroups, {} names, {seeded} open connections; device root {}",
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
                while let Ok(batch) = power_rx.try_recv() {
                    pipeline.power(batch);
                }
                pipeline.advance(monotonic_ns());
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
                // Connections silent for 10 minutes lost their close somewhere: end them.
                pipeline.tracker.evict_idle(monotonic_ns(), IDLE_CONNECTION_NS);
                pipeline.flush_requests();
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
                        &format!("{} | {}", pipeline.http_summary(), pipeline.energy_summary()),
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
