//! Managed API keys in the apiserver (issue 17): who a request is, what it may use, and what
//! it used.
//!
//! The keys live in the controller's store ([`crate::wire::keys`]); the apiserver keeps a
//! copy ([`Tenancy`]) that a background loop refreshes every `--keys_sync_ms`: each sync
//! posts the usage counted since the last one and gets back the keys that changed and the
//! cluster-wide counts the limits need. Requests never wait for the controller: when it is
//! down the last known keys keep working, and usage is kept (bounded, [`MAX_BACKLOG`] rows)
//! until a sync goes through; on stop a last report is sent.
//!
//! Authentication ([`Tenancy::authenticate`]): a static `--api_keys` key has full access and
//! no limits; a managed key (`sk-dbgpt-<id>-…`) is found by its id and checked against its
//! salted hash once (then against a keyed SipHash of the verified secret, so a request does
//! not hash with SHA-256 every time); revoked and expired keys are told so (401). Keys are
//! required when static keys are configured or the controller has any managed key
//! (revoked ones count); with neither the apiserver is open, as without keys before.
//!
//! Admission ([`Tenancy::admit`], once the request's model is known): a key restricted to
//! some models gets a 403 for any other; then its limits and those of the model
//! ([`super::limits`]) admit the request or answer 429 with `Retry-After` and OpenAI's
//! `x-ratelimit-*` headers. An admitted request holds a [`Lease`] until its answer's body
//! ends or the client goes away ([`attach`]: the metrics layer feeds it the answer's `usage`
//! and drops it at the end); dropping it releases the concurrency slot and counts the
//! tokens and the usage row (key, model, UTC day). A managed key's stream whose client did
//! not ask for `stream_options.include_usage` asks the worker for it all the same
//! ([`stream_usage`]), and the usage chunk is taken out of the answer before the client
//! sees it ([`HideUsage`]): streams are counted by their real usage too.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::limits::{self, DAY_US, Exceeded, MINUTE_US, Scope, Status};
use crate::controller::client::{ClientError, ControllerClient};
use crate::openai::OpenAiError;
use crate::telemetry::metrics::usage::{Tokens, UsageScan};
use crate::telemetry::metrics::{Charge, TokenSink};
use crate::wire::keys::{
    self as wire, ApiKey, MinuteCount, Priority, SyncRequest, SyncResponse, UsageRow,
};

/// Most usage rows kept for a controller that does not answer (the oldest go first).
pub const MAX_BACKLOG: usize = 100_000;
/// Most usage rows in one report (a backlog goes in several, ~3 MB of JSON each).
pub const MAX_REPORT_ROWS: usize = 20_000;

/// How often a controller without the keys API (DB-GPT's own) is asked again.
pub const NO_KEYS_API_RETRY: Duration = Duration::from_secs(60);

/// The controller's key sync, as the apiserver calls it (a trait, so tests can answer it
/// from memory).
#[async_trait::async_trait]
pub trait KeySync: Send + Sync + 'static {
    async fn keys_sync(&self, req: &SyncRequest) -> Result<SyncResponse, ClientError>;
}

#[async_trait::async_trait]
impl KeySync for ControllerClient {
    async fn keys_sync(&self, req: &SyncRequest) -> Result<SyncResponse, ClientError> {
        ControllerClient::keys_sync(self, req).await
    }
}

/// Whether `e` says the controller has no keys API at all (DB-GPT's own controller answers
/// the sync route 404, FastAPI's 405 for a path it routes otherwise): nothing to sync, not a
/// failure.
pub fn no_keys_api(e: &ClientError) -> bool {
    matches!(e.status(), Some(404 | 405))
}

/// The known keys, replaced as a whole by each sync that changes them.
#[derive(Default)]
struct Table {
    version: u64,
    keys: HashMap<String, Arc<KeyEntry>>,
}

/// One key's record as of the last sync, with its counters.
pub struct KeyEntry {
    record: ApiKey,
    state: Arc<KeyState>,
    /// Keys the SipHash of verified secrets (random per entry).
    hasher: std::hash::RandomState,
    /// The keyed hash of the last secret that matched the record (0: none yet).
    verified: AtomicU64,
}

