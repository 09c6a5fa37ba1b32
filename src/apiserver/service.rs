//! The apiserver process: wires discovery, the worker client and HTTP routes with CORS, and
//! runs them through the daemons' common lifecycle ([`crate::daemon::run`]).
//!
//! Start-up order: pid lock → first instance-list fetch and managed-key sync (a controller
//! that is down is only a warning: the view fills in when it comes up) → TCP bind → admin
//! socket → ready. Stop (SIGTERM, SIGINT or admin `Stop`) stops accepting, lets in-flight
//! requests finish (bounded), sends the last usage report ([`super::tenancy`]), flushes the
//! tracer file, removes socket and pid file and exits 0.
//!
//! HTTP is served by `--threads` OS threads, each running a single-threaded tokio runtime
//! with its own pool of worker connections. The accept loop (on the main runtime, with
//! discovery and the admin socket) hands each new client connection to the next serving
//! thread in turn, and the connection stays there: a request, its call to the worker and its
//! stream relay never change threads. With a shared multi-threaded runtime every request
//! crossed threads several times, and at low load those wake-ups cost more CPU than the
//! proxying itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tower_http::cors::{AllowHeaders, AllowOrigin, Cors, CorsLayer};
use tracing::{info, warn};

use super::admission::Admission;
use super::admission::wake::Waker;
use super::config::ApiserverConfig;
use super::discovery::Discovery;
use super::proxy::Upstream;
use super::tenancy::{self, KeySync, Tenancy};
use super::{AppState, Stats, router};
use crate::controller::client::ControllerClient;
use crate::daemon::{self, Daemon, DaemonBase, Health, Readiness, Service, Started};
use crate::telemetry::metrics::apiserver::{ApiMetrics, instance_details};
use crate::telemetry::metrics::{Exposition, MeasureLayer, Vitals};
use crate::tracer::{Flusher, RequestSpans, Tracer};

/// Timeout of each controller call.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(5);

/// The apiserver's part of the lifecycle.
struct Apiserver {
    cfg: ApiserverConfig,
    state: Arc<AppState>,
    refresher: Option<JoinHandle<()>>,
    /// The admission ticker (queues re-read the view; idle woken models unload).
    ticker: Option<JoinHandle<()>>,
    /// The managed keys' sync loop, and its client.
    key_sync: (Option<JoinHandle<()>>, Arc<dyn KeySync>),
    flusher: Flusher,
    exposition: Arc<Exposition>,
    /// The separate `/metrics` listener (`--metrics_addr HOST:PORT`).
    metrics_listener: Option<TcpListener>,
}

impl Daemon for Apiserver {
    /// In-flight requests include streams.
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    fn health(&self) -> impl Fn() -> Health + Send + Sync + 'static {
        let state = self.state.clone();
        let policy = self.cfg.routing_policy.as_str();
        move || {
            let d = &state.upstream.discovery;
            let view = d.view();
            let mut healthy = 0;
            let mut total = 0;
            for g in view.groups.values() {
                for i in &g.instances {
                    total += 1;
                    if i.routable() && !d.avoids(i) {
                        healthy += 1;
                    }
                }
            }
            let models = super::served_models(&view);
            let (ok, err) = d.freshness();
            let refresh = match (ok, err) {
                (_, Some(e)) => format!("failing ({e})"),
                (Some(t), None) => format!("ok {:.1}s ago", t.as_secs_f64()),
                (None, None) => "pending".into(),
            };
            Health {
                healthy,
                total,
                details: vec![
                    ("controller".into(), d.controllers()),
                    ("policy".into(), policy.into()),
                    (
                        "models".into(),
                        if models.is_empty() {
                            "-".into()
                        } else {
                            models.join(",")
                        },
                    ),
                    (
                        "requests".into(),
                        state.stats.requests.load(Ordering::Relaxed).to_string(),
                    ),
                    ("refresh".into(), refresh),
                    (
                        "managed_keys".into(),
                        format!(
                            "{}{}",
                            state.tenancy.key_count(),
                            if state.tenancy.controller_has_no_keys_api() {
                                " (the controller has no keys API)"
                            } else if state.tenancy.has_synced() {
                                ""
                            } else {
                                " (no key sync yet)"
                            }
                        ),
                    ),
                ]
                .into_iter()
                .chain(state.admission.status_details())
                .chain(state.metrics.vitals_ref().details())
                .chain(instance_details(d))
                .collect(),
            }
        }
    }

    async fn prepare(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let tenancy = &self.state.tenancy;
        if !tenancy.required() {
            warn!(
                "no --api_keys given and the controller has no managed API keys: the API server is open to anyone who can reach it"
            );
        } else {
            info!(
                keys = self.cfg.api_keys.len(),
                managed_keys = tenancy.key_count(),
                "API key authentication enabled"
            );
        }
        self.key_sync.0 = Some(tenancy.spawn_loop(
            self.key_sync.1.clone(),
            self.cfg.keys_sync,
            shutdown.clone(),
        ));
        self.refresher = Some(
            self.state
                .upstream
                .discovery
                .spawn_loop(self.cfg.refresh_interval, shutdown.clone()),
        );
        self.ticker = Some(
            self.state
                .admission
                .spawn_ticker(self.state.upstream.discovery.clone(), shutdown.clone()),
        );
        Ok(())
    }

    fn serve(
        &mut self,
        listener: TcpListener,
        drain: crate::http::Drain,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
        if let Some(l) = self.metrics_listener.take() {
            self.exposition.serve_separate(l, drain.clone());
        }
        Vitals::spawn_sampler(
            self.state.metrics.clone(),
            ApiMetrics::vitals_ref,
            shutdown.clone(),
        );
        serve_on_threads(&self.cfg, &self.state, &self.exposition, listener, drain)
    }

    fn ready_status(&self) -> String {
        format!(
            "apiserver serving on {}:{} (controller {}, policy {})",
            self.cfg.host,
            self.cfg.port,
            self.state.upstream.discovery.controllers(),
            self.cfg.routing_policy.as_str()
        )
    }

    async fn finish(self, _drained: bool) {
        if let Some(r) = self.refresher {
            let _ = r.await;
        }
        if let Some(t) = self.ticker {
            let _ = t.await;
        }
        if let Some(k) = self.key_sync.0 {
            let _ = k.await;
        }
        self.state.tenancy.final_report(&*self.key_sync.1).await;
        self.flusher.finish().await;
    }
}

