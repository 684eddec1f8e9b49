//! The durable store: final records, services, devices and per-interval device totals in an
//! embedded `SQLite` database (`<store>/tracer.db`), and each run's journal beside it.
//!
//! Why `SQLite` (through `rusqlite`, bundled): its write-ahead log makes every committed
//! transaction survive a `kill -9` of the daemon (and, with `synchronous = NORMAL`, everything
//! but the last commits before a power cut), one file holds everything, operators can read it
//! with the `sqlite3` shell (a record's columns; the whole record is a binary row, [`row`]),
//! and indexed range queries serve what the in-memory index does not hold. Records are written by one thread ([`writer`]) in group commits; the API and the
//! stream see a record only once it is committed, so "final" means "stored".
//!
//! Ids: each daemon start is a run (`runs` table); a run's first request id follows every id
//! an earlier run gave (its stored records and, after a crash, its journal's replay), so ids
//! are unique across restarts. Two daemons cannot share a store (an exclusive lock).

mod config;
mod quantiles;
mod query;
mod recover;
mod rollup;
mod row;
mod schema;
#[cfg(test)]
mod tests;
pub mod writer;

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use rusqlite::{Connection, OptionalExtension, params};

pub use self::{
    config::StoreConfig,
    quantiles::JouleQuantiles,
    query::{GroupBy, GroupSums, merge_currency},
    recover::{Recovery, recover},
    writer::{StoreFeed, StoreWriter, WriterStats},
};
use crate::pipeline::{FinalRecord, snapshot::Snapshot};

/// Rollups are per minute of a record's end.
pub(crate) const MINUTE_MS: i64 = 60_000;

/// The database's file name in the store directory.
pub const DB_FILE: &str = "tracer.db";
/// The journals' directory in the store directory.
pub const JOURNAL_DIR: &str = "journal";

/// The journal files in `dir`: (run, segment, path) for `run-N.rec` (segment 0) and
/// `run-N.K.rec`.
fn journal_files(dir: &Path) -> Vec<(i64, u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let rest = name.to_str()?.strip_prefix("run-")?.strip_suffix(".rec")?;
            let (run, segment) = match rest.split_once('.') {
                Some((r, k)) => (r.parse().ok()?, k.parse().ok()?),
                None => (rest.parse().ok()?, 0),
            };
            Some((run, segment, e.path()))
        })
        .collect()
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or a file in it could not be created or opened.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the store.
    #[error("{0}: another tracer is using this store (its lock is held)")]
    Locked(PathBuf),
    /// The database refused an operation.
    #[error("the store's database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored record is not valid JSON of a record.
    #[error("stored record {id}: {source}")]
    Corrupt {
        id: i64,
        #[source]
        source: serde_json::Error,
    },
    /// A stored record's binary row does not read as one ([`row`]).
    #[error("stored record {id}: {source}")]
    Row {
        id: i64,
        #[source]
        source: row::RowError,
    },
    /// The database was written by a newer tracer.
    #[error("the store's schema version {found} is newer than this tracer's ({supported})")]
    Schema { found: i64, supported: i64 },
    /// A quantiles histogram (a rollup row's) could not be written, read or added.
    #[error("a quantiles histogram: {0}")]
    Histogram(String),
    /// Recovering a crashed run from its journal failed.
    #[error("recovering run {run} from {journal}: {detail}")]
    Recover {
        run: i64,
        journal: PathBuf,
        detail: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One daemon run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub run: i64,
    pub started_unix_ms: i64,
    pub first_request_id: u64,
    /// The id after the last one the run gave, once known (a clean stop or a recovery).
    pub next_request_id: Option<u64>,
    /// The run stopped cleanly (or was recovered).
    pub closed: bool,
}

/// A record's cost in billionths of its currency (sums stay exact integers), and the currency.
fn cost_nano(r: &FinalRecord) -> (Option<i64>, Option<&str>) {
    use rust_decimal::prelude::ToPrimitive as _;
    r.cost.as_ref().map_or((None, None), |c| {
        (
            (c.amount * rust_decimal::Decimal::from(1_000_000_000u32))
                .round()
                .to_i64(),
            Some(c.currency.as_str()),
        )
    })
}

