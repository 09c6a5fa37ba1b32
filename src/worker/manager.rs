//! The worker manager: the set of models one worker process hosts, and their lifecycle.
//!
//! Models are keyed `name@type`, one instance per key. Start loads the engine *then*
//! inserts and registers it; a second start of a running (or starting) key is refused
//! without touching the running one (DB-GPT's duplicate start deletes it). Stop
//! deregisters first, removes the model, then lets in-flight requests finish on their own
//! handle. Restart is stop + start of the *same* spec and leaves the model registered and
//! healthy (DB-GPT's restart loses the spec and fails); a stopped model restarts with the
//! spec it last ran with, as stop-then-start would. Each model has a fair semaphore of
//! `concurrency` permits: excess requests wait, they are not rejected. A model that
//! schedules its own requests (llama.cpp: sequence slots and a bounded wait queue that
//! refuses the excess as overloaded, [`crate::worker::backends::LlmBackend::engine_status`])
//! gets no limit here, so that its queue is the only one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::info;

use crate::telemetry::Escaped;
use crate::telemetry::metrics::worker::{Metered, ModelMetrics, WorkerMetrics};

use super::backends::{EngineStatus, ProxyTimeouts};
use super::chat::ChatOptions;
use super::registration::Registrar;
use super::spec::{Engine, ModelSpec};
use crate::wire::worker::WorkerType;

/// Default per-model concurrency (DB-GPT's `limit_model_concurrency`).
pub const DEFAULT_CONCURRENCY: usize = 5;

/// Lifecycle errors, mapped to HTTP statuses by the routes.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("model {0} is already running on this worker")]
    AlreadyRunning(String),
    #[error("model {0} is already starting on this worker")]
    Starting(String),
    #[error("model {0} is not running on this worker")]
    NotRunning(String),
    #[error("invalid model configuration: {0}")]
    Invalid(String),
    #[error("model {key} failed to load: {message}")]
    Load { key: String, message: String },
}

/// A model being served.
pub struct RunningModel {
    pub spec: ModelSpec,
    pub engine: Engine,
    /// How the OpenAI routes render this model's chats (its `chat_template`).
    pub chat: ChatOptions,
    limit: Arc<Semaphore>,
    in_flight: AtomicUsize,
    pub loaded_at: Instant,
    /// The model's metrics (slots, queue, token timings).
    pub metrics: Arc<ModelMetrics>,
}

/// Holds a concurrency permit and counts the request as in flight until dropped.
pub struct Slot {
    model: Arc<RunningModel>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.model.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.model.metrics.slot_released();
    }
}

/// Counts a request in the queue until it gets its slot (or goes away).
struct Queued<'a>(&'a ModelMetrics, bool);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.gave_up();
        }
    }
}

impl RunningModel {
    /// Waits for a free slot (requests beyond the limit queue here, in order).
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        self.metrics.queued();
        let mut queued = Queued(&self.metrics, false);
        let permit = self
            .limit
            .clone()
            .acquire_owned()
            .await
            .expect("model semaphores are never closed");
        queued.1 = true;
        self.metrics.slot_taken();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            model: self.clone(),
            _permit: permit,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The engine's slot and queue usage, when it schedules its own requests.
    pub fn engine_status(&self) -> Option<EngineStatus> {
        match &self.engine {
            Engine::Llm(b) => b.engine_status(),
            _ => None,
        }
    }
}

fn model_schedules_itself(engine: &Engine) -> bool {
    matches!(engine, Engine::Llm(b) if b.engine_status().is_some())
}

/// How often an engine that schedules its own requests has its slot, queue and prefix-cache
/// figures copied into the model's metrics.
const ENGINE_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Copies `model`'s engine figures (slots in use, queue depth, prompt tokens served from the
/// prefix cache) into its metrics every [`ENGINE_SAMPLE_EVERY`] while the model is served:
/// the engine owns those figures, so the per-model permits stop counting them.
fn sample_engine(model: &Arc<RunningModel>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    model.metrics.engine_owned();
    let weak = Arc::downgrade(model);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(ENGINE_SAMPLE_EVERY);
        let mut reused = 0u64;
        loop {
            tick.tick().await;
            let Some(model) = weak.upgrade() else { break };
            let Some(st) = model.engine_status() else {
                break;
            };
            let m = &model.metrics;
            m.slots_in_use.set(st.busy as i64);
            m.queue_depth.set(st.queued as i64);
            m.prompt_cached_tokens
                .inc_by(st.reused_prompt_tokens.saturating_sub(reused));
            reused = st.reused_prompt_tokens;
        }
    });
}

