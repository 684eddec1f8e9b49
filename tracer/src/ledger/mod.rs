//! The ledger: decides where every measured joule goes.
//!
//! Pure and deterministic: no I/O, no clock of its own, no randomness. The daemon pushes
//! observations (energy counters, power samples, device occupancy, request lifecycles) stamped
//! with `CLOCK_MONOTONIC` nanoseconds and calls [`Ledger::advance`] with the current time; the
//! ledger attributes every interval that is older than the grace period and returns the requests
//! whose energy is final.
//!
//! # Model
//!
//! 1. **Measured energy.** Consecutive readings of a device's cumulative energy counter give the
//!    energy of the interval between the counter's *updates*. A reading equal to the previous one
//!    only tells us the update has not happened yet; when the value changes, the update time is
//!    estimated as the midpoint between the last unchanged read and this read (±half that gap is
//!    the timing uncertainty). Wraps are undone with the counter's range; a decrease without a
//!    range is a reset: the interval is an uncovered gap, never negative energy. Devices without a
//!    counter (power-only sensors, modelled CPU power) integrate their power samples instead.
//! 2. **Shape.** Each counter interval is cut into slices of at most `slice_ns` and its energy is
//!    spread over them by the instant-power curve (piecewise linear through the power samples,
//!    each placed at the middle of the window it averages), or uniformly when there is none.
//! 3. **Idle.** Each slice's idle energy is `idle_watts × duration`, capped at the slice's energy;
//!    idle watts are configured per device or learned as a low quantile of recent power.
//! 4. **Split.** At each slice's midpoint, the services occupying the device share its dynamic
//!    energy: by their occupancy weights when every occupant has one (e.g. SM utilisation), else
//!    equally among the services with requests in flight. Within a service, requests in flight
//!    share it by the split policy:
//!    - `equal`: each in-flight request weighs 1 (time slicing).
//!    - `tokens`: a request weighs its token *rate* in its current phase — during prefill
//!      (arrival → first response byte) `prefill_token_weight × (prompt − cached) / prefill
//!      time`, during decode `completion tokens / decode time` (completion tokens from usage, else
//!      streamed events). In continuous batching each step advances every decoding sequence by
//!      one token and processes prefill tokens of new sequences; a decode token costs a share of a
//!      memory-bound step while a prefill token is one of thousands in a compute-bound pass, hence
//!      the (configurable) weight below 1 for prefill tokens.
//!    - `bytes`: response bytes per second of response time; a fallback when no tokens are known.
//!    - `auto` (default): `tokens` when every request in the group has token counts, else `equal`.
//! 5. **Idle policy.** `report`: requests carry only dynamic energy, idle goes to the device's
//!    idle total. `amortize`: idle energy of slices with requests in flight is shared among them
//!    by the same weights and shown as each request's idle share; idle with nothing in flight
//!    stays in the device's idle total.
//! 6. **Nothing is lost.** Per device, `measured = Σ request dynamic + Σ request idle + idle +
//!    unattributed` for every attributed slice; dynamic energy with no request in flight (or of
//!    an occupant without requests) is "unattributed".
//!
//! # Watermarks
//!
//! [`Ledger::advance`]`(now)` sets the watermark to `now − grace_ns`. Slices are attributed once
//! they end before the watermark and every request that overlaps them has ended (the token
//! policy needs each request's phase durations). Input older than the attributed horizon is
//! counted as late and does not change attributed energy. A request is final once it has ended
//! and every device its service used has attributed energy up to its end — or, for a device that
//! stopped reporting, once `stale_ns` has passed (the gap then widens its error bar).
//!
//! # Uncertainty
//!
//! Each record's `uncertainty_j` combines, per device:
//! - *edges*: the request's start and end fall inside counter intervals whose internal shape is
//!   only known through the power samples; for every slice of such an interval the request's
//!   share × slice energy × (`edge_factor_shaped` or `edge_factor_uniform`), plus the counter
//!   update timing uncertainty (share × power × half the read gap);
//! - *coverage*: time of the request not covered by any counter interval × the device's highest
//!   dynamic power seen × the request's mean share;
//! - *split ambiguity*: the difference between the request's energy under the chosen policy and
//!   under the alternative one (equal ↔ tokens).
//!
//! Edges and coverage are independent errors and add in quadrature; split ambiguity is a model
//! error and adds linearly. The simulation test calibrates the factors (see BENCHMARKS.md).

mod idle;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use idle::IdleEstimator;

/// Joules per kWh.
const J_PER_KWH: f64 = 3.6e6;

/// A power-measured device (GPU, CPU package, DRAM domain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// A service: the set of processes serving one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceId(pub u32);

/// A request, as minted by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// What kind of device a power domain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Gpu,
    CpuPackage,
    Dram,
    Other,
}

/// Where a device's idle power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdleSource {
    /// A fixed figure (from a datasheet or a measurement of the idle host).
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: DeviceKind,
    /// The figures are modelled, not measured (e.g. CPU power from utilisation in a VM).
    pub estimated: bool,
    pub idle: IdleSource,
}

