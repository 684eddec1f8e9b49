//! The step time a decode sequence's context adds, and whose it is.
//!
//! A decode step reads every sequence's KV cache: the longer a sequence's context, the longer
//! the step (on a memory-bound GPU, at the same power). By the written convention that time is
//! the sequence's own, as a prefill's extension of its step is — time-slicing it would charge
//! short prompts for long ones. The cost model cannot learn it per counter interval: under
//! load an interval is busy throughout whatever the contexts, so the time shows up as busy
//! time, not as a price per context token.
//!
//! So it is measured where it shows: in the engine's decode steps. Per service, each step
//! without a prefill in it gives (sequences in it, Σ their context tokens, its length), and the
//! slope of length on context is fitted by least squares **within each batch size** (each
//! number of sequences has its own intercept), so no function of the batch size — per-sequence
//! work, a kernel choice that changes with the batch — can pass for context. The slope is used
//! only where the data shows it (t ≥ [`MIN_T`]); else no step time is given to contexts.

use std::collections::{BTreeMap, HashMap};

use crate::ids::RequestId;

use super::{
    features::{Feat, prompt_tokens},
    presence::pauses,
    state::Request,
    steps::{Step, StepClock, StepClockPolicy},
};

/// Weight of a step `k` steps old: `FORGET^k` (a memory of a few thousand steps).
const FORGET: f64 = 1.0 - 1.0 / 8192.0;
/// Steps (decayed) before the slope is used.
const MIN_STEPS: f64 = 200.0;
/// The slope must be this many standard errors above 0 to be used.
const MIN_T: f64 = 4.0;
/// The slope is refitted every this many steps.
const REFIT_EVERY: u64 = 32;
/// Batch sizes kept apart (larger ones share the last).
const MAX_SEQS: usize = 1024;
/// Steps are grouped by batch size within periods this long: the clock of a GPU that throttles
/// or hits its power cap drifts with load, and so do contexts.
const PERIOD_NS: u64 = 5_000_000_000;
/// Groups kept at most (the oldest go first).
const MAX_GROUPS: usize = 4096;
/// Groups lighter than this (decayed steps) are forgotten.
const MIN_GROUP_W: f64 = 1e-2;

/// One batch size's decayed moments of (context tokens `x`, step length ns `y`).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    yy: f64,
    /// The step count these are decayed to.
    at: u64,
}

impl Moments {
    fn decay_to(&mut self, k: u64) {
        let age = k.saturating_sub(self.at);
        if age > 0 {
            let f = FORGET.powf(age as f64);
            for v in [
                &mut self.w,
                &mut self.x,
                &mut self.y,
                &mut self.xx,
                &mut self.xy,
                &mut self.yy,
            ] {
                *v *= f;
            }
            self.at = k;
        }
    }

    /// Centred sums: `(Sxx, Sxy, Syy)`.
    fn centred(&self) -> (f64, f64, f64) {
        if self.w <= 0.0 {
            return (0.0, 0.0, 0.0);
        }
        (
            (self.xx - self.x * self.x / self.w).max(0.0),
            self.xy - self.x * self.y / self.w,
            (self.yy - self.y * self.y / self.w).max(0.0),
        )
    }
}

/// The fit of a service's decode step length on its sequences' context (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ContextTime {
    /// Keyed by (period, batch size).
    groups: BTreeMap<(u64, usize), Moments>,
    steps: u64,
    /// Steps ending before this are learned (a service on several devices is seen once).
    learned_until_ns: u64,
    ns_per_token: Option<f64>,
}

impl ContextTime {
    /// Where learning resumes: steps ending at or before this were learned.
    pub(crate) fn learned_until_ns(&self) -> u64 {
        self.learned_until_ns
    }

    /// A decode step ending at `to_ns` that lasted `len_ns`, with `seqs` sequences whose
    /// contexts sum to `context_tokens`.
    pub(crate) fn learn(&mut self, to_ns: u64, seqs: usize, context_tokens: f64, len_ns: u64) {
        if to_ns <= self.learned_until_ns || seqs == 0 || !context_tokens.is_finite() {
            return;
        }
        self.learned_until_ns = to_ns;
        self.steps += 1;
        let k = self.steps;
        let g = self
            .groups
            .entry((to_ns / PERIOD_NS, seqs.min(MAX_SEQS)))
            .or_default();
        g.decay_to(k);
        let (x, y) = (context_tokens, len_ns as f64);
        g.w += 1.0;
        g.x += x;
        g.y += y;
        g.xx += x * x;
        g.xy += x * y;
        g.yy += y * y;
        if k.is_multiple_of(REFIT_EVERY) {
            self.refit();
        }
    }

