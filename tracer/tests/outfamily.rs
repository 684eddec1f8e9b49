//! Attribution against truths from outside the ledger's model (issue 13): every scenario of
//! `tracer-sim`, whose GPU physics, batching and observations are its own, fed to the ledger
//! through its public API as the daemon would, and scored over **every** request (short ones,
//! under 1 s, also apart) against the written convention ("caused": per-step Aumann–Shapley
//! shares) and against plain time sharing.
//!
//! The scenarios are split in advance (`tracer_sim::TUNING`, `tracer_sim::REPORTING`); the
//! table goes to BENCHMARKS.md:
//! `cargo test --release -p tracer --test outfamily -- --nocapture`.

use tracer::ledger::{
    Arrival, DeviceId, DeviceInfo, DeviceKind, IdlePolicy, Ledger, LedgerConfig, Outcome,
    RequestId, RequestRecord, ServiceId, SplitPolicy, StepSource, UncertaintyConfig,
};
use tracer_sim::{Obs, Simulated, TUNING, scenarios, simulate};

const MS: u64 = 1_000_000;
/// Seconds of load per scenario (debug builds too: the bars are fitted on runs this long).
const SECONDS: f64 = 20.0;
/// Seed of every scenario's run.
const SEED: u64 = 42;

/// The ledger's settings for `split`: dynamic energy is what the truths give, so idle is
/// reported per device (as the demo runs).
fn config(split: SplitPolicy) -> LedgerConfig {
    LedgerConfig {
        split,
        idle: IdlePolicy::Report,
        ..LedgerConfig::default()
    }
}

/// Feeds what the daemon observed to a ledger with `split`; returns its records.
fn attribute(sim: &Simulated, split: SplitPolicy) -> (Vec<RequestRecord>, Ledger) {
    attribute_with(sim, config(split))
}

/// As [`attribute`], with `config`.
fn attribute_with(sim: &Simulated, config: LedgerConfig) -> (Vec<RequestRecord>, Ledger) {
    let dev = DeviceId(0);
    let mut ledger = Ledger::new(config).expect("config");
    ledger.register_device(
        dev,
        DeviceInfo {
            name: "gpu0".into(),
            kind: DeviceKind::Gpu,
            ..DeviceInfo::default()
        },
    );
    ledger
        .set_counter_period(dev, Some(100 * MS))
        .expect("device");
    for s in 0..sim.scenario.batching.len() {
        ledger.occupy(dev, service(s), 0, None).expect("device");
    }
    let mut arrived = vec![false; sim.run.requests.len()];
    let mut held: Vec<(u64, &Obs)> = Vec::new();
    let mut records = Vec::new();
    let mut next_advance = 100 * MS;
    for o in &sim.observed {
        while o.delivered_ns >= next_advance {
            records.extend(ledger.advance(next_advance));
            next_advance += 100 * MS;
        }
        // The tracker reports a request's arrival before anything else on its connection.
        let who = match o.obs {
            Obs::Event { req } | Obs::Usage { req, .. } | Obs::End { req } => Some(req),
            _ => None,
        };
        if let Some(i) = who
            && !arrived[i]
        {
            held.push((o.ts_ns, &o.obs));
            continue;
        }
        apply(&mut ledger, sim, o.ts_ns, &o.obs);
        if let Obs::Arrive { req, .. } = o.obs {
            arrived[req] = true;
            let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut held)
                .into_iter()
                .partition(|(_, h)| matches!(h, Obs::Event { req: r } | Obs::Usage { req: r, .. } | Obs::End { req: r } if *r == req));
            held = rest;
            for (ts, h) in mine {
                apply(&mut ledger, sim, ts, h);
            }
        }
    }
    let end = (sim.horizon_s * 1e9) as u64;
    records.extend(ledger.advance(end + 60_000 * MS));
    records.extend(ledger.finish());
    (records, ledger)
}

fn service(s: usize) -> ServiceId {
    ServiceId(s as u32 + 1)
}

