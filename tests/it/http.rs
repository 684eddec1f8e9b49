//! Requests off the wire: real servers on loopback, the real probes attached by port, a
//! keep-alive client recording the truth; every request must come out with the right
//! boundaries, status, sizes, event counts and usage.

use std::process::Command;

use serde_json::Value;
use tracer_tests::{
    TempDir, Tracer,
    client::{Client, Post},
    listening, privileged_or_skip, self_signed_cert,
};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const AXUM: &str = env!("CARGO_BIN_EXE_openai-axum");

/// The daemon attached by `port`, writing the output `out` (flag, path); `events`: the
/// per-event JSON too.
fn attach(dir: &std::path::Path, port: u16, out: (&str, &std::path::Path), events: bool) -> Tracer {
    Tracer::start_with(
        TRACER,
        dir,
        &[
            "--port",
            &port.to_string(),
            "--poll-interval-ms",
            "5",
            out.0,
            out.1.to_str().expect("utf8"),
        ],
        events,
    )
}

fn requests_of(dir: &std::path::Path, tgid: u32) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("requests.jsonl")).expect("requests output");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("request JSON"))
        .filter(|r| r["tgid"] == tgid)
        .collect()
}

/// Drives `n` alternating streaming / non-streaming chat requests over one connection and checks
/// the tracer's records against what the client saw.
fn check_server(name: &str, server: &mut Command, keepalive_comments: bool) {
    check_server_with(name, server, keepalive_comments, "", &[]);
}

/// As [`check_server`], with `extra` JSON members in every request body (`,"k":v`) and
/// `headers` in every request.
fn check_server_with(
    name: &str,
    server: &mut Command,
    keepalive_comments: bool,
    extra: &str,
    headers: &[(&str, &str)],
) {
    let body = |i: u64, stream: bool| {
        format!(
            r#"{{"model":"m-{i}","stream":{stream},"max_tokens":{},"stream_options":{{"include_usage":true}},"keepalive":{keepalive_comments}{extra},"messages":[{{"role":"user","content":"hello number {i}"}}]}}"#,
            3 + i
        )
    };
    check_server_bodies(name, server, &body, headers, 1, false);
}

