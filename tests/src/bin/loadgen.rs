//! A closed-loop load generator for `cargo xtask bench`: `--conns` keep-alive connections, one
//! thread each, send OpenAI-style chat requests back to back until `--requests` in all are
//! done. Prints one JSON line: requests answered 200, failures, seconds, requests/s, latency
//! p50/p99 (ms) and SSE events received.
//!
//! `loadgen --port P [--conns 32] [--requests 20000] [--stream] [--max-tokens 4]
//! [--token-delay-ms 0]`
//!
//! `--hold N`: opens N connections, sends one request on each, prints `held N` and keeps them
//! open until its standard input closes (what the daemon holds per open connection).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use tracer_tests::client::Client;

struct Args {
    port: u16,
    conns: usize,
    requests: u64,
    stream: bool,
    max_tokens: u64,
    token_delay_ms: u64,
    hold: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        port: 0,
        conns: 32,
        requests: 20_000,
        stream: false,
        max_tokens: 4,
        token_delay_ms: 0,
        hold: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--stream" {
            a.stream = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{k}: {v:?} is not a number"))?;
        match k.as_str() {
            "--port" => a.port = u16::try_from(n).map_err(|e| e.to_string())?,
            "--conns" => a.conns = n.max(1) as usize,
            "--requests" => a.requests = n,
            "--max-tokens" => a.max_tokens = n,
            "--token-delay-ms" => a.token_delay_ms = n,
            "--hold" => a.hold = n,
            _ => return Err(format!("unknown flag {k}")),
        }
    }
    if a.port == 0 {
        return Err("--port is required".into());
    }
    Ok(a)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let body = format!(
        r#"{{"model":"bench","max_tokens":{},"stream":{},"token_delay_ms":{},"messages":[{{"role":"user","content":"Say something about energy."}}]}}"#,
        a.max_tokens, a.stream, a.token_delay_ms
    );
    if a.hold > 0 {
        hold(&a, &body);
        return;
    }
    let next = AtomicU64::new(0);
    let (ok, failed, events) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    let mut latencies_ns: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.conns)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    let mut conn = None;
                    while next.fetch_add(1, Ordering::Relaxed) < a.requests {
                        if conn.is_none() {
                            conn = Client::connect(a.port).ok();
                        }
                        let Some(c) = conn.as_mut() else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let t = Instant::now();
                        match c.post("/v1/chat/completions", &body, &[]) {
                            Ok(ex) if ex.status == 200 => {
                                lat.push(t.elapsed().as_nanos() as u64);
                                ok.fetch_add(1, Ordering::Relaxed);
                                events.fetch_add(ex.events, Ordering::Relaxed);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                conn = None;
                            }
                        }
                    }
                    lat
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    latencies_ns.sort_unstable();
    let q = |p: f64| {
        latencies_ns
            .get(((latencies_ns.len().saturating_sub(1)) as f64 * p) as usize)
            .map_or(0.0, |&n| n as f64 / 1e6)
    };
    let ok = ok.load(Ordering::Relaxed);
    println!(
        r#"{{"ok":{ok},"failed":{},"secs":{secs:.3},"rps":{:.1},"p50_ms":{:.3},"p99_ms":{:.3},"events":{}}}"#,
        failed.load(Ordering::Relaxed),
        ok as f64 / secs,
        q(0.5),
        q(0.99),
        events.load(Ordering::Relaxed)
    );
}

fn hold(a: &Args, body: &str) {
    let mut held = Vec::new();
    for _ in 0..a.hold {
        match Client::connect(a.port) {
            Ok(mut c) => {
                if c.post("/v1/chat/completions", body, &[]).is_ok() {
                    // One descriptor per connection held.
                    held.push(c.into_stream());
                }
            }
            Err(e) => {
                eprintln!("loadgen: connection {}: {e}", held.len());
                break;
            }
        }
    }
    println!("held {}", held.len());
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
}
