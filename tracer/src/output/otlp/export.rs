//! OTLP/HTTP with protobuf bodies over one kept-alive HTTP/1.1 connection (hyper's client):
//! `POST <base>/v1/logs` and `POST <base>/v1/metrics`, `Content-Type: application/x-protobuf`.
//! A connection the collector closed while idle is replaced once before an export counts as
//! failed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    HeaderMap, Request, StatusCode,
    client::conn::http1::SendRequest,
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;

use super::{OtlpError, Signal, config::Endpoint};

/// An answer body is read up to this (a partial-success message, an error text).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the collector answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// `Retry-After` in seconds, on a 429 or 503.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Sends encoded exports somewhere (the collector, or a stand-in in tests).
pub trait Sink {
    /// One export of `body` for `signal`, within `timeout`.
    fn send(
        &mut self,
        signal: Signal,
        body: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Answer, OtlpError>>;
}

/// The collector at an `http://` endpoint.
pub struct HttpSink {
    endpoint: Endpoint,
    headers: HeaderMap,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl HttpSink {
    /// A client for `endpoint` sending `headers` with every export (validated with the
    /// configuration: one that does not parse here is an error).
    pub fn new(
        endpoint: Endpoint,
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, OtlpError> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| OtlpError::Header(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| OtlpError::Header(k.clone()))?;
            map.insert(name, value);
        }
        Ok(Self {
            endpoint,
            headers: map,
            conn: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, OtlpError> {
        let e = &self.endpoint;
        let stream = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(OtlpError::Connect)?;
        // Small requests: no waiting for more bytes to fill a segment.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(OtlpError::Http)?;
        tokio::spawn(async move {
            // Ends when the collector or the sender closes it; nothing to report.
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, signal: Signal, body: Bytes) -> Result<Request<Full<Bytes>>, OtlpError> {
        let mut req = Request::post(format!("{}{}", self.endpoint.base_path, signal.path()))
            .header(header::HOST, &self.endpoint.authority)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                header::USER_AGENT,
                concat!("tracer/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| OtlpError::Request(e.to_string()))?;
        req.headers_mut().extend(self.headers.clone());
        Ok(req)
    }

    async fn exchange(&mut self, signal: Signal, body: Bytes) -> Result<Answer, OtlpError> {
        // A kept connection may have been closed by the collector while idle: one more try on
        // a new one before this counts as a failure.
        let reused = self.conn.is_some();
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        let sent = match sender.ready().await {
            Ok(()) => {
                sender
                    .send_request(self.request(signal, body.clone())?)
                    .await
            }
            Err(e) => Err(e),
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                sender = self.connect().await?;
                sender.ready().await.map_err(OtlpError::Http)?;
                sender
                    .send_request(self.request(signal, body)?)
                    .await
                    .map_err(OtlpError::Http)?
            }
            Err(e) => return Err(OtlpError::Http(e)),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| OtlpError::Request(format!("reading the answer: {e}")))?
            .to_bytes();
        self.conn = Some(sender);
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

impl Sink for HttpSink {
    async fn send(
        &mut self,
        signal: Signal,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, OtlpError> {
        let out = tokio::time::timeout(timeout, self.exchange(signal, body)).await;
        match out {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(OtlpError::Timeout(timeout))
            }
        }
    }
}
