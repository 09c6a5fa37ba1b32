//! Calls to worker managers: DB-GPT's `/api/worker/generate_stream`, `/generate` and
//! `/embeddings`, over pooled keep-alive HTTP/1.1 connections ([`super::pool`], one pool per
//! serving thread). Workers are always plain HTTP, so the client is hyper's own rather than
//! reqwest, whose redirect and URL handling cost more than the rest of a request.
//!
//! Each call picks an instance through the routing policy. If the instance cannot be reached,
//! answers 5xx, sends no response headers within the first-byte timeout (a frozen worker; our
//! workers answer their headers once the model produced its first event, for `generate` as
//! for `generate_stream`), or its stream fails before the first frame, the failure is recorded
//! against the instance (outlier detection, [`super::outlier`], which also triggers a
//! discovery refresh) and the call is retried on another instance, at most `max_retries`
//! more times; any answer from a worker is recorded as a success. A worker that has answered but is slow is not
//! retried: waiting longer than the request timeout for the first frame (or a whole
//! non-stream answer) is a 504. A worker's 400 or 413 is the client's error (a prompt longer
//! than the model's context, a body over the cap): every instance would refuse it, so it is
//! final ([`UpstreamError::Refused`]). Streams are read frame by frame (JSON + NUL, cumulative `text`) as they arrive;
//! dropping a [`FrameStream`] closes the connection, which cancels the worker's generation.
//!
//! Our workers also have native OpenAI routes ([`Upstream::native`]): the client's body goes
//! to them unchanged and their answer comes back as it is. A worker that answers those
//! routes with a plain 404 (DB-GPT's own) is remembered as such
//! ([`Discovery::mark_legacy`]) and the request takes DB-GPT's worker API instead
//! ([`Native::Legacy`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tracing::Instrument;

use super::discovery::{self, Discovery, Group, Instance, Lookup};
use super::policy::{self, InFlight, RoutingPolicy};
use super::pool::{self, Target};
use crate::http::error_chain;
use crate::telemetry::otlp;
use crate::tracer::{SpanCtx, TRACE_HEADER};
use crate::wire::controller::worker_key;
use crate::wire::worker::{
    EMBEDDINGS_PATH, Frame, GENERATE_PATH, GENERATE_STREAM_PATH, MalformedFrame, WorkerType,
    is_route_missing, next_frame, parse_frame,
};

pub use super::pool::WorkerHttp;

/// A pooled keep-alive client for worker calls: 3 s to connect, `TCP_NODELAY`, idle
/// connections kept 90 s (up to 256 per worker). Its connections are driven by tasks on
/// the runtime that opened them, so each serving thread builds its own.
pub fn worker_client() -> WorkerHttp {
    WorkerHttp::new(Duration::from_secs(3), Duration::from_secs(90), 256)
}

/// Why a worker call failed. The apiserver answers each case in OpenAI's shape
/// ([`crate::openai::OpenAiError`]'s `From`); the relay itself knows no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No instance of the model is registered (a discovery refresh was requested).
    #[error("the model `{model}` does not exist")]
    UnknownModel {
        model: String,
        /// The models of the same worker type that are available.
        available: Vec<String>,
    },
    /// The model is registered, but no instance can take requests now.
    #[error("no healthy instance of model `{model}` is available right now")]
    NoneRoutable { model: String },
    /// No instance could be tried.
    #[error("no instance of model `{model}` could take the request")]
    NoInstance { model: String },
    /// Every instance tried failed in a way worth retrying, the retry budget is spent.
    #[error("every worker tried for model `{model}` failed ({tried} tried); last: {last}")]
    Exhausted {
        model: String,
        tried: usize,
        last: String,
    },
    /// The worker did not answer (status line, or a whole answer) within the request timeout.
    #[error("the worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker refused the request itself (HTTP 400 or 413): the client's error, which
    /// every instance would refuse too. `detail` is the worker's message.
    #[error("the worker refused the request (HTTP {status}): {detail}")]
    Refused { status: u16, detail: String },
    /// The worker answered another non-5xx error status.
    #[error("the worker rejected the request (HTTP {status}): {body}")]
    Rejected { status: u16, body: String },
    /// A stream was silent for the idle timeout.
    #[error("the worker sent nothing for {0:?}")]
    Idle(Duration),
    /// The connection broke while reading the answer.
    #[error("the connection to the worker failed: {0}")]
    Broken(String),
    /// A frame was not a ModelOutput.
    #[error(transparent)]
    Malformed(#[from] MalformedFrame),
    /// An embeddings answer was not a list of vectors.
    #[error("the worker's embeddings answer is not a list of vectors: {0}")]
    NotVectors(String),
    /// A stream failed after its first frame (the client already has a 200).
    #[error("the worker stream broke: {0}")]
    MidStream(Box<UpstreamError>),
    /// Every instance tried was overloaded (HTTP 503 with `Retry-After`: its slots and wait
    /// queue full); `retry_after` is the last one's advice in seconds.
    #[error("every worker tried for model `{model}` is overloaded ({tried} tried); last: {last}")]
    Overloaded {
        model: String,
        tried: usize,
        last: String,
        retry_after: u32,
    },
}

