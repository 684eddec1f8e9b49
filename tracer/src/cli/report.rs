//! `tracer report`: the bill, from the store (or a recording), with the audit trail that lets a
//! customer check it: the tracer version, the tariff, the runs and their attribution policies,
//! the journals that reproduce each line (`tracer replay`), the devices' energy and gaps.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rust_decimal::Decimal;
use serde::Serialize;

use super::{ReportArgs, ReportFormat};
use crate::{
    bill::{self, Tariff, TokenTable, round_minor},
    config::Config,
    pipeline::FinalRecord,
    record::{
        format::{Replayer, segment_path},
        replay,
    },
    report::{self as billing, Bill, Interval, plots},
    store::Store,
    wallclock::utc,
};

/// A run the bill covers, and how to reproduce its lines.
#[derive(Debug, Serialize)]
struct RunAudit {
    run: i64,
    first_request_id: u64,
    next_request_id: Option<u64>,
    recovered_records: i64,
    /// The run's oldest journal segment still kept: `tracer replay` of it and those after it
    /// gives the run's records from there on again.
    journal: Option<PathBuf>,
    split: Option<String>,
    idle: Option<String>,
    step_clock: Option<String>,
}

/// What a bill states about its inputs.
#[derive(Debug, Serialize)]
struct Audit {
    tracer_version: &'static str,
    source: String,
    since_unix_ms: Option<i64>,
    until_unix_ms: Option<i64>,
    tariff: Tariff,
    runs: Vec<RunAudit>,
    /// Per device: measured energy over the period and its intervals.
    devices: Vec<(String, f64, usize)>,
    /// Σ over the requests of time on a device without power data.
    request_coverage_gap_ns: u64,
    /// Per request id, the recording (journal segment) whose `tracer replay` gives its line
    /// again, while it is kept.
    reproduce: std::collections::BTreeMap<u64, PathBuf>,
}

/// What a bill is computed from: records, the devices' intervals, the runs, and per request
/// the recording that reproduces it.
type Sources = (
    Vec<FinalRecord>,
    Vec<Interval>,
    Vec<RunAudit>,
    std::collections::BTreeMap<u64, PathBuf>,
);

fn policies(journal: &Path) -> (Option<String>, Option<String>, Option<String>) {
    let name = |v: serde_json::Value| v.as_str().map(str::to_string);
    match Replayer::open(journal) {
        Ok(r) => {
            let l = &r.header.pipeline.ledger;
            (
                serde_json::to_value(l.split).ok().and_then(name),
                serde_json::to_value(l.idle).ok().and_then(name),
                serde_json::to_value(l.step_clock).ok().and_then(name),
            )
        }
        Err(_) => (None, None, None),
    }
}

fn from_store(dir: &Path, since: i64, until: i64) -> anyhow::Result<Sources> {
    let store =
        Store::open_reader(dir).with_context(|| format!("opening the store {}", dir.display()))?;
    let rows = store.records_between(since, until)?;
    let intervals = store.intervals(since, until)?;
    let used: std::collections::BTreeSet<i64> = rows.iter().map(|((run, _), _)| *run).collect();
    let mut reproduce = std::collections::BTreeMap::new();
    // Each segment's file looked up once, not once per record.
    let mut kept: std::collections::BTreeMap<(i64, u32), Option<PathBuf>> =
        std::collections::BTreeMap::new();
    for ((run, segment), r) in &rows {
        let path = kept.entry((*run, *segment)).or_insert_with(|| {
            let p = segment_path(&store.journal_path(*run), *segment);
            p.exists().then_some(p)
        });
        if let Some(p) = path {
            reproduce.insert(r.record.id.0, p.clone());
        }
    }
    let runs = store
        .runs()?
        .into_iter()
        .filter(|(r, _)| used.contains(&r.run))
        .map(|(r, recovered)| {
            let journal = store
                .journal_segments(r.run)
                .into_iter()
                .next()
                .map(|(_, p)| p);
            let (split, idle, step_clock) = journal.as_deref().map_or((None, None, None), policies);
            RunAudit {
                run: r.run,
                first_request_id: r.first_request_id,
                next_request_id: r.next_request_id,
                recovered_records: recovered,
                journal,
                split,
                idle,
                step_clock,
            }
        })
        .collect();
    Ok((
        rows.into_iter().map(|(_, r)| r).collect(),
        intervals,
        runs,
        reproduce,
    ))
}

