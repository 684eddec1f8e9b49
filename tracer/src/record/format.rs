//! Recordings: every input of the attribution pipeline, in order, so a bill can be recomputed
//! from raw data (`tracer replay`).
//!
//! Format: the magic `TRACERREC1\n`, then frames of `[tag: u8][len: u32 LE][len bytes]`.
//! Tag 0 is the header (JSON: format version, start time, the pipeline settings, whether
//! payloads are redacted), tag 1 a probe record in the kernel's format (decoded again at replay
//! by the same code), tag 2 any other [`Input`] as JSON (power readings, devices, services,
//! clock ticks). A recording cut short (the daemon was killed) replays up to its last whole
//! frame.
//!
//! Tag 3 is a checkpoint (the pipeline's whole state, `pipeline::Pipeline::checkpoint`): a
//! journal is cut into segments (`run-N.rec`, `run-N.1.rec`, ...) and every segment after the
//! first starts with one, right after its header, so it replays on its own. Tag 4 ends a
//! segment that the next continues (its open requests are not cut short there).
//!
//! Version 2: data records hold what the tracker read, not what the kernel wrote: redacted
//! unless payloads were kept on purpose (`wire::redact`), a syscall captured in pieces put
//! together, IPC messages without their bytes. Version 1 recordings (raw payloads) replay as
//! before.

use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::pipeline::{Fact, Input, Interest, PipelineConfig, Subscriber, SubscriberError};

const MAGIC: &[u8; 11] = b"TRACERREC1\n";
const TAG_HEADER: u8 = 0;
const TAG_PROBE: u8 = 1;
const TAG_INPUT: u8 = 2;
const TAG_CHECKPOINT: u8 = 3;
/// The last frame of a journal segment that the next one continues.
const TAG_CONTINUED: u8 = 4;
/// Frames larger than this are corruption, not data (a probe record is at most ~4 KiB).
const MAX_FRAME: u32 = 64 << 20;
/// A checkpoint holds every open connection's buffers: allowed to be larger.
const MAX_CHECKPOINT: u32 = crate::pipeline::checkpoint::MAX_BYTES as u32;

/// Errors reading or writing a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the recording magic.
    #[error("{0}: not a tracer recording")]
    NotARecording(PathBuf),
    /// A frame is malformed (unknown tag, absurd length, invalid JSON).
    #[error("{path}: bad frame at byte {offset}: {detail}")]
    BadFrame {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    /// The first frame is not a header of a version this build reads.
    #[error("{path}: unsupported header: {detail}")]
    Header { path: PathBuf, detail: String },
}

/// The format version this build writes.
pub const VERSION: u32 = 2;

/// What the data records' payloads hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payloads {
    /// As captured: prompts, completions and credentials included (version 1, or kept on
    /// purpose with `--record-payloads`).
    #[default]
    Raw,
    /// Redacted by the tracker before it read them: no text, no credentials.
    Redacted,
}

/// The first frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordHeader {
    /// Format version (1 or 2).
    pub version: u32,
    /// What data records hold.
    #[serde(default)]
    pub payloads: Payloads,
    /// Wall-clock start of the recording, Unix milliseconds.
    pub started_unix_ms: i64,
    /// The tracer version that wrote it.
    pub tracer_version: String,
    /// The settings attribution ran with.
    pub pipeline: PipelineConfig,
    /// Which segment of a journal this is: 0 starts with the run, a later one with a
    /// checkpoint of the state where the one before it ended.
    #[serde(default)]
    pub segment: u32,
}

/// Where segment `k` of the journal whose first segment is `first` goes (`run-3.rec`,
/// `run-3.1.rec`, `run-3.2.rec`, ...).
pub fn segment_path(first: &Path, k: u32) -> PathBuf {
    if k == 0 {
        return first.to_owned();
    }
    let stem = first
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    first.with_file_name(format!("{stem}.{k}.rec"))
}

/// Writes a recording.
pub struct Recorder {
    w: BufWriter<File>,
    frames: u64,
    /// Bytes in the current file (the daemon starts a journal's next segment by size).
    written: Arc<AtomicU64>,
    /// A journal: a checkpoint ends the current segment and starts the next with it.
    segments: Option<Segments>,
}

