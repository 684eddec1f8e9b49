//! The output seam, driven by the H200 recording: every subscriber sees the same facts in the
//! same order, and a stalled lossy subscriber costs the others (and the ledger) nothing — its
//! drops are counted.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tracer::{
    output::jsonl::{JsonLines, Stream},
    pipeline::{Bus, Fact, Input, Interest, OwnedFact, Subscriber, SubscriberError},
    probe::decode::decode,
    record::{
        format::Replayer,
        replay::{ReplayOptions, ReplaySummary, replay_into},
    },
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/h200")
        .join(name)
}

fn options() -> ReplayOptions {
    ReplayOptions::of(&fixture("live.rec"))
}

/// A writer the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }
}

/// A record as the test compares it: id, external id, total energy.
type Seen = (u64, Option<String>, f64);

/// A second, independent subscriber: keeps each record's id, external id and energy.
struct Collect(Arc<Mutex<Vec<Seen>>>);

impl Subscriber for Collect {
    fn name(&self) -> &'static str {
        "collect"
    }

    fn interest(&self) -> Interest {
        Interest {
            records: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        if let Fact::Record(r) = fact {
            self.0.lock().expect("lock").push((
                r.record.id.0,
                r.record.external_id.clone(),
                r.record.total_j,
            ));
        }
        Ok(())
    }
}

fn jsonl_bus() -> (Bus, Shared) {
    let out = Shared::default();
    let mut bus = Bus::new();
    bus.subscribe(Box::new(JsonLines::new(
        Stream::Records,
        Box::new(out.clone()),
    )));
    (bus, out)
}

#[test]
fn a_second_subscriber_sees_exactly_what_the_jsonl_writer_writes() {
    let (mut bus, out) = jsonl_bus();
    let seen = Arc::new(Mutex::new(Vec::new()));
    bus.subscribe(Box::new(Collect(Arc::clone(&seen))));
    let summary = replay_into(&options(), bus).expect("replay");
    let text = out.text();
    assert_eq!(
        text,
        std::fs::read_to_string(fixture("live-records.jsonl")).expect("fixture"),
        "the JSON-lines subscriber writes the daemon's records"
    );
    let written: Vec<Seen> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
            (
                v["id"].as_u64().expect("id"),
                v["external_id"].as_str().map(str::to_string),
                v["total_j"].as_f64().expect("total_j"),
            )
        })
        .collect();
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(summary.records, 40);
    assert_eq!(seen.len(), 40);
    assert_eq!(seen, written, "same records, same order, same figures");
}

/// Probe records in the recording that decode (each is one event fact).
fn decodable_events() -> u64 {
    let mut rp = Replayer::open(&fixture("live.rec")).expect("open");
    let mut n = 0;
    while let Some(input) = rp.next_input().expect("read") {
        if let Input::Probe { bytes } = input
            && decode(&bytes).is_ok()
        {
            n += 1;
        }
    }
    n
}

fn totals(s: &ReplaySummary) -> [u64; 4] {
    [s.measured_j, s.attributed_j, s.idle_j, s.unattributed_j].map(f64::to_bits)
}

#[test]
fn a_stalled_lossy_subscriber_drops_and_counts_without_touching_the_rest() {
    let (bus, out) = jsonl_bus();
    let alone = replay_into(&options(), bus).expect("replay");
    let reference = out.text();

    let (mut bus, out) = jsonl_bus();
    // Never read: its queue holds 5 facts, the rest must be dropped and counted.
    let stalled = bus.subscribe_lossy(
        "stalled",
        Interest {
            records: true,
            events: true,
            ..Interest::default()
        },
        5,
    );
    let with_stall = replay_into(&options(), bus).expect("replay");
    assert_eq!(out.text(), reference, "the lossless output is unaffected");
    assert_eq!(
        totals(&with_stall),
        totals(&alone),
        "the ledger's totals are unaffected, bit for bit"
    );
    assert_eq!(with_stall.records, alone.records);
    assert_eq!(stalled.stats.delivered(), 5);
    assert_eq!(
        stalled.stats.dropped(),
        decodable_events() + with_stall.records - 5,
        "every fact past the queue is counted as dropped"
    );
    // What it did get is the start of the stream, in order.
    let mut rx = stalled.rx;
    let mut got = 0;
    while let Ok(f) = rx.try_recv() {
        assert!(matches!(f, OwnedFact::Event(_) | OwnedFact::Record(_)));
        got += 1;
    }
    assert_eq!(got, 5);
}
