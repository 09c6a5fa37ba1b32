//! The controller process: wires the registry, HTTP API, admin socket and background tasks
//! together and runs the graceful-stop sequence.
//!
//! Start-up order: pid lock → registry open → TCP bind → admin socket → ready. Any failure
//! is reported to the `--daemon` parent / systemd with its reason. Stop (SIGTERM, SIGINT or
//! admin `Stop`) takes one path: stop accepting, drain in-flight requests (bounded), flush
//! heartbeat timestamps and the tracer file, remove socket and pid file, exit 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tracing::{error, info};

use super::{ControllerState, router, spawn_background};
use crate::admin::server::AdminHandler;
use crate::config::{ControllerConfig, RegistryType};
use crate::daemon::{self, DaemonBase, Readiness};
use crate::registry::{RedbRegistry, Registry, SqlRegistry};

/// How long in-flight HTTP requests may take to finish on stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

struct Admin {
    base: Arc<DaemonBase>,
    registry: Arc<dyn Registry>,
}

impl AdminHandler for Admin {
    fn status(&self) -> crate::admin::Status {
        let c = self.registry.counts();
        self.base.status(
            c.healthy as u32,
            c.total as u32,
            vec![("registry".into(), self.registry.describe())],
        )
    }

    fn stop(&self) {
        self.base.shutdown.cancel();
    }
}

/// Runs the controller until it is stopped.
pub async fn run(cfg: ControllerConfig, mut readiness: Readiness) -> anyhow::Result<()> {
    let started = daemon::report_startup(&mut readiness, start(&cfg).await);
    let (base, registry, listener, admin_sock) = started?;
    let base = Arc::new(base);
    let token = base.shutdown.clone();
    daemon::spawn_signal_handler(token.clone())?;

    let bg = spawn_background(registry.clone(), cfg.heartbeat_interval, token.clone());
    let admin: Arc<dyn AdminHandler> = Arc::new(Admin {
        base: base.clone(),
        registry: registry.clone(),
    });
    let admin_task = tokio::spawn(crate::admin::server::serve(
        admin_sock,
        admin,
        token.clone(),
    ));
    let (tracer, flusher) = cfg.tracer.open(crate::tracer::CONTROLLER_ROOT);
    let app = router(ControllerState {
        registry: registry.clone(),
        tracer,
    });
    let http = tokio::spawn(crate::http::serve(listener, app, cfg.http, token.clone()));

    let status = format!(
        "controller serving on {}:{} (registry {})",
        cfg.host,
        cfg.port,
        registry.describe()
    );
    info!("{status}");
    readiness.ready(&status);
    daemon::spawn_watchdog(token.clone());

    token.cancelled().await;
    daemon::notify_stopping();
    info!("stopping: draining in-flight requests");
    daemon::drain_http(http, DRAIN_TIMEOUT).await;
    for t in bg {
        let _ = t.await;
    }
    let _ = admin_task.await;
    if let Err(e) = registry.flush().await {
        error!(error = %e, "could not persist the last heartbeat timestamps");
    }
    drop(registry);
    flusher.finish().await;
    info!("controller stopped");
    drop(base);
    Ok(())
}

type Started = (
    DaemonBase,
    Arc<dyn Registry>,
    tokio::net::TcpListener,
    crate::admin::server::AdminSocket,
);

async fn start(cfg: &ControllerConfig) -> anyhow::Result<Started> {
    let base = DaemonBase::acquire("controller", "controller", cfg.port)?;
    let registry: Arc<dyn Registry> = match cfg.registry_type {
        RegistryType::Embedded => {
            let path = cfg.registry_path.clone();
            let timeout = cfg.heartbeat_timeout;
            Arc::new(
                tokio::task::spawn_blocking(move || RedbRegistry::open(&path, timeout)).await??,
            )
        }
        RegistryType::Database => {
            let Some(db) = cfg.registry_db.as_ref() else {
                bail!("--registry_type database needs --registry_db_host or --registry_db_url");
            };
            Arc::new(SqlRegistry::open(db, cfg.heartbeat_timeout).await?)
        }
    };
    let listener = crate::http::bind(&cfg.host, cfg.port).await?;
    let admin = crate::admin::server::bind(&base.socket_path()).await?;
    Ok((base, registry, listener, admin))
}
