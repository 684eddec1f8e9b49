//! From raw sensor readings to measured energy intervals ("segments").
//!
//! Readings are buffered in time order (out-of-order ones within the grace are inserted where
//! they belong) and turned into segments only once they are older than the watermark, so the
//! result does not depend on arrival order.
//!
//! A cumulative counter that updates every `period` and is read more often shows the same value
//! several times, then jumps: the update happened between the last unchanged read and the
//! changing one. With the period known, successive updates are `period` apart, so the bounds
//! from many reads intersect and pin the update times down to a few milliseconds — much tighter
//! than one read gap. Without it, the midpoint of the read gap is the estimate.

use std::collections::VecDeque;

/// A measured energy interval between two (estimated) counter updates, or between power
/// windows on a device without a counter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Segment {
    pub start_ns: u64,
    pub end_ns: u64,
    pub energy_j: f64,
    /// Timing uncertainty (half-width) of the start and end.
    pub tau_start_ns: u64,
    pub tau_end_ns: u64,
    /// Energy interpolated rather than measured (between power windows): its own error, J.
    pub interpolated_unc_j: f64,
}

/// What a counter reading did, for the ledger's stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum CounterEvent {
    Unchanged,
    First,
    Update,
    Wrap,
    Reset,
    Implausible,
}

/// What became of a buffered observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Push {
    /// In time order.
    Appended,
    /// Older than the newest buffered one, but not yet processed: sorted in.
    Reordered,
    /// Older than what was already processed: ignored.
    Late,
    /// The same sample again: ignored.
    Repeat,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Reading {
    ts_ns: u64,
    uj: u64,
    wrap_uj: Option<u64>,
}

/// One device's energy counter.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Counter {
    buf: VecDeque<Reading>,
    /// Readings at or before this time have been processed; older ones are late.
    processed_ns: u64,
    seen: bool,
    /// The earliest reading ever accepted: power samples before it are integrated instead.
    first_ts: Option<u64>,
    last_uj: Option<u64>,
    /// The last read that still showed `last_uj`.
    last_same_ns: u64,
    /// Bounds on the time of the last update.
    clock: Option<(u64, u64)>,
    /// Estimated time and timing half-width of the last update.
    last_update: Option<(u64, u64)>,
    /// After a reset or an implausible jump: where the uncovered gap began.
    gap_from: Option<u64>,
    /// The update period as the updates themselves show it.
    fit: PeriodFit,
}

impl Counter {
    /// Power-only integration covers time before the counter's first reading (decided by
    /// timestamps, not arrival order, so that reordering within the grace changes nothing).
    pub(crate) fn integrate_before(&self) -> u64 {
        self.first_ts.unwrap_or(u64::MAX)
    }

    /// Buffers a reading.
    pub(crate) fn push(&mut self, ts_ns: u64, uj: u64, wrap_uj: Option<u64>) -> Push {
        if self.seen && ts_ns < self.processed_ns {
            return Push::Late;
        }
        self.seen = true;
        self.first_ts = Some(self.first_ts.map_or(ts_ns, |f| f.min(ts_ns)));
        let r = Reading { ts_ns, uj, wrap_uj };
        match self.buf.back() {
            Some(last) if last.ts_ns > ts_ns => {
                let at = self.buf.partition_point(|x| x.ts_ns <= ts_ns);
                self.buf.insert(at, r);
                Push::Reordered
            }
            _ => {
                self.buf.push_back(r);
                Push::Appended
            }
        }
    }

    /// Processes buffered readings up to `until_ns`, appending segments and gaps.
    pub(crate) fn process(
        &mut self,
        until_ns: u64,
        period_ns: Option<u64>,
        max_watts: f64,
        segments: &mut VecDeque<Segment>,
        gaps: &mut Vec<(u64, u64)>,
        mut on_event: impl FnMut(CounterEvent),
    ) {
        while let Some(r) = self.buf.front().copied() {
            if r.ts_ns > until_ns {
                break;
            }
            self.buf.pop_front();
            self.processed_ns = r.ts_ns;
            on_event(self.reading(r, period_ns, max_watts, segments, gaps));
        }
    }

