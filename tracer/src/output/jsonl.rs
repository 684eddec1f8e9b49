//! JSON-lines outputs: decoded events, finished requests, or final energy records, one JSON
//! object per line.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use crate::{
    pipeline::{Fact, Interest, Subscriber, SubscriberError},
    probe::decode::Body,
};

/// Which facts a JSON-lines output writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Every decoded probe event (`--events-out`).
    Events,
    /// Every finished HTTP request (`--requests-out`).
    Requests,
    /// Every final energy record (`--records-out`).
    Records,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Events => "events",
            Stream::Requests => "requests",
            Stream::Records => "records",
        }
    }
}

/// Writes one kind of fact as JSON lines to any writer.
pub struct JsonLines {
    stream: Stream,
    w: BufWriter<Box<dyn Write + Send>>,
    /// The file it appends to, reopened on SIGHUP (none: a stream it was handed).
    path: Option<std::path::PathBuf>,
    /// Events keep the bytes the probes captured (prompts, completions, credentials): off
    /// unless asked for (`output.events_payload`).
    payload: bool,
}

impl std::fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLines")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl JsonLines {
    /// Writes `stream` to `w`.
    pub fn new(stream: Stream, w: Box<dyn Write + Send>) -> Self {
        Self {
            stream,
            w: BufWriter::new(w),
            path: None,
            payload: false,
        }
    }

    /// Keeps captured payloads in events (what was sent and received: prompts, completions,
    /// credentials).
    #[must_use]
    pub fn with_payload(mut self, payload: bool) -> Self {
        self.payload = payload;
        self
    }

    /// Writes `stream` to a new file at `path`, replacing one there (a replay's outputs are
    /// the recording's, whole).
    pub fn replace(stream: Stream, path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(stream, Box::new(File::create(path)?)))
    }

    /// Appends `stream` to the file at `path` (created if missing): a restart never loses what
    /// an earlier run wrote. A last line a crash cut off (no newline) is removed first, so every
    /// line stays one JSON value; returns how many bytes that was.
    pub fn create(stream: Stream, path: &Path) -> std::io::Result<(Self, u64)> {
        let (f, cut) = open_appending(path)?;
        let mut out = Self::new(stream, Box::new(f));
        out.path = Some(path.to_path_buf());
        Ok((out, cut))
    }

    fn line<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> Result<(), SubscriberError> {
        serde_json::to_writer(&mut self.w, v)?;
        self.w.write_all(b"\n")?;
        Ok(())
    }
}

/// Truncates `f` after its last newline; returns the bytes removed (0 when it ends with one
/// or is empty).
fn cut_torn_line(f: &mut File) -> std::io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Read backwards in blocks until a newline.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(at) = buf[..n].iter().rposition(|&b| b == b'\n') {
            let keep = start + at as u64 + 1;
            if keep < len {
                f.set_len(keep)?;
            }
            return Ok(len - keep);
        }
        end = start;
    }
    f.set_len(0)?;
    Ok(len)
}

/// The file at `path` for appending (created if missing), a last line cut off by a crash
/// removed first; returns it and how many bytes were cut.
fn open_appending(path: &Path) -> std::io::Result<(File, u64)> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let cut = cut_torn_line(&mut f)?;
    Ok((f, cut))
}

impl Subscriber for JsonLines {
    fn name(&self) -> &str {
        self.stream.name()
    }

    fn interest(&self) -> Interest {
        Interest {
            events: self.stream == Stream::Events,
            requests: self.stream == Stream::Requests,
            records: self.stream == Stream::Records,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        match (self.stream, fact) {
            (Stream::Events, Fact::Event { event, .. }) => {
                if !self.payload && matches!(event.body, Body::Data { .. }) {
                    let mut e = (*event).clone();
                    if let Body::Data { payload, .. } = &mut e.body {
                        *payload = &[];
                    }
                    return self.line(&e);
                }
                self.line(*event)
            }
            (Stream::Requests, Fact::Request(r)) => self.line(&***r),
            (Stream::Records, Fact::Record(r)) => self.line(&***r),
            _ => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), SubscriberError> {
        Ok(self.w.flush()?)
    }

    fn reopen(&mut self) -> Result<bool, SubscriberError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        // Flushed first: the buffer may end inside a line already half written, which must be
        // whole before the file at the path (the same one when it was not rotated) is checked
        // for a torn line. On an error the old file stays in use and no line is lost.
        self.w.flush()?;
        let (f, _) = open_appending(path)?;
        self.w = BufWriter::new(Box::new(f));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{JsonLines, Stream};

    #[test]
    fn reopening_after_a_rotation_loses_no_line() {
        use crate::pipeline::Subscriber as _;
        let dir = std::env::temp_dir().join(format!("tracer-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("records.jsonl");
        let (mut out, _) = JsonLines::create(Stream::Records, &path).expect("create");
        out.line(&1).expect("line");
        std::fs::rename(&path, dir.join("records.jsonl.1")).expect("rotate");
        out.line(&2)
            .expect("line, buffered: lands in the rotated file");
        assert!(out.reopen().expect("reopen"));
        out.line(&3).expect("line");
        out.flush().expect("flush");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("read");
        assert_eq!(read("records.jsonl.1"), "1\n2\n");
        assert_eq!(read("records.jsonl"), "3\n");
        // Reopened in place (no rotation) while the buffer holds the end of a line whose start
        // is already in the file: the line stays whole.
        let big = "x".repeat(20_000);
        out.line(&big).expect("a line longer than the buffer");
        assert!(out.reopen().expect("reopen in place"));
        out.line(&4).expect("line");
        out.flush().expect("flush");
        assert_eq!(read("records.jsonl"), format!("3\n\"{big}\"\n4\n"));
        // A stream handed in has no file to reopen.
        assert!(
            !JsonLines::new(Stream::Records, Box::new(std::io::sink()))
                .reopen()
                .expect("no-op")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn appending_keeps_earlier_lines_and_drops_a_torn_last_one() {
        let dir = std::env::temp_dir().join(format!("tracer-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("records.jsonl");
        std::fs::write(&path, "{\"id\":1}\n{\"id\":2}\n{\"id\":3,\"tot").expect("write");
        let (mut out, cut) = JsonLines::create(Stream::Records, &path).expect("open");
        assert_eq!(cut, 12, "the torn line");
        out.w.write_all(b"{\"id\":4}\n").expect("append");
        out.w.flush().expect("flush");
        drop(out);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"id\":1}\n{\"id\":2}\n{\"id\":4}\n");
        // Whole lines: nothing to cut, nothing lost.
        let (_, cut) = JsonLines::create(Stream::Records, &path).expect("open");
        assert_eq!(cut, 0);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
