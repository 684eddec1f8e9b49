//! The learned cost model behind the `tokens` split.
//!
//! A batched inference engine spends energy in three ways that requests can be charged for:
//! time the engine is busy (weights streamed from memory every step, kernels launched: shared by
//! whoever is in the batch), prefill tokens (compute-bound, per uncached prompt token) and decode
//! tokens (per sequence per step). Per (device, service) the ledger fits
//!
//! ```text
//! dynamic energy of a unit ≈ a · busy_s + b · prefill_tokens + c · decode_tokens
//!                            + k · Σ(decode token × its context length)
//! ```
//!
//! The last term is the KV cache a decode step reads for each sequence: long contexts make
//! decode tokens dearer.
//!
//! over recent attribution units (counter intervals) by non-negative least squares with
//! exponential forgetting, and splits each unit's *measured* energy among its requests in
//! proportion to their predicted costs. Only the ratios matter, so a wrong scale cannot break
//! conservation, and the fit adapts to the hardware, the model served and the batch sizes.
//!
//! The fit is on the unit's *total* energy with a static term `θ · duration` of its own, not
//! on measured minus idle: a device under sustained load is never seen idle, its learned idle is
//! then too high, and a fit on the remainder would price everything as prefill bursts.
//!
//! Where the data cannot tell terms apart (constant load: duration and busy time move together;
//! no prefill seen yet) a ridge term pulls the coefficients towards a prior: static power at the
//! idle estimate, no busy term, prefill tokens at `prior_prefill_weight` × a decode token,
//! scaled to the data. That prior is what `tokens` means before anything is learned.

/// Unit seconds, busy seconds, prefill tokens, decode tokens, decode tokens × context tokens.
pub(crate) type Features = [f64; N];

const N: usize = 5;

/// Online non-negative ridge regression of unit dynamic energy on [`Features`].
/// Learned sufficient statistics and coefficients; stored between runs (the store's `learned`
/// table) and given back to the ledger at start ([`super::Ledger::restore_model`]), so a
/// restart does not begin from the prior.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostModel {
    /// Decayed Gram matrix `XᵀX`.
    g: [[f64; N]; N],
    /// Decayed `Xᵀy`.
    xy: [f64; N],
    /// Decayed number of units.
    n: f64,
    /// Decayed Σ y².
    y2: f64,
    last_ns: u64,
    beta: [f64; N],
    /// Prior shape: static W (set from the idle estimate), busy, prefill, decode, context.
    prior: [f64; N],
    strength: f64,
    window_ns: f64,
}

impl CostModel {
    pub(crate) fn new(prior_prefill_weight: f64, strength: f64, window_ns: u64) -> Self {
        let prior = [0.0, 0.0, prior_prefill_weight, 1.0, 0.0];
        Self {
            g: [[0.0; N]; N],
            xy: [0.0; N],
            n: 0.0,
            y2: 0.0,
            last_ns: 0,
            beta: prior,
            prior,
            strength,
            window_ns: window_ns.max(1) as f64,
        }
    }

    /// Current coefficients (static W, busy W, J/prefill token, J/decode token, J/decode token
    /// per context token).
    pub(crate) fn beta(&self) -> [f64; N] {
        self.beta
    }

    /// How many units it has learned from (decayed with its window).
    pub(crate) fn units(&self) -> f64 {
        self.n
    }

    /// RMS of the fit's residual relative to the RMS of what it explains, over recent units:
    /// how well the model accounts for what the sensors measured, used as the random part of
    /// the split uncertainty.
    pub(crate) fn relative_residual(&self) -> f64 {
        if !(self.y2 > 0.0 && self.n >= 10.0) {
            // Nothing learned yet: the split is as uncertain as the prior is arbitrary.
            return 0.5;
        }
        let b = self.beta;
        let bxy: f64 = (0..N).map(|i| b[i] * self.xy[i]).sum();
        let bgb: f64 = (0..N)
            .map(|i| (0..N).map(|j| b[i] * self.g[i][j] * b[j]).sum::<f64>())
            .sum();
        let ss = (self.y2 - 2.0 * bxy + bgb).max(0.0);
        (ss / self.y2).sqrt().min(1.0)
    }

