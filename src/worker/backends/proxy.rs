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
//!
//! The upstream is never waited on without a bound ([`ProxyTimeouts`]): connecting, the
//! first byte of an answer, and every silence between two chunks of a stream (or while a
//! non-streamed body arrives). A timeout ends the stream with an error naming the upstream
//! (its URL without credentials or query) and the timeout that fired.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{Map, Value, json};

use crate::http::error_chain;
use crate::telemetry::{Escaped, otlp};
use tracing::Instrument;

use super::{
    BackendError, EmbeddingBackend, FinishReason, GenerateEvent, GenerateParams, LlmBackend,
    OpenAiPassthrough, Passthrough, Usage, error_stream,
};
use crate::openai::raw::{ModelField, with_model};

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
    /// How long the upstream may take to connect, to start answering, and to go silent.
    pub timeouts: ProxyTimeouts,
    /// Context window reported by [`LlmBackend::context_length`] (the upstream
    /// does not say; DB-GPT reports 4096 for proxies).
    pub context_length: usize,
    /// Embedding dimension, if known in advance (otherwise learned from the
    /// first successful call).
    pub dimension: Option<usize>,
}

/// The bounds on waiting for an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyTimeouts {
    /// Establishing the connection (TCP and TLS).
    pub connect: Duration,
    /// From sending a request to the first byte of the answer: the response head and,
    /// for a stream, its first chunk (the upstream's queueing and prompt processing).
    pub first_byte: Duration,
    /// The longest silence between two chunks of a stream once it started; also the
    /// bound on reading a non-streamed body (an embeddings answer, an error body).
    pub between_chunks: Duration,
}

impl Default for ProxyTimeouts {
    /// Connect 10 s, first byte 120 s, between chunks 60 s.
    fn default() -> Self {
        ProxyTimeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(120),
            between_chunks: Duration::from_secs(60),
        }
    }
}

/// Which of the [`ProxyTimeouts`] fired.
#[derive(Debug, Clone, Copy)]
enum Waited {
    FirstByte,
    BetweenChunks,
}

impl OpenAiProxyConfig {
    /// Defaults: key from env, [`ProxyTimeouts::default`], context 4096.
    pub fn new(api_base: impl Into<String>, backend_model: impl Into<String>) -> Self {
        OpenAiProxyConfig {
            api_base: api_base.into(),
            api_key: None,
            backend_model: backend_model.into(),
            timeouts: ProxyTimeouts::default(),
            context_length: 4096,
            dimension: None,
        }
    }
}

/// Redacts the key.
impl std::fmt::Debug for OpenAiProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProxyConfig")
            .field("api_base", &shown_api_base(&self.api_base))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("backend_model", &self.backend_model)
            .field("timeouts", &self.timeouts)
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
    /// Built at load, which checks the settings; a thread whose own client cannot be built
    /// falls back to it.
    client: reqwest::Client,
    /// One client per calling thread: a client's pooled connections are driven by tasks on
    /// the runtime that opened them, so a shared one made each serving thread's streams
    /// wake the thread that first connected, for every event (see the worker's
    /// `serve_on_threads`).
    per_thread: thread_local::ThreadLocal<reqwest::Client>,
    connect_timeout: std::time::Duration,
    api_base: String,
    /// The upstream URLs of the OpenAI endpoints, parsed once (a string URL is parsed on
    /// every request).
    urls: Vec<(&'static str, reqwest::Url)>,
    /// `api_base` without credentials or query: what errors and logs name.
    shown_base: String,
    api_key: Option<String>,
    model: String,
    timeouts: ProxyTimeouts,
    context_length: usize,
    /// 0 = unknown.
    dimension: AtomicUsize,
}

impl std::fmt::Debug for OpenAiProxyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProxyBackend")
            .field("api_base", &self.inner.shown_base)
            .field("model", &self.inner.model)
            .finish_non_exhaustive()
    }
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

