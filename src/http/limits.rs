//! Connection limits of the HTTP servers: how long a client may take to send a request
//! head, to send a request body, and to stay idle between requests, and how many
//! connections are served at once ([`HttpLimits`]).
//!
//! hyper's own `header_read_timeout` starts as soon as a connection waits for a request,
//! idle keep-alive time included, so it cannot tell a slow head from an idle keep-alive
//! connection. Instead each connection has a [`ConnClock`]: the socket reads (through
//! [`Watched`]) note when the first byte of a new request arrives, the service notes when a
//! request head has been parsed and when its response has been written out, and a watchdog
//! closes the connection when the phase it is in has lasted too long (idle: since the last
//! response; head: since its first byte). While a request is in flight only the body timeout
//! applies ([`TimeoutBody`]): the whole request body must arrive within it, or the request is
//! answered 408 and the connection closed. Slow handlers and long streamed responses are
//! never cut.
//!
//! Cost per request (it is on every request's path): the phase changes only write the
//! clock; nothing wakes the watchdog, which sleeps until the current phase's deadline, or at
//! most [`ConnClock::tick`], and then looks again (a request head that starts during an
//! idle sleep is caught at the next look: a head times out between its limit and its limit
//! plus a tick). A body that arrives with its head (most bodies) never starts a timer; its
//! deadline is armed the first time it has to wait for the client.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{ApiError, AppService};

/// Per-connection limits of an HTTP server (`--http_*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From the first byte of a request head to its end.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight (from accept, or from the end of
    /// the previous response, to the first byte of the next request).
    pub idle_timeout: Duration,
    /// From the end of a request head to the end of its body.
    pub body_timeout: Duration,
    /// Connections served at once; beyond, new connections wait in the listen backlog.
    pub max_connections: usize,
}

impl HttpLimits {
    /// Default `--http_header_timeout_secs`.
    pub const HEADER_TIMEOUT_SECS: u64 = 10;
    /// Default `--http_idle_timeout_secs`: longer than the apiserver's worker pool keeps an
    /// idle connection (90 s), so that the pool, not the worker, closes a pooled connection.
    pub const IDLE_TIMEOUT_SECS: u64 = 120;
    /// Default `--http_body_timeout_secs`.
    pub const BODY_TIMEOUT_SECS: u64 = 30;
    /// Default `--http_max_connections`.
    pub const MAX_CONNECTIONS: usize = 4096;
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(Self::HEADER_TIMEOUT_SECS),
            idle_timeout: Duration::from_secs(Self::IDLE_TIMEOUT_SECS),
            body_timeout: Duration::from_secs(Self::BODY_TIMEOUT_SECS),
            max_connections: Self::MAX_CONNECTIONS,
        }
    }
}

/// Where one connection is: which phase it is in and since when.
#[derive(Debug)]
struct Phase {
    /// Requests whose response has not been written out yet.
    in_flight: u32,
    /// The end of the last response (or the accept).
    idle_since: Instant,
    /// The first byte of the next request head, once it has arrived.
    head_since: Option<Instant>,
}

/// The clock of one connection (see the module documentation).
#[derive(Debug)]
pub(super) struct ConnClock {
    phase: Mutex<Phase>,
    /// Set when a request body missed its deadline.
    body_timed_out: AtomicBool,
    limits: HttpLimits,
}

