//! Where each prefill ran: its own part of each stretched engine step.
//!
//! A step that carries prefill work lasts longer than one that only decodes; that extension is
//! what the prefills in it caused. Requests whose prefill one step finished (their first token
//! came out of it) form a *group*. Engines chunk prefills first come, first served (vLLM,
//! `SGLang` and TGI give a step's token budget to the oldest unfinished prefill first), so in a
//! *period* of stretched steps — a run with no step of usual length inside — the token stream
//! is cut in order: the stretched steps between two groups' last steps ran only the later
//! group's chunks, and the step that finished a group ran that group's last chunks and then
//! the next group's first. What is not seen is where that cut lies inside each group's last
//! step: the part of it the group took.
//!
//! A group takes what the group before it left of that one's last step, the steps in between,
//! and of its own last step what it still needs; the rest of its step is the next group's. What
//! a group needs is its prompts' uncached tokens at the service's ns per token. Where every
//! prompt of a group reported its size (usage), that fixes the cut after it (from the one before)
//! and the cut before it (from the one after); a period's last group takes the rest of its step
//! (nothing ran after it: the next step was of usual length, or the next group began a new
//! period). Cuts that no group of known size fixes follow, going forward, from what the bodies'
//! sizes suggest (`bodies.rs`, less the start the engine likely had cached: `prefix.rs`; known
//! sizes come first, as a cached start can still be misjudged). In a closed period whose start
//! was seen, each start that prompts of unknown size share with others is taken as cached or
//! computed, whichever adds up closest to the period's extension ([`weigh_cached`]).
//! A period still open leaves the rest to the group that continues it
//! ([`StepClock::set_leftover`]), as does a group for members whose first events come later.
//! Without a size or a rate a group takes its whole last step; before a rate is learned, a
//! closed period whose sizes are all known sets its own (its extension over its tokens).
//!
//! Prefills are placed only once every request that came in before their last step ended is
//! known to its end (the ledger holds segments back for it): a response that is not streamed
//! reveals its prefill's step only then, and the periods around it must see it.
//!
//! Within a group, prompts of known size take their tokens' worth and prompts of unknown size
//! share the rest by body size. First come, first served holds inside the group too: going back
//! from its last step, the latest arrival's tokens ran last and the earliest one's began the
//! group's prefill. The ns per uncached token and tokens per body byte are learned first, from
//! the periods and prompts these groups close ([`StepClock::period_group`]).

use super::{
    pending::IdMap,
    prefix::PrefixCache,
    presence::extension,
    sizes::{Shared, body_estimate, cached_choice, choose_cached},
    state::Request,
    steps::{Chain, Chunk, MARK_MERGE_NS, StepClock, StepClockPolicy},
};
use crate::ids::RequestId;

/// A group of fresh requests whose prefill one step finished.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Group {
    /// Its members: a range of the sorted fresh list.
    members: (usize, usize),
    /// Its last step, with that step's whole extension.
    last: Chunk,
    /// The rest of a group placed in an earlier pass (what it left of the step is recorded).
    rest: bool,
    /// The stretched steps before its last step (none for the rest of a group).
    chain: Chain,
    /// Each member's uncached prompt tokens when reported.
    tokens: Vec<Option<f64>>,
    /// Each member's prompt tokens as its body's size suggests (filled once this pass has
    /// learned tokens per byte; see `weigh_cached`).
    body: Vec<Option<f64>>,
    /// Each member of unknown size whose start others shared: its size with that start
    /// cached and computed whole.
    cached: Vec<Option<Shared>>,
}

impl Group {
    /// What each member needs (ns) at `rate`, when its size is known.
    fn needs(&self, rate: Option<f64>) -> Vec<Option<f64>> {
        self.tokens
            .iter()
            .map(|t| rate.zip(*t).map(|(r, t)| r * t))
            .collect()
    }

    /// Σ of the members' tokens, unknown sizes as their bodies suggest (`known`: reported only).
    fn sum_tokens(&self, known: bool) -> Option<f64> {
        let body = |i: usize| self.body.get(i).copied().flatten();
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| if known { *t } else { t.or_else(|| body(i)) })
            .sum()
    }

    /// Its chain steps' extension (ns).
    fn chain_ns(&self) -> f64 {
        self.chain.steps.iter().map(|s| s.own_ns).sum()
    }

    /// Its chain steps' and last step's extension (ns).
    fn ext_ns(&self) -> f64 {
        self.last.own_ns + self.chain_ns()
    }
}