/// `paths`: a recording, or consecutive segments of a journal.
fn from_recording(paths: &[PathBuf], since: i64, until: i64) -> anyhow::Result<Sources> {
    let (path, rest) = paths
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no recording"))?;
    let (all, summary) = replay::replay_records(&replay::ReplayOptions {
        continued: rest.to_vec(),
        ..replay::ReplayOptions::of(path)
    })?;
    let first = Replayer::open(path)?.header.segment;
    let mut records = Vec::new();
    let mut reproduce = std::collections::BTreeMap::new();
    for r in all
        .iter()
        .filter(|r| r.record.end_unix_ms >= since && r.record.end_unix_ms < until)
    {
        // The segment it was finalised in replays it on its own.
        let at = paths
            .get(r.segment.saturating_sub(first) as usize)
            .unwrap_or(path);
        reproduce.insert(r.record.record.id.0, at.clone());
        records.push(FinalRecord::clone(&r.record));
    }
    // A recording's devices' energy, as one interval over its requests' span.
    let from = records
        .iter()
        .map(|r| r.end_unix_ms - ((r.record.end_ns - r.record.arrive_ns) / 1_000_000) as i64)
        .min()
        .unwrap_or(0);
    let to = records.iter().map(|r| r.end_unix_ms).max().unwrap_or(from);
    let interval = Interval {
        device: "all devices".into(),
        from_ms: from,
        to_ms: to.max(from + 1),
        measured_j: summary.measured_j,
        request_j: summary.attributed_j,
        idle_j: summary.idle_j,
        unattributed_j: summary.unattributed_j,
    };
    let (split, idle, step_clock) = policies(path);
    let run = RunAudit {
        run: 0,
        first_request_id: records.first().map_or(1, |r| r.record.id.0),
        next_request_id: Some(summary.next_request_id),
        recovered_records: 0,
        journal: Some(path.to_owned()),
        split,
        idle,
        step_clock,
    };
    Ok((records, vec![interval], vec![run], reproduce))
}

