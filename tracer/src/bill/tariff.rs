//! Tariffs: a price per kWh (flat, or a schedule of `from, price` steps for time-of-use), a PUE
//! factor, an optional fixed overhead per request, an optional carbon intensity (flat or a
//! schedule, gCO2e/kWh), and how idle energy is allocated. Read from TOML (`[bill]`) or CSV.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{J_PER_KWH, RecordCost, joules};
use crate::wallclock::parse_time;

/// Errors reading a tariff.
#[derive(Debug, thiserror::Error)]
pub enum TariffError {
    /// A schedule file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A schedule line is not `from, value` (RFC 3339 or Unix ms, then a decimal).
    #[error("{path}:{line}: {detail}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        detail: String,
    },
    /// A value is out of range (negative price, PUE below 1, no currency).
    #[error("the tariff: {0}")]
    Invalid(String),
}

/// A value that changes at given instants: `(from Unix ms, value)`, sorted; before the first
/// step the first value holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Schedule(pub Vec<(i64, Decimal)>);

impl Schedule {
    /// One value, always.
    pub fn flat(v: Decimal) -> Self {
        Schedule(vec![(i64::MIN, v)])
    }

    /// The value in force at `t_ms`.
    pub fn at(&self, t_ms: i64) -> Decimal {
        let i = self.0.partition_point(|(from, _)| *from <= t_ms);
        self.0
            .get(i.saturating_sub(1))
            .map_or(Decimal::ZERO, |(_, v)| *v)
    }

    /// `[from, to)` cut at the steps: `(piece start, piece end, value)`.
    pub fn pieces(&self, from_ms: i64, to_ms: i64) -> Vec<(i64, i64, Decimal)> {
        let mut out = Vec::new();
        let mut t = from_ms;
        while t < to_ms {
            let i = self.0.partition_point(|(f, _)| *f <= t);
            let end = self.0.get(i).map_or(to_ms, |(next, _)| (*next).min(to_ms));
            out.push((t, end, self.at(t)));
            t = end;
        }
        if out.is_empty() {
            out.push((from_ms, to_ms, self.at(from_ms)));
        }
        out
    }

    /// Reads `from, value` lines (a header line and `#` comments are skipped); `from` is RFC
    /// 3339 or Unix milliseconds.
    pub fn from_csv(path: &std::path::Path) -> Result<Self, TariffError> {
        let text = std::fs::read_to_string(path).map_err(|source| TariffError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut steps = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |detail: String| TariffError::Line {
                path: path.to_owned(),
                line: n + 1,
                detail,
            };
            let Some((from, value)) = line.split_once(',') else {
                return Err(bad("expected `from, value`".into()));
            };
            let (from, value) = (from.trim(), value.trim());
            let Some(t) = parse_time(from) else {
                if steps.is_empty() && value.parse::<Decimal>().is_err() {
                    continue; // a header: neither column is data
                }
                return Err(bad(format!("{from:?} is neither RFC 3339 nor Unix ms")));
            };
            let v: Decimal = value.parse().map_err(|e| bad(format!("{value:?}: {e}")))?;
            steps.push((t, v));
        }
        if steps.is_empty() {
            return Err(TariffError::Invalid(format!(
                "{}: no steps",
                path.display()
            )));
        }
        steps.sort_by_key(|s| s.0);
        Ok(Schedule(steps))
    }
}

/// `j` spread evenly over `[from_ms, to_ms)`, each piece times the schedule's value then (the
/// whole of `j` when one value covers the span, so no division enters).
fn spread(schedule: &Schedule, j: Decimal, from_ms: i64, to_ms: i64) -> Decimal {
    if to_ms <= from_ms {
        return j * schedule.at(from_ms);
    }
    let span = Decimal::from(to_ms - from_ms);
    schedule
        .pieces(from_ms, to_ms)
        .into_iter()
        .map(|(a, b, v)| {
            let share = if b - a == to_ms - from_ms {
                j
            } else {
                j * (Decimal::from(b - a) / span)
            };
            share * v
        })
        .sum()
}

/// How idle energy (the device on, nothing running) is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IdleAllocation {
    /// Its own line: the provider's cost of standing by.
    #[default]
    None,
    /// Spread over the period's requests in proportion to their energy.
    ProRata,
}

/// A tariff, as every bill states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tariff {
    pub currency: String,
    /// Price per kWh.
    pub price: Schedule,
    /// Power usage effectiveness: facility energy per IT energy (≥ 1).
    pub pue: Decimal,
    /// Added to each request's cost.
    pub overhead_per_request: Decimal,
    /// Carbon intensity, gCO2e per kWh.
    pub carbon: Option<Schedule>,
    pub idle: IdleAllocation,
}

