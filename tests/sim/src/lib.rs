//! An inference host simulated from the outside in, to check tracer's attribution against
//! truths its ledger's model did not generate (issue 13).
//!
//! The GPU's physics (`gpu.rs`), the engine's batching (`engine.rs`), the clients (`load.rs`)
//! and what a daemon would observe (`observe.rs`) are this crate's own; it does not depend on
//! `tracer`. Each request's truth is computed two ways from the simulated steps:
//! - **caused** (the written convention): per step, the Aumann–Shapley share of the step's
//!   dynamic energy as a function of the work its requests brought (`gpu::Gpu::shares`);
//! - **time sharing**: per step, its dynamic energy split equally among the requests in it;
//!
//! and its **marginal** energy (what each step would have saved without it) is kept beside
//! them, to say how far the convention is from it.
//!
//! The scenarios (`scenarios`) are split in advance into the ones tracer may be tuned on
//! ([`TUNING`]) and the ones it is only reported on ([`REPORTING`]).

mod engine;
mod gpu;
mod load;
mod observe;
mod rng;

pub use engine::{Batching, Conditions, Outcome, Request, Run, Step};
pub use gpu::{Gpu, Work};
pub use load::Load;
pub use observe::{EnergyTrace, Obs, Observed, Wire};
pub use rng::Rng;

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    /// What it exercises, in a line.
    pub what: &'static str,
    /// Seconds of load.
    pub seconds: f64,
    /// Seconds the daemon watches before the load starts (0: it never sees the GPU quiet).
    pub quiet_s: f64,
    pub gpu: Gpu,
    pub conditions: Conditions,
    /// One per service on the GPU.
    pub batching: Vec<Batching>,
    pub load: Load,
    pub wire: Wire,
}

/// The scenarios tracer's models and error bars may be tuned on.
pub const TUNING: &[&str] = &["baseline", "step-noise", "spread-5ms", "saturated"];

/// The scenarios tracer is only reported on.
pub const REPORTING: &[&str] = &[
    "batch-cost",
    "attention",
    "power-cap",
    "throttle",
    "spread-20ms",
    "chunked-long",
    "hidden-cost",
    "two-services",
    "idle-unseen",
    "writes-only",
];

/// Every scenario, by name.
pub fn scenarios() -> Vec<Scenario> {
    let base = Scenario {
        name: "baseline",
        what: "16 closed-loop clients, chat-like prompts, 40 µs per request per write, engine clock seen",
        seconds: 20.0,
        quiet_s: 2.0,
        gpu: Gpu::default(),
        conditions: Conditions {
            clocks: Vec::new(),
            noise_sigma: 0.0,
        },
        batching: vec![Batching {
            max_seqs: 32,
            max_batched_tokens: 512,
        }],
        load: Load::default(),
        wire: Wire {
            write_us: 40.0,
            spread_ms: None,
            engine_clock: true,
        },
    };
    let with = |name: &'static str, what: &'static str, f: &dyn Fn(&mut Scenario)| {
        let mut s = base.clone();
        s.name = name;
        s.what = what;
        f(&mut s);
        s
    };
    vec![
        base.clone(),
        with(
            "step-noise",
            "each step's energy off the model by σ = 25 % (log-normal)",
            &|s| {
                s.conditions.noise_sigma = 0.25;
            },
        ),
        with("spread-5ms", "a step's writes spread over 5 ms", &|s| {
            s.wire.spread_ms = Some(5.0);
        }),
        with(
            "saturated",
            "open-loop arrivals above capacity: a long queue (max 16 running)",
            &|s| {
                s.load.open_rate = Some(30.0);
                s.batching[0].max_seqs = 16;
            },
        ),
        with(
            "batch-cost",
            "per-token decode energy falls with the batch (×(1 + 6/n))",
            &|s| {
                s.gpu.decode_batch_shape = 6.0;
            },
        ),
        with(
            "attention",
            "prefill cost quadratic in prompt length (attention), long prompts",
            &|s| {
                s.gpu.attention_j = 0.000_8;
                s.gpu.attention_s = 0.000_004;
                s.load.prompt_median = 900.0;
            },
        ),
        with(
            "power-cap",
            "a 330 W power cap: big batches run at lower clocks",
            &|s| {
                s.gpu.cap_w = Some(330.0);
                s.gpu.busy_w = 260.0;
                s.load.concurrency = 32;
            },
        ),
        with(
            "throttle",
            "clocks drop to 70 % after 8 s (thermal)",
            &|s| {
                s.conditions.clocks = vec![(s.quiet_s + 8.0, 0.7)];
            },
        ),
        with(
            "spread-20ms",
            "a step's writes spread over 20 ms (longer than a step)",
            &|s| {
                s.wire.spread_ms = Some(20.0);
            },
        ),
        with(
            "chunked-long",
            "prompts of 2–8k tokens prefilled in 512-token chunks",
            &|s| {
                s.load.prompt_median = 3500.0;
                s.load.prompt_sigma = 0.4;
                s.load.prompt_max = 8000.0;
                s.load.concurrency = 8;
            },
        ),
        with(
            "hidden-cost",
            "a quarter of requests cost 2.5× per token (adapters), unseen",
            &|s| {
                s.load.hidden = (0.25, 2.5);
            },
        ),
        with(
            "two-services",
            "two engines on one GPU, steps in turn",
            &|s| {
                s.batching = vec![s.batching[0], s.batching[0]];
                s.load.services = 2;
            },
        ),
        with(
            "idle-unseen",
            "load from the daemon's start to its end: idle never seen",
            &|s| {
                s.quiet_s = 0.0;
            },
        ),
        with(
            "writes-only",
            "no engine clock: steps only from the write bursts",
            &|s| {
                s.wire.engine_clock = false;
            },
        ),
    ]
}

