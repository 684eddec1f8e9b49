//! `[otlp]` in the configuration file: where the collector is and how much may wait for it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// OTLP/HTTP export of final records (logs) and the `/metrics` counters (metrics). Off unless
/// `endpoint` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`); `/v1/logs` and
    /// `/v1/metrics` are appended. `http://` only: put TLS in a local collector.
    pub endpoint: Option<String>,
    /// One log record per final energy record.
    pub logs: bool,
    /// The `/metrics` counters as cumulative sums, and the device gauges.
    pub metrics: bool,
    /// Sent with every export (an authorization token).
    pub headers: BTreeMap<String, String>,
    /// One export's whole time: connecting, sending, the answer.
    pub timeout_ms: u64,
    /// Records waiting for export at most; more are dropped (counted) so a collector that is
    /// down costs bounded memory and never slows attribution.
    pub queue_records: usize,
    /// Records in one export at most.
    pub batch_records: usize,
    /// A batch goes out at the latest this long after its first record.
    pub flush_interval_ms: u64,
    /// How often the metrics are sent.
    pub metrics_interval_ms: u64,
    /// A batch the collector did not take is retried with backoff for this long, then dropped
    /// (counted). Metrics are not retried: the next export carries the new totals.
    pub retry_max_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            logs: true,
            metrics: true,
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
            queue_records: 2048,
            batch_records: 512,
            flush_interval_ms: 1000,
            metrics_interval_ms: 10_000,
            retry_max_ms: 30_000,
        }
    }
}

/// Where exports go: an `http://` URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// `host:port` as written (the `Host` header).
    pub authority: String,
    /// The URL's path without a trailing slash (`""` for none): signal paths go after it.
    pub base_path: String,
}

impl Endpoint {
    /// Parses `url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("otlp.endpoint = {url:?}: not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "otlp.endpoint = {url:?}: https is not supported; send OTLP/HTTP to a local \
                     collector (http://127.0.0.1:4318) that forwards over TLS"
                ));
            }
            _ => return Err(format!("otlp.endpoint = {url:?}: must start with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("otlp.endpoint = {url:?}: no host"))?;
        if uri.query().is_some() {
            return Err(format!("otlp.endpoint = {url:?}: no query string"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl OtlpConfig {
    /// The endpoint, when export is on and has something to send.
    pub fn enabled(&self) -> Option<&str> {
        self.endpoint
            .as_deref()
            .filter(|_| self.logs || self.metrics)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let Some(url) = &self.endpoint else {
            return Ok(());
        };
        Endpoint::parse(url)?;
        for (k, v) in &self.headers {
            hyper::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("otlp.headers: {k:?} is not a header name"))?;
            hyper::header::HeaderValue::from_str(v)
                .map_err(|_| format!("otlp.headers.{k}: not a valid header value"))?;
        }
        for (key, v) in [
            ("timeout_ms", self.timeout_ms),
            ("flush_interval_ms", self.flush_interval_ms),
            ("metrics_interval_ms", self.metrics_interval_ms),
            ("queue_records", self.queue_records as u64),
            ("batch_records", self.batch_records as u64),
        ] {
            if v == 0 {
                return Err(format!("otlp.{key} must be > 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Endpoint, OtlpConfig};

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:4318").expect("valid");
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.authority.as_str(),
                e.base_path.as_str()
            ),
            ("127.0.0.1", 4318, "127.0.0.1:4318", "")
        );
        let e = Endpoint::parse("http://[::1]/otlp/").expect("valid");
        assert_eq!((e.host.as_str(), e.port), ("::1", 80));
        assert_eq!(e.base_path, "/otlp");
        for bad in [
            "https://c:4318",
            "c:4318",
            "http://c:4318/?a=1",
            "not a url",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn off_by_default_and_checked_when_on() {
        let c = OtlpConfig::default();
        assert!(c.enabled().is_none());
        assert!(c.validate().is_ok());
        let on = |extra: &str| {
            toml::from_str::<OtlpConfig>(&format!("endpoint = \"http://h:4318\"\n{extra}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map(|()| c))
        };
        assert_eq!(on("").expect("valid").enabled(), Some("http://h:4318"));
        assert!(
            on("logs = false\nmetrics = false\n")
                .expect("valid")
                .enabled()
                .is_none()
        );
        assert!(on("headers = { authorization = \"Bearer x\" }").is_ok());
        assert!(on("headers = { \"a b\" = \"x\" }").is_err());
        assert!(on("queue_records = 0").is_err());
        assert!(on("endpoint_url = \"x\"").is_err(), "unknown keys refused");
    }
}
