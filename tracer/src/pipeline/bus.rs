//! The output seam: every result of the pipeline leaves through one [`Bus`] as a [`Fact`], to
//! subscribers of two kinds.
//!
//! - **Lossless** subscribers (the recorder, JSON-lines files, a store) are called in line, in
//!   order, for every fact they asked for: the pipeline waits for them. One that fails is
//!   dropped with a warning and counted, so a full disk stops that output, never attribution.
//! - **Lossy** subscribers (an API stream, a live view) get owned facts through a bounded queue:
//!   when the queue is full the fact is dropped for that subscriber and counted. A stalled
//!   consumer never stalls attribution, and never loses a fact silently.
//!
//! Subscribers say which facts they want ([`Interest`]), so facts nobody wants are never built.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use super::{
    fact::{Fact, OwnedFact},
    snapshot::SubscriberHealth,
};

/// Why a subscriber gave up.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// Writing its output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Encoding a fact failed.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Which facts a subscriber receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one switch per fact kind, read as a set"
)]
pub struct Interest {
    /// Every input, before the pipeline acts on it (raw probe records included).
    pub inputs: bool,
    /// Every decoded probe event.
    pub events: bool,
    /// Every finished HTTP request.
    pub requests: bool,
    /// Every final energy record.
    pub records: bool,
    /// Occupancy changes (a service bound to or released a GPU).
    pub bindings: bool,
    /// Periodic snapshots.
    pub snapshots: bool,
    /// Checkpoints of the whole state (the journal's segments start with one).
    pub checkpoints: bool,
}

impl Interest {
    /// Every fact.
    pub const ALL: Interest = Interest {
        inputs: true,
        events: true,
        requests: true,
        records: true,
        bindings: true,
        snapshots: true,
        checkpoints: true,
    };

    fn union(self, o: Interest) -> Interest {
        Interest {
            inputs: self.inputs || o.inputs,
            events: self.events || o.events,
            requests: self.requests || o.requests,
            records: self.records || o.records,
            bindings: self.bindings || o.bindings,
            snapshots: self.snapshots || o.snapshots,
            checkpoints: self.checkpoints || o.checkpoints,
        }
    }

    /// Whether `fact` is one of these.
    pub fn wants(self, fact: &Fact<'_>) -> bool {
        match fact {
            Fact::Input(_) | Fact::Probe(_) => self.inputs,
            Fact::Event { .. } => self.events,
            Fact::Request(_) => self.requests,
            Fact::Record(_) => self.records,
            Fact::Binding(_) => self.bindings,
            Fact::Snapshot(_) => self.snapshots,
            Fact::Checkpoint(_) => self.checkpoints,
        }
    }
}

/// A consumer the pipeline calls in line (lossless).
pub trait Subscriber: Send {
    /// A short name for logs and health reports.
    fn name(&self) -> &str;
    /// The facts it wants.
    fn interest(&self) -> Interest;
    /// One fact, in pipeline order.
    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError>;
    /// Make what it has received durable or visible (called at every summary tick and at the
    /// end).
    fn flush(&mut self) -> Result<(), SubscriberError> {
        Ok(())
    }
    /// Write to its path's file anew (SIGHUP: logrotate moved the old one), after flushing
    /// what it holds to the old. Returns whether it has such a file. On error it keeps writing
    /// the old one.
    fn reopen(&mut self) -> Result<bool, SubscriberError> {
        Ok(false)
    }
}

