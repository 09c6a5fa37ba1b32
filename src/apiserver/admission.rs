//! Admission: a bounded queue per model with priorities, and hold-and-wake.
//!
//! Every completion and embeddings request passes a per-model [`Gate`] before its first
//! worker call ([`Admission::admit`]). The gate admits at most `--max_instance_concurrency`
//! × routable instances requests of the model at once (no bound when it is 0); beyond that
//! requests wait in the model's queue, interactive before batch ([`Priority`]), first come
//! first served within a class, until a request of the model finishes (its [`Ticket`] drops:
//! the natural hook, since the ticket lives as long as the answer) or an instance appears
//! (a [`TICK`] re-reads the view). A request whose every instance answered *overloaded* (503
//! with `Retry-After`) goes back to the queue keeping its place ([`Admission::again`]); the
//! gate then pauses (at most [`OVERLOADED_PAUSE_MAX`], or until a request of the model
//! finishes) before it tries again. Every wait is bounded by `--queue_timeout` from arrival.
//!
//! The queue holds at most `--max_queue` requests; when it is full an arriving interactive
//! request evicts the newest waiting batch request, and otherwise the arriving request is
//! shed. Shed and expired requests get 503 `model_overloaded` with `Retry-After`
//! ([`RETRY_AFTER_SECS`]). A client that goes away leaves the queue (its waiting future is
//! dropped, and with it its place).
//!
//! **Hold-and-wake**: a request for a model that is known — in the discovery view with no
//! routable instance, seen in the view before, or named in `--wake_models` — but has no
//! routable instance waits in the same queue (capacity 0) instead of failing at once, while
//! the view is refreshed every [`TICK`]; it expires as 503 `no_healthy_instance` with
//! `Retry-After`. With `--wake_on_request` the model is started on a worker manager that ran
//! it ([`wake`]), and with `--idle_unload_secs` a model woken so is stopped again when idle.
//! A model never known stays a 404. `--queue_timeout 0` turns every wait off (today's
//! immediate answers). In a fallback chain only the last model waits (`may_wait`): a model
//! with a fallback after it refuses at once ([`Refusal::Upstream`]) and the next one is tried.

pub(crate) mod wake;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::discovery::{Discovery, Group, Lookup};
use super::proxy::{Upstream, UpstreamError};
use crate::openai::OpenAiError;
use crate::telemetry::metrics::Labels;
use crate::wire::controller::{split_worker_key, worker_key};
use crate::wire::keys::Priority;
use crate::wire::worker::WorkerType;

/// `Retry-After` (seconds) of a shed or expired request.
pub const RETRY_AFTER_SECS: u32 = 1;
/// How often queues with waiters re-read the view (instances that appeared, pauses over).
pub const TICK: Duration = Duration::from_millis(100);
/// Longest pause of a gate after every instance answered overloaded.
pub const OVERLOADED_PAUSE_MAX: Duration = Duration::from_secs(1);
/// How long a gate admits nobody while its idle model is being stopped.
const UNLOAD_HOLD: Duration = Duration::from_secs(2);
/// Ticks between two passes that unload idle woken models.
const SLOW_TICKS: u32 = 10;

/// The admission settings (`--queue_timeout`, `--max_queue`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Longest wait of a request, from arrival (queue, hold and overloaded retries); zero
    /// turns waiting off.
    pub queue_timeout: Duration,
    /// Waiting requests per model (beyond: shed).
    pub max_queue: usize,
    /// Requests in flight per routable instance; 0 = no limit (the queue is then used only
    /// when every instance answered overloaded, or none is routable).
    pub max_instance_concurrency: u32,
    /// Models (`name` or `name@type`) held while they have no instance, even if this
    /// apiserver never saw them registered.
    pub wake_models: Vec<String>,
    /// Start a stopped model on a worker manager that ran it, when a request holds for it.
    pub wake_on_request: bool,
    /// Stop a model this apiserver woke once it has been idle this long.
    pub idle_unload: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_timeout: Duration::from_secs(30),
            max_queue: 64,
            max_instance_concurrency: 0,
            wake_models: Vec::new(),
            wake_on_request: false,
            idle_unload: None,
        }
    }
}

