//! The power model of an emulated GPU running an LLM engine.
//!
//! # Model
//!
//! The GPU draws `idle_w` whenever it is powered. An engine *step* (one forward pass over the
//! current batch) additionally costs dynamic energy:
//!
//! ```text
//! duration  = step_overhead_s + decode_s_per_seq * n_decode_tokens + prefill_s_per_token * n_prefill
//! dynamic_J = step_base_w * duration                      (weights streamed, kernels launched)
//!           + decode_j_per_token  * n_decode_tokens       (per-sequence KV reads and maths)
//!           + prefill_j_per_token * n_prefill             (compute-bound prompt tokens)
//! ```
//!
//! where `n_decode_tokens` is the number of sequence-tokens decoded in the step and `n_prefill`
//! the number of *uncached* prompt tokens processed (prefix-cache hits cost nothing). During the
//! step the GPU draws `idle_w + dynamic_J / duration`, clamped to `max_w` by stretching the
//! step (a power-capped GPU runs slower rather than drawing more).
//!
//! # Ground truth
//!
//! [`PowerModel::split_step`] splits a step's dynamic energy across the requests in it by what
//! each one *caused*: the base power over the step's fixed part (`step_base_w *
//! step_overhead_s`, the weights streamed once whoever is in the batch) equally among the
//! requests in the step; the base power over the time each request adds to the step
//! (`decode_s_per_seq` per decoded token, `prefill_s_per_token` per prefilled token) to that
//! request; and each request's own decode and prefill energy. A prefill chunk therefore pays
//! for the time it stretches the step. Under the power cap the step's stretch comes from the
//! energy of its tokens, so the base power beyond the fixed part goes in proportion to each
//! request's own token energy instead. The parts sum exactly to the step's dynamic energy.
//! [`PowerModel::split_idle`] splits idle energy over some interval in proportion to the
//! requests' dynamic energy in that interval (nothing is split if nothing ran).
//!
//! The defaults resemble an H100 SXM serving an 8B-parameter model in bf16: a decode step of one
//! sequence lasts about 6 ms at ~270 W, a 64-sequence decode step about 9 ms at ~400 W, and a
//! 2048-token prefill about 90 ms at ~650 W.

use serde::{Deserialize, Serialize};

/// Parameters of the power model. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerModel {
    /// Power drawn while nothing runs, in watts.
    pub idle_w: f64,
    /// Power limit, in watts.
    pub max_w: f64,
    /// Dynamic power (above idle) drawn for the whole duration of any step, in watts.
    pub step_base_w: f64,
    /// Fixed duration of a step (weights streamed once), in seconds.
    pub step_overhead_s: f64,
    /// Extra duration per decoded sequence-token, in seconds.
    pub decode_s_per_seq: f64,
    /// Extra duration per uncached prompt token, in seconds.
    pub prefill_s_per_token: f64,
    /// Dynamic energy per decoded sequence-token, in joules.
    pub decode_j_per_token: f64,
    /// Dynamic energy per uncached prompt token, in joules.
    pub prefill_j_per_token: f64,
}

impl Default for PowerModel {
    fn default() -> Self {
        Self {
            idle_w: 70.0,
            max_w: 700.0,
            step_base_w: 200.0,
            step_overhead_s: 0.006,
            decode_s_per_seq: 0.000_05,
            prefill_s_per_token: 0.000_04,
            decode_j_per_token: 0.02,
            prefill_j_per_token: 0.015,
        }
    }
}

/// One request's share of a step's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    /// Sequence-tokens this request decodes in the step (usually 0 or 1).
    pub decode_tokens: u32,
    /// Uncached prompt tokens this request prefills in the step.
    pub prefill_tokens: u32,
}

/// Duration and dynamic energy of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepCost {
    /// How long the step runs, in seconds.
    pub duration_s: f64,
    /// Dynamic energy (above idle) of the step, in joules: `base_j + decode_j + prefill_j`.
    pub dynamic_j: f64,
    /// The part of `dynamic_j` drawn by the step itself (`step_base_w * duration`).
    pub base_j: f64,
    /// The part of `dynamic_j` due to decoded tokens.
    pub decode_j: f64,
    /// The part of `dynamic_j` due to prefilled tokens.
    pub prefill_j: f64,
}

