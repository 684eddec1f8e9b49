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
}

fn now_ms() -> i64 {
    (power::realtime_ns() / 1_000_000) as i64
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
    Ok(Some(Opened {
        store,
        run,
        journal,
    }))
}
