//! Wake-on-request: starting a stopped model on a worker manager that ran it, and stopping
//! it again when idle.
//!
//! The worker managers are the controller's `WorkerManager@service` entries. A manager that
//! ran the model lists it in `GET /api/worker/models/supports` (running or stopped); it is
//! asked to start it with `POST /api/worker/models/startup` and empty `params` — the call
//! `dbgpt model start` makes, which then starts the model with the spec it last ran with. At
//! most one start per model is under way at a time, and none is tried again for
//! [`RETRY_GAP`] after one ended (while requests wait, a failed start is retried so). Models started so are remembered, so that an idle one can be stopped with
//! `POST /api/worker/models/shutdown` (`dbgpt model stop`'s call). A manager that answers
//! 409 (the model is running or starting already) was not woken by us: it is never unloaded.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use crate::controller::client::ControllerClient;
use crate::telemetry::Escaped;
use crate::wire::controller::{manager_key, worker_key};
use crate::wire::worker::{
    MODELS_SHUTDOWN_PATH, MODELS_STARTUP_PATH, MODELS_SUPPORTS_PATH, WorkerSupportedModel,
    WorkerType,
};
use crate::worker::client::{WorkerClientError, post_worker};

/// How long a failed wake of a model blocks the next one.
pub const RETRY_GAP: Duration = Duration::from_secs(5);

/// Why a wake failed.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("cannot list the worker managers: {0}")]
    Controller(String),
    #[error("no worker manager registered with the controller ran model {0} ({1})")]
    NoManager(String, String),
    #[error("{0}")]
    Worker(#[from] WorkerClientError),
}

/// A model this apiserver started.
#[derive(Debug, Clone)]
struct Woken {
    model: String,
    worker_type: WorkerType,
    host: String,
    port: u16,
}

#[derive(Default)]
struct State {
    /// `model@type` → `None` while a start is under way, `Some(t)` after one ended at `t`
    /// (none is tried again for [`RETRY_GAP`]: a model just started takes a moment to
    /// appear in the apiserver's view).
    starting: HashMap<String, Option<Instant>>,
    woken: HashMap<String, Woken>,
}

/// Starts and stops models on worker managers for the apiserver.
pub struct Waker {
    controller: ControllerClient,
    http: reqwest::Client,
    /// Where the start and stop calls run (the daemon's main runtime; else the caller's).
    runtime: OnceLock<tokio::runtime::Handle>,
    state: Mutex<State>,
}

impl Waker {
    pub fn new(controller: ControllerClient) -> anyhow::Result<Self> {
        Ok(Waker {
            controller,
            http: crate::worker::client::worker_http()?,
            runtime: OnceLock::new(),
            state: Mutex::new(State::default()),
        })
    }

