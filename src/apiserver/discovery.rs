//! Discovery: the apiserver's in-memory view of worker instances, per `model@type`.
//!
//! One background loop asks the controller(s) for every instance (`healthy_only=false`, so a
//! registered model whose instances are all down answers 503 rather than 404) on an interval,
//! and at once when a request reports a failure; requests for a model in the view never wait
//! for the controller. A request for a model *not* in the view refreshes it once before its
//! 404 ([`Discovery::refresh_after_miss`]), so a model registered a moment ago is found:
//! concurrent misses share one controller request, and misses refresh at most once per
//! [`MISS_REFRESH_GAP`].
//! When every controller is down the last view keeps serving. Per-instance state (requests in
//! flight, round-robin credit, the outlier state judged from live traffic ([`super::outlier`]),
//! the mark of a draining worker) lives in a map keyed by instance identity, so it survives
//! refreshes. An ejected or draining instance is avoided unless nothing else is left; a
//! refresh that shows an instance coming back (unhealthy or absent before, healthy now)
//! clears both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::outlier::{self, Change, Ejection, Outlier};
use super::pool::Target;
use crate::controller::client::ControllerClient;
use crate::wire::controller::{ModelInstance, split_worker_key};
use crate::wire::worker::WorkerType;

/// How long an instance whose worker said it is draining is avoided (unless a refresh shows
/// it registered again first).
pub const DRAINING_FOR: Duration = Duration::from_secs(10);
/// How long an instance that lacks the native OpenAI routes is served through DB-GPT's
/// worker API before it is asked again.
pub const LEGACY_FOR: Duration = Duration::from_secs(60);
/// Minimum gap between two failure-triggered refreshes.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);
/// Minimum gap between two refreshes caused by look-up misses.
pub const MISS_REFRESH_GAP: Duration = Duration::from_millis(250);

/// Mutable per-instance state that survives refreshes.
#[derive(Debug, Default)]
pub struct InstanceState {
    /// Requests currently in flight on this instance.
    pub outstanding: AtomicU64,
    /// Requests sent to this instance since start.
    pub served: AtomicU64,
    /// Smooth weighted round-robin credit.
    pub rr_current: AtomicI64,
    /// Milliseconds (since discovery start) until which the instance is avoided because its
    /// worker is draining; 0 = never.
    draining_until_ms: AtomicU64,
    /// Health judged from live traffic.
    pub outlier: Outlier,
    /// Milliseconds (since discovery start) until which the instance is taken for a worker
    /// without the native OpenAI routes (DB-GPT's own); 0 = never seen so.
    legacy_until_ms: AtomicU64,
}

/// One worker instance as the apiserver sees it.
#[derive(Debug)]
pub struct Instance {
    /// `host:port`, also the instance's identity within a model.
    pub addr: String,
    /// `http://host:port` (IPv6 hosts bracketed).
    pub base_url: String,
    /// The worker's address for the connection pool, parsed once per refresh instead of
    /// once per request; `None` if the registered host does not make a valid URL (requests
    /// to it fail and are retried).
    pub target: Option<Target>,
    pub weight: f64,
    pub enabled: bool,
    pub healthy: bool,
    pub state: Arc<InstanceState>,
}

impl Instance {
    /// Can the policy ever choose it?
    pub fn routable(&self) -> bool {
        self.healthy && self.enabled && self.weight > 0.0
    }
}

/// The pool target of a worker at `base_url` (`http://host:port`); `None` unless it is a
/// plain `http://` URL with a host.
fn worker_target(base_url: &str) -> Option<Target> {
    let uri = http::Uri::try_from(base_url).ok()?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) || uri.path() != "/" {
        return None;
    }
    Target::new(&uri)
}

/// Every instance of one `model@type`.
#[derive(Debug, Default)]
pub struct Group {
    pub instances: Vec<Arc<Instance>>,
    /// Serialises round-robin credit updates.
    pub rr_lock: Mutex<()>,
}

/// A snapshot of the whole view.
#[derive(Debug, Default)]
pub struct View {
    pub groups: HashMap<String, Arc<Group>>,
}

impl View {
    /// Model names (without the type) of `worker_type` with at least one routable instance.
    pub fn models(&self, worker_type: WorkerType) -> Vec<String> {
        let mut v: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.instances.iter().any(|i| i.routable()))
            .filter_map(|(k, _)| {
                let (name, ty) = split_worker_key(k)?;
                (ty == worker_type.as_str()).then(|| name.to_string())
            })
            .collect();
        v.sort();
        v
    }
}

