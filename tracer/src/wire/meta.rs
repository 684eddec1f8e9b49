//! What a request asks for (`model`, `stream`, `max_tokens`, `include_usage`), read from its
//! JSON body piece by piece as it arrives.

use super::json;

/// What a request body asks for.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct RequestMeta {
    pub(super) model: Option<String>,
    pub(super) stream: Option<bool>,
    pub(super) max_tokens: Option<u64>,
    pub(super) include_usage: Option<bool>,
}

/// Request body bytes scanned for what the request asks for, at most: clients put `model`,
/// `stream` and `max_tokens` before or after the prompt.
pub(super) const BODY_SCAN_MAX: u64 = 1 << 20;

/// Reads what a request asks for from its JSON body, piece by piece as it is read (nothing of
/// the body is kept; see [`json::Scanner`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct MetaScan {
    scanner: json::Scanner,
    pub(super) meta: RequestMeta,
    scanned: u64,
    /// Bytes of the body went by uncaptured, or past [`BODY_SCAN_MAX`]: the scan stopped.
    stopped: bool,
}

impl MetaScan {
    /// The next `len` body bytes, of which `data` were captured.
    pub(super) fn feed(&mut self, data: &[u8], len: u64) {
        if self.stopped || self.scanner.done() {
            return;
        }
        if (data.len() as u64) < len || self.scanned + len > BODY_SCAN_MAX {
            self.stopped = true;
            return;
        }
        self.scanned += len;
        let m = &mut self.meta;
        self.scanner.feed(data, |path, v| match path {
            ["model"] => m.model = Some(v.text().to_string()),
            ["stream"] => m.stream = v.text().parse().ok(),
            ["max_tokens" | "max_completion_tokens" | "n_predict"] => {
                m.max_tokens = v.text().parse().ok();
            }
            ["stream_options", "include_usage"] => m.include_usage = v.text().parse().ok(),
            _ => {}
        });
    }

    /// The scan stopped before the body's object closed (part of it unseen).
    pub(super) fn cut(&self) -> bool {
        self.stopped && !self.scanner.done()
    }
}
