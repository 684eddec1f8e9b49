//! Requests as the wire tracker reports them, gathered into one summary per request.
//!
//! The tracker emits lifecycle events as bytes move; this collects them per request and yields
//! a [`RequestSummary`] when the request ends. The summaries are what `--requests-out` writes and
//! what feeds the ledger's request lifecycle.

use std::collections::HashMap;

use serde::Serialize;

use crate::wire::{Lifecycle, Outcome};

/// One HTTP request, start to end, as seen on the wire.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RequestSummary {
    /// Minted by the tracker, unique within this daemon run.
    pub id: u64,
    /// The process and connection.
    pub tgid: u32,
    /// The process made this request (a call to another server: a proxy's hop to its engine),
    /// rather than serving it.
    pub client: bool,
    pub fd: i32,
    pub conn_id: u64,
    /// Position on the connection (0 = first request).
    pub seq: u32,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub max_tokens: Option<u64>,
    /// `X-Request-Id`, from the request or the response.
    pub request_id: Option<String>,
    /// The server's own id (response `id`), when seen.
    pub server_id: Option<String>,
    /// Keyed hash of the configured tenant header.
    pub tenant: Option<String>,
    pub arrive_ns: u64,
    pub request_done_ns: Option<u64>,
    pub first_byte_ns: Option<u64>,
    pub first_event_ns: Option<u64>,
    pub end_ns: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Streamed events (SSE `data:` events without `[DONE]`, NDJSON lines).
    pub events: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// `open`, or the outcome's name (owned when read back from a checkpoint).
    pub outcome: std::borrow::Cow<'static, str>,
}

/// Collects lifecycle events into summaries.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RequestCollector {
    open: HashMap<u64, RequestSummary>,
    /// Lifecycle events for requests never seen arriving (should stay 0).
    pub orphans: u64,
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Complete => "complete",
        Outcome::ClosedEarly => "closed_early",
        Outcome::Truncated => "truncated",
        Outcome::Aborted => "aborted",
    }
}

impl RequestCollector {
    /// Requests that arrived and have not ended.
    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    /// The requests in flight, in no particular order.
    pub fn open(&self) -> impl Iterator<Item = &RequestSummary> {
        self.open.values()
    }

    /// Applies one lifecycle event; returns the summary when it ends the request.
    pub fn apply(&mut self, ev: &Lifecycle) -> Option<RequestSummary> {
        if let Lifecycle::Arrive {
            req,
            ts_ns,
            method,
            path,
            model,
            stream,
            max_tokens,
            request_id,
            tenant,
            client,
            ..
        } = ev
        {
            self.open.insert(
                req.id,
                RequestSummary {
                    id: req.id,
                    tgid: req.conn.tgid,
                    client: *client,
                    fd: req.conn.fd,
                    conn_id: req.conn.conn_id,
                    seq: req.seq,
                    method: method.clone(),
                    path: path.clone(),
                    model: model.clone(),
                    stream: *stream,
                    max_tokens: *max_tokens,
                    request_id: request_id.clone(),
                    tenant: tenant.clone(),
                    arrive_ns: *ts_ns,
                    outcome: "open".into(),
                    ..RequestSummary::default()
                },
            );
            return None;
        }
        let id = ev.request().id;
        let Some(s) = self.open.get_mut(&id) else {
            self.orphans += 1;
            return None;
        };
        match ev {
            Lifecycle::Arrive { .. } => {}
            Lifecycle::RequestDone { ts_ns, bytes, .. } => {
                s.request_done_ns = Some(*ts_ns);
                s.request_bytes = *bytes;
            }
            Lifecycle::FirstByte { ts_ns, status, .. } => {
                s.first_byte_ns = Some(*ts_ns);
                s.status = Some(*status);
            }
            Lifecycle::Event { ts_ns, .. } => {
                s.first_event_ns.get_or_insert(*ts_ns);
            }
            Lifecycle::Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                s.prompt_tokens = prompt_tokens.or(s.prompt_tokens);
                s.completion_tokens = completion_tokens.or(s.completion_tokens);
                s.cached_tokens = cached_tokens.or(s.cached_tokens);
            }
            Lifecycle::End {
                ts_ns,
                status,
                response_bytes,
                events,
                server_id,
                request_id,
                outcome,
                ..
            } => {
                let mut done = self.open.remove(&id)?;
                done.end_ns = *ts_ns;
                done.status = status.or(done.status);
                done.response_bytes = *response_bytes;
                done.events = *events;
                done.server_id.clone_from(server_id);
                if done.request_id.is_none() {
                    done.request_id.clone_from(request_id);
                }
                done.outcome = outcome_name(*outcome).into();
                return Some(done);
            }
        }
        None
    }
}
