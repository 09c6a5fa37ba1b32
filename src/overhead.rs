//! In-process measurements of what the per-request machinery adds to a request, for
//! `examples/bench_overhead.rs` (`scripts/bench-overhead.sh`; a benchmark, not a test).
//!
//! Across processes (`scripts/bench-apiserver.sh`) a cost of a few microseconds drowns in
//! the run-to-run spread of a loopback request (±5–15 µs); here the same request goes
//! through the same code twice in one thread, once with the piece under measurement and
//! once without, so their difference is the piece's cost:
//! - **metrics, apiserver:** [`MeasureLayer`] with the apiserver's real [`ApiMetrics`]
//!   around a handler that answers a canned chat completion (plain: one JSON body with
//!   `usage`; stream: [`STREAM_CHUNKS`] content events, a usage event and `[DONE]`), against
//!   the same handler bare;
//! - **metrics, worker:** the worker's [`MeasureLayer`] and what its passthrough route adds
//!   per request (the model's slot gauges and the answer's TTFT, inter-token and token
//!   metering, [`ModelMetrics::meter_body`]), against the same handler without them;
//! - **managed key:** the whole key path of the chat handler (authenticate, admit under a
//!   key with every limit on the key and on the model, the usage request, the lease on the
//!   answer, the usage read back from the body, the lease's release) with a managed key,
//!   against a static key through the same code, both behind the metrics layer as served.
//!
//! CPU is the thread's own (`CLOCK_THREAD_CPUTIME_ID`), on a current-thread runtime; the
//! variants alternate within each round and the medians of the rounds are reported.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use tower::{Layer, ServiceExt};

use crate::apiserver::tenancy::{self, Tenancy};
use crate::telemetry::metrics::apiserver::ApiMetrics;
use crate::telemetry::metrics::worker::{ModelMetrics, WorkerMetrics};
use crate::telemetry::metrics::{MeasureLayer, ModelName};
use crate::wire::keys::{self as wire, ApiKey, KeySpec, Limits, SyncResponse};

/// Content events of the canned stream (a 16-token answer: role, 16 pieces, finish).
pub const STREAM_CHUNKS: usize = 18;

/// Plain or streamed chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Stream,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Stream => "stream",
        }
    }
}

/// One measured comparison: the CPU per request without and with the piece (medians over
/// the rounds, nanoseconds), and every round's difference.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub piece: &'static str,
    pub kind: Kind,
    pub without_ns: f64,
    pub with_ns: f64,
    pub added_ns: Vec<f64>,
}

impl Comparison {
    /// Median of the per-round differences.
    pub fn added_median_ns(&self) -> f64 {
        median(&self.added_ns)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

const MODEL: &str = "bench-model";

/// The canned upstream answer.
fn answer(kind: Kind) -> Response {
    const USAGE: &str = r#""usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}"#;
    match kind {
        Kind::Plain => {
            let body = format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":"one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"}},"finish_reason":"stop"}}],{USAGE}}}"#
            );
            let mut r = Response::new(Body::from(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Kind::Stream => {
            let mut events: Vec<Bytes> = (0..STREAM_CHUNKS)
                .map(|i| {
                    Bytes::from(format!(
                        r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"{MODEL}","choices":[{{"index":0,"delta":{{"content":"w{i} "}},"finish_reason":null}}],"usage":null}}

"#
                    ))
                })
                .collect();
            events.push(Bytes::from(format!(
                r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"{MODEL}","choices":[],{USAGE}}}

"#
            )));
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            crate::http::sse_response(Body::from_stream(futures::stream::iter(
                events.into_iter().map(Ok::<_, Infallible>),
            )))
        }
    }
}

/// The client's request to `path`.
fn request(kind: Kind, key: Option<&str>, path: &str) -> Request {
    let body = match kind {
        Kind::Plain => format!(
            r#"{{"model":"{MODEL}","max_tokens":16,"messages":[{{"role":"user","content":"Say something."}}]}}"#
        ),
        Kind::Stream => format!(
            r#"{{"model":"{MODEL}","max_tokens":16,"stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Say something."}}]}}"#
        ),
    };
    let mut b = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(Body::from(body)).expect("a valid request")
}

type Handler = tower::util::BoxCloneService<Request, Response, Infallible>;

/// The apiserver's chat route.
const API_PATH: &str = "/v1/chat/completions";

