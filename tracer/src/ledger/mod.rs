//! The ledger: decides where every measured joule goes.
//!
//! Pure and deterministic: no I/O, no clock of its own, no randomness. The daemon pushes
//! observations (energy counters, power samples, device occupancy, request lifecycles) stamped
//! with `CLOCK_MONOTONIC` nanoseconds and calls [`Ledger::advance`] with the current time; the
//! ledger attributes every interval older than the grace period and returns the requests whose
//! energy is final.
//!
//! # Model
//!
//! 1. **Measured energy.** Readings of a device's cumulative energy counter are kept in time
//!    order and turned into *segments*: the energy between two counter *updates*. A repeated
//!    value means "not updated yet"; the update happened between the last unchanged read and
//!    the changing one. With the counter's update period known ([`Ledger::set_counter_period`]:
//!    100 ms for NVML on A100/H100) those bounds, projected by whole periods, intersect and pin
//!    each update down to a few milliseconds; without it the midpoint of the read gap is used.
//!    Wraps are undone with the counter's range; a decrease without one, or a jump beyond
//!    [`LedgerConfig::max_device_watts`], is a reset: an uncovered gap, never negative or
//!    invented energy. Devices without a counter integrate their power samples (each sample's
//!    window is measured, the time between windows is interpolated and carries its own error).
//! 2. **Idle.** Static power is configured per device, or learned as a low quantile of the
//!    power of segments with nothing in flight (falling back to a low quantile of all power
//!    samples) over a sliding window — not the minimum ever seen, which a single glitch or a
//!    state never reached again would pin forever. A device that is never idle while watched
//!    cannot be learned: the fallback is then an upper bound, flagged as
//!    [`IdleBasis::AllPower`] in [`DeviceTotals`] — configure idle for such devices. A
//!    segment's idle energy is `idle W × time`, capped at the measured energy, spread uniformly
//!    in time (it is static). The `tokens` split uses it once: under sustained load only the
//!    sum of static and busy power is identified, and what is time-sliced among requests is
//!    the part above idle (above half the fallback when idle is only that upper bound).
//! 3. **Shape.** The dynamic rest is spread over 10 ms slices by the instant-power curve (linear
//!    between samples placed at the middle of the window they average), uniformly without
//!    samples. When requests are in flight in only part of a segment, all of its dynamic energy
//!    goes to that part: with 25 ms power windows in 100 ms counter intervals the curve alone
//!    would smear a request's first and last steps into the idle time around it. (Not when an
//!    occupant has a weight: then the quiet part may be another process's work.)
//! 4. **Services.** At each slice, the services occupying the device share it by their
//!    occupancy weights (e.g. SM share) when every occupant has one — an occupant with nothing
//!    in flight then leaves its share unattributed — else equally among the services with
//!    requests in flight.
//! 5. **Requests.** Within a service, each segment's energy (per slice instead when power
//!    samples cover ≥ 80 % of it) is split among the requests in flight by the policy:
//!    - `equal`: time slicing; at each instant the requests in flight share equally.
//!    - `tokens`: in proportion to each request's predicted cost in the segment under a linear
//!      cost model fitted per (device, service) to the measured segments (`model.rs`):
//!      `busy W × its time share + b × its prefill tokens + c × its decode tokens + k × Σ its
//!      decode tokens × their context length`. Prefill tokens are the uncached prompt tokens,
//!      spread over the engine step that produced the first streamed event (from the
//!      service's previous step end, seen as the previous cluster of streamed events, to the
//!      first event; servers often send headers long before the first token, so the first
//!      response byte is only the fallback). Decode tokens are the streamed events after the
//!      first (scaled to the reported completion tokens), each spread over the time since the
//!      request's previous event: the step that produced it. Busy time is time-sliced, except
//!      that the part of a prefill step its prefills added (its length minus its neighbours')
//!      is theirs. Why: in continuous batching every step costs a shared part (weights read,
//!      kernels launched), a prefill part (compute-bound, per token, and the time it adds to
//!      the step) and a decode part per sequence that grows with its context (KV cache
//!      reads). The prices depend on the GPU, the model served and the batch size, so they
//!      are learned, not configured; only their ratios matter, and the measured energy is
//!      always what is split, so a poor fit costs accuracy, never conservation.
//!    - `bytes`: response bytes per second of the request's life; a fallback for non-LLM APIs.
//!    - `auto` (default): `tokens` where every request in the segment has the token counts the
//!      segment needs (prompt tokens during prefill; events or completion tokens during
//!      decode), else `equal` (counted in [`LedgerStats::split_fallbacks`]).
//! 6. **Idle policy.** `report`: requests carry only dynamic energy; idle stays on the device.
//!    `amortize` (default): the idle energy of slices with requests in flight is shared among
//!    them by the same weights and shown as each request's idle share; idle with nothing in
//!    flight stays on the device.
//! 7. **Nothing is lost.** Per device, `measured = Σ request dynamic + Σ request idle + idle +
//!    unattributed` over attributed segments, to rounding; dynamic energy with no request in
//!    flight (or of an occupant without requests) is "unattributed".
//!
//! # Watermarks
//!
//! [`Ledger::advance`]`(now)` sets the watermark to `now − grace_ns`. Sensor readings are
//! processed in time order up to the watermark, and only processed samples shape anything, so
//! out-of-order input within the grace is simply sorted in (property-tested); observations
//! older than the watermark are counted as late and ignored. A segment is attributed once it
//! ends before the watermark and every request overlapping it has ended (the split needs their
//! phases and token counts, which usage reports at the end) — or, after `max_defer_ns`, with
//! what is known so far. Records therefore lag by up to the longest request in flight (at most
//! `max_defer_ns`). A request is final once it has ended and every device its service uses has
//! attributed energy up to its end; a device that stopped reporting holds it for at most
//! `stale_ns`, and the missing time widens its error bar.
//!
//! # Uncertainty
//!
//! Each record's `uncertainty_j` (per device, summed over devices) combines:
//! - *sensor*: in the segments where the request starts or ends, `edge_factor` × its energy
//!   there (the shape inside a counter interval is modelled, not measured) plus its share of
//!   the segment's power × the update-time uncertainty of the segment's ends; energy that
//!   power-only devices interpolate between sample windows adds its own error;
//! - *coverage*: time of the request with no sensor data × the device's highest dynamic power
//!   seen × the request's mean share;
//! - *split, random*: the cost model's relative residual over recent segments × the request's
//!   model-split energy, per segment (independent from one segment to the next);
//! - *split, systematic*: `split_factor` × the difference between the request's energy under
//!   the policy used and under the alternative (`tokens` ↔ `equal`); when token counts were
//!   missing and `equal` was used by default, half its energy × (1 − its share); when idle is
//!   only the fallback upper bound, `idle_factor` × the difference to the split with idle 0 W.
//!
//! Sensor, coverage and random split errors are independent and add in quadrature; the
//! systematic split error adds linearly. The factors (0.15, 0.3, 1, 0.5) were calibrated with the
//! simulation test (`tests/ledger_sim.rs`): the bar holds the truth for 97–99 % of requests at
//! concurrency 1 to 32, with margin left for a world messier than the simulation.

