//! The apiserver's metrics.
//!
//! Per request ([`super::MeasureLayer`]): `dbgpt_apiserver_requests_total{route,model,status_class}`,
//! `dbgpt_apiserver_request_duration_seconds{route,model}` (to the last byte of a stream),
//! `dbgpt_apiserver_time_to_first_token_seconds{model}` (first byte of a streamed
//! completion), `dbgpt_apiserver_prompt_tokens_total` / `_completion_tokens_total{model}`
//! (from the answer's `usage`: every whole answer, a stream only when the client asked for
//! `stream_options.include_usage`; the worker counts every token it generates). From the
//! relay: `dbgpt_apiserver_retries_total{model}` (attempts moved to another instance before
//! the first byte) and `dbgpt_apiserver_failovers_total{model}` (streams continued on
//! another instance mid-way; counted by the mid-stream relay),
//! `dbgpt_apiserver_ejections_total{model}` (instances ejected by outlier detection) and
//! `dbgpt_apiserver_fallbacks_total{model,to}` (requests moved from `model` to the next model
//! of its fallback chain). At scrape time, from the
//! discovery view: `dbgpt_apiserver_in_flight_requests`,
//! `dbgpt_apiserver_instance_outstanding_requests{model,worker_type,worker}` (`worker`: the
//! instance's host:port; not `instance`, which Prometheus gives the scrape target),
//! `dbgpt_apiserver_instance_healthy{…}` (1 when the apiserver would route to it: healthy,
//! enabled, neither ejected nor draining), `dbgpt_apiserver_instance_ejected{…}` (1 while
//! outlier detection has it ejected, its trial included),
//! `dbgpt_apiserver_discovery_refresh_age_seconds` and
//! `dbgpt_apiserver_discovery_refresh_failing`. The per-key series
//! (`dbgpt_apiserver_key_*`, by key name) are [`crate::apiserver::tenancy`]'s.
//! The queues' series (`dbgpt_apiserver_queue_*`, `dbgpt_apiserver_model_wakes_total`,
//! `…_unloads_total`) are registered by [`crate::apiserver::admission`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Bounded, CLASSES, Labels, Meter, ModelName, Record, Vitals, class_index};
use crate::apiserver::discovery::Discovery;

/// Route labels, by index.
const ROUTES: [&str; 8] = [
    "chat_completions",
    "completions",
    "responses",
    "embeddings",
    "rerank",
    "models",
    "health",
    "other",
];
const CHAT: u8 = 0;
const COMPLETIONS: u8 = 1;
const RESPONSES: u8 = 2;
const EMBEDDINGS: u8 = 3;
const RERANK: u8 = 4;
const MODELS: u8 = 5;
const HEALTH: u8 = 6;
const OTHER_ROUTE: u8 = 7;

/// Most instance series reported (a registry of thousands is summarised by the rest).
const MAX_INSTANCES: usize = 1000;

type CounterFamily = Family<Labels, Counter>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Every family, cloned into the registry (clones share their series).
#[derive(Clone)]
struct Families {
    requests: CounterFamily,
    duration: HistogramFamily,
    ttft: HistogramFamily,
    prompt_tokens: CounterFamily,
    completion_tokens: CounterFamily,
    retries: CounterFamily,
    failovers: CounterFamily,
    ejections: CounterFamily,
    fallbacks: CounterFamily,
}

/// One model's handles.
pub struct ApiModel {
    model: String,
    families: Families,
    requests: [[OnceLock<Counter>; 5]; ROUTES.len()],
    duration: [OnceLock<Histogram>; ROUTES.len()],
    ttft: OnceLock<Histogram>,
    tokens: OnceLock<(Counter, Counter)>,
    retries: OnceLock<Counter>,
    failovers: OnceLock<Counter>,
    ejections: OnceLock<Counter>,
}

impl ApiModel {
    fn one(&self) -> Labels {
        vec![("model", self.model.clone())]
    }

