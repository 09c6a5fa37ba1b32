//! The worker's HTTP API, in DB-GPT's wire format (reference §6.1–§6.2).
//!
//! `generate_stream` answers JSON frames of cumulative text, each followed by one NUL byte
//! (the final frame carries `finish_reason` and `usage`; an error is one frame with
//! `error_code` 1, HTTP 200, as DB-GPT's clients expect), except a prompt the model refuses
//! outright (longer than its context window, a NUL byte, an invalid parameter: the backend's
//! `BadRequest`, or a proxy upstream's 400/413, as its first event), which is that 4xx on
//! `generate` and `generate_stream` alike, so that a caller with several instances knows not to try the others. Both answer
//! their headers once the model produced its first event (`generate` then sends its JSON
//! when generation ends), so a caller can tell a frozen worker from a long generation. The
//! model routes accept bodies up to [`MAX_MODEL_BODY_BYTES`], the apiserver's own cap. Both DB-GPT roles
//! (`human`/`ai`/`system`) and OpenAI roles are accepted; an unknown role is an error frame,
//! never a silently dropped message. Lifecycle routes (`apply`, `models/startup`,
//! `models/shutdown`) answer JSON 4xx for conflicts and unknown models instead of DB-GPT's
//! plain-text 500s. Every route but health writes a root span to DB-GPT's tracer file,
//! continuing the caller's `DB-GPT-Trace-Span-Id`, and the model routes add DB-GPT's
//! `WorkerManager.*` spans ([`crate::tracer`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};
use tracing::warn;

use super::backends::{BackendError, ChatMessage, GenerateEvent, GenerateParams, Role};
use super::manager::{ManagerError, WorkerManager};
use super::spec::{Engine, ModelSpec};
use crate::http::{ApiError, CappedBody, MAX_MODEL_BODY_BYTES, json_response, with_fallbacks};
use crate::tracer::{self, SpanCtx, Tracer};
use crate::validate::{Fields, parse_json_object, query_object};
use crate::wire::HEALTH_PATH;
use crate::wire::controller::worker_key;
use crate::wire::worker::{
    self as wire, ModelMetadata, ModelOutput, PromptRequest, SupportedModel, WorkerApplyOutput,
    WorkerSupportedModel, WorkerType, encode_frame,
};

/// Shared state of the worker's handlers.
#[derive(Clone)]
pub struct WorkerState {
    pub manager: Arc<WorkerManager>,
    /// DB-GPT's span file ([`Tracer::disabled`] when off).
    pub tracer: Tracer,
    /// The address the HTTP listener is bound to (its real port, also when port 0 was
    /// asked): what `models/supports` reports when the worker does not register.
    pub bind: SocketAddr,
}

/// The parent of a `WorkerManager.*` span: the body's `span_id` (DB-GPT's clients send
/// it), else the request's root span.
fn parent_span(v: &Value) -> Option<SpanCtx> {
    SpanCtx::from_body(v).or_else(tracer::current)
}

/// The worker's routes.
pub fn router(state: WorkerState) -> Router {
    let api = Router::new()
        .route(
            HEALTH_PATH,
            get(|| async { json_response(StatusCode::OK, &json!({"status": "ok"})) }),
        )
        // Ready once serving (the models are loaded first); 503 while draining, answered by
        // the drain layer (crate::http::Drain).
        .route(
            crate::wire::READY_PATH,
            get(|| async { json_response(StatusCode::OK, &json!({"status": "ok"})) }),
        )
        .route(wire::GENERATE_STREAM_PATH, post(generate_stream))
        .route(wire::GENERATE_PATH, post(generate))
        .route(wire::EMBEDDINGS_PATH, post(embeddings))
        .route(wire::COUNT_TOKEN_PATH, post(count_token))
        .route(wire::MODEL_METADATA_PATH, post(model_metadata))
        .route(wire::APPLY_PATH, post(apply))
        .route(
            wire::PARAMETER_DESCRIPTIONS_PATH,
            get(parameter_descriptions),
        )
        .route(wire::MODELS_SUPPORTS_PATH, get(supports))
        .route(wire::MODELS_STARTUP_PATH, post(startup))
        .route(wire::MODELS_SHUTDOWN_PATH, post(shutdown))
        .route(wire::OPENAI_CHAT_PATH, post(super::native::chat))
        .route(
            wire::OPENAI_COMPLETIONS_PATH,
            post(super::native::completions),
        )
        .route(
            wire::OPENAI_EMBEDDINGS_PATH,
            post(super::native::embeddings),
        );
    let app = with_fallbacks(api);
    let app = tracer::with_request_middleware(app, &state.tracer, false);
    app.with_state(state)
}

