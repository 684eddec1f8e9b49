//! API query latency with 1,000,000 final records: first all in memory (what
//! `api.memory_records` can be set to), then as the daemon runs by default — stored in `SQLite`
//! through the store's writer (its sustained write rate, and what the pipeline's thread pays per
//! record), the newest 100,000 in memory. One record by id, a page of 1,000 with a model
//! filter, a summary by model over 24 hours: measured in process on the same routes the socket
//! serves, and, for the default (the store), also over the real Unix socket (`Api`, hyper, a
//! keep-alive HTTP/1.1 client reading whole answers), as p50 and p99.
//! `cargo bench -p tracer --bench api` (as root: the socket's peer is then root, who sees all).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    sync::Arc,
    time::Instant,
};

use tracer::{
    api::{Api, ApiConfig, Feed, Shared, get_as_root},
    ledger::RequestRecord,
    pipeline::{Fact, FinalRecord, Subscriber as _},
    store::{Store, StoreConfig, StoreWriter},
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
        workload: None,
        record,
        service_name: format!("port {}", 8000 + id % 4),
        end_unix_ms: END_MS - ((N - id) as f64 * 86.4) as i64,
        cost: None,
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
    drop(shared);
    stored(&template);
}

/// The default: every record through the store's writer, the newest 100,000 in memory.
fn stored(template: &RequestRecord) {
    let dir = std::env::temp_dir().join(format!("tracer-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = Store::open(&dir).expect("store");
    let run = store.begin_run(END_MS).expect("run");
    let shared = Shared::new(100_000);
    let on_commit = {
        let shared = Arc::clone(&shared);
        Box::new(move |records: &[Arc<FinalRecord>]| {
            for r in records {
                shared.add_record(r);
            }
        })
    };
    let writer =
        StoreWriter::start(store, run.run, StoreConfig::default(), on_commit).expect("writer");
    let mut feed = writer.feed();
    let records: Vec<_> = (1..=N).map(|id| record(id, template)).collect();
    let t = Instant::now();
    let mut feeding = std::time::Duration::ZERO;
    for chunk in records.chunks(10_000) {
        let f = Instant::now();
        for r in chunk {
            feed.on_fact(&Fact::Record(r)).expect("fed");
        }
        feeding += f.elapsed();
    }
    writer.sync();
    let total = t.elapsed().as_secs_f64();
    let stats = writer.stats();
    println!(
        "stored {N} records in {total:.2} s: {:.0} records/s committed ({} transactions; fed as fast as it takes them, {:.0} ns per record on the feeding side)",
        N as f64 / total,
        stats
            .transactions
            .load(std::sync::atomic::Ordering::Relaxed),
        feeding.as_nanos() as f64 / N as f64,
    );
    // At a sustained 20,000 records/s (the issue's rate), what the pipeline's thread pays.
    let paced: Vec<_> = (N + 1..=N + 100_000)
        .map(|id| record(id, template))
        .collect();
    let t = Instant::now();
    let mut feeding = std::time::Duration::ZERO;
    for (i, chunk) in paced.chunks(200).enumerate() {
        let due = std::time::Duration::from_millis(10 * i as u64);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
        let f = Instant::now();
        for r in chunk {
            feed.on_fact(&Fact::Record(r)).expect("fed");
        }
        feeding += f.elapsed();
    }
    writer.sync();
    println!(
        "at 20,000 records/s for {:.1} s: {:.0} ns per record on the pipeline's thread ({:.2} % of a core), all committed",
        t.elapsed().as_secs_f64(),
        feeding.as_nanos() as f64 / paced.len() as f64,
        100.0 * feeding.as_secs_f64() / t.elapsed().as_secs_f64()
    );
    drop(records);
    drop(paced);
    let store = writer.stop().expect("store back");
    drop(store);
    let shared = Shared::new(100_000);
    let loaded = shared
        .attach_store(Store::open_reader(&dir).expect("reader"), N + 100_001)
        .expect("attach");
    println!(
        "store: {} MiB, {loaded} newest records in memory",
        dir_mib(&dir)
    );
    let mut id = 1u64;
    percentiles(
        "store: one record by id (90 % not in memory)",
        10_000,
        || {
            id = id * 7_919 % N + 1;
            get_as_root(&shared, &format!("/v1/requests/{id}")).1.len()
        },
    );
    percentiles("store: a page of 1,000 (model filter, old)", 200, || {
        get_as_root(
            &shared,
            "/v1/requests?model=model-3&limit=1000&cursor=r500000",
        )
        .1
        .len()
    });
    let since = END_MS - 86_400_000;
    percentiles(
        "store: summary by model over 24 h (1 M records)",
        50,
        || {
            get_as_root(&shared, &format!("/v1/summary?by=model&since={since}"))
                .1
                .len()
        },
    );
    over_the_socket(&shared, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same three queries over the real socket, as `curl --unix-socket` would ask them.
fn over_the_socket(shared: &Arc<Shared>, dir: &std::path::Path) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = rt.enter();
    let sock = dir.join("bench.sock");
    let _api = Api::start(
        &ApiConfig::default(),
        &sock,
        Arc::clone(shared),
        "/proc".into(),
    )
    .expect("api");
    let mut client = SocketClient::connect(&sock);
    let mut id = 1u64;
    percentiles("socket: one record by id", 10_000, || {
        id = id * 7_919 % N + 1;
        client.get(&format!("/v1/requests/{id}"))
    });
    percentiles("socket: a page of 1,000 (model filter, old)", 200, || {
        client.get("/v1/requests?model=model-3&limit=1000&cursor=r500000")
    });
    percentiles("socket: a page of 1,000 (newest)", 200, || {
        client.get("/v1/requests?limit=1000")
    });
    let since = END_MS - 86_400_000;
    percentiles("socket: summary by model over 24 h", 50, || {
        client.get(&format!("/v1/summary?by=model&since={since}"))
    });
}

/// A keep-alive HTTP/1.1 client on a Unix socket that reads each answer whole.
struct SocketClient {
    stream: BufReader<UnixStream>,
}

impl SocketClient {
    fn connect(path: &std::path::Path) -> Self {
        Self {
            stream: BufReader::new(UnixStream::connect(path).expect("connect")),
        }
    }

    /// `GET path`: the body's length (a 200 is required).
    fn get(&mut self, path: &str) -> usize {
        write!(
            self.stream.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .expect("write");
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("status");
        assert!(line.starts_with("HTTP/1.1 200"), "{path}: {line}");
        let mut len = 0;
        loop {
            line.clear();
            self.stream.read_line(&mut line).expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).expect("body");
        len
    }
}

fn dir_mib(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum::<u64>()
    }) >> 20
}
