//! Mid-stream failover: a worker's native SSE stream relayed event by event, and moved to
//! another instance of the model when the worker dies (the connection resets or ends before
//! `data: [DONE]`) or stalls (silent for the stall timeout) before the stream's end.
//!
//! The relay forwards whole events only (never half an event before an error), notes the
//! chunks' envelope (`id`, `created`, `model`) and the text of choice 0. On a failure it
//! records it against the instance (outlier detection) and, when the stream may be continued
//! ([`continuation::blocker`], no tool call or other non-text delta seen, migrations left),
//! sends the continuation request ([`continuation::request`]: the client's request with the
//! text so far as an open assistant message) to another instance through
//! [`Upstream::native_excluding`], and relays what follows with the first stream's envelope
//! and without a second `role`: the client sees one stream. When it cannot continue, the
//! stream ends with an OpenAI error event and no `[DONE]`, as an OpenAI client expects of a
//! failed stream; a failure after the finish chunk only completes the stream (`[DONE]`),
//! unless the usage chunk the client asked for is missing. DB-GPT workers have no
//! continuation: they are never chosen for one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::discovery::Group;
use super::pool;
use super::proxy::{Native, NativeAnswer, NativeBody};
use super::{Shared, tokio_stream_from};
use crate::http::{error_chain, sse_response};
use crate::openai::OpenAiError;
use crate::openai::continuation::{self, Envelope, Event};
use crate::openai::response::{DONE, sse};
use crate::tracer::SpanCtx;

/// The failover flags (`--max_stream_migrations`, `--stream_stall_timeout_secs`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Migrations allowed per stream; 0 = failover off.
    pub max_migrations: u32,
    /// The longest silence inside a continuable stream.
    pub stall: Duration,
}

/// The request a relayed stream answers.
pub(super) struct Request {
    pub model: String,
    pub group: Arc<Group>,
    pub path: &'static str,
    /// The client's body (what a continuation extends).
    pub body: Bytes,
    /// Why this stream cannot be continued (`None`: it can).
    pub blocker: Option<String>,
    pub include_usage: bool,
    pub trace: Option<SpanCtx>,
    /// The name every chunk's `model` gets instead of the worker's (an alias served by its
    /// target, [`super::aliases`]).
    pub rename: Option<String>,
}

/// Whether a worker's answer is an SSE stream the relay should carry.
pub(super) fn is_stream(a: &NativeAnswer) -> bool {
    a.status.is_success()
        && matches!(a.body, NativeBody::Stream(_))
        && a.content_type
            .as_ref()
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"))
}

/// Relays `first` (a stream answer, see [`is_stream`]) to the client, holding `guards` until
/// the stream ends.
pub(super) fn relay<G: Send + 'static>(
    s: Shared,
    req: Request,
    first: NativeAnswer,
    guards: G,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _guards = guards;
        tokio::select! {
            _ = run(&s, req, first, &tx) => {}
            _ = tx.closed() => debug!("client went away; cancelling the worker stream"),
        }
    });
    sse_response(Body::from_stream(
        tokio_stream_from(rx).map(Ok::<Bytes, std::convert::Infallible>),
    ))
}

/// What the client has been sent of choice 0.
#[derive(Default)]
struct Sent {
    envelope: Envelope,
    text: String,
    finished: bool,
    usage: bool,
    not_text: bool,
    /// The worker sent an error event: its verdict is final.
    worker_error: bool,
}

/// How a worker's stream ended.
enum End {
    /// `data: [DONE]` was relayed: the stream is complete.
    Done,
    /// The client went away.
    Gone,
    /// The worker failed (this is why).
    Failed(String),
}

async fn run(s: &Shared, req: Request, first: NativeAnswer, tx: &mpsc::Sender<Bytes>) {
    let settings = s.failover;
    let continuable = req.blocker.is_none() && settings.max_migrations > 0;
    // A stream that is not continued keeps the request timeout as its bound on silence
    // (a tool call is held back until complete, which may take a while).
    let stall = if continuable {
        settings.stall.min(s.upstream.timeout)
    } else {
        s.upstream.timeout
    };
    let NativeBody::Stream(mut body) = first.body else {
        return;
    };
    let mut guard = first.guard;
    let mut tried = vec![guard.instance().addr.clone()];
    let mut sent = Sent::default();
    let mut migrations = 0u32;
    loop {
        let rename = req.rename.as_deref();
        let failure = match pass(&mut body, stall, (migrations > 0, rename), &mut sent, tx).await {
            End::Done | End::Gone => return,
            End::Failed(why) => why,
        };
        if sent.worker_error {
            return;
        }
        s.upstream.failed(&req.model, guard.instance(), &failure);
        if sent.finished {
            // The text is complete; only the end is missing.
            if req.include_usage && !sent.usage {
                fail(
                    tx,
                    format!("the stream broke off before its usage chunk: {failure}"),
                )
                .await;
            } else {
                let _ = tx.send(Bytes::from_static(DONE)).await;
            }
            return;
        }
        let why_not = if let Some(b) = &req.blocker {
            Some(b.clone())
        } else if settings.max_migrations == 0 {
            Some("mid-stream failover is off (--max_stream_migrations 0)".into())
        } else if sent.not_text {
            Some("a stream that is not plain text (a tool call) is not continued".into())
        } else if migrations >= settings.max_migrations {
            Some(format!(
                "it already moved {migrations} times (--max_stream_migrations)"
            ))
        } else {
            None
        };
        if let Some(why) = why_not {
            fail(tx, format!("the worker stream broke: {failure}; {why}")).await;
            return;
        }
        migrations += 1;
        let Some(cont) = continuation::request(&req.body, &sent.text) else {
            fail(tx, format!("the worker stream broke: {failure}")).await;
            return;
        };
        info!(
            model = %crate::telemetry::Escaped(&req.model),
            from = %crate::telemetry::Escaped(&guard.instance().addr),
            migration = migrations,
            chars = sent.text.chars().count(),
            reason = %crate::telemetry::Escaped(&failure),
            "continuing a broken stream on another instance"
        );
        s.metrics.failed_over(&req.model);
        let next = s
            .upstream
            .native_excluding(
                &req.model,
                &req.group,
                (req.path, &cont),
                false,
                req.trace,
                tried.clone(),
            )
            .await;
        match next {
            Ok(Native::Answer(a)) if is_stream(&a) => {
                let NativeBody::Stream(b) = a.body else {
                    unreachable!("is_stream checked the body")
                };
                body = b;
                guard = a.guard;
                tried.push(guard.instance().addr.clone());
            }
            Ok(Native::Answer(a)) => {
                let detail = match a.body {
                    NativeBody::Whole(b) => String::from_utf8_lossy(&b[..b.len().min(300)])
                        .trim()
                        .to_string(),
                    NativeBody::Stream(_) => "an answer that is not a stream".into(),
                };
                warn!(status = %a.status, "the continuation was refused");
                fail(
                    tx,
                    format!(
                        "the worker stream broke ({failure}) and its continuation was refused (HTTP {}): {detail}",
                        a.status.as_u16()
                    ),
                )
                .await;
                return;
            }
            Ok(Native::Legacy(_)) => {
                fail(
                    tx,
                    format!(
                        "the worker stream broke ({failure}) and no other instance can continue it (DB-GPT workers cannot)"
                    ),
                )
                .await;
                return;
            }
            Err(e) => {
                fail(
                    tx,
                    format!("the worker stream broke ({failure}) and could not be continued: {e}"),
                )
                .await;
                return;
            }
        }
    }
}

