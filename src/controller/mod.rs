//! The model controller: DB-GPT's controller HTTP API over a [`Registry`], plus the
//! background tasks that keep health and persistence current.
//!
//! Routes (reference §2): `GET /api/health`, `POST/DELETE/GET /api/controller/models`,
//! `POST /api/controller/heartbeat`, our readiness probe `GET /api/ready` (503 while the
//! registry cannot take writes; `/api/health` stays DB-GPT's liveness answer), and our
//! managed API key routes ([`keys`]: untraced, JSON objects). Responses of DB-GPT's routes
//! are its bare JSON literals (`true`, lists of nine-key instances). Every DB-GPT route but
//! heartbeat and health writes a root span to DB-GPT's tracer file, with
//! register/deregister child spans ([`crate::tracer`]); the heartbeat route has no
//! middleware at all. The health sweep marks instances unhealthy
//! after `heartbeat_timeout`, and a flusher persists heartbeat timestamps in batches; both
//! run each tick in a fresh task so that an error or even a panic is logged and the loop
//! carries on.

pub mod client;
pub mod config;
pub mod keys;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::http::{ApiError, CappedBody, json_response, with_fallbacks};
use crate::keys::KeyStore;
use crate::registry::{Registry, RegistryError};
use crate::telemetry::Escaped;
use crate::telemetry::metrics::controller::{ControllerMetrics, Op};
use crate::tracer::{self, Meta, Tracer};
use crate::validate::{Fields, parse_json_object, query_object};
use crate::wire::controller::{HEARTBEAT_PATH, InstanceInput, MODELS_PATH};
use crate::wire::{HEALTH_PATH, READY_PATH};

/// How often buffered heartbeat timestamps are written to the registry.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Shared state of the controller's HTTP handlers.
#[derive(Clone)]
pub struct ControllerState {
    pub registry: Arc<dyn Registry>,
    /// Managed API keys and their usage (in the registry's store).
    pub keys: Arc<dyn KeyStore>,
    /// DB-GPT's span file ([`Tracer::disabled`] when off).
    pub tracer: Tracer,
    /// Prometheus metrics.
    pub metrics: Arc<ControllerMetrics>,
}

/// Span names of DB-GPT's controller.
const REGISTER_SPAN: &str = "dbgpt.model.controller.register_instance";
const DEREGISTER_SPAN: &str = "dbgpt.model.controller.deregister_instance";

/// The controller's HTTP routes.
pub fn router(state: ControllerState) -> Router {
    // Heartbeats and health checks are the hot, untraced routes (DB-GPT filters them from
    // its logs and its tracer too): they skip both middlewares entirely.
    let traced = Router::new().route(MODELS_PATH, post(register).delete(deregister).get(list));
    let traced = tracer::with_request_middleware(traced, &state.tracer, true);
    let hot = Router::new()
        .route(HEALTH_PATH, get(health))
        .route(READY_PATH, get(ready))
        .route(HEARTBEAT_PATH, post(heartbeat));
    // The key routes are ours (DB-GPT has none): untraced, like the apiservers' polls.
    with_fallbacks(traced.merge(hot).merge(keys::routes())).with_state(state)
}

fn storage_error(e: RegistryError) -> ApiError {
    error!(error = %Escaped(&e), "registry write failed");
    ApiError::Unavailable(format!("registry unavailable: {e}"))
}

/// DB-GPT's bare `true` (a static body: this answers every heartbeat).
fn ok_true() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        axum::body::Bytes::from_static(b"true"),
    )
        .into_response()
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: 200 while the registry takes writes, else 503 with the reason (the registry
/// recovers by itself, e.g. once a full disk has space again).
async fn ready(State(s): State<ControllerState>) -> Response {
    match s.registry.storage_failure() {
        None => json_response(StatusCode::OK, &json!({"status": "ok", "registry": "ok"})),
        Some(error) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unavailable", "registry": "failing", "error": error}),
        ),
    }
}

/// A span's metadata for an instance: DB-GPT's `ModelInstance.to_dict()` without the
/// values it drops (`None`s, the unserialisable `last_heartbeat`, the server-set `healthy`).
fn instance_meta(i: &InstanceInput) -> Meta {
    #[derive(serde::Serialize)]
    struct M<'a> {
        model_name: &'a str,
        host: &'a str,
        port: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        weight: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        check_healthy: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        enabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        prompt_template: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        remove_from_registry: bool,
    }
    Meta::json(&M {
        model_name: &i.model_name,
        host: &i.host,
        port: i.port,
        weight: i.weight,
        check_healthy: i.check_healthy,
        enabled: i.enabled,
        prompt_template: i.prompt_template.as_deref(),
        remove_from_registry: i.remove_from_registry,
    })
}