struct Segments {
    first: PathBuf,
    header: RecordHeader,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates `path` and writes the header: one file, from the start (checkpoints are not
    /// kept).
    pub fn create(path: &Path, header: &RecordHeader) -> Result<Self, RecordError> {
        let mut r = Self {
            w: Self::open(path)?,
            frames: 0,
            written: Arc::new(AtomicU64::new(0)),
            segments: None,
        };
        r.header(path, header)?;
        Ok(r)
    }

    /// A journal whose first segment is `path` (header segment 0): every checkpoint ends the
    /// current segment and starts the next (`segment_path`) with it.
    pub fn journal(path: &Path, header: &RecordHeader) -> Result<Self, RecordError> {
        let mut r = Self::create(path, header)?;
        r.segments = Some(Segments {
            first: path.to_owned(),
            header: RecordHeader {
                segment: 0,
                ..header.clone()
            },
        });
        Ok(r)
    }

    /// Bytes of inputs written to the current segment so far (shared: the daemon reads it;
    /// when the journal is dropped, after a write failed, the daemon holds the only copy).
    pub fn written(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.written)
    }

    fn open(path: &Path) -> Result<BufWriter<File>, RecordError> {
        File::create(path)
            .map(|f| BufWriter::with_capacity(1 << 20, f))
            .map_err(|source| RecordError::Io {
                path: path.to_owned(),
                source,
            })
    }

    fn header(&mut self, path: &Path, header: &RecordHeader) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_owned(),
            source,
        };
        self.w.write_all(MAGIC).map_err(io)?;
        self.written.store(MAGIC.len() as u64, Ordering::Relaxed);
        let json = serde_json::to_vec(header).map_err(|e| io(e.into()))?;
        self.frame(TAG_HEADER, &json).map_err(io)
    }

    fn frame(&mut self, tag: u8, bytes: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
        self.w.write_all(&[tag])?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(bytes)?;
        self.frames += 1;
        self.written
            .fetch_add(5 + u64::from(len), Ordering::Relaxed);
        Ok(())
    }

    /// Ends the current segment (flushed whole) and starts the next with `state`.
    fn next_segment(&mut self, state: &[u8]) -> Result<(), RecordError> {
        let Some(seg) = &mut self.segments else {
            return Ok(());
        };
        seg.header.segment += 1;
        let path = segment_path(&seg.first, seg.header.segment);
        let header = seg.header.clone();
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        self.frame(TAG_CONTINUED, &[]).map_err(io)?;
        self.w.flush().map_err(io)?;
        self.w = Self::open(&path)?;
        self.header(&path, &header)?;
        self.frame(TAG_CHECKPOINT, state).map_err(io)?;
        // A segment's size is its inputs': a large state must not start the next one at once.
        self.written.store(0, Ordering::Relaxed);
        // On disk before the inputs that follow it are.
        self.w.flush().map_err(io)
    }

    /// Appends a raw probe record.
    pub fn write_probe(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.frame(TAG_PROBE, bytes)
    }

    /// Appends an input.
    pub fn write(&mut self, input: &Input) -> std::io::Result<()> {
        if let Input::Probe { bytes } = input {
            return self.write_probe(bytes);
        }
        let json = serde_json::to_vec(input)?;
        self.frame(TAG_INPUT, &json)
    }

    /// Flushes buffered frames to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The recorder is a lossless subscriber: it keeps every input, in order, before the pipeline
/// acts on it.
impl Subscriber for Recorder {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn interest(&self) -> Interest {
        Interest {
            inputs: true,
            checkpoints: self.segments.is_some(),
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        match fact {
            Fact::Input(i) => self.write(i)?,
            Fact::Probe(b) => self.write_probe(b)?,
            Fact::Checkpoint(state) => self
                .next_segment(state)
                .map_err(|e| SubscriberError::Io(std::io::Error::other(e)))?,
            _ => {}
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SubscriberError> {
        Ok(Recorder::flush(self)?)
    }
}

/// Reads a recording frame by frame.
pub struct Replayer {
    path: PathBuf,
    r: BufReader<File>,
    offset: u64,
    /// The recording's header.
    pub header: RecordHeader,
    /// A later segment of a journal: the state it starts from.
    pub checkpoint: Option<Vec<u8>>,
    /// The recording ended where the journal went on in its next segment (read to the end).
    pub continued: bool,
    /// The recording ended inside a frame (cut short).
    pub truncated: bool,
}

impl Replayer {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_owned(),
            source,
        };
        let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
        let mut magic = [0u8; MAGIC.len()];
        if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
            return Err(RecordError::NotARecording(path.to_owned()));
        }
        let mut me = Self {
            path: path.to_owned(),
            r,
            offset: MAGIC.len() as u64,
            header: RecordHeader {
                version: 0,
                payloads: Payloads::Raw,
                started_unix_ms: 0,
                tracer_version: String::new(),
                pipeline: PipelineConfig::default(),
                segment: 0,
            },
            checkpoint: None,
            continued: false,
            truncated: false,
        };
        let bad = |detail: String| RecordError::Header {
            path: path.to_owned(),
            detail,
        };
        match me.next_frame()? {
            Some((TAG_HEADER, bytes)) => {
                let h: RecordHeader =
                    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                if h.version != 1 && h.version != VERSION {
                    return Err(bad(format!("version {}", h.version)));
                }
                me.header = h;
            }
            _ => return Err(bad("missing".into())),
        }
        if me.header.segment > 0 {
            match me.next_frame()? {
                Some((TAG_CHECKPOINT, bytes)) => me.checkpoint = Some(bytes),
                _ => {
                    return Err(bad(format!(
                        "segment {} without the checkpoint it starts from",
                        me.header.segment
                    )));
                }
            }
        }
        Ok(me)
    }

    fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, RecordError> {
        let mut head = [0u8; 5];
        match read_full(&mut self.r, &mut head) {
            Ok(0) => return Ok(None),
            Ok(5) => {}
            Ok(_) => {
                self.truncated = true;
                return Ok(None);
            }
            Err(source) => {
                return Err(RecordError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        let tag = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let max = if tag == TAG_CHECKPOINT {
            MAX_CHECKPOINT
        } else {
            MAX_FRAME
        };
        if len > max || tag > TAG_CONTINUED {
            return Err(RecordError::BadFrame {
                path: self.path.clone(),
                offset: self.offset,
                detail: format!("tag {tag}, length {len}"),
            });
        }
        let mut bytes = vec![0u8; len as usize];
        match read_full(&mut self.r, &mut bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(_) => {
                self.truncated = true;
                return Ok(None);
            }
            Err(source) => {
                return Err(RecordError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        self.offset += 5 + u64::from(len);
        Ok(Some((tag, bytes)))
    }

    /// The next input, `None` at the end.
    pub fn next_input(&mut self) -> Result<Option<Input>, RecordError> {
        let at = self.offset;
        let Some((tag, bytes)) = self.next_frame()? else {
            return Ok(None);
        };
        match tag {
            TAG_PROBE => Ok(Some(Input::Probe { bytes })),
            TAG_INPUT => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RecordError::BadFrame {
                        path: self.path.clone(),
                        offset: at,
                        detail: e.to_string(),
                    })
            }
            TAG_CONTINUED => {
                self.continued = true;
                Ok(None)
            }
            TAG_CHECKPOINT => Err(RecordError::BadFrame {
                path: self.path.clone(),
                offset: at,
                detail: "a checkpoint inside a segment".into(),
            }),
            _ => Err(RecordError::BadFrame {
                path: self.path.clone(),
                offset: at,
                detail: "a second header".into(),
            }),
        }
    }
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::Reading;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tracer-record-{}-{name}", std::process::id()))
    }

    fn header() -> RecordHeader {
        RecordHeader {
            version: VERSION,
            payloads: Payloads::Redacted,
            started_unix_ms: 1,
            tracer_version: "test".into(),
            pipeline: PipelineConfig::default(),
            segment: 0,
        }
    }

    #[test]
    fn round_trip_and_truncation() {
        let path = temp("rt");
        let inputs = vec![
            Input::Probe {
                bytes: vec![1, 2, 3],
            },
            Input::Power {
                readings: vec![Reading::Counter {
                    device: 0,
                    ts_ns: 5,
                    energy_uj: 7,
                    wrap_uj: None,
                }],
            },
            Input::Advance { now_ns: 9 },
            Input::Finish,
        ];
        let mut r = Recorder::create(&path, &header()).expect("create");
        for i in &inputs {
            r.write(i).expect("write");
        }
        r.flush().expect("flush");
        drop(r);
        let mut rp = Replayer::open(&path).expect("open");
        let mut got = Vec::new();
        while let Some(i) = rp.next_input().expect("read") {
            got.push(i);
        }
        assert_eq!(got, inputs);
        assert!(!rp.truncated);

        // Cut inside the last frame: replays what is whole, says it was cut.
        let len = std::fs::metadata(&path).expect("meta").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(len - 3).expect("truncate");
        let mut rp = Replayer::open(&path).expect("open");
        let mut n = 0;
        while rp.next_input().expect("read").is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(rp.truncated);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn floats_come_back_bit_for_bit() {
        let path = temp("floats");
        let watts: Vec<f64> = vec![
            0.1 + 0.2,
            1.0 / 3.0 * 123.456,
            41.304_347_826_086_96,
            f64::MIN_POSITIVE,
            1e300 / 7.0,
        ];
        let input = Input::Power {
            readings: watts
                .iter()
                .enumerate()
                .map(|(i, &w)| Reading::Power {
                    device: i,
                    ts_ns: 1,
                    watts: w,
                    window_ns: 0,
                })
                .collect(),
        };
        let mut r = Recorder::create(&path, &header()).expect("create");
        r.write(&input).expect("write");
        r.flush().expect("flush");
        drop(r);
        let mut rp = Replayer::open(&path).expect("open");
        let Some(Input::Power { readings }) = rp.next_input().expect("read") else {
            panic!("no power input");
        };
        for (r, w) in readings.iter().zip(&watts) {
            let Reading::Power { watts: got, .. } = r else {
                panic!("not power");
            };
            assert_eq!(got.to_bits(), w.to_bits());
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_journal_is_cut_into_segments_that_start_from_their_checkpoint() {
        let path = temp("journal.rec");
        let mut j = Recorder::journal(&path, &header()).expect("create");
        let written = j.written();
        j.on_fact(&Fact::Input(&Input::Advance { now_ns: 1 }))
            .expect("write");
        assert!(written.load(Ordering::Relaxed) > MAGIC.len() as u64);
        j.on_fact(&Fact::Checkpoint(b"state one")).expect("cut");
        j.on_fact(&Fact::Input(&Input::Advance { now_ns: 2 }))
            .expect("write");
        j.on_fact(&Fact::Checkpoint(b"state two")).expect("cut");
        j.on_fact(&Fact::Input(&Input::Finish)).expect("write");
        Subscriber::flush(&mut j).expect("flush");
        drop(j);
        let read = |k: u32| {
            let mut rp = Replayer::open(&segment_path(&path, k)).expect("open");
            let mut inputs = Vec::new();
            while let Some(i) = rp.next_input().expect("read") {
                inputs.push(i);
            }
            (rp, inputs)
        };
        let (rp0, in0) = read(0);
        assert_eq!(
            (rp0.header.segment, rp0.checkpoint.as_deref(), rp0.continued),
            (0, None, true)
        );
        assert_eq!(in0, vec![Input::Advance { now_ns: 1 }]);
        let (rp1, in1) = read(1);
        assert_eq!(
            (rp1.header.segment, rp1.checkpoint.as_deref(), rp1.continued),
            (1, Some(&b"state one"[..]), true)
        );
        assert_eq!(in1, vec![Input::Advance { now_ns: 2 }]);
        let (rp2, in2) = read(2);
        assert_eq!(
            (rp2.header.segment, rp2.checkpoint.as_deref(), rp2.continued),
            (2, Some(&b"state two"[..]), false)
        );
        assert_eq!(in2, vec![Input::Finish]);
        assert_eq!(rp2.header.started_unix_ms, rp0.header.started_unix_ms);
        // A plain recording keeps no checkpoints: one file from the start.
        let plain = Recorder::create(&temp("plain.rec"), &header()).expect("create");
        assert!(!plain.interest().checkpoints);
        for k in 0..3 {
            let _ = std::fs::remove_file(segment_path(&path, k));
        }
        let _ = std::fs::remove_file(temp("plain.rec"));
    }

    #[test]
    fn segment_paths() {
        let p = Path::new("/s/journal/run-3.rec");
        assert_eq!(segment_path(p, 0), p);
        assert_eq!(segment_path(p, 7), Path::new("/s/journal/run-3.7.rec"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let path = temp("garbage");
        std::fs::write(&path, b"hello world, not a recording").expect("write");
        assert!(matches!(
            Replayer::open(&path),
            Err(RecordError::NotARecording(_))
        ));
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[0, 2, 0, 0, 0, b'{', b'}']);
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            Replayer::open(&path),
            Err(RecordError::Header { .. })
        ));
        let mut r = Recorder::create(&path, &header()).expect("create");
        r.flush().expect("flush");
        drop(r);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&[9, 1, 0, 0, 0, 0]);
        std::fs::write(&path, &bytes).expect("write");
        let mut rp = Replayer::open(&path).expect("open");
        assert!(matches!(rp.next_input(), Err(RecordError::BadFrame { .. })));
        let _ = std::fs::remove_file(&path);
    }
}