fn apply(ledger: &mut Ledger, sim: &Simulated, ts: u64, o: &Obs) {
    let dev = DeviceId(0);
    match *o {
        Obs::Arrive {
            req,
            service: s,
            body_bytes,
            ref prefix_blocks,
        } => {
            ledger
                .arrive(
                    RequestId(req as u64),
                    service(s),
                    Arrival {
                        ts_ns: ts,
                        model: Some("sim".into()),
                        body_bytes: Some(body_bytes),
                        prefix_blocks: prefix_blocks.clone(),
                        ..Arrival::default()
                    },
                )
                .expect("new request");
        }
        Obs::Event { req } => ledger.events(RequestId(req as u64), ts, 1),
        Obs::Usage {
            req,
            prompt,
            cached,
            completion,
        } => ledger.usage(
            RequestId(req as u64),
            Some(prompt),
            Some(completion),
            Some(cached),
        ),
        Obs::End { req } => {
            let bytes = 200 * sim.run.outcomes[req].generated;
            ledger.end(RequestId(req as u64), ts, bytes, Outcome::Complete);
        }
        Obs::StepMark { service: s } => ledger.step_mark(service(s), ts, StepSource::Ipc),
        Obs::Counter { uj } => ledger.counter(dev, ts, uj, None).expect("device"),
        Obs::Power { w, window_ns } => ledger.power(dev, ts, w, window_ns).expect("device"),
        // As the daemon's binding does: a service's weight on the GPU is its processes' SM
        // utilisation (`occupancy::binding`).
        Obs::ProcessUtil {
            service: s,
            sm_percent,
        } => ledger
            .occupy(dev, service(s), ts, Some(f64::from(sm_percent)))
            .expect("device"),
    }
}

/// |error| and whether the bar held, per request; `short`: under 1 s from arrival to end.
struct Scored {
    errs: Vec<(f64, bool, f64, bool)>,
}

impl Scored {
    fn new(sim: &Simulated, records: &[RequestRecord], truth: impl Fn(usize) -> f64) -> Self {
        let mut errs = Vec::new();
        for r in records {
            let i = r.id.0 as usize;
            let want = truth(i);
            let gpu = r.devices.iter().find(|d| d.kind == DeviceKind::Gpu);
            let (got, bar) = gpu.map_or((0.0, 0.0), |d| (d.dynamic_j, d.uncertainty_j));
            let req = &sim.run.requests[i];
            let out = &sim.run.outcomes[i];
            let short = out.end_s.is_some_and(|e| e - req.arrive_s < 1.0);
            if want > 0.0 {
                errs.push((
                    (got - want).abs() / want,
                    (got - want).abs() <= bar,
                    bar / want,
                    short,
                ));
            }
        }
        Self { errs }
    }

    /// (n, median, p95, bar coverage, median bar width) over those `pick` selects.
    fn figures(&self, pick: impl Fn(bool) -> bool) -> (usize, f64, f64, f64, f64) {
        let sel: Vec<&(f64, bool, f64, bool)> = self.errs.iter().filter(|e| pick(e.3)).collect();
        let n = sel.len();
        if n == 0 {
            return (0, 0.0, 0.0, 0.0, 0.0);
        }
        let mut e: Vec<f64> = sel.iter().map(|x| x.0).collect();
        let mut w: Vec<f64> = sel.iter().map(|x| x.2).collect();
        e.sort_by(f64::total_cmp);
        w.sort_by(f64::total_cmp);
        let q = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let held = sel.iter().filter(|x| x.1).count() as f64 / n as f64;
        (n, q(&e, 0.5), q(&e, 0.95), held, q(&w, 0.5))
    }
}

fn row(label: &str, f: (usize, f64, f64, f64, f64)) -> String {
    format!(
        "| {label} | {} | {:.2} % | {:.1} % | {:.0} % | ± {:.1} % |",
        f.0,
        f.1 * 100.0,
        f.2 * 100.0,
        f.3 * 100.0,
        f.4 * 100.0
    )
}

/// How far a request's marginal energy (what its steps would have saved without it) is from
/// its share under the convention: Σ marginal / Σ caused, and the median per-request ratio.
fn marginal_vs_caused(sim: &Simulated) -> (f64, f64) {
    let o = &sim.run.outcomes;
    let sum = |f: fn(&tracer_sim::Outcome) -> f64| o.iter().map(f).sum::<f64>();
    let mut ratios: Vec<f64> = o
        .iter()
        .filter(|x| x.caused_j > 0.0)
        .map(|x| x.marginal_j / x.caused_j)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    (sum(|x| x.marginal_j) / sum(|x| x.caused_j), median)
}