/// Relays one worker's stream until it ends; `continued` when it is a continuation (its
/// chunks get the first stream's envelope); `rename`: the `model` every chunk gets.
async fn pass(
    body: &mut pool::Body,
    stall: Duration,
    (continued, rename): (bool, Option<&str>),
    sent: &mut Sent,
    tx: &mpsc::Sender<Bytes>,
) -> End {
    let mut buf = BytesMut::new();
    loop {
        while let Some(ev) = continuation::next_event(&mut buf) {
            // Relayed as it is: read in place, no map of values built.
            if !continued
                && rename.is_none()
                && sent.envelope.is_noted()
                && let Some(seen) = continuation::glance(&ev, &mut sent.text)
            {
                sent.finished |= seen.finished;
                sent.usage |= seen.usage;
                sent.not_text |= seen.not_text;
                if tx.send(ev).await.is_err() {
                    return End::Gone;
                }
                continue;
            }
            let out = match continuation::classify(&ev) {
                Event::Done => {
                    let _ = tx.send(ev).await;
                    finish_body(body).await;
                    return End::Done;
                }
                Event::Error => {
                    sent.worker_error = true;
                    Some(ev)
                }
                Event::Other => Some(ev),
                Event::Chunk(mut c) => {
                    if let Some(name) = rename
                        && let Some(slot) = c.get_mut("model")
                    {
                        *slot = serde_json::Value::String(name.to_string());
                    }
                    let seen = continuation::seen(&c);
                    sent.text.push_str(&seen.content);
                    sent.finished |= seen.finished;
                    sent.usage |= seen.usage;
                    sent.not_text |= seen.not_text;
                    if continued {
                        sent.envelope.rewrite(c)
                    } else {
                        sent.envelope.note(&c);
                        if rename.is_some() {
                            Some(sse(&serde_json::Value::Object(c)))
                        } else {
                            Some(ev)
                        }
                    }
                }
            };
            if let Some(b) = out
                && tx.send(b).await.is_err()
            {
                return End::Gone;
            }
        }
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return End::Failed(format!("the worker went silent for {stall:?}")),
            Ok(None) => return End::Failed("the worker ended the stream before its end".into()),
            Ok(Some(Err(e))) => {
                return End::Failed(format!(
                    "the connection to the worker failed: {}",
                    error_chain(&e)
                ));
            }
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    buf.extend_from_slice(d);
                }
            }
        }
    }
}

/// How long the relay waits, after a worker's `[DONE]`, for the rest of its body.
const FINISH_AFTER_DONE: Duration = Duration::from_millis(100);

/// Reads what is left of a worker's stream after its `[DONE]` (normally only the chunked
/// body's end, already on its way), so that the connection goes back to the pool: a body
/// dropped unfinished closes its connection, and every stream then cost a new connection to
/// the worker (connect, accept, close: about a third more CPU per stream in both daemons).
/// Bounded by [`FINISH_AFTER_DONE`] and a few frames; a worker still sending after its
/// `[DONE]` is cut off (its connection closed) as before.
async fn finish_body(body: &mut pool::Body) {
    let _ = tokio::time::timeout(FINISH_AFTER_DONE, async {
        for _ in 0..4 {
            if !matches!(body.frame().await, Some(Ok(_))) {
                break;
            }
        }
    })
    .await;
}

/// Ends the stream with an OpenAI error event (and no `[DONE]`).
async fn fail(tx: &mpsc::Sender<Bytes>, message: String) {
    warn!(reason = %crate::telemetry::Escaped(&message), "a stream ends with an error event");
    let e = OpenAiError::bad_gateway(message);
    let _ = tx.send(sse(&e.body())).await;
}
