//! The per-request root span (DB-GPT's `TraceIDMiddleware`): the middleware every
//! service's router uses, its tower-layer form for the apiserver's hot path, and the
//! task-local "current span" that handlers name as the parent of their own spans.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::{Meta, SpanCtx, TRACE_HEADER, Tracer};

/// Marks a periodic poll (the apiserver's instance-list refresh): no root span, like
/// heartbeats. Anything else (a `dbgpt model list`, DB-GPT's own clients) is traced.
pub const POLL_HEADER: &str = "dbgpt-poll";

tokio::task_local! {
    static CURRENT: SpanCtx;
}

/// The current request's root span (DB-GPT's `root_tracer.get_current_span_id()`), if
/// any: children started in a handler name it as their parent. Without one (a path
/// outside `/api`), the current OTLP span when spans are exported, so that the file's
/// spans stay in the collector's trace.
pub fn current() -> Option<SpanCtx> {
    CURRENT.try_with(|c| *c).ok().or_else(|| {
        let (trace, span) = crate::telemetry::otlp::current_ids()?;
        SpanCtx::from_ids(trace, span)
    })
}

/// Adds the request middleware to `router` (to its routes only with `routes_only`, as
/// axum's `route_layer`): [`root_span`] when tracing is on, else plain request logging
/// ([`crate::http::trace_requests`]). Every service's router uses this.
pub fn with_request_middleware<S>(
    router: axum::Router<S>,
    tracer: &Tracer,
    routes_only: bool,
) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use crate::http::trace_requests;
    use axum::middleware::{from_fn, from_fn_with_state};
    match (tracer.is_enabled(), routes_only) {
        (true, true) => router.route_layer(from_fn_with_state(tracer.clone(), root_span)),
        (true, false) => router.layer(from_fn_with_state(tracer.clone(), root_span)),
        (false, true) => router.route_layer(from_fn(trace_requests)),
        (false, false) => router.layer(from_fn(trace_requests)),
    }
}

/// Middleware used instead of [`crate::http::trace_requests`] when tracing is on (one
/// layer, not two: each `from_fn` layer costs allocations on every request). It adds
/// DB-GPT's `TraceIDMiddleware`: a root span per request under `/api`, except heartbeats
/// and health checks, continuing the trace named by [`TRACE_HEADER`] (else by the
/// request's OTLP span or W3C `traceparent`); metadata `{"path": …}`.
pub async fn root_span(State(tracer): State<Tracer>, req: Request, next: Next) -> Response {
    traced(&tracer, req, |req| next.run(req)).await
}

/// [`root_span`] around any continuation `next`, inside the request's OTLP server span
/// when spans are exported ([`crate::telemetry::otlp::served`]).
async fn traced<F, Fut>(tracer: &Tracer, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    crate::telemetry::otlp::served(req, |req| root(tracer, req, next)).await
}

/// The parent of a root span when the caller named none in DB-GPT's header: the request's
/// OTLP server span (so the file and the collector share the trace id), else the client's
/// W3C `traceparent`.
fn w3c_parent(req: &Request) -> Option<SpanCtx> {
    use crate::telemetry::otlp;
    let (trace, span) = otlp::current_ids().or_else(|| otlp::traceparent_ids(req.headers()))?;
    SpanCtx::from_ids(trace, span)
}

/// The root span itself (see [`root_span`]).
async fn root<F, Fut>(tracer: &Tracer, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let path = req.uri().path();
    if !path.starts_with("/api")
        || crate::http::is_quiet(path)
        || req.headers().contains_key(POLL_HEADER)
    {
        return crate::http::logged(req, next).await;
    }
    let parent = req
        .headers()
        .get(&TRACE_HEADER)
        .and_then(|v| SpanCtx::parse(v.as_bytes()))
        .or_else(|| w3c_parent(&req));
    let meta = match req.extensions().get::<MatchedPath>() {
        Some(m) if m.as_str() == path => Meta::Route(m.clone()),
        _ => Meta::Path(path.to_string()),
    };
    let span = tracer.root(parent, meta);
    let resp = match span.ctx() {
        Some(ctx) => CURRENT.scope(ctx, crate::http::logged(req, next)).await,
        None => crate::http::logged(req, next).await,
    };
    drop(span);
    resp
}

/// The request middleware of [`with_request_middleware`] as a tower layer around a whole
/// service (a router) rather than around each route: `Router::layer` wraps every route
/// in it and `from_fn` boxes and clones on each call, which the apiserver's hot path cannot
/// afford. Root spans name the request path (the route is not known outside the router).
#[derive(Clone)]
pub struct RequestSpans(pub Tracer);

impl<S> tower::Layer<S> for RequestSpans {
    type Service = RequestSpansService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpansService {
            tracer: self.0.clone(),
            inner,
        }
    }
}

/// See [`RequestSpans`].
#[derive(Clone)]
pub struct RequestSpansService<S> {
    tracer: Tracer,
    inner: S,
}

impl<S> tower::Service<Request> for RequestSpansService<S>
where
    S: crate::http::AppService,
    S::Future: Send,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request (tower's contract).
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let tracer = self.tracer.clone();
        Box::pin(async move {
            let next = move |req| async move {
                match inner.call(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            };
            Ok(if tracer.is_enabled() {
                traced(&tracer, req, next).await
            } else {
                crate::telemetry::otlp::served(req, |req| crate::http::logged(req, next)).await
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(s: &str) -> SpanCtx {
        SpanCtx::parse(s.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn current_span_is_task_local() {
        assert!(current().is_none());
        let c = ctx("ab:cd");
        CURRENT
            .scope(c, async {
                assert_eq!(current(), Some(c));
            })
            .await;
        assert!(current().is_none());
    }
}
