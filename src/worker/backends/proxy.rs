//! OpenAI-compatible upstream ("proxy") backend: vLLM, llama.cpp's
//! llama-server, Ollama, OpenAI, or anything else speaking
//! `POST {api_base}/chat/completions` and `POST {api_base}/embeddings`.
//!
//! Unlike DB-GPT's proxy, every sampling parameter is forwarded (temperature
//! including 0, top_p, top_k when set, max_tokens, stop, seed, presence and
//! frequency penalties), and the upstream's finish_reason and usage are
//! propagated. Chat always streams upstream (`stream: true` with
//! `stream_options.include_usage`). Upstream HTTP errors become
//! [`BackendError::Upstream`] carrying the upstream status and its own error
//! message. The API key is sent as a Bearer token and never logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{Map, Value, json};

use super::{
    BackendError, EmbeddingBackend, FinishReason, GenerateEvent, GenerateParams, LlmBackend, Usage,
    error_stream,
};

/// Configuration of an [`OpenAiProxyBackend`].
#[derive(Clone, PartialEq)]
pub struct OpenAiProxyConfig {
    /// Base URL including the version prefix, e.g. `http://127.0.0.1:8080/v1`
    /// or `https://api.openai.com/v1`. `/chat/completions` and `/embeddings`
    /// are appended.
    pub api_base: String,
    /// Bearer key. `None`: env `OPENAI_API_KEY` if set, else no
    /// `Authorization` header (fine for local servers).
    pub api_key: Option<String>,
    /// Model name sent upstream (`model` field).
    pub backend_model: String,
    /// Connect timeout, and the longest silence tolerated while streaming a
    /// chat response; also the total time limit of an embeddings call.
    pub timeout: Duration,
    /// Context window reported by [`LlmBackend::context_length`] (the upstream
    /// does not say; DB-GPT reports 4096 for proxies).
    pub context_length: usize,
    /// Embedding dimension, if known in advance (otherwise learned from the
    /// first successful call).
    pub dimension: Option<usize>,
}

impl OpenAiProxyConfig {
    /// Defaults: key from env, 120 s timeout, context 4096.
    pub fn new(api_base: impl Into<String>, backend_model: impl Into<String>) -> Self {
        OpenAiProxyConfig {
            api_base: api_base.into(),
            api_key: None,
            backend_model: backend_model.into(),
            timeout: Duration::from_secs(120),
            context_length: 4096,
            dimension: None,
        }
    }
}

/// Redacts the key.
impl std::fmt::Debug for OpenAiProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProxyConfig")
            .field("api_base", &self.api_base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("backend_model", &self.backend_model)
            .field("timeout", &self.timeout)
            .field("context_length", &self.context_length)
            .field("dimension", &self.dimension)
            .finish()
    }
}

/// Chat and embeddings through an OpenAI-compatible server. Cheap to clone.
#[derive(Clone)]
pub struct OpenAiProxyBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    api_base: String,
    api_key: Option<String>,
    model: String,
    timeout: Duration,
    context_length: usize,
    /// 0 = unknown.
    dimension: AtomicUsize,
}

impl std::fmt::Debug for OpenAiProxyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProxyBackend")
            .field("api_base", &self.inner.api_base)
            .field("model", &self.inner.model)
            .finish_non_exhaustive()
    }
}

/// `error` and all its sources, joined by ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

/// The upstream's error message from an error response body: OpenAI
/// `{"error":{"message":..}}`, Ollama `{"error":".."}`, FastAPI
/// `{"detail":..}`, `{"message":..}`, else the (shortened) body itself.
pub(crate) fn upstream_error_message(status: reqwest::StatusCode, body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let candidates = [
            v.pointer("/error/message"),
            v.get("error"),
            v.get("message"),
            v.get("detail"),
        ];
        for c in candidates.into_iter().flatten() {
            match c {
                Value::String(s) if !s.is_empty() => return s.clone(),
                Value::Null | Value::String(_) => {}
                other if !other.is_object() => return other.to_string(),
                _ => {}
            }
        }
        if let Some(d) = v.get("detail") {
            return d.to_string();
        }
    }
    let body = body.trim();
    if body.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no response body")
            .to_string();
    }
    let mut s: String = body.chars().take(500).collect();
    if s.len() < body.len() {
        s.push('…');
    }
    s
}

