//! `emuload`: closed-loop clients on keep-alive connections with a chat-like request mix.
//!
//! Each of `--concurrency` clients sends one request, reads the whole response, and sends the
//! next, until `--seconds` have passed (requests in flight then are finished, not cut).
//! The mix: mostly chat, prompt lengths lognormal-ish between 50 and 4000 characters,
//! `max_tokens` between 16 and `--max-tokens-max` skewed short, a fraction of prompts starting
//! with one of a few long shared system prompts (so prefix caching matters), and
//! `--stream-fraction` streamed (half of those asking for a usage chunk).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use tracer_emugpu::monotonic_us;

use crate::client::{Conn, Response};

/// Options of `emuload`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "emuload",
    version,
    about = "Closed-loop load for an OpenAI-compatible server"
)]
pub struct LoadOpts {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port.
    #[arg(long)]
    pub port: u16,
    /// How long to keep starting requests, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Concurrent clients (each with its own keep-alive connection).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fraction of requests that stream.
    #[arg(long, default_value_t = 0.7)]
    pub stream_fraction: f64,
    /// Fraction of requests that start with a shared system prompt.
    #[arg(long, default_value_t = 0.3)]
    pub shared_prefix_fraction: f64,
    /// Largest `max_tokens` asked for.
    #[arg(long, default_value_t = 512)]
    pub max_tokens_max: u32,
    /// Model name sent in requests.
    #[arg(long, default_value = "emu/llama-3.1-8b-instruct")]
    pub model: String,
    /// Write one JSON line per request here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Exit with status 1 if any request failed.
    #[arg(long)]
    pub fail_on_error: bool,
}

/// What the client saw of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// `load-<n>`, sent as `X-Request-Id`.
    pub request_id: String,
    /// Which client sent it.
    pub client: usize,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub endpoint: &'static str,
    /// Streamed.
    pub stream: bool,
    /// Asked for a usage chunk.
    pub include_usage: bool,
    /// Prompt length in characters.
    pub prompt_chars: usize,
    /// Shared system prompt used (index), if any.
    pub shared_prefix: Option<usize>,
    /// `max_tokens` asked for.
    pub max_tokens: u32,
    /// HTTP status (0: no response).
    pub status: u16,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Request written, µs of `CLOCK_MONOTONIC`.
    pub start_us: u64,
    /// Response head received.
    pub first_byte_us: Option<u64>,
    /// First content event received (streams).
    pub first_token_us: Option<u64>,
    /// Response complete.
    pub end_us: u64,
    /// Server-sent events received (`[DONE]` included).
    pub events: usize,
    /// Events carrying generated text.
    pub content_events: usize,
    /// The usage object returned, if any.
    pub usage: Option<Value>,
    /// Whether the server echoed `X-Request-Id`.
    pub id_echoed: bool,
}

/// Totals over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Requests completed (successfully or not).
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Wall time from the first request to the last response, seconds.
    pub wall_s: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// Median time to first token of streamed requests, ms.
    pub ttft_p50_ms: f64,
    /// Prompt tokens reported.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
    /// Completion tokens reported.
    pub completion_tokens: u64,
    /// Completion tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Every request, in order of completion per client.
    #[serde(skip)]
    pub records: Vec<Record>,
}

impl Summary {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let rows = [
            ("requests", format!("{}", self.requests)),
            ("errors", format!("{}", self.errors)),
            ("wall_s", format!("{:.2}", self.wall_s)),
            ("latency_p50_ms", format!("{:.1}", self.p50_ms)),
            ("latency_p95_ms", format!("{:.1}", self.p95_ms)),
            ("ttft_p50_ms", format!("{:.1}", self.ttft_p50_ms)),
            ("prompt_tokens", format!("{}", self.prompt_tokens)),
            ("cached_tokens", format!("{}", self.cached_tokens)),
            ("completion_tokens", format!("{}", self.completion_tokens)),
            ("tokens_per_s", format!("{:.1}", self.tokens_per_s)),
        ];
        let mut s = String::new();
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<18} {v:>12}");
        }
        s
    }
}

/// splitmix64: small, seedable, good enough for a request mix.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-12);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "energy",
    "request",
    "token",
    "batch",
    "kernel",
    "prompt",
    "cache",
    "power",
    "answer",
    "explain",
    "summarise",
    "why",
    "how",
    "latency",
    "python",
    "rust",
    "function",
    "data",
    "table",
    "compare",
    "write",
    "list",
    "three",
    "reasons",
    "please",
    "short",
    "detail",
    "example",
    "history",
    "science",
    "graph",
    "memory",
    "decode",
    "prefill",
    "schedule",
];

/// `chars` characters of word salad from `rng`.
pub fn text(rng: &mut Rng, chars: usize) -> String {
    let mut s = String::with_capacity(chars + 16);
    while s.len() < chars {
        s.push_str(WORDS[rng.below(WORDS.len())]);
        s.push(' ');
    }
    s.truncate(chars);
    s
}

