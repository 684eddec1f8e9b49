//! The fit of a service's decode step length on its sequences' context (see `ledger/context.rs`
//! for why and how it is used).

use std::collections::BTreeMap;

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
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
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
    fn each_step_is_learned_once() {
        let mut c = ContextTime::default();
        c.learn(10, 2, 100.0, 5);
        c.learn(10, 2, 100.0, 5);
        c.learn(5, 2, 100.0, 5);
        assert_eq!(c.steps, 1);
        assert_eq!(c.learned_until_ns(), 10);
    }
}
