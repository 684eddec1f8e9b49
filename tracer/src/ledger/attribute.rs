//! Attribution of one measured segment: idle, shape, services, requests, error terms.

use std::collections::{BTreeMap, HashMap};

use super::{
    Device, DeviceId, IdleBasis, IdlePolicy, LedgerConfig, LedgerStats, Request, RequestId,
    ServiceId, SplitPolicy,
    model::{CostModel, Features},
    sensor::Segment,
    steps::StepClock,
};

/// Power coverage of a segment above which requests are split per slice, not per segment.
const FINE_COVERAGE: f64 = 0.8;

/// Borrowed ledger state an attribution needs.
pub(crate) struct Ctx<'a> {
    pub dev_id: DeviceId,
    pub config: &'a LedgerConfig,
    pub pending: &'a BTreeMap<ServiceId, Vec<RequestId>>,
    pub steps: &'a BTreeMap<ServiceId, StepClock>,
    pub stats: &'a mut LedgerStats,
    pub scratch: &'a mut Scratch,
}

/// Buffers reused from segment to segment (no allocation per segment in steady state).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    cands: Vec<Cand>,
    services: Vec<Svc>,
    shape: Vec<f64>,
    active: Vec<bool>,
    feats: Vec<Feat>,
    points: Vec<u64>,
    w: Vec<f64>,
    w_alt: Vec<f64>,
}

/// A request in flight during the segment.
#[derive(Debug, Clone, Copy)]
struct Cand {
    id: RequestId,
    svc: usize,
    /// Presence clipped to the segment.
    a: u64,
    b: u64,
    /// Energy given to it in this segment (dynamic + amortised idle), and the part split by
    /// the cost model.
    e_seg: f64,
    e_model: f64,
}

/// A service occupying the device during the segment.
#[derive(Debug, Clone, Copy)]
struct Svc {
    service: ServiceId,
    unit: Unit,
    /// Its cost model's relative residual when it was split.
    rel_resid: f64,
}

/// A service's energy in a split unit.
#[derive(Debug, Clone, Copy, Default)]
struct Unit {
    dyn_j: f64,
    /// Its idle energy (shared among its requests only under `amortize`).
    idle_j: f64,
    /// Its share of the device's time: Σ share × slice length over its active slices.
    time_s: f64,
}

/// A request's features in one split unit.
#[derive(Debug, Clone, Copy)]
struct Feat {
    cand: usize,
    a: u64,
    b: u64,
    /// ∫ 1/n(t) dt over its presence: its time-sliced share of the unit, seconds.
    time_s: f64,
    prefill: f64,
    decode: f64,
    /// Σ decode token × its context length.
    decode_ctx: f64,
    /// Its prefill step and the share of that step's extension it caused (ns), for the
    /// step-aware time split.
    pf: (u64, u64),
    pf_ext: f64,
    uncached: f64,
    tokens_known: bool,
    bytes_rate: Option<f64>,
}