/// Places the prefills of the `fresh` requests (just resolved) in the stretched steps they ran
/// in, as each one's own part of each step (`Request::prefill_chunks`). See the module docs.
pub(super) fn allocate_prefills(
    requests: &mut IdMap<Box<Request>>,
    fresh: &mut [RequestId],
    clock: Option<&mut StepClock>,
    prefixes: Option<&PrefixCache>,
    policy: StepClockPolicy,
) {
    let key = |requests: &IdMap<Box<Request>>, id: &RequestId| {
        requests
            .get(id)
            .map(|r| (r.prefill_to_ns, r.arrival.ts_ns, *id))
    };
    fresh.sort_unstable_by_key(|id| key(requests, id));
    let Some(c) = clock else {
        for id in fresh.iter() {
            if let Some(r) = requests.get_mut(id) {
                r.prefill_chunks.clear();
            }
        }
        return;
    };
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < fresh.len() {
        let to = key(requests, &fresh[i]).and_then(|k| k.0);
        let n = fresh[i..]
            .iter()
            .take_while(|id| key(requests, id).and_then(|k| k.0) == to)
            .count();
        ranges.push((i, i + n));
        i += n;
    }
    // A response that was not streamed has no first event: its prefill's step, counted back
    // from its end, finished it all the same (a chain must not walk through it).
    for id in fresh.iter() {
        if let Some(r) = requests.get(id)
            && r.first_event_ns.is_none()
            && let Some(to) = r.prefill_to_ns
        {
            c.first_event(to);
        }
    }
    let mut groups: Vec<Group> = ranges
        .iter()
        .filter_map(|&(a, b)| group(requests, &fresh[a..b], (a, b), c, policy))
        .collect();
    // Learn the rate from the periods these groups close, and prompt tokens per body byte,
    // before placing any of them: at start-up every prefill runs in one long period.
    for g in &groups {
        learn_period(requests, &fresh[g.members.0..g.members.1], g, c);
    }
    let rate = c.prefill_ns_per_token();
    for g in &mut groups {
        g.body = fresh[g.members.0..g.members.1]
            .iter()
            .filter_map(|id| requests.get(id))
            .map(|r| body_estimate(r, c, prefixes))
            .collect();
        g.cached = fresh[g.members.0..g.members.1]
            .iter()
            .filter_map(|id| requests.get(id))
            .map(|r| cached_choice(r, c, prefixes))
            .collect();
    }
    groups.retain(|g| {
        let Some(left) = c.leftover(g.last.to_ns).filter(|_| g.rest) else {
            return true;
        };
        // The rest of a group placed in an earlier pass: what that left of the step.
        let avail = left.min(g.last.own_ns);
        let need = rate.zip(g.sum_tokens(true)).map(|(r, t)| r * t);
        let take = need.map_or(avail, |n| n.min(avail));
        c.set_leftover(g.last.to_ns, avail - take);
        let claimed = [Chunk {
            own_ns: take,
            ..g.last
        }];
        let (a, b) = g.members;
        share_group(requests, &fresh[a..b], &g.needs(rate), &claimed, &g.body);
        false
    });
    // Periods: a group continues the one before when its chain reaches back to that group's
    // last step.
    let mut start = 0;
    while start < groups.len() {
        let mut end = start + 1;
        while end < groups.len()
            && groups[end]
                .chain
                .boundary
                .is_some_and(|b| b.to_ns.abs_diff(groups[end - 1].last.to_ns) <= MARK_MERGE_NS)
        {
            end += 1;
        }
        // Closed: the next group began a new period, or the step after this one's last was
        // of usual length.
        let closed = end < groups.len()
            || c.stretched_after(groups[end - 1].last.to_ns, policy) == Some(false);
        let period = &groups[start..end];
        // Before any rate is learned, a closed period whose prompts all reported their size is
        // its own: its extension over their tokens.
        let rate = rate.or_else(|| {
            let ext = period_ext_ns(period);
            let tokens: f64 = period
                .iter()
                .map(|g| g.sum_tokens(true))
                .sum::<Option<f64>>()?;
            (closed && tokens > 0.0 && ext > 0.0).then(|| ext / tokens)
        });
        if closed
            && period[0].chain.boundary.is_none()
            && let Some(r) = rate.filter(|&r| r > 0.0)
        {
            weigh_cached(&mut groups[start..end], r);
        }
        let period = &groups[start..end];
        let cuts = cut_period(period, closed, rate);
        for (k, g) in period.iter().enumerate() {
            let before = match k.checked_sub(1) {
                Some(p) => Some(Chunk {
                    own_ns: (period[p].last.own_ns - cuts[p]).max(0.0),
                    ..period[p].last
                }),
                // Continuing a period from an earlier pass: what its last group left.
                None => g.chain.boundary,
            };
            if k == 0
                && let Some(b) = before
            {
                c.set_leftover(b.to_ns, 0.0);
            }
            let next_continues = k + 1 < period.len();
            c.set_leftover(
                g.last.to_ns,
                if next_continues {
                    0.0
                } else {
                    g.last.own_ns - cuts[k]
                },
            );
            let mut claimed: Vec<Chunk> = Vec::with_capacity(g.chain.steps.len() + 2);
            claimed.extend(before);
            claimed.extend(g.chain.steps.iter().rev().copied());
            claimed.push(Chunk {
                own_ns: cuts[k],
                ..g.last
            });
            claimed.retain(|s| s.own_ns > 0.0);
            let (a, b) = g.members;
            share_group(requests, &fresh[a..b], &g.needs(rate), &claimed, &g.body);
        }
        start = end;
    }
}

