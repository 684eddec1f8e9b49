//! The store as the daemon opens it: lock, recover runs that never closed (from their
//! journals), start this run (its first request id), and prune old journals.

use std::path::PathBuf;

use super::DaemonError;
use crate::{
    config::Config,
    power,
    store::{self, Run, Store},
};

/// An opened store and this run.
pub(super) struct Opened {
    pub store: Store,
    pub run: Run,
    /// Where this run's journal goes (`None`: journal off).
    pub journal: Option<PathBuf>,
    /// Cost models earlier runs learned, by device and service name.
    pub learned: Vec<(String, String, crate::ledger::CostModel)>,
    /// Idle watts earlier runs learned from quiet time, by device name.
    pub learned_idle: Vec<(String, f64)>,
    /// What recovering crashed runs did (the API reports it).
    pub recoveries: Vec<store::Recovery>,
}

fn now_ms() -> i64 {
    (power::realtime_ns() / 1_000_000) as i64
}

/// The redaction key (`wire::redact`): the store's, made on first use and readable by root
/// only, so pseudonyms stay the same across runs; without a store, a fresh one per run.
/// Never written into a recording.
pub(super) fn redaction_key(store: Option<&Store>) -> Result<[u64; 2], DaemonError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let mut random = [0u8; 16];
    let urandom = std::path::Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(super::io_err("reading /dev/urandom"))?;
    let bytes = match store {
        None => random,
        Some(s) => {
            let path = s.dir().join("redaction.key");
            match std::fs::read(&path) {
                Ok(b) if b.len() == 16 => b.try_into().unwrap_or(random),
                _ => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(super::io_err("creating the store's redaction key"))?;
                    std::io::Write::write_all(&mut f, &random)
                        .map_err(super::io_err("writing the store's redaction key"))?;
                    random
                }
            }
        }
    };
    let (a, b) = bytes.split_at(8);
    Ok([
        u64::from_le_bytes(a.try_into().unwrap_or_default()),
        u64::from_le_bytes(b.try_into().unwrap_or_default()),
    ])
}

/// Opens the configured store, if any.
pub(super) fn open(config: &Config) -> Result<Option<Opened>, DaemonError> {
    let Some(dir) = &config.store.path else {
        return Ok(None);
    };
    let mut store = Store::open(dir)?;
    let recoveries = store::recover(&mut store, now_ms())?;
    for r in &recoveries {
        if r.journal.is_some() && r.unreadable.is_none() {
            tracing::info!("store: {r}");
        } else {
            tracing::warn!("store: {r}");
        }
    }
    let run = store.begin_run(now_ms())?;
    let journal = config.store.journal.then(|| store.journal_path(run.run));
    match store.prune_journals(run.run, config.store.journals_kept) {
        Ok(n) if n > 0 => tracing::info!("store: removed {n} old journals"),
        Ok(_) => {}
        Err(e) => tracing::warn!("store: pruning journals: {e}"),
    }
    tracing::info!(
        "store {}: run {}, request ids from {}, {} records kept{}",
        dir.display(),
        run.run,
        run.first_request_id,
        store.count()?,
        journal
            .as_ref()
            .map_or_else(String::new, |j| format!(", journal {}", j.display())),
    );
    let learned = store.learned()?;
    let learned_idle = store.learned_idle()?;
    Ok(Some(Opened {
        store,
        run,
        journal,
        learned,
        learned_idle,
        recoveries,
    }))
}

/// Gives the pipeline the cost models earlier runs learned for the devices and services it has
/// now (matched by name); returns how many.
pub(super) fn restore_learned(
    pipeline: &mut crate::pipeline::Pipeline,
    learned: Vec<(String, String, crate::ledger::CostModel)>,
) -> usize {
    let services = pipeline.services();
    let mut n = 0;
    for (device, service, model) in learned {
        let (Some(device), Some(service)) = (
            pipeline.device_id(&device),
            services.iter().find(|s| s.name == service).map(|s| s.id),
        ) else {
            continue;
        };
        pipeline.apply(crate::pipeline::Input::Learned {
            device,
            service,
            model: Box::new(model),
        });
        n += 1;
    }
    n
}

/// Gives the pipeline the idle power earlier runs learned from quiet time for the devices it
/// has now (matched by name); returns how many.
pub(super) fn restore_idle(
    pipeline: &mut crate::pipeline::Pipeline,
    learned: Vec<(String, f64)>,
) -> usize {
    let mut n = 0;
    for (device, watts) in learned {
        // Only figures the ledger takes reach the journal (a NaN would not replay).
        let (Some(device), true) = (
            pipeline.device_id(&device),
            watts.is_finite() && watts >= 0.0,
        ) else {
            continue;
        };
        pipeline.apply(crate::pipeline::Input::LearnedIdle { device, watts });
        n += 1;
    }
    n
}

/// When the journal starts its next segment: at `store.journal_segment_mib` or
/// `store.journal_segment_s`, whichever comes first. The pipeline publishes a checkpoint of its
/// state, the journal ends the segment and starts the next with it, and the journals are cut
/// back to `store.journal_max_bytes`.
pub(super) struct Segments {
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_bytes: u64,
    max_ns: u64,
    since_ns: u64,
    store_dir: PathBuf,
    run: i64,
    journals_max_bytes: u64,
}

impl Segments {
    pub(super) fn new(
        config: &store::StoreConfig,
        written: std::sync::Arc<std::sync::atomic::AtomicU64>,
        run: i64,
        now_ns: u64,
    ) -> Option<Self> {
        Some(Self {
            written,
            max_bytes: config.journal_segment_mib.saturating_mul(1 << 20),
            max_ns: config.journal_segment_s.saturating_mul(1_000_000_000),
            since_ns: now_ns,
            store_dir: config.path.clone()?,
            run,
            journals_max_bytes: config.journal_max_bytes,
        })
    }

    /// Between inputs: starts the next segment if this one is due.
    pub(super) fn tick(&mut self, pipeline: &mut crate::pipeline::Pipeline, now_ns: u64) {
        if std::sync::Arc::strong_count(&self.written) == 1 {
            // The journal failed and was dropped (its bus counts it): nothing to cut.
            return;
        }
        let bytes = self.written.load(std::sync::atomic::Ordering::Relaxed);
        let by_size = self.max_bytes > 0 && bytes >= self.max_bytes;
        let by_age = self.max_ns > 0 && now_ns.saturating_sub(self.since_ns) >= self.max_ns;
        if !(by_size || by_age) {
            return;
        }
        self.since_ns = now_ns;
        let t0 = std::time::Instant::now();
        match pipeline.checkpoint() {
            Ok(size) => tracing::info!(
                "journal: next segment after {:.1} MiB; checkpoint of the state {:.1} KiB in {:.1} ms",
                bytes as f64 / f64::from(1 << 20),
                size as f64 / 1024.0,
                t0.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => {
                // The journal goes on in the current segment; a recovery replays more.
                tracing::warn!("journal: no checkpoint, the segment goes on: {e}");
                return;
            }
        }
        let n = store::prune_journal_bytes(&self.store_dir, self.run, self.journals_max_bytes);
        if n > 0 {
            tracing::info!("journal: removed {n} old segments (store.journal_max_bytes)");
        }
    }
}
