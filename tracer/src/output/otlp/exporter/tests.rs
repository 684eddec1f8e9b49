//! The queue's accounting against a stand-in collector that can be up or down: every record
//! offered ends exported, dropped on a full queue, given up on, or rejected, and what waits
//! stays bounded.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::StatusCode;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use prost::Message as _;

use super::{Exporter, Settings, Verdict, backoff, verdict};
use crate::{
    output::otlp::{OtlpError, OtlpStats, Signal, encode, export::Answer, export::Sink},
    pipeline::{Bus, Fact, FinalRecord, Interest},
};

/// A collector stand-in: answers `status` (0: unreachable), keeps the batch sizes it took.
#[derive(Clone, Default)]
struct Fake {
    status: Arc<AtomicU16>,
    /// Rejects this many of each logs batch (a partial success).
    reject: Arc<AtomicU16>,
    batches: Arc<Mutex<Vec<usize>>>,
    metrics: Arc<Mutex<usize>>,
}

impl Sink for Fake {
    async fn send(
        &mut self,
        signal: Signal,
        body: Bytes,
        _timeout: Duration,
    ) -> Result<Answer, OtlpError> {
        let status = self.status.load(Ordering::Relaxed);
        if status == 0 {
            return Err(OtlpError::Connect(
                std::io::ErrorKind::ConnectionRefused.into(),
            ));
        }
        let mut answer = Bytes::new();
        if status == 200 {
            match signal {
                Signal::Logs => {
                    let req = ExportLogsServiceRequest::decode(body).expect("a logs request");
                    let n = req.resource_logs[0].scope_logs[0].log_records.len();
                    self.batches.lock().expect("lock").push(n);
                    let reject = self.reject.load(Ordering::Relaxed);
                    if reject > 0 {
                        answer = ExportLogsServiceResponse {
                            partial_success: Some(ExportLogsPartialSuccess {
                                rejected_log_records: i64::from(reject),
                                error_message: "too old".into(),
                            }),
                        }
                        .encode_to_vec()
                        .into();
                    }
                }
                Signal::Metrics => *self.metrics.lock().expect("lock") += 1,
            }
        }
        Ok(Answer {
            status: StatusCode::from_u16(status).expect("status"),
            retry_after: None,
            body: answer,
        })
    }
}

fn record() -> Arc<FinalRecord> {
    let line = include_str!("../../../../../tests/fixtures/h200/live-records.jsonl")
        .lines()
        .next()
        .expect("a record");
    Arc::new(serde_json::from_str(line).expect("a record"))
}

fn settings(queue_records: usize, batch_records: usize, retry_max_ms: u64) -> Settings {
    Settings {
        timeout: Duration::from_millis(200),
        queue_records,
        batch_records,
        flush_interval: Duration::from_millis(20),
        metrics_interval: Duration::from_millis(50),
        retry_max: Duration::from_millis(retry_max_ms),
    }
}

/// A bus with the exporter's queue, and the exporter on `fake`.
fn exporter(fake: &Fake, s: Settings, metrics: bool) -> (Bus, Exporter<Fake>) {
    let mut bus = Bus::new();
    let interest = Interest {
        records: true,
        ..Interest::default()
    };
    let rx = bus.subscribe_lossy("otlp", interest, s.queue_records);
    let families: Option<super::Families> = metrics.then(|| Box::new(Vec::new) as _);
    let e = Exporter {
        sink: fake.clone(),
        settings: s,
        endpoint: "http://test".into(),
        resource: encode::resource("test"),
        stats: Arc::new(OtlpStats::new(rx.stats)),
        records: Some(rx.rx),
        families,
        start_ns: 0,
        down_since: None,
    };
    (bus, e)
}

fn publish(bus: &mut Bus, n: usize) {
    let r = record();
    for _ in 0..n {
        bus.publish(&Fact::Record(&r));
    }
}

/// Runs `e` until `until` holds of its counters (or 5 s pass), then stops it with `grace` to
/// send what waits.
async fn run_until(
    e: Exporter<Fake>,
    until: impl Fn(&OtlpStats) -> bool,
    grace: Duration,
) -> Arc<OtlpStats> {
    let stats = Arc::clone(&e.stats);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::task::spawn_local(e.run(stopped));
    let t0 = Instant::now();
    while !until(&stats) && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(Instant::now() + grace);
    task.await.expect("the exporter ends");
    stats
}

fn offered(s: &OtlpStats) -> u64 {
    s.exported() + s.queue_full() + s.failed() + s.rejected() + s.waiting()
}