/// Why an attempt failed.
enum Attempt {
    /// Try another instance (the failure counts towards this one's ejection); the reason is
    /// for the log and the final error.
    Retry(String),
    /// The instance is healthy but full (503 with `Retry-After`): try another one; neither a
    /// failure nor a success.
    Busy { reason: String, retry_after: u32 },
    /// Give up with this error.
    Fail(UpstreamError),
}

/// What a worker's native OpenAI route gave.
pub enum Native {
    /// The worker's answer: a success, or a 4xx about the request (the worker's or its
    /// upstream's verdict, which every instance would give), to be relayed as it is.
    Answer(NativeAnswer),
    /// The instance the policy chose has no native routes (a DB-GPT worker): use DB-GPT's
    /// API, starting with that instance (so the policy's choice stands). `None` when the
    /// request cannot go to such a worker (it has fields DB-GPT's API cannot carry) and no
    /// other instance could take it.
    Legacy(Option<Arc<Instance>>),
}

/// A worker's native answer: its head, and its body still to come (or already read, for an
/// error status).
pub struct NativeAnswer {
    pub status: http::StatusCode,
    pub content_type: Option<http::HeaderValue>,
    pub body: NativeBody,
    pub guard: InFlight,
}

pub enum NativeBody {
    Stream(pool::Body),
    Whole(Bytes),
}

/// What a call that ran out of instances answers: none could be tried, or every one tried
/// failed (`last` is the last failure; empty when none was tried).
fn out_of_instances(model: &str, tried: usize, last: String, busy: Option<u32>) -> UpstreamError {
    let model = model.to_string();
    if let Some(retry_after) = busy {
        UpstreamError::Overloaded {
            model,
            tried,
            last,
            retry_after,
        }
    } else if last.is_empty() {
        UpstreamError::NoInstance { model }
    } else {
        UpstreamError::Exhausted { model, tried, last }
    }
}

/// The worker-facing side of the apiserver.
#[derive(Clone)]
pub struct Upstream {
    pub http: WorkerHttp,
    pub discovery: Arc<Discovery>,
    pub policy: RoutingPolicy,
    pub max_retries: u32,
    pub timeout: Duration,
    /// How long an LLM call waits for the worker's response headers before the instance is
    /// treated as frozen and the call moves on (at most `timeout`).
    pub first_byte_timeout: Duration,
    /// Retries are counted here.
    pub metrics: Arc<crate::telemetry::metrics::apiserver::ApiMetrics>,
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
    fn take_frame(&mut self) -> Option<Result<Frame, UpstreamError>> {
        let piece = next_frame(&mut self.buf)?;
        Some(parse_frame(&piece).map_err(UpstreamError::from))
    }

