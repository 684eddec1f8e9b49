//! The API process's one writer loop: like a Python server's event loop (vLLM, `SGLang`), it
//! receives the engine's per-step message and writes that step's chunks one request at a time,
//! in the message's order, spending `--write-cost-us` of CPU on each request (detokenising,
//! building the JSON, the event loop's own overhead) before its write. Non-streamed responses
//! are written by the same loop when their request finishes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tracer_emugpu::monotonic_us;

use crate::http;
use crate::proto::{FromEngine, ToEngine, Usage};

/// Most steps kept for `--write-log`.
const MAX_LOGGED_STEPS: usize = 1 << 20;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// State shared by the connection threads and the writer loop.
pub struct Api {
    pub model: String,
    pub engine_pid: u32,
    pub to_engine: Mutex<UnixStream>,
    /// Requests in flight by number. Locked by the writer loop for a whole step message.
    pub routes: Mutex<HashMap<u64, Route>>,
    pub next_rid: AtomicU64,
    pub engine_alive: AtomicBool,
    pub inflight: AtomicUsize,
    pub connections: AtomicUsize,
    pub served: AtomicU64,
    pub last_activity_us: AtomicU64,
    /// CPU spent per request per step before its write, µs.
    pub write_cost_us: u64,
}

impl Api {
    pub fn send(&self, msg: &ToEngine) -> Result<()> {
        let mut line = serde_json::to_string(msg)?;
        line.push('\n');
        let mut s = self
            .to_engine
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.write_all(line.as_bytes()).context("write to engine")
    }

    pub fn touch(&self) {
        self.last_activity_us
            .store(monotonic_us(), Ordering::Relaxed);
    }
}

/// A request in flight: what its response needs, and the connection's (only) socket to write
/// it on. The connection thread waits on `finished` before it reads the next request.
pub struct Route {
    pub w: Arc<TcpStream>,
    pub id: String,
    pub created: u64,
    pub kind: Kind,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: u32,
    pub request_id: Option<String>,
    pub keep_alive: bool,
    /// Tokens so far.
    pub n: u32,
    /// Text so far (non-streamed).
    pub text: String,
    /// `true`: the response is complete and the connection can carry another; `false`: close it.
    pub finished: mpsc::Sender<bool>,
}

/// What one response needs to know about its request.
pub struct Ctx<'a> {
    pub request_id: Option<&'a str>,
    pub keep_alive: bool,
}

impl Ctx<'_> {
    pub fn common_headers(&self) -> String {
        let mut h = String::from("server: emuhost\r\n");
        if let Some(id) = self.request_id {
            let _ = write!(h, "x-request-id: {id}\r\n");
        }
        if !self.keep_alive {
            h.push_str("connection: close\r\n");
        }
        h
    }
}

pub fn respond_json(mut w: &TcpStream, ctx: &Ctx<'_>, status: u16, body: &Value) -> Result<()> {
    let body = body.to_string();
    let msg = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        http::reason(status),
        body.len(),
        ctx.common_headers()
    );
    w.write_all(msg.as_bytes()).context("write response")
}

pub fn error_body(status: u16, kind: &str, message: &str) -> Value {
    json!({
        "object": "error",
        "message": message,
        "type": kind,
        "param": null,
        "code": status,
    })
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Burn `us` µs of CPU, as an interpreter does (a sleep would leave the CPU idle).
fn spin_us(us: u64) {
    if us == 0 {
        return;
    }
    let end = monotonic_us() + us;
    while monotonic_us() < end {
        std::hint::spin_loop();
    }
}

impl Route {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            request_id: self.request_id.as_deref(),
            keep_alive: self.keep_alive,
        }
    }

    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    fn event(&self, ev: &Value) -> Result<()> {
        http::write_chunk(&mut &*self.w, format!("data: {ev}\n\n").as_bytes())
            .context("write event")
    }

    /// One streamed token.
    fn write_token(&mut self, model: &str, t: &str) -> Result<()> {
        self.n += 1;
        let finish = if self.n >= self.max_tokens {
            json!("length")
        } else {
            Value::Null
        };
        let choice = match self.kind {
            Kind::Chat => {
                let delta = if self.n == 1 {
                    json!({"role": "assistant", "content": t})
                } else {
                    json!({"content": t})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": finish})
            }
        };
        let ev = json!({
            "id": self.id, "object": self.chunk_object(), "created": self.created, "model": model,
            "choices": [choice],
        });
        self.event(&ev)
    }

    /// The end of a response: the usage chunk, `[DONE]` and the last chunk of a stream, or the
    /// whole body of a non-streamed one.
    fn write_done(&self, model: &str, usage: &Usage) -> Result<()> {
        if self.stream {
            if self.include_usage {
                let ev = json!({
                    "id": self.id, "object": self.chunk_object(), "created": self.created,
                    "model": model, "choices": [], "usage": usage_json(usage),
                });
                self.event(&ev).context("write usage")?;
            }
            let mut w = &*self.w;
            http::write_chunk(&mut w, b"data: [DONE]\n\n").context("write [DONE]")?;
            w.write_all(b"0\r\n\r\n").context("end stream")?;
            return Ok(());
        }
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "logprobs": null,
                    "finish_reason": "length",
                }),
            ),
            Kind::Completion => (
                "text_completion",
                json!({
                    "index": 0, "text": self.text, "logprobs": null, "finish_reason": "length",
                }),
            ),
        };
        let body = json!({
            "id": self.id, "object": object, "created": self.created, "model": model,
            "choices": [choice],
            "usage": usage_json(usage),
        });
        respond_json(&self.w, &self.ctx(), 200, &body)
    }

    /// The engine is gone: end the response with an error.
    fn write_engine_died(&self) -> bool {
        if self.stream {
            let ev = json!({"error": error_body(500, "InternalServerError", "engine died")});
            let mut w = &*self.w;
            let _ = http::write_chunk(&mut w, format!("data: {ev}\n\n").as_bytes());
            let _ = w.write_all(b"0\r\n\r\n");
            false
        } else {
            respond_json(
                &self.w,
                &self.ctx(),
                500,
                &error_body(500, "InternalServerError", "engine died"),
            )
            .is_ok()
        }
    }
}

