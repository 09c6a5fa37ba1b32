//! The worker process: model loading, HTTP API and registration, run through the daemons'
//! common lifecycle ([`crate::daemon::run`]).
//!
//! Start-up: pid lock → TCP bind → admin socket → load every configured model (each
//! registers once loaded) → accept HTTP → register `WorkerManager@service` → ready. A configured
//! model that fails to load fails the start with its reason (the `--daemon` parent and
//! systemd see it). An unreachable controller does not: the worker serves and keeps
//! retrying. Stop (SIGTERM, SIGINT, admin `Stop`): deregister every entry first, then stop
//! accepting and drain in-flight requests (bounded), flush the tracer file, then exit 0.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tracing::{info, warn};

use super::config::WorkerConfig;
use super::manager::WorkerManager;
use super::registration::{Registrar, advertised_host};
use super::routes::{WorkerState, router};
use crate::controller::client::ControllerClient;
use crate::daemon::{self, Daemon, DaemonBase, Health, Readiness, Service, Started};
use crate::telemetry::metrics::worker::WorkerMetrics;
use crate::telemetry::metrics::{Exposition, MeasureLayer, Vitals};
use crate::tracer::Flusher;
use crate::wire::controller::manager_key;

/// The worker's part of the lifecycle.
struct Worker {
    cfg: WorkerConfig,
    manager: Arc<WorkerManager>,
    heartbeat: Option<JoinHandle<()>>,
    flusher: Option<Flusher>,
    exposition: Arc<Exposition>,
    /// The separate `/metrics` listener (`--metrics_addr HOST:PORT`).
    metrics_listener: Option<TcpListener>,
}

impl Daemon for Worker {
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    const STOPPING: &'static str = "stopping: deregistering, then draining in-flight requests";

    fn health(&self) -> impl Fn() -> Health + Send + Sync + 'static {
        let manager = self.manager.clone();
        move || {
            let running = manager.running();
            let known = manager.known_specs().len();
            let mut details = vec![(
                "models".to_string(),
                running
                    .iter()
                    .map(|m| m.spec.key())
                    .collect::<Vec<_>>()
                    .join(","),
            )];
            details.extend(manager.metrics().vitals().details());
            // Slot and queue usage of the models that schedule their own requests.
            for m in &running {
                if let Some(st) = m.engine_status() {
                    details.push((format!("engine {}", m.spec.key()), st.to_string()));
                }
            }
            if let Some(r) = manager.registrar() {
                details.push(("controller".to_string(), r.controllers()));
                let (h, p) = r.address();
                details.push(("advertised".to_string(), format!("{h}:{p}")));
            }
            Health {
                healthy: running.len() as u32,
                total: known as u32,
                details,
            }
        }
    }

    /// Loads the configured models (each registers itself once loaded) before accepting
    /// connections: the port is already bound, so early clients wait in the backlog
    /// instead of getting "model not found".
    async fn prepare(&mut self, _shutdown: &CancellationToken) -> anyhow::Result<()> {
        for spec in self.cfg.models.clone() {
            if let Err(e) = self.manager.start(spec).await {
                anyhow::bail!(e.to_string());
            }
        }
        Ok(())
    }

    fn serve(
        &mut self,
        listener: TcpListener,
        drain: crate::http::Drain,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
        let (tracer, flusher) = self.cfg.tracer.open(crate::tracer::WORKER_ROOT);
        self.flusher = Some(flusher);
        let bind = listener.local_addr()?;
        let app = router(WorkerState {
            manager: self.manager.clone(),
            tracer,
            bind,
        });
        let app = MeasureLayer(self.manager.metrics().clone()).layer(self.exposition.route_on(app));
        if let Some(l) = self.metrics_listener.take() {
            self.exposition.serve_separate(l, drain.clone());
        }
        Vitals::spawn_sampler(
            self.manager.metrics().clone(),
            WorkerMetrics::vitals,
            shutdown.clone(),
        );
        // HTTP closes after the stop's deregistration (the lifecycle drains after
        // `stopping`), so requests are answered until every entry is deregistered.
        // One single-threaded runtime per core, as the apiserver: a connection's requests,
        // the upstream calls they make and the streams they relay stay on one thread. On the
        // shared multi-threaded runtime a proxied stream woke other threads for each event
        // (12-13 voluntary context switches per 16-event stream at c=1, about 4 now).
        let routers = vec![app; crate::http::default_threads()];
        let http = crate::http::serve_on_threads(listener, routers, self.cfg.http, drain)?;
        self.heartbeat = self.manager.registrar().cloned().map(|r| {
            let r2 = r.clone();
            tokio::spawn(async move {
                r2.add(&manager_key()).await;
            });
            r.spawn_loop(shutdown.clone())
        });
        Ok(http)
    }

    fn ready_status(&self) -> String {
        format!(
            "worker serving {} model(s) on {}:{}",
            self.manager.running().len(),
            self.cfg.host,
            self.cfg.port
        )
    }

    async fn stopping(&mut self) {
        if let Some(r) = self.manager.registrar() {
            r.remove_all().await;
        }
        if let Some(h) = self.heartbeat.take() {
            let _ = h.await;
        }
    }

    async fn finish(self, drained: bool) {
        if !drained {
            warn!(
                in_flight = self.manager.in_flight(),
                "abandoned in-flight requests"
            );
        }
        if let Some(f) = self.flusher {
            f.finish().await;
        }
    }
}

/// Runs the worker until it is stopped.
pub async fn run(cfg: WorkerConfig, readiness: Readiness) -> anyhow::Result<()> {
    daemon::run(readiness, start(cfg)).await
}

async fn start(cfg: WorkerConfig) -> anyhow::Result<Started<Worker>> {
    let mut base = DaemonBase::acquire(Service::Worker, cfg.port).await?;
    let (listener, admin) = daemon::bind(&mut base, &cfg.host).await?;
    let registrar = match &cfg.controller_addr {
        Some(addr) => {
            let client = ControllerClient::new(addr, Duration::from_secs(10))?;
            let host = advertised_host(&cfg.host, cfg.register_host.as_deref());
            info!(controller = addr, advertised = %format!("{host}:{}", cfg.port), "registering with the controller");
            Some(Arc::new(Registrar::new(
                client,
                host,
                cfg.port,
                cfg.heartbeat_interval,
            )))
        }
        None => {
            info!("not registering with a controller (--no_register)");
            None
        }
    };
    let manager = Arc::new(
        WorkerManager::new(registrar, cfg.concurrency).with_proxy_timeouts(cfg.proxy_timeouts),
    );
    let mut exposition = Exposition::new(Service::Worker.as_str(), cfg.metrics.clone());
    manager.metrics().register(exposition.registry());
    let metrics_listener = exposition.bind_separate().await?;
    Ok(Started {
        base,
        listener,
        admin,
        daemon: Worker {
            cfg,
            manager,
            heartbeat: None,
            flusher: None,
            exposition: Arc::new(exposition),
            metrics_listener,
        },
    })
}