/// How requests of a service share a device's dynamic energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitPolicy {
    /// Tokens when every request in the group has token counts, else equal.
    #[default]
    Auto,
    Equal,
    Tokens,
    Bytes,
}

/// What happens to idle energy while requests are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    /// Requests carry dynamic energy only; idle is reported per device.
    Report,
    /// Idle energy while requests are in flight is shared among them.
    #[default]
    Amortize,
}

/// Ledger settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// How long to wait for late observations before attributing an interval.
    pub grace_ns: u64,
    /// Longest slice a counter interval is cut into.
    pub slice_ns: u64,
    pub split: SplitPolicy,
    pub idle: IdlePolicy,
    /// Cost of a prefill token relative to a decode token in the `tokens` policy.
    pub prefill_token_weight: f64,
    /// After this long without power data for a device, requests that used it are finalised
    /// with the gap counted in their uncertainty.
    pub stale_ns: u64,
    /// Edge uncertainty factor for counter intervals shaped by power samples.
    pub edge_factor_shaped: f64,
    /// Edge uncertainty factor for counter intervals spread uniformly.
    pub edge_factor_uniform: f64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            grace_ns: 2_000_000_000,
            slice_ns: 10_000_000,
            split: SplitPolicy::Auto,
            idle: IdlePolicy::Amortize,
            prefill_token_weight: 0.1,
            stale_ns: 30_000_000_000,
            edge_factor_shaped: 0.25,
            edge_factor_uniform: 0.5,
        }
    }
}

/// Errors the ledger reports to its caller (everything else is counted in [`LedgerStats`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// An observation names a device that was never registered.
    #[error("unknown device {0:?}")]
    UnknownDevice(DeviceId),
    /// A request id was used twice.
    #[error("request {0:?} already exists")]
    DuplicateRequest(RequestId),
    /// A configuration value is out of range.
    #[error("invalid ledger configuration: {0}")]
    InvalidConfig(&'static str),
}

/// What is known about a request when it arrives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// No response (client gone, or evicted).
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
    pub uncertainty_j: f64,
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
    pub joules_per_output_token: Option<f64>,
    pub uncertainty_j: f64,
    /// Part of the request's time on some device had no power data.
    pub coverage_gap_ns: u64,
}

/// Per-device energy totals over everything attributed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTotals {
    pub measured_j: f64,
    pub request_dynamic_j: f64,
    pub request_idle_j: f64,
    pub idle_j: f64,
    pub unattributed_j: f64,
    /// Time covered by attributed slices.
    pub covered_ns: u64,
    /// Gaps: resets, readings lost.
    pub gap_ns: u64,
}

impl DeviceTotals {
    /// `measured − (requests + idle + unattributed)`: zero up to rounding, by construction.
    pub fn imbalance_j(&self) -> f64 {
        self.measured_j
            - (self.request_dynamic_j + self.request_idle_j + self.idle_j + self.unattributed_j)
    }
}

/// Counted anomalies: nothing bad is silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStats {
    pub counter_readings: u64,
    pub power_samples: u64,
    /// Counter decreased without a known range: interval dropped, gap recorded.
    pub counter_resets: u64,
    pub counter_wraps: u64,
    /// Observations older than the attributed horizon.
    pub late_observations: u64,
    /// Events for request ids the ledger does not know.
    pub unknown_requests: u64,
    /// A second end for the same request.
    pub duplicate_ends: u64,
    pub requests_open: u64,
    pub records_emitted: u64,
    /// Requests finalised while a device they used had stopped reporting.
    pub stale_finalisations: u64,
}

#[derive(Debug, Clone, Copy)]
struct PowerPoint {
    ts_ns: u64,
    watts: f64,
}

/// A counter interval waiting to be sliced.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start_ns: u64,
    end_ns: u64,
    energy_j: f64,
    /// Timing uncertainty of the segment's end (half the read gap).
    tau_ns: u64,
}

/// A slice ready for attribution.
#[derive(Debug, Clone, Copy)]
struct Slice {
    start_ns: u64,
    end_ns: u64,
    energy_j: f64,
    idle_w: f64,
    seg_start_ns: u64,
    seg_end_ns: u64,
    tau_ns: u64,
    shaped: bool,
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
    /// Learned idle from every power observation: the fallback.
    idle: Option<IdleEstimator>,
    /// Learned idle from counter intervals with no request in flight: the better signal, since
    /// a busy server may never show a low quantile of its overall power.
    idle_quiet: Option<IdleEstimator>,
    // Counter state.
    last_value_uj: Option<u64>,
    wrap_uj: Option<u64>,
    /// Time of the last read that still showed `last_value_uj`.
    last_same_read_ns: u64,
    /// Estimated time of the last counter update.
    last_update_ns: Option<u64>,
    has_counter: bool,
    // Data waiting for the watermark.
    segments: VecDeque<Segment>,
    power: VecDeque<PowerPoint>,
    last_power_ns: u64,
    slices: VecDeque<Slice>,
    occupancy: Vec<Occupancy>,
    /// Everything before this is attributed.
    attributed_ns: u64,
    /// Latest time power data covers.
    covered_until_ns: u64,
    gaps: Vec<(u64, u64)>,
    max_dyn_w: f64,
    totals: DeviceTotals,
}

