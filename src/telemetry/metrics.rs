//! Prometheus metrics: one registry per process, rendered as the Prometheus text exposition
//! (version 0.0.4) at `GET /metrics` on the daemon's HTTP port, on a separate address
//! (`--metrics_addr HOST:PORT`) or nowhere (`--metrics_addr off`), optionally behind a
//! bearer key (`--metrics_api_key`).
//!
//! Everything is `prometheus-client` (typed, no global state): [`Exposition`] owns the
//! registry, each service registers its own metrics on it once at start-up
//! ([`apiserver`], [`worker`], [`controller`]) and every daemon gets the process metrics
//! ([`process`]: build info, uptime, RSS, open fds, CPU). The hot path only touches
//! pre-resolved handles (atomic counters, a histogram's uncontended lock): per-model handles
//! are looked up once per request in a small table ([`Bounded`]) that also bounds the
//! `model` label: only models the daemon knows get their own series (at most
//! [`MAX_MODELS`]), anything else is counted under `model="other"`. Labels are model,
//! route, status class and instance, and a managed API key's *name* on the per-key series
//! ([`crate::apiserver::tenancy`]); never key secrets or prompts.
//!
//! [`Vitals`] keeps the three figures `dbgpt ctl status` shows per daemon (requests/s,
//! in flight, errors) from the same events.

pub(crate) mod apiserver;
pub(crate) mod controller;
mod http;
pub(crate) mod process;
pub(crate) mod usage;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub(crate) use self::http::{Charge, MeasureLayer, Meter, ModelName, Record, TokenSink};

/// Where the exposition is served.
pub const METRICS_PATH: &str = "/metrics";

/// The Content-Type of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Distinct `model` label values per daemon; further models are counted as `other`.
pub const MAX_MODELS: usize = 128;

/// The `model` label of requests for a model the daemon does not know (or beyond
/// [`MAX_MODELS`]).
pub const OTHER: &str = "other";

/// Where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Endpoint {
    /// On the daemon's HTTP port (the default).
    #[default]
    Main,
    /// On its own listener at this address (and not on the HTTP port).
    Separate(String),
    /// Nowhere (the metrics are still kept for `dbgpt ctl status`).
    Off,
}

/// The metrics flags of a daemon, resolved.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    pub endpoint: Endpoint,
    /// A scrape must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for MetricsConfig {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl MetricsConfig {
    /// From `--metrics_addr` (`off`, `HOST:PORT`, or unset/empty for the HTTP port) and
    /// `--metrics_api_key` (empty = none).
    pub fn from_flags(addr: Option<&str>, api_key: Option<&str>) -> anyhow::Result<Self> {
        let endpoint = match addr.map(str::trim) {
            None | Some("") => Endpoint::Main,
            Some(a) if a.eq_ignore_ascii_case("off") || a.eq_ignore_ascii_case("none") => {
                Endpoint::Off
            }
            Some(a) => {
                let Some((host, port)) = a.rsplit_once(':') else {
                    anyhow::bail!("--metrics_addr must be off or HOST:PORT, not {a:?}");
                };
                match port.parse::<u16>() {
                    Ok(p) if p > 0 && !host.is_empty() => Endpoint::Separate(a.to_string()),
                    _ => anyhow::bail!(
                        "--metrics_addr must be off or HOST:PORT with a port between 1 and 65535, not {a:?}"
                    ),
                }
            }
        };
        let api_key = api_key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string);
        Ok(MetricsConfig { endpoint, api_key })
    }
}

/// The process's registry and how it is served. Built once at start-up
/// ([`Exposition::new`], then each service registers on [`Exposition::registry`]), then
/// shared read-only.
pub struct Exposition {
    registry: Registry,
    cfg: MetricsConfig,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Exposition {
    /// A registry with the process metrics of `service` registered.
    pub fn new(service: &'static str, cfg: MetricsConfig) -> Self {
        let mut registry = Registry::default();
        process::register(&mut registry, service);
        Exposition { registry, cfg }
    }

    /// Where the service registers its metrics (start-up only).
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn config(&self) -> &MetricsConfig {
        &self.cfg
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an encoder error would be a bug in a collector.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        out
    }

    /// The answer to a scrape: 401 without the key (when one is required), else the text.
    pub fn scrape(&self, headers: &HeaderMap) -> Response {
        if let Some(key) = &self.cfg.api_key
            && !bearer_matches(headers, key)
        {
            let mut r = crate::http::json_response(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"detail": "metrics need an API key: send 'Authorization: Bearer <key>' (--metrics_api_key)"}),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            self.render(),
        )
            .into_response()
    }

    /// Adds `GET /metrics` to `router` when the exposition is served on the HTTP port.
    pub fn route_on<S: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        router: axum::Router<S>,
    ) -> axum::Router<S> {
        if self.cfg.endpoint != Endpoint::Main {
            return router;
        }
        let me = self.clone();
        router.route(
            METRICS_PATH,
            axum::routing::get(move |headers: HeaderMap| {
                let me = me.clone();
                async move { me.scrape(&headers) }
            }),
        )
    }

    /// Binds the separate metrics listener, when one is configured (at start-up, so that a
    /// busy address fails the start with its reason).
    pub async fn bind_separate(&self) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        let Endpoint::Separate(addr) = &self.cfg.endpoint else {
            return Ok(None);
        };
        let l = tokio::net::TcpListener::bind(addr.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on --metrics_addr {addr}: {e}"))?;
        Ok(Some(l))
    }

    /// Serves `/metrics` alone on `listener` until the daemon's HTTP server closes.
    pub fn serve_separate(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        drain: crate::http::Drain,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let app = crate::http::with_fallbacks(self.route_on_any(axum::Router::new()));
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::HttpLimits::default(),
            drain,
        ))
    }

    fn route_on_any(self: &Arc<Self>, router: axum::Router) -> axum::Router {
        let me = self.clone();
        router.route(
            METRICS_PATH,
            axum::routing::get(move |headers: HeaderMap| {
                let me = me.clone();
                async move { me.scrape(&headers) }
            }),
        )
    }
}

