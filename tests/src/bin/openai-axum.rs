//! A minimal OpenAI-style server on axum/hyper (which answers with `writev`), for the probe and
//! load tests. `POST /v1/chat/completions`: `"stream": true` gives SSE events (one per token, a
//! usage chunk when `stream_options.include_usage`, then `[DONE]`, with `: keep-alive` comments
//! interleaved when `"keepalive": true`); otherwise one JSON body with `usage`. Completion tokens
//! = `max_tokens`. Prints `listening <port>` when ready.

use std::{convert::Infallible, time::Duration};

use axum::{
    Json, Router,
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, Sse},
    },
    routing::{get, post},
};
use futures_util::stream;
use serde_json::{Value, json};

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn completions(headers: HeaderMap, Json(req): Json<Value>) -> Response {
    let n = req["max_tokens"].as_u64().unwrap_or(4);
    let prompt = req["messages"].to_string().len() as u64 / 4;
    let usage =
        json!({"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n});
    let model = req["model"].clone();
    let rid = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut resp = if req["stream"].as_bool() == Some(true) {
        let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
        let keepalive = req["keepalive"].as_bool() == Some(true);
        let delay = Duration::from_millis(req["token_delay_ms"].as_u64().unwrap_or(1));
        let mut events: Vec<Event> = Vec::new();
        for i in 0..n {
            if keepalive && i % 2 == 1 {
                events.push(Event::default().comment("keep-alive"));
            }
            let chunk = json!({"id": "chatcmpl-3", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}}]});
            events.push(Event::default().data(chunk.to_string()));
        }
        if include_usage {
            let chunk = json!({"id": "chatcmpl-3", "object": "chat.completion.chunk", "choices": [], "usage": usage});
            events.push(Event::default().data(chunk.to_string()));
        }
        events.push(Event::default().data("[DONE]"));
        let s = stream::unfold(events.into_iter(), move |mut it| async move {
            let ev = it.next()?;
            tokio::time::sleep(delay).await;
            Some((Ok::<_, Infallible>(ev), it))
        });
        Sse::new(s).into_response()
    } else {
        Json(json!({"id": "chatcmpl-4", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x".repeat(n as usize)}}],
            "usage": usage}))
        .into_response()
    };
    if let Some(rid) = rid.and_then(|r| r.parse().ok()) {
        resp.headers_mut().insert("x-request-id", rid);
    }
    resp
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/chat/completions", post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("listening {}", listener.local_addr().expect("addr").port());
    axum::serve(listener, app).await.expect("serve");
}