impl KeyEntry {
    fn new(record: ApiKey, state: Arc<KeyState>) -> Self {
        KeyEntry {
            record,
            state,
            hasher: std::hash::RandomState::new(),
            verified: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.record.spec.name
    }

    /// Whether `token` is this key's secret: a SipHash compare once verified, the salted
    /// SHA-256 otherwise.
    fn matches(&self, token: &str) -> bool {
        let h = self.hasher.hash_one(token.as_bytes()).max(1);
        if self.verified.load(Ordering::Relaxed) == h {
            return true;
        }
        if wire::key_matches(&self.record, token) {
            self.verified.store(h, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// A key's counters: kept by id across changes of its record.
struct KeyState {
    id: String,
    whole: Scope,
    models: RwLock<HashMap<String, Arc<Scope>>>,
    /// Usage since the last report, by model and UTC day number (looked up by `&str`: no
    /// allocation per request).
    usage: Mutex<HashMap<String, Vec<(i64, Usage)>>>,
    /// `/metrics` handles by model.
    handles: RwLock<HashMap<String, Arc<Handles>>>,
}

impl KeyState {
    fn new(id: &str) -> Self {
        KeyState {
            id: id.to_string(),
            whole: Scope::default(),
            models: RwLock::default(),
            usage: Mutex::default(),
            handles: RwLock::default(),
        }
    }

    /// The counters of this key on `model` (created at first use).
    fn scope(&self, model: &str) -> Arc<Scope> {
        if let Some(s) = read(&self.models).get(model) {
            return s.clone();
        }
        write(&self.models)
            .entry(model.to_string())
            .or_default()
            .clone()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    requests: u64,
    prompt: u64,
    completion: u64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who a request is.
#[derive(Clone)]
pub enum Caller {
    /// No keys are configured or known: the apiserver is open.
    Open,
    /// A static `--api_keys` key.
    Static,
    /// A managed key.
    Key(Arc<KeyEntry>),
}

impl Caller {
    /// The admission priority of the caller's requests (interactive but for batch keys).
    pub fn priority(&self) -> Priority {
        match self {
            Caller::Key(e) => e.record.spec.priority,
            _ => Priority::Interactive,
        }
    }

    /// Whether the caller may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            Caller::Key(e) => e
                .record
                .spec
                .models
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x == model)),
            _ => true,
        }
    }
}

/// The per-key `/metrics` families (labelled by key name, never the secret).
#[derive(Clone, Default)]
struct KeyMetrics {
    requests: Family<Vec<(&'static str, String)>, Counter>,
    tokens: Family<Vec<(&'static str, String)>, Counter>,
    limited: Family<Vec<(&'static str, String)>, Counter>,
}

/// One (key, model)'s resolved counters.
struct Handles {
    requests: Counter,
    prompt: Counter,
    completion: Counter,
}

/// The apiserver's managed keys, limits and usage; shared by every serving thread.
pub struct Tenancy {
    static_keys: Vec<String>,
    table: RwLock<Arc<Table>>,
    /// Counters by key id, kept across changes of the key (and its removal from a table).
    states: Mutex<HashMap<String, Arc<KeyState>>>,
    /// Usage rows a failed report keeps for the next one.
    backlog: Mutex<Vec<UsageRow>>,
    /// Whether a sync has gone through yet.
    synced: AtomicBool,
    /// Whether the table has any key (the open mode's check without a lock).
    any_keys: AtomicBool,
    /// The last sync was answered "no such route" (a controller without the keys API).
    no_keys_api: AtomicBool,
    metrics: KeyMetrics,
    /// This process, for the controller's per-apiserver minute counts.
    apiserver: String,
}

impl Tenancy {
    /// `apiserver` names this process in its reports (e.g. `host:port/pid`).
    pub fn new(static_keys: Vec<String>, apiserver: String) -> Self {
        Tenancy {
            static_keys,
            table: RwLock::default(),
            states: Mutex::default(),
            backlog: Mutex::default(),
            synced: AtomicBool::new(false),
            any_keys: AtomicBool::new(false),
            no_keys_api: AtomicBool::new(false),
            metrics: KeyMetrics::default(),
            apiserver,
        }
    }

    fn table(&self) -> Arc<Table> {
        read(&self.table).clone()
    }

    /// Whether requests must carry a key (static keys configured, or managed keys known).
    pub fn required(&self) -> bool {
        !self.static_keys.is_empty() || self.any_keys.load(Ordering::Relaxed)
    }

    /// Registers the per-key families.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "dbgpt_apiserver_key_requests",
            "Requests answered successfully per managed API key (by name) and model",
            self.metrics.requests.clone(),
        );
        r.register(
            "dbgpt_apiserver_key_tokens",
            "Tokens per managed API key (by name), model and kind (prompt, completion)",
            self.metrics.tokens.clone(),
        );
        r.register(
            "dbgpt_apiserver_key_rate_limited",
            "Requests refused (429) per managed API key (by name) and limit",
            self.metrics.limited.clone(),
        );
    }

    /// Who sent `headers`: the bearer key checked against the static and managed keys, or
    /// [`Caller::Open`] when no key is configured or known.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, OpenAiError> {
        if self.static_keys.is_empty() && !self.any_keys.load(Ordering::Relaxed) {
            return Ok(Caller::Open);
        }
        let token = bearer(headers)?;
        let table = read(&self.table);
        if let Some(e) = wire::key_id(token).and_then(|id| table.keys.get(id))
            && e.matches(token)
        {
            let name = e.name();
            if e.record.revoked_at.is_some() {
                return Err(OpenAiError::unauthorized(&format!(
                    "The API key '{name}' was revoked."
                )));
            }
            if let Some(at) = e.record.spec.expires_at
                && limits::now_us() / 1_000_000 >= at
            {
                let when = chrono::DateTime::from_timestamp(at, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_else(|| at.to_string());
                return Err(OpenAiError::unauthorized(&format!(
                    "The API key '{name}' expired at {when}."
                )));
            }
            return Ok(Caller::Key(e.clone()));
        }
        let mut ok = false;
        for k in &self.static_keys {
            ok |= super::same(k.as_bytes(), token.as_bytes());
        }
        if ok {
            Ok(Caller::Static)
        } else {
            Err(OpenAiError::unauthorized("Incorrect API key provided."))
        }
    }

    /// Admits a request of `caller` for `model`: `None` for callers without limits, a
    /// [`Lease`] to hold until the answer ends, or the 403/429 answer (boxed: the rare case).
    pub fn admit(&self, caller: &Caller, model: &str) -> Result<Option<Lease>, Box<Response>> {
        let Caller::Key(e) = caller else {
            return Ok(None);
        };
        if !caller.allows(model) {
            let allowed = e
                .record
                .spec
                .models
                .as_deref()
                .unwrap_or_default()
                .join(", ");
            return Err(OpenAiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "model_not_allowed",
                format!(
                    "The API key '{}' may not use model '{model}' (allowed: {allowed}).",
                    e.name()
                ),
            )
            .with_param("model")
            .into_response()
            .into());
        }
        let now = limits::now_us();
        let spec = &e.record.spec;
        let mut status = e
            .state
            .whole
            .admit(&spec.limits, now)
            .map_err(|x| Box::new(self.refuse(e, None, x)))?;
        let mut model_scope = None;
        if let Some(l) = spec.model_limits.get(model) {
            let scope = e.state.scope(model);
            match scope.admit(l, now) {
                Ok(s) => {
                    status.requests = status.requests.or(s.requests);
                    status.tokens = status.tokens.or(s.tokens);
                    model_scope = Some(scope);
                }
                Err(x) => {
                    e.state.whole.cancel(&spec.limits, now);
                    return Err(Box::new(self.refuse(e, Some(model), x)));
                }
            }
        }
        Ok(Some(Lease {
            entry: e.clone(),
            model: model.to_string(),
            model_scope,
            status,
            prompt: AtomicU64::new(0),
            completion: AtomicU64::new(0),
            ok: AtomicBool::new(false),
            hide_usage: false,
            metrics: self.metrics.clone(),
        }))
    }

    /// The 429 of a request over a limit.
    fn refuse(&self, e: &KeyEntry, model: Option<&str>, x: Exceeded) -> Response {
        self.metrics
            .limited
            .get_or_create(&vec![
                ("key", e.name().to_string()),
                ("limit", x.kind.as_str().to_string()),
            ])
            .inc();
        let what = match x.kind {
            limits::LimitKind::Rpm => "requests per minute",
            limits::LimitKind::Tpm => "tokens per minute",
            limits::LimitKind::MaxConcurrency => "concurrent requests",
            limits::LimitKind::DailyTokens => "tokens per day (UTC)",
        };
        let on = model
            .map(|m| format!(" on model '{m}'"))
            .unwrap_or_default();
        let retry = limits::openai_duration(x.retry_after_us);
        let msg = format!(
            "Rate limit reached for API key '{}'{on} on {what} ({}): limit {}, used {}. Please try again in {retry}.",
            e.name(),
            x.kind.as_str(),
            x.limit,
            x.used,
        );
        let mut err = OpenAiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            x.kind.unit(),
            "rate_limit_exceeded",
            msg,
        );
        err.retry_after = Some(
            limits::ceil_div(x.retry_after_us.max(0), 1_000_000).clamp(1, u32::MAX as i64) as u32,
        );
        let mut resp = err.into_response();
        let h = resp.headers_mut();
        h.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(limits::ceil_div(x.retry_after_us.max(0), 1_000).max(1)),
        );
        // The figures of the scope that refused (the key's own, or the key on the model).
        let limits = match model {
            Some(m) => e
                .record
                .spec
                .model_limits
                .get(m)
                .copied()
                .unwrap_or_default(),
            None => e.record.spec.limits,
        };
        let scope = match model {
            Some(m) => e.state.scope(m),
            None => return with_status(resp, &e.state.whole.status(&limits, limits::now_us())),
        };
        let st = scope.status(&limits, limits::now_us());
        with_status(resp, &st)
    }

    /// Builds the next report: usage and minute counts since the last one (what it takes
    /// is restored by [`Tenancy::sync_failed`] when the report does not go through).
    pub fn take_report(&self) -> SyncRequest {
        let table = self.table();
        let states: Vec<Arc<KeyState>> = lock(&self.states).values().cloned().collect();
        let mut usage = std::mem::take(&mut *lock(&self.backlog));
        let mut minute = Vec::new();
        for st in &states {
            for (model, days) in lock(&st.usage).drain() {
                for (day, u) in days {
                    usage.push(UsageRow {
                        key_id: st.id.clone(),
                        key_name: String::new(),
                        model: model.clone(),
                        day: day_string(day),
                        requests: u.requests,
                        prompt_tokens: u.prompt,
                        completion_tokens: u.completion,
                    });
                }
            }
            let scopes = std::iter::once((String::new(), &st.whole as &Scope));
            let models = read(&st.models);
            for (model, scope) in scopes.chain(models.iter().map(|(m, s)| (m.clone(), &**s))) {
                for (m, c) in scope.take_report() {
                    minute.push(MinuteCount {
                        key_id: st.id.clone(),
                        model: model.clone(),
                        minute: m,
                        requests: c.requests,
                        tokens: c.tokens,
                    });
                }
            }
        }
        if usage.len() > MAX_REPORT_ROWS {
            // The newest rows wait for the next report.
            let rest = usage.split_off(MAX_REPORT_ROWS);
            let mut backlog = lock(&self.backlog);
            let mut rows = rest;
            rows.append(&mut backlog);
            *backlog = rows;
        }
        SyncRequest {
            apiserver: self.apiserver.clone(),
            since_version: table.version,
            usage,
            minute,
        }
    }

    /// A report did not go through: its usage rows wait for the next one (at most
    /// [`MAX_BACKLOG`], the oldest dropped), its minute counts too.
    pub fn sync_failed(&self, report: SyncRequest) {
        let mut backlog = lock(&self.backlog);
        let mut rows = report.usage;
        rows.append(&mut backlog);
        if rows.len() > MAX_BACKLOG {
            let dropped = rows.len() - MAX_BACKLOG;
            warn!(
                dropped,
                "the controller has not taken usage reports for a while; the oldest rows are dropped"
            );
            rows.drain(..dropped);
        }
        *backlog = rows;
        drop(backlog);
        for st in lock(&self.states).values() {
            st.whole.sync_failed();
            for s in read(&st.models).values() {
                s.sync_failed();
            }
        }
    }

    /// Applies the controller's answer to a report: changed keys, cluster-wide counts.
    pub fn synced(&self, resp: SyncResponse, since_version: u64) {
        let now = limits::now_us();
        // Keys.
        let old = self.table();
        if !resp.keys.is_empty() || resp.version != old.version {
            let full = since_version == 0;
            let mut keys = if full {
                HashMap::new()
            } else {
                old.keys.clone()
            };
            let mut states = lock(&self.states);
            for k in resp.keys {
                let st = states
                    .entry(k.id.clone())
                    .or_insert_with(|| Arc::new(KeyState::new(&k.id)))
                    .clone();
                keys.insert(k.id.clone(), Arc::new(KeyEntry::new(k, st)));
            }
            // A store that went back (a new one): ask for every key next time.
            let version = if resp.version < since_version {
                warn!(
                    had = since_version,
                    now = resp.version,
                    "the key store's version went back; fetching every key again"
                );
                0
            } else {
                resp.version
            };
            if keys.len() != old.keys.len() {
                info!(keys = keys.len(), "managed API keys loaded");
            }
            self.any_keys.store(!keys.is_empty(), Ordering::Relaxed);
            *write(&self.table) = Arc::new(Table { version, keys });
        }
        // Cluster-wide counts.
        let mut by_scope: HashMap<(&str, &str), Vec<(i64, limits::Count)>> = HashMap::new();
        for m in &resp.minute {
            by_scope
                .entry((m.key_id.as_str(), m.model.as_str()))
                .or_default()
                .push((
                    m.minute,
                    limits::Count {
                        requests: m.requests,
                        tokens: m.tokens,
                    },
                ));
        }
        let minute = now.div_euclid(MINUTE_US);
        let covered = [minute, minute - 1];
        let day = now.div_euclid(DAY_US);
        for st in lock(&self.states).values() {
            let id = st.id.as_str();
            let get = |model: &str| -> Vec<(i64, limits::Count)> {
                by_scope.get(&(id, model)).cloned().unwrap_or_default()
            };
            let daily = resp.daily_tokens.get(&st.id).map(|t| (day, *t));
            st.whole.synced(covered, &get(""), daily);
            for (model, s) in read(&st.models).iter() {
                let daily = resp
                    .daily_tokens
                    .get(&format!("{}/{model}", st.id))
                    .map(|t| (day, *t));
                s.synced(covered, &get(model), daily);
            }
        }
        self.synced.store(true, Ordering::Relaxed);
    }

    /// One sync with the controller; `Err` says why it failed (the usage is kept).
    pub async fn sync_once(&self, client: &dyn KeySync) -> Result<(), ClientError> {
        let report = self.take_report();
        match client.keys_sync(&report).await {
            Ok(resp) => {
                if self.no_keys_api.swap(false, Ordering::Relaxed) {
                    info!("managed API keys: the controller serves the keys API now");
                }
                self.synced(resp, report.since_version);
                Ok(())
            }
            Err(e) => {
                if no_keys_api(&e) && !self.no_keys_api.swap(true, Ordering::Relaxed) {
                    info!(
                        error = %e,
                        retry_secs = NO_KEYS_API_RETRY.as_secs(),
                        "managed API keys: the controller has no keys API (DB-GPT's own controller?); only --api_keys apply, asked again every retry_secs"
                    );
                }
                self.sync_failed(report);
                Err(e)
            }
        }
    }

    /// Syncs every `every` until `shutdown`, then once more (the last usage report).
    pub fn spawn_loop(
        self: &Arc<Self>,
        client: Arc<dyn KeySync>,
        every: Duration,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            let mut last = tokio::time::Instant::now();
            loop {
                // A controller without the keys API is asked every NO_KEYS_API_RETRY only.
                let wait = if me.no_keys_api.load(Ordering::Relaxed) {
                    NO_KEYS_API_RETRY
                } else {
                    every
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(last + wait) => {}
                    _ = shutdown.cancelled() => break,
                }
                last = tokio::time::Instant::now();
                match me.sync_once(&*client).await {
                    Ok(()) if failing => {
                        failing = false;
                        info!("managed API keys: the controller answers the key sync again");
                    }
                    Ok(()) => {}
                    // Not a failure (`sync_once` said so once).
                    Err(e) if no_keys_api(&e) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "managed API keys: key sync failed; the last known keys stay in use and usage is kept");
                    }
                    Err(e) => debug!(error = %e, "key sync failed again"),
                }
            }
        })
    }

    /// The last report, on stop (after in-flight requests ended).
    pub async fn final_report(&self, client: &dyn KeySync) {
        if let Err(e) = self.sync_once(client).await {
            let rows = lock(&self.backlog).len();
            if no_keys_api(&e) && rows == 0 {
                return;
            }
            warn!(error = %e, rows, "the last usage report failed; its usage is lost");
        }
    }

    /// Whether the controller said it has no keys API (at the last sync).
    pub fn controller_has_no_keys_api(&self) -> bool {
        self.no_keys_api.load(Ordering::Relaxed)
    }

    /// Whether a sync has gone through.
    pub fn has_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Known managed keys (for the admin status).
    pub fn key_count(&self) -> usize {
        read(&self.table).keys.len()
    }
}

