//! The store's cost per record as the daemon pays it on its writer thread: records like the
//! no-op load's (one CPU device; ~740 bytes as JSON, ~190 as the stored row) committed in groups of 2,000 (what a
//! 100 ms tick finalises at 20,000 requests/s) into a fresh store, CPU time of the thread
//! (user and system: the WAL's and the checkpoints' writes are system time) over the records.
//! `cargo bench -p tracer --bench store_write` (issue 17; `BENCHMARKS.md`).

use std::{sync::Arc, time::Instant};

use tracer::{ledger::RequestRecord, pipeline::FinalRecord, store::Store};

/// Records per run, and per transaction.
const N: u64 = 200_000;
const GROUP: usize = 2_000;
const END_MS: i64 = 1_796_464_800_000;

/// CPU time of this thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    let template: RequestRecord = serde_json::from_str(
        r#"{"id":80000,"external_id":null,"service":1,"model":"bench","arrive_ns":56321782501488,"first_byte_ns":56321782519134,"first_event_ns":null,"end_ns":56321782519134,"outcome":"complete","prompt_tokens":14,"cached_tokens":null,"completion_tokens":4,"events":0,"response_bytes":312,"devices":[{"device":0,"name":"cpu0-model","kind":"cpu_package","estimated":true,"dynamic_j":0.005647975880872576,"idle_j":0.004220519874252216,"uncertainty_j":0.0017001263147811076,"sensor_j":0.0004934247877562396,"coverage_j":0.0,"split_j":0.00162694851333375}],"dynamic_j":0.005647975880872576,"idle_j":0.004220519874252216,"total_j":0.00986849575512479,"kwh":2.7412488208679974e-9,"joules_per_output_token":0.0024671239387811976,"occupancy":30.0,"uncertainty_j":0.0017001263147811076,"coverage_gap_ns":0}"#,
    )
    .expect("template record");
    let records: Vec<Arc<FinalRecord>> = (1..=N)
        .map(|id| {
            let mut record = template.clone();
            record.id.0 = id;
            record.total_j += id as f64 * 1e-9;
            Arc::new(FinalRecord {
                record,
                service_name: "port 42177".into(),
                workload: None,
                end_unix_ms: END_MS + (id / 20) as i64,
                cost: None,
            })
        })
        .collect();
    for round in 1..=3 {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut store = Store::open(dir.path()).expect("store");
        let run = store.begin_run(END_MS).expect("run").run;
        let (wall, cpu) = (Instant::now(), thread_cpu_ns());
        for (i, group) in records.chunks(GROUP).enumerate() {
            store
                .insert_in(run, i as u32 / 100, group, false)
                .expect("insert");
        }
        let cpu_ns = thread_cpu_ns() - cpu;
        let bytes = store.used_bytes().expect("size");
        println!(
            "round {round}: {N} records in groups of {GROUP}: {:.2} µs CPU per record ({:.2} µs wall), {} database bytes per record",
            cpu_ns as f64 / N as f64 / 1e3,
            wall.elapsed().as_nanos() as f64 / N as f64 / 1e3,
            bytes / N,
        );
    }
}
