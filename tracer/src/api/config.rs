//! `[api]` in the configuration file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where and to whom the API is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The Unix socket; none: no API.
    pub socket: Option<PathBuf>,
    /// The socket file's permission bits. 0666 by default: every local user may connect, and
    /// the peer's credentials decide what it sees.
    pub mode: u32,
    /// Members of this group (name or number) see every service, as root does.
    pub group: Option<String>,
    /// Final records kept in memory for queries (the oldest go first).
    pub memory_records: usize,
    /// Connections served at once; more wait in the socket's backlog.
    pub max_connections: usize,
    /// Of those, at most this many from one user (uid), so one user's idle or slow
    /// connections cannot take every slot; more are answered 429 at once.
    pub max_connections_per_user: usize,
    /// Of those, at most this many may be `/v1/stream` readers (long-lived), so streams can
    /// never take every slot from queries; more are answered 503.
    pub max_streams: usize,
    /// Tenants named in `/metrics` (in the order first seen); the rest are counted as
    /// `other`, so a tenant per customer cannot grow the series without bound.
    pub metrics_tenants: usize,
    /// Also serve `/metrics` (and `/health`) on this TCP address, for Prometheus; off when
    /// unset. No credentials over TCP: bind it where only the scraper reaches.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: Some(PathBuf::from("/run/tracer/tracer.sock")),
            mode: 0o666,
            group: None,
            memory_records: 100_000,
            max_connections: 64,
            max_connections_per_user: 16,
            max_streams: 16,
            metrics_tenants: 100,
            metrics_listen: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ApiConfig;

    #[test]
    fn the_readme_block_parses() {
        let c: ApiConfig = toml::from_str(
            "socket = \"/run/tracer/tracer.sock\"\nmode = 0o666\ngroup = \"tracer\"\nmemory_records = 100000\nmax_connections = 64\nmax_connections_per_user = 16\nmax_streams = 16\nmetrics_tenants = 100\n",
        )
        .expect("valid");
        assert_eq!(c.mode, 0o666);
        assert_eq!(
            c,
            ApiConfig {
                group: Some("tracer".into()),
                ..ApiConfig::default()
            }
        );
        assert!(
            toml::from_str::<ApiConfig>("sock = \"/x\"").is_err(),
            "unknown keys refused"
        );
    }
}
