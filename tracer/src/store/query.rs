//! Reading the store: pages of records, one record's neighbours, sums per group (from the
//! records, or whole minutes from the rollups), records and device intervals for a bill.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{MINUTE_MS, Store, StoreError, StoredFilter, quantiles::JouleQuantiles};
use crate::pipeline::FinalRecord;

/// A stored record's run and the journal segment it was finalised in.
pub type RunSegment = (i64, u32);

/// What a summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Service,
    Tenant,
}

/// One group's sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupSums {
    pub key: String,
    pub requests: u64,
    pub total_j: f64,
    pub dynamic_j: f64,
    pub idle_j: f64,
    /// Output tokens of the requests that reported them, and those requests' joules.
    pub output_tokens: u64,
    pub token_j: f64,
    /// Cost in billionths of `currency` (records without a cost add nothing).
    pub cost_nano: i64,
    /// `None`: no record had a cost; `Some("*")`: costs in more than one currency.
    pub currency: Option<String>,
    /// Quantiles of J per request and per output token, over `quantiles.requests()` of the
    /// requests (rollup rows from before schema 3 have none).
    pub quantiles: JouleQuantiles,
}

impl GroupSums {
    /// Adds one record (in place: a group's histograms are not built per record).
    pub fn add_record(&mut self, r: &FinalRecord) {
        let rec = &r.record;
        let (cost_nano, currency) = super::cost_nano(r);
        self.add_row(
            rec.total_j,
            rec.dynamic_j,
            rec.idle_j,
            rec.completion_tokens,
            cost_nano,
            currency.map(str::to_owned),
        );
    }

    /// Adds one record's stored columns.
    fn add_row(
        &mut self,
        total_j: f64,
        dynamic_j: f64,
        idle_j: f64,
        completion_tokens: Option<u64>,
        cost_nano: Option<i64>,
        currency: Option<String>,
    ) {
        let tokens = completion_tokens.filter(|&t| t > 0);
        self.requests += 1;
        self.total_j += total_j;
        self.dynamic_j += dynamic_j;
        self.idle_j += idle_j;
        self.output_tokens += tokens.unwrap_or(0);
        if tokens.is_some() {
            self.token_j += total_j;
        }
        self.cost_nano += cost_nano.unwrap_or(0);
        self.currency = merge_currency(self.currency.take(), currency);
        self.quantiles.record(total_j, tokens);
    }

    /// Adds `other`'s sums (the same group).
    pub fn add(&mut self, other: &GroupSums) {
        self.requests += other.requests;
        self.total_j += other.total_j;
        self.dynamic_j += other.dynamic_j;
        self.idle_j += other.idle_j;
        self.output_tokens += other.output_tokens;
        self.token_j += other.token_j;
        self.cost_nano += other.cost_nano;
        self.currency = merge_currency(self.currency.take(), other.currency.clone());
        self.quantiles.add(&other.quantiles);
    }
}

/// Group `key` in `groups`, created empty.
/// Minutes per hour of `rollup_hour`.
const HOUR_MINUTES: i64 = 60;

/// `col >= ?1 AND col < ?2` and the filter's columns, with their arguments.
fn rollup_conditions(
    filter: &StoredFilter,
    col: &str,
    from: i64,
    to: i64,
) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("{col} >= ?1 AND {col} < ?2");
    let mut args: Vec<rusqlite::types::Value> = vec![from.into(), to.into()];
    for (c, v) in [
        ("service_name", &filter.service_name),
        ("model", &filter.model),
        ("tenant", &filter.tenant),
        ("outcome", &filter.outcome),
    ] {
        if let Some(v) = v {
            args.push(v.clone().into());
            let _ = write!(sql, " AND {c} = ?{}", args.len());
        }
    }
    (sql, args)
}

/// A column of an unexpected type, as rusqlite reports it.
fn column(idx: usize) -> impl Fn(rusqlite::types::FromSqlError) -> StoreError {
    move |e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Null, Box::new(e))
            .into()
    }
}

fn group(groups: &mut BTreeMap<String, GroupSums>, key: String) -> &mut GroupSums {
    groups.entry(key).or_insert_with_key(|k| GroupSums {
        key: k.clone(),
        ..GroupSums::default()
    })
}

/// The currency of two sums: one, the other, or `*` for two different ones.
pub fn merge_currency(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) if a == b => Some(a),
        _ => Some("*".into()),
    }
}

