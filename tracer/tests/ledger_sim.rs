//! Simulation: a synthetic GPU serving LLM requests with continuous batching, with a known
//! per-request energy model, observed through realistic sensors; the ledger's attribution is
//! compared with the ground truth. Uses only the ledger's public API.
//!
//! **Engine.** Closed-loop clients (concurrency 1, 8, 32) send requests of 100–2000 prompt
//! tokens (half of them with 0–80 % cached) and 20–600 output tokens, thinking 0–200 ms between
//! requests. Each engine step prefills every waiting request and decodes one token for every
//! running one; a request's prefill step emits its first token.
//!
//! **Energy** (dynamic, on top of 90 W idle). A step lasts `12 ms + 0.15 ms × decoding
//! sequences` (its base) plus `uncached prompt tokens / 20 000 tok/s` (prefill compute), and
//! draws 120 W over that time; on top, each decoded token costs 0.06 J and each uncached prompt
//! token 0.015 J. Two variants add a cost: 50 µJ per decoded token per token of its context (KV
//! cache reads; the ledger's model has such a term) and 3 µJ per uncached token per prompt token
//! (attention in prefill; the ledger's model has none — how it copes outside its family).
//!
//! **Truth** ("caused" energy, the ledger's semantics): the step's base energy (120 W × base) is
//! shared equally by the sequences in the step; the prefill time (120 W × its tokens / 20 000)
//! and the per-token costs go to the request whose tokens they are. Idle energy of each step is
//! shared in proportion to that dynamic truth (`amortize`); idle with nothing in flight is
//! nobody's. A second, cruder truth shares the whole step's 120 W equally among its sequences
//! (prefill time included); its error column shows how much the definition matters.
//!
//! **Sensors**, as on A100/H100: an energy counter in integer mJ updated every 100 ms (±1 ms
//! jitter), read by the daemon every 20–50 ms; instant power = mean over the last 25 ms of every
//! 100 ms. **Wire**: response headers 2 ms after arrival; after each step the server writes the
//! connections' chunks one after the other (0–1 ms apart), with an OpenAI-style role chunk
//! before the first token and finish and usage chunks after the last; usage (prompt, cached and
//! completion tokens) is known at the end. Every observation reaches the ledger after a random
//! 0–30 ms delay, so input is out of order within the grace. The daemon starts 2 s before the
//! traffic (learned idle needs quiet time) and calls `advance` every 100 ms.
//!
//! Figures (same in debug and release builds, ~5 s in debug):
//! `cargo test -p tracer --test ledger_sim -- --nocapture`.

use std::collections::BTreeMap;

use tracer::ledger::{
    Arrival, DeviceId, DeviceInfo, DeviceKind, Ledger, LedgerConfig, Outcome, RequestId,
    RequestRecord, ServiceId,
};

const MS: u64 = 1_000_000;
const IDLE_W: f64 = 90.0;
const STEP_W: f64 = 120.0;
const DECODE_J: f64 = 0.06;
const PREFILL_J: f64 = 0.015;
const PREFILL_TOK_PER_S: f64 = 20_000.0;
/// Extra decode cost per token of context (KV cache reads).
const KV_J_PER_CTX_TOKEN: f64 = 0.000_05;
/// Extra prefill cost per uncached token per prompt token (attention), which the ledger's cost
/// model does not have: the out-of-model scenario.
const ATTN_J_PER_TOKEN2: f64 = 0.000_003;

/// Cost terms on top of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    None,
    /// Decode tokens cost more with longer contexts (in the ledger's model family).
    KvCache,
    /// Prefill cost quadratic in prompt length (outside the ledger's model family).
    Attention,
}

/// splitmix64: a small deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct SimRequest {
    arrive: u64,
    prompt: u64,
    cached: u64,
    output: u64,
    produced: u64,
    first_byte: Option<u64>,
    end: Option<u64>,
    /// Dynamic and amortised idle truth ("caused"), and the crude alternative.
    truth_dyn: f64,
    truth_idle: f64,
    crude_dyn: f64,
    crude_idle: f64,
    token_times: Vec<u64>,
}

