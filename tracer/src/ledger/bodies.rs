//! Prompt tokens from request-body bytes, for prompts whose usage is never reported.
//!
//! A body is the prompt plus a roughly fixed frame (the JSON keys, model name, sampling
//! options), and a chat template adds a roughly fixed number of tokens, so tokens grow with
//! bytes along a line that does not pass through zero: a single tokens-per-byte ratio
//! overstates short prompts and understates long ones (a 49-token prompt read as 92, a
//! 1,000-token one as 794). The line is fitted by least squares over the recent requests that
//! reported usage; until there are enough of them, or when their sizes barely differ, the
//! median ratio is used.

use std::collections::VecDeque;

/// Recent (bytes, prompt tokens) pairs kept.
const KEEP: usize = 128;
/// Pairs before the line is fitted (the ratio is used from [`MIN_RATIO`]).
const MIN_FIT: usize = 16;
const MIN_RATIO: usize = 3;

/// Recent requests' body sizes and prompt tokens, and what they say about the next.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct BodySizes {
    pairs: VecDeque<(f64, f64)>,
    /// Tokens = `slope` × bytes + `intercept`, once fitted.
    line: Option<(f64, f64)>,
    /// The median tokens per byte, from [`MIN_RATIO`] pairs.
    ratio: Option<f64>,
}

impl BodySizes {
    /// A request whose body was `bytes` long reported `prompt_tokens`.
    pub(crate) fn sample(&mut self, bytes: u64, prompt_tokens: u64) {
        if bytes == 0 {
            return;
        }
        if self.pairs.len() == KEEP {
            self.pairs.pop_front();
        }
        self.pairs.push_back((bytes as f64, prompt_tokens as f64));
        if self.pairs.len() >= MIN_RATIO {
            let mut r: Vec<f64> = self.pairs.iter().map(|(b, t)| t / b).collect();
            let mid = r.len() / 2;
            self.ratio = Some(*r.select_nth_unstable_by(mid, f64::total_cmp).1);
        }
        self.line = (self.pairs.len() >= MIN_FIT).then(|| self.fit()).flatten();
    }

    /// Least squares over the pairs; `None` when the sizes barely differ or tokens would not
    /// grow with bytes.
    fn fit(&self) -> Option<(f64, f64)> {
        let n = self.pairs.len() as f64;
        let (mx, my) = self
            .pairs
            .iter()
            .fold((0.0, 0.0), |(x, y), (b, t)| (x + b / n, y + t / n));
        let (sxx, sxy) = self.pairs.iter().fold((0.0, 0.0), |(xx, xy), (b, t)| {
            (xx + (b - mx) * (b - mx), xy + (b - mx) * (t - my))
        });
        // Sizes spread by less than a tenth of their mean say nothing of the slope.
        if sxx <= 0.0 || (sxx / n).sqrt() < 0.1 * mx {
            return None;
        }
        let slope = sxy / sxx;
        (slope > 0.0).then_some((slope, my - slope * mx))
    }

    /// A prompt's tokens estimated from its body's size (at least one), once known.
    pub(crate) fn estimate(&self, bytes: u64) -> Option<f64> {
        let b = bytes as f64;
        match (self.line, self.ratio) {
            (Some((slope, intercept)), _) => Some((slope * b + intercept).max(1.0)),
            (None, Some(r)) => Some(r * b),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_frame_is_not_read_as_tokens() {
        // 4 bytes per token plus a 150-byte frame and 10 template tokens.
        let mut s = BodySizes::default();
        let body = |t: u64| 150 + 4 * (t - 10);
        for t in [
            30, 60, 90, 200, 400, 800, 1000, 120, 50, 700, 300, 500, 250, 75, 640, 980,
        ] {
            s.sample(body(t), t);
        }
        for t in [20, 49, 1000, 1500] {
            let e = s.estimate(body(t)).unwrap_or(0.0);
            assert!((e - t as f64).abs() < 1.0, "{t}: {e}");
        }
    }

    #[test]
    fn the_ratio_until_enough_sizes_are_known() {
        let mut s = BodySizes::default();
        assert_eq!(s.estimate(400), None);
        for _ in 0..MIN_FIT {
            s.sample(400, 100);
        }
        // All the same size: no line, the ratio.
        assert_eq!(s.estimate(800), Some(200.0));
    }
}
