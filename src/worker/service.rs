//! The worker process: HTTP API, admin socket, model loading and registration.
//!
//! Start-up: pid lock → TCP bind → admin socket → load every configured model (each
//! registers once loaded) → accept HTTP → register `WorkerManager@service` → ready. A configured
//! model that fails to load fails the start with its reason (the `--daemon` parent and
//! systemd see it). An unreachable controller does not: the worker serves and keeps
//! retrying. Stop (SIGTERM, SIGINT, admin `Stop`): deregister every entry first, then stop
//! accepting and drain in-flight requests (bounded), flush the tracer file, then exit 0.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::manager::WorkerManager;
use super::registration::{Registrar, advertised_host, manager_key};
use super::routes::{WorkerState, router};
use crate::admin::server::AdminHandler;
use crate::config::WorkerConfig;
use crate::controller::client::ControllerClient;
use crate::daemon::{self, DaemonBase, Readiness};

/// How long in-flight generations may run on after a stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

struct Admin {
    base: Arc<DaemonBase>,
    manager: Arc<WorkerManager>,
}

impl AdminHandler for Admin {
    fn status(&self) -> crate::admin::Status {
        let running = self.manager.running();
        let known = self.manager.known_specs().len();
        let mut details = vec![
            (
                "models".to_string(),
                running
                    .iter()
                    .map(|m| m.spec.key())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "in_flight".to_string(),
                self.manager.in_flight().to_string(),
            ),
        ];
        if let Some(r) = self.manager.registrar() {
            details.push(("controller".to_string(), r.controllers()));
            let (h, p) = r.address();
            details.push(("advertised".to_string(), format!("{h}:{p}")));
        }
        self.base
            .status(running.len() as u32, known as u32, details)
    }

    fn stop(&self) {
        self.base.shutdown.cancel();
    }
}

/// Runs the worker until it is stopped.
pub async fn run(cfg: WorkerConfig, mut readiness: Readiness) -> anyhow::Result<()> {
    let started = daemon::report_startup(&mut readiness, start(&cfg).await);
    let (base, listener, admin_sock, manager) = started?;
    let base = Arc::new(base);
    let token = base.shutdown.clone();
    daemon::spawn_signal_handler(token.clone())?;

    let admin: Arc<dyn AdminHandler> = Arc::new(Admin {
        base: base.clone(),
        manager: manager.clone(),
    });
    let admin_task = tokio::spawn(crate::admin::server::serve(
        admin_sock,
        admin,
        token.clone(),
    ));
    // Load the configured models (each registers itself once loaded) before accepting
    // connections: the port is already bound, so early clients wait in the backlog
    // instead of getting "model not found".
    for spec in cfg.models.clone() {
        if let Err(e) = manager.start(spec).await {
            let reason = e.to_string();
            readiness.failed(&reason);
            token.cancel();
            let _ = admin_task.await;
            anyhow::bail!(reason);
        }
    }
    let http_token = tokio_util::sync::CancellationToken::new();
    let (tracer, flusher) = cfg.tracer.open(crate::tracer::WORKER_ROOT);
    let app = router(WorkerState {
        manager: manager.clone(),
        tracer,
    });
    let http = tokio::spawn(crate::http::serve(
        listener,
        app,
        cfg.http,
        http_token.clone(),
    ));
    let heartbeat = manager.registrar().cloned().map(|r| {
        let r2 = r.clone();
        let t = token.clone();
        tokio::spawn(async move {
            r2.add(&manager_key()).await;
        });
        r.spawn_loop(t)
    });
    let status = format!(
        "worker serving {} model(s) on {}:{}",
        manager.running().len(),
        cfg.host,
        cfg.port
    );
    info!("{status}");
    readiness.ready(&status);
    daemon::spawn_watchdog(token.clone());

    token.cancelled().await;
    daemon::notify_stopping();
    info!("stopping: deregistering, then draining in-flight requests");
    if let Some(r) = manager.registrar() {
        r.remove_all().await;
    }
    if let Some(h) = heartbeat {
        let _ = h.await;
    }
    http_token.cancel();
    if !daemon::drain_http(http, DRAIN_TIMEOUT).await {
        warn!(
            in_flight = manager.in_flight(),
            "abandoned in-flight requests"
        );
    }
    let _ = admin_task.await;
    flusher.finish().await;
    info!("worker stopped");
    drop(base);
    Ok(())
}

type Started = (
    DaemonBase,
    tokio::net::TcpListener,
    crate::admin::server::AdminSocket,
    Arc<WorkerManager>,
);

async fn start(cfg: &WorkerConfig) -> anyhow::Result<Started> {
    let base = DaemonBase::acquire("worker", "worker", cfg.port)?;
    let listener = crate::http::bind(&cfg.host, cfg.port).await?;
    let admin = crate::admin::server::bind(&base.socket_path()).await?;
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
    let manager = Arc::new(WorkerManager::new(registrar, cfg.concurrency));
    Ok((base, listener, admin, manager))
}
