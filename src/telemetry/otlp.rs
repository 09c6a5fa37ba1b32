//! OTLP trace export: the spans of one request, across the apiserver, the worker and the
//! proxy upstream, sent to an OpenTelemetry collector over OTLP/HTTP (protobuf) when
//! `--otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Spans are `tracing` spans with the target [`TARGET`]; only those reach the
//! `tracing-opentelemetry` layer, and the log formatter never sees them. Every span is made
//! by a function here, which returns [`tracing::Span::none`] at the cost of one atomic load
//! when export is off, so the hot path pays nothing then. The spans: a server span per
//! request ([`served`], continuing the client's W3C `traceparent`, else DB-GPT's
//! `DB-GPT-Trace-Span-Id`), the apiserver's call to a worker instance ([`worker_call`]),
//! the worker's model call ([`model_call`]) and the proxy backend's upstream request
//! ([`upstream_call`]); [`traceparent`] names the current span to the next hop. A
//! malformed `traceparent` is ignored (the request starts a new trace).
//!
//! Finished spans go through a bounded queue to one exporter thread ([`Batcher`]), which
//! sends a batch every `--otlp_batch_delay_ms` (or when [`MAX_BATCH`] spans wait) and on
//! shutdown. An endpoint that cannot be reached is reported once; its spans (and those that
//! find the queue full) are dropped and counted ([`dropped_spans`]), and serving goes on.

use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::Body as HttpBody;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of exported spans (and of nothing else).
pub const TARGET: &str = "dbgpt::otel";

/// The W3C trace-context header.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Spans waiting for the exporter beyond this are dropped (and counted).
pub const MAX_QUEUE: usize = 4096;
/// At most this many spans per export request.
pub const MAX_BATCH: usize = 512;
/// How long one export (with the exporter's retries) may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final flush may take when the daemon stops.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The default delay between exports.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_secs(1);

static ENABLED: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are exported (the process installed the OTLP layer).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans that never reached the collector: the queue was full, or their export failed
/// (the endpoint unreachable, or it refused them). For the metrics endpoint.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans the collector accepted.
pub fn exported_spans() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// Where and how a daemon exports its spans.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// The traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// `service.name` (unless `OTEL_SERVICE_NAME` says otherwise).
    pub service_name: &'static str,
    /// Delay between exports.
    pub batch_delay: Duration,
}

impl OtlpConfig {
    /// The traces URL of a collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is read
    /// (`http://collector:4318` → `http://collector:4318/v1/traces`); a URL that already
    /// ends in `/v1/traces` is kept. Anything but an http(s) URL with a host is an error.
    pub fn traces_url(base: &str) -> Result<String, String> {
        let base = base.trim();
        let url = reqwest::Url::parse(base).map_err(|e| format!("{base:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("{base:?} must be an http:// or https:// URL"));
        }
        let trimmed = base.trim_end_matches('/');
        Ok(if trimmed.ends_with("/v1/traces") {
            trimmed.to_string()
        } else {
            format!("{trimmed}/v1/traces")
        })
    }
}

/// Ends export at the daemon's stop: [`Exporting::shutdown`] sends what is queued (bounded
/// by [`SHUTDOWN_TIMEOUT`]).
pub struct Exporting {
    provider: Option<SdkTracerProvider>,
}

impl Exporting {
    /// Nothing to flush (export off).
    pub fn off() -> Self {
        Exporting { provider: None }
    }

    /// Flushes the queued spans and stops the exporter thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            let _ = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            tracing::info!(
                exported = exported_spans(),
                dropped = dropped_spans(),
                "OTLP export stopped"
            );
        }
    }
}

impl Drop for Exporting {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `tracing` layer that exports [`TARGET`] spans, and its shutdown handle. Starts the
/// exporter thread; call after daemonizing.
pub fn layer<S>(
    cfg: &OtlpConfig,
) -> anyhow::Result<(impl tracing_subscriber::Layer<S> + use<S>, Exporting)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let (mut exporter, last_error) = exporter(&cfg.endpoint)?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        resource = resource.with_service_name(cfg.service_name);
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // The provider would hand the resource to the processor after the exporter thread
    // started: the exporter gets it here, first.
    exporter.set_resource(&resource);
    let processor = Batcher::start(exporter, last_error, cfg.endpoint.clone(), cfg.batch_delay)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("dbgpt");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == TARGET
        }));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((
        layer,
        Exporting {
            provider: Some(provider),
        },
    ))
}

