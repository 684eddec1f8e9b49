//! `/metrics`: Prometheus text.

use std::fmt::Write as _;

use super::{Shared, Totals, access::Scope, reply::Reply};
use crate::output::family::{Family, Kind, head, label};

/// One (service, model, where the service ran) group's totals, as `/metrics` and OTLP see them.
pub(crate) type ModelTotals = (
    String,
    String,
    Option<std::sync::Arc<crate::occupancy::workload::Workload>>,
    Totals,
);

/// How one counter is read from a group's totals.
type Get = fn(&Totals) -> f64;
/// A counter over groups' totals: its names (Prometheus, OpenTelemetry) and unit, help, how its
/// value is read, and whether it counts whole things (sent as integers over OTLP).
type Counter = (
    (&'static str, &'static str, &'static str),
    &'static str,
    Get,
    bool,
);
/// How one histogram is found in a group's totals.
type Hist = fn(&Totals) -> &Histogram;

/// Bucket bounds, joules per request: 10 mJ to 10 kJ, three per decade.
pub(super) const J_PER_REQUEST: [f64; 13] = [
    0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10_000.0,
];
/// Bucket bounds, joules per output token: 1 mJ to 100 J.
pub(super) const J_PER_TOKEN: [f64; 11] = [
    0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0,
];

/// A Prometheus histogram: counts per bucket (not cumulative; summed when written), the sum
/// and the count. Aggregatable across hosts, unlike quantiles.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Histogram {
    buckets: [u64; 13],
    sum: f64,
    count: u64,
}