    fn refit(&mut self) {
        let now = self.steps;
        let (mut sxx, mut sxy, mut syy, mut w) = (0.0, 0.0, 0.0, 0.0);
        let mut groups = 0.0;
        self.groups.retain(|_, g| {
            g.decay_to(now);
            g.w >= MIN_GROUP_W
        });
        while self.groups.len() > MAX_GROUPS {
            self.groups.pop_first();
        }
        for g in self.groups.values() {
            let (a, b, c) = g.centred();
            sxx += a;
            sxy += b;
            syy += c;
            w += g.w;
            groups += 1.0;
        }
        let dof = w - groups - 1.0;
        self.ns_per_token = None;
        if w < MIN_STEPS || dof < 1.0 || sxx <= 0.0 {
            return;
        }
        let slope = sxy / sxx;
        let resid = (syy - slope * sxy).max(0.0) / dof;
        let se = (resid / sxx).sqrt();
        if slope > 0.0 && slope >= MIN_T * se {
            self.ns_per_token = Some(slope);
        }
    }

    /// Step ns each context token of a decoding sequence adds, where the data shows it.
    pub(crate) fn ns_per_token(&self) -> Option<f64> {
        self.ns_per_token
    }
}

/// Moves the time a unit's decode contexts added to its steps from the time-sliced share to
/// the requests whose contexts they were: each gets `ns_per_token` × Σ its steps' context, and
/// gives back its time-sliced part of the unit's total (`plain_s` / `busy_s`). Σ `time_s` is
/// unchanged.
pub(super) fn own_context_time(feats: &mut [Feat], ns_per_token: f64, busy_s: f64) {
    if !(busy_s > 0.0 && ns_per_token > 0.0) {
        return;
    }
    let s_per_token = ns_per_token * 1e-9;
    let total: f64 = feats.iter().map(|f| f.step_ctx).sum::<f64>() * s_per_token;
    // Never more than most of the busy time: a step's fixed part is nobody's own.
    let scale = (0.9 * busy_s / total).min(1.0);
    if !(total > 0.0 && scale.is_finite()) {
        return;
    }
    for f in feats {
        let own = f.step_ctx * s_per_token * scale;
        f.time_s = (f.time_s + own - total * scale * f.plain_s / busy_s).max(0.0);
    }
}

/// A request in the engine around the steps being learned, and its time there.
pub(super) type Member = (RequestId, (u64, u64));

/// The decode steps of a service that ended in `(from, to]` (after those already learned) as
/// `(end, sequences, Σ context tokens, length)` samples for [`ContextTime::learn`]. A step is
/// left out when a request was in prefill in it, or was in the engine for only part of it (its
/// membership is not clear); a paused request is not in it.
pub(super) fn decode_steps(
    clock: &StepClock,
    policy: StepClockPolicy,
    (from, to): (u64, u64),
    (members, requests): (&[Member], &HashMap<RequestId, Request>),
    buf: &mut Vec<(u64, u64)>,
    out: &mut Vec<(u64, usize, f64, u64)>,
) {
    let from = from.max(clock.context.learned_until_ns());
    'steps: for s in clock.steps_ending(from, to, policy) {
        let (mut seqs, mut ctx) = (0usize, 0.0);
        for (id, engine) in members {
            let Some(r) = requests.get(id) else {
                continue;
            };
            let (a, b) = *engine;
            if a >= s.to_ns || b <= s.from_ns {
                continue;
            }
            if a > s.from_ns || b < s.to_ns || r.prefill_to_ns.is_none_or(|p| p >= s.to_ns) {
                continue 'steps;
            }
            buf.clear();
            let (p0, p1) = pauses(r, Some(clock), policy, (s.from_ns, s.to_ns), buf);
            if p1 > p0 {
                continue;
            }
            seqs += 1;
            ctx += context_at(r, clock, s, *engine);
        }
        if seqs > 0 {
            out.push((s.to_ns, seqs, ctx, s.len_ns()));
        }
    }
}