/// Drives 10 requests whose bodies `body(i, stream)` makes; see [`check_server`]. `tls`: the
/// server speaks HTTPS, and the client reaches it through `tls_tunnel.py` (so the client's
/// truth is the plaintext on the wire inside TLS).
fn check_server_bodies(
    name: &str,
    server: &mut Command,
    body: &dyn Fn(u64, bool) -> String,
    headers: &[(&str, &str)],
    pipelined: u64,
    tls: bool,
) {
    if !privileged_or_skip(name) {
        return;
    }
    let dir = TempDir::new(name);
    let (mut child, port) = listening(server);
    let requests_out = dir.path().join("requests.jsonl");
    let tracer = attach(dir.path(), port, ("--requests-out", &requests_out), true);
    let mut tunnel = tls.then(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/tls_tunnel.py");
        listening(Command::new("python3").arg(script).arg(port.to_string()))
    });
    let connect_to = tunnel.as_ref().map_or(port, |t| t.1);
    let mut client = Client::connect(connect_to).expect("connect");
    let mut truth = Vec::new();
    // `pipelined` requests at a time in one write (1: one after the other).
    for first in (0..10u64).step_by(pipelined.max(1) as usize) {
        let batch: Vec<(u64, bool, String, String)> = (first..(first + pipelined.max(1)).min(10))
            .map(|i| (i, i % 2 == 0, body(i, i % 2 == 0), format!("req-{i}")))
            .collect();
        let all: Vec<Vec<(&str, &str)>> = batch
            .iter()
            .map(|(_, _, _, rid)| {
                let mut all = vec![("X-Request-Id", rid.as_str())];
                all.extend_from_slice(headers);
                all
            })
            .collect();
        let requests: Vec<Post<'_>> = batch
            .iter()
            .zip(&all)
            .map(|((_, _, body, _), h)| ("/v1/chat/completions", body.as_str(), h.as_slice()))
            .collect();
        let exchanges = client.pipeline(&requests).expect("exchange");
        for ((i, stream, _, rid), ex) in batch.iter().zip(exchanges) {
            assert_eq!(ex.status, 200);
            truth.push((*i, *stream, rid.clone(), ex));
        }
    }
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let events = tracer.stop();
    // After the stop: its last summary is there.
    let log = std::fs::read_to_string(dir.path().join("tracer.log")).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    if let Some((t, _)) = &mut tunnel {
        let _ = t.kill();
        let _ = t.wait();
    }
    assert!(!events.is_empty());
    // Without --events-payload, nothing sent or received is kept.
    assert!(
        events
            .iter()
            .all(|e| e["payload"].as_str().is_none_or(str::is_empty)),
        "a payload in the events file"
    );
    if tls {
        assert!(
            log.contains("TLS plaintext (OpenSSL): 9 uprobes on"),
            "{log}"
        );
        assert!(log.contains("tls=1 (decrypted 1)"), "{log}");
    }

    let records = requests_of(dir.path(), child.id());
    assert_eq!(
        records.len(),
        truth.len(),
        "{name}: one record per request: {records:#?}"
    );
    for (rec, (i, stream, rid, ex)) in records.iter().zip(&truth) {
        let ctx = format!("{name} request {i}: {rec}");
        assert_eq!(rec["method"], "POST", "{ctx}");
        assert_eq!(rec["path"], "/v1/chat/completions", "{ctx}");
        assert_eq!(rec["status"], 200, "{ctx}");
        assert_eq!(rec["outcome"], "complete", "{ctx}");
        assert_eq!(rec["model"], format!("m-{i}"), "{ctx}");
        assert_eq!(rec["stream"], *stream, "{ctx}");
        assert_eq!(rec["request_id"], rid.as_str(), "{ctx}");
        assert_eq!(rec["request_bytes"], ex.request_bytes, "{ctx}");
        assert_eq!(rec["response_bytes"], ex.response_bytes, "{ctx}");
        assert_eq!(rec["completion_tokens"], 3 + i, "{ctx}");
        if *stream {
            // Token events plus the usage chunk, never [DONE] or comments.
            assert_eq!(rec["events"], ex.events, "{ctx}");
            assert!(ex.done);
            assert!(
                rec["first_event_ns"].as_u64() >= rec["first_byte_ns"].as_u64(),
                "{ctx}"
            );
        } else {
            assert_eq!(rec["events"], 0, "{ctx}");
        }
        let (a, f, e) = (
            rec["arrive_ns"].as_u64().expect("arrive"),
            rec["first_byte_ns"].as_u64().expect("first byte"),
            rec["end_ns"].as_u64().expect("end"),
        );
        assert!(a <= f && f <= e, "{ctx}");
    }
    // Requests on one connection come in order.
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>());
}

#[test]
fn python_stdlib_server_streaming_and_not() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    check_server("python-stdlib", Command::new("python3").arg(script), false);
}

/// Node's own `http` server: streams that end in one `writev` of 9 segments (the usage chunk,
/// `[DONE]` and the chunked terminator), keep-alive.
#[test]
fn node_http_server_streaming_and_not() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_node.js");
    check_server("node-http", Command::new("node").arg(script), false);
}

/// Pipelining against Node: three requests in one write, the responses queued behind each
/// other on the connection; each must still get its own events, usage and bytes.
#[test]
fn node_http_server_pipelined() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_node.js");
    let body = |i: u64, stream: bool| {
        format!(
            r#"{{"model":"m-{i}","stream":{stream},"max_tokens":{},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hello number {i}"}}]}}"#,
            3 + i
        )
    };
    check_server_bodies(
        "node-pipelined",
        Command::new("node").arg(script),
        &body,
        &[],
        3,
        false,
    );
}

/// Node's `http` writes the usage chunk, `[DONE]` and the chunked terminator in one `writev` of
/// 9 segments; servers that gather more write more: every segment must be walked.
#[test]
fn a_stream_ending_in_one_writev_of_9_and_of_64_segments() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    for segments in [9, 64] {
        check_server_with(
            &format!("writev-{segments}"),
            Command::new("python3").arg(script),
            false,
            &format!(r#","tail_segments":{segments}"#),
            &[],
        );
    }
}

