//! Calls to worker managers: DB-GPT's `/api/worker/generate_stream`, `/generate` and
//! `/embeddings`, over pooled keep-alive HTTP/1.1 connections ([`super::pool`], one pool per
//! serving thread). Workers are always plain HTTP, so the client is hyper's own rather than
//! reqwest, whose redirect and URL handling cost more than the rest of a request.
//!
//! Each call picks an instance through the routing policy. If the instance cannot be reached,
//! answers 5xx, or its stream fails before the first frame, the instance is marked suspect
//! (which also triggers a discovery refresh) and the call is retried on another instance, at
//! most `max_retries` more times. A worker that answers but is slow is not retried: waiting
//! longer than the request timeout for the first frame (or a whole non-stream answer) is a
//! 504. Streams are read frame by frame (JSON + NUL, cumulative `text`) as they arrive;
//! dropping a [`FrameStream`] closes the connection, which cancels the worker's generation.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::discovery::{self, Discovery, Group, Lookup};
use super::openai::{OpenAiError, Usage};
use super::policy::{self, InFlight, RoutingPolicy};
use super::pool::{self, Target};
use crate::tracer::{SpanCtx, TRACE_HEADER};
use crate::types::{WORKER_EMBEDDINGS, WORKER_GENERATE, WORKER_GENERATE_STREAM};

pub use super::pool::WorkerHttp;

/// A pooled keep-alive client for worker calls: 3 s to connect, `TCP_NODELAY`, idle
/// connections kept 90 s (up to 256 per worker). Its connections are driven by tasks on
/// the runtime that opened them, so each serving thread builds its own.
pub fn worker_client() -> WorkerHttp {
    WorkerHttp::new(Duration::from_secs(3), Duration::from_secs(90), 256)
}

/// A short reason for a failed worker call (connection refused, reset, …), with the
/// causes that add something.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    crate::controller::client::with_causes(e.to_string(), e)
}

/// One frame of a worker's output (DB-GPT's ModelOutput, the fields we use).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// Cumulative text so far (the error message when `error_code != 0`).
    pub text: String,
    pub error_code: i64,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// ModelOutput as it arrives; unknown keys (`model_context`, `metrics`, …) are skipped.
#[derive(serde::Deserialize)]
struct RawFrame {
    #[serde(default)]
    text: Option<String>,
    /// DB-GPT 0.7+ calls `text` `content`.
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    error_code: Option<Value>,
    #[serde(default)]
    finish_reason: Option<Value>,
    #[serde(default)]
    usage: LenientUsage,
}

/// A frame's `usage`: the token counts when it is an object (missing or non-integer counts
/// are 0), nothing for any other value — read without building a map.
#[derive(Default)]
struct LenientUsage(Option<Usage>);