    fn reading(
        &mut self,
        r: Reading,
        period_ns: Option<u64>,
        max_watts: f64,
        segments: &mut VecDeque<Segment>,
        gaps: &mut Vec<(u64, u64)>,
    ) -> CounterEvent {
        let Some(last) = self.last_uj else {
            self.last_uj = Some(r.uj);
            self.last_same_ns = r.ts_ns;
            return CounterEvent::First;
        };
        if r.uj == last {
            self.last_same_ns = r.ts_ns;
            return CounterEvent::Unchanged;
        }
        let (delta_uj, event) = if r.uj > last {
            (r.uj - last, CounterEvent::Update)
        } else if let Some(range) = r.wrap_uj.filter(|&w| w > last) {
            (range - last + r.uj, CounterEvent::Wrap)
        } else {
            self.break_chain(r);
            return CounterEvent::Reset;
        };
        // The period given was measured over a few updates at start: 2 % off, and projecting
        // bounds by it places every update later and later. What the updates show, once they
        // have shown enough, is used instead.
        let period_ns = period_ns.map(|p| self.fit.period(p).unwrap_or(p));
        if let Some(p) = period_ns {
            self.fit.observe(self.last_same_ns / 2 + r.ts_ns / 2, p);
        }
        let (lo, hi) = update_bounds(self.last_same_ns, r.ts_ns, period_ns, self.clock);
        let est = lo + (hi - lo) / 2;
        let tau = (hi - lo) / 2;
        let energy_j = delta_uj as f64 * 1e-6;
        if let Some((prev, prev_tau)) = self.last_update {
            let end = est.max(prev + 1);
            let dt = (end - prev) as f64 * 1e-9;
            // A jump no device could draw: a reset to a larger value or a glitch.
            if energy_j / dt.max(1e-3) > max_watts {
                self.break_chain(r);
                return CounterEvent::Implausible;
            }
            segments.push_back(Segment {
                start_ns: prev,
                end_ns: end,
                energy_j,
                tau_start_ns: prev_tau,
                tau_end_ns: tau,
                interpolated_unc_j: 0.0,
            });
            self.last_update = Some((end, tau));
        } else {
            if let Some(from) = self.gap_from.take()
                && est > from
            {
                gaps.push((from, est));
            }
            self.last_update = Some((est, tau));
        }
        self.clock = Some((lo, hi));
        self.last_uj = Some(r.uj);
        self.last_same_ns = r.ts_ns;
        event
    }

    /// The energy since the last update is unknown: start a new chain at the next update.
    fn break_chain(&mut self, r: Reading) {
        if let Some((prev, _)) = self.last_update.take() {
            self.gap_from = Some(self.gap_from.map_or(prev, |g| g.min(prev)));
        }
        self.last_uj = Some(r.uj);
        self.last_same_ns = r.ts_ns;
        self.clock = None;
    }
}

/// Updates observed before the fitted period is used.
const FIT_MIN_UPDATES: f64 = 32.0;
/// Per update, the weight of what came before (a memory of about a thousand updates).
const FIT_DECAY: f64 = 0.999;

/// A counter's update period fitted to its updates: each update lies somewhere in the window
/// between the last read that showed the old value and the first that showed the new one, so
/// the windows' middles, against the updates' running count, lie on a line whose slope is the
/// period (weighted least squares with a slow decay, so that it follows drift).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct PeriodFit {
    /// The first update's window middle and the period then in use: the line is fitted to the
    /// differences from `origin + count × period`.
    origin: Option<(u64, u64)>,
    last_mid: u64,
    count: f64,
    /// Σw, Σw·count, Σw·diff, Σw·count², Σw·count·diff.
    sums: [f64; 5],
}

impl PeriodFit {
    /// An update seen in a read window whose middle is `mid`; `period_ns` is the period in use.
    fn observe(&mut self, mid: u64, period_ns: u64) {
        let Some((t0, p0)) = self.origin else {
            self.origin = Some((mid, period_ns));
            self.last_mid = mid;
            self.sums = [1.0, 0.0, 0.0, 0.0, 0.0];
            return;
        };
        if mid <= self.last_mid || period_ns == 0 {
            return;
        }
        let steps = ((mid - self.last_mid) as f64 / period_ns as f64)
            .round()
            .max(1.0);
        self.count += steps;
        self.last_mid = mid;
        let x = self.count;
        let y = mid as f64 - t0 as f64 - x * p0 as f64;
        for v in &mut self.sums {
            *v *= FIT_DECAY;
        }
        let s = &mut self.sums;
        s[0] += 1.0;
        s[1] += x;
        s[2] += y;
        s[3] += x * x;
        s[4] += x * y;
    }

