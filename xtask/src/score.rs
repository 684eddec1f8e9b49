//! Scoring the demo's energy records against the emulated host's ground truth, and what the
//! host's own logs say about queueing and the API process's writes.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// Queue waits above this count as queued.
const QUEUED_US: u64 = 50_000;

pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The `q` quantile of `v` (sorted in place); NaN when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A record's sum over its GPU shares of `field`.
pub fn gpu_sum(r: &Value, field: &str) -> f64 {
    r["devices"].as_array().map_or(0.0, |ds| {
        ds.iter()
            .filter(|d| d["kind"] == "gpu")
            .filter_map(|d| d[field].as_f64())
            .sum()
    })
}

/// Completed requests of the truth file, by request id.
pub fn truth_by_id(truth: &[Value]) -> BTreeMap<&str, &Value> {
    truth
        .iter()
        .filter(|t| t["aborted"] == false)
        .filter_map(|t| Some((t["request_id"].as_str()?, t)))
        .collect()
}

/// One variant's score over all completed requests of the truth.
#[derive(Debug, Clone, Default)]
pub struct Score {
    pub requests: usize,
    pub matched: usize,
    /// |error| against the caused truth, in %, per request (a request without a record: 100).
    errs: Vec<f64>,
    /// |error| against the time-sharing truth, in %.
    ts_errs: Vec<f64>,
    /// Error bar (±) relative to the caused truth, in %.
    bars: Vec<f64>,
    inside: usize,
}

impl Score {
    pub fn of(records: &[Value], truth: &[Value]) -> Score {
        let by_id = truth_by_id(truth);
        let recs: BTreeMap<&str, &Value> = records
            .iter()
            .filter_map(|r| Some((r["external_id"].as_str()?, r)))
            .collect();
        let mut s = Score {
            requests: by_id.len(),
            ..Score::default()
        };
        for (id, t) in &by_id {
            let caused = t["dynamic_j"].as_f64().unwrap_or(0.0);
            let ts = t["timeshare_dynamic_j"].as_f64().unwrap_or(f64::NAN);
            let Some(r) = recs.get(id) else {
                s.errs.push(100.0);
                s.ts_errs.push(100.0);
                continue;
            };
            s.matched += 1;
            let got = gpu_sum(r, "dynamic_j");
            let bar = gpu_sum(r, "uncertainty_j");
            if caused > 0.0 {
                s.errs.push((got - caused).abs() / caused * 100.0);
                s.bars.push(bar / caused * 100.0);
            }
            if ts > 0.0 {
                s.ts_errs.push((got - ts).abs() / ts * 100.0);
            }
            if (got - caused).abs() <= bar {
                s.inside += 1;
            }
        }
        s
    }

    pub fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {}/{} | {:.2} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} |",
            self.matched,
            self.requests,
            quantile(&mut self.errs.clone(), 0.5),
            quantile(&mut self.errs.clone(), 0.95),
            self.inside as f64 / self.requests.max(1) as f64 * 100.0,
            quantile(&mut self.bars.clone(), 0.5),
            quantile(&mut self.ts_errs.clone(), 0.5),
            quantile(&mut self.ts_errs.clone(), 0.95),
        )
    }
}

pub const TABLE_HEAD: &str = "| variant | records/requests | median \\|err\\| % | p95 \\|err\\| % | bar holds truth % | median bar ± % | median \\|err\\| vs timeshare % | p95 \\|err\\| vs timeshare % |\n|---|---|---|---|---|---|---|---|";

/// Prints how many requests queued before the engine admitted them.
pub fn print_queueing(truth: &[Value]) {
    let mut waits: Vec<f64> = truth_by_id(truth)
        .values()
        .filter_map(|t| {
            Some(
                t["scheduled_us"]
                    .as_u64()?
                    .saturating_sub(t["arrive_us"].as_u64()?),
            )
        })
        .map(|us| us as f64 / 1000.0)
        .collect();
    let queued = waits
        .iter()
        .filter(|&&ms| ms > QUEUED_US as f64 / 1000.0)
        .count();
    let n = waits.len();
    println!(
        "queueing: {queued} of {n} requests waited more than {} ms for the batch (wait median {:.1} ms, p95 {:.1} ms)",
        QUEUED_US / 1000,
        quantile(&mut waits, 0.5),
        quantile(&mut waits, 0.95),
    );
    let preemptions: Vec<u64> = truth_by_id(truth)
        .values()
        .filter_map(|t| t["preemptions"].as_u64())
        .filter(|&p| p > 0)
        .collect();
    if !preemptions.is_empty() {
        println!(
            "preemption: {} of {n} requests were preempted and recomputed ({} preemptions)",
            preemptions.len(),
            preemptions.iter().sum::<u64>()
        );
    }
}

/// Prints how the API process's writer loop spread each step's writes.
pub fn print_write_spread(write_log: &Path) {
    let Ok(steps) = read_jsonl(write_log) else {
        println!("write spread: no write log");
        return;
    };
    let field = |s: &Value, k: &str| s[k].as_u64();
    let mut spread_ms = Vec::new();
    let mut lag_ms = Vec::new();
    let mut writes = Vec::new();
    for s in &steps {
        let (Some(first), Some(last), Some(recv)) = (
            field(s, "first_write_us"),
            field(s, "last_write_us"),
            field(s, "recv_us"),
        ) else {
            continue;
        };
        writes.push(field(s, "writes").unwrap_or(0) as f64);
        spread_ms.push(last.saturating_sub(first) as f64 / 1000.0);
        lag_ms.push(last.saturating_sub(recv) as f64 / 1000.0);
    }
    println!(
        "write spread: {} steps, {} with writes (median {:.0} writes); first to last chunk of a step: median {:.2} ms, p95 {:.2} ms; step message to last chunk: median {:.2} ms, p95 {:.2} ms",
        steps.len(),
        writes.len(),
        quantile(&mut writes, 0.5),
        quantile(&mut spread_ms, 0.5),
        quantile(&mut spread_ms, 0.95),
        quantile(&mut lag_ms, 0.5),
        quantile(&mut lag_ms, 0.95),
    );
}
