//! OTLP export (issue 20) against a receiver on loopback built on the official OTLP protobuf
//! definitions (`opentelemetry-proto`, decoded with prost): every final record arrives once as
//! a log record whose body is its `--records-out` line, the metrics carry the records' totals;
//! with the receiver gone (port closed) the daemon runs on and counts what it drops; with the
//! receiver back on the same port export resumes, and over the whole run exported + dropped
//! equals the records the daemon made.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
        metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
    },
    common::v1::{KeyValue, any_value::Value as Any},
    logs::v1::LogRecord,
    metrics::v1::{AggregationTemporality, Metric, metric::Data, number_data_point},
};
use prost::Message;
use serde_json::Value;
use tracer_tests::{EmuEnv, emuload, free_port, jsonl, privileged_or_skip, wait_until};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

/// What the receiver took.
#[derive(Default)]
struct Received {
    logs: Vec<LogRecord>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// Requests that were not OTLP/HTTP protobuf with the configured header (answered 400).
    bad: Vec<String>,
}

type Shared = Arc<Mutex<Received>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Received> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks what every export must carry; the problem, if any.
fn check_head(headers: &HeaderMap) -> Option<String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .map(header::HeaderValue::as_bytes);
    if ct != Some(b"application/x-protobuf".as_slice()) {
        return Some(format!("content type {ct:?}"));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(header::HeaderValue::as_bytes);
    (auth != Some(b"Bearer test-token".as_slice())).then(|| format!("authorization {auth:?}"))
}

fn answer(body: Vec<u8>) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        body,
    )
}

/// The request's protobuf message, once its head is checked (what is wrong is kept, and
/// answered 400).
fn decode<M: Message + Default>(
    got: &Shared,
    what: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<M, StatusCode> {
    check_head(headers)
        .map_or_else(|| M::decode(body).map_err(|e| e.to_string()), Err)
        .map_err(|why| {
            lock(got).bad.push(format!("{what}: {why}"));
            StatusCode::BAD_REQUEST
        })
}

async fn logs(
    State(got): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>), StatusCode> {
    let req: ExportLogsServiceRequest = decode(&got, "logs", &headers, body)?;
    let records = req
        .resource_logs
        .into_iter()
        .flat_map(|r| r.scope_logs)
        .flat_map(|s| s.log_records);
    lock(&got).logs.extend(records);
    Ok(answer(ExportLogsServiceResponse::default().encode_to_vec()))
}

async fn metrics(
    State(got): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>), StatusCode> {
    let req: ExportMetricsServiceRequest = decode(&got, "metrics", &headers, body)?;
    lock(&got).metrics.push(req);
    Ok(answer(
        ExportMetricsServiceResponse::default().encode_to_vec(),
    ))
}

/// An OTLP/HTTP receiver on `127.0.0.1:port`, on a runtime of its own.
struct Receiver(Option<tokio::runtime::Runtime>);

impl Receiver {
    fn start(port: u16, got: &Shared) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind the receiver's port");
        let app = Router::new()
            .route("/v1/logs", post(logs))
            .route("/v1/metrics", post(metrics))
            .with_state(Arc::clone(got));
        rt.spawn(async move { axum::serve(listener, app).await });
        Receiver(Some(rt))
    }

    /// Gone as a killed collector is: the port and every connection closed at once.
    fn stop(mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// `/metrics` from the daemon's TCP listener.
fn scrape(port: u16) -> String {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    tcp.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The exporter's counters in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    exported: u64,
    queue_full: u64,
    failed: u64,
    rejected: u64,
    waiting: u64,
    logs_failed: u64,
}

impl Counts {
    fn read(text: &str) -> Counts {
        let get = |series: &str| -> u64 {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(series)?
                        .strip_prefix(' ')?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}")) as u64
        };
        let records = |r: &str| get(&format!("tracer_otlp_records_total{{result=\"{r}\"}}"));
        Counts {
            exported: records("exported"),
            queue_full: records("queue_full"),
            failed: records("failed"),
            rejected: records("rejected"),
            waiting: get("tracer_otlp_queue_records"),
            logs_failed: get("tracer_otlp_exports_total{signal=\"logs\",result=\"failed\"}"),
        }
    }

    fn lost(&self) -> u64 {
        self.queue_full + self.failed + self.rejected
    }
}

fn wait_for(what: &str, timeout_s: u64, done: impl FnMut() -> bool, log: impl Fn() -> String) {
    wait_until(what, Duration::from_secs(timeout_s), done, log);
}

/// `emuload` for `seconds`; returns how many requests it made.
fn load(port: u16, seconds: &str, seed: &str, out: &std::path::Path) -> usize {
    let args = ["--seconds", seconds, "--seed", seed, "--concurrency", "4"];
    emuload(
        port,
        &[&args[..], &["--max-tokens-max", "64"]].concat(),
        out,
    )
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn log_id(l: &LogRecord) -> u64 {
    match attr(&l.attributes, "tracer.id") {
        Some(Any::IntValue(id)) => u64::try_from(*id).expect("an id"),
        other => panic!("a log record without tracer.id: {other:?}"),
    }
}

/// Every series of the OTLP metric `name` in `req`, by its attributes, summed.
fn metric_sum(req: &ExportMetricsServiceRequest, name: &str) -> Option<f64> {
    let m: &Metric = req
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)?;
    let Some(Data::Sum(sum)) = &m.data else {
        panic!("{name} is not a sum: {m:?}");
    };
    assert!(sum.is_monotonic, "{name}");
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32,
        "{name}"
    );
    Some(
        sum.data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => v as f64,
                Some(number_data_point::Value::AsDouble(v)) => v,
                None => panic!("{name}: a point without a value"),
            })
            .sum(),
    )
}

