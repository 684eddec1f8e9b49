//! The ledger's public records: devices as registered, requests as they arrive and as they
//! end up (per-device shares), and the per-device totals and counters it reports.

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, RequestId, ServiceId};

/// What kind of device a power domain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    #[default]
    Gpu,
    CpuPackage,
    Dram,
    Other,
}

/// Where a device's idle power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdleSource {
    /// A fixed figure (from a datasheet or a measurement of the idle host). Best for devices
    /// that are never idle while the daemon watches them.
    Configured { watts: f64 },
    /// Learned over a sliding window: the lower quartile of quiet segments' power (nothing in
    /// flight),
    /// else, never seen quiet, a low `quantile` of all power observed.
    Learned { quantile: f64, window_ns: u64 },
}

impl Default for IdleSource {
    fn default() -> Self {
        IdleSource::Learned {
            quantile: 0.05,
            window_ns: 600_000_000_000,
        }
    }
}

/// A device as registered with the ledger.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: DeviceKind,
    /// The figures are modelled, not measured (e.g. CPU power from utilisation in a VM).
    pub estimated: bool,
    pub idle: IdleSource,
}

/// What is known about a request when it arrives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Arrival {
    /// First request byte.
    pub ts_ns: u64,
    pub model: Option<String>,
    /// The server's own id (X-Request-Id, response id), if any.
    pub external_id: Option<String>,
    /// The tenant as the tracker keeps it (a keyed hash of the configured header's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// Bytes of the request body: sizes a prompt whose usage is never reported, at the
    /// service's tokens per byte learned from the requests that did report it.
    pub body_bytes: Option<u64>,
    /// The prompt's start as chained block hashes (`wire::prefix`): the part of a prompt
    /// without usage that others shared, which the engine had cached (`prefix.rs`). Kept in
    /// memory only (never written out; a checkpoint carries it).
    #[serde(default, skip_serializing_if = "crate::memo::memory_only")]
    pub prefix_blocks: Vec<u64>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Complete,
    /// The connection closed before the response ended.
    ClosedEarly,
    /// The capture lost the response framing.
    Truncated,
    /// No response (client gone, evicted, or open past `max_open_ns`).
    Aborted,
    /// Still in flight when the tracer stopped (shutdown, or a crash recovered from the
    /// journal): its energy up to the last thing seen of it.
    Incomplete,
}

impl Outcome {
    /// Its name in records and queries.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClosedEarly => "closed_early",
            Outcome::Truncated => "truncated",
            Outcome::Aborted => "aborted",
            Outcome::Incomplete => "incomplete",
        }
    }
}

/// One device's part of a request's energy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceShare {
    pub device: DeviceId,
    pub name: String,
    pub kind: DeviceKind,
    pub estimated: bool,
    pub dynamic_j: f64,
    pub idle_j: f64,
    /// Combined error bound (see the module docs).
    pub uncertainty_j: f64,
    /// Its parts: sensor granularity, missing data, split model.
    pub sensor_j: f64,
    pub coverage_j: f64,
    pub split_j: f64,
}

/// A request's final energy account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: RequestId,
    pub external_id: Option<String>,
    pub service: ServiceId,
    pub model: Option<String>,
    /// Keyed hash of the tenant header's value (`http.tenant_header`), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub arrive_ns: u64,
    pub first_byte_ns: Option<u64>,
    pub first_event_ns: Option<u64>,
    pub end_ns: u64,
    pub outcome: Outcome,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Streamed events (SSE `data:` events, NDJSON lines).
    pub events: u64,
    pub response_bytes: u64,
    pub devices: Vec<DeviceShare>,
    pub dynamic_j: f64,
    pub idle_j: f64,
    pub total_j: f64,
    pub kwh: f64,
    /// Per completion token (or streamed event when the count is unknown).
    pub joules_per_output_token: Option<f64>,
    /// Batch occupancy: requests of its service in the engine with it (itself included),
    /// averaged over its time on the devices, as the split saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupancy: Option<f64>,
    pub uncertainty_j: f64,
    /// Time of the request on some device with no power data.
    pub coverage_gap_ns: u64,
}

