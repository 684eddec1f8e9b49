//! A service's engine steps: where they end, from the engine itself when it can be seen.
//!
//! In continuous batching every step ends with one token for each sequence in the batch. The
//! ledger needs those step ends to know which requests were in which step: a request's prefill
//! ran in the step that produced its first token, each later token in the step before it was
//! written, and a request waiting in the queue is in no step at all. Three clocks, best first:
//!
//! - **IPC** ([`StepSource::Ipc`]): the API process receives the engine's per-step message
//!   (vLLM's per-step engine outputs over ZMQ, `SGLang`'s over ZMQ, TGI's gRPC over a Unix socket) and
//!   then writes that step's chunks, one request after the other. The receipt is the step end,
//!   and every chunk written after it (until the next receipt) belongs to that step, however
//!   long the API takes to write them.
//! - **CUDA** ([`StepSource::Cuda`]): the GPU-holding process synchronises with its stream at
//!   the end of a step that launched kernels (single-process servers have no IPC).
//! - **Write bursts** (the fallback): the service's streamed writes, chained while they follow
//!   each other closer than a window. The window adapts: half the 25th percentile of the gaps
//!   between one request's consecutive events (≈ a decode step), at most
//!   `burst_window_max_ns`, starting from `step_merge_ns` until enough gaps are seen. A step's
//!   chunks written one request at a time chain into one burst as long as writing them takes
//!   less than half a step.
//!
//! Marks of one source closer than [`MARK_MERGE_NS`] are one step end (a message read in two
//! parts, tensor-parallel ranks synchronising together). `Auto` uses IPC where its marks cover
//! the time asked about, else CUDA, else bursts.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::bodies::BodySizes;
pub(crate) use context::ContextTime;

mod context;
mod gaps;

/// Where a step end was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepSource {
    /// The API process received a message from the engine over IPC.
    Ipc,
    /// A GPU-holding process synchronised after launching kernels.
    Cuda,
}

/// Which clock the ledger steps by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StepClockPolicy {
    /// IPC where seen, else CUDA, else write bursts.
    #[default]
    Auto,
    /// Only the engine's IPC messages (write bursts where there are none).
    Ipc,
    /// Only CUDA synchronisations (write bursts where there are none).
    Cuda,
    /// Only write bursts (the clock of a server whose engine is not seen).
    Writes,
}

/// Most steps a chunked prefill is followed back through.
const MAX_CHUNK_STEPS: usize = 16;
/// Prefill rates kept (see [`StepClock::prefill_sample`]).
const RATE_SAMPLES: usize = 64;
/// Prefill rates needed before they size a prefill (their median is robust to one outlier).
const MIN_RATES: usize = 3;
/// Steps on each side of a prefill step that tell what a step without prefill lasts.
const BASE_STEPS: usize = 32;
/// Marks of one source closer than this are one step end.
pub(crate) const MARK_MERGE_NS: u64 = 300_000;
/// A source's marks cover a time when one lies within this of it.
const COVER_NS: u64 = 1_000_000_000;
/// Gaps between one request's events kept for the burst window.
const GAP_SAMPLES: usize = 256;
/// Gaps needed before the burst window adapts.
const MIN_GAPS: usize = 16;
/// The burst window is never below this (writes of one step by a slow server follow each other
/// closer than this).
const MIN_WINDOW_NS: u64 = 200_000;

/// The step that produced an event, or in which a request's prefill ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Step {
    /// When the step began (the previous step's end).
    pub from_ns: u64,
    /// When it ended.
    pub to_ns: u64,
}

impl Step {
    pub(crate) fn len_ns(self) -> u64 {
        self.to_ns - self.from_ns
    }
}

/// The engine step a request's prefill ran in.
#[expect(
    clippy::struct_field_names,
    reason = "all three are times in ns, named with their unit"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PrefillStep {
    /// When the step began (the previous step's end), or `None` when the engine was idle.
    pub from_ns: Option<u64>,
    /// When the step ended (at most the first event).
    pub to_ns: u64,
    /// How much longer the step was than its neighbours.
    pub extension_ns: u64,
    /// How long a step without prefill lasts around it.
    pub base_ns: Option<u64>,
}

/// Part of a stretched step's extension: the step `[from_ns, to_ns)` and how many ns of it.
#[expect(
    clippy::struct_field_names,
    reason = "all three are times in ns, named with their unit"
)]
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Chunk {
    pub from_ns: u64,
    pub to_ns: u64,
    pub own_ns: f64,
}

