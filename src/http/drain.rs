//! Draining an HTTP server: readiness, telling clients to go elsewhere, then closing.
//!
//! A [`Drain`] is the switchboard of one daemon's HTTP server. [`Drain::begin`] flips it
//! into draining: `GET /api/ready` answers 503 (liveness `/api/health` stays 200) and every
//! response carries `Connection: close`, so a keep-alive client (the apiserver's worker
//! pool, an SDK) opens its next request on a new connection, which the listener gives to
//! whoever serves next (the successor of an upgrade, or the process systemd starts on its
//! socket). When the daemon is leaving for good (not handing over to a successor), responses
//! also carry [`DRAINING_HEADER`]: the apiserver then stops choosing that worker at once,
//! without waiting for its next instance-list refresh. [`Drain::stop_accepting`] ends the
//! accept loop; [`Drain::close`] also closes idle connections and lets in-flight requests
//! and streams finish (hyper's graceful shutdown).
//!
//! It also counts the requests in flight, a response counting until its body has been sent
//! (or dropped), so a stop can wait for long streams that began before the drain and then
//! still answer the next request on their connection with `Connection: close`. Cost per
//! request: the count (two atomic operations), a boxed future and a boxed body.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// Response header of a daemon that is draining and will not come back on this process:
/// `x-dbgpt-draining: 1`. The apiserver avoids a worker that sends it.
pub static DRAINING_HEADER: HeaderName = HeaderName::from_static("x-dbgpt-draining");

#[derive(Debug, Default)]
struct State {
    draining: AtomicBool,
    announce: AtomicBool,
    /// Requests whose response (body included) has not been sent or dropped yet.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// Ends one request's count when dropped (with the response body).
struct Counted(Arc<State>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`Counted`] until it is sent or dropped.
struct CountedBody {
    inner: axum::body::Body,
    _count: Counted,
}

impl hyper::body::Body for CountedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The drain state and stop switches of one HTTP server (cheap to clone).
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<State>,
    /// Cancelled by [`Drain::close`].
    close: CancellationToken,
    /// Cancelled by [`Drain::stop_accepting`] (a child of `close`).
    accept: CancellationToken,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let close = CancellationToken::new();
        let accept = close.child_token();
        Drain {
            state: Arc::default(),
            close,
            accept,
        }
    }

    /// Starts draining: readiness 503, `Connection: close` on every response, and with
    /// `announce` the [`DRAINING_HEADER`] too.
    pub fn begin(&self, announce: bool) {
        self.state.announce.store(announce, Ordering::Relaxed);
        self.state.draining.store(true, Ordering::Release);
    }

    /// Requests in flight (responses not yet sent to their end), streams included.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// Whether [`Drain::begin`] was called.
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Acquire)
    }

    /// Stops accepting new connections (already accepted ones are served).
    pub fn stop_accepting(&self) {
        self.accept.cancel();
    }

    /// Stops accepting, closes idle connections and lets in-flight requests finish.
    pub fn close(&self) {
        self.close.cancel();
    }

    pub(crate) fn accept_token(&self) -> &CancellationToken {
        &self.accept
    }

    pub(crate) fn close_token(&self) -> &CancellationToken {
        &self.close
    }

    /// `inner` answering as this drain state says.
    pub fn layer<S>(&self, inner: S) -> Drained<S> {
        Drained {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The body of `/api/ready` while draining.
fn not_ready() -> Response {
    let mut r = crate::http::json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"status": "draining"}),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A service behind a [`Drain`] (see the module documentation).
#[derive(Clone)]
pub struct Drained<S> {
    inner: S,
    state: Arc<State>,
}

impl<S> tower::Service<Request> for Drained<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let draining = self.state.draining.load(Ordering::Relaxed);
        if draining && req.method() == Method::GET && req.uri().path() == crate::wire::READY_PATH {
            return Box::pin(async { Ok(not_ready()) });
        }
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let count = Counted(self.state.clone());
        let fut = self.inner.call(req);
        let state = self.state.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let (mut parts, body) = resp.into_parts();
            // Decided when the answer is ready: a request that began before the drain
            // still gets `Connection: close` if its answer comes after.
            if state.draining.load(Ordering::Relaxed) {
                let h = &mut parts.headers;
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                if state.announce.load(Ordering::Relaxed) {
                    h.insert(DRAINING_HEADER.clone(), HeaderValue::from_static("1"));
                }
            }
            let body = super::boxed_body(CountedBody {
                inner: body,
                _count: count,
            });
            Ok(Response::from_parts(parts, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn app() -> axum::Router {
        axum::Router::new()
            .route(
                crate::wire::READY_PATH,
                axum::routing::get(|| async { "ok" }),
            )
            .route(
                crate::wire::HEALTH_PATH,
                axum::routing::get(|| async { "ok" }),
            )
    }

    async fn get(d: &Drain, path: &str) -> Response {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        d.layer(app()).oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn readiness_fails_and_responses_close_while_draining() {
        let d = Drain::new();
        let r = get(&d, crate::wire::READY_PATH).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get(header::CONNECTION).is_none());

        // Handing over: readiness 503, connections closed, no draining announcement.
        d.begin(false);
        let r = get(&d, crate::wire::READY_PATH).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = get(&d, crate::wire::HEALTH_PATH).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert!(r.headers().get(&DRAINING_HEADER).is_none());

        // Leaving for good: announced on every response.
        d.begin(true);
        let r = get(&d, crate::wire::HEALTH_PATH).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[&DRAINING_HEADER], "1");
    }

    #[test]
    fn stop_accepting_does_not_close_but_close_stops_accepting() {
        let d = Drain::new();
        d.stop_accepting();
        assert!(d.accept_token().is_cancelled());
        assert!(!d.close_token().is_cancelled());
        let d = Drain::new();
        d.close();
        assert!(d.accept_token().is_cancelled());
    }
}
