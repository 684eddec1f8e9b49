//! The durable store (issue 15): a daemon killed with `kill -9` under load and started again
//! on the same store keeps every record that was final before the kill, recovers the requests
//! whose end its journal holds, duplicates nothing, and keeps its ids growing; a clean stop
//! leaves nothing to recover.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{TempDir, Tracer, api_get, client::Client, listening, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");

fn get(sock: &Path, path: &str) -> Value {
    serde_json::from_str(&api_get(sock, path)).expect("json")
}

/// Every record the API lists, paging with its cursor (memory, then the store).
fn all_records(sock: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let v = get(sock, &format!("/v1/requests?limit=500{cursor}"));
        out.extend(v["requests"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

fn daemon(dir: &TempDir, port: u16, memory_records: usize) -> Tracer {
    daemon_with(
        dir,
        port,
        &format!("[api]\nmemory_records = {memory_records}\n"),
    )
}

/// The daemon on `port` with `extra` configuration, its records final within two seconds;
/// returns it (its config is `<dir>/tracer.toml`).
fn daemon_with(dir: &TempDir, port: u16, extra: &str) -> Tracer {
    let config = dir.path().join("tracer.toml");
    std::fs::write(
        &config,
        format!("[ledger]\nmax_defer_ns = 2000000000\n{extra}"),
    )
    .expect("config");
    Tracer::start_with(
        TRACER,
        dir.path(),
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--port",
            &port.to_string(),
            "--summary-interval-ms",
            "200",
        ],
        false,
    )
}

fn post(port: u16, rid: &str) -> bool {
    let Ok(mut c) = Client::connect(port) else {
        return false;
    };
    let body = r#"{"model":"m","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
    c.post("/v1/chat/completions", body, &[("X-Request-Id", rid)])
        .is_ok_and(|ex| ex.status == 200)
}

#[test]
fn a_kill_9_loses_nothing_final_and_nothing_journalled() {
    if !privileged_or_skip("a_kill_9_loses_nothing_final_and_nothing_journalled") {
        return;
    }
    let dir = TempDir::new("store-kill9");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let sock = dir.path().join("tracer.sock");
    // Memory holds 50 records: the rest are read from the store. The journal starts a new
    // segment every second: the recovery replays the last two, from a checkpoint.
    let first = daemon_with(
        &dir,
        port,
        "[api]\nmemory_records = 50\n[store]\njournal_segment_s = 1\n",
    );

    // Load from four clients; each request's completion time is kept.
    let done: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let rid = format!("c{c}-{i}");
                    if post(port, &rid) {
                        done.lock().expect("lock").push((rid, Instant::now()));
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let before: Vec<Value> = all_records(&sock);
    assert!(
        before.len() > 50,
        "final records before the kill: {}",
        before.len()
    );
    let killed_at = Instant::now();
    first.kill9();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }

    let second = daemon(&dir, port, 50);
    let log = second.log_text();
    assert!(log.contains("recovered from"), "{log}");
    assert!(log.contains("and 1 later segment(s)"), "{log}");
    // The cost model the first run learned (CPU energy split per service) starts this one.
    assert!(log.contains("restored 1 learned cost models"), "{log}");
    for i in 0..5 {
        assert!(post(port, &format!("after-{i}")));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let a = all_records(&sock);
        let news = a
            .iter()
            .filter(|r| {
                r["external_id"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("after-"))
            })
            .count();
        if news == 5 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Nothing twice.
    let ids: Vec<u64> = after.iter().filter_map(|r| r["id"].as_u64()).collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate ids");
    // Every record final before the kill, unchanged.
    let by_id: BTreeMap<u64, &Value> = after
        .iter()
        .filter_map(|r| Some((r["id"].as_u64()?, r)))
        .collect();
    for r in &before {
        let id = r["id"].as_u64().expect("id");
        assert_eq!(
            by_id.get(&id).copied(),
            Some(r),
            "record {id} changed or lost"
        );
    }
    // Every request answered well before the kill (its end was journalled): recorded.
    let recorded: BTreeSet<&str> = after
        .iter()
        .filter_map(|r| r["external_id"].as_str())
        .collect();
    let done = done.lock().expect("lock");
    let journalled: Vec<&String> = done
        .iter()
        .filter(|(_, t)| *t + Duration::from_millis(200) < killed_at)
        .map(|(rid, _)| rid)
        .collect();
    let lost: Vec<&&String> = journalled
        .iter()
        .filter(|rid| !recorded.contains(rid.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} lost: {lost:?}",
        lost.len(),
        journalled.len()
    );
    let recovered = after.len() - before.len() - 5;
    eprintln!(
        "final before the kill {}, answered {}, recovered after it {recovered}, after restart 5",
        before.len(),
        journalled.len()
    );
    // The new run's ids follow every old one.
    let old_max = before
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .max()
        .expect("ids");
    for r in after.iter().filter(|r| {
        r["external_id"]
            .as_str()
            .is_some_and(|x| x.starts_with("after-"))
    }) {
        assert!(r["id"].as_u64().expect("id") > old_max, "{r}");
    }
    // Summaries see the old runs' records too (memory holds only 50).
    let s = get(&sock, "/v1/summary?by=model");
    let n: u64 = s["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["requests"].as_u64())
        .sum();
    assert_eq!(n as usize, after.len(), "{s}");
    let _ = second.stop();

    // A clean stop leaves nothing to recover.
    let third = daemon(&dir, port, 50);
    let log = third.log_text();
    assert!(!log.contains("recovered from"), "{log}");
    assert_eq!(all_records(&sock).len(), after.len());
    let _ = third.stop();
    let _ = server.kill();
    let _ = server.wait();
}

/// Every file found under `dir` (recursively) that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// A clean stop with a request in flight (the server still working on it): the request is
/// stored as `incomplete`, not dropped, and the next run still lists it beside the others.
#[test]
fn a_request_in_flight_at_a_clean_stop_is_stored_incomplete() {
    use std::io::Write as _;
    if !privileged_or_skip("a_request_in_flight_at_a_clean_stop_is_stored_incomplete") {
        return;
    }
    let dir = TempDir::new("store-stop");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let sock = dir.path().join("tracer.sock");
    let tracer = daemon(&dir, port, 1000);
    assert!(post(port, "done-1"));
    // The server works on this one for 8 s of CPU (`burn_ms`): in flight until the stop.
    let body = r#"{"model":"m","max_tokens":3,"burn_ms":8000,"messages":[]}"#;
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        held,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: held-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    // Final records of the first, and the held one in flight in a snapshot.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = get(&sock, "/v1/requests")["requests"]
            .as_array()
            .is_some_and(|l| !l.is_empty());
        let in_flight = get(&sock, "/v1/services")["services"]
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["in_flight"] == 1));
        if done && in_flight {
            break;
        }
        assert!(Instant::now() < deadline, "{}", tracer.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tracer.stop();
    drop(held);
    let tracer = daemon(&dir, port, 1000);
    let incomplete = get(&sock, "/v1/requests?outcome=incomplete")["requests"].clone();
    let list = incomplete.as_array().expect("list");
    assert_eq!(list.len(), 1, "{incomplete}");
    assert_eq!(list[0]["external_id"], "held-1", "{incomplete}");
    let complete = get(&sock, "/v1/requests?outcome=complete")["requests"].clone();
    assert_eq!(complete.as_array().map(Vec::len), Some(1), "{complete}");
    let _ = tracer.stop();
    let _ = server.kill();
    let _ = server.wait();
}

/// Nothing the daemon writes by default holds prompt text or credentials: the store, the
/// journal, a recording, the JSON-lines outputs, the log. The recording and the journal still
/// replay to the records the daemon wrote. With `--record-payloads` the recording keeps them
/// (what the check above would catch).
#[test]
fn nothing_written_by_default_holds_a_prompt_or_a_credential() {
    const PROMPT: &str = "ZEBRA-PRIVATE-7731 tell me a secret";
    const TOKEN: &str = "sk-OCELOT-4402";
    if !privileged_or_skip("nothing_written_by_default_holds_a_prompt_or_a_credential") {
        return;
    }
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let run = |dir: &TempDir, extra: &[&str]| {
        let rec = dir.path().join("run.rec");
        let records = dir.path().join("records.jsonl");
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--record".into(),
            rec.display().to_string(),
            "--records-out".into(),
            records.display().to_string(),
            "--requests-out".into(),
            dir.path().join("requests.jsonl").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tracer = Tracer::start(TRACER, dir.path(), &args);
        for (i, stream) in [false, true, false].into_iter().enumerate() {
            let mut c = Client::connect(port).expect("connect");
            let body = format!(
                r#"{{"model":"m","stream":{stream},"max_tokens":4,"messages":[{{"role":"system","content":"{PROMPT}"}},{{"role":"user","content":"{PROMPT} {i}"}}]}}"#
            );
            let auth = format!("Bearer {TOKEN}");
            let ex = c
                .post(
                    "/v1/chat/completions",
                    &body,
                    &[("Authorization", auth.as_str()), ("X-Request-Id", "p")],
                )
                .expect("exchange");
            assert_eq!(ex.status, 200);
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = tracer.stop();
        (rec, records)
    };

    let dir = TempDir::new("store-privacy");
    let (rec, records) = run(&dir, &[]);
    let written = std::fs::read_to_string(&records).expect("records");
    assert_eq!(written.lines().count(), 3, "{written}");
    for needle in ["ZEBRA-PRIVATE", TOKEN] {
        let found = files_holding(dir.path(), needle.as_bytes());
        assert!(found.is_empty(), "{needle} written to {found:?}");
    }
    // The redacted recording and the journal still give the daemon's records back.
    let journal = std::fs::read_dir(dir.path().join("store/journal"))
        .expect("journal dir")
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("a journal");
    for r in [&rec, &journal] {
        assert_eq!(
            tracer_tests::replay(TRACER, r, dir.path()),
            written,
            "{} replays to other records",
            r.display()
        );
    }

    let kept = TempDir::new("store-payloads");
    let (rec, _) = run(&kept, &["--record-payloads"]);
    assert_eq!(
        files_holding(kept.path(), b"ZEBRA-PRIVATE")
            .iter()
            .filter(|f| f.ends_with("run.rec") || f.contains("journal"))
            .count(),
        2,
        "--record-payloads keeps them in the recording and the journal ({})",
        rec.display()
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// The bill (issue 16): with a tariff configured, every record carries its cost; `tracer
/// report` from the store gives a line per request at the same price, the per-token
/// comparison, CSV, and an HTML report with its plots.
#[test]
fn records_carry_their_cost_and_the_report_bills_them() {
    if !privileged_or_skip("records_carry_their_cost_and_the_report_bills_them") {
        return;
    }
    let dir = TempDir::new("store-bill");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon_with(
        &dir,
        port,
        "[bill]\ncurrency = \"EUR\"\nprice_per_kwh = \"0.30\"\npue = \"1.2\"\n",
    );
    let config = dir.path().join("tracer.toml");
    for i in 0..8 {
        assert!(post(port, &format!("bill-{i}")));
    }
    let sock = dir.path().join("tracer.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let r = all_records(&sock);
        if r.len() >= 8 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(records.len(), 8);
    for r in &records {
        assert_eq!(r["cost"]["currency"], "EUR", "{r}");
        let amount: f64 = r["cost"]["amount"]
            .as_str()
            .expect("amount")
            .parse()
            .expect("decimal");
        let want = r["total_j"].as_f64().expect("J") / 3.6e6 * 0.30 * 1.2;
        assert!((amount - want).abs() < 2e-9, "{amount} vs {want}: {r}");
    }
    // The summary adds the records' costs, exactly (billionths), in their currency.
    let summary = get(&sock, "/v1/summary?by=model");
    let group = &summary["groups"][0];
    let nano = |s: &str| -> i64 {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let frac = format!("{frac:0<9}");
        int.parse::<i64>().expect("int") * 1_000_000_000 + frac[..9].parse::<i64>().expect("frac")
    };
    let want: i64 = records
        .iter()
        .map(|r| nano(r["cost"]["amount"].as_str().expect("amount")))
        .sum();
    assert_eq!(group["cost"]["currency"], "EUR", "{summary}");
    assert_eq!(
        nano(group["cost"]["amount"].as_str().expect("sum")),
        want,
        "{summary}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = tracer.stop();

    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "currency = \"EUR\"\n[default]\ninput = \"0.50\"\noutput = \"1.50\"\n",
    )
    .expect("prices");
    let store = dir.path().join("store");
    let args = report_args(&config, &store, &tokens);
    let report = |format: &str| tracer_report(&args, &["--format", format]);
    let v: Value = serde_json::from_str(&report("json")).expect("json");
    let lines = v["bill"]["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), 8);
    for l in lines {
        let r = records
            .iter()
            .find(|r| r["id"] == l["id"])
            .expect("the record");
        let billed: f64 = l["cost"].as_str().expect("cost").parse().expect("decimal");
        let carried: f64 = r["cost"]["amount"]
            .as_str()
            .expect("amount")
            .parse()
            .expect("decimal");
        assert!((billed - carried).abs() < 2e-9, "{l} vs {r}");
        assert!(l["per_token_cost"].is_string(), "{l}");
    }
    assert_eq!(v["audit"]["runs"][0]["split"], "auto", "{}", v["audit"]);
    assert!(v["audit"]["runs"][0]["journal"].is_string());
    let by_day = tracer_report(&args, &["--by", "day"]);
    assert_eq!(
        by_day.lines().filter(|l| l.starts_with("20")).count(),
        1,
        "{by_day}"
    );
    let table = report("table");
    assert!(table.contains("0.30 EUR/kWh (flat) | PUE 1.2"), "{table}");
    assert!(table.contains("saving"), "{table}");
    let csv = report("csv");
    assert_eq!(csv.lines().count(), 9);
    assert!(
        csv.lines().skip(1).all(|l| l.ends_with("run-1.rec")),
        "each line names the journal that reproduces it: {csv}"
    );
    let html = report("html");
    assert_eq!(html.matches("<svg").count(), 6, "six plots");
    let _ = server.kill();
    let _ = server.wait();
}

/// `tracer report` on a store with a config and per-token prices.
fn report_args(config: &Path, store: &Path, tokens: &Path) -> Vec<String> {
    vec![
        "report".into(),
        "--config".into(),
        config.display().to_string(),
        "--store".into(),
        store.display().to_string(),
        "--per-token-prices".into(),
        tokens.display().to_string(),
    ]
}
/// `tracer report` with `args` and `more`: its standard output.
fn tracer_report(args: &[String], more: &[&str]) -> String {
    let out = Command::new(TRACER)
        .args(args)
        .args(more)
        .output()
        .expect("report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Issue 16's audit trail: the journal is cut into segments (here every second), each after
/// the first starting from a checkpoint of the whole state. The bill replayed from one segment
/// alone, starting mid-run, has exactly the live bill's lines for the requests finalised in it
/// (the CSV names that segment on each of them), and no others.
#[test]
fn a_bill_replayed_from_a_mid_run_segment_has_the_live_lines() {
    if !privileged_or_skip("a_bill_replayed_from_a_mid_run_segment_has_the_live_lines") {
        return;
    }
    let dir = TempDir::new("store-segments");
    let (mut server, port) = listening(Command::new("python3").arg(SERVER));
    let tracer = daemon_with(
        &dir,
        port,
        "[store]\njournal_segment_s = 1\n[bill]\ncurrency = \"EUR\"\nprice_per_kwh = \"0.30\"\npue = \"1.2\"\n",
    );
    let config = dir.path().join("tracer.toml");
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _ = post(port, &format!("seg{c}-{i}"));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(4500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    std::thread::sleep(Duration::from_millis(2500));
    for l in tracer
        .log_text()
        .lines()
        .filter(|l| l.contains("checkpoint of"))
    {
        eprintln!("{l}");
    }
    let _ = tracer.stop();

    let store = dir.path().join("store");
    let base = ["report", "--config", config.to_str().expect("utf-8")];
    let csv_lines = |more: &[&str]| -> BTreeMap<String, String> {
        let args: Vec<String> = base.iter().map(ToString::to_string).collect();
        let out = tracer_report(&args, &[more, &["--format", "csv"]].concat());
        out.lines()
            .skip(1)
            .map(|l| (l.split(',').next().expect("id").to_string(), l.to_string()))
            .collect()
    };
    let live = csv_lines(&["--store", store.to_str().expect("utf-8")]);
    assert!(live.len() > 50, "{} live lines", live.len());
    let mut segments: Vec<String> = live
        .values()
        .filter_map(|l| l.rsplit(',').next().map(str::to_string))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    segments.retain(|s| !s.ends_with("run-1.rec"));
    assert!(segments.len() >= 2, "mid-run segments: {segments:?}");
    let mut checked = 0;
    for seg in &segments {
        let want: BTreeMap<&String, &String> = live
            .iter()
            .filter(|(_, l)| l.ends_with(seg.as_str()))
            .collect();
        let got = csv_lines(&["--recording", seg]);
        let got: BTreeMap<&String, &String> = got.iter().collect();
        assert!(!want.is_empty());
        let differ: Vec<String> = want
            .keys()
            .chain(got.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|id| want.get(*id) != got.get(*id))
            .map(|id| format!("live {:?}\nreplayed {:?}", want.get(id), got.get(id)))
            .collect();
        assert!(
            differ.is_empty(),
            "the bill replayed from {seg} alone: {} of {} lines differ, e.g.\n{}",
            differ.len(),
            want.len(),
            differ
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        checked += want.len();
    }
    eprintln!(
        "{} live lines; {checked} reproduced line for line from {} mid-run segments",
        live.len(),
        segments.len()
    );
    let _ = server.kill();
    let _ = server.wait();
}