fn manager_error(e: ManagerError) -> ApiError {
    let status = match &e {
        ManagerError::AlreadyRunning(_) | ManagerError::Starting(_) => StatusCode::CONFLICT,
        ManagerError::NotRunning(_) => StatusCode::NOT_FOUND,
        ManagerError::Invalid(_) | ManagerError::Load { .. } => StatusCode::BAD_REQUEST,
    };
    ApiError::Status(status, e.to_string())
}

fn backend_error(e: BackendError) -> ApiError {
    if let BackendError::Overloaded {
        retry_after_secs, ..
    } = e
    {
        return ApiError::Overloaded {
            message: e.to_string(),
            retry_after_secs,
        };
    }
    let status = match &e {
        BackendError::BadRequest(_) => StatusCode::BAD_REQUEST,
        BackendError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::Status(status, e.to_string())
}

/// The status of a generation the model refused as the client's error, before any output:
/// our own check (prompt longer than the context window, NUL byte, bad parameter) or a proxy
/// upstream's 400/413 (vLLM's context-length error, say). Every instance would refuse it.
fn refusal(e: &BackendError) -> Option<StatusCode> {
    match e {
        BackendError::BadRequest(_) => Some(StatusCode::BAD_REQUEST),
        BackendError::Upstream {
            status: Some(s @ (400 | 413)),
            ..
        } => StatusCode::from_u16(*s).ok(),
        _ => None,
    }
}

fn not_running(name: &str, wt: WorkerType) -> ApiError {
    ApiError::Status(
        StatusCode::NOT_FOUND,
        format!(
            "model {} is not running on this worker",
            worker_key(name, wt.as_str())
        ),
    )
}

/// The body of a model call (a prompt or an embedding batch).
type ModelBody = CappedBody<MAX_MODEL_BODY_BYTES>;

/// Maps a validated request onto backend parameters (roles included).
pub fn to_params(req: &PromptRequest) -> Result<GenerateParams, BackendError> {
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if m.role == "view" {
            continue; // DB-GPT's display-only role is never sent to a model.
        }
        messages.push(ChatMessage::new(Role::parse(&m.role)?, m.content.clone()));
    }
    Ok(GenerateParams {
        messages,
        temperature: req.temperature.map(|t| t as f32),
        top_p: req.top_p.map(|t| t as f32),
        top_k: req.top_k.map(|k| k as i32),
        max_new_tokens: req.max_new_tokens.map(|m| m as u32),
        stop: req.stop.iter().map(|s| s.to_string()).collect(),
        seed: req.seed.map(|s| s as u64),
        presence_penalty: req.presence_penalty.map(|p| p as f32),
        frequency_penalty: req.frequency_penalty.map(|p| p as f32),
        ..GenerateParams::default()
    })
}

