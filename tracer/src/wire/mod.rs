//! HTTP/1.1 request tracking from captured socket syscalls.
//!
//! For every read/write on a traced connection the daemon knows how many bytes moved and the
//! first few KiB of them. This module follows each connection's two byte streams: request and
//! response heads, body framing (Content-Length, chunked, close-delimited; HEAD, 1xx, 204, 304),
//! keep-alive and pipelining (responses matched to requests in order), Server-Sent Events and
//! NDJSON streams (one event per `data:` event or line), and OpenAI-style metadata (model,
//! stream, max tokens, usage, request ids). Bytes past a capture are accounted for by length:
//! a body or chunk is skipped by counting, and when framing cannot be followed any more the
//! message is marked truncated and the stream resynchronises at the next request or status line.
//!
//! It is pure: no I/O, no clock; the caller supplies timestamps. Nothing sensitive is kept:
//! heads are parsed and dropped, `Authorization` is never read, bodies are scanned in bounded
//! windows for a handful of keys, and a tenant key is kept only as a keyed hash.

mod json;
pub mod summary;

use std::{
    collections::{HashMap, VecDeque},
    hash::Hasher as _,
};

use memchr::memmem;
use serde::{Deserialize, Serialize};

/// One traced connection: process, fd, and the probes' generation id for that fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
    pub conn_id: u64,
}

/// Which side of the connection the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    /// It accepted the connection: inbound bytes are requests.
    Server,
    /// It connected: outbound bytes are requests.
    Client,
    /// Unknown (seen mid-stream): decided by the first request line.
    Unknown,
}

/// Direction of bytes relative to the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A request on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct RequestKey {
    pub conn: ConnKey,
    /// Position on the connection, from 0.
    pub seq: u32,
    /// Unique within this tracker.
    pub id: u64,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response's framing completed.
    Complete,
    /// The connection closed while the response was incomplete.
    ClosedEarly,
    /// The capture lost the framing (truncated beyond what length accounting could follow).
    Truncated,
    /// No response before the connection closed or was evicted.
    Aborted,
}

/// What the tracker tells the ledger, in order per request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Lifecycle {
    /// The request's head and body were received; `ts_ns` is its first byte.
    Arrive {
        req: RequestKey,
        ts_ns: u64,
        method: String,
        path: String,
        model: Option<String>,
        stream: Option<bool>,
        max_tokens: Option<u64>,
        include_usage: Option<bool>,
        request_id: Option<String>,
        tenant: Option<String>,
    },
    /// The request's last byte.
    RequestDone {
        req: RequestKey,
        ts_ns: u64,
        bytes: u64,
    },
    /// The response's first byte (of the final, non-1xx response).
    FirstByte {
        req: RequestKey,
        ts_ns: u64,
        status: u16,
    },
    /// A streamed event (SSE `data:` event, NDJSON line).
    Event { req: RequestKey, ts_ns: u64 },
    /// Token counts reported by the server.
    Usage {
        req: RequestKey,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        cached_tokens: Option<u64>,
    },
    /// The request is over.
    End {
        req: RequestKey,
        ts_ns: u64,
        status: Option<u16>,
        response_bytes: u64,
        events: u64,
        server_id: Option<String>,
        request_id: Option<String>,
        outcome: Outcome,
    },
}

impl Lifecycle {
    /// The request this event is about.
    pub fn request(&self) -> &RequestKey {
        match self {
            Lifecycle::Arrive { req, .. }
            | Lifecycle::RequestDone { req, .. }
            | Lifecycle::FirstByte { req, .. }
            | Lifecycle::Event { req, .. }
            | Lifecycle::Usage { req, .. }
            | Lifecycle::End { req, .. } => req,
        }
    }
}

/// Tracker settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// Largest request/response head kept while it is incomplete.
    pub max_head_bytes: usize,
    /// Header whose value identifies the tenant (stored only as a keyed hash).
    pub tenant_header: Option<String>,
    /// Key of the tenant hash (SipHash-1-3, 128-bit key as two u64).
    pub tenant_key: [u64; 2],
    /// Connections tracked at most; beyond, the oldest idle one is evicted.
    pub max_connections: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            tenant_header: None,
            tenant_key: [0x7472_6163_6572, 0x7465_6e61_6e74],
            max_connections: 65_536,
        }
    }
}