/// Runs `n` requests to `path` through `svc`, each read to its end; the thread CPU they
/// took.
async fn run(svc: &Handler, kind: Kind, key: Option<&str>, path: &str, n: usize) -> Duration {
    let start = thread_cpu();
    for _ in 0..n {
        let resp = svc
            .clone()
            .oneshot(request(kind, key, path))
            .await
            .unwrap_or_else(|e| match e {});
        assert_eq!(resp.status(), StatusCode::OK, "the bench handler refused");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("a canned body");
        std::hint::black_box(body);
    }
    thread_cpu() - start
}

/// The apiserver's handler stand-in: reads the request, answers the canned answer for its
/// model, as the real handlers tag it.
fn bare(kind: Kind) -> Handler {
    tower::util::BoxCloneService::new(tower::service_fn(move |req: Request| async move {
        let body = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .expect("a request body");
        std::hint::black_box(body);
        Ok::<_, Infallible>(ModelName::tag(answer(kind), MODEL))
    }))
}

/// The worker's passthrough stand-in: the upstream's answer arrives as a stream of chunks
/// and goes out as the body, with the request's slot held to its end (as the worker's
/// relay does); `metered`: with the slot gauges and the body metering the route adds.
fn worker_route(kind: Kind, metered: Option<Arc<ModelMetrics>>) -> Handler {
    tower::util::BoxCloneService::new(tower::service_fn(move |req: Request| {
        let m = metered.clone();
        async move {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .expect("a request body");
            std::hint::black_box(body);
            let started = std::time::Instant::now();
            let (parts, body) = answer(kind).into_parts();
            let mut chunks = body.into_data_stream().boxed();
            if let Some(m) = &m {
                m.queued();
                m.slot_taken();
                chunks = m.meter_body(chunks, kind == Kind::Stream, started);
            }
            let slot = SlotBack(m);
            let body = Body::from_stream(chunks.map(move |r| {
                let _ = &slot;
                r
            }));
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    }))
}

/// Holds the request's slot to the answer's end (and gives the gauge back, when metered).
struct SlotBack(Option<Arc<ModelMetrics>>);

impl Drop for SlotBack {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.slot_released();
        }
    }
}

/// The chat handler's key path around the canned answer.
fn keyed(kind: Kind, t: Arc<Tenancy>) -> Handler {
    tower::util::BoxCloneService::new(tower::service_fn(move |req: Request| {
        let t = t.clone();
        async move {
            let caller = match t.authenticate(req.headers()) {
                Ok(c) => c,
                Err(e) => return Ok(e.into_response()),
            };
            std::hint::black_box(caller.priority());
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .expect("a request body");
            let mut r = match crate::openai::parse_chat(&body) {
                Ok(r) => r,
                Err(e) => return Ok(e.into_response()),
            };
            let model = r.model.clone();
            let mut lease = match t.admit(&caller, &model) {
                Ok(l) => l,
                Err(resp) => return Ok(*resp),
            };
            std::hint::black_box(tenancy::stream_usage(&mut r, body, &mut lease));
            Ok::<_, Infallible>(ModelName::tag(tenancy::attach(answer(kind), lease), &model))
        }
    }))
}

/// Static key of the key comparison.
const STATIC_KEY: &str = "bench-static";

/// A tenancy with [`STATIC_KEY`] and one managed key with every limit set (never reached)
/// on the key and on [`MODEL`]; the managed key's secret.
fn tenancy() -> (Arc<Tenancy>, String) {
    let t = Tenancy::new(vec![STATIC_KEY.to_string()], "bench".into());
    let id = "bench0000001";
    let secret = format!("sk-dbgpt-{id}-QmVuY2htYXJrQmVuY2htYXJrQmVuY2htYXJrQmVuY2g");
    let salt = "00112233445566778899aabbccddeeff".to_string();
    let big = Limits {
        rpm: Some(1 << 40),
        tpm: Some(1 << 40),
        max_concurrency: Some(1 << 20),
        daily_tokens: Some(1 << 40),
    };
    let record = ApiKey {
        id: id.into(),
        hash: wire::key_hash(&salt, &secret).expect("hex salt"),
        salt,
        spec: KeySpec {
            name: "bench".into(),
            limits: big,
            model_limits: BTreeMap::from([(MODEL.to_string(), big)]),
            ..KeySpec::default()
        },
        created_at: 0,
        revoked_at: None,
        version: 1,
    };
    t.synced(
        SyncResponse {
            version: 1,
            keys: vec![record],
            minute: Vec::new(),
            daily_tokens: BTreeMap::new(),
        },
        0,
    );
    (Arc::new(t), secret)
}

