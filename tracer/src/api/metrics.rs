//! `/metrics`: Prometheus text.

use std::fmt::Write as _;

use super::{
    Shared, Totals,
    access::Scope,
    health_metrics::{head, label},
    reply::Reply,
};

/// How one counter is read from a group's totals.
type Get = fn(&Totals) -> f64;
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
    let totals: Vec<_> = shared
        .totals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|((id, ..), _)| scope.sees(*id))
        .map(|((_, s, m, w), t)| {
            // A series per pod and container too: a restarted pod starts new counters, the
            // old pod's stop (`sum by (service, model)` still adds them up).
            let workload = w.as_ref().map_or_else(String::new, |w| w.labels(label));
            (
                format!("service=\"{}\",model=\"{}\"{workload}", label(s), label(m)),
                *t,
            )
        })
        .collect();
    let mut out = String::new();
    let series: [(&str, &str, Get); 3] = [
        (
            "tracer_requests_total",
            "Requests with a final energy record.",
            |t| t.requests as f64,
        ),
        (
            "tracer_request_energy_joules_total",
            "Energy attributed to requests (dynamic and idle share), joules.",
            |t| t.joules,
        ),
        (
            "tracer_output_tokens_total",
            "Completion tokens of requests with a final energy record.",
            |t| t.output_tokens as f64,
        ),
    ];
    for (name, help, get) in series {
        per_model(&mut out, (name, help), &totals, "", get);
    }
    money(&mut out, shared.currency().as_deref(), &totals);
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
        for (labels, t) in &totals {
            get(t).write(&mut out, name, labels, bounds);
        }
    }
    tenants(&mut out, shared, scope);
    if *scope == Scope::All {
        super::health_metrics::write(&mut out, shared);
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
        let name = "tracer_store_commit_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time the store's writer spent committing.\n# TYPE {name} counter\n{name} {}",
            w.commit_ns.load(Relaxed) as f64 / 1e9
        );
    }
    Reply::Text(200, "text/plain; version=0.0.4", out)
}

/// Cost at the tariff (once one is configured and a record carried a cost) and emissions (once
/// a carbon intensity is), per (service, model).
fn money(out: &mut String, currency: Option<&str>, totals: &[(String, Totals)]) {
    let Some(currency) = currency else {
        return;
    };
    per_model(
        out,
        (
            "tracer_request_cost_total",
            "Cost of requests at the configured tariff (PUE and overhead included), in its currency.",
        ),
        totals,
        &format!(",currency=\"{}\"", label(currency)),
        |t| t.cost,
    );
    if totals.iter().any(|(_, t)| t.emissions_g > 0.0) {
        per_model(
            out,
            (
                "tracer_request_emissions_grams_total",
                "Emissions of requests at the configured carbon intensity (PUE included), grams CO2e.",
            ),
            totals,
            "",
            |t| t.emissions_g,
        );
    }
}

/// One counter with a series per (service, model, workload), each given with its labels:
/// `extra` is more labels (`,name="value"`).
fn per_model(
    out: &mut String,
    (name, help): (&str, &str),
    totals: &[(String, Totals)],
    extra: &str,
    get: Get,
) {
    head(out, name, "counter", help);
    for (labels, t) in totals {
        let _ = writeln!(out, "{name}{{{labels}{extra}}} {}", get(t));
    }
}

/// Requests and energy per tenant: a label only for the first `api.metrics_tenants` tenants
/// seen (a series per tenant would otherwise grow without bound); the rest are `other`.
fn tenants(out: &mut String, shared: &Shared, scope: &Scope) {
    let rows: Vec<_> = shared
        .tenant_totals()
        .into_iter()
        .filter(|((id, ..), _)| scope.sees(*id))
        .collect();
    let series: [(&str, &str, Get); 2] = [
        (
            "tracer_tenant_requests_total",
            "Requests with a final energy record, per tenant (capped; the rest are \"other\").",
            |t| t.requests as f64,
        ),
        (
            "tracer_tenant_request_energy_joules_total",
            "Energy attributed to requests per tenant, joules (capped; the rest are \"other\").",
            |t| t.joules,
        ),
    ];
    for (name, help, get) in series {
        head(out, name, "counter", help);
        for ((_, s, m, t), v) in &rows {
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\",model=\"{}\",tenant=\"{}\"}} {}",
                label(s),
                label(m),
                label(t),
                get(v)
            );
        }
    }
}
