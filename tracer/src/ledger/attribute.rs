//! Attribution of one measured segment: idle, shape, services, requests, error terms.

use std::collections::BTreeMap;

use crate::ids::{DeviceId, RequestId, ServiceId};

use super::{
    config::{IdlePolicy, LedgerConfig},
    context::{Member, decode_steps, own_context_time},
    features::{Feat, decode_in, prefill_in, time_shares, unit_chunks},
    model::{CostModel, Features},
    pending::{IdMap, Pending},
    prefills::allocate_prefills,
    prefix::PrefixCache,
    presence::{in_engine, pauses, resolve_prefill},
    sensor::Segment,
    state::{Device, Request},
    steps::{Chunk, StepClock},
    types::{DeviceKind, IdleBasis, LedgerStats},
    warmup::HeldUnit,
    weights::{self, Prices, Weights, WeightsOutcome},
};

/// Power coverage of a segment above which requests are split per slice, not per segment
/// (counting only sample windows no longer than a slice: a coarser mean cannot tell one
/// slice's power from its neighbour's, and splitting slice by slice on its smeared shape is
/// worse than splitting the segment).
const FINE_COVERAGE: f64 = 0.8;

/// Borrowed ledger state an attribution needs.
pub(crate) struct Ctx<'a> {
    pub dev_id: DeviceId,
    pub config: &'a LedgerConfig,
    pub pending: &'a mut Pending,
    /// Every request that came in before this is known to its end: prefills whose last step
    /// ended before it can be placed.
    pub settled_ns: u64,
    pub steps: &'a mut BTreeMap<ServiceId, StepClock>,
    /// Per service, the prompt starts seen (`prefix.rs`).
    pub prefixes: &'a BTreeMap<ServiceId, PrefixCache>,
    /// The device's units held for a re-split (`warmup.rs`).
    pub held: &'a mut Vec<HeldUnit>,
    pub stats: &'a mut LedgerStats,
    pub scratch: &'a mut Scratch,
}

/// Buffers reused from segment to segment (no allocation per segment in steady state).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Scratch {
    cands: Vec<Cand>,
    services: Vec<Svc>,
    shape: Vec<f64>,
    active: Vec<bool>,
    feats: Vec<Feat>,
    /// The split unit's prefill chunks (see `features::unit_chunks`).
    chunks: Vec<Chunk>,
    /// The split unit's pauses (see `presence::pauses`).
    pauses: Vec<(u64, u64)>,
    points: Vec<u64>,
    weights: Weights,
    /// Requests whose prefill step was resolved while collecting candidates.
    fresh: Vec<RequestId>,
    /// A service's requests to look at (unplaced prefills, then candidates).
    ids: Vec<RequestId>,
    /// One service's candidates and their time in the engine, its decode steps learned from
    /// them, and pauses (`context.rs`).
    members: Vec<Member>,
    decode_steps: Vec<(u64, usize, f64, u64)>,
    step_pauses: Vec<(u64, u64)>,
}

/// A request in flight during the segment.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Cand {
    id: RequestId,
    svc: usize,
    /// Its time in the engine (see `presence.rs`), and that clipped to the segment.
    engine: (u64, u64),
    a: u64,
    b: u64,
    /// Energy given to it in this segment (dynamic + amortised idle), and the part split by
    /// the cost model.
    e_seg: f64,
    e_model: f64,
}

/// A service occupying the device during the segment.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Svc {
    service: ServiceId,
    unit: Unit,
    /// Its cost model's relative residual when it was split.
    rel_resid: f64,
}

/// A service's energy in a split unit.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Unit {
    dyn_j: f64,
    /// Its idle energy (shared among its requests only under `amortize`).
    idle_j: f64,
    /// Its share of the device's time: Σ share × slice length over its active slices.
    time_s: f64,
}

