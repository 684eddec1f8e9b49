//! Third-party servers under load, each request compared with the client's own counts (issue
//! 14): Node's `http` (SSE with `include_usage`, keep-alive, a third of the clients pipelining),
//! uvicorn (a vLLM-shaped ASGI app), an Ollama-shaped NDJSON front spawning its engine (the
//! second hop, over loopback TCP and over a Unix socket), and HTTPS served through OpenSSL. The
//! tracer attaches by port after the server started. Every request must come out once,
//! `complete`, with its exact request and response bytes, events, completion tokens and id;
//! nothing truncated.
//!
//! CI runs `TRACER_THIRDPARTY_REQUESTS` (default 200) requests per server at
//! `TRACER_THIRDPARTY_CONCURRENCY` (default 16); `cargo xtask thirdparty` runs 2,000 at 32 on a
//! release build and prints the table BENCHMARKS.md quotes. It also builds llama.cpp's C++
//! `llama-server` from source with a generated tiny model (about ten minutes on two cores, so
//! not in CI: that test is ignored unless `TRACER_LLAMA_SERVER` and `TRACER_LLAMA_MODEL` name
//! them, which the xtask does).

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    TempDir, Tracer,
    client::{Client, Exchange, Post},
    listening, privileged_or_skip, self_signed_cert,
};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const SERVERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers");
/// The Python environment `cargo xtask setup` makes with uvicorn in it.
const PYENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pyenv/bin/python");

fn scale() -> (u64, u64) {
    let var = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (
        var("TRACER_THIRDPARTY_REQUESTS", 200),
        var("TRACER_THIRDPARTY_CONCURRENCY", 16).max(1),
    )
}

/// How a server is spoken to.
#[derive(Clone, Copy)]
struct Shape {
    path: &'static str,
    /// Request `i`'s body (and whether it streams).
    body: fn(u64) -> (String, bool),
    /// NDJSON (every line an event) rather than SSE.
    ndjson: bool,
    /// Requests a pipelining client sends per write (1: none); every third client pipelines.
    pipeline: u64,
    /// Through `tls_tunnel.py` to an HTTPS server.
    tls: bool,
}

/// `OpenAI` chat completions, one request per write, plain HTTP.
const OPENAI: Shape = Shape {
    path: "/v1/chat/completions",
    body: openai,
    ndjson: false,
    pipeline: 1,
    tls: false,
};

/// Ollama's chat API (NDJSON).
const OLLAMA: Shape = Shape {
    path: "/api/chat",
    body: ollama,
    ndjson: true,
    pipeline: 1,
    tls: false,
};

fn tokens(i: u64) -> u64 {
    2 + i % 7
}

fn openai(i: u64) -> (String, bool) {
    let stream = i.is_multiple_of(2);
    (
        format!(
            r#"{{"model":"m-{}","stream":{stream},"max_tokens":{},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"request {i}"}}]}}"#,
            i % 3,
            tokens(i)
        ),
        stream,
    )
}

/// llama.cpp's server: as [`openai`], never stopping early at the random model's end token.
fn llama(i: u64) -> (String, bool) {
    let stream = i.is_multiple_of(2);
    (
        format!(
            r#"{{"model":"tiny","stream":{stream},"max_tokens":{},"ignore_eos":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"request {i}"}}]}}"#,
            tokens(i)
        ),
        stream,
    )
}

fn ollama(i: u64) -> (String, bool) {
    (
        format!(
            r#"{{"model":"m-{}","options":{{"num_predict":{}}},"messages":[{{"role":"user","content":"request {i}"}}]}}"#,
            i % 3,
            tokens(i)
        ),
        true,
    )
}

/// The client's view of one request.
struct Truth {
    i: u64,
    stream: bool,
    ex: Exchange,
}

