//! The steps of [`Ledger::advance`]: expire requests open too long, turn sensor readings
//! into segments, attribute the segments, emit the requests that became final, and prune.

use std::collections::BTreeMap;

use crate::ids::{DeviceId, RequestId, ServiceId};

use super::{
    Ledger, attribute,
    sensor::{CounterEvent, PowerPoint},
    state::Request,
    types::{DeviceShare, IdleBasis, Outcome, RequestRecord},
    warmup,
    weights::Weights,
};

/// Joules per kWh.
const J_PER_KWH: f64 = 3.6e6;
/// Event times a request keeps before those attribution is past are pruned.
pub(super) const LONG_TIMES: usize = 64;

impl Ledger {
    /// Ends requests open longer than `max_open_ns`.
    pub(super) fn expire(&mut self, watermark: u64) {
        // Open longer than the limit: arrived before `watermark - limit`.
        let Some(cutoff) = watermark.checked_sub(self.config.max_open_ns) else {
            return;
        };
        let expired: Vec<(ServiceId, RequestId)> = self
            .pending
            .services()
            .flat_map(|(svc, p)| {
                p.open
                    .range(..(cutoff, RequestId(0)))
                    .map(move |(_, id)| (svc, *id))
            })
            .collect();
        for (service, id) in expired {
            if let Some(r) = self.requests.get_mut(&id)
                && r.end_ns.is_none()
            {
                r.end_ns = Some(r.last_seen_ns);
                r.outcome = Outcome::Aborted;
                self.stats.expired_requests += 1;
                self.pending
                    .end(service, id, r.arrival.ts_ns, r.last_seen_ns);
            }
        }
    }

    /// Turns sensor readings up to the watermark into segments.
    pub(super) fn ingest(&mut self, id: DeviceId, watermark: u64) {
        let max_w = self.config.max_device_watts;
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        let stats = &mut self.stats;
        let first_new = d.segments.len();
        d.counter.process(
            watermark,
            d.counter_period_ns,
            max_w,
            &mut d.segments,
            &mut d.gaps,
            |e| match e {
                CounterEvent::Wrap => stats.counter_wraps += 1,
                CounterEvent::Reset => stats.counter_resets += 1,
                CounterEvent::Implausible => stats.implausible_readings += 1,
                CounterEvent::Unchanged | CounterEvent::First | CounterEvent::Update => {}
            },
        );
        let integrate_before = d.counter.integrate_before();
        let idle = &mut d.idle;
        d.power.process(
            watermark,
            integrate_before,
            &mut d.segments,
            |p: &PowerPoint| {
                if let Some(e) = idle {
                    e.push(p.mid_ns(), p.watts);
                }
            },
        );
        // New segments must not overlap what is already covered (a counter that appears after
        // power-only integration began, or out-of-order power windows): trim them.
        let mut covered = d.covered_until_ns;
        let mut i = first_new;
        while i < d.segments.len() {
            let s = &mut d.segments[i];
            if s.end_ns <= covered {
                d.segments.remove(i);
                continue;
            }
            if s.start_ns < covered {
                let keep = (s.end_ns - covered) as f64 / (s.end_ns - s.start_ns) as f64;
                s.energy_j *= keep;
                s.interpolated_unc_j *= keep;
                s.start_ns = covered;
            }
            covered = s.end_ns;
            i += 1;
        }
        d.covered_until_ns = covered;
        d.totals.gap_ns = d.gaps.iter().map(|g| g.1 - g.0).sum();
    }

