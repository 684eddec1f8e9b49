//! Recovery after a crash: a run that never closed left requests that had ended but were not
//! yet final (the ledger waits for power data past a request's end) and requests in flight.
//! Its journal holds every input up to the kill, so replaying it gives exactly the records the
//! run would have finalised (only its last two segments: each later segment starts from a
//! checkpoint, and the records of older ones were committed long before the kill); those not already stored are stored (`recovered`), requests
//! still open at the journal's end as `incomplete`. Nothing already stored is duplicated
//! (ids are the run's own: the journal's header carries its first id).

use std::path::PathBuf;

use super::{Store, StoreError};
use crate::{
    ledger::Outcome,
    record::replay::{ReplayOptions, replay_records},
};

/// What recovering one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub run: i64,
    /// The journal segment the replay started from; `None`: the run had none (nothing could
    /// be recovered).
    pub journal: Option<PathBuf>,
    /// Segments replayed (from `journal` on).
    pub segments: usize,
    /// Records stored now that were not before.
    pub recovered: usize,
    /// Of those, requests still in flight at the journal's end.
    pub incomplete: usize,
    /// Records the replay gave that were already stored.
    pub already_stored: usize,
    /// The journal ended inside a frame (the kill cut its last write).
    pub cut_short: bool,
    /// The run's journal could not be read: its unstored requests are lost (count unknown).
    pub unreadable: Option<String>,
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.journal, &self.unreadable) {
            (None, _) => write!(
                f,
                "run {} stopped without closing and kept no journal: requests not final at the stop are lost (count unknown)",
                self.run
            ),
            (Some(j), Some(e)) => write!(
                f,
                "run {}: journal {} unreadable ({e}): requests not final at the stop are lost (count unknown)",
                self.run,
                j.display()
            ),
            (Some(j), None) => write!(
                f,
                "run {} recovered from {}{}: {} records stored now ({} of them incomplete: in flight at the stop), {} were already stored{}",
                self.run,
                j.display(),
                if self.segments > 1 {
                    format!(" and {} later segment(s)", self.segments - 1)
                } else {
                    String::new()
                },
                self.recovered,
                self.incomplete,
                self.already_stored,
                if self.cut_short {
                    "; the journal's last write was cut"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Recovers every run of `store` that never closed, oldest first, and closes it.
pub fn recover(store: &mut Store, now_unix_ms: i64) -> Result<Vec<Recovery>, StoreError> {
    let mut out = Vec::new();
    for run in store.unclosed_runs()? {
        let segments = store.journal_segments(run.run);
        let tail: Vec<PathBuf> = segments
            .iter()
            .rev()
            .take(2)
            .rev()
            .map(|(_, p)| p.clone())
            .collect();
        let mut rec = Recovery {
            run: run.run,
            journal: tail.first().cloned(),
            segments: tail.len(),
            recovered: 0,
            incomplete: 0,
            already_stored: 0,
            cut_short: false,
            unreadable: None,
        };
        let mut next_id = store.last_request_id()? + 1;
        if !tail.is_empty() {
            // The last two segments; the one before the newest alone (the newest may be only a
            // header the kill cut); else the whole journal from its first segment, where it is
            // all kept (a checkpoint this build cannot read: written before an upgrade).
            let all: Vec<PathBuf> = segments.iter().map(|(_, p)| p.clone()).collect();
            let whole = segments
                .iter()
                .enumerate()
                .all(|(i, (k, _))| *k as usize == i);
            let mut chains: Vec<&[PathBuf]> = vec![&tail, &tail[..1]];
            if whole {
                chains.push(&all);
                chains.push(&all[..all.len() - 1]);
            }
            let mut replayed = Err(None);
            for paths in chains {
                let Some((first, rest)) = paths.split_first() else {
                    continue;
                };
                match replay_records(&ReplayOptions {
                    continued: rest.to_vec(),
                    // The run ended here: what was open is incomplete.
                    finish_continued: true,
                    ..ReplayOptions::of(first)
                }) {
                    Ok(r) => {
                        rec.journal = Some(first.clone());
                        rec.segments = paths.len();
                        replayed = Ok(r);
                        break;
                    }
                    Err(e) => {
                        if let Err(None) = replayed {
                            replayed = Err(Some(e));
                        }
                    }
                }
            }
            let replayed = replayed.map_err(|e| e.map_or_else(String::new, |e| e.to_string()));
            match replayed {
                Ok((records, summary)) => {
                    let mut fresh: std::collections::BTreeMap<u32, Vec<_>> =
                        std::collections::BTreeMap::new();
                    // Records retention has since deleted stay deleted.
                    let floor = store.deleted_through()?;
                    for r in records {
                        let id = r.record.record.id.0;
                        if id <= floor || store.contains(id)? {
                            rec.already_stored += 1;
                        } else {
                            fresh.entry(r.segment).or_default().push(r.record);
                        }
                    }
                    for (segment, records) in &fresh {
                        rec.recovered += store.insert_in(run.run, *segment, records, true)?;
                        rec.incomplete += records
                            .iter()
                            .filter(|r| r.record.outcome == Outcome::Incomplete)
                            .count();
                    }
                    rec.cut_short = summary.truncated;
                    next_id = next_id.max(summary.next_request_id);
                }
                Err(e) => rec.unreadable = Some(e),
            }
        }
        store.close_run(run.run, now_unix_ms, next_id)?;
        store.conn.execute(
            "UPDATE runs SET recovered = ?2, incomplete = ?3 WHERE run = ?1",
            rusqlite::params![run.run, rec.recovered as i64, rec.incomplete as i64],
        )?;
        out.push(rec);
    }
    Ok(out)
}
