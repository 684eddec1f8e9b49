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
    for r in store::recover(&mut store, now_ms())? {
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
    Ok(Some(Opened {
        store,
        run,
        journal,
        learned,
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