#[derive(Debug, Clone, Copy, Default)]
struct Account {
    dynamic_j: f64,
    idle_j: f64,
    edge_j: f64,
    /// Signed: energy under the alternative policy minus energy under the chosen one.
    split_diff_j: f64,
    /// Σ share × duration, for the mean share.
    share_ns: f64,
    covered_ns: u64,
}

#[derive(Debug)]
struct Request {
    service: ServiceId,
    arrival: Arrival,
    first_byte_ns: Option<u64>,
    end_ns: Option<u64>,
    outcome: Outcome,
    completion_tokens: Option<u64>,
    events: u64,
    /// Event times (and counts), for the local decode rate. Bounded: past the cap, the
    /// request's mean rate is used.
    event_times: Vec<(u64, u32)>,
    response_bytes: u64,
    accounts: BTreeMap<DeviceId, Account>,
}

/// Events kept per request for local rates.
const EVENT_TIMES_CAP: usize = 1 << 16;
/// Half-width of the window the local decode rate is measured over.
const RATE_HALF_WINDOW_NS: u64 = 150_000_000;

impl Request {
    fn end_or(&self, t: u64) -> u64 {
        self.end_ns.unwrap_or(t)
    }

    /// Tokens per second around `t`: continuous batching advances every decoding sequence once
    /// per step, so the local rate (not the request's mean rate) is what makes decoding requests
    /// weigh the same at the same moment. Scaled by tokens per event when events carry several.
    fn decode_rate(&self, t: u64, first: u64, end: u64, tokens: u64) -> f64 {
        let mean = tokens as f64 / ((end - first).max(1) as f64 * 1e-9);
        if self.events == 0
            || self.event_times.len() as u64 != self.events.min(EVENT_TIMES_CAP as u64)
        {
            return mean;
        }
        let a = t.saturating_sub(RATE_HALF_WINDOW_NS).max(first);
        let b = (t + RATE_HALF_WINDOW_NS).min(end);
        if b <= a {
            return mean;
        }
        let lo = self.event_times.partition_point(|e| e.0 <= a);
        let hi = self.event_times.partition_point(|e| e.0 <= b);
        let n: u64 = self.event_times[lo..hi]
            .iter()
            .map(|e| u64::from(e.1))
            .sum();
        let per_event = tokens as f64 / self.events as f64;
        let rate = n as f64 * per_event / ((b - a) as f64 * 1e-9);
        if rate > 0.0 { rate } else { mean * 0.5 }
    }

    /// Weight at `t` under `policy`, or None when the policy lacks the inputs it needs.
    fn weight(&self, t: u64, policy: SplitPolicy, prefill_w: f64) -> Option<f64> {
        let end = self.end_ns?;
        let arrive = self.arrival.ts_ns;
        let first = self.first_byte_ns.unwrap_or(end).clamp(arrive, end);
        let in_prefill = t < first;
        match policy {
            SplitPolicy::Equal | SplitPolicy::Auto => Some(1.0),
            SplitPolicy::Tokens => {
                if self.events == 0 {
                    // Not streamed: the tokens' timing is invisible, so the whole request is one
                    // phase of (weighted prefill + completion) tokens over its duration.
                    let completion = self.completion_tokens?;
                    let uncached = self
                        .arrival
                        .prompt_tokens
                        .unwrap_or(0)
                        .saturating_sub(self.arrival.cached_tokens.unwrap_or(0));
                    let dur = (end - arrive).max(1) as f64 * 1e-9;
                    return Some((prefill_w * uncached as f64 + completion as f64) / dur);
                }
                if in_prefill {
                    let prompt = self.arrival.prompt_tokens?;
                    let uncached = prompt.saturating_sub(self.arrival.cached_tokens.unwrap_or(0));
                    let dur = (first - arrive).max(1) as f64 * 1e-9;
                    Some(prefill_w * uncached as f64 / dur)
                } else {
                    let tokens = self
                        .completion_tokens
                        .or((self.events > 0).then_some(self.events))?;
                    Some(self.decode_rate(t, first, end, tokens))
                }
            }
            SplitPolicy::Bytes => {
                if self.response_bytes == 0 {
                    return None;
                }
                let dur = (end - arrive).max(1) as f64 * 1e-9;
                Some(self.response_bytes as f64 / dur)
            }
        }
    }
}

/// The attribution engine. See the module docs for the model.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    devices: BTreeMap<DeviceId, Device>,
    requests: HashMap<RequestId, Request>,
    /// Requests not yet emitted, by service, in arrival order of registration.
    pending: BTreeMap<ServiceId, BTreeSet<RequestId>>,
    /// Ended requests not yet emitted, by end time: finalisation looks only at these.
    ended: BTreeSet<(u64, RequestId)>,
    watermark_ns: u64,
    stats: LedgerStats,
}

