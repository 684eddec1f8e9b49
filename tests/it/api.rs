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
use tracer_tests::{Killed, TempDir, Tracer, client::Client, listening, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");
/// `nobody`: a user that is not root and owns nothing of the daemon's.
const NOBODY: u32 = 65534;

/// `curl --unix-socket SOCK http://localhost/PATH` (as `uid` when given): (status, body).
fn curl(sock: &Path, path: &str, uid: Option<u32>) -> (u16, String) {
    curl_in(sock, path, uid, None)
}

/// `curl` as `uid`, a member of `group` when given (else of no supplementary group).
fn curl_in(sock: &Path, path: &str, uid: Option<u32>, group: Option<u32>) -> (u16, String) {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={NOBODY}"),
                group.map_or_else(|| "--clear-groups".into(), |g| format!("--groups={g}")),
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
    post_as(port, model, rid, "t-0");
}

/// A completion for `tenant` (the daemon's `http.tenant_header`).
fn post_as(port: u16, model: &str, rid: &str, tenant: &str) {
    let mut c = Client::connect(port).expect("connect");
    let body = format!(
        r#"{{"model":"{model}","max_tokens":3,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let ex = c
        .post(
            "/v1/chat/completions",
            &body,
            &[("X-Request-Id", rid), ("X-Tenant", tenant)],
        )
        .expect("exchange");
    assert_eq!(ex.status, 200);
}

/// The number of requests a page lists.
fn listed(sock: &Path, path: &str) -> usize {
    json(sock, path)["requests"]
        .as_array()
        .map_or(usize::MAX, Vec::len)
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
    daemon_with(dir, ports, "")
}

/// As `daemon`, with more configuration (`[api]` keys).
fn daemon_with(dir: &TempDir, ports: &[u16], api: &str) -> Tracer {
    let config = dir.path().join("tracer.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\nmax_defer_ns = 2000000000\n[http]\ntenant_header = \"x-tenant\"\n[api]\n{api}\n"
        ),
    )
    .expect("config");
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
        post_as(
            port,
            &format!("m-{}", i % 3),
            &format!("api-{i}"),
            &format!("t-{}", i % 2),
        );
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
    let first_ms = all
        .iter()
        .filter_map(|r| r["end_unix_ms"].as_i64())
        .min()
        .expect("ends");
    // `until` is exclusive.
    assert_eq!(listed(&sock, &format!("/v1/requests?until={first_ms}")), 0);
    assert_eq!(
        listed(&sock, &format!("/v1/requests?until={}", now_ms + 1)),
        6
    );
    assert_eq!(listed(&sock, "/v1/requests?outcome=complete"), 6);
    assert_eq!(listed(&sock, "/v1/requests?outcome=aborted"), 0);
    assert_eq!(
        listed(&sock, &format!("/v1/requests?service=port%20{port}")),
        6
    );
    assert_eq!(listed(&sock, "/v1/requests?service=port%201"), 0);
    // Tenants are kept as keyed hashes: the filter takes the hash a record shows.
    let tenant = all[0]["tenant"]
        .as_str()
        .expect("a tenant hash")
        .to_string();
    assert!(!tenant.contains("t-"), "never the tenant itself: {tenant}");
    assert_eq!(listed(&sock, &format!("/v1/requests?tenant={tenant}")), 3);
    let by_tenant = json(&sock, "/v1/summary?by=tenant");
    let tenants = by_tenant["groups"].as_array().expect("groups");
    assert_eq!(tenants.len(), 2, "{by_tenant}");
    assert!(tenants.iter().all(|g| g["requests"] == 3), "{by_tenant}");
    // The devices' energy over the same window: requests + idle + unattributed = measured.
    let window = json(&sock, "/v1/summary?by=model");
    let devices = window["devices"]
        .as_array()
        .expect("devices over the window");
    assert!(!devices.is_empty(), "{window}");
    for d in devices {
        let parts: f64 = ["requests_j", "idle_j", "unattributed_j"]
            .iter()
            .filter_map(|k| d[*k].as_f64())
            .sum();
        let measured = d["measured_j"].as_f64().expect("measured");
        assert!(
            measured > 0.0 && (parts - measured).abs() < 1e-6 * measured,
            "{d}"
        );
    }
    let by_service = json(&sock, "/v1/summary?by=service");
    assert_eq!(by_service["groups"][0]["service"], format!("port {port}"));
    assert_eq!(by_service["groups"][0]["requests"], 6, "{by_service}");
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
    let want = format!(
        "tracer_tenant_requests_total{{service=\"port {port}\",model=\"m-0\",tenant=\"{tenant}\"}} "
    );
    assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    for want in [
        "tracer_probe_records_total{kind=\"data\",result=\"dropped\"} 0",
        "tracer_probe_events_total{counter=\"stash_full\"} ",
        "tracer_pipeline_events_total{counter=\"user_decode_errors\"} 0",
        "tracer_store_runs_lost_total 0",
        "tracer_device_idle_watts{device=",
        "tracer_sampler_polls_total{source=",
    ] {
        assert!(metrics.contains(want), "{want} not in\n{metrics}");
    }
    // The host's devices: what each draws now, who holds it, its sensor's health.
    let gpus = json(&sock, "/v1/gpus");
    let devices = gpus["devices"].as_array().expect("devices");
    assert!(!devices.is_empty(), "{gpus}");
    for d in devices {
        assert!(d["holders"].is_array(), "{d}");
        assert_eq!(d["sensor"]["status"], "ok", "{d}");
        assert!(d["power_w"].as_f64().is_some_and(|w| w >= 0.0), "{d}");
        assert!(d["sensor"]["polls"].as_u64().is_some_and(|n| n > 0), "{d}");
    }
    assert_eq!(
        json(&sock, "/health")["recoveries"],
        Value::Array(Vec::new())
    );
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
        status.contains(" 431 ") || status.contains(" 400 "),
        "a head over 16 KiB is refused with a status: {status:?}"
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
    // Its table shows the quantiles: every figure of a model's line is a number.
    assert!(by_model.contains("J/req p50"), "{by_model}");
    let m0: Vec<&str> = by_model
        .lines()
        .find(|l| l.starts_with("m-0 "))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert!(
        m0.len() == 9 && m0[1..].iter().all(|f| f.parse::<f64>().is_ok()),
        "{m0:?} in\n{by_model}"
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
    for sub in ["query", "summary", "top"] {
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
    // A socket the caller may not open: said so (the binary copied where `nobody` may run it).
    let cli_copy = dir.path().join("tracer-cli");
    std::fs::copy(TRACER, &cli_copy).expect("copy the cli");
    let mode = |p: &Path, m: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    };
    mode(&cli_copy, 0o755);
    mode(&sock, 0o600);
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(&cli_copy)
        .args(["summary", "--socket"])
        .arg(&sock)
        .output()
        .expect("cli as nobody");
    mode(&sock, 0o666);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied (the socket's mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

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

/// A user and a group made for one test (`useradd`, `groupadd`), removed after it.
struct Account {
    user: String,
    group: String,
    uid: u32,
    gid: u32,
}

impl Account {
    fn create() -> Account {
        let tag = std::process::id();
        let (user, group) = (format!("tracer-u{tag}"), format!("tracer-g{tag}"));
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("account tools");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        run(Command::new("groupadd").arg(&group));
        run(Command::new("useradd").args(["-M", "-N", "-s", "/usr/sbin/nologin", &user]));
        let uid = run(Command::new("id").args(["-u", &user]))
            .parse()
            .expect("uid");
        let gid = run(Command::new("getent").args(["group", &group]))
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .expect("gid");
        Account {
            user,
            group,
            uid,
            gid,
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.user).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// A user sees the services it runs: a server started by a user created for the test is
/// visible to that user, root's is not; another user sees neither; a member of `api.group`
/// sees both, as root does.
#[test]
fn a_user_sees_its_own_services_only() {
    if !privileged_or_skip("a_user_sees_its_own_services_only") {
        return;
    }
    let account = Account::create();
    let dir = TempDir::new("api-users");
    let (mine, my_port) = listening(
        Command::new("setpriv")
            .args([
                format!("--reuid={}", account.uid),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                // The system's: the test's own Python may live where the user cannot read.
                "/usr/bin/python3".into(),
            ])
            .arg(SERVER),
    );
    // Dropped before the account (even on a failed assertion): its user can then be deleted.
    let mine = Killed(mine);
    let (mut roots, root_port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon_with(
        &dir,
        &[my_port, root_port],
        &format!("group = \"{}\"", account.group),
    );
    let sock = dir.path().join("tracer.sock");
    post(my_port, "mine", "user-1");
    post(root_port, "roots", "root-1");
    let all = records(&sock, 2);
    assert_eq!(all.len(), 2);
    let id_of = |model: &str| {
        all.iter()
            .find(|r| r["model"] == model)
            .and_then(|r| r["id"].as_u64())
            .expect("id")
    };
    // The next snapshot knows both services.
    std::thread::sleep(Duration::from_millis(500));
    let models = |uid: u32, group: Option<u32>| {
        let (status, body) = curl_in(&sock, "/v1/requests", Some(uid), group);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        let mut m: Vec<String> = v["requests"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|r| r["model"].as_str().map(str::to_owned))
            .collect();
        m.sort();
        m
    };
    let me = account.uid;
    assert_eq!(models(me, None), ["mine"]);
    assert_eq!(
        curl(&sock, &format!("/v1/requests/{}", id_of("roots")), Some(me)).0,
        404
    );
    assert_eq!(
        curl(&sock, &format!("/v1/requests/{}", id_of("mine")), Some(me)).0,
        200
    );
    assert_eq!(curl(&sock, "/v1/gpus", Some(me)).0, 403);
    let (_, services) = curl(&sock, "/v1/services", Some(me));
    assert!(services.contains(&format!("port {my_port}")), "{services}");
    assert!(
        !services.contains(&format!("port {root_port}")),
        "{services}"
    );
    // Another user: nobody's records, 404 rather than someone else's.
    assert!(models(NOBODY, None).is_empty());
    assert_eq!(
        curl(
            &sock,
            &format!("/v1/requests/{}", id_of("mine")),
            Some(NOBODY)
        )
        .0,
        404
    );
    // The API group sees everything.
    assert_eq!(models(NOBODY, Some(account.gid)), ["mine", "roots"]);
    assert_eq!(
        curl_in(&sock, "/v1/gpus", Some(NOBODY), Some(account.gid)).0,
        200
    );
    let _ = tracer.stop();
    drop(mine);
    let _ = roots.kill();
    let _ = roots.wait();
}

/// Connections to `sock` held open by processes running as the given uids, started
/// together (an idle connection lasts the daemon's 5 s head timeout): with a request, sent
/// and the answer's status line read; without, idle. The processes (kill them to close the
/// connections) and those lines (`idle` for an idle one).
fn hold(sock: &Path, clients: &[(u32, Option<&str>)]) -> Vec<(std::process::Child, String)> {
    const SCRIPT: &str = r"import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
line = 'idle'
if len(sys.argv) > 2:
    s.sendall(sys.argv[2].encode())
    s.settimeout(10)
    line = s.makefile('rb').readline().decode().strip()
print(line, flush=True)
time.sleep(60)
";
    let children: Vec<_> = clients
        .iter()
        .map(|(uid, request)| {
            Command::new("setpriv")
                .args([
                    format!("--reuid={uid}"),
                    format!("--regid={NOBODY}"),
                    "--clear-groups".into(),
                    "/usr/bin/python3".into(),
                    "-c".into(),
                    SCRIPT.into(),
                ])
                .arg(sock)
                .args(request)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("a holding client")
        })
        .collect();
    let held = children
        .into_iter()
        .map(|mut child| {
            let mut line = String::new();
            let out = child.stdout.take().expect("stdout");
            BufReader::new(out).read_line(&mut line).expect("its line");
            (child, line.trim().to_string())
        })
        .collect();
    // Time for the daemon to take the connections in.
    std::thread::sleep(Duration::from_millis(200));
    held
}

/// Kills holding clients (their connections close).
fn release(clients: Vec<(std::process::Child, String)>) {
    for (mut c, _) in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Slow and idle clients: one user's idle connections are capped (the next is told 429 at
/// once) while another user is served; a full house is answered 503 at once, except root;
/// streams are capped (503) and give their connection slot back to queries; a head trickled
/// byte by byte is cut off by the head timeout; records keep becoming final throughout.
#[test]
fn slow_and_idle_clients_never_stall_the_api() {
    if !privileged_or_skip("slow_and_idle_clients_never_stall_the_api") {
        return;
    }
    let dir = TempDir::new("api-slow");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon_with(
        &dir,
        &[port],
        "max_connections = 4\nmax_connections_per_user = 2\nmax_streams = 2",
    );
    let sock = dir.path().join("tracer.sock");
    post(port, "m", "slow-0");
    assert_eq!(records(&sock, 1).len(), 1);
    let quick = Duration::from_secs(5);
    let health = Some("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let stream = Some("GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n");
    let line = |held: &[(std::process::Child, String)]| held[0].1.clone();
    // One user's two idle connections, then a third from it: 429 at once; another user is
    // served meanwhile.
    let idle = hold(&sock, &[(NOBODY, None), (NOBODY, None)]);
    let t = Instant::now();
    let third = hold(&sock, &[(NOBODY, health)]);
    assert!(line(&third).contains(" 429 "), "{}", line(&third));
    assert_eq!(curl(&sock, "/health", Some(NOBODY - 1)).0, 200);
    assert!(t.elapsed() < quick, "{:?}", t.elapsed());
    release(idle);
    release(third);
    // A full house (two users, two idle connections each): a third user is answered 503 at
    // once; root is still served.
    let full = hold(
        &sock,
        &[
            (NOBODY, None),
            (NOBODY, None),
            (NOBODY - 1, None),
            (NOBODY - 1, None),
        ],
    );
    let t = Instant::now();
    let refused = hold(&sock, &[(NOBODY - 2, health)]);
    assert!(line(&refused).contains(" 503 "), "{}", line(&refused));
    assert_eq!(curl(&sock, "/health", None).0, 200);
    assert!(t.elapsed() < quick, "{:?}", t.elapsed());
    release(full);
    release(refused);
    // Two streams; a third is refused; the streams gave their connection slots back: four
    // connections of two other users still fit, a fifth does not.
    let streams = hold(&sock, &[(NOBODY, stream), (NOBODY, stream)]);
    assert!(
        streams.iter().all(|(_, l)| l.contains(" 200 ")),
        "{streams:?}"
    );
    let third = hold(&sock, &[(NOBODY - 3, stream)]);
    assert!(line(&third).contains(" 503 "), "{}", line(&third));
    // (Its connection stays open, keep-alive, with its slot: closed.)
    release(third);
    // Each answered (a slot) and kept open (keep-alive): four connections held.
    let four = hold(
        &sock,
        &[
            (NOBODY - 1, health),
            (NOBODY - 1, health),
            (NOBODY - 2, health),
            (NOBODY - 2, health),
        ],
    );
    assert!(four.iter().all(|(_, l)| l.contains(" 200 ")), "{four:?}");
    let fifth = hold(&sock, &[(NOBODY - 3, health)]);
    assert!(
        line(&fifth).contains(" 503 "),
        "the four fit, a fifth is refused: {}",
        line(&fifth)
    );
    release(four);
    release(fifth);
    // A head trickled a byte at a time is cut off by the 5 s head timeout.
    let mut slow = UnixStream::connect(&sock).expect("connect");
    slow.set_write_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let t = Instant::now();
    let mut cut = false;
    for b in b"GET /health HTTP/1.1\r\nX-Slow: ".iter().cycle().take(40) {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if !cut {
        // The server may have closed without our writes failing yet: it sends nothing more.
        slow.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut b = Vec::new();
        cut = slow.read_to_end(&mut b).is_ok();
    }
    assert!(cut, "a trickled head was cut off ({:?})", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    // Records kept becoming final throughout.
    post(port, "m", "slow-1");
    assert_eq!(records(&sock, 2).len(), 2);
    release(streams);
    let _ = tracer.stop();
    let _ = server.kill();
    let _ = server.wait();
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