    /// Learns one unit that ended at `ts_ns`; `idle_w` is the device's current idle estimate
    /// (the static term's prior).
    pub(crate) fn learn(&mut self, ts_ns: u64, x: Features, y: f64, idle_w: f64) {
        if idle_w.is_finite() && idle_w >= 0.0 {
            self.prior[0] = idle_w;
        }
        if !(y.is_finite() && x.iter().all(|v| v.is_finite() && *v >= 0.0)) {
            return;
        }
        if x.iter().all(|v| *v == 0.0) {
            return;
        }
        let decay = if self.n > 0.0 && ts_ns > self.last_ns {
            (-((ts_ns - self.last_ns) as f64) / self.window_ns).exp()
        } else {
            1.0
        };
        self.last_ns = self.last_ns.max(ts_ns);
        for i in 0..N {
            for j in 0..N {
                self.g[i][j] *= decay;
            }
            self.xy[i] *= decay;
        }
        self.n *= decay;
        self.y2 *= decay;
        self.y2 += y * y;
        for i in 0..N {
            for j in 0..N {
                self.g[i][j] += x[i] * x[j];
            }
            self.xy[i] += x[i] * y;
        }
        self.n += 1.0;
        self.solve();
    }

    /// Ridge towards the prior scaled to the data, then non-negativity by an active set.
    #[expect(
        clippy::many_single_char_names,
        clippy::needless_range_loop,
        reason = "matrix algebra reads best with its own notation"
    )]
    fn solve(&mut self) {
        let p = self.prior;
        // The prior's scale for the work terms: 1-D least squares of (y − static prior) on the
        // prior's work prediction.
        let work = |v: &[f64; N]| -> f64 { (1..N).map(|i| p[i] * v[i]).sum() };
        let gp: f64 = (1..N)
            .map(|i| (1..N).map(|j| p[i] * self.g[i][j] * p[j]).sum::<f64>())
            .sum();
        let xp = work(&self.xy) - p[0] * (1..N).map(|j| self.g[0][j] * p[j]).sum::<f64>();
        let scale = if gp > 0.0 && xp > 0.0 { xp / gp } else { 1.0 };
        let mut target = p;
        for t in target.iter_mut().skip(1) {
            *t *= scale;
        }
        let n = self.n.max(1.0);
        let mut a = self.g;
        let mut b = self.xy;
        for i in 0..N {
            // Ridge worth `strength` units of typical magnitude in each feature's direction.
            let r = self.strength * (self.g[i][i] / n).max(1e-12);
            a[i][i] += r;
            b[i] += r * target[i];
        }
        let mut active = [true; N];
        for i in 0..N {
            if self.g[i][i] <= 0.0 {
                active[i] = false;
            }
        }
        for _ in 0..N {
            let Some(beta) = solve_subset(&a, &b, active) else {
                return;
            };
            let mut clamped = false;
            for i in 0..N {
                if active[i] && beta[i] < 0.0 {
                    active[i] = false;
                    clamped = true;
                }
            }
            if !clamped {
                // Directions the data never saw keep the prior (scaled), so a new kind of work
                // (first prefill after pure decoding) is not priced at zero.
                let mut out = beta;
                for i in 0..N {
                    if self.g[i][i] <= 0.0 {
                        out[i] = target[i];
                    }
                }
                self.beta = out;
                return;
            }
        }
    }
}

