//! Serving: the Unix socket (created with the configured mode, a stale one replaced, a live
//! one refused), one hyper HTTP/1.1 connection per client with a header timeout and size
//! limit, at most `max_connections` at once (more are answered 503; root is never turned
//! away), `max_connections_per_user` per uid (429), `max_streams` streams (503; they give their
//! connection slot back), a write that makes no progress for 10 s ends its connection, the
//! peer's credentials read once per connection.

use std::{
    convert::Infallible,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::UnixListener, sync::Semaphore};

use super::{ApiConfig, Shared, access, reply::Reply, routes};

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something that is not a socket is at the socket's path.
    #[error("{0} exists and is not a socket: choose another api.socket")]
    NotASocket(PathBuf),
    /// Another process serves the socket (another daemon).
    #[error("{0}: another process is serving this socket (is another tracer running?)")]
    InUse(PathBuf),
    /// Creating, binding or setting the socket's mode failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `api.group` names no group.
    #[error("api.group {0:?} is not a group on this host")]
    UnknownGroup(String),
}

/// A running API.
#[derive(Debug)]
pub struct Api {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApiError {
    let path = path.to_path_buf();
    move |source| ApiError::Io { what, path, source }
}

/// Binds `path`: a socket file nobody answers on is a stale one (a daemon that died) and is
/// replaced; one that answers is another daemon's.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory of", path))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        // Only a socket is ever replaced: a misconfigured path never costs a file.
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", path))?;
    Ok(listener)
}

/// `/v1/stream`'s body: records as they become final, one JSON line each, fed by a task that
/// follows the broadcast; a reader too slow for the queue is told how many it missed.
struct StreamBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    /// One of `api.max_streams`, held while the body lives.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl StreamBody {
    fn follow(
        shared: &Shared,
        scope: access::Scope,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        let mut records = shared.stream.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let line = match records.recv().await {
                    Ok(r) => match routes::stream_line(&r, &scope) {
                        Some(line) => line,
                        None => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        format!("{{\"lagged\":{n}}}\n")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                // The client went away: stop following.
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        Self { rx, _slot: slot }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|b| Ok(Frame::data(b))))
    }
}

type ApiBody = http_body_util::Either<Full<Bytes>, StreamBody>;

/// What a connection holds: its slot among `api.max_connections` (given back when it turns
/// into a stream, which holds one of `api.max_streams` instead) and the streams' semaphore.
struct Slots {
    connection: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    streams: Arc<Semaphore>,
}

fn reply(r: Reply, shared: &Shared, scope: &access::Scope, slots: &Slots) -> Response<ApiBody> {
    let (status, kind, body) = match r {
        Reply::Json(status, v) => (status, "application/json", v.to_string() + "\n"),
        Reply::Text(status, kind, text) => (status, kind, text),
        Reply::Stream => match Arc::clone(&slots.streams).try_acquire_owned() {
            Ok(slot) => {
                // A stream lives long: it gives its connection slot back to queries.
                slots
                    .connection
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                let body = StreamBody::follow(shared, scope.clone(), slot);
                let mut resp = Response::new(http_body_util::Either::Right(body));
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/x-ndjson"),
                );
                // Without its slot, the connection ends with the stream.
                h.insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                return resp;
            }
            Err(_) => (
                503,
                "application/json",
                serde_json::json!({ "error": "too many streams open (api.max_streams)" })
                    .to_string()
                    + "\n",
            ),
        },
    };
    let mut resp = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    resp
}

