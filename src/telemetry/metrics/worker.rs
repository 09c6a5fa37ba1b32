//! A worker's metrics.
//!
//! Per HTTP request ([`super::MeasureLayer`]): `dbgpt_worker_requests_total{route,status_class}`,
//! `dbgpt_worker_request_duration_seconds{route}`, `dbgpt_worker_in_flight_requests`.
//! Per model ([`ModelMetrics`], labels `model` and `worker_type`): `dbgpt_worker_model_requests_total`
//! (calls that got a slot), `dbgpt_worker_slots_in_use`, `dbgpt_worker_queue_depth`,
//! `dbgpt_worker_time_to_first_token_seconds`, `dbgpt_worker_inter_token_seconds`,
//! `dbgpt_worker_generated_tokens_total` (its rate is the tokens/s),
//! `dbgpt_worker_prompt_tokens_total`, `dbgpt_worker_prompt_cached_tokens_total` (prompt
//! tokens served from the prefix cache) and `dbgpt_worker_model_load_seconds`.
//!
//! The worker's generation layer sets them: slots and queue are the model's concurrency
//! permits (`--limit_model_concurrency`), token timings come from the engine's event stream
//! ([`Metered`]) or, for a proxy model's pass-through answer, from its bytes
//! ([`ModelMetrics::meter_body`]: the first chunk is the first token; a stream's chunks are
//! not tokens, so it adds one inter-token observation per stream, its mean: the time from
//! the first chunk to the stream's end over the completion tokens its usage reports, or
//! over its chunks without one). For an engine with its own scheduler (llama.cpp) the
//! worker manager calls [`ModelMetrics::engine_owned`] and copies the engine's slots, queue
//! and prefix-cache figures into `slots_in_use`, `queue_depth` and `prompt_cached_tokens`
//! every second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::http::{Method, StatusCode};
use futures::StreamExt;
use futures::stream::BoxStream;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::usage::BodyScan;
use super::{CLASSES, Labels, Meter, ModelName, Record, Vitals, class_index};
use crate::wire::worker as wire;
use crate::worker::backends::{
    BackendError, GenerateEvent, GenerateParams, LlmBackend, OpenAiPassthrough,
};

const ROUTES: [&str; 10] = [
    "generate_stream",
    "generate",
    "embeddings",
    "openai_chat_completions",
    "openai_completions",
    "openai_embeddings",
    "count_token",
    "lifecycle",
    "health",
    "other",
];

fn route_of(path: &str) -> Option<u8> {
    Some(match path {
        super::METRICS_PATH => return None,
        wire::GENERATE_STREAM_PATH => 0,
        wire::GENERATE_PATH => 1,
        wire::EMBEDDINGS_PATH => 2,
        wire::OPENAI_CHAT_PATH => 3,
        wire::OPENAI_COMPLETIONS_PATH => 4,
        wire::OPENAI_EMBEDDINGS_PATH => 5,
        wire::COUNT_TOKEN_PATH | wire::MODEL_METADATA_PATH => 6,
        wire::APPLY_PATH
        | wire::PARAMETER_DESCRIPTIONS_PATH
        | wire::MODELS_SUPPORTS_PATH
        | wire::MODELS_STARTUP_PATH
        | wire::MODELS_SHUTDOWN_PATH => 7,
        crate::wire::HEALTH_PATH => 8,
        _ => 9,
    })
}

type CounterFamily = Family<Labels, Counter>;
type GaugeFamily = Family<Labels, Gauge>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
struct Families {
    requests: CounterFamily,
    duration: HistogramFamily,
    model_requests: CounterFamily,
    slots: GaugeFamily,
    queue: GaugeFamily,
    ttft: HistogramFamily,
    inter_token: HistogramFamily,
    generated: CounterFamily,
    prompt: CounterFamily,
    cached: CounterFamily,
    load: Family<Labels, Gauge<f64, AtomicU64>>,
}

/// The worker's metrics (one per process, owned by the worker manager).
pub struct WorkerMetrics {
    vitals: Vitals,
    families: Families,
    /// `[route][status class]`, resolved at start.
    requests: Vec<[Counter; 5]>,
    duration: Vec<Histogram>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let families = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(super::duration_histogram as fn() -> _),
            model_requests: Family::default(),
            slots: Family::default(),
            queue: Family::default(),
            ttft: Family::new_with_constructor(super::ttft_histogram as fn() -> _),
            inter_token: Family::new_with_constructor(super::inter_token_histogram as fn() -> _),
            generated: Family::default(),
            prompt: Family::default(),
            cached: Family::default(),
            load: Family::default(),
        };
        // Only the classes a route has answered appear: resolved lazily would cost a lock;
        // resolved eagerly they would all show. Series are created here but a zero counter
        // is cheap to scrape and tells "none of these" explicitly.
        let requests = ROUTES
            .iter()
            .map(|r| {
                std::array::from_fn(|c| {
                    families.requests.get_or_create_owned(&vec![
                        ("route", r.to_string()),
                        ("status_class", CLASSES[c].to_string()),
                    ])
                })
            })
            .collect();
        let duration = ROUTES
            .iter()
            .map(|r| {
                families
                    .duration
                    .get_or_create_owned(&vec![("route", r.to_string())])
            })
            .collect();
        WorkerMetrics {
            vitals: Vitals::default(),
            families,
            requests,
            duration,
        }
    }
}

