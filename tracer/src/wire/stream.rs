//! Streamed response bodies: Server-Sent Events and NDJSON, one [`Lifecycle::Event`] per SSE
//! `data:` event or NDJSON line. A line cut by a syscall is carried to the next one (up to
//! [`MAX_LINE`]); a line with uncaptured bytes is skipped. What an event says (ids, token
//! counts) is read by `dialect`.

use super::{
    Lifecycle,
    conn::{BodyType, Pending},
    dialect,
};

/// Longest partial SSE/NDJSON line carried between syscalls.
const MAX_LINE: usize = 64 * 1024;

/// How a response with this `Content-Type` is read.
pub(super) fn body_type(content_type: &str) -> BodyType {
    if content_type.starts_with("text/event-stream") {
        BodyType::Sse
    } else if content_type.starts_with("application/x-ndjson") {
        BodyType::Ndjson
    } else {
        BodyType::Other
    }
}

/// Splits streamed body bytes into lines and emits events (SSE `data:` / NDJSON lines).
pub(super) fn stream_lines(p: &mut Pending, ts: u64, mut data: &[u8], out: &mut Vec<Lifecycle>) {
    while !data.is_empty() {
        let nl = memchr::memchr(b'\n', data);
        let take = nl.map_or(data.len(), |i| i + 1);
        let piece = &data[..take];
        data = &data[take..];
        if nl.is_none() {
            if !p.skip_line {
                if p.line.len() + piece.len() > MAX_LINE {
                    p.line.clear();
                    p.skip_line = true;
                } else {
                    p.line.extend_from_slice(piece);
                }
            }
            break;
        }
        if p.skip_line {
            p.skip_line = false;
            p.line.clear();
            continue;
        }
        let line: Vec<u8>;
        let full: &[u8] = if p.line.is_empty() {
            piece
        } else {
            p.line.extend_from_slice(piece);
            line = std::mem::take(&mut p.line);
            &line
        };
        stream_line(p, ts, trim_crlf(full), out);
    }
}

/// One complete line of a streamed body.
fn stream_line(p: &mut Pending, ts: u64, line: &[u8], out: &mut Vec<Lifecycle>) {
    let payload: &[u8] = if p.body == BodyType::Sse {
        let Some(rest) = line.strip_prefix(b"data:") else {
            // Comments (":"), event:, id:, retry:, blank separators.
            return;
        };
        rest.strip_prefix(b" ").unwrap_or(rest)
    } else {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        line
    };
    if p.body == BodyType::Sse && payload.trim_ascii() == b"[DONE]" {
        return;
    }
    p.events += 1;
    out.push(Lifecycle::Event {
        req: p.key,
        ts_ns: ts,
    });
    let says = dialect::event_says(payload, p.body == BodyType::Ndjson, p.server_id.is_none());
    if let Some(id) = says.server_id {
        p.server_id = Some(id);
    }
    if let Some(u) = says.usage {
        p.usage_seen = true;
        out.push(u.event(p.key));
    }
}

/// `line` without its line ending (LF or CRLF).
pub(super) fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