    /// Attributes the segments no open request still overlaps (or that waited long enough).
    pub(super) fn attribute_device(&mut self, id: DeviceId, watermark: u64) {
        let Some(d) = self.devices.get_mut(&id) else {
            return;
        };
        // The earliest arrival among open requests of services on this device blocks
        // attribution from there on: their phases and token counts are not known yet.
        let mut blocked_from = u64::MAX;
        for o in &d.occupancy {
            if let Some(&(arrival, _)) =
                self.pending.service(o.service).and_then(|p| p.open.first())
            {
                blocked_from = blocked_from.min(arrival);
            }
        }
        while let Some(s) = d.segments.front().copied() {
            if s.end_ns > watermark {
                break;
            }
            // Prefills are placed once every request that could share their steps is known
            // (`prefills.rs`): the segment also waits for the steps that finished the prefills
            // of the requests that came in before its end to be settled.
            let mut settle_to = s.end_ns;
            for o in &d.occupancy {
                let unplaced = self
                    .pending
                    .service(o.service)
                    .map(|p| p.unplaced.range(..(s.end_ns, RequestId(0))));
                for (_, rid) in unplaced.into_iter().flatten() {
                    if let Some(r) = self.requests.get(rid)
                        && r.arrival.ts_ns < s.end_ns
                        && !r.prefill_placed
                    {
                        let to = r.prefill_to_ns.or(r.end_ns).unwrap_or(u64::MAX);
                        settle_to = settle_to.max(to);
                    }
                }
            }
            let forced = settle_to >= blocked_from;
            if forced && s.end_ns.saturating_add(self.config.max_defer_ns) > watermark {
                break;
            }
            d.segments.pop_front();
            self.stats.forced_attributions += u64::from(forced);
            attribute::segment(
                attribute::Ctx {
                    dev_id: id,
                    config: &self.config,
                    pending: &mut self.pending,
                    settled_ns: if forced { u64::MAX } else { blocked_from },
                    steps: &mut self.steps,
                    prefixes: &self.prefixes,
                    held: self.held.entry(id).or_default(),
                    stats: &mut self.stats,
                    scratch: &mut self.scratch,
                },
                d,
                &s,
                &mut self.requests,
            );
            d.attributed_ns = d.attributed_ns.max(s.end_ns);
        }
        // Units split before their service's model had learned: again, once it has (or once
        // they waited `max_defer_ns`).
        let Some(held) = self.held.get_mut(&id).filter(|h| !h.is_empty()) else {
            return;
        };
        let (idle_w, basis) = d.idle_estimate();
        let guessed = basis == IdleBasis::AllPower;
        let mut scratch = Weights::default();
        let (config, requests) = (&self.config, &mut self.requests);
        held.retain(|u| {
            let model = d.models.get(&u.service);
            let warm = model.is_some_and(|m| m.units() >= config.model.warmup_units);
            let late = u.end_ns.saturating_add(config.max_defer_ns) <= watermark;
            if !(warm || late) {
                return true;
            }
            let prices = model.map(|m| attribute::prices_of(m.beta(), idle_w, guessed));
            warmup::resplit(id, config, u, prices.as_ref(), requests, &mut scratch);
            false
        });
    }

    pub(super) fn finalise(&mut self, watermark: u64) -> Vec<RequestRecord> {
        let mut done: Vec<(u64, RequestId)> = Vec::new();
        for (end, rid) in self.pending.ended_until(watermark) {
            let Some(r) = self.requests.get(&rid) else {
                continue;
            };
            if r.held_units > 0 {
                continue;
            }
            let ready = self.devices.iter().all(|(dev_id, d)| {
                let used = d.uses(r.service) || r.accounts.contains_key(dev_id);
                !used
                    || d.attributed_ns >= end
                    || (d.covered_until_ns < end
                        && watermark.saturating_sub(end) >= self.config.stale_ns)
            });
            if ready {
                done.push((end, rid));
            }
        }
        let mut out = Vec::with_capacity(done.len());
        for (_, rid) in done {
            if let Some(r) = self.requests.remove(&rid) {
                self.pending.remove(r.service, rid, r.keys());
                self.stats.requests_open = self.stats.requests_open.saturating_sub(1);
                self.stats.records_emitted += 1;
                out.push(self.record(rid, *r));
            }
        }
        // A burst (10k requests at once) leaves the map's table at its peak; give it back
        // once it is three quarters empty.
        if self.requests.capacity() > 1024 && self.requests.len() * 4 < self.requests.capacity() {
            self.requests.shrink_to(self.requests.len() * 2);
        }
        out
    }