    fn ttft(&self) -> &Histogram {
        self.ttft
            .get_or_init(|| self.families.ttft.get_or_create_owned(&self.one()))
    }

    fn tokens(&self) -> &(Counter, Counter) {
        self.tokens.get_or_init(|| {
            (
                self.families.prompt_tokens.get_or_create_owned(&self.one()),
                self.families
                    .completion_tokens
                    .get_or_create_owned(&self.one()),
            )
        })
    }
}

/// The apiserver's metrics; shared by every serving thread.
pub struct ApiMetrics {
    vitals: Vitals,
    families: Families,
    models: Bounded<ApiModel>,
    discovery: OnceLock<Arc<Discovery>>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    pub fn new() -> Self {
        let families = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(super::duration_histogram as fn() -> _),
            ttft: Family::new_with_constructor(super::ttft_histogram as fn() -> _),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            retries: Family::default(),
            failovers: Family::default(),
            ejections: Family::default(),
            fallbacks: Family::default(),
        };
        let f = families.clone();
        ApiMetrics {
            vitals: Vitals::default(),
            models: Bounded::new(move |model| ApiModel {
                model: model.to_string(),
                families: f.clone(),
                requests: Default::default(),
                duration: Default::default(),
                ttft: OnceLock::new(),
                tokens: OnceLock::new(),
                retries: OnceLock::new(),
                failovers: OnceLock::new(),
                ejections: OnceLock::new(),
            }),
            families,
            discovery: OnceLock::new(),
        }
    }

    /// Registers every family, and the scrape-time view of `discovery`.
    pub fn register(self: &Arc<Self>, r: &mut Registry, discovery: Arc<Discovery>) {
        let f = &self.families;
        r.register(
            "dbgpt_apiserver_requests",
            "Requests answered, by route, model and status class",
            f.requests.clone(),
        );
        r.register(
            "dbgpt_apiserver_request_duration_seconds",
            "Time from the request to the last byte of its answer",
            f.duration.clone(),
        );
        r.register(
            "dbgpt_apiserver_time_to_first_token_seconds",
            "Time from a streamed completion request to the first byte of its answer",
            f.ttft.clone(),
        );
        r.register(
            "dbgpt_apiserver_prompt_tokens",
            "Prompt tokens of answered requests (from the answer's usage)",
            f.prompt_tokens.clone(),
        );
        r.register(
            "dbgpt_apiserver_completion_tokens",
            "Completion tokens of answered requests (from the answer's usage)",
            f.completion_tokens.clone(),
        );
        r.register(
            "dbgpt_apiserver_retries",
            "Worker calls moved to another instance before the first byte",
            f.retries.clone(),
        );
        r.register(
            "dbgpt_apiserver_failovers",
            "Streams continued on another instance after their first byte",
            f.failovers.clone(),
        );
        r.register(
            "dbgpt_apiserver_ejections",
            "Instances ejected by outlier detection (failures in a row from live traffic)",
            f.ejections.clone(),
        );
        r.register(
            "dbgpt_apiserver_fallbacks",
            "Requests moved from a model to the next model of its fallback chain",
            f.fallbacks.clone(),
        );
        let _ = self.discovery.set(discovery.clone());
        r.register_collector(Box::new(ViewCollector {
            metrics: self.clone(),
            discovery,
        }));
    }

    /// The handles of `model` (its own when the view has it, else `other`'s).
    pub fn model(&self, model: &str) -> Arc<ApiModel> {
        self.models.get(model, || match self.discovery.get() {
            Some(d) => known(d, model),
            None => false,
        })
    }

    /// A worker call of `model` failed before its first byte and moves to another instance.
    pub fn retried(&self, model: &str) {
        let m = self.model(model);
        m.retries
            .get_or_init(|| m.families.retries.get_or_create_owned(&m.one()))
            .inc();
    }

    /// A stream of `model` continued on another instance after its first byte.
    pub fn failed_over(&self, model: &str) {
        let m = self.model(model);
        m.failovers
            .get_or_init(|| m.families.failovers.get_or_create_owned(&m.one()))
            .inc();
    }

    /// Outlier detection ejected an instance of `model`.
    pub fn ejected(&self, model: &str) {
        let m = self.model(model);
        m.ejections
            .get_or_init(|| m.families.ejections.get_or_create_owned(&m.one()))
            .inc();
    }

    /// A request for `model` moves on to `to`, the next model of its fallback chain (both
    /// come from the configured chains, so the series are bounded).
    pub fn fell_back(&self, model: &str, to: &str) {
        self.families
            .fallbacks
            .get_or_create(&vec![("model", model.to_string()), ("to", to.to_string())])
            .inc();
    }

    pub fn vitals_ref(&self) -> &Vitals {
        &self.vitals
    }
}