// ---------------------------------------------------------------------------------------
// Spans and propagation

/// The parent a request's server span continues: the client's `traceparent` when it is
/// valid, else DB-GPT's `DB-GPT-Trace-Span-Id` when its ids have W3C's widths, else none.
pub fn parent_from(headers: &HeaderMap) -> Option<Context> {
    if headers.contains_key(&TRACEPARENT) {
        let cx =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        if cx.span().span_context().is_valid() {
            return Some(cx);
        }
    }
    let ctx = headers
        .get(&crate::tracer::TRACE_HEADER)
        .and_then(|v| crate::tracer::SpanCtx::parse(v.as_bytes()))?;
    let (trace, span) = ctx.ids()?;
    let sc = SpanContext::new(
        TraceId::from_bytes(trace.to_be_bytes()),
        SpanId::from_bytes(span.to_be_bytes()),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| Context::new().with_remote_span_context(sc))
}

/// The ids of a valid W3C `traceparent` header: `(trace id, parent span id)`.
pub fn traceparent_ids(headers: &HeaderMap) -> Option<(u128, u64)> {
    headers.get(&TRACEPARENT)?;
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| ids_of(&sc))
}

fn ids_of(sc: &SpanContext) -> (u128, u64) {
    (
        u128::from_be_bytes(sc.trace_id().to_bytes()),
        u64::from_be_bytes(sc.span_id().to_bytes()),
    )
}

tokio::task_local! {
    /// The ids of the request's server span, for code that runs inside spans the exporter
    /// does not see (the log's `http_request` span).
    static REQUEST: (u128, u64);
}

/// The ids of the current exported span, else of the request's server span (`None` when
/// export is off or outside any).
pub fn current_ids() -> Option<(u128, u64)> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        return Some(ids_of(&sc));
    }
    REQUEST.try_with(|r| *r).ok()
}

/// The `traceparent` naming the current exported span as the parent of the next hop's
/// (`None` when export is off or outside any).
pub fn traceparent() -> Option<HeaderValue> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let v = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    HeaderValue::from_str(&v).ok()
}

/// The name of a server span: `METHOD /path` for short paths (every route of ours),
/// `METHOD` alone for long ones (a client's junk must not make a name per request).
fn server_name(method: &http::Method, path: &str) -> String {
    if path.len() <= 64 {
        format!("{method} {path}")
    } else {
        method.to_string()
    }
}

/// Runs `next` for `req` inside a server span (continuing the client's trace, see
/// [`parent_from`]) that lasts until the response body ends. Health checks, heartbeats
/// and the apiserver's periodic polls get none. Export off: just `next(req)`.
pub async fn served<F, Fut>(req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    if !enabled()
        || crate::http::is_quiet(req.uri().path())
        || req.headers().contains_key(crate::tracer::POLL_HEADER)
    {
        return next(req).await;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %server_name(req.method(), req.uri().path()),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    if let Some(cx) = parent_from(req.headers()) {
        let _ = span.set_parent(cx);
    }
    let sc = span.context().span().span_context().clone();
    let call = next(req);
    let resp = if sc.is_valid() {
        REQUEST
            .scope(ids_of(&sc), call)
            .instrument(span.clone())
            .await
    } else {
        call.instrument(span.clone()).await
    };
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    resp.map(|body| crate::http::boxed_body(InSpan { body, _span: span }))
}

/// A response body that keeps its request's span open until it ends.
struct InSpan {
    body: Body,
    _span: tracing::Span,
}

impl HttpBody for InSpan {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        HttpBody::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        HttpBody::size_hint(&self.body)
    }
}

/// The apiserver's attempt at one worker instance for `model` (a child of the current
/// span; its `traceparent` goes to the worker).
pub fn worker_call(model: &str, worker: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "worker_call",
        otel.kind = "client",
        model = %model,
        server.address = %worker,
    )
}

/// A worker's model call `op` (generate, embed) on `model`, from the slot wait to the
/// end of its answer.
pub fn model_call(op: &'static str, model: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(target: TARGET, "model_call", otel.name = op, model = %model)
}

