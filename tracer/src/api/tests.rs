//! The `OpenAPI` description (`tracer/openapi.json`) against the implementation: every
//! documented path is served and answers with the documented required fields; every served
//! path is documented.

use std::sync::Arc;

use serde_json::Value;

use super::{
    Feed, Shared,
    access::Scope,
    reply::Reply,
    routes::{ENDPOINTS, route},
};
use crate::{
    ledger::RequestRecord,
    pipeline::{Fact, FinalRecord, Subscriber as _},
};

const OPENAPI: &str = include_str!("../../openapi.json");

fn record(id: u64) -> Arc<FinalRecord> {
    let json = format!(
        r#"{{"id":{id},"external_id":"x-{id}","service":1,"model":"m","arrive_ns":1,"first_byte_ns":2,"first_event_ns":null,"end_ns":3,"outcome":"complete","prompt_tokens":5,"cached_tokens":null,"completion_tokens":4,"events":0,"response_bytes":10,"devices":[],"dynamic_j":1.0,"idle_j":0.5,"total_j":1.5,"kwh":4.1e-7,"joules_per_output_token":0.375,"uncertainty_j":0.1,"coverage_gap_ns":0}}"#
    );
    let record: RequestRecord = serde_json::from_str(&json).expect("a record");
    Arc::new(FinalRecord {
        workload: None,
        record,
        service_name: "port 8000".into(),
        end_unix_ms: 1_796_464_800_000,
        cost: None,
    })
}

/// The schema `s` points at (one `$ref` resolved).
fn resolve<'a>(doc: &'a Value, s: &'a Value) -> &'a Value {
    match s["$ref"].as_str() {
        Some(r) => r
            .trim_start_matches("#/")
            .split('/')
            .fold(doc, |v, k| &v[k]),
        None => s,
    }
}

/// A JSON answer sent as text (a page: records as stored) parsed like the others.
fn json_text(r: Reply) -> Reply {
    match r {
        Reply::Text(status, kind, text) if kind.starts_with("application/json") => {
            Reply::Json(status, serde_json::from_str(&text).expect("JSON text"))
        }
        other => other,
    }
}