/// The learned prices of the `tokens` split for one (device, service).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostPrices {
    /// Static power while the service runs (absorbs idle; not used to split).
    pub static_w: f64,
    /// Power while busy, time-sliced among the requests in flight.
    pub busy_w: f64,
    pub prefill_j_per_token: f64,
    pub decode_j_per_token: f64,
    /// Extra per decode token per token of context (KV cache reads).
    pub decode_context_j_per_token: f64,
    /// Step time a decoding sequence adds per token of its context, where the service's steps
    /// show it: that part of the busy time is the sequence's own (`context.rs`).
    pub context_step_ns_per_token: Option<f64>,
}

/// Per-device energy totals over everything attributed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTotals {
    pub measured_j: f64,
    pub request_dynamic_j: f64,
    pub request_idle_j: f64,
    pub idle_j: f64,
    pub unattributed_j: f64,
    /// Time covered by attributed segments.
    pub covered_ns: u64,
    /// Gaps: resets, implausible readings.
    pub gap_ns: u64,
    /// Current idle estimate, W, and where it comes from.
    pub idle_w: f64,
    pub idle_basis: IdleBasis,
}

/// Where a device's idle figure comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleBasis {
    /// No data yet.
    #[default]
    Unknown,
    Configured,
    /// Learned from time with nothing in flight: trustworthy.
    Quiet,
    /// Learned from quiet time by an earlier run (kept by the store), until this run has
    /// quiet time of its own.
    Restored,
    /// Learned from all power samples because the device was never seen quiet: an overestimate
    /// under sustained load. Error bars widen accordingly; configure idle for such devices.
    AllPower,
}

impl DeviceTotals {
    /// `measured − (requests + idle + unattributed)`: zero up to rounding, by construction.
    pub fn imbalance_j(&self) -> f64 {
        self.measured_j
            - (self.request_dynamic_j + self.request_idle_j + self.idle_j + self.unattributed_j)
    }
}

/// Counted anomalies and activity: nothing bad is silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStats {
    pub counter_readings: u64,
    pub power_samples: u64,
    /// Counter decreased without a known range: a gap until the next update.
    pub counter_resets: u64,
    pub counter_wraps: u64,
    /// Counter jumps beyond `max_device_watts`: treated as resets.
    pub implausible_readings: u64,
    /// Power samples that were negative or not finite, or repeated.
    pub rejected_power_samples: u64,
    /// Observations that arrived out of order but within the grace: sorted in.
    pub reordered_observations: u64,
    /// Observations older than what was already processed: ignored.
    pub late_observations: u64,
    /// Events for request ids the ledger does not know (never arrived, or already final).
    pub unknown_requests: u64,
    /// A second arrival with the same id.
    pub duplicate_requests: u64,
    /// A second end for the same request.
    pub duplicate_ends: u64,
    pub requests_open: u64,
    pub records_emitted: u64,
    /// Requests finalised while a device they used had stopped reporting.
    pub stale_finalisations: u64,
    /// Segments attributed while a request overlapping them was still open (`max_defer_ns`).
    pub forced_attributions: u64,
    /// Requests ended by the ledger after `max_open_ns`.
    pub expired_requests: u64,
    /// Split units where `auto`/`tokens` fell back to `equal` for lack of token counts.
    pub split_fallbacks: u64,
    /// Engine step ends seen over IPC (API process receiving the engine's per-step message).
    #[serde(default)]
    pub step_marks_ipc: u64,
    /// Engine step ends seen as CUDA synchronisations after kernel launches.
    #[serde(default)]
    pub step_marks_cuda: u64,
    /// Requests taken back as another's inner exchange (`Ledger::withdraw`).
    #[serde(default)]
    pub withdrawn: u64,
    /// Inner exchanges found after energy was attributed to them: kept as requests.
    #[serde(default)]
    pub withdraw_too_late: u64,
    /// Forwarded requests moved to the service their engine runs in, and those found too
    /// late for it (`Ledger::rehome`).
    #[serde(default)]
    pub rehomed: u64,
    #[serde(default)]
    pub rehome_too_late: u64,
}
