//! The worker's native OpenAI routes (ours; DB-GPT's workers do not have them):
//! `wire::worker::OPENAI_CHAT_PATH`, `…_COMPLETIONS_PATH` and `…_EMBEDDINGS_PATH` take the
//! client's OpenAI request as the apiserver received it and answer in OpenAI's shape, so
//! nothing DB-GPT's PromptRequest cannot carry (tools, structured output, log-probabilities,
//! several choices, image parts, vendor fields) is lost on the way.
//!
//! A model behind an OpenAI-compatible upstream (the proxy backend) gets the body passed
//! through byte for byte (only `model` is set to the upstream's name; a continuation
//! request, [`crate::openai::continuation`], loses our fields and keeps its assistant
//! prefill) and its answer relayed as it comes, status and error bodies included. A model that runs here is served by the
//! local engines ([`super::chat`], [`super::embed`]). Errors are OpenAI error objects; a
//! model this worker does not run is a 404 *with* an OpenAI error body, which callers tell
//! apart from the missing route of an older worker ([`crate::wire::worker::is_route_missing`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use super::backends::{BackendError, LlmBackend, OpenAiPassthrough};
use super::manager::RunningModel;
use super::routes::WorkerState;
use super::spec::Engine;
use crate::http::{CappedBody, MAX_MODEL_BODY_BYTES, sse_response};
use crate::openai::OpenAiError;
use crate::openai::raw::{asks_stream, model_field};
use crate::telemetry::otlp;
use crate::tracer;
use crate::wire::worker::WorkerType;
use tracing::Instrument;

/// The body of a model call.
type ModelBody = CappedBody<MAX_MODEL_BODY_BYTES>;

/// Which OpenAI endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The path under an OpenAI base URL (`…/v1/` + this).
    fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    fn worker_type(self) -> WorkerType {
        match self {
            Endpoint::Embeddings => WorkerType::Text2vec,
            _ => WorkerType::Llm,
        }
    }

    /// The name of this call's OTLP span.
    fn otlp_name(self) -> &'static str {
        match self {
            Endpoint::Embeddings => "embed",
            _ => "generate",
        }
    }

    /// The span this call writes to DB-GPT's tracer file.
    fn span(self) -> &'static str {
        match self {
            Endpoint::Chat => "WorkerManager.openai_chat_completions",
            Endpoint::Completions => "WorkerManager.openai_completions",
            Endpoint::Embeddings => "WorkerManager.openai_embeddings",
        }
    }
}

pub(crate) async fn chat(State(s): State<WorkerState>, CappedBody(b): ModelBody) -> Response {
    serve(&s, Endpoint::Chat, b).await
}

pub(crate) async fn completions(
    State(s): State<WorkerState>,
    CappedBody(b): ModelBody,
) -> Response {
    serve(&s, Endpoint::Completions, b).await
}

pub(crate) async fn embeddings(State(s): State<WorkerState>, CappedBody(b): ModelBody) -> Response {
    serve(&s, Endpoint::Embeddings, b).await
}