/// What a lossy subscriber's queue has seen; shared with its consumer.
#[derive(Debug, Default)]
pub struct QueueStats {
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl QueueStats {
    /// Facts put in the queue.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Facts dropped because the queue was full (or its consumer gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The consumer end of a lossy subscription.
#[derive(Debug)]
pub struct LossyReceiver {
    /// The queue, in pipeline order (with gaps where facts were dropped).
    pub rx: tokio::sync::mpsc::Receiver<OwnedFact>,
    /// Its counters.
    pub stats: Arc<QueueStats>,
}

struct Lossy {
    name: String,
    interest: Interest,
    tx: tokio::sync::mpsc::Sender<OwnedFact>,
    stats: Arc<QueueStats>,
}

struct Lossless {
    sub: Box<dyn Subscriber>,
    interest: Interest,
    delivered: u64,
}

/// The subscribers of one pipeline.
#[derive(Default)]
pub struct Bus {
    lossless: Vec<Lossless>,
    lossy: Vec<Lossy>,
    /// Subscribers that failed and were dropped, with their last counts.
    failed: Vec<SubscriberHealth>,
    interest: Interest,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a lossless subscriber: it sees every fact it wants, in order, and the pipeline
    /// waits for it.
    pub fn subscribe(&mut self, sub: Box<dyn Subscriber>) {
        let interest = sub.interest();
        self.interest = self.interest.union(interest);
        self.lossless.push(Lossless {
            sub,
            interest,
            delivered: 0,
        });
    }

    /// Adds a lossy subscriber with a queue of `capacity` facts; returns its consumer end.
    pub fn subscribe_lossy(
        &mut self,
        name: &str,
        interest: Interest,
        capacity: usize,
    ) -> LossyReceiver {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let stats = Arc::new(QueueStats::default());
        self.interest = self.interest.union(interest);
        self.lossy.push(Lossy {
            name: name.to_string(),
            interest,
            tx,
            stats: Arc::clone(&stats),
        });
        LossyReceiver { rx, stats }
    }

    /// The union of what the subscribers want (the pipeline skips building the rest).
    pub fn interest(&self) -> Interest {
        self.interest
    }

    /// Delivers `fact` to every subscriber that wants it.
    pub fn publish(&mut self, fact: &Fact<'_>) {
        if !self.interest.wants(fact) {
            return;
        }
        let mut failed = Vec::new();
        for (i, s) in self.lossless.iter_mut().enumerate() {
            if !s.interest.wants(fact) {
                continue;
            }
            match s.sub.on_fact(fact) {
                Ok(()) => s.delivered += 1,
                Err(e) => {
                    tracing::warn!("output {} failed ({e}); no longer writing it", s.sub.name());
                    failed.push(i);
                }
            }
        }
        for i in failed.into_iter().rev() {
            self.drop_lossless(i);
        }
        if self.lossy.iter().any(|l| l.interest.wants(fact)) {
            let owned = fact.to_owned_fact();
            for l in &self.lossy {
                if !l.interest.wants(fact) {
                    continue;
                }
                match l.tx.try_send(owned.clone()) {
                    Ok(()) => l.stats.delivered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => l.stats.dropped.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    }

    fn drop_lossless(&mut self, i: usize) {
        let s = self.lossless.remove(i);
        self.failed.push(SubscriberHealth {
            name: s.sub.name().to_string(),
            mode: "lossless",
            delivered: s.delivered,
            dropped: 0,
            failed: true,
        });
        self.interest = self
            .lossless
            .iter()
            .map(|s| s.interest)
            .chain(self.lossy.iter().map(|l| l.interest))
            .fold(Interest::default(), Interest::union);
    }

    /// Flushes every lossless subscriber (a failing one is dropped with a warning).
    pub fn flush(&mut self) {
        let mut i = 0;
        while i < self.lossless.len() {
            if let Err(e) = self.lossless[i].sub.flush() {
                tracing::warn!(
                    "output {} failed ({e}); no longer writing it",
                    self.lossless[i].sub.name()
                );
                self.drop_lossless(i);
            } else {
                i += 1;
            }
        }
    }

    /// Reopens every lossless subscriber's file (see [`Subscriber::reopen`]); returns how
    /// many were reopened and, by name, those that could not be (they keep their old file).
    pub fn reopen(&mut self) -> (usize, Vec<(String, SubscriberError)>) {
        let mut reopened = 0;
        let mut failed = Vec::new();
        for s in &mut self.lossless {
            match s.sub.reopen() {
                Ok(true) => reopened += 1,
                Ok(false) => {}
                Err(e) => failed.push((s.sub.name().to_string(), e)),
            }
        }
        (reopened, failed)
    }

    /// Every subscriber's counters.
    pub fn health(&self) -> Vec<SubscriberHealth> {
        self.lossless
            .iter()
            .map(|s| SubscriberHealth {
                name: s.sub.name().to_string(),
                mode: "lossless",
                delivered: s.delivered,
                dropped: 0,
                failed: false,
            })
            .chain(self.lossy.iter().map(|l| SubscriberHealth {
                name: l.name.clone(),
                mode: "lossy",
                delivered: l.stats.delivered(),
                dropped: l.stats.dropped(),
                failed: false,
            }))
            .chain(self.failed.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests;