fn body_instance(body: &[u8]) -> Result<InstanceInput, ApiError> {
    if let Some(input) = InstanceInput::from_body_strict(body) {
        return Ok(input);
    }
    let v = parse_json_object(body, "ModelInstance")?;
    Ok(InstanceInput::from_json("body", &v)?)
}

async fn register(
    State(s): State<ControllerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let input = body_instance(&body)?;
    let key = input.key();
    let _span = s
        .tracer
        .start_with(REGISTER_SPAN, tracer::current(), || instance_meta(&input));
    {
        let _t = s.metrics.timed(Op::Register);
        s.registry.register(input).await.map_err(storage_error)?;
    }
    s.metrics.registered();
    info!(instance = %Escaped(&key), "registered");
    Ok(ok_true())
}

async fn heartbeat(
    State(s): State<ControllerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let input = body_instance(&body)?;
    {
        let _t = s.metrics.timed(Op::Heartbeat);
        s.registry.heartbeat(input).await.map_err(storage_error)?;
    }
    s.metrics.heartbeat();
    Ok(ok_true())
}

async fn deregister(
    State(s): State<ControllerState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let v = query_object(q.as_deref());
    let input = InstanceInput::from_json("query", &v)?;
    let key = input.key();
    let removed = input.remove_from_registry;
    let _span = s
        .tracer
        .start_with(DEREGISTER_SPAN, tracer::current(), || instance_meta(&input));
    {
        let _t = s.metrics.timed(Op::Deregister);
        s.registry.deregister(input).await.map_err(storage_error)?;
    }
    s.metrics.deregistered();
    info!(instance = %Escaped(&key), removed, "deregistered");
    Ok(ok_true())
}

async fn list(
    State(s): State<ControllerState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let v: Value = query_object(q.as_deref());
    let mut f = Fields::new("query", &v);
    let model_name = f.opt_str("model_name").filter(|m| !m.is_empty());
    let healthy_only = f.bool_or("healthy_only", false);
    f.finish()?;
    let body = s
        .registry
        .list_json(model_name.as_deref(), healthy_only)
        .await
        .map_err(|e| ApiError::Unavailable(format!("registry unavailable: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// Runs `tick` every `period` until `shutdown`; each tick runs in its own task so a panic
/// in it is logged instead of ending the loop.
pub fn spawn_resilient_loop<F, Fut>(
    name: &'static str,
    period: Duration,
    shutdown: CancellationToken,
    tick: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            if let Err(e) = tokio::spawn(tick()).await {
                error!(task = name, error = %e, "background task panicked; it keeps running");
            }
        }
    })
}

/// Starts the health sweep (every `check_interval`) and the heartbeat flusher.
pub fn spawn_background(
    registry: Arc<dyn Registry>,
    metrics: Arc<ControllerMetrics>,
    check_interval: Duration,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let r1 = registry.clone();
    let (m1, m2) = (metrics.clone(), metrics);
    let sweep = spawn_resilient_loop(
        "health-check",
        check_interval,
        shutdown.clone(),
        move || {
            let r = r1.clone();
            let m = m1.clone();
            async move {
                let expired = {
                    let _t = m.timed(Op::Expire);
                    r.expire().await
                };
                match expired {
                    Ok(0) => {}
                    Ok(n) => {
                        m.expired(n);
                        info!(count = n, "marked instances unhealthy: heartbeat timeout")
                    }
                    Err(e) => {
                        warn!(error = %e, "health check could not persist expiry; will retry")
                    }
                }
            }
        },
    );
    let r2 = registry;
    let flush = spawn_resilient_loop("heartbeat-flush", FLUSH_INTERVAL, shutdown, move || {
        let r = r2.clone();
        let m = m2.clone();
        async move {
            let flushed = {
                let _t = m.timed(Op::Flush);
                r.flush().await
            };
            if let Err(e) = flushed {
                warn!(error = %e, "could not persist heartbeat timestamps; will retry");
            }
        }
    });
    vec![sweep, flush]
}