/// The stretched steps before a prefill's last step (see [`StepClock::chain_before`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Chain {
    /// Stretched steps that finished no prefill, nearest first, with their whole extension.
    pub steps: Vec<Chunk>,
    /// The stretched step before them that finished other prefills, with what they left.
    pub boundary: Option<Chunk>,
    /// Where the run of stretched steps began was not seen: the walk stopped at
    /// [`MAX_CHUNK_STEPS`], at the start of what the clock keeps, or at a source's first mark
    /// that another source shows was not the engine's first step.
    pub truncated: bool,
}

/// Step ends of one source, in time order.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Marks {
    ends: VecDeque<u64>,
}

impl Marks {
    fn insert(&mut self, t: u64, merge_ns: u64) {
        let idx = self.ends.partition_point(|&x| x <= t);
        if idx > 0 && t - self.ends[idx - 1] <= merge_ns {
            return;
        }
        match self.ends.get(idx).copied() {
            Some(next) if next - t <= merge_ns => self.ends[idx] = t,
            _ => self.ends.insert(idx, t),
        }
    }

    /// A mark lies near `t`, and the step ending at or before it has a seen start (a source's
    /// first mark has none: the step it ended began before the source was seen).
    fn covers(&self, t: u64) -> bool {
        let idx = self.ends.partition_point(|&x| x <= t);
        let near = |i: usize| self.ends.get(i).is_some_and(|&m| m.abs_diff(t) <= COVER_NS);
        idx >= 2 && (near(idx - 1) || near(idx))
    }

    /// Index of the latest end at or before `t`.
    fn at_or_before(&self, t: u64) -> Option<usize> {
        self.ends.partition_point(|&x| x <= t).checked_sub(1)
    }

    /// The 10th percentile of the step lengths around mark `i` (up to [`BASE_STEPS`] each side).
    fn low_gap(&self, i: usize) -> Option<u64> {
        let lo = i.saturating_sub(BASE_STEPS).max(1);
        let hi = (i + BASE_STEPS).min(self.ends.len().saturating_sub(1));
        let mut gaps: Vec<u64> = (lo..=hi).filter_map(|j| self.gap(j)).collect();
        if gaps.len() < 8 {
            return None;
        }
        let q = gaps.len() / 10;
        Some(*gaps.select_nth_unstable(q).1)
    }

    fn gap(&self, i: usize) -> Option<u64> {
        let a = *self.ends.get(i.checked_sub(1)?)?;
        Some(self.ends.get(i)? - a)
    }

    fn prune(&mut self, t: u64) {
        while self.ends.len() > 2 && self.ends[2] < t {
            self.ends.pop_front();
        }
    }
}

/// Write bursts: the first event time of each (as marks) and the last, in time order.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Bursts {
    marks: Marks,
    lasts: VecDeque<u64>,
}

impl Bursts {
    fn insert(&mut self, t: u64, window_ns: u64) {
        let firsts = &mut self.marks.ends;
        let idx = firsts.partition_point(|&f| f <= t);
        if let Some(i) = idx.checked_sub(1)
            && t <= self.lasts[i].saturating_add(window_ns)
        {
            self.lasts[i] = self.lasts[i].max(t);
            // It may now reach the next burst: chain them.
            if let Some(&next_first) = firsts.get(i + 1)
                && next_first <= self.lasts[i].saturating_add(window_ns)
            {
                let next_last = self.lasts[i + 1];
                self.lasts[i] = self.lasts[i].max(next_last);
                firsts.remove(i + 1);
                self.lasts.remove(i + 1);
            }
        } else if let Some(next) = firsts.get_mut(idx)
            && *next <= t.saturating_add(window_ns)
        {
            *next = t;
        } else {
            firsts.insert(idx, t);
            self.lasts.insert(idx, t);
        }
    }

    fn prune(&mut self, t: u64) {
        while self.marks.ends.len() > 2 && self.marks.ends[2] < t {
            self.marks.ends.pop_front();
            self.lasts.pop_front();
        }
    }
}

