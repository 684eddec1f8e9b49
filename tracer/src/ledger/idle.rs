//! Idle (static) power, learned as a low quantile of recent power observations.
//!
//! Why a quantile over a sliding window and not the minimum ever seen: one glitchy low sample, or
//! a clock-gated state the device never returns to under load, would pin the minimum forever. A
//! low quantile over the last few minutes tracks the device as it is now and ignores outliers.

use std::collections::VecDeque;

/// Histogram bin width in watts.
const BIN_W: f64 = 0.25;
/// Bins: 0 .. 4096 W.
const BINS: usize = 16_384;

/// Sliding-window quantile of power samples. Deterministic: depends only on the samples pushed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IdleEstimator {
    quantile: f64,
    window_ns: u64,
    samples: VecDeque<(u64, u32)>,
    hist: Vec<u32>,
}

impl IdleEstimator {
    /// `quantile` in (0, 1), e.g. 0.05; `window_ns`, e.g. ten minutes.
    pub fn new(quantile: f64, window_ns: u64) -> Self {
        Self {
            quantile: quantile.clamp(0.0, 1.0),
            window_ns,
            samples: VecDeque::new(),
            hist: vec![0; BINS],
        }
    }

    /// Adds an observation of `watts` at `ts_ns` (samples must come in time order; older ones
    /// are ignored for expiry purposes but still counted).
    pub fn push(&mut self, ts_ns: u64, watts: f64) {
        if !watts.is_finite() || watts < 0.0 {
            return;
        }
        let bin = ((watts / BIN_W) as usize).min(BINS - 1) as u32;
        self.hist[bin as usize] += 1;
        self.samples.push_back((ts_ns, bin));
        let horizon = ts_ns.saturating_sub(self.window_ns);
        while let Some(&(t, b)) = self.samples.front() {
            if t >= horizon {
                break;
            }
            self.hist[b as usize] -= 1;
            self.samples.pop_front();
        }
    }

    /// The current estimate in watts, or `None` before any sample.
    pub fn watts(&self) -> Option<f64> {
        let n = self.samples.len();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64 - 1.0) * self.quantile).floor() as usize;
        let mut seen = 0usize;
        for (bin, &count) in self.hist.iter().enumerate() {
            seen += count as usize;
            if seen > rank {
                return Some((bin as f64 + 0.5) * BIN_W);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_quantile_ignores_outliers_and_forgets_old_samples() {
        let mut e = IdleEstimator::new(0.05, 1_000);
        assert_eq!(e.watts(), None);
        e.push(0, 5.0); // a glitch
        for i in 1..=99 {
            e.push(i, 100.0 + i as f64);
        }
        let w = e.watts().expect("estimate");
        assert!((100.0..110.0).contains(&w), "{w}");
        // Once the window moves on, the device's new lower idle shows.
        for i in 0..200 {
            e.push(2_000 + i, 60.0 + (i % 10) as f64);
        }
        let w = e.watts().expect("estimate");
        assert!((59.0..62.0).contains(&w), "{w}");
    }
}