/// A 20 KB body with `model`, `stream` and `max_tokens` after the prompt (clients that put
/// `messages` first).
fn long_body(i: u64, stream: bool) -> String {
    let prompt = "w ".repeat(10 * 1024);
    format!(
        r#"{{"messages":[{{"role":"user","content":"{prompt}"}}],"stream_options":{{"include_usage":true}},"max_tokens":{},"stream":{stream},"model":"m-{i}"}}"#,
        3 + i
    )
}

/// Clients that put `messages` first send `model`, `stream` and `max_tokens` after the
/// prompt: a 20 KB body with them at its end.
#[test]
fn a_20_kb_body_with_the_model_at_its_end() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    check_server_bodies(
        "body-20kb",
        Command::new("python3").arg(script),
        &long_body,
        &[],
        1,
        false,
    );
}

/// `program script --tls CERT KEY` (a self-signed certificate) checked with 20 KB bodies,
/// streamed and not, through the TLS tunnel.
fn check_https(name: &str, program: &str, script: &str) {
    let certs = TempDir::new(&format!("{name}-cert"));
    let (cert, key) = self_signed_cert(certs.path());
    let mut server = Command::new(program);
    server.arg(script).arg("--tls").arg(&cert).arg(&key);
    check_server_bodies(name, &mut server, &long_body, &[], 1, true);
}

/// HTTPS terminated by the server itself (Python's `ssl`: OpenSSL through a socket BIO), read
/// in plaintext through the OpenSSL uprobes (a request read in several `SSL_read_ex` calls and
/// capture records).
#[test]
fn https_served_through_openssl_is_read_in_plaintext() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    check_https("https", "python3", script);
}

/// HTTPS from Node (`https`: the OpenSSL linked into the node binary, exporting its symbols,
/// fed through a memory BIO: the socket under each `SSL *` is the one its thread just read).
#[test]
fn node_https_through_its_own_openssl_is_read_in_plaintext() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_node.js");
    check_https("node-https", "node", script);
}

/// A server idle in a blocking `accept` when tracer attaches (any thread-per-connection
/// server): the accept's entry was never seen, its first connection is followed all the same.
#[test]
fn a_server_blocked_in_accept_at_attach() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    check_server(
        "blocked-accept",
        Command::new("python3").arg(script).arg("--blocking-accept"),
        false,
    );
}

/// Large cookies and tokens make heads of many kilobytes, read in one syscall: a 12 KB head
/// with a 6 KB cookie is followed as any other.
#[test]
fn a_12_kb_head_with_a_6_kb_cookie() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    let cookie = format!("session={}", "c".repeat(6 * 1024));
    let token = format!("Bearer {}", "t".repeat(5 * 1024));
    check_server_with(
        "head-12kb",
        Command::new("python3").arg(script),
        false,
        "",
        &[("Cookie", &cookie), ("Authorization", &token)],
    );
}

#[test]
fn axum_hyper_server_with_keepalive_comments() {
    check_server("axum", &mut Command::new(AXUM), true);
}