#[test]
fn every_documented_path_is_served_with_its_required_fields() {
    let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    let shared = Shared::new(100);
    let mut feed = Feed {
        shared: Arc::clone(&shared),
        records: true,
    };
    for id in 1..=3 {
        feed.on_fact(&Fact::Record(&record(id))).expect("fed");
    }
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    let mut served = ENDPOINTS.to_vec();
    documented.sort_unstable();
    served.sort_unstable();
    assert_eq!(
        documented, served,
        "openapi.json and the router list the same paths"
    );
    for (path, item) in paths {
        let concrete = path.replace("{id}", "2");
        let reply = json_text(route("GET", &concrete, None, &Scope::All, &shared));
        let ok = &item["get"]["responses"]["200"]["content"];
        match reply {
            Reply::Json(status, body) => {
                assert_eq!(status, 200, "{path}: {body}");
                let schema = resolve(&doc, &ok["application/json"]["schema"]);
                for field in schema["required"].as_array().into_iter().flatten() {
                    let f = field.as_str().expect("a name");
                    assert!(body.get(f).is_some(), "{path}: no {f} in {body}");
                }
            }
            Reply::Text(status, kind, _) => {
                assert_eq!(status, 200, "{path}");
                assert!(
                    ok.get(kind.split(';').next().unwrap_or(kind)).is_some(),
                    "{path}: {kind}"
                );
            }
            Reply::Stream => assert!(ok.get("application/x-ndjson").is_some(), "{path}"),
        }
    }
    // Every documented query parameter is accepted, with each of its documented values.
    for (path, item) in paths {
        for p in item["get"]["parameters"].as_array().into_iter().flatten() {
            if p["in"] != "query" {
                continue;
            }
            let name = p["name"].as_str().expect("name");
            let values: Vec<String> = match p["schema"]["enum"].as_array() {
                Some(e) => e
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                None if p["schema"]["type"] == "integer" => vec!["5".into()],
                None if ["since", "until"].contains(&name) => vec!["1796460000000".into()],
                None if name == "cursor" => vec!["r3".into()],
                None => vec!["x".into()],
            };
            for v in values {
                let q = format!("{name}={v}");
                match route("GET", path, Some(&q), &Scope::All, &shared) {
                    Reply::Json(status, body) => assert_eq!(status, 200, "{path}?{q}: {body}"),
                    Reply::Text(status, ..) => assert_eq!(status, 200, "{path}?{q}"),
                    Reply::Stream => {}
                }
            }
        }
    }
    // A summary's groups carry the documented group fields; the quantiles are the records'
    // (all 1.5 J, 4 output tokens), from memory.
    let Reply::Json(_, summary) = route("GET", "/v1/summary", None, &Scope::All, &shared) else {
        panic!("a summary");
    };
    let group_schema = &doc["components"]["schemas"]["Summary"]["properties"]["groups"]["items"];
    let quantiles_schema = &doc["components"]["schemas"]["Quantiles"];
    let groups = summary["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{summary}");
    let g = &groups[0];
    for f in group_schema["required"].as_array().expect("required") {
        let f = f.as_str().expect("a name");
        assert!(g.get(f).is_some(), "group without {f}: {g}");
    }
    assert_eq!(g["quantiles_over"], 3);
    for (field, want_j) in [("j_per_request", 1.5), ("j_per_output_token", 0.375)] {
        for q in quantiles_schema["required"].as_array().expect("required") {
            let q = q.as_str().expect("a name");
            let got = g[field][q].as_f64().expect("a number");
            assert!(
                (want_j..=want_j * 1.01).contains(&got),
                "{field}.{q}: {got}, not {want_j}"
            );
        }
    }
    // A page's records carry the documented record fields.
    let Reply::Json(_, page) = json_text(route(
        "GET",
        "/v1/requests",
        Some("limit=2"),
        &Scope::All,
        &shared,
    )) else {
        panic!("a page");
    };
    let record_schema = &doc["components"]["schemas"]["Record"];
    for r in page["requests"].as_array().expect("requests") {
        for f in record_schema["required"].as_array().expect("required") {
            let f = f.as_str().expect("a name");
            assert!(r.get(f).is_some(), "record without {f}: {r}");
        }
    }
    assert_eq!(page["next_cursor"], "r2");
    let Reply::Json(_, next) = json_text(route(
        "GET",
        "/v1/requests",
        Some("limit=2&cursor=r2"),
        &Scope::All,
        &shared,
    )) else {
        panic!("a page");
    };
    assert_eq!(next["requests"][0]["id"], 1);
    assert_eq!(next["next_cursor"], Value::Null);
    // Someone who owns nothing sees nothing.
    let nobody = Scope::Services(Vec::new());
    let Reply::Json(status, none) = json_text(route("GET", "/v1/requests", None, &nobody, &shared))
    else {
        panic!("a page");
    };
    assert_eq!(
        (status, none["requests"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    assert!(matches!(
        route("GET", "/v1/requests/2", None, &nobody, &shared),
        Reply::Json(404, _)
    ));
    assert!(matches!(
        route("GET", "/v1/gpus", None, &nobody, &shared),
        Reply::Json(403, _)
    ));
    assert!(matches!(
        route("DELETE", "/v1/requests", None, &Scope::All, &shared),
        Reply::Json(405, _)
    ));
}

/// Tenants past `api.metrics_tenants` share the `other` label: the series cannot grow without
/// bound, and no request is left out of the totals.
#[test]
fn tenants_past_the_cap_are_counted_as_other() {
    let shared = Shared::new(100);
    shared.limit_tenants(2);
    for id in 1..=5 {
        let mut r = (*record(id)).clone();
        r.record.tenant = Some(format!("tenant-{id}"));
        shared.add_record(&Arc::new(r));
    }
    let Reply::Text(200, _, text) = super::metrics::metrics(&shared, &Scope::All) else {
        panic!("metrics");
    };
    let line = |tenant: &str| {
        format!(
            "tracer_tenant_requests_total{{service=\"port 8000\",model=\"m\",tenant=\"{tenant}\"}} "
        )
    };
    assert!(text.contains(&(line("tenant-1") + "1")), "{text}");
    assert!(text.contains(&(line("tenant-2") + "1")), "{text}");
    assert!(text.contains(&(line("other") + "3")), "{text}");
    assert!(!text.contains("tenant-3"), "{text}");
}

/// With a tariff, `/metrics` sums each group's cost in the tariff's currency (and emissions
/// once a carbon intensity is set); without one it has no cost series at all.
#[test]
fn cost_and_emissions_are_counted_in_the_tariffs_currency() {
    let text = |shared: &Shared| match super::metrics::metrics(shared, &Scope::All) {
        Reply::Text(200, _, text) => text,
        _ => panic!("metrics"),
    };
    let shared = Shared::new(100);
    shared.add_record(&record(1));
    assert!(!text(&shared).contains("tracer_request_cost_total"));
    for (id, amount, grams) in [(2, "0.000125", 0.5), (3, "0.000250", 1.0)] {
        let mut r = (*record(id)).clone();
        r.cost = Some(crate::bill::RecordCost {
            amount: amount.parse().expect("decimal"),
            bar: "0".parse().expect("decimal"),
            currency: "EUR".into(),
            price_per_kwh: "0.25".parse().expect("decimal"),
            pue: "1.2".parse().expect("decimal"),
            emissions_g: Some(grams),
        });
        shared.add_record(&Arc::new(r));
    }
    let t = text(&shared);
    let cost = "tracer_request_cost_total{service=\"port 8000\",model=\"m\",currency=\"EUR\"} ";
    let value: f64 = t
        .lines()
        .find_map(|l| l.strip_prefix(cost))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!((value - 0.000_375).abs() < 1e-12, "{value}");
    assert!(
        t.contains("tracer_request_emissions_grams_total{service=\"port 8000\",model=\"m\"} 1.5"),
        "{t}"
    );
}