/// Step ends of one service.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct StepClock {
    ipc: Marks,
    cuda: Marks,
    bursts: Bursts,
    /// Recent gaps between one request's consecutive events (a ring).
    gaps: gaps::Gaps,
    window_ns: Option<u64>,
    /// Requests' first events, in time order: a step that wrote one finished a prefill.
    firsts: VecDeque<u64>,
    /// Recent prefill steps' extension per uncached prompt token (ns), from steps whose
    /// prefills all reported usage: sizes the prefill of requests whose usage was not.
    prefill_rates: Samples,
    /// Recent requests' body sizes and prompt tokens, from requests that reported usage.
    bodies: BodySizes,
    /// Per step that finished prefills (by its end), what they left of its extension.
    leftovers: VecDeque<(u64, f64)>,
    /// The prefill period being summed (see [`StepClock::period_group`]).
    period: Option<Period>,
    /// Step time per decode context token (`context.rs`).
    pub(crate) context: ContextTime,
}

/// A run of stretched steps with no step of usual length inside: every chunk in it belongs
/// to a prefill that finished in it, whatever order the engine ran them in.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Period {
    ext_ns: f64,
    tokens: u64,
    /// Every prefill in it reported its size, and its start was seen.
    known: bool,
}

impl StepClock {
    /// A step end seen from the engine.
    pub(crate) fn mark(&mut self, t: u64, source: StepSource) {
        match source {
            StepSource::Ipc => self.ipc.insert(t, MARK_MERGE_NS),
            StepSource::Cuda => self.cuda.insert(t, MARK_MERGE_NS),
        }
    }

    /// A streamed event at `t`; `prev` is the same request's previous event, if any.
    pub(crate) fn event(&mut self, t: u64, prev: Option<u64>, initial_ns: u64, max_ns: u64) {
        if let Some(p) = prev.filter(|&p| p < t) {
            self.gaps.push(t - p, GAP_SAMPLES);
            let n = self.gaps.len();
            if n >= MIN_GAPS
                && n.is_multiple_of(8)
                && let Some(p25) = self.gaps.nth_smallest(n / 4)
            {
                self.window_ns = Some((p25 / 2).clamp(MIN_WINDOW_NS, max_ns.max(MIN_WINDOW_NS)));
            }
        }
        let window = self.window_ns.unwrap_or(initial_ns);
        self.bursts.insert(t, window);
    }

    /// A request's first event (its prefill finished in the step that produced it).
    pub(crate) fn first_event(&mut self, t: u64) {
        let idx = self.firsts.partition_point(|&f| f <= t);
        self.firsts.insert(idx, t);
    }

    /// A request's first event turned out to be at `t`, not `was` (an earlier one arrived out
    /// of order): one prefill finished, not two.
    pub(crate) fn move_first_event(&mut self, was: u64, t: u64) {
        let idx = self.firsts.partition_point(|&f| f < was);
        if self.firsts.get(idx) == Some(&was) {
            self.firsts.remove(idx);
        }
        self.first_event(t);
    }

    /// A group of prefills that finished in one step, seen in time order: `added_ns` is the
    /// extension of its step and of the chunk steps before it that it brought to its period
    /// (`starts`: its chain began after a step of usual length, so the previous period is
    /// closed), `tokens` their uncached prompt tokens (`None`: some size unknown). A closed
    /// period's extension over its tokens is a sample of the service's ns per uncached token —
    /// unlike one step's, which a chunk of the next prefill may have stretched too.
    /// `seen` is false when a new period's start is not known (the chain was cut short).
    pub(crate) fn period_group(
        &mut self,
        (starts, seen): (bool, bool),
        added_ns: f64,
        tokens: Option<u64>,
    ) {
        if starts && let Some(p) = self.period.take().filter(|p| p.known && p.ext_ns >= 1.0) {
            self.prefill_sample(p.ext_ns as u64, p.tokens);
        }
        let p = self.period.get_or_insert(Period {
            ext_ns: 0.0,
            tokens: 0,
            known: starts && seen,
        });
        p.ext_ns += added_ns;
        match tokens {
            Some(t) => p.tokens += t,
            None => p.known = false,
        }
    }

    /// A request with `tokens` uncached prompt tokens made its prefill steps `extension_ns`
    /// longer than steps without prefill.
    pub(crate) fn prefill_sample(&mut self, extension_ns: u64, tokens: u64) {
        if extension_ns == 0 || tokens == 0 {
            return;
        }
        self.prefill_rates.push(extension_ns as f64 / tokens as f64);
    }

    /// A request whose body was `bytes` long reported `prompt_tokens`.
    pub(crate) fn prompt_sample(&mut self, bytes: u64, prompt_tokens: u64) {
        self.bodies.sample(bytes, prompt_tokens);
    }

