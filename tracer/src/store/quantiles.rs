//! Exact-enough quantiles of J per request and J per output token: counts per hdrhistogram
//! bucket of integer microjoules (2 significant figures: any quantile within 1 %). Unlike the
//! `/metrics` buckets, they merge without losing precision, so a rollup row keeps them per
//! minute (and per hour) and group, and a summary adds them up. They are kept sparse, in
//! memory and stored (the recorded buckets as (value, count) varints): a group costs the few
//! buckets it holds, where a whole histogram is thousands of counts, and a summary over a day
//! adds rows bucket by bucket.

use std::{collections::BTreeMap, sync::LazyLock};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::StoreError;

/// The smallest value kept apart from zero: 1 µJ (smaller values count as 1 µJ).
const LOW_UJ: u64 = 1;
/// The largest value kept: 10 MJ (larger values count as 10 MJ).
const HIGH_UJ: u64 = 10_000_000_000_000;
/// Significant figures: any quantile within 1 %.
const SIGFIG: u8 = 2;

/// The bucket layout every histogram shares (hdrhistogram's, at these bounds): values are
/// kept as their bucket's lowest equivalent value, so two groups' buckets add exactly.
static LAYOUT: LazyLock<Option<Histogram<u32>>> =
    LazyLock::new(|| Histogram::new_with_bounds(LOW_UJ, HIGH_UJ, SIGFIG).ok());

/// Sparse counts per bucket (its lowest equivalent value, µJ): a group costs what it holds,
/// not a whole histogram (thousands of counts; a batch or a summary by tenant may hold
/// thousands of groups).
type Buckets = BTreeMap<u64, u64>;

/// A rollup row's two histogram columns, as stored (`None`: NULL).
pub type HistBytes = (Option<Vec<u8>>, Option<Vec<u8>>);

/// J per request and J per output token of a set of records.
#[derive(Clone, Default, PartialEq)]
pub struct JouleQuantiles {
    per_request: Buckets,
    per_token: Buckets,
}

impl std::fmt::Debug for JouleQuantiles {
    /// The quantiles say more in a test's message than the buckets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JouleQuantiles")
            .field("per_request", &self.per_request_json())
            .field("per_token", &self.per_token_json())
            .finish()
    }
}

/// Joules as whole microjoules within the kept range (NaN and negatives count as 1 µJ).
fn to_uj(j: f64) -> u64 {
    ((j * 1e6).round().max(1.0) as u64).clamp(LOW_UJ, HIGH_UJ)
}

/// The bucket of a value: its lowest equivalent value under the shared layout.
fn bucket(uj: u64) -> u64 {
    LAYOUT
        .as_ref()
        .map_or(uj, |h| h.lowest_equivalent(uj.clamp(LOW_UJ, HIGH_UJ)))
}

fn record(b: &mut Buckets, j: f64) {
    *b.entry(bucket(to_uj(j))).or_default() += 1;
}

fn merge(into: &mut Buckets, from: &Buckets) {
    for (&v, &n) in from {
        let c = into.entry(v).or_default();
        *c = c.saturating_add(n);
    }
}

/// The first byte of a stored histogram: its layout (sparse varint pairs).
const FORMAT: u8 = 1;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, StoreError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| StoreError::Histogram("cut short inside a number".into()))?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(StoreError::Histogram("a number over 64 bits".into()))
}

fn to_bytes(b: &Buckets) -> Option<Vec<u8>> {
    (!b.is_empty()).then(|| {
        let mut out = Vec::with_capacity(1 + b.len() * 6);
        out.push(FORMAT);
        for (&v, &n) in b {
            put_varint(&mut out, v);
            put_varint(&mut out, n);
        }
        out
    })
}