/// The frames of one generation, as a stream of `ModelOutput`s; the span `op` lasts as
/// long as the stream.
async fn generation(
    s: &WorkerState,
    body: &[u8],
    op: &'static str,
) -> Result<futures::stream::BoxStream<'static, ModelOutput>, ApiError> {
    let v = parse_json_object(body, "PromptRequest")?;
    let req = PromptRequest::from_json(&v)?;
    let span = s.tracer.start(op, parent_span(&v));
    let Some(model) = s.manager.get(&req.model, WorkerType::Llm) else {
        let msg = format!(
            "Cound not found worker instances for model name {} and worker type llm",
            req.model
        );
        return Ok(futures::stream::once(async move {
            drop(span);
            ModelOutput::error(&msg)
        })
        .boxed());
    };
    let params = match to_params(&req) {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            return Ok(futures::stream::once(async move {
                drop(span);
                ModelOutput::error(&msg)
            })
            .boxed());
        }
    };
    let Engine::Llm(backend) = model.engine.clone() else {
        return Err(not_running(&req.model, WorkerType::Llm));
    };
    // The OTLP span of the model call lasts as long as the frames (like `span`).
    let call = crate::telemetry::otlp::model_call("generate", &req.model);
    let slot = tracing::Instrument::instrument(model.acquire(), call.clone()).await;
    let mut events = call.in_scope(|| backend.generate_stream(params));
    // The first event decides the status: a prompt the model refuses is a 4xx, not a frame.
    let first = events.next().await;
    if let Some(Err(e)) = &first
        && let Some(status) = refusal(e)
    {
        return Err(ApiError::Status(status, e.to_string()));
    }
    // A full model is a 503 with Retry-After (the apiserver tries another instance, a
    // client waits and tries again), not an error frame.
    let first = match first {
        Some(Err(e @ BackendError::Overloaded { .. })) => return Err(backend_error(e)),
        other => other,
    };
    let events = futures::stream::iter(first).chain(events);
    let frames = events
        .scan(
            (String::new(), false, slot, (span, call)),
            |(text, done, _slot, _span), ev| {
                if *done {
                    return futures::future::ready(None);
                }
                let out = match ev {
                    // The DB-GPT frame has no place for them (and nobody asked).
                    Ok(GenerateEvent::Logprobs { .. }) => {
                        return futures::future::ready(Some(None));
                    }
                    Ok(GenerateEvent::Delta { text: d }) => {
                        text.push_str(&d);
                        ModelOutput::text(text.clone())
                    }
                    Ok(GenerateEvent::Finish {
                        finish_reason,
                        usage,
                    }) => {
                        *done = true;
                        ModelOutput {
                            finish_reason: Some(finish_reason.as_str().to_string()),
                            usage,
                            ..ModelOutput::text(text.clone())
                        }
                    }
                    Err(e) => {
                        *done = true;
                        ModelOutput::error(&e.to_string())
                    }
                };
                futures::future::ready(Some(Some(out)))
            },
        )
        .filter_map(futures::future::ready)
        .boxed();
    Ok(frames)
}

async fn generate_stream(
    State(s): State<WorkerState>,
    CappedBody(body): ModelBody,
) -> Result<Response, ApiError> {
    let frames = generation(&s, &body, "WorkerManager.generate_stream").await?;
    let body = Body::from_stream(frames.map(|f| Ok::<_, Infallible>(encode_frame(&f))));
    // DB-GPT sends no Content-Type on this stream.
    Ok((StatusCode::OK, body).into_response())
}

/// How long `generate` holds back its headers hoping to send the whole answer at once.
const GENERATE_WHOLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn generate(
    State(s): State<WorkerState>,
    CappedBody(body): ModelBody,
) -> Result<Response, ApiError> {
    let frames = generation(&s, &body, "WorkerManager.generate").await?;
    let mut last = Box::pin(async move {
        let out = frames
            .fold(None, |_, f| async move { Some(f) })
            .await
            .unwrap_or_else(|| ModelOutput::error("the model produced no output"));
        Ok::<_, Infallible>(axum::body::Bytes::from(
            serde_json::to_vec(&out).unwrap_or_default(),
        ))
    });
    let json = [(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    )];
    // An answer complete within GENERATE_WHOLE_WITHIN (most are) goes out whole, with a
    // Content-Length: the apiserver's pool reuses the connection at its last byte. A longer
    // one gets its headers now (the model has started), so that the apiserver can tell a
    // working worker from a frozen one (its first-byte timeout), and the JSON when the last
    // frame is in.
    match tokio::time::timeout(GENERATE_WHOLE_WITHIN, &mut last).await {
        Ok(Ok(bytes)) => Ok((StatusCode::OK, json, bytes).into_response()),
        Ok(Err(never)) => match never {},
        Err(_) => Ok((
            StatusCode::OK,
            json,
            Body::from_stream(futures::stream::once(last)),
        )
            .into_response()),
    }
}

