//! OTLP export (`[otlp]`, off by default): every final record as a log record and the
//! `/metrics` counters as cumulative sums, sent as OTLP/HTTP protobuf to a collector.
//!
//! Attribution never waits for it: records reach the exporter through a lossy queue of
//! `otlp.queue_records` on the pipeline's bus (full: dropped and counted), and the exporter runs
//! on its own thread. It sends batches of up to `otlp.batch_records` at most
//! `otlp.flush_interval_ms` after their first record, retries a batch the collector did not
//! take with backoff for up to `otlp.retry_max_ms` (while it waits, the queue fills and then
//! drops), then drops it (counted). Every record offered is, in the end, exported, dropped on a
//! full queue, given up on, or rejected by the collector: [`OtlpStats`], in `/metrics` as
//! `tracer_otlp_records_total`. The log says once when exports start failing and once when
//! they are back.

mod config;
mod encode;
mod export;
mod exporter;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

pub use config::{Endpoint, OtlpConfig};
pub use exporter::Families;

use crate::{
    output::family::{Family, Kind},
    pipeline::{Bus, Interest, bus::QueueStats},
};

/// Why an export, or the exporter, failed.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The collector could not be reached (refused, unreachable, no such host).
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    /// The HTTP exchange failed (the connection closed mid-way, a malformed answer).
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// No whole answer within `otlp.timeout_ms`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be built, or its answer read.
    #[error("{0}")]
    Request(String),
    /// A configured header is not a valid HTTP header (the configuration checks this first).
    #[error("otlp.headers: {0:?} is not a valid header")]
    Header(String),
    /// `otlp.endpoint` is not an `http://` URL (the configuration checks this first).
    #[error("{0}")]
    Endpoint(String),
    /// The exporter's thread or runtime could not start.
    #[error("starting the OTLP exporter: {0}")]
    Start(#[source] std::io::Error),
}

/// What is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Logs,
    Metrics,
}

impl Signal {
    /// Its path after the endpoint's.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Logs => "/v1/logs",
            Signal::Metrics => "/v1/metrics",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
        }
    }
}

/// The exporter's counters, shared with `/metrics`. Records offered (the queue's delivered and
/// dropped) = exported + queue full + failed + rejected + waiting.
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// The bus's counters of the queue (records put in, and dropped on a full queue).
    queue: Arc<QueueStats>,
    /// Records the collector took.
    exported: AtomicU64,
    /// Records given up on: retried for `otlp.retry_max_ms`, refused, or left at shutdown.
    failed: AtomicU64,
    /// Records the collector answered it rejected (a partial success).
    rejected: AtomicU64,
    /// Exports per signal (logs, metrics) that succeeded and that failed.
    exports: [[AtomicU64; 2]; 2],
}

impl OtlpStats {
    fn new(queue: Arc<QueueStats>) -> Self {
        Self {
            queue,
            ..Self::default()
        }
    }

    /// Records the collector took.
    pub fn exported(&self) -> u64 {
        self.exported.load(Relaxed)
    }

    /// Records dropped because the queue was full.
    pub fn queue_full(&self) -> u64 {
        self.queue.dropped()
    }