impl SimRequest {
    fn truth(&self) -> f64 {
        self.truth_dyn + self.truth_idle
    }

    fn crude(&self) -> f64 {
        self.crude_dyn + self.crude_idle
    }

    fn uncached(&self) -> u64 {
        self.prompt - self.cached
    }
}

/// Power is piecewise constant: (start, end, watts), contiguous from 0.
struct Trace {
    pieces: Vec<(u64, u64, f64)>,
    cum: Vec<f64>,
}

impl Trace {
    fn new(pieces: Vec<(u64, u64, f64)>) -> Self {
        let cum = pieces
            .iter()
            .scan(0.0, |acc, &(s, e, w)| {
                *acc += w * (e - s) as f64 * 1e-9;
                Some(*acc)
            })
            .collect();
        Self { pieces, cum }
    }

    /// Energy from 0 to `t`, J.
    fn energy_until(&self, t: u64) -> f64 {
        let i = self.pieces.partition_point(|p| p.1 <= t);
        let before = if i == 0 { 0.0 } else { self.cum[i - 1] };
        match self.pieces.get(i) {
            Some(&(s, _, w)) if s < t => before + w * (t - s) as f64 * 1e-9,
            _ => before,
        }
    }

    fn total(&self) -> f64 {
        self.cum.last().copied().unwrap_or(0.0)
    }
}

struct SimResult {
    requests: Vec<SimRequest>,
    trace: Trace,
    end: u64,
}

/// Runs the engine with `concurrency` closed-loop clients until `n` requests are done.
fn simulate(concurrency: usize, n: usize, seed: u64, extra: Extra) -> SimResult {
    let mut rng = Rng(seed);
    let mut requests: Vec<SimRequest> = Vec::new();
    let mut waiting: Vec<usize> = Vec::new();
    let mut running: Vec<usize> = Vec::new();
    // Next submission time per client: traffic starts after 2 s of quiet.
    let mut clients: Vec<u64> = (0..concurrency)
        .map(|_| rng.uniform(2_000, 2_300) * MS)
        .collect();
    let mut pieces = vec![];
    let mut t = 0u64;
    let mut submitted = 0usize;
    let mut client_of: Vec<usize> = Vec::new();
    loop {
        for (c, due) in clients.iter_mut().enumerate() {
            if *due <= t && submitted < n {
                let prompt = rng.uniform(100, 2000);
                let cached = if rng.unit() < 0.5 {
                    0
                } else {
                    (prompt as f64 * rng.unit() * 0.8) as u64
                };
                requests.push(SimRequest {
                    arrive: *due,
                    prompt,
                    cached,
                    output: rng.uniform(20, 600),
                    produced: 0,
                    first_byte: None,
                    end: None,
                    truth_dyn: 0.0,
                    truth_idle: 0.0,
                    crude_dyn: 0.0,
                    crude_idle: 0.0,
                    token_times: Vec::new(),
                });
                client_of.push(c);
                waiting.push(requests.len() - 1);
                submitted += 1;
                *due = u64::MAX;
            }
        }
        if waiting.is_empty() && running.is_empty() {
            let next = clients.iter().copied().min().unwrap_or(u64::MAX);
            if submitted >= n || next == u64::MAX {
                break;
            }
            pieces.push((t, next, IDLE_W));
            t = next;
            continue;
        }
        // One engine step: prefill everything waiting, decode everything running.
        let prefill: Vec<usize> = std::mem::take(&mut waiting);
        let prefill_tokens: u64 = prefill.iter().map(|&i| requests[i].uncached()).sum();
        let base_ns = 12 * MS + (0.15 * MS as f64 * running.len() as f64) as u64;
        let prefill_ns = (prefill_tokens as f64 / PREFILL_TOK_PER_S * 1e9) as u64;
        let dur = base_ns + prefill_ns;
        let seqs = (prefill.len() + running.len()) as f64;
        let base_share = STEP_W * base_ns as f64 * 1e-9 / seqs;
        let step_share = STEP_W * dur as f64 * 1e-9 / seqs;
        // (request, caused dynamic J, crude dynamic J)
        let mut parts: Vec<(usize, f64, f64)> = Vec::new();
        for &i in &prefill {
            let tok = requests[i].uncached() as f64;
            let attn = if extra == Extra::Attention {
                ATTN_J_PER_TOKEN2 * tok * requests[i].prompt as f64
            } else {
                0.0
            };
            let own = STEP_W * tok / PREFILL_TOK_PER_S + PREFILL_J * tok + attn;
            parts.push((i, base_share + own, step_share + PREFILL_J * tok + attn));
        }
        for &i in &running {
            let r = &requests[i];
            let kv = if extra == Extra::KvCache {
                KV_J_PER_CTX_TOKEN * (r.prompt + r.produced) as f64
            } else {
                0.0
            };
            parts.push((i, base_share + DECODE_J + kv, step_share + DECODE_J + kv));
        }
        let step_dyn: f64 = parts.iter().map(|p| p.1).sum();
        let crude_dyn: f64 = parts.iter().map(|p| p.2).sum();
        let idle_j = IDLE_W * dur as f64 * 1e-9;
        let end = t + dur;
        pieces.push((t, end, IDLE_W + step_dyn / (dur as f64 * 1e-9)));
        for &(i, e, crude) in &parts {
            let r = &mut requests[i];
            r.truth_dyn += e;
            r.truth_idle += idle_j * e / step_dyn;
            r.crude_dyn += crude;
            r.crude_idle += idle_j * crude / crude_dyn;
            r.produced += 1;
            r.token_times.push(end);
            if r.first_byte.is_none() {
                r.first_byte = Some(end);
            }
        }
        t = end;
        running.extend(prefill);
        running.retain(|&i| {
            let r = &mut requests[i];
            if r.produced >= r.output {
                r.end = Some(t);
                clients[client_of[i]] = t + rng.uniform(0, 200) * MS;
                false
            } else {
                true
            }
        });
    }
    SimResult {
        requests,
        trace: Trace::new(pieces),
        end: t,
    }
}

