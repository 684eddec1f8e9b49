//! Pod, namespace and container names from the kubelet's `/pods` endpoint (the node's own
//! view of its pods, so it answers for static pods too and needs no API-server access).
//!
//! The list is cached and fetched again only when a UID or container id is not in it, at most
//! once per `refresh_ms`: a pod started since the last fetch is named on the next discovery.
//! An outage is logged once when it starts and once when it ends; identities keep what the
//! cgroup path gave meanwhile.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::Workload;

/// Where the service account's token lives in a pod.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How to reach the kubelet (`[workload]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeletConfig {
    /// The kubelet's base URL, e.g. `https://${NODE_IP}:10250` (`${NAME}` is read from the
    /// environment: a `DaemonSet` passes the node's address through the downward API). None:
    /// identities carry what the cgroup path says (pod UID, container id) without names.
    pub kubelet_url: Option<String>,
    /// Bearer token sent to the kubelet, read at each fetch (projected tokens rotate). Absent
    /// file: no token.
    pub kubelet_token_file: PathBuf,
    /// PEM bundle that signs the kubelet's serving certificate. None: the public web roots.
    pub kubelet_ca_file: Option<PathBuf>,
    /// Skip the kubelet's certificate check (most kubelets serve a self-signed certificate
    /// that names the node, not the address used). The token still goes only to this URL.
    pub kubelet_insecure_tls: bool,
    /// Per fetch.
    pub kubelet_timeout_ms: u64,
    /// Least time between two fetches of the pod list.
    pub kubelet_refresh_ms: u64,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            kubelet_url: None,
            kubelet_token_file: PathBuf::from(SERVICE_ACCOUNT_TOKEN),
            kubelet_ca_file: None,
            kubelet_insecure_tls: false,
            kubelet_timeout_ms: 2000,
            kubelet_refresh_ms: 5000,
        }
    }
}

/// Errors reaching or reading the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// `kubelet_url` names an environment variable that is not set.
    #[error("kubelet_url: environment variable {0} is not set")]
    Env(String),
    /// The CA bundle could not be read or holds no certificate.
    #[error("kubelet CA {path}: {why}")]
    Ca { path: PathBuf, why: String },
    /// The request failed (connection refused, timeout, TLS).
    #[error("kubelet {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The body is not a pod list.
    #[error("kubelet {url}: not a pod list: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One pod as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub name: String,
    /// Container id (no runtime prefix) → container name.
    pub containers: HashMap<String, String>,
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(
    clippy::struct_field_names,
    reason = "the kubelet's field names, kept so the JSON maps one to one"
)]
struct Status {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    /// `containerd://<id>` (absent while the container is being created).
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
}

/// Parses a `PodList` (the kubelet's `/pods` body) into names by pod UID.
pub fn parse_pods(body: &[u8]) -> Result<HashMap<String, PodNames>, serde_json::Error> {
    let list: PodList = serde_json::from_slice(body)?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| !p.metadata.uid.is_empty())
        .map(|p| {
            let containers = p
                .status
                .container_statuses
                .into_iter()
                .chain(p.status.init_container_statuses)
                .chain(p.status.ephemeral_container_statuses)
                .filter_map(|c| {
                    let id = c.container_id?;
                    let bare = id.split_once("://").map_or(id.as_str(), |(_, id)| id);
                    Some((bare.to_string(), c.name))
                })
                .collect();
            (
                p.metadata.uid,
                PodNames {
                    namespace: p.metadata.namespace,
                    name: p.metadata.name,
                    containers,
                },
            )
        })
        .collect())
}