/// One A/B pair: a name, the handler without and with the piece, and the key each sends.
struct Pair {
    piece: &'static str,
    kind: Kind,
    path: &'static str,
    without: (Handler, Option<String>),
    with: (Handler, Option<String>),
}

fn pairs() -> Vec<Pair> {
    let mut out = Vec::new();
    for kind in [Kind::Plain, Kind::Stream] {
        let api = MeasureLayer(Arc::new(ApiMetrics::new()));
        out.push(Pair {
            piece: "metrics (apiserver)",
            kind,
            path: API_PATH,
            without: (bare(kind), None),
            with: (Handler::new(api.layer(bare(kind))), None),
        });
        let wm = Arc::new(WorkerMetrics::default());
        let model = wm.model(MODEL, "llm");
        out.push(Pair {
            piece: "metrics (worker)",
            kind,
            path: crate::wire::worker::OPENAI_CHAT_PATH,
            without: (worker_route(kind, None), None),
            with: (
                Handler::new(MeasureLayer(wm).layer(worker_route(kind, Some(model)))),
                None,
            ),
        });
        let (t, secret) = tenancy();
        let served =
            Handler::new(MeasureLayer(Arc::new(ApiMetrics::new())).layer(keyed(kind, t.clone())));
        out.push(Pair {
            piece: "managed key over static",
            kind,
            path: API_PATH,
            without: (served.clone(), Some(STATIC_KEY.to_string())),
            with: (served, Some(secret)),
        });
    }
    out
}

/// The single thread every measurement runs on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Runs one variant alone: `n` requests of comparison `index` (in [`measure`]'s order),
/// with the piece or without; for counting its instructions under callgrind.
pub fn run_one(index: usize, with: bool, n: usize) -> Option<(&'static str, Kind)> {
    let p = pairs().into_iter().nth(index)?;
    let (svc, key) = if with { &p.with } else { &p.without };
    runtime().block_on(run(svc, p.kind, key.as_deref(), p.path, n));
    Some((p.piece, p.kind))
}

/// Measures every comparison: `rounds` rounds of `n` requests per variant (after one
/// warm-up round), the two variants of a pair alternating which goes first.
pub fn measure(rounds: usize, n: usize) -> Vec<Comparison> {
    runtime().block_on(async {
        let mut out = Vec::new();
        for p in pairs() {
            let (mut without, mut with, mut added) = (Vec::new(), Vec::new(), Vec::new());
            run(&p.without.0, p.kind, p.without.1.as_deref(), p.path, n).await;
            run(&p.with.0, p.kind, p.with.1.as_deref(), p.path, n).await;
            for round in 0..rounds {
                let (a, b) = if round % 2 == 0 {
                    let a = run(&p.without.0, p.kind, p.without.1.as_deref(), p.path, n).await;
                    let b = run(&p.with.0, p.kind, p.with.1.as_deref(), p.path, n).await;
                    (a, b)
                } else {
                    let b = run(&p.with.0, p.kind, p.with.1.as_deref(), p.path, n).await;
                    let a = run(&p.without.0, p.kind, p.without.1.as_deref(), p.path, n).await;
                    (a, b)
                };
                let per = |d: Duration| d.as_nanos() as f64 / n as f64;
                without.push(per(a));
                with.push(per(b));
                added.push(per(b) - per(a));
            }
            out.push(Comparison {
                piece: p.piece,
                kind: p.kind,
                without_ns: median(&without),
                with_ns: median(&with),
                added_ns: added,
            });
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant answers 200 (`run` checks each answer), and a wrong key is refused:
    /// the comparison never measures a refusal.
    #[test]
    fn every_variant_answers_and_is_counted() {
        let c = measure(1, 3);
        assert_eq!(c.len(), 6);
        for x in &c {
            assert!(x.with_ns > 0.0 && x.without_ns > 0.0, "{x:?}");
        }
        runtime().block_on(async {
            let (t, _) = tenancy();
            let h = keyed(Kind::Plain, t);
            let resp = h
                .oneshot(request(Kind::Plain, Some("wrong"), API_PATH))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        });
    }

    #[test]
    fn the_managed_key_is_charged_its_usage() {
        runtime().block_on(async {
            let (t, secret) = tenancy();
            let h = Handler::new(
                MeasureLayer(Arc::new(ApiMetrics::new())).layer(keyed(Kind::Stream, t.clone())),
            );
            run(&h, Kind::Stream, Some(&secret), API_PATH, 2).await;
            let report = t.take_report();
            let row = &report.usage[0];
            assert_eq!(
                (row.requests, row.prompt_tokens, row.completion_tokens),
                (2, 24, 32)
            );
        });
    }
}