impl Histogram {
    /// One observation against `bounds` (at most 13).
    pub(super) fn observe(&mut self, bounds: &[f64], v: f64) {
        if !v.is_finite() {
            return;
        }
        if let Some(i) = bounds.iter().position(|&b| v <= b)
            && let Some(c) = self.buckets.get_mut(i)
        {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let mut cumulative = 0;
        for (b, c) in bounds.iter().zip(self.buckets) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Prometheus text: per (service, model) counters the caller may see (and per tenant, up to
/// `api.metrics_tenants` of them); the host's devices, samplers, losses and store for root and
/// the API group.
pub(super) fn metrics(shared: &Shared, scope: &Scope) -> Reply {
    let totals = shared.model_totals(scope);
    let mut out = String::new();
    for f in model_families(&totals, shared.currency().as_deref()) {
        f.write(&mut out);
    }
    let histograms: [(&str, &str, &[f64], Hist); 2] = [
        (
            "tracer_request_joules",
            "Energy of one request (dynamic and idle share), joules.",
            &J_PER_REQUEST,
            |t| &t.per_request,
        ),
        (
            "tracer_output_token_joules",
            "Energy of a request per output token, joules.",
            &J_PER_TOKEN,
            |t| &t.per_token,
        ),
    ];
    for (name, help, bounds, get) in histograms {
        head(&mut out, name, "histogram", help);
        for (s, m, w, t) in &totals {
            let workload = w.as_ref().map_or_else(String::new, |w| w.labels(label));
            let labels = format!("service=\"{}\",model=\"{}\"{workload}", label(s), label(m));
            get(t).write(&mut out, name, &labels, bounds);
        }
    }
    for f in tenant_families(shared, scope) {
        f.write(&mut out);
    }
    if *scope == Scope::All {
        super::health_metrics::write(&mut out, shared);
        for f in shared.sourced_families() {
            f.write(&mut out);
        }
    }
    if *scope == Scope::All
        && let Some(w) = shared.writer()
    {
        use std::sync::atomic::Ordering::Relaxed;
        let name = "tracer_store_records_total";
        let _ = writeln!(
            out,
            "# HELP {name} Final records the store committed, failed to commit (shown unstored), or deleted by retention.\n# TYPE {name} counter"
        );
        for (result, n) in [
            ("committed", w.committed.load(Relaxed)),
            ("failed", w.failed.load(Relaxed)),
            ("expired", w.expired.load(Relaxed)),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {n}");
        }
        let name = "tracer_store_transactions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Group commits of records (records over transactions: the group size).\n# TYPE {name} counter\n{name} {}",
            w.transactions.load(Relaxed)
        );
        let name = "tracer_store_commit_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time the store's writer spent committing.\n# TYPE {name} counter\n{name} {}",
            w.commit_ns.load(Relaxed) as f64 / 1e9
        );
    }
    Reply::Text(200, "text/plain; version=0.0.4", out)
}

/// The per-(service, model) counters over `totals`: requests, energy, output tokens, and the
/// cost at the tariff (once one is configured and a record carried a cost, its `currency`) and
/// emissions (once a carbon intensity is).
pub(super) fn model_families(totals: &[ModelTotals], currency: Option<&str>) -> Vec<Family> {
    let series: [Counter; 3] = [
        (
            ("tracer_requests_total", "tracer.requests", "{request}"),
            "Requests with a final energy record.",
            |t| t.requests as f64,
            true,
        ),
        (
            (
                "tracer_request_energy_joules_total",
                "tracer.request.energy",
                "J",
            ),
            "Energy attributed to requests (dynamic and idle share), joules.",
            |t| t.joules,
            false,
        ),
        (
            (
                "tracer_output_tokens_total",
                "tracer.output_tokens",
                "{token}",
            ),
            "Completion tokens of requests with a final energy record.",
            |t| t.output_tokens as f64,
            true,
        ),
    ];
    let mut out: Vec<Family> = series
        .into_iter()
        .map(|(names, help, get, whole)| {
            let f = per_model(names, help, totals, None, get);
            if whole { f.whole() } else { f }
        })
        .collect();
    let Some(currency) = currency else {
        return out;
    };
    out.push(per_model(
        (
            "tracer_request_cost_total",
            "tracer.request.cost",
            &format!("{{{currency}}}"),
        ),
        "Cost of requests at the configured tariff (PUE and overhead included), in its currency.",
        totals,
        Some(("currency", currency)),
        |t| t.cost,
    ));
    if totals.iter().any(|(.., t)| t.emissions_g > 0.0) {
        out.push(per_model(
            (
                "tracer_request_emissions_grams_total",
                "tracer.request.emissions",
                "g",
            ),
            "Emissions of requests at the configured carbon intensity (PUE included), grams CO2e.",
            totals,
            None,
            |t| t.emissions_g,
        ));
    }
    out
}

/// One counter with a series per (service, model) and where the service ran (`namespace`,
/// `pod`, `container` labels: a restarted pod starts new series, the old pod's stop, and
/// `sum by (service, model)` still adds them up), and `extra` as one more label.
fn per_model(
    names: (&'static str, &'static str, &str),
    help: &'static str,
    totals: &[ModelTotals],
    extra: Option<(&'static str, &str)>,
    get: Get,
) -> Family {
    let mut f = Family::new(names, help, Kind::Counter);
    for (s, m, w, t) in totals {
        let mut labels = vec![("service", s.clone()), ("model", m.clone())];
        labels.extend(w.iter().flat_map(|w| w.label_pairs()));
        labels.extend(extra.map(|(k, v)| (k, v.to_owned())));
        f.point(labels, get(t));
    }
    f
}

/// Requests and energy per tenant: a label only for the first `api.metrics_tenants` tenants
/// seen (a series per tenant would otherwise grow without bound); the rest are `other`.
pub(super) fn tenant_families(shared: &Shared, scope: &Scope) -> Vec<Family> {
    let rows: Vec<_> = shared
        .tenant_totals()
        .into_iter()
        .filter(|((id, ..), _)| scope.sees(*id))
        .collect();
    let series: [Counter; 2] = [
        (
            (
                "tracer_tenant_requests_total",
                "tracer.tenant.requests",
                "{request}",
            ),
            "Requests with a final energy record, per tenant (capped; the rest are \"other\").",
            |t| t.requests as f64,
            true,
        ),
        (
            (
                "tracer_tenant_request_energy_joules_total",
                "tracer.tenant.request.energy",
                "J",
            ),
            "Energy attributed to requests per tenant, joules (capped; the rest are \"other\").",
            |t| t.joules,
            false,
        ),
    ];
    series
        .into_iter()
        .map(|(names, help, get, whole)| {
            let mut f = Family::new(names, help, Kind::Counter);
            f.integer = whole;
            for ((_, s, m, t, w), v) in &rows {
                let mut labels = vec![("service", s.clone()), ("model", m.clone())];
                labels.extend(w.iter().flat_map(|w| w.label_pairs()));
                labels.push(("tenant", t.clone()));
                f.point(labels, get(v));
            }
            f
        })
        .collect()
}