mod attribute;
mod idle;
mod model;
mod sensor;
mod steps;

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use idle::IdleEstimator;

use model::CostModel;
use sensor::{CounterEvent, PowerCurve, PowerPoint, Push, Segment};

/// Joules per kWh.
const J_PER_KWH: f64 = 3.6e6;

pub use crate::ids::{DeviceId, RequestId, ServiceId};

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
    /// A low quantile of the power observed over a sliding window.
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

/// How requests of a service share a device's dynamic energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SplitPolicy {
    /// `tokens` where every request involved has token counts, else `equal`.
    #[default]
    Auto,
    /// Time slicing: requests in flight share equally at each instant.
    Equal,
    /// By predicted cost: busy time, prefill tokens, decode tokens (learned prices).
    Tokens,
    /// By response bytes per second.
    Bytes,
}

/// What happens to idle energy while requests are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    /// Requests carry dynamic energy only; idle is reported per device.
    Report,
    /// Idle energy while requests are in flight is shared among them.
    #[default]
    Amortize,
}

/// The `tokens` cost model's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostModelConfig {
    /// Memory of the fit: older segments weigh `exp(−age / window_ns)`.
    pub window_ns: u64,
    /// Before the data says otherwise, a prefill token costs this many decode tokens.
    pub prior_prefill_weight: f64,
    /// How many segments' worth of evidence the prior is worth.
    pub prior_strength: f64,
}

impl Default for CostModelConfig {
    fn default() -> Self {
        Self {
            window_ns: 600_000_000_000,
            prior_prefill_weight: 0.1,
            prior_strength: 0.1,
        }
    }
}

/// Error-bar settings (see the module docs; calibrated by the simulation test).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UncertaintyConfig {
    /// Fraction of a request's energy in a segment where it starts or ends.
    pub edge_factor: f64,
    /// Fraction of the difference to the alternative split policy.
    pub split_factor: f64,
    /// Multiplier on the cost model's relative residual.
    pub residual_factor: f64,
    /// Fraction of the split's sensitivity to an idle figure guessed from loaded power.
    pub idle_factor: f64,
}

impl Default for UncertaintyConfig {
    fn default() -> Self {
        Self {
            edge_factor: 0.15,
            split_factor: 0.3,
            residual_factor: 1.0,
            idle_factor: 0.5,
        }
    }
}