/// What the clients saw: each request's final exchange, and the ids of attempts a server
/// closed the connection on without answering.
struct Seen {
    truth: BTreeMap<String, Truth>,
    unanswered: std::collections::BTreeSet<String>,
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Drives `n` requests over `c` keep-alive connections at once. A server may close a keep-alive
/// connection without answering the request it read next (llama.cpp's does after every
/// streamed response): as HTTP clients do, the request is sent again on a new connection,
/// under a new id (`<id>.retryN`), and the unanswered attempt is remembered.
fn drive(port: u16, shape: &Shape, name: &str, n: u64, c: u64) -> Seen {
    let seen = Mutex::new(Seen {
        truth: BTreeMap::new(),
        unanswered: std::collections::BTreeSet::new(),
    });
    std::thread::scope(|s| {
        for k in 0..c {
            let seen = &seen;
            s.spawn(move || {
                let mut client = Client::connect(port).expect("connect");
                let mine: Vec<u64> = (k..n).step_by(c as usize).collect();
                let per_write = if k % 3 == 2 { shape.pipeline } else { 1 };
                for batch in mine.chunks(per_write.max(1) as usize) {
                    for attempt in 0.. {
                        let reqs: Vec<(u64, String, bool, String)> = batch
                            .iter()
                            .map(|&i| {
                                let (body, stream) = (shape.body)(i);
                                let rid = match attempt {
                                    0 => format!("{name}-{i}"),
                                    a => format!("{name}-{i}.retry{a}"),
                                };
                                (i, body, stream, rid)
                            })
                            .collect();
                        let headers: Vec<[(&str, &str); 1]> = reqs
                            .iter()
                            .map(|(_, _, _, rid)| [("X-Request-Id", rid.as_str())])
                            .collect();
                        let posts: Vec<Post<'_>> = reqs
                            .iter()
                            .zip(&headers)
                            .map(|((_, body, _, _), h)| (shape.path, body.as_str(), h.as_slice()))
                            .collect();
                        match client.pipeline(&posts) {
                            Ok(exchanges) => {
                                let mut r = seen.lock().expect("results");
                                for ((i, _, stream, rid), ex) in reqs.into_iter().zip(exchanges) {
                                    assert_eq!(ex.status, 200, "{rid}");
                                    r.truth.insert(rid, Truth { i, stream, ex });
                                }
                                break;
                            }
                            Err(e) if is_closed(&e) && attempt < 3 && batch.len() == 1 => {
                                let mut r = seen.lock().expect("results");
                                r.unanswered.extend(reqs.into_iter().map(|q| q.3));
                                client = Client::connect(port).expect("reconnect");
                            }
                            Err(e) => panic!("{name}: {e}"),
                        }
                    }
                }
            });
        }
    });
    seen.into_inner().expect("results")
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Events the client saw: SSE `data:` events but `[DONE]`, or NDJSON lines.
fn events(t: &Truth, ndjson: bool) -> u64 {
    if !t.stream {
        return 0;
    }
    if ndjson {
        t.ex.body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64
    } else {
        t.ex.events
    }
}

/// The completion tokens the client was told (the last `"completion_tokens":N` in the body),
/// else the count asked for (the NDJSON front reports none; its engine produces exactly that).
fn completion_tokens(t: &Truth) -> u64 {
    const KEY: &[u8] = b"\"completion_tokens\":";
    let body = &t.ex.body;
    let told = (0..body.len().saturating_sub(KEY.len()))
        .rev()
        .find(|&at| body[at..].starts_with(KEY))
        .and_then(|at| {
            let digits: String = body[at + KEY.len()..]
                .iter()
                .skip_while(|b| **b == b' ')
                .take_while(|b| b.is_ascii_digit())
                .map(|&b| char::from(b))
                .collect();
            digits.parse().ok()
        });
    told.unwrap_or_else(|| tokens(t.i))
}

/// uvicorn from `setup`'s Python environment: `None` (a loud skip) where it is missing, which
/// fails under `CI=true`.
fn uvicorn() -> Option<Command> {
    if !Path::new(PYENV).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{PYENV} missing: `cargo xtask setup` installs uvicorn there"
        );
        eprintln!("SKIPPED uvicorn: {PYENV} missing (run `cargo xtask setup`)");
        return None;
    }
    let mut server = Command::new(PYENV);
    server.arg(format!("{SERVERS}/openai_uvicorn.py"));
    Some(server)
}

