//! `--metrics-listen`: `/metrics` (and `/health`) on a TCP address, for Prometheus, which
//! cannot scrape a Unix socket. Off by default. A TCP peer has no credentials: it gets what
//! root gets from `/metrics`, so bind it where only the scraper reaches (loopback, or a
//! network policy), and it gets nothing else.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use tokio::net::TcpListener;

use super::{
    Shared, get_as_root,
    server::{ApiError, serve},
};

/// The running listener (stops when dropped).
#[derive(Debug)]
pub struct MetricsListener {
    task: tokio::task::JoinHandle<()>,
    /// Where it listens (the port chosen when 0 was asked for).
    pub addr: SocketAddr,
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    let (status, kind, body) = match path {
        "/metrics" => {
            let (s, b) = get_as_root(shared, "/metrics");
            (s, "text/plain; version=0.0.4", b)
        }
        "/health" => {
            let (s, b) = get_as_root(shared, "/health");
            (s, "application/json", b)
        }
        _ => (
            404,
            "text/plain",
            "only /metrics and /health here\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    resp
}

impl MetricsListener {
    /// Binds `addr` and serves on the current tokio runtime.
    pub async fn start(addr: SocketAddr, shared: Arc<Shared>) -> Result<Self, ApiError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Io {
                what: "binding the metrics listener",
                path: addr.to_string().into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ApiError::Io {
            what: "the metrics listener's address",
            path: addr.to_string().into(),
            source,
        })?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let resp = answer(&shared, req.uri().path());
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    serve(stream, service).await;
                });
            }
        });
        Ok(Self { task, addr })
    }
}
