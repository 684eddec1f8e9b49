//! Continuous batching and energy ground truth.

mod common;

use std::thread;

use serde_json::{Value, json};
use tracer_emuhost::client::Conn;

use common::{Server, contents};

#[test]
fn concurrent_streams_overlap_and_energy_adds_up() {
    let mut server = Server::start("batching", 2, &[]);
    let addr = server.addr();
    let n_req = 4;
    let handles: Vec<_> = (0..n_req)
        .map(|i| {
            thread::spawn(move || {
                thread::sleep(std::time::Duration::from_millis(40 * i as u64));
                let mut c = Conn::connect(addr).expect("connect");
                let id = format!("batch-{i}");
                let r = c
                    .post_json(
                        "/v1/chat/completions",
                        &[("X-Request-Id", &id)],
                        &json!({
                            "messages": [{"role": "user", "content": "q".repeat(400 + 300 * i)}],
                            "max_tokens": 30, "stream": true,
                            "stream_options": {"include_usage": true},
                        }),
                    )
                    .expect("request");
                assert_eq!(r.status, 200);
                let evs = r.event_json().expect("events");
                assert_eq!(contents(&evs).len(), 30);
                let first = r.events.first().expect("events").at_us;
                let last = r.events.last().expect("events").at_us;
                (first, last)
            })
        })
        .collect();
    let times: Vec<(u64, u64)> = handles
        .into_iter()
        .map(|h| h.join().expect("client"))
        .collect();
    // Later requests get their first token while the first one is still generating.
    for (i, t) in times.iter().enumerate().skip(1) {
        assert!(t.0 < times[0].1, "request {i}: {times:?}");
    }

    let truth = server.stop();
    let summary = truth.last().expect("summary");
    assert_eq!(summary["summary"], true);
    let reqs: Vec<&Value> = truth
        .iter()
        .filter(|l| l.get("summary").is_none())
        .collect();
    assert_eq!(reqs.len(), n_req);
    let mut attributed = 0.0;
    for r in &reqs {
        assert_eq!(r["aborted"], false);
        assert_eq!(r["completion_tokens"], 30);
        let total = r["total_j"].as_f64().expect("total_j");
        let dynamic = r["dynamic_j"].as_f64().expect("dynamic_j");
        let idle = r["idle_j"].as_f64().expect("idle_j");
        assert!(dynamic > 0.0 && idle > 0.0);
        assert!((dynamic + idle - total).abs() < 1e-9);
        let per_gpu: Vec<f64> = r["per_gpu_j"]
            .as_array()
            .expect("per_gpu_j")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(per_gpu.len(), 2);
        assert!((per_gpu.iter().sum::<f64>() - total).abs() < 1e-9);
        let (a, f, e) = (
            r["arrive_us"].as_u64().expect("arrive"),
            r["first_token_us"].as_u64().expect("first"),
            r["end_us"].as_u64().expect("end"),
        );
        assert!(a <= f && f <= e);
        attributed += total;
    }
    let ids: Vec<&str> = reqs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    for i in 0..n_req {
        assert!(ids.contains(&format!("batch-{i}").as_str()), "{ids:?}");
    }
    let idle_outside = summary["idle_outside_requests_j"].as_f64().expect("idle");
    let counters: f64 = summary["energy_j_per_gpu"]
        .as_array()
        .expect("per gpu")
        .iter()
        .filter_map(Value::as_f64)
        .sum();
    let err = (attributed + idle_outside - counters).abs() / counters;
    assert!(
        err < 0.01,
        "attributed {attributed} + idle {idle_outside} vs counters {counters}"
    );
    // Requests ran together: their summed in-request time exceeds the busy wall time.
    assert!(attributed > 0.0 && idle_outside > 0.0);
}
