//! Load: 50 000 requests over 1 000 keep-alive connections against the axum server, the real
//! probes attached. Every request the clients made must come out of the tracker, and the
//! kernel and the daemon must report zero losses. Prints the figures for BENCHMARKS.md.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use serde_json::Value;
use tracer_tests::{TempDir, Tracer, client::Client, cpu_seconds, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const AXUM: &str = env!("CARGO_BIN_EXE_openai-axum");
const THREADS: usize = 100;
const CONNS_PER_THREAD: usize = 10;
const REQUESTS_PER_CONN: usize = 50;

#[test]
fn fifty_thousand_requests_over_a_thousand_connections() {
    if !privileged_or_skip("fifty_thousand_requests_over_a_thousand_connections") {
        return;
    }
    let dir = TempDir::new("load");
    let mut server = Command::new(AXUM)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn axum");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let port: u16 = line.trim()["listening ".len()..].parse().expect("port");
    let requests_out = dir.path().join("requests.jsonl");
    let tracer = Tracer::start_with(
        TRACER,
        dir.path(),
        &[
            "--port",
            &port.to_string(),
            "--requests-out",
            requests_out.to_str().expect("utf8"),
        ],
        false,
    );
    let cpu_before = cpu_seconds(tracer.pid());
    let ok = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let mut conns: Vec<Client> = (0..CONNS_PER_THREAD)
                    .map(|_| Client::connect(port).expect("connect"))
                    .collect();
                for i in 0..REQUESTS_PER_CONN * CONNS_PER_THREAD {
                    let c = &mut conns[i % CONNS_PER_THREAD];
                    let ex = c
                        .post(
                            "/v1/chat/completions",
                            r#"{"model":"load","max_tokens":2,"messages":[]}"#,
                            &[],
                        )
                        .expect("exchange");
                    if ex.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let cpu = cpu_seconds(tracer.pid()) - cpu_before;
    let log_before_stop = tracer.log_text();
    let _ = tracer.stop();
    let _ = server.kill();
    let _ = server.wait();

    let made = ok.load(Ordering::Relaxed);
    let total = (THREADS * CONNS_PER_THREAD * REQUESTS_PER_CONN) as u64;
    assert_eq!(made, total, "the clients' own count");
    let text = std::fs::read_to_string(&requests_out).expect("requests output");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .filter(|r: &Value| r["tgid"] == server.id())
        .collect();
    let complete = records
        .iter()
        .filter(|r| r["outcome"] == "complete" && r["status"] == 200)
        .count() as u64;
    let conns: std::collections::BTreeSet<(u64, u64)> = records
        .iter()
        .map(|r| {
            (
                r["fd"].as_u64().unwrap_or(0),
                r["conn_id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let log = std::fs::read_to_string(dir.path().join("tracer.log")).unwrap_or(log_before_stop);
    let last = log
        .lines()
        .rfind(|l| l.contains("shutting down"))
        .unwrap_or("")
        .to_string();
    println!(
        "load: {made} requests over {} connections in {elapsed:.1} s ({:.0} req/s); tracker saw {complete} complete; daemon CPU {cpu:.2} s ({:.0} % of one core); {last}",
        conns.len(),
        made as f64 / elapsed,
        cpu / elapsed * 100.0
    );
    assert_eq!(complete, total, "tracker count = client count");
    assert_eq!(
        conns.len(),
        THREADS * CONNS_PER_THREAD,
        "every connection seen"
    );
    assert!(
        last.contains("dropped ring=0 decode=0"),
        "losses reported: {last}"
    );
}
