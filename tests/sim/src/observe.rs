//! What a daemon on the host would see of a simulated run: requests and streamed writes off
//! the wire (written by an API process one request at a time after each step), the engine's
//! per-step messages, and NVML-like sensors; each delivered after a random delay, so out of
//! order.

use crate::engine::{Request, Run};
use crate::rng::Rng;

/// One observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Obs {
    /// A request's first byte: its service and body size.
    Arrive {
        req: usize,
        service: usize,
        body_bytes: u64,
        /// The prompt's start as chained block hashes (64 bytes each, as the tracker cuts
        /// them): equal for requests sharing a system prompt, then their own.
        prefix_blocks: Vec<u64>,
    },
    /// A streamed event written to it.
    Event { req: usize },
    /// The token counts its response reported.
    Usage {
        req: usize,
        prompt: u64,
        cached: u64,
        completion: u64,
    },
    /// Its last response byte.
    End { req: usize },
    /// The engine's per-step message to the API process (an engine step clock).
    StepMark { service: usize },
    /// The GPU's energy counter as a read returns it (µJ, integer mJ resolution).
    Counter { uj: u64 },
    /// The GPU's power, averaged over the `window_ns` before the observation.
    Power { w: f64, window_ns: u64 },
    /// NVML's per-process SM utilisation of a service's engine over its last sample period
    /// (percent of the period its kernels ran), as `nvmlDeviceGetProcessUtilization` gives it;
    /// only with more than one service on the GPU.
    ProcessUtil { service: usize, sm_percent: u32 },
}

/// An observation, when it happened and when the daemon gets it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub ts_ns: u64,
    pub delivered_ns: u64,
    pub obs: Obs,
}

/// How the host shows itself.
#[derive(Debug, Clone)]
pub struct Wire {
    /// CPU the API process spends per request per step before its write (µs).
    pub write_us: f64,
    /// Or: the step's writes spread evenly over this long (ms), whatever the batch.
    pub spread_ms: Option<f64>,
    /// The engine's per-step messages are seen.
    pub engine_clock: bool,
}

pub(crate) const NS: f64 = 1e9;

/// Total GPU energy (J, idle + dynamic) from 0 to `t` seconds.
pub struct EnergyTrace {
    /// (start, end, dynamic J) of each step, in time order.
    steps: Vec<(f64, f64, f64)>,
    /// Dynamic energy of all steps before each index.
    before: Vec<f64>,
    idle_w: f64,
}

impl EnergyTrace {
    pub fn new(run: &Run, idle_w: f64) -> Self {
        let steps: Vec<(f64, f64, f64)> = run
            .steps
            .iter()
            .map(|s| (s.start_s, s.end_s, s.dynamic_j))
            .collect();
        let mut before = Vec::with_capacity(steps.len() + 1);
        let mut acc = 0.0;
        for s in &steps {
            before.push(acc);
            acc += s.2;
        }
        before.push(acc);
        Self {
            steps,
            before,
            idle_w,
        }
    }

    pub fn until(&self, t: f64) -> f64 {
        let k = self.steps.partition_point(|s| s.1 <= t);
        let mut e = self.before[k];
        if let Some(&(a, b, j)) = self.steps.get(k)
            && t > a
        {
            e += j * (t - a) / (b - a).max(1e-12);
        }
        e + self.idle_w * t.max(0.0)
    }

    pub fn dynamic_total(&self) -> f64 {
        self.before.last().copied().unwrap_or(0.0)
    }
}

/// A request's prompt blocks: its system prompt's (shared) and then its own, ~4 bytes a token.
fn prefix_blocks(r: &Request) -> Vec<u64> {
    let n = (r.body_bytes.saturating_sub(160) / 64).min(64) as usize;
    let shared = r.system.map_or(0, |(_, tokens)| (tokens * 4 / 64) as usize);
    (0..n)
        .map(|j| match r.system {
            Some((k, _)) if j < shared => 0xC0DE_0000 + ((k as u64) << 8) + j as u64,
            _ => ((r.id as u64 + 1) << 20) + j as u64,
        })
        .collect()
}

