//! What an endpoint sends back.

use serde_json::{Value, json};

/// What to send back.
#[derive(Debug)]
pub enum Reply {
    Json(u16, Value),
    Text(u16, &'static str, String),
    /// `/v1/stream`: records as they become final, as NDJSON.
    Stream,
}

pub(super) fn error(status: u16, message: impl Into<String>) -> Reply {
    Reply::Json(status, json!({ "error": message.into() }))
}