/// A stored histogram's (bucket, count) pairs, checked: its format, values within this
/// module's bounds, counts above zero, nothing cut short.
fn pairs(bytes: &[u8]) -> Result<Vec<(u64, u64)>, StoreError> {
    let Some((&FORMAT, mut rest)) = bytes.split_first() else {
        return Err(StoreError::Histogram(format!(
            "not a histogram (format byte {:?})",
            bytes.first()
        )));
    };
    let mut out = Vec::with_capacity(rest.len() / 4);
    while !rest.is_empty() {
        let value = get_varint(&mut rest)?;
        let count = get_varint(&mut rest)?;
        if !(LOW_UJ..=HIGH_UJ).contains(&value) || count == 0 {
            return Err(StoreError::Histogram(format!(
                "{count} at {value} µJ, outside {LOW_UJ}..={HIGH_UJ} µJ or empty"
            )));
        }
        out.push((value, count));
    }
    Ok(out)
}

fn add_pairs(into: &mut Buckets, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        // Stored by this layout already; `bucket` makes a foreign value fall in one.
        let c = into.entry(bucket(value)).or_default();
        *c = c.saturating_add(count);
    }
}

/// `{p50, p90, p99, max}` in joules, `null` without values: each the highest value of the
/// bucket holding the nearest-rank quantile (at most 1 % above it), as hdrhistogram reports.
fn quantiles_json(b: &Buckets) -> Value {
    let total: u64 = b.values().fold(0u64, |a, &n| a.saturating_add(n));
    if total == 0 {
        return Value::Null;
    }
    let highest = |v: u64| {
        LAYOUT
            .as_ref()
            .map_or(v, |h| h.highest_equivalent(v))
            .min(HIGH_UJ)
    };
    let at = |q: f64| {
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (&v, &n) in b {
            seen = seen.saturating_add(n);
            if seen >= rank {
                return highest(v) as f64 / 1e6;
            }
        }
        b.keys()
            .next_back()
            .map_or(0.0, |&v| highest(v) as f64 / 1e6)
    };
    json!({ "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0) })
}

impl JouleQuantiles {
    /// Records one request: its joules and, when it reported output tokens, its joules per
    /// token (`total_j / completion_tokens`, as `joules_per_output_token`).
    pub fn record(&mut self, total_j: f64, completion_tokens: Option<u64>) {
        record(&mut self.per_request, total_j);
        if let Some(t) = completion_tokens.filter(|&t| t > 0) {
            record(&mut self.per_token, total_j / t as f64);
        }
    }

    /// Adds `other`'s values.
    pub fn add(&mut self, other: &JouleQuantiles) {
        merge(&mut self.per_request, &other.per_request);
        merge(&mut self.per_token, &other.per_token);
    }

    /// Adds stored histograms (a rollup row's columns; `None`: a row from before they
    /// existed), both or, on an error, neither.
    pub fn add_bytes(
        &mut self,
        per_request: Option<&[u8]>,
        per_token: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        // Both read before either is added: a row counts whole or not at all.
        let per_request = per_request.map(pairs).transpose()?;
        let per_token = per_token.map(pairs).transpose()?;
        if let Some(p) = &per_request {
            add_pairs(&mut self.per_request, p);
        }
        if let Some(p) = &per_token {
            add_pairs(&mut self.per_token, p);
        }
        Ok(())
    }

    /// The two histograms as stored, `None` where empty.
    pub fn to_bytes(&self) -> HistBytes {
        (to_bytes(&self.per_request), to_bytes(&self.per_token))
    }

    /// Requests the quantiles cover (fewer than a group's requests where rollup rows from
    /// before schema 3 have no histograms).
    pub fn requests(&self) -> u64 {
        self.per_request
            .values()
            .fold(0u64, |a, &n| a.saturating_add(n))
    }

    /// Quantiles of J per request (`null` without values).
    pub fn per_request_json(&self) -> Value {
        quantiles_json(&self.per_request)
    }

    /// Quantiles of J per output token (`null` without values).
    pub fn per_token_json(&self) -> Value {
        quantiles_json(&self.per_token)
    }
}
