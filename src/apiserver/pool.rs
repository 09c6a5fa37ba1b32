//! Keep-alive HTTP/1.1 connections from one serving thread to the workers: the client the
//! apiserver's worker calls go through. Each serving thread has its own pool, because a
//! hyper connection is driven by a task on the runtime that opened it.
//!
//! Idle connections are kept per worker address (`host:port`), newest used first, at most
//! `max_idle` per worker and for `idle_timeout`; a connection goes back to the pool when its
//! response body has been read to the end, and is closed when the body is dropped before
//! that (which is how a client disconnect cancels the worker's generation). A request that a
//! pooled connection could not send because the worker had closed it meanwhile (keep-alive
//! timeouts, e.g. uvicorn's 5 s) is sent again on another connection, and one that a pooled
//! connection sent just as the worker closed it (a draining worker closing its idle
//! connections) is sent once more on a new connection; every other failure is the caller's
//! to handle. This replaces hyper-util's general pool, whose key hashing and URI
//! handling cost about as much per request as the rest of the worker call.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// Where a worker is: the pool key, the `Host` header and the address to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` as the worker registered it (IPv6 hosts bracketed): the pool key.
    key: Arc<str>,
    host_header: HeaderValue,
    /// Host to connect to (IPv6 without brackets).
    host: Box<str>,
    port: u16,
}

impl Target {
    /// The target of an `http://` URL's authority (`None` when it has no host; the port
    /// defaults to 80).
    pub fn new(uri: &http::Uri) -> Option<Target> {
        let host = uri.host()?;
        let port = uri.port_u16().unwrap_or(80);
        let key = uri.authority()?.as_str();
        Some(Target {
            key: key.into(),
            host_header: HeaderValue::from_str(key).ok()?,
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        })
    }

    /// The value for the request's `Host` header.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }
}

/// Why a worker call failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connection failed")]
    Connect(#[source] std::io::Error),
    #[error("connection failed: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

#[derive(Debug)]
struct Idle {
    tx: Sender,
    since: Instant,
}

impl Idle {
    fn expired(&self, now: Instant, idle_timeout: Duration) -> bool {
        now.duration_since(self.since) >= idle_timeout
    }
}

#[derive(Debug)]
struct Inner {
    idle: Mutex<HashMap<Arc<str>, VecDeque<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    sweeping: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, VecDeque<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle connection to `key` that is still open (expired ones are dropped).
    fn checkout(&self, key: &str) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while list
            .front()
            .is_some_and(|c| c.expired(now, self.idle_timeout))
        {
            list.pop_front();
        }
        while let Some(c) = list.pop_back() {
            if !c.tx.is_closed() {
                return Some(c.tx);
            }
        }
        None
    }

    fn put(&self, key: Arc<str>, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() >= self.max_idle {
            list.pop_front();
        }
        list.push_back(Idle {
            tx,
            since: Instant::now(),
        });
    }

    /// Drops expired and closed connections, and workers left with none.
    fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            list.retain(|c| !c.expired(now, self.idle_timeout) && !c.tx.is_closed());
            !list.is_empty()
        });
    }

    fn idle_count(&self) -> usize {
        self.lock().values().map(VecDeque::len).sum()
    }
}

/// One serving thread's client for worker calls (clones share the pool).
#[derive(Clone)]
pub struct WorkerHttp {
    inner: Arc<Inner>,
}

impl WorkerHttp {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        WorkerHttp {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                connect_timeout,
                idle_timeout,
                max_idle,
                sweeping: Default::default(),
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to `target` on a pooled connection or a new
    /// one, and returns the response once its headers have arrived.
    pub async fn request(
        &self,
        target: &Target,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Body>, PoolError> {
        // Set once a pooled connection was closed under a request it had sent.
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only {
                None
            } else {
                self.inner.checkout(&target.key)
            };
            let (mut tx, reused) = match pooled {
                Some(tx) => (tx, true),
                None => (self.connect(target).await?, false),
            };
            // A pooled connection becomes ready once it has finished the previous exchange;
            // an error means the worker closed it: try the next one.
            if reused && tx.ready().await.is_err() {
                continue;
            }
            // A worker that closes an idle connection (a draining worker, after its grace)
            // just as a request goes out on it never reads that request: the connection
            // ends without an answer. Such a request is sent once more, on a new connection.
            let again = (reused && !fresh_only).then(|| copy_request(&req));
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let ret = Some((self.inner.clone(), target.key.clone(), tx));
                    return Ok(resp.map(|inner| Body { inner, ret }));
                }
                Err(mut e) => match (e.take_message(), again) {
                    // Not sent: the pooled connection closed under us.
                    (Some(r), _) if reused => req = r,
                    (None, Some(r)) if closed_unanswered(e.error()) => {
                        fresh_only = true;
                        req = r;
                    }
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self, t: &Target) -> Result<Sender, PoolError> {
        self.start_sweeper();
        let tcp = tokio::time::timeout(
            self.inner.connect_timeout,
            tokio::net::TcpStream::connect((&*t.host, t.port)),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(self.inner.connect_timeout))?
        .map_err(PoolError::Connect)?;
        tcp.set_nodelay(true).map_err(PoolError::Connect)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "worker connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// On the first connection: a task on this thread's runtime that closes idle connections
    /// past their time, every half idle timeout, for as long as the pool exists.
    fn start_sweeper(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let every = (self.inner.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.sweep(),
                    None => break,
                }
            }
        });
    }