/// What a look-up of `model@type` found.
pub enum Lookup {
    /// Never registered (or no longer listed).
    Unknown,
    /// Registered, but no instance can take requests.
    NoneRoutable,
    Found(Arc<Group>),
}

/// The discovery service.
pub struct Discovery {
    client: ControllerClient,
    view: RwLock<Arc<View>>,
    states: Mutex<HashMap<(String, String), Arc<InstanceState>>>,
    wake: Notify,
    epoch: Instant,
    last_ok: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    last_trigger: Mutex<Option<Instant>>,
    refreshes: AtomicU64,
    /// Completed refreshes (successful or not): a miss that waited while one completed
    /// looks again instead of asking the controller itself.
    completed: AtomicU64,
    /// Held by the miss that refreshes; holds when the last miss-refresh started.
    miss_refresh: tokio::sync::Mutex<Option<Instant>>,
    miss_gap: Duration,
    /// Outlier detection ([`super::outlier`]).
    outlier: outlier::Settings,
}

fn base_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

impl Discovery {
    pub fn new(client: ControllerClient) -> Self {
        Discovery {
            client,
            view: RwLock::new(Arc::new(View::default())),
            states: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            epoch: Instant::now(),
            last_ok: Mutex::new(None),
            last_error: Mutex::new(None),
            last_trigger: Mutex::new(None),
            refreshes: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            miss_refresh: tokio::sync::Mutex::new(None),
            miss_gap: MISS_REFRESH_GAP,
            outlier: outlier::Settings::default(),
        }
    }

    /// The same discovery with outlier detection set to `settings`.
    pub fn with_outlier(mut self, settings: outlier::Settings) -> Self {
        self.outlier = settings;
        self
    }

    /// After a look-up miss: refreshes the view, unless a refresh completed while this miss
    /// waited for another miss's refresh (coalesced: N concurrent misses, one controller
    /// request). Miss-refreshes start at least [`MISS_REFRESH_GAP`] apart: a miss within the
    /// gap waits for its end (so a flood of unknown models cannot flood the controller, and
    /// no miss is answered from a view older than its arrival). Returns whether the view may
    /// have changed since the miss, i.e. whether looking again is worth it.
    pub async fn refresh_after_miss(&self) -> bool {
        let seen = self.completed.load(Ordering::Acquire);
        let mut last = self.miss_refresh.lock().await;
        if self.completed.load(Ordering::Acquire) != seen {
            return true;
        }
        if let Some(t) = *last {
            tokio::time::sleep_until((t + self.miss_gap).into()).await;
            if self.completed.load(Ordering::Acquire) != seen {
                return true;
            }
        }
        *last = Some(Instant::now());
        self.refresh().await
    }

