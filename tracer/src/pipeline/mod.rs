//! The attribution pipeline: everything between the ring buffer and samplers and the outputs.
//!
//! The pipeline has no clock and does no I/O of its own besides writing its outputs: every
//! fact it acts on arrives as an [`Input`] — a raw probe record, a batch of power readings, a
//! service discovered in /proc, a tick of the daemon's clock. That makes it deterministic, so
//! recording the inputs ([`crate::record`]) is enough to recompute every figure later
//! (`tracer replay`), with the same or another split policy.
//!
//! GPU binding: a process holds a GPU while it has a live compute context on it (RM compute
//! objects, decoded in the kernel), a UVM registration of its UUID, an entry in NVML's running
//! processes, or — for processes found at attach — an open device node or mapping. A service
//! holds a GPU while any of its processes does; its share of a GPU it shares with other
//! services is its processes' SM utilisation (NVML samples) when every sharer has one, else
//! equal.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufWriter, Write as _},
};

use serde::{Deserialize, Serialize};

use crate::{
    ledger::{
        self, Arrival, DeviceId, DeviceInfo, DeviceKind, IdleSource, Ledger, LedgerConfig,
        RequestId, RequestRecord, ServiceId,
    },
    power::Reading,
    probe::decode::{self as event, Body, DeviceNode, Event, GpuChange},
    record::format::Recorder,
    wire::summary::RequestCollector,
    wire::{self as wire_http, ConnKey, Direction, Lifecycle, Role, Tracker, TrackerConfig},
};

/// Everything the pipeline acts on. Recorded in this form by `tracer record`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A ring-buffer record exactly as the probes wrote it.
    Probe { bytes: Vec<u8> },
    /// Readings from a power sampler.
    Power { readings: Vec<Reading> },
    /// A power-measured device (index = position among `Device` inputs' ids).
    Device { id: u32, setup: DeviceSetup },
    /// A service: the processes that serve one endpoint. It shares the host's CPU and DRAM
    /// power domains with the other services from `ts_ns`.
    Service { id: u32, name: String, ts_ns: u64 },
    /// A process belongs to a service, and why (target, descendant, cgroup, IPC peer...).
    Member {
        pid: u32,
        service: u32,
        reason: String,
    },
    /// A process found holding a GPU at attach (open device node, mapping).
    SeedGpu {
        pid: u32,
        minor: u32,
        ts_ns: u64,
        evidence: String,
    },
    /// A connection a target had before the daemon attached.
    SeedConn {
        tgid: u32,
        fd: i32,
        conn_id: u64,
        ts_ns: u64,
        server: bool,
    },
    /// The daemon's clock: attribute what the grace period allows up to `now_ns`.
    Advance { now_ns: u64 },
    /// End connections silent for `idle_ns` (their close was never seen).
    EvictIdle { now_ns: u64, idle_ns: u64 },
    /// Shutdown: finalise every request.
    Finish,
}

/// A power device as the pipeline registers it with the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSetup {
    pub name: String,
    pub kind: DeviceKind,
    pub estimated: bool,
    /// Configured idle power; `None`: learned.
    pub idle_watts: Option<f64>,
    /// How often the energy counter updates (measured or known).
    pub counter_period_ns: Option<u64>,
    pub minor: Option<u32>,
    pub uuid: Option<String>,
}

/// The settings a recording carries, so a replay starts from the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PipelineConfig {
    pub http: TrackerConfig,
    pub ledger: LedgerConfig,
    /// Wall-clock minus monotonic at the start, for wall-clock stamps at the API edge.
    pub wall_offset_ns: i64,
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
    /// GPU events about a device no power source knows (no NVML, or an unknown UUID).
    pub gpu_unknown_device: u64,
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

    /// Counter-wise `self - earlier`.
    #[must_use]
    pub fn since(&self, earlier: &UserStats) -> UserStats {
        let mut d = *self;
        for (i, v) in d.decoded.iter_mut().enumerate() {
            *v -= earlier.decoded[i];
        }
        d.decode_errors -= earlier.decode_errors;
        d.bytes_in -= earlier.bytes_in;
        d.bytes_out -= earlier.bytes_out;
        d.gpu_unknown_device -= earlier.gpu_unknown_device;
        d
    }
}

/// A traced connection: its tracker key (first fd) and every fd that refers to it.
#[derive(Debug)]
struct OpenConn {
    key: ConnKey,
    fds: Vec<i32>,
}