async fn embeddings(
    State(s): State<WorkerState>,
    CappedBody(body): ModelBody,
) -> Result<Response, ApiError> {
    let v = parse_json_object(&body, "EmbeddingsRequest")?;
    let mut f = Fields::new("body", &v);
    let model = f.req_str("model");
    let input: Vec<String> = match f.raw("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            f.invalid("list_type", "input", "Input should be a list of strings");
            vec![]
        }
        None => {
            f.invalid("missing", "input", "Field required");
            vec![]
        }
    };
    let query = f.opt_str("query");
    f.finish()?;
    let _span = s.tracer.start("WorkerManager.embeddings", parent_span(&v));
    // A reranker is reached here too (DB-GPT 0.7 names its `worker_type`, 0.5 serves it as
    // text2vec): it answers one list of scores, `[[score, …]]`.
    let types = match v.get("worker_type").and_then(Value::as_str) {
        Some(t) if WorkerType::parse(t) == Some(WorkerType::Reranker) => {
            [WorkerType::Reranker, WorkerType::Text2vec]
        }
        _ => [WorkerType::Text2vec, WorkerType::Reranker],
    };
    let Some(m) = types.iter().find_map(|t| s.manager.get(&model, *t)) else {
        return Err(not_running(&model, types[0]));
    };
    match m.engine.clone() {
        Engine::Embedding(_) if input.is_empty() => {
            Ok(json_response(StatusCode::OK, &Vec::<Vec<f32>>::new()))
        }
        Engine::Embedding(backend) => {
            let _slot = m.acquire().await;
            let vectors = backend.embed(input).await.map_err(backend_error)?;
            Ok(json_response(StatusCode::OK, &vectors))
        }
        Engine::Reranker(backend) => {
            let query = query.ok_or_else(|| {
                backend_error(BackendError::BadRequest(format!(
                    "model {model} is a reranker: give the 'query' to score the input against"
                )))
            })?;
            let _slot = m.acquire().await;
            let scores = backend.rerank(query, input).await.map_err(backend_error)?;
            Ok(json_response(StatusCode::OK, &[scores]))
        }
        Engine::Llm(_) => Err(not_running(&model, types[0])),
    }
}

fn model_field(body: &[u8], class: &str) -> Result<(String, Value), ApiError> {
    let v = parse_json_object(body, class)?;
    let mut f = Fields::new("body", &v);
    let model = f.req_str("model");
    f.finish()?;
    Ok((model, v))
}

async fn count_token(
    State(s): State<WorkerState>,
    CappedBody(body): ModelBody,
) -> Result<Response, ApiError> {
    let (model, v) = model_field(&body, "CountTokenRequest")?;
    let mut f = Fields::new("body", &v);
    let prompt = f.req_str("prompt");
    f.finish()?;
    let _span = s.tracer.start("WorkerManager.count_token", parent_span(&v));
    let Some(m) = s.manager.get(&model, WorkerType::Llm) else {
        return Err(not_running(&model, WorkerType::Llm));
    };
    let Engine::Llm(b) = &m.engine else {
        return Err(not_running(&model, WorkerType::Llm));
    };
    // DB-GPT answers 200 `-1` when counting fails; a count that is not one is an error here
    // (JSON `detail`, 500 for a model failure), so a caller cannot take it for a number.
    let n = b.count_tokens(&prompt).map_err(|e| {
        warn!(model = %crate::telemetry::Escaped(&model), error = %crate::telemetry::Escaped(&e), "count_token failed");
        backend_error(e)
    })?;
    Ok(json_response(StatusCode::OK, &n))
}

async fn model_metadata(
    State(s): State<WorkerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let (model, v) = model_field(&body, "ModelMetadataRequest")?;
    let _span = s
        .tracer
        .start("WorkerManager.get_model_metadata", parent_span(&v));
    let Some(m) = s.manager.get(&model, WorkerType::Llm) else {
        return Err(not_running(&model, WorkerType::Llm));
    };
    let Engine::Llm(b) = &m.engine else {
        return Err(not_running(&model, WorkerType::Llm));
    };
    // From the model: its context window and its own chat template (a GGUF's
    // `tokenizer.chat_template`; null when it has none or it is behind a proxy). The rest
    // is DB-GPT's `ModelMetadata`/`ModelExtraMedata` defaults on purpose: every engine here
    // is a chat model, none advertises function calling, `metadata` is empty, and DB-GPT's
    // roles and round separator apply (the worker maps them onto the model's template).
    // Ours: what the native OpenAI routes take for this model (`openai_capabilities`): a
    // proxied model everything its upstream takes, passed through; a local one the engine's
    // list (image and audio parts it refuses, naming them).
    let capabilities: &[&str] = if b.passthrough().is_some() {
        &["passthrough"]
    } else {
        &[
            "tools",
            "tool_choice",
            "json_object",
            "json_schema",
            "logprobs",
            "n",
        ]
    };
    Ok(json_response(
        StatusCode::OK,
        &ModelMetadata {
            model,
            context_length: b.context_length(),
            chat_model: true,
            is_function_calling_model: false,
            metadata: json!({}),
            ext_metadata: json!({"prompt_roles": ["system", "human", "ai"], "prompt_sep": "\n", "prompt_chat_template": b.chat_template(), "openai_capabilities": capabilities}),
        },
    ))
}

