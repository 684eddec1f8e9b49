//! `tracer replay`: recompute every energy record of a recording.
//!
//! The recording holds every input the pipeline acted on, in order; the pipeline has no clock
//! and no other input, so feeding them again gives the same records, bit for bit, under the
//! same settings — and a different split or idle policy gives the bill under that policy,
//! from the same raw data.

use std::path::PathBuf;

use super::format::{Payloads, RecordError, RecordHeader, Recorder, Replayer, VERSION};
use crate::{
    ledger::{IdlePolicy, LedgerError, SplitPolicy, StepClockPolicy},
    output::jsonl::{JsonLines, Stream},
    pipeline::{Bus, Fact, FinalRecord, Input, Interest, Pipeline, Subscriber, SubscriberError},
};

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The recording could not be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The recorded (or overridden) ledger settings are invalid.
    #[error("ledger settings: {0}")]
    Ledger(#[from] LedgerError),
    /// `--redact-to` was given a recording whose payloads are redacted already.
    #[error("{0}: its payloads are redacted already")]
    AlreadyRedacted(PathBuf),
    /// An output could not be written.
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub recording: PathBuf,
    /// Overrides the recording's split policy.
    pub split: Option<SplitPolicy>,
    /// Overrides the recording's idle policy.
    pub idle: Option<IdlePolicy>,
    /// Overrides the recording's step clock (which engine clock the split steps by).
    pub step_clock: Option<StepClockPolicy>,
    /// Records as JSON lines here; `None`: standard output.
    pub records_out: Option<PathBuf>,
    /// Decoded probe events as JSON lines here.
    pub events_out: Option<PathBuf>,
    /// Also write the recording again here with its payloads redacted (a version 1 or
    /// `--record-payloads` recording made safe to keep or share); its records are the same.
    pub redact_to: Option<PathBuf>,
}

impl ReplayOptions {
    /// `recording` with its own settings, records to standard output.
    pub fn of(recording: &std::path::Path) -> Self {
        Self {
            recording: recording.to_owned(),
            split: None,
            idle: None,
            step_clock: None,
            records_out: None,
            events_out: None,
            redact_to: None,
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    pub inputs: u64,
    pub records: u64,
    pub requests: u64,
    pub truncated: bool,
    pub measured_j: f64,
    pub attributed_j: f64,
    pub idle_j: f64,
    pub unattributed_j: f64,
    /// The id the recording's next request would have had.
    pub next_request_id: u64,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} inputs{}: {} requests, {} energy records; measured {:.3} J = requests {:.3} J + idle {:.3} J + unattributed {:.3} J",
            self.inputs,
            if self.truncated {
                " (recording cut short: replayed up to its last whole frame)"
            } else {
                ""
            },
            self.requests,
            self.records,
            self.measured_j,
            self.attributed_j,
            self.idle_j,
            self.unattributed_j
        )
    }
}

fn create(stream: Stream, path: &std::path::Path) -> Result<Box<dyn Subscriber>, ReplayError> {
    JsonLines::replace(stream, path)
        .map(|j| Box::new(j) as Box<dyn Subscriber>)
        .map_err(|source| ReplayError::Output {
            path: path.to_owned(),
            source,
        })
}

/// Replays `opts.recording`; records go to a file, or to standard output, in the daemon's
/// format.
pub fn replay(opts: &ReplayOptions) -> Result<ReplaySummary, ReplayError> {
    let mut bus = Bus::new();
    bus.subscribe(match &opts.records_out {
        Some(p) => create(Stream::Records, p)?,
        None => Box::new(JsonLines::new(Stream::Records, Box::new(std::io::stdout()))),
    });
    if let Some(p) = &opts.events_out {
        bus.subscribe(create(Stream::Events, p)?);
    }
    replay_into(opts, bus)
}

/// Replays `opts.recording` into the subscribers on `bus` (`records_out`/`events_out` are not
/// used): what a test or another output sees of a recording.
pub fn replay_into(opts: &ReplayOptions, mut bus: Bus) -> Result<ReplaySummary, ReplayError> {
    let mut rp = Replayer::open(&opts.recording)?;
    let mut config = rp.header.pipeline.clone();
    if let Some(to) = &opts.redact_to {
        if rp.header.payloads == Payloads::Redacted {
            return Err(ReplayError::AlreadyRedacted(opts.recording.clone()));
        }
        // A fresh key: pseudonyms only need to agree within the recording.
        let key = std::collections::hash_map::RandomState::new();
        let k = |i: u64| std::hash::BuildHasher::hash_one(&key, i);
        config.http.redaction_key = Some([k(0), k(1)]);
        let header = RecordHeader {
            version: VERSION,
            payloads: Payloads::Redacted,
            pipeline: config.clone(),
            ..rp.header.clone()
        };
        bus.subscribe(Box::new(Recorder::create(to, &header)?));
    }
    if let Some(s) = opts.split {
        config.ledger.split = s;
    }
    if let Some(c) = opts.step_clock {
        config.ledger.step_clock = c;
    }
    if let Some(i) = opts.idle {
        config.ledger.idle = i;
    }
    let mut pipeline = Pipeline::new(&config, bus)?;
    let mut inputs = 0u64;
    let mut finished = false;
    while let Some(input) = rp.next_input()? {
        inputs += 1;
        finished |= matches!(input, Input::Finish);
        pipeline.apply(input);
    }
    if !finished {
        // Cut short before the daemon's shutdown: finalise what the recording holds.
        pipeline.apply(Input::Finish);
    }
    pipeline.flush();
    let totals = pipeline.totals();
    let sum = |f: fn(&crate::ledger::DeviceTotals) -> f64| totals.values().map(f).sum::<f64>();
    let counts = pipeline.counts();
    Ok(ReplaySummary {
        inputs,
        records: counts.records_done,
        requests: counts.requests_done,
        truncated: rp.truncated,
        measured_j: sum(|t| t.measured_j),
        attributed_j: sum(|t| t.request_dynamic_j + t.request_idle_j),
        idle_j: sum(|t| t.idle_j),
        unattributed_j: sum(|t| t.unattributed_j),
        next_request_id: pipeline.next_request_id(),
    })
}

/// Keeps a replay's final records.
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<FinalRecord>>>>);

impl Subscriber for Collect {
    fn name(&self) -> &'static str {
        "replayed records"
    }

    fn interest(&self) -> Interest {
        Interest {
            records: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        if let Fact::Record(r) = fact {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(std::sync::Arc::clone(r));
        }
        Ok(())
    }
}

/// Replays `opts.recording` and returns its final records (what recovery and reports read).
pub fn replay_records(
    opts: &ReplayOptions,
) -> Result<(Vec<std::sync::Arc<FinalRecord>>, ReplaySummary), ReplayError> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut bus = Bus::new();
    bus.subscribe(Box::new(Collect(std::sync::Arc::clone(&got))));
    let summary = replay_into(opts, bus)?;
    let records = std::mem::take(
        &mut *got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok((records, summary))
}