/// `YYYY-MM-DD` of a UTC day number.
fn day_string(day: i64) -> String {
    chrono::DateTime::from_timestamp(day * 86_400, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// The bearer token of `headers`.
fn bearer(headers: &HeaderMap) -> Result<&str, OpenAiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match given {
        None => Err(OpenAiError::unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        )),
        Some(h) => match h.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(t.trim()),
            _ => Err(OpenAiError::unauthorized(
                "Malformed Authorization header; expected 'Bearer <key>'.",
            )),
        },
    }
}

/// Adds OpenAI's `x-ratelimit-*` headers for the figures in `st`.
fn with_status(mut resp: Response, st: &Status) -> Response {
    let h = resp.headers_mut();
    let mut put = |name: &'static str, v: HeaderValue| {
        h.insert(HeaderName::from_static(name), v);
    };
    if let Some(r) = st.requests {
        put("x-ratelimit-limit-requests", r.limit.into());
        put("x-ratelimit-remaining-requests", r.remaining.into());
        put(
            "x-ratelimit-reset-requests",
            HeaderValue::from_str(&limits::openai_duration(r.reset_us))
                .unwrap_or(HeaderValue::from_static("0s")),
        );
    }
    if let Some(t) = st.tokens {
        put("x-ratelimit-limit-tokens", t.limit.into());
        put("x-ratelimit-remaining-tokens", t.remaining.into());
        put(
            "x-ratelimit-reset-tokens",
            HeaderValue::from_str(&limits::openai_duration(t.reset_us))
                .unwrap_or(HeaderValue::from_static("0s")),
        );
    }
    resp
}