impl WorkerMetrics {
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        let f = &self.families;
        r.register(
            "dbgpt_worker_requests",
            "HTTP requests answered, by route and status class",
            f.requests.clone(),
        );
        r.register(
            "dbgpt_worker_request_duration_seconds",
            "Time from the request to the last byte of its answer",
            f.duration.clone(),
        );
        r.register(
            "dbgpt_worker_model_requests",
            "Model calls (generations, embedding and rerank batches) that got a slot",
            f.model_requests.clone(),
        );
        r.register(
            "dbgpt_worker_slots_in_use",
            "Model slots busy with a request",
            f.slots.clone(),
        );
        r.register(
            "dbgpt_worker_queue_depth",
            "Requests waiting for a model slot",
            f.queue.clone(),
        );
        r.register(
            "dbgpt_worker_time_to_first_token_seconds",
            "Time from the start of a generation to its first token",
            f.ttft.clone(),
        );
        r.register(
            "dbgpt_worker_inter_token_seconds",
            "Time between two tokens (text events) of a generation",
            f.inter_token.clone(),
        );
        r.register(
            "dbgpt_worker_generated_tokens",
            "Tokens generated",
            f.generated.clone(),
        );
        r.register(
            "dbgpt_worker_prompt_tokens",
            "Prompt tokens of generations",
            f.prompt.clone(),
        );
        r.register(
            "dbgpt_worker_prompt_cached_tokens",
            "Prompt tokens served from the prefix cache instead of being computed",
            f.cached.clone(),
        );
        r.register(
            "dbgpt_worker_model_load_seconds",
            "How long the model took to load at its last start",
            f.load.clone(),
        );
        r.register_collector(Box::new(InFlight(self.clone())));
    }

    /// The handles of a model (the same series again when a model restarts).
    pub fn model(&self, name: &str, worker_type: &str) -> Arc<ModelMetrics> {
        let l: Labels = vec![
            ("model", name.to_string()),
            ("worker_type", worker_type.to_string()),
        ];
        let f = &self.families;
        Arc::new(ModelMetrics {
            requests: f.model_requests.get_or_create_owned(&l),
            slots_in_use: f.slots.get_or_create_owned(&l),
            queue_depth: f.queue.get_or_create_owned(&l),
            ttft: f.ttft.get_or_create_owned(&l),
            inter_token: f.inter_token.get_or_create_owned(&l),
            generated_tokens: f.generated.get_or_create_owned(&l),
            prompt_tokens: f.prompt.get_or_create_owned(&l),
            prompt_cached_tokens: f.cached.get_or_create_owned(&l),
            load_seconds: f.load.get_or_create_owned(&l),
            engine_owned: AtomicBool::new(false),
        })
    }

    pub fn vitals(&self) -> &Vitals {
        &self.vitals
    }
}

impl Meter for WorkerMetrics {
    fn route(&self, _method: &Method, path: &str) -> Option<u8> {
        route_of(path)
    }

    fn record(&self, route: u8, _model: Option<&ModelName>, status: StatusCode) -> Record {
        Record {
            requests: self.requests[route as usize][class_index(status)].clone(),
            duration: self.duration[route as usize].clone(),
            ttft: None,
            tokens: None,
        }
    }

    fn vitals(&self) -> &Vitals {
        &self.vitals
    }
}

/// The daemon's in-flight requests at scrape time.
struct InFlight(Arc<WorkerMetrics>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Collector for InFlight {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.0.vitals.in_flight.load(Ordering::Relaxed).max(0)).encode(
            enc.encode_descriptor(
                "dbgpt_worker_in_flight_requests",
                "HTTP requests being answered (streams until their last byte)",
                None,
                MetricType::Gauge,
            )?,
        )
    }
}

/// One model's handles: what the generation layer records, and what an engine with its own
/// scheduler sets (see the module documentation).
#[derive(Debug)]
pub struct ModelMetrics {
    requests: Counter,
    /// Busy slots: the generation layer's permits, or the engine's own slots.
    pub slots_in_use: Gauge,
    /// Requests waiting for a slot.
    pub queue_depth: Gauge,
    ttft: Histogram,
    inter_token: Histogram,
    generated_tokens: Counter,
    prompt_tokens: Counter,
    /// Prompt tokens the engine took from its prefix cache.
    pub prompt_cached_tokens: Counter,
    load_seconds: Gauge<f64, AtomicU64>,
    engine_owned: AtomicBool,
}

impl ModelMetrics {
    /// An engine sets the slot and queue gauges itself from now on (the generation layer
    /// stops touching them).
    pub fn engine_owned(&self) {
        self.engine_owned.store(true, Ordering::Relaxed);
    }