/// A waiting request's place: class first (interactive before batch), then arrival order.
pub(crate) type Place = (Priority, u64);

/// What [`Queue::push`] did.
#[derive(Debug, PartialEq)]
pub(crate) enum Push<T> {
    /// The request waits.
    Queued,
    /// The request waits; the newest batch request (returned) was evicted to make room.
    Evicted(Place, T),
    /// The queue is full of requests that rank before it: it is shed (returned).
    Full(T),
}

/// The waiting requests of one model, in the order they are admitted (no clocks, no I/O).
pub(crate) struct Queue<T> {
    waiting: BTreeMap<Place, T>,
    max: usize,
}

impl<T> Queue<T> {
    pub(crate) fn new(max: usize) -> Self {
        Queue {
            waiting: BTreeMap::new(),
            max,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Queues `v` at `place`; when full, an interactive request evicts the newest batch one.
    pub(crate) fn push(&mut self, place: Place, v: T) -> Push<T> {
        if self.waiting.len() < self.max {
            self.waiting.insert(place, v);
            return Push::Queued;
        }
        // Batch sorts after interactive, and later arrivals after earlier ones: the last
        // entry is the newest batch request, if there is any.
        let newest_batch = self
            .waiting
            .last_key_value()
            .is_some_and(|(k, _)| k.0 == Priority::Batch);
        if place.0 == Priority::Interactive && newest_batch {
            let (k, old) = self.waiting.pop_last().expect("not empty");
            self.waiting.insert(place, v);
            return Push::Evicted(k, old);
        }
        Push::Full(v)
    }

    /// The next request to admit.
    pub(crate) fn pop(&mut self) -> Option<(Place, T)> {
        self.waiting.pop_first()
    }

    pub(crate) fn remove(&mut self, place: &Place) -> Option<T> {
        self.waiting.remove(place)
    }
}

/// What a waiting request is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Admitted: a slot of the gate is counted for it.
    Go,
    /// Evicted from a full queue.
    Shed,
}

/// Why a wait ended without admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Shed,
    Expired,
}

struct GateState {
    queue: Queue<oneshot::Sender<Verdict>>,
    /// Admitted requests not yet finished.
    active: usize,
    /// How many may be admitted at once (from the view; 0 = no routable instance).
    cap: usize,
    /// Every instance answered overloaded: admit nobody before then (or before a request of
    /// the model finishes).
    paused_until: Option<Instant>,
    /// After an overloaded answer: how many requests the instances took then (those of
    /// this apiserver still in flight, at least 1). The gate admits no more until its queue
    /// is empty again, so a pause that ends lets one waiter per free slot try, not all.
    hint: Option<usize>,
    next_seq: u64,
    /// When the model last had an admitted request finish (or start).
    last_used: Instant,
}

/// One model's admission: its queue and the count of admitted requests.
pub struct Gate {
    key: String,
    st: Mutex<GateState>,
}

/// The outcome of [`Gate::enter`].
pub(crate) enum Entry {
    /// Admitted at once.
    In,
    /// Queued: await [`Waiting::until`].
    Wait(Waiting),
    /// The queue is full.
    Shed,
}

