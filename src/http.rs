//! HTTP plumbing shared by the services: FastAPI-shaped errors, capped body reading,
//! JSON 404/405 fallbacks, request tracing, and serving with graceful shutdown.
//!
//! DB-GPT's clients parse FastAPI's error bodies (`{"detail": …}`), so every service answers
//! bad input the same way: 422 with pydantic-style entries, 413 for oversized bodies, JSON
//! 404/405 — never a 500 or a dropped connection.

use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::validate::ValidationErrors;

/// Largest request body any service accepts by default.
pub const MAX_BODY_BYTES: usize = 1 << 20;

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
            ApiError::Status(s, m) => (*s, json!({ "detail": m })),
        };
        json_response(status, &body)
    }
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

/// The raw request body, read up to [`MAX_BODY_BYTES`] (413 beyond).
pub struct CappedBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for CappedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > MAX_BODY_BYTES
        {
            return Err(ApiError::TooLarge(MAX_BODY_BYTES));
        }
        axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map(CappedBody)
            .map_err(|_| ApiError::TooLarge(MAX_BODY_BYTES))
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

/// Paths that are neither traced nor logged (DB-GPT filters these too: they are hot).
fn is_quiet(path: &str) -> bool {
    path == "/api/controller/heartbeat" || path == "/api/health"
}

/// Middleware: one `tracing` span and one log line per request, except heartbeats and
/// health checks.
pub async fn trace_requests(req: Request, next: Next) -> Response {
    if is_quiet(req.uri().path()) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = info_span!("http_request", %method, %path);
    async move {
        let started = Instant::now();
        let resp = next.run(req).await;
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

/// Serves `router` until `shutdown` is cancelled, then stops accepting and drains
/// in-flight requests.
///
/// Accepted connections get `TCP_NODELAY` (axum 0.8 leaves Nagle on): every response is
/// written in one go, and with Nagle a keep-alive client pays delayed-ACK stalls and the
/// kernel extra work on each response.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
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