/// The SQL condition (and its arguments) for `filter` and ids below `before`; `None`: nothing
/// can match.
fn where_clause(
    filter: &StoredFilter,
    before: u64,
) -> Option<(String, Vec<rusqlite::types::Value>)> {
    let mut sql = String::from("id < ?1");
    let mut args: Vec<rusqlite::types::Value> = vec![(before.min(i64::MAX as u64) as i64).into()];
    let mut add = |clause: &str, v: rusqlite::types::Value| {
        args.push(v);
        let _ = write!(sql, " AND {clause} ?{}", args.len());
    };
    if let Some(m) = &filter.model {
        add("model =", m.clone().into());
    }
    if let Some(t) = &filter.tenant {
        add("tenant =", t.clone().into());
    }
    if let Some(o) = &filter.outcome {
        add("outcome =", o.clone().into());
    }
    if let Some(t) = filter.since_ms {
        add("end_unix_ms >=", t.into());
    }
    if let Some(t) = filter.until_ms {
        add("end_unix_ms <", t.into());
    }
    if let Some(n) = &filter.service_name {
        add("service_name =", n.clone().into());
    }
    if filter.first_id > 0 {
        add(
            "id >=",
            (filter.first_id.min(i64::MAX as u64) as i64).into(),
        );
    }
    if let Some(ids) = &filter.services {
        if ids.is_empty() {
            return None;
        }
        let mut marks = Vec::new();
        for id in ids {
            args.push(i64::from(*id).into());
            marks.push(format!("?{}", args.len()));
        }
        let _ = write!(sql, " AND service IN ({})", marks.join(","));
    }
    Some((sql, args))
}

impl Store {
    /// Up to `limit` records with ids below `before` that `filter` keeps, newest first.
    pub fn page(
        &self,
        filter: &StoredFilter,
        before: u64,
        limit: usize,
    ) -> Result<Vec<FinalRecord>, StoreError> {
        self.page_raw(filter, before, limit)?
            .into_iter()
            .map(|(id, raw)| Self::decode(id as i64, raw.get()))
            .collect()
    }

