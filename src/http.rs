//! HTTP plumbing shared by the services: FastAPI-shaped errors, capped body reading,
//! JSON 404/405 fallbacks, request tracing, and serving with graceful shutdown and
//! per-connection limits ([`HttpLimits`]).
//!
//! DB-GPT's clients parse FastAPI's error bodies (`{"detail": …}`), so every service answers
//! bad input the same way: 422 with pydantic-style entries, 413 for oversized bodies, JSON
//! 404/405 — never a 500 or a dropped connection.

mod drain;
mod limits;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use self::drain::{DRAINING_HEADER, Drain, Drained};
pub use self::limits::{BodyTimeout, HttpLimits};
use crate::validate::ValidationErrors;

/// Largest request body any service accepts by default.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Largest body of a model call (a prompt or an embedding batch): what the apiserver
/// accepts from its clients and what a worker's model routes accept, so that nothing the
/// apiserver takes is refused by every worker for its size.
pub const MAX_MODEL_BODY_BYTES: usize = 32 << 20;

/// An error answered in FastAPI's shape.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed: {0}")]
    Validation(#[from] ValidationErrors),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: the model is busy, try again shortly (or another instance).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u32,
    },
    /// Any other status with a `{"detail": message}` body.
    #[error("{1}")]
    Status(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Validation(e) => (StatusCode::UNPROCESSABLE_ENTITY, json!({ "detail": e.0 })),
            ApiError::NotFound => (StatusCode::NOT_FOUND, json!({ "detail": "Not Found" })),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "detail": "Method Not Allowed" }),
            ),
            ApiError::TooLarge(n) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "detail": format!("Request body too large: the limit is {n} bytes") }),
            ),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "detail": m })),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, json!({ "detail": m })),
            ApiError::Overloaded {
                message,
                retry_after_secs,
            } => {
                let mut resp = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "detail": message }),
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                return resp;
            }
            ApiError::Status(s, m) => (*s, json!({ "detail": m })),
        };
        json_response(status, &body)
    }
}

/// `body` as axum's [`Body`](axum::body::Body), without the error-mapping layer
/// `Body::new` puts around any other body type: every frame of an answer passes through each
/// of its wrappers (limits, drain, metrics, traces), so each layer avoided is a virtual call
/// and a match less per streamed event.
pub fn boxed_body<B>(body: B) -> axum::body::Body
where
    B: hyper::body::Body<Data = Bytes, Error = axum::Error> + Send + 'static,
{
    use http_body_util::BodyExt;
    axum::body::Body::new(body.boxed_unsync())
}

/// A `text/event-stream` answer with `body` as its events, never cached or buffered by a
/// proxy in between.
pub fn sse_response(body: axum::body::Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Serialises `body` as a JSON response (compact, `application/json`).
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    json_response_sized(status, body, 128)
}