/// Attributes one segment of device `d`.
#[expect(
    clippy::many_single_char_names,
    reason = "segment maths uses its own notation"
)]
pub(crate) fn segment(
    ctx: Ctx<'_>,
    d: &mut Device,
    seg: &Segment,
    requests: &mut IdMap<Box<Request>>,
) {
    let Ctx {
        dev_id,
        config,
        pending,
        settled_ns,
        steps,
        prefixes,
        held,
        stats,
        scratch,
    } = ctx;
    let len_ns = (seg.end_ns - seg.start_ns).max(1);
    let len_s = len_ns as f64 * 1e-9;
    let energy = seg.energy_j.max(0.0);

    // Who could be charged: requests of the services occupying the device in this segment.
    scratch.services.clear();
    scratch.cands.clear();
    for o in &d.occupancy {
        if o.from_ns >= seg.end_ns || o.to_ns <= seg.start_ns {
            continue;
        }
        if scratch.services.iter().any(|s| s.service == o.service) {
            continue;
        }
        let svc = scratch.services.len();
        scratch.services.push(Svc {
            service: o.service,
            unit: Unit::default(),
            rel_resid: 0.0,
        });
        // Placed prefills are settled: only the others can change (in id order, as held);
        // without a step clock, only those with a streamed event.
        let no_clock = !steps.contains_key(&o.service);
        match pending.service(o.service) {
            Some(p) => p.unplaced(no_clock, &mut scratch.ids),
            None => scratch.ids.clear(),
        }
        for id in &scratch.ids {
            let Some(r) = requests.get_mut(id) else {
                continue;
            };
            resolve_prefill(r, steps.get(&o.service), config);
            if !r.prefill_placed && r.prefill_to_ns.is_some_and(|to| to < settled_ns) {
                r.prefill_placed = true;
                scratch.fresh.push(*id);
            }
        }
        for id in &scratch.fresh {
            if let Some(r) = requests.get(id) {
                pending.placed(o.service, *id, r.arrival.ts_ns);
            }
        }
        allocate_prefills(
            requests,
            &mut scratch.fresh,
            steps.get_mut(&o.service),
            prefixes.get(&o.service),
            config.step_clock,
        );
        scratch.fresh.clear();
        // In the engine during the segment: arrived before its end (in the engine from its
        // arrival at the earliest, `in_engine`).
        match pending.service(o.service) {
            Some(p) => p.arrived_before(seg.end_ns, &mut scratch.ids),
            None => scratch.ids.clear(),
        }
        for id in &scratch.ids {
            let Some(r) = requests.get(id) else {
                continue;
            };
            // Queued before its prefill step, only being written after its last step: not
            // in the engine, so no share of its steps.
            let (from, to) = in_engine(r, steps.get(&o.service), config);
            let a = from.max(seg.start_ns);
            let b = to.min(seg.end_ns);
            if b > a {
                scratch.cands.push(Cand {
                    id: *id,
                    svc,
                    engine: (from, to),
                    a,
                    b,
                    e_seg: 0.0,
                    e_model: 0.0,
                });
            }
        }
    }

    // Idle power: learned from segments with nothing in flight when possible.
    let seg_w = energy / len_s;
    if scratch.cands.is_empty()
        && let Some(e) = &mut d.idle_quiet
    {
        e.push(seg.end_ns, seg_w);
    }
    if !d.power.near(seg.start_ns, seg.end_ns)
        && let Some(e) = &mut d.idle
    {
        e.push(seg.end_ns, seg_w);
    }
    let (idle_w, idle_basis) = d.idle_estimate();
    let idle_guessed = idle_basis == IdleBasis::AllPower;
    let idle_total = (idle_w * len_s).min(energy).max(0.0);
    let dyn_total = energy - idle_total;
    d.totals.measured_j += energy;
    d.totals.covered_ns += len_ns;
    d.max_dyn_w = d.max_dyn_w.max(dyn_total / len_s);

    // Slices and the dynamic energy's shape over them.
    let n = len_ns.div_ceil(config.slice_ns).max(1) as usize;
    let bounds = |i: usize| {
        let i = i as u64;
        let n = n as u64;
        (
            seg.start_ns + len_ns * i / n,
            seg.start_ns + len_ns * (i + 1) / n,
        )
    };
    scratch.active.clear();
    for i in 0..n {
        let (a, b) = bounds(i);
        scratch
            .active
            .push(scratch.cands.iter().any(|c| c.a < b && a < c.b));
    }
    let any_active = scratch.active.iter().any(|&x| x);
    // With occupancy weights (an untracked process holds part of the device) the idle-looking
    // slices are someone else's work: keep the power curve's shape.
    let weighted = d
        .occupancy
        .iter()
        .any(|o| o.weight.is_some() && o.from_ns < seg.end_ns && seg.start_ns < o.to_ns);
    let mixed = !weighted && any_active && scratch.active.iter().any(|&x| !x);
    let curve = d.power.near(seg.start_ns, seg.end_ns);
    scratch.shape.clear();
    for i in 0..n {
        let (a, b) = bounds(i);
        let dt = (b - a) as f64 * 1e-9;
        let mut v = if curve {
            (d.power.at(a + (b - a) / 2).unwrap_or(idle_w) - idle_w).max(0.0) * dt
        } else {
            dt
        };
        if mixed {
            // All dynamic energy goes where requests were in flight (see module docs).
            v = if scratch.active[i] {
                v.max(1e-3 * dt)
            } else {
                0.0
            };
        }
        scratch.shape.push(v);
    }
    let total_shape: f64 = scratch.shape.iter().sum();
    if total_shape <= 0.0 {
        for i in 0..n {
            let (a, b) = bounds(i);
            scratch.shape[i] = (b - a) as f64;
        }
    }
    let total_shape: f64 = scratch.shape.iter().sum();
    let host = matches!(d.info.kind, DeviceKind::CpuPackage | DeviceKind::Dram);
    // Host domains keep the slice path whatever their windows: the segment path costs more
    // per request at high rates (with the CPU model's 100 ms windows on it, 24 -> 36 µs of
    // daemon CPU per request at 36k requests/s, after `features::time_shares` became a
    // sweep; finalising rescans the requests that wait), to be fixed before they can follow
    // the GPUs' rule.
    let max_window_ns = if host { u64::MAX } else { config.slice_ns };
    let fine = curve && d.power.coverage(seg.start_ns, seg.end_ns, max_window_ns) >= FINE_COVERAGE;

    let mut attributed_dyn = 0.0;
    let mut attributed_idle = 0.0;
    for i in 0..n {
        let (a, b) = bounds(i);
        let dyn_i = dyn_total * scratch.shape[i] / total_shape;
        let idle_i = idle_total * (b - a) as f64 / len_ns as f64;
        if !scratch.active[i] {
            continue;
        }
        // Service shares at the slice's middle.
        let mid = a + (b - a) / 2;
        let occupants = d
            .occupancy
            .iter()
            .filter(|o| o.from_ns <= mid && mid < o.to_ns);
        let mut weighted = true;
        let mut sum_w = 0.0;
        let mut n_active = 0usize;
        let mut any = false;
        for o in occupants.clone() {
            any = true;
            let active = slice_active(scratch, o.service, a, b);
            match o.weight {
                // A host domain's weights are CPU-time rates while serving: a service with
                // nothing in flight here is not using its share now (`binding/cputime.rs`).
                Some(_) if host && !active && o.service != ServiceId::OTHER_PROCESSES => {}
                Some(w) => sum_w += w,
                None => weighted = false,
            }
            if active {
                n_active += 1;
            }
        }
        weighted &= any && sum_w > 0.0;
        if n_active == 0 {
            continue;
        }
        for o in occupants {
            let share = if weighted {
                o.weight.unwrap_or(0.0) / sum_w
            } else {
                1.0 / n_active as f64
            };
            if share <= 0.0 || !slice_active(scratch, o.service, a, b) {
                continue;
            }
            let Some(svc) = scratch.services.iter().position(|s| s.service == o.service) else {
                continue;
            };
            let unit = Unit {
                dyn_j: share * dyn_i,
                idle_j: share * idle_i,
                time_s: share * (b - a) as f64 * 1e-9,
            };
            if fine {
                let (dj, ij) = split_unit(
                    dev_id,
                    config,
                    stats,
                    scratch,
                    (&mut d.models, &mut *held),
                    requests,
                    &*steps,
                    svc,
                    (a, b),
                    unit,
                    (idle_w, idle_guessed),
                );
                attributed_dyn += dj;
                attributed_idle += ij;
            } else {
                let u = &mut scratch.services[svc].unit;
                u.dyn_j += unit.dyn_j;
                u.idle_j += unit.idle_j;
                u.time_s += unit.time_s;
            }
        }
    }
    if !fine {
        for svc in 0..scratch.services.len() {
            let unit = scratch.services[svc].unit;
            if unit.time_s <= 0.0 {
                continue;
            }
            let (dj, ij) = split_unit(
                dev_id,
                config,
                stats,
                scratch,
                (&mut d.models, &mut *held),
                requests,
                &*steps,
                svc,
                (seg.start_ns, seg.end_ns),
                unit,
                (idle_w, idle_guessed),
            );
            attributed_dyn += dj;
            attributed_idle += ij;
        }
    }

    // The services' decode steps that ended in the segment: what a sequence's context adds.
    for svc in 0..scratch.services.len() {
        let service = scratch.services[svc].service;
        let Some(clock) = steps.get_mut(&service) else {
            continue;
        };
        scratch.members.clear();
        scratch.members.extend(
            scratch
                .cands
                .iter()
                .filter(|c| c.svc == svc)
                .map(|c| (c.id, c.engine)),
        );
        scratch.decode_steps.clear();
        decode_steps(
            clock,
            config.step_clock,
            (seg.start_ns, seg.end_ns),
            (&scratch.members, requests),
            &mut scratch.step_pauses,
            &mut scratch.decode_steps,
        );
        for &(to, seqs, ctx, len) in &scratch.decode_steps {
            clock.context.learn(to, seqs, ctx, len);
        }
    }

    // Per-segment error terms, once each request's energy in the segment is known.
    let edge_factor = config.uncertainty.edge_factor;
    let tau = (seg.tau_start_ns + seg.tau_end_ns) as f64;
    for c in &scratch.cands {
        if c.e_seg <= 0.0 {
            continue;
        }
        let Some(r) = requests.get_mut(&c.id) else {
            continue;
        };
        let near = |t: u64| {
            t.saturating_add(seg.tau_start_ns) >= seg.start_ns
                && t <= seg.end_ns.saturating_add(seg.tau_end_ns)
        };
        let edge = near(r.arrival.ts_ns) || r.end_ns.is_some_and(near);
        let acc = r.accounts.entry(dev_id).or_default();
        if edge {
            acc.edge_j += c.e_seg * (edge_factor + tau / len_ns as f64);
        }
        // The model's misfit, independent from one segment to the next.
        acc.split_model_j += (scratch.services[c.svc].rel_resid * c.e_model).abs();
        if seg.interpolated_unc_j > 0.0 && energy > 0.0 {
            acc.sensor_var += (c.e_seg / energy * seg.interpolated_unc_j).powi(2);
        }
    }

    let t = &mut d.totals;
    t.request_dynamic_j += attributed_dyn;
    t.request_idle_j += attributed_idle;
    t.unattributed_j += dyn_total - attributed_dyn;
    t.idle_j += idle_total - attributed_idle;
}