/// Why a process holds a GPU.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// Live compute contexts on the GPU (RM, decoded in the kernel).
    pub context: bool,
    /// Registered the GPU's UUID with UVM.
    pub uvm: bool,
    /// Listed by NVML as a running compute process.
    pub nvml: bool,
    /// Found at attach: open device node or mapping (`fd`, `maps`).
    pub seeded: Option<String>,
}

impl Evidence {
    fn holds(&self) -> bool {
        self.context || self.uvm || self.nvml || self.seeded.is_some()
    }
}

/// A service as the pipeline tracks it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceState {
    pub name: String,
    /// Member processes and why each belongs.
    pub members: BTreeMap<u32, String>,
}

/// CPU packages and DRAM are shared by every service; `Other` domains (RAPL psys, which
/// contains the packages and DRAM) are measured and reported but never split, so nothing is
/// counted twice.
fn is_host_domain(kind: DeviceKind) -> bool {
    matches!(kind, DeviceKind::CpuPackage | DeviceKind::Dram)
}

/// The service processes of unknown membership fall into (a single-service daemon run).
const DEFAULT_SERVICE: u32 = 0;
/// NVML utilisation samples older than this no longer weigh a service's share of a GPU.
const UTIL_FRESH_NS: u64 = 5_000_000_000;

/// A finished request's energy account with its wall-clock end time and service name (the
/// API edge).
#[derive(Debug, Serialize)]
pub struct RecordOut<'a> {
    #[serde(flatten)]
    pub record: &'a RequestRecord,
    pub service_name: &'a str,
    pub end_unix_ms: i64,
}

/// A JSON-lines output (a file, or standard output for replays).
pub type Sink = BufWriter<Box<dyn std::io::Write + Send>>;

/// A sink writing to the file at `path` (created or truncated).
pub fn file_sink(path: &std::path::Path) -> std::io::Result<Sink> {
    Ok(BufWriter::new(Box::new(File::create(path)?)))
}

/// Writes `v` as a JSON line; a failing output is dropped with a warning, tracing goes on.
pub fn write_line<T: Serialize>(sink: &mut Option<Sink>, v: &T, what: &str) {
    if let Some(w) = sink
        && (serde_json::to_writer(&mut *w, v).is_err() || w.write_all(b"\n").is_err())
    {
        tracing::warn!("{what} output failed; no longer writing it");
        *sink = None;
    }
}

/// Where the pipeline's results go.
#[derive(Default)]
pub struct Outputs {
    /// Every decoded probe event, as JSON lines.
    pub events: Option<Sink>,
    /// Every finished HTTP request, as JSON lines.
    pub requests: Option<Sink>,
    /// Every final energy record, as JSON lines.
    pub records: Option<Sink>,
    /// Every input, for replay.
    pub recorder: Option<Recorder>,
}

/// The pipeline. Owned by one thread (the daemon's event loop, or a replay); no locking.
pub struct Pipeline {
    pub stats: UserStats,
    out: Outputs,
    /// Processes that exited since the caller last looked (their kernel entries go).
    pub exited: Vec<u32>,
    pub tracker: Tracker,
    collector: RequestCollector,
    lifecycle: Vec<Lifecycle>,
    conns: BTreeMap<(u32, u64), OpenConn>,
    pub requests_done: u64,
    ledger: Ledger,
    pub records_done: u64,
    /// Final records kept in memory as well (replay prints them).
    pub keep_records: Option<Vec<RequestRecord>>,
    wall_offset_ns: i128,
    // --- devices
    devices: BTreeMap<DeviceId, DeviceSetup>,
    gpu_by_minor: BTreeMap<u32, DeviceId>,
    gpu_by_uuid: BTreeMap<String, DeviceId>,
    // --- services and binding
    services: BTreeMap<u32, ServiceState>,
    proc_service: BTreeMap<u32, u32>,
    evidence: BTreeMap<(u32, DeviceId), Evidence>,
    holders: BTreeMap<(DeviceId, u32), BTreeSet<u32>>,
    /// Latest NVML SM utilisation per (device, process): (stamp, percent).
    sm_util: BTreeMap<(DeviceId, u32), (u64, u32)>,
    /// Weight last given to the ledger per (device, service).
    weights: BTreeMap<(DeviceId, u32), Option<f64>>,
    /// Device nodes each process was seen using (first ioctl), for `services` output.
    nodes_used: BTreeMap<u32, BTreeSet<u32>>,
    /// Since when each service shares the host's CPU/DRAM domains.
    host_devices_since: BTreeMap<u32, u64>,
    /// Newest NVML utilisation sample per GPU.
    util_seen: BTreeMap<DeviceId, u64>,
}