impl Tariff {
    /// A flat price.
    pub fn flat(currency: &str, price_per_kwh: Decimal) -> Self {
        Tariff {
            currency: currency.to_string(),
            price: Schedule::flat(price_per_kwh),
            pue: Decimal::ONE,
            overhead_per_request: Decimal::ZERO,
            carbon: None,
            idle: IdleAllocation::None,
        }
    }

    /// Refuses what cannot be a tariff.
    pub fn validate(&self) -> Result<(), TariffError> {
        if self.currency.trim().is_empty() {
            return Err(TariffError::Invalid("no currency".into()));
        }
        if self.pue < Decimal::ONE {
            return Err(TariffError::Invalid(format!("PUE {} is below 1", self.pue)));
        }
        if self.price.0.iter().any(|(_, p)| p.is_sign_negative()) {
            return Err(TariffError::Invalid("a negative price".into()));
        }
        if self.price.0.is_empty() {
            return Err(TariffError::Invalid("no price".into()));
        }
        Ok(())
    }

    /// `j` joules used evenly over `[from_ms, to_ms)`, times the price in force over each
    /// piece of the span, times the PUE: "joule-prices", exact decimal products when the span
    /// lies within one price (÷ 3.6 MJ gives money). A span of zero length is priced at its
    /// instant.
    pub fn joule_prices(&self, j: Decimal, from_ms: i64, to_ms: i64) -> Decimal {
        spread(&self.price, j, from_ms, to_ms) * self.pue
    }

    /// The cost (PUE included, no overhead) of `j` joules used evenly over the span.
    pub fn energy_cost(&self, j: Decimal, from_ms: i64, to_ms: i64) -> Decimal {
        self.joule_prices(j, from_ms, to_ms) / Decimal::from(J_PER_KWH)
    }

    /// Grams `CO2e` of `j` joules used evenly over the span, with PUE.
    pub fn emissions_g(&self, j: Decimal, from_ms: i64, to_ms: i64) -> Option<Decimal> {
        let carbon = self.carbon.as_ref()?;
        Some(spread(carbon, j, from_ms, to_ms) * self.pue / Decimal::from(J_PER_KWH))
    }

    /// A record's cost: its energy over its time, the overhead, the bar at the same prices.
    pub fn record_cost(
        &self,
        total_j: f64,
        uncertainty_j: f64,
        from_ms: i64,
        to_ms: i64,
    ) -> RecordCost {
        let j = joules(total_j);
        let energy = self.energy_cost(j, from_ms, to_ms);
        let bar = self.energy_cost(joules(uncertainty_j), from_ms, to_ms);
        let per_kwh = if j.is_zero() || self.pue.is_zero() {
            self.price.at(from_ms)
        } else {
            energy * Decimal::from(J_PER_KWH) / j / self.pue
        };
        RecordCost {
            amount: (energy + self.overhead_per_request).round_dp(9),
            bar: bar.round_dp(9),
            currency: self.currency.clone(),
            price_per_kwh: per_kwh.round_dp(6),
            pue: self.pue,
            emissions_g: self
                .emissions_g(j, from_ms, to_ms)
                .map(|g| rust_decimal::prelude::ToPrimitive::to_f64(&g).unwrap_or(0.0)),
        }
    }
}

/// `[bill]` in the configuration file (and `tracer report`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillConfig {
    /// ISO 4217 code; no price: records carry no cost.
    pub currency: String,
    /// Flat price per kWh.
    pub price_per_kwh: Option<Decimal>,
    /// Time-of-use prices: `from, price` lines (overrides `price_per_kwh`).
    pub price_csv: Option<std::path::PathBuf>,
    pub pue: Decimal,
    pub overhead_per_request: Decimal,
    /// Flat carbon intensity, gCO2e/kWh.
    pub carbon_g_per_kwh: Option<Decimal>,
    /// `from, gCO2e/kWh` lines (overrides the flat figure).
    pub carbon_csv: Option<std::path::PathBuf>,
    pub idle: IdleAllocation,
}

impl Default for BillConfig {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            price_per_kwh: None,
            price_csv: None,
            pue: Decimal::ONE,
            overhead_per_request: Decimal::ZERO,
            carbon_g_per_kwh: None,
            carbon_csv: None,
            idle: IdleAllocation::None,
        }
    }
}