impl Gate {
    pub(crate) fn new(key: &str, max_queue: usize) -> Arc<Gate> {
        Arc::new(Gate {
            key: key.to_string(),
            st: Mutex::new(GateState {
                queue: Queue::new(max_queue),
                active: 0,
                cap: 0,
                paused_until: None,
                hint: None,
                next_seq: 0,
                last_used: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many may be in flight now: the capacity, or less after an overloaded answer.
    fn room(st: &GateState) -> usize {
        st.cap.min(st.hint.unwrap_or(usize::MAX))
    }

    /// Admits waiters, in order, while there is room and the gate is not paused.
    fn pump(st: &mut GateState) {
        if let Some(t) = st.paused_until {
            if Instant::now() < t {
                return;
            }
            st.paused_until = None;
        }
        while st.active < Self::room(st) {
            let Some((_, tx)) = st.queue.pop() else {
                break;
            };
            // A waiter that went away meanwhile takes no slot.
            if tx.send(Verdict::Go).is_ok() {
                st.active += 1;
            }
        }
        if st.queue.is_empty() {
            st.hint = None;
        }
    }

    /// A request arrives (`place` is `None`) or comes back (its old place) with the model's
    /// current capacity `cap`. Evicted waiters are told here; returns what happened and
    /// how many were evicted.
    pub(crate) fn enter(
        self: &Arc<Self>,
        cap: usize,
        priority: Priority,
        place: &mut Option<Place>,
    ) -> (Entry, usize) {
        let mut st = self.lock();
        st.cap = cap;
        st.last_used = Instant::now();
        let open = st.paused_until.is_none_or(|t| Instant::now() >= t);
        if place.is_none() && st.queue.is_empty() && open && st.active < Self::room(&st) {
            st.active += 1;
            return (Entry::In, 0);
        }
        let p = *place.get_or_insert_with(|| {
            st.next_seq += 1;
            (priority, st.next_seq)
        });
        let (tx, rx) = oneshot::channel();
        let evicted = match st.queue.push(p, tx) {
            Push::Queued => 0,
            Push::Evicted(_, old) => {
                let _ = old.send(Verdict::Shed);
                1
            }
            Push::Full(_) => return (Entry::Shed, 0),
        };
        Self::pump(&mut st);
        (
            Entry::Wait(Waiting {
                gate: self.clone(),
                place: p,
                rx,
                settled: false,
            }),
            evicted,
        )
    }

    /// A request admitted here finished: its slot goes to the next waiter, and a pause
    /// after an overloaded answer ends (something was freed).
    pub(crate) fn release(&self) {
        let mut st = self.lock();
        st.active = st.active.saturating_sub(1);
        st.last_used = Instant::now();
        st.paused_until = None;
        Self::pump(&mut st);
    }

    /// A request admitted here found every instance overloaded: its slot is given up and
    /// nobody is admitted for `pause` (or until another request of the model finishes).
    pub(crate) fn release_paused(&self, pause: Duration) {
        let mut st = self.lock();
        st.active = st.active.saturating_sub(1);
        st.paused_until = Some(Instant::now() + pause);
        st.hint = Some(st.active.max(1));
    }

    /// New capacity from the view; admits waiters if there is room now.
    pub(crate) fn retune(&self, cap: usize) {
        let mut st = self.lock();
        st.cap = cap;
        Self::pump(&mut st);
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.lock().queue.len()
    }

    /// Admitted requests in flight.
    #[cfg(test)]
    pub(crate) fn active(&self) -> usize {
        self.lock().active
    }

    /// If the model has had nothing admitted and nothing waiting for `idle`, pauses the gate
    /// for `hold` (arrivals wait while the model is stopped, then hold for it) and says so.
    pub(crate) fn quiesce(&self, idle: Duration, hold: Duration) -> bool {
        let mut st = self.lock();
        let idle = st.active == 0 && st.queue.is_empty() && st.last_used.elapsed() >= idle;
        if idle {
            st.paused_until = Some(Instant::now() + hold);
        }
        idle
    }
}

/// A queued request's place; dropping it (the client went away, or the deadline passed)
/// leaves the queue, and gives back a slot it was granted but never took.
pub(crate) struct Waiting {
    gate: Arc<Gate>,
    place: Place,
    rx: oneshot::Receiver<Verdict>,
    settled: bool,
}

impl Waiting {
    /// Waits to be admitted (a slot is then counted for the caller) until `deadline`.
    pub(crate) async fn until(mut self, deadline: Instant) -> Result<(), Refused> {
        let v = tokio::select! {
            v = &mut self.rx => v,
            _ = tokio::time::sleep_until(deadline) => return Err(Refused::Expired),
        };
        self.settled = true;
        match v {
            Ok(Verdict::Go) => Ok(()),
            Ok(Verdict::Shed) | Err(_) => Err(Refused::Shed),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut st = self.gate.lock();
        if st.queue.remove(&self.place).is_none() && matches!(self.rx.try_recv(), Ok(Verdict::Go)) {
            // Admitted just as it gave up: the slot goes to the next one.
            st.active = st.active.saturating_sub(1);
            Gate::pump(&mut st);
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// The model cannot take it now without a wait (unknown, no routable instance, or at
    /// capacity when the request may not wait): the next model of a fallback chain may.
    Upstream(UpstreamError),
    /// Shed from a full queue, or waited past `--queue_timeout`: the answer.
    Answer(OpenAiError),
}

impl From<OpenAiError> for Refusal {
    fn from(e: OpenAiError) -> Self {
        Refusal::Answer(e)
    }
}

/// A request's admission: while it holds a slot, dropping it (with the answer's last byte)
/// frees the slot for the next waiter.
pub struct Ticket {
    gate: Arc<Gate>,
    priority: Priority,
    place: Option<Place>,
    deadline: Instant,
    holding: bool,
    /// The model's name, for the answers of refused waits.
    model: String,
    worker_type: WorkerType,
}

impl Ticket {
    fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.gate.release();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// Admission counters.
#[derive(Clone, Default)]
struct Metrics {
    waits: Family<Labels, Counter>,
    shed: Family<Labels, Counter>,
    expired: Family<Labels, Counter>,
    wakes: Family<Labels, Counter>,
    unloads: Family<Labels, Counter>,
}

fn model_labels(key: &str) -> Labels {
    let (model, wt) = split_worker_key(key).unwrap_or((key, ""));
    vec![
        ("model", model.to_string()),
        ("worker_type", wt.to_string()),
    ]
}

/// The apiserver's admission: a gate per known `model@type`.
pub struct Admission {
    settings: Settings,
    gates: RwLock<HashMap<String, Arc<Gate>>>,
    /// `model@type` keys seen in the view.
    known: RwLock<HashSet<String>>,
    waker: Arc<wake::Waker>,
    metrics: Metrics,
}

impl Admission {
    pub fn new(settings: Settings, waker: wake::Waker) -> Self {
        Admission {
            settings,
            gates: RwLock::new(HashMap::new()),
            known: RwLock::new(HashSet::new()),
            waker: Arc::new(waker),
            metrics: Metrics::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The gate of `key`, made on first use (only for models in the view or known).
    fn gate(&self, key: &str) -> Arc<Gate> {
        if let Some(g) = self
            .gates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return g.clone();
        }
        self.gates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_insert_with(|| Gate::new(key, self.settings.max_queue))
            .clone()
    }

    /// Was `model` (`key` = `model@type`) registered before, or configured?
    fn is_known(&self, model: &str, key: &str) -> bool {
        self.settings
            .wake_models
            .iter()
            .any(|m| m == model || m == key)
            || self
                .known
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(key)
    }

    /// Remembers every `model@type` of the view (a model that goes away stays known).
    pub fn learn(&self, d: &Discovery) {
        let view = d.view();
        let new: Vec<&String> = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            view.groups.keys().filter(|k| !known.contains(*k)).collect()
        };
        if !new.is_empty() {
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            known.extend(new.into_iter().cloned());
        }
    }

    /// Requests of a group the gate may admit at once.
    fn capacity(&self, g: &Group) -> usize {
        let n = g.instances.iter().filter(|i| i.routable()).count();
        match (n, self.settings.max_instance_concurrency) {
            (0, _) => 0,
            (_, 0) => usize::MAX,
            (n, per) => n.saturating_mul(per as usize),
        }
    }

    fn capacity_of(&self, d: &Discovery, key: &str) -> usize {
        match d.lookup(key) {
            Lookup::Found(g) => self.capacity(&g),
            _ => 0,
        }
    }

    /// Admits a request for `model` of `worker_type`: its group and its [`Ticket`] (to be
    /// kept until the answer is complete), after waiting in the model's queue when it is at
    /// capacity or has no instance (and is known), if it `may_wait` (and waiting is on).
    /// Refused: the model's own error (unknown: 404; no instance, or full without a wait:
    /// [`Refusal::Upstream`]), or shed or expired (503 with `Retry-After`).
    pub async fn admit(
        &self,
        up: &Upstream,
        (model, worker_type): (&str, WorkerType),
        priority: Priority,
        may_wait: bool,
    ) -> Result<(Arc<Group>, Ticket), Refusal> {
        let key = worker_key(model, worker_type.as_str());
        let waits = may_wait && !self.settings.queue_timeout.is_zero();
        let group = match up.group(model, worker_type).await {
            Ok(g) => Some(g),
            Err(UpstreamError::NoneRoutable { .. }) if waits => None,
            Err(UpstreamError::UnknownModel { .. }) if waits && self.is_known(model, &key) => None,
            Err(e) => return Err(Refusal::Upstream(e)),
        };
        let mut ticket = Ticket {
            gate: self.gate(&key),
            priority,
            place: None,
            deadline: Instant::now() + self.settings.queue_timeout,
            holding: false,
            model: model.to_string(),
            worker_type,
        };
        let cap = group.as_ref().map_or(0, |g| self.capacity(g));
        if let Some(g) = group {
            // An evicted waiter counts itself as shed when it is told.
            let (entry, _) = ticket.gate.enter(cap, priority, &mut ticket.place);
            match entry {
                Entry::In => {
                    ticket.holding = true;
                    return Ok((g, ticket));
                }
                Entry::Shed if waits => return Err(self.shed(&ticket).into()),
                Entry::Wait(w) if waits => {
                    let g = self.wait_admitted(up, &mut ticket, w).await?;
                    return Ok((g, ticket));
                }
                // At capacity and no wait: the caller tries elsewhere or answers overloaded.
                Entry::Shed | Entry::Wait(_) => {
                    return Err(Refusal::Upstream(UpstreamError::Overloaded {
                        model: model.to_string(),
                        tried: 0,
                        last: "it is at capacity in this apiserver (--max_instance_concurrency, \
                               or paused after an overloaded answer)"
                            .into(),
                        retry_after: RETRY_AFTER_SECS,
                    }));
                }
            }
        }
        let g = self.wait(up, &mut ticket, 0).await?;
        Ok((g, ticket))
    }

    /// After every instance answered overloaded: the request gives up its slot, waits in
    /// the queue again (keeping its place) and gets the group to try again; `None` when it
    /// may not wait (no time left, queue full, waiting off): then the overloaded answer is
    /// the client's.
    pub async fn again(
        &self,
        up: &Upstream,
        ticket: &mut Ticket,
        retry_after: u32,
    ) -> Option<Arc<Group>> {
        if self.settings.queue_timeout.is_zero() || Instant::now() >= ticket.deadline {
            return None;
        }
        let pause = Duration::from_secs(u64::from(retry_after)).clamp(TICK, OVERLOADED_PAUSE_MAX);
        if std::mem::take(&mut ticket.holding) {
            ticket.gate.release_paused(pause);
        }
        let key = ticket.gate.key.clone();
        let cap = self.capacity_of(&up.discovery, &key);
        self.wait(up, ticket, cap).await.ok()
    }

    /// Queues `ticket` (capacity `cap` now) until admitted with a routable group.
    async fn wait(
        &self,
        up: &Upstream,
        ticket: &mut Ticket,
        cap: usize,
    ) -> Result<Arc<Group>, OpenAiError> {
        if cap == 0 {
            self.holding(up, ticket);
        }
        let (entry, _) = ticket.gate.enter(cap, ticket.priority, &mut ticket.place);
        match entry {
            Entry::In => {
                ticket.holding = true;
                self.admitted_group(up, ticket).await
            }
            Entry::Shed => Err(self.shed(ticket)),
            Entry::Wait(w) => self.wait_admitted(up, ticket, w).await,
        }
    }

    /// Awaits `w`, then the routable group (queueing again while there is none).
    async fn wait_admitted(
        &self,
        up: &Upstream,
        ticket: &mut Ticket,
        w: Waiting,
    ) -> Result<Arc<Group>, OpenAiError> {
        let key = ticket.gate.key.clone();
        self.metrics.waits.get_or_create(&model_labels(&key)).inc();
        let mut w = w;
        loop {
            match w.until(ticket.deadline).await {
                Ok(()) => ticket.holding = true,
                Err(Refused::Shed) => return Err(self.shed(ticket)),
                Err(Refused::Expired) => {
                    self.metrics
                        .expired
                        .get_or_create(&model_labels(&key))
                        .inc();
                    return Err(self.expired(up, ticket));
                }
            }
            if let Lookup::Found(g) = up.discovery.lookup(&key) {
                return Ok(g);
            }
            // The instance went away again between admission and now: hold on.
            ticket.release();
            self.holding(up, ticket);
            let (entry, _) = ticket.gate.enter(0, ticket.priority, &mut ticket.place);
            w = match entry {
                Entry::Wait(w) => w,
                Entry::Shed => return Err(self.shed(ticket)),
                Entry::In => unreachable!("a gate without capacity admits nobody"),
            };
        }
    }

    async fn admitted_group(
        &self,
        up: &Upstream,
        ticket: &mut Ticket,
    ) -> Result<Arc<Group>, OpenAiError> {
        let key = ticket.gate.key.clone();
        match up.discovery.lookup(&key) {
            Lookup::Found(g) => Ok(g),
            _ => {
                ticket.release();
                Box::pin(self.wait(up, ticket, 0)).await
            }
        }
    }

    /// A request waits for an instance: refresh the view now, and wake the model if asked.
    fn holding(&self, up: &Upstream, ticket: &Ticket) {
        up.discovery.request_refresh();
        if self.settings.wake_on_request && self.waker.wake(&ticket.model, ticket.worker_type) {
            self.metrics
                .wakes
                .get_or_create(&model_labels(&ticket.gate.key))
                .inc();
        }
    }

    fn shed(&self, t: &Ticket) -> OpenAiError {
        self.metrics
            .shed
            .get_or_create(&model_labels(&t.gate.key))
            .inc();
        OpenAiError::overloaded(
            format!(
                "model `{}` is at capacity and its queue is full ({} waiting); the request was shed, retry later",
                t.model, self.settings.max_queue
            ),
            RETRY_AFTER_SECS,
        )
    }

    fn expired(&self, up: &Upstream, t: &Ticket) -> OpenAiError {
        let secs = self.settings.queue_timeout.as_secs_f64();
        if matches!(up.discovery.lookup(&t.gate.key), Lookup::Found(_)) {
            OpenAiError::overloaded(
                format!(
                    "model `{}` stayed at capacity: the request waited {secs} s in its queue (--queue_timeout)",
                    t.model
                ),
                RETRY_AFTER_SECS,
            )
        } else {
            let mut e = OpenAiError::unavailable(format!(
                "no healthy instance of model `{}` is available right now (waited {secs} s for one, --queue_timeout)",
                t.model
            ));
            e.retry_after = Some(RETRY_AFTER_SECS);
            e
        }
    }

    /// Every [`TICK`]: learns the view's models, re-reads the capacity of every model with
    /// waiters (instances that came or went) and asks for a refresh while one has no
    /// instance; every [`SLOW_TICKS`] unloads idle woken models; until `shutdown`.
    pub fn spawn_ticker(
        self: &Arc<Self>,
        discovery: Arc<Discovery>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        self.waker.set_runtime(tokio::runtime::Handle::current());
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u32;
            me.learn(&discovery);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                me.learn(&discovery);
                me.tick(&discovery);
                n += 1;
                if n.is_multiple_of(SLOW_TICKS) {
                    me.unload_idle();
                }
            }
        })
    }

    fn gates(&self) -> Vec<Arc<Gate>> {
        self.gates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// One pass over the gates with waiters.
    pub(crate) fn tick(&self, d: &Discovery) {
        for g in self.gates() {
            if g.depth() == 0 {
                continue;
            }
            let cap = self.capacity_of(d, &g.key);
            if cap == 0 {
                d.request_refresh();
                // A wake that failed is tried again (at most every RETRY_GAP).
                if self.settings.wake_on_request
                    && let Some((model, ty)) = split_worker_key(&g.key)
                    && let Some(wt) = WorkerType::from_wire(ty)
                    && self.waker.wake(model, wt)
                {
                    self.metrics
                        .wakes
                        .get_or_create(&model_labels(&g.key))
                        .inc();
                }
            }
            g.retune(cap);
        }
    }

    fn unload_idle(&self) {
        let Some(idle) = self.settings.idle_unload else {
            return;
        };
        for key in self.waker.woken() {
            // A request arriving while the model stops waits instead of being sent to it.
            if self.gate(&key).quiesce(idle, UNLOAD_HOLD) {
                self.metrics
                    .unloads
                    .get_or_create(&model_labels(&key))
                    .inc();
                self.waker.unload(&key);
            }
        }
    }

    /// Waiting requests per `model@type` (models with none left out), sorted.
    pub fn depths(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .gates()
            .iter()
            .map(|g| (g.key.clone(), g.depth()))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    }

    /// The admin status entries: `queued` (waiting requests in all) and `queue` (per model).
    pub fn status_details(&self) -> Vec<(String, String)> {
        let d = self.depths();
        let total: usize = d.iter().map(|(_, n)| n).sum();
        let per = if d.is_empty() {
            "-".to_string()
        } else {
            d.iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![("queued".into(), total.to_string()), ("queue".into(), per)]
    }

    /// Registers the admission families and the scrape-time queue depths.
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        let m = &self.metrics;
        r.register(
            "dbgpt_apiserver_queue_waits",
            "Requests that waited in a model's queue (at capacity, overloaded or without an instance)",
            m.waits.clone(),
        );
        r.register(
            "dbgpt_apiserver_queue_shed",
            "Requests shed because a model's queue was full (503 model_overloaded)",
            m.shed.clone(),
        );
        r.register(
            "dbgpt_apiserver_queue_expired",
            "Requests that waited past --queue_timeout (503)",
            m.expired.clone(),
        );
        r.register(
            "dbgpt_apiserver_model_wakes",
            "Stopped models this apiserver asked a worker manager to start (--wake_on_request)",
            m.wakes.clone(),
        );
        r.register(
            "dbgpt_apiserver_model_unloads",
            "Woken models stopped again after --idle_unload_secs idle",
            m.unloads.clone(),
        );
        r.register_collector(Box::new(DepthCollector(self.clone())));
    }
}

/// `dbgpt_apiserver_queue_depth{model,worker_type}` at scrape time.
struct DepthCollector(Arc<Admission>);

impl std::fmt::Debug for DepthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DepthCollector")
    }
}

impl Collector for DepthCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut gates: Vec<(String, usize)> = self
            .0
            .gates()
            .iter()
            .map(|g| (g.key.clone(), g.depth()))
            .collect();
        gates.sort();
        let mut m = enc.encode_descriptor(
            "dbgpt_apiserver_queue_depth",
            "Requests waiting in each model's queue",
            None,
            MetricType::Gauge,
        )?;
        for (key, n) in gates {
            ConstGauge::new(n as i64).encode(m.encode_family(&model_labels(&key))?)?;
        }
        Ok(())
    }
}