/// An admitted request of a managed key: held until its answer's body ends.
pub struct Lease {
    entry: Arc<KeyEntry>,
    model: String,
    model_scope: Option<Arc<Scope>>,
    status: Status,
    prompt: AtomicU64,
    completion: AtomicU64,
    /// The answer was a success (its usage counts).
    ok: AtomicBool,
    /// The stream's usage chunk is ours, not the client's ([`stream_usage`]).
    hide_usage: bool,
    metrics: KeyMetrics,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.entry.name())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl TokenSink for Lease {
    fn tokens(&self, t: Tokens) {
        self.prompt.fetch_add(t.prompt_tokens, Ordering::Relaxed);
        self.completion
            .fetch_add(t.completion_tokens, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let now = limits::now_us();
        let (p, c) = (*self.prompt.get_mut(), *self.completion.get_mut());
        let e = &self.entry;
        e.state.whole.release(&e.record.spec.limits, p + c, now);
        if let Some(s) = &self.model_scope {
            let l = e
                .record
                .spec
                .model_limits
                .get(&self.model)
                .copied()
                .unwrap_or_default();
            s.release(&l, p + c, now);
        }
        if !*self.ok.get_mut() {
            return;
        }
        {
            let day = now.div_euclid(DAY_US);
            let mut usage = lock(&e.state.usage);
            let days = match usage.get_mut(self.model.as_str()) {
                Some(d) => d,
                None => usage.entry(self.model.clone()).or_default(),
            };
            let u = match days.iter().position(|(d, _)| *d == day) {
                Some(i) => &mut days[i].1,
                None => {
                    days.push((day, Usage::default()));
                    &mut days.last_mut().expect("just pushed").1
                }
            };
            u.requests += 1;
            u.prompt += p;
            u.completion += c;
        }
        let h = self.handles();
        h.requests.inc();
        h.prompt.inc_by(p);
        h.completion.inc_by(c);
    }
}

impl Lease {
    /// The `/metrics` handles of this key and model.
    fn handles(&self) -> Arc<Handles> {
        let st = &self.entry.state;
        if let Some(h) = read(&st.handles).get(&self.model) {
            return h.clone();
        }
        let name = self.entry.name().to_string();
        let m = &self.metrics;
        let tokens = |kind: &str| {
            m.tokens.get_or_create_owned(&vec![
                ("key", name.clone()),
                ("model", self.model.clone()),
                ("kind", kind.to_string()),
            ])
        };
        let h = Arc::new(Handles {
            requests: m
                .requests
                .get_or_create_owned(&vec![("key", name.clone()), ("model", self.model.clone())]),
            prompt: tokens("prompt"),
            completion: tokens("completion"),
        });
        write(&st.handles)
            .entry(self.model.clone())
            .or_insert(h)
            .clone()
    }
}

/// Puts `lease` on the answer (with the `x-ratelimit-*` headers of a limited key) for the
/// metrics layer, which feeds it the answer's usage and drops it when the body ends; or,
/// when the stream's usage chunk is to be hidden, wraps the body in [`HideUsage`].
pub fn attach(resp: Response, lease: Option<Lease>) -> Response {
    let Some(lease) = lease else {
        return resp;
    };
    lease
        .ok
        .store(resp.status().is_success(), Ordering::Relaxed);
    let hide = lease.hide_usage && is_sse(&resp);
    let mut resp = with_status(resp, &lease.status);
    let lease = Arc::new(lease);
    if hide {
        let (parts, body) = resp.into_parts();
        let body = crate::http::boxed_body(HideUsage { inner: body, lease });
        return Response::from_parts(parts, body);
    }
    resp.extensions_mut().insert(Charge(lease));
    resp
}

fn is_sse(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// For a managed key's stream whose client did not ask for `stream_options.include_usage`:
/// the body that asks for it (the usage chunk is hidden from the client again, see
/// [`attach`]), and `r` marked so. Anything else is left as it is.
pub fn stream_usage(
    r: &mut crate::openai::CompletionRequest,
    body: bytes::Bytes,
    lease: &mut Option<Lease>,
) -> bytes::Bytes {
    let Some(l) = lease else {
        return body;
    };
    if !r.stream || r.include_usage {
        return body;
    }
    let Ok(mut o) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
    else {
        return body;
    };
    match o.get_mut("stream_options") {
        Some(serde_json::Value::Object(so)) => {
            so.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
        _ => {
            o.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
    }
    match serde_json::to_vec(&o) {
        Ok(v) => {
            r.include_usage = true;
            l.hide_usage = true;
            v.into()
        }
        Err(_) => body,
    }
}

/// A stream body without its usage chunk (the event with `"choices":[]` and a `usage`
/// object), whose counts go to the lease instead; the lease is dropped with the body. The
/// relays send whole events per frame.
struct HideUsage {
    inner: axum::body::Body,
    lease: Arc<Lease>,
}

static EMPTY_CHOICES: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"choices\":[]"));

impl HideUsage {
    /// `data` without its usage events (fed to the lease); `None`: nothing to take out.
    fn filter(&self, data: &bytes::Bytes) -> Option<bytes::Bytes> {
        EMPTY_CHOICES.find(data)?;
        let mut kept = Vec::with_capacity(data.len());
        let mut rest: &[u8] = data;
        while !rest.is_empty() {
            let end = memchr::memmem::find(rest, b"\n\n").map_or(rest.len(), |i| i + 2);
            let (ev, tail) = rest.split_at(end);
            rest = tail;
            if EMPTY_CHOICES.find(ev).is_some()
                && let Some(t) = UsageScan::default().feed(ev)
            {
                self.lease.tokens(t);
                continue;
            }
            kept.extend_from_slice(ev);
        }
        Some(kept.into())
    }
}

impl hyper::body::Body for HideUsage {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        use std::task::Poll;
        loop {
            let this = &mut *self;
            let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
            let Poll::Ready(Some(Ok(frame))) = polled else {
                return polled;
            };
            let Some(data) = frame.data_ref() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            match this.filter(data) {
                None => return Poll::Ready(Some(Ok(frame))),
                Some(kept) if kept.is_empty() => continue,
                Some(kept) => return Poll::Ready(Some(Ok(hyper::body::Frame::data(kept)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests;