/// Whether the view has `model` under any worker type.
fn known(d: &Discovery, model: &str) -> bool {
    let view = d.view();
    ["llm", "text2vec", "reranker"].iter().any(|t| {
        view.groups
            .contains_key(&crate::wire::controller::worker_key(model, t))
    })
}

/// The route of a path (both `/v1` and `/api/v1` prefixes).
fn route_of(path: &str) -> Option<u8> {
    if path == super::METRICS_PATH {
        return None;
    }
    if path == crate::wire::HEALTH_PATH {
        return Some(HEALTH);
    }
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
        .or_else(|| path.strip_prefix('/'));
    Some(match rest {
        Some("chat/completions") => CHAT,
        Some("completions") => COMPLETIONS,
        Some("responses") => RESPONSES,
        Some("embeddings") => EMBEDDINGS,
        Some("rerank" | "beta/relevance" | "v2/rerank") => RERANK,
        Some("models") => MODELS,
        _ => OTHER_ROUTE,
    })
}

impl Meter for ApiMetrics {
    fn route(&self, _method: &Method, path: &str) -> Option<u8> {
        route_of(path)
    }

    fn record(&self, route: u8, model: Option<&ModelName>, status: StatusCode) -> Record {
        let m = match model {
            Some(n) => self.model(&n.0),
            None => self.models.other(),
        };
        let r = route as usize;
        let requests = m.requests[r][class_index(status)]
            .get_or_init(|| {
                m.families.requests.get_or_create_owned(&vec![
                    ("route", ROUTES[r].to_string()),
                    ("model", m.model.clone()),
                    ("status_class", CLASSES[class_index(status)].to_string()),
                ])
            })
            .clone();
        let duration = m.duration[r]
            .get_or_init(|| {
                m.families.duration.get_or_create_owned(&vec![
                    ("route", ROUTES[r].to_string()),
                    ("model", m.model.clone()),
                ])
            })
            .clone();
        let completion = matches!(route, CHAT | COMPLETIONS | RESPONSES);
        Record {
            requests,
            duration,
            ttft: completion.then(|| m.ttft().clone()),
            tokens: (completion || route == EMBEDDINGS).then(|| m.tokens().clone()),
        }
    }

    fn vitals(&self) -> &Vitals {
        &self.vitals
    }
}

/// Scrape-time figures from the discovery view.
struct ViewCollector {
    metrics: Arc<ApiMetrics>,
    discovery: Arc<Discovery>,
}

impl std::fmt::Debug for ViewCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewCollector")
    }
}

