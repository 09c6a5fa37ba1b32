//! The controller's metrics.
//!
//! Per HTTP request ([`super::MeasureLayer`]): `dbgpt_controller_requests_total{route,status_class}`,
//! `dbgpt_controller_request_duration_seconds{route}`. From the handlers:
//! `dbgpt_controller_registrations_total`, `dbgpt_controller_deregistrations_total`,
//! `dbgpt_controller_heartbeats_total` (accepted ones), `dbgpt_controller_expiries_total`
//! (instances the health sweep marked unhealthy) and
//! `dbgpt_controller_registry_write_duration_seconds{op}` (register, deregister, heartbeat,
//! expire, flush; failed writes too). At scrape time, from the registry:
//! `dbgpt_controller_instances{model,worker_type,health}` (at most [`super::MAX_MODELS`] models, the rest
//! as `other`), `dbgpt_controller_registry_errors_total` (failed database round trips of the
//! SQL registry, failed writes of redb) and `dbgpt_controller_registry_reconnects_total` (the
//! SQL database reachable again after a failure).

use std::sync::Arc;
use std::time::Instant;

use axum::http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{CLASSES, Labels, Meter, ModelName, Record, Vitals, class_index};
use crate::registry::Registry as InstanceRegistry;

const ROUTES: [&str; 6] = [
    "register",
    "deregister",
    "list",
    "heartbeat",
    "health",
    "other",
];

fn route_of(method: &str, path: &str) -> Option<u8> {
    Some(match (method, path) {
        (_, super::METRICS_PATH) => return None,
        ("POST", crate::wire::controller::MODELS_PATH) => 0,
        ("DELETE", crate::wire::controller::MODELS_PATH) => 1,
        (_, crate::wire::controller::MODELS_PATH) => 2,
        (_, crate::wire::controller::HEARTBEAT_PATH) => 3,
        (_, crate::wire::HEALTH_PATH | crate::wire::READY_PATH) => 4,
        _ => 5,
    })
}

/// Registry operations timed.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Register = 0,
    Deregister = 1,
    Heartbeat = 2,
    Expire = 3,
    Flush = 4,
}
const OPS: [&str; 5] = ["register", "deregister", "heartbeat", "expire", "flush"];

/// The controller's metrics.
pub struct ControllerMetrics {
    vitals: Vitals,
    requests_family: Family<Labels, Counter>,
    duration_family: Family<Labels, Histogram, fn() -> Histogram>,
    writes_family: Family<Labels, Histogram, fn() -> Histogram>,
    requests: Vec<[Counter; 5]>,
    duration: Vec<Histogram>,
    writes: Vec<Histogram>,
    registrations: Counter,
    deregistrations: Counter,
    heartbeats: Counter,
    expiries: Counter,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let requests_family = Family::<Labels, Counter>::default();
        let duration_family: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(super::duration_histogram as fn() -> _);
        let writes_family: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(super::write_histogram as fn() -> _);
        let requests = ROUTES
            .iter()
            .map(|r| {
                std::array::from_fn(|c| {
                    requests_family.get_or_create_owned(&vec![
                        ("route", r.to_string()),
                        ("status_class", CLASSES[c].to_string()),
                    ])
                })
            })
            .collect();
        let duration = ROUTES
            .iter()
            .map(|r| duration_family.get_or_create_owned(&vec![("route", r.to_string())]))
            .collect();
        let writes = OPS
            .iter()
            .map(|o| writes_family.get_or_create_owned(&vec![("op", o.to_string())]))
            .collect();
        ControllerMetrics {
            vitals: Vitals::default(),
            requests_family,
            duration_family,
            writes_family,
            requests,
            duration,
            writes,
            registrations: Counter::default(),
            deregistrations: Counter::default(),
            heartbeats: Counter::default(),
            expiries: Counter::default(),
        }
    }
}

