//! The controller process: the registry, HTTP API and background tasks, run through the
//! daemons' common lifecycle ([`crate::daemon::run`]).
//!
//! Start-up order: pid lock → registry open → TCP bind → admin socket → ready. Any failure
//! is reported to the `--daemon` parent / systemd with its reason. Stop (SIGTERM, SIGINT or
//! admin `Stop`) takes one path: stop accepting, drain in-flight requests (bounded), flush
//! heartbeat timestamps and the tracer file, remove socket and pid file, exit 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tracing::error;

use super::config::{ControllerConfig, RegistryType};
use super::{ControllerState, router, spawn_background};
use crate::daemon::{self, Daemon, DaemonBase, Health, Readiness, Service, Started};
use crate::http::Drain;
use crate::keys::{KeyStore, RedbKeyStore, SqlKeyStore};
use crate::registry::{RedbRegistry, Registry, RegistryError, SqlRegistry};
use crate::telemetry::metrics::controller::ControllerMetrics;
use crate::telemetry::metrics::{Exposition, MeasureLayer, Vitals};
use crate::tracer::{Flusher, Tracer};

/// The controller's part of the lifecycle.
struct Controller {
    cfg: ControllerConfig,
    registry: Arc<dyn Registry>,
    keys: Arc<dyn KeyStore>,
    background: Vec<JoinHandle<()>>,
    tracer: Tracer,
    flusher: Flusher,
    metrics: Arc<ControllerMetrics>,
    exposition: Arc<Exposition>,
    /// The separate `/metrics` listener (`--metrics_addr HOST:PORT`).
    metrics_listener: Option<TcpListener>,
}

impl Daemon for Controller {
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// The redb registry is one process's at a time: an upgrade's new process opens it once
    /// the old one has drained and closed it (connections wait in the listen queue).
    const SEQUENTIAL_HANDOVER: bool = true;

    fn health(&self) -> impl Fn() -> Health + Send + Sync + 'static {
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        move || {
            let c = registry.counts();
            let mut details = vec![("registry".into(), registry.describe())];
            details.extend(metrics.vitals().details());
            Health {
                healthy: c.healthy as u32,
                total: c.total as u32,
                details,
            }
        }
    }

    fn serve(
        &mut self,
        listener: TcpListener,
        drain: Drain,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
        let app = router(ControllerState {
            registry: self.registry.clone(),
            keys: self.keys.clone(),
            tracer: self.tracer.clone(),
            metrics: self.metrics.clone(),
        });
        let app = MeasureLayer(self.metrics.clone()).layer(self.exposition.route_on(app));
        if let Some(l) = self.metrics_listener.take() {
            self.exposition.serve_separate(l, drain.clone());
        }
        Vitals::spawn_sampler(
            self.metrics.clone(),
            ControllerMetrics::vitals,
            shutdown.clone(),
        );
        Ok(tokio::spawn(crate::http::serve(
            listener,
            app,
            self.cfg.http,
            drain,
        )))
    }

    fn ready_status(&self) -> String {
        format!(
            "controller serving on {}:{} (registry {})",
            self.cfg.host,
            self.cfg.port,
            self.registry.describe()
        )
    }

    async fn finish(self, _drained: bool) {
        for t in self.background {
            let _ = t.await;
        }
        if let Err(e) = self.registry.flush().await {
            error!(error = %e, "could not persist the last heartbeat timestamps");
        }
        drop(self.keys);
        drop(self.registry);
        self.flusher.finish().await;
    }
}

/// Runs the controller until it is stopped.
pub async fn run(cfg: ControllerConfig, readiness: Readiness) -> anyhow::Result<()> {
    daemon::run(readiness, start(cfg)).await
}

async fn start(cfg: ControllerConfig) -> anyhow::Result<Started<Controller>> {
    let mut base = DaemonBase::acquire(Service::Controller, cfg.port).await?;
    // After an upgrade, the old process must have closed the registry first.
    base.release_predecessor().await?;
    let (registry, keys): (Arc<dyn Registry>, Arc<dyn KeyStore>) = match cfg.registry_type {
        RegistryType::Embedded => {
            // After an upgrade's handover the old process may still be closing the file: a
            // successor waits for its lock (bounded).
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let registry: Arc<RedbRegistry> = loop {
                let path = cfg.registry_path.clone();
                let timeout = cfg.heartbeat_timeout;
                match tokio::task::spawn_blocking(move || RedbRegistry::open(&path, timeout))
                    .await?
                {
                    Err(RegistryError::Locked { .. })
                        if daemon::handover::is_successor()
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => break Arc::new(r?),
                }
            };
            (registry.clone(), Arc::new(RedbKeyStore::new(registry)))
        }
        RegistryType::Database => {
            let Some(db) = cfg.registry_db.as_ref() else {
                bail!("--registry_type database needs --registry_db_host or --registry_db_url");
            };
            let registry = SqlRegistry::open(db, cfg.heartbeat_timeout).await?;
            let keys = SqlKeyStore::open(registry.pool(), db.db_type).await?;
            (Arc::new(registry), Arc::new(keys))
        }
    };
    tracing::info!(store = %keys.describe(), "managed API keys ready");
    let metrics = Arc::new(ControllerMetrics::default());
    let mut exposition = Exposition::new(Service::Controller.as_str(), cfg.metrics.clone());
    metrics.register(exposition.registry(), registry.clone());
    let metrics_listener = exposition.bind_separate().await?;
    let (listener, admin) = daemon::bind(&mut base, &cfg.host).await?;
    let background = spawn_background(
        registry.clone(),
        metrics.clone(),
        cfg.heartbeat_interval,
        base.shutdown.clone(),
    );
    let (tracer, flusher) = cfg.tracer.open(crate::tracer::CONTROLLER_ROOT);
    Ok(Started {
        base,
        listener,
        admin,
        daemon: Controller {
            cfg,
            registry,
            keys,
            background,
            tracer,
            flusher,
            metrics,
            exposition: Arc::new(exposition),
            metrics_listener,
        },
    })
}