/// All models of this worker.
pub struct WorkerManager {
    models: RwLock<HashMap<String, Arc<RunningModel>>>,
    /// Specs of models stopped through the API, kept so `models/supports` lists them.
    known: RwLock<Vec<ModelSpec>>,
    starting: Mutex<HashSet<String>>,
    registrar: Option<Arc<Registrar>>,
    default_concurrency: usize,
    /// Upstream timeouts of proxy models that have none of their own.
    proxy_timeouts: ProxyTimeouts,
    metrics: Arc<WorkerMetrics>,
}

impl WorkerManager {
    pub fn new(registrar: Option<Arc<Registrar>>, default_concurrency: usize) -> Self {
        WorkerManager {
            models: RwLock::new(HashMap::new()),
            known: RwLock::new(Vec::new()),
            starting: Mutex::new(HashSet::new()),
            registrar,
            default_concurrency: default_concurrency.max(1),
            proxy_timeouts: ProxyTimeouts::default(),
            metrics: Arc::new(WorkerMetrics::default()),
        }
    }

    /// The worker's metrics (every model's handles hang off it).
    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// Sets the upstream timeouts of proxy models that have none of their own.
    pub fn with_proxy_timeouts(mut self, timeouts: ProxyTimeouts) -> Self {
        self.proxy_timeouts = timeouts;
        self
    }

    pub fn registrar(&self) -> Option<&Arc<Registrar>> {
        self.registrar.as_ref()
    }

    /// The running model `name@worker_type`.
    pub fn get(&self, name: &str, worker_type: WorkerType) -> Option<Arc<RunningModel>> {
        let key = crate::wire::controller::worker_key(name, worker_type.as_str());
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }

    /// Every running model, sorted by key.
    pub fn running(&self) -> Vec<Arc<RunningModel>> {
        let mut v: Vec<_> = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|m| m.spec.key());
        v
    }

    /// Specs of every model this worker runs or ran.
    pub fn known_specs(&self) -> Vec<ModelSpec> {
        let mut specs: Vec<ModelSpec> = self.running().iter().map(|m| m.spec.clone()).collect();
        for s in self.known.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if !specs.iter().any(|x| x.key() == s.key()) {
                specs.push(s.clone());
            }
        }
        specs
    }

    /// Requests in flight across all models.
    pub fn in_flight(&self) -> usize {
        self.running().iter().map(|m| m.in_flight()).sum()
    }

    /// Loads and starts a model, then registers it.
    pub async fn start(&self, spec: ModelSpec) -> Result<Arc<RunningModel>, ManagerError> {
        spec.validate().map_err(|e| ManagerError::Invalid(e.0))?;
        let key = spec.key();
        if self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
        {
            return Err(ManagerError::AlreadyRunning(key));
        }
        if !self
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return Err(ManagerError::Starting(key));
        }
        let chat = match &spec.chat_template {
            None => Ok(ChatOptions::default()),
            Some(p) => ChatOptions::with_template_file(p).map_err(|e| e.to_string()),
        };
        let load_started = Instant::now();
        let loaded = match chat {
            Ok(mut chat) => spec
                .load(self.proxy_timeouts)
                .await
                .map(|(engine, render)| {
                    chat.render = render;
                    (engine, chat)
                })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let result = match loaded {
            Ok((engine, chat)) => {
                let m = self.insert(spec, engine, chat);
                m.metrics.loaded_in(load_started.elapsed().as_secs_f64());
                Ok(m)
            }
            Err(message) => Err(ManagerError::Load {
                key: key.clone(),
                message,
            }),
        };
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let model = result?;
        if let Some(r) = &self.registrar {
            r.add(&key).await;
        }
        info!(model = %Escaped(&key), "model started");
        Ok(model)
    }

    /// Serves `engine` under `spec`'s key (not registered yet).
    fn insert(&self, spec: ModelSpec, engine: Engine, chat: ChatOptions) -> Arc<RunningModel> {
        let key = spec.key();
        let permits = if model_schedules_itself(&engine) {
            Semaphore::MAX_PERMITS
        } else {
            spec.concurrency.unwrap_or(self.default_concurrency)
        };
        let metrics = self.metrics.model(&spec.name, spec.worker_type.as_str());
        let engine = match engine {
            Engine::Llm(b) => Engine::Llm(Arc::new(Metered::new(b, metrics.clone()))),
            other => other,
        };
        let model = Arc::new(RunningModel {
            metrics,
            chat,
            limit: Arc::new(Semaphore::new(permits)),
            spec,
            engine,
            in_flight: AtomicUsize::new(0),
            loaded_at: Instant::now(),
        });
        if model_schedules_itself(&model.engine) {
            sample_engine(&model);
        }
        self.models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), model.clone());
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.key() != key);
        model
    }

    /// Serves an engine no spec can load (a test double) under `spec`'s key.
    #[cfg(test)]
    pub(crate) fn insert_engine(&self, spec: ModelSpec, engine: Engine) -> Arc<RunningModel> {
        self.insert(spec, engine, ChatOptions::default())
    }

    /// Deregisters and stops a model; returns its spec.
    pub async fn stop(
        &self,
        name: &str,
        worker_type: WorkerType,
    ) -> Result<ModelSpec, ManagerError> {
        let key = crate::wire::controller::worker_key(name, worker_type.as_str());
        if !self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
        {
            return Err(ManagerError::NotRunning(key));
        }
        // Deregister before removing, so routers stop sending requests first.
        if let Some(r) = &self.registrar {
            r.remove(&key).await;
        }
        let removed = self
            .models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let Some(model) = removed else {
            return Err(ManagerError::NotRunning(key));
        };
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(model.spec.clone());
        info!(model = %Escaped(&key), in_flight = model.in_flight(), "model stopped");
        Ok(model.spec.clone())
    }

    /// The spec a model stopped on this worker last ran with (`None` if it never ran here);
    /// [`ManagerError::AlreadyRunning`] while it runs.
    pub fn stopped_spec(
        &self,
        name: &str,
        worker_type: WorkerType,
    ) -> Result<Option<ModelSpec>, ManagerError> {
        let key = crate::wire::controller::worker_key(name, worker_type.as_str());
        if self.get(name, worker_type).is_some() {
            return Err(ManagerError::AlreadyRunning(key));
        }
        Ok(self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|s| s.key() == key)
            .cloned())
    }

    /// Stop then start of the same spec. A model stopped earlier just starts again, with
    /// the spec it last ran with; one this worker never ran is [`ManagerError::NotRunning`].
    pub async fn restart(
        &self,
        name: &str,
        worker_type: WorkerType,
    ) -> Result<Arc<RunningModel>, ManagerError> {
        let spec = match self.stop(name, worker_type).await {
            Ok(spec) => spec,
            Err(ManagerError::NotRunning(key)) => self
                .known
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .rev()
                .find(|s| s.key() == key)
                .cloned()
                .ok_or(ManagerError::NotRunning(key))?,
            Err(e) => return Err(e),
        };
        self.start(spec).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn proxy_spec(name: &str) -> ModelSpec {
        ModelSpec::from_params(
            name,
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_api_base": "http://127.0.0.1:1/v1"}),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn restart_of_a_stopped_model_starts_it_with_its_last_spec() {
        let m = WorkerManager::new(None, 2);
        let spec = proxy_spec("gpt");
        m.start(spec.clone()).await.unwrap();
        m.stop("gpt", WorkerType::Llm).await.unwrap();
        assert!(m.get("gpt", WorkerType::Llm).is_none());

        let restarted = m.restart("gpt", WorkerType::Llm).await.unwrap();
        assert_eq!(restarted.spec, spec);
        assert!(m.get("gpt", WorkerType::Llm).is_some());
        // A running model: stop + start, still running.
        m.restart("gpt", WorkerType::Llm).await.unwrap();
        assert!(m.get("gpt", WorkerType::Llm).is_some());
        assert_eq!(m.known_specs(), vec![spec]);
    }

    #[tokio::test]
    async fn a_stopped_model_keeps_the_spec_it_last_ran_with() {
        let m = WorkerManager::new(None, 2);
        let spec = proxy_spec("gpt");
        assert!(matches!(m.stopped_spec("gpt", WorkerType::Llm), Ok(None)));
        m.start(spec.clone()).await.unwrap();
        assert!(matches!(
            m.stopped_spec("gpt", WorkerType::Llm),
            Err(ManagerError::AlreadyRunning(_))
        ));
        m.stop("gpt", WorkerType::Llm).await.unwrap();
        assert_eq!(m.stopped_spec("gpt", WorkerType::Llm).unwrap(), Some(spec));
        assert!(matches!(
            m.stopped_spec("gpt", WorkerType::Text2vec),
            Ok(None)
        ));
    }

    #[tokio::test]
    async fn restart_of_a_model_never_run_is_not_running() {
        let m = WorkerManager::new(None, 2);
        m.start(proxy_spec("gpt")).await.unwrap();
        assert!(matches!(
            m.restart("other", WorkerType::Llm).await,
            Err(ManagerError::NotRunning(k)) if k == "other@llm"
        ));
        assert!(matches!(
            m.restart("gpt", WorkerType::Text2vec).await,
            Err(ManagerError::NotRunning(_))
        ));
    }
}