    pub(super) fn record(&mut self, id: RequestId, r: Request) -> RequestRecord {
        let end = r.end_or(r.last_seen_ns);
        let span = end.saturating_sub(r.arrival.ts_ns);
        let mut devices = Vec::new();
        let mut gap_total = 0;
        let mut stale = false;
        let u = &self.config.uncertainty;
        for (&dev_id, d) in &self.devices {
            let acc = r.accounts.get(&dev_id).copied();
            if acc.is_none() && !d.uses(r.service) {
                continue;
            }
            let acc = acc.unwrap_or_default();
            let gap_ns = (gaps_overlap(&d.gaps, r.arrival.ts_ns, end)
                + end
                    .saturating_sub(d.covered_until_ns.max(r.arrival.ts_ns))
                    .min(span))
            .min(span);
            if d.covered_until_ns < end {
                stale = true;
            }
            gap_total += gap_ns;
            let mean_share = if acc.present_ns > 0 {
                acc.share_ns / acc.present_ns as f64
            } else {
                1.0
            };
            let coverage_j = d.max_dyn_w * gap_ns as f64 * 1e-9 * mean_share;
            let sensor_j = acc.edge_j.hypot(acc.sensor_var.sqrt());
            let split_model = acc.split_model_j * u.residual_factor;
            let split_sys = u.split_factor * acc.split_diff_j.abs()
                + acc.split_unknown_j
                + u.idle_factor * acc.idle_diff_j.abs();
            let uncertainty_j =
                sensor_j.hypot(coverage_j).hypot(split_model) + split_sys + acc.idle_unknown_j;
            devices.push(DeviceShare {
                device: dev_id,
                name: d.info.name.clone(),
                kind: d.info.kind,
                estimated: d.info.estimated,
                dynamic_j: acc.dynamic_j,
                idle_j: acc.idle_j,
                uncertainty_j,
                sensor_j,
                coverage_j,
                split_j: split_model + split_sys,
            });
        }
        if stale {
            self.stats.stale_finalisations += 1;
        }
        let dynamic_j: f64 = devices.iter().map(|s| s.dynamic_j).sum();
        let idle_j: f64 = devices.iter().map(|s| s.idle_j).sum();
        let total_j = dynamic_j + idle_j;
        let uncertainty_j = devices.iter().map(|s| s.uncertainty_j).sum();
        let out_tokens = r.completion_tokens.or((r.events > 0).then_some(r.events));
        let present_ns: u64 = r.accounts.values().map(|a| a.present_ns).sum();
        let occupancy = (present_ns > 0)
            .then(|| r.accounts.values().map(|a| a.batch_ns).sum::<f64>() / present_ns as f64);
        RequestRecord {
            id,
            external_id: r.arrival.external_id,
            service: r.service,
            model: r.arrival.model,
            tenant: r.arrival.tenant,
            arrive_ns: r.arrival.ts_ns,
            first_byte_ns: r.first_byte_ns,
            first_event_ns: r.first_event_ns,
            end_ns: end,
            outcome: r.outcome,
            prompt_tokens: r.arrival.prompt_tokens,
            cached_tokens: r.arrival.cached_tokens,
            completion_tokens: r.completion_tokens,
            events: r.events,
            response_bytes: r.response_bytes,
            devices,
            dynamic_j,
            idle_j,
            total_j,
            kwh: total_j / J_PER_KWH,
            joules_per_output_token: out_tokens.filter(|&t| t > 0).map(|t| total_j / t as f64),
            occupancy,
            uncertainty_j,
            coverage_gap_ns: gap_total,
        }
    }

    /// Drops state nothing can need any more: old power samples, occupancy, gaps, and event
    /// times of open requests before every device has attributed past them.
    pub(super) fn prune(&mut self) {
        let oldest_pending = self.pending.oldest_arrival().unwrap_or(u64::MAX);
        let mut horizon_by_service: BTreeMap<ServiceId, u64> = BTreeMap::new();
        for d in self.devices.values_mut() {
            let horizon = d.attributed_ns;
            d.power.prune(horizon);
            d.occupancy.retain(|o| o.to_ns >= horizon);
            d.gaps.retain(|g| g.1 >= oldest_pending.min(horizon));
            for o in &d.occupancy {
                let h = horizon_by_service.entry(o.service).or_insert(u64::MAX);
                *h = (*h).min(horizon);
            }
            (d.totals.idle_w, d.totals.idle_basis) = d.idle_estimate();
        }
        for (service, steps) in &mut self.steps {
            // Not resolved yet: not placed either (`unplaced` holds them all, by arrival: the
            // first such is the oldest).
            let oldest = self
                .pending
                .service(*service)
                .map(|p| &p.unplaced)
                .into_iter()
                .flatten()
                .find(|(_, id)| {
                    self.requests
                        .get(id)
                        .is_some_and(|r| r.prefill_from_ns.is_none())
                })
                .map_or(u64::MAX, |(arrival, _)| *arrival);
            // Events not attributed yet are placed in their steps: keep those too.
            let horizon = horizon_by_service.get(service).copied().unwrap_or(0);
            steps.prune(oldest.min(horizon));
        }
        let long: Vec<(ServiceId, RequestId)> = self
            .pending
            .services()
            .flat_map(|(svc, p)| p.long.iter().map(move |id| (svc, *id)))
            .collect();
        for (service, id) in long {
            let Some(&h) = horizon_by_service.get(&service) else {
                continue;
            };
            if let Some(r) = self.requests.get_mut(&id)
                && r.times.len() > LONG_TIMES
            {
                while r.times.len() > 1 && r.times[0].0 < h {
                    if let Some((t, n)) = r.times.pop_front() {
                        r.pruned_last_ns = Some(t);
                        r.pruned_events += u64::from(n);
                    }
                }
                if r.times.len() <= LONG_TIMES {
                    self.pending.short(service, id);
                }
            }
        }
    }
}

fn gaps_overlap(gaps: &[(u64, u64)], a: u64, b: u64) -> u64 {
    gaps.iter()
        .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)))
        .sum()
}
