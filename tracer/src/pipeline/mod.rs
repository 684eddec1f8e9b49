//! The attribution pipeline: everything between the ring buffer and samplers and the outputs.
//!
//! The pipeline has no clock and does no I/O: every fact it acts on arrives as an [`Input`] —
//! a raw probe record, a batch of power readings, a service discovered in /proc, a tick of the
//! daemon's clock — and every result leaves as a [`Fact`] on its [`Bus`]. That makes it
//! deterministic, so recording the inputs (the recorder is a subscriber) is enough to recompute
//! every figure later (`tracer replay`), with the same or another split policy.
//!
//! Inside: probe records are decoded ([`crate::probe::decode`]); connection records go to the
//! HTTP tracker ([`crate::wire`], via [`conns`]), whose request lifecycles feed the ledger and
//! the request summaries ([`requests`]); process and GPU records go to the occupancy binding
//! ([`crate::occupancy::binding`]), whose changes tell the ledger who occupies which device;
//! power readings go to the ledger. [`snapshot`] renders the whole state as plain structs.

pub mod bus;
pub mod checkpoint;
mod conns;
pub mod fact;
mod hops;
mod input;
mod requests;
pub mod snapshot;
mod stats;

use std::sync::Arc;

use self::conns::Moved;
pub use self::{
    bus::{Bus, Interest, LossyReceiver, Subscriber, SubscriberError},
    checkpoint::CheckpointError,
    fact::{BindingFact, Fact, FinalRecord, OwnedFact},
    input::{DeviceSetup, Input, PipelineConfig},
    snapshot::{Snapshot, SubscriberHealth},
    stats::UserStats,
};
use crate::{
    ids::{DeviceId, Pid, ServiceId},
    ledger::{self, DeviceInfo, IdleSource, Ledger, StepSource},
    occupancy::binding::{self, Binding, ServiceView},
    power::Reading,
    probe::decode::{self, Body, DeviceNode, Event, GpuChange},
    wire::{Lifecycle, Role, Tracker, summary::RequestCollector},
};

