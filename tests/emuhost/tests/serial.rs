//! The API process's single writer loop, the engine's FIFO queue and its ground truth, client
//! cancellation, and the stand-in CUDA library option.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};
use tracer_emuhost::client::Conn;

use common::{Server, truth_lines};

fn stream_body(content: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "stream": true,
    })
}

#[test]
fn queue_is_fifo_and_truth_has_both_references() {
    let mut server = Server::start("fifo", 1, &["--max-seqs", "2"]);
    let addr = server.addr();
    let handles: Vec<_> = (0..5u64)
        .map(|i| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(15 * i));
                let mut c = Conn::connect(addr).expect("connect");
                let id = format!("fifo-{i}");
                let r = c
                    .post_json(
                        "/v1/chat/completions",
                        &[("X-Request-Id", &id)],
                        &stream_body("hello", 20),
                    )
                    .expect("request");
                assert_eq!(r.status, 200);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client");
    }
    let truth = server.stop();
    let mut reqs: Vec<&Value> = truth
        .iter()
        .filter(|l| l.get("summary").is_none())
        .collect();
    assert_eq!(reqs.len(), 5);
    reqs.sort_by_key(|r| r["arrive_us"].as_u64());
    let field = |r: &Value, k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r}"));
    // Admitted in arrival order, each after it arrived.
    for w in reqs.windows(2) {
        assert!(
            field(w[0], "scheduled_us") <= field(w[1], "scheduled_us"),
            "{w:?}"
        );
    }
    for r in &reqs {
        assert!(field(r, "arrive_us") <= field(r, "scheduled_us"), "{r}");
        assert!(r.get("preempted_us").is_none());
    }
    // Two run at once: the third waits for the first to finish.
    assert!(
        field(reqs[2], "scheduled_us") >= field(reqs[0], "end_us"),
        "{reqs:?}"
    );
    // Both references split the same steps' energy.
    let sum = |k: &str| -> f64 { reqs.iter().filter_map(|r| r[k].as_f64()).sum() };
    for (a, b) in [
        ("dynamic_j", "timeshare_dynamic_j"),
        ("total_j", "timeshare_j"),
    ] {
        assert!((sum(a) - sum(b)).abs() <= 1e-9 * sum(a), "{a} vs {b}");
    }
}

#[test]
fn one_writer_spends_its_cost_per_request_and_logs_every_step() {
    let log = std::env::temp_dir().join(format!("emuhost-writelog-{}", std::process::id()));
    let log_arg = log.to_str().expect("utf8").to_owned();
    let mut server = Server::start(
        "writer",
        1,
        &["--write-cost-us", "2000", "--write-log", &log_arg],
    );
    let addr = server.addr();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let mut c = Conn::connect(addr).expect("connect");
                let r = c
                    .post_json(
                        "/v1/completions",
                        &[],
                        &json!({"prompt": "x", "max_tokens": 30}),
                    )
                    .expect("request");
                assert_eq!(r.status, 200);
                let s = c
                    .post_json("/v1/chat/completions", &[], &stream_body("y", 30))
                    .expect("request");
                assert_eq!(s.event_json().expect("events").len(), 30);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client");
    }
    server.stop();
    let steps = truth_lines(&log);
    let _ = std::fs::remove_file(&log);
    assert!(!steps.is_empty());
    // Every step's message, in order, empty ones too.
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"].as_u64(), Some(i as u64 + 1), "{s}");
    }
    // With four requests in a step, its writes spread over at least three costs.
    let spread = steps
        .iter()
        .filter(|s| s["writes"].as_u64() == Some(4))
        .filter_map(|s| Some(s["last_write_us"].as_u64()? - s["first_write_us"].as_u64()?))
        .max()
        .expect("a step writing to four streams");
    assert!(spread >= 6_000, "{spread} µs");
}

#[test]
fn client_gone_cancels_and_the_server_goes_on() {
    let mut server = Server::start("cancel", 1, &[]);
    let body = stream_body("bye", 2000).to_string();
    let mut s = TcpStream::connect(server.addr()).expect("connect");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: gone\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < 2000 {
        got += s.read(&mut buf).expect("read");
    }
    drop(s);
    thread::sleep(Duration::from_millis(300));
    let mut c = Conn::connect(server.addr()).expect("connect");
    let r = c
        .post_json(
            "/v1/completions",
            &[],
            &json!({"prompt": "x", "max_tokens": 3}),
        )
        .expect("next request");
    assert_eq!(r.status, 200);
    let truth = server.stop();
    let gone = truth
        .iter()
        .find(|t| t["request_id"] == "gone")
        .expect("truth of the cancelled request");
    assert_eq!(gone["aborted"], true, "{gone}");
    assert!(gone["completion_tokens"].as_u64() < Some(2000), "{gone}");
}

#[test]
fn cuda_lib_without_the_symbols_is_refused() {
    let dir = common::Scratch::new("cuda");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_emuhost"))
        .args(["serve", "--port", "0", "--cuda-lib", "libc.so.6"])
        .arg("--state")
        .arg(dir.0.join("state"))
        .arg("--device-root")
        .arg(dir.0.join("dev"))
        .arg("--truth")
        .arg(dir.0.join("truth.jsonl"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(err.contains("cuLaunchKernel"), "{err}");
}