    /// The fitted period, once enough updates were seen, if within 10 % of `given_ns`.
    fn period(&self, given_ns: u64) -> Option<u64> {
        let (_, p0) = self.origin?;
        let [w, sx, sy, sxx, sxy] = self.sums;
        if w < FIT_MIN_UPDATES {
            return None;
        }
        let den = w * sxx - sx * sx;
        if den <= 0.0 {
            return None;
        }
        let p = p0 as f64 + (w * sxy - sx * sy) / den;
        let given = given_ns as f64;
        ((p - given).abs() < 0.1 * given).then(|| p.round() as u64)
    }
}

/// Bounds on the time of the update seen by a read at `hi` whose previous read at `lo` still
/// showed the old value: intersected with the previous update's bounds projected by whole
/// periods when the period is known.
fn update_bounds(lo: u64, hi: u64, period_ns: Option<u64>, prev: Option<(u64, u64)>) -> (u64, u64) {
    let (mut a, b) = (lo.min(hi), hi);
    let Some(p) = period_ns.filter(|&p| p > 0) else {
        return (a, b);
    };
    // The latest update is at most one period before the read.
    a = a.max(b.saturating_sub(p));
    if let Some((pa, pb)) = prev {
        let mid = a / 2 + b / 2;
        let pmid = pa / 2 + pb / 2;
        if mid > pmid {
            let k = (((mid - pmid) as f64 / p as f64).round() as u64).max(1);
            // Tight slack first (0.2 % of a period of jitter, 100 ppm of drift per period): the
            // bounds then keep shrinking as reads land near updates. If the counter jitters
            // more than that, retry with 5 %; if even that fails, start again from the reads.
            for slack in [p / 500 + k * p / 10_000, p / 20 + k * p / 1000] {
                let qa = (pa + k * p).saturating_sub(slack);
                let qb = pb + k * p + slack;
                let (na, nb) = (a.max(qa), b.min(qb));
                if na <= nb {
                    return (na, nb);
                }
            }
        }
    }
    (a, b)
}

/// A power sample: the mean power over `[ts_ns − window_ns, ts_ns]`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PowerPoint {
    pub ts_ns: u64,
    pub window_ns: u64,
    pub watts: f64,
}

impl PowerPoint {
    /// Where the sample sits on the power curve: the middle of its window.
    pub(crate) fn mid_ns(&self) -> u64 {
        self.ts_ns - self.window_ns / 2
    }
}

/// Power samples of one device, in time order.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct PowerCurve {
    /// Every sample not yet pruned (the curve), ordered by `ts_ns`.
    points: VecDeque<PowerPoint>,
    /// Samples up to here were fed to the idle estimator and the power-only integration.
    processed: usize,
    processed_ns: u64,
    /// End of the last power-only segment.
    integrated_ns: Option<(u64, f64)>,
}

impl PowerCurve {
    /// Buffers a sample.
    pub(crate) fn push(&mut self, p: PowerPoint) -> Push {
        let at = self.points.partition_point(|x| x.ts_ns <= p.ts_ns);
        if at > 0 && self.points[at - 1].ts_ns == p.ts_ns {
            // The same sensor value read twice (sensors update slower than they are polled).
            return Push::Repeat;
        }
        if p.ts_ns < self.processed_ns {
            return Push::Late;
        }
        if at < self.points.len() {
            self.points.insert(at, p);
            Push::Reordered
        } else {
            self.points.push_back(p);
            Push::Appended
        }
    }

    /// Feeds samples up to `until_ns` to `each` in order; those before `integrate_before`
    /// (devices without a counter) are also integrated into segments (each window is measured;
    /// between windows, a trapezoid).
    pub(crate) fn process(
        &mut self,
        until_ns: u64,
        integrate_before: u64,
        segments: &mut VecDeque<Segment>,
        mut each: impl FnMut(&PowerPoint),
    ) {
        while let Some(p) = self.points.get(self.processed).copied() {
            if p.ts_ns > until_ns {
                break;
            }
            self.processed += 1;
            self.processed_ns = p.ts_ns;
            each(&p);
            if p.ts_ns >= integrate_before {
                continue;
            }
            let start = p.ts_ns - p.window_ns;
            match self.integrated_ns {
                None => {
                    if p.window_ns > 0 {
                        segments.push_back(measured(start, p));
                    }
                }
                Some((prev_end, prev_w)) => {
                    let from = start.max(prev_end);
                    if from > prev_end {
                        let gap = (from - prev_end) as f64 * 1e-9;
                        segments.push_back(Segment {
                            start_ns: prev_end,
                            end_ns: from,
                            energy_j: f64::midpoint(prev_w, p.watts) * gap,
                            tau_start_ns: 0,
                            tau_end_ns: 0,
                            // Unknown shape between windows: ± half the step plus 10 %.
                            interpolated_unc_j: (0.5 * (prev_w - p.watts).abs()
                                + 0.1 * f64::midpoint(prev_w, p.watts))
                                * gap,
                        });
                    }
                    if p.ts_ns > from {
                        segments.push_back(measured(from, p));
                    }
                }
            }
            if self
                .integrated_ns
                .is_none_or(|(prev_end, _)| p.ts_ns > prev_end)
            {
                self.integrated_ns = Some((p.ts_ns, p.watts));
            }
        }
    }

