//! The endpoints: a request (method, path, query) and the caller's scope in, a reply out.
//! Pure over [`Shared`]: no I/O but the locks.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json, value::RawValue};

use super::{
    Shared,
    access::Scope,
    health_metrics::STALE_AFTER_MS,
    index::Filter,
    query::{params, parse_time},
    reply::{Reply, error},
};
use crate::{pipeline::FinalRecord, store::GroupSums};

/// Records per page when `limit` is not given, and the most one page holds.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

/// The filter the query asks for, within the caller's scope.
fn filter(p: &BTreeMap<String, String>, scope: &Scope, shared: &Shared) -> Result<Filter, Reply> {
    let time = |k: &str| -> Result<Option<i64>, Reply> {
        p.get(k)
            .map(|v| {
                parse_time(v).ok_or_else(|| {
                    error(
                        400,
                        format!("{k}: {v:?} is neither unix milliseconds nor RFC 3339"),
                    )
                })
            })
            .transpose()
    };
    if let Some(o) = p.get("outcome")
        && ![
            "complete",
            "closed_early",
            "truncated",
            "aborted",
            "incomplete",
        ]
        .contains(&o.as_str())
    {
        return Err(error(400, format!("outcome: unknown {o:?}")));
    }
    Ok(Filter {
        services: scope.services(),
        service_name: p.get("service").cloned(),
        model: p.get("model").cloned(),
        outcome: p.get("outcome").cloned(),
        tenant: p.get("tenant").cloned(),
        first_id: shared.first_visible(scope),
        since_ms: time("since")?,
        until_ms: time("until")?,
    })
}

fn requests(shared: &Shared, p: &BTreeMap<String, String>, scope: &Scope) -> Reply {
    for k in p.keys() {
        if ![
            "service", "model", "tenant", "outcome", "since", "until", "limit", "cursor",
        ]
        .contains(&k.as_str())
        {
            return error(400, format!("unknown parameter {k:?}"));
        }
    }
    let f = match filter(p, scope, shared) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let limit = match p.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_LIMIT,
        Some(Ok(l)) if (1..=MAX_LIMIT).contains(&l) => l,
        Some(_) => return error(400, format!("limit: 1 to {MAX_LIMIT}")),
    };
    let before = match p
        .get("cursor")
        .map(|c| c.strip_prefix('r').map(str::parse::<u64>))
    {
        None => None,
        Some(Some(Ok(id))) => Some(id),
        Some(_) => return error(400, "cursor: not one this API gave"),
    };
    let (memory, oldest) = {
        let index = shared.index();
        (index.page(&f, before, limit), index.oldest_id())
    };
    // Records as JSON text: memory's encoded here, the store's sent as stored (checked JSON).
    let mut page: Vec<(u64, Box<RawValue>)> = Vec::with_capacity(limit);
    for r in &memory {
        match serde_json::value::to_raw_value(r.as_ref()) {
            Ok(raw) => page.push((r.record.id.0, raw)),
            Err(e) => return error(500, format!("encoding record {}: {e}", r.record.id.0)),
        }
    }
    // Memory holds the newest records; older ones are read from the store.
    if page.len() < limit
        && let Some(store) = shared.store().as_ref()
    {
        let from = before.unwrap_or(u64::MAX).min(oldest.unwrap_or(u64::MAX));
        match store.page_raw(&stored_filter(&f), from, limit - page.len()) {
            Ok(more) => page.extend(more),
            Err(e) => return error(500, format!("reading the store: {e}")),
        }
    }
    let next = (page.len() == limit)
        .then(|| page.last().map(|(id, _)| format!("r{id}")))
        .flatten();
    let body = Page {
        requests: page.into_iter().map(|(_, raw)| raw).collect(),
        next_cursor: next,
    };
    match serde_json::to_string(&body) {
        Ok(text) => Reply::Text(200, "application/json", text + "\n"),
        Err(e) => error(500, format!("encoding the page: {e}")),
    }
}

/// A page of records, each as JSON text.
#[derive(serde::Serialize)]
struct Page {
    requests: Vec<Box<RawValue>>,
    next_cursor: Option<String>,
}

