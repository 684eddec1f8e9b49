//! `[store]` in the configuration file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where final records are kept, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The store's directory (`tracer.db`, the journal, the lock); none: nothing is stored
    /// and nothing survives a restart.
    pub path: Option<PathBuf>,
    /// Records older than this many days are deleted (0: kept by size only).
    pub retention_days: u32,
    /// The database is kept under this many bytes by deleting the oldest records first
    /// (0: no limit).
    pub max_bytes: u64,
    /// Journal every input (the recording format, payloads redacted) next to the database,
    /// so requests that had ended but were not yet final at a crash are recovered on restart.
    pub journal: bool,
    /// Journals of earlier runs kept (the newest; each is a replayable recording).
    pub journals_kept: u32,
    /// The journal starts a new segment (beginning with a checkpoint of the whole state, so
    /// it replays on its own) after this many MiB...
    pub journal_segment_mib: u64,
    /// ...or this many seconds, whichever comes first (0: never by time). A recovery
    /// replays at most the last two segments.
    pub journal_segment_s: u64,
    /// All journals together are kept under this many bytes by deleting the oldest segments
    /// first (never the current run's newest two; 0: no limit).
    pub journal_max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: Some(PathBuf::from("/var/lib/tracer")),
            retention_days: 90,
            max_bytes: 10 << 30,
            journal: true,
            journals_kept: 3,
            journal_segment_mib: 256,
            journal_segment_s: 3600,
            journal_max_bytes: 20 << 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoreConfig;

    #[test]
    fn the_readme_block_parses() {
        let c: StoreConfig = toml::from_str(
            "path = \"/var/lib/tracer\"\nretention_days = 90\nmax_bytes = 10737418240\njournal = true\njournals_kept = 3\njournal_segment_mib = 256\njournal_segment_s = 3600\njournal_max_bytes = 21474836480\n",
        )
        .expect("valid");
        assert_eq!(c, StoreConfig::default());
        assert!(toml::from_str::<StoreConfig>("dir = \"/x\"").is_err());
    }
}