impl<'de> serde::Deserialize<'de> for LenientUsage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LenientUsage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object or any other value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<LenientUsage, A::Error> {
                let mut u = Usage::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "prompt_tokens" => &mut u.prompt_tokens,
                        "completion_tokens" => &mut u.completion_tokens,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<Value>()?.as_u64().unwrap_or(0);
                }
                Ok(LenientUsage(Some(u)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<LenientUsage, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(LenientUsage(None))
            }
            fn visit_unit<E>(self) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_none<E>(self) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<LenientUsage, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_bool<E>(self, _: bool) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl Frame {
    fn from_raw(r: RawFrame) -> Frame {
        let text = match (r.text, r.content) {
            (Some(t), _) => t,
            (None, Some(Value::String(c))) => c,
            _ => String::new(),
        };
        let usage = r.usage.0;
        Frame {
            text,
            error_code: r.error_code.as_ref().and_then(Value::as_i64).unwrap_or(0),
            finish_reason: match r.finish_reason {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                _ => None,
            },
            usage,
        }
    }

    /// Reads a ModelOutput.
    pub fn from_json(v: &Value) -> Option<Frame> {
        if !v.is_object() {
            return None;
        }
        serde_json::from_value::<RawFrame>(v.clone())
            .ok()
            .map(Frame::from_raw)
    }
}

/// Why an attempt failed.
enum Attempt {
    /// Try another instance (this one is marked suspect).
    Retry(String),
    /// Give up with this error.
    Fail(OpenAiError),
}

/// The worker-facing side of the apiserver.
#[derive(Clone)]
pub struct Upstream {
    pub http: WorkerHttp,
    pub discovery: Arc<Discovery>,
    pub policy: RoutingPolicy,
    pub max_retries: u32,
    pub timeout: Duration,
}

/// A worker's stream of frames, read as bytes arrive.
pub struct FrameStream {
    body: pool::Body,
    buf: BytesMut,
    ended: bool,
    idle_timeout: Duration,
    pub guard: InFlight,
}

impl FrameStream {
    fn take_frame(&mut self) -> Option<Result<Frame, String>> {
        loop {
            let pos = self.buf.iter().position(|&b| b == 0)?;
            let piece = self.buf.split_to(pos + 1);
            let piece = &piece[..pos];
            if piece.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(parse_frame(piece));
        }
    }

    /// The next frame; `None` at the end of the body.
    pub async fn next(&mut self) -> Option<Result<Frame, String>> {
        loop {
            if let Some(f) = self.take_frame() {
                return Some(f);
            }
            if self.ended {
                // A last frame without its NUL terminator.
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let rest = self.buf.split();
                return Some(parse_frame(&rest));
            }
            match tokio::time::timeout(self.idle_timeout, self.body.frame()).await {
                Err(_) => {
                    self.ended = true;
                    self.buf.clear();
                    return Some(Err(format!(
                        "the worker sent nothing for {:?}",
                        self.idle_timeout
                    )));
                }
                Ok(None) => self.ended = true,
                Ok(Some(Ok(f))) => {
                    if let Some(b) = f.data_ref() {
                        self.buf.extend_from_slice(b)
                    }
                }
                Ok(Some(Err(e))) => {
                    self.ended = true;
                    self.buf.clear();
                    return Some(Err(format!(
                        "the connection to the worker failed: {}",
                        describe(&e)
                    )));
                }
            }
        }
    }
}

fn parse_frame(piece: &[u8]) -> Result<Frame, String> {
    serde_json::from_slice::<RawFrame>(piece)
        .ok()
        .map(Frame::from_raw)
        .ok_or_else(|| {
            format!(
                "the worker sent a malformed frame: {}",
                String::from_utf8_lossy(&piece[..piece.len().min(200)])
            )
        })
}

/// The instance's pre-parsed address (a host that makes no valid URL is a failed attempt,
/// so the request moves on to another instance).
fn endpoint(inst: &discovery::Instance) -> Result<&Target, Attempt> {
    match &inst.target {
        Some(t) => Ok(t),
        None => Err(Attempt::Retry(format!(
            "its address {} does not make a valid URL",
            inst.base_url
        ))),
    }
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(300)]);
    s.trim().to_string()
}

impl Upstream {
    /// Resolves `name@worker_type` to its group or the right 404/503.
    pub fn group(&self, model: &str, worker_type: &str) -> Result<Arc<Group>, OpenAiError> {
        let key = crate::types::worker_key(model, worker_type);
        match self.discovery.lookup(&key) {
            Lookup::Found(g) => Ok(g),
            Lookup::NoneRoutable => Err(OpenAiError::unavailable(format!(
                "no healthy instance of model `{model}` is available right now"
            ))),
            Lookup::Unknown => {
                self.discovery.request_refresh();
                Err(OpenAiError::model_not_found(
                    model,
                    &self.discovery.view().models(worker_type),
                ))
            }
        }
    }