/// The same filter on the store's columns.
fn stored_filter(f: &Filter) -> crate::store::StoredFilter {
    crate::store::StoredFilter {
        services: f
            .services
            .as_ref()
            .map(|s| s.iter().map(|id| id.0).collect()),
        service_name: f.service_name.clone(),
        first_id: f.first_id,
        model: f.model.clone(),
        tenant: f.tenant.clone(),
        outcome: f.outcome.clone(),
        since_ms: f.since_ms,
        until_ms: f.until_ms,
    }
}

/// A group's cost: `{amount, currency}` (decimal string), `null` without a tariff, or a
/// refusal to add different currencies.
fn cost_json(nano: i64, currency: Option<&str>) -> Value {
    match currency {
        None => Value::Null,
        Some("*") => {
            json!({ "error": "costs in more than one currency: summarise a period of one tariff" })
        }
        Some(c) => json!({
            "amount": (rust_decimal::Decimal::from(nano) / rust_decimal::Decimal::from(1_000_000_000u32)).to_string(),
            "currency": c,
        }),
    }
}

/// Sums and quantiles (J per request and per output token) per group (`by` model, service or
/// tenant) over the records kept, with the devices' idle and unattributed energy from the
/// latest snapshot (whole host: root and the group only).
fn summary(shared: &Shared, p: &BTreeMap<String, String>, scope: &Scope) -> Reply {
    let by = p.get("by").map_or("service", String::as_str);
    if !["model", "service", "tenant"].contains(&by) {
        return error(400, format!("by: model, service or tenant, not {by:?}"));
    }
    let f = match filter(p, scope, shared) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let mut groups: BTreeMap<String, GroupSums> = BTreeMap::new();
    let store_only = *scope == Scope::All && shared.store().is_some();
    let oldest = {
        let index = shared.index();
        for r in index.all(&f).filter(|_| !store_only) {
            let key = match by {
                "model" => r.record.model.as_deref().unwrap_or("(unknown)"),
                "tenant" => r.record.tenant.as_deref().unwrap_or("(none)"),
                _ => r.service_name.as_str(),
            };
            // Found without allocating: a window holds many records of few groups.
            match groups.get_mut(key) {
                Some(g) => g.add_record(r),
                None => groups.entry(key.to_owned()).or_default().add_record(r),
            }
        }
        index.oldest_id()
    };
    // With a store, everything is in it (memory holds only committed records): whole minutes
    // from its rollups. Callers limited to their own services: memory, then the store's rows.
    if let Some(store) = shared.store().as_ref() {
        let group_by = match by {
            "model" => crate::store::GroupBy::Model,
            "tenant" => crate::store::GroupBy::Tenant,
            _ => crate::store::GroupBy::Service,
        };
        let sums = if store_only {
            store.summary(&stored_filter(&f), group_by)
        } else {
            store.sums(&stored_filter(&f), oldest.unwrap_or(u64::MAX), group_by)
        };
        match sums {
            Ok(sums) => {
                for s in sums {
                    groups.entry(s.key.clone()).or_default().add(&s);
                }
            }
            Err(e) => return error(500, format!("reading the store: {e}")),
        }
    }
    // By service: where each runs now (pod, container, unit), as the services view says.
    let snapshot = (by == "service").then(|| shared.snapshot()).flatten();
    let workload_of = |name: &str| {
        snapshot
            .as_ref()
            .and_then(|s| s.services.iter().find(|svc| svc.name == name))
            .and_then(|svc| svc.workload.as_ref())
            .map(|w| serde_json::to_value(w.as_ref()).unwrap_or(Value::Null))
    };
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(k, g)| {
            let mut v = json!({
                by: k,
                "requests": g.requests,
                "joules": g.total_j,
                "kwh": g.total_j / 3.6e6,
                "dynamic_j": g.dynamic_j,
                "idle_j": g.idle_j,
                "output_tokens": g.output_tokens,
                "joules_per_output_token": (g.output_tokens > 0).then(|| g.token_j / g.output_tokens as f64),
                "j_per_request": g.quantiles.per_request_json(),
                "j_per_output_token": g.quantiles.per_token_json(),
                "quantiles_over": g.quantiles.requests(),
                "cost": cost_json(g.cost_nano, g.currency.as_deref()),
            });
            if let (Some(w), Some(o)) = (workload_of(&k), v.as_object_mut()) {
                o.insert("workload".into(), w);
            }
            v
        })
        .collect();
    let devices = (*scope == Scope::All)
        .then(|| shared.snapshot())
        .flatten()
        .map(|s| {
            s.devices
                .iter()
                .map(|d| {
                    json!({
                        "device": d.name,
                        "measured_j": d.totals.measured_j,
                        "idle_j": d.totals.idle_j,
                        "unattributed_j": d.totals.unattributed_j,
                    })
                })
                .collect::<Vec<_>>()
        });
    // Each device's energy over the window (between the store's snapshots nearest its edges):
    // where the requests' share sits beside idle and unattributed energy for the same period.
    let window = match (*scope == Scope::All, shared.store().as_ref()) {
        (true, Some(store)) => {
            match store.device_window(
                f.since_ms.unwrap_or(i64::MIN),
                f.until_ms.unwrap_or(i64::MAX),
            ) {
                Ok(devices) => Some(
                    devices
                        .into_iter()
                        .map(|(device, v)| {
                            json!({
                                "device": device,
                                "measured_j": v[0],
                                "requests_j": v[1],
                                "idle_j": v[2],
                                "unattributed_j": v[3],
                            })
                        })
                        .collect::<Vec<_>>(),
                ),
                Err(e) => return error(500, format!("reading the store: {e}")),
            }
        }
        _ => None,
    };
    Reply::Json(
        200,
        json!({ "by": by, "groups": groups, "devices": window, "devices_since_start": devices }),
    )
}

