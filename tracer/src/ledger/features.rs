//! A request's features in one split unit: its time-sliced share of the busy time, and the
//! prefill and decode tokens it processed there (what the split policies weigh).

use std::collections::BTreeSet;

use super::{
    state::Request,
    steps::{Chunk, StepClock, StepClockPolicy},
};

/// A request's features in one split unit.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct Feat {
    pub(super) cand: usize,
    pub(super) a: u64,
    pub(super) b: u64,
    /// Its share of the unit's busy time, seconds: time-sliced, plus the part of its prefill
    /// step its prefill caused (what the cost model prices).
    pub(super) time_s: f64,
    /// ∫ 1/n(t) dt over its presence: plain time slicing, seconds (the `equal` split).
    pub(super) plain_s: f64,
    pub(super) prefill: f64,
    pub(super) decode: f64,
    /// Σ decode token × its context length.
    pub(super) decode_ctx: f64,
    /// Σ decode step × its context length (steps, not tokens: the KV cache is read once per
    /// step; see `context.rs`).
    pub(super) step_ctx: f64,
    /// Its own parts of stretched prefill steps touching the unit: a range of the unit's
    /// chunk list, each chunk's `own_ns` turned into the fraction of the step it caused.
    pub(super) chunks: (usize, usize),
    /// Stretches of the unit it sat out (`presence::pauses`): a range of the unit's pauses.
    pub(super) pauses: (usize, usize),
    pub(super) tokens_known: bool,
    pub(super) bytes_rate: Option<f64>,
}

/// Appends `r`'s prefill chunks that touch `[u0, u1)` to `out` as fractions of their steps;
/// returns their range there.
pub(super) fn unit_chunks(r: &Request, u0: u64, u1: u64, out: &mut Vec<Chunk>) -> (usize, usize) {
    let start = out.len();
    out.extend(
        r.prefill_chunks
            .iter()
            .filter(|c| c.to_ns > u0 && c.from_ns < u1 && c.to_ns > c.from_ns && c.own_ns > 0.0)
            .map(|c| Chunk {
                own_ns: (c.own_ns / (c.to_ns - c.from_ns) as f64).min(1.0),
                ..*c
            }),
    );
    (start, out.len())
}

/// Time-sliced shares of the unit's busy time. At each instant the requests in flight share
/// equally, except that during a step that carried prefills the part of the step its prefills
/// caused (its extension over neighbouring steps) goes to them. Returns busy seconds.
pub(super) fn time_shares(
    feats: &mut [Feat],
    (chunks, pauses): (&[Chunk], &[(u64, u64)]),
    points: &mut Vec<u64>,
    u0: u64,
    u1: u64,
) -> f64 {
    let m = feats.len();
    let any_ext = feats.iter().any(|f| f.chunks.1 > f.chunks.0);
    if !any_ext && pauses.is_empty() && feats.iter().all(|f| f.a == u0 && f.b == u1) {
        let each = (u1 - u0) as f64 * 1e-9 / m as f64;
        for f in feats.iter_mut() {
            f.time_s = each;
            f.plain_s = each;
        }
        return (u1 - u0) as f64 * 1e-9;
    }
    points.clear();
    points.extend(feats.iter().flat_map(|f| [f.a, f.b]));
    points.extend(
        chunks
            .iter()
            .flat_map(|c| [c.from_ns.clamp(u0, u1), c.to_ns.clamp(u0, u1)]),
    );
    points.extend(pauses.iter().flat_map(|&(a, b)| [a, b]));
    points.sort_unstable();
    points.dedup();
    // A sweep: only the requests in flight over an elementary interval can be present in
    // it, so each interval looks at those alone (kept in index order: every sum adds the same
    // terms in the same order as a scan of all of them, so the result is the same to the bit).
    // A scan of all was O(intervals × requests): 3,600 requests in a 100 ms segment at 36k
    // requests/s made this a fifth of the daemon's CPU.
    let mut by_start: Vec<usize> = (0..m).collect();
    by_start.sort_unstable_by_key(|&i| feats[i].a);
    let mut next = 0;
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut busy = 0u64;
    for win in points.windows(2) {
        let (p, q) = (win[0], win[1]);
        while next < m && feats[by_start[next]].a <= p {
            active.insert(by_start[next]);
            next += 1;
        }
        active.retain(|&i| feats[i].b >= q);
        let present = |f: &Feat| {
            f.a <= p
                && f.b >= q
                && !pauses[f.pauses.0..f.pauses.1]
                    .iter()
                    .any(|&(a, b)| a <= p && b >= q)
        };
        let count = active.iter().filter(|&&i| present(&feats[i])).count();
        if count == 0 {
            continue;
        }
        busy += q - p;
        let dt = (q - p) as f64 * 1e-9;
        // The fraction of the step at this instant that each one's prefill caused.
        let caused = |f: &Feat| -> f64 {
            if !present(f) {
                return 0.0;
            }
            chunks[f.chunks.0..f.chunks.1]
                .iter()
                .filter(|c| c.from_ns <= p && c.to_ns >= q)
                .map(|c| c.own_ns)
                .sum()
        };
        let ext: f64 = active.iter().map(|&i| caused(&feats[i])).sum();
        let scale = if ext > 1.0 { 1.0 / ext } else { 1.0 };
        let shared = dt * (1.0 - ext.min(1.0)) / count as f64;
        for &i in &active {
            let (own, here) = (caused(&feats[i]), present(&feats[i]));
            let f = &mut feats[i];
            if own > 0.0 {
                f.time_s += dt * own * scale;
            }
            if here {
                f.time_s += shared;
                f.plain_s += dt / count as f64;
            }
        }
    }
    busy as f64 * 1e-9
}

