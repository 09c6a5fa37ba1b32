//! Calls to worker managers: DB-GPT's `/api/worker/generate_stream`, `/generate` and
//! `/embeddings`, over one pooled keep-alive reqwest client.
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
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use super::discovery::{Discovery, Lookup};
use super::openai::{OpenAiError, Usage};
use super::policy::{self, InFlight};
use crate::config::RoutingPolicy;
use crate::controller::client::describe;
use crate::tracer::{SpanCtx, TRACE_HEADER};

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
    usage: Option<Value>,
}

impl Frame {
    fn from_raw(r: RawFrame) -> Frame {
        let text = match (r.text, r.content) {
            (Some(t), _) => t,
            (None, Some(Value::String(c))) => c,
            _ => String::new(),
        };
        let usage = r.usage.as_ref().and_then(Value::as_object).map(|u| {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            }
        });
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
    pub http: reqwest::Client,
    pub discovery: Arc<Discovery>,
    pub policy: RoutingPolicy,
    pub max_retries: u32,
    pub timeout: Duration,
}

/// A worker's stream of frames, read as bytes arrive.
pub struct FrameStream {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
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
            match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
                Err(_) => {
                    self.ended = true;
                    self.buf.clear();
                    return Some(Err(format!(
                        "the worker sent nothing for {:?}",
                        self.idle_timeout
                    )));
                }
                Ok(None) => self.ended = true,
                Ok(Some(Ok(b))) => self.buf.extend_from_slice(&b),
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

/// One of the instance's pre-parsed worker URLs (a host that makes no valid URL is a
/// failed attempt, so the request moves on to another instance).
fn endpoint(
    inst: &super::discovery::Instance,
    pick: impl Fn(&super::discovery::Endpoints) -> &reqwest::Url,
) -> Result<reqwest::Url, Attempt> {
    match &inst.endpoints {
        Some(e) => Ok(pick(e).clone()),
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
    pub fn group(
        &self,
        model: &str,
        worker_type: &str,
    ) -> Result<Arc<super::discovery::Group>, OpenAiError> {
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

    /// Runs `attempt` on instances chosen by the policy until one succeeds, a non-retryable
    /// error occurs or the retry budget is spent.
    async fn with_retries<T, F, Fut>(
        &self,
        model: &str,
        worker_type: &str,
        attempt: F,
    ) -> Result<T, OpenAiError>
    where
        F: Fn(InFlight) -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let group = self.group(model, worker_type)?;
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::new();
        for _ in 0..=self.max_retries {
            let Some(inst) = policy::choose(self.policy, &self.discovery, &group, &tried) else {
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

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Attempt> {
        let resp = match tokio::time::timeout(self.timeout, req.send()).await {
            Err(_) => {
                return Err(Attempt::Fail(OpenAiError::gateway_timeout(format!(
                    "the worker did not answer within {:?}",
                    self.timeout
                ))));
            }
            Ok(Err(e)) => return Err(Attempt::Retry(describe(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_server_error() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(Attempt::Retry(format!("HTTP {status}: {}", snippet(&body))));
        }
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(Attempt::Fail(OpenAiError::bad_gateway(format!(
                "the worker rejected the request (HTTP {}): {}",
                status.as_u16(),
                snippet(&body)
            ))));
        }
        Ok(resp)
    }

    /// A POST of a JSON body to a worker, naming the caller's span `trace` in DB-GPT's
    /// `DB-GPT-Trace-Span-Id` header so the worker continues the trace.
    fn post(
        &self,
        url: reqwest::Url,
        body: Bytes,
        trace: Option<SpanCtx>,
    ) -> reqwest::RequestBuilder {
        let req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        match trace {
            Some(t) => req.header(TRACE_HEADER.clone(), t.header_value()),
            None => req,
        }
    }

    /// Opens `generate_stream` and waits for the first frame (retrying other instances on
    /// failures before it).
    pub async fn open_stream(
        &self,
        model: &str,
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<(Frame, FrameStream), OpenAiError> {
        self.with_retries(model, super::discovery::LLM, |guard| {
            let body = body.clone();
            async move {
                let url = endpoint(guard.instance(), |e| &e.generate_stream)?;
                let req = self.post(url, body, trace);
                let resp = self.send(req).await?;
                let mut fs = FrameStream {
                    body: resp.bytes_stream().boxed(),
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

    /// POSTs a JSON `body` to a worker route and reads the whole answer, bounded by the
    /// request timeout (a timeout is final, a broken read may be retried elsewhere).
    async fn post_and_read(
        &self,
        url: reqwest::Url,
        body: Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Bytes, Attempt> {
        let req = self.post(url, body, trace);
        let resp = self.send(req).await?;
        match tokio::time::timeout(self.timeout, resp.bytes()).await {
            Err(_) => Err(Attempt::Fail(OpenAiError::gateway_timeout(format!(
                "the worker did not finish within {:?}",
                self.timeout
            )))),
            Ok(Err(e)) => Err(Attempt::Retry(describe(&e))),
            Ok(Ok(b)) => Ok(b),
        }
    }

    /// `generate` (non-stream): the final frame.
    pub async fn generate(
        &self,
        model: &str,
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Frame, OpenAiError> {
        self.with_retries(model, super::discovery::LLM, |guard| {
            let body = body.clone();
            async move {
                let url = endpoint(guard.instance(), |e| &e.generate)?;
                let bytes = self.post_and_read(url, body, trace).await?;
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
        input: &[String],
        query: Option<&str>,
        trace: Option<SpanCtx>,
    ) -> Result<Vec<Vec<f32>>, OpenAiError> {
        let mut req = serde_json::json!({"model": model, "input": input});
        if let Some(q) = query {
            req["query"] = Value::String(q.to_string());
        }
        let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
        self.with_retries(model, super::discovery::TEXT2VEC, |guard| {
            let body = body.clone();
            async move {
                let url = endpoint(guard.instance(), |e| &e.embeddings)?;
                let bytes = self.post_and_read(url, body, trace).await?;
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
    }
}
