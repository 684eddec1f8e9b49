//! The clients: closed-loop (each sends its next request after the last one ended and a
//! think time) or open-loop (Poisson arrivals, which saturate the engine when faster than it).

use crate::engine::{Request, Source};
use crate::rng::Rng;

/// What the clients send.
#[derive(Debug, Clone)]
pub struct Load {
    /// Closed-loop clients (ignored with `open_rate`).
    pub concurrency: usize,
    /// Open-loop arrivals per second, if any.
    pub open_rate: Option<f64>,
    pub think_ms: (u64, u64),
    pub prompt_median: f64,
    pub prompt_sigma: f64,
    pub prompt_max: f64,
    pub out_median: f64,
    pub out_max: f64,
    /// Share of requests that start with one of a few long shared system prompts (cached
    /// after their first use).
    pub shared_prefix: f64,
    pub streamed: f64,
    /// Share of streamed requests that ask for usage (non-streamed responses always carry it).
    pub include_usage: f64,
    /// Share of requests with a hidden per-token cost, and its multiplier.
    pub hidden: (f64, f64),
    /// Services the requests go to, in turn.
    pub services: usize,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            concurrency: 16,
            open_rate: None,
            think_ms: (0, 200),
            prompt_median: 300.0,
            prompt_sigma: 0.9,
            prompt_max: 4000.0,
            out_median: 80.0,
            out_max: 600.0,
            shared_prefix: 0.3,
            streamed: 0.7,
            include_usage: 0.5,
            hidden: (0.0, 1.0),
            services: 1,
        }
    }
}

const SYSTEM_PROMPTS: [u64; 3] = [752, 496, 304];

/// Generates requests per [`Load`].
pub struct Clients {
    load: Load,
    rng: Rng,
    next_id: usize,
    /// Pending arrival times (closed loop: one per idle client).
    pending: Vec<f64>,
}

impl Clients {
    pub fn new(load: Load, start_s: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let pending = match load.open_rate {
            Some(_) => vec![start_s],
            None => (0..load.concurrency)
                .map(|_| start_s + rng.f64() * 0.002)
                .collect(),
        };
        Self {
            load,
            rng,
            next_id: 0,
            pending,
        }
    }

    fn make(&mut self, arrive_s: f64) -> Request {
        let l = &self.load;
        let rng = &mut self.rng;
        let mut prompt = rng.lognormal(l.prompt_median, l.prompt_sigma, 8.0, l.prompt_max) as u64;
        // Cached once a request carrying it has been prefilled (the engine decides).
        let system = (rng.f64() < l.shared_prefix).then(|| {
            let k = rng.range(0, 2) as usize;
            prompt += SYSTEM_PROMPTS[k];
            (k, SYSTEM_PROMPTS[k])
        });
        let max_out = rng.lognormal(l.out_median, 0.8, 1.0, l.out_max) as u64;
        let streamed = rng.f64() < l.streamed;
        let include_usage = streamed && rng.f64() < l.include_usage;
        let hidden = if rng.f64() < l.hidden.0 {
            l.hidden.1
        } else {
            1.0
        };
        // A chat body: a frame of JSON keys and options around ~4 bytes per token.
        let body_bytes = 160 + (prompt as f64 * rng.lognormal(4.0, 0.1, 3.0, 5.5)) as u64;
        let id = self.next_id;
        self.next_id += 1;
        Request {
            id,
            service: id % l.services.max(1),
            arrive_s,
            prompt,
            cached: 0,
            system,
            max_out: max_out.max(1),
            streamed,
            include_usage,
            hidden,
            body_bytes,
        }
    }
}

impl Source for Clients {
    fn poll(&mut self, now_s: f64) -> Option<Request> {
        let (i, &t) = self
            .pending
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))?;
        if t > now_s {
            return None;
        }
        self.pending.swap_remove(i);
        if let Some(rate) = self.load.open_rate {
            let next = t + self.rng.exp(1.0 / rate);
            self.pending.push(next);
        }
        Some(self.make(t))
    }

    fn next_arrival(&self) -> Option<f64> {
        self.pending.iter().copied().min_by(f64::total_cmp)
    }

    fn ended(&mut self, _id: usize, t_s: f64) {
        if self.load.open_rate.is_none() {
            let (lo, hi) = self.load.think_ms;
            let think = self.rng.range(lo, hi) as f64 / 1000.0;
            self.pending.push(t_s + think);
        }
    }
}
