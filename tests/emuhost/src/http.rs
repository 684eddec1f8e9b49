//! Minimal HTTP/1.1 framing shared by the server and the client.

use std::io::{self, BufRead, Read, Write};

use anyhow::{Context, Result, bail};

/// Largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// A request or response head: the start line and the headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// `GET /health HTTP/1.1` or `HTTP/1.1 200 OK`.
    pub start: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether header `name` lists `token` (case-insensitive, comma separated).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Content-Length`, if present and valid.
    pub fn content_length(&self) -> Result<Option<usize>> {
        self.header("content-length")
            .map(|v| v.trim().parse::<usize>().context("bad Content-Length"))
            .transpose()
    }

    /// Whether the body is chunked.
    pub fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }
}

/// Read one line ending in `\n` (the `\r\n` or `\n` stripped); `None` at a clean EOF.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n > *budget {
            bail!("head too large");
        }
        bail!("connection closed mid-line");
    }
    *budget = budget.saturating_sub(n);
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8(buf).context("head is not UTF-8")?))
}

/// Read a head; `Ok(None)` if the peer closed the connection before sending anything.
pub fn read_head(r: &mut impl BufRead) -> Result<Option<Head>> {
    let mut budget = MAX_HEAD;
    // Tolerate stray empty lines between messages (RFC 9112 §2.2).
    let start = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => {}
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?.context("connection closed in head")?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').context("header without ':'")?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Some(Head { start, headers }))
}

/// Read a chunked body, calling `on_chunk` with each chunk's data as it arrives.
pub fn read_chunked(r: &mut impl BufRead, mut on_chunk: impl FnMut(&[u8])) -> Result<usize> {
    let mut total = 0usize;
    loop {
        let mut budget = MAX_HEAD;
        let line = read_line(r, &mut budget)?.context("connection closed in chunked body")?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let l = read_line(r, &mut budget)?.context("connection closed in trailers")?;
                if l.is_empty() {
                    return Ok(total);
                }
            }
        }
        total += size;
        if total > MAX_BODY {
            bail!("body too large");
        }
        let mut data = vec![0u8; size];
        r.read_exact(&mut data)?;
        on_chunk(&data);
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if crlf != *b"\r\n" {
            bail!("chunk not followed by CRLF");
        }
    }
}

/// Read a body framed by `head` (Content-Length or chunked; neither means empty for
/// requests). Responses without either are read to EOF when `to_eof` is set.
pub fn read_body(r: &mut impl BufRead, head: &Head, to_eof: bool) -> Result<Vec<u8>> {
    if head.is_chunked() {
        let mut body = Vec::new();
        read_chunked(r, |c| body.extend_from_slice(c))?;
        return Ok(body);
    }
    if let Some(len) = head.content_length()? {
        if len > MAX_BODY {
            bail!("body too large");
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    if to_eof {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Write one chunk of a chunked body in a single `write` call.
pub fn write_chunk(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(data.len() + 12);
    buf.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\r\n");
    w.write_all(&buf)
}

/// Reason phrase of the status codes the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Split an SSE stream into events: returns the `data:` payloads of the complete events in
/// `buf` and leaves any incomplete tail in it.
pub fn take_sse_events(buf: &mut String) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let event: String = buf.drain(..end + 2).collect();
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if !data.is_empty() {
            out.push(data.join("\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_and_chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\nrest";
        let mut r = &raw[..];
        let head = read_head(&mut r).expect("head").expect("some");
        assert_eq!(head.start, "HTTP/1.1 200 OK");
        assert_eq!(head.header("x-a"), Some("b"));
        assert!(head.is_chunked());
        let body = read_body(&mut r, &head, false).expect("body");
        assert_eq!(body, b"hello!");
        assert_eq!(r, b"rest");
    }

    #[test]
    fn splits_sse() {
        let mut s = "data: a\n\ndata: [DONE]\n\ndata: par".to_owned();
        assert_eq!(take_sse_events(&mut s), vec!["a", "[DONE]"]);
        assert_eq!(s, "data: par");
    }

    #[test]
    fn eof_before_head_is_none() {
        let mut r: &[u8] = b"";
        assert!(read_head(&mut r).expect("ok").is_none());
    }
}
