//! The local-socket API over a real Unix socket (issue 15, first part): the README's `curl
//! --unix-socket` examples, filters and paging, one record, summaries, services, metrics,
//! the live stream, bad input that gets a 4xx without stalling the daemon, and what a user who
//! is not root sees (only services whose processes it owns).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{TempDir, Tracer, client::Client, listening, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
/// `nobody`: a user that is not root and owns nothing of the daemon's.
const NOBODY: u32 = 65534;

/// `curl --unix-socket SOCK http://localhost/PATH` (as `uid` when given): (status, body).
fn curl(sock: &Path, path: &str, uid: Option<u32>) -> (u16, String) {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                "curl".into(),
            ]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args([
            "-s",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(sock)
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn json(sock: &Path, path: &str) -> Value {
    let (status, body) = curl(sock, path, None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Raw bytes on the socket; the response's status line.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn post(port: u16, model: &str, rid: &str) {
    let mut c = Client::connect(port).expect("connect");
    let body = format!(
        r#"{{"model":"{model}","max_tokens":3,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let ex = c
        .post("/v1/chat/completions", &body, &[("X-Request-Id", rid)])
        .expect("exchange");
    assert_eq!(ex.status, 200);
}

/// Waits until `/v1/requests` lists `n` records.
fn records(sock: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = json(sock, "/v1/requests?limit=1000");
        let list = v["requests"].as_array().cloned().unwrap_or_default();
        if list.len() >= n || Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The daemon on `ports`, its records final within two seconds (the cost model's warm-up
/// would otherwise hold the first few requests of a quiet service for up to a minute).
fn daemon(dir: &TempDir, ports: &[u16]) -> Tracer {
    let config = dir.path().join("tracer.toml");
    std::fs::write(&config, "[ledger]\nmax_defer_ns = 2000000000\n").expect("config");
    let mut args: Vec<String> = vec![
        "--config".into(),
        config.to_str().expect("utf-8").into(),
        "--summary-interval-ms".into(),
        "200".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    for p in ports {
        args.extend(["--port".into(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start_with(TRACER, dir.path(), &args, false)
}

#[test]
fn the_api_answers_over_its_unix_socket() {
    if !privileged_or_skip("the_api_answers_over_its_unix_socket") {
        return;
    }
    let dir = TempDir::new("api");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon(&dir, &[port]);
    let sock = dir.path().join("tracer.sock");
    for i in 0..6 {
        post(port, &format!("m-{}", i % 3), &format!("api-{i}"));
    }
    let all = records(&sock, 6);
    assert_eq!(all.len(), 6, "{all:#?}");
    let ids: Vec<u64> = all.iter().map(|r| r["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");

    // Paging: two at a time, following the cursor, gives the same six.
    let mut paged = Vec::new();
    let mut path = "/v1/requests?limit=2".to_string();
    loop {
        let v = json(&sock, &path);
        paged.extend(v["requests"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/requests?limit=2&cursor={c}"),
            None => break,
        }
    }
    let paged_ids: Vec<u64> = paged.iter().filter_map(|r| r["id"].as_u64()).collect();
    assert_eq!(paged_ids, ids);

    // Filters, one record, a summary by model.
    let m1 = json(&sock, "/v1/requests?model=m-1");
    assert_eq!(m1["requests"].as_array().map(Vec::len), Some(2), "{m1}");
    let one = json(&sock, &format!("/v1/requests/{}", ids[0]));
    assert_eq!(one["id"], ids[0]);
    assert!(
        one["devices"].as_array().is_some_and(|d| !d.is_empty()),
        "{one}"
    );
    assert_eq!(curl(&sock, "/v1/requests/999999999", None).0, 404);
    let now_ms = json(&sock, "/v1/requests?limit=1")["requests"][0]["end_unix_ms"]
        .as_i64()
        .expect("end_unix_ms");
    let later = json(&sock, &format!("/v1/requests?since={}", now_ms + 1));
    assert_eq!(
        later["requests"].as_array().map(Vec::len),
        Some(0),
        "{later}"
    );
    let rfc = json(&sock, "/v1/requests?since=2020-01-01T00:00:00Z");
    assert_eq!(rfc["requests"].as_array().map(Vec::len), Some(6));
    let summary = json(&sock, "/v1/summary?by=model");
    let groups = summary["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 3, "{summary}");
    let total: f64 = all.iter().filter_map(|r| r["total_j"].as_f64()).sum();
    let grouped: f64 = groups.iter().filter_map(|g| g["joules"].as_f64()).sum();
    assert!(
        (total - grouped).abs() < 1e-6 * total.max(1.0),
        "{total} vs {grouped}"
    );
    assert!(groups.iter().all(|g| g["requests"] == 2), "{summary}");

    // Services, health, metrics.
    let services = json(&sock, "/v1/services");
    assert!(
        services.to_string().contains(&server.id().to_string()),
        "{services}"
    );
    assert_eq!(json(&sock, "/health")["status"], "ok");
    let (status, metrics) = curl(&sock, "/metrics", None);
    assert_eq!(status, 200);
    let want = format!("tracer_requests_total{{service=\"port {port}\",model=\"m-0\"}} 2");
    assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    let want = format!("tracer_request_joules_count{{service=\"port {port}\",model=\"m-0\"}} 2");
    assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    // The same on the TCP listener Prometheus scrapes (its port from the log).
    let log = tracer.log_text();
    let addr = log
        .split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split("/metrics").next())
        .expect("the metrics address in the log");
    let mut tcp = std::net::TcpStream::connect(addr).expect("metrics listener");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut scraped = String::new();
    tcp.read_to_string(&mut scraped).expect("read");
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    let want = format!("tracer_requests_total{{service=\"port {port}\",model=\"m-0\"}} 2");
    assert!(scraped.contains(&want), "{scraped}");
    // Prometheus's own checker reads it (format and naming).
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("metrics to promtool");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{metrics}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The stream: a record that becomes final while it is open.
    let mut stream = UnixStream::connect(&sock).expect("connect");
    stream
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    post(port, "m-live", "api-live");
    let mut reader = BufReader::new(stream);
    let mut seen = false;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.contains("\"api-live\"") {
            seen = true;
            break;
        }
        line.clear();
    }
    assert!(seen, "the stream showed the new record");

    // Bad input: an error, and the daemon goes on answering.
    assert_eq!(curl(&sock, "/nope", None).0, 404);
    assert_eq!(curl(&sock, "/v1/requests?limit=0", None).0, 400);
    assert_eq!(curl(&sock, "/v1/requests?since=yesterday", None).0, 400);
    assert_eq!(curl(&sock, "/v1/requests?colour=red", None).0, 400);
    assert_eq!(curl(&sock, "/v1/summary?by=colour", None).0, 400);
    assert!(raw(&sock, b"\x00\xffgarbage\r\n\r\n").contains(" 400 "));
    let huge = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let status = raw(&sock, huge.as_bytes());
    assert!(
        status.is_empty() || status.contains(" 431 ") || status.contains(" 400 "),
        "{status}"
    );
    let s = {
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.write_all(b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .expect("write");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 64];
        let n = c.read(&mut b).unwrap_or(0);
        String::from_utf8_lossy(&b[..n]).to_string()
    };
    assert!(s.contains(" 405 "), "{s}");
    assert_eq!(json(&sock, "/health")["status"], "ok", "still answering");

    // The CLI on the socket: a table, JSON lines, a summary, and a clear error without a daemon.
    let cli = |args: &[&str]| {
        let out = Command::new(TRACER)
            .args(args)
            .arg("--socket")
            .arg(&sock)
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let table = cli(&["query", "--limit", "10"]);
    assert!(
        table.lines().count() == 8 && table.contains("m-2"),
        "{table}"
    );
    let lines = cli(&["query", "--model", "m-1", "--json"]);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(
        lines
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{lines}"
    );
    let by_model = cli(&["summary", "--by", "model"]);
    assert!(
        by_model.contains("m-0") && by_model.contains("m-live"),
        "{by_model}"
    );
    // The README's `curl --unix-socket` examples, as written (its example id made a real one):
    // each is answered 200 (the stream's headers, then curl's own time limit).
    let readme = include_str!("../../README.md");
    let block = readme
        .split("### Asking the daemon")
        .nth(1)
        .and_then(|t| t.split("```sh\n").nth(1))
        .and_then(|t| t.split("```").next())
        .expect("the README's curl block");
    let mut ran = 0;
    for line in block.lines().filter(|l| l.starts_with("curl ")) {
        let cmd = line
            .split("  #")
            .next()
            .unwrap_or(line)
            .trim()
            .replace("1234", &ids[0].to_string());
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{cmd} -s -o /dev/null -w '%{{http_code}}' --max-time 2 --noproxy '*'"
            ))
            .env("S", &sock)
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{cmd}");
        ran += 1;
    }
    assert_eq!(ran, 9, "every example in the block:\n{block}");

    // `tracer top`, one frame as text: devices with watts, the service with its processes,
    // the latest requests.
    let frame = cli(&["top", "--once", "--interval-ms", "300"]);
    eprintln!("{frame}");
    for want in [
        "devices",
        "W now",
        &format!("port {port}"),
        "latest requests",
        "m-live",
        "ring drops 0",
    ] {
        assert!(frame.contains(want), "{want} not in:\n{frame}");
    }
    for sub in ["query", "top"] {
        let out = Command::new(TRACER)
            .args([sub, "--socket", "/run/no-such-tracer.sock"])
            .output()
            .expect("cli");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is the daemon running"),
            "{sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Another user sees none of root's services, and not the whole host.
    let (status, body) = curl(&sock, "/v1/requests", Some(NOBODY));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["requests"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(
        curl(&sock, &format!("/v1/requests/{}", ids[0]), Some(NOBODY)).0,
        404
    );
    assert_eq!(curl(&sock, "/v1/gpus", Some(NOBODY)).0, 403);
    assert!(!curl(&sock, "/metrics", Some(NOBODY)).1.contains("m-0"));

    let _ = tracer.stop();
    let _ = server.kill();
    let _ = server.wait();
    assert!(!sock.exists(), "the socket is removed at exit");
}

/// A user sees the services it runs: a server started as `nobody` is visible to `nobody`,
/// root's is not.
#[test]
fn a_user_sees_its_own_services_only() {
    if !privileged_or_skip("a_user_sees_its_own_services_only") {
        return;
    }
    let dir = TempDir::new("api-users");
    let (mut mine, my_port) = listening(
        Command::new("setpriv")
            .args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                // The system's: the test's own Python may live where nobody can read.
                "/usr/bin/python3".into(),
            ])
            .arg(SERVER),
    );
    let (mut roots, root_port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon(&dir, &[my_port, root_port]);
    let sock = dir.path().join("tracer.sock");
    post(my_port, "mine", "nobody-1");
    post(root_port, "roots", "root-1");
    assert_eq!(records(&sock, 2).len(), 2);
    // The next snapshot knows both services.
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = curl(&sock, "/v1/requests", Some(NOBODY));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let models: Vec<&str> = v["requests"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|r| r["model"].as_str())
        .collect();
    assert_eq!(models, ["mine"], "{v}");
    let (_, services) = curl(&sock, "/v1/services", Some(NOBODY));
    assert!(services.contains(&format!("port {my_port}")), "{services}");
    assert!(
        !services.contains(&format!("port {root_port}")),
        "{services}"
    );
    let _ = tracer.stop();
    for s in [&mut mine, &mut roots] {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// A restart on the same outputs: the JSON-lines files are appended to (the first run's lines
/// are still there, a line the first run's `kill -9` cut off is dropped), and the earlier
/// recording is kept beside the new one, never overwritten.
#[test]
fn a_restart_appends_and_keeps_the_recording() {
    if !privileged_or_skip("a_restart_appends_and_keeps_the_recording") {
        return;
    }
    let dir = TempDir::new("api-restart");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let records = dir.path().join("records.jsonl");
    let recording = dir.path().join("run.rec");
    let run = |tag: &str| {
        let tracer = Tracer::start_with(
            TRACER,
            dir.path(),
            &[
                "--port",
                &port.to_string(),
                "--records-out",
                records.to_str().expect("utf-8"),
                "--record",
                recording.to_str().expect("utf-8"),
            ],
            false,
        );
        post(port, tag, &format!("{tag}-1"));
        post(port, tag, &format!("{tag}-2"));
        std::thread::sleep(Duration::from_millis(300));
        tracer.stop();
    };
    run("first");
    // As a kill -9 in the middle of a line leaves it.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&records)
        .expect("records");
    f.write_all(b"{\"id\":99,\"total").expect("torn line");
    drop(f);
    run("second");
    let text = std::fs::read_to_string(&records).expect("records");
    let models: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line is JSON"))
        .filter_map(|r| r["model"].as_str().map(str::to_string))
        .collect();
    assert_eq!(models, ["first", "first", "second", "second"], "{text}");
    let kept = dir.path().join("run.rec.1");
    assert!(kept.exists() && recording.exists(), "both recordings");
    // The kept one is the first run's, whole: it replays to the first run's records.
    let n = tracer_tests::replay(TRACER, &kept, dir.path())
        .lines()
        .count();
    assert_eq!(n, 2, "the first run's two records");
    let _ = server.kill();
    let _ = server.wait();
}

/// A file that is not a socket at the API's path is never removed: the daemon refuses to start
/// and says why.
#[test]
fn a_file_at_the_socket_path_is_left_alone() {
    if !privileged_or_skip("a_file_at_the_socket_path_is_left_alone") {
        return;
    }
    let dir = TempDir::new("api-not-a-socket");
    let path = dir.path().join("important.txt");
    std::fs::write(&path, "keep me").expect("file");
    let mut target = Command::new("sleep").arg("30").spawn().expect("sleep");
    let out = Command::new(TRACER)
        .args([
            "run",
            "--no-store",
            "--pid",
            &target.id().to_string(),
            "--api-socket",
        ])
        .arg(&path)
        .output()
        .expect("run");
    let _ = target.kill();
    let _ = target.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&path).expect("still there"),
        "keep me"
    );
}