fn worker_type_field(f: &mut Fields<'_>, v: &Value, required: bool) -> WorkerType {
    match v.get("worker_type") {
        None | Some(Value::Null) if !required => WorkerType::Llm,
        None => {
            f.invalid("missing", "worker_type", "Field required");
            WorkerType::Llm
        }
        Some(Value::String(t)) => WorkerType::parse(t).unwrap_or_else(|| {
            f.invalid(
                "enum",
                "worker_type",
                "Input should be 'llm', 'text2vec' or 'reranker'",
            );
            WorkerType::Llm
        }),
        Some(_) => {
            f.invalid(
                "enum",
                "worker_type",
                "Input should be 'llm', 'text2vec' or 'reranker'",
            );
            WorkerType::Llm
        }
    }
}

async fn apply(
    State(s): State<WorkerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let v = parse_json_object(&body, "WorkerApplyRequest")?;
    let mut f = Fields::new("body", &v);
    let model = f.req_str("model");
    let apply_type = f.req_str("apply_type");
    let wt = worker_type_field(&mut f, &v, false);
    if !f.has_errors()
        && !matches!(
            apply_type.as_str(),
            "start" | "stop" | "restart" | "update_params"
        )
    {
        f.invalid(
            "enum",
            "apply_type",
            "Input should be 'start', 'stop', 'restart' or 'update_params'",
        );
    }
    f.finish()?;
    let params = v.get("params").cloned().unwrap_or(Value::Null);
    let started = Instant::now();
    let key = worker_key(&model, wt.as_str());
    let m = &s.manager;
    let message = match apply_type.as_str() {
        "start" => {
            let spec = ModelSpec::from_params(&model, wt, &params)
                .map_err(|e| ApiError::Status(StatusCode::BAD_REQUEST, e.0))?;
            m.start(spec).await.map_err(manager_error)?;
            format!("model {key} started")
        }
        "stop" => {
            m.stop(&model, wt).await.map_err(manager_error)?;
            format!("model {key} stopped")
        }
        "restart" => {
            m.restart(&model, wt).await.map_err(manager_error)?;
            format!("model {key} restarted")
        }
        _ => {
            // update_params: the current spec overlaid with the given params.
            let Some(cur) = m.get(&model, wt) else {
                return Err(not_running(&model, wt));
            };
            let mut merged = serde_json::Map::new();
            for p in cur.spec.describe_params() {
                if p.param_name == "proxy_api_key" {
                    continue;
                }
                if let Some(d) = p.default_value {
                    merged.insert(p.param_name, d);
                }
            }
            if let Some(k) = &cur.spec.api_key {
                merged.insert("proxy_api_key".into(), Value::String(k.clone()));
            }
            if let Some(obj) = params.as_object() {
                for (k, val) in obj {
                    merged.insert(k.clone(), val.clone());
                }
            }
            let new_spec = ModelSpec::from_params(&model, wt, &Value::Object(merged))
                .map_err(|e| ApiError::Status(StatusCode::BAD_REQUEST, e.0))?;
            let old = m.stop(&model, wt).await.map_err(manager_error)?;
            if let Err(e) = m.start(new_spec).await {
                // Put the previous configuration back so the model is not lost.
                let rollback = m.start(old).await;
                return Err(ApiError::Status(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{e}; previous parameters {}",
                        if rollback.is_ok() {
                            "restored"
                        } else {
                            "could not be restored"
                        }
                    ),
                ));
            }
            format!("model {key} parameters updated")
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &WorkerApplyOutput {
            message,
            success: true,
            timecost: started.elapsed().as_secs_f64(),
        },
    ))
}

