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

use crate::http::error_chain;

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
mod tests;