/// What the daemon would see.
enum Obs {
    Counter(u64),
    Power(u64, f64),
    Arrive(usize),
    First(usize),
    Token(usize),
    End(usize),
}

/// Feeds the simulated observations to a ledger; returns its records and the ledger.
fn observe(sim: &SimResult, seed: u64) -> (Vec<RequestRecord>, Ledger) {
    let mut rng = Rng(seed ^ 0xABCD);
    let dev = DeviceId(0);
    let svc = ServiceId(1);
    let mut ledger = Ledger::new(LedgerConfig::default()).expect("config");
    ledger.register_device(
        dev,
        DeviceInfo {
            name: "gpu0".into(),
            kind: DeviceKind::Gpu,
            ..DeviceInfo::default()
        },
    );
    // NVML's energy counter updates every 100 ms on A100/H100.
    ledger
        .set_counter_period(dev, Some(100 * MS))
        .expect("device");
    ledger.occupy(dev, svc, 0, None).expect("device");

    // (delivery time, event time, order, what)
    let mut obs: Vec<(u64, u64, u8, Obs)> = Vec::new();
    let horizon = sim.end + 2_000 * MS;
    let delay = |rng: &mut Rng| rng.uniform(0, 30) * MS;
    // Counter updates every 100 ms (phase 37 ms, ±1 ms jitter); reads every 20–50 ms return
    // the last update's value in integer mJ.
    let mut updates = Vec::new();
    let mut u = 37 * MS;
    while u < horizon + 200 * MS {
        updates.push(u + rng.uniform(0, 2 * MS) - MS);
        u += 100 * MS;
    }
    let mut read = 5 * MS;
    while read < horizon {
        let k = updates.partition_point(|&x| x <= read);
        let mj = if k == 0 {
            0
        } else {
            (sim.trace.energy_until(updates[k - 1]) * 1000.0).floor() as u64
        };
        obs.push((read + delay(&mut rng), read, 0, Obs::Counter(mj * 1000)));
        read += rng.uniform(20, 50) * MS;
    }
    // Instant power: mean over the last 25 ms of every 100 ms.
    let mut p = 100 * MS;
    while p < horizon {
        let e = sim.trace.energy_until(p) - sim.trace.energy_until(p - 25 * MS);
        obs.push((p + delay(&mut rng), p, 0, Obs::Power(p, e / 0.025)));
        p += 100 * MS;
    }
    for (i, r) in sim.requests.iter().enumerate() {
        obs.push((r.arrive + delay(&mut rng), r.arrive, 1, Obs::Arrive(i)));
        // Response headers go out as soon as the request is accepted.
        let head = r.arrive + 2 * MS;
        obs.push((head + delay(&mut rng), head, 2, Obs::First(i)));
        // The server writes each connection's chunk in turn after a step: up to 1 ms apart.
        // OpenAI-style streams add a role chunk before the first token and a finish and a
        // usage chunk after the last.
        let n = r.token_times.len();
        for (k, &tt) in r.token_times.iter().enumerate() {
            let extra = usize::from(k == 0) + 2 * usize::from(k + 1 == n);
            for _ in 0..=extra {
                let at = tt + rng.uniform(0, 1_000) * 1_000;
                obs.push((at + delay(&mut rng), at, 3, Obs::Token(i)));
            }
        }
        if let Some(e) = r.end {
            // The last byte follows the last chunk on the same connection.
            let at = e + 1_100_000;
            obs.push((at + 30 * MS, at, 4, Obs::End(i)));
        }
    }
    obs.sort_by_key(|o| (o.0, o.2, o.1));

    let id = |i: usize| RequestId(i as u64);
    let mut arrived = vec![false; sim.requests.len()];
    let mut held: Vec<(usize, u64, Obs)> = Vec::new();
    let mut records = Vec::new();
    let mut next_advance = 100 * MS;
    for (at, ts, _, o) in obs {
        while at >= next_advance {
            records.extend(ledger.advance(next_advance));
            next_advance += 100 * MS;
        }
        // Sensor pollers and the event pipeline are merged with delays, so observations arrive
        // out of order; only a request's arrival always comes first (the tracker reports it
        // before anything else on the connection).
        let who = match o {
            Obs::First(i) | Obs::Token(i) | Obs::End(i) => Some(i),
            _ => None,
        };
        if let Some(i) = who
            && !arrived[i]
        {
            held.push((i, ts, o));
            continue;
        }
        match o {
            Obs::Counter(uj) => ledger.counter(dev, ts, uj, None).expect("device"),
            Obs::Power(end, w) => ledger.power(dev, end, w, 25 * MS).expect("device"),
            Obs::Arrive(i) => {
                ledger
                    .arrive(
                        id(i),
                        svc,
                        Arrival {
                            ts_ns: ts,
                            model: Some("sim".into()),
                            ..Arrival::default()
                        },
                    )
                    .expect("new request");
                arrived[i] = true;
                for (j, t2, o2) in std::mem::take(&mut held) {
                    if j == i {
                        apply(&mut ledger, sim, j, t2, &o2);
                    } else {
                        held.push((j, t2, o2));
                    }
                }
            }
            ref other => {
                if let Some(i) = who {
                    apply(&mut ledger, sim, i, ts, other);
                }
            }
        }
    }
    records.extend(ledger.advance(horizon + 60_000 * MS));
    (records, ledger)
}

