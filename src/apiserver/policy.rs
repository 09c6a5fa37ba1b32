//! Instance selection: which worker instance of a model serves the next request.
//!
//! Candidates are the routable instances (healthy, `enabled`, `weight > 0`) not yet tried by
//! this request; instances ejected by outlier detection ([`super::outlier`]; unless their
//! trial is due) or draining are used only when no other candidate is left. The request that
//! starts on an instance whose trial is due holds the trial ([`InFlight`]).
//! `random` is DB-GPT's uniform choice made weight-proportional; `round_robin` is nginx's
//! smooth weighted round robin (credits kept per instance across refreshes, so equal weights
//! alternate strictly); `least_outstanding` picks the lowest `(in flight + 1) / weight`, ties
//! broken at random so idle instances share load.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::ValueEnum;
use rand::Rng;
use serde::Deserialize;

use super::discovery::{Discovery, Group, Instance};

/// Instance-selection policies of the apiserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Weighted random choice (DB-GPT's behaviour, plus weights).
    Random,
    /// Smooth weighted round robin.
    #[value(alias = "round-robin")]
    RoundRobin,
    /// Fewest requests in flight relative to weight (default).
    #[default]
    #[value(alias = "least-outstanding")]
    LeastOutstanding,
}

impl RoutingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPolicy::Random => "random",
            RoutingPolicy::RoundRobin => "round_robin",
            RoutingPolicy::LeastOutstanding => "least_outstanding",
        }
    }
}

/// Weights are compared as integers with this scale (0.001 resolution).
const SCALE: f64 = 1000.0;

fn iweight(i: &Instance) -> i64 {
    ((i.weight * SCALE).round() as i64).max(1)
}

/// Chooses an instance of `group`, skipping those in `tried` (by address).
pub fn choose(
    policy: RoutingPolicy,
    discovery: &Discovery,
    group: &Group,
    tried: &[String],
) -> Option<Arc<Instance>> {
    let fresh: Vec<&Arc<Instance>> = group
        .instances
        .iter()
        .filter(|i| i.routable() && !tried.contains(&i.addr))
        .collect();
    let healthy: Vec<&Arc<Instance>> = fresh
        .iter()
        .copied()
        .filter(|i| !discovery.avoids(i))
        .collect();
    let cands = if healthy.is_empty() { fresh } else { healthy };
    if cands.is_empty() {
        return None;
    }
    if cands.len() == 1 {
        return Some(cands[0].clone());
    }
    let mut rng = rand::rng();
    let picked = match policy {
        RoutingPolicy::Random => {
            let total: i64 = cands.iter().map(|i| iweight(i)).sum();
            let mut r = rng.random_range(0..total);
            let mut out = cands[cands.len() - 1];
            for c in &cands {
                let w = iweight(c);
                if r < w {
                    out = c;
                    break;
                }
                r -= w;
            }
            out
        }
        RoutingPolicy::RoundRobin => {
            let _g = group.rr_lock.lock().unwrap_or_else(|e| e.into_inner());
            let total: i64 = cands.iter().map(|i| iweight(i)).sum();
            let mut best = cands[0];
            let mut best_cur = i64::MIN;
            for c in &cands {
                let cur = c.state.rr_current.fetch_add(iweight(c), Ordering::Relaxed) + iweight(c);
                if cur > best_cur {
                    best_cur = cur;
                    best = c;
                }
            }
            best.state.rr_current.fetch_sub(total, Ordering::Relaxed);
            best
        }
        RoutingPolicy::LeastOutstanding => {
            // Compare (outstanding + 1) / weight without floats: a/wa < b/wb ⇔ a*wb < b*wa.
            let load = |i: &Instance| {
                (
                    i.state.outstanding.load(Ordering::Relaxed) as i128 + 1,
                    iweight(i) as i128,
                )
            };
            let mut best: Vec<&Arc<Instance>> = Vec::new();
            let mut best_load = (i128::MAX, 1i128);
            for c in &cands {
                let (a, wa) = load(c);
                let (b, wb) = best_load;
                let lhs = a * wb;
                let rhs = b.saturating_mul(wa);
                if best.is_empty() || lhs < rhs {
                    best.clear();
                    best.push(c);
                    best_load = (a, wa);
                } else if lhs == rhs {
                    best.push(c);
                }
            }
            best[rng.random_range(0..best.len())]
        }
    };
    Some(picked.clone())
}