#[test]
fn every_scenario_against_the_convention_and_time_sharing() {
    let seconds = SECONDS;
    println!("| scenario | set | variant | requests | median | p95 | bar holds | bar ± (median) |");
    println!("|---|---|---|---|---|---|---|---|");
    for mut s in scenarios() {
        s.seconds = s.seconds.min(seconds);
        let sim = simulate(&s, SEED);
        let set = if TUNING.contains(&s.name) {
            "tuning"
        } else {
            "reporting"
        };
        let n = sim.run.requests.len();
        assert!(n >= 10, "{}: {n} requests", s.name);
        let (sum_ratio, median_ratio) = marginal_vs_caused(&sim);
        eprintln!(
            "{}: marginal / caused: Σ {:.2}, median per request {:.2}",
            s.name, sum_ratio, median_ratio
        );
        for (variant, split) in [
            ("default", SplitPolicy::Auto),
            ("time sharing", SplitPolicy::Equal),
        ] {
            let (records, ledger) = attribute(&sim, split);
            // One record per request, and every measured joule accounted for.
            assert_eq!(records.len(), n, "{} {variant}: records", s.name);
            let t = ledger.totals()[&DeviceId(0)];
            let measured = t.measured_j;
            let placed = t.request_dynamic_j + t.request_idle_j + t.idle_j + t.unattributed_j;
            assert!(
                (measured - placed).abs() <= 1e-6 * measured.max(1.0),
                "{} {variant}: measured {measured} J, placed {placed} J",
                s.name
            );
            if split == SplitPolicy::Auto {
                eprintln!(
                    "{}: idle learned {:.2} W ({:?}; true {} W); prices {:?}",
                    s.name,
                    t.idle_w,
                    t.idle_basis,
                    sim.idle_w,
                    ledger.cost_model(DeviceId(0), service(0))
                );
            }
            let caused = Scored::new(&sim, &records, |i| sim.run.outcomes[i].caused_j);
            let shared = Scored::new(&sim, &records, |i| sim.run.outcomes[i].timeshare_j);
            let label =
                |truth: &str, who: &str| format!("{} | {set} | {variant} vs {truth}{who}", s.name);
            println!("{}", row(&label("caused", ""), caused.figures(|_| true)));
            println!(
                "{}",
                row(&label("caused", ", short"), caused.figures(|short| short))
            );
            println!(
                "{}",
                row(&label("time sharing", ""), shared.figures(|_| true))
            );
        }
    }
}

/// Pooled bar coverage and median bar width (relative) of the default split against the
/// convention over the tuning scenarios' runs, with the bar factors `u`.
fn bars(sims: &[Simulated], u: &UncertaintyConfig) -> (f64, f64) {
    let (mut held, mut n) = (0usize, 0usize);
    let mut widths = Vec::new();
    for sim in sims {
        let mut c = config(SplitPolicy::Auto);
        c.uncertainty = u.clone();
        let (records, _) = attribute_with(sim, c);
        let scored = Scored::new(sim, &records, |i| sim.run.outcomes[i].caused_j);
        held += scored.errs.iter().filter(|e| e.1).count();
        n += scored.errs.len();
        widths.extend(scored.errs.iter().map(|e| e.2));
    }
    widths.sort_by(f64::total_cmp);
    let width = widths.get(widths.len() / 2).copied().unwrap_or(0.0);
    (held as f64 / n.max(1) as f64, width)
}

/// The bar factors are fitted on the tuning scenarios only: the narrowest bars (median width)
/// that hold the convention's truth for at least 95 % of their requests, pooled. The defaults
/// must be that choice on this grid (the one they were picked from, with more values of each),
/// and must not cover much more than 95 % either. The reporting scenarios' coverage is in the
/// table, never fitted on.
#[test]
fn bars_are_fitted_on_the_tuning_scenarios() {
    let sims: Vec<Simulated> = scenarios()
        .into_iter()
        .filter(|s| TUNING.contains(&s.name))
        .map(|mut s| {
            s.seconds = SECONDS;
            simulate(&s, SEED)
        })
        .collect();
    let default = UncertaintyConfig::default();
    let (held, width) = bars(&sims, &default);
    println!(
        "default (edge {}, split {}, residual {}): tuning coverage {:.1} %, median bar ± {:.1} %",
        default.edge_factor,
        default.split_factor,
        default.residual_factor,
        100.0 * held,
        100.0 * width
    );
    assert!(
        (0.95..=0.975).contains(&held),
        "tuning coverage {held} with the default bar factors"
    );
    for edge_factor in [0.05, 0.15] {
        for split_factor in [0.05, 0.3] {
            for residual_factor in [0.7, 1.5, 2.5] {
                let u = UncertaintyConfig {
                    edge_factor,
                    split_factor,
                    residual_factor,
                    ..default.clone()
                };
                let (h, w) = bars(&sims, &u);
                println!(
                    "edge {edge_factor}, split {split_factor}, residual {residual_factor}: coverage {:.1} %, median bar ± {:.1} %",
                    100.0 * h,
                    100.0 * w
                );
                assert!(
                    h < 0.95 || w >= width - 1e-9,
                    "narrower bars at {:.1} % coverage: {u:?}",
                    100.0 * h
                );
            }
        }
    }
}