    /// Records given up on after failed exports.
    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    /// Records the collector rejected.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Relaxed)
    }

    /// Every record not exported.
    pub fn lost(&self) -> u64 {
        self.queue_full() + self.failed() + self.rejected()
    }

    /// Records in the queue or in the batch being sent.
    pub fn waiting(&self) -> u64 {
        self.queue
            .delivered()
            .saturating_sub(self.exported() + self.failed() + self.rejected())
    }

    /// Exports of `signal` that succeeded (`ok`) or failed.
    pub fn exports(&self, signal: Signal, ok: bool) -> u64 {
        self.exports[signal as usize][usize::from(!ok)].load(Relaxed)
    }

    fn count_export(&self, signal: Signal, ok: bool) {
        self.exports[signal as usize][usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// Its `/metrics` families.
    pub fn families(&self) -> Vec<Family> {
        let mut records = Family::new(
            (
                "tracer_otlp_records_total",
                "tracer.otlp.records",
                "{record}",
            ),
            "Final records the OTLP exporter was offered, by what became of them: exported, \
             dropped on a full queue, given up on after failed exports, rejected by the collector.",
            Kind::Counter,
        )
        .whole();
        for (result, n) in [
            ("exported", self.exported()),
            ("queue_full", self.queue_full()),
            ("failed", self.failed()),
            ("rejected", self.rejected()),
        ] {
            records.point(vec![("result", result.into())], n as f64);
        }
        let mut exports = Family::new(
            (
                "tracer_otlp_exports_total",
                "tracer.otlp.exports",
                "{export}",
            ),
            "OTLP export requests per signal that the collector took, and that failed.",
            Kind::Counter,
        )
        .whole();
        for signal in [Signal::Logs, Signal::Metrics] {
            for (result, ok) in [("ok", true), ("failed", false)] {
                exports.point(
                    vec![("signal", signal.name().into()), ("result", result.into())],
                    self.exports(signal, ok) as f64,
                );
            }
        }
        let mut waiting = Family::new(
            ("tracer_otlp_queue_records", "tracer.otlp.queue", "{record}"),
            "Final records waiting for OTLP export (the queue and the batch being sent).",
            Kind::Gauge,
        )
        .whole();
        waiting.point(Vec::new(), self.waiting() as f64);
        vec![records, exports, waiting]
    }
}

/// The running exporter: stop it with [`Otlp::finish`].
#[derive(Debug)]
pub struct Otlp {
    stats: Arc<OtlpStats>,
    stop: Option<tokio::sync::oneshot::Sender<Instant>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Otlp {
    /// Starts exporting what `config` asks for, when it names an endpoint: records from `bus`,
    /// metrics from `families` (what `/metrics` shows; none: no metrics).
    pub fn start(
        config: &OtlpConfig,
        bus: &mut Bus,
        families: Option<Families>,
    ) -> Result<Option<Self>, OtlpError> {
        let Some(url) = config.enabled() else {
            return Ok(None);
        };
        let endpoint = Endpoint::parse(url).map_err(OtlpError::Endpoint)?;
        let sink = export::HttpSink::new(endpoint, &config.headers)?;
        let (records, queue) = if config.logs {
            let interest = Interest {
                records: true,
                ..Interest::default()
            };
            let rx = bus.subscribe_lossy("otlp", interest, config.queue_records);
            (Some(rx.rx), rx.stats)
        } else {
            (None, Arc::default())
        };
        let stats = Arc::new(OtlpStats::new(queue));
        let families = families.filter(|_| config.metrics);
        let exporter = exporter::Exporter {
            sink,
            settings: exporter::Settings::from(config),
            endpoint: url.to_owned(),
            resource: encode::resource(&host_name()),
            stats: Arc::clone(&stats),
            records,
            families,
            start_ns: crate::power::realtime_ns(),
            down_since: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OtlpError::Start)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("otlp".into())
            .spawn(move || rt.block_on(exporter.run(stopped)))
            .map_err(OtlpError::Start)?;
        Ok(Some(Self {
            stats,
            stop: Some(stop),
            thread: Some(thread),
        }))
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<OtlpStats> {
        Arc::clone(&self.stats)
    }

    /// Sends what waits (each batch tried once) and the metrics a last time, within `within`;
    /// what is left is counted as failed. Call it after the last record is final.
    pub fn finish(mut self, within: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Instant::now() + within);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = &self.stats;
        tracing::info!(
            "OTLP: {} records exported, {} dropped on a full queue, {} given up on, {} rejected",
            s.exported(),
            s.queue_full(),
            s.failed(),
            s.rejected()
        );
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        // Not finished (the daemon stops on an error): the thread stops at once, not joined.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Instant::now());
        }
    }
}

/// This host's name (`host.name`), or `unknown`.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the kernel writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match (rc, std::str::from_utf8(&buf[..end])) {
        (0, Ok(name)) if !name.is_empty() => name.to_owned(),
        _ => "unknown".into(),
    }
}