/// What a records query keeps (the API's filters, on stored columns).
#[derive(Debug, Default, Clone)]
pub struct StoredFilter {
    /// Service ids (of runs from `first_id` on: callers limited to their own services).
    pub services: Option<Vec<u32>>,
    pub service_name: Option<String>,
    /// Records with smaller ids are left out.
    pub first_id: u64,
    pub model: Option<String>,
    pub tenant: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// An open store (the writer's side, holding the lock) or a reader.
pub struct Store {
    conn: Connection,
    dir: PathBuf,
    /// The exclusive lock: held for the store's life (writers only).
    _lock: Option<std::fs::File>,
    /// The row being written, reused from record to record.
    row: Vec<u8>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating) the store in `dir` for writing; fails if another daemon holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::create_dir_all(dir.join(JOURNAL_DIR)).map_err(io(dir))?;
        // Records, journals and the key are root's: other users ask the API, which limits
        // what they see. (SQLite gives its -wal and -shm files the database's mode.)
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let db = dir.join(DB_FILE);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&db)
            .map_err(io(&db))?;
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).map_err(io(&db))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on an fd this function owns; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        let conn = Connection::open(dir.join(DB_FILE))?;
        schema::prepare(&conn)?;
        Ok(Self {
            conn,
            dir: dir.to_owned(),
            _lock: Some(lock),
            row: Vec::new(),
        })
    }

    /// Opens the store in `dir` to read (the API's queries beyond memory, reports), beside a
    /// writer.
    pub fn open_reader(dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            dir.join(DB_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        Ok(Self {
            conn,
            dir: dir.to_owned(),
            _lock: None,
            row: Vec::new(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where run `run`'s journal starts (its first segment; later ones beside it,
    /// [`crate::record::format::segment_path`]).
    pub fn journal_path(&self, run: i64) -> PathBuf {
        self.dir.join(JOURNAL_DIR).join(format!("run-{run}.rec"))
    }

    /// Run `run`'s journal segments on disk, in order: (segment number, path). Older
    /// segments may have been removed to bound the journals' size; each segment replays on
    /// its own (a later one starts with a checkpoint).
    pub fn journal_segments(&self, run: i64) -> Vec<(u32, PathBuf)> {
        let mut out: Vec<(u32, PathBuf)> = journal_files(&self.dir.join(JOURNAL_DIR))
            .into_iter()
            .filter(|(r, _, _)| *r == run)
            .map(|(_, k, p)| (k, p))
            .collect();
        out.sort();
        out
    }

    /// The highest request id given by any run so far (stored records, closed runs).
    pub fn last_request_id(&self) -> Result<u64, StoreError> {
        let max_record: Option<i64> =
            self.conn
                .query_row("SELECT MAX(id) FROM records", [], |r| r.get(0))?;
        let max_run: Option<i64> = self.conn.query_row(
            "SELECT MAX(COALESCE(next_request_id, first_request_id) - 1) FROM runs",
            [],
            |r| r.get(0),
        )?;
        Ok(max_record.unwrap_or(0).max(max_run.unwrap_or(0)).max(0) as u64)
    }

    /// Starts a run: its first request id follows every id given before.
    pub fn begin_run(&mut self, started_unix_ms: i64) -> Result<Run, StoreError> {
        let first = self.last_request_id()? + 1;
        self.conn.execute(
            "INSERT INTO runs (started_unix_ms, tracer_version, first_request_id) VALUES (?1, ?2, ?3)",
            params![started_unix_ms, env!("CARGO_PKG_VERSION"), first as i64],
        )?;
        Ok(Run {
            run: self.conn.last_insert_rowid(),
            started_unix_ms,
            first_request_id: first,
            next_request_id: None,
            closed: false,
        })
    }

    /// Marks `run` closed, with the id after the last one it gave.
    pub fn close_run(
        &mut self,
        run: i64,
        ended_unix_ms: i64,
        next_request_id: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE runs SET ended_unix_ms = ?2, next_request_id = ?3, closed = 1 WHERE run = ?1",
            params![run, ended_unix_ms, next_request_id as i64],
        )?;
        Ok(())
    }

    /// Runs that never closed (the daemon was killed), oldest first.
    pub fn unclosed_runs(&self) -> Result<Vec<Run>, StoreError> {
        Ok(self
            .runs()?
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| !r.closed)
            .collect())
    }

    /// Stores `records` of `run` in one transaction; a record already stored (same id) is
    /// left alone. Returns how many were new.
    pub fn insert(
        &mut self,
        run: i64,
        records: &[Arc<FinalRecord>],
        recovered: bool,
    ) -> Result<usize, StoreError> {
        self.insert_in(run, 0, records, recovered)
    }

    /// [`Store::insert`], for records finalised in journal segment `segment` of the run.
    pub fn insert_in(
        &mut self,
        run: i64,
        segment: u32,
        records: &[Arc<FinalRecord>],
        recovered: bool,
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut new = 0;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO records (id, run, end_unix_ms, service, service_name, model, tenant, outcome, total_j, dynamic_j, idle_j, completion_tokens, recovered, json, cost_nano, currency, segment, rec) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, '', ?14, ?15, ?16, ?17)",
            )?;
            let mut rollups = rollup::Rollups::default();
            for r in records {
                row::encode(r, &mut self.row).map_err(|source| StoreError::Row {
                    id: r.record.id.0 as i64,
                    source,
                })?;
                let (cost_nano, currency) = cost_nano(r);
                let added = st.execute(params![
                    r.record.id.0 as i64,
                    run,
                    r.end_unix_ms,
                    r.record.service.0,
                    r.service_name,
                    r.record.model,
                    r.record.tenant,
                    r.record.outcome.name(),
                    r.record.total_j,
                    r.record.dynamic_j,
                    r.record.idle_j,
                    r.record.completion_tokens.map(|t| t as i64),
                    recovered,
                    cost_nano,
                    currency,
                    segment,
                    self.row,
                ])?;
                if added > 0 {
                    rollups.add(r, cost_nano, currency);
                }
                new += added;
            }
            rollups.write(&tx)?;
        }
        tx.commit()?;
        Ok(new)
    }

    /// Stores what a snapshot says about services and devices: the services as of now and
    /// each device's running totals at this instant (differences of consecutive rows give
    /// per-interval energy).
    pub fn snapshot(&mut self, run: i64, snap: &Snapshot) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut dev = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_totals (run, unix_ms, device, name, kind, measured_j, request_j, idle_j, unattributed_j, gap_ns, idle_w, idle_basis) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for d in &snap.devices {
                let t = &d.totals;
                dev.execute(params![
                    run,
                    snap.unix_ms,
                    d.id.0,
                    d.name,
                    format!("{:?}", d.kind),
                    t.measured_j,
                    t.request_dynamic_j + t.request_idle_j,
                    t.idle_j,
                    t.unattributed_j,
                    t.gap_ns as i64,
                    t.idle_w,
                    serde_json::to_value(t.idle_basis)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned)),
                ])?;
            }
            let mut svc = tx.prepare_cached(
                "INSERT OR REPLACE INTO services (run, id, name, updated_unix_ms, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for s in &snap.services {
                svc.execute(params![
                    run,
                    s.id.0,
                    s.name,
                    snap.unix_ms,
                    serde_json::to_string(s).unwrap_or_default(),
                ])?;
            }
            let mut learned = tx.prepare_cached(
                "INSERT OR REPLACE INTO learned (device, service, updated_unix_ms, json) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for l in &snap.learned {
                learned.execute(params![
                    l.device,
                    l.service,
                    snap.unix_ms,
                    serde_json::to_string(&l.model).unwrap_or_default(),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn decode(id: i64, json: &str) -> Result<FinalRecord, StoreError> {
        serde_json::from_str(json).map_err(|source| StoreError::Corrupt { id, source })
    }

    /// A stored record from its columns: the binary row (`rec`, schema 4 on) or, in rows
    /// written before, the JSON.
    fn decode_row(id: i64, json: &str, rec: Option<&[u8]>) -> Result<FinalRecord, StoreError> {
        match rec {
            Some(bytes) => row::decode(bytes).map_err(|source| StoreError::Row { id, source }),
            None => Self::decode(id, json),
        }
    }

    /// Every run: (run, first request id, next request id when closed, recovered records).
    pub fn runs(&self) -> Result<Vec<(Run, i64)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT run, started_unix_ms, first_request_id, next_request_id, closed, recovered FROM runs ORDER BY run",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                Run {
                    run: r.get(0)?,
                    started_unix_ms: r.get(1)?,
                    first_request_id: r.get::<_, i64>(2)? as u64,
                    next_request_id: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    closed: r.get(4)?,
                },
                r.get::<_, i64>(5)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The cost models earlier runs learned, by device and service name (a row that does not
    /// read as a model is skipped: it is re-learned).
    pub fn learned(&self) -> Result<Vec<(String, String, crate::ledger::CostModel)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT device, service, json FROM learned ORDER BY device, service")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, service, json) = row?;
            if let Ok(model) = serde_json::from_str(&json) {
                out.push((device, service, model));
            }
        }
        Ok(out)
    }

    /// Each device's newest idle figure learned from quiet time (`idle_basis` quiet), by
    /// device name: what the next run starts from instead of the all-power fallback. Looks at
    /// the newest rows of the newest runs only (an index walk back from each run's end, not a
    /// scan of months of snapshots at every start).
    pub fn learned_idle(&self) -> Result<Vec<(String, f64)>, StoreError> {
        /// Rows read back per run: at one snapshot a second, the last minutes of 8 devices.
        const ROWS_PER_RUN: i64 = 10_000;
        let mut runs = self
            .conn
            .prepare("SELECT run FROM runs ORDER BY run DESC LIMIT 16")?;
        let runs: Vec<i64> = runs
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut st = self.conn.prepare(
            "SELECT name, idle_w, idle_basis FROM device_totals WHERE run = ?1 ORDER BY unix_ms DESC LIMIT ?2",
        )?;
        let mut found: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
        for run in runs {
            let rows = st.query_map(params![run, ROWS_PER_RUN], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?;
            for row in rows {
                let (name, w, basis) = row?;
                if basis.as_deref() == Some("quiet") {
                    found.entry(name).or_insert(w);
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    /// The newest `n` records, oldest first (what the API's memory starts with).
    pub fn newest(&self, n: usize) -> Result<Vec<FinalRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, json, rec FROM records ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([n as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json, rec) = row?;
            match Self::decode_row(id, &json, rec.as_deref()) {
                Ok(r) => out.push(r),
                // One unreadable row must not keep the daemon from starting.
                Err(e) => tracing::warn!("store: skipping {e}"),
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Whether a record with this id is stored (without reading it).
    pub fn contains(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM records WHERE id = ?1", [id as i64], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// The highest id retention has deleted (recovery must not bring those back).
    pub fn deleted_through(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'deleted_through_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    fn note_deleted_through(&self, id: Option<i64>) -> Result<(), StoreError> {
        if let Some(id) = id {
            self.conn.execute(
                "INSERT INTO meta (key, value) VALUES ('deleted_through_id', ?1) \
                 ON CONFLICT DO UPDATE SET value = MAX(value, excluded.value)",
                [id],
            )?;
        }
        Ok(())
    }

    /// One record by id.
    pub fn get(&self, id: u64) -> Result<Option<FinalRecord>, StoreError> {
        let row: Option<(String, Option<Vec<u8>>)> = self
            .conn
            .query_row(
                "SELECT json, rec FROM records WHERE id = ?1",
                [id as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(json, rec)| Self::decode_row(id as i64, &json, rec.as_deref()))
            .transpose()
    }

    /// Stored records (all runs).
    pub fn count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Bytes the database uses (pages in use).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(((pages - free).max(0) * size) as u64)
    }

    /// Deletes records older than the configured age, then the oldest until the database is
    /// under its size limit (and the totals rows of the same span). Returns records deleted.
    pub fn enforce_retention(
        &mut self,
        now_unix_ms: i64,
        config: &StoreConfig,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0u64;
        if config.retention_days > 0 {
            let cut = now_unix_ms - i64::from(config.retention_days) * 86_400_000;
            let top: Option<i64> = self.conn.query_row(
                "SELECT MAX(id) FROM records WHERE end_unix_ms < ?1",
                [cut],
                |r| r.get(0),
            )?;
            self.note_deleted_through(top)?;
            deleted += self
                .conn
                .execute("DELETE FROM records WHERE end_unix_ms < ?1", [cut])?
                as u64;
            self.conn
                .execute("DELETE FROM device_totals WHERE unix_ms < ?1", [cut])?;
            self.conn.execute(
                "DELETE FROM rollup WHERE minute < ?1",
                [cut.div_euclid(MINUTE_MS)],
            )?;
            // An hour partly deleted goes whole: its histograms would count deleted records
            // (a summary's `quantiles_over` then says what the quantiles cover).
            self.conn.execute(
                "DELETE FROM rollup_hour WHERE hour * 60 < ?1",
                [cut.div_euclid(MINUTE_MS)],
            )?;
        }
        if config.max_bytes > 0 {
            // Delete the oldest tenth at a time: used pages shrink as rows go (freed pages are
            // reused, and incremental vacuum hands them back to the file system).
            for _ in 0..64 {
                if self.used_bytes()? <= config.max_bytes {
                    break;
                }
                let n = self.count()?;
                if n == 0 {
                    break;
                }
                let k = (n / 10).max(1);
                let top: Option<i64> = self.conn.query_row(
                    "SELECT MAX(id) FROM (SELECT id FROM records ORDER BY id LIMIT ?1)",
                    [k as i64],
                    |r| r.get(0),
                )?;
                self.note_deleted_through(top)?;
                let gone = self.conn.execute(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY id LIMIT ?1)",
                    [k as i64],
                )? as u64;
                deleted += gone;
                if let Some(oldest) =
                    self.conn
                        .query_row("SELECT MIN(end_unix_ms) FROM records", [], |r| {
                            r.get::<_, Option<i64>>(0)
                        })?
                {
                    self.conn
                        .execute("DELETE FROM device_totals WHERE unix_ms < ?1", [oldest])?;
                    // The rollups go with the records they sum: left, they could fill the
                    // budget alone and empty the records table pass after pass.
                    let minute = oldest.div_euclid(MINUTE_MS);
                    self.conn
                        .execute("DELETE FROM rollup WHERE minute < ?1", [minute])?;
                    self.conn
                        .execute("DELETE FROM rollup_hour WHERE hour * 60 < ?1", [minute])?;
                }
            }
        }
        if deleted > 0 {
            self.conn.execute_batch("PRAGMA incremental_vacuum")?;
        }
        Ok(deleted)
    }

    /// Deletes the journals (every segment) of runs older than the newest `keep`, except
    /// runs never closed (recovery needs them).
    pub fn prune_journals(&self, current_run: i64, keep: u32) -> Result<u32, StoreError> {
        let files = journal_files(&self.dir.join(JOURNAL_DIR));
        let runs: std::collections::BTreeSet<i64> = files
            .iter()
            .map(|(r, _, _)| *r)
            .filter(|r| *r != current_run)
            .collect();
        let unclosed: Vec<i64> = self.unclosed_runs()?.iter().map(|r| r.run).collect();
        let excess = runs.len().saturating_sub(keep as usize);
        let old: Vec<i64> = runs
            .into_iter()
            .take(excess)
            .filter(|r| !unclosed.contains(r))
            .collect();
        let mut removed = 0;
        for (run, _, path) in files {
            if old.contains(&run) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Deletes the oldest journal segments until the journals in `store_dir` take at most
/// `max_bytes` (0: no limit), never one of the newest two segments of `current_run` (a
/// recovery replays those). Returns how many were deleted.
pub fn prune_journal_bytes(store_dir: &Path, current_run: i64, max_bytes: u64) -> u32 {
    if max_bytes == 0 {
        return 0;
    }
    let mut files: Vec<(i64, u32, PathBuf, u64)> = journal_files(&store_dir.join(JOURNAL_DIR))
        .into_iter()
        .map(|(r, k, p)| {
            let len = std::fs::metadata(&p).map_or(0, |m| m.len());
            (r, k, p, len)
        })
        .collect();
    files.sort_by_key(|(r, k, _, _)| (*r, *k));
    let newest: Vec<u32> = {
        let mut mine: Vec<u32> = files
            .iter()
            .filter(|(r, ..)| *r == current_run)
            .map(|(_, k, ..)| *k)
            .collect();
        mine.sort_unstable();
        mine.into_iter().rev().take(2).collect()
    };
    let mut total: u64 = files.iter().map(|f| f.3).sum();
    let mut removed = 0;
    for (run, k, path, len) in files {
        if total <= max_bytes {
            break;
        }
        if run == current_run && newest.contains(&k) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += 1;
        }
    }
    removed
}