/// The shared system prompts (same for every run and client).
pub fn system_prompts() -> Vec<String> {
    [1200usize, 2000, 3000]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut rng = Rng::new(0xC0FF_EE00 + i as u64);
            format!("You are assistant #{i}. {}", text(&mut rng, len))
        })
        .collect()
}

/// One generated request.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Endpoint path.
    pub endpoint: &'static str,
    /// JSON body.
    pub body: Value,
    /// Streamed.
    pub stream: bool,
    /// Usage chunk asked for.
    pub include_usage: bool,
    /// Prompt characters.
    pub prompt_chars: usize,
    /// Shared prefix index.
    pub shared_prefix: Option<usize>,
    /// `max_tokens`.
    pub max_tokens: u32,
}

fn lognormal_chars(rng: &mut Rng, median: f64, sigma: f64, lo: usize, hi: usize) -> usize {
    let x = (median.ln() + sigma * rng.normal()).exp();
    (x as usize).clamp(lo, hi)
}

/// Draw one request of the mix.
pub fn plan(rng: &mut Rng, opts: &LoadOpts, systems: &[String]) -> Planned {
    let shared = (rng.f64() < opts.shared_prefix_fraction).then(|| rng.below(systems.len()));
    let user_chars = match shared {
        Some(i) => lognormal_chars(rng, 200.0, 0.8, 50, 4000 - systems[i].len()),
        None => lognormal_chars(rng, 500.0, 1.0, 50, 4000),
    };
    let user = text(rng, user_chars);
    let hi = opts.max_tokens_max.max(16);
    let max_tokens = 16 + ((f64::from(hi - 16)) * rng.f64().powi(3)).round() as u32;
    let stream = rng.f64() < opts.stream_fraction;
    let include_usage = stream && rng.f64() < 0.5;
    let chat = shared.is_some() || rng.f64() < 0.8;
    let prompt_chars = user.chars().count() + shared.map_or(0, |i| systems[i].chars().count());
    let mut body = if chat {
        let mut messages = Vec::new();
        if let Some(i) = shared {
            messages.push(json!({"role": "system", "content": systems[i]}));
        }
        messages.push(json!({"role": "user", "content": user}));
        json!({"model": opts.model, "messages": messages, "max_tokens": max_tokens, "stream": stream})
    } else {
        json!({"model": opts.model, "prompt": user, "max_tokens": max_tokens, "stream": stream})
    };
    if stream {
        body["stream_options"] = json!({"include_usage": include_usage});
    }
    Planned {
        endpoint: if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        body,
        stream,
        include_usage,
        prompt_chars,
        shared_prefix: shared,
        max_tokens,
    }
}

fn content_of(ev: &Value) -> Option<&str> {
    let c = ev.get("choices")?.get(0)?;
    c.get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| c.get("text"))
        .and_then(Value::as_str)
}

