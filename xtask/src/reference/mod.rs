//! `cargo xtask reference DIR`: the physical reference's tables (issue 18) from what
//! `tests/device/reference.sh` wrote — the load log (`load.jsonl`), the independent energy log
//! (`energy.log`) and tracer's records (`records.jsonl`, and `records-equal.jsonl`, the same
//! recording replayed under plain time sharing).
//!
//! Nothing here uses tracer's model: the reference energies come from the counter alone, and
//! the class split from the two-class Shapley value over four periods of equal length.

mod counter;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::stats::{Mean, mean_ci, median};
pub use counter::Counter;

/// Padding around a sequential request's counter window: a few counter updates (about 100 ms
/// apart on NVIDIA GPUs), so the energy the request caused is inside the window and the idle
/// subtracted over the padding is small.
const SEQ_PAD_NS: u64 = 300_000_000;

/// One period of the load: which classes ran, when, in which repetition.
#[derive(Debug, Clone)]
pub struct Period {
    pub label: String,
    pub rep: u64,
    pub set: String,
    pub start_ns: u64,
    pub arrive_end_ns: u64,
    pub end_ns: u64,
    pub spill: u64,
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub label: String,
    pub id: String,
    pub class: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
}

/// tracer's figure for one request: dynamic energy on the chosen devices, and its bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figure {
    pub dynamic_j: f64,
    pub bar_j: f64,
}

/// Everything the tables are made from.
pub struct Inputs {
    pub counter: Counter,
    pub periods: Vec<Period>,
    pub requests: Vec<Request>,
    pub tput: Vec<(String, f64)>,
    /// By `X-Request-Id`: the default split, and plain time sharing where it was replayed.
    pub caused: BTreeMap<String, Figure>,
    pub equal: BTreeMap<String, Figure>,
    /// Which device kind was summed (`gpu`, or every device in a dry run without one).
    pub kind: String,
}

fn u(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("`{key}` missing in {v}"))
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

/// The load log: periods, requests, and throughput windows (label, tokens/s).
pub type Load = (Vec<Period>, Vec<Request>, Vec<(String, f64)>);

/// Reads the load log's periods, requests and throughput windows.
pub fn parse_load(text: &str) -> Result<Load> {
    let (mut periods, mut requests, mut tput) = (Vec::new(), Vec::new(), Vec::new());
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("load log line {}", n + 1))?;
        match v["kind"].as_str() {
            Some("period") => periods.push(Period {
                label: s(&v, "label"),
                rep: u(&v, "rep")?,
                set: s(&v, "set"),
                start_ns: u(&v, "start_ns")?,
                arrive_end_ns: u(&v, "arrive_end_ns")?,
                end_ns: u(&v, "end_ns")?,
                spill: v["spill"].as_u64().unwrap_or(0),
            }),
            Some("request") => requests.push(Request {
                label: s(&v, "label"),
                id: s(&v, "id"),
                class: s(&v, "class"),
                start_ns: u(&v, "start_ns")?,
                end_ns: u(&v, "end_ns")?,
                ok: v["status"].as_u64() == Some(200) && v["error"].is_null(),
            }),
            Some("tput") => tput.push((
                s(&v, "label"),
                v["tokens_per_s"]
                    .as_f64()
                    .context("tput without tokens_per_s")?,
            )),
            _ => bail!("load log line {}: unknown kind", n + 1),
        }
    }
    Ok((periods, requests, tput))
}

/// Reads tracer's records: per `external_id`, the dynamic energy and bar on devices of `kind`
/// (every device where `kind` is `None`).
pub fn parse_records(text: &str, kind: Option<&str>) -> Result<BTreeMap<String, Figure>> {
    let mut out = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line).with_context(|| format!("record {}", n + 1))?;
        let Some(id) = v["external_id"].as_str() else {
            continue;
        };
        let mut f = Figure::default();
        for d in v["devices"].as_array().into_iter().flatten() {
            if kind.is_none_or(|k| d["kind"].as_str() == Some(k)) {
                f.dynamic_j += d["dynamic_j"].as_f64().unwrap_or(0.0);
                f.bar_j += d["uncertainty_j"].as_f64().unwrap_or(0.0);
            }
        }
        out.insert(id.to_owned(), f);
    }
    Ok(out)
}

