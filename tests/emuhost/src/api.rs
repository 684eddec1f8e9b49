//! The API process: OpenAI-compatible HTTP/1.1 in front of the engine child.
//!
//! It never opens a GPU device node or the sensor state: like vLLM's API server it only
//! speaks HTTP and forwards work to the engine process over a Unix stream socket
//! (a `socketpair` whose other end the engine inherits). One thread per connection reads
//! requests and submits them; the engine's per-step messages are written out by one writer
//! loop ([`crate::writer`]), one request at a time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tracer_emugpu::{STATE_ENV, monotonic_us};

use crate::engine::EngineOpts;
use crate::http::{self, Head};
use crate::proto::{FromEngine, ToEngine};
use crate::signals;
pub use crate::writer::Kind;
use crate::writer::{self, Api, Ctx, Route, error_body, respond_json};

/// Largest `max_tokens` honoured.
pub const MAX_TOKENS_CAP: u32 = 4096;
/// `max_tokens` when the request has none.
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// A client that stops reading for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `emuhost serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOpts {
    /// TCP port to listen on (0: pick a free one; the chosen port is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Model name reported in responses.
    #[arg(long, default_value = "emu/llama-3.1-8b-instruct")]
    pub model: String,
    /// Exit (cleanly, summary written) once no request or connection has been active for
    /// this many seconds after at least one request was served. Bare flag: 2 s.
    #[arg(long, num_args = 0..=1, default_missing_value = "2", value_name = "SECS")]
    pub idle_exit: Option<f64>,
    /// CPU the writer loop spends per request per step before writing its chunk, in µs (busy,
    /// like a Python server's event loop; 0: none).
    #[arg(long, default_value_t = 40)]
    pub write_cost_us: u64,
    /// Write one JSON line per engine step here when the server stops: when the writer loop
    /// got the step's message and wrote its first and last chunk.
    #[arg(long)]
    pub write_log: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineOpts,
}

/// A `socketpair`: our end (close-on-exec) and the raw fd of the end the child inherits.
fn socketpair() -> Result<(UnixStream, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("socketpair");
    }
    // SAFETY: socketpair just returned these two fds, owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child's end must survive exec.
    // SAFETY: fcntl on an fd we own.
    let rc = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("fcntl(F_SETFD)");
    }
    Ok((UnixStream::from(ours), theirs))
}

/// Run `emuhost serve` until SIGTERM/SIGINT (or `--idle-exit`), then stop the engine.
pub fn serve(opts: &ServeOpts) -> Result<()> {
    signals::install();
    let (sock, child_end) = socketpair()?;
    let exe = std::env::current_exe().context("current_exe")?;
    let mut child = Command::new(exe)
        .arg("engine")
        .arg("--fd")
        .arg(child_end.as_raw_fd().to_string())
        .args(opts.engine.to_args())
        .env(STATE_ENV, &opts.engine.state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawn engine process")?;
    drop(child_end);

    // Wait for the engine to come up.
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(sock.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line).context("wait for the engine")?;
    let Ok(FromEngine::Ready { pid: engine_pid }) = serde_json::from_str(line.trim()) else {
        // Let it finish saying why before it is killed.
        let deadline = monotonic_us() + 1_000_000;
        while matches!(child.try_wait(), Ok(None)) && monotonic_us() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("engine did not start (said {line:?})");
    };
    reader.get_ref().set_read_timeout(None)?;

    let listener = TcpListener::bind((opts.host.as_str(), opts.port))
        .with_context(|| format!("bind {}:{}", opts.host, opts.port))?;
    let port = listener.local_addr()?.port();
    let api = Arc::new(Api {
        model: opts.model.clone(),
        engine_pid,
        to_engine: Mutex::new(sock),
        routes: Mutex::new(HashMap::new()),
        next_rid: AtomicU64::new(1),
        engine_alive: AtomicBool::new(true),
        inflight: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        last_activity_us: AtomicU64::new(monotonic_us()),
        write_cost_us: opts.write_cost_us,
    });
    let dispatch_api = Arc::clone(&api);
    let write_log = opts.write_log.clone();
    let dispatcher = std::thread::Builder::new()
        .name("api-dispatch".to_owned())
        .spawn(move || writer::dispatch(reader, &dispatch_api, write_log.as_ref()))?;

    println!("listening {port}");
    std::io::stdout().flush()?;

    let result = accept_loop(&listener, &api, opts.idle_exit);
    drop(listener);
    stop_engine(&api, &mut child);
    // The engine's socket is closed: the writer loop ends (and writes its log).
    let _ = dispatcher.join();
    result
}

fn accept_loop(listener: &TcpListener, api: &Arc<Api>, idle_exit: Option<f64>) -> Result<()> {
    loop {
        if signals::stop_requested() {
            return Ok(());
        }
        if !api.engine_alive.load(Ordering::SeqCst) {
            bail!("engine process exited");
        }
        if let Some(secs) = idle_exit {
            let idle_us =
                monotonic_us().saturating_sub(api.last_activity_us.load(Ordering::Relaxed));
            if api.served.load(Ordering::Relaxed) > 0
                && api.inflight.load(Ordering::Relaxed) == 0
                && api.connections.load(Ordering::Relaxed) == 0
                && idle_us as f64 > secs * 1e6
            {
                return Ok(());
            }
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let api = Arc::clone(api);
                api.connections.fetch_add(1, Ordering::SeqCst);
                api.touch();
                let spawned = std::thread::Builder::new()
                    .name("api-conn".to_owned())
                    .spawn(move || {
                        handle_conn(&api, stream);
                        api.connections.fetch_sub(1, Ordering::SeqCst);
                        api.touch();
                    });
                if let Err(e) = spawned {
                    eprintln!("emuhost: spawn connection thread: {e}");
                }
            }
            Err(e) => eprintln!("emuhost: accept: {e}"),
        }
    }
}

