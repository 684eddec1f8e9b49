//! The exporter's loop: batches from the queue, sends them, retries with backoff, counts.
//!
//! One export is in flight at a time. While a batch waits for its next try nothing more is
//! taken from the queue, so what waits is bounded by `queue_records + batch_records` and a
//! collector that is down costs drops (counted), never memory or attribution time.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceResponse, metrics::v1::ExportMetricsServiceResponse},
    resource::v1::Resource,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use super::{OtlpConfig, OtlpError, OtlpStats, Signal, encode, export::Sink};
use crate::{output::family::Family, pipeline::fact::OwnedFact, power::realtime_ns};

/// Reads the families to export (what `/metrics` shows).
pub type Families = Box<dyn Fn() -> Vec<Family> + Send>;

/// The first retry waits this long; each next one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The configuration's numbers, as durations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub timeout: Duration,
    pub queue_records: usize,
    pub batch_records: usize,
    pub flush_interval: Duration,
    pub metrics_interval: Duration,
    pub retry_max: Duration,
}

impl From<&OtlpConfig> for Settings {
    fn from(c: &OtlpConfig) -> Self {
        Self {
            timeout: Duration::from_millis(c.timeout_ms.max(1)),
            queue_records: c.queue_records.max(1),
            batch_records: c.batch_records.max(1),
            flush_interval: Duration::from_millis(c.flush_interval_ms.max(1)),
            metrics_interval: Duration::from_millis(c.metrics_interval_ms.max(1)),
            retry_max: Duration::from_millis(c.retry_max_ms),
        }
    }
}

/// A batch encoded once, with its tries.
struct Pending {
    body: Bytes,
    records: u64,
    first_try: Instant,
    tries: u32,
    next_try: Instant,
}

/// What an export's answer means for its records.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Taken; the collector may have rejected some (a partial success), saying why.
    Taken { rejected: u64, message: String },
    /// Worth another try (unreachable, timed out, 429, 502, 503, 504), after at least `after`.
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// Refused for good (another 4xx or 5xx): retrying would be refused again.
    Refused(String),
}

fn verdict(signal: Signal, answer: Result<super::export::Answer, OtlpError>) -> Verdict {
    let a = match answer {
        Ok(a) => a,
        Err(e) => {
            return Verdict::Retry {
                after: None,
                why: e.to_string(),
            };
        }
    };
    let status = a.status.as_u16();
    if a.status.is_success() {
        // An answer that is not the response message is still a success (the spec's rule).
        let (rejected, message) = match signal {
            Signal::Logs => ExportLogsServiceResponse::decode(a.body)
                .ok()
                .and_then(|r| r.partial_success)
                .map(|p| (p.rejected_log_records, p.error_message)),
            Signal::Metrics => ExportMetricsServiceResponse::decode(a.body)
                .ok()
                .and_then(|r| r.partial_success)
                .map(|p| (p.rejected_data_points, p.error_message)),
        }
        .unwrap_or_default();
        return Verdict::Taken {
            rejected: u64::try_from(rejected).unwrap_or(0),
            message,
        };
    }
    let why = format!(
        "HTTP {status}: {}",
        String::from_utf8_lossy(&a.body[..a.body.len().min(200)]).trim()
    );
    match status {
        429 | 502 | 503 | 504 => Verdict::Retry {
            after: a.retry_after,
            why,
        },
        _ => Verdict::Refused(why),
    }
}

/// The delay before try `tries + 1`: doubling from [`FIRST_BACKOFF`], at most [`MAX_BACKOFF`],
/// ±25 % so a fleet of daemons does not retry in step after a collector's restart.
fn backoff(tries: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1u32 << tries.min(16))
        .min(MAX_BACKOFF);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// The exporter, on its own thread's runtime.
