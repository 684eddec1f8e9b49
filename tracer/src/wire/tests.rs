//! Recorded byte streams in the shapes real servers write them.

use proptest::prelude::*;

use super::*;

const CONN: ConnKey = ConnKey {
    tgid: 10,
    fd: 7,
    conn_id: 99,
};
use Direction::{Inbound as In, Outbound as Out};

/// Feeds `(direction, bytes)` pieces, one syscall each, fully captured, at ts 1000, 2000, ...
///
/// Three times: as captured, redacted (`redact.rs`), and the redacted views fed again as a
/// replay of a redacted recording reads them. All three must say the same (every test here
/// checks that redaction changes nothing attribution reads).
fn run(pieces: &[(Direction, &[u8])]) -> (Vec<Lifecycle>, TrackerStats) {
    let go = |key: Option<[u64; 2]>, pieces: &[(Direction, Vec<u8>)]| {
        let mut t = Tracker::new(TrackerConfig {
            redaction_key: key,
            ..TrackerConfig::default()
        });
        t.on_open(CONN, 0, Role::Server);
        let mut views = Vec::new();
        for (i, (dir, bytes)) in pieces.iter().enumerate() {
            t.on_data(CONN, (i as u64 + 1) * 1000, *dir, bytes.len() as u64, bytes);
            views.push((*dir, t.view().to_vec()));
        }
        t.on_close(CONN, 1_000_000);
        let mut out = Vec::new();
        t.drain_into(&mut out);
        (out, t.stats(), views)
    };
    let owned: Vec<(Direction, Vec<u8>)> = pieces.iter().map(|(d, b)| (*d, b.to_vec())).collect();
    let (out, stats, _) = go(None, &owned);
    let (redacted, redacted_stats, views) = go(Some([0xfeed, 0xbeef]), &owned);
    let (replayed, replayed_stats, again) = go(None, &views);
    let json = |v: &[Lifecycle]| serde_json::to_string(v).expect("json");
    assert_eq!(
        json(&out),
        json(&redacted),
        "redaction changed what the tracker read"
    );
    assert_eq!(
        json(&redacted),
        json(&replayed),
        "a redacted replay differs"
    );
    assert_eq!(stats, redacted_stats);
    assert_eq!(redacted_stats, replayed_stats);
    assert_eq!(views, again, "a replay reads the recording as recorded");
    (out, stats)
}

fn ends(evs: &[Lifecycle]) -> Vec<(Option<u16>, u64, u64, Outcome)> {
    evs.iter()
        .filter_map(|e| match e {
            Lifecycle::End {
                status,
                response_bytes,
                events,
                outcome,
                ..
            } => Some((*status, *response_bytes, *events, *outcome)),
            _ => None,
        })
        .collect()
}

fn usage(evs: &[Lifecycle]) -> Vec<(Option<u64>, Option<u64>, Option<u64>)> {
    evs.iter()
        .filter_map(|e| match e {
            Lifecycle::Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => Some((*prompt_tokens, *completion_tokens, *cached_tokens)),
            _ => None,
        })
        .collect()
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

const CHAT_STREAM: &str = r#"{"model":"llama-3-8b","stream":true,"stream_options":{"include_usage":true},"max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;

fn post(body: &str, extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-SECRET-123\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn sse_events(n: usize, usage_chunk: bool) -> Vec<String> {
    let mut v: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-abc\",\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            )
        })
        .collect();
    if usage_chunk {
        v.push("data: {\"id\":\"chatcmpl-abc\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n".into());
    }
    v.push("data: [DONE]\n\n".into());
    v
}

