//! The simulated GPU: what a step costs, in time and dynamic energy, as a function of the work
//! its requests bring (summed), and how a request's share of it is defined.
//!
//! The model is the simulation's own, not the ledger's: a step's time is a fixed weight read,
//! a little per sequence, compute for prefill tokens (and quadratic attention), and KV-cache
//! reads per decode token's context; its dynamic energy is a memory-bound floor power over that
//! time plus energy per prefill and decode token, a per-token decode energy that can fall with
//! the batch size, KV reads, and hidden per-token work (adapters, speculative decoding) that
//! nothing outside the GPU shows. Clocks can be lowered (thermal throttling: time / f, energy
//! × f²) and power capped (the clock drops until the step's power fits).
//!
//! **Shares.** A step's dynamic energy `C(W)` is a function of the summed work `W = Σ wᵢ`.
//! Each request in the step gets its Aumann–Shapley share, `Σ_d wᵢ[d] ∫₀¹ ∂_d C(tW) dt`:
//! the fair split of a cost shared by divisible contributions, which is the Shapley value
//! where the cost is a fixed part plus parts additive in requests (equal shares of the fixed
//! part, each its own additive part), and adds up to `C(W)` exactly. The integral is taken piecewise
//! between the kinks of `C` along the path (one sequence present; the power cap binding) with
//! Gauss–Legendre nodes, and the gradient by central differences.

/// What a request brings to a step; a step's work is the sum over its requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// Presence: 1 per request in the step.
    pub seqs: f64,
    /// Uncached prompt tokens computed.
    pub prefill: f64,
    /// Σ over those tokens of their position in the prompt, in thousands (attention work).
    pub attention: f64,
    /// Tokens decoded.
    pub decode: f64,
    /// Σ over decoded tokens of their context length, in thousands (KV-cache reads).
    pub context: f64,
    /// Hidden per-token work: tokens × (cost multiplier − 1).
    pub hidden: f64,
}

const DIMS: usize = 6;

impl Work {
    fn to_array(self) -> [f64; DIMS] {
        [
            self.seqs,
            self.prefill,
            self.attention,
            self.decode,
            self.context,
            self.hidden,
        ]
    }

    fn from_array(a: [f64; DIMS]) -> Self {
        Self {
            seqs: a[0],
            prefill: a[1],
            attention: a[2],
            decode: a[3],
            context: a[4],
            hidden: a[5],
        }
    }

    pub fn add(&mut self, o: &Work) {
        let (mut a, b) = (self.to_array(), o.to_array());
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
        *self = Self::from_array(a);
    }

    fn scaled(self, t: f64) -> Self {
        Self::from_array(self.to_array().map(|x| x * t))
    }
}

/// The GPU's physics.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub idle_w: f64,
    /// Power cap (board power, W), if any.
    pub cap_w: Option<f64>,
    pub t_fixed_s: f64,
    pub t_seq_s: f64,
    pub prefill_tok_per_s: f64,
    /// Seconds per thousand token-positions of attention.
    pub attention_s: f64,
    /// Seconds per thousand context tokens read.
    pub kv_s: f64,
    /// Dynamic power while a step runs (memory-bound floor), W.
    pub busy_w: f64,
    pub prefill_j: f64,
    pub decode_j: f64,
    /// Per-token decode energy × (1 + `decode_batch_shape` / batch): cheaper in big batches.
    pub decode_batch_shape: f64,
    /// Joules per thousand context tokens read.
    pub kv_j: f64,
    pub attention_j: f64,
    pub hidden_j: f64,
}

impl Default for Gpu {
    /// An H100-like board serving an 8B model.
    fn default() -> Self {
        Self {
            idle_w: 70.0,
            cap_w: None,
            t_fixed_s: 0.008,
            t_seq_s: 0.000_05,
            prefill_tok_per_s: 25_000.0,
            attention_s: 0.000_002,
            kv_s: 0.000_03,
            busy_w: 170.0,
            prefill_j: 0.012,
            decode_j: 0.05,
            decode_batch_shape: 0.0,
            kv_j: 0.004,
            attention_j: 0.0,
            hidden_j: 0.05,
        }
    }
}

impl Gpu {
    /// A step's (duration s, dynamic energy J) for `work`, at clock fraction `clock` (1: full).
    pub fn cost(&self, work: &Work, clock: f64) -> (f64, f64) {
        let (mut time_s, mut energy_j) = self.uncapped(work, clock);
        if let Some(room) = self.cap_room()
            && energy_j / time_s > room
        {
            // Power ∝ f³ at fixed work: the clock drops until the step fits under the cap.
            let slow = (room / (energy_j / time_s)).cbrt();
            time_s /= slow;
            energy_j *= slow * slow;
        }
        (time_s, energy_j)
    }

    /// Dynamic power the cap leaves above idle, if capped.
    fn cap_room(&self) -> Option<f64> {
        self.cap_w.map(|cap| (cap - self.idle_w).max(1.0))
    }

    /// As [`Gpu::cost`], before the power cap.
    fn uncapped(&self, work: &Work, clock: f64) -> (f64, f64) {
        if work.seqs <= 0.0 {
            return (0.0, 0.0);
        }
        let time_s = self.t_fixed_s * work.seqs.min(1.0)
            + self.t_seq_s * work.seqs
            + work.prefill / self.prefill_tok_per_s
            + self.attention_s * work.attention
            + self.kv_s * work.context;
        let per_decode = self.decode_j * (1.0 + self.decode_batch_shape / work.seqs.max(1.0));
        let energy_j = self.busy_w * time_s
            + self.prefill_j * work.prefill
            + self.attention_j * work.attention
            + per_decode * work.decode
            + self.kv_j * work.context
            + self.hidden_j * work.hidden;
        let clock = clock.clamp(0.05, 1.0);
        (time_s / clock, energy_j * clock * clock)
    }

