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
//!
//! Inside that time a streamed request can sit steps out: preempted (vLLM recomputes it later,
//! TGI and `SGLang` retract it) or swapped out. A running request gets an event from every
//! step, so a gap between two of its events during which the API process wrote
//! [`PAUSE_STEPS`] or more other steps' output means it was not in those steps — unless the
//! event after the gap carries the tokens it missed (a client that read slowly, so the server
//! wrote its backlog at once). It is out of the engine from the end of the step that produced
//! the event before the gap to the start of the step that produced the one after ([`pauses`]).
//! A gap with no other writes (the API process stalled, or nothing else ran) is no pause.

use super::{
    config::LedgerConfig,
    state::Request,
    steps::{PrefillStep, Step, StepClock, StepClockPolicy},
};

/// Other steps' write bursts inside a gap between two of a request's events that make it a
/// pause. One or two are a server merging a late step's output into the next one's.
pub(super) const PAUSE_STEPS: usize = 4;
/// Events written within this of the one after a gap are written with it (a backlog).
const BACKLOG_NS: u64 = 1_000_000;

/// Appends the stretches inside `[u0, u1)` that the streamed request `r` sat out (see the
/// module docs) to `out`; returns their range there.
pub(super) fn pauses(
    r: &Request,
    clock: Option<&StepClock>,
    policy: StepClockPolicy,
    (u0, u1): (u64, u64),
    out: &mut Vec<(u64, u64)>,
) -> (usize, usize) {
    let start = out.len();
    let Some(c) = clock else {
        return (start, start);
    };
    // Gaps ending in or after the unit: from its first event at or after `u0` on.
    let i0 = r.times.partition_point(|e| e.0 < u0);
    let mut prev = match i0.checked_sub(1) {
        Some(i) => r.times.get(i).map(|e| e.0),
        None => r.pruned_last_ns,
    };
    for (i, &(t, _)) in r.times.iter().enumerate().skip(i0) {
        let Some(a) = prev.replace(t) else {
            continue;
        };
        if a >= u1 {
            break;
        }
        let skipped = c.bursts_between(a, t);
        // The events written with it (one write, or one burst of writes).
        let count = || -> usize {
            r.times
                .range(i..)
                .take_while(|e| e.0 - t <= BACKLOG_NS)
                .map(|e| e.1 as usize)
                .sum()
        };
        if skipped >= PAUSE_STEPS
            && count() * 2 < skipped
            && let (Some(before), Some(after)) = (c.step_of(a, policy), c.step_of(t, policy))
        {
            let (from, to) = (before.to_ns.max(u0), after.from_ns.min(u1));
            if to > from {
                out.push((from, to));
            }
        }
    }
    (start, out.len())
}

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
}

/// The part of the prefill step `s` its prefills added, for a request in it over `[from, to)`
/// whose first event came at `fe`: not more than the step's time since the request came in
/// over a step's usual length (the engine was idle before, or the step's start was not seen: it
/// began at the arrival).
pub(super) fn extension(s: &PrefillStep, (from, to): (u64, u64), fe: u64) -> u64 {
    match s.from_ns {
        Some(_) => s.base_ns.map_or(s.extension_ns, |b| {
            s.extension_ns.min((to - from).saturating_sub(b))
        }),
        None => s.base_ns.map_or(0, |b| (to - from).saturating_sub(b)),
    }
    .min(fe.saturating_sub(from))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ServiceId;
    use crate::ledger::{steps::StepSource, types::Arrival};

    const MS: u64 = 1_000_000;

    /// 10 ms engine steps (ends at 10, 20, … ms) whose output another request streams, and
    /// `r`, streamed one event per step at the ends in `own` (ms), `backlog` events in the
    /// write after a gap.
    fn setup(own: &[u64], others_stop: Option<(u64, u64)>, backlog: u32) -> (StepClock, Request) {
        let mut c = StepClock::default();
        let mut prev = None;
        for k in 1..=40u64 {
            c.mark(k * 10 * MS, StepSource::Ipc);
            if others_stop.is_some_and(|(a, b)| (a..b).contains(&(k * 10))) {
                continue;
            }
            let t = k * 10 * MS + MS / 5;
            c.event(t, prev, 2 * MS, 5 * MS);
            prev = Some(t);
        }
        let mut r = Request::new(ServiceId(1), Arrival::default());
        let mut last = 0;
        for &ms in own {
            let n = if ms > last + 10 && last > 0 {
                backlog
            } else {
                1
            };
            r.times.push_back((ms * MS + MS / 4, n));
            last = ms;
        }
        (c, r)
    }

    fn found(c: &StepClock, r: &Request) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        pauses(r, Some(c), StepClockPolicy::Auto, (0, 500 * MS), &mut out);
        out.into_iter().map(|(a, b)| (a / MS, b / MS)).collect()
    }

    #[test]
    fn a_request_left_out_of_steps_others_ran_is_paused() {
        // Events out of the steps ending 10..=50 and 160..=300 ms: it was out of the steps
        // from 50 ms (its last before the gap) to 150 ms (the start of the one that produced
        // the next).
        let own: Vec<u64> = (1..=5).chain(16..=30).map(|k| k * 10).collect();
        let (c, r) = setup(&own, None, 1);
        assert_eq!(found(&c, &r), vec![(50, 150)]);
    }

    #[test]
    fn a_backlog_written_at_once_or_a_gap_nobody_wrote_in_is_no_pause() {
        let own: Vec<u64> = (1..=5).chain(16..=30).map(|k| k * 10).collect();
        // A slow reader: the server wrote the ten tokens it missed at once.
        let (c, r) = setup(&own, None, 10);
        assert!(found(&c, &r).is_empty());
        // The API process wrote nothing for anyone in the gap (it stalled).
        let (c, r) = setup(&own, Some((60, 160)), 1);
        assert!(found(&c, &r).is_empty());
        // Two steps missed is a merged output, not a pause.
        let own: Vec<u64> = (1..=5).chain(8..=30).map(|k| k * 10).collect();
        let (c, r) = setup(&own, None, 1);
        assert!(found(&c, &r).is_empty());
    }
}
