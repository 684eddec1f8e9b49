//! Which start of a prompt the engine likely had cached, for prompts whose usage never tells.
//!
//! Engines keep the prefixes they computed (vLLM's and `SGLang`'s prefix caches) and compute
//! only the rest, so a prompt's body overstates the prefill of one that repeats a system prompt
//! or a conversation. The tracker hashes each prompt's start in blocks (`wire::prefix`); a
//! block counts as cached for a request when a request that arrived before it carried the same
//! block (it was computed first), or when a request that reported its cached tokens had it among
//! them (a prefix already cached before the daemon saw it, e.g. at attach). A prefix first seen
//! in two requests arriving together is counted for the later one, which the engine may not
//! have reused; the cache is bounded, as the engine's is, by dropping the blocks seen longest ago.

use std::collections::{HashMap, VecDeque};

use crate::wire::prefix::BLOCK_BYTES;

/// Blocks remembered per service: 4 MiB of prompt text, about a million tokens (more than an
/// engine's cache on one GPU holds).
const CAPACITY: usize = 1 << 16;

/// One block's history.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Block {
    /// The first arrival that carried it (ns).
    first_ns: u64,
    /// Requests that carried it (saturating).
    carriers: u32,
    /// A request that carried it reported it cached.
    reported: bool,
    /// When it was last seen (a sequence number: the drop order).
    seen: u64,
}

/// The blocks a service's prompts began with.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct PrefixCache {
    blocks: HashMap<u64, Block>,
    /// Blocks in the order they were last seen (stale entries are skipped when dropping).
    order: VecDeque<(u64, u64)>,
    seq: u64,
}

impl PrefixCache {
    /// A prompt that began with `blocks` arrived at `ts_ns`.
    pub(crate) fn arrive(&mut self, ts_ns: u64, blocks: &[u64]) {
        for &h in blocks {
            self.seq += 1;
            let b = self.blocks.entry(h).or_insert(Block {
                first_ns: ts_ns,
                carriers: 0,
                reported: false,
                seen: 0,
            });
            b.first_ns = b.first_ns.min(ts_ns);
            b.carriers = b.carriers.saturating_add(1);
            b.seen = self.seq;
            self.order.push_back((self.seq, h));
        }
        self.trim();
    }

    /// A request whose prompt began with `blocks` reported `cached` of its `prompt` tokens:
    /// its first blocks, in that proportion of its `body_bytes`, were cached.
    pub(crate) fn reported(&mut self, blocks: &[u64], body_bytes: u64, prompt: u64, cached: u64) {
        if prompt == 0 || cached == 0 {
            return;
        }
        let cached_bytes = body_bytes as f64 * (cached.min(prompt) as f64 / prompt as f64);
        let n = (cached_bytes / BLOCK_BYTES as f64) as usize;
        for h in blocks.iter().take(n) {
            if let Some(b) = self.blocks.get_mut(h) {
                b.reported = true;
            }
        }
    }

    /// Bytes of the prompt's start (`blocks`, arrived at `ts_ns`) likely cached when it ran.
    pub(crate) fn cached_bytes(&self, ts_ns: u64, blocks: &[u64]) -> u64 {
        let n = blocks
            .iter()
            .take_while(|h| {
                self.blocks
                    .get(h)
                    .is_some_and(|b| b.reported || b.first_ns < ts_ns)
            })
            .count();
        (n * BLOCK_BYTES) as u64
    }

    /// Bytes of the prompt's start that other requests carried too or that were reported
    /// cached: what it may have found cached, whenever it ran.
    pub(crate) fn shared_bytes(&self, blocks: &[u64]) -> u64 {
        let n = blocks
            .iter()
            .take_while(|h| {
                self.blocks
                    .get(h)
                    .is_some_and(|b| b.reported || b.carriers > 1)
            })
            .count();
        (n * BLOCK_BYTES) as u64
    }

    /// Drops the blocks seen longest ago beyond the capacity, and stale order entries.
    fn trim(&mut self) {
        while self.blocks.len() > CAPACITY || self.order.len() > 2 * CAPACITY {
            let Some((seq, h)) = self.order.pop_front() else {
                break;
            };
            if self.blocks.get(&h).is_some_and(|b| b.seen == seq) {
                self.blocks.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_cached_for_later_arrivals_and_where_reported() {
        let mut p = PrefixCache::default();
        let a = [1, 2, 3, 10];
        let b = [1, 2, 3, 20];
        p.arrive(100, &a);
        p.arrive(200, &b);
        // The first carrier computed it; the second found three blocks cached.
        assert_eq!(p.cached_bytes(100, &a), 0);
        assert_eq!(p.cached_bytes(200, &b), 3 * BLOCK_BYTES as u64);
        // Both may have found it cached, whenever they ran.
        assert_eq!(p.shared_bytes(&a), 3 * BLOCK_BYTES as u64);
        // A later request reported the first half of its 4-block prompt cached.
        p.arrive(300, &[1, 2, 3, 30]);
        p.reported(&[1, 2, 3, 30], 4 * BLOCK_BYTES as u64, 100, 50);
        assert_eq!(p.cached_bytes(100, &a), 2 * BLOCK_BYTES as u64);
    }

    #[test]
    fn the_blocks_seen_longest_ago_are_dropped_first() {
        let mut p = PrefixCache::default();
        p.arrive(0, &[u64::MAX]);
        let n = CAPACITY as u64;
        for h in 0..n {
            p.arrive(1, &[h]);
            // Seen again all along: kept.
            if h % 1024 == 0 {
                p.arrive(2, &[0]);
            }
        }
        assert_eq!(p.blocks.len(), CAPACITY);
        assert!(!p.blocks.contains_key(&u64::MAX));
        assert!(p.blocks.contains_key(&0));
        assert!(p.order.len() <= 2 * CAPACITY);
    }
}
