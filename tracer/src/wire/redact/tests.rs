//! Redaction: what is kept, what is replaced, and the bulk paths against the lexer.

use super::*;

const K: Key = Key([0x1234, 0x5678]);

fn body(text: &str, sse: bool, pieces: usize) -> String {
    let mut s = BodyState::default();
    s.reset(sse);
    let mut bytes = text.as_bytes().to_vec();
    let n = bytes.len().div_ceil(pieces.max(1));
    for chunk in bytes.chunks_mut(n.max(1)) {
        s.redact(K, chunk);
    }
    String::from_utf8(bytes).expect("ascii")
}

/// The bulk runs give the lexer's bytes, whatever the pieces' boundaries.
#[test]
fn bulk_runs_match_the_bytewise_lexer() {
    let texts = [
        (
            r#"{"model":"m","messages":[{"role":"user","content":"a \"quoted\" \\ line\nbreak"}],"metadata":{"a":{"b":{"deep key":"v","n":[1,2]}}},"max_tokens":7}"#,
            false,
        ),
        (
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok\\\"en\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12}}\r\n\r\nevent: x\ndata: text line\ndata: {\"cut\":\"in a string\nnext\":1}\ndata: [DONE]\n\n",
            true,
        ),
        ("plain text body, not JSON\r\nsecond line", false),
        (
            "{\r\n  \"model\" : \"m\",\n\t\"stream\": true, \"n\": null, \"t\": -1.5e3,\n  \"tools\": [ {\"type\": \"function\", \"x\": [[1, 2], {\"k\\\"ey\": \"v\"}]} ],\n  \"usage\": {\"prompt_tokens\": 9, \"completion_tokens\":4}, \"bad\": @, \"role\": \"user\"\r\n}",
            false,
        ),
        (
            "data:{\"choices\":[{\"delta\":{\"content\":\"tok0 \"},\"index\":0}],\"id\":\"chatcmpl-3\",\"model\":\"m\",\"object\":\"chat.completion.chunk\"}\n\ndat: {\"a\":1}\ndatax: {\"b\":2}\n: comment\ndata:  [1, true, \"s\"]\r\ndata: {\"usage\":{\"completion_tokens\":64},\"stop_reason\":\"end\"}\n\n",
            true,
        ),
        (
            r#"{"a_key_longer_than_twenty_four_bytes_is_never_kept":"secret","model":"kept"}"#,
            false,
        ),
    ];
    for (text, sse) in texts {
        for pieces in 1..=text.len() {
            let mut bulk = BodyState::default();
            let mut bytewise = BodyState::default();
            bulk.reset(sse);
            bytewise.reset(sse);
            let mut a = text.as_bytes().to_vec();
            let mut b = a.clone();
            let n = a.len().div_ceil(pieces);
            for (k, (ca, cb)) in a.chunks_mut(n).zip(b.chunks_mut(n)).enumerate() {
                if k == 3 && pieces > 6 {
                    bulk.gap();
                    bytewise.gap();
                }
                bulk.redact(K, ca);
                for x in cb {
                    bytewise.byte(K, x);
                }
            }
            assert_eq!(
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b),
                "{pieces} pieces of {text:?}"
            );
            // And the lexer is left where it would be: the next piece is read alike.
            assert_eq!(
                format!("{bulk:?}"),
                format!("{bytewise:?}"),
                "{pieces} pieces of {text:?}"
            );
        }
    }
}

#[test]
fn json_keeps_structure_and_attribution_keys_only() {
    let req = r#"{"model":"llama-3","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"SECRET prompt \"quoted\""}],"prompt":[101,2023,3],"user":"alice"}"#;
    for pieces in [1, 3, 17, req.len()] {
        let out = body(req, false, pieces);
        assert_eq!(out.len(), req.len());
        assert!(!out.contains("SECRET") && !out.contains("alice") && !out.contains("2023"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(v["model"], "llama-3");
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 64);
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["prompt"].as_array().map(Vec::len), Some(3));
        assert_eq!(out, body(req, false, 1), "the same however it is cut");
    }
}

#[test]
fn equal_starts_stay_equal_and_different_ones_differ() {
    let a = body(
        r#"{"prompt":"You are helpful. Tell me about cats"}"#,
        false,
        1,
    );
    let b = body(
        r#"{"prompt":"You are helpful. Tell me about dogs"}"#,
        false,
        1,
    );
    let shared = r#"{"prompt":"You are helpful. Tell me about "#.len();
    assert_eq!(a[..shared], b[..shared]);
    assert_ne!(a[shared..], b[shared..]);
    let other_key = {
        let mut s = BodyState::default();
        s.reset(false);
        let mut x = br#"{"prompt":"You are helpful. Tell me about cats"}"#.to_vec();
        s.redact(Key([9, 9]), &mut x);
        String::from_utf8(x).expect("ascii")
    };
    assert_ne!(a, other_key, "another key, other pseudonyms");
}

