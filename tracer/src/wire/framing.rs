//! HTTP/1.x message framing, one side of a connection at a time: start lines and heads,
//! Content-Length, chunked and close-delimited bodies (HEAD, 1xx, 204, 304 have none), bytes
//! past a capture accounted for by length, and resynchronisation at the next start line when
//! framing cannot be followed. Requests arrive here; streamed bodies go to `stream`,
//! what heads and bodies say to `dialect`.

use std::sync::LazyLock;

use memchr::memmem;

use super::{
    Lifecycle, Outcome, RequestKey, Role, Tracker,
    conn::{BodyType, Chunk, Conn, Framing, Incoming, Kind, Pending, Proto, State},
    dialect, header,
    meta::MetaScan,
    prefix, redact,
    stream::{self, trim_crlf},
};

/// Request body bytes kept for metadata.
const BODY_HEAD: usize = 4096;
/// Response body bytes kept (head and tail) for usage and ids of non-streamed responses.
const RESP_KEEP: usize = 8192;
/// What a request line starts with.
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

/// Whether `data` begins with a request line (decides the role of a connection seen mid-stream).
pub(super) fn starts_request(data: &[u8]) -> bool {
    METHODS.iter().any(|m| data.starts_with(m))
}

/// The blank line that ends a head, searched at every head piece (built once).
static HEAD_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));

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