impl Inputs {
    /// Reads a reference run's folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            fs::read_to_string(dir.join(name))
                .with_context(|| format!("reading {}", dir.join(name).display()))
        };
        let counter = Counter::parse(&read("energy.log")?)?;
        let (periods, requests, tput) = parse_load(&read("load.jsonl")?)?;
        let records = read("records.jsonl")?;
        let has_gpu = records.contains(r#""kind":"gpu""#);
        let kind = has_gpu.then_some("gpu");
        let caused = parse_records(&records, kind)?;
        let equal = match fs::read_to_string(dir.join("records-equal.jsonl")) {
            Ok(t) => parse_records(&t, kind)?,
            Err(_) => BTreeMap::new(),
        };
        Ok(Self {
            counter,
            periods,
            requests,
            tput,
            caused,
            equal,
            kind: kind
                .unwrap_or("all (no GPU in the records: a dry run)")
                .to_owned(),
        })
    }

    fn period(&self, label: &str, rep: u64, set: &str) -> Option<&Period> {
        self.periods
            .iter()
            .find(|p| p.label == label && p.rep == rep && p.set == set)
    }

    fn requests_in<'a>(&'a self, p: &'a Period) -> impl Iterator<Item = &'a Request> + 'a {
        self.requests.iter().filter(move |r| {
            r.label == p.label && r.start_ns >= p.start_ns && r.start_ns < p.arrive_end_ns
        })
    }

    /// Mean power of a label's idle periods (W).
    fn idle_w(&self, label: &str, rep: Option<u64>) -> Result<f64> {
        let mut w = Vec::new();
        for p in self
            .periods
            .iter()
            .filter(|p| p.label == label && p.set == "0")
        {
            if rep.is_none_or(|r| r == p.rep) {
                let j = self.counter.energy_j(p.start_ns, p.end_ns)?;
                w.push(j / ns_to_s(p.end_ns - p.start_ns));
            }
        }
        if w.is_empty() {
            bail!("no idle period for {label}");
        }
        Ok(w.iter().sum::<f64>() / w.len() as f64)
    }

    /// Dynamic energy of a period: the counter's energy less the repetition's idle power.
    fn dynamic_j(&self, p: &Period, idle_w: f64) -> Result<f64> {
        Ok(self.counter.energy_j(p.start_ns, p.end_ns)? - idle_w * ns_to_s(p.end_ns - p.start_ns))
    }
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One repetition of the four-period experiment.
#[derive(Debug, Clone, Default)]
pub struct Rep {
    pub d_a_j: f64,
    pub d_b_j: f64,
    pub d_ab_j: f64,
    pub phi_a_j: f64,
    pub phi_b_j: f64,
    /// tracer's sums over each class's requests in the A + B period, and their bars.
    pub caused_a: Figure,
    pub caused_b: Figure,
    pub equal_a: Figure,
    pub equal_b: Figure,
    /// Requests sent in the A + B period that tracer has no record of.
    pub missing: usize,
    /// Time-weighted share of class A among requests in flight while both classes were
    /// (none if they never were at once).
    pub presence_a: Option<f64>,
}

/// The two-class Shapley split of one repetition (`label`: `main` or `svc`).
pub fn shapley_rep(inp: &Inputs, label: &str, rep: u64) -> Result<Rep> {
    let get = |set: &str| {
        inp.period(label, rep, set)
            .with_context(|| format!("{label} rep {rep}: no period {set}"))
    };
    let idle_w = inp.idle_w(label, Some(rep))?;
    let (alone_a, alone_b, both) = (get("A")?, get("B")?, get("AB")?);
    let mut r = Rep {
        d_a_j: inp.dynamic_j(alone_a, idle_w)?,
        d_b_j: inp.dynamic_j(alone_b, idle_w)?,
        d_ab_j: inp.dynamic_j(both, idle_w)?,
        ..Rep::default()
    };
    r.phi_a_j = 0.5 * ((r.d_ab_j - r.d_b_j) + r.d_a_j);
    r.phi_b_j = 0.5 * ((r.d_ab_j - r.d_a_j) + r.d_b_j);
    for q in inp.requests_in(both) {
        let add = |sum: &mut Figure, f: Option<&Figure>| {
            if let Some(f) = f {
                sum.dynamic_j += f.dynamic_j;
                sum.bar_j += f.bar_j;
            }
        };
        let (caused, equal) = if q.class == "A" {
            (&mut r.caused_a, &mut r.equal_a)
        } else {
            (&mut r.caused_b, &mut r.equal_b)
        };
        add(caused, inp.caused.get(&q.id));
        add(equal, inp.equal.get(&q.id));
        r.missing += usize::from(!inp.caused.contains_key(&q.id));
    }
    r.presence_a = presence_share(inp.requests_in(both), "A");
    Ok(r)
}