pub(super) struct Exporter<S> {
    pub sink: S,
    pub settings: Settings,
    /// The endpoint as configured, for the log.
    pub endpoint: String,
    pub resource: Resource,
    pub stats: Arc<OtlpStats>,
    /// The queue of final records (none: logs are off).
    pub records: Option<mpsc::Receiver<OwnedFact>>,
    /// None: metrics are off.
    pub families: Option<Families>,
    /// When the counters started (the sums' start time), Unix ns.
    pub start_ns: u64,
    /// Since when exports fail, and how many records were lost by then.
    pub down_since: Option<(Instant, u64)>,
}

impl<S: Sink> Exporter<S> {
    /// Runs until `stop` says by when to be done (or its sender is gone: at once).
    pub async fn run(mut self, mut stop: oneshot::Receiver<Instant>) {
        let mut batch = Vec::new();
        let mut batch_due = Instant::now();
        let mut pending: Option<Pending> = None;
        let mut metrics = tokio::time::interval(self.settings.metrics_interval);
        metrics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the first export is one interval in.
        metrics.tick().await;
        loop {
            let retry_at = pending.as_ref().map_or(batch_due, |p| p.next_try);
            let room = pending.is_none() && batch.len() < self.settings.batch_records;
            tokio::select! {
                biased;
                deadline = &mut stop => {
                    let deadline = deadline.unwrap_or_else(|_| Instant::now());
                    return self.finish(batch, pending, deadline).await;
                }
                () = tokio::time::sleep_until(retry_at.into()), if pending.is_some() => {
                    if let Some(p) = pending.take() {
                        pending = self.attempt(p).await;
                    }
                }
                fact = recv(self.records.as_mut()), if room && self.records.is_some() => {
                    match fact {
                        Some(OwnedFact::Record(r)) => {
                            if batch.is_empty() {
                                batch_due = Instant::now() + self.settings.flush_interval;
                            }
                            batch.push(r);
                            if batch.len() >= self.settings.batch_records {
                                pending = self.attempt(self.encode(&mut batch)).await;
                            }
                        }
                        Some(_) => {}
                        // The bus is gone: what is in the batch still goes out when due.
                        None => self.records = None,
                    }
                }
                () = tokio::time::sleep_until(batch_due.into()), if pending.is_none() && !batch.is_empty() => {
                    pending = self.attempt(self.encode(&mut batch)).await;
                }
                _ = metrics.tick(), if self.families.is_some() => {
                    self.export_metrics(self.settings.timeout).await;
                }
            }
        }
    }

    fn encode(&self, batch: &mut Vec<Arc<crate::pipeline::FinalRecord>>) -> Pending {
        let records = std::mem::take(batch);
        let body =
            encode::logs_request(&self.resource, records.iter().map(|r| &**r), realtime_ns())
                .encode_to_vec();
        let now = Instant::now();
        Pending {
            body: Bytes::from(body),
            records: records.len() as u64,
            first_try: now,
            tries: 0,
            next_try: now,
        }
    }

    /// One try of `p`; returns it when it is to be tried again.
    async fn attempt(&mut self, mut p: Pending) -> Option<Pending> {
        let answer = self
            .sink
            .send(Signal::Logs, p.body.clone(), self.settings.timeout)
            .await;
        match verdict(Signal::Logs, answer) {
            Verdict::Taken { rejected, message } => {
                self.taken(Signal::Logs);
                let rejected = rejected.min(p.records);
                self.stats.exported.fetch_add(p.records - rejected, Relaxed);
                if rejected > 0 {
                    self.stats.rejected.fetch_add(rejected, Relaxed);
                    tracing::warn!(
                        "OTLP: the collector rejected {rejected} of {} log records: {message}",
                        p.records
                    );
                }
                None
            }
            Verdict::Retry { after, why } => {
                self.failed(Signal::Logs, &why);
                let delay = after.unwrap_or_default().max(backoff(p.tries));
                if p.first_try.elapsed() + delay > self.settings.retry_max {
                    self.stats.failed.fetch_add(p.records, Relaxed);
                    return None;
                }
                p.tries += 1;
                p.next_try = Instant::now() + delay;
                Some(p)
            }
            Verdict::Refused(why) => {
                self.failed(Signal::Logs, &why);
                self.stats.failed.fetch_add(p.records, Relaxed);
                None
            }
        }
    }

