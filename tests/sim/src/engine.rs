//! Continuous batching on the simulated GPU, one engine per service: what ran in every step,
//! and what each request was given under each convention.
//!
//! Like vLLM's scheduler with chunked prefill: each step first gives every running request
//! whose prompt is done one decode token, then the remaining token budget to unfinished
//! prefills and then to waiting requests (first come, first served, at most `max_seqs`
//! running). A request's first token comes out of the step that finishes its prefill. With two
//! services the GPU runs their steps in turn.

use crate::gpu::{Gpu, Work};
use crate::rng::Rng;

/// A request as a client sent it.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: usize,
    pub service: usize,
    pub arrive_s: f64,
    pub prompt: u64,
    /// Tokens of its prompt found in the prefix cache (set when it is scheduled).
    pub cached: u64,
    /// The shared system prompt it starts with, if any, and its length in tokens.
    pub system: Option<(usize, u64)>,
    pub max_out: u64,
    pub streamed: bool,
    pub include_usage: bool,
    /// Per-token cost multiplier nothing outside the GPU shows (1: none).
    pub hidden: f64,
    pub body_bytes: u64,
}

/// What happened to a request, and its energy under each convention (J, dynamic).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub first_token_s: Option<f64>,
    pub end_s: Option<f64>,
    pub generated: u64,
    /// Aumann–Shapley share of each step it was in (the written convention).
    pub caused_j: f64,
    /// Each step's dynamic energy split equally among the requests in it.
    pub timeshare_j: f64,
    /// Σ over its steps of what the step would have saved without it.
    pub marginal_j: f64,
}

/// One engine step.
#[derive(Debug, Clone)]
pub struct Step {
    pub service: usize,
    pub start_s: f64,
    pub end_s: f64,
    pub dynamic_j: f64,
    /// Requests that got a token out of it (first or decode), in batch order.
    pub outputs: Vec<usize>,
    /// Requests that finished in it.
    pub finished: Vec<usize>,
}

/// How a service's engine batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_seqs: usize,
    pub max_batched_tokens: u64,
}

#[derive(Debug, Clone)]
struct Running {
    id: usize,
    prefilled: u64,
    generated: u64,
}

#[derive(Debug, Default)]
struct Engine {
    waiting: std::collections::VecDeque<usize>,
    running: Vec<Running>,
    /// System prompts whose prefill finished: cached (in whole 16-token blocks) from then on.
    cached_prefixes: std::collections::BTreeSet<usize>,
}

/// Where the clients' requests come from.
pub trait Source {
    /// The next request arriving at or before `now_s`, if any.
    fn poll(&mut self, now_s: f64) -> Option<Request>;
    /// When the next request will arrive (`None`: no more).
    fn next_arrival(&self) -> Option<f64>;
    /// A request ended at `t_s` (closed-loop clients send their next one after it).
    fn ended(&mut self, id: usize, t_s: f64);
}

/// What the physics does over time besides the work.
#[derive(Debug, Clone)]
pub struct Conditions {
    /// Clock fraction from a time on: `(from_s, clock)`, in time order.
    pub clocks: Vec<(f64, f64)>,
    /// Log-normal deviation of each step's energy (0: none).
    pub noise_sigma: f64,
}

impl Conditions {
    fn clock_at(&self, t: f64) -> f64 {
        self.clocks
            .iter()
            .take_while(|c| c.0 <= t)
            .last()
            .map_or(1.0, |c| c.1)
    }
}

/// The simulated run.
#[derive(Debug, Default)]
pub struct Run {
    pub requests: Vec<Request>,
    pub outcomes: Vec<Outcome>,
    pub steps: Vec<Step>,
}