fn parse_usage(v: &Value) -> Option<Usage> {
    let get = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
    };
    let prompt = get("prompt_tokens")?;
    let completion = get("completion_tokens").unwrap_or(0);
    let mut u = Usage::new(prompt, completion);
    if let Some(total) = get("total_tokens") {
        u.total_tokens = total;
    }
    Some(u)
}

impl OpenAiProxyBackend {
    /// Build the client (no network traffic happens here).
    pub fn new(config: OpenAiProxyConfig) -> Result<Self, BackendError> {
        // reqwest is built with `rustls-no-provider`: install ring once per
        // process; "already installed" is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = config.api_base.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base).map_err(|e| {
            BackendError::load(&config.api_base, format!("invalid api_base URL: {e}"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(BackendError::load(
                &config.api_base,
                "api_base must be an http:// or https:// URL",
            ));
        }
        let timeout = config.timeout;
        let client =
            crate::http::build_client(|b| b.connect_timeout(timeout).read_timeout(timeout))
                .map_err(|e| {
                    BackendError::load(
                        &config.api_base,
                        format!("HTTP client: {}", error_chain(&e)),
                    )
                })?;
        let api_key = config
            .api_key
            .or_else(|| std::env::var("OPENAI_API_KEY").ok())
            .filter(|k| !k.is_empty());
        tracing::info!(
            api_base = %base,
            model = %config.backend_model,
            has_key = api_key.is_some(),
            "OpenAI-compatible proxy backend ready"
        );
        Ok(OpenAiProxyBackend {
            inner: Arc::new(Inner {
                client,
                api_base: base,
                api_key,
                model: config.backend_model,
                timeout: config.timeout,
                context_length: config.context_length,
                dimension: AtomicUsize::new(config.dimension.unwrap_or(0)),
            }),
        })
    }

    /// The JSON body sent to `/chat/completions` for `params`.
    pub fn chat_request_body(&self, params: &GenerateParams) -> Value {
        self.inner.chat_body(params)
    }
}

impl Inner {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let rb = self.client.post(format!("{}/{}", self.api_base, path));
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    fn chat_body(&self, p: &GenerateParams) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert(
            "messages".into(),
            Value::Array(
                p.messages
                    .iter()
                    .map(|m| json!({"role": m.role.openai_name(), "content": m.content}))
                    .collect(),
            ),
        );
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        let mut opt = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                body.insert(k.into(), v);
            }
        };
        opt("temperature", p.temperature.map(|v| json!(v)));
        opt("top_p", p.top_p.map(|v| json!(v)));
        opt("top_k", p.top_k.map(|v| json!(v)));
        opt("max_tokens", p.max_new_tokens.map(|v| json!(v)));
        opt("seed", p.seed.map(|v| json!(v)));
        opt("presence_penalty", p.presence_penalty.map(|v| json!(v)));
        opt("frequency_penalty", p.frequency_penalty.map(|v| json!(v)));
        let stop: Vec<&String> = p.stop.iter().filter(|s| !s.is_empty()).collect();
        if !stop.is_empty() {
            body.insert("stop".into(), json!(stop));
        }
        Value::Object(body)
    }

    fn send_error(&self, e: &reqwest::Error) -> BackendError {
        let message = if e.is_timeout() {
            format!(
                "upstream {} timed out after {:?}",
                self.api_base, self.timeout
            )
        } else if e.is_connect() {
            format!(
                "cannot connect to upstream {}: {}",
                self.api_base,
                error_chain(e)
            )
        } else {
            format!(
                "request to upstream {} failed: {}",
                self.api_base,
                error_chain(e)
            )
        };
        BackendError::Upstream {
            status: None,
            message,
        }
    }

    async fn check_status(
        &self,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, BackendError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let message = upstream_error_message(status, &body);
        tracing::warn!(api_base = %self.api_base, status = status.as_u16(), %message, "upstream error");
        Err(BackendError::Upstream {
            status: Some(status.as_u16()),
            message,
        })
    }
}

