//! What the tracker keeps per connection: each direction's framing state, the request being
//! received, and the requests waiting for (or receiving) their responses, oldest first.

use std::collections::VecDeque;

use super::{ConnKey, RequestKey, Role, meta::MetaScan, redact};

/// Which message a side carries, by who sends it.
///
/// Its value is the index of that side in [`Conn::sides`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Kind {
    Request,
    Response,
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Chunk {
    /// Reading a chunk-size line (in `line`).
    Size,
    Data(u64),
    /// The CRLF after chunk data: bytes still to skip.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailer,
}

/// Where one side's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum State {
    /// Waiting for / accumulating a start line and head.
    Head,
    Body(Framing),
    InChunk(Chunk),
    /// Skipping to the next start line.
    Resync,
}

/// How a response body is read: streamed ones event by event, others by their kept windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum BodyType {
    Other,
    Sse,
    Ndjson,
}

/// One direction of a connection.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Side {
    pub(super) state: State,
    /// Head bytes, or the current chunk-size / trailer line.
    pub(super) buf: Vec<u8>,
    /// Bytes of the current message so far.
    pub(super) msg_bytes: u64,
    pub(super) msg_start_ns: u64,
    pub(super) in_message: bool,
    /// Redaction of the current message's head and body (`redact.rs`).
    pub(super) head_redact: redact::HeadState,
    pub(super) body_redact: redact::BodyState,
}

impl Side {
    pub(super) fn new() -> Self {
        Side {
            state: State::Head,
            buf: Vec::new(),
            msg_bytes: 0,
            msg_start_ns: 0,
            in_message: false,
            head_redact: redact::HeadState::default(),
            body_redact: redact::BodyState::default(),
        }
    }
}

/// A request waiting for (or receiving) its response.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Pending {
    pub(super) key: RequestKey,
    pub(super) head_request: bool,
    pub(super) request_id: Option<String>,
    // Response state.
    pub(super) status: Option<u16>,
    pub(super) body: BodyType,
    pub(super) events: u64,
    pub(super) server_id: Option<String>,
    pub(super) response_request_id: Option<String>,
    pub(super) line: Vec<u8>,
    pub(super) skip_line: bool,
    pub(super) resp_head: Vec<u8>,
    pub(super) resp_tail: Vec<u8>,
    pub(super) resp_body_bytes: u64,
    pub(super) usage_seen: bool,
}

impl Pending {
    /// A request that has arrived; nothing of its response is known yet.
    pub(super) fn new(key: RequestKey, head_request: bool, request_id: Option<String>) -> Self {
        Pending {
            key,
            head_request,
            request_id,
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
}

/// The request currently being received.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Incoming {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) request_id: Option<String>,
    pub(super) tenant: Option<String>,
    pub(super) body_head: Vec<u8>,
    /// Part of the body was not captured: the head window is complete as it is.
    pub(super) body_gap: bool,
    /// What the body asks for, scanned as it is read.
    pub(super) meta: MetaScan,
    /// Hash of the message's first [`MESSAGE_HASH_BYTES`] (head, then body), and how many
    /// went in: both ends of one exchange see the same (`Lifecycle::Arrive::message_hash`).
    pub(super) hasher: siphasher::sip::SipHasher13,
    pub(super) hashed: usize,
}

/// Bytes of a request message hashed to recognise the same exchange at its two ends: every
/// capture holds at least a message's first 4 KiB.
pub(super) const MESSAGE_HASH_BYTES: usize = 4096;

impl Incoming {
    /// Hashes the next bytes of the message, up to [`MESSAGE_HASH_BYTES`].
    pub(super) fn hash(&mut self, bytes: &[u8]) {
        use std::hash::Hasher as _;
        let n = bytes.len().min(MESSAGE_HASH_BYTES - self.hashed);
        self.hasher.write(&bytes[..n]);
        self.hashed += n;
    }
}

/// One traced connection.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Conn {
    pub(super) key: ConnKey,
    pub(super) role: Role,
    /// Indexed by [`Kind`]: requests, then responses.
    pub(super) sides: [Side; 2],
    /// Boxed: most connections wait between requests most of the time.
    pub(super) incoming: Option<Box<Incoming>>,
    pub(super) pending: VecDeque<Pending>,
    pub(super) next_seq: u32,
    pub(super) last_ns: u64,
    /// What the connection speaks; only HTTP/1.x is parsed.
    pub(super) proto: Proto,
    /// No byte has been seen on it yet (its first bytes tell its protocol).
    pub(super) fresh: bool,
    /// TLS read through the TLS library: its plaintext is parsed, its socket bytes counted.
    pub(super) decrypted: bool,
}

/// A connection's protocol, from its first bytes or an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge (the client preface) or after an `h2c` upgrade.
    Http2,
    /// TLS records: encrypted where the probes see it (not through a traced TLS library).
    Tls,
    /// Switched to another protocol by `101 Switching Protocols` (WebSocket, ...).
    Upgraded,
}

impl Proto {
    /// Bytes [`Proto::sniff`] reads at most.
    pub(super) const SNIFF_BYTES: usize = 16;

    /// The protocol that `first` (a connection's first bytes) begins, when not HTTP/1.x.
    pub(super) fn sniff(first: &[u8]) -> Option<Proto> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
        let n = first.len().min(PREFACE.len());
        if n >= 3 && first[..n] == PREFACE[..n] {
            return Some(Proto::Http2);
        }
        // A TLS record: handshake, alert, change cipher spec or application data, TLS 1.0-1.3.
        match first {
            [0x14..=0x17, 0x03, 0x00..=0x04, ..] => Some(Proto::Tls),
            _ => None,
        }
    }
}

impl Conn {
    pub(super) fn new(key: ConnKey, role: Role, ts: u64) -> Self {
        Conn {
            key,
            role,
            sides: [Side::new(), Side::new()],
            incoming: None,
            pending: VecDeque::new(),
            next_seq: 0,
            last_ns: ts,
            proto: Proto::Http1,
            fresh: true,
            decrypted: false,
        }
    }
}