impl Collector for ViewCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.metrics.vitals.in_flight.load(Ordering::Relaxed).max(0)).encode(
            enc.encode_descriptor(
                "dbgpt_apiserver_in_flight_requests",
                "Requests being answered (streams until their last byte)",
                None,
                MetricType::Gauge,
            )?,
        )?;
        let d = &self.discovery;
        let (ok, err) = d.freshness();
        if let Some(age) = ok {
            ConstGauge::new(age.as_secs_f64()).encode(enc.encode_descriptor(
                "dbgpt_apiserver_discovery_refresh_age_seconds",
                "Seconds since the instance list was last fetched from a controller",
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(i64::from(err.is_some())).encode(enc.encode_descriptor(
            "dbgpt_apiserver_discovery_refresh_failing",
            "1 while the last fetch of the instance list failed",
            None,
            MetricType::Gauge,
        )?)?;
        let view = d.view();
        let mut rows: Vec<(&str, &str, &crate::apiserver::discovery::Instance)> = Vec::new();
        for (key, g) in &view.groups {
            let (model, wt) = key.rsplit_once('@').unwrap_or((key.as_str(), ""));
            for i in &g.instances {
                rows.push((model, wt, i.as_ref()));
            }
        }
        rows.sort_by(|a, b| (a.0, a.1, &a.2.addr).cmp(&(b.0, b.1, &b.2.addr)));
        rows.truncate(MAX_INSTANCES);
        let labels = |(model, wt, i): &(&str, &str, &crate::apiserver::discovery::Instance)| {
            [
                ("model", model.to_string()),
                ("worker_type", wt.to_string()),
                ("worker", i.addr.clone()),
            ]
        };
        {
            let mut m = enc.encode_descriptor(
                "dbgpt_apiserver_instance_outstanding_requests",
                "Requests this apiserver has outstanding on each instance",
                None,
                MetricType::Gauge,
            )?;
            for row in &rows {
                let l = labels(row);
                let v = row.2.state.outstanding.load(Ordering::Relaxed) as i64;
                ConstGauge::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "dbgpt_apiserver_instance_healthy",
                "1 when the apiserver routes to the instance (healthy, enabled, neither ejected nor draining)",
                None,
                MetricType::Gauge,
            )?;
            for row in &rows {
                let l = labels(row);
                let v = i64::from(row.2.routable() && !d.avoids(row.2));
                ConstGauge::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dbgpt_apiserver_instance_ejected",
            "1 while outlier detection has the instance ejected (its trial request included)",
            None,
            MetricType::Gauge,
        )?;
        for row in &rows {
            let l = labels(row);
            let v = i64::from(d.ejection(row.2).is_some());
            ConstGauge::new(v).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

/// `instance <model>@<type>@<addr>` entries of the admin status: how the apiserver sees
/// each instance (`healthy`, `ejected <time left>` (`ejected trial` while its trial request
/// runs, `ejected trial-due` once its backoff is over), `draining`, `unhealthy`, `disabled`)
/// and its outstanding requests.
pub fn instance_details(d: &Discovery) -> Vec<(String, String)> {
    let view = d.view();
    let mut out = Vec::new();
    for (key, g) in &view.groups {
        for i in &g.instances {
            let ejection = d.ejection(i);
            let state = if !i.enabled {
                "disabled".to_string()
            } else if !i.healthy {
                "unhealthy".to_string()
            } else if let Some(e) = ejection {
                let left = if e.trial {
                    "trial".to_string()
                } else if e.remaining.is_zero() {
                    "trial-due".to_string()
                } else {
                    format!("{:.1}s", e.remaining.as_secs_f64())
                };
                format!("ejected {left} ejections={}", e.streak)
            } else if d.avoids(i) {
                "draining".to_string()
            } else {
                "healthy".to_string()
            };
            out.push((
                format!("{}{key}@{}", super::STATUS_INSTANCE_PREFIX, i.addr),
                format!(
                    "{state} outstanding={}",
                    i.state.outstanding.load(Ordering::Relaxed)
                ),
            ));
        }
    }
    out.sort();
    out.truncate(64);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_of_paths() {
        assert_eq!(route_of("/v1/chat/completions"), Some(CHAT));
        assert_eq!(route_of("/api/v1/chat/completions"), Some(CHAT));
        assert_eq!(route_of("/v1/embeddings"), Some(EMBEDDINGS));
        assert_eq!(route_of("/v2/rerank"), Some(RERANK));
        assert_eq!(route_of("/rerank"), Some(RERANK));
        assert_eq!(route_of("/api/health"), Some(HEALTH));
        assert_eq!(route_of("/metrics"), None);
        assert_eq!(route_of("/v1/secret-key-in-path"), Some(OTHER_ROUTE));
    }
}