/// Counters: everything unusual is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrackerStats {
    pub requests: u64,
    pub completed: u64,
    pub resyncs: u64,
    pub resync_bytes_skipped: u64,
    pub truncated: u64,
    pub heads_too_large: u64,
    pub parse_errors: u64,
    pub unmatched_responses: u64,
    pub connections_open: u64,
    pub evicted: u64,
    /// SSE/NDJSON bytes that could not be parsed for events (past a capture).
    pub stream_bytes_unseen: u64,
}

/// Longest partial SSE/NDJSON line carried between syscalls.
const MAX_LINE: usize = 64 * 1024;
/// Request body bytes kept for metadata.
const BODY_HEAD: usize = 4096;
/// Response body bytes kept (head and tail) for usage and ids of non-streamed responses.
const RESP_KEEP: usize = 8192;
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (in `line`).
    Size,
    Data(u64),
    /// The CRLF after chunk data: bytes still to skip.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for / accumulating a start line and head.
    Head,
    Body(Framing),
    InChunk(Chunk),
    /// Skipping to the next start line.
    Resync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyType {
    Other,
    Sse,
    Ndjson,
}

/// One direction of a connection.
#[derive(Debug)]
struct Side {
    state: State,
    /// Head bytes, or the current chunk-size / trailer line.
    buf: Vec<u8>,
    /// Bytes of the current message so far.
    msg_bytes: u64,
    msg_start_ns: u64,
    in_message: bool,
}

impl Side {
    fn new() -> Self {
        Side {
            state: State::Head,
            buf: Vec::new(),
            msg_bytes: 0,
            msg_start_ns: 0,
            in_message: false,
        }
    }
}

/// A request waiting for (or receiving) its response.
#[derive(Debug)]
struct Pending {
    key: RequestKey,
    head_request: bool,
    request_id: Option<String>,
    // Response state.
    status: Option<u16>,
    body: BodyType,
    events: u64,
    server_id: Option<String>,
    response_request_id: Option<String>,
    line: Vec<u8>,
    skip_line: bool,
    resp_head: Vec<u8>,
    resp_tail: Vec<u8>,
    resp_body_bytes: u64,
    usage_seen: bool,
}

/// The request currently being received.
#[derive(Debug, Default)]
struct Incoming {
    method: String,
    path: String,
    request_id: Option<String>,
    tenant: Option<String>,
    body_head: Vec<u8>,
    /// Part of the body was not captured: the head window is complete as it is.
    body_gap: bool,
}

#[derive(Debug)]
struct Conn {
    key: ConnKey,
    role: Role,
    sides: [Side; 2],
    incoming: Option<Incoming>,
    pending: VecDeque<Pending>,
    next_seq: u32,
    last_ns: u64,
}

/// The tracker. See the module docs.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    conns: HashMap<ConnKey, Conn>,
    next_id: u64,
    out: Vec<Lifecycle>,
    stats: TrackerStats,
}

fn lower_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| lower_eq(h.name, name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn is_chunked(headers: &[httparse::Header<'_>]) -> bool {
    header(headers, "transfer-encoding").is_some_and(|v| {
        v.rsplit(',')
            .next()
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    })
}

fn content_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.parse().ok())
}

