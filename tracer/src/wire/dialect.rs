//! What each server dialect says, and where: the request body keys that describe a request,
//! and the headers and JSON fields that carry request ids, server ids and token counts.
//!
//! Framing (`framing.rs`) and stream parsing (`stream.rs`) find the bytes; this file
//! reads them. To teach the tracker a new server, add what it says here: request body keys in
//! `meta.rs`, response headers in [`usage_in_headers`], streamed events in
//! [`event_says`], whole JSON responses in [`read_body`] / [`usage_in`].
//!
//! Known today:
//! - OpenAI-compatible servers report `usage` (`prompt_tokens`, `completion_tokens`,
//!   `prompt_tokens_details.cached_tokens`): in the JSON response, or in a streamed event when
//!   the request set `stream_options.include_usage`; request and response ids are `id`.
//! - Ollama ends an NDJSON stream with `"done": true`, `prompt_eval_count` and `eval_count`.
//! - TGI sends the counts as `x-prompt-tokens` / `x-generated-tokens` response headers.
//! - The output limit is `max_tokens`, `max_completion_tokens`, or llama.cpp's `n_predict`.

use std::sync::LazyLock;

use memchr::memmem;

use serde::Deserialize as _;

use super::counts::Usage;
use super::{Lifecycle, RequestKey, conn::Pending, counts, header, json};

impl Usage {
    /// The lifecycle event telling these counts for `req`.
    pub(super) fn event(self, req: RequestKey) -> Lifecycle {
        Lifecycle::Usage {
            req,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
        }
    }
}

/// The request id a request or response head carries.
pub(super) fn request_id(headers: &[httparse::Header<'_>]) -> Option<String> {
    header(headers, "x-request-id").map(str::to_owned)
}

/// Token counts sent as response headers (TGI).
pub(super) fn usage_in_headers(headers: &[httparse::Header<'_>]) -> Option<Usage> {
    let prompt_tokens = header(headers, "x-prompt-tokens").and_then(|v| v.parse().ok());
    let completion_tokens = header(headers, "x-generated-tokens").and_then(|v| v.parse().ok());
    (prompt_tokens.is_some() || completion_tokens.is_some()).then_some(Usage {
        prompt_tokens,
        completion_tokens,
        cached_tokens: None,
    })
}

/// Needles searched in every streamed event, built once: `memmem::find` builds its searcher
/// at each call, which on a 100-byte event costs more than the search.
static USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static DONE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"done\":true"));
static DONE_SPACED: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"done\": true"));

/// What one streamed event (an SSE `data:` payload or an NDJSON line) says.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct EventSays {
    pub(super) server_id: Option<String>,
    pub(super) usage: Option<Usage>,
}

/// Reads an event's server id (only when `want_id`) and token counts. Most events are token
/// deltas: a payload is parsed only when it may hold something wanted.
pub(super) fn event_says(payload: &[u8], ndjson: bool, want_id: bool) -> EventSays {
    let has_usage = USAGE.find(payload).is_some();
    let ollama_done =
        (ndjson && DONE.find(payload).is_some()) || DONE_SPACED.find(payload).is_some();
    if !(want_id || has_usage || ollama_done) {
        return EventSays::default();
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return EventSays::default();
    };
    let server_id = if want_id {
        v["id"].as_str().map(str::to_string)
    } else {
        None
    };
    let usage = if has_usage && v["usage"].is_object() {
        Some(usage_of(&v["usage"]))
    } else if ollama_done {
        Some(Usage {
            prompt_tokens: v["prompt_eval_count"].as_u64(),
            completion_tokens: v["eval_count"].as_u64(),
            cached_tokens: None,
        })
    } else {
        None
    };
    EventSays { server_id, usage }
}

/// Id and usage of a non-streamed JSON response, from its kept head and tail windows.
pub(super) fn read_body(p: &mut Pending, out: &mut Vec<Lifecycle>) {
    if p.server_id.is_none() {
        let mut id = None;
        json::scan_until(&p.resp_head, |path, v| {
            let found = path == ["id"];
            if found {
                id = Some(v.text().to_string());
            }
            found
        });
        p.server_id = id;
    }
    if p.usage_seen {
        return;
    }
    for window in [&p.resp_head, &p.resp_tail] {
        if let Some(u) = usage_in(window) {
            p.usage_seen = true;
            out.push(u.event(p.key));
            return;
        }
    }
}

/// Finds a `"usage": {...}` object in `bytes` and reads its counts.
pub(super) fn usage_in(bytes: &[u8]) -> Option<Usage> {
    let at = USAGE.find(bytes)?;
    let rest = &bytes[at + 7..];
    let brace = memchr::memchr(b'{', rest)?;
    let mut it =
        serde_json::Deserializer::from_slice(&rest[brace..]).into_iter::<counts::UsageObject>();
    Some(it.next()?.ok()?.0)
}

/// The counts of an OpenAI-style `usage` object, read by the one lenient reader
/// ([`counts::UsageObject`]) whole responses use too.
fn usage_of(u: &serde_json::Value) -> Usage {
    counts::UsageObject::deserialize(u).unwrap_or_default().0
}