/// A group's facts (`None` when its members were not resolved).
fn group(
    requests: &IdMap<Box<Request>>,
    ids: &[RequestId],
    members: (usize, usize),
    c: &StepClock,
    policy: StepClockPolicy,
) -> Option<Group> {
    let first = requests.get(ids.first()?)?;
    let (from, to) = (first.prefill_from_ns?, first.prefill_to_ns?);
    // The step's extension again, now that the steps after it are known too (when the first
    // event came, a burst's step could only be compared with the stretched ones before it).
    let fe = first.first_event_ns.unwrap_or(to).max(to);
    let last = Chunk {
        from_ns: from,
        to_ns: to,
        own_ns: extension(&c.prefill_step(fe, policy), (from, to), fe) as f64,
    };
    let rs = || ids.iter().filter_map(|id| requests.get(id));
    let arrived = rs().map(|r| r.arrival.ts_ns).min().unwrap_or(last.from_ns);
    let rest = c.leftover(last.to_ns).is_some();
    let chain = if rest {
        Chain::default()
    } else {
        c.chain_before(last.from_ns, arrived, policy)
    };
    Some(Group {
        members,
        last,
        rest,
        chain,
        tokens: rs()
            .map(|r| {
                r.arrival
                    .prompt_tokens
                    .map(|p| p.saturating_sub(r.arrival.cached_tokens.unwrap_or(0)) as f64)
            })
            .collect(),
        body: Vec::new(),
        cached: Vec::new(),
    })
}

/// What the group before a period left of its last step (a leftover carried over), ns.
fn carried_ns(period: &[Group]) -> f64 {
    period
        .first()
        .and_then(|g| g.chain.boundary)
        .map_or(0.0, |b| b.own_ns)
}

/// A period's whole extension: what was carried into it and its groups' steps, ns.
fn period_ext_ns(period: &[Group]) -> f64 {
    carried_ns(period) + period.iter().map(Group::ext_ns).sum::<f64>()
}

