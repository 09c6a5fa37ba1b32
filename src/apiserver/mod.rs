//! The OpenAI-compatible API server: the router, API-key auth and thin handlers that tie
//! OpenAI requests to worker calls (CORS and the request middleware are layered around the
//! router in [`service`]). Static and managed API keys, their limits and usage are
//! [`tenancy`]'s ([`limits`] keeps the counters): every handler admits its request once
//! the model is known and hands the key's lease to the answer.
//!
//! Routes (under both `/api/v1` and `/v1`): `GET models`, `POST chat/completions` (plain and
//! SSE), `POST completions`, `POST responses` (stateless, onto chat), `POST embeddings`, `POST beta/relevance`, `POST rerank` (also at
//! `/rerank` and `/v2/rerank`); plus an open `GET /api/health`. Relevance and rerank go to a
//! `reranker` worker (DB-GPT 0.7), else to a `text2vec` worker serving a reranker (0.5). Requests are validated and answered in OpenAI's shapes ([`openai`]), routed to a worker instance from
//! the cached controller view ([`discovery`], [`policy`], instances ejected by [`outlier`]
//! detection passed over) on the models of the request's chain ([`aliases`]: an alias's
//! target, then its fallbacks) after [`admission`] (a bounded per-model queue; a hold for a
//! known model without instances) and relayed ([`proxy`]); worker
//! frames carry cumulative text, which is turned into OpenAI deltas here. A completion goes
//! first to the worker's native OpenAI route, which takes the client's body unchanged and
//! answers in OpenAI's shape, relayed byte for byte ([`splice`]) or, for a stream, event by
//! event by [`failover`], which continues it on another instance when its worker dies or
//! stalls mid-way; only a DB-GPT worker
//! (no such route) gets DB-GPT's PromptRequest, and then a request with fields its API
//! cannot carry (tools, structured output, log-probabilities) is a 400 naming the field.
//! On that DB-GPT path, streams send the
//! role first, one chunk with `finish_reason` per choice, an optional usage chunk, then
//! `data: [DONE]`; a worker failure mid-stream ends the stream with an OpenAI error event.
//! The stream is produced by a task that stops (dropping the worker connection) as soon as
//! the client goes away. Requests under `/api` write a root span to DB-GPT's tracer file;
//! each completion, embedding batch and relevance call writes DB-GPT's
//! `dbgpt.model.apiserver.*` span and passes it to the worker in the
//! `DB-GPT-Trace-Span-Id` header ([`crate::tracer`]). [`service`] wires the process.

pub(crate) mod admission;
pub(crate) mod aliases;
pub(crate) mod config;
pub(crate) mod discovery;
pub(crate) mod failover;
pub(crate) mod limits;
pub(crate) mod outlier;
pub(crate) mod policy;
pub mod pool;
pub(crate) mod proxy;
pub(crate) mod service;
pub(crate) mod splice;
pub(crate) mod tenancy;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

use self::aliases::Hop;
use self::discovery::Group;
use self::proxy::{FrameStream, Native, NativeAnswer, NativeBody, Upstream, UpstreamError};
use self::splice::Spliced;
use crate::http::{json_response, json_response_sized, sse_response};
use crate::openai::response::{DONE, Envelope, Kind, sse};
use crate::openai::{self, CompletionRequest, OpenAiError};
use crate::telemetry::metrics::ModelName;
use crate::telemetry::metrics::apiserver::ApiMetrics;
use crate::tracer::{self, Meta, Tracer};
use crate::wire::keys::Priority;
use crate::wire::worker::{self as wire, Frame, Usage, WorkerType};

/// Largest request body accepted (embedding batches can be large); the workers' model routes
/// accept as much, so a body we take is never refused by every worker for its size.
pub const MAX_REQUEST_BYTES: usize = crate::http::MAX_MODEL_BODY_BYTES;

/// State of the handlers of one serving thread (each has its own worker connection pool).
#[derive(Clone)]
pub struct AppState {
    pub upstream: Upstream,
    /// Static and managed API keys, their limits and usage ([`tenancy`]); shared.
    pub tenancy: Arc<tenancy::Tenancy>,
    /// Model aliases and fallback chains ([`aliases`]), shared by every serving thread.
    pub routes: Arc<aliases::Routes>,
    pub embedding_batch_size: usize,
    /// Shared by every serving thread.
    pub stats: Arc<Stats>,
    /// DB-GPT's span file ([`Tracer::disabled`] when off), shared by every serving thread.
    pub tracer: Tracer,
    /// Mid-stream failover of native streams ([`failover`]).
    pub failover: failover::Settings,
    /// Prometheus metrics, shared by every serving thread.
    pub metrics: Arc<ApiMetrics>,
    /// Per-model queues and hold-and-wake ([`admission`]), shared by every serving thread.
    pub admission: Arc<admission::Admission>,
}

/// Request counters for the admin status, shared by every serving thread.
#[derive(Default)]
pub struct Stats {
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
}

type Shared = Arc<AppState>;