async fn parameter_descriptions(
    State(s): State<WorkerState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let v = query_object(q.as_deref());
    let mut f = Fields::new("query", &v);
    let model = f.req_str("model");
    let wt = worker_type_field(&mut f, &v, false);
    f.finish()?;
    let spec = s
        .manager
        .known_specs()
        .into_iter()
        .find(|sp| sp.name == model && sp.worker_type == wt)
        .ok_or_else(|| not_running(&model, wt))?;
    Ok(json_response(StatusCode::OK, &spec.describe_params()))
}

async fn supports(State(s): State<WorkerState>) -> Response {
    // The address the controller knows, else (`--no_register`) the one we listen on.
    let (host, port) = s
        .manager
        .registrar()
        .map(|r| r.address())
        .unwrap_or_else(|| (s.bind.ip().to_string(), s.bind.port()));
    let models = s
        .manager
        .known_specs()
        .into_iter()
        .map(|sp| SupportedModel {
            path: sp
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| sp.api_base.clone().unwrap_or_default()),
            path_exist: sp.path.as_ref().map(|p| p.exists()).unwrap_or(false),
            proxy: sp.model_type == super::spec::ModelType::Proxy,
            worker_type: sp.worker_type.as_str().into(),
            enabled: true,
            params: Some(sp.describe_params()),
            model: sp.name,
        })
        .collect();
    json_response(
        StatusCode::OK,
        &vec![WorkerSupportedModel { host, port, models }],
    )
}

fn startup_request(body: &[u8]) -> Result<(String, WorkerType, Value), ApiError> {
    let v = parse_json_object(body, "WorkerStartupRequest")?;
    let mut f = Fields::new("body", &v);
    let model = f.req_str("model");
    let wt = worker_type_field(&mut f, &v, true);
    f.finish()?;
    Ok((model, wt, v.get("params").cloned().unwrap_or(Value::Null)))
}

async fn startup(
    State(s): State<WorkerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let (model, wt, params) = startup_request(&body)?;
    // No params: a model this worker stopped starts again as it last ran (how the
    // apiserver wakes a stopped model); a running one is a conflict.
    let bare = params.as_object().is_none_or(|o| o.is_empty());
    let last = if bare {
        s.manager.stopped_spec(&model, wt).map_err(manager_error)?
    } else {
        None
    };
    let spec = match last {
        Some(spec) => spec,
        None => ModelSpec::from_params(&model, wt, &params)
            .map_err(|e| ApiError::Status(StatusCode::BAD_REQUEST, e.0))?,
    };
    s.manager.start(spec).await.map_err(manager_error)?;
    Ok(json_response(StatusCode::OK, &Value::Null))
}