    /// Idle connections in the pool (for tests and status).
    pub fn idle_count(&self) -> usize {
        self.inner.idle_count()
    }
}

/// Whether a request failed because its connection closed before any answer.
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    e.is_incomplete_message()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | BrokenPipe))
}

/// A copy of `req` (its body is reference-counted bytes).
fn copy_request(req: &http::Request<Full<Bytes>>) -> http::Request<Full<Bytes>> {
    let mut r = http::Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// A worker's response body; the connection goes back to the pool when it has been read
/// to the end: at the end of the stream, or with the last bytes of a `content-length` body
/// (a reader such as hyper's server stops there without asking for the end). A body dropped
/// before that closes the connection.
#[derive(Debug)]
pub struct Body {
    inner: Incoming,
    ret: Option<(Arc<Inner>, Arc<str>, Sender)>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let done = match &frame {
            None => true,
            Some(Err(_)) => {
                this.ret = None;
                false
            }
            Some(Ok(_)) => this.inner.is_end_stream(),
        };
        if done && let Some((pool, key, tx)) = this.ret.take() {
            pool.put(key, tx);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn get(t: &Target) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::from_static(b"{}")));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(crate::wire::worker::GENERATE_PATH);
        req.headers_mut()
            .insert(http::header::HOST, t.host_header().clone());
        req
    }

    /// A worker stand-in: answers each request on a connection with `body`, closing the
    /// connection after `per_conn` answers; counts connections and checks the request line.
    async fn worker(per_conn: usize) -> (Target, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        // Read one request (headers + the 2-byte body).
                        loop {
                            let mut chunk = [0u8; 1024];
                            let n = s.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                            if let Some(p) = end
                                && buf.len() >= p + 4 + 2
                            {
                                let head = String::from_utf8_lossy(&buf[..p]).to_string();
                                assert!(head.starts_with("POST /api/worker/generate HTTP/1.1"));
                                assert!(head.to_ascii_lowercase().contains("host: 127.0.0.1:"));
                                buf.drain(..p + 6);
                                break;
                            }
                        }
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                    // Close without a word, as a keep-alive timeout does.
                });
            }
        });
        let uri: http::Uri = format!("http://{addr}/api/worker/generate")
            .parse()
            .unwrap();
        (Target::new(&uri).unwrap(), conns)
    }

    async fn call(pool: &WorkerHttp, t: &Target) -> Bytes {
        let resp = pool.request(t, get(t)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn reuses_connections_and_survives_workers_closing_them() {
        use std::sync::atomic::Ordering::SeqCst;
        let pool = WorkerHttp::new(Duration::from_secs(3), Duration::from_secs(90), 8);
        // Keep-alive: ten calls, one connection, back in the pool after each body.
        let (t, conns) = worker(usize::MAX).await;
        for _ in 0..10 {
            assert_eq!(&call(&pool, &t).await[..], b"hello");
        }
        assert_eq!(conns.load(SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        // A reader that stops at the end of the content-length (as hyper's server does)
        // returns the connection too.
        let mut body = pool.request(&t, get(&t)).await.unwrap().into_body();
        while !hyper::body::Body::is_end_stream(&body) {
            body.frame().await.unwrap().unwrap();
        }
        assert_eq!(pool.idle_count(), 1);
        drop(body);
        call(&pool, &t).await;
        assert_eq!(conns.load(SeqCst), 1);
        // A body dropped unread closes its connection instead of pooling it.
        let resp = pool.request(&t, get(&t)).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        call(&pool, &t).await;
        assert_eq!(conns.load(SeqCst), 2);

        // The worker closes each connection after one answer: every call still succeeds
        // (the closed pooled connection is noticed, or the unsent request is sent again).
        let (t, conns) = worker(1).await;
        for _ in 0..5 {
            assert_eq!(&call(&pool, &t).await[..], b"hello");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(SeqCst), 5);
    }

    #[tokio::test]
    async fn expired_and_surplus_connections_are_closed() {
        let pool = WorkerHttp::new(Duration::from_secs(3), Duration::from_millis(200), 2);
        let (t, conns) = worker(usize::MAX).await;
        // Three at once: three connections, of which two are kept.
        let (a, b, c) = tokio::join!(call(&pool, &t), call(&pool, &t), call(&pool, &t));
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"hello"[..], &b"hello"[..], &b"hello"[..])
        );
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(), 2);
        // The sweeper closes them after the idle timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn unreachable_worker_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let uri: http::Uri = format!("http://{addr}/x").parse().unwrap();
        let t = Target::new(&uri).unwrap();
        let pool = WorkerHttp::new(Duration::from_secs(3), Duration::from_secs(90), 8);
        let e = pool.request(&t, get(&t)).await.unwrap_err();
        assert!(matches!(e, PoolError::Connect(_)), "{e:?}");
        assert_eq!(e.to_string(), "connection failed");
    }

    #[test]
    fn targets_from_urls() {
        let t = Target::new(&"http://[::1]:8001/api/worker/generate".parse().unwrap()).unwrap();
        assert_eq!((&*t.key, &*t.host, t.port), ("[::1]:8001", "::1", 8001));
        assert_eq!(t.host_header(), "[::1]:8001");
        let t = Target::new(&"http://worker-3/api".parse().unwrap()).unwrap();
        assert_eq!((&*t.key, &*t.host, t.port), ("worker-3", "worker-3", 80));
        assert!(Target::new(&"/api/worker/generate".parse().unwrap()).is_none());
    }
}