/// Solves the sub-system of `a x = b` over `active` indices (others 0) by Gaussian elimination.
#[expect(
    clippy::many_single_char_names,
    clippy::needless_range_loop,
    reason = "matrix algebra reads best with its own notation"
)]
fn solve_subset(a: &[[f64; N]; N], b: &[f64; N], active: [bool; N]) -> Option<[f64; N]> {
    let mut idx = [0usize; N];
    let mut k = 0;
    for i in 0..N {
        if active[i] {
            idx[k] = i;
            k += 1;
        }
    }
    let mut out = [0.0; N];
    if k == 0 {
        return Some(out);
    }
    let mut m = [[0.0f64; N + 1]; N];
    for r in 0..k {
        for c in 0..k {
            m[r][c] = a[idx[r]][idx[c]];
        }
        m[r][N] = b[idx[r]];
    }
    for col in 0..k {
        let pivot = (col..k).max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))?;
        if m[pivot][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, pivot);
        for r in 0..k {
            if r != col {
                let f = m[r][col] / m[col][col];
                for c in col..=N {
                    m[r][c] -= f * m[col][c];
                }
            }
        }
    }
    for r in 0..k {
        out[idx[r]] = m[r][N] / m[r][r];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::many_single_char_names, reason = "the model's coefficients")]
    fn recovers_a_linear_cost_model() {
        let mut m = CostModel::new(0.1, 0.1, 600_000_000_000);
        let (idle, a, b, c) = (90.0, 120.0, 0.015, 0.06);
        let mut s = 1u64;
        for i in 0..5_000u64 {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let busy = 0.1 * ((s >> 33) % 100) as f64 / 100.0;
            let pre = ((s >> 20) % 3000) as f64 * f64::from(u8::from(i % 3 == 0));
            let dec = ((s >> 40) % 200) as f64;
            let ctx = dec * ((s >> 50) % 4000) as f64;
            let y = idle * 0.1 + a * busy + b * pre + c * dec + 1e-5 * ctx;
            // A poor idle prior (as learned under sustained load) must not matter.
            m.learn(i * 100_000_000, [0.1, busy, pre, dec, ctx], y, 250.0);
        }
        let beta = m.beta();
        for (got, want) in beta.iter().zip([idle, a, b, c, 1e-5]) {
            assert!((got - want).abs() / want < 0.01, "{beta:?}");
        }
        assert!(m.relative_residual() < 0.01);
    }

    #[test]
    fn a_stored_model_comes_back_bit_for_bit_and_keeps_learning_alike() {
        let mut m = CostModel::new(0.1, 0.1, 600_000_000_000);
        for i in 0..50u64 {
            let x = [
                0.1,
                0.05 + (i % 3) as f64 * 0.01,
                (i % 5) as f64 * 30.0,
                10.0,
                900.0,
            ];
            m.learn(i * 100_000_000, x, 20.0 + (i % 7) as f64, 60.0);
        }
        let json = serde_json::to_string(&m).expect("json");
        let mut back: CostModel = serde_json::from_str(&json).expect("model");
        assert_eq!(back, m);
        let x = [0.1, 0.07, 64.0, 12.0, 1000.0];
        m.learn(6_000_000_000, x, 25.0, 60.0);
        back.learn(6_000_000_000, x, 25.0, 60.0);
        assert_eq!(back, m, "the same state learns the same");
        assert!(
            back.units() > 40.0,
            "warm after a restart: {}",
            back.units()
        );
    }

    #[test]
    fn collinear_data_keeps_the_prior_shape() {
        // Constant full load: busy time and decode tokens move together.
        let mut m = CostModel::new(0.1, 0.1, 600_000_000_000);
        for i in 0..100u64 {
            m.learn(i * 100_000_000, [0.1, 0.1, 0.0, 10.0, 5000.0], 30.0, 100.0);
        }
        let beta = m.beta();
        assert!(beta.iter().all(|b| *b >= 0.0), "{beta:?}");
        // The prefill direction was never seen: priced by the prior relative to decode.
        assert!(beta[2] > 0.0, "{beta:?}");
        let pred = beta[0] * 0.1 + beta[1] * 0.1 + beta[3] * 10.0;
        assert!((pred - 30.0).abs() < 1.0, "{beta:?}");
    }
}