    /// The next frame; `None` at the end of the body. The errors are
    /// [`UpstreamError::Idle`], [`UpstreamError::Broken`] and [`UpstreamError::Malformed`].
    pub async fn next(&mut self) -> Option<Result<Frame, UpstreamError>> {
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
                return Some(parse_frame(&rest).map_err(UpstreamError::from));
            }
            match tokio::time::timeout(self.idle_timeout, self.body.frame()).await {
                Err(_) => {
                    self.ended = true;
                    self.buf.clear();
                    return Some(Err(UpstreamError::Idle(self.idle_timeout)));
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
                    return Some(Err(UpstreamError::Broken(error_chain(&e))));
                }
            }
        }
    }
}

/// Whether a final error is the worker's answer (its verdict on the request): a success
/// for outlier detection. A timeout or a malformed answer counts neither way.
fn answered(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Refused { .. } | UpstreamError::Rejected { .. }
    )
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

/// The message of a worker's `{"detail": "…"}` error body (else the body's start).
/// A full worker's advice: `Retry-After` seconds on a 503 or 429 (an overloaded model).
fn retry_after<B>(resp: &http::Response<B>) -> Option<u32> {
    if !matches!(
        resp.status(),
        http::StatusCode::SERVICE_UNAVAILABLE | http::StatusCode::TOO_MANY_REQUESTS
    ) {
        return None;
    }
    resp.headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn detail(b: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Detail {
        detail: String,
    }
    match serde_json::from_slice::<Detail>(b) {
        Ok(d) => d.detail,
        Err(_) => snippet(b),
    }
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(300)]);
    s.trim().to_string()
}

impl Upstream {
    /// Records a failed call to `inst` for outlier detection (and counts an ejection it
    /// causes).
    pub fn failed(&self, model: &str, inst: &Instance, reason: &str) {
        if self.discovery.record_failure(inst, reason).is_some() {
            self.metrics.ejected(model);
        }
    }

    /// A worker that answers with the draining header is stopping: choose others from now.
    fn note_draining(&self, inst: &Instance, headers: &http::HeaderMap) {
        if headers.contains_key(&crate::http::DRAINING_HEADER) {
            self.discovery.mark_draining(inst);
        }
    }

    /// Resolves `name@worker_type` to its group or the right 404/503. A miss refreshes the
    /// view once first ([`Discovery::refresh_after_miss`]), so a model registered a moment
    /// ago is found.
    pub async fn group(
        &self,
        model: &str,
        worker_type: WorkerType,
    ) -> Result<Arc<Group>, UpstreamError> {
        let key = worker_key(model, worker_type.as_str());
        let mut found = self.discovery.lookup(&key);
        if matches!(found, Lookup::Unknown) && self.discovery.refresh_after_miss().await {
            found = self.discovery.lookup(&key);
        }
        match found {
            Lookup::Found(g) => Ok(g),
            Lookup::NoneRoutable => Err(UpstreamError::NoneRoutable {
                model: model.to_string(),
            }),
            Lookup::Unknown => Err(UpstreamError::UnknownModel {
                model: model.to_string(),
                available: self.discovery.view().models(worker_type),
            }),
        }
    }

