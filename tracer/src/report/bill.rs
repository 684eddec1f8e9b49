//! A bill: records and the devices' per-interval totals in, priced lines out.
//!
//! Amounts are carried as "joule-prices" (joules × price per kWh × PUE, exact decimal
//! products) and turned into money once per line (÷ 3.6 MJ, rounded to the currency's minor
//! unit, half to even) — so the sum of every request's cost, idle and unattributed equals the
//! measured energy's cost exactly, and the rounding residual is stated on its own line.
//! A record's energy is spread evenly over its time (arrival to end) when a price changes
//! inside it; idle and unattributed energy is priced per interval.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::bill::{IdleAllocation, J_PER_KWH, Tariff, TokenTable, joules, round_minor};
use crate::pipeline::FinalRecord;

/// A device's energy over one interval (the store's totals rows, differenced).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interval {
    pub device: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub measured_j: f64,
    pub request_j: f64,
    pub idle_j: f64,
    pub unattributed_j: f64,
}

/// What a bill groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum By {
    Model,
    Service,
    Tenant,
    /// The UTC hour a request ended in.
    Hour,
    /// The UTC day a request ended in.
    Day,
}

/// One request on a bill.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub id: u64,
    pub service: String,
    pub model: Option<String>,
    pub tenant: Option<String>,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
    pub joules: f64,
    pub bar_j: f64,
    /// Energy cost with its idle share (pro rata policy) and the overhead, unrounded.
    pub cost: Decimal,
    pub cost_bar: Decimal,
    /// The same request at per-token prices, when the table prices its model.
    pub per_token_cost: Option<Decimal>,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Batch occupancy: requests of its service in the engine with it (itself included),
    /// time-averaged, as the ledger's split saw them (`None`: never on a device with power
    /// data).
    pub occupancy: Option<f64>,
    pub emissions_g: Option<Decimal>,
    pub outcome: String,
}

/// A group's sums.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub key: String,
    pub requests: u64,
    pub kwh: f64,
    pub cost: Decimal,
    pub per_token_cost: Decimal,
    /// Requests the per-token table priced (the comparison is over these).
    pub priced: u64,
    /// Their energy cost, beside `per_token_cost`.
    pub priced_energy_cost: Decimal,
    pub output_tokens: u64,
    pub emissions_g: Decimal,
}

impl Group {
    /// How much lower the energy bill is than the per-token bill, in % (over the requests
    /// both price).
    pub fn savings_pct(&self) -> Option<f64> {
        use rust_decimal::prelude::ToPrimitive as _;
        (self.per_token_cost > Decimal::ZERO).then(|| {
            ((Decimal::ONE - self.priced_energy_cost / self.per_token_cost) * Decimal::from(100))
                .to_f64()
                .unwrap_or(0.0)
        })
    }
}

/// The bill.
#[derive(Debug, Clone, Serialize)]
pub struct Bill {
    pub currency: String,
    pub by: By,
    pub lines: Vec<Line>,
    pub groups: Vec<Group>,
    /// Idle energy's cost on its own line (`IdleAllocation::None`), else spread into lines.
    pub idle: Decimal,
    pub idle_j: f64,
    pub unattributed: Decimal,
    pub unattributed_j: f64,
    /// Every line rounded to the minor unit, and what rounding left over (so the rounded
    /// lines add up to the rounded total).
    pub total: Decimal,
    pub rounding: Decimal,
    /// The devices' measured energy over the intervals and its cost (the check).
    pub measured_j: f64,
    pub measured_cost: Decimal,
}

fn money(units: Decimal) -> Decimal {
    units / Decimal::from(J_PER_KWH)
}