/// An `api_base` as logs may show it (see [`shown_url`]); unparsable ones as they are.
pub(crate) fn shown_api_base(api_base: &str) -> String {
    reqwest::Url::parse(api_base.trim()).map_or_else(|_| api_base.to_string(), shown_url)
}

/// `url` as errors and logs may show it: without user, password, query or fragment.
fn shown_url(mut url: reqwest::Url) -> String {
    // Only fails for URLs that cannot have credentials (no host), which have none to hide.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.as_str().trim_end_matches('/').to_string()
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
        let shown_base = shown_url(url);
        // Only the connect timeout is the client's: the first-byte and between-chunk
        // bounds differ, so each wait below carries its own.
        let connect = config.timeouts.connect;
        let client = crate::http::build_client(|b| b.connect_timeout(connect)).map_err(|e| {
            BackendError::load(&shown_base, format!("HTTP client: {}", error_chain(&e)))
        })?;
        let api_key = config
            .api_key
            .or_else(|| std::env::var("OPENAI_API_KEY").ok())
            .filter(|k| !k.is_empty());
        tracing::info!(
            api_base = %Escaped(&shown_base),
            model = %Escaped(&config.backend_model),
            has_key = api_key.is_some(),
            "OpenAI-compatible proxy backend ready"
        );
        Ok(OpenAiProxyBackend {
            inner: Arc::new(Inner {
                client,
                per_thread: thread_local::ThreadLocal::new(),
                connect_timeout: connect,
                urls: ["chat/completions", "completions", "embeddings"]
                    .into_iter()
                    .filter_map(|p| Some((p, format!("{base}/{p}").parse().ok()?)))
                    .collect(),
                api_base: base,
                shown_base,
                api_key,
                model: config.backend_model,
                timeouts: config.timeouts,
                context_length: config.context_length,
                dimension: AtomicUsize::new(config.dimension.unwrap_or(0)),
            }),
        })
    }
}

