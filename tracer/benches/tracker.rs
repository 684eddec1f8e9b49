//! The HTTP tracker's cost per streamed event and per non-streamed request, redacting and not
//! (the daemon's per-event work before the ledger: framing, SSE lines, redaction, summaries).
//! `cargo bench -p tracer --bench tracker` (issue 17; `BENCHMARKS.md`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::wire::{ConnKey, Direction, Lifecycle, Role, Tracker, TrackerConfig};

const REQUEST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\
user-agent: loadgen\r\ncontent-type: application/json\r\ncontent-length: 87\r\n\r\n\
{\"model\":\"m\",\"stream\":true,\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
cache-control: no-cache\r\ntransfer-encoding: chunked\r\ndate: Sun, 06 Dec 2026 05:55:20 GMT\r\n\r\n";

/// Events per streamed response, as the load bench's (`--max-tokens 64`).
const EVENTS: usize = 64;

/// One chunk of the stream as the bench server writes it (one `write` each).
fn event(i: usize) -> Vec<u8> {
    let data = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"tok{i} \"}},\"index\":0}}],\
         \"id\":\"chatcmpl-3\",\"model\":\"m\",\"object\":\"chat.completion.chunk\"}}\n\n"
    );
    let mut chunk = format!("{:X}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data.as_bytes());
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// Benches one exchange, sent write by write on one connection, redacting and not; `units`
/// is what a run counts (events, requests).
fn exchange(c: &mut Criterion, name: &str, units: u64, writes: &[(Direction, &[u8])]) {
    let mut group = c.benchmark_group("tracker");
    group.throughput(Throughput::Elements(units));
    for redact in [false, true] {
        let id = if redact {
            format!("{name}_redacted")
        } else {
            name.to_string()
        };
        group.bench_function(id, |b| {
            let mut t = Tracker::new(TrackerConfig {
                redaction_key: redact.then_some([1, 2]),
                ..TrackerConfig::default()
            });
            let mut out: Vec<Lifecycle> = Vec::new();
            let conn = ConnKey {
                tgid: 10,
                fd: 3,
                conn_id: 1,
            };
            t.on_open(conn, 0, Role::Server);
            let mut ts = 1;
            b.iter(|| {
                for &(dir, bytes) in writes {
                    ts += 1000;
                    t.on_data(conn, ts, dir, bytes.len() as u64, bytes);
                }
                t.drain_into(&mut out);
                assert!(!out.is_empty());
                out.clear();
            });
            // Every exchange framed as it was sent: no resync, one request each.
            let stats = t.stats();
            assert_eq!(stats.resyncs, 0, "{stats:?}");
            assert!(stats.completed > 0, "{stats:?}");
        });
    }
    group.finish();
}

fn stream(c: &mut Criterion) {
    let events: Vec<Vec<u8>> = (0..EVENTS).map(event).collect();
    let done = b"E\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
    let mut writes = vec![(Direction::Inbound, REQUEST), (Direction::Outbound, HEAD)];
    writes.extend(events.iter().map(|e| (Direction::Outbound, e.as_slice())));
    writes.push((Direction::Outbound, done.as_slice()));
    exchange(c, "sse_events", EVENTS as u64, &writes);
}

/// A non-streamed request and its JSON answer as the bench server (`openai-axum`) sends them
/// for the no-op mix (`--max-tokens 4`): one `read`, one `write` each.
const NOOP_REQUEST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\
content-type: application/json\r\ncontent-length: 85\r\n\r\n\
{\"model\":\"bench\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hello world\"}]}";

const NOOP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
content-length: 203\r\ndate: Sun, 06 Dec 2026 05:55:20 GMT\r\n\r\n\
{\"choices\":[{\"index\":0,\"message\":{\"content\":\"xxxx\",\"role\":\"assistant\"}}],\
\"id\":\"chatcmpl-4\",\"model\":\"bench\",\"object\":\"chat.completion\",\
\"usage\":{\"completion_tokens\":4,\"prompt_tokens\":14,\"total_tokens\":18}}";

fn noop(c: &mut Criterion) {
    let writes = [
        (Direction::Inbound, NOOP_REQUEST),
        (Direction::Outbound, NOOP_RESPONSE),
    ];
    exchange(c, "noop_request", 1, &writes);
}

criterion_group!(benches, stream, noop);
criterion_main!(benches);
