//! A service's engine steps, seen through its streamed events.
//!
//! In continuous batching every step ends with one token for each sequence in the batch, so the
//! service's events cluster at step ends (a server writes the connections one after the other,
//! a fraction of a millisecond apart: events closer than `merge_ns` are one step). A request's
//! prefill runs in the step that ends with its first event, which began when the previous step
//! ended; that step is longer than its neighbours by the prefill's own compute time — the part
//! of the engine's busy time the prefill caused.

use std::collections::VecDeque;

/// Step ends of one service (each cluster represented by its earliest event), in time order.
#[derive(Debug, Default)]
pub(crate) struct StepClock {
    ends: VecDeque<u64>,
}

/// The engine step a request's prefill ran in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefillStep {
    /// When the step began (the previous step's end), or `None` when the engine was idle.
    pub from_ns: Option<u64>,
    /// How much longer the step was than its neighbours.
    pub extension_ns: u64,
}

impl StepClock {
    /// Records an event at `t`.
    pub(crate) fn record(&mut self, t: u64, merge_ns: u64) {
        if self.ends.back().is_none_or(|&last| last < t) {
            if self.ends.back().is_none_or(|&last| t - last > merge_ns) {
                self.ends.push_back(t);
            }
            return;
        }
        let idx = self.ends.partition_point(|&x| x < t);
        if idx > 0 && t - self.ends[idx - 1] <= merge_ns {
            return;
        }
        match self.ends.get(idx).copied() {
            Some(next) if next - t <= merge_ns => self.ends[idx] = t,
            _ => self.ends.insert(idx, t),
        }
    }

    /// The step that ended with a first event at `fe`.
    pub(crate) fn prefill_step(&self, fe: u64, merge_ns: u64) -> PrefillStep {
        let k = self.ends.partition_point(|&x| x <= fe);
        // `own`: the cluster holding `fe`; `prev`: the one before it.
        let (own, prev) = match k.checked_sub(1) {
            Some(i) if fe - self.ends[i] <= merge_ns => (Some(i), i.checked_sub(1)),
            Some(i) => (None, Some(i)),
            None => (None, None),
        };
        let from_ns = prev.map(|p| self.ends[p]);
        let gap = |i: usize| -> Option<u64> {
            let a = *self.ends.get(i.checked_sub(1)?)?;
            Some(self.ends.get(i)? - a)
        };
        let before = prev.and_then(gap);
        let after = own.and_then(|o| gap(o + 1));
        let base = match (before, after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let len = from_ns.map(|f| fe.saturating_sub(f));
        let extension_ns = match (len, base) {
            (Some(l), Some(b)) => l.saturating_sub(b),
            _ => 0,
        };
        PrefillStep {
            from_ns,
            extension_ns,
        }
    }

    /// Forgets steps before `t`, keeping two for the gaps around the first step after it.
    pub(crate) fn prune(&mut self, t: u64) {
        while self.ends.len() > 2 && self.ends[2] < t {
            self.ends.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn clusters_writes_and_measures_the_prefill_step() {
        let mut c = StepClock::default();
        // Decode steps of 20 ms, each written to three connections 0.1 ms apart; the step
        // ending at 100 ms carried a prefill and lasted 50 ms.
        for end in [10, 30, 50, 100, 120, 140] {
            for k in 0..3 {
                c.record(end * MS + k * MS / 10, 2 * MS);
            }
        }
        assert_eq!(c.ends.len(), 6);
        let s = c.prefill_step(100 * MS + MS / 5, 2 * MS);
        assert_eq!(s.from_ns, Some(50 * MS));
        assert_eq!(s.extension_ns, 30 * MS + MS / 5);
        // Out of order within a cluster, and a new cluster between two.
        c.record(99 * MS + MS / 2, 2 * MS);
        c.record(75 * MS, 2 * MS);
        assert_eq!(c.ends.len(), 7);
        assert_eq!(c.ends[4], 99 * MS + MS / 2);
    }
}