/// The fields of a streamed `chat.completion.chunk` that matter, borrowed from the line.
#[derive(serde::Deserialize)]
struct FastChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<FastChoice<'a>>,
    #[serde(default)]
    usage: Option<FastUsage>,
    /// Present and not null: an error object (handled by the general path).
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct FastChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<FastDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct FastDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct FastUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl FastUsage {
    /// As [`parse_usage`]: nothing without `prompt_tokens`.
    fn usage(self) -> Option<Usage> {
        let clamp = |n: u64| n.min(u64::from(u32::MAX)) as u32;
        let mut u = Usage::new(
            clamp(self.prompt_tokens?),
            self.completion_tokens.map_or(0, clamp),
        );
        if let Some(total) = self.total_tokens {
            u.total_tokens = clamp(total);
        }
        Some(u)
    }
}

/// Incremental parser of an OpenAI chat-completion SSE stream.
#[derive(Debug, Default)]
pub(crate) struct SseChatParser {
    buf: Vec<u8>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
    done: bool,
}

impl SseChatParser {
    /// Feed raw bytes; returns the events completed by them. After an error
    /// or the final event, the parser is done and ignores further input.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Result<GenerateEvent, BackendError>> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.buf);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            self.line(&buf[start..=start + nl], &mut out);
            start += nl + 1;
            if self.done {
                return out;
            }
        }
        self.buf = buf;
        self.buf.drain(..start);
        out
    }

    /// End of the byte stream.
    pub(crate) fn finish(&mut self) -> Vec<Result<GenerateEvent, BackendError>> {
        let mut out = Vec::new();
        if !self.buf.is_empty() && !self.done {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut out);
        }
        if !self.done {
            self.done = true;
            match self.finish_reason {
                // Some servers omit [DONE]; a finish_reason is enough.
                Some(finish_reason) => out.push(Ok(GenerateEvent::Finish {
                    finish_reason,
                    usage: self.usage,
                })),
                None => out.push(Err(BackendError::Upstream {
                    status: None,
                    message: "upstream stream ended before the completion finished".into(),
                })),
            }
        }
        out
    }

    fn line(&mut self, raw: &[u8], out: &mut Vec<Result<GenerateEvent, BackendError>>) {
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches(['\n', '\r']);
        // Only `data:` fields matter; comments (`:`), `event:`, `id:` and
        // blank separators are ignored. OpenAI-style servers put one JSON
        // document per data line.
        let Some(data) = line.strip_prefix("data:") else {
            return;
        };
        let data = data.strip_prefix(' ').unwrap_or(data).trim_end();
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            self.done = true;
            out.push(Ok(GenerateEvent::Finish {
                finish_reason: self.finish_reason.unwrap_or(FinishReason::Stop),
                usage: self.usage,
            }));
            return;
        }
        // The common chunk, parsed without building a `Value`; anything unusual (an error
        // object, other types) takes the general path below, which decides as before.
        if let Ok(chunk) = serde_json::from_str::<FastChunk<'_>>(data)
            && chunk.error.is_none()
        {
            if let Some(choice) = chunk.choices.first() {
                if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_deref())
                    && !text.is_empty()
                {
                    out.push(Ok(GenerateEvent::Delta {
                        text: text.to_string(),
                    }));
                }
                if let Some(r) = choice.finish_reason.as_deref() {
                    self.finish_reason = Some(FinishReason::from_upstream(r));
                }
            }
            if let Some(u) = chunk.usage.and_then(FastUsage::usage) {
                self.usage = Some(u);
            }
            return;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                self.done = true;
                out.push(Err(BackendError::Upstream {
                    status: None,
                    message: format!("invalid JSON in upstream stream: {e}"),
                }));
                return;
            }
        };
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            self.done = true;
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| err.as_str().map(str::to_string))
                .unwrap_or_else(|| err.to_string());
            let status = err
                .get("code")
                .and_then(Value::as_u64)
                .filter(|c| (400..600).contains(c))
                .map(|c| c as u16);
            out.push(Err(BackendError::Upstream { status, message }));
            return;
        }
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str)
                && !text.is_empty()
            {
                out.push(Ok(GenerateEvent::Delta {
                    text: text.to_string(),
                }));
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(FinishReason::from_upstream(r));
            }
        }
        if let Some(u) = v.get("usage").and_then(parse_usage) {
            self.usage = Some(u);
        }
    }
}

