//! The HTTP surface of `emuhost serve`.

mod common;

use serde_json::json;
use tracer_emuhost::client::Conn;

use common::{Server, contents};

#[test]
fn openai_protocol_on_one_keep_alive_connection() {
    let mut server = Server::start("protocol", 1, &[]);
    let mut c = Conn::connect(server.addr()).expect("connect");

    // Health.
    let r = c.get("/health").expect("health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json().expect("json")["status"], "ok");

    // Non-streamed completion with usage and an echoed request id.
    let prompt = "a".repeat(37); // ceil(37 / 4) = 10 tokens
    let r = c
        .post_json(
            "/v1/completions",
            &[("X-Request-Id", "proto-1")],
            &json!({"model": "m", "prompt": prompt, "max_tokens": 5}),
        )
        .expect("completion");
    assert_eq!(r.status, 200);
    assert_eq!(r.head.header("x-request-id"), Some("proto-1"));
    assert!(r.head.content_length().expect("cl").is_some());
    let v = r.json().expect("json");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], "tok ".repeat(5));
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 15);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Streamed chat: N content events, a usage chunk, [DONE].
    let n = 7;
    let r = c
        .post_json(
            "/v1/chat/completions",
            &[("X-Request-Id", "proto-2")],
            &json!({
                "model": "m",
                "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hello there"}],
                "max_tokens": n, "stream": true,
                "stream_options": {"include_usage": true},
            }),
        )
        .expect("stream");
    assert_eq!(r.status, 200);
    assert_eq!(r.head.header("x-request-id"), Some("proto-2"));
    assert!(r.head.is_chunked());
    assert!(
        r.head
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"))
    );
    assert_eq!(r.events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let evs = r.event_json().expect("events");
    let texts = contents(&evs);
    assert_eq!(texts.len(), n, "{evs:?}");
    assert!(texts.iter().all(|t| !t.is_empty()));
    assert!(
        evs[..n]
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    let usage = &evs.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    // "be brief" + "hello there" = 19 chars → 5 tokens.
    assert_eq!(usage["usage"]["prompt_tokens"], 5);
    assert_eq!(usage["usage"]["completion_tokens"], n);
    assert_eq!(usage["usage"]["total_tokens"], 5 + n);
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(evs.len(), n + 1);
    // Tokens arrive over time, one step apart (≥ 10 ms each).
    let span = r.events[n - 1].at_us - r.events[0].at_us;
    assert!(span >= 5_000 * (n as u64 - 1), "{span} µs");

    // Streamed completion without usage.
    let r = c
        .post_json(
            "/v1/completions",
            &[],
            &json!({"prompt": "hi", "max_tokens": 3, "stream": true}),
        )
        .expect("stream completion");
    let evs = r.event_json().expect("events");
    assert_eq!(evs.len(), 3);
    assert!(evs.iter().all(|e| e["object"] == "text_completion"));
    assert!(evs.iter().all(|e| e.get("usage").is_none()));
    assert!(r.head.header("x-request-id").is_none());

    // Errors.
    let r = c
        .request(
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            b"{not json",
        )
        .expect("bad json");
    assert_eq!(r.status, 400);
    assert_eq!(r.json().expect("error json")["code"], 400);
    let r = c
        .post_json("/v1/chat/completions", &[], &json!({"model": "m"}))
        .expect("no messages");
    assert_eq!(r.status, 400);
    let r = c.get("/nope").expect("404");
    assert_eq!(r.status, 404);
    assert!(r.json().is_ok());

    // Still the same connection after all that.
    assert!(!c.is_closed());
    let r = c.get("/health").expect("health again");
    assert_eq!(r.status, 200);

    // Default max_tokens is 16.
    let r = c
        .post_json("/v1/completions", &[], &json!({"prompt": "x"}))
        .expect("default");
    assert_eq!(r.json().expect("json")["usage"]["completion_tokens"], 16);

    let truth = server.stop();
    let reqs: Vec<_> = truth
        .iter()
        .filter(|l| l.get("summary").is_none())
        .collect();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0]["request_id"], "proto-1");
    assert_eq!(reqs[1]["request_id"], "proto-2");
    assert!(reqs[2]["request_id"].is_null());
    assert!(truth.last().expect("summary")["summary"] == true);
}

#[test]
fn connection_close_is_honoured() {
    let server = Server::start("close", 1, &[]);
    let mut c = Conn::connect(server.addr()).expect("connect");
    let r = c
        .request("GET", "/health", &[("Connection", "close")], b"")
        .expect("health");
    assert_eq!(r.status, 200);
    assert!(c.is_closed());
}