/// Whether `headers` carry `Authorization: Bearer <key>` (compared in constant time).
fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
    else {
        return false;
    };
    let (a, b) = (token.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `2xx`, `4xx`, … of a status.
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Index of a status class in per-class arrays.
pub(crate) fn class_index(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// The status classes, by [`class_index`].
pub(crate) const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Buckets of request durations (seconds): 5 ms to 5 min.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets of times to first token (seconds).
pub const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of gaps between tokens (seconds).
pub const INTER_TOKEN_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets of registry writes (seconds).
pub const WRITE_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

pub(crate) fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}
pub(crate) fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}
pub(crate) fn inter_token_histogram() -> Histogram {
    Histogram::new(INTER_TOKEN_BUCKETS)
}
pub(crate) fn write_histogram() -> Histogram {
    Histogram::new(WRITE_BUCKETS)
}

/// Label set of the families (built once per handle, never per request).
pub(crate) type Labels = Vec<(&'static str, String)>;

/// Per-model handles keyed by model name, at most [`MAX_MODELS`] of them; every other name
/// (or a name the caller does not vouch for) shares the `other` handle.
pub(crate) struct Bounded<T> {
    table: RwLock<HashMap<Box<str>, Arc<T>>>,
    other: Arc<T>,
    make: Box<dyn Fn(&str) -> T + Send + Sync>,
}

impl<T> Bounded<T> {
    pub(crate) fn new(make: impl Fn(&str) -> T + Send + Sync + 'static) -> Self {
        Bounded {
            other: Arc::new(make(OTHER)),
            table: RwLock::new(HashMap::new()),
            make: Box::new(make),
        }
    }

    /// The handle of `model` if it has one already, else (when `known` says the daemon
    /// serves such a model, and there is room) a new one, else `other`'s.
    pub(crate) fn get(&self, model: &str, known: impl FnOnce() -> bool) -> Arc<T> {
        if let Some(h) = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            return h.clone();
        }
        if model == OTHER || !known() {
            return self.other.clone();
        }
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = t.get(model) {
            return h.clone();
        }
        if t.len() >= MAX_MODELS {
            return self.other.clone();
        }
        let h = Arc::new((self.make)(model));
        t.insert(model.into(), h.clone());
        h
    }

    /// `other`'s handle.
    pub(crate) fn other(&self) -> Arc<T> {
        self.other.clone()
    }

    /// How many models have their own handle.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.read().unwrap().len()
    }
}

/// The figures `dbgpt ctl status` shows for a daemon: requests, errors (5xx answers) and
/// requests in flight, with the request rate over the last minute ([`Vitals::sample`] runs
/// every [`SAMPLE_EVERY`]).
#[derive(Debug, Default)]
pub struct Vitals {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicI64,
    samples: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// How often [`Vitals::sample`] runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The window of the request rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Vitals {
    pub(crate) fn started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished(&self, error: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the request count now (keeps a minute of samples).
    pub fn sample(&self) {
        let now = Instant::now();
        let n = self.requests.load(Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, n));
        while s
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW + SAMPLE_EVERY)
        {
            s.pop_front();
        }
    }

    /// Requests per second over the last minute (or since the first sample).
    pub fn rate(&self) -> f64 {
        let now = Instant::now();
        let n = self.requests.load(Ordering::Relaxed);
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(t0, n0)) = s
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .or(s.front())
        else {
            return 0.0;
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.5 {
            return 0.0;
        }
        n.saturating_sub(n0) as f64 / secs
    }

    /// The `details` entries of the admin status: `req_per_s`, `in_flight`, `errors`.
    pub fn details(&self) -> Vec<(String, String)> {
        vec![
            (STATUS_RATE.into(), format!("{:.1}", self.rate())),
            (
                STATUS_IN_FLIGHT.into(),
                self.in_flight.load(Ordering::Relaxed).max(0).to_string(),
            ),
            (
                STATUS_ERRORS.into(),
                self.errors.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }

    /// Samples `owner`'s vitals every [`SAMPLE_EVERY`] until `shutdown`.
    pub fn spawn_sampler<T: Send + Sync + 'static>(
        owner: Arc<T>,
        vitals: fn(&T) -> &Vitals,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => vitals(&owner).sample(),
                }
            }
        })
    }
}

/// Admin status `details` keys `dbgpt ctl status` shows as columns.
pub const STATUS_RATE: &str = "req_per_s";
pub const STATUS_IN_FLIGHT: &str = "in_flight";
pub const STATUS_ERRORS: &str = "errors";
/// Prefix of the admin status `details` keys of the apiserver's per-instance health
/// (`instance <model>@<host:port>` = `healthy|ejected …|draining|unhealthy|disabled outstanding=N`).
pub const STATUS_INSTANCE_PREFIX: &str = "instance ";

#[cfg(test)]
mod tests;