async fn serve(s: &WorkerState, ep: Endpoint, body: Bytes) -> Response {
    let field = match model_field(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let Some(model) = s.manager.get(&field.name, ep.worker_type()) else {
        return OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model `{}` is not running on this worker as {}",
                field.name,
                ep.worker_type().as_str()
            ),
        )
        .with_param("model")
        .into_response();
    };
    let span = s.tracer.start(ep.span(), tracer::current());
    // The OTLP span of the model call: from the slot wait to the end of the answer.
    let call = otlp::model_call(ep.otlp_name(), &field.name);
    let slot = model.acquire().instrument(call.clone()).await;
    let guards = (slot, span, call.clone());
    if let Some(p) = passthrough(&model) {
        // A continuation goes upstream as an assistant prefill, without our fields.
        let prefill = match ep {
            Endpoint::Chat => crate::openai::continuation::for_upstream(&body),
            _ => None,
        };
        let (body, field) = match prefill {
            Some(b) => match model_field(&b) {
                Ok(f) => (b, f),
                Err(e) => return e.into_response(),
            },
            None => (body, field),
        };
        let stream = asks_stream(&body);
        let started = std::time::Instant::now();
        let mut forward = call.in_scope(|| p.forward(ep.upstream_path(), body, field));
        let forwarded = if stream {
            forward.await
        } else {
            // A non-stream upstream answers its head only when the whole answer is ready:
            // past WHOLE_WITHIN our headers go first (see `whole_within`).
            match tokio::time::timeout(WHOLE_WITHIN, &mut forward).await {
                Ok(r) => r,
                Err(_) => {
                    let m = model.metrics.clone();
                    let forward = forward
                        .map(move |r| {
                            r.map(|mut a| {
                                a.body = m.meter_body(a.body, false, started);
                                a
                            })
                        })
                        .boxed();
                    return relay_late(forward, guards);
                }
            }
        };
        return match forwarded {
            Ok(mut answer) => {
                answer.body = model.metrics.meter_body(answer.body, stream, started);
                relay(answer, guards)
            }
            Err(e) => upstream_failed(e),
        };
    }
    match (&model.engine, ep) {
        (Engine::Llm(b), Endpoint::Chat | Endpoint::Completions) => {
            let (chat, stream) = (model.chat.clone(), asks_stream(&body));
            let started = Arc::new(tokio::sync::Notify::new());
            // A non-stream answer learns when the model has started (see `whole_within`).
            let b: Arc<dyn LlmBackend> = if stream {
                b.clone()
            } else {
                Arc::new(Started {
                    inner: b.clone(),
                    started: started.clone(),
                })
            };
            let engine = async move {
                match ep {
                    Endpoint::Chat => super::chat::chat_completions_with(b, &chat, &body).await,
                    _ => super::chat::completions(b, &body).await,
                }
            }
            .instrument(call);
            if stream {
                answer(engine.await, guards)
            } else {
                whole_within(Box::pin(engine), &started, guards).await
            }
        }
        (Engine::Embedding(b), Endpoint::Embeddings) => {
            match super::embed::embeddings(b.clone(), &body)
                .instrument(call)
                .await
            {
                Ok(json) => json_answer(json),
                Err(e) => e.into_response(),
            }
        }
        _ => OpenAiError::invalid(
            "model",
            "model_not_supported",
            format!("The model `{}` cannot serve this endpoint", field.name),
        )
        .into_response(),
    }
}

/// The upstream of a proxied model, if this is one.
fn passthrough(model: &Arc<RunningModel>) -> Option<&dyn OpenAiPassthrough> {
    match &model.engine {
        Engine::Llm(b) => b.passthrough(),
        Engine::Embedding(b) => b.passthrough(),
        Engine::Reranker(_) => None,
    }
}

/// An upstream that gave no answer (unreachable, silent past its first-byte timeout): 502,
/// which callers may retry on another instance.
fn upstream_failed(e: BackendError) -> Response {
    OpenAiError::bad_gateway(e.to_string()).into_response()
}

/// The upstream's answer as it comes; `guards` (the model's slot and the span) live until
/// the body ends. A failure after the head cuts the body short (the client sees a broken
/// stream, as it would from the upstream itself).
fn relay<G: Send + 'static>(answer: super::backends::Passthrough, guards: G) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = answer.body.map(move |item| {
        let _held = &guards;
        item.map_err(|e| {
            tracing::warn!(error = %e, "the upstream's answer broke off");
            std::io::Error::other(e.to_string())
        })
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    if let Some(ct) = answer
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