impl ConnClock {
    pub(super) fn new(limits: HttpLimits) -> Arc<Self> {
        Arc::new(ConnClock {
            phase: Mutex::new(Phase {
                in_flight: 0,
                idle_since: Instant::now(),
                head_since: None,
            }),
            body_timed_out: AtomicBool::new(false),
            limits,
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived from the client.
    fn on_read(&self) {
        let mut p = self.phase();
        if p.in_flight == 0 && p.head_since.is_none() {
            p.head_since = Some(Instant::now());
        }
    }

    /// A request head has been parsed; the returned guard ends the request when dropped.
    fn request(self: &Arc<Self>) -> InFlight {
        let mut p = self.phase();
        p.in_flight += 1;
        p.head_since = None;
        InFlight(self.clone())
    }

    /// When the connection's current phase runs out, and what running out means (`None`
    /// while a request is in flight).
    fn due(&self) -> Option<(Instant, &'static str)> {
        let p = self.phase();
        if p.in_flight > 0 {
            None
        } else if let Some(h) = p.head_since {
            Some((
                h + self.limits.header_timeout,
                "request head not received in time",
            ))
        } else {
            Some((
                p.idle_since + self.limits.idle_timeout,
                "idle keep-alive connection timed out",
            ))
        }
    }

    #[cfg(test)]
    fn deadline(&self) -> Option<Instant> {
        self.due().map(|(at, _)| at)
    }

    /// The longest the watchdog sleeps without looking at the phase again: half the
    /// shorter of the header and idle limits, and at least 10 ms.
    fn tick(&self) -> Duration {
        (self.limits.header_timeout.min(self.limits.idle_timeout) / 2)
            .max(Duration::from_millis(10))
    }

    /// Returns once the connection has stayed in one phase longer than that phase allows.
    /// It polls the phase (see the module documentation): nothing notifies it.
    pub(super) async fn expired(&self) -> &'static str {
        loop {
            let now = Instant::now();
            let wake = match self.due() {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => at.min(now + self.tick()),
                None => now + self.tick(),
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// One request in flight on a connection; ends it (the connection goes idle) when dropped.
struct InFlight(Arc<ConnClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut p = self.0.phase();
        p.in_flight = p.in_flight.saturating_sub(1);
        if p.in_flight == 0 {
            p.idle_since = Instant::now();
            p.head_since = None;
        }
    }
}

/// A socket whose reads are reported to the connection's clock.
pub(super) struct Watched<T> {
    io: T,
    clock: Arc<ConnClock>,
}

impl<T> Watched<T> {
    pub(super) fn new(io: T, clock: Arc<ConnClock>) -> Self {
        Watched { io, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The error a request body yields once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body that must arrive in full before a deadline, armed (from then on) the
/// first time the body has to wait for the client.
struct TimeoutBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    clock: Arc<ConnClock>,
}

impl hyper::body::Body for TimeoutBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = self.clock.limits.body_timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.clock.body_timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends its request (see [`InFlight`]) when written out or dropped.
struct Tracked {
    inner: Body,
    _request: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one request of a connection with `clock`: the body gets its deadline, the
/// response tells the clock when it is written out, and a request whose body missed its
/// deadline is answered 408 (and the connection closed), whatever the handler made of it.
pub(super) async fn call<S>(mut app: S, clock: Arc<ConnClock>, req: Request<Incoming>) -> Response
where
    S: AppService,
{
    let request = clock.request();
    let req = if req.body().is_end_stream() {
        req.map(Body::new)
    } else {
        let clock = clock.clone();
        req.map(|inner| {
            Body::new(TimeoutBody {
                inner,
                deadline: None,
                clock,
            })
        })
    };
    // Routers and the layers around them are always ready.
    let resp = match tower::Service::call(&mut app, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let resp = if clock.body_timed_out.load(Ordering::Relaxed) {
        let mut r = ApiError::Status(
            StatusCode::REQUEST_TIMEOUT,
            BodyTimeout(clock.limits.body_timeout).to_string(),
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    } else {
        resp
    };
    resp.map(|inner| {
        super::boxed_body(Tracked {
            inner,
            _request: request,
        })
    })
}

/// Serves one accepted connection on a task of the current runtime until it ends, times
/// out (see [`ConnClock`]) or, once `graceful` shuts down, has finished its in-flight
/// request. `permit` is its slot under `--http_max_connections`, given back when the
/// connection closes.
pub(super) fn spawn_connection<S>(
    tcp: tokio::net::TcpStream,
    app: S,
    limits: HttpLimits,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    permit: OwnedSemaphorePermit,
) where
    S: AppService,
    S::Future: Send,
{
    let clock = ConnClock::new(limits);
    let io = hyper_util::rt::TokioIo::new(Watched::new(tcp, clock.clone()));
    let c = clock.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (app, clock) = (app.clone(), c.clone());
        async move { Ok::<_, std::convert::Infallible>(call(app, clock, req).await) }
    });
    let conn =
        graceful.watch(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
    // The connection and its watchdog are two tasks, so that serving a request never polls
    // the watchdog's timer: the watchdog aborts the connection's task when a phase runs
    // out, and ends when the connection does.
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop((permit, done));
    });
    let serving = served.abort_handle();
    tokio::spawn(async move {
        tokio::select! {
            _ = ended => {}
            why = clock.expired() => {
                tracing::debug!(why, "closing a client connection");
                serving.abort();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(header_ms: u64, idle_ms: u64) -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            ..HttpLimits::default()
        }
    }

    /// `clock`'s deadline lies `after` past a moment between `before` and now.
    fn assert_deadline(clock: &ConnClock, before: Instant, after: Duration) {
        let d = clock.deadline().expect("a deadline");
        assert!(d >= before + after && d <= Instant::now() + after, "{d:?}");
    }

    #[test]
    fn phases_move_the_deadline() {
        let (header, idle) = (Duration::from_secs(2), Duration::from_secs(7));
        let t0 = Instant::now();
        let clock = ConnClock::new(limits(2000, 7000));
        // Idle from the accept.
        assert_deadline(&clock, t0, idle);
        // The first byte of a head starts the header timeout; later bytes do not move it.
        let t1 = Instant::now();
        clock.on_read();
        assert_deadline(&clock, t1, header);
        let first = clock.deadline();
        clock.on_read();
        assert_eq!(clock.deadline(), first);
        // No deadline while a request is in flight, whatever arrives meanwhile.
        let req = clock.request();
        clock.on_read();
        assert_eq!(clock.deadline(), None);
        // Idle again from the end of the response.
        let t2 = Instant::now();
        drop(req);
        assert_deadline(&clock, t2, idle);
    }

    #[tokio::test]
    async fn expiry_names_the_phase() {
        let bound = Duration::from_secs(10);
        let clock = ConnClock::new(limits(20, 30));
        let expired = |c: Arc<ConnClock>| async move {
            tokio::time::timeout(bound, c.expired()).await.unwrap()
        };
        assert_eq!(
            expired(clock.clone()).await,
            "idle keep-alive connection timed out"
        );
        clock.on_read();
        assert_eq!(
            expired(clock.clone()).await,
            "request head not received in time"
        );
        // A request in flight does not expire; its end starts the idle timeout.
        let req = clock.request();
        let waiting = tokio::spawn(expired(clock.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        drop(req);
        assert_eq!(
            waiting.await.unwrap(),
            "idle keep-alive connection timed out"
        );
    }
}
