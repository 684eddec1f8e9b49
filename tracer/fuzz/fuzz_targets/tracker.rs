//! Fuzzes `tracer::wire::Tracker` with syscall sequences mixing raw bytes and pieces of real
//! HTTP/SSE traffic, random splits and uncaptured tails, and checks the lifecycle invariants:
//! per request, `Arrive` comes first, nothing follows `End`, and every `Arrive` ends once.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use tracer::wire::{ConnKey, Direction, Lifecycle, Role, Tracker, TrackerConfig};

const REQUESTS: &[&[u8]] = &[
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 98\r\n\r\n{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    b"e\r\n{\"model\":\"ll\",\r\n",
    b"0\r\n\r\n",
    b"GET /old HTTP/1.0\r\nAuthorization: Bearer sk-x\r\nX-Request-Id: r1\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    b"4a\r\ndata: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"tok\"}}],\"model\":\"m\",\"x\":0}\n\n\r\n",
    b"e\r\n: keep-alive\n\n\r\n",
    b"7b;e=1\r\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}}\n\n",
    b"\r\n",
    b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: 64\r\n\r\n{\"done\":false}\n{\"done\":true,\"prompt_eval_count\":2,\"eval_count\":3}\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"id\":\"x\",\"usage\":{\"prompt_tokens\":4}}",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
];

struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
}

#[derive(Default)]
struct Seen {
    ended: bool,
}

fn check(t: &mut Tracker, seen: &mut HashMap<u64, Seen>) {
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    for e in &evs {
        let id = e.request().id;
        match e {
            Lifecycle::Arrive { .. } => {
                assert!(
                    seen.insert(id, Seen::default()).is_none(),
                    "second Arrive: {e:?}"
                );
            }
            _ => {
                let s = seen
                    .get_mut(&id)
                    .unwrap_or_else(|| panic!("before Arrive: {e:?}"));
                assert!(!s.ended, "after End: {e:?}");
                if let Lifecycle::End { .. } = e {
                    s.ended = true;
                }
            }
        }
    }
    let json = serde_json::to_string(&evs).unwrap_or_default();
    assert!(!json.contains("sk-x"));
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input { data };
    let cfg = TrackerConfig {
        max_head_bytes: 256 + usize::from(inp.byte().unwrap_or(0)) * 16,
        tenant_header: Some("authorization".to_owned()),
        max_connections: 3,
        ..TrackerConfig::default()
    };
    let mut t = Tracker::new(cfg);
    let mut seen = HashMap::new();
    let mut ts = 0u64;
    let roles = [Role::Server, Role::Client, Role::Unknown];
    while let Some(op) = inp.byte() {
        ts += 1 + u64::from(op >> 5);
        let conn = ConnKey {
            tgid: 1,
            fd: i32::from(op & 1),
            conn_id: u64::from((op >> 1) & 1),
        };
        let dir = if op & 4 == 0 {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let arg = inp.byte().unwrap_or(0);
        match (op >> 3) % 8 {
            0 | 1 => {
                let raw = inp.bytes(usize::from(arg));
                t.on_data(conn, ts, dir, raw.len() as u64, raw);
            }
            2 | 3 => {
                // A template piece in two syscalls split at a chosen point.
                let piece = if op & 8 == 0 {
                    REQUESTS[usize::from(arg) % REQUESTS.len()]
                } else {
                    RESPONSES[usize::from(arg) % RESPONSES.len()]
                };
                let cut = usize::from(inp.byte().unwrap_or(255)) % (piece.len() + 1);
                for part in [&piece[..cut], &piece[cut..]] {
                    if !part.is_empty() {
                        t.on_data(conn, ts, dir, part.len() as u64, part);
                    }
                }
            }
            4 => {
                // A syscall captured only in part.
                let raw = inp.bytes(usize::from(arg));
                let extra = u64::from(inp.byte().unwrap_or(0)) * 37;
                t.on_data(conn, ts, dir, raw.len() as u64 + extra, raw);
            }
            5 => t.on_eof(conn, ts, dir),
            6 => {
                t.on_close(conn, ts);
                t.on_open(conn, ts, roles[usize::from(arg) % 3]);
            }
            _ => t.evict_idle(ts, u64::from(arg)),
        }
        check(&mut t, &mut seen);
        assert_eq!(t.stats().connections_open, t.open_connections() as u64);
    }
    for fd in 0..2 {
        for conn_id in 0..2 {
            t.on_close(
                ConnKey {
                    tgid: 1,
                    fd,
                    conn_id,
                },
                ts + 1,
            );
        }
    }
    check(&mut t, &mut seen);
    assert!(seen.values().all(|s| s.ended), "an Arrive without End");
    assert_eq!(t.open_connections(), 0);
});