/// The apiserver's router (without CORS and the request middleware, which
/// [`service`] puts around the whole router).
pub fn router(state: Shared) -> Router {
    // Every route under both prefixes, registered flat: a nested router would rewrite the
    // path and route a second time on every request.
    let mut api = Router::new();
    for prefix in ["/api/v1", "/v1"] {
        api = api
            .route(&format!("{prefix}/models"), get(models))
            .route(&format!("{prefix}/chat/completions"), post(chat))
            .route(&format!("{prefix}/completions"), post(completions))
            .route(&format!("{prefix}/responses"), post(responses))
            .route(&format!("{prefix}/embeddings"), post(embeddings))
            .route(&format!("{prefix}/beta/relevance"), post(relevance))
            .route(&format!("{prefix}/rerank"), post(rerank));
    }
    for path in ["/rerank", "/v2/rerank"] {
        api = api.route(path, post(rerank));
    }
    let app = Router::new()
        .route(crate::wire::HEALTH_PATH, get(health))
        // 503 while draining, answered by the drain layer (crate::http::Drain).
        .route(crate::wire::READY_PATH, get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    app.with_state(state)
}

async fn not_found(req: Request) -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> OpenAiError {
    OpenAiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!(
            "Method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Constant-time comparison (keys must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who sent the request, once its key is checked ([`tenancy::Tenancy::authenticate`]:
/// static `--api_keys`, managed keys, or open when there are neither): the first extractor
/// of every `/v1` handler. An extractor rather than a middleware layer, which would box and
/// clone on every request. Keys are never logged. Puts the caller's
/// [`crate::wire::keys::Priority`] in the request's extensions (for admission queues).
struct Authorized(tenancy::Caller);

impl FromRequestParts<Shared> for Authorized {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Self, OpenAiError> {
        let caller = s.tenancy.authenticate(&parts.headers)?;
        parts.extensions.insert(caller.priority());
        Ok(Authorized(caller))
    }
}

/// Admits a request of `auth` for `model` under its key's model list and limits (the
/// 403/429 answer when not); the lease goes on the answer ([`tenancy::attach`]).
fn admit(
    s: &Shared,
    auth: &Authorized,
    model: &str,
) -> Result<Option<tenancy::Lease>, Box<Response>> {
    s.tenancy
        .admit(&auth.0, model)
        .map_err(|r| Box::new(ModelName::tag(*r, model)))
}

/// Reads the body (413 beyond [`MAX_REQUEST_BYTES`]).
async fn read_body(req: Request) -> Result<Bytes, OpenAiError> {
    axum::body::to_bytes(req.into_body(), MAX_REQUEST_BYTES)
        .await
        .map_err(|_| {
            OpenAiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("The request body is larger than {MAX_REQUEST_BYTES} bytes"),
            )
        })
}

/// Counts a request in flight for the admin status; also carries the request's priority
/// and, once admitted, its [`admission::Ticket`] (dropped with the answer's last byte,
/// which admits the next waiter).
struct Busy {
    s: Shared,
    priority: Priority,
    ticket: Option<admission::Ticket>,
}

impl Busy {
    fn new(s: &Shared) -> Self {
        s.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        s.stats.requests.fetch_add(1, Ordering::Relaxed);
        Busy {
            s: s.clone(),
            priority: Priority::default(),
            ticket: None,
        }
    }

    /// [`Busy::new`] for `req`, at the priority its key gave it (interactive by default).
    fn of(s: &Shared, req: &Request) -> Self {
        let mut b = Self::new(s);
        b.priority = req
            .extensions()
            .get::<Priority>()
            .copied()
            .unwrap_or_default();
        b
    }

    /// Admits the request for `model` ([`admission::Admission::admit`]): its group.
    async fn admit(
        &mut self,
        model: &str,
        wt: WorkerType,
        may_wait: bool,
    ) -> Result<Arc<Group>, admission::Refusal> {
        let s = self.s.clone();
        let (group, ticket) = s
            .admission
            .admit(&s.upstream, (model, wt), self.priority, may_wait)
            .await?;
        self.ticket = Some(ticket);
        Ok(group)
    }

    /// After every instance answered overloaded: waits in the queue again; the group to
    /// retry with, or `None` (the overloaded answer stands).
    async fn again(&mut self, retry_after: u32) -> Option<Arc<Group>> {
        let s = self.s.clone();
        let ticket = self.ticket.as_mut()?;
        s.admission.again(&s.upstream, ticket, retry_after).await
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.s.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn models(State(s): State<Shared>, auth: Authorized) -> Response {
    let mut names = served_models(&s.upstream.discovery.view());
    names.retain(|m| auth.0.allows(m));
    names.sort();
    names.dedup();
    let now = openai::unix_now();
    let mut data: Vec<Value> = names.iter().map(|m| openai::model_card(m, now)).collect();
    // Aliases something serves, their `root` the model they stand for.
    for (alias, target) in s.routes.listed(&names) {
        if names.binary_search(&alias).is_err() {
            let mut card = openai::model_card(&alias, now);
            card["root"] = Value::String(target);
            data.push(card);
        }
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// The names of every model with a routable instance, of every worker type (a name may
/// repeat across types).
pub fn served_models(view: &discovery::View) -> Vec<String> {
    [WorkerType::Llm, WorkerType::Text2vec, WorkerType::Reranker]
        .into_iter()
        .flat_map(|t| view.models(t))
        .collect()
}

/// DB-GPT's span name for a completion request.
fn span_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "dbgpt.model.apiserver.create_chat_completion",
        Kind::Text => "dbgpt.model.apiserver.create_completion",
    }
}

/// A completion span's metadata: DB-GPT's keys without the prompt text (`messages`,
/// `prompt`: large, and not for a log file) and without unset values.
fn completion_meta(r: &CompletionRequest) -> Meta {
    #[derive(serde::Serialize)]
    struct M<'a> {
        model: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        temperature: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        top_p: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_tokens: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stop: Option<&'a Value>,
    }
    Meta::json(&M {
        model: &r.model,
        temperature: r.sampling.temperature,
        top_p: r.sampling.top_p,
        max_tokens: r.sampling.max_tokens,
        stop: r.sampling.stop.as_ref(),
    })
}

/// `{"model": …}`.
fn model_meta(model: &str) -> Meta {
    #[derive(serde::Serialize)]
    struct M<'a> {
        model: &'a str,
    }
    Meta::json(&M { model })
}

async fn chat(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let busy = Busy::of(&s, &req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match openai::parse_chat(&body) {
        Ok(mut r) => {
            let model = r.model.clone();
            let mut lease = match admit(&s, &auth, &model) {
                Ok(l) => l,
                Err(resp) => return *resp,
            };
            let body = tenancy::stream_usage(&mut r, body, &mut lease);
            let resp = run_completion(s.clone(), Kind::Chat, r, body, busy).await;
            tag(&s, tenancy::attach(resp, lease), &model)
        }
        Err(e) => e.into_response(),
    }
}

async fn completions(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let busy = Busy::of(&s, &req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match openai::parse_completion(&body) {
        Ok(mut r) => {
            let model = r.model.clone();
            let mut lease = match admit(&s, &auth, &model) {
                Ok(l) => l,
                Err(resp) => return *resp,
            };
            let body = tenancy::stream_usage(&mut r, body, &mut lease);
            let resp = run_completion(s.clone(), Kind::Text, r, body, busy).await;
            tag(&s, tenancy::attach(resp, lease), &model)
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/responses` (stateless): the request becomes a chat completion
/// ([`openai::responses::to_chat`]) routed like any other, and its answer, whole or streamed,
/// becomes a Response object or Responses events. An error before the answer starts is
/// relayed as the chat path answered it (OpenAI's error shape is the same).
async fn responses(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let busy = Busy::of(&s, &req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (chat, ctx) = match openai::responses::to_chat(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let chat_body = Bytes::from(serde_json::to_vec(&chat).unwrap_or_default());
    let r = match openai::parse_chat(&chat_body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let lease = match admit(&s, &auth, &r.model) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let answer = run_completion(s.clone(), Kind::Chat, r, chat_body, busy).await;
    // The model that served it (for the metrics and the header).
    let model = aliases::served_by(&answer)
        .unwrap_or_else(|| s.routes.target(ctx.model()))
        .to_string();
    if !answer.status().is_success() {
        return ModelName::tag(tenancy::attach(answer, lease), &model);
    }
    if !ctx.stream() {
        return match axum::body::to_bytes(answer.into_body(), MAX_REQUEST_BYTES).await {
            Ok(b) => match openai::responses::whole(&ctx, &b) {
                Ok(json) => ModelName::tag(
                    aliases::served(
                        tenancy::attach(json_body(StatusCode::OK, json), lease),
                        &model,
                    ),
                    &model,
                ),
                Err(e) => e.into_response(),
            },
            Err(e) => {
                OpenAiError::bad_gateway(format!("the chat answer broke off: {e}")).into_response()
            }
        };
    }
    // Chat SSE in, Responses events out, as the pieces arrive.
    let conv = openai::ResponsesStream::new(ctx);
    let chunks = answer.into_body().into_data_stream();
    let events = futures::stream::unfold(Some((chunks, conv)), |state| async move {
        let (mut chunks, mut conv) = state?;
        let out = match chunks.next().await {
            Some(Ok(b)) => conv.feed_sse(&b),
            Some(Err(e)) => conv.fail_with(&format!("the chat answer broke off: {e}")),
            None => conv.finish(),
        };
        let done = conv.ended();
        let piece: Bytes = out.concat().into();
        Some((
            Ok::<_, std::convert::Infallible>(piece),
            (!done).then_some((chunks, conv)),
        ))
    })
    .filter(|r| futures::future::ready(r.as_ref().map_or(true, |b| !b.is_empty())));
    ModelName::tag(
        aliases::served(
            tenancy::attach(sse_response(Body::from_stream(events)), lease),
            &model,
        ),
        &model,
    )
}

/// Tags an answer with the model it is measured under: the model that served it (the
/// header [`aliases::served`] set), else the one the request resolves to.
fn tag(s: &Shared, resp: Response, requested: &str) -> Response {
    let model = aliases::served_by(&resp)
        .unwrap_or_else(|| s.routes.target(requested))
        .to_string();
    ModelName::tag(resp, &model)
}

/// A JSON body as it is.
fn json_body(status: StatusCode, json: Bytes) -> Response {
    let mut resp = Response::new(Body::from(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A worker's native answer, relayed to the client byte for byte; a stream's `guards` live
/// until its last byte is sent.
fn spliced(s: &Shared, a: NativeAnswer, guards: (Busy, tracer::Span)) -> Response {
    let body = match a.body {
        NativeBody::Whole(b) => Body::from(b),
        NativeBody::Stream(b) => Body::new(Spliced::new(b, s.upstream.timeout, (a.guard, guards))),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = a.status;
    if let Some(ct) = a.content_type {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

/// [`spliced`], with the answer's `model` renamed to `rename` when given (an alias served by
/// its target: the client gets the name it asked for). Only a whole JSON answer is renamed
/// (read first, within the request timeout); streams are renamed by [`failover`].
async fn spliced_as(
    s: &Shared,
    mut a: NativeAnswer,
    guards: (Busy, tracer::Span),
    rename: Option<&str>,
) -> Response {
    let json = a
        .content_type
        .as_ref()
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if let Some(name) = rename
        && a.status.is_success()
        && json
    {
        let bytes = match std::mem::replace(&mut a.body, NativeBody::Whole(Bytes::new())) {
            NativeBody::Whole(b) => b,
            NativeBody::Stream(body) => {
                match tokio::time::timeout(s.upstream.timeout, body.collect()).await {
                    Ok(Ok(b)) => b.to_bytes(),
                    Ok(Err(e)) => {
                        return OpenAiError::bad_gateway(format!(
                            "the worker's answer broke off: {}",
                            crate::http::error_chain(&e)
                        ))
                        .into_response();
                    }
                    Err(_) => {
                        return OpenAiError::from(UpstreamError::Timeout(s.upstream.timeout))
                            .into_response();
                    }
                }
            }
        };
        a.body = NativeBody::Whole(aliases::renamed(&bytes, name).unwrap_or(bytes));
    }
    spliced(s, a, guards)
}

/// The route of a completion on a worker with native OpenAI routes.
fn native_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => wire::OPENAI_CHAT_PATH,
        Kind::Text => wire::OPENAI_COMPLETIONS_PATH,
    }
}

/// A request that needs a native worker, for a model served by DB-GPT's workers only.
fn needs_native(model: &str, field: &str) -> Response {
    OpenAiError::invalid(
        field,
        "unsupported_parameter",
        format!(
            "'{field}' cannot be served: model `{model}` runs on DB-GPT workers, whose API \
             carries none of tools, structured output, log-probabilities, tool messages, \
             non-text content or embedding dimensions"
        ),
    )
    .into_response()
}

/// Strips a trailing replacement character (a split multi-byte sequence still in flight).
fn settled(text: &str) -> &str {
    text.trim_end_matches('\u{fffd}')
}

/// The part of `text` (cumulative) not yet sent; `sent` is what was sent so far.
fn delta(sent: &mut String, text: &str) -> String {
    let text = settled(text);
    if !text.starts_with(sent.as_str()) && text.len() < sent.len() {
        // The worker rewrote (shortened) earlier text: nothing can be taken back; wait.
        return String::new();
    }
    let mut start = sent.len().min(text.len());
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let d = text[start..].to_string();
    sent.clear();
    sent.push_str(text);
    d
}

/// Per-choice bookkeeping while streaming.
struct Choice {
    index: usize,
    /// Whether this choice is the first of its prompt (prompt tokens are counted once).
    first_of_prompt: bool,
    echo: Option<String>,
    sent: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Choice {
    fn apply(&mut self, f: &Frame) -> String {
        let d = delta(&mut self.sent, &f.text);
        if let Some(r) = &f.finish_reason {
            self.finish_reason = Some(r.clone());
        }
        if f.usage.is_some() {
            self.usage = f.usage;
        }
        match self.echo.take() {
            Some(p) => p + &d,
            None => d,
        }
    }
}

fn total_usage(choices: &[Choice]) -> Usage {
    let mut u = Usage::default();
    for c in choices {
        if let Some(cu) = c.usage {
            let prompt = if c.first_of_prompt {
                cu.prompt_tokens
            } else {
                0
            };
            u.add(prompt, cu.completion_tokens);
        }
    }
    u
}

/// What a request holds until its answer is committed: the busy count and its span (started
/// once the first model of its chain is found). Handed to the answer that is sent.
struct Guards {
    busy: Option<Busy>,
    span: Option<tracer::Span>,
}

impl Guards {
    fn new(busy: Busy) -> Self {
        Guards {
            busy: Some(busy),
            span: None,
        }
    }

    /// The span, started by `start` the first time.
    fn span(&mut self, start: impl FnOnce() -> tracer::Span) -> &tracer::Span {
        self.span.get_or_insert_with(start)
    }

    /// Admits the request on `model` ([`Busy::admit`]); only the last model of a chain may
    /// wait (`may_wait`): the others fall back at once when full.
    async fn admit(
        &mut self,
        model: &str,
        wt: WorkerType,
        may_wait: bool,
    ) -> Result<Arc<Group>, admission::Refusal> {
        let busy = self.busy.as_mut().expect("admitted before the answer");
        busy.admit(model, wt, may_wait).await
    }

    /// After every instance answered overloaded: [`Busy::again`].
    async fn again(&mut self, retry_after: u32) -> Option<Arc<Group>> {
        self.busy.as_mut()?.again(retry_after).await
    }

    /// Both, for the answer being sent (taken once).
    fn take(&mut self) -> (Busy, tracer::Span) {
        let busy = self
            .busy
            .take()
            .expect("guards are taken once, by the answer");
        // Always started before an answer is sent; a no-op span otherwise.
        let span = self
            .span
            .take()
            .unwrap_or_else(|| Tracer::disabled().start_with("", None, || Meta::None));
        (busy, span)
    }
}

/// The request's body for `hop`'s model: the client's, with `model` rewritten when another
/// model serves it.
fn body_for(body: &Bytes, requested: &str, hop: &Hop<'_>) -> Bytes {
    if hop.model == requested {
        return body.clone();
    }
    aliases::with_model(body, hop.model).unwrap_or_else(|| body.clone())
}

/// A chat or text completion, on the models of its chain in turn ([`aliases`]) until one
/// serves it; the error of the first when none can.
async fn run_completion(
    s: Shared,
    kind: Kind,
    r: CompletionRequest,
    body: Bytes,
    busy: Busy,
) -> Response {
    let mut guards = Guards::new(busy);
    let hops = s.routes.hops(&r.model);
    let mut first_error = None;
    for (n, hop) in hops.iter().enumerate() {
        let body = body_for(&body, &r.model, hop);
        let last = n + 1 == hops.len();
        match complete_on(&s, kind, &r, (hop, last), body, &mut guards).await {
            Ok(resp) => return aliases::served(resp, hop.model),
            Err(e) => {
                if let Some(next) = hops.get(n + 1) {
                    aliases::note_fallback(&s.metrics, hop.model, next.model, &e);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    let e = first_error.expect("a chain has at least one model");
    OpenAiError::from_upstream(e, prompt_field(kind)).into_response()
}

/// A completion on `hop`'s model: the worker body of each prompt (sent `n` times), then the
/// whole answer or a stream. `Err` when the model cannot serve it and the next model of the
/// chain may ([`aliases::falls_back`]); every other failure is answered.
async fn complete_on(
    s: &Shared,
    kind: Kind,
    r: &CompletionRequest,
    (hop, may_wait): (&Hop<'_>, bool),
    body: Bytes,
    guards: &mut Guards,
) -> Result<Response, UpstreamError> {
    // Validate the model before anything else (404/503 with the right message), and wait
    // for room (or an instance) in its queue when it is the last model of the chain.
    let mut group = match guards.admit(hop.model, WorkerType::Llm, may_wait).await {
        Ok(g) => g,
        Err(admission::Refusal::Upstream(e)) => return Err(e),
        Err(admission::Refusal::Answer(e)) => return Ok(e.into_response()),
    };
    // Ends when the answer is complete (for a stream: when the last chunk is sent).
    let trace = guards
        .span(|| {
            s.tracer
                .start_with(span_name(kind), tracer::current(), || completion_meta(r))
        })
        .ctx();
    // Our workers take the request as it is; DB-GPT's get it as PromptRequests below.
    let legacy_ok = r.native_only.is_none();
    let native = loop {
        let native = s
            .upstream
            .native(
                hop.model,
                &group,
                (native_path(kind), &body),
                legacy_ok,
                trace,
            )
            .await;
        match &native {
            Err(UpstreamError::Overloaded { retry_after, .. }) if may_wait => {
                match guards.again(*retry_after).await {
                    Some(g) => group = g,
                    None => break native,
                }
            }
            _ => break native,
        }
    };
    let first = match native {
        Ok(Native::Answer(a)) if r.stream && failover::is_stream(&a) => {
            let blocker = match kind {
                Kind::Chat => openai::continuation::blocker(r, &body),
                Kind::Text => Some("text completions are not continued".into()),
            };
            let req = failover::Request {
                model: hop.model.to_string(),
                group: group.clone(),
                path: native_path(kind),
                body,
                blocker,
                include_usage: r.include_usage,
                trace,
                rename: hop.rename().map(str::to_string),
            };
            return Ok(failover::relay(s.clone(), req, a, guards.take()));
        }
        Ok(Native::Answer(a)) => return Ok(spliced_as(s, a, guards.take(), hop.rename()).await),
        Ok(Native::Legacy(first)) => first,
        Err(e) if aliases::falls_back(&e) => return Err(e),
        Err(e) => return Ok(OpenAiError::from_upstream(e, prompt_field(kind)).into_response()),
    };
    if let Some(field) = &r.native_only {
        return Ok(needs_native(hop.model, field));
    }
    let env = Envelope::new(kind, hop.answer_as.to_string(), r.include_usage);
    let mut bodies = Vec::new();
    let mut choices = Vec::new();
    for (p, msgs) in r.prompts.iter().enumerate() {
        let body = openai::worker_prompt(hop.model, msgs, &r.sampling);
        if body.len() > MAX_REQUEST_BYTES {
            // Every worker would refuse it: no instance is tried.
            return Ok(OpenAiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("The prompt is larger than {MAX_REQUEST_BYTES} bytes"),
            )
            .with_param(prompt_field(kind))
            .into_response());
        }
        for j in 0..r.n {
            bodies.push(body.clone());
            choices.push(Choice {
                index: p * r.n + j,
                first_of_prompt: j == 0,
                echo: (kind == Kind::Text && r.echo).then(|| msgs[0].1.clone()),
                sent: String::new(),
                finish_reason: None,
                usage: None,
            });
        }
    }
    let call = Call {
        s,
        model: hop.model,
        group: &group,
        first: first.as_ref(),
        trace,
    };
    if r.stream {
        stream_completion(call, env, bodies, choices, guards).await
    } else {
        whole_completion(call, &env, &bodies, choices).await
    }
}

/// What every worker call of one completion shares.
#[derive(Clone, Copy)]
struct Call<'a> {
    s: &'a Shared,
    model: &'a str,
    group: &'a Group,
    /// The instance the policy chose already (every call starts there).
    first: Option<&'a Arc<discovery::Instance>>,
    trace: Option<tracer::SpanCtx>,
}

/// The request field that holds a completion's prompt (named by a worker's refusal).
fn prompt_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "messages",
        Kind::Text => "prompt",
    }
}

/// The answer of a worker that reported a failure in its frame.
fn worker_failed(f: &Frame) -> OpenAiError {
    OpenAiError::bad_gateway(format!("the worker failed: {}", f.text))
}

/// A non-stream completion: every choice's `generate`, answered as one JSON body.
async fn whole_completion(
    call: Call<'_>,
    env: &Envelope,
    bodies: &[Bytes],
    mut choices: Vec<Choice>,
) -> Result<Response, UpstreamError> {
    let results = futures::future::join_all(bodies.iter().map(|b| {
        call.s
            .upstream
            .generate(call.model, (call.group, call.first.cloned()), b, call.trace)
    }))
    .await;
    let mut out = Vec::with_capacity(choices.len());
    for (c, res) in choices.iter_mut().zip(results) {
        let f = match res {
            Ok(f) => f,
            Err(e) if aliases::falls_back(&e) => return Err(e),
            Err(e) => {
                return Ok(OpenAiError::from_upstream(e, prompt_field(env.kind)).into_response());
            }
        };
        if f.error_code != 0 {
            return Ok(worker_failed(&f).into_response());
        }
        let text = c.apply(&f);
        let finish_reason = c.finish_reason.clone().unwrap_or_else(|| "stop".into());
        out.push(env.result_choice(c.index, text, finish_reason));
    }
    let body = env.completion(out, total_usage(&choices));
    Ok(json_response_sized(StatusCode::OK, &body, 512))
}

/// A stream completion: every choice's worker stream must deliver its first frame before we
/// commit to a 200, so failures up to there are retried or answered with a proper status;
/// then a task relays the frames as SSE chunks, holding `guards` (the busy count and the
/// span) until the stream ends.
async fn stream_completion(
    call: Call<'_>,
    env: Envelope,
    bodies: Vec<Bytes>,
    choices: Vec<Choice>,
    guards: &mut Guards,
) -> Result<Response, UpstreamError> {
    let opened = futures::future::join_all(bodies.iter().map(|b| {
        call.s
            .upstream
            .open_stream(call.model, (call.group, call.first.cloned()), b, call.trace)
    }))
    .await;
    let mut streams = Vec::with_capacity(opened.len());
    for o in opened {
        match o {
            // An error before any output is still an HTTP error, not a 200 stream.
            Ok((f, _)) if f.error_code != 0 => return Ok(worker_failed(&f).into_response()),
            Ok(v) => streams.push(v),
            Err(e) if aliases::falls_back(&e) => return Err(e),
            Err(e) => {
                return Ok(OpenAiError::from_upstream(e, prompt_field(env.kind)).into_response());
            }
        }
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let guards = guards.take();
    tokio::spawn(async move {
        let _guards = guards;
        tokio::select! {
            _ = pump(&env, choices, streams, &tx) => {}
            _ = tx.closed() => debug!("client went away; cancelling the worker stream"),
        }
    });
    Ok(sse_response(Body::from_stream(
        tokio_stream_from(rx).map(Ok::<Bytes, std::convert::Infallible>),
    )))
}

/// An mpsc receiver as a stream.
fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Relays the worker streams of every choice as OpenAI chunks.
async fn pump(
    env: &Envelope,
    mut choices: Vec<Choice>,
    streams: Vec<(Frame, FrameStream)>,
    tx: &mpsc::Sender<Bytes>,
) {
    let send = |b: Bytes| async move { tx.send(b).await.is_ok() };
    if env.kind == Kind::Chat {
        for c in &choices {
            if !send(env.chunk(c.index, Some(""), true, None)).await {
                return;
            }
        }
    }
    let mut merged =
        futures::stream::select_all(streams.into_iter().enumerate().map(|(slot, (first, fs))| {
            let first = futures::stream::once(async move { Some(Ok(first)) });
            let rest = futures::stream::unfold(fs, |mut fs| async move {
                let item = fs.next().await;
                item.map(|i| (Some(i), fs))
            });
            first
                .chain(rest)
                .chain(futures::stream::once(async { None }))
                .map(move |i| (slot, i))
                .boxed()
        }));
    while let Some((slot, item)) = merged.next().await {
        let c = &mut choices[slot];
        match item {
            Some(Ok(f)) if f.error_code == 0 => {
                let d = c.apply(&f);
                if !d.is_empty() && !send(env.chunk(c.index, Some(&d), false, None)).await {
                    return;
                }
            }
            Some(Ok(f)) => {
                let _ = send(sse(&worker_failed(&f).body())).await;
                return;
            }
            Some(Err(e)) => {
                let e = OpenAiError::from(UpstreamError::MidStream(Box::new(e)));
                let _ = send(sse(&e.body())).await;
                return;
            }
            None => {
                let finish = c.finish_reason.clone().unwrap_or_else(|| "stop".into());
                let chunk = match env.kind {
                    Kind::Chat => env.chunk(c.index, None, false, Some(&finish)),
                    Kind::Text => env.chunk(c.index, Some(""), false, Some(&finish)),
                };
                if !send(chunk).await {
                    return;
                }
            }
        }
    }
    if env.include_usage {
        let u = total_usage(&choices);
        if !send(env.event(&[], Some(&u))).await {
            return;
        }
    }
    let _ = send(Bytes::from_static(DONE)).await;
}

async fn embeddings(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let busy = Busy::of(&s, &req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let r = match openai::parse_embeddings(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let model = r.model.clone();
    let lease = match admit(&s, &auth, &model) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let resp = embed(s.clone(), busy, body, r).await;
    tag(&s, tenancy::attach(resp, lease), &model)
}

/// `embeddings` once the request is parsed: on the models of its chain in turn until one
/// serves it ([`aliases`]).
async fn embed(
    s: Shared,
    busy: Busy,
    body: Bytes,
    r: openai::request::EmbeddingsRequest,
) -> Response {
    let mut guards = Guards::new(busy);
    let hops = s.routes.hops(&r.model);
    let mut first_error = None;
    for (n, hop) in hops.iter().enumerate() {
        let body = body_for(&body, &r.model, hop);
        let last = n + 1 == hops.len();
        match embed_on(&s, &r, (hop, last), body, &mut guards).await {
            Ok(resp) => return aliases::served(resp, hop.model),
            Err(e) => {
                if let Some(next) = hops.get(n + 1) {
                    aliases::note_fallback(&s.metrics, hop.model, next.model, &e);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    let e = first_error.expect("a chain has at least one model");
    OpenAiError::from_upstream(e, "input").into_response()
}

/// `embeddings` on `hop`'s model; `Err` as [`complete_on`].
async fn embed_on(
    s: &Shared,
    r: &openai::request::EmbeddingsRequest,
    (hop, may_wait): (&Hop<'_>, bool),
    body: Bytes,
    guards: &mut Guards,
) -> Result<Response, UpstreamError> {
    let model = hop.model;
    let mut group = match guards.admit(model, WorkerType::Text2vec, may_wait).await {
        Ok(g) => g,
        Err(admission::Refusal::Upstream(e)) => return Err(e),
        Err(admission::Refusal::Answer(e)) => return Ok(e.into_response()),
    };
    // Our workers answer the whole request (real token counts, `dimensions`); DB-GPT's get
    // it in batches below.
    let span = s.tracer.start_with(
        "dbgpt.model.apiserver.generate_embeddings",
        tracer::current(),
        || model_meta(model),
    );
    let legacy_ok = r.dimensions.is_none();
    let native = loop {
        let native = s
            .upstream
            .native(
                model,
                &group,
                (wire::OPENAI_EMBEDDINGS_PATH, &body),
                legacy_ok,
                span.ctx(),
            )
            .await;
        match &native {
            Err(UpstreamError::Overloaded { retry_after, .. }) if may_wait => {
                match guards.again(*retry_after).await {
                    Some(g) => group = g,
                    None => break native,
                }
            }
            _ => break native,
        }
    };
    let first = match native {
        Ok(Native::Answer(a)) => {
            guards.span = Some(span);
            return Ok(spliced_as(s, a, guards.take(), hop.rename()).await);
        }
        Ok(Native::Legacy(first)) => {
            drop(span);
            first
        }
        Err(e) if aliases::falls_back(&e) => return Err(e),
        Err(e) => return Ok(OpenAiError::from_upstream(e, "input").into_response()),
    };
    if r.dimensions.is_some() {
        return Ok(needs_native(model, "dimensions"));
    }
    let batches: Vec<&[String]> = r.input.chunks(s.embedding_batch_size).collect();
    // One span per worker call, as DB-GPT's `embeddings_generate`.
    let parent = tracer::current();
    let results = futures::future::join_all(batches.iter().enumerate().map(|(i, b)| {
        // The first batch goes where the policy sent the request.
        let first = if i == 0 { first.clone() } else { None };
        let span = s
            .tracer
            .start_with("dbgpt.model.apiserver.generate_embeddings", parent, || {
                model_meta(model)
            });
        let group = &group;
        async move {
            let res = s
                .upstream
                .embeddings(
                    model,
                    (group, WorkerType::Text2vec),
                    first,
                    b,
                    None,
                    span.ctx(),
                )
                .await;
            drop(span);
            res
        }
    }))
    .await;
    let mut data = Vec::with_capacity(r.input.len());
    for (b, res) in batches.iter().zip(results) {
        let vecs = match res {
            Ok(v) => v,
            Err(e) if aliases::falls_back(&e) => return Err(e),
            Err(e) => return Ok(OpenAiError::from_upstream(e, "input").into_response()),
        };
        if vecs.len() != b.len() {
            return Ok(OpenAiError::bad_gateway(format!(
                "the worker returned {} embeddings for {} inputs",
                vecs.len(),
                b.len()
            ))
            .into_response());
        }
        for v in vecs {
            let index = data.len();
            let embedding = if r.base64 {
                Value::String(openai::base64_f32(&v))
            } else {
                json!(v)
            };
            data.push(json!({"object": "embedding", "embedding": embedding, "index": index}));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": hop.answer_as,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }),
    ))
}

/// The group serving `model` as a reranker: a `reranker` worker, else a `text2vec` one (DB-GPT
/// 0.5 serves rerankers as text2vec; whether it is one shows in its answer), the latter found
/// in the view without the refresh a miss costs. A chat model is a 400 naming `model`; an
/// unknown one a 404 listing the rerank-capable models.
async fn reranker_group(s: &Shared, model: &str) -> Result<(Arc<Group>, WorkerType), Unserved> {
    let in_view = |t: WorkerType| {
        let key = crate::wire::controller::worker_key(model, t.as_str());
        !matches!(
            s.upstream.discovery.lookup(&key),
            discovery::Lookup::Unknown
        )
    };
    let group = |t: WorkerType| async move { s.upstream.group(model, t).await.map(|g| (g, t)) };
    let unserved = |e| Unserved::from_upstream(e, "documents");
    if !in_view(WorkerType::Reranker) && in_view(WorkerType::Text2vec) {
        return group(WorkerType::Text2vec).await.map_err(unserved);
    }
    match group(WorkerType::Reranker).await {
        Err(UpstreamError::UnknownModel { .. }) => {}
        other => return other.map_err(unserved),
    }
    // The miss refreshed the view: a `text2vec` entry may have come with it.
    if in_view(WorkerType::Text2vec) {
        return group(WorkerType::Text2vec).await.map_err(unserved);
    }
    let view = s.upstream.discovery.view();
    if view.models(WorkerType::Llm).iter().any(|m| m == model) {
        return Err(Unserved::Final(not_a_reranker(model, "it is a chat model")));
    }
    let mut available = view.models(WorkerType::Reranker);
    available.extend(view.models(WorkerType::Text2vec));
    Err(Unserved::Next(UpstreamError::UnknownModel {
        model: model.to_string(),
        available,
    }))
}

/// Why a model of a chain did not serve a request.
enum Unserved {
    /// The next model of the chain may ([`aliases::falls_back`]).
    Next(UpstreamError),
    /// The answer.
    Final(OpenAiError),
}

impl Unserved {
    /// Sorts a relay error; `field` is named by a worker's refusal.
    fn from_upstream(e: UpstreamError, field: &str) -> Self {
        if aliases::falls_back(&e) {
            Unserved::Next(e)
        } else {
            Unserved::Final(OpenAiError::from_upstream(e, field))
        }
    }
}

fn not_a_reranker(model: &str, why: &str) -> OpenAiError {
    OpenAiError::invalid(
        "model",
        "model_not_reranker",
        format!(
            "model `{model}` is not a reranker ({why}); start a reranker worker (--worker_type reranker) with a cross-encoder model"
        ),
    )
}

/// One score per document from the reranker `model` (DB-GPT's relevance call: the worker's
/// `embeddings` with the query), under DB-GPT's `generate_relevance` span.
async fn score_documents(
    s: &Shared,
    model: &str,
    query: &str,
    documents: &[String],
) -> Result<Vec<f32>, Unserved> {
    let (group, worker_type) = reranker_group(s, model).await?;
    if documents.is_empty() {
        return Ok(Vec::new());
    }
    let span = s.tracer.start_with(
        "dbgpt.model.apiserver.generate_relevance",
        tracer::current(),
        || {
            #[derive(serde::Serialize)]
            struct M<'a> {
                model: &'a str,
                query: &'a str,
                worker_type: WorkerType,
            }
            Meta::json(&M {
                model,
                query,
                worker_type,
            })
        },
    );
    match s
        .upstream
        .embeddings(
            model,
            (&group, worker_type),
            None,
            documents,
            Some(query),
            span.ctx(),
        )
        .await
    {
        // A reranker answers one list of scores, one per document.
        Ok(mut v) if v.len() == 1 && v[0].len() == documents.len() => Ok(v.remove(0)),
        Ok(_) => Err(Unserved::Final(not_a_reranker(
            model,
            "it answered with embeddings, not one score per document",
        ))),
        Err(e) => Err(Unserved::from_upstream(e, "documents")),
    }
}

/// [`score_documents`] on the models of `requested`'s chain in turn ([`aliases`]): the
/// scores, or the answer of the error, with the hop that gave them (the first when none
/// served).
async fn score_on_chain<'a>(
    s: &'a Shared,
    requested: &'a str,
    query: &str,
    documents: &[String],
) -> (Result<Vec<f32>, OpenAiError>, Hop<'a>) {
    let hops = s.routes.hops(requested);
    let mut first_error = None;
    for (n, hop) in hops.iter().enumerate() {
        match score_documents(s, hop.model, query, documents).await {
            Ok(scores) => return (Ok(scores), *hop),
            Err(Unserved::Final(e)) => return (Err(e), *hop),
            Err(Unserved::Next(e)) => {
                if let Some(next) = hops.get(n + 1) {
                    aliases::note_fallback(&s.metrics, hop.model, next.model, &e);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    let e = first_error.expect("a chain has at least one model");
    (Err(OpenAiError::from_upstream(e, "documents")), hops[0])
}

async fn relevance(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let _busy = Busy::new(&s);
    let r = match read_body(req)
        .await
        .and_then(|b| openai::parse_relevance(&b))
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let lease = match admit(&s, &auth, &r.model) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let resp = match score_on_chain(&s, &r.model, &r.query, &r.documents).await {
        (Ok(scores), hop) => aliases::served(
            json_response(
                StatusCode::OK,
                &json!({
                    "object": "list",
                    "model": hop.answer_as,
                    "data": scores,
                    "usage": {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0},
                }),
            ),
            hop.model,
        ),
        (Err(e), _) => e.into_response(),
    };
    tag(&s, tenancy::attach(resp, lease), &r.model)
}

/// Jina's and Cohere's rerank: the relevance call, answered sorted and cut to `top_n`.
async fn rerank(State(s): State<Shared>, auth: Authorized, req: Request) -> Response {
    let _busy = Busy::new(&s);
    let r = match read_body(req).await.and_then(|b| openai::parse_rerank(&b)) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let lease = match admit(&s, &auth, &r.model) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    let resp = match score_on_chain(&s, &r.model, &r.query, &r.documents).await {
        (Ok(scores), hop) => aliases::served(
            json_response(
                StatusCode::OK,
                &openai::rerank_response(
                    hop.answer_as,
                    &scores,
                    &r.documents,
                    r.top_n,
                    r.return_documents,
                ),
            ),
            hop.model,
        ),
        (Err(e), _) => e.into_response(),
    };
    tag(&s, tenancy::attach(resp, lease), &r.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_from_cumulative_text() {
        let mut sent = String::new();
        assert_eq!(delta(&mut sent, "Hel"), "Hel");
        assert_eq!(delta(&mut sent, "Hello"), "lo");
        assert_eq!(delta(&mut sent, "Hello"), "");
        // A half-decoded character is held back until it settles.
        assert_eq!(delta(&mut sent, "Hello \u{fffd}"), " ");
        assert_eq!(delta(&mut sent, "Hello é!"), "é!");
        // A rewrite of earlier text never re-sends or panics.
        assert_eq!(delta(&mut sent, "Help"), "");
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