/// Over the times when requests of both classes are in flight (as the client saw them), the
/// time-weighted mean of class `class`'s share of the requests in flight. The convention shares
/// a step's fixed part equally among the requests in it; Shapley over two classes halves what
/// their overlap saves. The difference between the two is this share less one half.
fn presence_share<'a>(reqs: impl Iterator<Item = &'a Request>, class: &str) -> Option<f64> {
    let mut edges: Vec<(u64, i32, bool)> = Vec::new();
    for r in reqs {
        let mine = r.class == class;
        edges.push((r.start_ns, 1, mine));
        edges.push((r.end_ns, -1, mine));
    }
    edges.sort_unstable();
    let (mut n_mine, mut n_other, mut last) = (0_i64, 0_i64, 0_u64);
    let (mut weighted, mut total) = (0.0, 0.0);
    for (t, d, mine) in edges {
        if n_mine > 0 && n_other > 0 {
            let dt = (t - last) as f64;
            weighted += dt * n_mine as f64 / (n_mine + n_other) as f64;
            total += dt;
        }
        if mine {
            n_mine += i64::from(d);
        } else {
            n_other += i64::from(d);
        }
        last = t;
    }
    (total > 0.0).then(|| weighted / total)
}

/// One sequential request: its counter window's dynamic energy against tracer's record.
#[derive(Debug, Clone)]
pub struct Seq {
    pub id: String,
    pub reference_j: f64,
    pub caused: Option<Figure>,
}

/// Each request of `seq` against its own counter window, idle (from `main`'s idle periods)
/// subtracted.
pub fn sequential(inp: &Inputs) -> Result<Vec<Seq>> {
    let idle_w = inp.idle_w("main", None)?;
    let mut out = Vec::new();
    for r in inp.requests.iter().filter(|r| r.label == "seq" && r.ok) {
        let (a, b) = (r.start_ns.saturating_sub(SEQ_PAD_NS), r.end_ns + SEQ_PAD_NS);
        let reference_j = inp.counter.energy_j(a, b)? - idle_w * ns_to_s(b - a);
        out.push(Seq {
            id: r.id.clone(),
            reference_j,
            caused: inp.caused.get(&r.id).copied(),
        });
    }
    Ok(out)
}

fn pct(x: f64, of: f64) -> f64 {
    100.0 * x / of
}

/// The four-period table for `label`, as markdown.
fn shapley_table(inp: &Inputs, label: &str, names: (&str, &str)) -> Result<String> {
    let reps: Vec<u64> = {
        let mut v: Vec<u64> = inp
            .periods
            .iter()
            .filter(|p| p.label == label)
            .map(|p| p.rep)
            .collect();
        v.dedup();
        v
    };
    let rows: Vec<Rep> = reps
        .iter()
        .map(|&r| shapley_rep(inp, label, r))
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        bail!("no periods labelled {label}");
    }
    let col = |f: &dyn Fn(&Rep) -> f64| mean_ci(&rows.iter().map(f).collect::<Vec<_>>());
    let mut t = String::new();
    let spill: u64 = inp
        .periods
        .iter()
        .filter(|p| p.label == label)
        .map(|p| p.spill)
        .sum();
    let missing: usize = rows.iter().map(|r| r.missing).sum();
    writeln!(
        t,
        "{} repetitions; requests still running at a period's end: {spill}; A + B requests \
         without a record: {missing}\n",
        rows.len()
    )?;
    writeln!(
        t,
        "| dynamic energy (J), mean ± 95 % CI | {} | {} | both |",
        names.0, names.1
    )?;
    writeln!(t, "|---|---|---|---|")?;
    let (da, db, dab) = (col(&|r| r.d_a_j), col(&|r| r.d_b_j), col(&|r| r.d_ab_j));
    writeln!(t, "| E(alone) − E(∅) | {da} | {db} | — |")?;
    writeln!(t, "| E(A+B) − E(∅) | — | — | {dab} |")?;
    let inter = col(&|r| r.d_ab_j - r.d_a_j - r.d_b_j);
    writeln!(
        t,
        "| interaction E(A+B) − E(A) − E(B) + E(∅) | — | — | {inter} |"
    )?;
    let (pa, pb) = (col(&|r| r.phi_a_j), col(&|r| r.phi_b_j));
    writeln!(t, "| **Shapley φ** | {pa} | {pb} | {dab} |")?;
    let fig = |f: &dyn Fn(&Rep) -> Figure| {
        let m = col(&|r| f(r).dynamic_j);
        let bar = rows.iter().map(|r| f(r).bar_j).sum::<f64>() / rows.len() as f64;
        (m, bar)
    };
    let (ca, cb) = (fig(&|r| r.caused_a), fig(&|r| r.caused_b));
    let call = col(&|r| r.caused_a.dynamic_j + r.caused_b.dynamic_j);
    writeln!(
        t,
        "| tracer Σ (convention), bar | {} (bar ±{:.0}) | {} (bar ±{:.0}) | {call} |",
        ca.0, ca.1, cb.0, cb.1
    )?;
    let diff = |c: &Mean, p: &Mean| format!("{:+.1} %", pct(c.mean - p.mean, p.mean));
    writeln!(
        t,
        "| tracer − φ | {} | {} | {} |",
        diff(&ca.0, &pa),
        diff(&cb.0, &pb),
        diff(&call, &dab)
    )?;
    let holds = |c: &(Mean, f64), p: &Mean| {
        if (c.0.mean - p.mean).abs() <= c.1 {
            "yes"
        } else {
            "no"
        }
    };
    writeln!(
        t,
        "| φ inside tracer's bar | {} | {} | — |",
        holds(&ca, &pa),
        holds(&cb, &pb)
    )?;
    if !inp.equal.is_empty() {
        let (ea, eb) = (fig(&|r| r.equal_a), fig(&|r| r.equal_b));
        writeln!(
            t,
            "| tracer Σ (time sharing, `--split equal`) | {} ({}) | {} ({}) | — |",
            ea.0,
            diff(&ea.0, &pa),
            eb.0,
            diff(&eb.0, &pb)
        )?;
    }
    let shares: Vec<f64> = rows.iter().filter_map(|r| r.presence_a).collect();
    if shares.is_empty() {
        writeln!(
            t,
            "| convention − φ predicted | 0 (the classes were never in flight at once) | 0 | 0 |"
        )?;
    } else {
        let p_a = shares.iter().sum::<f64>() / shares.len() as f64;
        let predicted = (p_a - 0.5) * -inter.mean;
        writeln!(
            t,
            "| convention − φ predicted, (share in flight − ½) × −interaction | {:+.0} J \
             (share {:.2}) | {:+.0} J (share {:.2}) | 0 |",
            predicted,
            p_a,
            -predicted,
            1.0 - p_a
        )?;
    }
    Ok(t)
}