impl StepCost {
    /// Total power (idle included) while the step runs, in watts.
    pub fn power_w(&self, idle_w: f64) -> f64 {
        if self.duration_s > 0.0 {
            idle_w + self.dynamic_j / self.duration_s
        } else {
            idle_w
        }
    }
}

impl PowerModel {
    /// Duration and dynamic energy of a step decoding `n_decode` sequence-tokens and
    /// prefilling `prefill_tokens` uncached prompt tokens. An empty step costs nothing.
    pub fn step(&self, n_decode: u32, prefill_tokens: u32) -> StepCost {
        if n_decode == 0 && prefill_tokens == 0 {
            return StepCost::default();
        }
        let mut duration_s = self.step_overhead_s
            + self.decode_s_per_seq * f64::from(n_decode)
            + self.prefill_s_per_token * f64::from(prefill_tokens);
        let decode_j = self.decode_j_per_token * f64::from(n_decode);
        let prefill_j = self.prefill_j_per_token * f64::from(prefill_tokens);
        // Power cap: stretch the step until idle + dynamic fits under max_w.
        let headroom_w = self.max_w - self.idle_w - self.step_base_w;
        if headroom_w > 0.0 && (decode_j + prefill_j) / duration_s > headroom_w {
            duration_s = (decode_j + prefill_j) / headroom_w;
        }
        let base_j = self.step_base_w * duration_s;
        StepCost {
            duration_s,
            dynamic_j: base_j + decode_j + prefill_j,
            base_j,
            decode_j,
            prefill_j,
        }
    }

    /// The cost of a step made of `entries` (one per request in the batch).
    pub fn step_of(&self, entries: &[StepEntry]) -> StepCost {
        let n_decode = entries.iter().map(|e| e.decode_tokens).sum();
        let prefill = entries.iter().map(|e| e.prefill_tokens).sum();
        self.step(n_decode, prefill)
    }

    /// Ground-truth split of a step's dynamic energy, by what each entry caused (see the
    /// [module docs](self)): joules per entry, in order. Sums to `self.step_of(entries).dynamic_j`.
    pub fn split_step(&self, entries: &[StepEntry]) -> Vec<f64> {
        let cost = self.step_of(entries);
        if entries.is_empty() || cost.dynamic_j == 0.0 {
            return vec![0.0; entries.len()];
        }
        let own_s = |e: &StepEntry| {
            self.decode_s_per_seq * f64::from(e.decode_tokens)
                + self.prefill_s_per_token * f64::from(e.prefill_tokens)
        };
        let own_j = |e: &StepEntry| {
            self.decode_j_per_token * f64::from(e.decode_tokens)
                + self.prefill_j_per_token * f64::from(e.prefill_tokens)
        };
        let fixed_s = self.step_overhead_s.min(cost.duration_s);
        let uncapped_s = fixed_s + entries.iter().map(own_s).sum::<f64>();
        let capped = cost.duration_s > uncapped_s * (1.0 + 1e-12);
        // What the stretch beyond the fixed part is proportional to, per entry.
        let weights: Vec<f64> = if capped {
            entries.iter().map(own_j).collect()
        } else {
            entries.iter().map(own_s).collect()
        };
        let total_weight: f64 = weights.iter().sum();
        let n = entries.len() as f64;
        let fixed_each = self.step_base_w * fixed_s / n;
        let stretch_j = cost.base_j - self.step_base_w * fixed_s;
        entries
            .iter()
            .zip(&weights)
            .map(|(e, w)| {
                let stretch = if total_weight > 0.0 {
                    stretch_j * w / total_weight
                } else {
                    stretch_j / n
                };
                fixed_each + stretch + own_j(e)
            })
            .collect()
    }

    /// Plain time sharing, the second reference: a step's `energy_j` split equally among the
    /// `n` requests in it (nothing if `n` is 0).
    pub fn split_timeshare(energy_j: f64, n: usize) -> Vec<f64> {
        if n == 0 {
            return Vec::new();
        }
        vec![energy_j / n as f64; n]
    }