#[tokio::test]
async fn records_go_out_in_batches_exactly_once() {
    tokio::task::LocalSet::new()
        .run_until(async {
            let fake = Fake::default();
            fake.status.store(200, Ordering::Relaxed);
            let (mut bus, e) = exporter(&fake, settings(64, 4, 1000), true);
            publish(&mut bus, 10);
            let stats = run_until(e, |s| s.exported() == 10, Duration::ZERO).await;
            // Two full batches at once, the rest when the flush interval is up.
            assert_eq!(*fake.batches.lock().expect("lock"), [4, 4, 2]);
            assert_eq!(
                (stats.exported(), stats.lost(), stats.waiting()),
                (10, 0, 0)
            );
            assert_eq!(stats.exports(Signal::Logs, true), 3);
            assert_eq!(stats.exports(Signal::Logs, false), 0);
        })
        .await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_counted_drops_and_export_resumes() {
    tokio::task::LocalSet::new()
        .run_until(async {
            let fake = Fake::default();
            let (mut bus, e) = exporter(&fake, settings(8, 4, 300), true);
            // Down: the queue takes 8 of 30, the rest are dropped at once.
            publish(&mut bus, 30);
            assert_eq!(bus.health()[0].dropped, 22);
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let stats = Arc::clone(&e.stats);
            let task = tokio::task::spawn_local(async move {
                e.run(stopped).await;
            });
            // Each batch of 4 is retried for up to 300 ms, then given up on.
            let t0 = Instant::now();
            while stats.failed() < 8 {
                assert!(t0.elapsed() < Duration::from_secs(5), "never gave up");
                assert!(stats.waiting() <= 8, "more waits than the queue holds");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(t0.elapsed() >= Duration::from_millis(200), "gave up early");
            assert!(stats.exports(Signal::Logs, false) >= 4, "retried");
            assert!(stats.exports(Signal::Metrics, false) >= 1);
            assert_eq!(stats.exported(), 0);
            // Back: new records go out.
            fake.status.store(200, Ordering::Relaxed);
            publish(&mut bus, 5);
            while stats.exported() < 5 {
                assert!(t0.elapsed() < Duration::from_secs(5), "never resumed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = stop.send(Instant::now());
            task.await.expect("ends");
            assert_eq!(
                (
                    stats.exported(),
                    stats.queue_full(),
                    stats.failed(),
                    stats.waiting()
                ),
                (5, 22, 8, 0)
            );
            assert_eq!(offered(&stats), 35);
        })
        .await;
}

#[tokio::test]
async fn a_refusal_drops_the_batch_without_retrying_and_a_partial_success_counts_rejections() {
    tokio::task::LocalSet::new()
        .run_until(async {
            let fake = Fake::default();
            fake.status.store(400, Ordering::Relaxed);
            let (mut bus, e) = exporter(&fake, settings(64, 4, 10_000), false);
            publish(&mut bus, 4);
            let stats = run_until(e, |s| s.failed() == 4, Duration::ZERO).await;
            assert_eq!(stats.exports(Signal::Logs, false), 1, "not retried");
            assert_eq!(stats.failed(), 4);

            fake.status.store(200, Ordering::Relaxed);
            fake.reject.store(1, Ordering::Relaxed);
            let (mut bus, e) = exporter(&fake, settings(64, 4, 10_000), false);
            publish(&mut bus, 4);
            let stats = run_until(e, |s| s.exported() + s.rejected() == 4, Duration::ZERO).await;
            assert_eq!((stats.exported(), stats.rejected()), (3, 1));
        })
        .await;
}

#[tokio::test]
async fn shutdown_sends_what_waits_and_counts_what_it_cannot() {
    tokio::task::LocalSet::new()
        .run_until(async {
            let fake = Fake::default();
            fake.status.store(200, Ordering::Relaxed);
            // A long flush interval: only the shutdown sends these.
            let mut s = settings(64, 4, 1000);
            s.flush_interval = Duration::from_secs(60);
            s.metrics_interval = Duration::from_secs(60);
            let (mut bus, e) = exporter(&fake, s, true);
            publish(&mut bus, 7);
            let stats = run_until(e, |s| s.exported() == 4, Duration::from_secs(1)).await;
            assert_eq!((stats.exported(), stats.waiting()), (7, 0));
            assert_eq!(
                *fake.metrics.lock().expect("lock"),
                1,
                "the metrics a last time"
            );

            fake.status.store(0, Ordering::Relaxed);
            let (mut bus, e) = exporter(&fake, s, false);
            publish(&mut bus, 3);
            let stats = run_until(e, |_| true, Duration::ZERO).await;
            assert_eq!((stats.failed(), stats.waiting()), (3, 0));
        })
        .await;
}

#[test]
fn answers_are_judged_as_the_otlp_spec_says() {
    let answer = |status: u16, retry_after: Option<u64>| {
        Ok(Answer {
            status: StatusCode::from_u16(status).expect("status"),
            retry_after: retry_after.map(Duration::from_secs),
            body: Bytes::from_static(b"busy"),
        })
    };
    assert_eq!(
        verdict(Signal::Logs, answer(200, None)),
        Verdict::Taken {
            rejected: 0,
            message: String::new()
        },
        "an answer that is not the response message is still a success"
    );
    for status in [429, 502, 503, 504] {
        assert!(matches!(
            verdict(Signal::Logs, answer(status, Some(3))),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
    }
    for status in [400, 401, 404, 413, 500] {
        assert!(matches!(
            verdict(Signal::Metrics, answer(status, None)),
            Verdict::Refused(why) if why.contains(&status.to_string()) && why.contains("busy")
        ));
    }
    assert!(matches!(
        verdict(
            Signal::Logs,
            Err(OtlpError::Timeout(Duration::from_secs(1)))
        ),
        Verdict::Retry { after: None, .. }
    ));
}

#[test]
fn backoff_doubles_to_a_cap_with_jitter() {
    for tries in 0..40 {
        let d = backoff(tries);
        let base = (200.0 * 2f64.powi(tries.min(16) as i32)).min(5000.0);
        let ms = d.as_secs_f64() * 1e3;
        assert!(
            (0.75 * base - 1e-6..=1.25 * base + 1e-6).contains(&ms),
            "{tries}: {ms} ms"
        );
    }
}
