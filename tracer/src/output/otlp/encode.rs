//! Final records and metric families as OTLP messages (the official protobuf definitions).
//!
//! A record is one log record: its body the JSON line `--records-out` writes, its time the
//! request's end, and attributes `tracer.<field>` for what an aggregator filters or sums by.
//! A family is one metric: counters as cumulative monotonic sums from the daemon's start,
//! gauges as gauges, labels as attributes.

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest},
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric::Data, number_data_point,
    },
    resource::v1::Resource,
};

use crate::{
    output::family::{Family, Kind},
    pipeline::FinalRecord,
};

/// The log records' event name.
pub const EVENT_NAME: &str = "tracer.request";

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn string(key: &str, v: &str) -> KeyValue {
    kv(key, Value::StringValue(v.to_owned()))
}

/// What every export says about its sender: `service.name = "tracer"`, its version, the host.
pub fn resource(host_name: &str) -> Resource {
    Resource {
        attributes: vec![
            string("service.name", "tracer"),
            string("service.version", env!("CARGO_PKG_VERSION")),
            string("host.name", host_name),
        ],
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "tracer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

/// A whole-number attribute (counts and ids fit an `i64`; a larger one saturates).
fn int(key: &str, v: u64) -> KeyValue {
    kv(key, Value::IntValue(i64::try_from(v).unwrap_or(i64::MAX)))
}

fn double(key: &str, v: f64) -> KeyValue {
    kv(key, Value::DoubleValue(v))
}

/// One record's attributes: `tracer.` and its JSON field (the cost's fields under
/// `tracer.cost.`), the names of the devices it used, and its duration.
fn attributes(r: &FinalRecord) -> Vec<KeyValue> {
    let rec = &r.record;
    let mut a = vec![
        int("tracer.id", rec.id.0),
        string("tracer.service_name", &r.service_name),
        int("tracer.service", u64::from(rec.service.0)),
        string("tracer.outcome", rec.outcome.name()),
        double("tracer.total_j", rec.total_j),
        double("tracer.dynamic_j", rec.dynamic_j),
        double("tracer.idle_j", rec.idle_j),
        double("tracer.uncertainty_j", rec.uncertainty_j),
        double("tracer.kwh", rec.kwh),
        double(
            "tracer.duration_ms",
            rec.end_ns.saturating_sub(rec.arrive_ns) as f64 / 1e6,
        ),
        int("tracer.events", rec.events),
        int("tracer.response_bytes", rec.response_bytes),
        kv(
            "tracer.devices",
            Value::ArrayValue(ArrayValue {
                values: rec
                    .devices
                    .iter()
                    .map(|d| AnyValue {
                        value: Some(Value::StringValue(d.name.clone())),
                    })
                    .collect(),
            }),
        ),
    ];
    let strings = [
        ("tracer.model", &rec.model),
        ("tracer.tenant", &rec.tenant),
        ("tracer.external_id", &rec.external_id),
    ];
    a.extend(
        strings
            .into_iter()
            .filter_map(|(k, v)| Some(string(k, v.as_deref()?))),
    );
    let counts = [
        ("tracer.prompt_tokens", rec.prompt_tokens),
        ("tracer.cached_tokens", rec.cached_tokens),
        ("tracer.completion_tokens", rec.completion_tokens),
    ];
    a.extend(counts.into_iter().filter_map(|(k, v)| Some(int(k, v?))));
    if let Some(j) = rec.joules_per_output_token {
        a.push(double("tracer.joules_per_output_token", j));
    }
    // Where the service ran, under OpenTelemetry's Kubernetes and container conventions
    // (so a collector's k8s processors and backends' pod views pick them up as they are).
    if let Some(w) = &r.workload {
        let place = [
            ("k8s.namespace.name", &w.namespace),
            ("k8s.pod.name", &w.pod),
            ("k8s.container.name", &w.container),
            ("k8s.pod.uid", &w.pod_uid),
            ("container.id", &w.container_id),
            ("container.runtime", &w.runtime),
            ("tracer.systemd_unit", &w.unit),
        ];
        a.extend(
            place
                .into_iter()
                .filter_map(|(k, v)| Some(string(k, v.as_deref()?))),
        );
    }
    if let Some(c) = &r.cost {
        // A float for aggregators, as /metrics sums it; the body keeps the exact decimal.
        let amount = rust_decimal::prelude::ToPrimitive::to_f64(&c.amount).unwrap_or(0.0);
        a.push(double("tracer.cost.amount", amount));
        a.push(string("tracer.cost.currency", &c.currency));
        if let Some(g) = c.emissions_g {
            a.push(double("tracer.cost.emissions_g", g));
        }
    }
    a
}

/// One final record as a log record, observed at `observed_ns` (Unix nanoseconds).
pub fn log_record(r: &FinalRecord, observed_ns: u64) -> LogRecord {
    let body = serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    LogRecord {
        time_unix_nano: u64::try_from(r.end_unix_ms)
            .unwrap_or(0)
            .saturating_mul(1_000_000),
        observed_time_unix_nano: observed_ns,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(body)),
        }),
        attributes: attributes(r),
        event_name: EVENT_NAME.into(),
        ..LogRecord::default()
    }
}

/// One logs export of `records`.
pub fn logs_request<'a>(
    resource: &Resource,
    records: impl IntoIterator<Item = &'a FinalRecord>,
    observed_ns: u64,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope()),
                log_records: records
                    .into_iter()
                    .map(|r| log_record(r, observed_ns))
                    .collect(),
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

fn metric(f: &Family, start_ns: u64, now_ns: u64) -> Metric {
    let points = f
        .points
        .iter()
        .map(|p| NumberDataPoint {
            attributes: p.labels.iter().map(|(k, v)| string(k, v)).collect(),
            start_time_unix_nano: if f.kind == Kind::Counter { start_ns } else { 0 },
            time_unix_nano: now_ns,
            value: Some(if f.integer {
                number_data_point::Value::AsInt(p.value as i64)
            } else {
                number_data_point::Value::AsDouble(p.value)
            }),
            ..NumberDataPoint::default()
        })
        .collect();
    let data = match f.kind {
        Kind::Counter => Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        Kind::Gauge => Data::Gauge(Gauge {
            data_points: points,
        }),
    };
    Metric {
        name: f.otel_name.into(),
        description: f.help.into(),
        unit: f.unit.clone(),
        data: Some(data),
        ..Metric::default()
    }
}

/// One metrics export of `families` (those with no series left out), counted from `start_ns`
/// and read at `now_ns` (Unix nanoseconds).
pub fn metrics_request(
    resource: &Resource,
    families: &[Family],
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics: families
                    .iter()
                    .filter(|f| !f.points.is_empty())
                    .map(|f| metric(f, start_ns, now_ns))
                    .collect(),
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

#[cfg(test)]
mod tests;