async fn shutdown(
    State(s): State<WorkerState>,
    CappedBody(body): CappedBody,
) -> Result<Response, ApiError> {
    let (model, wt, _) = startup_request(&body)?;
    s.manager.stop(&model, wt).await.map_err(manager_error)?;
    Ok(json_response(StatusCode::OK, &Value::Null))
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use futures::stream::BoxStream;
    use tower::ServiceExt;

    use super::*;
    use crate::worker::backends::LlmBackend;

    /// An LLM whose tokenizer fails and whose template is given.
    struct Fake(Option<&'static str>);

    impl LlmBackend for Fake {
        fn generate_stream(
            &self,
            _: GenerateParams,
        ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
            futures::stream::empty().boxed()
        }
        fn count_tokens(&self, _: &str) -> Result<usize, BackendError> {
            Err(BackendError::internal("the tokenizer broke"))
        }
        fn context_length(&self) -> usize {
            1234
        }
        fn chat_template(&self) -> Option<&str> {
            self.0
        }
    }

    /// A worker without a controller, bound to a real port, serving `Fake` models.
    fn state(models: &[(&str, Option<&'static str>)]) -> (WorkerState, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let manager = Arc::new(WorkerManager::new(None, 2));
        for (name, template) in models {
            let spec = ModelSpec::from_params(
                name,
                WorkerType::Llm,
                &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
            )
            .unwrap();
            manager.insert_engine(spec, Engine::Llm(Arc::new(Fake(*template))));
        }
        let state = WorkerState {
            manager,
            tracer: Tracer::disabled(),
            bind: listener.local_addr().unwrap(),
        };
        (state, listener)
    }

    async fn call(s: &WorkerState, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = match body {
            Some(b) => Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => Request::get(path).body(Body::empty()),
        };
        let resp = router(s.clone()).oneshot(req.unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// An LLM that says "a" at once and finishes 1.5 s later (past GENERATE_WHOLE_WITHIN).
    struct Slow;

    impl LlmBackend for Slow {
        fn generate_stream(
            &self,
            _: GenerateParams,
        ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
            futures::stream::iter([false, true])
                .then(|last| async move {
                    if !last {
                        return Ok(GenerateEvent::Delta { text: "a".into() });
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                    Ok(GenerateEvent::Finish {
                        finish_reason: crate::worker::backends::FinishReason::Stop,
                        usage: None,
                    })
                })
                .boxed()
        }
        fn count_tokens(&self, _: &str) -> Result<usize, BackendError> {
            Ok(1)
        }
        fn context_length(&self) -> usize {
            1234
        }
    }

    /// `generate`'s answer, with its Content-Length when it has one.
    async fn generate_answer(s: &WorkerState, model: &str) -> (Option<u64>, Value) {
        let req = Request::post(wire::GENERATE_PATH)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"model": model, "messages": [{"role": "human", "content": "hi"}]})
                    .to_string(),
            ))
            .unwrap();
        let resp = router(s.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let len = hyper::body::Body::size_hint(resp.body()).exact();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (len, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn generate_sends_a_quick_answer_whole_and_a_slow_one_headers_first() {
        let (s, _l) = state(&[]);
        let spec = ModelSpec::from_params(
            "slow",
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
        )
        .unwrap();
        s.manager.insert_engine(spec, Engine::Llm(Arc::new(Slow)));
        // Complete at once (an unknown model's error frame): one body with its length.
        let (len, v) = generate_answer(&s, "nope").await;
        assert!(v["error_code"].as_i64().unwrap_or(0) != 0, "{v}");
        assert_eq!(len, Some(serde_json::to_vec(&v).unwrap().len() as u64));
        // Still generating after the window: headers first, the body when it is done.
        let (len, v) = generate_answer(&s, "slow").await;
        assert_eq!(len, None, "{v}");
        assert_eq!(v["text"], "a", "{v}");
    }

    /// The native chat route's answer to a non-stream request, with its Content-Length.
    async fn native_answer(s: &WorkerState, model: &str) -> (StatusCode, Option<u64>, Value) {
        let req = Request::post(wire::OPENAI_CHAT_PATH)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
                    .to_string(),
            ))
            .unwrap();
        let resp = router(s.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let len = hyper::body::Body::size_hint(resp.body()).exact();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, len, serde_json::from_slice(&bytes).unwrap())
    }

    /// An LLM that takes 1.5 s to refuse every prompt (a huge prompt's tokenization).
    struct SlowRefusal;

    impl LlmBackend for SlowRefusal {
        fn generate_stream(
            &self,
            _: GenerateParams,
        ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
            futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                Err(BackendError::BadRequest("prompt too long".into()))
            })
            .boxed()
        }
        fn count_tokens(&self, _: &str) -> Result<usize, BackendError> {
            Ok(1)
        }
        fn context_length(&self) -> usize {
            1234
        }
    }

    #[tokio::test]
    async fn a_slow_native_answer_sends_its_headers_first() {
        let (s, _l) = state(&[]);
        let spec = ModelSpec::from_params(
            "slow",
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
        )
        .unwrap();
        s.manager.insert_engine(spec, Engine::Llm(Arc::new(Slow)));
        let spec = ModelSpec::from_params(
            "refuses",
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
        )
        .unwrap();
        s.manager
            .insert_engine(spec, Engine::Llm(Arc::new(SlowRefusal)));
        // Refused at once (an unknown model): one body with its length.
        let (status, len, v) = native_answer(&s, "nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
        assert_eq!(len, Some(serde_json::to_vec(&v).unwrap().len() as u64));
        // Still generating after the window: headers first, the JSON when it is done.
        let (status, len, v) = native_answer(&s, "slow").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(len, None, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "a", "{v}");
        // Refused after the window, but before any output: still the 400.
        let (status, _, v) = native_answer(&s, "refuses").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("too long"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn supports_reports_the_bound_address_without_a_controller() {
        let (s, listener) = state(&[("m", None)]);
        let port = listener.local_addr().unwrap().port();
        let (status, v) = call(&s, "/api/worker/models/supports", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v[0]["host"], "127.0.0.1");
        assert_eq!(v[0]["port"], port, "{v}");
        assert_eq!(v[0]["models"][0]["model"], "m");
    }

    #[tokio::test]
    async fn a_failed_token_count_is_an_error_not_a_count() {
        let (s, _l) = state(&[("m", None)]);
        let (status, v) = call(
            &s,
            "/api/worker/count_token",
            Some(json!({"model": "m", "prompt": "hello"})),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("the tokenizer broke"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn model_metadata_reports_what_the_model_knows() {
        let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
        let (s, _l) = state(&[("tpl", Some(template)), ("plain", None)]);
        let (status, v) = call(
            &s,
            "/api/worker/model_metadata",
            Some(json!({"model": "tpl"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["context_length"], 1234);
        assert_eq!(v["ext_metadata"]["prompt_chat_template"], template);
        assert_eq!(
            v["ext_metadata"]["openai_capabilities"],
            json!([
                "tools",
                "tool_choice",
                "json_object",
                "json_schema",
                "logprobs",
                "n"
            ])
        );
        let (_, v) = call(
            &s,
            "/api/worker/model_metadata",
            Some(json!({"model": "plain"})),
        )
        .await;
        assert_eq!(v["ext_metadata"]["prompt_chat_template"], Value::Null);
        // DB-GPT's defaults, on purpose.
        assert_eq!(v["chat_model"], true);
        assert_eq!(v["is_function_calling_model"], false);
        assert_eq!(
            v["ext_metadata"]["prompt_roles"],
            json!(["system", "human", "ai"])
        );
    }

    /// An LLM that refuses every prompt as too long (before any output).
    struct Refuses;

    impl LlmBackend for Refuses {
        fn generate_stream(
            &self,
            _: GenerateParams,
        ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
            crate::worker::backends::error_stream(BackendError::BadRequest(
                "prompt is 9 tokens but the model's context window is 8 tokens".into(),
            ))
        }
        fn count_tokens(&self, _: &str) -> Result<usize, BackendError> {
            Ok(9)
        }
        fn context_length(&self) -> usize {
            8
        }
        fn chat_template(&self) -> Option<&str> {
            None
        }
    }

    #[tokio::test]
    async fn a_refused_prompt_is_a_400_on_both_generate_routes() {
        let (s, _l) = state(&[]);
        let spec = ModelSpec::from_params(
            "r",
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
        )
        .unwrap();
        s.manager
            .insert_engine(spec, Engine::Llm(Arc::new(Refuses)));
        let ask = json!({"model": "r", "messages": [{"role": "user", "content": "hello"}]});
        for path in [wire::GENERATE_STREAM_PATH, wire::GENERATE_PATH] {
            let (status, v) = call(&s, path, Some(ask.clone())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
            assert!(
                v["detail"]
                    .as_str()
                    .unwrap()
                    .contains("context window is 8 tokens"),
                "{path}: {v}"
            );
        }
    }

    #[test]
    fn refusals_are_the_clients_errors_only() {
        let upstream = |status| BackendError::Upstream {
            status,
            message: "m".into(),
        };
        assert_eq!(
            refusal(&BackendError::BadRequest("prompt is 9 tokens".into())),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(refusal(&upstream(Some(400))), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            refusal(&upstream(Some(413))),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
        // The upstream's own trouble (auth, overload, outage) stays an error frame.
        for s in [Some(401), Some(429), Some(500), None] {
            assert_eq!(refusal(&upstream(s)), None, "{s:?}");
        }
        assert_eq!(refusal(&BackendError::internal("decode failed")), None);
    }
}