impl Tracker {
    /// A tracker with `config`.
    pub fn new(config: TrackerConfig) -> Self {
        Tracker {
            config,
            conns: HashMap::new(),
            next_id: 1,
            out: Vec::new(),
            stats: TrackerStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> TrackerStats {
        let mut s = self.stats;
        s.connections_open = self.conns.len() as u64;
        s
    }

    /// Connections being tracked.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Moves the lifecycle events produced so far into `out`.
    pub fn drain_into(&mut self, out: &mut Vec<Lifecycle>) {
        out.append(&mut self.out);
    }

    /// A connection was opened (accepted: `Server`, connected: `Client`).
    pub fn on_open(&mut self, conn: ConnKey, ts_ns: u64, role: Role) {
        if self.conns.len() >= self.config.max_connections {
            self.evict_oldest(ts_ns);
        }
        // A stale entry for the same key would be a bug upstream; close it properly.
        if self.conns.contains_key(&conn) {
            self.on_close(conn, ts_ns);
        }
        self.conns.insert(conn, Conn::new(conn, role, ts_ns));
    }

    /// Bytes moved: `total_len` by the syscall, of which `captured` are known.
    pub fn on_data(
        &mut self,
        conn: ConnKey,
        ts_ns: u64,
        dir: Direction,
        total_len: u64,
        captured: &[u8],
    ) {
        if !self.conns.contains_key(&conn) {
            if self.conns.len() >= self.config.max_connections {
                self.evict_oldest(ts_ns);
            }
            self.conns
                .insert(conn, Conn::new(conn, Role::Unknown, ts_ns));
        }
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        c.last_ns = ts_ns;
        if c.role == Role::Unknown {
            if starts_request(captured) {
                c.role = if dir == Direction::Inbound {
                    Role::Server
                } else {
                    Role::Client
                };
            } else {
                // Until a request line shows which way requests flow, nothing can be matched.
                self.stats.resync_bytes_skipped += total_len;
                self.conns.insert(conn, c);
                return;
            }
        }
        let requests_inbound = c.role == Role::Server;
        let kind = if (dir == Direction::Inbound) == requests_inbound {
            Kind::Request
        } else {
            Kind::Response
        };
        let captured = &captured[..captured.len().min(total_len as usize)];
        let missing = total_len - captured.len() as u64;
        self.feed(&mut c, kind, ts_ns, captured);
        if missing > 0 {
            self.skip(&mut c, kind, ts_ns, missing);
        }
        self.conns.insert(conn, c);
    }

    /// A read returned 0: the peer closed its sending side.
    pub fn on_eof(&mut self, conn: ConnKey, ts_ns: u64, dir: Direction) {
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        let requests_inbound = c.role != Role::Client;
        let kind = if (dir == Direction::Inbound) == requests_inbound {
            Kind::Request
        } else {
            Kind::Response
        };
        if kind == Kind::Response {
            // A close-delimited response ends here; anything else is cut short.
            self.finish_responses(&mut c, ts_ns);
        }
        self.conns.insert(conn, c);
    }

    /// The connection was closed: everything in flight ends.
    pub fn on_close(&mut self, conn: ConnKey, ts_ns: u64) {
        if let Some(mut c) = self.conns.remove(&conn) {
            self.finish_responses(&mut c, ts_ns);
        }
    }

    /// Ends connections idle for `idle_ns` (their peers vanished without a close we saw).
    pub fn evict_idle(&mut self, now_ns: u64, idle_ns: u64) {
        let stale: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_ns) >= idle_ns)
            .map(|(k, _)| *k)
            .collect();
        // Sorted: request ids and ends must not depend on hash order (replay is exact).
        let mut stale = stale;
        stale.sort_unstable();
        for k in stale {
            self.stats.evicted += 1;
            self.on_close(k, now_ns);
        }
    }

    fn evict_oldest(&mut self, now_ns: u64) {
        if let Some(k) = self
            .conns
            .iter()
            .min_by_key(|(k, c)| (c.last_ns, **k))
            .map(|(k, _)| *k)
        {
            self.stats.evicted += 1;
            self.on_close(k, now_ns);
        }
    }

    /// Ends every pending request of a connection that is going away (or half-closed).
    fn finish_responses(&mut self, c: &mut Conn, ts_ns: u64) {
        let resp = 1;
        let until_close = c.sides[resp].state == State::Body(Framing::UntilClose);
        while let Some(p) = c.pending.pop_front() {
            let outcome = if p.status.is_none() {
                Outcome::Aborted
            } else if until_close {
                Outcome::Complete
            } else {
                Outcome::ClosedEarly
            };
            self.end(p, ts_ns, outcome);
        }
        c.sides[resp] = Side::new();
    }

    fn end(&mut self, mut p: Pending, ts_ns: u64, outcome: Outcome) {
        if p.body == BodyType::Other && p.status.is_some() {
            self.usage_from_body(&mut p);
        }
        if outcome == Outcome::Complete {
            self.stats.completed += 1;
        }
        if outcome == Outcome::Truncated {
            self.stats.truncated += 1;
        }
        self.out.push(Lifecycle::End {
            req: p.key,
            ts_ns,
            status: p.status,
            response_bytes: p.resp_body_bytes,
            events: p.events,
            server_id: p.server_id,
            request_id: p.response_request_id.or(p.request_id),
            outcome,
        });
    }