fn slice_active(scratch: &Scratch, service: ServiceId, a: u64, b: u64) -> bool {
    scratch
        .cands
        .iter()
        .any(|c| scratch.services[c.svc].service == service && c.a < b && a < c.b)
}

/// Splits one service's energy in `[u0, u1)` among its requests; returns what was attributed.
#[expect(
    clippy::too_many_arguments,
    reason = "one split unit's inputs, each a different piece of ledger state"
)]
fn split_unit(
    dev_id: DeviceId,
    config: &LedgerConfig,
    stats: &mut LedgerStats,
    scratch: &mut Scratch,
    (models, held): (&mut BTreeMap<ServiceId, CostModel>, &mut Vec<HeldUnit>),
    requests: &mut IdMap<Box<Request>>,
    steps: &BTreeMap<ServiceId, StepClock>,
    svc: usize,
    (u0, u1): (u64, u64),
    unit: Unit,
    (idle_w, idle_guessed): (f64, bool),
) -> (f64, f64) {
    let service = scratch.services[svc].service;
    let e_dyn = unit.dyn_j;
    let e_idle = if config.idle == IdlePolicy::Amortize {
        unit.idle_j
    } else {
        0.0
    };
    let cap = config.decode_gap_cap_ns;
    let clock = steps.get(&service);
    let rate = clock.and_then(StepClock::prefill_ns_per_token);
    scratch.feats.clear();
    scratch.chunks.clear();
    scratch.pauses.clear();
    for (ci, c) in scratch.cands.iter().enumerate() {
        if c.svc != svc {
            continue;
        }
        let (a, b) = (c.a.max(u0), c.b.min(u1));
        if b <= a {
            continue;
        }
        let Some(r) = requests.get(&c.id) else {
            continue;
        };
        let engine = c.engine;
        let (prefill, pk) = prefill_in(r, u0, u1, engine, rate);
        let steps_of = clock.map(|c| (c, config.step_clock));
        let decode = decode_in(r, (u0, u1), cap, steps_of, engine);
        let chunks = unit_chunks(r, u0, u1, &mut scratch.chunks);
        let pauses = pauses(r, clock, config.step_clock, (u0, u1), &mut scratch.pauses);
        let bytes_rate = match (r.end_ns, r.response_bytes) {
            (Some(e), bytes) if bytes > 0 => {
                Some(bytes as f64 / ((e - r.arrival.ts_ns).max(1) as f64 * 1e-9))
            }
            _ => None,
        };
        scratch.feats.push(Feat {
            cand: ci,
            a,
            b,
            time_s: 0.0,
            plain_s: 0.0,
            prefill,
            decode: decode.tokens,
            decode_ctx: decode.ctx,
            step_ctx: decode.step_ctx,
            chunks,
            pauses,
            tokens_known: pk && decode.known,
            bytes_rate,
        });
    }
    if scratch.feats.is_empty() {
        return (0.0, 0.0);
    }
    let busy_s = time_shares(
        &mut scratch.feats,
        (&scratch.chunks, &scratch.pauses),
        &mut scratch.points,
        u0,
        u1,
    );
    if let Some(ns) = clock.and_then(|c| c.context.ns_per_token()) {
        own_context_time(&mut scratch.feats, ns, busy_s);
    }

    let model = models.entry(service).or_insert_with(|| {
        CostModel::new(
            config.model.prior_prefill_weight,
            config.model.prior_strength,
            config.model.window_ns,
        )
    });
    let beta = model.beta();
    let warm = model.units() >= config.model.warmup_units;
    scratch.services[svc].rel_resid = model.relative_residual();
    let prices = prices_of(beta, idle_w, idle_guessed);
    let busy_w = prices.busy_w;
    let WeightsOutcome {
        sum,
        used_model,
        fallback,
    } = weights::weights(config.split, &scratch.feats, &prices, &mut scratch.weights);
    if sum.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return (0.0, 0.0);
    }
    let (w, w_alt) = (&scratch.weights.w, &scratch.weights.alt);
    let sum_alt: f64 = w_alt.iter().sum();
    let has_alt = !w_alt.is_empty() && sum_alt > 0.0 && sum_alt.is_finite();
    // With idle guessed from loaded power, the busy price is uncertain: the other extreme is
    // idle 0 W (all static power is busy power).
    let busy_hi = (beta[0] + beta[1]).max(0.0);
    let idle_alt = used_model && idle_guessed && busy_hi > busy_w;
    let prices_hi = Prices {
        busy_w: busy_hi,
        ..prices
    };
    let sum_idle_alt: f64 = if idle_alt {
        scratch.feats.iter().map(|f| prices_hi.cost(f)).sum()
    } else {
        0.0
    };
    stats.split_fallbacks += u64::from(fallback);

    let mut got_dyn = 0.0;
    let mut got_idle = 0.0;
    let batch = scratch.feats.len() as f64;
    for (k, f) in scratch.feats.iter().enumerate() {
        let share = w[k] / sum;
        let e_d = share * e_dyn;
        let e_i = share * e_idle;
        let e = e_d + e_i;
        got_dyn += e_d;
        got_idle += e_i;
        let c = &mut scratch.cands[f.cand];
        c.e_seg += e;
        if used_model {
            c.e_model += e;
        }
        let Some(r) = requests.get_mut(&c.id) else {
            continue;
        };
        let acc = r.accounts.entry(dev_id).or_default();
        acc.dynamic_j += e_d;
        acc.idle_j += e_i;
        if has_alt {
            acc.split_diff_j += w_alt[k] / sum_alt * (e_dyn + e_idle) - e;
        }
        if fallback {
            acc.split_unknown_j += 0.5 * e * (1.0 - share);
        }
        if idle_guessed && config.idle == IdlePolicy::Report {
            // Idle is only bounded (never seen quiet): this much of the unit's idle energy may
            // be dynamic energy of its requests.
            acc.idle_unknown_j += share * unit.idle_j;
        }
        if idle_alt && sum_idle_alt > 0.0 {
            acc.idle_diff_j += prices_hi.cost(f) / sum_idle_alt * (e_dyn + e_idle) - e;
        }
        acc.share_ns += share * (f.b - f.a) as f64;
        acc.present_ns += f.b - f.a;
        acc.batch_ns += batch * (f.b - f.a) as f64;
    }

    if used_model && !warm {
        let ids: Vec<RequestId> = scratch
            .feats
            .iter()
            .map(|f| scratch.cands[f.cand].id)
            .collect();
        for id in &ids {
            if let Some(r) = requests.get_mut(id) {
                r.held_units += 1;
            }
        }
        held.push(HeldUnit {
            service,
            end_ns: u1,
            e_dyn,
            e_idle,
            ids,
            feats: scratch.feats.clone(),
            shares: w.iter().map(|x| x / sum).collect(),
        });
    }

    // Learn from this unit after splitting it (the split uses past evidence only).
    if scratch.feats.iter().all(|f| f.tokens_known) && busy_s > 0.0 {
        let x: Features = [
            unit.time_s,
            busy_s,
            scratch.feats.iter().map(|f| f.prefill).sum(),
            scratch.feats.iter().map(|f| f.decode).sum(),
            scratch.feats.iter().map(|f| f.decode_ctx).sum(),
        ];
        model.learn(u1, x, unit.dyn_j + unit.idle_j, idle_w);
    }
    (got_dyn, got_idle)
}

/// The `tokens` split's prices from the cost model's coefficients. Power above idle that goes
/// with time: static + busy − idle. Under sustained load the fit cannot tell static from busy
/// (they move together), but their sum is well defined. An idle guessed from loaded power is
/// an upper bound (true idle lies in [0, guess]): busy time is priced from the middle of that
/// range.
pub(super) fn prices_of(beta: [f64; 5], idle_w: f64, idle_guessed: bool) -> Prices {
    let idle_for_busy = if idle_guessed { idle_w / 2.0 } else { idle_w };
    Prices {
        busy_w: (beta[0] + beta[1] - idle_for_busy).max(0.0),
        prefill_j_per_token: beta[2],
        decode_j_per_token: beta[3],
        decode_context_j_per_token: beta[4],
    }
}
