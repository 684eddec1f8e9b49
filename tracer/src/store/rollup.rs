//! The per-minute rollups: each batch's sums per minute and group, added to the `rollup`
//! table in the batch's transaction (summaries read whole minutes from it), and the same
//! groups' histograms per hour in `rollup_hour` (a summary over a day adds 24 of them per
//! group instead of 1,440: the quantiles' cost is per histogram read).

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension as _, params};

use super::{
    MINUTE_MS, StoreError,
    quantiles::{HistBytes, JouleQuantiles},
};
use crate::pipeline::FinalRecord;

/// (minute or hour, service, model, tenant, outcome).
type Key<'a> = (i64, &'a str, &'a str, &'a str, &'static str);

/// A batch's per-minute sums and per-hour histograms before they are added to the `rollup`
/// and `rollup_hour` tables.
#[derive(Default)]
pub(super) struct Rollups<'a> {
    minutes: BTreeMap<Key<'a>, RollupSums<'a>>,
    hours: BTreeMap<Key<'a>, JouleQuantiles>,
}

/// Minutes per hour of the hourly histograms.
const HOUR_MINUTES: i64 = 60;

#[derive(Default)]
struct RollupSums<'a> {
    requests: i64,
    total_j: f64,
    dynamic_j: f64,
    idle_j: f64,
    output_tokens: i64,
    token_j: f64,
    cost_nano: i64,
    /// The table's rule: one currency, `*` where they differ, empty while none is known.
    currency: &'a str,
    quantiles: JouleQuantiles,
}

impl<'a> Rollups<'a> {
    pub(super) fn add(
        &mut self,
        r: &'a FinalRecord,
        cost_nano: Option<i64>,
        currency: Option<&'a str>,
    ) {
        let rec = &r.record;
        let key = (
            r.end_unix_ms.div_euclid(MINUTE_MS),
            r.service_name.as_str(),
            rec.model.as_deref().unwrap_or(""),
            rec.tenant.as_deref().unwrap_or(""),
            rec.outcome.name(),
        );
        let tokens = rec.completion_tokens.filter(|&t| t > 0);
        let hour = (key.0.div_euclid(HOUR_MINUTES), key.1, key.2, key.3, key.4);
        self.hours
            .entry(hour)
            .or_default()
            .record(rec.total_j, tokens);
        let s = self.minutes.entry(key).or_default();
        s.requests += 1;
        s.total_j += rec.total_j;
        s.dynamic_j += rec.dynamic_j;
        s.idle_j += rec.idle_j;
        s.output_tokens += tokens.unwrap_or(0) as i64;
        if tokens.is_some() {
            s.token_j += rec.total_j;
        }
        s.quantiles.record(rec.total_j, tokens);
        s.cost_nano += cost_nano.unwrap_or(0);
        let c = currency.unwrap_or("");
        s.currency = if s.requests == 1 || s.currency.is_empty() || s.currency == c {
            c
        } else if c.is_empty() {
            s.currency
        } else {
            "*"
        };
    }

    /// Adds the batch's sums to the table: one upsert per minute and group, not one per
    /// record, and one read of the row's histograms to merge them with the batch's.
    pub(super) fn write(&mut self, tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
        let mut roll = tx.prepare_cached(
            "INSERT INTO rollup (minute, service_name, model, tenant, outcome, requests, total_j, dynamic_j, idle_j, output_tokens, token_j, cost_nano, currency, j_hist, token_hist) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?13, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?14, ?15) \
             ON CONFLICT DO UPDATE SET requests = requests + excluded.requests, total_j = total_j + excluded.total_j, \
             dynamic_j = dynamic_j + excluded.dynamic_j, idle_j = idle_j + excluded.idle_j, \
             output_tokens = output_tokens + excluded.output_tokens, token_j = token_j + excluded.token_j, \
             cost_nano = cost_nano + excluded.cost_nano, \
             currency = CASE WHEN currency IN ('', excluded.currency) THEN excluded.currency \
             WHEN excluded.currency = '' THEN currency ELSE '*' END, \
             j_hist = excluded.j_hist, token_hist = excluded.token_hist",
        )?;
        // The histograms are merged here, not in SQL: the upsert writes the row's merged
        // with the batch's.
        let mut hists = tx.prepare_cached(
            "SELECT j_hist, token_hist FROM rollup WHERE minute = ?1 AND service_name = ?2 AND model = ?3 AND tenant = ?4 AND outcome = ?5",
        )?;
        for ((minute, service, model, tenant, outcome), s) in &mut self.minutes {
            let key = params![minute, service, model, tenant, outcome];
            merge_stored(&mut s.quantiles, &mut hists, key, "minute", *minute)?;
            let (j_hist, token_hist) = s.quantiles.to_bytes();
            roll.execute(params![
                minute,
                service,
                model,
                tenant,
                outcome,
                s.total_j,
                s.dynamic_j,
                s.idle_j,
                s.output_tokens,
                s.token_j,
                s.cost_nano,
                s.currency,
                s.requests,
                j_hist,
                token_hist,
            ])?;
        }
        let mut hour_hists = tx.prepare_cached(
            "SELECT j_hist, token_hist FROM rollup_hour WHERE hour = ?1 AND service_name = ?2 AND model = ?3 AND tenant = ?4 AND outcome = ?5",
        )?;
        let mut hour_roll = tx.prepare_cached(
            "INSERT INTO rollup_hour (hour, service_name, model, tenant, outcome, j_hist, token_hist) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT DO UPDATE SET j_hist = excluded.j_hist, token_hist = excluded.token_hist",
        )?;
        for ((hour, service, model, tenant, outcome), q) in &mut self.hours {
            let key = params![hour, service, model, tenant, outcome];
            merge_stored(q, &mut hour_hists, key, "hour", *hour)?;
            let (j_hist, token_hist) = q.to_bytes();
            hour_roll.execute(params![
                hour, service, model, tenant, outcome, j_hist, token_hist
            ])?;
        }
        Ok(())
    }
}

/// Adds a row's stored buckets (read with `select` at `key`) to the batch's `q`: the upsert
/// then writes the merge. An unreadable row is never a reason to lose records: its quantiles
/// then cover this batch's alone (its `quantiles_over` says so).
fn merge_stored(
    q: &mut JouleQuantiles,
    select: &mut rusqlite::CachedStatement<'_>,
    key: impl rusqlite::Params,
    what: &str,
    at: i64,
) -> Result<(), StoreError> {
    let old: Option<HistBytes> = select
        .query_row(key, |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((j, token)) = old
        && let Err(e) = q.add_bytes(j.as_deref(), token.as_deref())
    {
        tracing::warn!("store: rollup {what} {at}: {e}");
    }
    Ok(())
}