/// Prices `records` and the devices' `intervals` at `tariff`; `tokens` adds the per-token
/// comparison.
pub fn bill(
    records: &[FinalRecord],
    intervals: &[Interval],
    tariff: &Tariff,
    tokens: Option<&TokenTable>,
    by: By,
) -> Bill {
    let mut lines: Vec<(Line, Decimal)> = records
        .iter()
        .map(|r| {
            let rec = &r.record;
            let dur = (rec.end_ns.saturating_sub(rec.arrive_ns) / 1_000_000) as i64;
            let (from, to) = (r.end_unix_ms - dur, r.end_unix_ms);
            let u = tariff.joule_prices(joules(rec.total_j), from, to);
            let bar = tariff.joule_prices(joules(rec.uncertainty_j), from, to);
            let emissions = tariff.emissions_g(joules(rec.total_j), from, to);
            (
                Line {
                    id: rec.id.0,
                    service: r.service_name.clone(),
                    model: rec.model.clone(),
                    tenant: rec.tenant.clone(),
                    start_unix_ms: from,
                    end_unix_ms: to,
                    joules: rec.total_j,
                    bar_j: rec.uncertainty_j,
                    cost: Decimal::ZERO,
                    cost_bar: money(bar),
                    per_token_cost: tokens.and_then(|t| {
                        t.cost(
                            rec.model.as_deref(),
                            rec.prompt_tokens,
                            rec.cached_tokens,
                            rec.completion_tokens,
                        )
                    }),
                    prompt_tokens: rec.prompt_tokens,
                    cached_tokens: rec.cached_tokens,
                    completion_tokens: rec.completion_tokens,
                    occupancy: rec.occupancy,
                    emissions_g: emissions,
                    outcome: rec.outcome.name().to_string(),
                },
                u,
            )
        })
        .collect();
    let mut idle_units = Decimal::ZERO;
    let mut unattributed_units = Decimal::ZERO;
    let mut measured_units = Decimal::ZERO;
    let (mut idle_j, mut unattributed_j, mut measured_j) = (0.0, 0.0, 0.0);
    for i in intervals {
        idle_units += tariff.joule_prices(joules(i.idle_j), i.from_ms, i.to_ms);
        unattributed_units += tariff.joule_prices(joules(i.unattributed_j), i.from_ms, i.to_ms);
        measured_units += tariff.joule_prices(joules(i.measured_j), i.from_ms, i.to_ms);
        idle_j += i.idle_j;
        unattributed_j += i.unattributed_j;
        measured_j += i.measured_j;
    }
    // Pro rata: idle joule-prices spread over the requests in proportion to theirs.
    let request_units: Decimal = lines.iter().map(|(_, u)| *u).sum();
    if tariff.idle == IdleAllocation::ProRata && request_units > Decimal::ZERO {
        let mut left = idle_units;
        let n = lines.len();
        for (k, (_, u)) in lines.iter_mut().enumerate() {
            // The last line takes what division left, so nothing is lost or made up.
            let share = if k + 1 == n {
                left
            } else {
                idle_units * *u / request_units
            };
            left -= share;
            *u += share;
        }
        idle_units = Decimal::ZERO;
    }
    let overhead = tariff.overhead_per_request;
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut rounded_sum = Decimal::ZERO;
    let mut exact_sum = Decimal::ZERO;
    let out: Vec<Line> = lines
        .into_iter()
        .map(|(mut l, u)| {
            l.cost = money(u) + overhead;
            exact_sum += l.cost;
            rounded_sum += round_minor(l.cost, &tariff.currency);
            let key = match by {
                By::Model => l.model.clone().unwrap_or_else(|| "(unknown)".into()),
                By::Service => l.service.clone(),
                By::Tenant => l.tenant.clone().unwrap_or_else(|| "(none)".into()),
                // `YYYY-MM-DDTHH` and `YYYY-MM-DD` sort in time order.
                By::Hour => crate::wallclock::utc(l.end_unix_ms)[..13].to_string(),
                By::Day => crate::wallclock::utc(l.end_unix_ms)[..10].to_string(),
            };
            let g = groups.entry(key.clone()).or_insert_with(|| Group {
                key,
                ..Group::default()
            });
            g.requests += 1;
            g.kwh += l.joules / f64::from(J_PER_KWH);
            g.cost += l.cost;
            g.output_tokens += l.completion_tokens.unwrap_or(0);
            g.emissions_g += l.emissions_g.unwrap_or_default();
            if let Some(p) = l.per_token_cost {
                g.priced += 1;
                g.per_token_cost += p;
                g.priced_energy_cost += l.cost;
            }
            l
        })
        .collect();
    let idle = money(idle_units);
    let unattributed = money(unattributed_units);
    exact_sum += idle + unattributed;
    rounded_sum +=
        round_minor(idle, &tariff.currency) + round_minor(unattributed, &tariff.currency);
    let total = round_minor(exact_sum, &tariff.currency);
    Bill {
        currency: tariff.currency.clone(),
        by,
        lines: out,
        groups: groups.into_values().collect(),
        idle,
        idle_j,
        unattributed,
        unattributed_j,
        total,
        rounding: total - rounded_sum,
        measured_j,
        measured_cost: money(measured_units),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    use super::*;
    use crate::bill::Schedule;

    /// Sum of joule-prices over allocations aligned to intervals: requests' parts, idle and
    /// unattributed of each interval add up to its measured energy, so their costs add up to
    /// the measured energy's cost, exactly.
    fn conserved(parts: &[(i64, Vec<u32>, u32, u32)], prices: &[(i64, u32)], pue_pct: u32) {
        let tariff = Tariff {
            price: Schedule(
                prices
                    .iter()
                    .map(|(t, p)| (*t, Decimal::from(*p) / dec!(1000)))
                    .collect(),
            ),
            pue: Decimal::from(100 + pue_pct) / dec!(100),
            ..Tariff::flat("EUR", dec!(0))
        };
        let mut req = Decimal::ZERO;
        let mut rest = Decimal::ZERO;
        let mut measured = Decimal::ZERO;
        for (start, reqs, idle, un) in parts {
            // An interval of 1 s inside one price step (steps fall on whole minutes).
            let (a, b) = (*start * 60_000 + 1_000, *start * 60_000 + 2_000);
            let mj = |v: u32| Decimal::from(v) / dec!(1000);
            let mut m = mj(*idle) + mj(*un);
            for r in reqs {
                req += tariff.joule_prices(mj(*r), a, b);
                m += mj(*r);
            }
            rest += tariff.joule_prices(mj(*idle), a, b) + tariff.joule_prices(mj(*un), a, b);
            measured += tariff.joule_prices(m, a, b);
        }
        assert_eq!(req + rest, measured);
    }

    proptest! {
        #[test]
        fn request_idle_and_unattributed_costs_add_up_to_the_measured_cost_exactly(
            parts in prop::collection::vec(
                (0i64..600, prop::collection::vec(0u32..5_000_000, 0..6), 0u32..2_000_000, 0u32..500_000),
                1..40,
            ),
            prices in prop::collection::vec((0i64..600, 1u32..900), 1..8),
            pue_pct in 0u32..80,
        ) {
            let mut prices: Vec<(i64, u32)> = prices.into_iter().map(|(m, p)| (m * 60_000, p)).collect();
            prices.sort_unstable();
            conserved(&parts, &prices, pue_pct);
        }
    }

    #[test]
    fn pro_rata_idle_is_spread_and_the_rounded_lines_add_up() {
        let tariff = Tariff {
            idle: IdleAllocation::ProRata,
            ..Tariff::flat("EUR", dec!(0.3))
        };
        let t0 = 1_800_000_000_000i64;
        let rec = |id: u64, j: f64| FinalRecord {
            workload: None,
            record: serde_json::from_value(serde_json::json!({
                "id": id, "external_id": null, "service": 1, "model": "m", "arrive_ns": 0,
                "first_byte_ns": null, "first_event_ns": null, "end_ns": 1_000_000_000u64,
                "outcome": "complete", "prompt_tokens": 100, "cached_tokens": 50,
                "completion_tokens": 10, "events": 10, "response_bytes": 1, "devices": [],
                "dynamic_j": j, "idle_j": 0.0, "total_j": j, "kwh": 0.0,
                "joules_per_output_token": null, "uncertainty_j": 1.0, "coverage_gap_ns": 0
            }))
            .expect("record"),
            service_name: "s".into(),
            end_unix_ms: t0 + id as i64 * 100,
            cost: None,
        };
        let records: Vec<_> = (1..=7).map(|i| rec(i, 1000.0 * i as f64 / 3.0)).collect();
        let intervals = vec![Interval {
            device: "gpu0".into(),
            from_ms: t0,
            to_ms: t0 + 60_000,
            measured_j: 20_000.0,
            request_j: 9333.0,
            idle_j: 9000.0,
            unattributed_j: 1667.0,
        }];
        let table: TokenTable =
            toml::from_str("[default]\ninput = 1\ncached_input = 0.1\noutput = 2\n")
                .expect("table");
        let b = bill(&records, &intervals, &tariff, Some(&table), By::Model);
        assert_eq!(b.idle, Decimal::ZERO, "spread into the lines");
        let lines: Decimal = b.lines.iter().map(|l| l.cost).sum();
        let rounded: Decimal = b
            .lines
            .iter()
            .map(|l| round_minor(l.cost, "EUR"))
            .sum::<Decimal>()
            + round_minor(b.unattributed, "EUR");
        assert_eq!(rounded + b.rounding, b.total);
        // Lines (with idle) and unattributed: the cost of requests, idle and unattributed.
        let want = (joules(records.iter().map(|r| r.record.total_j).sum::<f64>()) * dec!(0.3)
            + dec!(9000) * dec!(0.3))
            / dec!(3600000);
        assert!(
            (lines - want).abs() < dec!(0.000000000001),
            "{lines} {want}"
        );
        // 7 requests of 100 prompt (50 cached) and 10 output tokens at the default prices.
        let g = &b.groups[0];
        assert_eq!(g.priced, 7);
        assert_eq!(
            g.per_token_cost,
            dec!(7) * (dec!(50) + dec!(5) + dec!(20)) / dec!(1000000)
        );
        assert!(g.savings_pct().is_some());
        assert!(b.lines.iter().all(|l| l.occupancy.is_none_or(|o| o >= 1.0)));
    }
}
