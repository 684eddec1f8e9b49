//! The recent gaps between one request's consecutive events, and their 25th percentile.
//!
//! Asked at every streamed event once the ring is full, so the order statistic is kept as a
//! sorted copy updated in place (two binary searches and a short move) instead of copying and
//! selecting the ring each time: the same value, without the per-event copy and selection.

use std::collections::VecDeque;

/// A ring of the last `cap` gaps with a sorted copy beside it.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(from = "VecDeque<u64>", into = "VecDeque<u64>")]
pub(super) struct Gaps {
    ring: VecDeque<u64>,
    sorted: Vec<u64>,
}

impl From<VecDeque<u64>> for Gaps {
    fn from(ring: VecDeque<u64>) -> Self {
        let mut sorted: Vec<u64> = ring.iter().copied().collect();
        sorted.sort_unstable();
        Gaps { ring, sorted }
    }
}

impl From<Gaps> for VecDeque<u64> {
    fn from(g: Gaps) -> Self {
        g.ring
    }
}

impl Gaps {
    /// Adds `gap`, dropping the oldest once `cap` are held.
    pub(super) fn push(&mut self, gap: u64, cap: usize) {
        if self.ring.len() >= cap
            && let Some(old) = self.ring.pop_front()
            && let Ok(i) = self.sorted.binary_search(&old)
        {
            self.sorted.remove(i);
        }
        self.ring.push_back(gap);
        let at = self.sorted.partition_point(|&g| g < gap);
        self.sorted.insert(at, gap);
    }

    pub(super) fn len(&self) -> usize {
        self.ring.len()
    }

    /// The `q`-th smallest gap (0-based), as `select_nth_unstable(q)` on the ring gives.
    pub(super) fn nth_smallest(&self, q: usize) -> Option<u64> {
        self.sorted.get(q).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_statistic_matches_a_selection_over_the_ring() {
        let mut g = Gaps::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Many repeats, as real gaps have (microsecond-rounded clocks).
            g.push(x % 97, 256);
            let mut copy: Vec<u64> = g.ring.iter().copied().collect();
            assert_eq!(copy.len(), (i + 1).min(256));
            let q = copy.len() / 4;
            assert_eq!(g.nth_smallest(q), Some(*copy.select_nth_unstable(q).1));
        }
        // A checkpoint carries the ring alone; the sorted copy is rebuilt from it.
        let back: Gaps =
            serde_json::from_str(&serde_json::to_string(&g).expect("ser")).expect("de");
        assert_eq!(back.sorted, g.sorted);
    }
}
