//! The size of a prompt whose usage is never reported: its body's tokens (`bodies.rs`), less
//! the start the engine likely had cached (`prefix.rs`); where prompts of a prefill period
//! share a start, whether each found it cached is weighed by the time the period took.

use super::{prefix::PrefixCache, state::Request, steps::StepClock};
use crate::wire::prefix::BLOCK_BYTES;

/// Most shared starts of prompts of unknown size weighed together (2^n sums).
const MAX_WEIGHED: usize = 12;

/// A prompt's uncached tokens as its body suggests: the tokens of its body less `cached` bytes
/// of its start (at least a block is computed), along the learned line (`bodies.rs`).
pub(super) fn body_tokens(r: &Request, c: &StepClock, cached: u64) -> Option<f64> {
    let bytes = r.arrival.body_bytes?;
    let floor = (BLOCK_BYTES as u64).min(bytes);
    c.prompt_estimate(bytes.saturating_sub(cached).max(floor))
}

/// A prompt of unknown size whose start others shared.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
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
