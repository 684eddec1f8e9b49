//! Prefix caching.

mod common;

use serde_json::json;
use tracer_emuhost::client::Conn;

use common::Server;

#[test]
fn shared_prefix_is_cached() {
    let mut server = Server::start("prefix", 1, &[]);
    let mut c = Conn::connect(server.addr()).expect("connect");
    let system = "You are a helpful assistant. ".repeat(70); // ~2000 chars
    let ask = |c: &mut Conn, system: &str, user: &str| {
        let r = c
            .post_json(
                "/v1/chat/completions",
                &[],
                &json!({
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": user}],
                    "max_tokens": 2,
                }),
            )
            .expect("request");
        assert_eq!(r.status, 200);
        r.json().expect("json")["usage"].clone()
    };
    let first = ask(&mut c, &system, "What is the capital of France?");
    assert_eq!(first["prompt_tokens_details"]["cached_tokens"], 0);
    let second = ask(&mut c, &system, "And of Germany, please?");
    let cached = second["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    let prompt = second["prompt_tokens"].as_u64().expect("prompt");
    assert!(cached > 0, "{second}");
    assert_eq!(cached % 16, 0);
    assert!(cached < prompt);
    // The whole system prompt (2030 chars = 507 tokens) is shared: at least 496 tokens.
    assert!(cached >= 496, "{cached}");
    // An unrelated prompt does not hit.
    let other = ask(&mut c, "", &"z".repeat(3000));
    assert_eq!(other["prompt_tokens_details"]["cached_tokens"], 0);

    let truth = server.stop();
    assert_eq!(truth[1]["cached_tokens"].as_u64(), Some(cached));
    // Cached tokens are not prefilled: the second request costs less dynamic energy.
    let d0 = truth[0]["dynamic_j"].as_f64().expect("d0");
    let d1 = truth[1]["dynamic_j"].as_f64().expect("d1");
    assert!(d1 < d0, "{d0} vs {d1}");
}
