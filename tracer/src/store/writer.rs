//! The store's writer thread: final records and snapshots arrive from the pipeline's bus
//! ([`StoreFeed`], in line and lossless: a full queue makes the pipeline wait rather than lose
//! a record), are committed in groups (everything queued goes in one transaction), and only
//! then are handed on (`on_commit`: the API's index and stream). A record anyone has seen as
//! final is therefore stored.
//!
//! A failed commit (disk full) is logged and counted, and its records are still handed on:
//! the store is an output, never a reason to lose what the API shows.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Store, StoreConfig, StoreError};
use crate::pipeline::{
    Fact, FinalRecord, Interest, Subscriber, SubscriberError, snapshot::Snapshot,
};

/// Records queued at most before the pipeline waits for the writer.
const QUEUE: usize = 1 << 16;
/// Records per transaction at most.
const BATCH: usize = 8192;
/// How often old records are deleted.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Called with each committed group of records.
pub type OnCommit = Box<dyn FnMut(&[Arc<FinalRecord>]) + Send>;

enum Msg {
    Record(Arc<FinalRecord>),
    Snapshot(Arc<Snapshot>),
    /// Commit everything before this, then answer.
    Sync(std::sync::mpsc::Sender<()>),
    /// The journal started its next segment: records after this were finalised in it.
    Checkpoint,
    Stop,
}

/// What the writer has done (shared with `/metrics` and snapshots).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub committed: AtomicU64,
    pub transactions: AtomicU64,
    /// Records whose commit failed (handed on unstored).
    pub failed: AtomicU64,
    /// Records deleted by retention.
    pub expired: AtomicU64,
    /// Time spent committing, nanoseconds.
    pub commit_ns: AtomicU64,
}

/// The running writer.
pub struct StoreWriter {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<Store>>,
    stats: Arc<WriterStats>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter").finish_non_exhaustive()
    }
}

impl StoreWriter {
    /// Starts writing run `run`'s records into `store`.
    pub fn start(
        store: Store,
        run: i64,
        config: StoreConfig,
        on_commit: OnCommit,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("tracer-store".into())
            .spawn(move || write_loop(store, run, &config, &rx, on_commit, &thread_stats))?;
        Ok(Self {
            tx,
            thread: Some(thread),
            stats,
        })
    }

    /// The bus subscriber that feeds this writer.
    pub fn feed(&self) -> StoreFeed {
        StoreFeed {
            tx: self.tx.clone(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<WriterStats> {
        Arc::clone(&self.stats)
    }

    /// Waits until everything sent so far is committed.
    pub fn sync(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Commits what is queued and stops; gives the store back (to close the run).
    pub fn stop(mut self) -> Option<Store> {
        let _ = self.tx.send(Msg::Stop);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

fn write_loop(
    mut store: Store,
    run: i64,
    config: &StoreConfig,
    rx: &Receiver<Msg>,
    mut on_commit: OnCommit,
    stats: &WriterStats,
) -> Store {
    let mut records: Vec<Arc<FinalRecord>> = Vec::with_capacity(BATCH);
    let mut snapshots: Vec<Arc<Snapshot>> = Vec::new();
    let mut syncs = Vec::new();
    // The journal segment the records now arriving were finalised in (the bus delivers the
    // journal's checkpoints to both, in order).
    let mut segment = 0u32;
    let mut last_retention: Option<Instant> = None;
    let mut stopping = false;
    while !stopping {
        // Wait for something, then take everything already queued: one commit per group.
        let first = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = first;
        while let Some(m) = next {
            match m {
                Msg::Record(r) => records.push(r),
                Msg::Snapshot(s) => snapshots.push(s),
                Msg::Sync(s) => syncs.push(s),
                Msg::Stop => stopping = true,
                Msg::Checkpoint => {
                    commit(
                        &mut store,
                        (run, segment),
                        &mut records,
                        &mut snapshots,
                        &mut on_commit,
                        stats,
                    );
                    segment += 1;
                }
            }
            next = if records.len() < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        commit(
            &mut store,
            (run, segment),
            &mut records,
            &mut snapshots,
            &mut on_commit,
            stats,
        );
        for s in syncs.drain(..) {
            let _ = s.send(());
        }
        if last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
            last_retention = Some(Instant::now());
            match store.enforce_retention(crate::power::realtime_ns() as i64 / 1_000_000, config) {
                Ok(n) => {
                    stats.expired.fetch_add(n, Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!("store: retention deleted {n} old records");
                    }
                }
                Err(e) => tracing::warn!("store: retention failed: {e}"),
            }
        }
    }
    // Every message taken was committed in its turn (a stop ends the turn it arrived in).
    store
}

fn commit(
    store: &mut Store,
    (run, segment): (i64, u32),
    records: &mut Vec<Arc<FinalRecord>>,
    snapshots: &mut Vec<Arc<Snapshot>>,
    on_commit: &mut OnCommit,
    stats: &WriterStats,
) {
    let t0 = Instant::now();
    if !records.is_empty() {
        match store.insert_in(run, segment, records, false) {
            Ok(_) => {
                stats
                    .committed
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                stats
                    .failed
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                tracing::warn!("store: {} records not stored: {e}", records.len());
            }
        }
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        on_commit(records);
        records.clear();
    }
    // Only the newest snapshot of a group matters for services; totals rows keep each.
    for s in snapshots.drain(..) {
        if let Err(e) = store.snapshot(run, &s) {
            tracing::warn!("store: snapshot not stored: {e}");
        }
    }
    stats
        .commit_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// The bus side of the writer.
pub struct StoreFeed {
    tx: SyncSender<Msg>,
}

impl Subscriber for StoreFeed {
    fn name(&self) -> &'static str {
        "store"
    }

    fn interest(&self) -> Interest {
        Interest {
            records: true,
            snapshots: true,
            checkpoints: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        let msg = match fact {
            Fact::Record(r) => Msg::Record(Arc::clone(r)),
            Fact::Snapshot(s) => Msg::Snapshot(Arc::clone(s)),
            Fact::Checkpoint(_) => Msg::Checkpoint,
            _ => return Ok(()),
        };
        self.tx
            .send(msg)
            .map_err(|_| std::io::Error::other("the store's writer stopped").into())
    }
}

impl From<StoreError> for SubscriberError {
    fn from(e: StoreError) -> Self {
        SubscriberError::Io(std::io::Error::other(e.to_string()))
    }
}
