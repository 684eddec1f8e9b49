//! Which service occupies which power-measured device, from what the probes, NVML and discovery
//! report. Pure and deterministic: every method takes the fact's timestamp and returns the
//! occupancy changes for the ledger; nothing here reads a clock or the host.
//!
//! A process holds a GPU while it has a live compute context on it (RM compute objects, decoded
//! in the kernel), a UVM registration of its UUID, an entry in NVML's running processes, or — for
//! processes found at attach — an open device node or mapping. A service holds a GPU while any
//! of its processes does; its share of a GPU it shares with other services is its processes' SM
//! utilisation (NVML samples) when the GPU reports samples, else equal. CPU packages and DRAM
//! are held by every service from the moment it is known.

mod cputime;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    ids::{DeviceId, Pid, ServiceId},
    ledger::DeviceKind,
    occupancy::workload::Workload,
};

/// The service processes of unknown membership fall into (a single-service daemon run).
pub const DEFAULT_SERVICE: ServiceId = ServiceId(0);
pub use cputime::OTHER_PROCESSES;
/// NVML utilisation samples older than this no longer weigh a service's share of a GPU.
const UTIL_FRESH_NS: u64 = 5_000_000_000;
/// A service's SM share is passed on when it moves by more than this many points.
const WEIGHT_STEP: f64 = 2.0;

/// Why a process holds a GPU.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

/// A change of who occupies a device, for the ledger (and the log).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// `service` now occupies `device` (`weight`: its SM share, `None` = split equally).
    Bound {
        device: DeviceId,
        service: ServiceId,
        ts_ns: u64,
        weight: Option<f64>,
        /// The process whose evidence made it so (`None`: a host domain, shared by all).
        pid: Option<Pid>,
    },
    /// The service's share of a device it occupies changed.
    Reweighed {
        device: DeviceId,
        service: ServiceId,
        ts_ns: u64,
        weight: Option<f64>,
    },
    /// `service` no longer occupies `device`.
    Released {
        device: DeviceId,
        service: ServiceId,
        ts_ns: u64,
        pid: Pid,
    },
}

/// A service as the binding tracks it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ServiceState {
    pub name: String,
    /// Member processes and why each belongs.
    pub members: BTreeMap<Pid, String>,
    /// Where it runs (pod, container, unit); shared with every record it finalises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

/// A GPU a service holds, who holds it and why.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ServiceGpu {
    pub device: String,
    pub uuid: Option<String>,
    pub holders: BTreeMap<Pid, Evidence>,
    /// SM utilisation share used to split the GPU with other services.
    pub weight: Option<f64>,
}

/// A service with its processes and GPUs (the `services` view).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServiceView {
    pub id: ServiceId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
    pub members: BTreeMap<Pid, String>,
    pub gpus: Vec<ServiceGpu>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DeviceEntry {
    name: String,
    kind: DeviceKind,
    uuid: Option<String>,
}

/// CPU packages and DRAM are shared by every service; `Other` domains (RAPL psys, which
/// contains the packages and DRAM) are measured and reported but never split, so nothing is
/// counted twice.
fn is_host_domain(kind: DeviceKind) -> bool {
    matches!(kind, DeviceKind::CpuPackage | DeviceKind::Dram)
}

/// The occupancy state machine.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    devices: BTreeMap<DeviceId, DeviceEntry>,
    gpu_by_minor: BTreeMap<u32, DeviceId>,
    gpu_by_uuid: BTreeMap<String, DeviceId>,
    services: BTreeMap<ServiceId, ServiceState>,
    proc_service: BTreeMap<Pid, ServiceId>,
    /// Since when each service shares the host's CPU/DRAM domains.
    host_since: BTreeMap<ServiceId, u64>,
    evidence: BTreeMap<(Pid, DeviceId), Evidence>,
    holders: BTreeMap<(DeviceId, ServiceId), BTreeSet<Pid>>,
    /// Latest NVML SM utilisation per (device, process): (stamp, percent).
    sm_util: BTreeMap<(DeviceId, Pid), (u64, u32)>,
    /// Newest NVML utilisation sample per GPU.
    util_seen: BTreeMap<DeviceId, u64>,
    /// Weight last given to the ledger per (device, service) the service holds.
    weights: BTreeMap<(DeviceId, ServiceId), Option<f64>>,
    /// Device nodes each process was seen using (first ioctl).
    nodes_used: BTreeMap<Pid, BTreeSet<u32>>,
    /// GPU facts about a device no power source knows (no NVML, or an unknown UUID).
    unknown_device: u64,
    /// The last CPU-time sample: each service process's ticks, and the host's busy ticks.
    cpu_last: BTreeMap<Pid, u64>,
    busy_last: Option<u64>,
    /// When the previous CPU-time sample was taken.
    cpu_last_ns: Option<u64>,
}