    /// A prompt's tokens estimated from its body's size (`bodies.rs`), once known.
    pub(crate) fn prompt_estimate(&self, bytes: u64) -> Option<f64> {
        self.bodies.estimate(bytes)
    }

    /// The median of the recent prefill rates, ns per uncached token, once a few are known.
    pub(crate) fn prefill_ns_per_token(&self) -> Option<f64> {
        self.prefill_rates.median
    }

    /// The burst window in use.
    #[cfg(test)]
    pub(crate) fn burst_window_ns(&self, initial_ns: u64) -> u64 {
        self.window_ns.unwrap_or(initial_ns)
    }

    /// The engine's own sources `policy` allows, best first.
    fn engine_sources(&self, policy: StepClockPolicy) -> impl Iterator<Item = &Marks> {
        let ipc = matches!(policy, StepClockPolicy::Auto | StepClockPolicy::Ipc);
        let cuda = matches!(policy, StepClockPolicy::Auto | StepClockPolicy::Cuda);
        [ipc.then_some(&self.ipc), cuda.then_some(&self.cuda)]
            .into_iter()
            .flatten()
    }

    /// The sources `policy` allows, best first (write bursts last, always).
    fn sources(&self, policy: StepClockPolicy) -> impl Iterator<Item = &Marks> {
        self.engine_sources(policy)
            .chain(std::iter::once(&self.bursts.marks))
    }

    /// Write bursts (steps in which the API process wrote to some request) that began after
    /// `a` and before `b`.
    pub(crate) fn bursts_between(&self, a: u64, b: u64) -> usize {
        let ends = &self.bursts.marks.ends;
        ends.partition_point(|&f| f < b)
            .saturating_sub(ends.partition_point(|&f| f <= a))
    }

    /// The marks to step by near `t`: the first engine source that covers it, else the write
    /// bursts (whether they cover it or not, so they are not searched for it: this runs for
    /// every event of every request in every segment).
    fn marks(&self, t: u64, policy: StepClockPolicy) -> &Marks {
        self.engine_sources(policy)
            .find(|m| m.covers(t))
            .unwrap_or(&self.bursts.marks)
    }

    /// The step that produced an event written at `t`: from the end before the latest one at
    /// or before `t`, to that one.
    pub(crate) fn step_of(&self, t: u64, policy: StepClockPolicy) -> Option<Step> {
        let m = self.marks(t, policy);
        let i = m.at_or_before(t)?;
        Some(Step {
            from_ns: m.ends[i.checked_sub(1)?],
            to_ns: m.ends[i],
        })
    }