    fn layer_owns(&self) -> bool {
        !self.engine_owned.load(Ordering::Relaxed)
    }

    /// A request starts waiting for a slot.
    pub fn queued(&self) {
        if self.layer_owns() {
            self.queue_depth.inc();
        }
    }

    /// The waiting request got its slot.
    pub fn slot_taken(&self) {
        self.requests.inc();
        if self.layer_owns() {
            self.queue_depth.dec();
            self.slots_in_use.inc();
        }
    }

    /// A waiting request went away before it got a slot.
    pub fn gave_up(&self) {
        if self.layer_owns() {
            self.queue_depth.dec();
        }
    }

    /// A slot was given back.
    pub fn slot_released(&self) {
        if self.layer_owns() {
            self.slots_in_use.dec();
        }
    }

    /// The model took `secs` to load.
    pub fn loaded_in(&self, secs: f64) {
        self.load_seconds.set(secs);
    }

    /// A pass-through answer (a proxy model's upstream bytes) watched on its way: the first
    /// chunk (since the request was `started` upstream) is the first token, a stream's mean
    /// gap between tokens is observed at its end, and the `usage` object gives the token
    /// counts (see the module documentation).
    pub fn meter_body<E: Send + 'static>(
        self: &Arc<Self>,
        body: BoxStream<'static, Result<bytes::Bytes, E>>,
        streamed: bool,
        started: Instant,
    ) -> BoxStream<'static, Result<bytes::Bytes, E>> {
        MeteredChunks {
            inner: body,
            m: self.clone(),
            started,
            first: None,
            chunks: 0,
            streamed,
            scan: BodyScan::new(streamed),
            done: false,
        }
        .boxed()
    }
}

impl ModelMetrics {
    /// An answer's token counts, read from its `usage`.
    fn count_tokens(&self, t: super::usage::Tokens) {
        self.prompt_tokens.inc_by(t.prompt_tokens);
        self.generated_tokens.inc_by(t.completion_tokens);
    }
}

/// [`ModelMetrics::meter_body`]'s stream; what it read is recorded at its end (or when the
/// client goes away).
struct MeteredChunks<E> {
    inner: BoxStream<'static, Result<bytes::Bytes, E>>,
    m: Arc<ModelMetrics>,
    started: Instant,
    /// When the first chunk came.
    first: Option<Instant>,
    chunks: u64,
    streamed: bool,
    scan: BodyScan,
    done: bool,
}

impl<E> MeteredChunks<E> {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let tokens = self.scan.finish();
        if let Some(t) = tokens {
            self.m.count_tokens(t);
        }
        if let (true, Some(first)) = (self.streamed, self.first) {
            let n = match tokens {
                Some(t) if t.completion_tokens >= 2 => t.completion_tokens,
                _ => self.chunks,
            };
            if n >= 2 {
                self.m
                    .inter_token
                    .observe(first.elapsed().as_secs_f64() / (n - 1) as f64);
            }
        }
    }
}

impl<E> futures::Stream for MeteredChunks<E> {
    type Item = Result<bytes::Bytes, E>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_next(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(b))) => {
                if this.first.is_none() {
                    let now = Instant::now();
                    this.m.ttft.observe((now - this.started).as_secs_f64());
                    this.first = Some(now);
                }
                this.chunks += 1;
                if let Some(t) = this.scan.feed(b) {
                    this.m.count_tokens(t);
                }
            }
            std::task::Poll::Ready(None) => this.finish(),
            _ => {}
        }
        polled
    }
}

impl<E> Drop for MeteredChunks<E> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A chat model whose event stream is timed and counted into its [`ModelMetrics`].
pub struct Metered {
    inner: Arc<dyn LlmBackend>,
    m: Arc<ModelMetrics>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn LlmBackend>, m: Arc<ModelMetrics>) -> Self {
        Metered { inner, m }
    }
}

impl LlmBackend for Metered {
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        let m = self.m.clone();
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        self.inner
            .generate_stream(params)
            .inspect(move |ev| match ev {
                Ok(GenerateEvent::Delta { .. }) => {
                    let now = Instant::now();
                    match last {
                        None => m.ttft.observe((now - started).as_secs_f64()),
                        Some(l) => m.inter_token.observe((now - l).as_secs_f64()),
                    }
                    last = Some(now);
                }
                Ok(GenerateEvent::Finish { usage: Some(u), .. }) => {
                    m.prompt_tokens.inc_by(u64::from(u.prompt_tokens));
                    m.generated_tokens.inc_by(u64::from(u.completion_tokens));
                }
                _ => {}
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

    fn passthrough(&self) -> Option<&dyn OpenAiPassthrough> {
        self.inner.passthrough()
    }

    fn engine_status(&self) -> Option<crate::worker::backends::EngineStatus> {
        self.inner.engine_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_routes() {
        assert_eq!(route_of(wire::OPENAI_CHAT_PATH), Some(3));
        assert_eq!(route_of("/metrics"), None);
        assert_eq!(route_of("/anything/else"), Some(9));
    }
}