/// Check a response against what was asked; fill in the record.
fn judge(p: &Planned, resp: &Response, rec: &mut Record) {
    rec.status = resp.status;
    rec.first_byte_us = Some(resp.first_byte_us);
    rec.end_us = resp.end_us;
    rec.events = resp.events.len();
    rec.id_echoed = resp.head.header("x-request-id") == Some(rec.request_id.as_str());
    let mut problems = Vec::new();
    if resp.status != 200 {
        problems.push(format!("status {}", resp.status));
    }
    if p.stream {
        let mut content = 0;
        for ev in &resp.events {
            if ev.data == "[DONE]" {
                continue;
            }
            match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) => {
                    if content_of(&v).is_some_and(|s| !s.is_empty()) {
                        content += 1;
                        rec.first_token_us.get_or_insert(ev.at_us);
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        rec.usage = Some(u.clone());
                    }
                }
                Err(e) => problems.push(format!("bad event: {e}")),
            }
        }
        rec.content_events = content;
        if resp.events.last().map(|e| e.data.as_str()) != Some("[DONE]") {
            problems.push("no [DONE]".to_owned());
        }
        if content != p.max_tokens as usize {
            problems.push(format!("{content} content events, asked {}", p.max_tokens));
        }
        if p.include_usage && rec.usage.is_none() {
            problems.push("no usage chunk".to_owned());
        }
    } else {
        match resp.json() {
            Ok(v) => rec.usage = v.get("usage").cloned(),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if let Some(u) = &rec.usage {
        let ct = u.get("completion_tokens").and_then(Value::as_u64);
        if ct != Some(u64::from(p.max_tokens)) {
            problems.push(format!("completion_tokens {ct:?}, asked {}", p.max_tokens));
        }
    }
    if !rec.id_echoed {
        problems.push("X-Request-Id not echoed".to_owned());
    }
    if !problems.is_empty() {
        rec.error = Some(problems.join("; "));
    }
}

fn client_loop(
    id: usize,
    addr: SocketAddr,
    opts: &LoadOpts,
    deadline_us: u64,
    counter: &AtomicU64,
) -> Vec<Record> {
    let systems = system_prompts();
    let mut rng = Rng::new(opts.seed.wrapping_mul(1_000_003).wrapping_add(id as u64));
    let mut conn: Option<Conn> = None;
    let mut out = Vec::new();
    while monotonic_us() < deadline_us {
        let p = plan(&mut rng, opts, &systems);
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let request_id = format!("load-{n}");
        let mut rec = Record {
            request_id: request_id.clone(),
            client: id,
            endpoint: p.endpoint,
            stream: p.stream,
            include_usage: p.include_usage,
            prompt_chars: p.prompt_chars,
            shared_prefix: p.shared_prefix,
            max_tokens: p.max_tokens,
            status: 0,
            error: None,
            start_us: monotonic_us(),
            first_byte_us: None,
            first_token_us: None,
            end_us: 0,
            events: 0,
            content_events: 0,
            usage: None,
            id_echoed: false,
        };
        let c = match conn.take().filter(|c| !c.is_closed()) {
            Some(c) => Ok(c),
            None => Conn::connect(addr),
        };
        let result = c.and_then(|mut c| {
            let r = c.post_json(p.endpoint, &[("X-Request-Id", &request_id)], &p.body)?;
            Ok((c, r))
        });
        match result {
            Ok((c, resp)) => {
                rec.start_us = resp.start_us;
                judge(&p, &resp, &mut rec);
                conn = Some(c);
            }
            Err(e) => {
                rec.end_us = monotonic_us();
                rec.error = Some(format!("{e:#}"));
                // Do not spin on a dead server.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        out.push(rec);
    }
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Summarise records.
pub fn summarise(records: Vec<Record>) -> Summary {
    let mut lat: Vec<f64> = records
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.end_us.saturating_sub(r.start_us) as f64 / 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut ttft: Vec<f64> = records
        .iter()
        .filter_map(|r| Some(r.first_token_us?.saturating_sub(r.start_us) as f64 / 1000.0))
        .collect();
    ttft.sort_by(f64::total_cmp);
    let start = records.iter().map(|r| r.start_us).min().unwrap_or(0);
    let end = records.iter().map(|r| r.end_us).max().unwrap_or(0);
    let wall_s = end.saturating_sub(start) as f64 / 1e6;
    let usage = |k: &str| -> u64 {
        records
            .iter()
            .filter_map(|r| r.usage.as_ref())
            .filter_map(|u| u.get(k).and_then(Value::as_u64))
            .sum()
    };
    let cached_tokens = records
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .filter_map(|u| u.pointer("/prompt_tokens_details/cached_tokens")?.as_u64())
        .sum();
    let completion_tokens = usage("completion_tokens");
    Summary {
        requests: records.len(),
        errors: records.iter().filter(|r| r.error.is_some()).count(),
        wall_s,
        p50_ms: percentile(&lat, 0.5),
        p95_ms: percentile(&lat, 0.95),
        ttft_p50_ms: percentile(&ttft, 0.5),
        prompt_tokens: usage("prompt_tokens"),
        cached_tokens,
        completion_tokens,
        tokens_per_s: if wall_s > 0.0 {
            completion_tokens as f64 / wall_s
        } else {
            0.0
        },
        records,
    }
}

/// Run the load and return the summary (records written to `--out` if given).
pub fn run(opts: &LoadOpts) -> Result<Summary> {
    let addr = (opts.host.as_str(), opts.port)
        .to_socket_addrs()
        .context("resolve server address")?
        .next()
        .context("no address for the server")?;
    let deadline_us = monotonic_us() + (opts.seconds.max(0.0) * 1e6) as u64;
    let counter = Arc::new(AtomicU64::new(0));
    let opts_arc = Arc::new(opts.clone());
    let handles: Vec<_> = (0..opts.concurrency.max(1))
        .map(|id| {
            let counter = Arc::clone(&counter);
            let opts = Arc::clone(&opts_arc);
            std::thread::Builder::new()
                .name(format!("emuload-{id}"))
                .spawn(move || client_loop(id, addr, &opts, deadline_us, &counter))
        })
        .collect::<std::io::Result<_>>()?;
    let mut records = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => records.extend(r),
            Err(_) => anyhow::bail!("a client thread panicked"),
        }
    }
    records.sort_by_key(|r| r.start_us);
    if let Some(path) = &opts.out {
        let mut w = BufWriter::new(
            File::create(path).with_context(|| format!("create {}", path.display()))?,
        );
        for r in &records {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    Ok(summarise(records))
}