/// When the writer loop handled one step message.
#[derive(Debug, Clone, Copy)]
struct StepLog {
    step: u64,
    recv_us: u64,
    first_write_us: Option<u64>,
    last_write_us: Option<u64>,
    writes: u32,
    requests: u32,
}

/// The writer loop: reads the engine's messages until it goes away, writes every response.
/// With `log`, one JSON line per step message is written there at the end.
pub fn dispatch(reader: BufReader<UnixStream>, api: &Api, log: Option<&PathBuf>) {
    let mut steps: Vec<StepLog> = Vec::new();
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let ev: FromEngine = match serde_json::from_str(&line) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("emuhost: bad engine message {line:?}: {e}");
                continue;
            }
        };
        let FromEngine::Step { step, tokens, done } = ev else {
            continue;
        };
        let entry = write_step(api, step, &tokens, &done);
        if log.is_some() && steps.len() < MAX_LOGGED_STEPS {
            steps.push(entry);
        }
    }
    api.engine_alive.store(false, Ordering::SeqCst);
    let gone: Vec<Route> = api
        .routes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .map(|(_, r)| r)
        .collect();
    for r in gone {
        let reusable = r.write_engine_died();
        let _ = r.finished.send(reusable);
    }
    if let Some(path) = log {
        write_log(path, &steps);
    }
}

fn write_log(path: &PathBuf, steps: &[StepLog]) {
    let mut out = String::new();
    for s in steps {
        let line = json!({
            "step": s.step,
            "recv_us": s.recv_us,
            "first_write_us": s.first_write_us,
            "last_write_us": s.last_write_us,
            "writes": s.writes,
            "requests": s.requests,
        });
        let _ = writeln!(out, "{line}");
    }
    if let Err(e) = std::fs::write(path, out) {
        eprintln!("emuhost: write log {}: {e}", path.display());
    }
}

/// Handle one step message: each request in order, its CPU cost, then its write(s).
fn write_step(api: &Api, step: u64, tokens: &[(u64, String)], done: &[(u64, Usage)]) -> StepLog {
    let mut log = StepLog {
        step,
        recv_us: monotonic_us(),
        first_write_us: None,
        last_write_us: None,
        writes: 0,
        requests: 0,
    };
    let mut finished: HashMap<u64, &Usage> = done.iter().map(|(rid, u)| (*rid, u)).collect();
    let mut routes = api.routes.lock().unwrap_or_else(PoisonError::into_inner);
    // Requests with a token, in order, then finished ones without a token this step.
    let order = tokens
        .iter()
        .map(|(rid, t)| (*rid, Some(t.as_str())))
        .chain(done.iter().map(|(rid, _)| (*rid, None)));
    for (rid, token) in order {
        let usage = if token.is_some() {
            finished.remove(&rid)
        } else {
            // Already handled with its token?
            let Some(u) = finished.remove(&rid) else {
                continue;
            };
            Some(u)
        };
        let Some(route) = routes.get_mut(&rid) else {
            continue;
        };
        log.requests += 1;
        spin_us(api.write_cost_us);
        let mut wrote = false;
        let mut result = Ok(());
        if let Some(t) = token {
            if route.stream {
                result = route.write_token(&api.model, t);
                wrote = true;
            } else {
                route.n += 1;
                route.text.push_str(t);
            }
        }
        let complete = usage.is_some();
        if let (Some(u), Ok(())) = (usage, &result) {
            result = route.write_done(&api.model, u);
            wrote = true;
        }
        if wrote {
            let now = monotonic_us();
            log.first_write_us.get_or_insert(now);
            log.last_write_us = Some(now);
            log.writes += 1;
        }
        if result.is_err() {
            // The client went away: stop generating, close the connection.
            if let Some(r) = routes.remove(&rid) {
                let _ = r.finished.send(false);
            }
            let _ = api.send(&ToEngine::Cancel { rid });
        } else if complete && let Some(r) = routes.remove(&rid) {
            let _ = r.finished.send(true);
        }
    }
    log
}