impl BillConfig {
    /// The tariff this configures; `None` without a price.
    pub fn tariff(&self) -> Result<Option<Tariff>, TariffError> {
        let price = match (&self.price_csv, self.price_per_kwh) {
            (Some(path), _) => Schedule::from_csv(path)?,
            (None, Some(p)) => Schedule::flat(p),
            (None, None) => return Ok(None),
        };
        let carbon = match (&self.carbon_csv, self.carbon_g_per_kwh) {
            (Some(path), _) => Some(Schedule::from_csv(path)?),
            (None, Some(c)) => Some(Schedule::flat(c)),
            (None, None) => None,
        };
        let t = Tariff {
            currency: self.currency.clone(),
            price,
            pue: self.pue,
            overhead_per_request: self.overhead_per_request,
            carbon,
            idle: self.idle,
        };
        t.validate()?;
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    const H: i64 = 3_600_000;

    fn tou() -> Tariff {
        Tariff {
            price: Schedule(vec![
                (0, dec!(0.10)),
                (10 * H, dec!(0.30)),
                (20 * H, dec!(0.10)),
            ]),
            ..Tariff::flat("EUR", dec!(0))
        }
    }

    #[test]
    fn a_request_spanning_a_price_change_pays_each_price_for_its_part() {
        let t = tou();
        // 3.6 MJ (1 kWh) over 10:00 - 1 h .. 10:00 + 1 h: half at 0.10, half at 0.30.
        let c = t.energy_cost(dec!(3600000), 9 * H, 11 * H);
        assert_eq!(c, dec!(0.20));
        // Entirely within one period.
        assert_eq!(t.energy_cost(dec!(3600000), 12 * H, 13 * H), dec!(0.30));
        // An instant request at the boundary: the new price.
        assert_eq!(t.energy_cost(dec!(3600000), 10 * H, 10 * H), dec!(0.30));
        // Before the first step, the first price.
        assert_eq!(t.energy_cost(dec!(3600000), -5 * H, -4 * H), dec!(0.10));
    }

    #[test]
    fn pue_overhead_emissions_and_the_bar() {
        let t = Tariff {
            pue: dec!(1.25),
            overhead_per_request: dec!(0.000001),
            carbon: Some(Schedule::flat(dec!(400))),
            ..Tariff::flat("USD", dec!(0.20))
        };
        let c = t.record_cost(360.0, 36.0, 0, 1000);
        // 360 J = 0.0001 kWh × 0.20 × 1.25 = 0.000025, plus the overhead.
        assert_eq!(c.amount, dec!(0.000026));
        assert_eq!(c.bar, dec!(0.0000025));
        assert_eq!(c.price_per_kwh, dec!(0.20));
        // 0.0001 kWh × 1.25 × 400 g/kWh = 0.05 g.
        assert!((c.emissions_g.expect("carbon") - 0.05).abs() < 1e-12);
        assert!(
            Tariff {
                pue: dec!(0.9),
                ..t.clone()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn currency_rounding_is_to_the_minor_unit_half_even() {
        assert_eq!(super::super::round_minor(dec!(0.125), "EUR"), dec!(0.12));
        assert_eq!(super::super::round_minor(dec!(0.135), "EUR"), dec!(0.14));
        assert_eq!(super::super::round_minor(dec!(12.5), "JPY"), dec!(12));
        assert_eq!(super::super::round_minor(dec!(1.0005), "KWD"), dec!(1.000));
    }

    #[test]
    fn schedules_read_from_csv() {
        let dir = std::env::temp_dir().join(format!("tracer-tariff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("prices.csv");
        std::fs::write(
            &p,
            "from,price\n2026-12-01T00:00:00Z,0.25\n# peak\n2026-12-01T17:00:00Z, 0.40\n1796169600000,0.25\n",
        )
        .expect("csv");
        let s = Schedule::from_csv(&p).expect("schedule");
        assert_eq!(s.0.len(), 3);
        assert_eq!(s.at(1_796_151_600_000), dec!(0.40));
        std::fs::write(&p, "2026-12-01T00:00:00Z,abc\n").expect("csv");
        let e = Schedule::from_csv(&p).expect_err("bad price");
        assert!(e.to_string().contains(":1:"), "{e}");
        // A mistyped first date is an error, not a header.
        std::fs::write(&p, "2026-13-01T00:00:00Z,0.25\n2026-12-02T00:00:00Z,0.30\n").expect("csv");
        let e = Schedule::from_csv(&p).expect_err("bad date");
        assert!(e.to_string().contains(":1:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