/// The request's context in step `s`: its prompt and the tokens it generated before.
fn context_at(r: &Request, clock: &StepClock, step: Step, (from, to): (u64, u64)) -> f64 {
    let prompt = prompt_tokens(r, Some(clock));
    let generated = if r.first_event_ns.is_some() {
        let per_event = match r.completion_tokens {
            Some(t) if r.events > 0 => t as f64 / r.events as f64,
            _ => 1.0,
        };
        let i = r.times.partition_point(|e| e.0 < step.to_ns);
        let before = r.pruned_events + r.times.range(..i).map(|e| u64::from(e.1)).sum::<u64>();
        before as f64 * per_event
    } else {
        // Not streamed: its tokens spread evenly over its time in the engine.
        let tokens = r.completion_tokens.unwrap_or(0) as f64;
        tokens * step.from_ns.saturating_sub(from) as f64 / to.saturating_sub(from).max(1) as f64
    };
    prompt + generated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ctx_ns: f64, batch_ns: impl Fn(usize) -> f64) -> Option<f64> {
        run_drifting(ctx_ns, batch_ns, |_| 0.0)
    }

    /// Steps of 10 ms; `drift_ns` slows them with time (throttling), contexts grow with time.
    fn run_drifting(
        ctx_ns: f64,
        batch_ns: impl Fn(usize) -> f64,
        drift_ns: impl Fn(f64) -> f64,
    ) -> Option<f64> {
        let mut c = ContextTime::default();
        let mut s = 7u64;
        for i in 0..4000u64 {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let n = 1 + ((s >> 33) % 32) as usize;
            // Contexts grow with the batch (confounded) and vary within it.
            let age = i as f64 / 4000.0;
            let ctx = n as f64 * (500.0 + ((s >> 45) % 1500) as f64 + 2000.0 * age);
            let noise = ((s >> 20) % 1000) as f64 * 200.0;
            let len = 8e6 + batch_ns(n) + ctx_ns * ctx + noise + drift_ns(age);
            c.learn((i + 1) * 10_000_000, n, ctx, len as u64);
        }
        c.ns_per_token()
    }

    #[test]
    fn recovers_the_context_slope() {
        let got = run(30.0, |n| 50_000.0 * n as f64).expect("slope seen");
        assert!((got - 30.0).abs() < 1.5, "{got}");
    }

    #[test]
    fn a_nonlinear_batch_cost_is_not_taken_for_context() {
        // Step time jumps with the batch size (kernel choices), no context term at all.
        let got = run(0.0, |n| if n > 16 { 3e6 } else { 1e5 * (n * n) as f64 });
        assert_eq!(got, None);
    }

    fn feat(time_s: f64, step_ctx: f64) -> Feat {
        Feat {
            cand: 0,
            a: 0,
            b: 100_000_000,
            time_s,
            plain_s: time_s,
            prefill: 0.0,
            decode: 10.0,
            decode_ctx: step_ctx,
            step_ctx,
            chunks: (0, 0),
            pauses: (0, 0),
            tokens_known: true,
            bytes_rate: None,
        }
    }

    #[test]
    fn a_clock_that_slows_down_is_not_taken_for_context() {
        // Steps 2 ms longer by the end, as contexts grow by 2,000 tokens a sequence: fitted
        // over the whole run that would read as ~60 ns per token; within periods of 5 s (0.25
        // ms of drift) little is left.
        let got = run_drifting(0.0, |n| 50_000.0 * n as f64, |age| 2e6 * age);
        assert!(got.is_none_or(|g| g < 2.0), "{got:?}");
        let got = run_drifting(30.0, |n| 50_000.0 * n as f64, |age| 2e6 * age);
        assert!(got.is_some_and(|g| (g - 30.0).abs() < 3.0), "{got:?}");
    }

    #[test]
    fn a_long_context_owns_the_step_time_it_adds() {
        // Two sequences in the same ten steps of 10 ms: contexts 4,000 and 100 tokens at
        // 100 ns each add 0.4 ms and 0.01 ms to every step.
        let mut f = [feat(0.05, 40_000.0), feat(0.05, 1_000.0)];
        own_context_time(&mut f, 100.0, 0.1);
        let total: f64 = f.iter().map(|f| f.time_s).sum();
        assert!((total - 0.1).abs() < 1e-12, "{total}");
        // Each: half of the 95.9 ms the contexts did not add, plus its own.
        assert!(
            (f[0].time_s - (0.047_95 + 0.004)).abs() < 1e-9,
            "{}",
            f[0].time_s
        );
        assert!(
            (f[1].time_s - (0.047_95 + 0.000_1)).abs() < 1e-9,
            "{}",
            f[1].time_s
        );
    }

    #[test]
    fn each_step_is_learned_once() {
        let mut c = ContextTime::default();
        c.learn(10, 2, 100.0, 5);
        c.learn(10, 2, 100.0, 5);
        c.learn(5, 2, 100.0, 5);
        assert_eq!(c.steps, 1);
        assert_eq!(c.learned_until_ns(), 10);
    }
}