/// Events for a non-streamed `chat.completion` object.
fn completion_events(v: &Value) -> Vec<Result<GenerateEvent, BackendError>> {
    let mut parser = SseChatParser::default();
    let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
        return vec![Err(BackendError::Upstream {
            status: None,
            message: "upstream completion has no choices".into(),
        })];
    };
    let mut events = Vec::new();
    if let Some(text) = choice.pointer("/message/content").and_then(Value::as_str)
        && !text.is_empty()
    {
        events.push(Ok(GenerateEvent::Delta {
            text: text.to_string(),
        }));
    }
    parser.finish_reason = Some(
        choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map_or(FinishReason::Stop, FinishReason::from_upstream),
    );
    parser.usage = v.get("usage").and_then(parse_usage);
    events.extend(parser.finish());
    events
}

impl LlmBackend for OpenAiProxyBackend {
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        let inner = self.inner.clone();
        let start = async move {
            let fail = error_stream;
            if params.messages.is_empty() {
                return fail(BackendError::BadRequest(
                    "messages must not be empty".into(),
                ));
            }
            let body = inner.chat_body(&params);
            let resp = match inner
                .post("chat/completions")
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return fail(inner.send_error(&e)),
            };
            let resp = match inner.check_status(resp).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let is_json = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/json"));
            if is_json {
                // The upstream ignored `stream: true` and sent one completion.
                let events = match resp.json::<Value>().await {
                    Ok(v) => completion_events(&v),
                    Err(e) => vec![Err(BackendError::Upstream {
                        status: None,
                        message: format!("invalid completion JSON: {}", error_chain(&e)),
                    })],
                };
                return stream::iter(events).boxed();
            }
            let bytes: BoxStream<'static, Result<Bytes, reqwest::Error>> =
                resp.bytes_stream().boxed();
            // State: (byte stream, parser, queued events, finished).
            stream::unfold(
                (
                    bytes,
                    SseChatParser::default(),
                    std::collections::VecDeque::new(),
                    inner,
                ),
                |(mut bytes, mut parser, mut queue, inner)| async move {
                    loop {
                        if let Some(ev) = queue.pop_front() {
                            return Some((ev, (bytes, parser, queue, inner)));
                        }
                        if parser.done {
                            return None;
                        }
                        match bytes.next().await {
                            Some(Ok(chunk)) => queue.extend(parser.feed(&chunk)),
                            Some(Err(e)) => {
                                parser.done = true;
                                let err = BackendError::Upstream {
                                    status: None,
                                    message: if e.is_timeout() {
                                        format!(
                                            "upstream {} sent nothing for {:?}",
                                            inner.api_base, inner.timeout
                                        )
                                    } else {
                                        format!("reading upstream stream: {}", error_chain(&e))
                                    },
                                };
                                queue.push_back(Err(err));
                            }
                            None => queue.extend(parser.finish()),
                        }
                    }
                },
            )
            .boxed()
        };
        stream::once(start).flatten().boxed()
    }

    /// The upstream's tokenizer is unknown, so this is an estimate: the larger
    /// of the word count and a quarter of the non-whitespace characters
    /// (about right for English BPE vocabularies).
    fn count_tokens(&self, text: &str) -> Result<usize, BackendError> {
        let words = text.split_whitespace().count();
        let chars = text.chars().filter(|c| !c.is_whitespace()).count();
        Ok(words.max(chars.div_ceil(4)))
    }

    fn context_length(&self) -> usize {
        self.inner.context_length
    }
}

