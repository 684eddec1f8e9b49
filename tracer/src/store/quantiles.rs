//! Exact-enough quantiles of J per request and J per output token: HDR histograms of integer
//! microjoules (2 significant figures: any quantile within 1 %). Unlike the `/metrics`
//! buckets, they merge without losing precision, so a rollup row keeps one per minute and
//! group and a summary adds them up. A row's histogram is stored sparse: its recorded buckets
//! as (value, count) varints. A summary over a day reads tens of thousands of rows, and adding
//! a sparse row costs its few recorded buckets, where hdrhistogram's own format would allocate
//! and add a whole histogram (thousands of counts) per row.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::StoreError;

/// The smallest value kept apart from zero: 1 µJ (smaller values count as 1 µJ).
const LOW_UJ: u64 = 1;
/// The largest value kept: 10 MJ (larger values count as 10 MJ).
const HIGH_UJ: u64 = 10_000_000_000_000;
/// Significant figures: 1 % precision keeps a histogram near 20 KiB in memory, and small once
/// serialised (zeros are run-length coded).
const SIGFIG: u8 = 2;

/// Counts per value: a rollup row or a summary never counts 2^32 requests in one 1 % bucket
/// (additions saturate).
type Hist = Histogram<u32>;

/// A rollup row's two histogram columns, serialised (`None`: NULL).
pub type HistBytes = (Option<Vec<u8>>, Option<Vec<u8>>);

/// J per request and J per output token of a set of records. `None`: no value yet (a group
/// allocates nothing until it records one).
#[derive(Clone, Default, PartialEq)]
pub struct JouleQuantiles {
    per_request: Option<Box<Hist>>,
    per_token: Option<Box<Hist>>,
}

impl std::fmt::Debug for JouleQuantiles {
    /// The counts (thousands of them) say nothing in a test's message; the quantiles do.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JouleQuantiles")
            .field("per_request", &self.per_request_json())
            .field("per_token", &self.per_token_json())
            .finish()
    }
}

fn new_hist() -> Hist {
    Hist::new_with_bounds(LOW_UJ, HIGH_UJ, SIGFIG)
        .expect("constant bounds within hdrhistogram's (low >= 1, high >= 2 low, sigfig <= 5)")
}

/// Joules as whole microjoules, at least 1 (NaN and negatives too: they have no bucket).
fn to_uj(j: f64) -> u64 {
    (j * 1e6).round().max(1.0) as u64
}

fn record(h: &mut Option<Box<Hist>>, j: f64) {
    h.get_or_insert_with(|| Box::new(new_hist()))
        .saturating_record(to_uj(j));
}

/// Adds `from`, whose values are within this module's bounds (its own histograms, or read ones
/// that [`from_bytes`] checked): the addition cannot fail.
fn merge(into: &mut Option<Box<Hist>>, from: &Hist) {
    if !from.is_empty() {
        // Its one error is a value above our highest, which `from` cannot hold.
        let _ = into.get_or_insert_with(|| Box::new(new_hist())).add(from);
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

fn to_bytes(h: Option<&Hist>) -> Option<Vec<u8>> {
    h.filter(|h| !h.is_empty()).map(|h| {
        let mut out = vec![FORMAT];
        for v in h.iter_recorded() {
            put_varint(&mut out, v.value_iterated_to());
            put_varint(&mut out, u64::from(v.count_at_value()));
        }
        out
    })
}

/// A stored histogram's (value µJ, count) pairs, checked: its format, values within this
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

fn add_pairs(into: &mut Option<Box<Hist>>, pairs: &[(u64, u64)]) {
    if pairs.is_empty() {
        return;
    }
    let h = into.get_or_insert_with(|| Box::new(new_hist()));
    for &(value, count) in pairs {
        // Saturating at u32::MAX per bucket, as recording does.
        h.saturating_record_n(value, u32::try_from(count).unwrap_or(u32::MAX));
    }
}

/// `{p50, p90, p99, max}` in joules, `null` without values. Each is the highest value
/// equivalent to the nearest-rank quantile's (at most 1 % above it).
fn quantiles_json(h: Option<&Hist>) -> Value {
    match h.filter(|h| !h.is_empty()) {
        None => Value::Null,
        Some(h) => {
            let j = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
            json!({ "p50": j(0.5), "p90": j(0.9), "p99": j(0.99), "max": h.max() as f64 / 1e6 })
        }
    }
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
        if let Some(h) = &other.per_request {
            merge(&mut self.per_request, h);
        }
        if let Some(h) = &other.per_token {
            merge(&mut self.per_token, h);
        }
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
        (
            to_bytes(self.per_request.as_deref()),
            to_bytes(self.per_token.as_deref()),
        )
    }

    /// Requests the quantiles cover (fewer than a group's requests where rollup rows from
    /// before schema 3 have no histograms).
    pub fn requests(&self) -> u64 {
        self.per_request.as_ref().map_or(0, |h| h.len())
    }

    /// Quantiles of J per request (`null` without values).
    pub fn per_request_json(&self) -> Value {
        quantiles_json(self.per_request.as_deref())
    }

    /// Quantiles of J per output token (`null` without values).
    pub fn per_token_json(&self) -> Value {
        quantiles_json(self.per_token.as_deref())
    }
}