/// Attributes one segment of device `d`.
#[allow(clippy::needless_pass_by_value, clippy::many_single_char_names)]
pub(crate) fn segment(
    ctx: Ctx<'_>,
    d: &mut Device,
    seg: &Segment,
    requests: &mut HashMap<RequestId, Request>,
) {
    let Ctx {
        dev_id,
        config,
        pending,
        steps,
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
        for id in pending.get(&o.service).into_iter().flatten() {
            let Some(r) = requests.get_mut(id) else {
                continue;
            };
            if r.prefill_from_ns.is_none()
                && let Some(fe) = r.first_event_ns
            {
                let step = steps
                    .get(&o.service)
                    .map(|s| s.prefill_step(fe, config.step_merge_ns));
                let from = step
                    .and_then(|s| s.from_ns)
                    .unwrap_or(0)
                    .clamp(r.arrival.ts_ns, fe);
                r.prefill_from_ns = Some(from);
                r.prefill_ext_ns = step.map_or(0, |s| s.extension_ns).min(fe - from);
            }
            let a = r.arrival.ts_ns.max(seg.start_ns);
            let b = r.end_or(u64::MAX).min(seg.end_ns);
            if b > a {
                scratch.cands.push(Cand {
                    id: *id,
                    svc,
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
    let fine = curve && d.power.coverage(seg.start_ns, seg.end_ns) >= FINE_COVERAGE;

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
            match o.weight {
                Some(w) => sum_w += w,
                None => weighted = false,
            }
            if slice_active(scratch, o.service, a, b) {
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
                    &mut d.models,
                    requests,
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
                &mut d.models,
                requests,
                svc,
                (seg.start_ns, seg.end_ns),
                unit,
                (idle_w, idle_guessed),
            );
            attributed_dyn += dj;
            attributed_idle += ij;
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
        acc.split_var += (scratch.services[c.svc].rel_resid * c.e_model).powi(2);
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
#[allow(clippy::too_many_arguments)]
fn split_unit(
    dev_id: DeviceId,
    config: &LedgerConfig,
    stats: &mut LedgerStats,
    scratch: &mut Scratch,
    models: &mut BTreeMap<ServiceId, CostModel>,
    requests: &mut HashMap<RequestId, Request>,
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
    scratch.feats.clear();
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
        let (prefill, pk) = prefill_in(r, u0, u1);
        let (decode, decode_ctx, dk) = decode_in(r, u0, u1, cap);
        let pf = match (r.prefill_from_ns, r.first_event_ns) {
            (Some(f), Some(fe)) if r.prefill_ext_ns > 0 => (f, fe),
            _ => (0, 0),
        };
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
            prefill,
            decode,
            decode_ctx,
            pf,
            pf_ext: r.prefill_ext_ns as f64,
            uncached: r
                .arrival
                .prompt_tokens
                .unwrap_or(0)
                .saturating_sub(r.arrival.cached_tokens.unwrap_or(0)) as f64,
            tokens_known: pk && dk,
            bytes_rate,
        });
    }
    if scratch.feats.is_empty() {
        return (0.0, 0.0);
    }
    share_extensions(&mut scratch.feats, config.step_merge_ns, u0, u1);
    let busy_s = time_shares(&mut scratch.feats, &mut scratch.points, u0, u1);

    let model = models.entry(service).or_insert_with(|| {
        CostModel::new(
            config.model.prior_prefill_weight,
            config.model.prior_strength,
            config.model.window_ns,
        )
    });
    let beta = model.beta();
    scratch.services[svc].rel_resid = model.relative_residual();
    let tokens_ok = scratch.feats.iter().all(|f| f.tokens_known);
    let bytes_ok = scratch.feats.iter().all(|f| f.bytes_rate.is_some());
    // Power above idle that goes with time: static + busy − idle. Under sustained load the
    // fit cannot tell static from busy (they move together), but their sum is well defined.
    // An idle guessed from loaded power is an upper bound (true idle lies in [0, guess]):
    // price busy time from the middle of that range.
    let idle_for_busy = if idle_guessed { idle_w / 2.0 } else { idle_w };
    let busy_w = (beta[0] + beta[1] - idle_for_busy).max(0.0);
    let priced = |busy_w: f64, f: &Feat| {
        busy_w * f.time_s + beta[2] * f.prefill + beta[3] * f.decode + beta[4] * f.decode_ctx
    };
    let tokens_w = |f: &Feat| priced(busy_w, f);
    let (w, w_alt) = (&mut scratch.w, &mut scratch.w_alt);
    w.clear();
    w_alt.clear();
    let mut used_model = false;
    let mut fallback = false;
    match config.split {
        SplitPolicy::Equal => {
            w.extend(scratch.feats.iter().map(|f| f.time_s));
            if tokens_ok {
                w_alt.extend(scratch.feats.iter().map(tokens_w));
            }
        }
        SplitPolicy::Auto | SplitPolicy::Tokens => {
            if tokens_ok {
                w.extend(scratch.feats.iter().map(tokens_w));
                w_alt.extend(scratch.feats.iter().map(|f| f.time_s));
                used_model = true;
            } else {
                w.extend(scratch.feats.iter().map(|f| f.time_s));
                fallback = true;
            }
        }
        SplitPolicy::Bytes => {
            if bytes_ok {
                w.extend(
                    scratch
                        .feats
                        .iter()
                        .map(|f| f.bytes_rate.unwrap_or(0.0) * (f.b - f.a) as f64 * 1e-9),
                );
                w_alt.extend(scratch.feats.iter().map(|f| f.time_s));
            } else {
                w.extend(scratch.feats.iter().map(|f| f.time_s));
                fallback = true;
            }
        }
    }
    let mut sum: f64 = w.iter().sum();
    if !(sum > 0.0 && sum.is_finite()) {
        w.clear();
        w.extend(scratch.feats.iter().map(|f| f.time_s));
        w_alt.clear();
        used_model = false;
        sum = w.iter().sum();
    }
    if sum.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return (0.0, 0.0);
    }
    let sum_alt: f64 = w_alt.iter().sum();
    let has_alt = !w_alt.is_empty() && sum_alt > 0.0 && sum_alt.is_finite();
    // With idle guessed from loaded power, the busy price is uncertain: the other extreme is
    // idle 0 W (all static power is busy power).
    let busy_hi = (beta[0] + beta[1]).max(0.0);
    let idle_alt = used_model && idle_guessed && busy_hi > busy_w;
    let sum_idle_alt: f64 = if idle_alt {
        scratch.feats.iter().map(|f| priced(busy_hi, f)).sum()
    } else {
        0.0
    };
    fallback &= scratch.feats.len() > 1;
    stats.split_fallbacks += u64::from(fallback);

    let mut got_dyn = 0.0;
    let mut got_idle = 0.0;
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
        if idle_alt && sum_idle_alt > 0.0 {
            acc.idle_diff_j += priced(busy_hi, f) / sum_idle_alt * (e_dyn + e_idle) - e;
        }
        acc.share_ns += share * (f.b - f.a) as f64;
        acc.present_ns += f.b - f.a;
    }

    // Learn from this unit after splitting it (the split uses past evidence only).
    if tokens_ok && busy_s > 0.0 {
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

/// Prefillers of one step share its extension in proportion to their uncached tokens; drops
/// extensions whose step does not touch the unit. `pf_ext` becomes the fraction of the step's
/// time each one caused.
fn share_extensions(feats: &mut [Feat], merge_ns: u64, u0: u64, u1: u64) {
    for i in 0..feats.len() {
        let (s, e) = feats[i].pf;
        if feats[i].pf_ext <= 0.0 || e <= s || e <= u0 || s >= u1 {
            feats[i].pf_ext = 0.0;
            continue;
        }
        let group: f64 = feats
            .iter()
            .filter(|g| g.pf.0 == s && g.pf.1.abs_diff(e) <= merge_ns)
            .map(|g| g.uncached.max(1.0))
            .sum();
        let own = feats[i].uncached.max(1.0);
        feats[i].pf_ext = feats[i].pf_ext / (e - s) as f64 * own / group.max(own);
    }
}

/// Time-sliced shares of the unit's busy time. At each instant the requests in flight share
/// equally, except that during a step that carried prefills the part of the step its prefills
/// caused (its extension over neighbouring steps) goes to them. Returns busy seconds.
fn time_shares(feats: &mut [Feat], points: &mut Vec<u64>, u0: u64, u1: u64) -> f64 {
    let m = feats.len();
    let any_ext = feats.iter().any(|f| f.pf_ext > 0.0);
    if !any_ext && feats.iter().all(|f| f.a == u0 && f.b == u1) {
        let each = (u1 - u0) as f64 * 1e-9 / m as f64;
        for f in feats.iter_mut() {
            f.time_s = each;
        }
        return (u1 - u0) as f64 * 1e-9;
    }
    points.clear();
    points.extend(feats.iter().flat_map(|f| [f.a, f.b]));
    for f in feats.iter().filter(|f| f.pf_ext > 0.0) {
        points.extend([f.pf.0.clamp(u0, u1), f.pf.1.clamp(u0, u1)]);
    }
    points.sort_unstable();
    points.dedup();
    let mut busy = 0u64;
    for win in points.windows(2) {
        let (p, q) = (win[0], win[1]);
        let present = |f: &Feat| f.a <= p && f.b >= q;
        let count = feats.iter().filter(|f| present(f)).count();
        if count == 0 {
            continue;
        }
        busy += q - p;
        let dt = (q - p) as f64 * 1e-9;
        let in_step = |f: &Feat| f.pf_ext > 0.0 && f.pf.0 <= p && f.pf.1 >= q && present(f);
        let ext: f64 = feats.iter().filter(|f| in_step(f)).map(|f| f.pf_ext).sum();
        let scale = if ext > 1.0 { 1.0 / ext } else { 1.0 };
        let shared = dt * (1.0 - ext.min(1.0)) / count as f64;
        for f in feats.iter_mut() {
            if in_step(f) {
                f.time_s += dt * f.pf_ext * scale;
            }
            if present(f) {
                f.time_s += shared;
            }
        }
    }
    busy as f64 * 1e-9
}

fn overlap(a: u64, b: u64, u0: u64, u1: u64) -> u64 {
    b.min(u1).saturating_sub(a.max(u0))
}

/// Uncached prompt tokens processed in `[u0, u1)`, spread over the wait for the first streamed
/// event (the whole request when nothing streams). `false` when needed but unknown.
fn prefill_in(r: &Request, u0: u64, u1: u64) -> (f64, bool) {
    let mut start = r.arrival.ts_ns;
    let end = match (r.first_event_ns, r.end_ns) {
        (Some(fe), _) => {
            start = r.prefill_from_ns.unwrap_or(start).clamp(start, fe);
            fe.max(start)
        }
        (None, Some(e)) => e,
        // Open with nothing streamed yet: the prefill's extent is unknown.
        (None, None) => {
            return (0.0, u1 <= start);
        }
    };
    let ov = if end > start {
        overlap(start, end, u0, u1)
    } else {
        u64::from((u0..u1).contains(&start))
    };
    if ov == 0 {
        return (0.0, true);
    }
    let Some(prompt) = r.arrival.prompt_tokens else {
        return (0.0, false);
    };
    let uncached = prompt.saturating_sub(r.arrival.cached_tokens.unwrap_or(0)) as f64;
    let frac = if end > start {
        ov as f64 / (end - start) as f64
    } else {
        1.0
    };
    (uncached * frac, true)
}

/// Decode tokens produced in `[u0, u1)`, and Σ token × context length: each streamed event
/// after the first (which closes the prefill) spread over the time since the previous one,
/// scaled to the reported completion tokens; without events, the completion tokens spread over
/// the whole request. `false` when needed but unknown.
fn decode_in(r: &Request, u0: u64, u1: u64, cap: u64) -> (f64, f64, bool) {
    let prompt = r.arrival.prompt_tokens.unwrap_or(0) as f64;
    if r.first_event_ns.is_some() {
        let per_event = match r.completion_tokens {
            Some(t) if r.events > 0 => t as f64 / r.events as f64,
            _ => 1.0,
        };
        let times = &r.times;
        let first = times.partition_point(|e| e.0 <= u0);
        let mut before =
            r.pruned_events + times.range(..first).map(|e| u64::from(e.1)).sum::<u64>();
        let (mut sum, mut ctx) = (0.0, 0.0);
        for k in first..times.len() {
            let (t, count) = times[k];
            let prev = match k.checked_sub(1) {
                Some(j) => Some(times[j].0),
                // Before the first event of all there is the prefill, not decode work.
                None => r.pruned_last_ns,
            };
            let count_before = before;
            before += u64::from(count);
            let Some(prev) = prev else {
                continue;
            };
            let start = prev.max(t.saturating_sub(cap));
            if start >= u1 {
                break;
            }
            let frac = if t > start {
                overlap(start, t, u0, u1) as f64 / (t - start) as f64
            } else {
                f64::from(u8::from((u0..u1).contains(&t)))
            };
            let tokens = f64::from(count) * per_event * frac;
            sum += tokens;
            ctx += tokens * (prompt + count_before as f64 * per_event);
        }
        return (sum, ctx, true);
    }
    match (r.end_ns, r.completion_tokens) {
        (Some(e), Some(tokens)) => {
            let s = r.arrival.ts_ns;
            let frac = if e > s {
                overlap(s, e, u0, u1) as f64 / (e - s) as f64
            } else {
                0.0
            };
            let t = tokens as f64 * frac;
            (t, t * (prompt + tokens as f64 / 2.0), true)
        }
        (Some(_), None) => (0.0, 0.0, false),
        // Open, nothing streamed: may still be in prefill, or generating a whole body.
        (None, _) => (0.0, 0.0, u1 <= r.arrival.ts_ns),
    }
}