impl EmbeddingBackend for OpenAiProxyBackend {
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if inputs.is_empty() {
                return Ok(Vec::new());
            }
            let n = inputs.len();
            let body = json!({"model": inner.model, "input": inputs});
            let resp = inner
                .post("embeddings")
                .timeout(inner.timeout)
                .json(&body)
                .send()
                .await
                .map_err(|e| inner.send_error(&e))?;
            let resp = inner.check_status(resp).await?;
            let bad = |m: String| BackendError::Upstream {
                status: None,
                message: m,
            };
            let v: Value = resp
                .json()
                .await
                .map_err(|e| bad(format!("invalid embeddings response: {}", error_chain(&e))))?;
            let data = v
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("embeddings response has no `data` array".into()))?;
            let mut rows: Vec<(usize, Vec<f32>)> = Vec::with_capacity(data.len());
            for (pos, item) in data.iter().enumerate() {
                let index = item
                    .get("index")
                    .and_then(Value::as_u64)
                    .map_or(pos, |i| i as usize);
                let emb = item
                    .get("embedding")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(format!("embeddings item {pos} has no `embedding` array")))?
                    .iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| {
                        bad(format!("embeddings item {pos} is not a list of numbers"))
                    })?;
                rows.push((index, emb));
            }
            rows.sort_by_key(|(i, _)| *i);
            if rows.len() != n || rows.iter().enumerate().any(|(i, (idx, _))| i != *idx) {
                return Err(bad(format!(
                    "upstream returned {} embeddings (indices {:?}) for {n} inputs",
                    rows.len(),
                    rows.iter().map(|r| r.0).collect::<Vec<_>>()
                )));
            }
            if let Some(dim) = rows.first().map(|r| r.1.len()) {
                inner.dimension.store(dim, Ordering::Relaxed);
            }
            Ok(rows.into_iter().map(|(_, e)| e).collect())
        })
    }

    fn dimension(&self) -> Option<usize> {
        match self.inner.dimension.load(Ordering::Relaxed) {
            0 => None,
            d => Some(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ChatMessage, Role};
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorded {
        chat: Vec<Value>,
        embeddings: Vec<Value>,
        auth: Vec<Option<String>>,
    }
    type Shared = Arc<Mutex<Recorded>>;

    fn sse(chunks: &[Value], done: bool) -> String {
        let mut s = String::new();
        for c in chunks {
            s.push_str(&format!("data: {c}\n\n"));
        }
        if done {
            s.push_str("data: [DONE]\n\n");
        }
        s
    }

    async fn chat(State(rec): State<Shared>, headers: HeaderMap, body: String) -> Response {
        let v: Value = serde_json::from_str(&body).unwrap();
        {
            let mut r = rec.lock().unwrap();
            r.chat.push(v.clone());
            r.auth.push(
                headers
                    .get("authorization")
                    .map(|h| h.to_str().unwrap().to_string()),
            );
        }
        match v["model"].as_str().unwrap() {
            "fail401" => (
                StatusCode::UNAUTHORIZED,
                [("content-type", "application/json")],
                r#"{"error":{"message":"Incorrect API key provided: sk-bad","type":"invalid_request_error","code":"invalid_api_key"}}"#,
            )
                .into_response(),
            "fail500" => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json")],
                r#"{"error":{"message":"model crashed","type":"server_error"}}"#,
            )
                .into_response(),
            "midstream-error" => (
                [("content-type", "text/event-stream")],
                sse(
                    &[
                        json!({"choices":[{"index":0,"delta":{"content":"par"}}]}),
                        json!({"error":{"message":"out of memory","code":500}}),
                    ],
                    false,
                ),
            )
                .into_response(),
            "nonstream" => axum::Json(json!({
                "id": "c2", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole answer"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            }))
            .into_response(),
            "truncated" => (
                [("content-type", "text/event-stream")],
                sse(&[json!({"choices":[{"index":0,"delta":{"content":"par"}}]})], false),
            )
                .into_response(),
            _ => {
                let text = sse(
                    &[
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}),
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}),
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo, "},"finish_reason":null}]}),
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"wörld"},"finish_reason":null}]}),
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}),
                        json!({"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}),
                    ],
                    true,
                );
                // Deliver in small pieces that split lines and a UTF-8 character.
                let bytes = text.into_bytes();
                let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                    bytes.chunks(7).map(|c| Ok(c.to_vec())).collect();
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(stream::iter(pieces)))
                    .unwrap()
            }
        }
    }

    async fn embeddings(State(rec): State<Shared>, body: String) -> Response {
        let v: Value = serde_json::from_str(&body).unwrap();
        rec.lock().unwrap().embeddings.push(v.clone());
        if v["model"] == "fail500" {
            return (StatusCode::INTERNAL_SERVER_ERROR, "plain text failure").into_response();
        }
        let inputs = v["input"].as_array().unwrap();
        // Reverse order on purpose: the client must sort by index.
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .rev()
            .map(|(i, s)| {
                let len = s.as_str().unwrap().len() as f64;
                json!({"object":"embedding","index":i,"embedding":[i as f64, len, 0.5]})
            })
            .collect();
        axum::Json(json!({"object":"list","data":data,"model":v["model"]})).into_response()
    }

    async fn upstream() -> (String, Shared) {
        let rec: Shared = Arc::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .with_state(rec.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/v1"), rec)
    }

    fn backend(base: &str, model: &str) -> OpenAiProxyBackend {
        let mut cfg = OpenAiProxyConfig::new(base, model);
        cfg.api_key = Some("sk-test-secret".into());
        cfg.timeout = Duration::from_secs(10);
        OpenAiProxyBackend::new(cfg).unwrap()
    }

    async fn collect(
        b: &OpenAiProxyBackend,
        p: GenerateParams,
    ) -> Vec<Result<GenerateEvent, BackendError>> {
        b.generate_stream(p).collect().await
    }

    fn params() -> GenerateParams {
        GenerateParams {
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "hi"),
                ChatMessage::new(Role::Assistant, "hello"),
                ChatMessage::new(Role::User, "again"),
            ],
            temperature: Some(0.0),
            top_p: Some(0.9),
            top_k: Some(40),
            max_new_tokens: Some(3),
            stop: vec!["\n\n".into(), "END".into()],
            seed: Some(1234),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.25),
        }
    }

    #[tokio::test]
    async fn sampling_params_reach_upstream_and_deltas_stream_in_order() {
        let (base, rec) = upstream().await;
        let b = backend(&base, "smollm2");
        let events = collect(&b, params()).await;
        let events: Vec<GenerateEvent> = events.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events,
            vec![
                GenerateEvent::Delta { text: "Hel".into() },
                GenerateEvent::Delta {
                    text: "lo, ".into()
                },
                GenerateEvent::Delta {
                    text: "wörld".into()
                },
                GenerateEvent::Finish {
                    finish_reason: FinishReason::Length,
                    usage: Some(Usage {
                        prompt_tokens: 11,
                        completion_tokens: 3,
                        total_tokens: 14
                    }),
                },
            ]
        );
        let r = rec.lock().unwrap();
        let body = &r.chat[0];
        assert_eq!(body["model"], "smollm2");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["temperature"], json!(0.0));
        assert_eq!(body["top_p"].as_f64().unwrap() as f32, 0.9);
        assert_eq!(body["top_k"], 40);
        assert_eq!(body["max_tokens"], 3);
        assert_eq!(body["seed"], 1234);
        assert_eq!(body["stop"], json!(["\n\n", "END"]));
        assert_eq!(body["presence_penalty"], json!(0.5));
        assert_eq!(body["frequency_penalty"], json!(-0.25));
        assert_eq!(
            body["messages"],
            json!([
                {"role":"system","content":"be brief"},
                {"role":"user","content":"hi"},
                {"role":"assistant","content":"hello"},
                {"role":"user","content":"again"},
            ])
        );
        assert_eq!(r.auth[0].as_deref(), Some("Bearer sk-test-secret"));
    }

    #[tokio::test]
    async fn unset_params_are_not_sent() {
        let (base, rec) = upstream().await;
        let b = backend(&base, "smollm2");
        let p = GenerateParams {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            ..Default::default()
        };
        let events = collect(&b, p).await;
        assert!(events.iter().all(Result::is_ok));
        let body = rec.lock().unwrap().chat[0].clone();
        for k in [
            "temperature",
            "top_p",
            "top_k",
            "max_tokens",
            "seed",
            "stop",
            "presence_penalty",
            "frequency_penalty",
        ] {
            assert!(body.get(k).is_none(), "{k} sent: {body}");
        }
    }

    #[tokio::test]
    async fn upstream_http_errors_carry_status_and_message() {
        let (base, _rec) = upstream().await;
        let events = collect(&backend(&base, "fail401"), params()).await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0],
            Err(BackendError::Upstream {
                status: Some(401),
                message: "Incorrect API key provided: sk-bad".into()
            })
        );
        let events = collect(&backend(&base, "fail500"), params()).await;
        assert_eq!(
            events,
            vec![Err(BackendError::Upstream {
                status: Some(500),
                message: "model crashed".into()
            })]
        );
    }

    #[tokio::test]
    async fn midstream_errors_and_truncated_streams() {
        let (base, _rec) = upstream().await;
        let events = collect(&backend(&base, "midstream-error"), params()).await;
        assert_eq!(events[0], Ok(GenerateEvent::Delta { text: "par".into() }));
        assert_eq!(
            events[1],
            Err(BackendError::Upstream {
                status: Some(500),
                message: "out of memory".into()
            })
        );
        assert_eq!(events.len(), 2);
        let events = collect(&backend(&base, "truncated"), params()).await;
        assert_eq!(events.len(), 2);
        assert!(matches!(
            &events[1],
            Err(BackendError::Upstream { status: None, .. })
        ));
    }

    #[tokio::test]
    async fn non_streamed_json_answer_is_accepted() {
        let (base, _rec) = upstream().await;
        // Used through the trait object, as the worker manager will.
        let b: Arc<dyn LlmBackend> = Arc::new(backend(&base, "nonstream"));
        let events: Vec<_> = b.generate_stream(params()).collect().await;
        assert_eq!(
            events,
            vec![
                Ok(GenerateEvent::Delta {
                    text: "whole answer".into()
                }),
                Ok(GenerateEvent::Finish {
                    finish_reason: FinishReason::Stop,
                    usage: Some(Usage::new(5, 2)),
                }),
            ]
        );
        let e: Arc<dyn EmbeddingBackend> = Arc::new(backend(&base, "m"));
        assert_eq!(e.embed(vec!["x".into()]).await.unwrap().len(), 1);
        assert_eq!(b.context_length(), 4096);
        assert!(b.count_tokens("hello there world").unwrap() >= 3);
    }

    #[tokio::test]
    async fn connection_refused_is_upstream_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let b = backend(&format!("http://{addr}/v1"), "m");
        let events = collect(&b, params()).await;
        assert!(
            matches!(&events[..], [Err(BackendError::Upstream { status: None, message })] if message.contains("connect")),
            "{events:?}"
        );
        let err = b.embed(vec!["x".into()]).await.unwrap_err();
        assert!(matches!(err, BackendError::Upstream { status: None, .. }));
    }

    #[tokio::test]
    async fn embeddings_are_ordered_by_index() {
        let (base, rec) = upstream().await;
        let b = backend(&base, "text-embedding-3-small");
        assert_eq!(b.dimension(), None);
        let inputs: Vec<String> = vec!["a".into(), "bbb".into(), "cc".into()];
        let out = b.embed(inputs).await.unwrap();
        assert_eq!(
            out,
            vec![
                vec![0.0, 1.0, 0.5],
                vec![1.0, 3.0, 0.5],
                vec![2.0, 2.0, 0.5]
            ]
        );
        assert_eq!(b.dimension(), Some(3));
        let body = rec.lock().unwrap().embeddings[0].clone();
        assert_eq!(
            body,
            json!({"model":"text-embedding-3-small","input":["a","bbb","cc"]})
        );
        let err = backend(&base, "fail500")
            .embed(vec!["x".into()])
            .await
            .unwrap_err();
        assert_eq!(
            err,
            BackendError::Upstream {
                status: Some(500),
                message: "plain text failure".into()
            }
        );
    }

    #[test]
    fn sse_parser_handles_split_lines_crlf_and_comments() {
        let mut p = SseChatParser::default();
        let text = ": keep-alive\r\n\r\nevent: message\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\ndata:{\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\ndata: {\"ignored\":true}\n";
        let mut events = Vec::new();
        for b in text.as_bytes() {
            events.extend(p.feed(std::slice::from_ref(b)));
        }
        events.extend(p.finish());
        assert_eq!(
            events,
            vec![
                Ok(GenerateEvent::Delta { text: "a".into() }),
                Ok(GenerateEvent::Delta { text: "b".into() }),
                Ok(GenerateEvent::Finish {
                    finish_reason: FinishReason::Stop,
                    usage: None
                }),
            ]
        );
    }

    /// Every event of `lines` fed as one SSE stream (`data: ` prefixed, then `finish`).
    fn events_of(lines: &[&str]) -> Vec<Result<GenerateEvent, BackendError>> {
        let mut p = SseChatParser::default();
        let mut events = Vec::new();
        for l in lines {
            events.extend(p.feed(format!("data: {l}\n\n").as_bytes()));
        }
        events.extend(p.finish());
        events
    }

    #[test]
    fn sse_chunks_typed_and_unusual() {
        // Escapes, unicode, null content, usage: the typed path.
        let e = events_of(&[
            r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":"a\n\"b\" \u00e9"}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            e,
            vec![
                Ok(GenerateEvent::Delta {
                    text: "a\n\"b\" é".into()
                }),
                Ok(GenerateEvent::Finish {
                    finish_reason: FinishReason::Length,
                    usage: Some(Usage::new(3, 2)),
                }),
            ]
        );
        // Usage without prompt_tokens is ignored; content that is not a string (the
        // general path) is skipped; a stream without [DONE] ends at its finish_reason.
        let e = events_of(&[
            r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}]}}],"usage":{"completion_tokens":1}}"#,
            r#"{"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}"#,
        ]);
        assert_eq!(
            e,
            vec![
                Ok(GenerateEvent::Delta { text: "ok".into() }),
                Ok(GenerateEvent::Finish {
                    finish_reason: FinishReason::Stop,
                    usage: None,
                }),
            ]
        );
        // An error object ends the stream with its message and status.
        let e = events_of(&[
            r#"{"choices":[{"delta":{"content":"a"}}]}"#,
            r#"{"error":{"message":"overloaded","code":503}}"#,
        ]);
        assert_eq!(
            e,
            vec![
                Ok(GenerateEvent::Delta { text: "a".into() }),
                Err(BackendError::Upstream {
                    status: Some(503),
                    message: "overloaded".into()
                }),
            ]
        );
        // A null error is no error.
        assert_eq!(
            events_of(&[
                r#"{"error":null,"choices":[{"delta":{"content":"z"},"finish_reason":"stop"}]}"#,
                "[DONE]"
            ]),
            vec![
                Ok(GenerateEvent::Delta { text: "z".into() }),
                Ok(GenerateEvent::Finish {
                    finish_reason: FinishReason::Stop,
                    usage: None,
                }),
            ]
        );
    }

    #[test]
    fn error_message_extraction() {
        let s = reqwest::StatusCode::BAD_REQUEST;
        assert_eq!(
            upstream_error_message(s, r#"{"error":{"message":"m1"}}"#),
            "m1"
        );
        assert_eq!(upstream_error_message(s, r#"{"error":"m2"}"#), "m2");
        assert_eq!(upstream_error_message(s, r#"{"detail":"m3"}"#), "m3");
        assert_eq!(upstream_error_message(s, "  plain  "), "plain");
        assert_eq!(upstream_error_message(s, ""), "Bad Request");
    }

    #[test]
    fn config_debug_redacts_key_and_bad_base_is_rejected() {
        let mut c = OpenAiProxyConfig::new("http://127.0.0.1:1/v1", "m");
        c.api_key = Some("sk-very-secret".into());
        assert!(!format!("{c:?}").contains("sk-very-secret"));
        assert!(OpenAiProxyBackend::new(OpenAiProxyConfig::new("not a url", "m")).is_err());
        assert!(OpenAiProxyBackend::new(OpenAiProxyConfig::new("ftp://x/v1", "m")).is_err());
    }
}