/// The cuts of one period: how much of its last step each group took (see the module docs).
///
/// A cut lies between two groups; a group whose prompts all reported their size fixes the cut
/// after it from the one before (forward) and the cut before it from the one after (back,
/// once the period is closed: its last group took the rest of its step). Cuts that neither
/// side fixes follow, going forward, from the sizes the bodies suggest.
fn cut_period(period: &[Group], closed: bool, rate: Option<f64>) -> Vec<f64> {
    let n = period.len();
    let ext = |k: usize| period[k].last.own_ns;
    let chain = |k: usize| period[k].chain_ns();
    let known = |k: usize| rate.zip(period[k].sum_tokens(true)).map(|(r, t)| r * t);
    let estimate = |k: usize| rate.zip(period[k].sum_tokens(false)).map(|(r, t)| r * t);
    // What the group before `k` left of its step (for the first: a leftover carried over).
    let carried = carried_ns(period);
    let left = |k: usize, cuts: &[Option<f64>]| match k.checked_sub(1) {
        Some(p) => cuts[p].map(|x| ext(p) - x),
        None => Some(carried),
    };
    let mut cuts: Vec<Option<f64>> = vec![None; n];
    if closed && n > 0 {
        // Nothing ran after a period's last group: it takes the rest of its step.
        cuts[n - 1] = Some(ext(n - 1));
    }
    loop {
        let mut changed = false;
        for k in 0..n {
            if cuts[k].is_none()
                && let (Some(need), Some(l)) = (known(k), left(k, &cuts))
            {
                cuts[k] = Some((need - chain(k) - l).clamp(0.0, ext(k)));
                changed = true;
            }
            if k > 0
                && cuts[k - 1].is_none()
                && let (Some(need), Some(x)) = (known(k), cuts[k])
            {
                let from_before = (need - chain(k) - x).clamp(0.0, ext(k - 1));
                cuts[k - 1] = Some(ext(k - 1) - from_before);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for k in 0..n {
        if cuts[k].is_none() {
            let l = left(k, &cuts).unwrap_or(0.0);
            cuts[k] = Some(match estimate(k) {
                Some(need) => (need - chain(k) - l).clamp(0.0, ext(k)),
                None => ext(k),
            });
        }
    }
    cuts.into_iter().map(|x| x.unwrap_or(0.0)).collect()
}

/// Adds a group to its service's prefill period (see [`StepClock::period_group`]) and its
/// prompts' sizes to what the clock knows of body sizes.
fn learn_period(requests: &IdMap<Box<Request>>, ids: &[RequestId], g: &Group, c: &mut StepClock) {
    for r in ids.iter().filter_map(|id| requests.get(id)) {
        if let (Some(prompt), Some(bytes)) = (r.arrival.prompt_tokens, r.arrival.body_bytes) {
            c.prompt_sample(bytes, prompt);
        }
    }
    // Reported token counts are whole numbers.
    let tokens = g.sum_tokens(true).map(|t| t as u64);
    if g.rest {
        // The rest of a group already counted.
        c.period_group((false, false), 0.0, tokens);
        return;
    }
    let starts = g.chain.boundary.is_none();
    c.period_group((starts, !g.chain.truncated), g.ext_ns(), tokens);
}

/// Shares a group's `claimed` step parts (in time order) among its members.
fn share_group(
    requests: &mut IdMap<Box<Request>>,
    group: &[RequestId],
    need: &[Option<f64>],
    claimed: &[Chunk],
    body: &[Option<f64>],
) {
    let total: f64 = claimed.iter().map(|s| s.own_ns).sum();
    // Targets: known sizes their worth, unknown sizes the rest by body size. What the group
    // claimed is its own: with every size known, in proportion to them.
    let known: f64 = need.iter().flatten().sum();
    let all_known = need.iter().all(Option::is_some);
    let scale = if known > 0.0 && (known > total || all_known) {
        total / known
    } else {
        1.0
    };
    let rest = (total - known).max(0.0);
    let size = |i: usize| {
        body.get(i)
            .copied()
            .flatten()
            .filter(|t| *t > 0.0)
            .unwrap_or(1.0)
    };
    let weight_unknown: f64 = (0..group.len())
        .filter(|&i| need.get(i).is_some_and(Option::is_none))
        .map(size)
        .sum();
    let mut target: Vec<f64> = Vec::with_capacity(group.len());
    let mut arrival: Vec<u64> = Vec::with_capacity(group.len());
    for (i, (id, n)) in group.iter().zip(need).enumerate() {
        let Some(r) = requests.get(id) else {
            target.push(0.0);
            arrival.push(u64::MAX);
            continue;
        };
        arrival.push(r.arrival.ts_ns);
        target.push(match n {
            Some(n) => n * scale,
            None if weight_unknown > 0.0 => rest * size(i) / weight_unknown,
            None => 0.0,
        });
    }
    // First come, first served inside the group too: going back from its last step, the
    // latest arrival's tokens ran last, and the earliest one's chunks began the group's prefill.
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(arrival[k]));
    let mut chunks: Vec<Vec<Chunk>> = vec![Vec::new(); group.len()];
    let mut left = target;
    let mut next = 0;
    for s in claimed.iter().rev() {
        let mut cap = s.own_ns;
        while cap > 0.0 && next < order.len() {
            let k = order[next];
            if arrival[k] >= s.to_ns || left[k] <= 0.0 {
                // Not there yet (nor in any earlier step), or done: the next one back.
                next += 1;
                continue;
            }
            let own = left[k].min(cap);
            left[k] -= own;
            cap -= own;
            chunks[k].push(Chunk { own_ns: own, ..*s });
            if left[k] <= 0.0 {
                next += 1;
            }
        }
    }
    for c in &mut chunks {
        c.reverse();
    }
    for (id, own) in group.iter().zip(chunks) {
        if let Some(r) = requests.get_mut(id) {
            if let Some(first) = own.first() {
                let from = first.from_ns.max(r.arrival.ts_ns);
                r.prefill_from_ns = r.prefill_from_ns.map(|f| f.min(from));
            }
            r.prefill_chunks = own;
        }
    }
}

/// Takes each shared start of the period's prompts of unknown size as cached or not,
/// whichever way their sizes add up closest to the period's extension (`Group::body`).
///
/// A prompt whose start others carried too either found that start cached or computed it
/// itself (the first to carry it since the engine started, or run in the same step as the
/// others); the arrival order (`body_estimate`) guesses, the time the prompts took tells. Only
/// a closed period whose start was seen is weighed (see [`choose_cached`]).
fn weigh_cached(period: &mut [Group], rate: f64) {
    // In the order the prefills ran (groups in time order, members by arrival).
    let choices: Vec<(usize, usize, Shared)> = period
        .iter()
        .enumerate()
        .flat_map(|(k, g)| {
            g.cached
                .iter()
                .enumerate()
                .filter_map(move |(i, ch)| ch.map(|ch| (k, i, ch)))
        })
        .collect();
    if choices.is_empty() {
        return;
    }
    let target = period_ext_ns(period) / rate;
    // The sizes that are not a choice: reported, or a body's whose start nobody shared.
    let fixed: f64 = period
        .iter()
        .flat_map(|g| {
            g.tokens.iter().enumerate().map(|(i, t)| {
                t.or_else(|| {
                    let choice = g.cached.get(i).copied().flatten().is_some();
                    (!choice)
                        .then(|| g.body.get(i).copied().flatten())
                        .flatten()
                })
                .unwrap_or(0.0)
            })
        })
        .sum();
    let shared: Vec<Shared> = choices.iter().map(|ch| ch.2).collect();
    let Some(cached) = choose_cached(&shared, fixed, target) else {
        return;
    };
    for (&(k, i, ch), cached) in choices.iter().zip(cached) {
        if let Some(size) = period[k].body.get_mut(i) {
            *size = Some(if cached { ch.lo } else { ch.hi });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ServiceId;
    use crate::ledger::steps::StepSource;
    use crate::ledger::{config::LedgerConfig, presence::resolve_prefill, types::Arrival};

    const MS: u64 = 1_000_000;

    /// 10 ms steps, except those ending at `stretched` (30 ms each: 20 ms of prefill).
    fn clock(stretched: &[u64]) -> StepClock {
        let mut c = StepClock::default();
        let mut t = 0;
        while t < 600 * MS {
            t += if stretched.contains(&(t + 30 * MS)) {
                30 * MS
            } else {
                10 * MS
            };
            c.mark(t, StepSource::Ipc);
        }
        // 40 µs per uncached token, from periods seen before.
        for _ in 0..3 {
            c.prefill_sample(4 * MS, 100);
        }
        c
    }

    /// A streamed request that arrived at `arrive` and whose first token was written after
    /// the step ending at `first`.
    fn streamed(
        c: &mut StepClock,
        arrive: u64,
        first: u64,
        prompt: Option<u64>,
        body: u64,
    ) -> Request {
        let mut r = Request::new(
            ServiceId(1),
            Arrival {
                ts_ns: arrive,
                prompt_tokens: prompt,
                cached_tokens: prompt.map(|_| 0),
                body_bytes: Some(body),
                ..Arrival::default()
            },
        );
        r.first_event_ns = Some(first + MS / 10);
        c.first_event(first + MS / 10);
        resolve_prefill(&mut r, Some(c), &LedgerConfig::default());
        r
    }

    /// One stretched step (130–160 ms: 20 ms of prefill) and bodies of 4 bytes a token.
    fn one_step_with_bodies() -> StepClock {
        let mut c = clock(&[160 * MS]);
        for _ in 0..3 {
            c.prompt_sample(4000, 1000);
        }
        c
    }

    /// A prompt without usage that arrived at `arrive_ms`, began with `blocks` and finished
    /// in the step ending at 160 ms.
    fn without_usage(c: &mut StepClock, arrive_ms: u64, body: u64, blocks: Vec<u64>) -> Request {
        let mut r = streamed(c, arrive_ms * MS, 160 * MS, None, body);
        r.arrival.prefix_blocks = blocks;
        r
    }

    fn place(c: &mut StepClock, rs: Vec<Request>) -> Vec<Vec<(u64, u64, u64)>> {
        place_with(c, rs, None)
    }

    fn place_with(
        c: &mut StepClock,
        rs: Vec<Request>,
        prefixes: Option<&PrefixCache>,
    ) -> Vec<Vec<(u64, u64, u64)>> {
        let mut requests: IdMap<Box<Request>> = IdMap::default();
        let mut fresh: Vec<RequestId> = Vec::new();
        for (i, r) in rs.into_iter().enumerate() {
            requests.insert(RequestId(i as u64), Box::new(r));
            fresh.push(RequestId(i as u64));
        }
        allocate_prefills(
            &mut requests,
            &mut fresh,
            Some(c),
            prefixes,
            StepClockPolicy::Auto,
        );
        (0..requests.len() as u64)
            .map(|i| {
                requests[&RequestId(i)]
                    .prefill_chunks
                    .iter()
                    .map(|k| {
                        (
                            k.from_ns / MS,
                            k.to_ns / MS,
                            (k.own_ns / 1e5).round() as u64,
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_period_is_cut_first_come_first_served() {
        // Steps ending at 130, 160 and 190 ms carried 60 ms of prefill: 700 tokens of A's
        // (first token out of the step ending at 160) and then 800 of B's (out of 190).
        let mut c = clock(&[130 * MS, 160 * MS, 190 * MS]);
        let a = streamed(&mut c, 95 * MS, 160 * MS, Some(700), 2800);
        let b = streamed(&mut c, 96 * MS, 190 * MS, Some(800), 3200);
        let placed = place(&mut c, vec![a, b]);
        // (from ms, to ms, own in 0.1 ms)
        assert_eq!(placed[0], vec![(100, 130, 200), (130, 160, 80)]);
        assert_eq!(placed[1], vec![(130, 160, 120), (160, 190, 200)]);
    }

    #[test]
    fn a_prompt_of_unknown_size_is_sized_from_its_body() {
        let mut c = clock(&[130 * MS, 160 * MS, 190 * MS]);
        for _ in 0..3 {
            c.prompt_sample(4000, 1000);
        }
        // A reported nothing; its body suggests 700 tokens (4 bytes each).
        let a = streamed(&mut c, 95 * MS, 160 * MS, None, 2800);
        let b = streamed(&mut c, 96 * MS, 190 * MS, Some(800), 3200);
        let placed = place(&mut c, vec![a, b]);
        assert_eq!(placed[0], vec![(100, 130, 200), (130, 160, 80)]);
        assert_eq!(placed[1], vec![(130, 160, 120), (160, 190, 200)]);
    }

    #[test]
    fn the_time_taken_tells_whether_a_shared_start_was_cached() {
        // A (1,600-byte body: 400 tokens at 4 bytes each) began with 20 blocks that C, later,
        // reported cached; D (400 bytes: 100 tokens) shared nothing. Their step carried 20 ms:
        // 500 tokens at 40 µs, so A computed its start itself (400 + 100), not 80 + 100.
        let mut c = one_step_with_bodies();
        let start: Vec<u64> = (1..=20).collect();
        let mut prefixes = PrefixCache::default();
        let a = without_usage(&mut c, 125, 1600, [start.clone(), vec![100]].concat());
        let d = without_usage(&mut c, 126, 400, (300..306).collect());
        let c_blocks = [start, vec![200]].concat();
        prefixes.arrive(125 * MS, &a.arrival.prefix_blocks);
        prefixes.arrive(126 * MS, &d.arrival.prefix_blocks);
        prefixes.arrive(170 * MS, &c_blocks);
        prefixes.reported(&c_blocks, 1600, 400, 320);
        let placed = place_with(&mut c, vec![a, d], Some(&prefixes));
        assert_eq!(placed[0], vec![(130, 160, 160)]);
        assert_eq!(placed[1], vec![(130, 160, 40)]);
    }

    #[test]
    fn a_start_carried_before_is_cached_for_the_prompt_after() {
        // A and B both carry a 1,280-byte start (320 of their 400 tokens). Their step carried
        // 20 ms, 500 tokens' worth: one computed the start, the other found it cached (480),
        // and the one that ran first (A, the earlier arrival) is the one that computed it.
        let mut c = one_step_with_bodies();
        let start: Vec<u64> = (1..=20).collect();
        let mut prefixes = PrefixCache::default();
        let a = without_usage(&mut c, 125, 1600, [start.clone(), vec![100]].concat());
        let b = without_usage(&mut c, 126, 1600, [start, vec![101]].concat());
        prefixes.arrive(125 * MS, &a.arrival.prefix_blocks);
        prefixes.arrive(126 * MS, &b.arrival.prefix_blocks);
        let placed = place_with(&mut c, vec![a, b], Some(&prefixes));
        let own = |p: &Vec<(u64, u64, u64)>| p.iter().map(|k| k.2).sum::<u64>();
        assert_eq!((own(&placed[0]), own(&placed[1])), (167, 33));
    }

    #[test]
    fn the_last_group_of_a_period_takes_the_rest_of_its_step() {
        // B's 500 tokens need 20 ms but its step and the one before carried 40 ms - A's 8:
        // nothing else ran after it, so the rest is its own too.
        let mut c = clock(&[130 * MS, 160 * MS, 190 * MS]);
        let a = streamed(&mut c, 95 * MS, 160 * MS, Some(700), 2800);
        let b = streamed(&mut c, 96 * MS, 190 * MS, Some(500), 2000);
        let placed = place(&mut c, vec![a, b]);
        assert_eq!(placed[1], vec![(130, 160, 120), (160, 190, 200)]);
    }

    #[test]
    fn a_reported_size_fixes_the_cut_before_it_too() {
        // A reported nothing and its body suggests 900 tokens (its prefix was cached: it needed
        // 300). B, after it, reported 700 (28 ms): of A's step it took 8 ms, so A had 12.
        let mut c = clock(&[130 * MS, 160 * MS]);
        for _ in 0..3 {
            c.prompt_sample(4000, 1000);
        }
        let a = streamed(&mut c, 95 * MS, 130 * MS, None, 3600);
        let b = streamed(&mut c, 96 * MS, 160 * MS, Some(700), 2800);
        let placed = place(&mut c, vec![a, b]);
        assert_eq!(placed[0], vec![(100, 130, 120)]);
        assert_eq!(placed[1], vec![(100, 130, 80), (130, 160, 200)]);
    }

    #[test]
    fn inside_a_group_the_latest_arrival_ran_last() {
        // One step of 20 ms finished both; the chunk step before it ran only the early one
        // (the late one came in after it had begun).
        let mut c = clock(&[130 * MS, 160 * MS]);
        let early = streamed(&mut c, 95 * MS, 160 * MS, Some(900), 3600);
        let late = streamed(&mut c, 140 * MS, 160 * MS, Some(100), 400);
        let placed = place(&mut c, vec![early, late]);
        assert_eq!(placed[0], vec![(100, 130, 200), (130, 160, 160)]);
        assert_eq!(placed[1], vec![(130, 160, 40)]);
    }

    #[test]
    fn an_open_period_leaves_the_rest_to_the_group_that_continues_it() {
        // A's step (ending 160) was followed by another stretched step whose prefill has not
        // finished yet: A takes its 700 tokens' worth; B, placed later, takes the rest.
        let mut c = clock(&[130 * MS, 160 * MS, 190 * MS]);
        let a = streamed(&mut c, 95 * MS, 160 * MS, Some(700), 2800);
        let placed = place(&mut c, vec![a]);
        assert_eq!(placed[0], vec![(100, 130, 200), (130, 160, 80)]);
        assert_eq!(c.leftover(160 * MS), Some(12e6));
        let b = streamed(&mut c, 96 * MS, 190 * MS, None, 3200);
        let placed = place(&mut c, vec![b]);
        assert_eq!(placed[0], vec![(130, 160, 120), (160, 190, 200)]);
    }
}