/// [`json_response`] into a buffer of `capacity` bytes to start with (large bodies such as
/// a full listing are then written without repeated reallocation).
pub fn json_response_sized<T: Serialize + ?Sized>(
    status: StatusCode,
    body: &T,
    capacity: usize,
) -> Response {
    let mut bytes = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut bytes, body) {
        Ok(()) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The raw request body, read up to `CAP` bytes ([`MAX_BODY_BYTES`] unless given; 413 beyond).
pub struct CappedBody<const CAP: usize = MAX_BODY_BYTES>(pub Bytes);

impl<S: Send + Sync, const CAP: usize> FromRequest<S> for CappedBody<CAP> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > CAP
        {
            return Err(ApiError::TooLarge(CAP));
        }
        axum::body::to_bytes(req.into_body(), CAP)
            .await
            .map(CappedBody)
            .map_err(|_| ApiError::TooLarge(CAP))
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Adds the JSON 404/405 fallbacks to a router.
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// Paths that are neither traced nor logged (DB-GPT filters these too: they are hot; and
/// Prometheus scrapes).
pub(crate) fn is_quiet(path: &str) -> bool {
    path == crate::wire::controller::HEARTBEAT_PATH
        || path == crate::wire::HEALTH_PATH
        || path == crate::wire::READY_PATH
        || path == crate::telemetry::metrics::METRICS_PATH
}

/// Middleware: one `tracing` span and one log line per request, except heartbeats and
/// health checks.
pub async fn trace_requests(req: Request, next: Next) -> Response {
    crate::telemetry::otlp::served(req, |req| logged(req, |req| next.run(req))).await
}

/// [`trace_requests`] around any continuation `next` (for services that are not axum
/// middleware).
pub async fn logged<F, Fut>(req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    // Below INFO (e.g. `--log_level warn`) there is nothing to record: skip the span too.
    if is_quiet(req.uri().path()) || !tracing::enabled!(tracing::Level::INFO) {
        return next(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = info_span!("http_request", %method, path = %crate::telemetry::Escaped(&path));
    async move {
        let started = Instant::now();
        let resp = next(req).await;
        info!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
        resp
    }
    .instrument(span)
    .await
}

/// Binds a TCP listener with a message that names the address on failure.
pub async fn bind(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = format!("{host}:{port}");
    tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("port {port} is already in use (cannot listen on {addr})")
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })
}

/// Serves `app` on the calling runtime until `drain` closes, then lets every connection
/// finish its in-flight request (idle keep-alive connections close at once). Connections
/// are limited as `limits` says (see [`limits`]); `drain` also decides readiness and
/// response headers while draining (see [`drain`]).
///
/// Accepted connections get `TCP_NODELAY` (axum 0.8 leaves Nagle on): every response is
/// written in one go, and with Nagle a keep-alive client pays delayed-ACK stalls and the
/// kernel extra work on each response.
pub async fn serve<S>(
    listener: tokio::net::TcpListener,
    app: S,
    limits: HttpLimits,
    drain: Drain,
) -> std::io::Result<()>
where
    S: AppService,
    S::Future: Send + 'static,
{
    let app = drain.layer(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    accept_loop(
        listener,
        limits,
        drain.accept_token().clone(),
        |tcp, permit| {
            limits::spawn_connection(tcp, app.clone(), limits, &graceful, permit);
        },
    )
    .await;
    // Accepting may stop before closing (a successor accepts on the same socket while
    // this process's connections drain).
    drain.close_token().cancelled().await;
    graceful.shutdown().await;
    Ok(())
}

/// A connection handed to a serving thread, with its slot under `--http_max_connections`.
type Handoff = (std::net::TcpStream, OwnedSemaphorePermit);

/// Serves the connections handed over on `rx` with hyper's HTTP/1.1 server, one task per
/// connection, until `shutdown` is cancelled; then lets every connection finish its
/// in-flight request (idle keep-alive connections close at once) and returns.
///
/// hyper directly rather than `axum::serve`: axum's loop goes through hyper-util's
/// protocol-sniffing builder with upgrade support and two service adapters per request,
/// none of which an HTTP/1.1 API server uses; nor can it limit connections.
async fn serve_handoff<S>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    app: S,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    S: AppService,
    S::Future: Send,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (std, permit) = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = rx.recv() => match s {
                Some(s) => s,
                // The accept loop is gone (stopping): wait for the graceful shutdown.
                None => {
                    shutdown.cancelled().await;
                    break;
                }
            },
        };
        // Registers the socket with this thread's reactor.
        let tcp = match tokio::net::TcpStream::from_std(std) {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a client connection");
                continue;
            }
        };
        limits::spawn_connection(tcp, app.clone(), limits, &graceful, permit);
    }
    // Dropping the receiver closes connections still queued for this thread.
    drop(rx);
    graceful.shutdown().await;
}

/// What [`serve`] and [`serve_on_threads`] serve: a router, or layers around one.
pub trait AppService:
    tower::Service<Request, Response = Response, Error = std::convert::Infallible>
    + Clone
    + Send
    + 'static
{
}

impl<S> AppService for S where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static
{
}