impl Pipeline {
    /// A pipeline writing to `out`.
    pub fn new(config: &PipelineConfig, out: Outputs) -> Result<Self, ledger::LedgerError> {
        Ok(Self {
            stats: UserStats::default(),
            out,
            exited: Vec::new(),
            tracker: Tracker::new(config.http.clone()),
            collector: RequestCollector::default(),
            lifecycle: Vec::new(),
            conns: BTreeMap::new(),
            requests_done: 0,
            ledger: Ledger::new(config.ledger.clone())?,
            records_done: 0,
            keep_records: None,
            wall_offset_ns: i128::from(config.wall_offset_ns),
            devices: BTreeMap::new(),
            gpu_by_minor: BTreeMap::new(),
            gpu_by_uuid: BTreeMap::new(),
            services: BTreeMap::new(),
            proc_service: BTreeMap::new(),
            evidence: BTreeMap::new(),
            holders: BTreeMap::new(),
            sm_util: BTreeMap::new(),
            weights: BTreeMap::new(),
            nodes_used: BTreeMap::new(),
            host_devices_since: BTreeMap::new(),
            util_seen: BTreeMap::new(),
        })
    }

    /// Records `input` (when recording), then acts on it.
    pub fn apply(&mut self, input: Input) {
        if let Some(r) = &mut self.out.recorder
            && let Err(e) = r.write(&input)
        {
            tracing::warn!("recording failed ({e}); no longer recording");
            self.out.recorder = None;
        }
        self.act(input);
    }

    /// A raw probe record (the hot path: no copy unless recording).
    pub fn probe(&mut self, bytes: &[u8]) {
        if let Some(r) = &mut self.out.recorder
            && let Err(e) = r.write_probe(bytes)
        {
            tracing::warn!("recording failed ({e}); no longer recording");
            self.out.recorder = None;
        }
        self.handle(bytes);
    }

    fn act(&mut self, input: Input) {
        match input {
            Input::Probe { bytes } => self.handle(&bytes),
            Input::Power { readings } => self.power(readings),
            Input::Device { id, setup } => self.add_device(DeviceId(id), setup),
            Input::Service { id, name, ts_ns } => {
                let fresh = !self.services.contains_key(&id);
                self.services.entry(id).or_default().name = name;
                if fresh {
                    self.host_devices_since.insert(id, ts_ns);
                    let host: Vec<DeviceId> = self
                        .devices
                        .iter()
                        .filter(|(_, d)| is_host_domain(d.kind))
                        .map(|(id, _)| *id)
                        .collect();
                    for dev in host {
                        let _ = self.ledger.occupy(dev, ServiceId(id), ts_ns, None);
                    }
                }
            }
            Input::Member {
                pid,
                service,
                reason,
            } => {
                self.services
                    .entry(service)
                    .or_default()
                    .members
                    .insert(pid, reason);
                self.proc_service.insert(pid, service);
            }
            Input::SeedGpu {
                pid,
                minor,
                ts_ns,
                evidence,
            } => {
                if let Some(dev) = self.gpu_by_minor.get(&minor).copied() {
                    self.evidence.entry((pid, dev)).or_default().seeded = Some(evidence);
                    self.rebind(pid, dev, ts_ns);
                } else {
                    self.stats.gpu_unknown_device += 1;
                }
            }
            Input::SeedConn {
                tgid,
                fd,
                conn_id,
                ts_ns,
                server,
            } => {
                let role = if server { Role::Server } else { Role::Client };
                self.open_conn(tgid, fd, conn_id, ts_ns, role);
            }
            Input::Advance { now_ns } => self.advance(now_ns),
            Input::EvictIdle { now_ns, idle_ns } => {
                self.tracker.evict_idle(now_ns, idle_ns);
                self.flush_requests();
            }
            Input::Finish => {
                self.flush_requests();
                let recs = self.ledger.finish();
                self.emit_records(recs);
                self.flush();
            }
        }
    }