impl Binding {
    /// A device the power sources measure.
    pub fn add_device(
        &mut self,
        id: DeviceId,
        name: &str,
        kind: DeviceKind,
        minor: Option<u32>,
        uuid: Option<&str>,
        out: &mut Vec<Change>,
    ) {
        if kind == DeviceKind::Gpu {
            if let Some(m) = minor {
                self.gpu_by_minor.insert(m, id);
            }
            if let Some(u) = uuid {
                self.gpu_by_uuid.insert(u.to_ascii_lowercase(), id);
            }
        } else if is_host_domain(kind) {
            for (&service, &since) in &self.host_since {
                out.push(Change::Bound {
                    device: id,
                    service,
                    ts_ns: since,
                    weight: None,
                    pid: None,
                });
            }
        }
        self.devices.insert(
            id,
            DeviceEntry {
                name: name.to_string(),
                kind,
                uuid: uuid.map(str::to_string),
            },
        );
    }

    /// A service (named or renamed); a new one shares the host domains from `ts_ns`.
    pub fn add_service(&mut self, id: ServiceId, name: String, ts_ns: u64, out: &mut Vec<Change>) {
        let fresh = !self.services.contains_key(&id);
        self.services.entry(id).or_default().name = name;
        if fresh {
            self.host_since.insert(id, ts_ns);
            for (&device, d) in &self.devices {
                if is_host_domain(d.kind) {
                    out.push(Change::Bound {
                        device,
                        service: id,
                        ts_ns,
                        weight: None,
                        pid: None,
                    });
                }
            }
        }
    }

    /// Where a service runs (a later discovery may name what an earlier one could not).
    pub fn set_workload(&mut self, id: ServiceId, workload: Option<Workload>) {
        let svc = self.services.entry(id).or_default();
        if svc.workload.as_deref() != workload.as_ref() {
            svc.workload = workload.map(Arc::new);
        }
    }

    /// Where a service runs, if known.
    pub fn service_workload(&self, id: ServiceId) -> Option<&Arc<Workload>> {
        self.services.get(&id).and_then(|s| s.workload.as_ref())
    }

    /// A process belongs to a service, and why.
    pub fn add_member(&mut self, pid: Pid, service: ServiceId, reason: String) {
        self.services
            .entry(service)
            .or_default()
            .members
            .insert(pid, reason);
        self.proc_service.insert(pid, service);
    }

    /// The service `pid` belongs to (the default service when unknown).
    pub fn service_of(&self, pid: Pid) -> ServiceId {
        self.proc_service
            .get(&pid)
            .copied()
            .unwrap_or(DEFAULT_SERVICE)
    }

    /// A service's name ("" when unknown).
    pub fn service_name(&self, id: ServiceId) -> &str {
        self.services.get(&id).map_or("", |s| s.name.as_str())
    }

    /// A child of a member joins its parent's service (threads too: they leave at their end).
    pub fn forked(&mut self, child: Pid, parent: Pid) {
        if let Some(&s) = self.proc_service.get(&parent) {
            self.proc_service.insert(child, s);
            if let Some(svc) = self.services.get_mut(&s) {
                svc.members.insert(child, format!("descendant of {parent}"));
            }
        }
    }

    /// A followed thread ended: forget what its creation added.
    pub fn thread_exited(&mut self, tid: Pid) {
        self.leave(tid);
    }

    /// A process ended: it holds nothing and belongs nowhere.
    pub fn process_exited(&mut self, pid: Pid, ts_ns: u64, out: &mut Vec<Change>) {
        for dev in self.devices_evidenced(pid) {
            self.evidence.remove(&(pid, dev));
            self.rebind(pid, dev, ts_ns, out);
        }
        self.nodes_used.remove(&pid);
        self.leave(pid);
    }

    fn leave(&mut self, pid: Pid) {
        if let Some(s) = self.proc_service.remove(&pid)
            && let Some(svc) = self.services.get_mut(&s)
        {
            svc.members.remove(&pid);
        }
    }

    fn devices_evidenced(&self, pid: Pid) -> Vec<DeviceId> {
        self.evidence
            .range((pid, DeviceId(0))..=(pid, DeviceId(u32::MAX)))
            .map(|(k, _)| k.1)
            .collect()
    }

    /// The GPU with RM device instance `instance`. The driver numbers device instances in
    /// probe order, as it does minor numbers: the n-th instance is the GPU with the n-th
    /// smallest minor (a UVM registration, keyed by UUID, confirms it independently).
    pub fn gpu_by_instance(&self, instance: u32) -> Option<DeviceId> {
        self.gpu_by_minor.values().nth(instance as usize).copied()
    }

    /// The GPU with this UUID, if a power source measures it.
    pub fn gpu_by_uuid(&self, uuid: &str) -> Option<DeviceId> {
        self.gpu_by_uuid.get(&uuid.to_ascii_lowercase()).copied()
    }

    /// A process used a GPU device node for the first time (not holding it: NVML clients do
    /// that too).
    pub fn node_used(&mut self, pid: Pid, minor: u32) {
        self.nodes_used.entry(pid).or_default().insert(minor);
    }

