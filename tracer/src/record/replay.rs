//! `tracer replay`: recompute every energy record of a recording.
//!
//! The recording holds every input the pipeline acted on, in order; the pipeline has no clock
//! and no other input, so feeding them again gives the same records, bit for bit, under the
//! same settings — and a different split or idle policy gives the bill under that policy,
//! from the same raw data.
//!
//! A journal segment after a run's first starts from a checkpoint (the state where the one
//! before it ended): it replays on its own, with the policies it was recorded with, and gives
//! the records finalised in it exactly as the live run did. Consecutive segments replay as one
//! (`continued`).

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
    /// A segment's checkpoint could not be read (or a boundary's written).
    #[error(transparent)]
    Checkpoint(#[from] crate::pipeline::CheckpointError),
    /// A segment starts from a checkpoint, which holds the policies it ran with and the
    /// tracker's redaction: they cannot be changed from there.
    #[error(
        "{0} starts from a checkpoint: it replays with the policies it was recorded with (replay the run from its first segment to change them)"
    )]
    FixedFromCheckpoint(PathBuf),
    /// A file given to continue a replay is not the next segment of the same journal.
    #[error("{path} does not continue the replay: {detail}")]
    NotNext { path: PathBuf, detail: String },
    /// A segment before the last ended inside a frame.
    #[error("{0} was cut short, but later segments follow it")]
    CutMidChain(PathBuf),
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
    /// Later segments of the same journal, in order, replayed after `recording` as one.
    pub continued: Vec<PathBuf>,
    /// Finalise requests still open at the end even when the last segment says the journal
    /// went on (a recovery whose newest segment is unreadable); otherwise they stay open, as
    /// they were in the live run at that point.
    pub finish_continued: bool,
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
            continued: Vec::new(),
            finish_continued: false,
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
    /// The last segment ended where the journal went on: requests open there stay open.
    pub continued: bool,
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
            } else if self.continued {
                " (the journal goes on in the next segment: requests open at its end are final there)"
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
    let mut pipeline = match rp.checkpoint.take() {
        Some(state) => {
            let changed = opts.split.is_some()
                || opts.idle.is_some()
                || opts.step_clock.is_some()
                || opts.redact_to.is_some();
            if changed {
                return Err(ReplayError::FixedFromCheckpoint(opts.recording.clone()));
            }
            Pipeline::restore(&state, bus)?
        }
        None => Pipeline::new(&config, bus)?,
    };
    // A segment's state carries the run's totals so far: its summary is what happened in it.
    let (totals0, counts0) = (pipeline.totals(), pipeline.counts());
    let mut inputs = 0u64;
    let mut finished = false;
    let mut path = opts.recording.clone();
    let mut rest = opts.continued.iter();
    loop {
        while let Some(input) = rp.next_input()? {
            inputs += 1;
            finished |= matches!(input, Input::Finish);
            pipeline.apply(input);
        }
        let Some(next) = rest.next() else { break };
        if rp.truncated {
            return Err(ReplayError::CutMidChain(path));
        }
        let follows = Replayer::open(next)?;
        let (a, b) = (&rp.header, &follows.header);
        if a.segment.checked_add(1) != Some(b.segment)
            || b.pipeline.first_request_id != a.pipeline.first_request_id
            || b.started_unix_ms != a.started_unix_ms
        {
            return Err(ReplayError::NotNext {
                path: next.clone(),
                detail: format!(
                    "segment {} of the run started at {} (first request id {}), after segment {} of the run started at {} (first request id {})",
                    b.segment,
                    b.started_unix_ms,
                    b.pipeline.first_request_id,
                    a.segment,
                    a.started_unix_ms,
                    a.pipeline.first_request_id
                ),
            });
        }
        // Where the live journal started this segment (what subscribers counting segments see);
        // the state is the one the segment's checkpoint holds, as the pipeline is deterministic.
        pipeline.checkpoint()?;
        rp = follows;
        path.clone_from(next);
    }
    if !finished && (!rp.continued || opts.finish_continued) {
        // Cut short before the daemon's shutdown: finalise what the recording holds.
        pipeline.apply(Input::Finish);
    }
    pipeline.flush();
    let totals = pipeline.totals();
    let sum = |f: fn(&crate::ledger::DeviceTotals) -> f64| {
        totals.values().map(f).sum::<f64>() - totals0.values().map(f).sum::<f64>()
    };
    let counts = pipeline.counts();
    Ok(ReplaySummary {
        inputs,
        records: counts.records_done - counts0.records_done,
        requests: counts.requests_done - counts0.requests_done,
        truncated: rp.truncated,
        continued: rp.continued && !opts.finish_continued,
        measured_j: sum(|t| t.measured_j),
        attributed_j: sum(|t| t.request_dynamic_j + t.request_idle_j),
        idle_j: sum(|t| t.idle_j),
        unattributed_j: sum(|t| t.unattributed_j),
        next_request_id: pipeline.next_request_id(),
    })
}

/// Keeps a replay's final records, each with the journal segment it was finalised in.
struct Collect {
    got: std::sync::Arc<std::sync::Mutex<Vec<Replayed>>>,
    segment: u32,
}

/// A replayed record and the journal segment it was finalised in.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub record: std::sync::Arc<FinalRecord>,
    pub segment: u32,
}

impl Subscriber for Collect {
    fn name(&self) -> &'static str {
        "replayed records"
    }

    fn interest(&self) -> Interest {
        Interest {
            records: true,
            checkpoints: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        match fact {
            Fact::Record(r) => self
                .got
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Replayed {
                    record: std::sync::Arc::clone(r),
                    segment: self.segment,
                }),
            Fact::Checkpoint(_) => self.segment += 1,
            _ => {}
        }
        Ok(())
    }
}

/// Replays `opts.recording` (and `opts.continued`) and returns its final records (what
/// recovery and reports read).
pub fn replay_records(opts: &ReplayOptions) -> Result<(Vec<Replayed>, ReplaySummary), ReplayError> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let first = Replayer::open(&opts.recording)?.header.segment;
    let mut bus = Bus::new();
    bus.subscribe(Box::new(Collect {
        got: std::sync::Arc::clone(&got),
        segment: first,
    }));
    let summary = replay_into(opts, bus)?;
    let records = std::mem::take(
        &mut *got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok((records, summary))
}