/// A non-stream upstream answer still pending after [`WHOLE_WITHIN`]: 200 and JSON now, the
/// upstream's body when it comes. Its status is lost then (an upstream that fails this late
/// is rare: a refusal comes at once); the body is the upstream's error object, or ours.
fn relay_late<G: Send + 'static>(
    forward: futures::future::BoxFuture<
        'static,
        Result<super::backends::Passthrough, BackendError>,
    >,
    guards: G,
) -> Response {
    let body = futures::stream::once(forward)
        .flat_map(move |res| {
            let _held = &guards;
            match res {
                Ok(answer) => {
                    if answer.status >= 400 {
                        tracing::warn!(
                            status = answer.status,
                            "the upstream failed after the headers were sent; its error is the body"
                        );
                    }
                    answer.body
                }
                Err(e) => {
                    let json = serde_json::to_vec(&OpenAiError::bad_gateway(e.to_string()).body())
                        .unwrap_or_default();
                    futures::stream::once(async move { Ok(Bytes::from(json)) }).boxed()
                }
            }
        })
        .map(|item| item.map_err(|e| std::io::Error::other(e.to_string())));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(body),
    )
        .into_response()
}

/// A local engine's answer: one JSON body, or an SSE stream holding `guards` to its end.
fn answer<G: Send + 'static>(a: Result<super::chat::Answer, OpenAiError>, guards: G) -> Response {
    match a {
        Err(e) => e.into_response(),
        Ok(super::chat::Answer::Whole(json)) => json_answer(json),
        Ok(super::chat::Answer::Stream(events)) => {
            let body = events.map(move |b| {
                let _held = &guards;
                Ok::<_, Infallible>(b)
            });
            sse_response(Body::from_stream(body))
        }
    }
}

/// How long a non-stream answer may hold back its headers hoping to go out whole.
const WHOLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A local model that tells when it has produced its first output: the moment a non-stream
/// answer may commit to a 200 (a prompt the model refuses is refused before that).
struct Started {
    inner: Arc<dyn LlmBackend>,
    started: Arc<tokio::sync::Notify>,
}

impl LlmBackend for Started {
    fn generate_stream(
        &self,
        params: super::backends::GenerateParams,
    ) -> futures::stream::BoxStream<'static, Result<super::backends::GenerateEvent, BackendError>>
    {
        let started = self.started.clone();
        self.inner
            .generate_stream(params)
            .inspect(move |ev| {
                if ev.is_ok() {
                    started.notify_one();
                }
            })
            .boxed()
    }

    fn count_tokens(&self, text: &str) -> Result<usize, BackendError> {
        self.inner.count_tokens(text)
    }

    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template()
    }
}

/// A non-stream local answer: complete within [`WHOLE_WITHIN`] (most are), it goes out whole
/// with its Content-Length. A longer one gets its headers once the model has `started`
/// producing output (a refusal, such as a prompt over the context window, comes before that
/// and keeps its 4xx, however long the check took) and its JSON when it is done, so that the
/// apiserver can tell a working model from a frozen worker (its first-byte timeout) during a
/// long generation. A failure after the headers is the error object as the body.
async fn whole_within<G: Send + 'static>(
    mut engine: futures::future::BoxFuture<'static, Result<super::chat::Answer, OpenAiError>>,
    started: &tokio::sync::Notify,
    guards: G,
) -> Response {
    let early = match tokio::time::timeout(WHOLE_WITHIN, &mut engine).await {
        Ok(a) => Some(a),
        Err(_) => tokio::select! {
            a = &mut engine => Some(a),
            _ = started.notified() => None,
        },
    };
    match early {
        Some(a) => answer(a, guards),
        None => {
            let body = futures::stream::once(async move {
                let _held = guards;
                let json = match engine.await {
                    Ok(super::chat::Answer::Whole(json)) => json,
                    Ok(super::chat::Answer::Stream(events)) => {
                        Bytes::from(events.collect::<Vec<Bytes>>().await.concat())
                    }
                    Err(e) => Bytes::from(serde_json::to_vec(&e.body()).unwrap_or_default()),
                };
                Ok::<_, Infallible>(json)
            });
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                Body::from_stream(body),
            )
                .into_response()
        }
    }
}

fn json_answer(json: Bytes) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}