/// CORS: DB-GPT's allow-all (origin echoed, credentials allowed), or a fixed origin list,
/// for requests that carry an `Origin` header ([`OriginCors`]).
fn cors(origins: &Option<Vec<String>>) -> OriginCors {
    let origin = match origins {
        None => AllowOrigin::mirror_request(),
        Some(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    OriginCors(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_credentials(true)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            // What a browser client may read of an answer besides the safelisted headers:
            // which model served it, and when to try again after a 429/503.
            .expose_headers(EXPOSED_HEADERS.map(axum::http::HeaderName::from_static)),
    )
}

/// Response headers a browser's script may read ([`cors`]).
const EXPOSED_HEADERS: [&str; 8] = [
    "x-dbgpt-served-model",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// The CORS layer, applied only to requests with an `Origin` header. A request without one
/// is not a CORS request (browsers send `Origin` on every cross-origin request and every
/// preflight), and DB-GPT's Starlette `CORSMiddleware` passes it through untouched; so do
/// we, which also spares SDK and curl calls the CORS layer's header work (~3% of the
/// apiserver's instructions per chat request).
#[derive(Clone)]
struct OriginCors(CorsLayer);

impl<S: Clone> tower::Layer<S> for OriginCors {
    type Service = OriginCorsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OriginCorsService {
            cors: self.0.layer(inner.clone()),
            plain: inner,
        }
    }
}

#[derive(Clone)]
struct OriginCorsService<S> {
    cors: Cors<S>,
    plain: S,
}

impl<S, B> tower::Service<axum::extract::Request> for OriginCorsService<S>
where
    S: tower::Service<axum::extract::Request, Response = axum::http::Response<B>> + Clone,
    B: Default,
{
    type Response = axum::http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::Either<tower_http::cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::ready!(self.plain.poll_ready(cx))?;
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        if req.headers().contains_key(axum::http::header::ORIGIN) {
            futures::future::Either::Left(self.cors.call(req))
        } else {
            futures::future::Either::Right(self.plain.call(req))
        }
    }
}

/// Builds the state (used by the process and by in-process tests).
pub fn build_state(cfg: &ApiserverConfig, tracer: Tracer) -> anyhow::Result<Arc<AppState>> {
    let client = ControllerClient::new(&cfg.controller_addr, CONTROLLER_TIMEOUT)?;
    let metrics = Arc::new(ApiMetrics::new());
    let waker = Waker::new(ControllerClient::new(
        &cfg.controller_addr,
        CONTROLLER_TIMEOUT,
    )?)?;
    let admission = Arc::new(Admission::new(cfg.admission.clone(), waker));
    Ok(Arc::new(AppState {
        admission,
        upstream: Upstream {
            metrics: metrics.clone(),
            http: super::proxy::worker_client(),
            discovery: Arc::new(Discovery::new(client).with_outlier(cfg.outlier)),
            policy: cfg.routing_policy,
            max_retries: cfg.max_retries,
            timeout: cfg.request_timeout,
            first_byte_timeout: cfg.first_byte_timeout,
        },
        tenancy: Arc::new(Tenancy::new(
            cfg.api_keys.clone(),
            format!("{}:{}/{}", cfg.host, cfg.port, std::process::id()),
        )),
        routes: Arc::new(cfg.routes.clone()),
        embedding_batch_size: cfg.embedding_batch_size,
        stats: Arc::new(Stats::default()),
        tracer,
        failover: super::failover::Settings {
            max_migrations: cfg.max_stream_migrations,
            stall: cfg.stream_stall_timeout,
        },
        metrics,
    }))
}

/// The managed keys' sync, through the controller client.
/// The state of one more serving thread: its own worker connection pool (connections are
/// driven by the runtime that opened them), everything else shared with `base`.
fn thread_state(base: &AppState) -> anyhow::Result<Arc<AppState>> {
    let mut state = base.clone();
    state.upstream.http = super::proxy::worker_client();
    Ok(Arc::new(state))
}

/// Runs the apiserver until it is stopped.
pub async fn run(cfg: ApiserverConfig, readiness: Readiness) -> anyhow::Result<()> {
    daemon::run(readiness, start(cfg)).await
}

/// Starts the serving threads, each with its own state (worker connection pool) and router.
fn serve_on_threads(
    cfg: &ApiserverConfig,
    state: &Arc<AppState>,
    exposition: &Arc<Exposition>,
    listener: TcpListener,
    drain: crate::http::Drain,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let mut routers = Vec::with_capacity(cfg.threads);
    for i in 0..cfg.threads {
        let s = if i == 0 {
            state.clone()
        } else {
            thread_state(state)?
        };
        // Request logging and root spans, then CORS, then the request metrics, around the
        // whole router (and `/metrics`, when served on this port).
        let measure = MeasureLayer(s.metrics.clone());
        let traced = RequestSpans(s.tracer.clone()).layer(exposition.route_on(router(s)));
        routers.push(measure.layer(cors(&cfg.cors_allow_origins).layer(traced)));
    }
    Ok(crate::http::serve_on_threads(
        listener, routers, cfg.http, drain,
    )?)
}

async fn start(cfg: ApiserverConfig) -> anyhow::Result<Started<Apiserver>> {
    let mut base = DaemonBase::acquire(Service::Apiserver, cfg.port).await?;
    let (tracer, flusher) = cfg.tracer.open(crate::tracer::APISERVER_ROOT);
    let state = build_state(&cfg, tracer)?;
    let mut exposition = Exposition::new(Service::Apiserver.as_str(), cfg.metrics.clone());
    state
        .metrics
        .register(exposition.registry(), state.upstream.discovery.clone());
    state.admission.register(exposition.registry());
    state.tenancy.register(exposition.registry());
    let key_client: Arc<dyn KeySync> = Arc::new(ControllerClient::new(
        &cfg.controller_addr,
        CONTROLLER_TIMEOUT,
    )?);
    let metrics_listener = exposition.bind_separate().await?;
    // The instance list and the keys at once (a controller that is down costs one wait).
    let (refreshed, keys) = tokio::join!(
        state.upstream.discovery.refresh(),
        state.tenancy.sync_once(&*key_client)
    );
    if !refreshed {
        warn!("no controller answered at start-up; models appear once one does");
    }
    match keys {
        Err(e) if tenancy::no_keys_api(&e) => {} // said once by the tenancy
        Err(e) => {
            warn!(error = %e, "managed API keys: the first key sync failed; keys are learned once a controller answers it")
        }
        Ok(()) => {}
    }
    let (listener, admin) = daemon::bind(&mut base, &cfg.host).await?;
    Ok(Started {
        base,
        listener,
        admin,
        daemon: Apiserver {
            cfg,
            state,
            refresher: None,
            ticker: None,
            key_sync: (None, key_client),
            flusher,
            exposition: Arc::new(exposition),
            metrics_listener,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, Response, StatusCode, header};
    use tower::{Layer, ServiceExt};

    /// `cors(origins)` around a service that answers 204 to everything.
    async fn call(
        origins: Option<Vec<String>>,
        method: Method,
        headers: &[(&str, &str)],
    ) -> Response<Body> {
        let inner = tower::service_fn(|_req: axum::extract::Request| async {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok::<_, std::convert::Infallible>(r)
        });
        let mut req = Request::builder().method(method).uri("/v1/models");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        cors(&origins)
            .layer(inner)
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn cors_only_for_requests_with_an_origin() {
        let a = "http://a.test";
        // No Origin: not a CORS request, answered untouched (allow-all or restricted).
        for origins in [None, Some(vec![a.to_string()])] {
            let r = call(origins, Method::GET, &[]).await;
            assert_eq!(r.status(), StatusCode::NO_CONTENT);
            assert!(r.headers().is_empty(), "{:?}", r.headers());
        }
        // Allow-all echoes any origin, with credentials.
        let r = call(None, Method::GET, &[("origin", "http://b.test")]).await;
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://b.test"
        );
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_CREDENTIALS],
            "true"
        );
        // A restricted list echoes listed origins only.
        let only_a = || Some(vec![a.to_string()]);
        let r = call(only_a(), Method::GET, &[("origin", a)]).await;
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], a);
        let r = call(only_a(), Method::GET, &[("origin", "http://b.test")]).await;
        assert!(
            !r.headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        // A preflight is answered by the CORS layer itself, not passed on.
        let preflight = [
            ("origin", a),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization"),
        ];
        let r = call(only_a(), Method::OPTIONS, &preflight).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], a);
        assert!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_METHODS]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization"
        );
    }
}