/// `${NAME}` in `url` replaced by the environment's value.
pub fn expand_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, KubeletError> {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[at..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&env(name).ok_or_else(|| KubeletError::Env(name.to_string()))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The kubelet client with its cache of pod names.
pub struct Kubelet {
    agent: ureq::Agent,
    pods_url: String,
    token_file: PathBuf,
    refresh: Duration,
    pods: HashMap<String, PodNames>,
    fetched: Option<Instant>,
    /// In an outage (logged once).
    failing: bool,
    /// Fetches that failed, for the log.
    pub failures: u64,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("pods_url", &self.pods_url)
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

impl Kubelet {
    /// A client for `config` (None when no URL is configured).
    pub fn new(config: &KubeletConfig) -> Result<Option<Self>, KubeletError> {
        let Some(url) = &config.kubelet_url else {
            return Ok(None);
        };
        let base = expand_env(url, |n| std::env::var(n).ok())?;
        let mut tls =
            ureq::tls::TlsConfig::builder().disable_verification(config.kubelet_insecure_tls);
        if let Some(path) = &config.kubelet_ca_file {
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(read_ca(path)?)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.kubelet_timeout_ms)))
            .tls_config(tls.build())
            .http_status_as_error(true)
            .build()
            .new_agent();
        Ok(Some(Self {
            agent,
            pods_url: format!("{}/pods", base.trim_end_matches('/')),
            token_file: config.kubelet_token_file.clone(),
            refresh: Duration::from_millis(config.kubelet_refresh_ms),
            pods: HashMap::new(),
            fetched: None,
            failing: false,
            failures: 0,
        }))
    }

    /// Fills in `w`'s names from the cache, fetching the list again first (when `fetch`) if
    /// its pod or container is not there and the last fetch is older than `refresh`.
    pub fn enrich(&mut self, w: &mut Workload, fetch: bool) {
        let Some(uid) = w.pod_uid.clone() else {
            return;
        };
        let known = self.pods.get(&uid).is_some_and(|p| {
            w.container_id
                .as_ref()
                .is_none_or(|id| p.containers.contains_key(id))
        });
        if fetch && !known && self.fetched.is_none_or(|t| t.elapsed() >= self.refresh) {
            self.fetched = Some(Instant::now());
            match self.fetch() {
                Ok(pods) => {
                    if self.failing {
                        tracing::info!("kubelet {} answers again", self.pods_url);
                    }
                    self.failing = false;
                    self.pods = pods;
                }
                Err(e) => {
                    self.failures += 1;
                    if !self.failing {
                        tracing::warn!(
                            "workload names unknown until the kubelet answers (pod UIDs and \
                             container ids still come from cgroups): {e}"
                        );
                    }
                    self.failing = true;
                }
            }
        }
        if let Some(p) = self.pods.get(&uid) {
            w.namespace = Some(p.namespace.clone());
            w.pod = Some(p.name.clone());
            w.container = w
                .container_id
                .as_ref()
                .and_then(|id| p.containers.get(id))
                .cloned();
        }
    }

    fn fetch(&self) -> Result<HashMap<String, PodNames>, KubeletError> {
        let http = |source| KubeletError::Http {
            url: self.pods_url.clone(),
            source: Box::new(source),
        };
        let mut req = self.agent.get(&self.pods_url);
        if let Ok(token) = std::fs::read_to_string(&self.token_file) {
            req = req.header("Authorization", &format!("Bearer {}", token.trim()));
        }
        let mut resp = req.call().map_err(http)?;
        // A pod list of a full node is a few MiB at most.
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(http)?;
        parse_pods(&body).map_err(|source| KubeletError::Decode {
            url: self.pods_url.clone(),
            source,
        })
    }
}

fn read_ca(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, KubeletError> {
    let ca = |why: String| KubeletError::Ca {
        path: path.to_path_buf(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| ca(e.to_string()))? {
            certs.push(c.to_owned());
        }
    }
    if certs.is_empty() {
        return Err(ca("no certificate in it".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
      {"metadata":{"name":"vllm-0","namespace":"llm","uid":"4f9c3a1e-7b2d-4c8e-9a01-23456789abcd",
        "labels":{"app":"vllm"}},
       "spec":{"containers":[{"name":"engine"}]},
       "status":{"phase":"Running",
         "initContainerStatuses":[{"name":"fetch-weights","containerID":"containerd://aaaa"}],
         "containerStatuses":[{"name":"engine","containerID":"containerd://bbbb","ready":true},
                              {"name":"sidecar"}]}},
      {"metadata":{"name":"pending","namespace":"llm","uid":"5f9c3a1e-7b2d-4c8e-9a01-23456789abcd"}},
      {"metadata":{"name":"no-uid"}}
    ]}"#;

    #[test]
    fn a_pod_list_gives_names_by_uid_and_container_id() {
        let pods = parse_pods(LIST.as_bytes()).expect("parses");
        assert_eq!(pods.len(), 2);
        let p = &pods["4f9c3a1e-7b2d-4c8e-9a01-23456789abcd"];
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("llm", "vllm-0"));
        assert_eq!(p.containers["bbbb"], "engine");
        assert_eq!(p.containers["aaaa"], "fetch-weights");
        assert_eq!(
            p.containers.len(),
            2,
            "a container without an id yet is left out"
        );
        assert!(
            pods["5f9c3a1e-7b2d-4c8e-9a01-23456789abcd"]
                .containers
                .is_empty()
        );
        assert!(parse_pods(b"<html>").is_err());
        assert!(parse_pods(br#"{"items":[{"metadata":7}]}"#).is_err());
    }

    /// A kubelet on loopback that answers `answers` requests with `LIST`, then closes.
    fn serve(answers: usize) -> (u16, std::thread::JoinHandle<usize>) {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let t = std::thread::spawn(move || {
            let mut served = 0;
            for conn in listener.incoming().take(answers).flatten() {
                let mut r = std::io::BufReader::new(&conn);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = (&conn).write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{LIST}",
                        LIST.len()
                    )
                    .as_bytes(),
                );
                served += 1;
            }
            served
        });
        (port, t)
    }

    /// Names come from the cache while the kubelet is down; an unknown pod fetches again, but
    /// not more often than `refresh`.
    #[test]
    fn the_cache_outlives_an_outage_and_refetches_are_spaced() {
        let (port, server) = serve(1);
        let mut k = Kubelet::new(&KubeletConfig {
            kubelet_url: Some(format!("http://127.0.0.1:{port}")),
            kubelet_token_file: PathBuf::from("/nonexistent"),
            kubelet_timeout_ms: 1000,
            kubelet_refresh_ms: 60_000,
            ..KubeletConfig::default()
        })
        .expect("config")
        .expect("a client");
        let mut w = Workload {
            pod_uid: Some("4f9c3a1e-7b2d-4c8e-9a01-23456789abcd".into()),
            container_id: Some("bbbb".into()),
            ..Workload::default()
        };
        k.enrich(&mut w, true);
        assert_eq!(server.join().expect("served"), 1);
        assert_eq!(
            (
                w.namespace.as_deref(),
                w.pod.as_deref(),
                w.container.as_deref()
            ),
            (Some("llm"), Some("vllm-0"), Some("engine"))
        );
        // The kubelet is gone: a known pod is named from the cache without a fetch.
        let mut again = Workload {
            namespace: None,
            pod: None,
            container: None,
            ..w.clone()
        };
        k.enrich(&mut again, true);
        assert_eq!(again, w);
        assert_eq!(k.failures, 0);
        // An unknown pod within `refresh` of the last fetch: no fetch, no names.
        let mut unknown = Workload {
            pod_uid: Some("6f9c3a1e-7b2d-4c8e-9a01-23456789abcd".into()),
            ..Workload::default()
        };
        k.enrich(&mut unknown, true);
        assert_eq!((unknown.pod.as_deref(), k.failures), (None, 0));
        // Once `refresh` has passed, it tries, fails, and counts it.
        k.refresh = Duration::ZERO;
        k.enrich(&mut unknown, false);
        assert_eq!(k.failures, 0, "cache only: no fetch");
        k.enrich(&mut unknown, true);
        assert_eq!((unknown.pod.as_deref(), k.failures), (None, 1));
    }

    #[test]
    fn env_names_in_the_url_are_expanded() {
        let env = |n: &str| (n == "NODE_IP").then(|| "10.0.0.7".to_string());
        assert_eq!(
            expand_env("https://${NODE_IP}:10250", env).expect("set"),
            "https://10.0.0.7:10250"
        );
        assert_eq!(expand_env("http://x/${", env).expect("kept"), "http://x/${");
        assert!(matches!(
            expand_env("https://${NODE_NAME}:10250", env),
            Err(KubeletError::Env(n)) if n == "NODE_NAME"
        ));
    }
}
