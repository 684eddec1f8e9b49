//! The split policies: how one service's energy in a unit is divided among its requests.
//!
//! One function per [`SplitPolicy`] behind [`weights`]: adding a policy is one variant and one
//! function here. Each fills the weights it splits by and, where there is one, the alternative
//! policy's weights (the systematic split error is the difference between the two).

use super::{config::SplitPolicy, features::Feat};

/// The `tokens` split's prices in one unit (the cost model's, with busy power taken above idle).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct Prices {
    /// Power above idle that goes with time, time-sliced among the requests in flight.
    pub busy_w: f64,
    pub prefill_j_per_token: f64,
    pub decode_j_per_token: f64,
    /// Extra per decode token per token of context.
    pub decode_context_j_per_token: f64,
}

impl Prices {
    /// A request's predicted cost in the unit.
    pub(super) fn cost(&self, f: &Feat) -> f64 {
        self.busy_w * f.time_s
            + self.prefill_j_per_token * f.prefill
            + self.decode_j_per_token * f.decode
            + self.decode_context_j_per_token * f.decode_ctx
    }
}

/// Per request of the unit, in [`Feat`] order (buffers reused from unit to unit).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Weights {
    /// What the energy is split by.
    pub w: Vec<f64>,
    /// The alternative policy's weights; empty when there is none.
    pub alt: Vec<f64>,
}

/// What [`weights`] decided.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct WeightsOutcome {
    /// Σ of the weights: positive and finite, unless nothing can be split.
    pub sum: f64,
    /// The weights are the cost model's predictions (its misfit is a random split error).
    pub used_model: bool,
    /// The policy lacked what it needs and split by time (counted when requests share a unit).
    pub fallback: bool,
}

/// What a policy's weights rest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Basis {
    /// Its own measure (time, response bytes).
    Measure,
    /// The cost model.
    Model,
    /// Time, for lack of what it needs.
    Fallback,
}

/// Fills `out` with the weights of `policy` for the requests in `feats`. Weights that do not
/// sum to a positive finite number are replaced by time shares, without alternative.
pub(super) fn weights(
    policy: SplitPolicy,
    feats: &[Feat],
    prices: &Prices,
    out: &mut Weights,
) -> WeightsOutcome {
    out.w.clear();
    out.alt.clear();
    let basis = match policy {
        SplitPolicy::Equal => equal(feats, prices, out),
        SplitPolicy::Auto | SplitPolicy::Tokens => tokens(feats, prices, out),
        SplitPolicy::Bytes => bytes(feats, out),
    };
    let mut used_model = basis == Basis::Model;
    let mut sum: f64 = out.w.iter().sum();
    if !(sum > 0.0 && sum.is_finite()) {
        out.w.clear();
        out.w.extend(feats.iter().map(|f| f.plain_s));
        out.alt.clear();
        used_model = false;
        sum = out.w.iter().sum();
    }
    WeightsOutcome {
        sum,
        used_model,
        fallback: basis == Basis::Fallback && feats.len() > 1,
    }
}

/// `equal`: plain time slicing among the requests in the engine. The alternative is `tokens`
/// where the token counts are known.
fn equal(feats: &[Feat], prices: &Prices, out: &mut Weights) -> Basis {
    out.w.extend(feats.iter().map(|f| f.plain_s));
    if feats.iter().all(|f| f.tokens_known) {
        out.alt.extend(feats.iter().map(|f| prices.cost(f)));
    }
    Basis::Measure
}

/// `tokens` (and `auto`): by predicted cost where every request has the token counts the unit
/// needs, against time slicing; else time slicing.
fn tokens(feats: &[Feat], prices: &Prices, out: &mut Weights) -> Basis {
    if feats.iter().all(|f| f.tokens_known) {
        out.w.extend(feats.iter().map(|f| prices.cost(f)));
        out.alt.extend(feats.iter().map(|f| f.plain_s));
        Basis::Model
    } else {
        out.w.extend(feats.iter().map(|f| f.plain_s));
        Basis::Fallback
    }
}

/// `bytes`: response bytes per second of each request's life × its time in the unit, against
/// time slicing; time slicing when a request has no byte rate yet.
fn bytes(feats: &[Feat], out: &mut Weights) -> Basis {
    if feats.iter().all(|f| f.bytes_rate.is_some()) {
        out.w.extend(
            feats
                .iter()
                .map(|f| f.bytes_rate.unwrap_or(0.0) * (f.b - f.a) as f64 * 1e-9),
        );
        out.alt.extend(feats.iter().map(|f| f.plain_s));
        Basis::Measure
    } else {
        out.w.extend(feats.iter().map(|f| f.plain_s));
        Basis::Fallback
    }
}