/// Requests of `service` in flight at the snapshot.
fn in_flight(snap: &crate::pipeline::snapshot::Snapshot, service: crate::ids::ServiceId) -> usize {
    snap.in_flight
        .iter()
        .filter(|r| r.service == service)
        .count()
}

fn services(shared: &Shared, scope: &Scope) -> Reply {
    let list: Vec<Value> = shared.snapshot().map_or_else(Vec::new, |s| {
        s.services
            .iter()
            .filter(|svc| scope.sees(svc.id))
            .map(|svc| {
                let mut v = serde_json::to_value(svc).unwrap_or(Value::Null);
                let in_flight = in_flight(&s, svc.id);
                if let Some(o) = v.as_object_mut() {
                    o.insert("in_flight".into(), in_flight.into());
                }
                v
            })
            .collect()
    });
    Reply::Json(200, json!({ "services": list }))
}

/// Every measured device: its totals, what it draws now, who holds it (services, their
/// processes, requests in flight) and its sensor's health.
fn gpus(shared: &Shared, scope: &Scope) -> Reply {
    if *scope != Scope::All {
        return error(
            403,
            "devices are the whole host's: root or the API group only",
        );
    }
    let Some(snap) = shared.snapshot() else {
        return Reply::Json(200, json!({ "devices": Value::Null }));
    };
    let devices: Vec<Value> = snap
        .devices
        .iter()
        .map(|d| {
            let holders: Vec<Value> = snap
                .services
                .iter()
                .filter_map(|svc| {
                    let g = svc.gpus.iter().find(|g| g.device == d.name)?;
                    Some(json!({
                        "service": svc.id,
                        "service_name": svc.name,
                        "pids": g.holders.keys().collect::<Vec<_>>(),
                        "weight": g.weight,
                        "in_flight": in_flight(&snap, svc.id),
                    }))
                })
                .collect();
            let sampler = snap.samplers.iter().find(|s| s.devices.contains(&d.name));
            let stale = d.power_age_ms.is_none_or(|age| age > STALE_AFTER_MS);
            let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("holders".into(), holders.into());
                o.insert(
                    "sensor".into(),
                    json!({
                        "source": sampler.map(|s| s.source.as_str()),
                        "polls": sampler.map(|s| s.polls),
                        "late_polls": sampler.map(|s| s.late),
                        "sampler_cpu_ns": sampler.map(|s| s.cpu_ns),
                        "reading_age_ms": d.power_age_ms,
                        "gap_ns": d.totals.gap_ns,
                        "status": if stale { "stale" } else { "ok" },
                    }),
                );
            }
            v
        })
        .collect();
    Reply::Json(200, json!({ "devices": devices }))
}

