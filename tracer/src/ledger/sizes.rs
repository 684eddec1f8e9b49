//! The size of a prompt whose usage is never reported: its body's tokens, less the start the
//! engine likely had cached.
//!
//! A body is the prompt plus a roughly fixed frame (the JSON keys, model name, sampling
//! options), and a chat template adds a roughly fixed number of tokens, so tokens grow with
//! bytes along a line that does not pass through zero: a single tokens-per-byte ratio
//! overstates short prompts and understates long ones (a 49-token prompt read as 92, a
//! 1,000-token one as 794). The line is fitted by least squares over the recent requests that
//! reported usage; until there are enough of them, or when their sizes barely differ, the
//! median ratio is used. What the engine had cached of its start comes from `prefix.rs`.

use std::collections::VecDeque;

use super::{prefix::PrefixCache, state::Request, steps::StepClock};
use crate::wire::prefix::BLOCK_BYTES;

/// Recent (bytes, prompt tokens) pairs kept.
const KEEP: usize = 128;
/// Pairs before the line is fitted (the ratio is used from [`MIN_RATIO`]).
const MIN_FIT: usize = 16;
const MIN_RATIO: usize = 3;

/// Recent requests' body sizes and prompt tokens, and what they say about the next.
#[derive(Debug, Default)]
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

/// Most shared starts of starts of prompts of unknown size weighed together (2^n sums).
const MAX_WEIGHED: usize = 12;

/// A prompt's uncached tokens as its body suggests: the body's tokens at the learned density,
/// less `cached` bytes of its start (at least a block is computed).
pub(super) fn body_tokens(r: &Request, c: &StepClock, cached: u64) -> Option<f64> {
    let bytes = r.arrival.body_bytes?;
    let floor = (BLOCK_BYTES as u64).min(bytes);
    c.prompt_estimate(bytes.saturating_sub(cached).max(floor))
}

/// A prompt of unknown size whose start others shared.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shared {
    /// Its size (tokens) with that start cached, and computed whole.
    pub(super) lo: f64,
    pub(super) hi: f64,
    /// Its first block: prompts with the same one share a start.
    pub(super) first_block: u64,
}

/// Without usage, the prompt's size with the start that others shared cached, and whole.
pub(super) fn cached_choice(
    r: &Request,
    c: &StepClock,
    prefixes: Option<&PrefixCache>,
) -> Option<Shared> {
    if r.arrival.prompt_tokens.is_some() {
        return None;
    }
    let shared = prefixes?.shared_bytes(&r.arrival.prefix_blocks);
    let (lo, hi) = (body_tokens(r, c, shared)?, body_tokens(r, c, 0)?);
    let first_block = *r.arrival.prefix_blocks.first()?;
    (lo < hi).then_some(Shared {
        lo,
        hi,
        first_block,
    })
}

/// A prompt's uncached tokens as its body suggests, less the start that requests arriving
/// before it carried (`prefix.rs`).
pub(super) fn body_estimate(
    r: &Request,
    c: &StepClock,
    prefixes: Option<&PrefixCache>,
) -> Option<f64> {
    let cached = prefixes.map_or(0, |p| {
        p.cached_bytes(r.arrival.ts_ns, &r.arrival.prefix_blocks)
    });
    body_tokens(r, c, cached)
}

/// Which of `shared` (in the order their prefills ran) found their start cached: the way
/// their sizes, with `fixed` tokens of the others, add up closest to `target` tokens, among the
/// ways where a start once cached stays cached for the prompts that ran after. `None` with
/// more than [`MAX_WEIGHED`] of them (too many sums) or none.
pub(super) fn choose_cached(shared: &[Shared], fixed: f64, target: f64) -> Option<Vec<bool>> {
    if shared.is_empty() || shared.len() > MAX_WEIGHED {
        return None;
    }
    let cached = |mask: usize, b: usize| mask >> b & 1 == 1;
    let consistent = |mask: usize| {
        shared.iter().enumerate().all(|(b, s)| {
            !cached(mask, b)
                || shared[b + 1..]
                    .iter()
                    .enumerate()
                    .all(|(d, later)| later.first_block != s.first_block || cached(mask, b + 1 + d))
        })
    };
    let miss = |mask: usize| {
        let sum: f64 = shared
            .iter()
            .enumerate()
            .map(|(b, s)| if cached(mask, b) { s.lo } else { s.hi })
            .sum();
        (fixed + sum - target).abs()
    };
    let best = (0..1usize << shared.len())
        .filter(|&m| consistent(m))
        .min_by(|&a, &b| miss(a).total_cmp(&miss(b)))?;
    Some((0..shared.len()).map(|b| cached(best, b)).collect())
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