    /// Each member's Aumann–Shapley share of the step's dynamic energy (see the module docs).
    pub fn shares(&self, members: &[Work], clock: f64) -> Vec<f64> {
        let mut total = Work::default();
        for m in members {
            total.add(m);
        }
        let prices = self.prices(&total, clock);
        members
            .iter()
            .map(|m| m.to_array().iter().zip(prices).map(|(x, p)| x * p).sum())
            .collect()
    }

    /// `∫₀¹ ∂_d C(tW) dt` for each dimension `d`.
    fn prices(&self, total: &Work, clock: f64) -> [f64; DIMS] {
        // Kinks along the path: one sequence present, and where the cap starts to bind.
        let mut cuts = vec![0.0, 1.0];
        if total.seqs > 1.0 {
            cuts.push(1.0 / total.seqs);
        }
        if let Some(room) = self.cap_room() {
            let binds = |t: f64| {
                let (d, e) = self.uncapped(&total.scaled(t), clock);
                d > 0.0 && e / d > room
            };
            if binds(1.0) {
                let (mut lo, mut hi) = (0.0, 1.0);
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if binds(mid) {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                cuts.push(hi);
            }
        }
        cuts.sort_by(f64::total_cmp);
        cuts.dedup();
        let base = total.to_array();
        let mut prices = [0.0; DIMS];
        for win in cuts.windows(2) {
            let (lo, hi) = (win[0], win[1]);
            for (node, wq) in GAUSS {
                let at_t = lo + (hi - lo) * (node + 1.0) / 2.0;
                let weight = wq * (hi - lo) / 2.0;
                for (d, p) in prices.iter_mut().enumerate() {
                    if base[d] == 0.0 {
                        continue;
                    }
                    let h = 1e-6 * base[d].abs().max(1e-3);
                    let at = |dx: f64| {
                        let mut v = base.map(|x| x * at_t);
                        v[d] += dx;
                        self.cost(&Work::from_array(v), clock).1
                    };
                    *p += weight * (at(h) - at(-h)) / (2.0 * h);
                }
            }
        }
        prices
    }

    /// The energy the step would have saved without `member` (its marginal energy).
    pub fn marginal(&self, members: &[Work], i: usize, clock: f64) -> f64 {
        let mut total = Work::default();
        let mut without = Work::default();
        for (k, m) in members.iter().enumerate() {
            total.add(m);
            if k != i {
                without.add(m);
            }
        }
        self.cost(&total, clock).1 - self.cost(&without, clock).1
    }
}

/// 8-point Gauss–Legendre nodes and weights on [-1, 1].
const GAUSS: [(f64, f64); 8] = [
    (-0.960_289_856_497_536_3, 0.101_228_536_290_376_26),
    (-0.796_666_477_413_626_7, 0.222_381_034_453_374_47),
    (-0.525_532_409_916_329, 0.313_706_645_877_887_3),
    (-0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.525_532_409_916_329, 0.313_706_645_877_887_3),
    (0.796_666_477_413_626_7, 0.222_381_034_453_374_47),
    (0.960_289_856_497_536_3, 0.101_228_536_290_376_26),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn member(prefill: f64, decode: f64, ctx: f64) -> Work {
        Work {
            seqs: 1.0,
            prefill,
            decode,
            context: ctx,
            ..Work::default()
        }
    }

    #[test]
    fn shares_add_up_to_the_step_whatever_its_shape() {
        let members = [
            member(500.0, 0.0, 0.0),
            member(0.0, 1.0, 1.2),
            member(0.0, 1.0, 0.3),
        ];
        for gpu in [
            Gpu::default(),
            Gpu {
                decode_batch_shape: 3.0,
                attention_j: 0.01,
                ..Gpu::default()
            },
            Gpu {
                cap_w: Some(200.0),
                ..Gpu::default()
            },
        ] {
            for clock in [1.0, 0.7] {
                let s = gpu.shares(&members, clock);
                let mut w = Work::default();
                for m in &members {
                    w.add(m);
                }
                let total = gpu.cost(&w, clock).1;
                let sum: f64 = s.iter().sum();
                assert!((sum - total).abs() < 1e-6 * total, "{sum} vs {total}");
            }
        }
    }

    #[test]
    fn a_fixed_cost_is_shared_equally_and_own_work_is_own() {
        // Two decoding requests with equal work: equal shares; a third with a prefill pays
        // the fixed part's third and its whole prefill.
        let gpu = Gpu::default();
        let members = [
            member(0.0, 1.0, 0.0),
            member(0.0, 1.0, 0.0),
            member(1000.0, 0.0, 0.0),
        ];
        let s = gpu.shares(&members, 1.0);
        assert!((s[0] - s[1]).abs() < 1e-9);
        let fixed = gpu.busy_w * gpu.t_fixed_s / 3.0;
        let seq = gpu.busy_w * gpu.t_seq_s;
        let own = gpu.busy_w * 1000.0 / gpu.prefill_tok_per_s + gpu.prefill_j * 1000.0;
        assert!(
            (s[2] - (fixed + seq + own)).abs() < 1e-6,
            "{} vs {}",
            s[2],
            fixed + seq + own
        );
    }
}