    /// Feeds known bytes through one side's state machine.
    fn feed(&mut self, c: &mut Conn, kind: Kind, ts: u64, mut data: &[u8]) {
        let side = kind as usize;
        while !data.is_empty() {
            match c.sides[side].state {
                State::Resync => {
                    let at = find_start(data, kind);
                    let skip = at.unwrap_or(data.len());
                    self.stats.resync_bytes_skipped += skip as u64;
                    data = &data[skip..];
                    if at.is_some() {
                        c.sides[side].state = State::Head;
                    }
                }
                State::Head => {
                    let s = &mut c.sides[side];
                    if !s.in_message {
                        if s.buf.is_empty() {
                            // Skip blank lines between messages (allowed by RFC 9112).
                            let lead = data
                                .iter()
                                .take_while(|b| matches!(b, b'\r' | b'\n'))
                                .count();
                            data = &data[lead..];
                            if data.is_empty() {
                                break;
                            }
                        }
                        if !could_start(data, kind) {
                            // Not a start line: garbage, or attached mid-message.
                            self.stats.resyncs += 1;
                            s.state = State::Resync;
                            continue;
                        }
                        s.in_message = true;
                        s.msg_start_ns = ts;
                        s.msg_bytes = 0;
                    }
                    let from = s.buf.len().saturating_sub(3);
                    let room = self.config.max_head_bytes.saturating_sub(s.buf.len());
                    let take = data.len().min(room.max(1));
                    s.buf.extend_from_slice(&data[..take]);
                    if let Some(end) =
                        memmem::find(&s.buf[from..], b"\r\n\r\n").map(|p| p + from + 4)
                    {
                        let extra = s.buf.len() - end;
                        let consumed = take - extra;
                        s.msg_bytes += consumed as u64;
                        data = &data[consumed..];
                        let head = std::mem::take(&mut s.buf);
                        self.on_head(c, kind, ts, &head[..end]);
                    } else if s.buf.len() >= self.config.max_head_bytes {
                        self.stats.heads_too_large += 1;
                        self.lose_framing(c, kind, ts);
                        data = &data[take..];
                    } else {
                        s.msg_bytes += take as u64;
                        data = &data[take..];
                    }
                }
                State::Body(Framing::Length(rem)) => {
                    let n = (rem as usize).min(data.len());
                    self.body(c, kind, ts, &data[..n], n as u64);
                    data = &data[n..];
                    let rem = rem - n as u64;
                    c.sides[side].state = State::Body(Framing::Length(rem));
                    if rem == 0 {
                        self.message_done(c, kind, ts);
                    }
                }
                State::Body(Framing::UntilClose) => {
                    self.body(c, kind, ts, data, data.len() as u64);
                    data = &[];
                }
                State::Body(Framing::Chunked) => {
                    c.sides[side].state = State::InChunk(Chunk::Size);
                }
                State::InChunk(Chunk::Size | Chunk::Trailer) => {
                    let s = &mut c.sides[side];
                    let nl = memchr::memchr(b'\n', data);
                    let take = nl.map_or(data.len(), |p| p + 1);
                    if s.buf.len() + take > 4096 {
                        self.stats.parse_errors += 1;
                        self.lose_framing(c, kind, ts);
                        continue;
                    }
                    s.buf.extend_from_slice(&data[..take]);
                    s.msg_bytes += take as u64;
                    data = &data[take..];
                    if nl.is_none() {
                        break;
                    }
                    let line = std::mem::take(&mut s.buf);
                    let text = trim_crlf(&line);
                    if s.state == State::InChunk(Chunk::Trailer) {
                        if text.is_empty() {
                            self.message_done(c, kind, ts);
                        }
                        continue;
                    }
                    let size_text = text.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size_text)
                        .ok()
                        .and_then(|t| u64::from_str_radix(t.trim(), 16).ok());
                    match size {
                        Some(0) => s.state = State::InChunk(Chunk::Trailer),
                        Some(n) => s.state = State::InChunk(Chunk::Data(n)),
                        None => {
                            self.stats.parse_errors += 1;
                            self.lose_framing(c, kind, ts);
                        }
                    }
                }
                State::InChunk(Chunk::Data(rem)) => {
                    let n = (rem as usize).min(data.len());
                    self.body(c, kind, ts, &data[..n], n as u64);
                    data = &data[n..];
                    let rem = rem - n as u64;
                    c.sides[side].msg_bytes += n as u64;
                    c.sides[side].state = if rem == 0 {
                        State::InChunk(Chunk::DataEnd(2))
                    } else {
                        State::InChunk(Chunk::Data(rem))
                    };
                }
                State::InChunk(Chunk::DataEnd(rem)) => {
                    let n = (rem as usize).min(data.len());
                    data = &data[n..];
                    let rem = rem - n as u8;
                    c.sides[side].msg_bytes += n as u64;
                    c.sides[side].state = if rem == 0 {
                        State::InChunk(Chunk::Size)
                    } else {
                        State::InChunk(Chunk::DataEnd(rem))
                    };
                }
            }
        }
    }

    /// Accounts for `n` bytes that moved but were not captured.
    fn skip(&mut self, c: &mut Conn, kind: Kind, ts: u64, mut n: u64) {
        let side = kind as usize;
        while n > 0 {
            match c.sides[side].state {
                State::Body(Framing::Length(rem)) => {
                    let k = rem.min(n);
                    self.body(c, kind, ts, &[], k);
                    n -= k;
                    c.sides[side].state = State::Body(Framing::Length(rem - k));
                    if rem == k {
                        self.message_done(c, kind, ts);
                    }
                }
                State::Body(Framing::UntilClose) => {
                    self.body(c, kind, ts, &[], n);
                    n = 0;
                }
                State::InChunk(Chunk::Data(rem)) => {
                    let k = rem.min(n);
                    self.body(c, kind, ts, &[], k);
                    c.sides[side].msg_bytes += k;
                    n -= k;
                    c.sides[side].state = if rem == k {
                        State::InChunk(Chunk::DataEnd(2))
                    } else {
                        State::InChunk(Chunk::Data(rem - k))
                    };
                }
                State::InChunk(Chunk::DataEnd(rem)) => {
                    let k = u64::from(rem).min(n);
                    n -= k;
                    c.sides[side].msg_bytes += k;
                    c.sides[side].state = if u64::from(rem) == k {
                        State::InChunk(Chunk::Size)
                    } else {
                        State::InChunk(Chunk::DataEnd(rem - k as u8))
                    };
                }
                State::Resync => {
                    self.stats.resync_bytes_skipped += n;
                    n = 0;
                }
                State::Head if !c.sides[side].in_message => {
                    // Unknown bytes where a message should start: cannot tell what they were.
                    self.stats.resync_bytes_skipped += n;
                    c.sides[side].state = State::Resync;
                    self.stats.resyncs += 1;
                    n = 0;
                }
                State::Head | State::Body(Framing::Chunked) | State::InChunk(_) => {
                    // Framing bytes we did not see: the message cannot be followed.
                    c.sides[side].msg_bytes += n;
                    self.lose_framing(c, kind, ts);
                    self.stats.resync_bytes_skipped += n;
                    n = 0;
                }
            }
        }
    }

    /// The current message's framing is lost: end it as truncated and resync.
    fn lose_framing(&mut self, c: &mut Conn, kind: Kind, ts: u64) {
        let side = kind as usize;
        self.stats.resyncs += 1;
        match kind {
            Kind::Request => {
                if let Some(inc) = c.incoming.take() {
                    // The request happened even if we lost its end: track it as truncated.
                    let p = self.arrive(
                        c,
                        inc,
                        ts,
                        c.sides[side].msg_start_ns,
                        c.sides[side].msg_bytes,
                    );
                    c.pending.push_back(p);
                    self.stats.truncated += 1;
                }
            }
            Kind::Response => {
                // Only a request whose response had started is cut; one still waiting keeps
                // waiting for the response the resync will find.
                if c.pending.front().is_some_and(|p| p.status.is_some())
                    && let Some(p) = c.pending.pop_front()
                {
                    self.end(p, ts, Outcome::Truncated);
                }
            }
        }
        let s = &mut c.sides[side];
        s.buf.clear();
        s.in_message = false;
        s.state = State::Resync;
    }

    fn on_head(&mut self, c: &mut Conn, kind: Kind, ts: u64, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        match kind {
            Kind::Request => {
                let mut req = httparse::Request::new(&mut headers);
                if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
                    self.stats.parse_errors += 1;
                    self.lose_framing(c, kind, ts);
                    return;
                }
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let tenant = self
                    .config
                    .tenant_header
                    .as_deref()
                    .and_then(|h| header(req.headers, h))
                    .map(|v| self.tenant_hash(v));
                let inc = Incoming {
                    method,
                    path,
                    request_id: header(req.headers, "x-request-id").map(str::to_owned),
                    tenant,
                    body_head: Vec::new(),
                    body_gap: false,
                };
                let framing = if is_chunked(req.headers) {
                    Some(Framing::Chunked)
                } else {
                    content_length(req.headers)
                        .filter(|&n| n > 0)
                        .map(Framing::Length)
                };
                self.stats.requests += 1;
                c.incoming = Some(inc);
                match framing {
                    Some(f) => c.sides[0].state = State::Body(f),
                    None => self.message_done(c, kind, ts),
                }
            }
            Kind::Response => {
                let mut resp = httparse::Response::new(&mut headers);
                if !matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
                    self.stats.parse_errors += 1;
                    self.lose_framing(c, kind, ts);
                    return;
                }
                let status = resp.code.unwrap_or(0);
                let http10 = resp.version == Some(0);
                if c.pending.is_empty() {
                    self.stats.unmatched_responses += 1;
                }
                if (100..200).contains(&status) && status != 101 {
                    // Interim response: the final one follows.
                    c.sides[1].in_message = false;
                    c.sides[1].state = State::Head;
                    return;
                }
                let head_len = head.len() as u64;
                let msg_start = c.sides[1].msg_start_ns;
                let ctype = header(resp.headers, "content-type").unwrap_or("");
                let body_type = if ctype.starts_with("text/event-stream") {
                    BodyType::Sse
                } else if ctype.starts_with("application/x-ndjson") {
                    BodyType::Ndjson
                } else {
                    BodyType::Other
                };
                let rid = header(resp.headers, "x-request-id").map(str::to_owned);
                let tgi_usage = (
                    header(resp.headers, "x-prompt-tokens").and_then(|v| v.parse().ok()),
                    header(resp.headers, "x-generated-tokens").and_then(|v| v.parse().ok()),
                );
                let no_body;
                if let Some(p) = c.pending.front_mut() {
                    p.status = Some(status);
                    p.body = body_type;
                    p.response_request_id = rid;
                    p.resp_body_bytes = head_len;
                    no_body = p.head_request;
                    self.out.push(Lifecycle::FirstByte {
                        req: p.key,
                        ts_ns: msg_start,
                        status,
                    });
                    if tgi_usage.0.is_some() || tgi_usage.1.is_some() {
                        p.usage_seen = true;
                        self.out.push(Lifecycle::Usage {
                            req: p.key,
                            prompt_tokens: tgi_usage.0,
                            completion_tokens: tgi_usage.1,
                            cached_tokens: None,
                        });
                    }
                } else {
                    no_body = false;
                }
                let framing = if no_body || status == 204 || status == 304 {
                    None
                } else if is_chunked(resp.headers) {
                    Some(Framing::Chunked)
                } else if let Some(n) = content_length(resp.headers) {
                    (n > 0).then_some(Framing::Length(n))
                } else if http10 || !no_body {
                    Some(Framing::UntilClose)
                } else {
                    None
                };
                match framing {
                    Some(f) => c.sides[1].state = State::Body(f),
                    None => self.message_done(c, kind, ts),
                }
            }
        }
    }

    /// Body bytes: `data` is what was captured of `len` body bytes (empty when uncaptured).
    fn body(&mut self, c: &mut Conn, kind: Kind, ts: u64, data: &[u8], len: u64) {
        match kind {
            Kind::Request => {
                c.sides[0].msg_bytes += if matches!(c.sides[0].state, State::InChunk(_)) {
                    0
                } else {
                    len
                };
                if let Some(inc) = &mut c.incoming
                    && !inc.body_gap
                {
                    let room = BODY_HEAD.saturating_sub(inc.body_head.len());
                    inc.body_head
                        .extend_from_slice(&data[..data.len().min(room)]);
                    // Past an uncaptured gap the window would no longer be contiguous.
                    inc.body_gap = (data.len() as u64) < len;
                }
            }
            Kind::Response => {
                if !matches!(c.sides[1].state, State::InChunk(_)) {
                    c.sides[1].msg_bytes += len;
                }
                let Some(p) = c.pending.front_mut() else {
                    return;
                };
                match p.body {
                    BodyType::Sse | BodyType::Ndjson => {
                        if (data.len() as u64) < len {
                            self.stats.stream_bytes_unseen += len - data.len() as u64;
                            p.line.clear();
                            p.skip_line = true;
                        }
                        stream_lines(p, ts, data, &mut self.out);
                    }
                    BodyType::Other => {
                        if p.resp_head.len() < RESP_KEEP && data.len() as u64 == len {
                            let room = RESP_KEEP - p.resp_head.len();
                            p.resp_head.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        p.resp_tail.extend_from_slice(data);
                        if (data.len() as u64) < len {
                            p.resp_tail.clear();
                        }
                        if p.resp_tail.len() > RESP_KEEP {
                            let cut = p.resp_tail.len() - RESP_KEEP;
                            p.resp_tail.drain(..cut);
                        }
                    }
                }
            }
        }
    }

    /// The current message on `kind`'s side is complete.
    fn message_done(&mut self, c: &mut Conn, kind: Kind, ts: u64) {
        let side = kind as usize;
        let (start, bytes) = (c.sides[side].msg_start_ns, c.sides[side].msg_bytes);
        {
            let s = &mut c.sides[side];
            s.state = State::Head;
            s.in_message = false;
            s.buf.clear();
        }
        match kind {
            Kind::Request => {
                if let Some(inc) = c.incoming.take() {
                    let p = self.arrive(c, inc, ts, start, bytes);
                    c.pending.push_back(p);
                }
            }
            Kind::Response => {
                if let Some(mut p) = c.pending.pop_front() {
                    p.resp_body_bytes = bytes;
                    self.end(p, ts, Outcome::Complete);
                }
            }
        }
    }

    fn arrive(&mut self, c: &mut Conn, inc: Incoming, ts: u64, start: u64, bytes: u64) -> Pending {
        let key = RequestKey {
            conn: c.key,
            seq: c.next_seq,
            id: self.next_id,
        };
        c.next_seq += 1;
        self.next_id += 1;
        let (mut model, mut stream, mut max_tokens, mut include_usage) = (None, None, None, None);
        json::scan(&inc.body_head, |path, v| match path {
            ["model"] => model = Some(v.text().to_string()),
            ["stream"] => stream = v.text().parse().ok(),
            ["max_tokens" | "max_completion_tokens" | "n_predict"] => {
                max_tokens = v.text().parse().ok();
            }
            ["stream_options", "include_usage"] => include_usage = v.text().parse().ok(),
            _ => {}
        });
        self.out.push(Lifecycle::Arrive {
            req: key,
            ts_ns: start,
            method: inc.method.clone(),
            path: inc.path,
            model,
            stream,
            max_tokens,
            include_usage,
            request_id: inc.request_id.clone(),
            tenant: inc.tenant,
        });
        self.out.push(Lifecycle::RequestDone {
            req: key,
            ts_ns: ts,
            bytes,
        });
        Pending {
            key,
            head_request: inc.method.eq_ignore_ascii_case("HEAD"),
            request_id: inc.request_id,
            status: None,
            body: BodyType::Other,
            events: 0,
            server_id: None,
            response_request_id: None,
            line: Vec::new(),
            skip_line: false,
            resp_head: Vec::new(),
            resp_tail: Vec::new(),
            resp_body_bytes: 0,
            usage_seen: false,
        }
    }

    fn tenant_hash(&self, value: &str) -> String {
        let [k0, k1] = self.config.tenant_key;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
        h.write(value.as_bytes());
        format!("{:016x}", h.finish())
    }

    /// Usage and id from a non-streamed JSON body (head and tail windows).
    fn usage_from_body(&mut self, p: &mut Pending) {
        if p.server_id.is_none() {
            json::scan(&p.resp_head, |path, v| {
                if path == ["id"] {
                    p.server_id = Some(v.text().to_string());
                }
            });
        }
        if p.usage_seen {
            return;
        }
        for window in [&p.resp_head, &p.resp_tail] {
            if let Some(u) = usage_in(window) {
                p.usage_seen = true;
                self.out.push(Lifecycle::Usage {
                    req: p.key,
                    prompt_tokens: u.0,
                    completion_tokens: u.1,
                    cached_tokens: u.2,
                });
                return;
            }
        }
    }
}