    /// Runs `attempt` on instances of `model`'s `group` (as resolved by [`Upstream::group`]
    /// when the request was validated) chosen by the policy until one succeeds, a
    /// non-retryable error occurs or the retry budget is spent.
    async fn with_retries<T, F, Fut>(
        &self,
        model: &str,
        (group, mut first): (&Group, Option<Arc<Instance>>),
        attempt: F,
    ) -> Result<T, UpstreamError>
    where
        F: Fn(InFlight) -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::new();
        let mut busy = None;
        for _ in 0..=self.max_retries {
            // The instance the policy already chose for this request (see `Native::Legacy`).
            let chosen = first
                .take()
                .or_else(|| policy::choose(self.policy, &self.discovery, group, &tried));
            let Some(inst) = chosen else {
                break;
            };
            tried.push(inst.addr.clone());
            let span = otlp::worker_call(model, &inst.addr);
            match attempt(InFlight::new(inst.clone())).instrument(span).await {
                Ok(v) => {
                    self.discovery.record_success(&inst);
                    return Ok(v);
                }
                Err(Attempt::Fail(e)) => {
                    if answered(&e) {
                        self.discovery.record_success(&inst);
                    }
                    return Err(e);
                }
                Err(Attempt::Retry(reason)) => {
                    self.metrics.retried(model);
                    self.failed(model, &inst, &reason);
                    last = format!("worker {} failed: {reason}", inst.addr);
                    busy = None;
                }
                Err(Attempt::Busy {
                    reason,
                    retry_after,
                }) => {
                    last = format!("worker {} is overloaded: {reason}", inst.addr);
                    busy = Some(retry_after);
                }
            }
        }
        Err(out_of_instances(model, tried.len(), last, busy))
    }

    /// POSTs `req` and waits for the status line and headers, bounded by the first-byte
    /// timeout (a 5xx, an unreachable worker or one silent for the first-byte timeout may be
    /// retried elsewhere; the request timeout, when it is the shorter, or another non-2xx is
    /// final).
    async fn send(
        &self,
        target: &Target,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<pool::Body>, Attempt> {
        let wait = self.first_byte_timeout.min(self.timeout);
        match tokio::time::timeout(wait, self.send_unbounded(target, req)).await {
            Ok(r) => r,
            Err(_) if wait < self.timeout => Err(Attempt::Retry(format!(
                "no response within the first-byte timeout ({wait:?})"
            ))),
            Err(_) => Err(self.no_answer()),
        }
    }

    fn no_answer(&self) -> Attempt {
        Attempt::Fail(UpstreamError::Timeout(self.timeout))
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
            .map_err(|e| Attempt::Retry(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let busy_for = retry_after(&resp);
        // The error body (bounded by the caller's timeout).
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if let Some(retry_after) = busy_for {
            return Err(Attempt::Busy {
                reason: format!("HTTP {status}: {}", snippet(&body)),
                retry_after,
            });
        }
        if status.is_server_error() {
            return Err(Attempt::Retry(format!("HTTP {status}: {}", snippet(&body))));
        }
        if matches!(
            status,
            http::StatusCode::BAD_REQUEST | http::StatusCode::PAYLOAD_TOO_LARGE
        ) {
            return Err(Attempt::Fail(UpstreamError::Refused {
                status: status.as_u16(),
                detail: detail(&body),
            }));
        }
        Err(Attempt::Fail(UpstreamError::Rejected {
            status: status.as_u16(),
            body: snippet(&body),
        }))
    }

    /// A POST of a JSON body to a worker, naming the caller's span `trace` in DB-GPT's
    /// `DB-GPT-Trace-Span-Id` header, and the current OTLP span in `traceparent`, so the
    /// worker continues the trace.
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
        if let Some(t) = otlp::traceparent() {
            h.insert(otlp::TRACEPARENT.clone(), t);
        }
        req
    }

    /// Opens `generate_stream` and waits for the first frame (retrying other instances on
    /// failures before it).
    pub async fn open_stream(
        &self,
        model: &str,
        route: (&Group, Option<Arc<Instance>>),
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<(Frame, FrameStream), UpstreamError> {
        self.with_retries(model, route, |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let req = self.post(target, GENERATE_STREAM_PATH, body, trace);
                let resp = self.send(target, req).await?;
                self.note_draining(guard.instance(), resp.headers());
                let mut fs = FrameStream {
                    body: resp.into_body(),
                    buf: BytesMut::new(),
                    ended: false,
                    idle_timeout: self.timeout,
                    guard,
                };
                match fs.next().await {
                    Some(Ok(f)) => Ok((f, fs)),
                    // A silent worker is slow, not broken: not retried.
                    Some(Err(e @ UpstreamError::Idle(_))) => Err(Attempt::Fail(e)),
                    Some(Err(e)) => Err(Attempt::Retry(e.to_string())),
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
    /// read may be retried elsewhere). With `first_byte`, the headers are also bounded by
    /// the first-byte timeout ([`Upstream::send`]; for `generate`, whose headers come when
    /// the model has started, not when the answer is complete).
    async fn post_and_read(
        &self,
        (inst, target): (&Instance, &Target),
        path: &'static str,
        body: Bytes,
        trace: Option<SpanCtx>,
        first_byte: bool,
    ) -> Result<Bytes, Attempt> {
        let req = self.post(target, path, body, trace);
        // One timer for the whole call: it first bounds the headers (by the first-byte
        // timeout when asked and shorter), then is moved out to the request deadline.
        let start = tokio::time::Instant::now();
        let first = if first_byte {
            self.first_byte_timeout.min(self.timeout)
        } else {
            self.timeout
        };
        let timer = tokio::time::sleep_until(start + first);
        tokio::pin!(timer);
        let resp = tokio::select! {
            biased;
            r = self.send_unbounded(target, req) => r?,
            _ = &mut timer => {
                return Err(if first < self.timeout {
                    Attempt::Retry(format!("no response within the first-byte timeout ({first:?})"))
                } else {
                    self.no_answer()
                });
            }
        };
        self.note_draining(inst, resp.headers());
        if first < self.timeout {
            timer.as_mut().reset(start + self.timeout);
        }
        tokio::select! {
            biased;
            b = resp.into_body().collect() => match b {
                Err(e) => Err(Attempt::Retry(error_chain(&e))),
                Ok(b) => Ok(b.to_bytes()),
            },
            _ = &mut timer => Err(self.no_answer()),
        }
    }

    /// POSTs the client's OpenAI `body` to a worker's native route `path` and waits for the
    /// answer's head (bounded by the first-byte timeout), retrying other instances as
    /// [`Upstream::open_stream`] does. A 4xx other than a missing route or a model the
    /// instance does not run is the answer. An instance without the routes (known, or found
    /// out now) ends it with [`Native::Legacy`] when `legacy_ok`, else is passed over.
    pub async fn native(
        &self,
        model: &str,
        group: &Group,
        (path, body): (&'static str, &Bytes),
        legacy_ok: bool,
        trace: Option<SpanCtx>,
    ) -> Result<Native, UpstreamError> {
        self.native_excluding(model, group, (path, body), legacy_ok, trace, Vec::new())
            .await
    }

    /// [`Upstream::native`] on instances other than those in `tried` (addresses): a stream
    /// moving away from instances that failed it ([`super::failover`]).
    pub async fn native_excluding(
        &self,
        model: &str,
        group: &Group,
        (path, body): (&'static str, &Bytes),
        legacy_ok: bool,
        trace: Option<SpanCtx>,
        mut tried: Vec<String>,
    ) -> Result<Native, UpstreamError> {
        let excluded = tried.len();
        let mut last = String::new();
        let mut passed_over = false;
        let mut busy = None;
        for _ in 0..=self.max_retries {
            let Some(inst) = policy::choose(self.policy, &self.discovery, group, &tried) else {
                break;
            };
            tried.push(inst.addr.clone());
            if self.discovery.is_legacy(&inst) {
                if legacy_ok {
                    return Ok(Native::Legacy(Some(inst)));
                }
                passed_over = true;
                continue;
            }
            let guard = InFlight::new(inst.clone());
            let span = otlp::worker_call(model, &inst.addr);
            let once = self.native_once(guard, path, body, trace).instrument(span);
            let failed = match once.await {
                Ok(Some(answer)) => {
                    self.discovery.record_success(&inst);
                    return Ok(Native::Answer(answer));
                }
                Ok(None) => {
                    self.discovery.record_success(&inst);
                    self.discovery.mark_legacy(&inst);
                    if legacy_ok {
                        return Ok(Native::Legacy(Some(inst)));
                    }
                    passed_over = true;
                    continue;
                }
                Err(Attempt::Fail(e)) => {
                    if answered(&e) {
                        self.discovery.record_success(&inst);
                    }
                    return Err(e);
                }
                Err(Attempt::Retry(reason)) => reason,
                Err(Attempt::Busy {
                    reason,
                    retry_after,
                }) => {
                    last = format!("worker {} is overloaded: {reason}", inst.addr);
                    busy = Some(retry_after);
                    continue;
                }
            };
            self.failed(model, &inst, &failed);
            last = format!("worker {} failed: {failed}", inst.addr);
            busy = None;
        }
        if passed_over && last.is_empty() {
            return Ok(Native::Legacy(None));
        }
        Err(out_of_instances(model, tried.len() - excluded, last, busy))
    }

    /// One native call: `Ok(None)` when the instance has no such route.
    async fn native_once(
        &self,
        guard: InFlight,
        path: &'static str,
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Option<NativeAnswer>, Attempt> {
        let target = endpoint(guard.instance())?;
        let req = self.post(target, path, body.clone(), trace);
        let wait = self.first_byte_timeout.min(self.timeout);
        let resp = match tokio::time::timeout(wait, self.http.request(target, req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Attempt::Retry(error_chain(&e))),
            Err(_) if wait < self.timeout => {
                return Err(Attempt::Retry(format!(
                    "no response within the first-byte timeout ({wait:?})"
                )));
            }
            Err(_) => return Err(self.no_answer()),
        };
        self.note_draining(guard.instance(), resp.headers());
        let status = resp.status();
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
        let busy_for = retry_after(&resp);
        let answer = |body, guard| NativeAnswer {
            status,
            content_type,
            body,
            guard,
        };
        if status.is_success() {
            return Ok(Some(answer(NativeBody::Stream(resp.into_body()), guard)));
        }
        let bytes = match tokio::time::timeout(self.timeout, resp.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Err(Attempt::Retry(error_chain(&e))),
            Err(_) => return Err(self.no_answer()),
        };
        if is_route_missing(status.as_u16(), &bytes) {
            return Ok(None);
        }
        if let Some(retry_after) = busy_for {
            return Err(Attempt::Busy {
                reason: format!("HTTP {status}: {}", snippet(&bytes)),
                retry_after,
            });
        }
        // 5xx (the worker, or its upstream unreachable) and 404 (the model is not running on
        // this instance any more) are worth another instance; any other 4xx is the answer.
        if status.is_server_error() || status == http::StatusCode::NOT_FOUND {
            return Err(Attempt::Retry(format!(
                "HTTP {status}: {}",
                snippet(&bytes)
            )));
        }
        Ok(Some(answer(NativeBody::Whole(bytes), guard)))
    }

    /// `generate` (non-stream): the final frame.
    pub async fn generate(
        &self,
        model: &str,
        route: (&Group, Option<Arc<Instance>>),
        body: &Bytes,
        trace: Option<SpanCtx>,
    ) -> Result<Frame, UpstreamError> {
        self.with_retries(model, route, |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let bytes = self
                    .post_and_read(
                        (guard.instance().as_ref(), target),
                        GENERATE_PATH,
                        body,
                        trace,
                        true,
                    )
                    .await?;
                drop(guard);
                parse_frame(&bytes).map_err(|e| Attempt::Fail(e.into()))
            }
        })
        .await
    }

    /// `embeddings` for one batch: `[[f32…]…]`, or a reranker's `[[score…]]` with `query`.
    /// `worker_type` is the type `group` was found under; a `reranker` says so in the body
    /// (DB-GPT 0.7's workers look the model up by it; 0.5's ignore it).
    pub async fn embeddings(
        &self,
        model: &str,
        (group, worker_type): (&Group, WorkerType),
        first: Option<Arc<Instance>>,
        input: &[String],
        query: Option<&str>,
        trace: Option<SpanCtx>,
    ) -> Result<Vec<Vec<f32>>, UpstreamError> {
        let mut req = serde_json::json!({"model": model, "input": input});
        if let Some(q) = query {
            req["query"] = Value::String(q.to_string());
        }
        if worker_type != WorkerType::Text2vec {
            req["worker_type"] = Value::String(worker_type.as_str().to_string());
        }
        let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
        self.with_retries(model, (group, first), |guard| {
            let body = body.clone();
            async move {
                let target = endpoint(guard.instance())?;
                let bytes = self
                    .post_and_read(
                        (guard.instance(), target),
                        EMBEDDINGS_PATH,
                        body,
                        trace,
                        false,
                    )
                    .await?;
                serde_json::from_slice::<Vec<Vec<f32>>>(&bytes)
                    .map_err(|_| Attempt::Fail(UpstreamError::NotVectors(snippet(&bytes))))
            }
        })
        .await
    }
}