    /// The controller URLs.
    pub fn controllers(&self) -> String {
        self.client.urls().join(",")
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The current snapshot.
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Looks up `key` (`model@type`).
    pub fn lookup(&self, key: &str) -> Lookup {
        let view = self.view();
        match view.groups.get(key) {
            None => Lookup::Unknown,
            Some(g) if !g.instances.iter().any(|i| i.routable()) => Lookup::NoneRoutable,
            Some(g) => Lookup::Found(g.clone()),
        }
    }

    /// Should the policy pass it over while other candidates are left? (Ejected by outlier
    /// detection with no trial due, or draining.)
    pub fn avoids(&self, i: &Instance) -> bool {
        !i.state.outlier.admits(outlier::now_ms())
            || i.state.draining_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// The instance's ejection, if it is ejected.
    pub fn ejection(&self, i: &Instance) -> Option<Ejection> {
        i.state.outlier.ejection(outlier::now_ms())
    }

    /// Is the instance known (lately) to lack the native OpenAI routes?
    pub fn is_legacy(&self, i: &Instance) -> bool {
        i.state.legacy_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Remembers for [`LEGACY_FOR`] that the instance has no native OpenAI routes (it
    /// answered them with a plain 404), so its requests take DB-GPT's worker API directly;
    /// then it is asked again (it may have been replaced by one of ours).
    pub fn mark_legacy(&self, i: &Instance) {
        let until = self.now_ms() + LEGACY_FOR.as_millis() as u64;
        if i.state.legacy_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::info!(instance = %crate::telemetry::Escaped(&i.addr), "worker has no native OpenAI routes (a DB-GPT worker): using DB-GPT's worker API");
        }
    }

    /// Records that a call to the instance failed (a connect error, a 5xx, a stall: see
    /// [`super::outlier`]) and asks for a refresh; the ejection it caused, if any.
    pub fn record_failure(&self, i: &Instance, reason: &str) -> Option<Duration> {
        let change = i.state.outlier.failure(outlier::now_ms(), &self.outlier);
        let addr = crate::telemetry::Escaped(&i.addr);
        let reason = crate::telemetry::Escaped(reason);
        self.request_refresh();
        match change {
            Change::Ejected { backoff, nth } => {
                warn!(instance = %addr, %reason, backoff_secs = backoff.as_secs_f64(), ejection = nth, "worker call failed; instance ejected");
                Some(backoff)
            }
            _ => {
                warn!(instance = %addr, %reason, "worker call failed");
                None
            }
        }
    }

    /// Records that the instance answered a call.
    pub fn record_success(&self, i: &Instance) {
        if i.state.outlier.success(outlier::now_ms()) == Change::Restored {
            info!(instance = %crate::telemetry::Escaped(&i.addr), "instance answered its trial request; back in rotation");
        }
    }

    /// Notes that a worker answered with [`crate::http::DRAINING_HEADER`] (it is stopping):
    /// new requests avoid it as they avoid an ejected instance (it is used only when no other
    /// is left) for [`DRAINING_FOR`] or until a refresh shows it registered again, and the
    /// view is refreshed now. Draining is not a failure: it does not count towards ejection.
    pub fn mark_draining(&self, i: &Instance) {
        let now = self.now_ms();
        let until = now + DRAINING_FOR.as_millis() as u64;
        if i.state.draining_until_ms.swap(until, Ordering::Relaxed) <= now {
            info!(instance = %crate::telemetry::Escaped(&i.addr), "worker is draining: new requests go to other instances");
            self.request_refresh();
        }
    }

    /// Asks the refresh loop to run now (coalesced, at most every 200 ms).
    pub fn request_refresh(&self) {
        let mut last = self.last_trigger.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_GAP) {
            return;
        }
        *last = Some(Instant::now());
        self.wake.notify_one();
    }

    /// Fetches the instance list once and swaps the view; on failure keeps the old view.
    pub async fn refresh(&self) -> bool {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let ok = match self.client.poll_all().await {
            Ok(list) => {
                self.install(list);
                *self.last_ok.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                let was = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if was.is_some() {
                    info!("controller reachable again; instance view refreshed");
                }
                true
            }
            Err(e) => {
                let msg = e.to_string();
                let mut le = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
                if le.as_deref() != Some(msg.as_str()) {
                    warn!(error = %crate::telemetry::Escaped(&msg), "cannot refresh instances; serving from the last view");
                }
                *le = Some(msg);
                false
            }
        };
        self.completed.fetch_add(1, Ordering::Release);
        ok
    }

    /// Replaces the view with `list` (the controller's answer).
    pub fn install(&self, list: Vec<ModelInstance>) {
        let old = self.view();
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::HashSet::new();
        let mut groups: HashMap<String, Vec<Arc<Instance>>> = HashMap::new();
        for m in list {
            let Some((_, ty)) = split_worker_key(&m.model_name) else {
                continue;
            };
            if WorkerType::from_wire(ty).is_none() {
                continue;
            }
            let addr = format!("{}:{}", m.host, m.port);
            let id = (m.model_name.clone(), addr.clone());
            if !seen.insert(id.clone()) {
                continue;
            }
            let state = states.entry(id).or_default().clone();
            let healthy = m.healthy.unwrap_or(false);
            let was_healthy = old
                .groups
                .get(&m.model_name)
                .and_then(|g| g.instances.iter().find(|i| i.addr == addr))
                .is_some_and(|i| i.healthy);
            if healthy && !was_healthy {
                // Came back (or is new): forget old failures and a drain.
                state.draining_until_ms.store(0, Ordering::Relaxed);
                state.outlier.reset();
            }
            let weight = m.weight.unwrap_or(1.0);
            let base = base_url(&m.host, m.port);
            groups
                .entry(m.model_name.clone())
                .or_default()
                .push(Arc::new(Instance {
                    target: worker_target(&base),
                    base_url: base,
                    addr,
                    weight: if weight.is_finite() {
                        weight.max(0.0)
                    } else {
                        0.0
                    },
                    enabled: m.enabled.unwrap_or(true),
                    healthy,
                    state,
                }));
        }
        states.retain(|k, _| seen.contains(k));
        drop(states);
        let groups = groups
            .into_iter()
            .map(|(k, mut instances)| {
                instances.sort_by(|a, b| a.addr.cmp(&b.addr));
                (
                    k,
                    Arc::new(Group {
                        instances,
                        rr_lock: Mutex::new(()),
                    }),
                )
            })
            .collect();
        debug!("instance view refreshed");
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(View { groups });
    }

    /// Seconds since the last successful refresh, and the last error if the latest failed.
    pub fn freshness(&self) -> (Option<Duration>, Option<String>) {
        let ok = self
            .last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed());
        let err = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (ok, err)
    }

    /// Refreshes every `interval` and whenever [`Self::request_refresh`] is called, until
    /// `shutdown`.
    pub fn spawn_loop(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                    _ = me.wake.notified() => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = me.refresh() => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, port: u16, healthy: bool) -> ModelInstance {
        ModelInstance {
            model_name: name.into(),
            host: "127.0.0.1".into(),
            port,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: Some(healthy),
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: None,
        }
    }

    #[test]
    fn view_groups_and_state_survives_refresh() {
        let d = Discovery::new(
            ControllerClient::new("http://127.0.0.1:1", Duration::from_secs(1)).unwrap(),
        );
        d.install(vec![
            inst("a@llm", 1, true),
            inst("a@llm", 2, true),
            inst("e@text2vec", 3, true),
            inst("WorkerManager@service", 4, true),
            inst("down@llm", 5, false),
        ]);
        let v = d.view();
        assert_eq!(v.models(WorkerType::Llm), ["a"]);
        assert_eq!(v.models(WorkerType::Text2vec), ["e"]);
        assert!(matches!(d.lookup("down@llm"), Lookup::NoneRoutable));
        assert!(matches!(d.lookup("zz@llm"), Lookup::Unknown));
        let Lookup::Found(g) = d.lookup("a@llm") else {
            panic!()
        };
        g.instances[0].state.outstanding.store(7, Ordering::Relaxed);
        for _ in 0..3 {
            d.record_failure(&g.instances[1], "test");
        }
        assert!(d.avoids(&g.instances[1]));
        assert!(d.ejection(&g.instances[1]).is_some());
        // Still healthy in the next list: state and ejection survive.
        d.install(vec![inst("a@llm", 1, true), inst("a@llm", 2, true)]);
        let Lookup::Found(g) = d.lookup("a@llm") else {
            panic!()
        };
        assert_eq!(g.instances[0].state.outstanding.load(Ordering::Relaxed), 7);
        assert!(d.avoids(&g.instances[1]));
        // Goes away, then comes back: the ejection is forgotten.
        d.install(vec![inst("a@llm", 1, true), inst("a@llm", 2, false)]);
        d.install(vec![inst("a@llm", 1, true), inst("a@llm", 2, true)]);
        let Lookup::Found(g) = d.lookup("a@llm") else {
            panic!()
        };
        assert!(!d.avoids(&g.instances[1]));
        assert!(d.ejection(&g.instances[1]).is_none());
    }

    /// A controller on 127.0.0.1 that lists `name@llm` and records when it was asked.
    async fn counting_controller(name: &'static str) -> (String, Arc<Mutex<Vec<Instant>>>) {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        let app = axum::Router::new().route(
            crate::wire::controller::MODELS_PATH,
            axum::routing::get(move || {
                h.lock().unwrap().push(Instant::now());
                async move { axum::Json(vec![inst(&format!("{name}@llm"), 9, true)]) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }

    #[tokio::test]
    async fn misses_share_one_refresh_and_are_rate_bounded() {
        let (url, hits) = counting_controller("new").await;
        let mut d = Discovery::new(ControllerClient::new(&url, Duration::from_secs(5)).unwrap());
        d.miss_gap = Duration::from_millis(300);
        let count = || hits.lock().unwrap().len();
        assert!(matches!(d.lookup("new@llm"), Lookup::Unknown));
        // Eight concurrent misses (all polled before any answer can arrive: this runtime has
        // one thread): one controller request, and every miss may look again.
        let misses = futures::future::join_all((0..8).map(|_| d.refresh_after_miss())).await;
        assert_eq!(misses, [true; 8]);
        assert_eq!(count(), 1);
        assert!(matches!(d.lookup("new@llm"), Lookup::Found(_)));
        // The next miss refreshes again, but not before the gap has passed.
        let first = d.miss_refresh.lock().await.expect("a miss refreshed");
        assert!(d.refresh_after_miss().await);
        let at = hits.lock().unwrap().clone();
        assert_eq!(at.len(), 2);
        assert!(at[1] >= first + d.miss_gap);
    }
}