/// Serves `listener` on one OS thread per router, each running a single-threaded tokio
/// runtime, until `drain` closes (see [`serve`]). The accept loop runs on the calling runtime and deals new connections out to
/// the threads in turn (with `TCP_NODELAY`); a connection then stays on its thread, so its
/// requests never cross threads: on a shared multi-threaded runtime every request woke
/// other threads several times, which at low load cost more CPU than the request itself.
/// Tasks a handler spawns run on its thread. The returned task ends when every thread has
/// finished its graceful shutdown (after `shutdown` is cancelled), for [`crate::daemon::drain_http`].
pub fn serve_on_threads<S>(
    listener: tokio::net::TcpListener,
    routers: Vec<S>,
    limits: HttpLimits,
    drain: Drain,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>>
where
    S: AppService,
    S::Future: Send + 'static,
{
    let mut senders = Vec::with_capacity(routers.len());
    let mut threads = Vec::with_capacity(routers.len());
    for (i, app) in routers.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = drain.close_token().clone();
        let app = drain.layer(app);
        let thread = std::thread::Builder::new()
            .name(format!("dbgpt-http-{i}"))
            .spawn(move || rt.block_on(serve_handoff(rx, app, limits, token)))?;
        threads.push(thread);
    }
    let mut next = 0usize;
    tokio::spawn(accept_loop(
        listener,
        limits,
        drain.accept_token().clone(),
        move |tcp, permit| {
            match tcp.into_std() {
                Ok(std) => {
                    // A closed channel means that thread has stopped: the connection is
                    // dropped (closed), as any connection arriving while stopping.
                    let _ = senders[next].send((std, permit));
                    next = (next + 1) % senders.len();
                }
                Err(e) => tracing::warn!(error = %e, "cannot hand over a client connection"),
            }
        },
    ));
    Ok(tokio::task::spawn_blocking(move || {
        // Serving itself cannot fail; only a panic on a thread is reported.
        let mut result = Ok(());
        for t in threads {
            if t.join().is_err() {
                result = Err(std::io::Error::other("a serving thread panicked"));
            }
        }
        result
    }))
}

/// Accepts connections (with `TCP_NODELAY`) and gives each to `dispatch` with its slot
/// under `limits.max_connections`, until `shutdown`. While every slot is taken it stops
/// accepting: new clients wait in the listen backlog (and are served as soon as a
/// connection closes, which the timeouts bound) instead of being refused, and the daemon
/// never runs out of file descriptors.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    limits: HttpLimits,
    shutdown: CancellationToken,
    mut dispatch: impl FnMut(tokio::net::TcpStream, OwnedSemaphorePermit),
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Warned about the current stretch at the limit (once, not per connection).
    let mut warned = false;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                warned = false;
                p
            }
            Err(_) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, _)) => {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                dispatch(tcp, permit);
            }
            // Per-connection failures (reset before accept…) are routine; running out of
            // file descriptors is not: back off instead of spinning.
            Err(e) => {
                use std::io::ErrorKind::*;
                if !matches!(
                    e.kind(),
                    ConnectionRefused | ConnectionAborted | ConnectionReset
                ) {
                    tracing::warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The default number of serving threads: the CPUs this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Installs the process-wide TLS crypto provider (ring) once; every reqwest client needs it
/// before it is built (HTTPS upstreams such as OpenAI for the proxy backend).
pub fn ensure_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Builds a reqwest client from `configure(Client::builder())`.
///
/// The platform certificate verifier refuses to build on a machine without usable CA
/// certificates, and reqwest then refuses to build any client — even one that only ever
/// speaks plain HTTP to the controller and workers. Cluster traffic must not depend on
/// that, so the client is rebuilt with an empty root store (HTTPS requests then fail with
/// a certificate error, which the log explains once).
pub fn build_client(
    configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> reqwest::Result<reqwest::Client> {
    ensure_tls_provider();
    match configure(reqwest::Client::builder()).build() {
        Ok(c) => Ok(c),
        Err(first) => {
            match configure(reqwest::Client::builder())
                .tls_certs_only(Vec::<reqwest::Certificate>::new())
                .build()
            {
                Ok(c) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(error = %first, "no usable CA certificates on this machine: plain HTTP works, HTTPS upstreams cannot be verified (install ca-certificates)");
                    });
                    Ok(c)
                }
                Err(_) => Err(first),
            }
        }
    }
}

/// `e` followed by each cause in its source chain that the text so far does not already say,
/// joined by ": " (connection refused, reset, …).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e)
}

/// A short reason for a failed reqwest call ("timed out", "connection failed", else the
/// error) with its causes, as [`error_chain`] adds them.
pub fn describe(e: &reqwest::Error) -> String {
    let msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        e.to_string()
    };
    with_causes(msg, e)
}

fn with_causes(mut msg: String, e: &dyn std::error::Error) -> String {
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}