/// The proxy backend's request to its upstream (`path` under the upstream's shown base
/// URL, credentials removed); its `traceparent` goes to the upstream.
pub fn upstream_call(path: &str, base: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "upstream_call",
        otel.name = %format!("POST {path}"),
        otel.kind = "client",
        url.full = %format!("{base}/{path}"),
    )
}

// ---------------------------------------------------------------------------------------
// The exporter: HTTP client, batching thread, counters

/// The OTLP/HTTP protobuf exporter to `endpoint` (the traces URL), and the text of its
/// client's last network error (the exporter itself only says "network error").
fn exporter(endpoint: &str) -> anyhow::Result<(opentelemetry_otlp::SpanExporter, LastError)> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let last_error = LastError::default();
    let client = ReqwestClient {
        client: crate::http::build_client(|b| b)?,
        last_error: last_error.clone(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP exporter: {e}"))?;
    Ok((exporter, last_error))
}

type LastError = std::sync::Arc<Mutex<String>>;

/// The OTLP exporter's HTTP client: the crate's reqwest client (HTTP and HTTPS), driven by
/// the exporter thread's own runtime.
#[derive(Debug)]
struct ReqwestClient {
    client: reqwest::Client,
    last_error: LastError,
}

/// Largest collector answer read (an OTLP answer is a few bytes).
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReqwestClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let sent = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .timeout(EXPORT_TIMEOUT)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let e = e.without_url();
                if let Ok(mut last) = self.last_error.lock() {
                    *last = crate::http::error_chain(&e);
                }
                return Err(Box::new(e));
            }
        };
        let mut out = http::Response::new(Bytes::new());
        *out.status_mut() = resp.status();
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(Box::new(opentelemetry_http::ResponseBodyTooLarge::new()));
            }
            buf.extend_from_slice(&chunk);
        }
        *out.body_mut() = buf.into();
        Ok(out)
    }
}

enum Msg {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    /// Export what is queued, stop, then answer.
    Stop(SyncSender<()>),
}