/// `server --tls CERT KEY` with a self-signed certificate, checked through the TLS tunnel.
fn check_https(name: &str, mut server: Command, shape: Shape) {
    let certs = TempDir::new(&format!("thirdparty-{name}-cert"));
    let (cert, key) = self_signed_cert(certs.path());
    server.arg("--tls").arg(&cert).arg(&key);
    check(name, &mut server, &Shape { tls: true, ..shape });
}

fn check(name: &str, server: &mut Command, shape: &Shape) {
    // One server at a time: they share two cores with the daemon.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if !privileged_or_skip(name) {
        return;
    }
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (n, c) = scale();
    let dir = TempDir::new(name);
    let (mut child, port) = listening(server);
    let (requests_out, records_out) = (
        dir.path().join("requests.jsonl"),
        dir.path().join("records.jsonl"),
    );
    let args = [
        "--port",
        &port.to_string(),
        "--requests-out",
        requests_out.to_str().expect("utf8"),
        "--records-out",
        records_out.to_str().expect("utf8"),
    ];
    let tracer = Tracer::start_with(TRACER, dir.path(), &args, false);
    let mut tunnel = shape.tls.then(|| {
        listening(
            Command::new("python3")
                .arg(format!("{SERVERS}/tls_tunnel.py"))
                .arg(port.to_string()),
        )
    });
    let start = Instant::now();
    let Seen { truth, unanswered } =
        drive(tunnel.as_ref().map_or(port, |t| t.1), shape, name, n, c);
    let took = start.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let log = tracer.log_text();
    let _ = tracer.stop();
    let _ = child.kill();
    let _ = child.wait();
    if let Some((t, _)) = &mut tunnel {
        let _ = t.kill();
        let _ = t.wait();
    }
    let requests: Vec<Value> = lines(&requests_out)
        .into_iter()
        .filter(|r| r["tgid"] == child.id() && r["client"] == false)
        .collect();
    let records = lines(&records_out);
    let mut by_id: BTreeMap<&str, (&Value, Option<&Value>)> = BTreeMap::new();
    for r in &requests {
        let id = r["request_id"].as_str().unwrap_or("");
        if let Some((first, _)) = by_id.insert(id, (r, None)) {
            panic!("{name}: {id} recorded twice:\n{first}\n{r}");
        }
    }
    for rec in &records {
        if let Some(e) = rec["external_id"].as_str().and_then(|id| by_id.get_mut(id)) {
            e.1 = Some(rec);
        }
    }
    let mut wrong = Vec::new();
    let (mut bytes, mut evs, mut toks, mut truncated) = (0, 0, 0, 0);
    for (rid, t) in &truth {
        let Some((r, rec)) = by_id.get(rid.as_str()) else {
            wrong.push(format!("{rid}: not recorded"));
            continue;
        };
        if r["outcome"] != "complete" {
            truncated += 1;
            wrong.push(format!("{rid}: {}", r["outcome"]));
        }
        if r["request_bytes"] == t.ex.request_bytes && r["response_bytes"] == t.ex.response_bytes {
            bytes += 1;
        } else {
            wrong.push(format!("{rid}: bytes {r}"));
        }
        if r["events"] == events(t, shape.ndjson) {
            evs += 1;
        } else {
            wrong.push(format!(
                "{rid}: events {} vs {}",
                r["events"],
                events(t, shape.ndjson)
            ));
        }
        if rec.is_some_and(|x| x["completion_tokens"] == completion_tokens(t)) {
            toks += 1;
        } else {
            wrong.push(format!("{rid}: tokens {rec:?}"));
        }
    }
    // An attempt the server read and closed the connection on: recorded, never answered.
    let mut closed = 0;
    for id in &unanswered {
        if let Some((r, _)) = by_id.get(id.as_str()) {
            closed += 1;
            if r["response_bytes"] != 0 || r["outcome"] == "complete" {
                wrong.push(format!("{id}: the client got no answer: {r}"));
            }
        }
    }
    let strays = requests.len().saturating_sub(truth.len() + closed);
    println!(
        "| {name} | {n} at {c} in {:.1} s | {} | {bytes} | {evs} | {toks} | {truncated} | {strays} | {} retried, {closed} of them recorded unanswered |",
        took.as_secs_f64(),
        by_id.len().min(truth.len()),
        unanswered.len(),
    );
    assert!(
        wrong.is_empty() && strays == 0,
        "{name}: {} of {n} wrong, {strays} records the client did not make: {:#?}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(20)],
        log.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn node_http_sse_keepalive_and_pipelined() {
    let shape = Shape {
        pipeline: 3,
        ..OPENAI
    };
    let mut node = Command::new("node");
    node.arg(format!("{SERVERS}/openai_node.js"));
    check("node", &mut node, &shape);
}

#[test]
fn uvicorn_vllm_shaped_sse() {
    if let Some(mut server) = uvicorn() {
        check("uvicorn", &mut server, &OPENAI);
    }
}

#[test]
fn ollama_shaped_ndjson_front_and_its_engine() {
    let shape = OLLAMA;
    let mut front = Command::new("python3");
    front.arg(format!("{SERVERS}/ndjson_proxy.py"));
    check("ollama-shaped", &mut front, &shape);
}

/// The same front calling its engine over HTTP on a Unix socket.
#[test]
fn ollama_shaped_front_and_its_engine_on_a_unix_socket() {
    let shape = OLLAMA;
    let mut front = Command::new("python3");
    front
        .arg(format!("{SERVERS}/ndjson_proxy.py"))
        .arg("--engine-unix");
    check("ollama-shaped-unix", &mut front, &shape);
}

/// uvicorn serving HTTPS: asyncio's SSL, OpenSSL fed through a memory BIO.
#[test]
fn uvicorn_https_through_a_memory_bio() {
    if let Some(server) = uvicorn() {
        check_https("uvicorn-https", server, OPENAI);
    }
}

/// Node serving HTTPS with the OpenSSL linked into its binary, through a memory BIO.
#[test]
fn node_https() {
    let mut server = Command::new("node");
    server.arg(format!("{SERVERS}/openai_node.js"));
    check_https(
        "node-https",
        server,
        Shape {
            pipeline: 3,
            ..OPENAI
        },
    );
}

#[test]
fn https_through_openssl() {
    let mut server = Command::new("python3");
    server.arg(format!("{SERVERS}/openai_stdlib.py"));
    check_https("https", server, OPENAI);
}

/// llama.cpp's own C++ server (continuous batching over 4 slots, real CPU inference on a tiny
/// random-weight Llama model): built by `cargo xtask thirdparty`.
#[test]
#[ignore = "needs llama-server and a model: `cargo xtask thirdparty` builds and runs them"]
fn llama_cpp_server() {
    let (Ok(bin), Ok(model)) = (
        std::env::var("TRACER_LLAMA_SERVER"),
        std::env::var("TRACER_LLAMA_MODEL"),
    ) else {
        panic!("TRACER_LLAMA_SERVER and TRACER_LLAMA_MODEL must name the server and model");
    };
    let shape = Shape {
        body: llama,
        ..OPENAI
    };
    let mut server = Command::new("python3");
    server
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/llama/serve.py"))
        .arg(bin)
        .arg(model);
    check("llama-server", &mut server, &shape);
}
