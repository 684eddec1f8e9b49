//! A snapshot of everything the pipeline knows, as plain structs: what the log summary, the API
//! and metrics render. The pipeline fills in its own state; the daemon adds what only it has
//! (the probes' counters, the samplers' health).

use serde::Serialize;

use super::stats::UserStats;
use crate::{
    ids::{DeviceId, Pid, RequestId, ServiceId},
    ledger::{DeviceKind, DeviceTotals, LedgerStats},
    occupancy::binding::ServiceView,
    probe::KernelStats,
    wire::TrackerStats,
};

/// The whole state at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// `CLOCK_MONOTONIC` time of the snapshot.
    pub ts_ns: u64,
    /// The same instant, Unix milliseconds (API edge).
    pub unix_ms: i64,
    /// Energy totals per device, with the idle basis.
    pub devices: Vec<DeviceSnapshot>,
    /// Services, their processes and the GPUs they hold.
    pub services: Vec<ServiceView>,
    /// Requests that arrived and have not ended, oldest first.
    pub in_flight: Vec<InFlight>,
    /// The pipeline's counters: activity and every kind of loss.
    pub counts: Counts,
    /// The probes' counters (absent in a replay).
    pub kernel: Option<KernelStats>,
    /// The power samplers' health (absent in a replay).
    pub samplers: Vec<SamplerHealth>,
    /// The outputs' health.
    pub outputs: Vec<SubscriberHealth>,
    /// Processes the kernel traces now (absent in a replay).
    pub targets: Option<usize>,
    /// The cost models learned so far (the store keeps them for the next run).
    #[serde(skip)]
    pub learned: Vec<Learned>,
}

/// A cost model, by the names that outlive a run.
#[derive(Debug, Clone)]
pub struct Learned {
    pub device: String,
    pub service: String,
    pub model: crate::ledger::CostModel,
}

/// One device's totals.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSnapshot {
    pub id: DeviceId,
    pub name: String,
    pub kind: DeviceKind,
    pub estimated: bool,
    /// What it draws now: its newest power sample or counter update, watts (`None` before the
    /// first).
    pub power_w: Option<f64>,
    /// How old that reading was at the snapshot, ms: a sensor that stopped answering shows
    /// here first.
    pub power_age_ms: Option<u64>,
    #[serde(flatten)]
    pub totals: DeviceTotals,
}

/// A request in flight.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub id: RequestId,
    pub service: ServiceId,
    pub pid: Pid,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub arrive_ns: u64,
}

/// Every counter the pipeline keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Decoded records and bytes (and decode failures).
    pub user: UserStats,
    /// The HTTP tracker's counters.
    pub http: TrackerStats,
    /// The ledger's counters.
    pub ledger: LedgerStats,
    /// Finished HTTP requests and final energy records.
    pub requests_done: u64,
    pub records_done: u64,
    /// Lifecycle events for requests never seen arriving (should stay 0).
    pub orphan_lifecycle_events: u64,
    /// GPU facts about devices no power source knows (no NVML, or an unknown UUID).
    pub gpu_unknown_device: u64,
    /// Continuation records of a long read that did not follow the record before them (the
    /// ring dropped it): their bytes count as uncaptured.
    pub data_pieces_lost: u64,
    /// Calls targets made to other targets, paired with the request they served, and their
    /// other ends found (not requests of their own, `hops.rs`).
    pub hop_calls_paired: u64,
    pub hop_inner_found: u64,
    /// Of the calls paired, those paired by arrival order, not by the thread that wrote them.
    pub hop_calls_by_arrival: u64,
}

/// A power sampler's health.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerHealth {
    /// `nvml`, `cpu:rapl`, ...
    pub source: String,
    /// Devices it measures.
    pub devices: Vec<String>,
    pub polls: u64,
    /// CPU time its thread has used.
    pub cpu_ns: u64,
    /// Polls that started late (the thread could not keep up).
    pub late: u64,
}

/// What the daemon adds to the pipeline's own state.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub kernel: Option<KernelStats>,
    pub samplers: Vec<SamplerHealth>,
    pub targets: Option<usize>,
}

/// A subscriber's health, for snapshots and the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriberHealth {
    pub name: String,
    /// `lossless` or `lossy`.
    pub mode: &'static str,
    pub delivered: u64,
    /// Lossy: facts dropped on a full queue. Lossless: always 0.
    pub dropped: u64,
    /// Lossless: gave up after an error (named in the log).
    pub failed: bool,
}