/// The pipeline. Owned by one thread (the daemon's event loop, or a replay); no locking.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    #[serde(skip)]
    bus: Bus,
    #[serde(with = "stats::raw")]
    stats: UserStats,
    tracker: Tracker,
    conns: conns::Conns,
    hops: hops::Hops,
    collector: RequestCollector,
    lifecycle: Vec<Lifecycle>,
    ledger: Ledger,
    binding: Binding,
    changes: Vec<binding::Change>,
    devices: std::collections::BTreeMap<DeviceId, DeviceSetup>,
    /// Processes that exited since the daemon last asked (their kernel entries go).
    exited: Vec<u32>,
    /// Execs and exits of traced processes since the daemon last asked (re-discovery).
    process_changes: u64,
    /// Processes that received HTTP requests: where an engine's IPC message is a step end.
    serving: std::collections::BTreeSet<Pid>,
    requests_done: u64,
    records_done: u64,
    wall_offset_ns: i128,
    tariff: Option<crate::bill::Tariff>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("requests_done", &self.requests_done)
            .field("records_done", &self.records_done)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline publishing to `bus`.
    pub fn new(config: &PipelineConfig, bus: Bus) -> Result<Self, ledger::LedgerError> {
        Ok(Self {
            bus,
            stats: UserStats::default(),
            tracker: Tracker::new(config.http.clone()).starting_at(config.first_request_id),
            conns: conns::Conns::default(),
            hops: hops::Hops::default(),
            collector: RequestCollector::default(),
            lifecycle: Vec::new(),
            ledger: Ledger::new(config.ledger.clone())?,
            binding: Binding::default(),
            changes: Vec::new(),
            devices: std::collections::BTreeMap::new(),
            exited: Vec::new(),
            process_changes: 0,
            serving: std::collections::BTreeSet::new(),
            requests_done: 0,
            records_done: 0,
            wall_offset_ns: i128::from(config.wall_offset_ns),
            tariff: config.tariff.clone(),
        })
    }

    /// Publishes `input` (the recorder keeps it), then acts on it.
    pub fn apply(&mut self, input: Input) {
        if let Input::Probe { bytes } = &input {
            self.probe(bytes);
            return;
        }
        self.bus.publish(&Fact::Input(&input));
        match input {
            Input::Probe { .. } => {}
            Input::Power { readings } => self.power(readings),
            Input::Device { id, setup } => self.add_device(id, setup),
            Input::Service {
                id,
                name,
                ts_ns,
                workload,
            } => {
                self.binding.add_service(id, name, ts_ns, &mut self.changes);
                self.binding.set_workload(id, workload);
                self.apply_changes();
            }
            Input::Member {
                pid,
                service,
                reason,
            } => self.binding.add_member(pid, service, reason),
            Input::SeedGpu {
                pid,
                minor,
                ts_ns,
                evidence,
            } => {
                self.binding
                    .seed(pid, minor, evidence, ts_ns, &mut self.changes);
                self.apply_changes();
            }
            Input::SeedConn {
                tgid,
                fd,
                conn_id,
                ts_ns,
                server,
            } => {
                let role = if server { Role::Server } else { Role::Client };
                self.conns
                    .open(&mut self.tracker, tgid, fd, conn_id, ts_ns, role);
            }
            Input::CpuTime {
                ts_ns,
                busy_ticks,
                processes,
            } => {
                let ledger = &self.ledger;
                self.binding.cpu_time(
                    ts_ns,
                    busy_ticks,
                    &processes,
                    |service, from, to| ledger.in_flight_fraction(service, from, to),
                    &mut self.changes,
                );
                self.apply_changes();
            }
            Input::Learned {
                device,
                service,
                model,
            } => {
                self.ledger.restore_model(device, service, *model);
            }
            Input::LearnedIdle { device, watts } => {
                self.ledger.restore_idle(device, watts);
            }
            Input::Advance { now_ns } => {
                let recs = self.ledger.advance(now_ns);
                self.emit_records(recs);
            }
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

    /// A raw probe record (the hot path: no copy). The recorder gets it after it is read:
    /// a data record as the tracker read it (redacted, `wire::redact`; a syscall captured in
    /// pieces once put together), any other record as it came.
    pub fn probe(&mut self, bytes: &[u8]) {
        let recording = self.bus.interest().inputs;
        if recording && self.conns.read.is_none() {
            self.conns.read = Some(Vec::new());
        }
        let data = self.handle(bytes);
        if recording {
            // The syscalls as the tracker read them, then the list kept for the next record.
            let mut read = self.conns.read.take().unwrap_or_default();
            for r in &read {
                self.bus.publish(&Fact::Probe(r));
            }
            read.clear();
            self.conns.read = Some(read);
            if !data {
                self.publish_unread(bytes);
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
        self.binding.add_device(
            id,
            &setup.name,
            setup.kind,
            setup.minor,
            setup.uuid.as_deref(),
            &mut self.changes,
        );
        self.apply_changes();
        self.devices.insert(id, setup);
    }

    /// A record the pipeline did not read as data: as it came, except that a data record it
    /// could not decode keeps its length but not its bytes (they were never redacted).
    fn publish_unread(&mut self, bytes: &[u8]) {
        use tracer_ebpf::abi::{DATA_HEAD_LEN, Header, Kind};
        let kind_at = std::mem::offset_of!(Header, kind);
        let is_data = bytes
            .get(kind_at..kind_at + 2)
            .is_some_and(|k| u16::from_ne_bytes([k[0], k[1]]) == Kind::Data as u16);
        if is_data && bytes.len() > DATA_HEAD_LEN {
            let mut r = bytes.to_vec();
            r[DATA_HEAD_LEN..].fill(0);
            self.bus.publish(&Fact::Probe(&r));
        } else {
            self.bus.publish(&Fact::Probe(bytes));
        }
    }

    /// Decodes and acts on a record; returns whether it was a data record (recorded as read,
    /// not as it came).
    fn handle(&mut self, bytes: &[u8]) -> bool {
        let ev = match decode::decode(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                self.stats.decode_errors += 1;
                tracing::debug!("undecodable record: {e}");
                return false;
            }
        };
        self.stats.record(&ev);
        self.bus.publish(&Fact::Event {
            raw: bytes,
            event: &ev,
        });
        self.track(&ev, bytes);
        matches!(ev.body, Body::Data { .. })
    }

    /// Connection events to the HTTP tracker, process and GPU events to the binding, engine
    /// messages and CUDA synchronisations to the ledger as step ends.
    fn track(&mut self, ev: &Event<'_>, raw: &[u8]) {
        let tgid = Pid(ev.tgid);
        let t = &mut self.tracker;
        match ev.body {
            Body::Conn {
                conn_id,
                fd,
                family,
                syscall,
                peer,
                ..
            } => {
                // A Unix socket is followed as IPC unless its first bytes are HTTP (a proxy's
                // hop to its engine); either way its other end is on this host.
                let unix = family == libc::AF_UNIX as u16;
                self.conns
                    .conn(t, tgid, fd, conn_id, syscall, ev.ts_ns, (peer, unix));
            }
            Body::Data {
                ipc: true, inbound, ..
            } => {
                // IPC between service members is never HTTP, and only its timing is read: it
                // is recorded without its bytes.
                if let Some(read) = &mut self.conns.read {
                    let head = raw.len().min(tracer_ebpf::abi::DATA_HEAD_LEN);
                    let mut r = raw.to_vec();
                    r[head..].fill(0);
                    read.push(r);
                }
                // The HTTP-serving process receiving a message from the engine: a step ended
                // (it writes that step's chunks next).
                if inbound && self.serving.contains(&tgid) {
                    let service = self.binding.service_of(tgid);
                    self.ledger.step_mark(service, ev.ts_ns, StepSource::Ipc);
                }
                return;
            }
            Body::CudaSync {
                launches,
                graph_launches,
                ..
            } => {
                // A GPU process synchronised after launching work: a step ended.
                if launches > 0 || graph_launches > 0 {
                    let service = self.binding.service_of(tgid);
                    self.ledger.step_mark(service, ev.ts_ns, StepSource::Cuda);
                }
                return;
            }
            Body::Data {
                conn_id,
                fd,
                syscall,
                inbound,
                total_len,
                eof,
                more,
                cont,
                offset,
                payload,
                ..
            } => {
                let role = self.conns.data(
                    t,
                    tgid,
                    &Moved {
                        fd,
                        conn_id,
                        ts_ns: ev.ts_ns,
                        inbound,
                        total_len,
                        eof,
                        more,
                        cont,
                        offset,
                        plaintext: syscall.is_plaintext(),
                        payload,
                        head: raw,
                    },
                );
                // Which request a thread serves, for the calls it makes (`hops.rs`).
                if let Some(role) = role {
                    self.hops
                        .data(ev.tid, tgid, conn_id, inbound, role == Role::Server);
                }
            }
            Body::Close { conn_id, fd } => {
                self.hops.closed(tgid, conn_id);
                self.conns.close(t, tgid, fd, conn_id, ev.ts_ns);
            }
            Body::Exit {
                pid, thread: true, ..
            } => {
                self.hops.thread_exited(pid);
                self.binding.thread_exited(Pid(pid));
                return;
            }
            Body::Fork { child, parent, .. } => {
                // Threads fire this too: their entries go when they exit (a thread exit event).
                self.binding.forked(Pid(child), Pid(parent));
                return;
            }
            Body::Gpu { ref change, .. } => {
                self.gpu_change(tgid, change, ev.ts_ns);
                return;
            }
            Body::Exec { .. } => {
                self.process_changes += 1;
                return;
            }
            Body::Exit { pid, .. } => {
                self.process_changes += 1;
                self.exited.push(pid);
                self.serving.remove(&Pid(pid));
                self.hops.process_exited(Pid(pid));
                self.binding
                    .process_exited(Pid(pid), ev.ts_ns, &mut self.changes);
                self.apply_changes();
                self.conns
                    .process_exited(&mut self.tracker, Pid(pid), ev.ts_ns);
            }
            _ => return,
        }
        self.flush_requests();
    }

    fn gpu_change(&mut self, pid: Pid, change: &GpuChange, ts_ns: u64) {
        let b = &mut self.binding;
        let out = &mut self.changes;
        match change {
            GpuChange::FirstUse { node } => {
                if let DeviceNode::Gpu(m) = node {
                    b.node_used(pid, *m);
                }
            }
            GpuChange::ContextUp { instance, .. } => {
                let dev = b.gpu_by_instance(*instance);
                b.set_evidence(pid, dev, ts_ns, |e| e.context = true, out);
            }
            GpuChange::ContextDown { instance } => {
                let dev = b.gpu_by_instance(*instance);
                b.set_evidence(pid, dev, ts_ns, |e| e.context = false, out);
            }
            GpuChange::UvmRegister { uuid } => {
                let dev = b.gpu_by_uuid(uuid);
                b.set_evidence(pid, dev, ts_ns, |e| e.uvm = true, out);
            }
            GpuChange::UvmUnregister { uuid } => {
                let dev = b.gpu_by_uuid(uuid);
                b.set_evidence(pid, dev, ts_ns, |e| e.uvm = false, out);
            }
            GpuChange::ClientFreed { .. } => b.client_freed(pid, ts_ns, out),
            GpuChange::Unknown { .. } => {}
        }
        self.apply_changes();
    }

    /// Tells the ledger who occupies what now, and publishes binds and releases.
    fn apply_changes(&mut self) {
        for c in std::mem::take(&mut self.changes) {
            let fact = match c {
                binding::Change::Bound {
                    device,
                    service,
                    ts_ns,
                    weight,
                    pid,
                } => {
                    let _ = self.ledger.occupy(device, service, ts_ns, weight);
                    pid.map(|pid| (device, service, ts_ns, pid, true))
                }
                binding::Change::Reweighed {
                    device,
                    service,
                    ts_ns,
                    weight,
                } => {
                    let _ = self.ledger.occupy(device, service, ts_ns, weight);
                    None
                }
                binding::Change::Released {
                    device,
                    service,
                    ts_ns,
                    pid,
                } => {
                    let _ = self.ledger.release(device, service, ts_ns);
                    Some((device, service, ts_ns, pid, false))
                }
            };
            if let Some((device, service, ts_ns, pid, bound)) = fact {
                self.bus.publish(&Fact::Binding(&BindingFact {
                    ts_ns,
                    device,
                    device_name: self.binding.device_name(device),
                    service,
                    pid,
                    bound,
                }));
            }
        }
    }

    /// Power readings from a sampler.
    fn power(&mut self, batch: Vec<Reading>) {
        for r in batch {
            match r {
                Reading::Counter {
                    device,
                    ts_ns,
                    energy_uj,
                    wrap_uj,
                } => {
                    let _ = self
                        .ledger
                        .counter(DeviceId(device as u32), ts_ns, energy_uj, wrap_uj);
                }
                Reading::Power {
                    device,
                    ts_ns,
                    watts,
                    window_ns,
                } => {
                    let _ = self
                        .ledger
                        .power(DeviceId(device as u32), ts_ns, watts, window_ns);
                }
                Reading::Processes {
                    device,
                    ts_ns,
                    pids,
                } => {
                    self.binding.nvml_processes(
                        DeviceId(device as u32),
                        ts_ns,
                        &pids,
                        &mut self.changes,
                    );
                    self.apply_changes();
                }
                Reading::ProcessUtil {
                    device,
                    ts_ns,
                    pid,
                    sm_percent,
                    ..
                } => {
                    self.binding.sm_sample(
                        DeviceId(device as u32),
                        Pid(pid),
                        ts_ns,
                        sm_percent,
                        &mut self.changes,
                    );
                    self.apply_changes();
                }
                Reading::Lost { .. } => {}
            }
        }
    }

    /// Every process of every service (whose CPU time the daemon reads, `Input::CpuTime`).
    pub fn service_processes(&self) -> Vec<u32> {
        self.binding.service_processes()
    }

    /// Processes that exited since the last call (the daemon removes their kernel entries).
    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    /// Execs and exits of traced processes since the last call.
    pub fn take_process_changes(&mut self) -> u64 {
        std::mem::take(&mut self.process_changes)
    }

    /// Builds a snapshot of the whole state (with what only the daemon knows) and publishes it.
    pub fn publish_snapshot(&mut self, ts_ns: u64, extras: snapshot::Extras) -> Arc<Snapshot> {
        let snap = Arc::new(self.snapshot(ts_ns, extras));
        self.bus.publish(&Fact::Snapshot(&snap));
        snap
    }

    /// The whole state now, as plain structs.
    pub fn snapshot(&self, ts_ns: u64, extras: snapshot::Extras) -> Snapshot {
        let totals = self.ledger.totals();
        let now = self.ledger.power_now();
        Snapshot {
            ts_ns,
            unix_ms: self.unix_ms(ts_ns),
            devices: self
                .devices
                .iter()
                .map(|(&id, d)| snapshot::DeviceSnapshot {
                    id,
                    name: d.name.clone(),
                    kind: d.kind,
                    estimated: d.estimated,
                    power_w: now.get(&id).map(|&(_, w)| w),
                    power_age_ms: now
                        .get(&id)
                        .map(|&(t, _)| ts_ns.saturating_sub(t) / 1_000_000),
                    totals: totals.get(&id).copied().unwrap_or_default(),
                })
                .collect(),
            services: self.binding.services(),
            in_flight: self.in_flight(),
            counts: self.counts(),
            kernel: extras.kernel,
            samplers: extras.samplers,
            outputs: self.bus.health(),
            targets: extras.targets,
            learned: self.learned(),
        }
    }

    /// Every counter the pipeline keeps.
    pub fn counts(&self) -> snapshot::Counts {
        snapshot::Counts {
            user: self.stats,
            http: self.tracker.stats(),
            ledger: self.ledger.stats(),
            requests_done: self.requests_done,
            records_done: self.records_done,
            orphan_lifecycle_events: self.collector.orphans,
            gpu_unknown_device: self.binding.unknown_device(),
            data_pieces_lost: self.conns.pieces_lost(),
            hop_calls_paired: self.hops.calls_paired,
            hop_inner_found: self.hops.inner_found,
            hop_calls_by_arrival: self.hops.calls_by_arrival,
        }
    }

    /// Per-device totals (conservation: measured = requests + idle + unattributed).
    pub fn totals(&self) -> std::collections::BTreeMap<DeviceId, ledger::DeviceTotals> {
        self.ledger.totals()
    }

    /// Every cost model learned so far, by device and service name (what the store keeps).
    pub fn learned(&self) -> Vec<snapshot::Learned> {
        let services = self.binding.services();
        self.ledger
            .learned_models()
            .into_iter()
            .filter_map(|(d, s, model)| {
                Some(snapshot::Learned {
                    device: self.devices.get(&d)?.name.clone(),
                    service: services.iter().find(|v| v.id == s)?.name.clone(),
                    model,
                })
            })
            .collect()
    }

    /// A device's id by name.
    pub fn device_id(&self, name: &str) -> Option<DeviceId> {
        self.devices
            .iter()
            .find(|(_, d)| d.name == name)
            .map(|(id, _)| *id)
    }

    /// The id the next request will get (a recovery continues after the last one given).
    pub fn next_request_id(&self) -> u64 {
        self.tracker.next_id()
    }

    /// The services as the pipeline knows them, with the GPUs each holds now.
    pub fn services(&self) -> Vec<ServiceView> {
        self.binding.services()
    }

    /// The service a process belongs to.
    pub fn service_of(&self, pid: Pid) -> ServiceId {
        self.binding.service_of(pid)
    }

    /// The bus, to subscribe after construction (e.g. an API stream).
    pub fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    /// Flushes the lossless outputs (a failing one is dropped with a warning).
    pub fn flush(&mut self) {
        self.bus.flush();
    }

    /// Reopens the output files at their paths (SIGHUP); see [`bus::Bus::reopen`].
    pub fn reopen_outputs(&mut self) -> (usize, Vec<(String, SubscriberError)>) {
        self.bus.reopen()
    }

    fn unix_ms(&self, ts_ns: u64) -> i64 {
        ((i128::from(ts_ns) + self.wall_offset_ns) / 1_000_000) as i64
    }
}

#[cfg(test)]
mod tests;
