//! API query latency with 1,000,000 final records in memory (what `api.memory_records` can be
//! set to): one record by id, a page of 1,000 with a model filter, a summary by model over
//! 24 hours. Measured in process on the same routes the socket serves (the socket adds one
//! local HTTP exchange, not measured here), as p50 and p99 over repeated calls on one core.
//! `cargo bench -p tracer --bench api`.

use std::{sync::Arc, time::Instant};

use tracer::{
    api::{Feed, Shared, get_as_root},
    ledger::RequestRecord,
    pipeline::{Fact, FinalRecord, Subscriber as _},
};

const N: u64 = 1_000_000;
/// Unix ms of the last record; one record every 86.4 ms spans 24 hours.
const END_MS: i64 = 1_796_464_800_000;

fn record(id: u64, template: &RequestRecord) -> Arc<FinalRecord> {
    let mut record = template.clone();
    record.id.0 = id;
    record.model = Some(format!("model-{}", id % 8));
    record.total_j = 1.0 + (id % 97) as f64;
    Arc::new(FinalRecord {
        record,
        service_name: format!("port {}", 8000 + id % 4),
        end_unix_ms: END_MS - ((N - id) as f64 * 86.4) as i64,
    })
}

fn percentiles(name: &str, runs: usize, mut f: impl FnMut() -> usize) {
    let mut ns: Vec<u128> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e6;
    println!(
        "{name:<44} p50 {:>9.3} ms   p99 {:>9.3} ms   ({runs} runs)",
        at(0.5),
        at(0.99)
    );
}

fn main() {
    let template: RequestRecord = serde_json::from_str(
        r#"{"id":0,"external_id":null,"service":1,"model":"m","arrive_ns":1,"first_byte_ns":2,"first_event_ns":null,"end_ns":3,"outcome":"complete","prompt_tokens":500,"cached_tokens":null,"completion_tokens":200,"events":200,"response_bytes":30000,"devices":[{"device":0,"name":"gpu0","kind":"gpu","estimated":false,"dynamic_j":40.0,"idle_j":10.0,"uncertainty_j":2.0,"sensor_j":1.0,"coverage_j":0.5,"split_j":0.5}],"dynamic_j":40.0,"idle_j":10.0,"total_j":50.0,"kwh":1.4e-5,"joules_per_output_token":0.25,"uncertainty_j":2.0,"coverage_gap_ns":0}"#,
    )
    .expect("template record");
    let shared = Shared::new(N as usize);
    let mut feed = Feed {
        shared: Arc::clone(&shared),
        records: true,
    };
    let t = Instant::now();
    for id in 1..=N {
        feed.on_fact(&Fact::Record(&record(id, &template)))
            .expect("fed");
    }
    println!(
        "fed {N} records in {:.2} s ({:.0} records/s through the API's subscriber)",
        t.elapsed().as_secs_f64(),
        N as f64 / t.elapsed().as_secs_f64()
    );
    let mut id = 1u64;
    percentiles("one record by id", 10_000, || {
        id = id * 7_919 % N + 1;
        get_as_root(&shared, &format!("/v1/requests/{id}")).1.len()
    });
    percentiles("a page of 1,000 (model filter)", 200, || {
        get_as_root(&shared, "/v1/requests?model=model-3&limit=1000")
            .1
            .len()
    });
    percentiles("a page of 1,000 (no filter)", 200, || {
        get_as_root(&shared, "/v1/requests?limit=1000").1.len()
    });
    let since = END_MS - 86_400_000;
    percentiles("summary by model over 24 h (1 M records)", 50, || {
        get_as_root(&shared, &format!("/v1/summary?by=model&since={since}"))
            .1
            .len()
    });
}