    /// Ground-truth split of `idle_j` joules of idle energy among requests in proportion to
    /// their dynamic energy `dynamic_j` over the same interval. If nobody drew dynamic energy
    /// the idle energy is attributed to nobody (all zeros).
    pub fn split_idle(idle_j: f64, dynamic_j: &[f64]) -> Vec<f64> {
        let total: f64 = dynamic_j.iter().sum();
        if total <= 0.0 {
            return vec![0.0; dynamic_j.len()];
        }
        dynamic_j.iter().map(|d| idle_j * d / total).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_look_like_an_h100() {
        let m = PowerModel::default();
        let one = m.step(1, 0);
        assert!((0.005..0.01).contains(&one.duration_s), "{one:?}");
        let p1 = one.power_w(m.idle_w);
        assert!((200.0..350.0).contains(&p1), "{p1}");
        let batch = m.step(64, 0);
        let p64 = batch.power_w(m.idle_w);
        assert!(p64 > p1 && p64 < m.max_w, "{p64}");
        let prefill = m.step(0, 2048);
        let pp = prefill.power_w(m.idle_w);
        assert!(pp > p64 && pp <= m.max_w + 1e-9, "{pp}");
        assert_eq!(m.step(0, 0), StepCost::default());
    }

    #[test]
    fn power_cap_stretches_the_step() {
        let m = PowerModel {
            prefill_j_per_token: 0.05,
            ..PowerModel::default()
        };
        let huge = m.step(0, 100_000);
        assert!((huge.power_w(m.idle_w) - m.max_w).abs() < 1e-6, "{huge:?}");
        assert!(huge.duration_s > m.step_overhead_s + 100_000.0 * m.prefill_s_per_token);
    }

    #[test]
    fn split_step_conserves_energy() {
        let m = PowerModel::default();
        let entries = [
            StepEntry {
                decode_tokens: 1,
                prefill_tokens: 0,
            },
            StepEntry {
                decode_tokens: 1,
                prefill_tokens: 0,
            },
            StepEntry {
                decode_tokens: 0,
                prefill_tokens: 512,
            },
        ];
        let shares = m.split_step(&entries);
        let cost = m.step_of(&entries);
        let sum: f64 = shares.iter().sum();
        assert!((sum - cost.dynamic_j).abs() < 1e-9, "{sum} vs {cost:?}");
        assert!((shares[0] - shares[1]).abs() < 1e-12);
        assert!(shares[2] > shares[0]);
        // The prefill pays for the time it adds: its share beyond a decode's is its own time's
        // base power and its own energy, minus a decode's.
        let decode = m.step_base_w * m.decode_s_per_seq + m.decode_j_per_token;
        let prefill = 512.0 * (m.step_base_w * m.prefill_s_per_token + m.prefill_j_per_token);
        assert!(
            ((shares[2] - shares[0]) - (prefill - decode)).abs() < 1e-9,
            "{shares:?}"
        );
        // And under the power cap too.
        let m = PowerModel {
            prefill_j_per_token: 0.05,
            ..PowerModel::default()
        };
        let capped = [StepEntry {
            decode_tokens: 0,
            prefill_tokens: 100_000,
        }];
        let s: f64 = m.split_step(&capped).iter().sum();
        assert!((s - m.step_of(&capped).dynamic_j).abs() < 1e-6);
        let mixed = [
            StepEntry {
                decode_tokens: 1,
                prefill_tokens: 0,
            },
            capped[0],
        ];
        let shares = m.split_step(&mixed);
        let s: f64 = shares.iter().sum();
        assert!((s - m.step_of(&mixed).dynamic_j).abs() < 1e-6);
        assert!(shares[1] > 100.0 * shares[0], "{shares:?}");
    }

    #[test]
    fn timeshare_is_equal() {
        assert_eq!(PowerModel::split_timeshare(9.0, 3), vec![3.0; 3]);
        assert!(PowerModel::split_timeshare(9.0, 0).is_empty());
    }

    #[test]
    fn idle_split_is_proportional() {
        let s = PowerModel::split_idle(10.0, &[1.0, 3.0]);
        assert!((s[0] - 2.5).abs() < 1e-12 && (s[1] - 7.5).abs() < 1e-12);
        assert_eq!(PowerModel::split_idle(10.0, &[0.0, 0.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn model_round_trips_through_json() {
        let m = PowerModel::default();
        let j = serde_json::to_string(&m).expect("serialise");
        let back: PowerModel = serde_json::from_str(&j).expect("deserialise");
        assert_eq!(m, back);
        let partial: PowerModel = serde_json::from_str(r#"{"idle_w": 60.0}"#).expect("partial");
        assert!((partial.idle_w - 60.0).abs() < f64::EPSILON);
        assert!((partial.max_w - 700.0).abs() < f64::EPSILON);
    }
}
