//! A bill's plots, as SVG (plotters): J per request by model, J per output token against cache
//! hit rate and against batch occupancy, watts and requests over time, where each device's
//! energy went, and the energy bill beside the per-token bill.

use std::collections::BTreeMap;

use plotters::{coord::Shift, prelude::*};
use rust_decimal::prelude::ToPrimitive as _;

use super::{Bill, Interval, Line};

/// A plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {plot}: {detail}")]
pub struct PlotError {
    plot: &'static str,
    detail: String,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn svg(
    plot: &'static str,
    draw: impl FnOnce(&Area<'_>) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<String, PlotError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (760, 420)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| PlotError {
            plot,
            detail: e.to_string(),
        };
        root.fill(&WHITE).map_err(|e| err(&e))?;
        draw(&root).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(out)
}

/// The series' legend, boxed in the chart's corner.
fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn key(l: &Line) -> String {
    l.model.clone().unwrap_or_else(|| "(unknown)".into())
}

fn range(v: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite() && (!log || *x > 0.0)) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return if log { (0.1, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        (lo - pad, hi + pad)
    }
}

/// The empirical distribution of joules per request, one curve per model.
pub fn joules_per_request(bill: &Bill) -> Result<String, PlotError> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for l in &bill.lines {
        by.entry(key(l)).or_default().push(l.joules);
    }
    let (lo, hi) = range(bill.lines.iter().map(|l| l.joules), true);
    svg("J per request", |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Energy per request, by model (cumulative share)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("joules per request")
            .y_desc("share of requests")
            .draw()?;
        for (i, (model, mut v)) in by.into_iter().enumerate() {
            v.retain(|x| *x > 0.0);
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    v.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                    color.stroke_width(2),
                ))?
                .label(model)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        legend(&mut chart)?;
        Ok(())
    })
}

/// Joules per output token against `x` (a request's cache hit rate, or its occupancy).
fn per_token_against(
    bill: &Bill,
    plot: &'static str,
    caption: &str,
    x_desc: &str,
    x_of: fn(&Line) -> Option<f64>,
) -> Result<String, PlotError> {
    let points: Vec<(String, f64, f64)> = bill
        .lines
        .iter()
        .filter_map(|l| {
            let t = l.completion_tokens.filter(|&t| t > 0)?;
            Some((key(l), x_of(l)?, l.joules / t as f64))
        })
        .collect();
    let (xlo, xhi) = range(points.iter().map(|p| p.1), false);
    let (ylo, yhi) = range(points.iter().map(|p| p.2), true);
    let models: Vec<String> = {
        let mut m: Vec<String> = points.iter().map(|p| p.0.clone()).collect();
        m.sort();
        m.dedup();
        m
    };
    svg(plot, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xlo..xhi, (ylo..yhi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("joules per output token")
            .draw()?;
        for (i, m) in models.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| &p.0 == m)
                        .map(|p| Circle::new((p.1, p.2), 3, color.mix(0.6).filled())),
                )?
                .label(m.clone())
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        }
        legend(&mut chart)?;
        Ok(())
    })
}

/// J per output token against the share of the prompt the engine had cached.
pub fn per_token_vs_cache(bill: &Bill) -> Result<String, PlotError> {
    per_token_against(
        bill,
        "J/token vs cache hit rate",
        "Energy per output token against cache hit rate",
        "cached share of the prompt",
        |l| {
            let p = l.prompt_tokens.filter(|&p| p > 0)?;
            Some(l.cached_tokens.unwrap_or(0) as f64 / p as f64)
        },
    )
}

/// J per output token against how many requests of its service ran with it.
pub fn per_token_vs_occupancy(bill: &Bill) -> Result<String, PlotError> {
    per_token_against(
        bill,
        "J/token vs occupancy",
        "Energy per output token against batch occupancy",
        "requests of the service in flight with it",
        |l| l.occupancy,
    )
}