fn health(shared: &Shared) -> Reply {
    let (records, evicted) = {
        let i = shared.index();
        (i.len(), i.evicted)
    };
    let counts = shared.snapshot().map(|s| s.counts);
    let store = shared.writer().map(|w| {
        use std::sync::atomic::Ordering::Relaxed;
        json!({
            "committed": w.committed.load(Relaxed),
            "failed": w.failed.load(Relaxed),
            "expired": w.expired.load(Relaxed),
        })
    });
    let recoveries: Vec<Value> = shared
        .recoveries()
        .iter()
        .map(|r| {
            let lost = r.journal.is_none() || r.unreadable.is_some();
            json!({
                "run": r.run,
                "journal": r.journal.as_ref().map(|j| j.display().to_string()),
                "segments": r.segments,
                "recovered": r.recovered,
                "incomplete": r.incomplete,
                "already_stored": r.already_stored,
                "cut_short": r.cut_short,
                // Without a readable journal, what was not final at the crash cannot be
                // counted: null says so, 0 means nothing was lost.
                "requests_lost": if lost { Value::Null } else { json!(0) },
                "why": r.to_string(),
            })
        })
        .collect();
    Reply::Json(
        200,
        json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "records_kept": records,
            "records_evicted": evicted,
            "counts": counts,
            "kernel": shared.snapshot().and_then(|s| s.kernel),
            "store": store,
            "recoveries": recoveries,
        }),
    )
}

/// A record for the caller, if it may see it.
fn one(shared: &Shared, id: &str, scope: &Scope) -> Reply {
    let Ok(id) = id.parse::<u64>() else {
        return error(400, format!("{id:?} is not a request id"));
    };
    // The index's lock is let go before the store is asked (the writer waits on it).
    let in_memory = shared.index().get(id);
    let found = in_memory.or_else(|| {
        let store = shared.store();
        let r = store.as_ref()?.get(id).ok().flatten()?;
        Some(Arc::new(r))
    });
    match found {
        Some(r) if shared.sees(scope, &r) => Reply::Json(200, json!(r.as_ref())),
        _ => error(
            404,
            format!("no request {id} (or not yours, or no longer kept)"),
        ),
    }
}

/// Every endpoint `route` serves, as `tracer/openapi.json` names them (a test holds the two
/// together).
pub const ENDPOINTS: [&str; 8] = [
    "/health",
    "/v1/requests",
    "/v1/requests/{id}",
    "/v1/summary",
    "/v1/services",
    "/v1/gpus",
    "/v1/stream",
    "/metrics",
];

/// Dispatches one request.
pub fn route(
    method: &str,
    path: &str,
    query: Option<&str>,
    scope: &Scope,
    shared: &Shared,
) -> Reply {
    if method != "GET" && method != "HEAD" {
        return error(405, format!("{method} is not served: the API is read-only"));
    }
    let p = match params(query) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match path {
        "/health" => health(shared),
        "/v1/requests" => requests(shared, &p, scope),
        "/v1/summary" => summary(shared, &p, scope),
        "/v1/services" => services(shared, scope),
        "/v1/gpus" => gpus(shared, scope),
        "/v1/stream" => Reply::Stream,
        "/metrics" => super::metrics::metrics(shared, scope),
        _ => match path.strip_prefix("/v1/requests/") {
            Some(id) => one(shared, id, scope),
            None => error(
                404,
                format!(
                    "no such endpoint {path:?}; served: {}",
                    ENDPOINTS.join(", ")
                ),
            ),
        },
    }
}

/// One record as a stream line, if the caller may see it.
pub fn stream_line(r: &Arc<FinalRecord>, scope: &Scope) -> Option<String> {
    // Streamed records are this run's: the scope's service ids mean the same services.
    if !scope.sees(r.record.service) {
        return None;
    }
    serde_json::to_string(r.as_ref()).ok().map(|mut l| {
        l.push('\n');
        l
    })
}