fn overlap(a: u64, b: u64, u0: u64, u1: u64) -> u64 {
    b.min(u1).saturating_sub(a.max(u0))
}

/// The request's uncached prompt tokens: reported, or (without usage) sized from the time its
/// prefill added to the steps it ran in (its chunks, see `prefills.rs`) at the service's recent
/// rate (`ns_per_token`).
pub(super) fn uncached_tokens(r: &Request, ns_per_token: Option<f64>) -> Option<f64> {
    match r.arrival.prompt_tokens {
        Some(p) => Some(p.saturating_sub(r.arrival.cached_tokens.unwrap_or(0)) as f64),
        None => ns_per_token
            .filter(|&rate| rate > 0.0 && r.prefill_own_ns() > 0.0)
            .map(|rate| r.prefill_own_ns() / rate),
    }
}

/// Uncached prompt tokens processed in `[u0, u1)`: spread over its chunks in proportion to the
/// time each added to its step, else over its prefill step (up to the first streamed event;
/// when nothing streams, the first of its steps in the engine: `engine` is its time there).
/// `false` when needed but unknown.
pub(super) fn prefill_in(
    r: &Request,
    u0: u64,
    u1: u64,
    engine: (u64, u64),
    ns_per_token: Option<f64>,
) -> (f64, bool) {
    let mut start = r.arrival.ts_ns;
    let end = match (r.first_event_ns, r.end_ns) {
        (Some(fe), _) => {
            start = r.prefill_from_ns.unwrap_or(start).clamp(start, fe);
            r.prefill_to_ns.unwrap_or(fe).clamp(start, fe)
        }
        (None, Some(e)) if r.prefill_from_ns.is_some() => {
            start = r.prefill_from_ns.unwrap_or(start).clamp(start, e);
            r.prefill_to_ns.unwrap_or(e).clamp(start, e)
        }
        (None, Some(e)) => {
            let (from, to) = (engine.0.max(start), engine.1.min(e));
            start = from;
            let steps = r.completion_tokens.unwrap_or(1).max(1);
            from + to.saturating_sub(from) / steps
        }
        // Open with nothing streamed yet: the prefill's extent is unknown.
        (None, None) => {
            return (0.0, u1 <= start);
        }
    };
    // Over its chunks in proportion to the time each added, else evenly over its step.
    let own = r.prefill_own_ns();
    let frac = if own > 0.0 {
        r.prefill_chunks
            .iter()
            .filter(|c| c.to_ns > c.from_ns)
            .map(|c| {
                c.own_ns * overlap(c.from_ns, c.to_ns, u0, u1) as f64 / (c.to_ns - c.from_ns) as f64
            })
            .sum::<f64>()
            / own
    } else if end > start {
        overlap(start, end, u0, u1) as f64 / (end - start) as f64
    } else {
        f64::from(u8::from((u0..u1).contains(&start)))
    };
    if frac <= 0.0 {
        return (0.0, true);
    }
    let Some(uncached) = uncached_tokens(r, ns_per_token) else {
        return (0.0, false);
    };
    (uncached * frac, true)
}

