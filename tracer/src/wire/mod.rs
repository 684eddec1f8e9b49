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
//!
//! Where things are:
//! - this file: the public types (keys, [`Lifecycle`] events, [`TrackerConfig`],
//!   [`TrackerStats`]) and the [`Tracker`] API the daemon calls per syscall: open, data, EOF,
//!   close, idle eviction; and how a request ends.
//! - `conn`: what is kept per connection: each side's framing state, the pending requests.
//! - `framing`: HTTP/1.x framing: heads, Content-Length, chunked and close-delimited bodies,
//!   bytes past a capture, resynchronisation; requests arrive here.
//! - `stream`: SSE and NDJSON response bodies, line by line, one event each.
//! - `dialect`: what each server says and where (request body keys, request and server ids,
//!   token counts in headers, events and bodies). **A new server dialect goes there**; framing
//!   and stream stay as they are.
//! - `json`: the bounded JSON scanner for request and response windows.
//! - [`summary`]: lifecycle events gathered into one summary per request.
//!
//! Dependencies run one way: `framing` uses `stream` and `dialect`, `stream` uses `dialect`,
//! and all of them use `conn`.

mod conn;
mod counts;
mod dialect;
mod framing;
mod json;
mod meta;
pub mod prefix;
mod redact;
mod stream;
pub mod summary;

use std::{collections::HashMap, hash::Hasher as _};

use serde::{Deserialize, Serialize};

use conn::{BodyType, Conn, Framing, Kind, Pending, Proto, Side, State};

/// One traced connection: process, fd, and the probes' generation id for that fd.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
    pub conn_id: u64,
}

/// Which side of the connection the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Role {
    /// It accepted the connection: inbound bytes are requests.
    Server,
    /// It connected: outbound bytes are requests.
    Client,
    /// Unknown (seen mid-stream): decided by the first request line.
    Unknown,
}

/// Direction of bytes relative to the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A request on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct RequestKey {
    pub conn: ConnKey,
    /// Position on the connection, from 0.
    pub seq: u32,
    /// Unique within this tracker.
    pub id: u64,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
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
        /// Bytes of the request body (what a prompt's size can be estimated from).
        body_bytes: u64,
        /// The prompt's start as chained block hashes (`prefix.rs`): what it shares with others.
        /// Kept in memory only (never written out; a checkpoint carries it).
        #[serde(default, skip_serializing_if = "crate::memo::memory_only")]
        prompt_blocks: Vec<u64>,
        /// Sent by the traced process (a call it makes as a client), not received by it.
        #[serde(default, skip_serializing_if = "crate::memo::memory_only")]
        client: bool,
        /// Hash of the message's first 4 KiB: the same exchange seen at its two ends.
        #[serde(default, skip_serializing_if = "crate::memo::memory_only")]
        message_hash: u64,
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
    /// Redact what the tracker reads (`redact.rs`) with this key; `None`: read bytes as they
    /// are (a replay of a redacted recording, or payloads kept on purpose). Never configured
    /// or recorded: the daemon sets it.
    #[serde(skip)]
    pub redaction_key: Option<[u64; 2]>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            tenant_header: None,
            tenant_key: [0x7472_6163_6572, 0x7465_6e61_6e74],
            max_connections: 65_536,
            redaction_key: None,
        }
    }
}

/// Counters: everything unusual is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    /// Request bodies whose scan for `model`, `stream`, `max_tokens` stopped before their end
    /// (bytes uncaptured, or past 1 MiB): what came after is unknown.
    pub body_meta_cut: u64,
    /// Connections speaking HTTP/2 (prior knowledge or `h2c` upgrade), TLS the probes see
    /// encrypted, or another protocol after `101 Switching Protocols`; and their bytes. Only
    /// HTTP/1.x is parsed: these are counted, never mis-read as requests.
    pub http2_connections: u64,
    pub tls_connections: u64,
    pub upgraded_connections: u64,
    pub other_protocol_bytes: u64,
    /// TLS connections read in plaintext through the TLS library's uprobes (their socket
    /// bytes are in `other_protocol_bytes`).
    pub tls_decrypted_connections: u64,
}

/// The tracker. See the module docs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Tracker {
    config: TrackerConfig,
    /// Boxed: the table holds a pointer per slot, not a whole connection per slot (a hash
    /// table keeps ~40 % of its slots empty), and moving one in and out per syscall copies 8
    /// bytes.
    /// Looked up, taken out and put back for every syscall's bytes: hashed with foldhash, not
    /// `SipHash` (the keys are the kernel's tgid, fd and times, not a peer's choice).
    conns: HashMap<ConnKey, Box<Conn>, foldhash::fast::RandomState>,
    next_id: u64,
    out: Vec<Lifecycle>,
    stats: TrackerStats,
    redact: Option<redact::Key>,
    /// The last syscall's bytes as the tracker read them (redacted when it redacts).
    view: Vec<u8>,
}

