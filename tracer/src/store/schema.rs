//! The database's tables, created on first open and checked on every open.

use rusqlite::Connection;

use super::StoreError;

/// The schema this build writes. 2: records carry the journal segment they were finalised in.
/// 3: rollup rows carry histograms of J per request and per output token (quantiles).
/// 4: records are stored as binary rows (`rec`, [`super::row`]); `json` is '' in them and
/// keeps the record in rows written before.
pub const VERSION: i64 = 4;

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY,
    started_unix_ms INTEGER NOT NULL,
    tracer_version TEXT NOT NULL,
    first_request_id INTEGER NOT NULL,
    next_request_id INTEGER,
    ended_unix_ms INTEGER,
    closed INTEGER NOT NULL DEFAULT 0,
    recovered INTEGER NOT NULL DEFAULT 0,
    incomplete INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL,
    end_unix_ms INTEGER NOT NULL,
    service INTEGER NOT NULL,
    service_name TEXT NOT NULL,
    model TEXT,
    tenant TEXT,
    outcome TEXT NOT NULL,
    total_j REAL NOT NULL,
    dynamic_j REAL NOT NULL,
    idle_j REAL NOT NULL,
    completion_tokens INTEGER,
    cost_nano INTEGER,
    currency TEXT,
    recovered INTEGER NOT NULL DEFAULT 0,
    json TEXT NOT NULL,
    segment INTEGER NOT NULL DEFAULT 0,
    rec BLOB
);
CREATE INDEX IF NOT EXISTS records_end ON records (end_unix_ms);
CREATE TABLE IF NOT EXISTS rollup (
    minute INTEGER NOT NULL,
    service_name TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requests INTEGER NOT NULL,
    total_j REAL NOT NULL,
    dynamic_j REAL NOT NULL,
    idle_j REAL NOT NULL,
    output_tokens INTEGER NOT NULL,
    token_j REAL NOT NULL,
    cost_nano INTEGER NOT NULL,
    currency TEXT NOT NULL,
    j_hist BLOB,
    token_hist BLOB,
    PRIMARY KEY (minute, service_name, model, tenant, outcome)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_hour (
    hour INTEGER NOT NULL,
    service_name TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant TEXT NOT NULL,
    outcome TEXT NOT NULL,
    j_hist BLOB,
    token_hist BLOB,
    PRIMARY KEY (hour, service_name, model, tenant, outcome)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS learned (
    device TEXT NOT NULL,
    service TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (device, service)
);
CREATE TABLE IF NOT EXISTS services (
    run INTEGER NOT NULL,
    id INTEGER NOT NULL,
    name TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (run, id)
);
CREATE TABLE IF NOT EXISTS device_totals (
    run INTEGER NOT NULL,
    unix_ms INTEGER NOT NULL,
    device INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    measured_j REAL NOT NULL,
    request_j REAL NOT NULL,
    idle_j REAL NOT NULL,
    unattributed_j REAL NOT NULL,
    gap_ns INTEGER NOT NULL,
    idle_w REAL NOT NULL,
    idle_basis TEXT,
    PRIMARY KEY (run, unix_ms, device)
);
";

/// Sets the connection up (WAL, durability, incremental vacuum) and creates or checks the
/// tables.
pub(super) fn prepare(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Before any table exists, so it takes effect.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    // WAL: a committed transaction is in the log before the commit returns, so it survives the
    // process being killed; NORMAL syncs at checkpoints (a power cut may lose the last
    // commits, never corrupt the database).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(StoreError::Schema {
            found,
            supported: VERSION,
        });
    }
    let existed: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'records'",
        [],
        |r| r.get(0),
    )?;
    conn.execute_batch(TABLES)?;
    // The migrations and the version in one transaction: a crash between them cannot leave a
    // column added and the version old.
    let mut migrate = String::new();
    if existed && found < 2 {
        // Version 1 had one journal file per run: its records are all in segment 0.
        migrate.push_str("ALTER TABLE records ADD COLUMN segment INTEGER NOT NULL DEFAULT 0;");
    }
    // Asked of the table, not the version: a rollup table created just now has the columns.
    let hists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('rollup') WHERE name = 'j_hist'",
        [],
        |r| r.get(0),
    )?;
    if !hists {
        // Rows from before version 3 keep NULL histograms: quantiles leave them out (and say
        // how many requests they cover).
        migrate.push_str(
            "ALTER TABLE rollup ADD COLUMN j_hist BLOB; ALTER TABLE rollup ADD COLUMN token_hist BLOB;",
        );
    }
    let rows: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('records') WHERE name = 'rec'",
        [],
        |r| r.get(0),
    )?;
    if !rows {
        // Rows from before version 4 keep their JSON (and NULL here); both read back.
        migrate.push_str("ALTER TABLE records ADD COLUMN rec BLOB;");
    }
    if !migrate.is_empty() {
        conn.execute_batch(&format!(
            "BEGIN; {migrate} PRAGMA user_version = {VERSION}; COMMIT;"
        ))?;
    }
    conn.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}