impl ControllerMetrics {
    /// Registers every metric, and the scrape-time view of `registry`.
    pub fn register(&self, r: &mut Registry, registry: Arc<dyn InstanceRegistry>) {
        r.register(
            "dbgpt_controller_requests",
            "HTTP requests answered, by route and status class",
            self.requests_family.clone(),
        );
        r.register(
            "dbgpt_controller_request_duration_seconds",
            "Time to answer an HTTP request",
            self.duration_family.clone(),
        );
        r.register(
            "dbgpt_controller_registry_write_duration_seconds",
            "Time of registry writes (durable when they return), by operation",
            self.writes_family.clone(),
        );
        r.register(
            "dbgpt_controller_registrations",
            "Instances registered",
            self.registrations.clone(),
        );
        r.register(
            "dbgpt_controller_deregistrations",
            "Instances deregistered",
            self.deregistrations.clone(),
        );
        r.register(
            "dbgpt_controller_heartbeats",
            "Heartbeats accepted",
            self.heartbeats.clone(),
        );
        r.register(
            "dbgpt_controller_expiries",
            "Instances marked unhealthy by the health sweep (heartbeat timeout)",
            self.expiries.clone(),
        );
        r.register_collector(Box::new(RegistryCollector(registry)));
    }

    /// Times a registry write `op`.
    pub fn timed(&self, op: Op) -> WriteTimer<'_> {
        WriteTimer {
            h: &self.writes[op as usize],
            started: Instant::now(),
        }
    }

    pub fn registered(&self) {
        self.registrations.inc();
    }
    pub fn deregistered(&self) {
        self.deregistrations.inc();
    }
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }
    pub fn expired(&self, n: usize) {
        self.expiries.inc_by(n as u64);
    }

    pub fn vitals(&self) -> &Vitals {
        &self.vitals
    }
}

/// Observes the time since it was made when dropped.
pub struct WriteTimer<'a> {
    h: &'a Histogram,
    started: Instant,
}

impl Drop for WriteTimer<'_> {
    fn drop(&mut self) {
        self.h.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Meter for ControllerMetrics {
    fn route(&self, method: &Method, path: &str) -> Option<u8> {
        route_of(method.as_str(), path)
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

struct RegistryCollector(Arc<dyn InstanceRegistry>);

impl std::fmt::Debug for RegistryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryCollector")
    }
}

impl Collector for RegistryCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut per_model = self.0.model_counts();
        per_model.sort_by(|a, b| a.0.cmp(&b.0));
        // Bounded: the first MAX_MODELS models by name have their own series.
        let mut other = crate::registry::Counts::default();
        if per_model.len() > super::MAX_MODELS {
            for (_, c) in per_model.drain(super::MAX_MODELS..) {
                other.healthy += c.healthy;
                other.total += c.total;
            }
            per_model.push((super::OTHER.to_string(), other));
        }
        {
            let mut m = enc.encode_descriptor(
                "dbgpt_controller_instances",
                "Registered instances, by model and health",
                None,
                MetricType::Gauge,
            )?;
            for (key, c) in &per_model {
                // Registry names are DB-GPT's `name@worker_type`.
                let (model, worker_type) = key.rsplit_once('@').unwrap_or((key.as_str(), ""));
                for (health, n) in [("healthy", c.healthy), ("unhealthy", c.total - c.healthy)] {
                    let l = [
                        ("model", model),
                        ("worker_type", worker_type),
                        ("health", health),
                    ];
                    ConstGauge::new(n as i64).encode(m.encode_family(&l)?)?;
                }
            }
        }
        let s = self.0.store_stats();
        ConstCounter::new(s.errors).encode(enc.encode_descriptor(
            "dbgpt_controller_registry_errors",
            "Failed registry round trips (SQL) or writes (redb)",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(s.reconnects).encode(enc.encode_descriptor(
            "dbgpt_controller_registry_reconnects",
            "Times the registry database became reachable again after a failure",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(i64::from(self.0.storage_failure().is_some())).encode(
            enc.encode_descriptor(
                "dbgpt_controller_registry_failing",
                "1 while the registry cannot take writes",
                None,
                MetricType::Gauge,
            )?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_routes() {
        assert_eq!(route_of("POST", "/api/controller/models"), Some(0));
        assert_eq!(route_of("DELETE", "/api/controller/models"), Some(1));
        assert_eq!(route_of("GET", "/api/controller/models"), Some(2));
        assert_eq!(route_of("POST", "/api/controller/heartbeat"), Some(3));
        assert_eq!(route_of("GET", "/metrics"), None);
    }
}
