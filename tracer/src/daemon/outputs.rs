//! The subscribers the configuration asks for, on a new bus.

use std::{
    path::Path,
    sync::{Arc, atomic::AtomicU64},
};

use super::DaemonError;
use crate::{
    config::Config,
    output::{
        jsonl::{JsonLines, Stream},
        summary::LogSummary,
    },
    pipeline::{Bus, PipelineConfig},
    power,
    record::format::{RecordHeader, Recorder},
};

/// Recording first (it must see every input before anything acts on it), then the JSON-lines
/// files, then the log.
/// Also returns the journal's byte counter for its current segment (the daemon starts the next
/// one by size).
pub(super) fn bus(
    config: &Config,
    pipeline: &PipelineConfig,
    journal: Option<&Path>,
) -> Result<(Bus, Option<Arc<AtomicU64>>), DaemonError> {
    let mut bus = Bus::new();
    let mut written = None;
    if let Some(path) = journal {
        let j = Recorder::journal(path, &header(pipeline))?;
        written = Some(j.written());
        bus.subscribe(Box::new(j));
    }
    if let Some(path) = &config.output.record {
        if let Some(kept) = rotate(path)? {
            tracing::info!(
                "{} existed: kept as {} (a recording is never overwritten)",
                path.display(),
                kept.display()
            );
        }
        bus.subscribe(Box::new(Recorder::create(path, &header(pipeline))?));
    }
    let file = |stream: Stream, path: &Path, what: &'static str| {
        let (out, cut) = JsonLines::create(stream, path).map_err(|source| DaemonError::Io {
            what: format!("{what} {}", path.display()),
            source,
        })?;
        if cut > 0 {
            tracing::warn!(
                "{}: removed a last line cut off by an earlier crash ({cut} bytes); appending",
                path.display()
            );
        }
        Ok::<_, DaemonError>(out)
    };
    for (stream, path, what) in [
        (
            Stream::Events,
            &config.output.events_out,
            "creating the events output",
        ),
        (
            Stream::Requests,
            &config.output.requests_out,
            "creating the requests output",
        ),
        (
            Stream::Records,
            &config.output.records_out,
            "creating the records output",
        ),
    ] {
        if let Some(p) = path {
            let out = file(stream, p, what)?.with_payload(config.output.events_payload);
            bus.subscribe(Box::new(out));
        }
    }
    bus.subscribe(Box::new(LogSummary::new()));
    Ok((bus, written))
}

fn header(pipeline: &PipelineConfig) -> RecordHeader {
    RecordHeader {
        version: crate::record::format::VERSION,
        payloads: if pipeline.http.redaction_key.is_some() {
            crate::record::format::Payloads::Redacted
        } else {
            crate::record::format::Payloads::Raw
        },
        started_unix_ms: (power::realtime_ns() / 1_000_000) as i64,
        tracer_version: env!("CARGO_PKG_VERSION").into(),
        pipeline: pipeline.clone(),
        segment: 0,
    }
}

/// Moves an existing file at `path` to the first free `<path>.N`; returns where it went.
fn rotate(path: &Path) -> Result<Option<std::path::PathBuf>, DaemonError> {
    if !path.exists() {
        return Ok(None);
    }
    let mut n = 1u32;
    let to = loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        let candidate = std::path::PathBuf::from(name);
        if !candidate.exists() {
            break candidate;
        }
        n += 1;
    };
    std::fs::rename(path, &to).map_err(|source| DaemonError::Io {
        what: format!(
            "keeping the earlier recording {} as {}",
            path.display(),
            to.display()
        ),
        source,
    })?;
    Ok(Some(to))
}