    /// As [`Store::page`], each record as the JSON the API sends: a binary row decoded and
    /// encoded, a JSON row (written before schema 4) as stored (checked to be JSON).
    pub fn page_raw(
        &self,
        filter: &StoredFilter,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Box<serde_json::value::RawValue>)>, StoreError> {
        let Some((clause, mut args)) = where_clause(filter, before) else {
            return Ok(Vec::new());
        };
        args.push((limit as i64).into());
        let sql = format!(
            "SELECT id, json, rec FROM records WHERE {clause} ORDER BY id DESC LIMIT ?{}",
            args.len()
        );
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (id, json, rec) = row?;
            let raw = match rec {
                Some(bytes) => {
                    let record = Self::decode_row(id, &json, Some(&bytes))?;
                    serde_json::value::to_raw_value(&record)
                }
                None => serde_json::value::RawValue::from_string(json),
            }
            .map_err(|source| StoreError::Corrupt { id, source })?;
            Ok((id as u64, raw))
        })
        .collect()
    }

    /// Sums per group (`by`: model, service or tenant) over records with ids below `before`
    /// that `filter` keeps (what memory no longer holds).
    pub fn sums(
        &self,
        filter: &StoredFilter,
        before: u64,
        by: GroupBy,
    ) -> Result<Vec<GroupSums>, StoreError> {
        let Some((clause, args)) = where_clause(filter, before) else {
            return Ok(Vec::new());
        };
        let key = match by {
            GroupBy::Model => "COALESCE(model, '(unknown)')",
            GroupBy::Service => "service_name",
            GroupBy::Tenant => "COALESCE(tenant, '(none)')",
        };
        // Row by row, not SQL's sums: the quantiles need each record's joules.
        let sql = format!(
            "SELECT {key}, total_j, dynamic_j, idle_j, completion_tokens, cost_nano, NULLIF(currency, '') \
             FROM records WHERE {clause}"
        );
        let mut st = self.conn.prepare(&sql)?;
        let mut rows = st.query(rusqlite::params_from_iter(args))?;
        let mut groups = BTreeMap::new();
        while let Some(r) = rows.next()? {
            group(&mut groups, r.get(0)?).add_row(
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                r.get(5)?,
                r.get(6)?,
            );
        }
        Ok(groups.into_values().collect())
    }

    /// Sums per group over every stored record `filter` keeps (all runs): whole minutes from
    /// the per-minute rollups, the partial minutes at the window's edges from the records.
    /// For callers who see everything (`filter.services` and `first_id` are ignored).
    pub fn summary(
        &self,
        filter: &StoredFilter,
        by: GroupBy,
    ) -> Result<Vec<GroupSums>, StoreError> {
        let since = filter.since_ms.unwrap_or(i64::MIN);
        let until = filter.until_ms.unwrap_or(i64::MAX);
        let first = if since == i64::MIN {
            i64::MIN
        } else {
            since.div_euclid(MINUTE_MS) + i64::from(since.rem_euclid(MINUTE_MS) != 0)
        };
        let last = if until == i64::MAX {
            i64::MAX
        } else {
            until.div_euclid(MINUTE_MS)
        };
        let everyone = StoredFilter {
            services: None,
            first_id: 0,
            ..filter.clone()
        };
        let mut groups = BTreeMap::new();
        let mut add = |g: GroupSums| group(&mut groups, g.key.clone()).add(&g);
        if first >= last {
            for g in self.sums(&everyone, u64::MAX, by)? {
                add(g);
            }
        } else {
            for g in self.rollup_sums(&everyone, first, last, by)? {
                add(g);
            }
            let edges = [
                (
                    filter.since_ms,
                    (first != i64::MIN).then(|| first * MINUTE_MS),
                ),
                (
                    (last != i64::MAX).then(|| last * MINUTE_MS),
                    filter.until_ms,
                ),
            ];
            for (from, to) in edges {
                if from.is_none() && to.is_none() {
                    continue;
                }
                if let (Some(a), Some(b)) = (from, to)
                    && a >= b
                {
                    continue;
                }
                let edge = StoredFilter {
                    since_ms: from,
                    until_ms: to,
                    ..everyone.clone()
                };
                for g in self.sums(&edge, u64::MAX, by)? {
                    add(g);
                }
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Sums per group over the whole minutes `[first, last)`: from the minute rollups (summed
    /// in SQL); the quantiles from the hourly histograms for whole hours and the minute rows'
    /// for the partial hours at the edges.
    fn rollup_sums(
        &self,
        filter: &StoredFilter,
        first: i64,
        last: i64,
        by: GroupBy,
    ) -> Result<Vec<GroupSums>, StoreError> {
        let key = match by {
            GroupBy::Model => "CASE model WHEN '' THEN '(unknown)' ELSE model END",
            GroupBy::Service => "service_name",
            GroupBy::Tenant => "CASE tenant WHEN '' THEN '(none)' ELSE tenant END",
        };
        let (conditions, args) = rollup_conditions(filter, "minute", first, last);
        let sql = format!(
            "SELECT {key}, SUM(requests), SUM(total_j), SUM(dynamic_j), SUM(idle_j), SUM(output_tokens), SUM(token_j), \
             SUM(cost_nano), MIN(NULLIF(currency, '')), MAX(NULLIF(currency, '')) \
             FROM rollup WHERE {conditions} GROUP BY 1"
        );
        let mut groups: BTreeMap<String, GroupSums> = BTreeMap::new();
        {
            let mut st = self.conn.prepare(&sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                let g = GroupSums {
                    key: r.get(0)?,
                    requests: r.get::<_, i64>(1)?.max(0) as u64,
                    total_j: r.get::<_, Option<f64>>(2)?.unwrap_or(0.0),
                    dynamic_j: r.get::<_, Option<f64>>(3)?.unwrap_or(0.0),
                    idle_j: r.get::<_, Option<f64>>(4)?.unwrap_or(0.0),
                    output_tokens: r.get::<_, Option<i64>>(5)?.unwrap_or(0).max(0) as u64,
                    token_j: r.get::<_, Option<f64>>(6)?.unwrap_or(0.0),
                    cost_nano: r.get::<_, Option<i64>>(7)?.unwrap_or(0),
                    currency: merge_currency(r.get(8)?, r.get(9)?),
                    ..GroupSums::default()
                };
                groups.insert(g.key.clone(), g);
            }
        }
        // Whole hours inside the window, and the minutes around them.
        let (h0, h1) = (
            first.div_euclid(HOUR_MINUTES) + i64::from(first.rem_euclid(HOUR_MINUTES) != 0),
            last.div_euclid(HOUR_MINUTES),
        );
        let spans: Vec<(&str, &str, i64, i64)> = if h0 < h1 {
            vec![
                ("rollup_hour", "hour", h0, h1),
                ("rollup", "minute", first, h0 * HOUR_MINUTES),
                ("rollup", "minute", h1 * HOUR_MINUTES, last),
            ]
        } else {
            vec![("rollup", "minute", first, last)]
        };
        for (table, col, from, to) in spans {
            if from >= to {
                continue;
            }
            let (conditions, args) = rollup_conditions(filter, col, from, to);
            let sql = format!("SELECT {key}, j_hist, token_hist FROM {table} WHERE {conditions}");
            let mut st = self.conn.prepare(&sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                // Borrowed from the row (a day is many rows of a few groups).
                let key = r.get_ref(0)?.as_str().map_err(column(0))?;
                let g = match groups.get_mut(key) {
                    Some(g) => g,
                    None => group(&mut groups, key.to_owned()),
                };
                let (j_hist, token_hist) = (
                    r.get_ref(1)?.as_blob_or_null().map_err(column(1))?,
                    r.get_ref(2)?.as_blob_or_null().map_err(column(2))?,
                );
                if let Err(e) = g.quantiles.add_bytes(j_hist, token_hist) {
                    // One unreadable row must not hide the sums: its requests go uncounted
                    // in `quantiles_over`.
                    tracing::warn!("store: {table} row: {e}");
                }
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Every record that ended in `[since, until)`, oldest first, with its run and the
    /// journal segment it was finalised in (whose replay gives it again).
    pub fn records_between(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(RunSegment, FinalRecord)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, run, segment, json, rec FROM records WHERE end_unix_ms >= ?1 AND end_unix_ms < ?2 ORDER BY id",
        )?;
        let rows = st.query_map([since_ms, until_ms], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (id, run, segment, json, rec) = row?;
            Ok(((run, segment), Self::decode_row(id, &json, rec.as_deref())?))
        })
        .collect()
    }

    /// Each device's energy between two instants: per run that overlaps `[since, until)`,
    /// its devices' totals at the run's last snapshot at or before `until` less those at or
    /// before `since` (zero before the run's first), summed by device name. Two indexed
    /// lookups per run, whatever the window's length.
    pub fn device_window(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, [f64; 4])>, StoreError> {
        let mut runs = self.conn.prepare(
            "SELECT run FROM runs WHERE started_unix_ms < ?2 AND COALESCE(ended_unix_ms, 9223372036854775807) >= ?1",
        )?;
        let runs: Vec<i64> = runs
            .query_map([since_ms, until_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut at = self.conn.prepare_cached(
            "SELECT name, measured_j, request_j, idle_j, unattributed_j FROM device_totals \
             WHERE run = ?1 AND unix_ms = (SELECT MAX(unix_ms) FROM device_totals WHERE run = ?1 AND unix_ms <= ?2)",
        )?;
        let mut out: BTreeMap<String, [f64; 4]> = BTreeMap::new();
        for run in runs {
            for (t, sign) in [(until_ms, 1.0), (since_ms, -1.0)] {
                let rows = at.query_map(rusqlite::params![run, t], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?],
                    ))
                })?;
                for row in rows {
                    let (name, v): (String, [f64; 4]) = row?;
                    let e = out.entry(name).or_default();
                    for (k, x) in v.into_iter().enumerate() {
                        e[k] += sign * x;
                    }
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Each device's energy per summary interval within `[since, until)`: consecutive totals
    /// rows of a run, differenced (a run's first row starts nothing).
    pub fn intervals(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<crate::report::Interval>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT run, device, name, unix_ms, measured_j, request_j, idle_j, unattributed_j FROM device_totals ORDER BY run, device, unix_ms",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                [
                    r.get::<_, f64>(4)?,
                    r.get::<_, f64>(5)?,
                    r.get::<_, f64>(6)?,
                    r.get::<_, f64>(7)?,
                ],
            ))
        })?;
        let mut out = Vec::new();
        let mut prev: Option<(i64, i64, i64, [f64; 4])> = None;
        for row in rows {
            let (run, device, name, t, v) = row?;
            if let Some((prun, pdev, pt, pv)) = prev
                && prun == run
                && pdev == device
                && t > since_ms
                && pt < until_ms
            {
                let d = |i: usize| (v[i] - pv[i]).max(0.0);
                out.push(crate::report::Interval {
                    device: name,
                    from_ms: pt,
                    to_ms: t,
                    measured_j: d(0),
                    request_j: d(1),
                    idle_j: d(2),
                    unattributed_j: d(3),
                });
            }
            prev = Some((run, device, t, v));
        }
        Ok(out)
    }
}