fn apply(ledger: &mut Ledger, sim: &SimResult, i: usize, ts: u64, o: &Obs) {
    let id = RequestId(i as u64);
    let r = &sim.requests[i];
    match o {
        Obs::First(_) => ledger.first_byte(id, ts),
        Obs::Token(_) => ledger.events(id, ts, 1),
        Obs::End(_) => {
            // Usage arrives with the last event, as with `stream_options.include_usage`.
            ledger.usage(id, Some(r.prompt), Some(r.output), Some(r.cached));
            ledger.end(id, ts, 1000, Outcome::Complete);
        }
        Obs::Counter(_) | Obs::Power(..) | Obs::Arrive(_) => {}
    }
}

struct Figures {
    n: usize,
    n_long: usize,
    median: f64,
    p95: f64,
    coverage: f64,
    bar_median: f64,
    crude_median: f64,
    crude_p95: f64,
    conservation: f64,
    measured_vs_true: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(concurrency: usize, n: usize, seed: u64, extra: Extra) -> Figures {
    let sim = simulate(concurrency, n, seed, extra);
    let (records, ledger) = observe(&sim, seed);
    assert_eq!(
        records.len(),
        sim.requests.len(),
        "every request gets one record"
    );
    let by_id: BTreeMap<u64, &RequestRecord> = records.iter().map(|r| (r.id.0, r)).collect();
    let mut errs = Vec::new();
    let mut crude = Vec::new();
    let mut bars = Vec::new();
    let mut covered = 0usize;
    for (i, r) in sim.requests.iter().enumerate() {
        let rec = by_id[&(i as u64)];
        let dur = r.end.unwrap_or(0) - r.arrive;
        if dur < 1_000 * MS {
            continue;
        }
        let err = rec.total_j - r.truth();
        errs.push(err.abs() / r.truth());
        crude.push((rec.total_j - r.crude()).abs() / r.crude());
        bars.push(rec.uncertainty_j / r.truth());
        covered += usize::from(err.abs() <= rec.uncertainty_j);
    }
    for v in [&mut errs, &mut crude, &mut bars] {
        v.sort_by(f64::total_cmp);
    }
    let totals = ledger.totals()[&DeviceId(0)];
    Figures {
        n: sim.requests.len(),
        n_long: errs.len(),
        median: percentile(&errs, 0.5),
        p95: percentile(&errs, 0.95),
        coverage: covered as f64 / errs.len().max(1) as f64,
        bar_median: percentile(&bars, 0.5),
        crude_median: percentile(&crude, 0.5),
        crude_p95: percentile(&crude, 0.95),
        conservation: totals.imbalance_j().abs() / totals.measured_j,
        // The counter is read until 2 s after the last request; its last update before that
        // bounds what can be measured.
        measured_vs_true: (totals.measured_j - sim.trace.total()).abs() / sim.trace.total(),
    }
}

#[test]
fn attribution_matches_ground_truth_through_realistic_sensors() {
    println!(
        "| scenario | requests | ≥ 1 s | median error | p95 error | error bar holds truth | median bar | crude truth: median / p95 | conservation | measured vs true |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, concurrency, n, extra) in [
        ("c = 1", 1, 160, Extra::None),
        ("c = 8", 8, 480, Extra::None),
        ("c = 32", 32, 1200, Extra::None),
        (
            "c = 32, decode cost grows with context",
            32,
            1200,
            Extra::KvCache,
        ),
        (
            "c = 32, quadratic prefill (not modelled)",
            32,
            1200,
            Extra::Attention,
        ),
    ] {
        let f = run(concurrency, n, 7 + concurrency as u64, extra);
        println!(
            "| {name} | {} | {} | {:.2} % | {:.2} % | {:.1} % | ±{:.1} % | {:.2} % / {:.2} % | {:.1e} | {:.3} % |",
            f.n,
            f.n_long,
            f.median * 100.0,
            f.p95 * 100.0,
            f.coverage * 100.0,
            f.bar_median * 100.0,
            f.crude_median * 100.0,
            f.crude_p95 * 100.0,
            f.conservation,
            f.measured_vs_true * 100.0
        );
        assert!(f.conservation <= 1e-3, "conservation {}", f.conservation);
        assert!(
            f.measured_vs_true <= 0.01,
            "measured vs true {}",
            f.measured_vs_true
        );
        // Targets: median ≤ 2 %, p95 ≤ 5 %, bars hold the truth ≥ 95 %.
        let (median, p95, coverage) = if extra == Extra::Attention {
            // Outside the model's family: a regression guard at what it reaches, not the target.
            (0.02, 0.08, 0.90)
        } else {
            (0.02, 0.05, 0.95)
        };
        assert!(f.median <= median, "median error {} at {name}", f.median);
        assert!(f.p95 <= p95, "p95 error {} at {name}", f.p95);
        assert!(
            f.coverage >= coverage,
            "error bars hold the truth only {} at {name}",
            f.coverage
        );
    }
}