/// Each device's average watts per interval, and requests ending per interval.
pub fn watts_over_time(bill: &Bill, intervals: &[Interval]) -> Result<String, PlotError> {
    let t0 = intervals
        .iter()
        .map(|i| i.from_ms)
        .chain(bill.lines.iter().map(|l| l.start_unix_ms))
        .min()
        .unwrap_or(0);
    let mins = |t: i64| (t - t0) as f64 / 60_000.0;
    let mut devices: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for i in intervals {
        let dt = (i.to_ms - i.from_ms) as f64 / 1000.0;
        if dt > 0.0 {
            devices
                .entry(i.device.as_str())
                .or_default()
                .push((mins(i.to_ms), i.measured_j / dt));
        }
    }
    let (xlo, xhi) = range(
        devices
            .values()
            .flatten()
            .map(|p| p.0)
            .chain(bill.lines.iter().map(|l| mins(l.end_unix_ms))),
        false,
    );
    let (_, whi) = range(devices.values().flatten().map(|p| p.1), false);
    // Requests per minute, as a second line scaled onto the watts axis.
    let mut per_min: BTreeMap<i64, u32> = BTreeMap::new();
    for l in &bill.lines {
        *per_min.entry((l.end_unix_ms - t0) / 60_000).or_default() += 1;
    }
    let rmax = f64::from(per_min.values().copied().max().unwrap_or(1));
    let scale = whi.max(1.0) / rmax;
    svg("watts over time", |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("Watts per device, and requests per minute (× {scale:.2} W)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(xlo..xhi, 0f64..whi.max(1.0) * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("minutes from the start")
            .y_desc("watts")
            .draw()?;
        for (i, (name, pts)) in devices.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(LineSeries::new(
                per_min
                    .iter()
                    .map(|(m, n)| (*m as f64 + 0.5, f64::from(*n) * scale)),
                BLACK.stroke_width(1),
            ))?
            .label("requests per minute")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        legend(&mut chart)?;
        Ok(())
    })
}

/// Bars per category: `(label, [(series, value)])`.
fn bars(
    plot: &'static str,
    caption: &str,
    y_desc: &str,
    series: &[&str],
    rows: &[(String, Vec<f64>)],
) -> Result<String, PlotError> {
    let ymax = rows
        .iter()
        .flat_map(|r| r.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-12)
        * 1.15;
    let n = rows.len().max(1);
    let k = series.len().max(1);
    svg(plot, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..ymax)?;
        let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 || x.fract() == 0.0 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_desc)
            .draw()?;
        let w = 0.8 / k as f64;
        for (s, name) in series.iter().enumerate() {
            let color = Palette99::pick(s).to_rgba();
            chart
                .draw_series(rows.iter().enumerate().map(|(i, r)| {
                    let x0 = i as f64 + 0.1 + w * s as f64;
                    Rectangle::new(
                        [
                            (x0, 0.0),
                            (x0 + w * 0.95, r.1.get(s).copied().unwrap_or(0.0)),
                        ],
                        color.filled(),
                    )
                }))?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        legend(&mut chart)?;
        Ok(())
    })
}

/// The energy bill beside the per-token bill, per group (the requests both price).
pub fn energy_vs_token_bill(bill: &Bill) -> Result<String, PlotError> {
    let rows: Vec<(String, Vec<f64>)> = bill
        .groups
        .iter()
        .filter(|g| g.priced > 0)
        .map(|g| {
            (
                g.key.clone(),
                vec![
                    g.priced_energy_cost.to_f64().unwrap_or(0.0),
                    g.per_token_cost.to_f64().unwrap_or(0.0),
                ],
            )
        })
        .collect();
    bars(
        "energy vs per-token bill",
        "The energy bill beside the per-token bill",
        &bill.currency,
        &["energy bill", "per-token bill"],
        &rows,
    )
}

/// Where each device's measured energy went: requests, idle, unattributed.
pub fn shares(intervals: &[Interval]) -> Result<String, PlotError> {
    let mut by: BTreeMap<&str, [f64; 3]> = BTreeMap::new();
    for i in intervals {
        let e = by.entry(i.device.as_str()).or_default();
        e[0] += i.request_j;
        e[1] += i.idle_j;
        e[2] += i.unattributed_j;
    }
    let rows: Vec<(String, Vec<f64>)> = by
        .into_iter()
        .map(|(d, v)| (d.to_string(), v.iter().map(|j| j / 3.6e6).collect()))
        .collect();
    bars(
        "shares",
        "Each device's energy: requests, idle, unattributed",
        "kWh",
        &["requests", "idle", "unattributed"],
        &rows,
    )
}

/// Every plot, titled.
pub fn all(bill: &Bill, intervals: &[Interval]) -> Result<Vec<(&'static str, String)>, PlotError> {
    Ok(vec![
        ("joules-per-request", joules_per_request(bill)?),
        ("per-token-vs-cache", per_token_vs_cache(bill)?),
        ("per-token-vs-occupancy", per_token_vs_occupancy(bill)?),
        ("watts-over-time", watts_over_time(bill, intervals)?),
        ("device-shares", shares(intervals)?),
        ("energy-vs-token-bill", energy_vs_token_bill(bill)?),
    ])
}