fn lower_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// A header's value, trimmed; names compare case-insensitively.
fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| lower_eq(h.name, name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

impl Tracker {
    /// A tracker with `config`.
    pub fn new(config: TrackerConfig) -> Self {
        Tracker {
            redact: config.redaction_key.map(redact::Key::new),
            config,
            conns: HashMap::default(),
            next_id: 1,
            out: Vec::new(),
            stats: TrackerStats::default(),
            view: Vec::new(),
        }
    }

    /// Request ids start at `first` (ids stay unique across a store's runs).
    #[must_use]
    pub fn starting_at(mut self, first: u64) -> Self {
        self.next_id = first.max(1);
        self
    }

    /// The bytes of the last `on_data`/`on_plaintext` as the tracker read them: redacted when
    /// it redacts. What a recording keeps, so that it replays to the same records.
    pub fn view(&self) -> &[u8] {
        &self.view
    }

    /// The id the next request will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
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
        self.conns
            .insert(conn, Box::new(Conn::new(conn, role, ts_ns)));
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
        self.data(conn, ts_ns, dir, (total_len, captured), false);
    }

    /// A TLS connection's plaintext, seen in the TLS library (`SSL_read`/`SSL_write`): from
    /// now on the connection is read from its plaintext, and its socket bytes (the records
    /// that carry it) are only counted.
    pub fn on_plaintext(
        &mut self,
        conn: ConnKey,
        ts_ns: u64,
        dir: Direction,
        total_len: u64,
        captured: &[u8],
    ) {
        self.data(conn, ts_ns, dir, (total_len, captured), true);
    }

    fn data(
        &mut self,
        conn: ConnKey,
        ts_ns: u64,
        dir: Direction,
        (total_len, captured): (u64, &[u8]),
        plaintext: bool,
    ) {
        // The tracker reads a copy, redacted in place as it goes (`redact.rs`).
        let mut view = std::mem::take(&mut self.view);
        view.clear();
        view.extend_from_slice(captured);
        self.read(conn, ts_ns, dir, (total_len, &mut view), plaintext);
        self.view = view;
    }

    fn read(
        &mut self,
        conn: ConnKey,
        ts_ns: u64,
        dir: Direction,
        (total_len, captured): (u64, &mut [u8]),
        plaintext: bool,
    ) {
        if !self.conns.contains_key(&conn) {
            if self.conns.len() >= self.config.max_connections {
                self.evict_oldest(ts_ns);
            }
            self.conns
                .insert(conn, Box::new(Conn::new(conn, Role::Unknown, ts_ns)));
        }
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        let redact = self.redact.is_some();
        c.last_ns = ts_ns;
        if plaintext && !c.decrypted {
            // Its first plaintext: whatever its ciphertext looked like, HTTP starts here.
            c.decrypted = true;
            c.fresh = true;
            c.proto = Proto::Http1;
            self.stats.tls_decrypted_connections += 1;
        } else if c.decrypted && !plaintext {
            self.stats.other_protocol_bytes += total_len;
            if redact {
                redact::opaque(captured);
            }
            self.conns.insert(conn, c);
            return;
        }
        let mut sniffed = 0;
        if c.fresh && !captured.is_empty() {
            c.fresh = false;
            if let Some(p) = Proto::sniff(captured) {
                self.other_protocol(&mut c, p);
                // The bytes the sniff read stay (a protocol's preface or record header).
                sniffed = Proto::SNIFF_BYTES.min(captured.len());
            }
        }
        if c.proto != Proto::Http1 {
            // Not HTTP/1.x: counted, never parsed into requests.
            self.stats.other_protocol_bytes += total_len;
            if redact {
                redact::opaque(&mut captured[sniffed..]);
            }
            self.conns.insert(conn, c);
            return;
        }
        if c.role == Role::Unknown {
            if framing::starts_request(captured) {
                c.role = if dir == Direction::Inbound {
                    Role::Server
                } else {
                    Role::Client
                };
            } else {
                // Until a request line shows which way requests flow, nothing can be matched.
                self.stats.resync_bytes_skipped += total_len;
                if redact {
                    redact::opaque(captured);
                }
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
        let n = captured.len().min(total_len as usize);
        let (captured, beyond) = captured.split_at_mut(n);
        if redact {
            redact::opaque(beyond);
        }
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

    /// The connection turned out to speak `p`: counted, and whatever was in flight on it ends.
    fn other_protocol(&mut self, c: &mut Conn, p: Proto) {
        c.proto = p;
        match p {
            Proto::Http2 => self.stats.http2_connections += 1,
            Proto::Tls => self.stats.tls_connections += 1,
            Proto::Upgraded => self.stats.upgraded_connections += 1,
            Proto::Http1 => {}
        }
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
        let mut first = true;
        while let Some(mut p) = c.pending.pop_front() {
            let outcome = if p.status.is_none() {
                Outcome::Aborted
            } else if until_close {
                Outcome::Complete
            } else {
                Outcome::ClosedEarly
            };
            if first && p.status.is_some() {
                // The response being received: its head and whatever body came, however it
                // was framed (a close-delimited body ends here).
                p.resp_body_bytes = p.resp_body_bytes.max(c.sides[resp].msg_bytes);
            }
            first = false;
            self.end(p, ts_ns, outcome);
        }
        c.sides[resp] = Side::new();
    }

    /// Tells that a request is over; a non-streamed response is first read for its id and usage.
    fn end(&mut self, mut p: Pending, ts_ns: u64, outcome: Outcome) {
        if p.body == BodyType::Other && p.status.is_some() {
            dialect::read_body(&mut p, &mut self.out);
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

    /// A tenant header value as a keyed hash: tenants can be told apart, not named.
    fn tenant_hash(&self, value: &str) -> String {
        let [k0, k1] = self.config.tenant_key;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
        h.write(value.as_bytes());
        format!("{:016x}", h.finish())
    }
}

#[cfg(test)]
mod tests;