/// Ledger settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// How long to wait for late observations before attributing an interval.
    pub grace_ns: u64,
    /// Longest slice a segment is cut into for shaping and service shares.
    pub slice_ns: u64,
    pub split: SplitPolicy,
    pub idle: IdlePolicy,
    pub model: CostModelConfig,
    pub uncertainty: UncertaintyConfig,
    /// Attribution waits for open requests at most this long, then splits with what is known.
    pub max_defer_ns: u64,
    /// After this long without power data for a device, requests that used it are finalised
    /// with the gap counted in their uncertainty.
    pub stale_ns: u64,
    /// Requests open this long are ended as aborted (a lost close must not pin memory).
    pub max_open_ns: u64,
    /// A streamed event accounts for decode work at most this far back.
    pub decode_gap_cap_ns: u64,
    /// A service's events closer than this belong to one engine step (one write per
    /// connection, a fraction of a millisecond apart).
    pub step_merge_ns: u64,
    /// Counter jumps implying more than this are treated as resets.
    pub max_device_watts: f64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            grace_ns: 2_000_000_000,
            slice_ns: 10_000_000,
            split: SplitPolicy::Auto,
            idle: IdlePolicy::Amortize,
            model: CostModelConfig::default(),
            uncertainty: UncertaintyConfig::default(),
            max_defer_ns: 60_000_000_000,
            stale_ns: 30_000_000_000,
            max_open_ns: 3_600_000_000_000,
            decode_gap_cap_ns: 1_000_000_000,
            step_merge_ns: 2_000_000,
            max_device_watts: 10_000.0,
        }
    }
}

/// Errors the ledger reports to its caller (everything else is counted in [`LedgerStats`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// An observation names a device that was never registered.
    #[error("unknown device {0:?}")]
    UnknownDevice(DeviceId),
    /// A request id was used twice (the first request is kept).
    #[error("request {0:?} already exists")]
    DuplicateRequest(RequestId),
    /// A configuration value is out of range.
    #[error("invalid ledger configuration: {0}")]
    InvalidConfig(&'static str),
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
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
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
}

#[derive(Debug, Clone, Copy)]
struct Occupancy {
    service: ServiceId,
    from_ns: u64,
    to_ns: u64,
    weight: Option<f64>,
}

#[derive(Debug)]
struct Device {
    info: DeviceInfo,
    counter_period_ns: Option<u64>,
    /// Learned idle from every power observation: the fallback.
    idle: Option<IdleEstimator>,
    /// Learned idle from segments with nothing in flight: preferred.
    idle_quiet: Option<IdleEstimator>,
    counter: sensor::Counter,
    power: PowerCurve,
    segments: VecDeque<Segment>,
    occupancy: Vec<Occupancy>,
    /// Everything before this is attributed.
    attributed_ns: u64,
    /// Latest time sensor data covers.
    covered_until_ns: u64,
    gaps: Vec<(u64, u64)>,
    max_dyn_w: f64,
    totals: DeviceTotals,
    models: BTreeMap<ServiceId, CostModel>,
}

impl Device {
    /// Idle watts and where the figure comes from.
    fn idle_estimate(&self) -> (f64, IdleBasis) {
        match self.info.idle {
            IdleSource::Configured { watts } => (watts.max(0.0), IdleBasis::Configured),
            IdleSource::Learned { .. } => {
                if let Some(w) = self.idle_quiet.as_ref().and_then(IdleEstimator::watts) {
                    (w, IdleBasis::Quiet)
                } else if let Some(w) = self.idle.as_ref().and_then(IdleEstimator::watts) {
                    (w, IdleBasis::AllPower)
                } else {
                    (0.0, IdleBasis::Unknown)
                }
            }
        }
    }

    fn uses(&self, service: ServiceId) -> bool {
        self.occupancy.iter().any(|o| o.service == service)
    }
}

/// A request's running account on one device.
#[derive(Debug, Clone, Copy, Default)]
struct Account {
    dynamic_j: f64,
    idle_j: f64,
    /// Linear sum of edge errors.
    edge_j: f64,
    /// Σ of squared independent sensor errors (interpolated power).
    sensor_var: f64,
    /// Σ of squared random split errors.
    split_var: f64,
    /// Signed: energy under the alternative policy minus energy under the one used.
    split_diff_j: f64,
    /// Split by default (`equal` for lack of token counts): a positive bound.
    split_unknown_j: f64,
    /// Signed: energy had idle been 0 W minus energy with the idle guessed from loaded power
    /// (only while the device was never seen quiet).
    idle_diff_j: f64,
    /// Σ share × duration and Σ duration, for the mean share.
    share_ns: f64,
    present_ns: u64,
}

#[derive(Debug)]
struct Request {
    service: ServiceId,
    arrival: Arrival,
    first_byte_ns: Option<u64>,
    first_event_ns: Option<u64>,
    end_ns: Option<u64>,
    outcome: Outcome,
    completion_tokens: Option<u64>,
    /// Σ of event counts.
    events: u64,
    /// Event times and counts not yet pruned, in time order.
    times: VecDeque<(u64, u32)>,
    /// Time of the last pruned event (the start of the next event's window), if any, and Σ
    /// of the pruned events' counts.
    pruned_last_ns: Option<u64>,
    pruned_events: u64,
    /// Start of its prefill (the end of the service's engine step before its first event) and
    /// how much that step outlasted its neighbours; set once the first event is known.
    prefill_from_ns: Option<u64>,
    prefill_ext_ns: u64,
    response_bytes: u64,
    last_seen_ns: u64,
    accounts: BTreeMap<DeviceId, Account>,
}