fn tariff_line(t: &Tariff) -> String {
    let price = if t.price.0.len() == 1 {
        format!("{} {}/kWh (flat)", t.price.0[0].1, t.currency)
    } else {
        format!(
            "time of use: {}",
            t.price
                .0
                .iter()
                .map(|(from, p)| {
                    if *from == i64::MIN {
                        format!("{p}")
                    } else {
                        format!("{p} from {}", utc(*from))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "{price} | PUE {} | overhead {} per request | carbon {} | idle: {}",
        t.pue,
        t.overhead_per_request,
        t.carbon
            .as_ref()
            .map_or_else(|| "not set".into(), |c| format!("{} gCO2e/kWh", c.at(0))),
        match t.idle {
            bill::IdleAllocation::None => "own line",
            bill::IdleAllocation::ProRata => "spread over requests pro rata",
        }
    )
}

fn table(b: &Bill, audit: &Audit) -> String {
    let mut o = String::new();
    let cur = &b.currency;
    // Lines to the micro-unit (a request costs fractions of a cent), totals to the minor unit.
    let m = |d: Decimal| d.round_dp(6);
    let _ = writeln!(
        o,
        "tracer {} bill from {}, {} .. {}",
        audit.tracer_version,
        audit.source,
        audit.since_unix_ms.map_or_else(|| "the start".into(), utc),
        audit.until_unix_ms.map_or_else(|| "now".into(), utc)
    );
    let _ = writeln!(o, "tariff: {}", tariff_line(&audit.tariff));
    for r in &audit.runs {
        let _ = writeln!(
            o,
            "run {}: ids {}..{} (split {}, idle {}, step clock {}){}{}",
            r.run,
            r.first_request_id,
            r.next_request_id
                .map_or_else(|| "open".into(), |n| n.to_string()),
            r.split.as_deref().unwrap_or("?"),
            r.idle.as_deref().unwrap_or("?"),
            r.step_clock.as_deref().unwrap_or("?"),
            r.journal.as_ref().map_or_else(String::new, |j| format!(
                "; reproduce: tracer replay {}",
                j.display()
            )),
            if r.recovered_records > 0 {
                format!("; {} records recovered after a crash", r.recovered_records)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "\n{:<24} {:>9} {:>12} {:>14} {:>16} {:>9} {:>10}",
        format!("{:?}", b.by).to_lowercase(),
        "requests",
        "kWh",
        format!("energy {cur}"),
        format!("per-token {cur}"),
        "saving",
        "g CO2e"
    );
    for g in &b.groups {
        let _ = writeln!(
            o,
            "{:<24} {:>9} {:>12.6} {:>14} {:>16} {:>9} {:>10.2}",
            g.key,
            g.requests,
            g.kwh,
            m(g.cost),
            if g.priced > 0 {
                m(g.per_token_cost).to_string()
            } else {
                "-".into()
            },
            g.savings_pct()
                .map_or_else(|| "-".into(), |s| format!("{s:.1} %")),
            rust_decimal::prelude::ToPrimitive::to_f64(&g.emissions_g).unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        o,
        "{:<24} {:>9} {:>12.6} {:>14}",
        "idle",
        "",
        b.idle_j / 3.6e6,
        m(b.idle)
    );
    let _ = writeln!(
        o,
        "{:<24} {:>9} {:>12.6} {:>14}",
        "unattributed",
        "",
        b.unattributed_j / 3.6e6,
        m(b.unattributed)
    );
    let _ = writeln!(
        o,
        "{:<24} {:>9} {:>12} {:>14}   (the lines rounded to the minor unit leave this)",
        "rounding", "", "", b.rounding
    );
    let _ = writeln!(
        o,
        "{:<24} {:>9} {:>12} {:>14} {cur}   ({} at the minor unit)",
        "total",
        "",
        "",
        m(b.lines.iter().map(|l| l.cost).sum::<Decimal>() + b.idle + b.unattributed),
        round_minor(b.total, cur)
    );
    let _ = writeln!(
        o,
        "\ncheck: the devices measured {:.6} kWh over the period's intervals, costing {} {cur}",
        b.measured_j / 3.6e6,
        m(b.measured_cost)
    );
    for (d, j, n) in &audit.devices {
        let _ = writeln!(o, "  {d}: {:.6} kWh in {n} intervals", j / 3.6e6);
    }
    let _ = writeln!(
        o,
        "requests' time on a device without power data: {:.3} s",
        audit.request_coverage_gap_ns as f64 / 1e9
    );
    o
}

fn csv(b: &Bill, reproduce: &std::collections::BTreeMap<u64, PathBuf>) -> String {
    let mut o = String::from(
        "id,service,model,tenant,start_unix_ms,end_unix_ms,joules,bar_j,cost,cost_bar,currency,per_token_cost,prompt_tokens,cached_tokens,completion_tokens,occupancy,emissions_g,outcome,journal\n",
    );
    let q = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let opt = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    for l in &b.lines {
        let _ = writeln!(
            o,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            l.id,
            q(&l.service),
            q(l.model.as_deref().unwrap_or("")),
            q(l.tenant.as_deref().unwrap_or("")),
            l.start_unix_ms,
            l.end_unix_ms,
            l.joules,
            l.bar_j,
            l.cost.round_dp(9),
            l.cost_bar.round_dp(9),
            b.currency,
            l.per_token_cost
                .map_or_else(String::new, |c| c.round_dp(9).to_string()),
            opt(l.prompt_tokens),
            opt(l.cached_tokens),
            opt(l.completion_tokens),
            l.occupancy.map_or_else(String::new, |o| format!("{o:.2}")),
            l.emissions_g
                .map_or_else(String::new, |g| g.round_dp(6).to_string()),
            l.outcome,
            q(&reproduce
                .get(&l.id)
                .map_or_else(String::new, |p| p.display().to_string()))
        );
    }
    o
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(b: &Bill, audit: &Audit, intervals: &[Interval]) -> anyhow::Result<String> {
    let mut o = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>tracer bill</title>\n<style>body{font-family:sans-serif;max-width:1600px;margin:2em auto}pre{background:#f6f6f6;padding:1em;overflow:auto}.plots{display:flex;flex-wrap:wrap;gap:12px}</style></head><body>\n<h1>Energy bill</h1>\n<pre>",
    );
    o.push_str(&html_escape(&table(b, audit)));
    o.push_str("</pre>\n<div class=\"plots\">\n");
    for (_, svg) in plots::all(b, intervals)? {
        o.push_str(&svg);
        o.push('\n');
    }
    o.push_str("</div>\n<h2>Audit</h2>\n<pre>");
    o.push_str(&html_escape(&serde_json::to_string_pretty(audit)?));
    o.push_str("</pre>\n</body></html>\n");
    Ok(o)
}

fn write_out(out: Option<&Path>, text: &str) -> anyhow::Result<()> {
    if let Some(p) = out {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
    } else {
        print!("{text}");
        Ok(())
    }
}

/// Runs `tracer report`.
pub fn run(a: &ReportArgs) -> anyhow::Result<()> {
    let config = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    let mut bc = config.bill.clone();
    if let Some(p) = a.price {
        bc.price_per_kwh = Some(p);
        bc.price_csv = None;
    }
    if let Some(p) = &a.price_csv {
        bc.price_csv = Some(p.clone());
    }
    if let Some(c) = &a.currency {
        bc.currency.clone_from(c);
    }
    if let Some(p) = a.pue {
        bc.pue = p;
    }
    if let Some(o) = a.overhead {
        bc.overhead_per_request = o;
    }
    if let Some(c) = a.carbon {
        bc.carbon_g_per_kwh = Some(c);
        bc.carbon_csv = None;
    }
    if let Some(i) = a.idle {
        bc.idle = i;
    }
    let tariff = bc.tariff()?.ok_or_else(|| {
        anyhow::anyhow!("no price: give --price or --price-csv (or [bill] in the config)")
    })?;
    let tokens = a
        .per_token_prices
        .as_deref()
        .map(TokenTable::from_file)
        .transpose()?;
    if let Some(c) = tokens.as_ref().and_then(|t| t.currency.as_deref())
        && !c.eq_ignore_ascii_case(&tariff.currency)
    {
        anyhow::bail!(
            "the per-token prices are in {c}, the tariff in {}: give --currency {c} or convert",
            tariff.currency
        );
    }
    let time = |v: &Option<String>, what: &str| -> anyhow::Result<Option<i64>> {
        v.as_deref()
            .map(|s| {
                crate::wallclock::parse_time(s).ok_or_else(|| {
                    anyhow::anyhow!("--{what}: {s:?} is neither Unix ms nor RFC 3339")
                })
            })
            .transpose()
    };
    let (since, until) = (time(&a.since, "since")?, time(&a.until, "until")?);
    let (lo, hi) = (since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX));
    if !a.recording.is_empty() && (since.is_some() || until.is_some()) {
        // A recording's device totals are the whole recording's.
        anyhow::bail!(
            "--since/--until bill part of a store; a recording is billed whole (cut it with the store instead)"
        );
    }
    let (records, intervals, runs, reproduce, source) = if let Some(rec) = a.recording.first() {
        let (r, i, runs, p) = from_recording(&a.recording, lo, hi)?;
        let more = a.recording.len() - 1;
        let source = if more > 0 {
            format!(
                "the recording {} and {more} later segment(s)",
                rec.display()
            )
        } else {
            format!("the recording {}", rec.display())
        };
        (r, i, runs, p, source)
    } else {
        let dir = a
            .store
            .clone()
            .or_else(|| config.store.path.clone())
            .ok_or_else(|| anyhow::anyhow!("no store: give --store or --recording"))?;
        let (r, i, runs, p) = from_store(&dir, lo, hi)?;
        (r, i, runs, p, format!("the store {}", dir.display()))
    };
    let b = billing::bill(&records, &intervals, &tariff, tokens.as_ref(), a.by);
    let mut devices = std::collections::BTreeMap::<String, (f64, usize)>::new();
    for i in &intervals {
        let d = devices.entry(i.device.clone()).or_default();
        d.0 += i.measured_j;
        d.1 += 1;
    }
    let audit = Audit {
        tracer_version: env!("CARGO_PKG_VERSION"),
        source,
        since_unix_ms: since,
        until_unix_ms: until,
        tariff,
        runs,
        devices: devices.into_iter().map(|(k, (j, n))| (k, j, n)).collect(),
        request_coverage_gap_ns: records.iter().map(|r| r.record.coverage_gap_ns).sum(),
        reproduce,
    };
    match a.format {
        ReportFormat::Table => write_out(a.out.as_deref(), &table(&b, &audit)),
        ReportFormat::Json => write_out(
            a.out.as_deref(),
            &(serde_json::to_string_pretty(&serde_json::json!({ "audit": audit, "bill": b }))?
                + "\n"),
        ),
        ReportFormat::Csv => write_out(a.out.as_deref(), &csv(&b, &audit.reproduce)),
        ReportFormat::Html => write_out(a.out.as_deref(), &html(&b, &audit, &intervals)?),
        ReportFormat::Svg => {
            let dir = a.out.as_deref().ok_or_else(|| {
                anyhow::anyhow!("--format svg writes one file per plot: give --out DIR")
            })?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, svg) in plots::all(&b, &intervals)? {
                let p = dir.join(format!("{name}.svg"));
                std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
                eprintln!("{}", p.display());
            }
            Ok(())
        }
    }
}