/// The span processor: a bounded queue ([`MAX_QUEUE`]) to one exporter thread. A full
/// queue drops the span (counted); nothing here blocks a request.
#[derive(Debug)]
struct Batcher {
    tx: SyncSender<Msg>,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Batcher {
    fn start<E>(
        exporter: E,
        last_error: LastError,
        endpoint: String,
        delay: Duration,
    ) -> anyhow::Result<Batcher>
    where
        E: SpanExporter + 'static,
    {
        let (tx, rx) = sync_channel(MAX_QUEUE);
        let thread = std::thread::Builder::new()
            .name("dbgpt-otlp".into())
            .spawn(move || export_loop(exporter, rx, (endpoint, last_error), delay))?;
        Ok(Batcher {
            tx,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a control message and waits (bounded) for its answer.
    fn control(&self, make: impl FnOnce(SyncSender<()>) -> Msg, wait: Duration) -> OTelSdkResult {
        let (done_tx, done_rx) = sync_channel(1);
        // The exporter thread keeps draining the queue, so this waits at most for one
        // export in progress.
        if self.tx.send(make(done_tx)).is_err() {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        done_rx
            .recv_timeout(wait)
            .map_err(|_| OTelSdkError::Timeout(wait))
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Span(Box::new(span)))
        {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, EXPORT_TIMEOUT * 2)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.stopped.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let r = self.control(Msg::Stop, timeout);
        if r.is_ok()
            && let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            let _ = t.join();
        }
        r
    }
}

/// The exporter thread: collects spans for `delay` (or [`MAX_BATCH`] of them) and sends
/// them; one warning when the endpoint starts failing, one note when it works again.
fn export_loop<E: SpanExporter>(
    mut exporter: E,
    rx: Receiver<Msg>,
    (endpoint, last_error): (String, LastError),
    delay: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the OTLP exporter's runtime: spans are dropped");
            for m in rx {
                match m {
                    Msg::Span(_) => {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                    }
                    Msg::Flush(done) | Msg::Stop(done) => {
                        let _ = done.send(());
                    }
                }
            }
            return;
        }
    };
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    let mut deadline = Instant::now() + delay;
    let mut send = |batch: &mut Vec<SpanData>, exporter: &mut E| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        if let Ok(mut l) = last_error.lock() {
            l.clear();
        }
        let result = rt.block_on(async {
            match tokio::time::timeout(
                EXPORT_TIMEOUT + Duration::from_secs(1),
                exporter.export(spans),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)),
            }
        });
        match result {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!(%endpoint, "the OTLP endpoint takes spans again");
                    failing = false;
                }
            }
            Err(e) => {
                DROPPED.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    let cause = last_error.lock().map(|l| l.clone()).unwrap_or_default();
                    let error = if cause.is_empty() {
                        e.to_string()
                    } else {
                        format!("{e}: {cause}")
                    };
                    tracing::warn!(%endpoint, %error, "cannot export spans to the OTLP endpoint: spans are dropped (and counted) until it answers");
                    failing = true;
                }
            }
        }
    };
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                if batch.len() >= MAX_BATCH {
                    send(&mut batch, &mut exporter);
                    deadline = Instant::now() + delay;
                }
            }
            Ok(Msg::Flush(done)) => {
                send(&mut batch, &mut exporter);
                let _ = done.send(());
            }
            Ok(Msg::Stop(done)) => {
                send(&mut batch, &mut exporter);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                send(&mut batch, &mut exporter);
                deadline = Instant::now() + delay;
            }
            Err(RecvTimeoutError::Disconnected) => {
                send(&mut batch, &mut exporter);
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::Tracer as _;

    #[test]
    fn traces_url_of_a_base_url() {
        let u = OtlpConfig::traces_url;
        assert_eq!(u("http://c:4318").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(u(" http://c:4318/ ").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(u("https://c/otlp").unwrap(), "https://c/otlp/v1/traces");
        assert_eq!(
            u("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        for bad in ["c:4318", "ftp://c/", "http://", "not a url"] {
            assert!(u(bad).is_err(), "{bad}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parents_from_traceparent_then_dbgpt_header() {
        let ids =
            |h: &HeaderMap| parent_from(h).map(|cx| ids_of(&cx.span().span_context().clone()));
        let w3c = (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331);
        assert_eq!(ids(&headers(&[("traceparent", TP)])), Some(w3c));
        assert_eq!(traceparent_ids(&headers(&[("traceparent", TP)])), Some(w3c));
        let dbgpt = "1234567890abcdef1234567890abcdef:00000000000000ff";
        // traceparent wins over DB-GPT's header; a malformed one is ignored.
        assert_eq!(
            ids(&headers(&[
                ("traceparent", TP),
                ("db-gpt-trace-span-id", dbgpt)
            ])),
            Some(w3c)
        );
        let from_dbgpt = Some((0x1234567890abcdef1234567890abcdef, 0xff));
        for bad in [
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319G-b7ad6b7169203331-01",
        ] {
            assert_eq!(ids(&headers(&[("traceparent", bad)])), None, "{bad}");
            assert_eq!(
                traceparent_ids(&headers(&[("traceparent", bad)])),
                None,
                "{bad}"
            );
            assert_eq!(
                ids(&headers(&[
                    ("traceparent", bad),
                    ("db-gpt-trace-span-id", dbgpt)
                ])),
                from_dbgpt,
                "{bad}"
            );
        }
        assert_eq!(ids(&headers(&[])), None);
        assert_eq!(ids(&headers(&[("db-gpt-trace-span-id", "nonsense")])), None);
    }

    #[test]
    fn off_means_no_spans_and_no_header() {
        // Export is never switched on in unit tests (no layer is installed).
        assert!(!enabled());
        assert!(worker_call("m", "h:1").is_none());
        assert!(model_call("generate", "m").is_none());
        assert!(upstream_call("chat/completions", "http://u/v1").is_none());
        assert!(traceparent().is_none());
        assert!(current_ids().is_none());
    }

    #[test]
    fn an_unreachable_endpoint_drops_and_counts_spans() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
        let (exporter, last_error) = exporter(&endpoint).unwrap();
        let batcher =
            Batcher::start(exporter, last_error, endpoint, Duration::from_secs(3600)).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batcher)
            .build();
        let tracer = provider.tracer("test");
        let before = dropped_spans();
        for _ in 0..3 {
            drop(tracer.start("s"));
        }
        let started = Instant::now();
        // The flush exports now (the delay is an hour): the refused connection is retried
        // by the exporter, then the batch is dropped and counted.
        provider.force_flush().unwrap();
        assert!(
            dropped_spans() >= before + 3,
            "{} {before}",
            dropped_spans()
        );
        assert!(started.elapsed() < EXPORT_TIMEOUT * 2);
        provider.shutdown().unwrap();
    }
}
