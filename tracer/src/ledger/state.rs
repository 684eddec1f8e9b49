//! The ledger's working state: devices (sensor streams, occupancy, learned idle and cost
//! models), requests in flight, and their running accounts.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::{DeviceId, ServiceId};

use super::{
    idle::IdleEstimator,
    model::CostModel,
    sensor::{self, PowerCurve, Segment},
    steps::Chunk,
    types::{Arrival, DeviceInfo, DeviceTotals, IdleBasis, IdleSource, Outcome},
};

/// A service holding a device over `[from_ns, to_ns)` (`u64::MAX`: still holding).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct Occupancy {
    pub(super) service: ServiceId,
    pub(super) from_ns: u64,
    pub(super) to_ns: u64,
    pub(super) weight: Option<f64>,
}

/// A registered device: its sensor streams, what was made of them, and who holds it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Device {
    pub(super) info: DeviceInfo,
    pub(super) counter_period_ns: Option<u64>,
    /// Learned idle from every power observation: the fallback.
    pub(super) idle: Option<IdleEstimator>,
    /// Learned idle from segments with nothing in flight: preferred.
    pub(super) idle_quiet: Option<IdleEstimator>,
    pub(super) counter: sensor::Counter,
    pub(super) power: PowerCurve,
    pub(super) segments: VecDeque<Segment>,
    pub(super) occupancy: Vec<Occupancy>,
    /// Everything before this is attributed.
    pub(super) attributed_ns: u64,
    /// Latest time sensor data covers.
    pub(super) covered_until_ns: u64,
    pub(super) gaps: Vec<(u64, u64)>,
    pub(super) max_dyn_w: f64,
    pub(super) totals: DeviceTotals,
    pub(super) models: BTreeMap<ServiceId, CostModel>,
    /// The newest reading, for what the device draws now (display only: never attributed).
    #[serde(default)]
    pub(super) now: PowerNow,
    /// Idle an earlier run learned from quiet time (the store keeps it): used until this run
    /// has quiet time of its own, rather than the all-power fallback, which overestimates a
    /// device restarted under sustained load.
    #[serde(default)]
    pub(super) restored_idle_w: Option<f64>,
}

/// What a device draws now: its newest power sample, or the mean between its counter's two
/// newest distinct readings (a counter repeats its value between updates).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct PowerNow {
    /// `(ts_ns, watts)` of the newest estimate.
    pub(super) watts: Option<(u64, f64)>,
    /// `(ts_ns, µJ)` of the newest counter reading that changed the value.
    counter: Option<(u64, u64)>,
}

impl PowerNow {
    pub(super) fn sample(&mut self, ts_ns: u64, watts: f64) {
        if self.watts.is_none_or(|(t, _)| ts_ns >= t) {
            self.watts = Some((ts_ns, watts));
        }
    }

    pub(super) fn counter(&mut self, ts_ns: u64, uj: u64) {
        match self.counter {
            Some((t, v)) if ts_ns > t && uj > v => {
                let watts = (uj - v) as f64 / 1e6 / ((ts_ns - t) as f64 / 1e9);
                self.sample(ts_ns, watts);
                self.counter = Some((ts_ns, uj));
            }
            // Unchanged (between updates), older, or wrapped/reset: a new base only on the
            // latter.
            Some((t, v)) if ts_ns > t && uj == v => {}
            Some((t, _)) if ts_ns <= t => {}
            _ => self.counter = Some((ts_ns, uj)),
        }
    }
}

impl Device {
    /// Idle watts and where the figure comes from.
    pub(super) fn idle_estimate(&self) -> (f64, IdleBasis) {
        match self.info.idle {
            IdleSource::Configured { watts } => (watts.max(0.0), IdleBasis::Configured),
            IdleSource::Learned { .. } => {
                if let Some(w) = self.idle_quiet.as_ref().and_then(IdleEstimator::watts) {
                    (w, IdleBasis::Quiet)
                } else if let Some(w) = self.restored_idle_w {
                    (w, IdleBasis::Restored)
                } else if let Some(w) = self.idle.as_ref().and_then(IdleEstimator::watts) {
                    (w, IdleBasis::AllPower)
                } else {
                    (0.0, IdleBasis::Unknown)
                }
            }
        }
    }

