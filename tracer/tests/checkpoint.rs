//! Checkpoints (issue 16): a pipeline restored from a checkpoint and fed the inputs after it
//! gives what the live pipeline gave; bad checkpoints are errors.

use std::sync::{Arc, Mutex};

use tracer::{
    pipeline::{
        Bus, CheckpointError, Fact, Input, Interest, Pipeline, PipelineConfig, Subscriber,
        SubscriberError,
    },
    record::format::Replayer,
};

/// Every final record, as JSON (what the outputs get).
struct Records(Arc<Mutex<Vec<String>>>);

impl Subscriber for Records {
    fn name(&self) -> &'static str {
        "test records"
    }
    fn interest(&self) -> Interest {
        Interest {
            records: true,
            ..Interest::default()
        }
    }
    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        if let Fact::Record(r) = fact {
            let json = serde_json::to_string(&***r)?;
            self.0.lock().expect("lock").push(json);
        }
        Ok(())
    }
}

fn collecting() -> (Bus, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut bus = Bus::new();
    bus.subscribe(Box::new(Records(Arc::clone(&got))));
    (bus, got)
}

/// The real H200 recording's header and inputs.
fn h200() -> (tracer::record::format::RecordHeader, Vec<Input>) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/h200/live.rec");
    let mut rp = Replayer::open(&path).expect("fixture");
    let mut inputs = Vec::new();
    while let Some(i) = rp.next_input().expect("read") {
        inputs.push(i);
    }
    (rp.header, inputs)
}

/// The real H200 recording, cut at many points: a pipeline restored from the live one's
/// checkpoint and fed the rest gives exactly the records the live one gave after the cut.
#[test]
fn a_restored_pipeline_gives_the_live_records_after_the_checkpoint() {
    let (header, mut inputs) = h200();
    if !matches!(inputs.last(), Some(Input::Finish)) {
        inputs.push(Input::Finish);
    }
    let (bus, live_got) = collecting();
    let mut live = Pipeline::new(&header.pipeline, bus).expect("pipeline");
    let step = inputs.len() / 9;
    let mut cuts = Vec::new();
    for (n, input) in inputs.iter().enumerate() {
        if n > 0 && n % step == 0 {
            let done = live_got.lock().expect("lock").len();
            cuts.push((n, done, live.checkpoint_bytes().expect("checkpoint")));
        }
        live.apply(input.clone());
    }
    let live_records = live_got.lock().expect("lock").clone();
    assert!(live_records.len() > 20, "{}", live_records.len());
    assert!(cuts.len() >= 8);
    let mut covered = 0;
    for (n, done, bytes) in cuts {
        let (bus, got) = collecting();
        let mut restored = Pipeline::restore(&bytes, bus).expect("restore");
        for input in &inputs[n..] {
            restored.apply(input.clone());
        }
        let got = got.lock().expect("lock").clone();
        assert_eq!(got, live_records[done..], "cut at input {n}");
        covered += got.len();
    }
    assert!(covered > 0);
}

#[test]
fn garbage_and_other_versions_are_errors() {
    assert!(matches!(
        Pipeline::restore(b"not a checkpoint", Bus::new()),
        Err(CheckpointError::Decode(_))
    ));
    let (bus, _) = collecting();
    let p = Pipeline::new(&PipelineConfig::default(), bus).expect("new");
    let bytes = p.checkpoint_bytes().expect("checkpoint");
    let mut v: ciborium::Value = ciborium::from_reader(&bytes[..]).expect("cbor");
    if let ciborium::Value::Map(m) = &mut v {
        for (k, val) in m.iter_mut() {
            if k.as_text() == Some("tracer_version") {
                *val = ciborium::Value::Text("0.0.0-other".into());
            }
        }
    }
    let mut other = Vec::new();
    ciborium::into_writer(&v, &mut other).expect("encode");
    assert!(matches!(
        Pipeline::restore(&other, Bus::new()),
        Err(CheckpointError::Version { .. })
    ));
    assert!(Pipeline::restore(&bytes, Bus::new()).is_ok());
}

/// The journal as the daemon writes it (a recorder in journal mode, a checkpoint published
/// every few hundred inputs): each segment replays on its own to the records the live pipeline
/// finalised in it, its summary counts what happened in it (not the run's totals carried by
/// its checkpoint), and consecutive segments replay as one.
#[test]
fn each_journal_segment_replays_to_its_own_records() {
    use tracer::record::{
        format::{RecordHeader, Recorder, segment_path},
        replay::{ReplayOptions, replay_records},
    };
    let (header, inputs) = h200();
    let dir = std::env::temp_dir().join(format!("tracer-journal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let first = dir.join("run-1.rec");
    let header = RecordHeader {
        segment: 0,
        ..header
    };
    let (mut bus, live_got) = collecting();
    bus.subscribe(Box::new(
        Recorder::journal(&first, &header).expect("journal"),
    ));
    let mut live = Pipeline::new(&header.pipeline, bus).expect("pipeline");
    let step = inputs.len() / 4;
    // Records the live pipeline had given when each segment began.
    let mut starts = vec![0];
    for (n, input) in inputs.iter().enumerate() {
        if n > 0 && n % step == 0 && starts.len() < 4 {
            starts.push(live_got.lock().expect("lock").len());
            assert!(live.checkpoint().expect("checkpoint") > 0);
        }
        live.apply(input.clone());
    }
    live.apply(Input::Finish);
    live.flush();
    drop(live);
    let live_records = live_got.lock().expect("lock").clone();
    starts.push(live_records.len());
    // The whole journal as one chain; each segment's energy adds up to it.
    let (all, whole) = replay_records(&ReplayOptions {
        continued: (1..4).map(|k| segment_path(&first, k)).collect(),
        ..ReplayOptions::of(&first)
    })
    .expect("the whole journal");
    assert_eq!(all.len(), live_records.len());
    let mut measured_j = replay_records(&ReplayOptions::of(&first))
        .expect("segment 0")
        .1
        .measured_j;
    for k in 1..4u32 {
        let seg = segment_path(&first, k);
        let (got, summary) = replay_records(&ReplayOptions::of(&seg)).expect("segment");
        let got: Vec<String> = got
            .iter()
            .map(|r| serde_json::to_string(&*r.record).expect("json"))
            .collect();
        let (a, b) = (starts[k as usize], starts[k as usize + 1]);
        assert_eq!(got, live_records[a..b], "segment {k}");
        assert_eq!(summary.records as usize, b - a, "segment {k}: {summary}");
        assert!(summary.measured_j > 0.0, "segment {k}: {summary}");
        measured_j += summary.measured_j;
        if k < 3 {
            assert!(summary.continued, "segment {k} goes on: {summary}");
        }
    }
    assert!(
        (measured_j - whole.measured_j).abs() <= 1e-9 * whole.measured_j,
        "segments {measured_j} J, whole {}",
        whole.measured_j
    );
    // Segments 2 and 3 as one: their records, in order.
    let (got, _) = replay_records(&ReplayOptions {
        continued: vec![segment_path(&first, 3)],
        ..ReplayOptions::of(&segment_path(&first, 2))
    })
    .expect("chain");
    assert_eq!(got.len(), starts[4] - starts[2]);
    assert!(got.iter().all(|r| r.segment >= 2));
    // Another policy cannot start from a checkpoint.
    let split = ReplayOptions {
        split: Some(tracer::ledger::SplitPolicy::Equal),
        ..ReplayOptions::of(&segment_path(&first, 1))
    };
    assert!(replay_records(&split).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