impl Inner {
    /// This thread's client (built like the one checked at load; that one if building
    /// fails).
    fn client(&self) -> &reqwest::Client {
        self.per_thread.get_or(|| {
            crate::http::build_client(|b| b.connect_timeout(self.connect_timeout))
                .unwrap_or_else(|_| self.client.clone())
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let client = self.client();
        let rb = match self.urls.iter().find(|(p, _)| *p == path) {
            Some((_, url)) => client.post(url.clone()),
            None => client.post(format!("{}/{}", self.api_base, path)),
        };
        let rb = match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        };
        // The current span is the upstream call's (see `otlp::upstream_call`).
        match otlp::traceparent() {
            Some(t) => rb.header(&otlp::TRACEPARENT, t),
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

    /// A failed send. reqwest's own text names the full URL, credentials included: it
    /// is dropped in favour of [`Inner::shown_base`].
    fn send_error(&self, e: reqwest::Error) -> BackendError {
        let base = &self.shown_base;
        let message = if e.is_connect() && e.is_timeout() {
            format!(
                "cannot connect to upstream {base}: no connection within {:?} (connect timeout)",
                self.timeouts.connect
            )
        } else if e.is_connect() {
            let e = e.without_url();
            format!("cannot connect to upstream {base}: {}", error_chain(&e))
        } else {
            let e = e.without_url();
            format!("request to upstream {base} failed: {}", error_chain(&e))
        };
        BackendError::Upstream {
            status: None,
            message,
        }
    }

    /// The upstream said nothing for as long as `waited` allows.
    fn timed_out(&self, waited: Waited) -> BackendError {
        let base = &self.shown_base;
        let message = match waited {
            Waited::FirstByte => format!(
                "upstream {base} did not start answering within {:?} (first-byte timeout)",
                self.timeouts.first_byte
            ),
            Waited::BetweenChunks => format!(
                "upstream {base} went silent for {:?} (between-chunk timeout)",
                self.timeouts.between_chunks
            ),
        };
        BackendError::Upstream {
            status: None,
            message,
        }
    }

    /// Sends `rb`; the answer's head must arrive by `deadline` (the first-byte bound).
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::Response, BackendError> {
        match tokio::time::timeout_at(deadline, rb.send()).await {
            Ok(Ok(resp)) => self.check_status(resp).await,
            Ok(Err(e)) => Err(self.send_error(e)),
            Err(_) => Err(self.timed_out(Waited::FirstByte)),
        }
    }

    /// Reads a whole non-streamed body, bounded by the between-chunk timeout.
    async fn body_json(&self, resp: reqwest::Response, what: &str) -> Result<Value, BackendError> {
        match tokio::time::timeout(self.timeouts.between_chunks, resp.json::<Value>()).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BackendError::Upstream {
                status: None,
                message: format!("invalid {what}: {}", error_chain(&e.without_url())),
            }),
            Err(_) => Err(self.timed_out(Waited::BetweenChunks)),
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
        // An error body that never finishes must not hold the request either.
        let body = tokio::time::timeout(self.timeouts.between_chunks, resp.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let message = upstream_error_message(status, &body);
        tracing::warn!(
            api_base = %Escaped(&self.shown_base),
            status = status.as_u16(),
            message = %Escaped(&message),
            "upstream error"
        );
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
        let span = otlp::upstream_call("chat/completions", &inner.shown_base);
        let start = async move {
            let fail = error_stream;
            if params.messages.is_empty() {
                return fail(BackendError::BadRequest(
                    "messages must not be empty".into(),
                ));
            }
            let body = inner.chat_body(&params);
            let first_byte = tokio::time::Instant::now() + inner.timeouts.first_byte;
            let request = inner
                .post("chat/completions")
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .json(&body);
            let resp = match inner.send(request, first_byte).await {
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
                let events = match inner.body_json(resp, "completion JSON").await {
                    Ok(v) => completion_events(&v),
                    Err(e) => vec![Err(e)],
                };
                return stream::iter(events).boxed();
            }
            let bytes: BoxStream<'static, Result<Bytes, reqwest::Error>> =
                resp.bytes_stream().boxed();
            // State: (byte stream, parser, queued events, the first chunk's deadline
            // until it arrived, backend).
            stream::unfold(
                (
                    bytes,
                    SseChatParser::default(),
                    std::collections::VecDeque::new(),
                    Some(first_byte),
                    inner,
                ),
                |(mut bytes, mut parser, mut queue, mut first, inner)| async move {
                    loop {
                        if let Some(ev) = queue.pop_front() {
                            return Some((ev, (bytes, parser, queue, first, inner)));
                        }
                        if parser.done {
                            return None;
                        }
                        let (deadline, waited) = match first.take() {
                            Some(d) => (d, Waited::FirstByte),
                            None => (
                                tokio::time::Instant::now() + inner.timeouts.between_chunks,
                                Waited::BetweenChunks,
                            ),
                        };
                        match tokio::time::timeout_at(deadline, bytes.next()).await {
                            Ok(Some(Ok(chunk))) => queue.extend(parser.feed(&chunk)),
                            Ok(Some(Err(e))) => {
                                parser.done = true;
                                queue.push_back(Err(BackendError::Upstream {
                                    status: None,
                                    message: format!(
                                        "reading the stream of upstream {}: {}",
                                        inner.shown_base,
                                        error_chain(&e.without_url())
                                    ),
                                }));
                            }
                            Ok(None) => queue.extend(parser.finish()),
                            Err(_) => {
                                parser.done = true;
                                queue.push_back(Err(inner.timed_out(waited)));
                            }
                        }
                    }
                },
            )
            .boxed()
        };
        stream::once(start.instrument(span)).flatten().boxed()
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

    fn passthrough(&self) -> Option<&dyn OpenAiPassthrough> {
        Some(self)
    }
}

impl OpenAiPassthrough for OpenAiProxyBackend {
    fn forward(
        &self,
        path: &'static str,
        body: Bytes,
        model: ModelField,
    ) -> BoxFuture<'static, Result<Passthrough, BackendError>> {
        let inner = self.inner.clone();
        let span = otlp::upstream_call(path, &inner.shown_base);
        let held = span.clone();
        let call = async move {
            let body = with_model(&body, &model, &inner.model);
            let first_byte = tokio::time::Instant::now() + inner.timeouts.first_byte;
            let request = inner
                .post(path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            // Every status is relayed as the upstream said it, errors included.
            let resp = match tokio::time::timeout_at(first_byte, request.send()).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => return Err(inner.send_error(e)),
                Err(_) => return Err(inner.timed_out(Waited::FirstByte)),
            };
            let status = resp.status().as_u16();
            if status >= 400 {
                tracing::warn!(
                    api_base = %Escaped(&inner.shown_base),
                    status,
                    "upstream answered an error status (relayed as is)"
                );
            }
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = resp.bytes_stream().boxed();
            let body = Relayed {
                timer: Box::pin(tokio::time::sleep(inner.timeouts.between_chunks)),
                last: tokio::time::Instant::now(),
                bytes,
                inner: Some(inner),
                _span: held,
            }
            .boxed();
            Ok(Passthrough {
                status,
                content_type,
                body,
            })
        };
        Box::pin(call.instrument(span))
    }
}

impl EmbeddingBackend for OpenAiProxyBackend {
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>> {
        let inner = self.inner.clone();
        let span = otlp::upstream_call("embeddings", &inner.shown_base);
        let call = async move {
            if inputs.is_empty() {
                return Ok(Vec::new());
            }
            let n = inputs.len();
            let body = json!({"model": inner.model, "input": inputs});
            let first_byte = tokio::time::Instant::now() + inner.timeouts.first_byte;
            let resp = inner
                .send(inner.post("embeddings").json(&body), first_byte)
                .await?;
            let bad = |m: String| BackendError::Upstream {
                status: None,
                message: m,
            };
            let v = inner.body_json(resp, "embeddings response").await?;
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
        };
        Box::pin(call.instrument(span))
    }

    fn dimension(&self) -> Option<usize> {
        match self.inner.dimension.load(Ordering::Relaxed) {
            0 => None,
            d => Some(d),
        }
    }

    /// The upstream's tokenizer is not here, so the proxy cannot count: an error. Its
    /// embeddings answers carry the upstream's own `usage`, passed through.
    fn count_tokens(&self, _texts: &[String]) -> Result<usize, BackendError> {
        Err(BackendError::internal(
            "the proxy backend cannot count the upstream model's tokens",
        ))
    }

    fn passthrough(&self) -> Option<&dyn OpenAiPassthrough> {
        Some(self)
    }
}

/// A passthrough answer with the between-chunks bound. Its timer is armed once: a chunk only
/// notes its time, and the timer, when it fires early, re-arms itself from the last chunk
/// (a `timeout` around every chunk would update the timer wheel per chunk).
struct Relayed {
    bytes: BoxStream<'static, reqwest::Result<Bytes>>,
    /// `None` once the body ended or failed.
    inner: Option<Arc<Inner>>,
    last: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The upstream call's span ends with its body.
    _span: tracing::Span,
}

impl futures::Stream for Relayed {
    type Item = Result<Bytes, BackendError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        let Some(inner) = &this.inner else {
            return Poll::Ready(None);
        };
        match this.bytes.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.last = tokio::time::Instant::now();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = BackendError::Upstream {
                    status: None,
                    message: format!(
                        "reading the answer of upstream {}: {}",
                        inner.shown_base,
                        error_chain(&e.without_url())
                    ),
                };
                this.inner = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                std::task::ready!(this.timer.as_mut().poll(cx));
                let due = this.last + inner.timeouts.between_chunks;
                if tokio::time::Instant::now() >= due {
                    let e = inner.timed_out(Waited::BetweenChunks);
                    this.inner = None;
                    return Poll::Ready(Some(Err(e)));
                }
                this.timer.as_mut().reset(due);
            },
        }
    }
}

#[cfg(test)]
mod tests;
