//! JSON-lines outputs: decoded events, finished requests, or final energy records, one JSON
//! object per line.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use crate::pipeline::{Fact, Interest, Subscriber, SubscriberError};

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
        }
    }

    /// Writes `stream` to the file at `path` (created or truncated).
    pub fn create(stream: Stream, path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(stream, Box::new(File::create(path)?)))
    }

    fn line<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> Result<(), SubscriberError> {
        serde_json::to_writer(&mut self.w, v)?;
        self.w.write_all(b"\n")?;
        Ok(())
    }
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
            (Stream::Events, Fact::Event { event, .. }) => self.line(*event),
            (Stream::Requests, Fact::Request(r)) => self.line(&***r),
            (Stream::Records, Fact::Record(r)) => self.line(&***r),
            _ => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), SubscriberError> {
        Ok(self.w.flush()?)
    }
}