    fn add_device(&mut self, id: DeviceId, setup: DeviceSetup) {
        self.ledger.register_device(
            id,
            DeviceInfo {
                name: setup.name.clone(),
                kind: setup.kind,
                estimated: setup.estimated,
                idle: setup.idle_watts.map_or_else(IdleSource::default, |watts| {
                    IdleSource::Configured { watts }
                }),
            },
        );
        let _ = self.ledger.set_counter_period(id, setup.counter_period_ns);
        if setup.kind == DeviceKind::Gpu {
            if let Some(m) = setup.minor {
                self.gpu_by_minor.insert(m, id);
            }
            if let Some(u) = &setup.uuid {
                self.gpu_by_uuid.insert(u.to_ascii_lowercase(), id);
            }
        } else if is_host_domain(setup.kind) {
            // Host power domains (CPU packages, DRAM) serve every service: shared equally.
            for (&svc, &since) in &self.host_devices_since {
                let _ = self.ledger.occupy(id, ServiceId(svc), since, None);
            }
        }
        self.devices.insert(id, setup);
    }

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
        write_line(&mut self.out.events, &ev, "events");
        self.track(&ev);
    }

    fn service_of(&self, pid: u32) -> u32 {
        self.proc_service
            .get(&pid)
            .copied()
            .unwrap_or(DEFAULT_SERVICE)
    }

    /// Feeds connection events to the HTTP tracker, process and GPU events to the binding.
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
            Body::Exit {
                pid, thread: true, ..
            } => {
                // A followed thread ended: forget what its creation added.
                if let Some(s) = self.proc_service.remove(&pid)
                    && let Some(svc) = self.services.get_mut(&s)
                {
                    svc.members.remove(&pid);
                }
                return;
            }
            Body::Fork { child, parent, .. } => {
                // Threads fire this too: their entries go when they exit (a thread exit event).
                if let Some(&s) = self.proc_service.get(&parent) {
                    self.proc_service.insert(child, s);
                    if let Some(svc) = self.services.get_mut(&s) {
                        svc.members.insert(child, format!("descendant of {parent}"));
                    }
                }
                return;
            }
            Body::Gpu { ref change, .. } => {
                self.gpu_change(tgid, change, ev.ts_ns);
                return;
            }
            Body::Exit { pid, .. } => {
                self.exited.push(pid);
                let devs: Vec<DeviceId> = self
                    .evidence
                    .range((pid, DeviceId(0))..=(pid, DeviceId(u32::MAX)))
                    .map(|(k, _)| k.1)
                    .collect();
                for dev in devs {
                    self.evidence.remove(&(pid, dev));
                    self.rebind(pid, dev, ev.ts_ns);
                }
                self.nodes_used.remove(&pid);
                if let Some(s) = self.proc_service.remove(&pid)
                    && let Some(svc) = self.services.get_mut(&s)
                {
                    svc.members.remove(&pid);
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

    /// The GPU with RM device instance `instance`. The driver numbers device instances in
    /// probe order, as it does minor numbers: the n-th instance is the GPU with the n-th
    /// smallest minor (a UVM registration, keyed by UUID, confirms it independently).
    fn gpu_by_instance(&self, instance: u32) -> Option<DeviceId> {
        self.gpu_by_minor.values().nth(instance as usize).copied()
    }

    fn gpu_change(&mut self, pid: u32, change: &GpuChange, ts_ns: u64) {
        let (dev, set): (Option<DeviceId>, fn(&mut Evidence)) = match change {
            GpuChange::FirstUse { node } => {
                if let DeviceNode::Gpu(m) = node {
                    self.nodes_used.entry(pid).or_default().insert(*m);
                }
                return;
            }
            GpuChange::ContextUp { instance, .. } => {
                (self.gpu_by_instance(*instance), |e| e.context = true)
            }
            GpuChange::ContextDown { instance } => {
                (self.gpu_by_instance(*instance), |e| e.context = false)
            }
            GpuChange::UvmRegister { uuid } => (
                self.gpu_by_uuid.get(&uuid.to_ascii_lowercase()).copied(),
                |e| e.uvm = true,
            ),
            GpuChange::UvmUnregister { uuid } => (
                self.gpu_by_uuid.get(&uuid.to_ascii_lowercase()).copied(),
                |e| e.uvm = false,
            ),
            GpuChange::ClientFreed { .. } => {
                // Every context of the client is gone; a process rarely has two RM clients,
                // and a second one's contexts come back with its next allocation.
                let devs: Vec<DeviceId> = self
                    .evidence
                    .range((pid, DeviceId(0))..=(pid, DeviceId(u32::MAX)))
                    .map(|(k, _)| k.1)
                    .collect();
                for dev in devs {
                    if let Some(e) = self.evidence.get_mut(&(pid, dev)) {
                        e.context = false;
                    }
                    self.rebind(pid, dev, ts_ns);
                }
                return;
            }
            GpuChange::Unknown { .. } => return,
        };
        let Some(dev) = dev else {
            self.stats.gpu_unknown_device += 1;
            return;
        };
        set(self.evidence.entry((pid, dev)).or_default());
        self.rebind(pid, dev, ts_ns);
    }

    /// Re-derives whether `pid` holds `dev`, and its service's occupancy of `dev`.
    fn rebind(&mut self, pid: u32, dev: DeviceId, ts_ns: u64) {
        let holds = self.evidence.get(&(pid, dev)).is_some_and(Evidence::holds);
        if !holds {
            self.evidence.remove(&(pid, dev));
        }
        let service = self.service_of(pid);
        let holders = self.holders.entry((dev, service)).or_default();
        let was_held = !holders.is_empty();
        if holds {
            holders.insert(pid);
        } else {
            holders.remove(&pid);
        }
        let is_held = !holders.is_empty();
        if is_held && !was_held {
            let weight = self.service_weight(dev, service, ts_ns);
            self.weights.insert((dev, service), weight);
            let _ = self.ledger.occupy(dev, ServiceId(service), ts_ns, weight);
            tracing::info!(
                "{} bound to service {service} (process {pid})",
                self.device_name(dev)
            );
        } else if was_held && !is_held {
            self.weights.remove(&(dev, service));
            let _ = self.ledger.release(dev, ServiceId(service), ts_ns);
            tracing::info!(
                "{} released by service {service} (process {pid})",
                self.device_name(dev)
            );
        }
    }

    fn device_name(&self, dev: DeviceId) -> String {
        self.devices
            .get(&dev)
            .map_or_else(|| format!("device {}", dev.0), |d| d.name.clone())
    }

    /// A service's SM utilisation on `dev`: the sum over its holding processes of their
    /// fresh NVML samples. NVML only has samples for processes that ran, so while the GPU
    /// delivers samples a holder without one used 0 %; with no fresh sample at all on the GPU
    /// the weight is `None` and the ledger splits equally.
    fn service_weight(&self, dev: DeviceId, service: u32, now_ns: u64) -> Option<f64> {
        let holders = self.holders.get(&(dev, service))?;
        let fresh = |ts: u64| now_ns.saturating_sub(ts) <= UTIL_FRESH_NS;
        let mut total = self
            .util_seen
            .get(&dev)
            .is_some_and(|&ts| fresh(ts))
            .then_some(0.0);
        for pid in holders {
            if let Some(&(ts, pct)) = self.sm_util.get(&(dev, *pid))
                && fresh(ts)
            {
                *total.get_or_insert(0.0) += f64::from(pct);
            }
        }
        total
    }

    fn open_conn(&mut self, tgid: u32, fd: i32, conn_id: u64, ts_ns: u64, role: Role) {
        let key = ConnKey { tgid, fd, conn_id };
        self.tracker.on_open(key, ts_ns, role);
        self.conns
            .insert((tgid, conn_id), OpenConn { key, fds: vec![fd] });
    }

    /// Moves the tracker's request lifecycles into the collector and the ledger.
    pub fn flush_requests(&mut self) {
        self.tracker.drain_into(&mut self.lifecycle);
        let lifecycle = std::mem::take(&mut self.lifecycle);
        for lc in &lifecycle {
            self.feed_ledger(lc);
            if let Some(done) = self.collector.apply(lc) {
                self.requests_done += 1;
                write_line(&mut self.out.requests, &done, "requests");
            }
        }
        self.lifecycle = lifecycle;
        self.lifecycle.clear();
    }

    /// Request lifecycle → ledger input.
    fn feed_ledger(&mut self, lc: &Lifecycle) {
        let service = match lc {
            Lifecycle::Arrive { req, .. } => self.service_of(req.conn.tgid),
            _ => DEFAULT_SERVICE,
        };
        let l = &mut self.ledger;
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
                    ServiceId(service),
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

    /// Power readings from a sampler.
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
                Reading::Processes {
                    device,
                    ts_ns,
                    pids,
                } => {
                    self.nvml_processes(DeviceId(device as u32), ts_ns, &pids);
                    Ok(())
                }
                Reading::ProcessUtil {
                    device,
                    ts_ns,
                    pid,
                    sm_percent,
                    ..
                } => {
                    let dev = DeviceId(device as u32);
                    self.sm_util.insert((dev, pid), (ts_ns, sm_percent));
                    self.util_seen.insert(dev, ts_ns);
                    let sharing: Vec<u32> = self
                        .weights
                        .keys()
                        .filter(|(d, _)| *d == dev)
                        .map(|(_, s)| *s)
                        .collect();
                    for service in sharing {
                        self.reweigh(dev, service, ts_ns);
                    }
                    Ok(())
                }
                Reading::Lost { .. } => Ok(()),
            };
        }
    }

    /// NVML's running compute processes on `dev`: evidence for the traced ones.
    fn nvml_processes(&mut self, dev: DeviceId, ts_ns: u64, pids: &[u32]) {
        let listed: BTreeSet<u32> = pids
            .iter()
            .copied()
            .filter(|p| self.proc_service.contains_key(p))
            .collect();
        let before: Vec<u32> = self
            .evidence
            .iter()
            .filter(|((_, d), e)| *d == dev && e.nvml)
            .map(|((p, _), _)| *p)
            .collect();
        for pid in before {
            if !listed.contains(&pid) {
                if let Some(e) = self.evidence.get_mut(&(pid, dev)) {
                    e.nvml = false;
                }
                self.rebind(pid, dev, ts_ns);
            }
        }
        for pid in listed {
            self.evidence.entry((pid, dev)).or_default().nvml = true;
            self.rebind(pid, dev, ts_ns);
        }
    }

    /// Gives the ledger a service's new SM share of `dev` when it changed noticeably.
    fn reweigh(&mut self, dev: DeviceId, service: u32, ts_ns: u64) {
        let Some(old) = self.weights.get(&(dev, service)).copied() else {
            return; // the service does not hold the device
        };
        let new = self.service_weight(dev, service, ts_ns);
        let changed = match (old, new) {
            (Some(a), Some(b)) => (a - b).abs() > 2.0,
            (None, None) => false,
            _ => true,
        };
        if changed {
            self.weights.insert((dev, service), new);
            let _ = self.ledger.occupy(dev, ServiceId(service), ts_ns, new);
        }
    }

    /// Attributes what the grace period allows and writes the final records.
    fn advance(&mut self, now_ns: u64) {
        let recs = self.ledger.advance(now_ns);
        self.emit_records(recs);
    }

    fn emit_records(&mut self, recs: Vec<RequestRecord>) {
        for rec in recs {
            self.records_done += 1;
            let end_unix_ms = ((i128::from(rec.end_ns) + self.wall_offset_ns) / 1_000_000) as i64;
            let name = self
                .services
                .get(&rec.service.0)
                .map_or("", |s| s.name.as_str());
            write_line(
                &mut self.out.records,
                &RecordOut {
                    record: &rec,
                    service_name: name,
                    end_unix_ms,
                },
                "records",
            );
            if let Some(keep) = &mut self.keep_records {
                keep.push(rec);
            }
        }
    }

    /// One line of energy totals for the periodic summary.
    pub fn energy_summary(&self) -> String {
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

    /// One line of HTTP counters for the periodic summary.
    pub fn http_summary(&self) -> String {
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

    /// Per-device totals (conservation: measured = requests + idle + unattributed).
    pub fn totals(&self) -> BTreeMap<DeviceId, ledger::DeviceTotals> {
        self.ledger.totals()
    }

    /// The services as the pipeline knows them, with the GPUs each holds now.
    pub fn services(&self) -> Vec<ServiceView> {
        self.services
            .iter()
            .map(|(&id, s)| ServiceView {
                id,
                name: s.name.clone(),
                members: s.members.clone(),
                gpus: self
                    .holders
                    .iter()
                    .filter(|((_, svc), h)| *svc == id && !h.is_empty())
                    .map(|((dev, _), h)| ServiceGpu {
                        device: self.device_name(*dev),
                        uuid: self.devices.get(dev).and_then(|d| d.uuid.clone()),
                        holders: h
                            .iter()
                            .map(|p| {
                                (
                                    *p,
                                    self.evidence.get(&(*p, *dev)).cloned().unwrap_or_default(),
                                )
                            })
                            .collect(),
                        weight: self.weights.get(&(*dev, id)).copied().flatten(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Flushes the outputs (a failing one is dropped with a warning).
    pub fn flush(&mut self) {
        for (sink, what) in [
            (&mut self.out.events, "events"),
            (&mut self.out.requests, "requests"),
            (&mut self.out.records, "records"),
        ] {
            if let Some(w) = sink
                && w.flush().is_err()
            {
                tracing::warn!("{what} output failed; no longer writing it");
                *sink = None;
            }
        }
        if let Some(r) = &mut self.out.recorder
            && let Err(e) = r.flush()
        {
            tracing::warn!("recording failed ({e}); no longer recording");
            self.out.recorder = None;
        }
    }
}

/// A service with its processes and GPUs (the `services` view).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub name: String,
    pub members: BTreeMap<u32, String>,
    pub gpus: Vec<ServiceGpu>,
}

/// A GPU a service holds, who holds it and why.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceGpu {
    pub device: String,
    pub uuid: Option<String>,
    pub holders: BTreeMap<u32, Evidence>,
    /// SM utilisation share used to split the GPU with other services.
    pub weight: Option<f64>,
}

#[cfg(test)]
mod tests {
    use tracer_ebpf::abi::{self, GpuEvent, Header, Kind, ProcEvent};

    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain #[repr(C)] records, read as bytes the way the ring buffer hands them.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: Kind, tgid: u32, ts_ns: u64) -> Header {
        Header {
            ts_ns,
            tgid,
            tid: tgid,
            kind: kind as u16,
            flags: 0,
            pad: 0,
        }
    }

    fn gpu(tgid: u32, ts_ns: u64, what: u32, dev: u32, uuid: [u8; 16]) -> Input {
        Input::Probe {
            bytes: bytes_of(&GpuEvent {
                hdr: header(Kind::Gpu, tgid, ts_ns),
                ioctls: 1,
                what,
                dev,
                contexts: 1,
                class: 0xCBC0,
                uuid,
            }),
        }
    }

    fn proc_event(kind: Kind, tgid: u32, ts_ns: u64, pid: u32, ppid: u32) -> Input {
        Input::Probe {
            bytes: bytes_of(&ProcEvent {
                hdr: header(kind, tgid, ts_ns),
                pid,
                ppid,
                comm: [0; 16],
            }),
        }
    }

    const UUID1: [u8; 16] = [
        0xe3, 0xa0, 0, 1, 0x7a, 0xce, 0x4e, 1, 0x80, 1, 0, 0, 0xe1, 0x1a, 0, 1,
    ];

    fn pipeline() -> Pipeline {
        let mut p = Pipeline::new(&PipelineConfig::default(), Outputs::default()).expect("new");
        for (i, uuid) in [
            "GPU-e3a00000-7ace-4e00-8000-0000e11a0000",
            "GPU-e3a00001-7ace-4e01-8001-0000e11a0001",
        ]
        .iter()
        .enumerate()
        {
            p.apply(Input::Device {
                id: i as u32,
                setup: DeviceSetup {
                    name: format!("gpu{i}"),
                    kind: DeviceKind::Gpu,
                    estimated: false,
                    idle_watts: Some(70.0),
                    counter_period_ns: Some(100_000_000),
                    minor: Some(i as u32),
                    uuid: Some((*uuid).into()),
                },
            });
        }
        for (id, name, pid) in [(0, "api", 10), (1, "other", 20)] {
            p.apply(Input::Service {
                id,
                name: name.into(),
                ts_ns: 0,
            });
            p.apply(Input::Member {
                pid,
                service: id,
                reason: "target".into(),
            });
        }
        p
    }

    fn gpus_of(p: &Pipeline, service: u32) -> Vec<String> {
        p.services()
            .into_iter()
            .find(|s| s.id == service)
            .map(|s| s.gpus.into_iter().map(|g| g.device).collect())
            .unwrap_or_default()
    }

    #[test]
    fn contexts_and_uvm_bind_and_release() {
        let mut p = pipeline();
        p.apply(gpu(10, 1, abi::GPU_FIRST_USE, 0, [0; 16]));
        assert!(
            gpus_of(&p, 0).is_empty(),
            "opening a node is not holding the GPU"
        );
        p.apply(gpu(10, 2, abi::GPU_CONTEXT_UP, 0, [0; 16]));
        p.apply(gpu(10, 3, abi::GPU_UVM_REGISTER, 0, UUID1));
        assert_eq!(gpus_of(&p, 0), vec!["gpu0", "gpu1"]);
        p.apply(gpu(10, 4, abi::GPU_CONTEXT_DOWN, 0, [0; 16]));
        assert_eq!(gpus_of(&p, 0), vec!["gpu1"]);
        p.apply(gpu(10, 5, abi::GPU_UVM_UNREGISTER, 0, UUID1));
        assert!(gpus_of(&p, 0).is_empty());
        // An RM client freed takes its contexts with it.
        p.apply(gpu(10, 6, abi::GPU_CONTEXT_UP, 1, [0; 16]));
        assert_eq!(gpus_of(&p, 0), vec!["gpu1"]);
        p.apply(gpu(10, 7, abi::GPU_CLIENT_FREED, 0xC1D0_0000, [0; 16]));
        assert!(gpus_of(&p, 0).is_empty());
        // Unknown GPUs are counted, not guessed.
        p.apply(gpu(10, 8, abi::GPU_CONTEXT_UP, 7, [0; 16]));
        assert_eq!(p.stats.gpu_unknown_device, 1);
    }

    #[test]
    fn children_inherit_the_service_and_exits_release() {
        let mut p = pipeline();
        p.apply(proc_event(Kind::ProcFork, 10, 1, 11, 10));
        p.apply(gpu(11, 2, abi::GPU_CONTEXT_UP, 0, [0; 16]));
        assert_eq!(
            gpus_of(&p, 0),
            vec!["gpu0"],
            "the engine's GPU is the API's service's"
        );
        let view = p.services();
        assert_eq!(
            view[0].members.get(&11).map(String::as_str),
            Some("descendant of 10")
        );
        p.apply(proc_event(Kind::ProcExit, 11, 3, 11, 0));
        assert!(gpus_of(&p, 0).is_empty(), "a dead engine holds nothing");
        assert!(!p.services()[0].members.contains_key(&11));
        assert_eq!(p.exited, vec![11]);
    }

    #[test]
    fn thread_exits_forget_what_thread_creation_added() {
        let mut p = pipeline();
        for tid in 100..110 {
            p.apply(proc_event(Kind::ProcFork, 10, 1, tid, 10));
        }
        assert_eq!(p.services()[0].members.len(), 11);
        for tid in 100..110 {
            let mut ev = ProcEvent {
                hdr: header(Kind::ProcExit, 10, 2),
                pid: tid,
                ppid: 0,
                comm: [0; 16],
            };
            ev.hdr.tid = tid;
            ev.hdr.flags = abi::EXIT_FLAG_THREAD;
            p.apply(Input::Probe {
                bytes: bytes_of(&ev),
            });
        }
        let view = p.services();
        assert_eq!(
            view[0].members.keys().copied().collect::<Vec<_>>(),
            vec![10]
        );
        assert!(p.exited.is_empty(), "a thread's end is not a process's");
        assert_eq!(p.proc_service.len(), 2, "only the two targets are left");
    }

    #[test]
    fn shared_gpu_is_weighted_by_sm_utilisation() {
        let mut p = pipeline();
        p.apply(gpu(10, 1, abi::GPU_CONTEXT_UP, 0, [0; 16]));
        p.apply(Input::SeedGpu {
            pid: 20,
            minor: 0,
            ts_ns: 1,
            evidence: "open device node".into(),
        });
        let weights = |p: &Pipeline| -> Vec<Option<f64>> {
            p.services()
                .iter()
                .map(|s| s.gpus.first().and_then(|g| g.weight))
                .collect()
        };
        assert_eq!(weights(&p), vec![None, None], "no samples: equal split");
        p.apply(Input::Power {
            readings: vec![Reading::ProcessUtil {
                device: 0,
                ts_ns: 2,
                pid: 10,
                sm_percent: 80,
                window_ns: 1_000_000_000,
            }],
        });
        // The other service ran nothing in the window: NVML has no sample for it.
        assert_eq!(weights(&p), vec![Some(80.0), Some(0.0)]);
        // Samples go stale: back to the equal split.
        p.apply(Input::Power {
            readings: vec![Reading::ProcessUtil {
                device: 0,
                ts_ns: 10_000_000_000,
                pid: 99,
                sm_percent: 5,
                window_ns: 1_000_000_000,
            }],
        });
        assert_eq!(weights(&p), vec![Some(0.0), Some(0.0)]);
    }

    #[test]
    fn nvml_process_lists_bind_only_traced_processes() {
        let mut p = pipeline();
        p.apply(Input::Power {
            readings: vec![Reading::Processes {
                device: 1,
                ts_ns: 1,
                pids: vec![20, 555],
            }],
        });
        assert_eq!(gpus_of(&p, 1), vec!["gpu1"]);
        assert!(gpus_of(&p, 0).is_empty());
        p.apply(Input::Power {
            readings: vec![Reading::Processes {
                device: 1,
                ts_ns: 2,
                pids: vec![555],
            }],
        });
        assert!(gpus_of(&p, 1).is_empty(), "gone from the list: released");
    }
}