    /// The steps that ended in `(a, b]`, by the marks in use at `b`.
    pub(crate) fn steps_ending(
        &self,
        a: u64,
        b: u64,
        policy: StepClockPolicy,
    ) -> impl Iterator<Item = Step> + '_ {
        let m = self.marks(b, policy);
        let lo = m.ends.partition_point(|&x| x <= a).max(1);
        let hi = m.ends.partition_point(|&x| x <= b);
        (lo..hi).map(move |i| Step {
            from_ns: m.ends[i - 1],
            to_ns: m.ends[i],
        })
    }

    /// The marks to find the step that ended at or before `t` by: as [`StepClock::marks`], or,
    /// when no source saw that step's start, the best that saw its end (the first step after
    /// the engine was idle began when its requests came in; a source's first mark has no start
    /// either: a blocking read of the engine's first message entered before the probes were
    /// attached is not seen).
    fn marks_with_start(&self, t: u64, policy: StepClockPolicy) -> &Marks {
        let m = self.marks(t, policy);
        if m.at_or_before(t).is_some_and(|i| i > 0) {
            return m;
        }
        self.sources(policy)
            .find(|c| {
                c.at_or_before(t)
                    .is_some_and(|i| c.ends[i].abs_diff(t) <= COVER_NS)
            })
            .unwrap_or(m)
    }

    /// The step a request's prefill ran in, given its first event at `fe`.
    pub(crate) fn prefill_step(&self, fe: u64, policy: StepClockPolicy) -> PrefillStep {
        let m = self.marks_with_start(fe, policy);
        let Some(own) = m.at_or_before(fe) else {
            return PrefillStep {
                from_ns: None,
                to_ns: fe,
                extension_ns: 0,
                base_ns: None,
            };
        };
        let to_ns = m.ends[own];
        let from_ns = own.checked_sub(1).map(|p| m.ends[p]);
        let before = own.checked_sub(1).and_then(|p| m.gap(p));
        let after = m.gap(own + 1);
        let neighbours = match (before, after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Under load every step may carry prefill chunks, its neighbours too: a step without
        // one is better seen as a low quantile of the steps around it.
        let base = match (neighbours, m.low_gap(own)) {
            (Some(a), Some(q)) => Some(a.min(q)),
            (a, q) => a.or(q),
        };
        let extension_ns = match (from_ns, base) {
            (Some(f), Some(b)) => (to_ns - f).saturating_sub(b),
            _ => 0,
        };
        PrefillStep {
            from_ns,
            to_ns,
            extension_ns,
            base_ns: base,
        }
    }

    /// A prefill longer than one step (chunked prefill) ran in the steps before the one that
    /// ended with its first token, each stretched by its chunk. Walks back from the step that
    /// began at `from_ns` through steps longer than a step without prefill that finished no
    /// other prefill (no first event came out of them: under first-come-first-served chunking
    /// their extension was a chunk of a prefill that finished later), at most
    /// [`MAX_CHUNK_STEPS`]. It stops at a step no longer than usual, or at a stretched step that
    /// finished other prefills: that one is the chain's `boundary`, carrying what those
    /// prefills left of its extension ([`StepClock::set_leftover`]; 0 when not known).
    pub(crate) fn chain_before(
        &self,
        from_ns: u64,
        not_before: u64,
        policy: StepClockPolicy,
    ) -> Chain {
        let mut chain = Chain::default();
        // The source whose mark began that step (the one the prefill step was found by).
        let exact = |m: &Marks| m.at_or_before(from_ns).filter(|&j| m.ends[j] == from_ns);
        let preferred = self.marks(from_ns, policy);
        let Some((m, mut j)) = [preferred, &self.ipc, &self.cuda, &self.bursts.marks]
            .into_iter()
            .find_map(|m| Some((m, exact(m)?)))
        else {
            return chain;
        };
        chain.truncated = true;
        let Some(base) = m.low_gap(j) else {
            return chain;
        };
        for _ in 0..MAX_CHUNK_STEPS {
            if m.ends[j] <= not_before {
                // Nothing of the group's had come in yet.
                chain.truncated = false;
                break;
            }
            // A step that began before the group's first request came in (the engine was idle,
            // or its start was not seen) ran its prefill from that arrival at the earliest.
            let start = m
                .ends
                .get(j.wrapping_sub(1))
                .copied()
                .filter(|&s| j > 0 && s >= not_before);
            if j == 0 && self.any_end_between(not_before, m.ends[j].saturating_sub(MARK_MERGE_NS)) {
                // Another source saw steps end in between: not idle, this one missed them.
                break;
            }
            let len = m.ends[j] - start.unwrap_or(not_before);
            // A step no longer than usual carried no chunk: the prefill began after it.
            let ext = len.saturating_sub(base);
            if ext * 10 < base {
                chain.truncated = false;
                break;
            }
            let step = Chunk {
                from_ns: start.unwrap_or(not_before),
                to_ns: m.ends[j],
                own_ns: ext as f64,
            };
            // A step that produced a first token finished that request's prefill: only what
            // it left of its extension can be a chunk of this one.
            let out_to = m.ends.get(j + 1).copied().unwrap_or(u64::MAX);
            let i = self.firsts.partition_point(|&f| f < step.to_ns);
            if self.firsts.get(i).is_some_and(|&f| f < out_to) {
                chain.boundary = Some(Chunk {
                    own_ns: self.leftover(step.to_ns).unwrap_or(0.0).min(step.own_ns),
                    ..step
                });
                chain.truncated = false;
                break;
            }
            chain.steps.push(step);
            if start.is_none() {
                // It began when the group's first request came in.
                chain.truncated = false;
                break;
            }
            j -= 1;
        }
        chain
    }

    /// Whether any source saw a step end in `(a, b)`.
    fn any_end_between(&self, a: u64, b: u64) -> bool {
        [&self.ipc, &self.cuda, &self.bursts.marks].iter().any(|m| {
            let i = m.ends.partition_point(|&x| x <= a);
            m.ends.get(i).is_some_and(|&x| x < b)
        })
    }

    /// Whether the step after the one ending at `to_ns` was stretched (a prefill period goes
    /// on); `None` while that step has not ended.
    pub(crate) fn stretched_after(&self, to_ns: u64, policy: StepClockPolicy) -> Option<bool> {
        let m = self.marks(to_ns, policy);
        let j = m.at_or_before(to_ns).filter(|&j| m.ends[j] == to_ns)?;
        let base = m.low_gap(j + 1)?;
        let len = m.gap(j + 1)?;
        Some(len.saturating_sub(base) * 10 >= base)
    }

    /// What the prefills that finished in the step ending at `to_ns` left of its extension
    /// (ns), once they were allocated.
    /// (Step ends seen by two sources differ by a little: the nearest within [`MARK_MERGE_NS`].)
    pub(crate) fn leftover(&self, to_ns: u64) -> Option<f64> {
        self.leftover_at(to_ns).map(|i| self.leftovers[i].1)
    }

    fn leftover_at(&self, to_ns: u64) -> Option<usize> {
        let i = self.leftovers.partition_point(|e| e.0 < to_ns);
        [i.checked_sub(1), Some(i)]
            .into_iter()
            .flatten()
            .filter(|&k| {
                self.leftovers
                    .get(k)
                    .is_some_and(|e| e.0.abs_diff(to_ns) <= MARK_MERGE_NS)
            })
            .min_by_key(|&k| self.leftovers[k].0.abs_diff(to_ns))
    }

    /// Records what the prefills finished by the step ending at `to_ns` left of its extension
    /// (a later prefill's first chunk).
    pub(crate) fn set_leftover(&mut self, to_ns: u64, ns: f64) {
        if let Some(k) = self.leftover_at(to_ns) {
            self.leftovers[k].1 = ns;
        } else {
            let i = self.leftovers.partition_point(|e| e.0 < to_ns);
            self.leftovers.insert(i, (to_ns, ns));
        }
    }

    /// The start of the step `n` steps before the one that ended at or before `t` (`n = 0`:
    /// that step's own start); `None` when the clock does not reach back that far or does not
    /// cover `t` (write bursts exist only while other requests stream).
    pub(crate) fn steps_back(&self, t_ns: u64, steps: u64, policy: StepClockPolicy) -> Option<u64> {
        let marks = self.marks(t_ns, policy);
        if !marks.covers(t_ns) {
            return None;
        }
        let last = marks.at_or_before(t_ns)?;
        let back = usize::try_from(steps).ok()?.checked_add(1)?;
        let first = last.checked_sub(back)?;
        Some(marks.ends[first])
    }

    /// The end of the step `n` steps before the one that ended at or before `t_ns` (`n = 0`:
    /// that one); `None` as for [`StepClock::steps_back`].
    pub(crate) fn end_back(&self, t_ns: u64, n: u64, policy: StepClockPolicy) -> Option<u64> {
        let marks = self.marks(t_ns, policy);
        if !marks.covers(t_ns) {
            return None;
        }
        let last = marks.at_or_before(t_ns)?;
        Some(marks.ends[last.checked_sub(usize::try_from(n).ok()?)?])
    }

    /// Forgets steps before `t`, keeping two for the gaps around the first step after it.
    pub(crate) fn prune(&mut self, t: u64) {
        let keep_from = [&self.ipc, &self.cuda, &self.bursts.marks]
            .iter()
            .filter_map(|m| m.ends.front().copied())
            .min()
            .unwrap_or(t)
            .min(t);
        while self.firsts.front().is_some_and(|&f| f < keep_from) {
            self.firsts.pop_front();
        }
        while self.leftovers.front().is_some_and(|e| e.0 < keep_from) {
            self.leftovers.pop_front();
        }
        self.ipc.prune(t);
        self.cuda.prune(t);
        self.bursts.prune(t);
    }
}

/// The last [`RATE_SAMPLES`] of a ratio and their median (kept up to date on each sample, once
/// there are [`MIN_RATES`]: read for every request in every split unit, written once per
/// request).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Samples {
    values: VecDeque<f64>,
    median: Option<f64>,
}

impl Samples {
    fn push(&mut self, v: f64) {
        if self.values.len() == RATE_SAMPLES {
            self.values.pop_front();
        }
        self.values.push_back(v);
        if self.values.len() >= MIN_RATES {
            let mut r: Vec<f64> = self.values.iter().copied().collect();
            let mid = r.len() / 2;
            self.median = Some(*r.select_nth_unstable_by(mid, f64::total_cmp).1);
        }
    }
}

#[cfg(test)]
mod tests;
