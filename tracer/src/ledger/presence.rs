//! When a request is in the engine: from the start of its prefill step to the end of the step
//! that produced its last token. Before that it waits in the queue, after that its response is
//! only being written; in neither does it share the engine's steps (or their power).
//!
//! How it is known, by what the wire and the engine show:
//! - streamed: the first event comes out of the step that ran its prefill, which began when
//!   the service's previous step ended (the previous step-clock mark, see `steps.rs`) — or
//!   earlier, when chunks of it stretched the steps before (`prefills.rs`); its last
//!   event out of its last step;
//! - not streamed, with the completion tokens and a step clock around its end (engine marks,
//!   or other requests' write bursts): one step per token counted back from the step that
//!   ended before the response gives its first step, which is then its prefill step as above;
//! - otherwise: from arrival to the end, as before.

use super::{
    config::LedgerConfig,
    state::Request,
    steps::{Step, StepClock},
};

/// Resolves the step that finished the request's prefill once its first event is known
/// (cached on the request); `prefills::allocate_prefills` then places its chunks.
pub(super) fn resolve_prefill(r: &mut Request, clock: Option<&StepClock>, config: &LedgerConfig) {
    if r.prefill_from_ns.is_some() {
        return;
    }
    // Streamed: the first event. Not streamed: the end of its first step, one step per
    // generated token counted back from the last (known once it ended).
    let fe = match (r.first_event_ns, r.end_ns, r.completion_tokens, clock) {
        (Some(fe), ..) => fe,
        (None, Some(end), Some(tokens), Some(c)) => {
            match c.end_back(end, tokens.max(1) - 1, config.step_clock) {
                Some(t) if t > r.arrival.ts_ns => t,
                _ => return,
            }
        }
        _ => return,
    };
    let step = clock.map(|c| c.prefill_step(fe, config.step_clock));
    let from = step
        .and_then(|s| s.from_ns)
        .unwrap_or(0)
        .clamp(r.arrival.ts_ns, fe);
    let to = step.map_or(fe, |s| s.to_ns).clamp(from, fe);
    r.prefill_from_ns = Some(from);
    r.prefill_to_ns = Some(if to > from { to } else { fe });
    // Not more than the step's time since the request came in over a step's usual length (the
    // engine was idle before, or the step's start was not seen: it began at the arrival).
    r.prefill_ext_ns = match step {
        Some(s) if s.from_ns.is_some() => s.base_ns.map_or(s.extension_ns, |b| {
            s.extension_ns.min((to - from).saturating_sub(b))
        }),
        Some(s) => s.base_ns.map_or(0, |b| (to - from).saturating_sub(b)),
        None => 0,
    }
    .min(fe - from);
}

/// `[from, to)` of the request's time in the engine (`to` is `u64::MAX` while it is open).
pub(super) fn in_engine(
    r: &Request,
    clock: Option<&StepClock>,
    config: &LedgerConfig,
) -> (u64, u64) {
    let arrival = r.arrival.ts_ns;
    let policy = config.step_clock;
    let Some(end) = r.end_ns else {
        return (r.prefill_from_ns.unwrap_or(arrival), u64::MAX);
    };
    if r.first_event_ns.is_some() {
        let from = r.prefill_from_ns.unwrap_or(arrival);
        let last = r.times.back().map(|e| e.0).or(r.pruned_last_ns);
        let to = last
            .and_then(|t| clock?.step_of(t, policy))
            .map_or(end, |s| s.to_ns)
            .min(end);
        return if to > from {
            (from, to)
        } else {
            (from, end.max(from + 1))
        };
    }
    // Not streamed: from its prefill step (see `resolve_prefill`), else one step per
    // generated token counted back from the last step.
    if let Some(from) = r.prefill_from_ns {
        let to = clock
            .and_then(|c| c.step_of(end, policy))
            .map_or(end, |s| s.to_ns)
            .min(end);
        if to > from {
            return (from, to);
        }
    }
    let counted = clock.zip(r.completion_tokens).and_then(|(c, tokens)| {
        let last: Step = c.step_of(end, policy)?;
        let from = c.steps_back(end, tokens.max(1) - 1, policy)?;
        Some((from.max(arrival), last.to_ns))
    });
    match counted {
        Some((from, to)) if to > from => (from, to),
        _ => (arrival, end.max(arrival + 1)),
    }
}
