//! Encoded, then decoded back with prost: what a collector reads.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest},
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::{AggregationTemporality, metric::Data, number_data_point},
};
use prost::Message as _;

use super::{logs_request, metrics_request, resource};
use crate::{
    output::family::{Family, Kind, Point},
    pipeline::FinalRecord,
};

/// The first record of the lent GPU machine's live run, with a cost.
fn record() -> FinalRecord {
    let line = include_str!("../../../../../tests/fixtures/h200/live-records.jsonl")
        .lines()
        .next()
        .expect("a record");
    let mut r: FinalRecord = serde_json::from_str(line).expect("a record");
    r.record.tenant = Some("t-9f2c".into());
    r.cost = Some(crate::bill::RecordCost {
        amount: "0.000004111".parse().expect("decimal"),
        bar: "0.0000017".parse().expect("decimal"),
        currency: "EUR".into(),
        price_per_kwh: "0.25".parse().expect("decimal"),
        pue: "1.0".parse().expect("decimal"),
        emissions_g: Some(5.75),
    });
    r.workload = Some(Arc::new(crate::occupancy::workload::Workload {
        namespace: Some("llm".into()),
        pod: Some("vllm-0".into()),
        container: Some("engine".into()),
        pod_uid: Some("4f9c3a1e-7b2d-4c8e-9a01-23456789abcd".into()),
        container_id: Some("ab".repeat(32)),
        runtime: Some("containerd".into()),
        unit: None,
    }));
    r
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text(v: Option<&Value>) -> &str {
    match v {
        Some(Value::StringValue(s)) => s,
        other => panic!("not a string: {other:?}"),
    }
}

#[test]
fn a_record_is_a_log_record_with_its_json_as_body() {
    let r = Arc::new(record());
    let bytes = logs_request(&resource("node-7"), [&*r], 42).encode_to_vec();
    let back = ExportLogsServiceRequest::decode(bytes.as_slice()).expect("decodes");
    let [rl] = back.resource_logs.as_slice() else {
        panic!("one resource");
    };
    let res = rl
        .resource
        .as_ref()
        .expect("resource")
        .attributes
        .as_slice();
    assert_eq!(text(attr(res, "service.name")), "tracer");
    assert_eq!(text(attr(res, "host.name")), "node-7");
    assert_eq!(
        text(attr(res, "service.version")),
        env!("CARGO_PKG_VERSION")
    );
    let logs = &rl.scope_logs[0].log_records;
    assert_eq!(logs.len(), 1);
    let l = &logs[0];
    assert_eq!(
        l.time_unix_nano, 1_795_734_388_277_000_000,
        "the request's end"
    );
    assert_eq!(l.observed_time_unix_nano, 42);
    assert_eq!(l.event_name, super::EVENT_NAME);
    // The body is the records_out line: it parses back to the same record.
    let body = text(l.body.as_ref().and_then(|b| b.value.as_ref()));
    let parsed: FinalRecord = serde_json::from_str(body).expect("record JSON");
    assert_eq!(parsed, *r);
    let a = l.attributes.as_slice();
    assert_eq!(attr(a, "tracer.id"), Some(&Value::IntValue(1)));
    assert_eq!(text(attr(a, "tracer.service_name")), "pid 453");
    assert_eq!(text(attr(a, "tracer.model")), "torch-matmul");
    assert_eq!(text(attr(a, "tracer.tenant")), "t-9f2c");
    assert_eq!(text(attr(a, "tracer.outcome")), "complete");
    assert_eq!(text(attr(a, "tracer.external_id")), "dev-1");
    assert_eq!(
        attr(a, "tracer.total_j"),
        Some(&Value::DoubleValue(r.record.total_j))
    );
    assert_eq!(
        attr(a, "tracer.dynamic_j"),
        Some(&Value::DoubleValue(r.record.dynamic_j))
    );
    assert_eq!(
        attr(a, "tracer.idle_j"),
        Some(&Value::DoubleValue(r.record.idle_j))
    );
    assert_eq!(attr(a, "tracer.prompt_tokens"), Some(&Value::IntValue(128)));
    assert_eq!(
        attr(a, "tracer.completion_tokens"),
        Some(&Value::IntValue(40))
    );
    assert_eq!(attr(a, "tracer.cached_tokens"), None, "unknown: absent");
    assert_eq!(text(attr(a, "k8s.namespace.name")), "llm");
    assert_eq!(text(attr(a, "k8s.pod.name")), "vllm-0");
    assert_eq!(text(attr(a, "k8s.container.name")), "engine");
    assert_eq!(
        text(attr(a, "k8s.pod.uid")),
        "4f9c3a1e-7b2d-4c8e-9a01-23456789abcd"
    );
    assert_eq!(text(attr(a, "container.id")), "ab".repeat(32));
    assert_eq!(attr(a, "tracer.systemd_unit"), None);
    assert_eq!(
        attr(a, "tracer.cost.amount"),
        Some(&Value::DoubleValue(0.000_004_111))
    );
    assert_eq!(text(attr(a, "tracer.cost.currency")), "EUR");
    assert_eq!(
        attr(a, "tracer.cost.emissions_g"),
        Some(&Value::DoubleValue(5.75))
    );
    let Some(Value::ArrayValue(devices)) = attr(a, "tracer.devices") else {
        panic!("devices");
    };
    let names: Vec<_> = devices
        .values
        .iter()
        .map(|v| text(v.value.as_ref()))
        .collect();
    assert_eq!(names, ["gpu0", "cpu0-model"]);
}

#[test]
fn families_are_cumulative_sums_and_gauges() {
    let families = [
        Family {
            name: "tracer_requests_total",
            otel_name: "tracer.requests",
            unit: "{request}".into(),
            help: "Requests.",
            kind: Kind::Counter,
            integer: true,
            points: vec![Point {
                labels: vec![("service", "port 8000".into()), ("model", "m".into())],
                value: 7.0,
            }],
        },
        Family {
            name: "tracer_device_power_watts",
            otel_name: "tracer.device.power",
            unit: "W".into(),
            help: "Watts.",
            kind: Kind::Gauge,
            integer: false,
            points: vec![Point {
                labels: vec![("device", "gpu0".into())],
                value: 81.5,
            }],
        },
        Family {
            name: "tracer_empty_total",
            otel_name: "tracer.empty",
            unit: "J".into(),
            help: "Nothing yet.",
            kind: Kind::Counter,
            integer: false,
            points: Vec::new(),
        },
    ];
    let bytes = metrics_request(&resource("h"), &families, 1_000, 9_000).encode_to_vec();
    let back = ExportMetricsServiceRequest::decode(bytes.as_slice()).expect("decodes");
    let metrics = &back.resource_metrics[0].scope_metrics[0].metrics;
    assert_eq!(metrics.len(), 2, "a family with no series is left out");
    let m = &metrics[0];
    assert_eq!(
        (m.name.as_str(), m.unit.as_str()),
        ("tracer.requests", "{request}")
    );
    let Some(Data::Sum(sum)) = &m.data else {
        panic!("a sum: {m:?}");
    };
    assert!(sum.is_monotonic);
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32
    );
    let p = &sum.data_points[0];
    assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1_000, 9_000));
    assert_eq!(p.value, Some(number_data_point::Value::AsInt(7)));
    assert_eq!(text(attr(&p.attributes, "service")), "port 8000");
    assert_eq!(text(attr(&p.attributes, "model")), "m");
    let Some(Data::Gauge(g)) = &metrics[1].data else {
        panic!("a gauge");
    };
    assert_eq!(
        g.data_points[0].value,
        Some(number_data_point::Value::AsDouble(81.5))
    );
}