    /// Sets or clears one kind of evidence that `pid` holds `dev` (`None`: a device no power
    /// source knows, counted).
    pub fn set_evidence(
        &mut self,
        pid: Pid,
        dev: Option<DeviceId>,
        ts_ns: u64,
        set: impl FnOnce(&mut Evidence),
        out: &mut Vec<Change>,
    ) {
        let Some(dev) = dev else {
            self.unknown_device += 1;
            return;
        };
        set(self.evidence.entry((pid, dev)).or_default());
        self.rebind(pid, dev, ts_ns, out);
    }

    /// A process found holding the GPU with `minor` at attach.
    pub fn seed(
        &mut self,
        pid: Pid,
        minor: u32,
        evidence: String,
        ts_ns: u64,
        out: &mut Vec<Change>,
    ) {
        let dev = self.gpu_by_minor.get(&minor).copied();
        self.set_evidence(pid, dev, ts_ns, |e| e.seeded = Some(evidence), out);
    }

    /// An RM client was freed: every context of the process is gone (a process rarely has two
    /// RM clients, and a second one's contexts come back with its next allocation).
    pub fn client_freed(&mut self, pid: Pid, ts_ns: u64, out: &mut Vec<Change>) {
        for dev in self.devices_evidenced(pid) {
            if let Some(e) = self.evidence.get_mut(&(pid, dev)) {
                e.context = false;
            }
            self.rebind(pid, dev, ts_ns, out);
        }
    }

    /// NVML's running compute processes on `dev`: evidence for the traced ones.
    pub fn nvml_processes(
        &mut self,
        dev: DeviceId,
        ts_ns: u64,
        pids: &[u32],
        out: &mut Vec<Change>,
    ) {
        let listed: BTreeSet<Pid> = pids
            .iter()
            .map(|&p| Pid(p))
            .filter(|p| self.proc_service.contains_key(p))
            .collect();
        let before: Vec<Pid> = self
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
                self.rebind(pid, dev, ts_ns, out);
            }
        }
        for pid in listed {
            self.evidence.entry((pid, dev)).or_default().nvml = true;
            self.rebind(pid, dev, ts_ns, out);
        }
    }

    /// An NVML SM utilisation sample: the sharing services' weights follow.
    pub fn sm_sample(
        &mut self,
        dev: DeviceId,
        pid: Pid,
        ts_ns: u64,
        sm_percent: u32,
        out: &mut Vec<Change>,
    ) {
        self.sm_util.insert((dev, pid), (ts_ns, sm_percent));
        self.util_seen.insert(dev, ts_ns);
        let sharing: Vec<ServiceId> = self
            .weights
            .keys()
            .filter(|(d, _)| *d == dev)
            .map(|(_, s)| *s)
            .collect();
        for service in sharing {
            self.reweigh(dev, service, ts_ns, out);
        }
    }

    /// Re-derives whether `pid` holds `dev`, and its service's occupancy of `dev`.
    fn rebind(&mut self, pid: Pid, dev: DeviceId, ts_ns: u64, out: &mut Vec<Change>) {
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
            out.push(Change::Bound {
                device: dev,
                service,
                ts_ns,
                weight,
                pid: Some(pid),
            });
        } else if was_held && !is_held {
            self.weights.remove(&(dev, service));
            out.push(Change::Released {
                device: dev,
                service,
                ts_ns,
                pid,
            });
        }
    }

    /// Passes on a service's new SM share of `dev` when it changed noticeably.
    fn reweigh(&mut self, dev: DeviceId, service: ServiceId, ts_ns: u64, out: &mut Vec<Change>) {
        let Some(old) = self.weights.get(&(dev, service)).copied() else {
            return; // the service does not hold the device
        };
        let new = self.service_weight(dev, service, ts_ns);
        let changed = match (old, new) {
            (Some(a), Some(b)) => (a - b).abs() > WEIGHT_STEP,
            (None, None) => false,
            _ => true,
        };
        if changed {
            self.weights.insert((dev, service), new);
            out.push(Change::Reweighed {
                device: dev,
                service,
                ts_ns,
                weight: new,
            });
        }
    }

    /// A service's SM utilisation on `dev`: the sum over its holding processes of their
    /// fresh NVML samples. NVML only has samples for processes that ran, so while the GPU
    /// delivers samples a holder without one used 0 %; with no fresh sample at all on the GPU
    /// the weight is `None` and the ledger splits equally.
    fn service_weight(&self, dev: DeviceId, service: ServiceId, now_ns: u64) -> Option<f64> {
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

    /// A device's name (`device N` when unknown).
    pub fn device_name(&self, dev: DeviceId) -> String {
        self.devices
            .get(&dev)
            .map_or_else(|| format!("device {}", dev.0), |d| d.name.clone())
    }

    /// GPU facts about devices no power source knows.
    pub fn unknown_device(&self) -> u64 {
        self.unknown_device
    }

    /// Processes known to belong to a service (members, descendants, threads).
    pub fn tracked_processes(&self) -> usize {
        self.proc_service.len()
    }

    /// The services, with the GPUs each holds now.
    pub fn services(&self) -> Vec<ServiceView> {
        self.services
            .iter()
            .map(|(&id, s)| ServiceView {
                id,
                name: s.name.clone(),
                workload: s.workload.clone(),
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
}