    /// One metrics export, not retried: the next carries newer totals.
    async fn export_metrics(&mut self, timeout: Duration) {
        let Some(families) = &self.families else {
            return;
        };
        let body =
            encode::metrics_request(&self.resource, &families(), self.start_ns, realtime_ns())
                .encode_to_vec();
        let answer = self
            .sink
            .send(Signal::Metrics, Bytes::from(body), timeout)
            .await;
        match verdict(Signal::Metrics, answer) {
            Verdict::Taken { rejected, message } => {
                self.taken(Signal::Metrics);
                if rejected > 0 {
                    tracing::warn!(
                        "OTLP: the collector rejected {rejected} data points: {message}"
                    );
                }
            }
            Verdict::Retry { why, .. } | Verdict::Refused(why) => {
                self.failed(Signal::Metrics, &why);
            }
        }
    }

    fn taken(&mut self, signal: Signal) {
        self.stats.count_export(signal, true);
        if let Some((since, lost)) = self.down_since.take() {
            tracing::info!(
                "OTLP export to {} is back after {:.1} s; {} records were dropped meanwhile \
                 (tracer_otlp_records_total)",
                self.endpoint,
                since.elapsed().as_secs_f64(),
                self.stats.lost().saturating_sub(lost)
            );
        }
    }

    fn failed(&mut self, signal: Signal, why: &str) {
        self.stats.count_export(signal, false);
        if self.down_since.is_none() {
            tracing::warn!(
                "OTLP export to {} failing ({why}); records wait in the queue (at most {}) and a \
                 batch is retried for up to {} ms, then dropped and counted \
                 (tracer_otlp_records_total)",
                self.endpoint,
                self.settings.queue_records,
                self.settings.retry_max.as_millis()
            );
            self.down_since = Some((Instant::now(), self.stats.lost()));
        }
    }

    /// At shutdown: what waits goes out, each batch tried once while there is time before
    /// `deadline`; the rest is counted as failed. Then the metrics once more.
    async fn finish(
        mut self,
        mut batch: Vec<Arc<crate::pipeline::FinalRecord>>,
        pending: Option<Pending>,
        deadline: Instant,
    ) {
        let mut batches: Vec<Pending> = pending.into_iter().collect();
        loop {
            while batch.len() < self.settings.batch_records
                && let Some(rx) = self.records.as_mut()
                && let Ok(fact) = rx.try_recv()
            {
                if let OwnedFact::Record(r) = fact {
                    batch.push(r);
                }
            }
            if batch.is_empty() {
                break;
            }
            batches.push(self.encode(&mut batch));
        }
        for p in batches {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stats.failed.fetch_add(p.records, Relaxed);
                continue;
            }
            let answer = self
                .sink
                .send(Signal::Logs, p.body, self.settings.timeout.min(left))
                .await;
            match verdict(Signal::Logs, answer) {
                Verdict::Taken { rejected, .. } => {
                    self.taken(Signal::Logs);
                    let rejected = rejected.min(p.records);
                    self.stats.exported.fetch_add(p.records - rejected, Relaxed);
                    self.stats.rejected.fetch_add(rejected, Relaxed);
                }
                Verdict::Retry { why, .. } | Verdict::Refused(why) => {
                    self.failed(Signal::Logs, &why);
                    self.stats.failed.fetch_add(p.records, Relaxed);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            self.export_metrics(self.settings.timeout.min(left)).await;
        }
    }
}

/// The next fact of `rx` (never called without one: the branch is disabled then).
async fn recv(rx: Option<&mut mpsc::Receiver<OwnedFact>>) -> Option<OwnedFact> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