/// A simulated run and what the daemon observed of it.
pub struct Simulated {
    pub scenario: Scenario,
    pub run: Run,
    pub observed: Vec<Observed>,
    /// Dynamic energy of all steps (J) and idle power (W).
    pub dynamic_j: f64,
    pub idle_w: f64,
    /// Seconds observed.
    pub horizon_s: f64,
}

/// Runs `scenario` with `seed`.
pub fn simulate(scenario: &Scenario, seed: u64) -> Simulated {
    let mut rng = Rng::new(seed);
    let start = scenario.quiet_s;
    let mut clients = load::Clients::new(scenario.load.clone(), start, seed ^ 0x1234);
    let run = engine::run(
        &scenario.gpu,
        &scenario.batching,
        &scenario.conditions,
        &mut clients,
        start + scenario.seconds,
        &mut rng,
    );
    let last = run.steps.last().map_or(start, |s| s.end_s);
    // With idle never seen, the daemon stops with the load.
    let horizon_s = if scenario.quiet_s > 0.0 {
        last + 2.0
    } else {
        last
    };
    let trace = EnergyTrace::new(&run, scenario.gpu.idle_w);
    let observed = observe::observe(&run, &trace, &scenario.wire, horizon_s, &mut rng);
    Simulated {
        scenario: scenario.clone(),
        dynamic_j: trace.dynamic_total(),
        idle_w: scenario.gpu.idle_w,
        run,
        observed,
        horizon_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_and_reporting_scenarios_do_not_overlap_and_cover_all() {
        let all: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
        for t in TUNING {
            assert!(!REPORTING.contains(t), "{t} is in both sets");
        }
        let mut named: Vec<&str> = TUNING.iter().chain(REPORTING).copied().collect();
        named.sort_unstable();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(named, sorted, "every scenario in exactly one set");
    }

    #[test]
    fn every_joule_of_a_run_is_in_some_request_under_both_conventions() {
        for s in scenarios()
            .iter()
            .filter(|s| ["baseline", "power-cap"].contains(&s.name))
        {
            let mut s = s.clone();
            s.seconds = 3.0;
            let sim = simulate(&s, 7);
            let caused: f64 = sim.run.outcomes.iter().map(|o| o.caused_j).sum();
            let shared: f64 = sim.run.outcomes.iter().map(|o| o.timeshare_j).sum();
            assert!(!sim.run.requests.is_empty());
            assert!(
                (caused - sim.dynamic_j).abs() < 1e-6 * sim.dynamic_j,
                "{caused} vs {}",
                sim.dynamic_j
            );
            assert!((shared - sim.dynamic_j).abs() < 1e-6 * sim.dynamic_j);
            assert!(sim.run.outcomes.iter().all(|o| o.end_s.is_some()));
        }
    }
}