/// The observations of `run` from the daemon's start (`t = 0`) to `horizon_s`.
pub fn observe(
    run: &Run,
    trace: &EnergyTrace,
    wire: &Wire,
    horizon_s: f64,
    rng: &mut Rng,
) -> Vec<Observed> {
    let mut out: Vec<Observed> = Vec::new();
    let ns = |t: f64| (t * NS).round().max(0.0) as u64;
    let mut push = |rng: &mut Rng, t: f64, obs: Obs| {
        let ts = ns(t);
        out.push(Observed {
            ts_ns: ts,
            delivered_ns: ts + rng.range(0, 30_000_000),
            obs,
        });
    };
    for r in &run.requests {
        push(
            rng,
            r.arrive_s,
            Obs::Arrive {
                req: r.id,
                service: r.service,
                body_bytes: r.body_bytes,
                prefix_blocks: prefix_blocks(r),
            },
        );
    }
    for s in &run.steps {
        if wire.engine_clock {
            push(rng, s.end_s + 50e-6, Obs::StepMark { service: s.service });
        }
        let n = s.outputs.len().max(1) as f64;
        let spacing = wire
            .spread_ms
            .map_or(wire.write_us * 1e-6, |ms| ms * 1e-3 / n);
        for (k, &id) in s.outputs.iter().enumerate() {
            let at = s.end_s + 100e-6 + (k + 1) as f64 * spacing;
            let r = &run.requests[id];
            let o = &run.outcomes[id];
            let last = s.finished.contains(&id);
            if r.streamed {
                // OpenAI-style: a role chunk before the first token, finish and usage chunks
                // after the last.
                let first = o.first_token_s == Some(s.end_s);
                let n_events =
                    1 + usize::from(first) + usize::from(last) * (1 + usize::from(r.include_usage));
                for _ in 0..n_events {
                    push(rng, at, Obs::Event { req: id });
                }
            }
            if last {
                if !r.streamed || r.include_usage {
                    push(
                        rng,
                        at,
                        Obs::Usage {
                            req: id,
                            prompt: r.prompt,
                            cached: r.cached,
                            completion: o.generated,
                        },
                    );
                }
                push(rng, at + 20e-6, Obs::End { req: id });
            }
        }
    }
    // The energy counter updates every 100 ms (±1 ms); reads every 20–50 ms return the last
    // update in integer mJ. Power: the mean over the last 25 ms, every 100 ms.
    let mut updates = Vec::new();
    let mut u = 0.037;
    while u < horizon_s + 0.2 {
        updates.push(u + (rng.f64() - 0.5) * 0.002);
        u += 0.1;
    }
    let mut read = 0.005;
    while read < horizon_s {
        let k = updates.partition_point(|&x| x <= read);
        let mj = k
            .checked_sub(1)
            .map_or(0, |i| (trace.until(updates[i]) * 1000.0).floor() as u64);
        push(rng, read, Obs::Counter { uj: mj * 1000 });
        read += rng.range(20, 50) as f64 / 1000.0;
    }
    let mut p = 0.1;
    while p < horizon_s {
        let w = (trace.until(p) - trace.until(p - 0.025)) / 0.025;
        push(
            rng,
            p,
            Obs::Power {
                w,
                window_ns: 25_000_000,
            },
        );
        p += 0.1;
    }
    let services = run.steps.iter().map(|s| s.service + 1).max().unwrap_or(0);
    if services > 1 {
        // NVML samples process utilisation about every 1/6 s.
        let period = 1.0 / 6.0;
        let mut t = period;
        while t < horizon_s {
            for svc in 0..services {
                let busy: f64 = run
                    .steps
                    .iter()
                    .filter(|s| s.service == svc && s.end_s > t - period && s.start_s < t)
                    .map(|s| s.end_s.min(t) - s.start_s.max(t - period))
                    .sum();
                let pct = (100.0 * busy / period).round().clamp(0.0, 100.0) as u32;
                push(
                    rng,
                    t,
                    Obs::ProcessUtil {
                        service: svc,
                        sm_percent: pct,
                    },
                );
            }
            t += period;
        }
    }
    out.sort_by_key(|o| (o.delivered_ns, o.ts_ns));
    out
}