/// Counts one request in flight on an instance for as long as it lives, and holds the
/// instance's outlier trial when the request is that trial (given back if the request ends
/// without a verdict).
pub struct InFlight(Arc<Instance>, Option<u64>);

impl InFlight {
    pub fn new(i: Arc<Instance>) -> Self {
        i.state.outstanding.fetch_add(1, Ordering::Relaxed);
        i.state.served.fetch_add(1, Ordering::Relaxed);
        let trial = i.state.outlier.claim(super::outlier::now_ms());
        InFlight(i, trial)
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state.outstanding.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.1 {
            self.0.state.outlier.release(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::client::ControllerClient;
    use crate::wire::controller::ModelInstance;
    use std::time::Duration;

    fn disc(list: &[(u16, f64, bool)]) -> Discovery {
        let d = Discovery::new(
            ControllerClient::new("http://127.0.0.1:1", Duration::from_secs(1)).unwrap(),
        );
        d.install(
            list.iter()
                .map(|&(port, w, enabled)| ModelInstance {
                    model_name: "m@llm".into(),
                    host: "127.0.0.1".into(),
                    port,
                    weight: Some(w),
                    check_healthy: Some(true),
                    healthy: Some(true),
                    enabled: Some(enabled),
                    prompt_template: None,
                    last_heartbeat: None,
                })
                .collect(),
        );
        d
    }

    fn counts(
        d: &Discovery,
        p: RoutingPolicy,
        n: usize,
    ) -> std::collections::HashMap<String, usize> {
        let super::super::discovery::Lookup::Found(g) = d.lookup("m@llm") else {
            panic!()
        };
        let mut c = std::collections::HashMap::new();
        for _ in 0..n {
            let i = choose(p, d, &g, &[]).unwrap();
            *c.entry(i.addr.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_even_and_weighted() {
        let d = disc(&[(1, 1.0, true), (2, 1.0, true), (3, 1.0, true)]);
        let c = counts(&d, RoutingPolicy::RoundRobin, 300);
        assert!(c.values().all(|&v| v == 100), "{c:?}");
        let d = disc(&[(1, 1.0, true), (2, 3.0, true)]);
        let c = counts(&d, RoutingPolicy::RoundRobin, 400);
        assert_eq!(c["127.0.0.1:2"], 300, "{c:?}");
    }

    #[test]
    fn weight_zero_and_disabled_never_chosen() {
        for p in [
            RoutingPolicy::Random,
            RoutingPolicy::RoundRobin,
            RoutingPolicy::LeastOutstanding,
        ] {
            let d = disc(&[(1, 0.0, true), (2, 1.0, false), (3, 1.0, true)]);
            let c = counts(&d, p, 200);
            assert_eq!(c.len(), 1, "{p:?} {c:?}");
            assert_eq!(c["127.0.0.1:3"], 200);
        }
    }

    #[test]
    fn least_outstanding_prefers_idle_and_skips_tried_and_ejected() {
        let d = disc(&[(1, 1.0, true), (2, 1.0, true)]);
        let super::super::discovery::Lookup::Found(g) = d.lookup("m@llm") else {
            panic!()
        };
        let busy = InFlight::new(g.instances[0].clone());
        for _ in 0..50 {
            let i = choose(RoutingPolicy::LeastOutstanding, &d, &g, &[]).unwrap();
            assert_eq!(i.addr, "127.0.0.1:2");
        }
        drop(busy);
        assert_eq!(g.instances[0].state.outstanding.load(Ordering::Relaxed), 0);
        let i = choose(
            RoutingPolicy::LeastOutstanding,
            &d,
            &g,
            &["127.0.0.1:2".into()],
        )
        .unwrap();
        assert_eq!(i.addr, "127.0.0.1:1");
        for _ in 0..3 {
            d.record_failure(&g.instances[0], "test");
        }
        for _ in 0..20 {
            let i = choose(RoutingPolicy::Random, &d, &g, &[]).unwrap();
            assert_eq!(i.addr, "127.0.0.1:2");
        }
        // Ejected is still a last resort.
        let i = choose(RoutingPolicy::Random, &d, &g, &["127.0.0.1:2".into()]).unwrap();
        assert_eq!(i.addr, "127.0.0.1:1");
        assert!(
            choose(
                RoutingPolicy::Random,
                &d,
                &g,
                &["127.0.0.1:1".into(), "127.0.0.1:2".into()]
            )
            .is_none()
        );
    }
}