    /// Drops samples that end more than a second before `before_ns` (keeping two for the curve).
    pub(crate) fn prune(&mut self, before_ns: u64) {
        while self.processed > 0
            && self.points.len() > 2
            && self.points[1].ts_ns.saturating_add(1_000_000_000) < before_ns
        {
            self.points.pop_front();
            self.processed -= 1;
        }
    }

    /// First index in the processed prefix where `pred` turns false (binary search over the
    /// prefix only, so that samples not yet processed never influence the answer).
    fn processed_partition(&self, pred: impl Fn(&PowerPoint) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.processed);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.points[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Whether any processed sample lies within a second of `[a, b]`.
    pub(crate) fn near(&self, a: u64, b: u64) -> bool {
        let i = self.processed_partition(|p| p.mid_ns().saturating_add(1_000_000_000) < a);
        i < self.processed && self.points[i].mid_ns() <= b.saturating_add(1_000_000_000)
    }

    /// Fraction of `[from, to)` covered by the windows of processed samples no longer than
    /// `max_window_ns`: a mean over a longer window does not say how the power moved within
    /// a piece of that length.
    pub(crate) fn coverage(&self, from: u64, to: u64, max_window_ns: u64) -> f64 {
        if to <= from {
            return 0.0;
        }
        let first = self.points.partition_point(|p| p.ts_ns <= from);
        let mut covered = 0u64;
        let mut upto = from;
        for p in self.points.range(first.min(self.processed)..self.processed) {
            if p.window_ns > max_window_ns {
                continue;
            }
            let (start, end) = ((p.ts_ns - p.window_ns).max(upto), p.ts_ns.min(to));
            if end > start {
                covered += end - start;
                upto = end;
            }
            if p.ts_ns - p.window_ns >= to {
                break;
            }
        }
        covered as f64 / (to - from) as f64
    }

    /// The power curve at `t` from processed samples (so that it does not depend on what
    /// arrived early): linear between sample midpoints, flat up to a second beyond the ends,
    /// `None` further away.
    pub(crate) fn at(&self, t: u64) -> Option<f64> {
        const NEAR: u64 = 1_000_000_000;
        let idx = self.processed_partition(|p| p.mid_ns() <= t);
        let after = (idx < self.processed)
            .then(|| self.points.get(idx))
            .flatten();
        let before = idx.checked_sub(1).and_then(|i| self.points.get(i));
        match (before, after) {
            (Some(a), Some(b)) => {
                let (ta, tb) = (a.mid_ns(), b.mid_ns());
                let f = (t - ta) as f64 / (tb - ta).max(1) as f64;
                Some(a.watts + (b.watts - a.watts) * f.clamp(0.0, 1.0))
            }
            (Some(a), None) if t - a.mid_ns() <= NEAR => Some(a.watts),
            (None, Some(b)) if b.mid_ns() - t <= NEAR => Some(b.watts),
            _ => None,
        }
        .map(|w| w.max(0.0))
    }
}

fn measured(start: u64, p: PowerPoint) -> Segment {
    Segment {
        start_ns: start,
        end_ns: p.ts_ns,
        energy_j: p.watts * (p.ts_ns - start) as f64 * 1e-9,
        tau_start_ns: 0,
        tau_end_ns: 0,
        interpolated_unc_j: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A counter updating every 100 ms at phase 37 ms, read at jittered 20–50 ms intervals
    /// for `until_ms`, processed with `period` given: the counter and its segments.
    fn simulated(until_ms: u64, period: u64) -> (Counter, VecDeque<Segment>) {
        let mut c = Counter::default();
        let mut segs = VecDeque::new();
        let mut gaps = Vec::new();
        let mut read = 5 * MS;
        let mut s = 7u64;
        while read < until_ms * MS {
            let updates = if read < 37 * MS {
                0
            } else {
                (read - 37 * MS) / (100 * MS) + 1
            };
            c.push(read, updates * 10_000_000, None);
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            read += (20 + (s >> 33) % 31) * MS;
        }
        c.process(u64::MAX, Some(period), 1e4, &mut segs, &mut gaps, |_| {});
        (c, segs)
    }

    /// How far a segment's end is from the true update time.
    fn off_ns(seg: &Segment) -> u64 {
        let phase = (seg.end_ns + 100 * MS - 37 * MS) % (100 * MS);
        phase.min(100 * MS - phase)
    }

    #[test]
    fn known_period_pins_update_times() {
        let (_, segs) = simulated(5_000, 100 * MS);
        let late: Vec<&Segment> = segs.iter().skip(10).collect();
        assert!(!late.is_empty());
        let mut worst_off = 0;
        let mut worst_tau = 0;
        for seg in late {
            let off = off_ns(seg);
            assert!(off <= seg.tau_end_ns, "truth outside the bounds: {seg:?}");
            worst_off = worst_off.max(off);
            worst_tau = worst_tau.max(seg.tau_end_ns);
        }
        eprintln!("worst offset {worst_off} ns, worst half-width {worst_tau} ns");
        // A read gap is 20–50 ms: the bounds are several times tighter than one.
        assert!(worst_off <= 3 * MS, "{worst_off}");
        assert!(worst_tau <= 8 * MS, "{worst_tau}");
        let total: f64 = segs.iter().map(|s| s.energy_j).sum();
        assert!(total > 0.0);
    }

    /// The same counter, given a period 2 % off (what a short measurement at start can say):
    /// the updates' own period takes over and the update times stay pinned.
    #[test]
    fn a_period_measured_slightly_off_is_corrected_by_the_updates() {
        let worst = |segs: &VecDeque<Segment>| segs.iter().skip(50).map(off_ns).max();
        let (_, exact) = simulated(20_000, 100 * MS);
        let (c, off) = simulated(20_000, 102 * MS);
        let fitted = c.fit.period(102 * MS);
        let (exact, off) = (worst(&exact), worst(&off));
        eprintln!("worst offset: exact period {exact:?} ns, 2 % off {off:?} ns, fitted {fitted:?}");
        assert!(
            fitted.is_some_and(|p| p.abs_diff(100 * MS) < MS / 5),
            "{fitted:?}"
        );
        assert!(off.is_some_and(|o| o <= 5 * MS), "{off:?}");
    }

    #[test]
    fn out_of_order_readings_are_sorted_and_late_ones_refused() {
        let mut c = Counter::default();
        assert_eq!(c.push(20, 2, None), Push::Appended);
        assert_eq!(c.push(10, 1, None), Push::Reordered);
        let mut segs = VecDeque::new();
        let mut gaps = Vec::new();
        c.process(20, None, 1e9, &mut segs, &mut gaps, |_| {});
        assert_eq!(c.push(15, 1, None), Push::Late);
        assert_eq!(c.push(30, 3, None), Push::Appended);
    }

    #[test]
    fn power_only_integration_measures_windows_and_fills_gaps() {
        let mut p = PowerCurve::default();
        for i in 1..=10u64 {
            p.push(PowerPoint {
                ts_ns: i * 100 * MS,
                window_ns: 25 * MS,
                watts: 100.0,
            });
        }
        let mut segs = VecDeque::new();
        assert_eq!(p.at(150 * MS), None, "nothing processed yet");
        p.process(u64::MAX, u64::MAX, &mut segs, |_| {});
        assert_eq!(p.at(150 * MS), Some(100.0));
        let total: f64 = segs.iter().map(|s| s.energy_j).sum();
        // From 75 ms to 1000 ms at 100 W.
        assert!((total - 92.5).abs() < 1e-9, "{total}");
        let segs: Vec<Segment> = segs.into_iter().collect();
        assert!(segs.windows(2).all(|w| w[0].end_ns == w[1].start_ns));
        assert!((p.coverage(100 * MS, 200 * MS, 25 * MS) - 0.25).abs() < 1e-9);
        // Windows longer than the pieces asked about do not count.
        assert!(p.coverage(100 * MS, 200 * MS, 10 * MS).abs() < 1e-12);
    }
}