/// Decode tokens produced in `[u0, u1)`, and Σ token × context length: each streamed event
/// after the first (which closes the prefill) spread over the engine step that produced it
/// (with no step clock, over the time since the previous event), scaled to the reported
/// completion tokens; without events, the completion tokens spread over the request's time in
/// the engine (`engine`). `false` when needed but unknown.
pub(super) fn decode_in(
    r: &Request,
    (u0, u1): (u64, u64),
    cap: u64,
    clock: Option<(&StepClock, StepClockPolicy)>,
    engine: (u64, u64),
) -> Decode {
    let prompt = prompt_tokens(r, clock.map(|c| c.0));
    if r.first_event_ns.is_some() {
        let per_event = match r.completion_tokens {
            Some(t) if r.events > 0 => t as f64 / r.events as f64,
            _ => 1.0,
        };
        let times = &r.times;
        let first = times.partition_point(|e| e.0 <= u0);
        let mut before =
            r.pruned_events + times.range(..first).map(|e| u64::from(e.1)).sum::<u64>();
        let (mut sum, mut ctx, mut step_ctx) = (0.0, 0.0, 0.0);
        for k in first..times.len() {
            let (t, count) = times[k];
            let prev = match k.checked_sub(1) {
                Some(j) => Some(times[j].0),
                // Before the first event of all there is the prefill, not decode work.
                None => r.pruned_last_ns,
            };
            let count_before = before;
            before += u64::from(count);
            let Some(prev) = prev else {
                continue;
            };
            // The step that produced it, when the clock places one between the two events.
            let step = clock
                .and_then(|(c, policy)| c.step_of(t, policy))
                .filter(|s| s.len_ns() <= cap);
            let (start, t) = match step {
                Some(s) => (s.from_ns, s.to_ns),
                None => (prev.max(t.saturating_sub(cap)), t),
            };
            if start >= u1 {
                break;
            }
            let frac = if t > start {
                overlap(start, t, u0, u1) as f64 / (t - start) as f64
            } else {
                f64::from(u8::from((u0..u1).contains(&t)))
            };
            let tokens = f64::from(count) * per_event * frac;
            let context = prompt + count_before as f64 * per_event;
            sum += tokens;
            ctx += tokens * context;
            step_ctx += f64::from(count) * frac * context;
        }
        return Decode {
            tokens: sum,
            ctx,
            step_ctx,
            known: true,
        };
    }
    match (r.end_ns, r.completion_tokens) {
        (Some(_), Some(tokens)) => {
            let (s, e) = engine;
            let frac = if e > s {
                overlap(s, e, u0, u1) as f64 / (e - s) as f64
            } else {
                0.0
            };
            let t = tokens as f64 * frac;
            let ctx = t * (prompt + tokens as f64 / 2.0);
            Decode {
                tokens: t,
                ctx,
                step_ctx: ctx,
                known: true,
            }
        }
        (Some(_), None) => Decode::unknown(false),
        // Open, nothing streamed: may still be in prefill, or generating a whole body.
        (None, _) => Decode::unknown(u1 <= r.arrival.ts_ns),
    }
}

/// A request's decode work in a unit (see [`decode_in`]).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct Decode {
    pub(super) tokens: f64,
    /// Σ token × its context length.
    pub(super) ctx: f64,
    /// Σ step × its context length.
    pub(super) step_ctx: f64,
    /// `false` when needed but unknown.
    pub(super) known: bool,
}

impl Decode {
    fn unknown(known: bool) -> Self {
        Self {
            tokens: 0.0,
            ctx: 0.0,
            step_ctx: 0.0,
            known,
        }
    }
}

/// The request's whole prompt in tokens (cached or not: the KV cache holds all of it):
/// reported, else estimated from its body's size, else 0.
pub(super) fn prompt_tokens(r: &Request, clock: Option<&StepClock>) -> f64 {
    match r.arrival.prompt_tokens {
        Some(p) => p as f64,
        None => clock
            .zip(r.arrival.body_bytes)
            .and_then(|(c, b)| c.prompt_estimate(b))
            .unwrap_or(0.0),
    }
}