#[test]
fn uvicorn_chunked_sse_one_write_per_event() {
    let req = post(CHAT_STREAM, "");
    let head = "HTTP/1.1 200 OK\r\ndate: x\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut pieces: Vec<(Direction, String)> = vec![(In, req.clone()), (Out, head.into())];
    for e in sse_events(3, true) {
        pieces.push((Out, chunk(&e)));
    }
    pieces.push((Out, "0\r\n\r\n".into()));
    let wire: u64 = pieces
        .iter()
        .filter(|p| p.0 == Out)
        .map(|p| p.1.len() as u64)
        .sum();
    let refs: Vec<(Direction, &[u8])> = pieces.iter().map(|(d, s)| (*d, s.as_bytes())).collect();
    let (evs, stats) = run(&refs);
    match &evs[0] {
        Lifecycle::Arrive {
            model,
            stream,
            max_tokens,
            include_usage,
            method,
            path,
            ..
        } => {
            assert_eq!(model.as_deref(), Some("llama-3-8b"));
            assert_eq!(
                (*stream, *max_tokens, *include_usage),
                (Some(true), Some(3), Some(true))
            );
            assert_eq!(
                (method.as_str(), path.as_str()),
                ("POST", "/v1/chat/completions")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(evs[1], Lifecycle::RequestDone { bytes, .. } if bytes == req.len() as u64));
    assert!(matches!(
        evs[2],
        Lifecycle::FirstByte {
            status: 200,
            ts_ns: 2000,
            ..
        }
    ));
    // 3 token events + the usage chunk; [DONE] is not an event.
    assert_eq!(ends(&evs), vec![(Some(200), wire, 4, Outcome::Complete)]);
    assert_eq!(usage(&evs), vec![(Some(12), Some(3), Some(8))]);
    let first_event = evs.iter().find_map(|e| match e {
        Lifecycle::Event { ts_ns, .. } => Some(*ts_ns),
        _ => None,
    });
    assert_eq!(first_event, Some(3000));
    match evs.last() {
        Some(Lifecycle::End { server_id, .. }) => {
            assert_eq!(server_id.as_deref(), Some("chatcmpl-abc"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stats.completed, 1);
    assert_eq!(stats.resyncs + stats.parse_errors, 0);
    // Nothing secret in the output.
    let json = serde_json::to_string(&evs).expect("json");
    assert!(!json.contains("sk-SECRET"), "{json}");
}

#[test]
fn aiohttp_style_headers_and_hyper_writev_with_keepalive_comments() {
    let req = post(CHAT_STREAM, "X-Request-Id: abc-1\r\n");
    // aiohttp: Title-Case headers. hyper: head and first chunk in one writev; comments.
    let mut body = String::new();
    for (i, e) in sse_events(3, false).iter().enumerate() {
        if i == 1 {
            body.push_str(&chunk(": keep-alive\n\n"));
        }
        body.push_str(&chunk(e));
    }
    body.push_str("0\r\n\r\n");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nX-Request-Id: abc-1\r\n\r\n";
    let resp = format!("{head}{body}");
    let (evs, _) = run(&[(In, req.as_bytes()), (Out, resp.as_bytes())]);
    assert_eq!(
        ends(&evs),
        vec![(Some(200), resp.len() as u64, 3, Outcome::Complete)]
    );
    match evs.last() {
        Some(Lifecycle::End { request_id, .. }) => assert_eq!(request_id.as_deref(), Some("abc-1")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cpp_httplib_sendto_per_chunk_with_separate_terminators_and_extensions() {
    let req = post(CHAT_STREAM, "");
    let mut pieces: Vec<(Direction, String)> = vec![
        (In, req),
        (Out, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".into()),
    ];
    for e in sse_events(2, true) {
        pieces.push((Out, format!("{:x};ext=1\r\n", e.len())));
        pieces.push((Out, e.clone()));
        pieces.push((Out, "\r\n".into()));
    }
    pieces.push((Out, "0\r\n".into()));
    pieces.push((Out, "\r\n".into()));
    let refs: Vec<(Direction, &[u8])> = pieces.iter().map(|(d, s)| (*d, s.as_bytes())).collect();
    let (evs, _) = run(&refs);
    let e = ends(&evs);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].2, e[0].3), (3, Outcome::Complete));
}

#[test]
fn go_net_http_ollama_ndjson_with_counts() {
    let body = "{\"model\":\"llama3\",\"prompt\":\"hello\"}";
    let req = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let lines = [
        "{\"model\":\"llama3\",\"response\":\"He\",\"done\":false}\n",
        "{\"model\":\"llama3\",\"response\":\"llo\",\"done\":false}\n",
        "{\"model\":\"llama3\",\"response\":\"\",\"done\":true,\"prompt_eval_count\":26,\"eval_count\":2}\n",
    ];
    let mut pieces: Vec<(Direction, String)> = vec![
        (In, req),
        (Out, "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n".into()),
    ];
    for l in lines {
        pieces.push((Out, chunk(l)));
    }
    pieces.push((Out, "0\r\n\r\n".into()));
    let refs: Vec<(Direction, &[u8])> = pieces.iter().map(|(d, s)| (*d, s.as_bytes())).collect();
    let (evs, _) = run(&refs);
    assert_eq!(ends(&evs)[0].2, 3);
    assert_eq!(usage(&evs), vec![(Some(26), Some(2), None)]);
    assert!(matches!(&evs[0], Lifecycle::Arrive { model: Some(m), .. } if m == "llama3"));
}

#[test]
fn non_streamed_json_usage_with_content_length() {
    let body = r#"{"id":"cmpl-7","object":"chat.completion","choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#;
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let req = post(r#"{"model":"m","max_tokens":2}"#, "");
    let (evs, _) = run(&[(In, req.as_bytes()), (Out, resp.as_bytes())]);
    assert_eq!(usage(&evs), vec![(Some(5), Some(2), Some(4))]);
    assert_eq!(
        ends(&evs),
        vec![(Some(200), resp.len() as u64, 0, Outcome::Complete)]
    );
}

#[test]
fn hundred_keep_alive_requests_and_pipelining() {
    let mut pieces = Vec::new();
    for i in 0..100 {
        let body = format!("{{\"n\":{i}}}");
        pieces.push((In, post(&body, "")));
        let rb = format!("{{\"ok\":{i}}}");
        pieces.push((
            Out,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{rb}",
                rb.len()
            ),
        ));
    }
    let refs: Vec<(Direction, &[u8])> = pieces.iter().map(|(d, s)| (*d, s.as_bytes())).collect();
    let (evs, stats) = run(&refs);
    let e = ends(&evs);
    assert_eq!(e.len(), 100);
    assert!(
        e.iter()
            .all(|x| x.0 == Some(200) && x.3 == Outcome::Complete)
    );
    assert_eq!(stats.completed, 100);
    let seqs: Vec<u32> = evs
        .iter()
        .filter_map(|e| match e {
            Lifecycle::End { req, .. } => Some(req.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (0..100).collect::<Vec<_>>());

    // Pipelining: three requests in one read, three responses in one write, matched in order.
    let reqs = format!(
        "{}{}{}",
        post("{}", ""),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        post("{}", "")
    );
    let resps = "HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\naHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
    let (evs, _) = run(&[(In, reqs.as_bytes()), (Out, resps.as_bytes())]);
    let st: Vec<Option<u16>> = ends(&evs).iter().map(|e| e.0).collect();
    assert_eq!(st, vec![Some(201), Some(204), Some(404)]);
}

#[test]
fn truncated_captures_keep_boundaries_by_length() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.on_open(CONN, 0, Role::Server);
    let body = "x".repeat(20_000);
    let req = post(&body, "");
    // The request arrives in 4 reads of which only 4096 bytes each are captured.
    let bytes = req.as_bytes();
    let mut off = 0;
    let mut ts = 1;
    while off < bytes.len() {
        let n = (bytes.len() - off).min(6000);
        let cap = n.min(4096);
        t.on_data(CONN, ts, In, n as u64, &bytes[off..off + cap]);
        off += n;
        ts += 1;
    }
    let resp_body = "y".repeat(10_000);
    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n{resp_body}");
    t.on_data(CONN, ts, Out, resp.len() as u64, &resp.as_bytes()[..4096]);
    // The next request on the same connection is still parsed.
    let req2 = post("{\"model\":\"second\"}", "");
    t.on_data(CONN, ts + 1, In, req2.len() as u64, req2.as_bytes());
    let resp2 = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    t.on_data(CONN, ts + 2, Out, resp2.len() as u64, resp2.as_bytes());
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    let e = ends(&evs);
    assert_eq!(e.len(), 2, "{evs:?}");
    assert_eq!(e[0], (Some(200), resp.len() as u64, 0, Outcome::Complete));
    assert!(
        matches!(evs.iter().find(|e| matches!(e, Lifecycle::RequestDone { .. })),
        Some(Lifecycle::RequestDone { bytes, .. }) if *bytes == req.len() as u64)
    );
    assert!(
        evs.iter()
            .any(|e| matches!(e, Lifecycle::Arrive { model: Some(m), .. } if m == "second"))
    );
    assert_eq!(t.stats().resyncs, 0);
}

#[test]
fn truncation_inside_a_chunked_stream_is_counted_and_resyncs() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.on_open(CONN, 0, Role::Server);
    let req = post(CHAT_STREAM, "");
    t.on_data(CONN, 1, In, req.len() as u64, req.as_bytes());
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    t.on_data(CONN, 2, Out, head.len() as u64, head.as_bytes());
    // A write of 9000 bytes holding many chunks, of which 4096 were captured: the chunk
    // boundaries past the capture are unknown.
    let mut many = String::new();
    while many.len() < 9000 {
        many.push_str(&chunk("data: {\"choices\":[]}\n\n"));
    }
    t.on_data(CONN, 3, Out, many.len() as u64, &many.as_bytes()[..4096]);
    // The next exchange is tracked again.
    let req2 = post("{}", "");
    t.on_data(CONN, 4, In, req2.len() as u64, req2.as_bytes());
    let resp2 = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    t.on_data(CONN, 5, Out, resp2.len() as u64, resp2.as_bytes());
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    let e = ends(&evs);
    assert_eq!(e.len(), 2, "{evs:?}");
    assert_eq!(e[0].3, Outcome::Truncated);
    assert_eq!((e[1].0, e[1].3), (Some(200), Outcome::Complete));
    assert!(t.stats().truncated >= 1 && t.stats().resyncs >= 1);
}

#[test]
fn garbage_and_mid_stream_attach_resync() {
    // Garbage before a request line.
    let req = post("{}", "");
    let noisy = format!("\x00\x01garbage\r\n{req}");
    let (evs, stats) = run(&[
        (In, noisy.as_bytes()),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]);
    assert_eq!(ends(&evs).len(), 1);
    assert!(stats.resyncs >= 1 || stats.parse_errors >= 1);

    // Attached mid-stream: the first bytes are the middle of a response body, role unknown.
    let mut t = Tracker::new(TrackerConfig::default());
    t.on_data(CONN, 1, Out, 20, b"data: {\"x\":1}\n\n0\r\n\r\n");
    t.on_data(CONN, 2, In, req.len() as u64, req.as_bytes());
    let resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    t.on_data(CONN, 3, Out, resp.len() as u64, resp.as_bytes());
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    assert_eq!(
        ends(&evs),
        vec![(Some(200), resp.len() as u64, 0, Outcome::Complete)]
    );
}

#[test]
fn head_204_304_100_continue_and_close_delimited() {
    let head_req = "HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n";
    let (evs, _) = run(&[
        (In, head_req.as_bytes()),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        (In, b"GET /a HTTP/1.1\r\n\r\n"),
        (
            Out,
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ),
    ]);
    let st: Vec<(Option<u16>, Outcome)> = ends(&evs).iter().map(|e| (e.0, e.3)).collect();
    assert_eq!(
        st,
        vec![
            (Some(200), Outcome::Complete),
            (Some(304), Outcome::Complete)
        ]
    );

    let body = r#"{"model":"m"}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (evs, _) = run(&[
        (In, req.as_bytes()),
        (Out, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (In, body.as_bytes()),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]);
    assert_eq!(
        ends(&evs).iter().map(|e| (e.0, e.3)).collect::<Vec<_>>(),
        vec![(Some(200), Outcome::Complete)]
    );

    // HTTP/1.0 without Content-Length: the body ends at close.
    let (evs, _) = run(&[
        (In, b"GET / HTTP/1.0\r\n\r\n"),
        (
            Out,
            b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
        ),
        (Out, b"</html>"),
    ]);
    assert_eq!(
        ends(&evs)
            .iter()
            .map(|e| (e.0, e.1, e.3))
            .collect::<Vec<_>>(),
        vec![(Some(200), 44 + 6 + 7, Outcome::Complete)]
    );
}

#[test]
fn client_gone_before_response_is_aborted_and_early_close_is_closed_early() {
    let req = post("{}", "");
    let (evs, _) = run(&[(In, req.as_bytes())]);
    assert_eq!(ends(&evs), vec![(None, 0, 0, Outcome::Aborted)]);
    let (evs, _) = run(&[
        (In, req.as_bytes()),
        (
            Out,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a bit",
        ),
    ]);
    assert_eq!(ends(&evs)[0].3, Outcome::ClosedEarly);
}

#[test]
fn client_role_tracks_outbound_requests() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.on_open(CONN, 0, Role::Client);
    let req = post("{}", "");
    t.on_data(CONN, 1, Out, req.len() as u64, req.as_bytes());
    let resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    t.on_data(CONN, 2, In, resp.len() as u64, resp.as_bytes());
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    assert_eq!(ends(&evs).len(), 1);
}

#[test]
fn tenant_is_a_keyed_hash_only() {
    let mut t = Tracker::new(TrackerConfig {
        tenant_header: Some("x-tenant".into()),
        ..TrackerConfig::default()
    });
    t.on_open(CONN, 0, Role::Server);
    let req = post("{}", "X-Tenant: acme-corp\r\n");
    t.on_data(CONN, 1, In, req.len() as u64, req.as_bytes());
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    let json = serde_json::to_string(&evs).expect("json");
    assert!(!json.contains("acme"), "{json}");
    assert!(matches!(&evs[0], Lifecycle::Arrive { tenant: Some(h), .. } if h.len() == 16));
}

fn sse_exchange() -> Vec<(Direction, Vec<u8>)> {
    let mut resp = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for e in sse_events(5, true) {
        resp.push_str(&chunk(&e));
    }
    resp.push_str("0\r\n\r\n");
    vec![
        (In, post(CHAT_STREAM, "").into_bytes()),
        (Out, resp.into_bytes()),
    ]
}

/// Lifecycle events with timestamps removed (splitting changes which syscall a byte is in).
fn shape(evs: &[Lifecycle]) -> Vec<String> {
    evs.iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).expect("json");
            v.as_object_mut().map(|o| o.remove("ts_ns"));
            v.to_string()
        })
        .collect()
}

proptest! {
    #[test]
    fn any_split_gives_the_same_lifecycle(cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40)) {
        let ex = sse_exchange();
        let (whole, _) = run(&ex.iter().map(|(d, b)| (*d, b.as_slice())).collect::<Vec<_>>());
        let mut pieces: Vec<(Direction, &[u8])> = Vec::new();
        for (d, b) in &ex {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(b.len())).collect();
            points.push(0);
            points.push(b.len());
            points.sort_unstable();
            points.dedup();
            for w in points.windows(2) {
                pieces.push((*d, &b[w[0]..w[1]]));
            }
        }
        let (split, _) = run(&pieces);
        prop_assert_eq!(shape(&whole), shape(&split));
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000), cap in 0usize..2000) {
        let mut t = Tracker::new(TrackerConfig::default());
        let n = bytes.len();
        t.on_data(CONN, 1, In, (n + 100) as u64, &bytes[..cap.min(n)]);
        t.on_data(CONN, 2, Out, n as u64, &bytes);
        t.on_close(CONN, 3);
        let mut evs = Vec::new();
        t.drain_into(&mut evs);
    }
}

