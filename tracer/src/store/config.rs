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
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: Some(PathBuf::from("/var/lib/tracer")),
            retention_days: 90,
            max_bytes: 10 << 30,
            journal: true,
            journals_kept: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoreConfig;

    #[test]
    fn the_readme_block_parses() {
        let c: StoreConfig = toml::from_str(
            "path = \"/var/lib/tracer\"\nretention_days = 90\nmax_bytes = 10737418240\njournal = true\njournals_kept = 3\n",
        )
        .expect("valid");
        assert_eq!(c, StoreConfig::default());
        assert!(toml::from_str::<StoreConfig>("dir = \"/x\"").is_err());
    }
}