/// Runs the engines until `until_s` (no new requests after it) and every request has ended.
pub fn run(
    gpu: &Gpu,
    batching: &[Batching],
    cond: &Conditions,
    source: &mut dyn Source,
    until_s: f64,
    rng: &mut Rng,
) -> Run {
    let mut engines: Vec<Engine> = batching.iter().map(|_| Engine::default()).collect();
    let mut out = Run::default();
    let mut now = 0.0;
    let mut turn = 0usize;
    loop {
        while let Some(r) = source.poll(now).filter(|r| r.arrive_s <= until_s) {
            engines[r.service].waiting.push_back(r.id);
            out.outcomes.push(Outcome::default());
            debug_assert_eq!(r.id, out.requests.len());
            out.requests.push(r);
        }
        let busy: Vec<usize> = (0..engines.len())
            .filter(|&s| !engines[s].waiting.is_empty() || !engines[s].running.is_empty())
            .collect();
        if busy.is_empty() {
            match source.next_arrival().filter(|&t| t <= until_s) {
                Some(t) => {
                    now = t.max(now);
                    continue;
                }
                None => break,
            }
        }
        // The GPU runs the services' steps in turn.
        let svc = busy[turn % busy.len()];
        turn += 1;
        let limits = batching[svc];
        let eng = &mut engines[svc];
        let mut budget = limits.max_batched_tokens;
        let mut plan: Vec<(usize, Work, bool)> = Vec::new(); // (running index, work, emits)
        for (k, r) in eng.running.iter().enumerate() {
            let req = &out.requests[r.id];
            if r.prefilled >= req.prompt - req.cached {
                let ctx = (req.prompt + r.generated) as f64 / 1000.0;
                plan.push((
                    k,
                    Work {
                        seqs: 1.0,
                        decode: 1.0,
                        context: ctx,
                        hidden: req.hidden - 1.0,
                        ..Work::default()
                    },
                    true,
                ));
                budget = budget.saturating_sub(1);
            }
        }
        let chunk_work = |req: &Request, done: u64, chunk: u64| {
            let from = req.cached + done;
            let positions = chunk as f64 * (from as f64 + chunk as f64 / 2.0) / 1000.0;
            Work {
                seqs: 1.0,
                prefill: chunk as f64,
                attention: positions,
                hidden: chunk as f64 * (req.hidden - 1.0),
                ..Work::default()
            }
        };
        for (k, r) in eng.running.iter().enumerate() {
            let req = &out.requests[r.id];
            let left = req.prompt - req.cached - r.prefilled;
            if left > 0 && budget > 0 {
                let chunk = left.min(budget);
                budget -= chunk;
                plan.push((k, chunk_work(req, r.prefilled, chunk), chunk == left));
            }
        }
        while budget > 0 && eng.running.len() < limits.max_seqs {
            let Some(id) = eng.waiting.pop_front() else {
                break;
            };
            if let Some((k, tokens)) = out.requests[id].system
                && eng.cached_prefixes.contains(&k)
            {
                // At least one token is computed.
                let r = &mut out.requests[id];
                r.cached = (tokens / 16 * 16).min(r.prompt - 1);
            }
            let req = &out.requests[id];
            let chunk = (req.prompt - req.cached).min(budget);
            budget -= chunk;
            eng.running.push(Running {
                id,
                prefilled: 0,
                generated: 0,
            });
            let k = eng.running.len() - 1;
            plan.push((
                k,
                chunk_work(req, 0, chunk),
                chunk == req.prompt - req.cached,
            ));
        }
        if plan.is_empty() {
            // Nothing this service could run (cannot happen with a token budget ≥ 1).
            break;
        }
        let clock = cond.clock_at(now);
        let works: Vec<Work> = plan.iter().map(|p| p.1).collect();
        let mut total = Work::default();
        for w in &works {
            total.add(w);
        }
        let (dur, dyn_j) = gpu.cost(&total, clock);
        let noise = if cond.noise_sigma > 0.0 {
            (cond.noise_sigma * rng.normal() - cond.noise_sigma * cond.noise_sigma / 2.0).exp()
        } else {
            1.0
        };
        let shares = gpu.shares(&works, clock);
        let n = works.len() as f64;
        let start = now;
        now += dur;
        let mut step = Step {
            service: svc,
            start_s: start,
            end_s: now,
            dynamic_j: dyn_j * noise,
            outputs: Vec::new(),
            finished: Vec::new(),
        };
        for (j, (k, w, emits)) in plan.iter().enumerate() {
            let r = &mut eng.running[*k];
            let o = &mut out.outcomes[r.id];
            o.caused_j += shares[j] * noise;
            o.timeshare_j += dyn_j * noise / n;
            o.marginal_j += gpu.marginal(&works, j, clock) * noise;
            if w.prefill > 0.0 {
                r.prefilled += w.prefill as u64;
                let req = &out.requests[r.id];
                if let Some((k, _)) = req.system
                    && r.prefilled >= req.prompt - req.cached
                {
                    eng.cached_prefixes.insert(k);
                }
            }
            if *emits {
                r.generated += 1;
                o.generated = r.generated;
                o.first_token_s.get_or_insert(now);
                step.outputs.push(r.id);
                if r.generated >= out.requests[r.id].max_out {
                    step.finished.push(r.id);
                }
            }
        }
        for &id in &step.finished {
            out.outcomes[id].end_s = Some(now);
            source.ended(id, now);
        }
        eng.running.retain(|r| !step.finished.contains(&r.id));
        out.steps.push(step);
    }
    out
}