    pub(crate) fn set_runtime(&self, h: tokio::runtime::Handle) {
        let _ = self.runtime.set(h);
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        match self.runtime.get() {
            Some(h) => {
                h.spawn(f);
            }
            None => {
                tokio::spawn(f);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `model` on a manager that ran it, unless a start is under way or ended less
    /// than [`RETRY_GAP`] ago; returns whether a start began.
    pub fn wake(self: &std::sync::Arc<Self>, model: &str, worker_type: WorkerType) -> bool {
        let key = worker_key(model, worker_type.as_str());
        {
            let mut st = self.lock();
            match st.starting.get(&key) {
                Some(None) => return false,
                Some(Some(t)) if t.elapsed() < RETRY_GAP => return false,
                _ => {}
            }
            st.starting.insert(key.clone(), None);
        }
        let me = self.clone();
        let model = model.to_string();
        self.spawn(async move {
            let r = me.start(&model, worker_type).await;
            let mut st = me.lock();
            match r {
                Ok(w) => {
                    st.starting.insert(key.clone(), Some(Instant::now()));
                    if let Some(w) = w {
                        info!(model = %Escaped(&key), worker = %format!("{}:{}", w.host, w.port), "woke a stopped model for a waiting request");
                        st.woken.insert(key, w);
                    }
                }
                Err(e) => {
                    warn!(model = %Escaped(&key), error = %Escaped(&e.to_string()), "cannot wake the model");
                    st.starting.insert(key, Some(Instant::now()));
                }
            }
        });
        true
    }

    /// Finds a manager that ran the model and asks it to start it; `Ok(None)` when one
    /// answered that it is running or starting already.
    async fn start(&self, model: &str, wt: WorkerType) -> Result<Option<Woken>, WakeError> {
        let managers = self
            .controller
            .list(Some(&manager_key()), true)
            .await
            .map_err(|e| WakeError::Controller(e.to_string()))?;
        let mut last = None;
        let mut why = Vec::new();
        for m in &managers {
            match self.ran(&m.host, m.port, model, wt).await {
                Ok(true) => {}
                Ok(false) => {
                    why.push(format!("{}:{} does not list it", m.host, m.port));
                    continue;
                }
                Err(e) => {
                    why.push(format!("{}:{}: {e}", m.host, m.port));
                    continue;
                }
            }
            let body = json!({"host": m.host, "port": m.port, "model": model,
                              "worker_type": wt.as_str(), "params": {}});
            match post_worker(&self.http, &m.host, m.port, MODELS_STARTUP_PATH, &body).await {
                Ok(_) => {
                    return Ok(Some(Woken {
                        model: model.to_string(),
                        worker_type: wt,
                        host: m.host.clone(),
                        port: m.port,
                    }));
                }
                Err(WorkerClientError::Status { status: 409, .. }) => return Ok(None),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => e.into(),
            None => WakeError::NoManager(
                worker_key(model, wt.as_str()),
                if managers.is_empty() {
                    "none is registered".into()
                } else {
                    why.join("; ")
                },
            ),
        })
    }

    /// Does the manager at `host:port` list the model (running or stopped)?
    async fn ran(
        &self,
        host: &str,
        port: u16,
        model: &str,
        wt: WorkerType,
    ) -> Result<bool, String> {
        let url = format!("http://{host}:{port}{MODELS_SUPPORTS_PATH}");
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| crate::http::describe(&e))?;
        if !resp.status().is_success() {
            return Err(format!("models/supports answered {}", resp.status()));
        }
        let list = resp
            .json::<Vec<WorkerSupportedModel>>()
            .await
            .map_err(|e| format!("models/supports: {}", crate::http::describe(&e)))?;
        Ok(list
            .iter()
            .flat_map(|w| &w.models)
            .any(|s| s.model == model && s.worker_type == wt.as_str()))
    }

    /// The models this apiserver woke (`model@type`).
    pub fn woken(&self) -> Vec<String> {
        self.lock().woken.keys().cloned().collect()
    }

    /// Stops a woken model on its manager (it is forgotten as woken).
    pub fn unload(&self, key: &str) {
        let w = {
            let mut st = self.lock();
            st.starting.remove(key);
            st.woken.remove(key)
        };
        let Some(w) = w else {
            return;
        };
        let http = self.http.clone();
        let key = key.to_string();
        self.spawn(async move {
            let body = json!({"host": w.host, "port": w.port, "model": w.model,
                              "worker_type": w.worker_type.as_str(), "params": {}});
            match post_worker(&http, &w.host, w.port, MODELS_SHUTDOWN_PATH, &body).await {
                Ok(_) => {
                    info!(model = %Escaped(&key), worker = %format!("{}:{}", w.host, w.port), "stopped an idle woken model")
                }
                Err(e) => {
                    warn!(model = %Escaped(&key), error = %Escaped(&e.to_string()), "cannot stop the idle model")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use serde_json::Value;

    use super::*;
    use crate::wire::controller::{MODELS_PATH, ModelInstance};
    use crate::wire::worker::SupportedModel;

    async fn serve(app: axum::Router) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await });
        port
    }

    /// A worker manager that ran `models` and answers a start with `start_status`; the
    /// lifecycle calls it got (path, body).
    async fn manager(
        models: &[&str],
        start_status: StatusCode,
    ) -> (u16, Arc<Mutex<Vec<(String, Value)>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let list: Vec<SupportedModel> = models
            .iter()
            .map(|m| SupportedModel {
                model: m.to_string(),
                path: String::new(),
                worker_type: "llm".into(),
                path_exist: false,
                proxy: true,
                enabled: true,
                params: None,
            })
            .collect();
        let (c1, c2) = (calls.clone(), calls.clone());
        let app = axum::Router::new()
            .route(
                MODELS_SUPPORTS_PATH,
                get(move || {
                    let list = list.clone();
                    async move {
                        Json(vec![WorkerSupportedModel {
                            host: "127.0.0.1".into(),
                            port: 1,
                            models: list,
                        }])
                    }
                }),
            )
            .route(
                MODELS_STARTUP_PATH,
                post(move |Json(b): Json<Value>| async move {
                    c1.lock().unwrap().push(("startup".into(), b));
                    (start_status, Json(serde_json::json!({"detail": "x"})))
                }),
            )
            .route(
                MODELS_SHUTDOWN_PATH,
                post(move |Json(b): Json<Value>| async move {
                    c2.lock().unwrap().push(("shutdown".into(), b));
                    Json(Value::Null)
                }),
            );
        (serve(app).await, calls)
    }

    /// A controller listing managers on `ports`.
    async fn controller(ports: Vec<u16>) -> String {
        let app = axum::Router::new().route(
            MODELS_PATH,
            get(move || {
                let list: Vec<ModelInstance> = ports
                    .iter()
                    .map(|&port| ModelInstance {
                        model_name: manager_key(),
                        host: "127.0.0.1".into(),
                        port,
                        weight: Some(1.0),
                        check_healthy: Some(true),
                        healthy: Some(true),
                        enabled: Some(true),
                        prompt_template: None,
                        last_heartbeat: None,
                    })
                    .collect();
                async move { Json(list) }
            }),
        );
        format!("http://127.0.0.1:{}", serve(app).await)
    }

    /// Polls `cond` every 10 ms for up to 5 s.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    fn waker(url: &str) -> Arc<Waker> {
        Arc::new(Waker::new(ControllerClient::new(url, Duration::from_secs(2)).unwrap()).unwrap())
    }

    #[tokio::test]
    async fn wakes_the_model_on_the_manager_that_ran_it_and_unloads_it() {
        let (other, other_calls) = manager(&["x"], StatusCode::OK).await;
        let (ran, ran_calls) = manager(&["m"], StatusCode::OK).await;
        let w = waker(&controller(vec![other, ran]).await);
        let woken = w.start("m", WorkerType::Llm).await.unwrap().unwrap();
        assert_eq!(woken.port, ran);
        assert!(other_calls.lock().unwrap().is_empty());
        let calls = ran_calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "startup");
        assert_eq!(calls[0].1["model"], "m");
        assert_eq!(calls[0].1["worker_type"], "llm");
        assert_eq!(calls[0].1["params"], serde_json::json!({}));
        // Through wake(): recorded as woken, and no second start within the gap.
        assert!(w.wake("m", WorkerType::Llm));
        assert!(eventually(|| w.woken() == ["m@llm"]).await, "never woken");
        assert!(!w.wake("m", WorkerType::Llm));
        w.unload("m@llm");
        assert!(w.woken().is_empty());
        assert!(
            eventually(|| ran_calls.lock().unwrap().len() == 3).await,
            "{:?}",
            ran_calls.lock().unwrap()
        );
        assert_eq!(ran_calls.lock().unwrap()[2].0, "shutdown");
        // Unloaded: it may be woken again at once.
        assert!(w.wake("m", WorkerType::Llm));
    }

    #[tokio::test]
    async fn a_model_running_already_is_not_woken_and_an_unknown_one_names_each_manager() {
        let (busy, _) = manager(&["m"], StatusCode::CONFLICT).await;
        let w = waker(&controller(vec![busy]).await);
        assert!(w.start("m", WorkerType::Llm).await.unwrap().is_none());
        let e = w
            .start("zz", WorkerType::Llm)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zz@llm") && e.contains("does not list it"),
            "{e}"
        );
        let (failing, _) = manager(&["m"], StatusCode::BAD_REQUEST).await;
        let w = waker(&controller(vec![failing]).await);
        let e = w.start("m", WorkerType::Llm).await.unwrap_err().to_string();
        assert!(e.contains("400"), "{e}");
        let w = waker(&controller(vec![]).await);
        let e = w.start("m", WorkerType::Llm).await.unwrap_err().to_string();
        assert!(e.contains("none is registered"), "{e}");
    }
}
