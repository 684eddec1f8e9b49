//! Checkpoints: the pipeline's whole state (everything but its subscribers) as bytes, so a
//! recording can start mid-run. The journal starts a new segment with one (bounding how much a
//! recovery replays), and `tracer replay` of a segment restores it and gives the same records
//! as the live run did, bit for bit, because the pipeline is deterministic and its state is all
//! there is besides the inputs.
//!
//! Encoding: CBOR (self-describing, so serde's tagged enums work; binary, so every f64 comes
//! back bit for bit). The layout is the build's own types: a checkpoint is read by the tracer
//! version that wrote it.

use serde::{Deserialize, Serialize};

use super::{Bus, Fact, Pipeline};

/// Why a checkpoint could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Encoding the state failed (a state type that does not serialise: a bug).
    #[error("encoding the pipeline's state: {0}")]
    Encode(String),
    /// The bytes are not a checkpoint (corrupt, or another layout).
    #[error("decoding the pipeline's state: {0}")]
    Decode(String),
    /// Larger than a recording frame may be ([`MAX_BYTES`]): not taken.
    #[error("the pipeline's state is {0} bytes, over the {MAX_BYTES}-byte limit of a checkpoint")]
    TooLarge(usize),
    /// Written by another tracer version, whose state layout this build does not know.
    #[error(
        "checkpoint written by tracer {found}, this is {this}: replay it with that version, or the run's journal from its first segment"
    )]
    Version { found: String, this: &'static str },
}

/// The largest checkpoint a recording holds (every open connection's buffers are in it).
pub const MAX_BYTES: usize = 1 << 30;

/// This build's version, which names the state layout.
const THIS: &str = env!("CARGO_PKG_VERSION");

#[derive(Serialize)]
struct Out<'a> {
    tracer_version: &'a str,
    state: &'a Pipeline,
}

#[derive(Deserialize)]
struct Head {
    tracer_version: String,
}

#[derive(Deserialize)]
struct In {
    state: Pipeline,
}

impl Pipeline {
    /// The pipeline's state as bytes ([`Pipeline::restore`] reads them).
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut out = Vec::new();
        crate::memo::checkpointing(|| {
            ciborium::into_writer(
                &Out {
                    tracer_version: THIS,
                    state: self,
                },
                &mut out,
            )
        })
        .map_err(|e| CheckpointError::Encode(e.to_string()))?;
        if out.len() > MAX_BYTES {
            return Err(CheckpointError::TooLarge(out.len()));
        }
        Ok(out)
    }

    /// Publishes a checkpoint to the subscribers that want one (the journal starts its next
    /// segment with it); does nothing when none does. Call it between inputs. Returns its
    /// size in bytes (0: nobody wanted one).
    pub fn checkpoint(&mut self) -> Result<usize, CheckpointError> {
        if !self.bus.interest().checkpoints {
            return Ok(0);
        }
        let bytes = self.checkpoint_bytes()?;
        self.bus.publish(&Fact::Checkpoint(&bytes));
        Ok(bytes.len())
    }

    /// The pipeline a checkpoint describes, publishing to `bus`: fed the inputs that followed
    /// the checkpoint, it gives what the pipeline that wrote it gave.
    pub fn restore(bytes: &[u8], bus: Bus) -> Result<Self, CheckpointError> {
        let head: Head =
            ciborium::from_reader(bytes).map_err(|e| CheckpointError::Decode(e.to_string()))?;
        if head.tracer_version != THIS {
            return Err(CheckpointError::Version {
                found: head.tracer_version,
                this: THIS,
            });
        }
        let In { state } =
            ciborium::from_reader(bytes).map_err(|e| CheckpointError::Decode(e.to_string()))?;
        Ok(Self { bus, ..state })
    }
}