type Usage = (Option<u64>, Option<u64>, Option<u64>);

/// Finds a `"usage": {...}` object in `bytes` and reads its counts.
fn usage_in(bytes: &[u8]) -> Option<Usage> {
    let at = memmem::find(bytes, b"\"usage\"")?;
    let rest = &bytes[at + 7..];
    let brace = memchr::memchr(b'{', rest)?;
    let mut it =
        serde_json::Deserializer::from_slice(&rest[brace..]).into_iter::<serde_json::Value>();
    let v = it.next()?.ok()?;
    Some(usage_of(&v))
}

fn usage_of(u: &serde_json::Value) -> Usage {
    (
        u["prompt_tokens"].as_u64(),
        u["completion_tokens"].as_u64(),
        u["prompt_tokens_details"]["cached_tokens"].as_u64(),
    )
}

/// Splits streamed body bytes into lines and emits events (SSE `data:` / NDJSON lines).
fn stream_lines(p: &mut Pending, ts: u64, mut data: &[u8], out: &mut Vec<Lifecycle>) {
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
    let want_id = p.server_id.is_none();
    let has_usage = memmem::find(payload, b"\"usage\"").is_some();
    let ollama_done = p.body == BodyType::Ndjson
        && memmem::find(payload, b"\"done\":true").is_some()
        || memmem::find(payload, b"\"done\": true").is_some();
    if !(want_id || has_usage || ollama_done) {
        return;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    if want_id && let Some(id) = v["id"].as_str() {
        p.server_id = Some(id.to_string());
    }
    if has_usage && v["usage"].is_object() {
        let u = usage_of(&v["usage"]);
        p.usage_seen = true;
        out.push(Lifecycle::Usage {
            req: p.key,
            prompt_tokens: u.0,
            completion_tokens: u.1,
            cached_tokens: u.2,
        });
    } else if ollama_done {
        p.usage_seen = true;
        out.push(Lifecycle::Usage {
            req: p.key,
            prompt_tokens: v["prompt_eval_count"].as_u64(),
            completion_tokens: v["eval_count"].as_u64(),
            cached_tokens: None,
        });
    }
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Whether `data` can be the beginning of a start line (it may be cut short by the syscall).
fn could_start(data: &[u8], kind: Kind) -> bool {
    let fits = |m: &[u8]| {
        let n = m.len().min(data.len());
        data[..n] == m[..n]
    };
    match kind {
        Kind::Request => METHODS.iter().any(|m| fits(m)),
        Kind::Response => fits(b"HTTP/1."),
    }
}

fn starts_request(data: &[u8]) -> bool {
    METHODS.iter().any(|m| data.starts_with(m))
}

/// Offset of the next start line (request line or status line) at a line start in `data`.
fn find_start(data: &[u8], kind: Kind) -> Option<usize> {
    let at_line_start = |i: usize| i == 0 || data[i - 1] == b'\n';
    match kind {
        Kind::Response => memmem::find_iter(data, b"HTTP/1.").find(|&i| at_line_start(i)),
        Kind::Request => METHODS
            .iter()
            .filter_map(|m| {
                memmem::find_iter(data, m).find(|&i| {
                    at_line_start(i)
                        && memchr::memchr(b'\n', &data[i..])
                            .is_none_or(|e| memmem::find(&data[i..i + e], b" HTTP/1.").is_some())
                })
            })
            .min(),
    }
}

impl Conn {
    fn new(key: ConnKey, role: Role, ts: u64) -> Self {
        Conn {
            key,
            role,
            sides: [Side::new(), Side::new()],
            incoming: None,
            pending: VecDeque::new(),
            next_seq: 0,
            last_ns: ts,
        }
    }
}

#[cfg(test)]
mod tests;