    /// Runs `attempt` on instances of `model`'s `group` (as resolved by [`Upstream::group`]
    /// when the request was validated) chosen by the policy until one succeeds, a
    /// non-retryable error occurs or the retry budget is spent.
    async fn with_retries<T, F, Fut>(
        &self,
        model: &str,
        group: &Group,
        attempt: F,
    ) -> Result<T, OpenAiError>
    where
        F: Fn(InFlight) -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::new();
        for _ in 0..=self.max_retries {
            let Some(inst) = policy::choose(self.policy, &self.discovery, group, &tried) else {
                break;
            };
            tried.push(inst.addr.clone());
            match attempt(InFlight::new(inst.clone())).await {
                Ok(v) => return Ok(v),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => {
                    self.discovery.mark_suspect(&inst, &reason);
                    last = format!("worker {} failed: {reason}", inst.addr);
                }
            }
        }
        Err(OpenAiError::bad_gateway(if last.is_empty() {
            format!("no instance of model `{model}` could take the request")
        } else {
            format!(
                "every worker tried for model `{model}` failed ({} tried); last: {last}",
                tried.len()
            )
        }))
    }

    /// POSTs `req` and waits for the status line and headers, bounded by the request
    /// timeout (a 5xx or an unreachable worker may be retried elsewhere; a timeout or
    /// another non-2xx is final).
    async fn send(
        &self,
        target: &Target,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<pool::Body>, Attempt> {
        match tokio::time::timeout(self.timeout, self.send_unbounded(target, req)).await {
            Ok(r) => r,
            Err(_) => Err(self.no_answer()),
        }
    }

    fn no_answer(&self) -> Attempt {
        Attempt::Fail(OpenAiError::gateway_timeout(format!(
            "the worker did not answer within {:?}",
            self.timeout
        )))
    }

    /// [`Upstream::send`] without the timeout (the caller bounds it).
    async fn send_unbounded(
        &self,
        target: &Target,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<pool::Body>, Attempt> {
        let resp = self
            .http
            .request(target, req)
            .await
            .map_err(|e| Attempt::Retry(describe(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // The error body (bounded by the caller's timeout).
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_server_error() {
            return Err(Attempt::Retry(format!("HTTP {status}: {}", snippet(&body))));
        }
        Err(Attempt::Fail(OpenAiError::bad_gateway(format!(
            "the worker rejected the request (HTTP {}): {}",
            status.as_u16(),
            snippet(&body)
        ))))
    }

    /// A POST of a JSON body to a worker, naming the caller's span `trace` in DB-GPT's
    /// `DB-GPT-Trace-Span-Id` header so the worker continues the trace.
    fn post(
        &self,
        target: &Target,
        path: &'static str,
        body: Bytes,
        trace: Option<SpanCtx>,
    ) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(path);
        let h = req.headers_mut();
        h.insert(http::header::HOST, target.host_header().clone());
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(t) = trace {
            h.insert(TRACE_HEADER.clone(), t.header_value());
        }
        req
    }

    /// Opens `generate_stream` and waits for the first frame (retrying other instances on
    /// failures before it).
    pub async fn open_stream(
        &self,
        model: &str,
        group: &Group,
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<(Frame, FrameStream), OpenAiError> {
        self.with_retries(model, group, |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let req = self.post(target, WORKER_GENERATE_STREAM, body, trace);
                let resp = self.send(target, req).await?;
                let mut fs = FrameStream {
                    body: resp.into_body(),
                    buf: BytesMut::new(),
                    ended: false,
                    idle_timeout: self.timeout,
                    guard,
                };
                match fs.next().await {
                    Some(Ok(f)) => Ok((f, fs)),
                    Some(Err(e)) if e.starts_with("the worker sent nothing") => {
                        Err(Attempt::Fail(OpenAiError::gateway_timeout(e)))
                    }
                    Some(Err(e)) => Err(Attempt::Retry(e)),
                    None => Err(Attempt::Retry(
                        "the worker closed the stream without output".into(),
                    )),
                }
            }
        })
        .await
    }

    /// POSTs a JSON `body` to a worker route and reads the whole answer, the two together
    /// bounded by the request timeout (one timer per call; a timeout is final, a broken
    /// read may be retried elsewhere).
    async fn post_and_read(
        &self,
        target: &Target,
        path: &'static str,
        body: Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Bytes, Attempt> {
        let req = self.post(target, path, body, trace);
        let call = async {
            let resp = self.send_unbounded(target, req).await?;
            match resp.into_body().collect().await {
                Err(e) => Err(Attempt::Retry(describe(&e))),
                Ok(b) => Ok(b.to_bytes()),
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(self.no_answer()),
        }
    }

    /// `generate` (non-stream): the final frame.
    pub async fn generate(
        &self,
        model: &str,
        group: &Group,
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Frame, OpenAiError> {
        self.with_retries(model, group, |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let bytes = self
                    .post_and_read(target, WORKER_GENERATE, body, trace)
                    .await?;
                drop(guard);
                parse_frame(&bytes).map_err(|e| Attempt::Fail(OpenAiError::bad_gateway(e)))
            }
        })
        .await
    }

    /// `embeddings` for one batch: `[[f32…]…]`, or a reranker's `[[score…]]` with `query`.
    pub async fn embeddings(
        &self,
        model: &str,
        group: &Group,
        input: &[String],
        query: Option<&str>,
        trace: Option<SpanCtx>,
    ) -> Result<Vec<Vec<f32>>, OpenAiError> {
        let mut req = serde_json::json!({"model": model, "input": input});
        if let Some(q) = query {
            req["query"] = Value::String(q.to_string());
        }
        let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
        self.with_retries(model, group, |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let bytes = self
                    .post_and_read(target, WORKER_EMBEDDINGS, body, trace)
                    .await?;
                serde_json::from_slice::<Vec<Vec<f32>>>(&bytes).map_err(|_| {
                    Attempt::Fail(OpenAiError::bad_gateway(format!(
                        "the worker's embeddings answer is not a list of vectors: {}",
                        snippet(&bytes)
                    )))
                })
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_from_dbgpt_and_ours() {
        let f = Frame::from_json(&serde_json::json!({"text": "Hi", "error_code": 0, "incremental": false, "model_context": null, "finish_reason": null, "usage": null})).unwrap();
        assert_eq!(f.text, "Hi");
        assert_eq!(f.finish_reason, None);
        let f = Frame::from_json(&serde_json::json!({"text": "Hi!", "error_code": 0, "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})).unwrap();
        assert_eq!(f.finish_reason.as_deref(), Some("length"));
        assert_eq!(f.usage.unwrap().completion_tokens, 2);
        assert!(parse_frame(b"not json").is_err());
        // usage: counts from an object (extra keys skipped, odd counts 0), nothing otherwise.
        let u = |usage: &str| {
            parse_frame(format!(r#"{{"text":"x","usage":{usage}}}"#).as_bytes())
                .unwrap()
                .usage
        };
        let both = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        assert_eq!(
            u(r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"x":{"y":[1]}}"#),
            both(3, 2)
        );
        assert_eq!(
            u(r#"{"prompt_tokens":1.5,"completion_tokens":"2"}"#),
            both(0, 0)
        );
        assert_eq!(u("{}"), both(0, 0));
        for other in ["null", "\"n/a\"", "[1,2]", "7", "true"] {
            assert_eq!(u(other), None, "{other}");
        }
        assert_eq!(parse_frame(br#"{"text":"x"}"#).unwrap().usage, None);
        // The same through a Value (Frame::from_json).
        let f =
            Frame::from_json(&serde_json::json!({"text": "x", "usage": {"completion_tokens": 4}}))
                .unwrap();
        assert_eq!(f.usage, both(0, 4));
    }
}