impl Ledger {
    /// A ledger with `config`.
    pub fn new(config: LedgerConfig) -> Result<Self, LedgerError> {
        if config.slice_ns == 0 {
            return Err(LedgerError::InvalidConfig("slice_ns must be > 0"));
        }
        if !(config.prefill_token_weight.is_finite() && config.prefill_token_weight >= 0.0) {
            return Err(LedgerError::InvalidConfig(
                "prefill_token_weight must be >= 0",
            ));
        }
        Ok(Self {
            config,
            devices: BTreeMap::new(),
            requests: HashMap::new(),
            pending: BTreeMap::new(),
            ended: BTreeSet::new(),
            watermark_ns: 0,
            stats: LedgerStats::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Registers (or re-describes) a device.
    pub fn register_device(&mut self, id: DeviceId, info: DeviceInfo) {
        let idle = match info.idle {
            IdleSource::Learned {
                quantile,
                window_ns,
            } => Some(IdleEstimator::new(quantile, window_ns)),
            IdleSource::Configured { .. } => None,
        };
        if let Some(d) = self.devices.get_mut(&id) {
            d.info = info;
            d.idle_quiet.clone_from(&idle);
            d.idle = idle;
            return;
        }
        self.devices.insert(
            id,
            Device {
                info,
                idle_quiet: idle.clone(),
                idle,
                last_value_uj: None,
                wrap_uj: None,
                last_same_read_ns: 0,
                last_update_ns: None,
                has_counter: false,
                segments: VecDeque::new(),
                power: VecDeque::new(),
                last_power_ns: 0,
                slices: VecDeque::new(),
                occupancy: Vec::new(),
                attributed_ns: self.watermark_ns,
                covered_until_ns: 0,
                gaps: Vec::new(),
                max_dyn_w: 0.0,
                totals: DeviceTotals::default(),
            },
        );
    }

    fn device(&mut self, id: DeviceId) -> Result<&mut Device, LedgerError> {
        self.devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))
    }

    /// A reading of a device's cumulative energy counter (microjoules), read at `ts_ns`.
    /// `wrap_uj` is the counter's range when it wraps (RAPL, powercap); `None` when it does not.
    pub fn counter(
        &mut self,
        id: DeviceId,
        ts_ns: u64,
        energy_uj: u64,
        wrap_uj: Option<u64>,
    ) -> Result<(), LedgerError> {
        let horizon = self.watermark_ns;
        let d = self
            .devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))?;
        if ts_ns < horizon {
            self.stats.late_observations += 1;
            return Ok(());
        }
        d.has_counter = true;
        d.wrap_uj = wrap_uj;
        let Some(last) = d.last_value_uj else {
            d.last_value_uj = Some(energy_uj);
            d.last_same_read_ns = ts_ns;
            self.stats.counter_readings += 1;
            return Ok(());
        };
        if ts_ns < d.last_same_read_ns {
            self.stats.late_observations += 1;
            return Ok(());
        }
        self.stats.counter_readings += 1;
        if energy_uj == last {
            d.last_same_read_ns = ts_ns;
            return Ok(());
        }
        let delta_uj = if energy_uj > last {
            energy_uj - last
        } else if let Some(range) = wrap_uj.filter(|&r| r > last) {
            self.stats.counter_wraps += 1;
            range - last + energy_uj
        } else {
            // A reset: the energy since the last update is unknown.
            self.stats.counter_resets += 1;
            if let Some(prev) = d.last_update_ns {
                d.gaps.push((prev, ts_ns));
                d.totals.gap_ns += ts_ns - prev;
            }
            d.last_value_uj = Some(energy_uj);
            d.last_same_read_ns = ts_ns;
            d.last_update_ns = None;
            return Ok(());
        };
        // The update happened between the last unchanged read and this one.
        let update_ns = d.last_same_read_ns + (ts_ns - d.last_same_read_ns) / 2;
        let tau_ns = (ts_ns - d.last_same_read_ns) / 2;
        if let Some(prev) = d.last_update_ns
            && update_ns > prev
        {
            d.segments.push_back(Segment {
                start_ns: prev,
                end_ns: update_ns,
                energy_j: delta_uj as f64 * 1e-6,
                tau_ns,
            });
            d.covered_until_ns = d.covered_until_ns.max(update_ns);
        }
        d.last_update_ns = Some(update_ns);
        d.last_value_uj = Some(energy_uj);
        d.last_same_read_ns = ts_ns;
        Ok(())
    }

    /// A power sample: the average of `watts` over `[ts_ns − window_ns, ts_ns]` (0 = instant).
    pub fn power(
        &mut self,
        id: DeviceId,
        ts_ns: u64,
        watts: f64,
        window_ns: u64,
    ) -> Result<(), LedgerError> {
        let horizon = self.watermark_ns;
        let d = self
            .devices
            .get_mut(&id)
            .ok_or(LedgerError::UnknownDevice(id))?;
        let mid = ts_ns.saturating_sub(window_ns / 2);
        if !watts.is_finite() || watts < 0.0 || mid < d.last_power_ns || ts_ns < horizon {
            self.stats.late_observations += 1;
            return Ok(());
        }
        self.stats.power_samples += 1;
        if d.last_power_ns == mid && !d.power.is_empty() {
            // Same sample read twice (sensors update slower than they are polled).
            return Ok(());
        }
        d.last_power_ns = mid;
        d.power.push_back(PowerPoint { ts_ns: mid, watts });
        if let Some(e) = &mut d.idle {
            e.push(mid, watts);
        }
        if !d.has_counter
            && let Some(prev) = d.power.iter().rev().nth(1).copied()
        {
            // Power-only device: integrate the samples (trapezoid).
            d.segments.push_back(Segment {
                start_ns: prev.ts_ns,
                end_ns: mid,
                energy_j: f64::midpoint(prev.watts, watts) * (mid - prev.ts_ns) as f64 * 1e-9,
                tau_ns: window_ns / 2,
            });
            d.covered_until_ns = d.covered_until_ns.max(mid);
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
            return Err(LedgerError::DuplicateRequest(id));
        }
        if arrival.ts_ns < self.watermark_ns {
            self.stats.late_observations += 1;
        }
        self.requests.insert(
            id,
            Request {
                service,
                arrival,
                first_byte_ns: None,
                end_ns: None,
                outcome: Outcome::Complete,
                completion_tokens: None,
                events: 0,
                event_times: Vec::new(),
                response_bytes: 0,
                accounts: BTreeMap::new(),
            },
        );
        self.pending.entry(service).or_default().insert(id);
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
        if let Some(r) = self.request(id)
            && r.first_byte_ns.is_none()
        {
            r.first_byte_ns = Some(ts_ns);
        }
    }

    /// `n` streamed events (tokens, or groups of tokens) at `ts_ns`.
    pub fn events(&mut self, id: RequestId, ts_ns: u64, n: u64) {
        if let Some(r) = self.request(id) {
            r.events += n;
            if r.event_times.len() < EVENT_TIMES_CAP {
                r.event_times
                    .push((ts_ns, n.min(u64::from(u32::MAX)) as u32));
            }
            if r.first_byte_ns.is_none() {
                r.first_byte_ns = Some(ts_ns);
            }
        }
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

    /// The request ended (last response byte, or close).
    pub fn end(&mut self, id: RequestId, ts_ns: u64, response_bytes: u64, outcome: Outcome) {
        let horizon = self.watermark_ns;
        let Some(r) = self.request(id) else {
            return;
        };
        if r.end_ns.is_some() {
            self.stats.duplicate_ends += 1;
            return;
        }
        let end_ns = ts_ns.max(r.arrival.ts_ns);
        r.end_ns = Some(end_ns);
        r.response_bytes = response_bytes;
        r.outcome = outcome;
        self.ended.insert((end_ns, id));
        if ts_ns < horizon {
            self.stats.late_observations += 1;
        }
    }

    /// Attributes everything older than `now_ns − grace_ns` and returns the requests that
    /// became final, in (end time, id) order.
    pub fn advance(&mut self, now_ns: u64) -> Vec<RequestRecord> {
        let watermark = now_ns.saturating_sub(self.config.grace_ns);
        if watermark > self.watermark_ns {
            self.watermark_ns = watermark;
        }
        let watermark = self.watermark_ns;
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        for id in ids {
            self.slice_device(id, watermark);
            self.attribute_device(id, watermark);
        }
        self.finalise(watermark)
    }

    /// Cuts closed counter intervals into slices shaped by the power samples.
    fn slice_device(&mut self, id: DeviceId, watermark: u64) {
        let slice_ns = self.config.slice_ns;
        let (pending, requests) = (&self.pending, &self.requests);
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        while let Some(seg) = d.segments.front().copied() {
            if seg.end_ns > watermark {
                break;
            }
            d.segments.pop_front();
            let seg_w = seg.energy_j / ((seg.end_ns - seg.start_ns).max(1) as f64 * 1e-9);
            let quiet =
                !in_flight_during(&d.occupancy, pending, requests, seg.start_ns, seg.end_ns);
            if let (true, Some(e)) = (quiet, &mut d.idle_quiet) {
                e.push(seg.end_ns, seg_w);
            }
            let idle_w = match d.info.idle {
                IdleSource::Configured { watts } => watts,
                IdleSource::Learned { .. } => {
                    if d.power.is_empty()
                        && let Some(e) = &mut d.idle
                    {
                        e.push(seg.end_ns, seg_w);
                    }
                    d.idle_quiet
                        .as_ref()
                        .and_then(IdleEstimator::watts)
                        .or_else(|| d.idle.as_ref().and_then(IdleEstimator::watts))
                        .unwrap_or(0.0)
                }
            };
            let n = (seg.end_ns - seg.start_ns).div_ceil(slice_ns).max(1);
            let len = seg.end_ns - seg.start_ns;
            let bounds = |i: u64| (seg.start_ns + len * i / n, seg.start_ns + len * (i + 1) / n);
            let shaped = has_samples(&d.power, seg.start_ns, seg.end_ns);
            // Power curve energy per slice (uniform without samples).
            let shape: Vec<f64> = (0..n)
                .map(|i| {
                    let (a, b) = bounds(i);
                    power_at(&d.power, a + (b - a) / 2).unwrap_or(1.0) * (b - a) as f64 * 1e-9
                })
                .collect();
            // Activity-aware shaping: the idle floor is spread over the whole interval and the
            // energy above it over the slices where requests were in flight, in proportion to
            // the curve's excess over idle. Counter intervals are 100 ms long while power
            // samples cover 25 ms of them, so the curve alone smears a request's first and last
            // steps into the idle time around it.
            let active: Vec<bool> = (0..n)
                .map(|i| {
                    let (a, b) = bounds(i);
                    in_flight(&d.occupancy, pending, requests, a + (b - a) / 2)
                })
                .collect();
            let idle_floor = (idle_w * len as f64 * 1e-9).min(seg.energy_j);
            let mixed = active.iter().any(|&a| a) && active.iter().any(|&a| !a);
            let fractions: Vec<f64> = if mixed {
                let excess: Vec<f64> = (0..n)
                    .map(|i| {
                        let (a, b) = bounds(i);
                        let dt = (b - a) as f64 * 1e-9;
                        if active[i as usize] {
                            (shape[i as usize] - idle_w * dt).max(1e-3 * dt)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let excess_total: f64 = excess.iter().sum();
                (0..n)
                    .map(|i| {
                        let (a, b) = bounds(i);
                        let floor = idle_floor * (b - a) as f64 / len as f64;
                        (floor + (seg.energy_j - idle_floor) * excess[i as usize] / excess_total)
                            / seg.energy_j.max(f64::MIN_POSITIVE)
                    })
                    .collect()
            } else {
                let total: f64 = shape.iter().sum();
                shape
                    .iter()
                    .map(|w| {
                        if total > 0.0 {
                            w / total
                        } else {
                            1.0 / n as f64
                        }
                    })
                    .collect()
            };
            for (i, frac) in fractions.iter().enumerate() {
                let (a, b) = bounds(i as u64);
                d.slices.push_back(Slice {
                    start_ns: a,
                    end_ns: b,
                    energy_j: seg.energy_j * frac,
                    idle_w,
                    seg_start_ns: seg.start_ns,
                    seg_end_ns: seg.end_ns,
                    tau_ns: seg.tau_ns,
                    shaped,
                });
            }
            // Samples well before this segment no longer shape anything.
            while d.power.len() > 2 && d.power[1].ts_ns + 1_000_000_000 < seg.end_ns {
                d.power.pop_front();
            }
        }
    }

    /// Attributes the slices no open request still overlaps.
    fn attribute_device(&mut self, id: DeviceId, watermark: u64) {
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        // The earliest arrival among open requests of services that use this device blocks
        // attribution from there on (their phase durations are not known yet).
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
        while let Some(s) = d.slices.front().copied() {
            if s.end_ns > watermark || s.end_ns > blocked_from {
                break;
            }
            d.slices.pop_front();
            attribute_slice(id, d, &s, &self.config, &self.pending, &mut self.requests);
            d.attributed_ns = d.attributed_ns.max(s.end_ns);
        }
        // With no data at all, attribution still moves with the watermark (gaps, idle periods).
        if d.slices.is_empty() && d.segments.is_empty() {
            d.attributed_ns = d.attributed_ns.max(watermark.min(blocked_from));
        }
        // Occupancy intervals that ended before the attributed horizon are done.
        let horizon = d.attributed_ns;
        d.occupancy.retain(|o| o.to_ns >= horizon);
    }

    fn finalise(&mut self, watermark: u64) -> Vec<RequestRecord> {
        // Only requests that ended before the watermark can be final; they are few per call.
        let mut done: Vec<(u64, RequestId)> = Vec::new();
        for &(end, rid) in self.ended.range(..=(watermark, RequestId(u64::MAX))) {
            let Some(r) = self.requests.get(&rid) else {
                continue;
            };
            let ready = self.devices.iter().all(|(dev_id, d)| {
                let used = d.occupancy.iter().any(|o| o.service == r.service)
                    || r.accounts.contains_key(dev_id);
                !used
                    || d.attributed_ns >= end && d.covered_until_ns >= end
                    || watermark.saturating_sub(end) >= self.config.stale_ns
            });
            if ready {
                done.push((end, rid));
            }
        }
        let mut out = Vec::with_capacity(done.len());
        for (end, rid) in done {
            self.ended.remove(&(end, rid));
            if let Some(r) = self.requests.remove(&rid) {
                if let Some(ids) = self.pending.get_mut(&r.service) {
                    ids.remove(&rid);
                }
                self.stats.requests_open = self.stats.requests_open.saturating_sub(1);
                self.stats.records_emitted += 1;
                out.push(self.record(rid, r, watermark));
            }
        }
        out
    }

    fn record(&mut self, id: RequestId, r: Request, watermark: u64) -> RequestRecord {
        let end = r.end_or(watermark);
        let mut devices = Vec::new();
        let mut gap_total = 0;
        let mut stale = false;
        for (&dev_id, acc) in &r.accounts {
            let Some(d) = self.devices.get(&dev_id) else {
                continue;
            };
            let span = end.saturating_sub(r.arrival.ts_ns);
            let gap_ns = gaps_overlap(&d.gaps, r.arrival.ts_ns, end)
                + end
                    .saturating_sub(d.covered_until_ns.max(r.arrival.ts_ns))
                    .min(span);
            if d.covered_until_ns < end {
                stale = true;
            }
            gap_total += gap_ns;
            let mean_share = if acc.covered_ns > 0 {
                acc.share_ns / acc.covered_ns as f64
            } else {
                1.0
            };
            let coverage_j = d.max_dyn_w * gap_ns as f64 * 1e-9 * mean_share;
            let uncertainty_j = acc.edge_j.hypot(coverage_j) + acc.split_diff_j.abs();
            devices.push(DeviceShare {
                device: dev_id,
                name: d.info.name.clone(),
                kind: d.info.kind,
                estimated: d.info.estimated,
                dynamic_j: acc.dynamic_j,
                idle_j: acc.idle_j,
                uncertainty_j,
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
}

/// Whether any request of a service occupying the device is in flight at `t`.
fn in_flight(
    occupancy: &[Occupancy],
    pending: &BTreeMap<ServiceId, BTreeSet<RequestId>>,
    requests: &HashMap<RequestId, Request>,
    t: u64,
) -> bool {
    occupancy
        .iter()
        .filter(|o| o.from_ns <= t && t < o.to_ns)
        .any(|o| {
            pending.get(&o.service).is_some_and(|ids| {
                ids.iter().any(|rid| {
                    requests
                        .get(rid)
                        .is_some_and(|r| r.arrival.ts_ns <= t && t < r.end_or(u64::MAX))
                })
            })
        })
}

/// Whether any request of a service occupying the device is in flight at some time in `[a, b)`.
fn in_flight_during(
    occupancy: &[Occupancy],
    pending: &BTreeMap<ServiceId, BTreeSet<RequestId>>,
    requests: &HashMap<RequestId, Request>,
    a: u64,
    b: u64,
) -> bool {
    occupancy
        .iter()
        .filter(|o| o.from_ns < b && a < o.to_ns)
        .any(|o| {
            pending.get(&o.service).is_some_and(|ids| {
                ids.iter().any(|rid| {
                    requests
                        .get(rid)
                        .is_some_and(|r| r.arrival.ts_ns < b && a < r.end_or(u64::MAX))
                })
            })
        })
}

/// Whether any power sample falls within a second of `[a, b]`.
fn has_samples(power: &VecDeque<PowerPoint>, a: u64, b: u64) -> bool {
    power
        .iter()
        .any(|p| p.ts_ns + 1_000_000_000 >= a && p.ts_ns <= b + 1_000_000_000)
}

/// The instant-power curve at `t`: linear between samples, flat beyond the ends. `None` when
/// there is no sample within a second (then the caller spreads uniformly).
fn power_at(power: &VecDeque<PowerPoint>, t: u64) -> Option<f64> {
    const NEAR: u64 = 1_000_000_000;
    let idx = power.partition_point(|p| p.ts_ns <= t);
    let after = power.get(idx);
    let before = idx.checked_sub(1).and_then(|i| power.get(i));
    match (before, after) {
        (Some(a), Some(b)) => {
            let span = (b.ts_ns - a.ts_ns).max(1) as f64;
            let f = (t - a.ts_ns) as f64 / span;
            Some(a.watts + (b.watts - a.watts) * f)
        }
        (Some(a), None) if t - a.ts_ns <= NEAR => Some(a.watts),
        (None, Some(b)) if b.ts_ns - t <= NEAR => Some(b.watts),
        _ => None,
    }
    .map(|w| w.max(1e-3))
}

fn gaps_overlap(gaps: &[(u64, u64)], a: u64, b: u64) -> u64 {
    gaps.iter()
        .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)))
        .sum()
}

/// The alternative policy used to measure split ambiguity.
fn alternative(policy: SplitPolicy) -> SplitPolicy {
    match policy {
        SplitPolicy::Equal | SplitPolicy::Bytes => SplitPolicy::Tokens,
        SplitPolicy::Tokens | SplitPolicy::Auto => SplitPolicy::Equal,
    }
}

/// Weights of `reqs` at `t` under `policy`, falling back to equal when any lacks the inputs
/// (that is what `auto` means; an explicit policy without inputs degrades the same way).
fn weights(
    reqs: &[(RequestId, &Request)],
    t: u64,
    policy: SplitPolicy,
    prefill_w: f64,
    out: &mut Vec<f64>,
) -> SplitPolicy {
    out.clear();
    let wanted = if policy == SplitPolicy::Auto {
        SplitPolicy::Tokens
    } else {
        policy
    };
    for (_, r) in reqs {
        match r.weight(t, wanted, prefill_w) {
            Some(w) if w.is_finite() => out.push(w),
            _ => {
                out.clear();
                out.resize(reqs.len(), 1.0);
                return SplitPolicy::Equal;
            }
        }
    }
    if out.iter().sum::<f64>() <= 0.0 {
        out.fill(1.0);
        return SplitPolicy::Equal;
    }
    wanted
}

#[allow(clippy::many_single_char_names)]
fn attribute_slice(
    dev_id: DeviceId,
    d: &mut Device,
    s: &Slice,
    config: &LedgerConfig,
    pending: &BTreeMap<ServiceId, BTreeSet<RequestId>>,
    requests: &mut HashMap<RequestId, Request>,
) {
    let dt_ns = s.end_ns - s.start_ns;
    let dt = dt_ns as f64 * 1e-9;
    let t = s.start_ns + dt_ns / 2;
    let idle_j = (s.idle_w * dt).min(s.energy_j).max(0.0);
    let dyn_j = s.energy_j - idle_j;
    d.totals.measured_j += s.energy_j;
    d.totals.covered_ns += dt_ns;
    if dt > 0.0 {
        d.max_dyn_w = d.max_dyn_w.max(dyn_j / dt);
    }

    // Occupants at t and their in-flight requests.
    let mut groups: Vec<(Option<f64>, Vec<RequestId>)> = Vec::new();
    for o in &d.occupancy {
        if o.from_ns > t || o.to_ns <= t {
            continue;
        }
        let active: Vec<RequestId> = pending
            .get(&o.service)
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|rid| {
                        requests
                            .get(rid)
                            .is_some_and(|r| r.arrival.ts_ns <= t && t < r.end_or(u64::MAX))
                    })
                    .collect()
            })
            .unwrap_or_default();
        groups.push((o.weight, active));
    }
    let all_weighted = !groups.is_empty() && groups.iter().all(|(w, _)| w.is_some());
    let service_weights: Vec<f64> = if all_weighted {
        groups
            .iter()
            .map(|(w, _)| w.unwrap_or(0.0).max(0.0))
            .collect()
    } else {
        groups
            .iter()
            .map(|(_, a)| if a.is_empty() { 0.0 } else { 1.0 })
            .collect()
    };
    let total_w: f64 = service_weights.iter().sum();
    if total_w <= 0.0 {
        d.totals.idle_j += idle_j;
        d.totals.unattributed_j += dyn_j;
        return;
    }

    let amortize = config.idle == IdlePolicy::Amortize;
    let mut attributed_dyn = 0.0;
    let mut attributed_idle = 0.0;
    let mut w = Vec::new();
    let mut w_alt = Vec::new();
    for ((_, active), sw) in groups.iter().zip(&service_weights) {
        let share_s = sw / total_w;
        if active.is_empty() || share_s <= 0.0 {
            continue;
        }
        let reqs: Vec<(RequestId, &Request)> = active
            .iter()
            .filter_map(|rid| requests.get(rid).map(|r| (*rid, r)))
            .collect();
        let used = weights(&reqs, t, config.split, config.prefill_token_weight, &mut w);
        weights(
            &reqs,
            t,
            alternative(used),
            config.prefill_token_weight,
            &mut w_alt,
        );
        let sum: f64 = w.iter().sum();
        let sum_alt: f64 = w_alt.iter().sum();
        let energy_for_split = dyn_j + if amortize { idle_j } else { 0.0 };
        let ids: Vec<RequestId> = reqs.iter().map(|(id, _)| *id).collect();
        for (i, rid) in ids.iter().enumerate() {
            let share = share_s * w[i] / sum;
            let share_alt = share_s * w_alt[i] / sum_alt;
            let Some(r) = requests.get_mut(rid) else {
                continue;
            };
            let in_segment = |x: u64| (s.seg_start_ns..=s.seg_end_ns).contains(&x);
            let edge = in_segment(r.arrival.ts_ns) || in_segment(r.end_or(u64::MAX));
            let acc = r.accounts.entry(dev_id).or_default();
            acc.dynamic_j += share * dyn_j;
            attributed_dyn += share * dyn_j;
            if amortize {
                acc.idle_j += share * idle_j;
                attributed_idle += share * idle_j;
            }
            acc.split_diff_j += (share_alt - share) * energy_for_split;
            acc.share_ns += share * dt_ns as f64;
            acc.covered_ns += dt_ns;
            if edge {
                let factor = if s.shaped {
                    config.edge_factor_shaped
                } else {
                    config.edge_factor_uniform
                };
                let seg_len = (s.seg_end_ns - s.seg_start_ns).max(1) as f64;
                acc.edge_j += share * energy_for_split * (factor + s.tau_ns as f64 / seg_len);
            }
        }
    }
    d.totals.request_dynamic_j += attributed_dyn;
    d.totals.request_idle_j += attributed_idle;
    d.totals.unattributed_j += dyn_j - attributed_dyn;
    d.totals.idle_j += idle_j - attributed_idle;
}

#[cfg(test)]
mod tests;
