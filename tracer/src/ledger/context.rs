//! The step time a decode sequence's context adds, and whose it is.
//!
//! A decode step reads every sequence's KV cache: the longer a sequence's context, the longer
//! the step (on a memory-bound GPU, at the same power). By the written convention that time is
//! the sequence's own, as a prefill's extension of its step is — time-slicing it would charge
//! short prompts for long ones. The cost model cannot learn it per counter interval: under
//! load an interval is busy throughout whatever the contexts, so the time shows up as busy
//! time, not as a price per context token.
//!
//! So it is measured where it shows: in the engine's decode steps. Per service, each step
//! without a prefill in it gives (sequences in it, Σ their context tokens, its length), and the
//! slope of length on context is fitted by least squares **within each batch size** (each
//! number of sequences has its own intercept), so no function of the batch size — per-sequence
//! work, a kernel choice that changes with the batch — can pass for context. The slope is used
//! only where the data shows it (t ≥ [`MIN_T`]); else no step time is given to contexts.

use crate::ids::RequestId;

use super::{
    features::{Feat, prompt_tokens},
    pending::IdMap,
    presence::pauses,
    state::Request,
    steps::{Step, StepClock, StepClockPolicy},
};

/// Moves the time a unit's decode contexts added to its steps from the time-sliced share to
/// the requests whose contexts they were: each gets `ns_per_token` × Σ its steps' context, and
/// gives back its time-sliced part of the unit's total (`plain_s` / `busy_s`). Σ `time_s` is
/// unchanged.
pub(super) fn own_context_time(feats: &mut [Feat], ns_per_token: f64, busy_s: f64) {
    if !(busy_s > 0.0 && ns_per_token > 0.0) {
        return;
    }
    let s_per_token = ns_per_token * 1e-9;
    let total: f64 = feats.iter().map(|f| f.step_ctx).sum::<f64>() * s_per_token;
    // Never more than most of the busy time: a step's fixed part is nobody's own.
    let scale = (0.9 * busy_s / total).min(1.0);
    if !(total > 0.0 && scale.is_finite()) {
        return;
    }
    for f in feats {
        let own = f.step_ctx * s_per_token * scale;
        f.time_s = (f.time_s + own - total * scale * f.plain_s / busy_s).max(0.0);
    }
}

/// Decode steps learned per measured segment at most (evenly spread).
const STEPS_PER_SEGMENT: usize = 4;

/// A request in the engine around the steps being learned, and its time there.
pub(super) type Member = (RequestId, (u64, u64));

/// The decode steps of a service that ended in `(from, to]` (after those already learned) as
/// `(end, sequences, Σ context tokens, length)` samples for [`ContextTime::learn`]. A step is
/// left out when a request was in prefill in it, or was in the engine for only part of it (its
/// membership is not clear); a paused request is not in it.
pub(super) fn decode_steps(
    clock: &StepClock,
    policy: StepClockPolicy,
    (from, to): (u64, u64),
    (members, requests): (&[Member], &IdMap<Box<Request>>),
    buf: &mut Vec<(u64, u64)>,
    out: &mut Vec<(u64, usize, f64, u64)>,
) {
    let from = from.max(clock.context.learned_until_ns());
    // A few steps per segment are plenty for the fit and keep the cost per segment linear in
    // the requests in flight, however short the steps (write bursts of a busy server).
    let stride = clock
        .steps_ending(from, to, policy)
        .count()
        .div_ceil(STEPS_PER_SEGMENT)
        .max(1);
    'steps: for s in clock.steps_ending(from, to, policy).step_by(stride) {
        let (mut seqs, mut ctx) = (0usize, 0.0);
        for (id, engine) in members {
            let Some(r) = requests.get(id) else {
                continue;
            };
            let (a, b) = *engine;
            if a >= s.to_ns || b <= s.from_ns {
                continue;
            }
            if a > s.from_ns || b < s.to_ns || r.prefill_to_ns.is_none_or(|p| p >= s.to_ns) {
                continue 'steps;
            }
            buf.clear();
            let (p0, p1) = pauses(r, Some(clock), policy, (s.from_ns, s.to_ns), buf);
            if p1 > p0 {
                continue;
            }
            seqs += 1;
            ctx += context_at(r, clock, s, *engine);
        }
        if seqs > 0 {
            out.push((s.to_ns, seqs, ctx, s.len_ns()));
        }
    }
}

/// The request's context in step `s`: its prompt and the tokens it generated before.
fn context_at(r: &Request, clock: &StepClock, step: Step, (from, to): (u64, u64)) -> f64 {
    let prompt = prompt_tokens(r, Some(clock));
    let generated = if r.first_event_ns.is_some() {
        let per_event = match r.completion_tokens {
            Some(t) if r.events > 0 => t as f64 / r.events as f64,
            _ => 1.0,
        };
        let i = r.times.partition_point(|e| e.0 < step.to_ns);
        let before = r.pruned_events + r.times.range(..i).map(|e| u64::from(e.1)).sum::<u64>();
        before as f64 * per_event
    } else {
        // Not streamed: its tokens spread evenly over its time in the engine.
        let tokens = r.completion_tokens.unwrap_or(0) as f64;
        tokens * step.from_ns.saturating_sub(from) as f64 / to.saturating_sub(from).max(1) as f64
    };
    prompt + generated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feat(time_s: f64, step_ctx: f64) -> Feat {
        Feat {
            cand: 0,
            a: 0,
            b: 100_000_000,
            time_s,
            plain_s: time_s,
            prefill: 0.0,
            decode: 10.0,
            decode_ctx: step_ctx,
            step_ctx,
            chunks: (0, 0),
            pauses: (0, 0),
            tokens_known: true,
            bytes_rate: None,
        }
    }

    #[test]
    fn a_long_context_owns_the_step_time_it_adds() {
        // Two sequences in the same ten steps of 10 ms: contexts 4,000 and 100 tokens at
        // 100 ns each add 0.4 ms and 0.01 ms to every step.
        let mut f = [feat(0.05, 40_000.0), feat(0.05, 1_000.0)];
        own_context_time(&mut f, 100.0, 0.1);
        let total: f64 = f.iter().map(|f| f.time_s).sum();
        assert!((total - 0.1).abs() < 1e-12, "{total}");
        // Each: half of the 95.9 ms the contexts did not add, plus its own.
        assert!(
            (f[0].time_s - (0.047_95 + 0.004)).abs() < 1e-9,
            "{}",
            f[0].time_s
        );
        assert!(
            (f[1].time_s - (0.047_95 + 0.000_1)).abs() < 1e-9,
            "{}",
            f[1].time_s
        );
    }
}
