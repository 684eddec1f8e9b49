//! When a request is in the engine: from the start of its prefill step to the end of the step
//! that produced its last token. Before that it waits in the queue, after that its response is
//! only being written; in neither does it share the engine's steps (or their power).
//!
//! How it is known, by what the wire and the engine show:
//! - streamed: the first event comes out of the step that ran its prefill, which began when
//!   the service's previous step ended (the previous step-clock mark, see `steps.rs`); its last
//!   event out of its last step;
//! - not streamed, with the completion tokens and a step clock around its end (engine marks,
//!   or other requests' write bursts): one step per token, counted back from the step that
//!   ended before the response;
//! - otherwise: from arrival to the end, as before.

use super::{
    config::LedgerConfig,
    state::Request,
    steps::{Step, StepClock},
};

/// Resolves the request's prefill step once its first event is known (cached on the request).
pub(super) fn resolve_prefill(r: &mut Request, clock: Option<&StepClock>, config: &LedgerConfig) {
    if r.prefill_from_ns.is_some() {
        return;
    }
    let Some(fe) = r.first_event_ns else {
        return;
    };
    let step = clock.map(|c| c.prefill_step(fe, config.step_clock));
    let mut from = step.and_then(|s| s.from_ns).unwrap_or(0);
    let mut ext = step.map_or(0, |s| s.extension_ns);
    // More prompt than the step's extension accounts for: chunks ran in the steps before.
    if let (Some(c), Some(s), Some(prompt)) = (clock, step, r.arrival.prompt_tokens)
        && let Some(rate) = c.prefill_ns_per_token()
        && s.from_ns.is_some()
    {
        let uncached = prompt.saturating_sub(r.arrival.cached_tokens.unwrap_or(0)) as f64;
        let needed = uncached * rate - ext as f64;
        if needed > 0.0 {
            let (start, covered) = c.chunk_steps(from, needed, config.step_clock);
            from = start;
            ext += covered;
        }
    }
    let from = from.clamp(r.arrival.ts_ns, fe);
    let to = step.map_or(fe, |s| s.to_ns).clamp(from, fe);
    r.prefill_from_ns = Some(from);
    r.prefill_to_ns = Some(if to > from { to } else { fe });
    r.prefill_ext_ns = ext.min(fe - from);
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
    // Not streamed: one step per generated token, counted back from the last step.
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