    pub(super) fn uses(&self, service: ServiceId) -> bool {
        self.occupancy.iter().any(|o| o.service == service)
    }
}

/// A request's running account on one device.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Account {
    pub(super) dynamic_j: f64,
    pub(super) idle_j: f64,
    /// Linear sum of edge errors.
    pub(super) edge_j: f64,
    /// Σ of squared independent sensor errors (interpolated power).
    pub(super) sensor_var: f64,
    /// Σ of the split's model errors (the model's relative residual × the energy it split):
    /// summed, not in quadrature, as a request's own deviation from the model persists.
    pub(super) split_model_j: f64,
    /// Signed: energy under the alternative policy minus energy under the one used.
    pub(super) split_diff_j: f64,
    /// Split by default (`equal` for lack of token counts): a positive bound.
    pub(super) split_unknown_j: f64,
    /// Signed: energy had idle been 0 W minus energy with the idle guessed from loaded power
    /// (only while the device was never seen quiet).
    pub(super) idle_diff_j: f64,
    /// Its share of idle energy that may have been dynamic (idle only bounded, `report`).
    pub(super) idle_unknown_j: f64,
    /// Σ share × duration and Σ duration, for the mean share.
    pub(super) share_ns: f64,
    pub(super) present_ns: u64,
    /// Σ requests of its service in the split unit × duration, for the mean occupancy.
    pub(super) batch_ns: f64,
}

/// A request not yet emitted: what the wire said about it and its accounts per device.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Request {
    pub(super) service: ServiceId,
    pub(super) arrival: Arrival,
    pub(super) first_byte_ns: Option<u64>,
    pub(super) first_event_ns: Option<u64>,
    pub(super) end_ns: Option<u64>,
    pub(super) outcome: Outcome,
    pub(super) completion_tokens: Option<u64>,
    /// Σ of event counts.
    pub(super) events: u64,
    /// Event times and counts not yet pruned, in time order.
    pub(super) times: VecDeque<(u64, u32)>,
    /// Time of the last pruned event (the start of the next event's window), if any, and Σ
    /// of the pruned events' counts.
    pub(super) pruned_last_ns: Option<u64>,
    pub(super) pruned_events: u64,
    /// Start of its prefill (the end of the service's engine step before its first event, or
    /// of the earliest step a chunk of it stretched); set once the first event is known.
    pub(super) prefill_from_ns: Option<u64>,
    /// End of the step that finished it (at most the first event).
    pub(super) prefill_to_ns: Option<u64>,
    /// Its own part of the stretched steps its prefill ran in, in time order (see
    /// `prefills::allocate_prefills`).
    pub(super) prefill_chunks: Vec<Chunk>,
    /// Its chunks were placed (once every request that could share its steps was known).
    pub(super) prefill_placed: bool,
    /// Units of its that wait to be split again (see `warmup.rs`): not final until 0.
    pub(super) held_units: u32,
    pub(super) response_bytes: u64,
    pub(super) last_seen_ns: u64,
    pub(super) accounts: BTreeMap<DeviceId, Account>,
}

impl Request {
    /// What the pending indices key it by.
    pub(super) fn keys(&self) -> super::pending::Keys {
        super::pending::Keys {
            arrival_ns: self.arrival.ts_ns,
            end_ns: self.end_ns,
            placed: self.prefill_placed,
            evented: self.first_event_ns.is_some(),
        }
    }

    pub(super) fn new(service: ServiceId, arrival: Arrival) -> Self {
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
            prefill_to_ns: None,
            prefill_chunks: Vec::new(),
            prefill_placed: false,
            held_units: 0,
            response_bytes: 0,
            last_seen_ns: ts,
            accounts: BTreeMap::new(),
        }
    }

    /// Σ of its own parts of its prefill's steps (ns): the time its prefill added.
    pub(super) fn prefill_own_ns(&self) -> f64 {
        self.prefill_chunks.iter().map(|c| c.own_ns).sum()
    }

    pub(super) fn end_or(&self, t: u64) -> u64 {
        self.end_ns.unwrap_or(t)
    }
}
