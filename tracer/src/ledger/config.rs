//! The ledger's settings and the errors it reports to its caller.

use serde::{Deserialize, Serialize};

use super::steps::StepClockPolicy;
use crate::ids::{DeviceId, RequestId};

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
    /// Units split before the model has learned from this many are split again once it has
    /// (or `max_defer_ns` after them): the prior's prices are far off (see `warmup.rs`).
    pub warmup_units: f64,
}

impl Default for CostModelConfig {
    fn default() -> Self {
        Self {
            window_ns: 600_000_000_000,
            prior_prefill_weight: 0.1,
            prior_strength: 0.1,
            warmup_units: 30.0,
        }
    }
}

/// Error-bar settings (see the module docs). The defaults are fitted on the out-of-family
/// simulation's tuning scenarios: the narrowest bars holding 95 % of their requests
/// (`tests/outfamily.rs`, `bars_are_fitted_on_the_tuning_scenarios`).
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
            edge_factor: 0.05,
            split_factor: 0.05,
            residual_factor: 2.5,
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
    /// Which engine step clock the split uses (see `steps.rs`).
    pub step_clock: StepClockPolicy,
    /// The write-burst clock's window until it has learned one from the gaps between a
    /// request's events (a server writes a step's chunks one connection after the other).
    pub step_merge_ns: u64,
    /// The learned write-burst window is never wider than this.
    pub burst_window_max_ns: u64,
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
            step_clock: StepClockPolicy::Auto,
            step_merge_ns: 2_000_000,
            burst_window_max_ns: 50_000_000,
            max_device_watts: 10_000.0,
        }
    }
}

/// Errors the ledger reports to its caller (everything else is counted in
/// [`LedgerStats`](super::LedgerStats)).
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