fn stop_engine(api: &Api, child: &mut Child) {
    let _ = api.send(&ToEngine::Shutdown);
    let deadline = monotonic_us() + 15_000_000;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    eprintln!("emuhost: engine exited with {status}");
                }
                return;
            }
            Ok(None) if monotonic_us() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                eprintln!("emuhost: engine did not stop; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

fn handle_conn(api: &Api, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    // Shared with the writer loop: responses go out on the connection's own fd.
    let w = Arc::new(stream);
    loop {
        let head = match http::read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                let ctx = Ctx {
                    request_id: None,
                    keep_alive: false,
                };
                let _ = respond_json(
                    &w,
                    &ctx,
                    400,
                    &error_body(400, "BadRequestError", &format!("{e:#}")),
                );
                return;
            }
        };
        api.touch();
        let mut parts = head.start.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let version = parts.next().unwrap_or("HTTP/1.0").to_owned();
        let keep_alive = if version == "HTTP/1.1" {
            !head.has_token("connection", "close")
        } else {
            head.has_token("connection", "keep-alive")
        };
        let ctx = Ctx {
            request_id: head.header("x-request-id"),
            keep_alive,
        };
        if head.has_token("expect", "100-continue")
            && (&*w).write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let body = match http::read_body(&mut reader, &head, false) {
            Ok(b) => b,
            Err(e) => {
                let ctx = Ctx {
                    keep_alive: false,
                    ..ctx
                };
                let _ = respond_json(
                    &w,
                    &ctx,
                    400,
                    &error_body(400, "BadRequestError", &format!("{e:#}")),
                );
                return;
            }
        };
        let path = target.split('?').next().unwrap_or("");
        let result = route(api, &w, &ctx, &method, path, &head, &body);
        api.touch();
        if result.is_err() || !keep_alive {
            return;
        }
    }
}

fn route(
    api: &Api,
    w: &Arc<TcpStream>,
    ctx: &Ctx<'_>,
    method: &str,
    path: &str,
    _head: &Head,
    body: &[u8],
) -> Result<()> {
    let kind = match (method, path) {
        ("GET", "/health") => {
            let alive = api.engine_alive.load(Ordering::SeqCst);
            let status = if alive { 200 } else { 503 };
            return respond_json(
                w,
                ctx,
                status,
                &json!({
                    "status": if alive { "ok" } else { "engine dead" },
                    "model": api.model,
                    "engine_pid": api.engine_pid,
                    "api_pid": std::process::id(),
                }),
            );
        }
        ("GET", "/v1/models") => {
            return respond_json(
                w,
                ctx,
                200,
                &json!({
                    "object": "list",
                    "data": [{"id": api.model, "object": "model", "owned_by": "emuhost",
                              "max_model_len": 32768}],
                }),
            );
        }
        ("POST", "/v1/completions") => Kind::Completion,
        ("POST", "/v1/chat/completions") => Kind::Chat,
        (_, "/health" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
            return respond_json(
                w,
                ctx,
                405,
                &error_body(405, "MethodNotAllowed", "method not allowed"),
            );
        }
        _ => {
            return respond_json(
                w,
                ctx,
                404,
                &error_body(
                    404,
                    "NotFoundError",
                    &format!("no route for {method} {path}"),
                ),
            );
        }
    };
    let req = match parse_request(kind, body) {
        Ok(r) => r,
        Err(msg) => return respond_json(w, ctx, 400, &error_body(400, "BadRequestError", &msg)),
    };
    completion(api, w, ctx, kind, &req)
}

