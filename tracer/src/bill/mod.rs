//! Bills: what a request's energy costs at a tariff, and what the same request would cost at
//! per-token prices.
//!
//! Money is [`rust_decimal::Decimal`] with its currency named ([`Money`]); energy comes in as
//! the ledger's joules (f64, converted once, exactly, to decimal). Everything here is pure: a
//! tariff and records in, cost lines out, so a bill recomputed from a recording or the store
//! gives the same lines.
//!
//! - [`tariff`]: price per kWh (flat or a schedule), PUE, overhead per request, carbon
//!   intensity, the idle-allocation policy; the cost of energy spread over a time span.
//! - [`tokens`]: per-token price tables and the per-token bill of a request.
//!
//! The bill over final records, and its plots, are downstream of the pipeline:
//! [`crate::report`].

pub mod tariff;
pub mod tokens;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use self::{
    tariff::{BillConfig, IdleAllocation, Schedule, Tariff, TariffError},
    tokens::{TokenPrices, TokenTable},
};

/// Joules per kWh.
pub const J_PER_KWH: u32 = 3_600_000;

/// An amount of money in a named currency (ISO 4217 code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: String,
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// Digits after the decimal point of a currency's minor unit (ISO 4217; 2 when unknown).
pub fn minor_units(currency: &str) -> u32 {
    match currency.to_ascii_uppercase().as_str() {
        "JPY" | "KRW" | "VND" | "CLP" | "ISK" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" => 3,
        _ => 2,
    }
}

/// `amount` rounded to the currency's minor unit, half to even (banker's rounding: no drift
/// over many lines).
pub fn round_minor(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(
        minor_units(currency),
        rust_decimal::RoundingStrategy::MidpointNearestEven,
    )
}

/// The most energy one line can hold: no device measures an exajoule, and beyond about
/// 1e28 the decimal type's products would overflow.
const MAX_J: f64 = 1e18;

/// Joules as a decimal, exactly (the f64's own value, no rounding but the decimal type's 28
/// digits); a value that cannot be energy (not finite, beyond [`MAX_J`]) counts as none.
pub fn joules(j: f64) -> Decimal {
    if !j.is_finite() || j.abs() > MAX_J {
        return Decimal::ZERO;
    }
    Decimal::from_f64_retain(j).unwrap_or(Decimal::ZERO)
}

/// A record's cost at the tariff in force: what every record carries once a tariff is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordCost {
    /// Energy cost (PUE and overhead included), in `currency`, to 9 decimals.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// The energy bar (± J) at the same prices.
    #[serde(with = "rust_decimal::serde::str")]
    pub bar: Decimal,
    pub currency: String,
    /// The mean price over the request's time, per kWh (before PUE).
    #[serde(with = "rust_decimal::serde::str")]
    pub price_per_kwh: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub pue: Decimal,
    /// Emissions at the carbon intensity in force, grams `CO2e` (with PUE), when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emissions_g: Option<f64>,
}