#[test]
fn connection_opened_before_attach_is_seeded_from_proc() {
    if !privileged_or_skip("connection_opened_before_attach_is_seeded_from_proc") {
        return;
    }
    let dir = TempDir::new("seeded");
    let (mut child, port) = listening(&mut Command::new(AXUM));
    // A keep-alive connection, used once before the tracer exists.
    let mut client = Client::connect(port).expect("connect");
    let body = r#"{"model":"before","max_tokens":2}"#;
    client
        .post("/v1/chat/completions", body, &[])
        .expect("first exchange");
    let requests_out = dir.path().join("requests.jsonl");
    let tracer = attach(dir.path(), port, ("--requests-out", &requests_out), true);
    assert!(
        tracer.log_text().contains("1 open connections"),
        "{}",
        tracer.log_text()
    );
    let mut truth = Vec::new();
    for i in 0..3 {
        let body = format!(r#"{{"model":"after-{i}","max_tokens":{}}}"#, 2 + i);
        truth.push(
            client
                .post("/v1/chat/completions", &body, &[])
                .expect("exchange"),
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = tracer.stop();
    let _ = child.kill();
    let _ = child.wait();
    let records = requests_of(dir.path(), child.id());
    assert_eq!(records.len(), 3, "{records:#?}");
    for (i, (rec, ex)) in records.iter().zip(&truth).enumerate() {
        assert_eq!(rec["model"], format!("after-{i}"));
        assert_eq!(rec["outcome"], "complete");
        assert_eq!(rec["request_bytes"], ex.request_bytes);
        assert_eq!(rec["response_bytes"], ex.response_bytes);
    }
}

/// The second hop: an Ollama-shaped front server that spawns its engine server and forwards
/// each request to it over loopback HTTP (NDJSON outside, SSE inside), 32 clients at once.
/// Each client request is one energy record, carrying the token counts of its own inner
/// exchange (the front reports none), and neither the front's call nor the engine's side of it
/// is a request of its own.
#[test]
fn a_request_forwarded_to_a_child_engine_is_one_request() {
    second_hop("second-hop", 32, None);
}

/// The same hop over HTTP on a Unix socket (the front spawns its engine on one): the socket's
/// first bytes make it an HTTP connection in the kernel, not IPC.
#[test]
fn a_request_forwarded_over_a_unix_socket_is_one_request() {
    second_hop("second-hop-unix", 32, Some(0));
}

/// The same with the engine started on its own and traced as another service (a proxy in
/// front of a local engine): each request is the engine's service's, where its energy is.
#[test]
fn a_request_forwarded_to_an_engine_of_another_service_is_that_services() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
    let (mut engine, port) = listening(Command::new("python3").arg(script));
    second_hop("second-hop-services", 8, Some(port));
    let _ = engine.kill();
    let _ = engine.wait();
}

/// `clients` × 3 requests through the Ollama-shaped front, its engine its child or, with
/// `engine`, the one listening on that port (traced too, as its own service); port 0: its
/// child on a Unix socket.
fn second_hop(name: &str, clients: u64, engine: Option<u16>) {
    const EACH: u64 = 3;
    if !privileged_or_skip(name) {
        return;
    }
    let dir = TempDir::new(name);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/ndjson_proxy.py");
    let mut front = Command::new("python3");
    front.arg(script);
    let engine = engine.filter(|&p| {
        if p == 0 {
            front.arg("--engine-unix");
        }
        p != 0
    });
    if let Some(p) = engine {
        front.args(["--engine-port", &p.to_string()]);
    }
    let (mut child, port) = listening(&mut front);
    let records_path = dir.path().join("records.jsonl");
    let mut args = vec![
        "--port".to_string(),
        port.to_string(),
        "--poll-interval-ms".into(),
        "5".into(),
        "--records-out".into(),
        records_path.to_str().expect("utf8").into(),
    ];
    if let Some(p) = engine {
        args.extend(["--port".into(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::start_with(TRACER, dir.path(), &args, false);
    std::thread::scope(|s| {
        for c in 0..clients {
            s.spawn(move || {
                let mut client = Client::connect(port).expect("connect");
                for i in 0..EACH {
                    let n = 2 + (c * EACH + i) % 7;
                    let body = format!(
                        r#"{{"model":"front-{c}","options":{{"num_predict":{n}}},"messages":[{{"role":"user","content":"client {c} request {i}"}}]}}"#
                    );
                    let rid = format!("hop-{c}-{i}-{n}");
                    let ex = client
                        .post("/api/chat", &body, &[("X-Request-Id", &rid)])
                        .expect("exchange");
                    assert_eq!(ex.status, 200);
                }
            });
        }
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let log = tracer.log_text();
    let _ = tracer.stop();
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&records_path).expect("records");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let strays: Vec<&Value> = records
        .iter()
        .filter(|r| {
            !r["external_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("hop-"))
        })
        .collect();
    assert_eq!(
        records.len() as u64,
        clients * EACH,
        "one record per client request; not the client's: {strays:#?}\n{log}"
    );
    let service = match engine {
        Some(p) => format!("port {p}"),
        None => format!("port {port}"),
    };
    for r in &records {
        let rid = r["external_id"].as_str().expect("the client's request id");
        let n: u64 = rid
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("n");
        let c = rid.split('-').nth(1).expect("client");
        assert_eq!(r["completion_tokens"], n, "the inner exchange's count: {r}");
        assert!(r["prompt_tokens"].as_u64().is_some_and(|p| p > 0), "{r}");
        assert_eq!(r["model"], format!("front-{c}"), "{r}");
        assert_eq!(r["service_name"], service, "where the work ran: {r}");
    }
}