/// The parts of a completion request the emulation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Prompt text (chat: message contents concatenated).
    pub prompt: String,
    /// Tokens to generate.
    pub max_tokens: u32,
    /// Stream with server-sent events.
    pub stream: bool,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        // Content parts: [{"type": "text", "text": "..."}], or a list of prompts / token ids.
        Value::Array(items) => {
            let mut out = String::new();
            for it in items {
                match it {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => {
                        // A token id stands for one token: four characters.
                        let _ = n;
                        out.push_str("<t> ");
                    }
                    Value::Object(o) => {
                        if let Some(Value::String(s)) = o.get("text") {
                            out.push_str(s);
                        }
                    }
                    Value::Array(_) => out.push_str(&text_of(it)?),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Parse a completion or chat request body.
pub fn parse_request(kind: Kind, body: &[u8]) -> Result<Parsed, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let obj = v.as_object().ok_or("request body must be a JSON object")?;
    let prompt = match kind {
        Kind::Completion => text_of(obj.get("prompt").ok_or("missing field `prompt`")?)
            .ok_or("`prompt` must be a string or an array")?,
        Kind::Chat => {
            let msgs = obj
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("missing or invalid field `messages`")?;
            let mut s = String::new();
            for m in msgs {
                let c = m.get("content").unwrap_or(&Value::Null);
                s.push_str(&text_of(c).ok_or("invalid message content")?);
            }
            s
        }
    };
    let max_tokens = match obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => DEFAULT_MAX_TOKENS,
        Some(n) => {
            let n = n
                .as_u64()
                .ok_or("`max_tokens` must be a non-negative integer")?;
            n.clamp(1, u64::from(MAX_TOKENS_CAP)) as u32
        }
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Parsed {
        prompt,
        max_tokens,
        stream,
        include_usage,
    })
}

/// Decrements the in-flight count (and forgets the route) when a request handler ends.
struct Inflight<'a> {
    api: &'a Api,
    rid: u64,
    done: bool,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if !self.done {
            let gone = self
                .api
                .routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.rid)
                .is_some();
            if gone {
                let _ = self.api.send(&ToEngine::Cancel { rid: self.rid });
            }
        }
        self.api.inflight.fetch_sub(1, Ordering::SeqCst);
        self.api.served.fetch_add(1, Ordering::SeqCst);
    }
}

fn completion(
    api: &Api,
    w: &Arc<TcpStream>,
    ctx: &Ctx<'_>,
    kind: Kind,
    req: &Parsed,
) -> Result<()> {
    let rid = api.next_rid.fetch_add(1, Ordering::SeqCst);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (tx, rx) = mpsc::channel();
    api.inflight.fetch_add(1, Ordering::SeqCst);
    let mut guard = Inflight {
        api,
        rid,
        done: false,
    };
    let submit = ToEngine::Submit {
        rid,
        request_id: ctx.request_id.map(str::to_owned),
        prompt: req.prompt.clone(),
        max_tokens: req.max_tokens,
        arrive_us: monotonic_us(),
    };
    {
        // The writer loop cannot see the request before its head is out.
        let mut routes = api.routes.lock().unwrap_or_else(PoisonError::into_inner);
        // The writer loop marks the engine dead before it ends the routes it holds.
        let sent = if api.engine_alive.load(Ordering::SeqCst) {
            api.send(&submit)
        } else {
            Err(anyhow::anyhow!("engine process exited"))
        };
        if let Err(e) = sent {
            guard.done = true;
            drop(routes);
            return respond_json(
                w,
                ctx,
                503,
                &error_body(503, "ServiceUnavailable", &format!("{e:#}")),
            );
        }
        if req.stream {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n{}\r\n",
                ctx.common_headers()
            );
            if let Err(e) = (&**w).write_all(head.as_bytes()) {
                guard.done = true;
                drop(routes);
                let _ = api.send(&ToEngine::Cancel { rid });
                return Err(e).context("write head");
            }
        }
        routes.insert(
            rid,
            Route {
                w: Arc::clone(w),
                id: format!("cmpl-{rid}"),
                created,
                kind,
                stream: req.stream,
                include_usage: req.include_usage,
                max_tokens: req.max_tokens,
                request_id: ctx.request_id.map(str::to_owned),
                keep_alive: ctx.keep_alive,
                n: 0,
                text: String::new(),
                finished: tx,
            },
        );
    }
    // The writer loop answers once the response is complete (or the client or engine gone).
    let reusable = rx.recv().unwrap_or(false);
    guard.done = true;
    if !reusable {
        bail!("response not completed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_completion_and_chat_bodies() {
        let p = parse_request(
            Kind::Completion,
            br#"{"prompt": "hello", "max_tokens": 100000, "stream": true,
                 "stream_options": {"include_usage": true}}"#,
        )
        .expect("parse");
        assert_eq!(p.prompt, "hello");
        assert_eq!(p.max_tokens, MAX_TOKENS_CAP);
        assert!(p.stream && p.include_usage);

        let p = parse_request(
            Kind::Chat,
            br#"{"messages": [{"role": "system", "content": "ab"},
                              {"role": "user", "content": [{"type": "text", "text": "cd"}]}]}"#,
        )
        .expect("parse");
        assert_eq!(p.prompt, "abcd");
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(!p.stream && !p.include_usage);

        assert!(parse_request(Kind::Chat, b"{").is_err());
        assert!(parse_request(Kind::Chat, br#"{"prompt": "x"}"#).is_err());
        assert!(parse_request(Kind::Completion, br#"{"prompt": "x", "max_tokens": -1}"#).is_err());
        assert!(parse_request(Kind::Completion, b"[1]").is_err());
    }
}