impl Tracker {
    /// Feeds known bytes through one side's state machine, redacting each part before it is
    /// read (`redact.rs`): skipped bytes and bodies by their kind, heads up to their blank
    /// line; start lines and chunk-size lines stay.
    pub(super) fn feed(&mut self, c: &mut Conn, kind: Kind, ts: u64, mut data: &mut [u8]) {
        let side = kind as usize;
        let key = self.redact;
        while !data.is_empty() {
            match c.sides[side].state {
                State::Resync => {
                    let at = find_start(data, kind);
                    let skip = at.unwrap_or(data.len());
                    self.stats.resync_bytes_skipped += skip as u64;
                    let (skipped, rest) = std::mem::take(&mut data).split_at_mut(skip);
                    if key.is_some() {
                        redact::opaque(skipped);
                    }
                    data = rest;
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
                            data = &mut std::mem::take(&mut data)[lead..];
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
                        s.head_redact.reset();
                    }
                    let from = s.buf.len().saturating_sub(3);
                    let room = self.config.max_head_bytes.saturating_sub(s.buf.len());
                    let take = data.len().min(room.max(1));
                    if let Some(k) = key {
                        // Stops at the blank line: what follows is the body's.
                        s.head_redact.redact(k, &mut data[..take]);
                    }
                    s.buf.extend_from_slice(&data[..take]);
                    if let Some(end) = HEAD_END.find(&s.buf[from..]).map(|p| p + from + 4) {
                        let extra = s.buf.len() - end;
                        let consumed = take - extra;
                        s.msg_bytes += consumed as u64;
                        data = &mut std::mem::take(&mut data)[consumed..];
                        let head = std::mem::take(&mut s.buf);
                        let sse = kind == Kind::Response;
                        self.on_head(c, kind, ts, &head[..end]);
                        let sse = sse && c.pending.front().is_some_and(|p| p.body == BodyType::Sse);
                        c.sides[side].body_redact.reset(sse);
                    } else if s.buf.len() >= self.config.max_head_bytes {
                        self.stats.heads_too_large += 1;
                        self.lose_framing(c, kind, ts);
                        data = &mut std::mem::take(&mut data)[take..];
                    } else {
                        s.msg_bytes += take as u64;
                        data = &mut std::mem::take(&mut data)[take..];
                    }
                }
                State::Body(Framing::Length(rem)) => {
                    let n = (rem as usize).min(data.len());
                    let (now, rest) = std::mem::take(&mut data).split_at_mut(n);
                    self.redact_body(c, kind, now);
                    self.body(c, kind, ts, now, n as u64);
                    data = rest;
                    let rem = rem - n as u64;
                    c.sides[side].state = State::Body(Framing::Length(rem));
                    if rem == 0 {
                        self.message_done(c, kind, ts);
                    }
                }
                State::Body(Framing::UntilClose) => {
                    let now = std::mem::take(&mut data);
                    self.redact_body(c, kind, now);
                    let n = now.len() as u64;
                    self.body(c, kind, ts, now, n);
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
                    if s.state == State::InChunk(Chunk::Trailer)
                        && let Some(k) = key
                    {
                        // Trailer fields are header fields: credentials go.
                        s.head_redact.redact(k, &mut data[..take]);
                    }
                    s.buf.extend_from_slice(&data[..take]);
                    s.msg_bytes += take as u64;
                    data = &mut std::mem::take(&mut data)[take..];
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
                        Some(0) => {
                            s.state = State::InChunk(Chunk::Trailer);
                            s.head_redact.reset();
                        }
                        Some(n) => s.state = State::InChunk(Chunk::Data(n)),
                        None => {
                            self.stats.parse_errors += 1;
                            self.lose_framing(c, kind, ts);
                        }
                    }
                }
                State::InChunk(Chunk::Data(rem)) => {
                    let n = (rem as usize).min(data.len());
                    let (now, rest) = std::mem::take(&mut data).split_at_mut(n);
                    self.redact_body(c, kind, now);
                    self.body(c, kind, ts, now, n as u64);
                    data = rest;
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
                    data = &mut std::mem::take(&mut data)[n..];
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

    /// Redacts body bytes of `kind`'s current message in place (when the tracker redacts).
    fn redact_body(&self, c: &mut Conn, kind: Kind, data: &mut [u8]) {
        if let Some(k) = self.redact {
            c.sides[kind as usize].body_redact.redact(k, data);
        }
    }

    /// Accounts for `n` bytes that moved but were not captured.
    pub(super) fn skip(&mut self, c: &mut Conn, kind: Kind, ts: u64, mut n: u64) {
        let side = kind as usize;
        if matches!(
            c.sides[side].state,
            State::Body(_) | State::InChunk(Chunk::Data(_))
        ) {
            // Past a hole the redactor cannot know where it is: it replaces the rest.
            c.sides[side].body_redact.gap();
        }
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
                        *inc,
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

    /// A complete head (start line to the blank line) on `kind`'s side.
    fn on_head(&mut self, c: &mut Conn, kind: Kind, ts: u64, head: &[u8]) {
        match kind {
            Kind::Request => self.request_head(c, ts, head),
            Kind::Response => self.response_head(c, ts, head),
        }
    }

    fn request_head(&mut self, c: &mut Conn, ts: u64, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            self.stats.parse_errors += 1;
            self.lose_framing(c, Kind::Request, ts);
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
        let mut inc = Incoming {
            method,
            path,
            request_id: dialect::request_id(req.headers),
            tenant,
            body_head: Vec::new(),
            body_gap: false,
            meta: MetaScan::default(),
            hasher: siphasher::sip::SipHasher13::new_with_keys(0, 0),
            hashed: 0,
        };
        inc.hash(head);
        let framing = if is_chunked(req.headers) {
            Some(Framing::Chunked)
        } else {
            content_length(req.headers)
                .filter(|&n| n > 0)
                .map(Framing::Length)
        };
        self.stats.requests += 1;
        c.incoming = Some(Box::new(inc));
        match framing {
            Some(f) => c.sides[0].state = State::Body(f),
            None => self.message_done(c, Kind::Request, ts),
        }
    }

    fn response_head(&mut self, c: &mut Conn, ts: u64, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if !matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
            self.stats.parse_errors += 1;
            self.lose_framing(c, Kind::Response, ts);
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
        let body_type = stream::body_type(header(resp.headers, "content-type").unwrap_or(""));
        let rid = dialect::request_id(resp.headers);
        let header_usage = dialect::usage_in_headers(resp.headers);
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
            if let Some(u) = header_usage {
                p.usage_seen = true;
                self.out.push(u.event(p.key));
            }
        } else {
            no_body = false;
        }
        if status == 101 {
            // Switching protocols: this exchange ends here, the connection speaks another.
            let h2 = header(resp.headers, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("h2c"));
            self.message_done(c, Kind::Response, ts);
            self.other_protocol(c, if h2 { Proto::Http2 } else { Proto::Upgraded });
            return;
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
            None => self.message_done(c, Kind::Response, ts),
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
                if let Some(inc) = &mut c.incoming {
                    inc.meta.feed(data, len);
                    if !inc.body_gap {
                        inc.hash(data);
                    }
                }
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
                        stream::stream_lines(p, ts, data, &mut self.out);
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
            // Released, not cleared: an idle connection keeps no buffer.
            s.buf = Vec::new();
        }
        match kind {
            Kind::Request => {
                if let Some(inc) = c.incoming.take() {
                    let p = self.arrive(c, *inc, ts, start, bytes);
                    c.pending.push_back(p);
                }
            }
            Kind::Response => {
                if let Some(mut p) = c.pending.pop_front() {
                    p.resp_body_bytes = bytes;
                    self.end(p, ts, Outcome::Complete);
                }
                if c.pending.is_empty() {
                    // Room for four requests stays otherwise (800 bytes) on an idle connection.
                    c.pending = std::collections::VecDeque::new();
                }
            }
        }
    }

    /// A request has been received (or its end was lost): tell it, and queue it for its
    /// response.
    fn arrive(&mut self, c: &mut Conn, inc: Incoming, ts: u64, start: u64, bytes: u64) -> Pending {
        let key = RequestKey {
            conn: c.key,
            seq: c.next_seq,
            id: self.next_id,
        };
        c.next_seq += 1;
        self.next_id += 1;
        if inc.meta.cut() {
            self.stats.body_meta_cut += 1;
        }
        let meta = inc.meta.meta;
        self.out.push(Lifecycle::Arrive {
            req: key,
            ts_ns: start,
            method: inc.method.clone(),
            path: inc.path,
            model: meta.model,
            stream: meta.stream,
            max_tokens: meta.max_tokens,
            include_usage: meta.include_usage,
            request_id: inc.request_id.clone(),
            tenant: inc.tenant,
            body_bytes: bytes,
            prompt_blocks: prefix::prompt_blocks(&inc.body_head),
            client: c.role == Role::Client,
            message_hash: {
                use std::hash::Hasher as _;
                inc.hasher.finish()
            },
        });
        self.out.push(Lifecycle::RequestDone {
            req: key,
            ts_ns: ts,
            bytes,
        });
        Pending::new(key, inc.method.eq_ignore_ascii_case("HEAD"), inc.request_id)
    }
}
