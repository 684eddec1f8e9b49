//! A minimal keep-alive HTTP/1.1 client (std `TcpStream`) that timestamps SSE events.

use std::fmt::Write as _;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracer_emugpu::monotonic_us;

use crate::http::{self, Head};

/// One server-sent event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When the chunk carrying it was read, µs of `CLOCK_MONOTONIC`.
    pub at_us: u64,
    /// The `data:` payload.
    pub data: String,
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Response head.
    pub head: Head,
    /// Body (for event streams: all the chunks concatenated).
    pub body: Vec<u8>,
    /// Server-sent events, if the body was an event stream.
    pub events: Vec<Event>,
    /// When the request was written, µs of `CLOCK_MONOTONIC`.
    pub start_us: u64,
    /// When the head arrived.
    pub first_byte_us: u64,
    /// When the body was complete.
    pub end_us: u64,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }

    /// The events' payloads parsed as JSON (`[DONE]` skipped).
    pub fn event_json(&self) -> Result<Vec<serde_json::Value>> {
        self.events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| serde_json::from_str(&e.data).context("event is not JSON"))
            .collect()
    }
}

/// A client connection, kept alive across requests.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    closed: bool,
}

impl Conn {
    /// Connect to `addr`.
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let writer = s.try_clone()?;
        Ok(Self {
            addr,
            reader: BufReader::new(s),
            writer,
            closed: false,
        })
    }

    /// Whether the server said it closes the connection after the last response.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Send a request and read the whole response. `body` is sent with `Content-Length`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        if self.closed {
            bail!("connection closed by the server");
        }
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: emuload\r\n",
            self.addr
        );
        for (k, v) in headers {
            let _ = write!(req, "{k}: {v}\r\n");
        }
        if !body.is_empty() || method == "POST" {
            let _ = write!(req, "Content-Length: {}\r\n", body.len());
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let start_us = monotonic_us();
        self.writer.write_all(&bytes).context("send request")?;
        let head = loop {
            let head = http::read_head(&mut self.reader)?.context("connection closed")?;
            // Skip interim responses.
            if !head
                .start
                .split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('1'))
            {
                break head;
            }
        };
        let first_byte_us = monotonic_us();
        let status: u16 = head
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", head.start))?;
        let sse = head
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut events = Vec::new();
        let body = if sse && head.is_chunked() {
            let mut body = Vec::new();
            let mut pending = String::new();
            http::read_chunked(&mut self.reader, |c| {
                let at_us = monotonic_us();
                body.extend_from_slice(c);
                pending.push_str(&String::from_utf8_lossy(c));
                for data in http::take_sse_events(&mut pending) {
                    events.push(Event { at_us, data });
                }
            })?;
            body
        } else {
            let to_eof = head.content_length()?.is_none() && !head.is_chunked();
            http::read_body(&mut self.reader, &head, to_eof)?
        };
        let end_us = monotonic_us();
        if head.has_token("connection", "close") || head.start.starts_with("HTTP/1.0") {
            self.closed = true;
        }
        Ok(Response {
            status,
            head,
            body,
            events,
            start_us,
            first_byte_us,
            end_us,
        })
    }

    /// `POST path` with a JSON body.
    pub fn post_json(
        &mut self,
        path: &str,
        extra_headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> Result<Response> {
        let mut headers = vec![("Content-Type", "application/json")];
        headers.extend_from_slice(extra_headers);
        self.request("POST", path, &headers, body.to_string().as_bytes())
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, &[], b"")
    }
}
