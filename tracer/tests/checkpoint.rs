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

/// The real H200 recording, cut at many points: a pipeline restored from the live one's
/// checkpoint and fed the rest gives exactly the records the live one gave after the cut.
#[test]
fn a_restored_pipeline_gives_the_live_records_after_the_checkpoint() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/h200/live.rec");
    let mut rp = Replayer::open(&path).expect("fixture");
    let mut inputs = Vec::new();
    while let Some(i) = rp.next_input().expect("read") {
        inputs.push(i);
    }
    if !matches!(inputs.last(), Some(Input::Finish)) {
        inputs.push(Input::Finish);
    }
    let (bus, live_got) = collecting();
    let mut live = Pipeline::new(&rp.header.pipeline, bus).expect("pipeline");
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
