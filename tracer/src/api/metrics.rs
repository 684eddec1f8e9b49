//! `/metrics`: Prometheus text.

use std::fmt::Write as _;

use super::{Shared, Totals, access::Scope, reply::Reply};

/// How one counter is read from a group's totals.
type Get = fn(&Totals) -> f64;

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text: per (service, model) counters the caller may see; the devices' energy
/// and the index's size for root and the API group.
pub(super) fn metrics(shared: &Shared, scope: &Scope) -> Reply {
    let totals: Vec<_> = shared
        .totals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|((id, _, _), _)| scope.sees(*id))
        .map(|((_, s, m), t)| (s.clone(), m.clone(), *t))
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (s, m, t) in &totals {
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\",model=\"{}\"}} {}",
                label(s),
                label(m),
                get(t)
            );
        }
    }
    if *scope == Scope::All
        && let Some(snap) = shared.snapshot()
    {
        let name = "tracer_device_energy_joules_total";
        let _ = writeln!(
            out,
            "# HELP {name} Energy measured on each device, and where it went.\n# TYPE {name} counter"
        );
        for d in &snap.devices {
            for (kind, j) in [
                ("measured", d.totals.measured_j),
                (
                    "requests",
                    d.totals.request_dynamic_j + d.totals.request_idle_j,
                ),
                ("idle", d.totals.idle_j),
                ("unattributed", d.totals.unattributed_j),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{device=\"{}\",part=\"{kind}\"}} {j}",
                    label(&d.name)
                );
            }
        }
    }
    Reply::Text(200, "text/plain; version=0.0.4", out)
}