#[test]
fn otlp_export_survives_a_receiver_that_goes_away_and_counts_every_record() {
    if !privileged_or_skip("otlp_export_survives_a_receiver_that_goes_away_and_counts_every_record")
    {
        return;
    }
    let t0 = Instant::now();
    let env = EmuEnv::new("otlp");
    let dir = env.dir.path();
    let (mut host, port) = env.start_host(1);
    let got: Shared = Arc::default();
    let otlp_port = free_port();
    let receiver = Receiver::start(otlp_port, &got);
    let metrics_port = free_port();
    let config = dir.join("tracer.toml");
    // A short retry: an outage of seconds gives up on batches (counted), deterministically. The
    // queue holds the burst of records a new service's cost model releases at once (over 20
    // here); drops on a full queue are counted exactly in the unit tests (`exporter::tests`).
    std::fs::write(
        &config,
        format!(
            "[ledger]\nmax_defer_ns = 2000000000\n[api]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [bill]\ncurrency = \"EUR\"\nprice_per_kwh = \"0.25\"\n\
             [otlp]\nendpoint = \"http://127.0.0.1:{otlp_port}\"\nqueue_records = 64\nbatch_records = 16\n\
             flush_interval_ms = 200\nmetrics_interval_ms = 500\ntimeout_ms = 1000\nretry_max_ms = 1000\n\
             headers = {{ authorization = \"Bearer test-token\" }}\n"
        ),
    )
    .expect("config");
    let records_path = dir.join("records.jsonl");
    let tracer = env.start_tracer(
        TRACER,
        &[
            "--config",
            config.to_str().expect("utf8"),
            "--port",
            &port.to_string(),
            "--records-out",
            records_path.to_str().expect("utf8"),
        ],
        &[],
    );
    let log = || tracer.log_text();
    let counts = || Counts::read(&scrape(metrics_port));
    let records = || jsonl(&records_path);
    // Every record the daemon made has been exported, dropped or given up on.
    let settled = |total: usize| {
        let c = counts();
        c.waiting == 0 && c.exported + c.lost() == total as u64
    };

    // 1. The receiver is up: every record arrives once, as its records_out line.
    let sent1 = load(port, "3", "1", &dir.join("load1.jsonl"));
    wait_for(
        "phase 1 records final",
        60,
        || records().len() >= sent1,
        log,
    );
    wait_for("phase 1 exported", 30, || settled(sent1), log);
    let phase1 = counts();
    assert_eq!(phase1.lost(), 0, "the receiver was up: {phase1:?}");
    let by_id: BTreeMap<u64, Value> = records()
        .into_iter()
        .map(|r| (r["id"].as_u64().expect("id"), r))
        .collect();
    assert_eq!(by_id.len(), sent1);
    {
        let g = lock(&got);
        assert!(g.bad.is_empty(), "{:?}", g.bad);
        let ids: Vec<u64> = g.logs.iter().map(log_id).collect();
        assert_eq!(ids.len(), sent1, "once each");
        assert_eq!(
            ids.iter().copied().collect::<BTreeSet<_>>(),
            by_id.keys().copied().collect(),
            "the daemon's records"
        );
        for l in &g.logs {
            let record = &by_id[&log_id(l)];
            let Some(Any::StringValue(body)) = l.body.as_ref().and_then(|b| b.value.as_ref())
            else {
                panic!("a body: {l:?}");
            };
            let body: Value = serde_json::from_str(body).expect("JSON body");
            assert_eq!(&body, record, "the body is the records_out line");
            assert_eq!(
                attr(&l.attributes, "tracer.total_j"),
                Some(&Any::DoubleValue(
                    record["total_j"].as_f64().expect("total_j")
                ))
            );
            assert_eq!(
                attr(&l.attributes, "tracer.cost.currency"),
                Some(&Any::StringValue("EUR".into()))
            );
            let end_ms = record["end_unix_ms"].as_u64().expect("end");
            assert_eq!(l.time_unix_nano, end_ms * 1_000_000);
        }
    }
    // The metrics carry the same totals once the last record is in them.
    let energy1: f64 = by_id.values().filter_map(|r| r["total_j"].as_f64()).sum();
    wait_for(
        "metrics with every phase 1 record",
        10,
        || {
            lock(&got)
                .metrics
                .last()
                .and_then(|m| metric_sum(m, "tracer.requests"))
                == Some(sent1 as f64)
        },
        log,
    );
    {
        let g = lock(&got);
        let last = g.metrics.last().expect("metrics");
        let energy = metric_sum(last, "tracer.request.energy").expect("energy");
        assert!(
            (energy - energy1).abs() <= 1e-6 * energy1,
            "metrics {energy} J, records {energy1} J"
        );
        assert!(metric_sum(last, "tracer.request.cost").is_some_and(|c| c > 0.0));
        assert!(metric_sum(last, "tracer.device.energy").is_some_and(|j| j > 0.0));
        let res = last.resource_metrics[0]
            .resource
            .as_ref()
            .expect("resource");
        assert_eq!(
            attr(&res.attributes, "service.name"),
            Some(&Any::StringValue("tracer".into()))
        );
        assert!(attr(&res.attributes, "host.name").is_some());
        // Cumulative from one start: the same start time in every export.
        let starts: BTreeSet<u64> = g
            .metrics
            .iter()
            .flat_map(|m| &m.resource_metrics[0].scope_metrics[0].metrics)
            .filter_map(|m| match &m.data {
                Some(Data::Sum(s)) => Some(s.data_points.iter().map(|p| p.start_time_unix_nano)),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(starts.len(), 1, "{starts:?}");
    }

    // 2. The receiver is gone: the daemon goes on, counting what it cannot send.
    receiver.stop();
    let received_before = lock(&got).logs.len();
    let sent2 = load(port, "4", "2", &dir.join("load2.jsonl"));
    wait_for(
        "phase 2 records final",
        60,
        || records().len() >= sent1 + sent2,
        log,
    );
    wait_for(
        "drops counted while the receiver is down",
        30,
        || {
            let c = counts();
            c.failed > 0 && c.logs_failed > 0
        },
        log,
    );
    let phase2 = counts();
    assert_eq!(lock(&got).logs.len(), received_before, "nobody listening");
    assert!(
        std::path::Path::new(&format!("/proc/{}", tracer.pid())).exists(),
        "the daemon is running:\n{}",
        log()
    );
    // `promtool` reads the exporter's families too.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    let text = scrape(metrics_port);
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("promtool's input");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // 3. The receiver is back on the same port: export resumes.
    let _receiver = Receiver::start(otlp_port, &got);
    let sent3 = load(port, "3", "3", &dir.join("load3.jsonl"));
    let total = sent1 + sent2 + sent3;
    wait_for(
        "phase 3 records final",
        60,
        || records().len() >= total,
        log,
    );
    wait_for("phase 3 exported", 30, || settled(total), log);
    let end = counts();
    let all: Vec<u64> = records()
        .iter()
        .map(|r| r["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(all.len(), total);
    let phase2_last = all[..sent1 + sent2].iter().max().copied().unwrap_or(0);
    {
        let g = lock(&got);
        assert!(g.bad.is_empty(), "{:?}", g.bad);
        let ids: Vec<u64> = g.logs.iter().map(log_id).collect();
        let unique: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "a record arrived twice");
        assert!(
            unique.iter().all(|id| all.contains(id)),
            "an id the daemon never made"
        );
        assert_eq!(ids.len() as u64, end.exported, "exported is what arrived");
        let phase3: Vec<_> = all.iter().filter(|id| **id > phase2_last).collect();
        assert_eq!(phase3.len(), sent3);
        assert!(
            phase3.iter().all(|id| unique.contains(id)),
            "a record made after the receiver came back is missing: {end:?}"
        );
    }
    // Nothing silently lost over the whole run.
    assert_eq!(end.exported + end.lost(), total as u64, "{end:?}");
    assert_eq!(end.rejected, 0);
    assert!(end.lost() >= phase2.lost() && phase2.lost() > 0);
    let text = log();
    let failing = format!("OTLP export to http://127.0.0.1:{otlp_port} failing");
    assert_eq!(
        text.matches(&failing).count(),
        1,
        "one warning per outage:\n{text}"
    );
    assert_eq!(text.matches("is back after").count(), 1, "{text}");

    tracer.stop();
    // The last export at shutdown has every record.
    let last = lock(&got)
        .metrics
        .last()
        .and_then(|m| metric_sum(m, "tracer.requests"));
    assert_eq!(last, Some(total as f64));
    host.stop();
    eprintln!(
        "otlp: {total} records ({sent1} + {sent2} + {sent3}), {end:?}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