/// One client connection, HTTP/1.1 with keep-alive: a head not sent within 5 s, or over
/// 16 KiB, ends it (hyper answers 408/431 where it can).
pub(super) async fn serve<S, B>(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

impl Api {
    /// Binds the socket and serves it on the current tokio runtime until dropped.
    pub fn start(
        config: &ApiConfig,
        socket: &Path,
        shared: Arc<Shared>,
        proc_root: PathBuf,
    ) -> Result<Api, ApiError> {
        let group = config
            .group
            .as_ref()
            .map(|g| access::group_id(g).ok_or_else(|| ApiError::UnknownGroup(g.clone())))
            .transpose()?;
        let listener = bind(socket, config.mode)?;
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let streams = Arc::new(Semaphore::new(config.max_streams.max(1)));
        let per_user = PerUser::new(config.max_connections_per_user.max(1));
        let task = tokio::spawn(async move {
            loop {
                // Accepted at once, whatever is open: a full house is answered, never left
                // waiting in the backlog.
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let cred = stream.peer_cred().ok();
                let (shared, proc_root) = (Arc::clone(&shared), proc_root.clone());
                let streams = Arc::clone(&streams);
                let per_user = per_user.clone();
                let connections = Arc::clone(&connections);
                tokio::spawn(async move {
                    let Some(cred) = cred else {
                        return;
                    };
                    // One user cannot hold more than its share of the slots (idle or slow
                    // connections): past it, it is told so at once.
                    let Some(_user_slot) = per_user.take(cred.uid()) else {
                        refuse(
                            &mut stream,
                            429,
                            "too many connections from this user (api.max_connections_per_user)",
                        )
                        .await;
                        return;
                    };
                    // Root is never turned away (it holds at most its own share); anyone else
                    // gets a slot or a 503.
                    let permit = match Arc::clone(&connections).try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) if cred.uid() == 0 => None,
                        Err(_) => {
                            refuse(
                                &mut stream,
                                503,
                                "the API is serving api.max_connections already",
                            )
                            .await;
                            return;
                        }
                    };
                    let slots = Arc::new(Slots {
                        connection: std::sync::Mutex::new(permit),
                        streams,
                    });
                    let peer = (cred.uid(), cred.gid(), cred.pid().map(|p| p as u32));
                    let snapshot = shared.snapshot();
                    let scope = access::scope(&proc_root, peer, group, snapshot.as_deref());
                    // Queries run on tokio's blocking pool: the daemon's event loop (the
                    // pipeline, the ring drain) never waits for one.
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (shared, scope) = (Arc::clone(&shared), scope.clone());
                        let slots = Arc::clone(&slots);
                        let method = req.method().as_str().to_owned();
                        let path = req.uri().path().to_owned();
                        let query = req.uri().query().map(str::to_owned);
                        async move {
                            let answer = tokio::task::spawn_blocking(move || {
                                let r = routes::route(
                                    &method,
                                    &path,
                                    query.as_deref(),
                                    &scope,
                                    &shared,
                                );
                                (r, shared, scope)
                            })
                            .await;
                            Ok::<_, Infallible>(match answer {
                                Ok((r, shared, scope)) => reply(r, &shared, &scope, &slots),
                                Err(_) => reply(
                                    super::reply::error(500, "the query failed"),
                                    &Shared::empty(),
                                    &access::Scope::All,
                                    &slots,
                                ),
                            })
                        }
                    });
                    serve(WriteDeadline::new(stream), service).await;
                });
            }
        });
        Ok(Api {
            path: socket.to_path_buf(),
            task,
        })
    }
}

/// Connections per user (uid): at most `limit` at once.
#[derive(Clone)]
struct PerUser {
    limit: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

/// A user's connection, counted until dropped.
struct UserSlot {
    uid: u32,
    held: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

impl PerUser {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Arc::default(),
        }
    }

    fn take(&self, uid: u32) -> Option<UserSlot> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(uid).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            uid,
            held: Arc::clone(&self.held),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// Answers a connection it will not serve (`status`: 429 or 503) and closes it, without
/// reading its request: the answer is the same whatever it asks.
async fn refuse(stream: &mut tokio::net::UnixStream, status: u16, why: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = serde_json::json!({ "error": why }).to_string() + "\n";
    let reason = if status == 429 {
        "Too Many Requests"
    } else {
        "Service Unavailable"
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // What the client sent is read and dropped until it closes: a socket closed with
        // unread data resets its peer, which could then lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    // A client that neither reads nor closes is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// How long a write may make no progress before the connection is dropped: a client that
/// stops reading (a large page, a stream) gives its slot back instead of holding it forever.
const WRITE_STALL: Duration = Duration::from_secs(10);

/// A connection whose writes fail once one has been pending for [`WRITE_STALL`].
struct WriteDeadline<S> {
    inner: S,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            stalled: None,
        }
    }

    /// `Pending` from a write: starts the clock, or reports the stall once it ran out.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            done @ Poll::Ready(_) => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            done @ Poll::Ready(_) => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