/// All tables, as markdown.
pub fn report(inp: &Inputs) -> Result<String> {
    let mut t = String::new();
    writeln!(
        t,
        "Counter: {} updates, median {:.1} ms apart; devices summed from tracer's records: {}\n",
        inp.counter.updates(),
        inp.counter.median_update_ns() / 1e6,
        inp.kind
    )?;
    writeln!(t, "### Two classes on one server (`main`)\n")?;
    t.push_str(&shapley_table(
        inp,
        "main",
        ("A (decode-heavy)", "B (prefill-heavy)"),
    )?);
    writeln!(t, "\n### Two services sharing the GPU (`svc`)\n")?;
    match shapley_table(inp, "svc", ("S1 (class A load)", "S2 (class B load)")) {
        Ok(s) => t.push_str(&s),
        Err(e) => writeln!(t, "not run: {e}")?,
    }
    writeln!(t, "\n### One request at a time (`seq`)\n")?;
    let seq = sequential(inp)?;
    writeln!(
        t,
        "| request | counter window − idle (J) | tracer (J) ± bar | error |"
    )?;
    writeln!(t, "|---|---|---|---|")?;
    let mut errs = Vec::new();
    let mut held = 0;
    for q in &seq {
        match q.caused {
            Some(f) => {
                let e = pct(f.dynamic_j - q.reference_j, q.reference_j);
                errs.push(e.abs());
                held += usize::from((f.dynamic_j - q.reference_j).abs() <= f.bar_j);
                writeln!(
                    t,
                    "| {} | {:.1} | {:.1} ± {:.1} | {e:+.1} % |",
                    q.id, q.reference_j, f.dynamic_j, f.bar_j
                )?;
            }
            None => writeln!(t, "| {} | {:.1} | no record | — |", q.id, q.reference_j)?,
        }
    }
    writeln!(
        t,
        "\nmedian |error| {:.1} %, largest {:.1} %; bars hold the reference for {held}/{}",
        median(&errs),
        errs.iter().copied().fold(0.0, f64::max),
        seq.len()
    )?;
    writeln!(t, "\n### Throughput (tokens/s, 16 streams on S1)\n")?;
    let get = |l: &str| inp.tput.iter().find(|(n, _)| n == l).map(|(_, v)| *v);
    if let (Some(pre), Some(with), Some(post)) =
        (get("tput-pre"), get("tput-with"), get("tput-post"))
    {
        writeln!(
            t,
            "without tracer {pre:.0} (before), {post:.0} (after); with tracer {with:.0}; \
             ratio {:.3}",
            with / f64::midpoint(pre, post)
        )?;
    }
    Ok(t)
}

/// `cargo xtask reference DIR`.
pub fn run(dir: &Path) -> Result<()> {
    let inp = Inputs::load(dir)?;
    let t = report(&inp)?;
    print!("{t}");
    fs::write(dir.join("reference.md"), &t)?;
    Ok(())
}