#[test]
fn http2_tls_and_upgraded_connections_are_counted_never_parsed() {
    // HTTP/2 with prior knowledge; a literal header that looks like HTTP/1 follows.
    let (evs, st) = run(&[
        (In, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00"),
        (In, b"\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]);
    assert!(ends(&evs).is_empty(), "{evs:?}");
    assert_eq!((st.http2_connections, st.requests), (1, 0));
    assert!(st.other_protocol_bytes > 0);

    // TLS (a ClientHello's record header), encrypted where the probes see it.
    let (evs, st) = run(&[
        (In, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        (In, b"\nPOST /v1/chat/completions HTTP/1.1\r\n\r\n"),
    ]);
    assert!(evs.is_empty(), "{evs:?}");
    assert_eq!((st.tls_connections, st.requests), (1, 0));

    // An h2c upgrade: the upgrading request is one exchange (101), then HTTP/2.
    let (evs, st) = run(&[
        (
            In,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n",
        ),
        (
            Out,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        ),
        (In, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /x HTTP/1.1\r\n\r\n"),
        (Out, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"),
    ]);
    assert_eq!(
        ends(&evs).iter().map(|e| (e.0, e.3)).collect::<Vec<_>>(),
        vec![(Some(101), Outcome::Complete)]
    );
    assert_eq!((st.http2_connections, st.requests), (1, 1));

    // A WebSocket upgrade.
    let (_, st) = run(&[
        (In, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
        (
            Out,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ),
        (In, b"\x81\x05hello"),
    ]);
    assert_eq!((st.upgraded_connections, st.requests), (1, 1));
}

/// A TLS connection read through the TLS library: its ciphertext (before and after the first
/// plaintext) is only counted, its plaintext parsed as HTTP/1.
#[test]
fn tls_plaintext_is_parsed_and_its_ciphertext_counted() {
    let mut t = Tracker::new(TrackerConfig::default());
    t.on_open(CONN, 0, Role::Server);
    let hello: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    t.on_data(CONN, 1_000, In, hello.len() as u64, hello);
    let request: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    let record: &[u8] = b"\x17\x03\x03\x00\x40 POST / HTTP/1.1\r\n\r\n";
    t.on_data(CONN, 2_000, In, record.len() as u64, record);
    t.on_plaintext(CONN, 2_100, In, request.len() as u64, request);
    let response: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    t.on_data(CONN, 3_000, Out, 90, b"\x17\x03\x03\x00\x50");
    t.on_plaintext(CONN, 3_100, Out, response.len() as u64, response);
    t.on_close(CONN, 4_000);
    let mut evs = Vec::new();
    t.drain_into(&mut evs);
    assert_eq!(
        ends(&evs),
        [(Some(200), response.len() as u64, 0, Outcome::Complete)]
    );
    let st = t.stats();
    assert_eq!(
        (
            st.tls_connections,
            st.tls_decrypted_connections,
            st.requests
        ),
        (1, 1, 1)
    );
    assert_eq!(
        st.other_protocol_bytes,
        (hello.len() + record.len() + 90) as u64
    );
}
