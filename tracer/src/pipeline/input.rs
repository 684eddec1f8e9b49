//! What the pipeline acts on: every fact arrives as an [`Input`], recorded in this form.

use serde::{Deserialize, Serialize};

use crate::{
    ids::{DeviceId, Pid, ServiceId},
    ledger::{DeviceKind, LedgerConfig},
    occupancy::workload::Workload,
    power::Reading,
    wire::TrackerConfig,
};

/// Everything the pipeline acts on. Recorded in this form by `tracer record` (the ids serialize
/// as bare numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A ring-buffer record exactly as the probes wrote it.
    Probe { bytes: Vec<u8> },
    /// Readings from a power sampler.
    Power { readings: Vec<Reading> },
    /// A power-measured device (readings name it by `id`).
    Device { id: DeviceId, setup: DeviceSetup },
    /// A service: the processes that serve one endpoint. It shares the host's CPU and DRAM
    /// power domains with the other services from `ts_ns`.
    Service {
        id: ServiceId,
        name: String,
        ts_ns: u64,
        /// Where it runs (absent in recordings made before workload identity).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<Workload>,
    },
    /// A process belongs to a service, and why (target, descendant, cgroup, IPC peer...).
    Member {
        pid: Pid,
        service: ServiceId,
        reason: String,
    },
    /// A process found holding a GPU at attach (open device node, mapping).
    SeedGpu {
        pid: Pid,
        minor: u32,
        ts_ns: u64,
        evidence: String,
    },
    /// A connection a target had before the daemon attached.
    SeedConn {
        tgid: Pid,
        fd: i32,
        conn_id: u64,
        ts_ns: u64,
        server: bool,
    },
    /// CPU time so far: the host's busy clock ticks and each service process's (all its
    /// threads); CPU package and DRAM energy is split by it (`Binding::cpu_time`).
    CpuTime {
        ts_ns: u64,
        busy_ticks: u64,
        processes: Vec<(Pid, u64)>,
    },
    /// A cost model an earlier run learned for a service on a device (from the store).
    Learned {
        device: DeviceId,
        service: ServiceId,
        model: Box<crate::ledger::CostModel>,
    },
    /// Idle power an earlier run learned for a device from quiet time (from the store).
    LearnedIdle { device: DeviceId, watts: f64 },
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub http: TrackerConfig,
    pub ledger: LedgerConfig,
    /// Wall-clock minus monotonic at the start, for wall-clock stamps at the API edge.
    pub wall_offset_ns: i64,
    /// The first request id this run gives: ids stay unique across restarts on one store.
    #[serde(default = "first_id")]
    pub first_request_id: u64,
    /// Records carry their cost at this tariff (`[bill]`); recorded, so a replay prices alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tariff: Option<crate::bill::Tariff>,
}

const fn first_id() -> u64 {
    1
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            http: TrackerConfig::default(),
            ledger: LedgerConfig::default(),
            wall_offset_ns: 0,
            first_request_id: first_id(),
            tariff: None,
        }
    }
}
