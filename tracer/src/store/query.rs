//! Reading the store: pages of records, one record's neighbours, sums per group (from the
//! records, or whole minutes from the rollups), records and device intervals for a bill.

use std::fmt::Write as _;

use super::{MINUTE_MS, Store, StoreError, StoredFilter};
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
}

impl GroupSums {
    /// One record's contribution to group `key` (what the records' sums add per row).
    pub fn of(key: String, r: &FinalRecord) -> Self {
        let rec = &r.record;
        let tokens = rec.completion_tokens.filter(|&t| t > 0);
        let (cost_nano, currency) = super::cost_nano(r);
        GroupSums {
            key,
            requests: 1,
            total_j: rec.total_j,
            dynamic_j: rec.dynamic_j,
            idle_j: rec.idle_j,
            output_tokens: tokens.unwrap_or(0),
            token_j: if tokens.is_some() { rec.total_j } else { 0.0 },
            cost_nano: cost_nano.unwrap_or(0),
            currency: currency.map(str::to_owned),
        }
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
    }
}

/// The currency of two sums: one, the other, or `*` for two different ones.
pub fn merge_currency(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) if a == b => Some(a),
        _ => Some("*".into()),
    }
}

fn currency_of(min: Option<String>, max: Option<String>) -> Option<String> {
    match (min.filter(|c| !c.is_empty()), max.filter(|c| !c.is_empty())) {
        (Some(a), Some(b)) if a == b => Some(a),
        (None, None) => None,
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
        let Some((clause, mut args)) = where_clause(filter, before) else {
            return Ok(Vec::new());
        };
        args.push((limit as i64).into());
        let sql = format!(
            "SELECT id, json FROM records WHERE {clause} ORDER BY id DESC LIMIT ?{}",
            args.len()
        );
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.map(|row| {
            let (id, json) = row?;
            Self::decode(id, &json)
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
        let sql = format!(
            "SELECT {key}, COUNT(*), SUM(total_j), SUM(dynamic_j), SUM(idle_j), \
             SUM(CASE WHEN completion_tokens > 0 THEN completion_tokens ELSE 0 END), \
             SUM(CASE WHEN completion_tokens > 0 THEN total_j ELSE 0 END), \
             SUM(COALESCE(cost_nano, 0)), MIN(NULLIF(currency, '')), MAX(NULLIF(currency, '')) \
             FROM records WHERE {clause} GROUP BY 1"
        );
        self.groups(&sql, args)
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
        let mut groups = std::collections::BTreeMap::<String, GroupSums>::new();
        let mut add = |g: GroupSums| {
            let e = groups.entry(g.key.clone()).or_insert_with(|| GroupSums {
                key: g.key.clone(),
                ..GroupSums::default()
            });
            e.add(&g);
        };
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
        let mut sql = String::from("minute >= ?1 AND minute < ?2");
        let mut args: Vec<rusqlite::types::Value> = vec![first.into(), last.into()];
        for (col, v) in [
            ("service_name", &filter.service_name),
            ("model", &filter.model),
            ("tenant", &filter.tenant),
            ("outcome", &filter.outcome),
        ] {
            if let Some(v) = v {
                args.push(v.clone().into());
                let _ = write!(sql, " AND {col} = ?{}", args.len());
            }
        }
        let sql = format!(
            "SELECT {key}, SUM(requests), SUM(total_j), SUM(dynamic_j), SUM(idle_j), SUM(output_tokens), SUM(token_j), \
             SUM(cost_nano), MIN(NULLIF(currency, '')), MAX(NULLIF(currency, '')) \
             FROM rollup WHERE {sql} GROUP BY 1"
        );
        self.groups(&sql, args)
    }

    /// Runs a sums query whose columns are: key, requests, total, dynamic and idle J, output
    /// tokens, their J, cost in billionths, lowest and highest currency.
    fn groups(
        &self,
        sql: &str,
        args: Vec<rusqlite::types::Value>,
    ) -> Result<Vec<GroupSums>, StoreError> {
        let mut st = self.conn.prepare(sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok(GroupSums {
                key: r.get(0)?,
                requests: r.get::<_, i64>(1)? as u64,
                total_j: r.get::<_, Option<f64>>(2)?.unwrap_or(0.0),
                dynamic_j: r.get::<_, Option<f64>>(3)?.unwrap_or(0.0),
                idle_j: r.get::<_, Option<f64>>(4)?.unwrap_or(0.0),
                output_tokens: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
                token_j: r.get::<_, Option<f64>>(6)?.unwrap_or(0.0),
                cost_nano: r.get::<_, Option<i64>>(7)?.unwrap_or(0),
                currency: currency_of(r.get(8)?, r.get(9)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every record that ended in `[since, until)`, oldest first, with its run and the
    /// journal segment it was finalised in (whose replay gives it again).
    pub fn records_between(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(RunSegment, FinalRecord)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, run, segment, json FROM records WHERE end_unix_ms >= ?1 AND end_unix_ms < ?2 ORDER BY id",
        )?;
        let rows = st.query_map([since_ms, until_ms], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (id, run, segment, json) = row?;
            Ok(((run, segment), Self::decode(id, &json)?))
        })
        .collect()
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
