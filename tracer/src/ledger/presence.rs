//! When a request is in the engine: from the start of its prefill step to the end of the step
//! that produced its last token. Before that it waits in the queue, after that its response is
//! only being written; in neither does it share the engine's steps (or their power).
//!
//! How it is known, by what the wire and the engine show:
//! - streamed: the first event comes out of the step that ran its prefill, which began when
//!   the service's previous step ended (the previous step-clock mark, see `steps.rs`) — or
//!   earlier, when chunks of it stretched the steps before (`StepClock::chunk_steps`); its last
//!   event out of its last step;
//! - not streamed, with the completion tokens and a step clock around its end (engine marks,
//!   or other requests' write bursts): one step per token counted back from the step that
//!   ended before the response gives its first step, which is then its prefill step as above;
//! - otherwise: from arrival to the end, as before.

use std::collections::HashMap;

use super::{
    config::LedgerConfig,
    state::Request,
    steps::{Step, StepClock},
};
use crate::ids::RequestId;

/// Resolves the request's prefill step once its first event is known (cached on the request).
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
    let mut from = step.and_then(|s| s.from_ns).unwrap_or(0);
    let mut ext = step.map_or(0, |s| s.extension_ns);
    // More prompt than the step's extension accounts for (or a prompt of unknown size):
    // chunks ran in the stretched steps before.
    if let (Some(c), Some(s)) = (clock, step)
        && s.from_ns.is_some()
    {
        let needed = match (r.arrival.prompt_tokens, c.prefill_ns_per_token()) {
            (Some(prompt), Some(rate)) => {
                let uncached = prompt.saturating_sub(r.arrival.cached_tokens.unwrap_or(0));
                Some(uncached as f64 * rate - ext as f64)
            }
            (Some(_), None) => Some(0.0),
            // Unknown: at most what its body's size suggests (cached tokens unknown too).
            (None, rate) => rate
                .zip(r.arrival.body_bytes.and_then(|b| c.prompt_estimate(b)))
                .map(|(rate, tokens)| tokens * rate - ext as f64),
        };
        if needed.is_none_or(|n| n > 0.0) {
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

/// Prefills finished by one engine step share its extension. For each group of `fresh`
/// requests (just resolved) whose prefill ended with the same step: when every prompt's size
/// is known and none began in earlier steps, the step teaches the clock its ns per uncached
/// token (extension / Σ tokens; one request of a shared step alone would teach a rate several
/// times too high). A prompt of unknown size gets the steps before its last one that it
/// claimed, plus the part of its last step's extension that the known prompts leave, in
/// proportion to the bodies' estimated sizes, and never more than its body's size suggests.
pub(super) fn share_prefill_steps(
    requests: &mut HashMap<RequestId, Request>,
    fresh: &[RequestId],
    mut clock: Option<&mut StepClock>,
) {
    let mut taken = vec![false; fresh.len()];
    let mut group: Vec<RequestId> = Vec::new();
    for i in 0..fresh.len() {
        let Some(key) = requests.get(&fresh[i]).map(|r| r.prefill_to_ns) else {
            continue;
        };
        if taken[i] {
            continue;
        }
        group.clear();
        for j in i..fresh.len() {
            if !taken[j] && requests.get(&fresh[j]).map(|r| r.prefill_to_ns) == Some(key) {
                taken[j] = true;
                group.push(fresh[j]);
            }
        }
        let members = || group.iter().filter_map(|id| requests.get(id));
        // The last step's own extension: what a member that claimed no earlier step has.
        let step_ext = members().map(|r| r.prefill_ext_ns).min().unwrap_or(0);
        let walked = members().any(|r| r.prefill_ext_ns > step_ext);
        let rate = clock.as_deref().and_then(StepClock::prefill_ns_per_token);
        let (mut known_ns, mut known, mut n_unknown, mut weight_unknown) = (0.0, 0u64, 0usize, 0.0);
        for r in members() {
            if let Some(prompt) = r.arrival.prompt_tokens {
                let uncached = prompt.saturating_sub(r.arrival.cached_tokens.unwrap_or(0));
                known += uncached;
                // Its time in the last step: what its earlier steps did not take.
                let earlier = (r.prefill_ext_ns - step_ext) as f64;
                known_ns += rate.map_or(0.0, |rate| (uncached as f64 * rate - earlier).max(0.0));
            } else {
                n_unknown += 1;
                weight_unknown += body_weight(r, clock.as_deref());
            }
        }
        if let Some(c) = clock.as_deref_mut() {
            for r in members() {
                if let (Some(prompt), Some(bytes)) = (r.arrival.prompt_tokens, r.arrival.body_bytes)
                {
                    c.prompt_sample(bytes, prompt);
                }
            }
            if n_unknown == 0 && !walked {
                c.prefill_sample(step_ext, known);
            }
        }
        if n_unknown == 0 {
            continue;
        }
        // What the known prompts leave of the last step; without a rate yet, an equal split.
        let left_ns = if rate.is_some() {
            (step_ext as f64 - known_ns).max(0.0)
        } else {
            step_ext as f64 * n_unknown as f64 / group.len() as f64
        };
        for id in &group {
            let Some(r) = requests
                .get(id)
                .filter(|r| r.arrival.prompt_tokens.is_none())
            else {
                continue;
            };
            let w = body_weight(r, clock.as_deref());
            let w = if weight_unknown > 0.0 {
                w / weight_unknown
            } else {
                1.0 / n_unknown as f64
            };
            let mut own_ns = (r.prefill_ext_ns - step_ext) as f64 + left_ns * w;
            let cap = rate.zip(
                r.arrival
                    .body_bytes
                    .and_then(|b| clock.as_deref()?.prompt_estimate(b)),
            );
            if let Some((rate, tokens)) = cap {
                own_ns = own_ns.min(tokens * rate);
            }
            let ext = r.prefill_ext_ns;
            if let Some(r) = requests.get_mut(id)
                && ext > 0
            {
                r.prefill_share = (own_ns / ext as f64).clamp(0.0, 1.0);
            }
        }
    }
}

/// How big an unknown prompt is relative to others: its body's estimated tokens (1 when
/// nothing is known of its size).
fn body_weight(r: &Request, clock: Option<&StepClock>) -> f64 {
    r.arrival
        .body_bytes
        .zip(clock)
        .and_then(|(b, c)| c.prompt_estimate(b))
        .filter(|t| *t > 0.0)
        .unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ServiceId;
    use crate::ledger::types::Arrival;

    fn prefilled(prompt: Option<u64>, body: u64, to: u64, ext: u64) -> Request {
        let mut r = Request::new(
            ServiceId(1),
            Arrival {
                prompt_tokens: prompt,
                body_bytes: Some(body),
                ..Arrival::default()
            },
        );
        r.prefill_from_ns = Some(to - 20_000_000);
        r.prefill_to_ns = Some(to);
        r.prefill_ext_ns = ext;
        r
    }

    #[test]
    fn prompts_of_unknown_size_get_what_the_step_leaves() {
        let mut clock = StepClock::default();
        let mut requests = HashMap::new();
        // Steps with known prompts only teach 40 µs per token (4 bytes per token); a step
        // shared by two known prompts teaches it from both, not 2× from one.
        let mut fresh = Vec::new();
        for k in 0..8u64 {
            let to = 1_000_000_000 + k * 50_000_000;
            for (j, tokens) in [(0, 100u64), (1, 300)] {
                let id = RequestId(k * 2 + j);
                requests.insert(id, prefilled(Some(tokens), tokens * 4, to, 400 * 40_000));
                fresh.push(id);
            }
        }
        share_prefill_steps(&mut requests, &fresh, Some(&mut clock));
        assert_eq!(clock.prefill_ns_per_token(), Some(40_000.0));

        // A step of 500 tokens' extension: 200 known, two unknown bodies of 100 and 200
        // tokens' size share the other 300 by size.
        let to = 2_000_000_000;
        let ext = 500 * 40_000;
        let ids = [RequestId(100), RequestId(101), RequestId(102)];
        requests.insert(ids[0], prefilled(Some(200), 800, to, ext));
        requests.insert(ids[1], prefilled(None, 400, to, ext));
        requests.insert(ids[2], prefilled(None, 800, to, ext));
        share_prefill_steps(&mut requests, &ids, Some(&mut clock));
        let share = |i: usize| requests[&ids[i]].prefill_share;
        assert!((share(1) - 100.0 / 500.0).abs() < 1e-9, "{}", share(1));
        assert!((share(2) - 200.0 / 500.0).abs() < 1e-9, "{}", share(2));
        assert!(
            (share(0) - 1.0).abs() < f64::EPSILON,
            "a known prompt's share is split by its tokens later"
        );

        // Alone in a step stretched by a chunk of another prompt, an unknown prompt claims no
        // more than its body's size suggests.
        let id = RequestId(200);
        requests.insert(id, prefilled(None, 200, 3_000_000_000, ext));
        share_prefill_steps(&mut requests, &[id], Some(&mut clock));
        assert!((requests[&id].prefill_share - 50.0 / 500.0).abs() < 1e-9);
    }
}