#[test]
fn sse_keeps_fields_usage_and_done() {
    let stream = "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n\
                  data: {\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2}}\n\n\
                  event: note\ndata: [DONE]\n\n";
    let out = body(stream, true, 5);
    assert!(!out.contains("Hello") && !out.contains("note"));
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines[0].starts_with("data: {\"id\":\"c1\""), "{out}");
    let usage: serde_json::Value =
        serde_json::from_str(lines[1].trim_start_matches("data: ")).expect("json");
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert!(lines[2].starts_with("event: "));
    assert_eq!(lines[3], "data: [DONE]");
}

#[test]
fn what_review_found_is_replaced_too() {
    // Tool arguments and metadata below the depth attribution reads: keys, numbers, ids.
    let req = r#"{"model":"m","tools":[{"type":"function"}],"messages":[{"role":"assistant","tool_calls":[{"id":"c1","function":{"name":"pay","arguments":{"account":98765432,"id":"passport X"}}}]}],"usage":{"prompt_tokens_details":{"cached_tokens":7}}}"#;
    let out = body(req, false, 3);
    for secret in ["98765432", "account", "passport"] {
        assert!(!out.contains(secret), "{secret} in {out}");
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
    assert_eq!(v["model"], "m");
    // SSE: a JSON object spread over lines, plain text, a comment; nothing of them stays.
    let stream = "data: {\"role\":\"assistant\",\ndata:   \"content\":\"SECRET\"}\n\n\
                  data: plain SECRET 4111\n: comment 4111\n\ndata: [DONE]\n\n";
    let out = body(stream, true, 4);
    assert!(!out.contains("SECRET") && !out.contains("4111"), "{out}");
    assert!(out.contains("data: [DONE]"), "{out}");
    // A hole in the capture: the rest of the body is replaced.
    let mut s = BodyState::default();
    s.reset(false);
    let mut a = br#"{"prompt":"first part "#.to_vec();
    s.redact(K, &mut a);
    s.gap();
    let mut b = br#"ends","x":"after 4111 the gap"}"#.to_vec();
    s.redact(K, &mut b);
    let b = String::from_utf8(b).expect("ascii");
    assert!(!b.contains("4111") && !b.contains("after"), "{b}");
}

#[test]
fn heads_lose_query_strings_odd_credentials_and_anything_after_a_bare_lf() {
    let redact = |text: &str| {
        let mut h = HeadState::default();
        h.reset();
        let mut v = text.as_bytes().to_vec();
        h.redact(K, &mut v);
        String::from_utf8(v).expect("ascii")
    };
    let out = redact(
        "POST /v1beta/models/x:generateContent?key=AIzaSECRET&alt=sse HTTP/1.1\r\nAuthorization : Bearer SECRET\r\nX-Auth-Token: SECRET\r\nCookie: a=1;\r\n b=SECRET\r\n\r\n{\"a\":1}",
    );
    assert!(!out.contains("SECRET"), "{out}");
    assert!(
        out.starts_with("POST /v1beta/models/x:generateContent?"),
        "{out}"
    );
    assert!(!out.contains("AIza") && !out.contains("Bearer"), "{out}");
    assert!(
        out.contains(" HTTP/1.1\r\n") && out.ends_with("\r\n\r\n{\"a\":1}"),
        "{out}"
    );
    // LF-only: the framing does not end the head there, so nothing after it is kept.
    let out = redact("POST / HTTP/1.1\nContent-Length: 20\n\n{\"prompt\":\"SECRET\"}");
    assert!(!out.contains("SECRET"), "{out}");
}

#[test]
fn text_bodies_and_credentials_are_replaced() {
    assert_eq!(
        body("plain SECRET\r\ntext", false, 2),
        "xxxxxxxxxxxx\r\nxxxx"
    );
    let mut head = b"POST /v1/chat HTTP/1.1\r\nAuthorization: Bearer sk-SECRET\r\nX-Request-Id: r1\r\n\r\n{\"a\":1}".to_vec();
    let mut h = HeadState::default();
    h.reset();
    h.redact(K, &mut head);
    let text = String::from_utf8(head).expect("ascii");
    assert!(
        !text.contains("SECRET") && !text.contains("Bearer"),
        "{text}"
    );
    assert!(text.contains("X-Request-Id: r1\r\n\r\n{\"a\":1}"), "{text}");
    assert!(text.starts_with("POST /v1/chat HTTP/1.1\r\nAuthorization: "));
}

#[test]
fn heads_redact_the_same_whatever_the_pieces() {
    let head = "POST /v1/chat?key=SECRET&x=1 HTTP/1.1\r\nHost: example\r\nAuthorization: Bearer sk-SECRET\r\nUser-Agent: a long agent value / 1.0\r\nCookie: a=1;\r\n\tb=SECRET\r\nX-Request-Id: r1\r\n\r\n{\"a\":1}";
    let whole = {
        let mut h = HeadState::default();
        h.reset();
        let mut v = head.as_bytes().to_vec();
        h.redact(K, &mut v);
        v
    };
    assert!(!String::from_utf8_lossy(&whole).contains("SECRET"));
    for size in 1..head.len() {
        let mut h = HeadState::default();
        h.reset();
        let mut v = head.as_bytes().to_vec();
        for piece in v.chunks_mut(size) {
            h.redact(K, piece);
        }
        assert_eq!(v, whole, "pieces of {size}");
    }
}