impl Request {
    fn new(service: ServiceId, arrival: Arrival) -> Self {
        let ts = arrival.ts_ns;
        Self {
            service,
            arrival,
            first_byte_ns: None,
            first_event_ns: None,
            end_ns: None,
            outcome: Outcome::Complete,
            completion_tokens: None,
            events: 0,
            times: VecDeque::new(),
            pruned_last_ns: None,
            pruned_events: 0,
            prefill_from_ns: None,
            prefill_ext_ns: 0,
            response_bytes: 0,
            last_seen_ns: ts,
            accounts: BTreeMap::new(),
        }
    }

    fn end_or(&self, t: u64) -> u64 {
        self.end_ns.unwrap_or(t)
    }
}

/// The attribution engine. See the module docs for the model.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    devices: BTreeMap<DeviceId, Device>,
    requests: HashMap<RequestId, Request>,
    /// Requests not yet emitted, by service, in order of arrival registration.
    pending: BTreeMap<ServiceId, Vec<RequestId>>,
    /// Per service, the ends of its engine steps (clustered event times).
    steps: BTreeMap<ServiceId, steps::StepClock>,
    watermark_ns: u64,
    stats: LedgerStats,
    scratch: attribute::Scratch,
}

impl Ledger {
    /// A ledger with `config`.
    pub fn new(config: LedgerConfig) -> Result<Self, LedgerError> {
        if config.slice_ns == 0 {
            return Err(LedgerError::InvalidConfig("slice_ns must be > 0"));
        }
        let m = &config.model;
        if !(m.prior_prefill_weight.is_finite() && m.prior_prefill_weight >= 0.0) {
            return Err(LedgerError::InvalidConfig(
                "model.prior_prefill_weight must be >= 0",
            ));
        }
        if !(m.prior_strength.is_finite() && m.prior_strength > 0.0) || m.window_ns == 0 {
            return Err(LedgerError::InvalidConfig(
                "model.prior_strength and model.window_ns must be > 0",
            ));
        }
        let u = &config.uncertainty;
        if ![
            u.edge_factor,
            u.split_factor,
            u.residual_factor,
            u.idle_factor,
        ]
        .iter()
        .all(|f| f.is_finite() && *f >= 0.0)
        {
            return Err(LedgerError::InvalidConfig(
                "uncertainty factors must be >= 0",
            ));
        }
        if !(config.max_device_watts.is_finite() && config.max_device_watts > 0.0) {
            return Err(LedgerError::InvalidConfig("max_device_watts must be > 0"));
        }
        Ok(Self {
            config,
            devices: BTreeMap::new(),
            requests: HashMap::new(),
            pending: BTreeMap::new(),
            steps: BTreeMap::new(),
            watermark_ns: 0,
            stats: LedgerStats::default(),
            scratch: attribute::Scratch::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Registers a device, or re-describes one (its data and totals are kept).
    pub fn register_device(&mut self, id: DeviceId, info: DeviceInfo) {
        let idle = match info.idle {
            IdleSource::Learned {
                quantile,
                window_ns,
            } => Some(IdleEstimator::new(quantile, window_ns)),
            IdleSource::Configured { .. } => None,
        };
        if let Some(d) = self.devices.get_mut(&id) {
            if d.info.idle != info.idle {
                d.idle_quiet.clone_from(&idle);
                d.idle = idle;
            }
            d.info = info;
            return;
        }
        self.devices.insert(
            id,
            Device {
                info,
                counter_period_ns: None,
                idle_quiet: idle.clone(),
                idle,
                counter: sensor::Counter::default(),
                power: PowerCurve::default(),
                segments: VecDeque::new(),
                occupancy: Vec::new(),
                attributed_ns: self.watermark_ns,
                covered_until_ns: 0,
                gaps: Vec::new(),
                max_dyn_w: 0.0,
                totals: DeviceTotals::default(),
                models: BTreeMap::new(),
            },
        );
    }

    fn device(&mut self, id: DeviceId) -> Result<&mut Device, LedgerError> {
        self.devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))
    }

    /// How often the device's energy counter updates (NVML on A100/H100: 100 ms; RAPL: about
    /// 1 ms): sharpens the update-time estimates. `None` (the default): unknown.
    pub fn set_counter_period(
        &mut self,
        id: DeviceId,
        period_ns: Option<u64>,
    ) -> Result<(), LedgerError> {
        self.device(id)?.counter_period_ns = period_ns.filter(|&p| p > 0);
        Ok(())
    }

    /// A reading of a device's cumulative energy counter in microjoules (NVML's millijoules
    /// × 1000, RAPL's microjoules), read at `ts_ns`. `wrap_uj` is the counter's range when it
    /// wraps (RAPL `max_energy_range_uj`); `None` when it does not.
    pub fn counter(
        &mut self,
        id: DeviceId,
        ts_ns: u64,
        energy_uj: u64,
        wrap_uj: Option<u64>,
    ) -> Result<(), LedgerError> {
        let d = self
            .devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))?;
        if ts_ns < self.watermark_ns {
            self.stats.late_observations += 1;
            return Ok(());
        }
        match d.counter.push(ts_ns, energy_uj, wrap_uj) {
            Push::Late | Push::Repeat => self.stats.late_observations += 1,
            Push::Appended => self.stats.counter_readings += 1,
            Push::Reordered => {
                self.stats.counter_readings += 1;
                self.stats.reordered_observations += 1;
            }
        }
        Ok(())
    }

    /// A power sample: the mean of `watts` over `[ts_ns − window_ns, ts_ns]` (0 = instant).
    pub fn power(
        &mut self,
        id: DeviceId,
        ts_ns: u64,
        watts: f64,
        window_ns: u64,
    ) -> Result<(), LedgerError> {
        let d = self
            .devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))?;
        if !watts.is_finite() || watts < 0.0 {
            self.stats.rejected_power_samples += 1;
            return Ok(());
        }
        if ts_ns < self.watermark_ns {
            self.stats.late_observations += 1;
            return Ok(());
        }
        let p = PowerPoint {
            ts_ns,
            window_ns: window_ns.min(ts_ns),
            watts,
        };
        match d.power.push(p) {
            Push::Appended => self.stats.power_samples += 1,
            Push::Reordered => {
                self.stats.power_samples += 1;
                self.stats.reordered_observations += 1;
            }
            Push::Late => self.stats.late_observations += 1,
            Push::Repeat => self.stats.rejected_power_samples += 1,
        }
        Ok(())
    }

    /// `service` holds `device` from `ts_ns` (again: updates its weight). `weight`, e.g. its SM
    /// utilisation share, is used when every occupant has one.
    pub fn occupy(
        &mut self,
        device: DeviceId,
        service: ServiceId,
        ts_ns: u64,
        weight: Option<f64>,
    ) -> Result<(), LedgerError> {
        let weight = weight.filter(|w| w.is_finite()).map(|w| w.max(0.0));
        let d = self.device(device)?;
        if let Some(o) = d
            .occupancy
            .iter_mut()
            .rev()
            .find(|o| o.service == service && o.to_ns == u64::MAX)
        {
            if o.weight == weight {
                return Ok(());
            }
            o.to_ns = ts_ns.max(o.from_ns);
        }
        d.occupancy.push(Occupancy {
            service,
            from_ns: ts_ns,
            to_ns: u64::MAX,
            weight,
        });
        Ok(())
    }

    /// `service` stops holding `device` at `ts_ns`.
    pub fn release(
        &mut self,
        device: DeviceId,
        service: ServiceId,
        ts_ns: u64,
    ) -> Result<(), LedgerError> {
        let d = self.device(device)?;
        for o in &mut d.occupancy {
            if o.service == service && o.to_ns == u64::MAX {
                o.to_ns = ts_ns.max(o.from_ns);
            }
        }
        Ok(())
    }

    /// A request arrived (its first byte).
    pub fn arrive(
        &mut self,
        id: RequestId,
        service: ServiceId,
        arrival: Arrival,
    ) -> Result<(), LedgerError> {
        if self.requests.contains_key(&id) {
            self.stats.duplicate_requests += 1;
            return Err(LedgerError::DuplicateRequest(id));
        }
        if arrival.ts_ns < self.watermark_ns {
            self.stats.late_observations += 1;
        }
        self.requests.insert(id, Request::new(service, arrival));
        self.pending.entry(service).or_default().push(id);
        self.stats.requests_open += 1;
        Ok(())
    }

    fn request(&mut self, id: RequestId) -> Option<&mut Request> {
        let r = self.requests.get_mut(&id);
        if r.is_none() {
            self.stats.unknown_requests += 1;
        }
        r
    }

    /// The first response byte.
    pub fn first_byte(&mut self, id: RequestId, ts_ns: u64) {
        if let Some(r) = self.request(id) {
            r.first_byte_ns = Some(r.first_byte_ns.map_or(ts_ns, |f| f.min(ts_ns)));
            r.last_seen_ns = r.last_seen_ns.max(ts_ns);
        }
    }

    /// `n` streamed events (tokens, or groups of tokens) at `ts_ns`.
    pub fn events(&mut self, id: RequestId, ts_ns: u64, n: u64) {
        let Some(r) = self.requests.get_mut(&id) else {
            self.stats.unknown_requests += 1;
            return;
        };
        if r.pruned_last_ns.is_some_and(|p| ts_ns <= p) {
            // Its time was attributed already; it still counts as output.
            r.events += n;
            self.stats.late_observations += 1;
            return;
        }
        r.events += n;
        let item = (ts_ns, n.min(u64::from(u32::MAX)) as u32);
        match r.times.back() {
            Some(&(last, _)) if last > ts_ns => {
                let at = r.times.partition_point(|e| e.0 <= ts_ns);
                r.times.insert(at, item);
                self.stats.reordered_observations += 1;
            }
            _ => r.times.push_back(item),
        }
        r.first_event_ns = Some(r.first_event_ns.map_or(ts_ns, |f| f.min(ts_ns)));
        r.last_seen_ns = r.last_seen_ns.max(ts_ns);
        self.steps
            .entry(r.service)
            .or_default()
            .record(ts_ns, self.config.step_merge_ns);
    }

    /// Token counts reported by the server (usage); each `Some` overrides what was known.
    pub fn usage(
        &mut self,
        id: RequestId,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        cached_tokens: Option<u64>,
    ) {
        if let Some(r) = self.request(id) {
            if prompt_tokens.is_some() {
                r.arrival.prompt_tokens = prompt_tokens;
            }
            if cached_tokens.is_some() {
                r.arrival.cached_tokens = cached_tokens;
            }
            if completion_tokens.is_some() {
                r.completion_tokens = completion_tokens;
            }
        }
    }

    /// The request ended (last response byte, or close). `response_bytes` feeds `bytes`.
    pub fn end(&mut self, id: RequestId, ts_ns: u64, response_bytes: u64, outcome: Outcome) {
        let horizon = self.watermark_ns;
        let Some(r) = self.request(id) else {
            return;
        };
        if r.end_ns.is_some() {
            self.stats.duplicate_ends += 1;
            return;
        }
        r.end_ns = Some(ts_ns.max(r.arrival.ts_ns));
        r.response_bytes = response_bytes;
        r.outcome = outcome;
        r.last_seen_ns = r.last_seen_ns.max(ts_ns);
        if ts_ns < horizon {
            self.stats.late_observations += 1;
        }
    }

    /// Attributes everything older than `now_ns − grace_ns` and returns the requests that
    /// became final, in (end time, id) order.
    pub fn advance(&mut self, now_ns: u64) -> Vec<RequestRecord> {
        let watermark = now_ns.saturating_sub(self.config.grace_ns);
        self.watermark_ns = self.watermark_ns.max(watermark);
        let watermark = self.watermark_ns;
        self.expire(watermark);
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        for id in ids {
            self.ingest(id, watermark);
            self.attribute_device(id, watermark);
        }
        let out = self.finalise(watermark);
        self.prune();
        out
    }

    /// Ends every open request at its last activity and attributes and emits everything the
    /// sensors cover (shutdown). Devices that stopped reporting are treated as stale.
    pub fn finish(&mut self) -> Vec<RequestRecord> {
        let open: Vec<RequestId> = self
            .pending
            .values()
            .flatten()
            .copied()
            .filter(|id| self.requests.get(id).is_some_and(|r| r.end_ns.is_none()))
            .collect();
        for id in open {
            if let Some(r) = self.requests.get_mut(&id) {
                r.end_ns = Some(r.last_seen_ns);
                r.outcome = Outcome::Aborted;
            }
        }
        self.advance(u64::MAX)
    }

    /// Ends requests open longer than `max_open_ns`.
    fn expire(&mut self, watermark: u64) {
        let limit = self.config.max_open_ns;
        for ids in self.pending.values() {
            for id in ids {
                if let Some(r) = self.requests.get_mut(id)
                    && r.end_ns.is_none()
                    && watermark.saturating_sub(r.arrival.ts_ns) > limit
                {
                    r.end_ns = Some(r.last_seen_ns);
                    r.outcome = Outcome::Aborted;
                    self.stats.expired_requests += 1;
                }
            }
        }
    }

    /// Turns sensor readings up to the watermark into segments.
    fn ingest(&mut self, id: DeviceId, watermark: u64) {
        let max_w = self.config.max_device_watts;
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        let stats = &mut self.stats;
        let first_new = d.segments.len();
        d.counter.process(
            watermark,
            d.counter_period_ns,
            max_w,
            &mut d.segments,
            &mut d.gaps,
            |e| match e {
                CounterEvent::Wrap => stats.counter_wraps += 1,
                CounterEvent::Reset => stats.counter_resets += 1,
                CounterEvent::Implausible => stats.implausible_readings += 1,
                CounterEvent::Unchanged | CounterEvent::First | CounterEvent::Update => {}
            },
        );
        let integrate_before = d.counter.integrate_before();
        let idle = &mut d.idle;
        d.power.process(
            watermark,
            integrate_before,
            &mut d.segments,
            |p: &PowerPoint| {
                if let Some(e) = idle {
                    e.push(p.mid_ns(), p.watts);
                }
            },
        );
        // New segments must not overlap what is already covered (a counter that appears after
        // power-only integration began, or out-of-order power windows): trim them.
        let mut covered = d.covered_until_ns;
        let mut i = first_new;
        while i < d.segments.len() {
            let s = &mut d.segments[i];
            if s.end_ns <= covered {
                d.segments.remove(i);
                continue;
            }
            if s.start_ns < covered {
                let keep = (s.end_ns - covered) as f64 / (s.end_ns - s.start_ns) as f64;
                s.energy_j *= keep;
                s.interpolated_unc_j *= keep;
                s.start_ns = covered;
            }
            covered = s.end_ns;
            i += 1;
        }
        d.covered_until_ns = covered;
        d.totals.gap_ns = d.gaps.iter().map(|g| g.1 - g.0).sum();
    }

    /// Attributes the segments no open request still overlaps (or that waited long enough).
    fn attribute_device(&mut self, id: DeviceId, watermark: u64) {
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        // The earliest arrival among open requests of services on this device blocks
        // attribution from there on: their phases and token counts are not known yet.
        let mut blocked_from = u64::MAX;
        for o in &d.occupancy {
            if let Some(ids) = self.pending.get(&o.service) {
                for rid in ids {
                    if let Some(r) = self.requests.get(rid)
                        && r.end_ns.is_none()
                    {
                        blocked_from = blocked_from.min(r.arrival.ts_ns);
                    }
                }
            }
        }
        while let Some(s) = d.segments.front().copied() {
            if s.end_ns > watermark {
                break;
            }
            let forced = s.end_ns > blocked_from;
            if forced && s.end_ns.saturating_add(self.config.max_defer_ns) > watermark {
                break;
            }
            d.segments.pop_front();
            self.stats.forced_attributions += u64::from(forced);
            attribute::segment(
                attribute::Ctx {
                    dev_id: id,
                    config: &self.config,
                    pending: &self.pending,
                    steps: &self.steps,
                    stats: &mut self.stats,
                    scratch: &mut self.scratch,
                },
                d,
                &s,
                &mut self.requests,
            );
            d.attributed_ns = d.attributed_ns.max(s.end_ns);
        }
    }

    fn finalise(&mut self, watermark: u64) -> Vec<RequestRecord> {
        let mut done: Vec<(u64, RequestId)> = Vec::new();
        for ids in self.pending.values() {
            for rid in ids {
                let Some(r) = self.requests.get(rid) else {
                    continue;
                };
                let Some(end) = r.end_ns else {
                    continue;
                };
                if end > watermark {
                    continue;
                }
                let ready = self.devices.iter().all(|(dev_id, d)| {
                    let used = d.uses(r.service) || r.accounts.contains_key(dev_id);
                    !used
                        || d.attributed_ns >= end
                        || (d.covered_until_ns < end
                            && watermark.saturating_sub(end) >= self.config.stale_ns)
                });
                if ready {
                    done.push((end, *rid));
                }
            }
        }
        done.sort_unstable();
        let mut out = Vec::with_capacity(done.len());
        for (_, rid) in done {
            if let Some(r) = self.requests.remove(&rid) {
                if let Some(ids) = self.pending.get_mut(&r.service)
                    && let Some(pos) = ids.iter().position(|x| *x == rid)
                {
                    ids.remove(pos);
                }
                self.stats.requests_open = self.stats.requests_open.saturating_sub(1);
                self.stats.records_emitted += 1;
                out.push(self.record(rid, r));
            }
        }
        out
    }

    fn record(&mut self, id: RequestId, r: Request) -> RequestRecord {
        let end = r.end_or(r.last_seen_ns);
        let span = end.saturating_sub(r.arrival.ts_ns);
        let mut devices = Vec::new();
        let mut gap_total = 0;
        let mut stale = false;
        let u = &self.config.uncertainty;
        for (&dev_id, d) in &self.devices {
            let acc = r.accounts.get(&dev_id).copied();
            if acc.is_none() && !d.uses(r.service) {
                continue;
            }
            let acc = acc.unwrap_or_default();
            let gap_ns = (gaps_overlap(&d.gaps, r.arrival.ts_ns, end)
                + end
                    .saturating_sub(d.covered_until_ns.max(r.arrival.ts_ns))
                    .min(span))
            .min(span);
            if d.covered_until_ns < end {
                stale = true;
            }
            gap_total += gap_ns;
            let mean_share = if acc.present_ns > 0 {
                acc.share_ns / acc.present_ns as f64
            } else {
                1.0
            };
            let coverage_j = d.max_dyn_w * gap_ns as f64 * 1e-9 * mean_share;
            let sensor_j = acc.edge_j.hypot(acc.sensor_var.sqrt());
            let split_rand = acc.split_var.sqrt() * u.residual_factor;
            let split_sys = u.split_factor * acc.split_diff_j.abs()
                + acc.split_unknown_j
                + u.idle_factor * acc.idle_diff_j.abs();
            let uncertainty_j = sensor_j.hypot(coverage_j).hypot(split_rand) + split_sys;
            devices.push(DeviceShare {
                device: dev_id,
                name: d.info.name.clone(),
                kind: d.info.kind,
                estimated: d.info.estimated,
                dynamic_j: acc.dynamic_j,
                idle_j: acc.idle_j,
                uncertainty_j,
                sensor_j,
                coverage_j,
                split_j: split_rand + split_sys,
            });
        }
        if stale {
            self.stats.stale_finalisations += 1;
        }
        let dynamic_j: f64 = devices.iter().map(|s| s.dynamic_j).sum();
        let idle_j: f64 = devices.iter().map(|s| s.idle_j).sum();
        let total_j = dynamic_j + idle_j;
        let uncertainty_j = devices.iter().map(|s| s.uncertainty_j).sum();
        let out_tokens = r.completion_tokens.or((r.events > 0).then_some(r.events));
        RequestRecord {
            id,
            external_id: r.arrival.external_id,
            service: r.service,
            model: r.arrival.model,
            arrive_ns: r.arrival.ts_ns,
            first_byte_ns: r.first_byte_ns,
            first_event_ns: r.first_event_ns,
            end_ns: end,
            outcome: r.outcome,
            prompt_tokens: r.arrival.prompt_tokens,
            cached_tokens: r.arrival.cached_tokens,
            completion_tokens: r.completion_tokens,
            events: r.events,
            response_bytes: r.response_bytes,
            devices,
            dynamic_j,
            idle_j,
            total_j,
            kwh: total_j / J_PER_KWH,
            joules_per_output_token: out_tokens.filter(|&t| t > 0).map(|t| total_j / t as f64),
            uncertainty_j,
            coverage_gap_ns: gap_total,
        }
    }

    /// Drops state nothing can need any more: old power samples, occupancy, gaps, and event
    /// times of open requests before every device has attributed past them.
    fn prune(&mut self) {
        let oldest_pending = self
            .pending
            .values()
            .flatten()
            .filter_map(|id| self.requests.get(id))
            .map(|r| r.arrival.ts_ns)
            .min()
            .unwrap_or(u64::MAX);
        let mut horizon_by_service: BTreeMap<ServiceId, u64> = BTreeMap::new();
        for d in self.devices.values_mut() {
            let horizon = d.attributed_ns;
            d.power.prune(horizon);
            d.occupancy.retain(|o| o.to_ns >= horizon);
            d.gaps.retain(|g| g.1 >= oldest_pending.min(horizon));
            for o in &d.occupancy {
                let h = horizon_by_service.entry(o.service).or_insert(u64::MAX);
                *h = (*h).min(horizon);
            }
            (d.totals.idle_w, d.totals.idle_basis) = d.idle_estimate();
        }
        for (service, steps) in &mut self.steps {
            let oldest = self
                .pending
                .get(service)
                .into_iter()
                .flatten()
                .filter_map(|id| self.requests.get(id))
                .filter(|r| r.prefill_from_ns.is_none())
                .map(|r| r.arrival.ts_ns)
                .min()
                .unwrap_or(u64::MAX);
            steps.prune(oldest);
        }
        for (service, ids) in &self.pending {
            let Some(&h) = horizon_by_service.get(service) else {
                continue;
            };
            for id in ids {
                if let Some(r) = self.requests.get_mut(id)
                    && r.times.len() > 64
                {
                    while r.times.len() > 1 && r.times[0].0 < h {
                        if let Some((t, n)) = r.times.pop_front() {
                            r.pruned_last_ns = Some(t);
                            r.pruned_events += u64::from(n);
                        }
                    }
                }
            }
        }
    }

    /// Per-device totals over everything attributed so far.
    pub fn totals(&self) -> BTreeMap<DeviceId, DeviceTotals> {
        self.devices.iter().map(|(k, d)| (*k, d.totals)).collect()
    }

    /// Counters of everything unusual.
    pub fn stats(&self) -> LedgerStats {
        self.stats
    }

    /// The current watermark (everything before it is attributed or waiting on open requests).
    pub fn watermark_ns(&self) -> u64 {
        self.watermark_ns
    }

    /// The `tokens` cost model's current prices for a service on a device (explains splits;
    /// only their ratios matter).
    pub fn cost_model(&self, device: DeviceId, service: ServiceId) -> Option<CostPrices> {
        let b = self.devices.get(&device)?.models.get(&service)?.beta();
        Some(CostPrices {
            static_w: b[0],
            busy_w: b[1],
            prefill_j_per_token: b[2],
            decode_j_per_token: b[3],
            decode_context_j_per_token: b[4],
        })
    }
}

fn gaps_overlap(gaps: &[(u64, u64)], a: u64, b: u64) -> u64 {
    gaps.iter()
        .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)))
        .sum()
}

#[cfg(test)]
mod tests;
