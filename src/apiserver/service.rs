//! The apiserver process: wires discovery, the worker client, HTTP routes with CORS, the
//! admin socket and the graceful-stop sequence, exactly like the controller's.
//!
//! Start-up order: pid lock → first instance-list fetch (a controller that is down is only
//! a warning: the view fills in when it comes up) → TCP bind → admin socket → ready. Stop
//! (SIGTERM, SIGINT or admin `Stop`) stops accepting, lets in-flight requests finish
//! (bounded), removes socket and pid file and exits 0.
//!
//! HTTP is served by `--threads` OS threads, each running a single-threaded tokio runtime
//! with its own pool of worker connections. The accept loop (on the main runtime, with
//! discovery and the admin socket) hands each new client connection to the next serving
//! thread in turn, and the connection stays there: a request, its call to the worker and its
//! stream relay never change threads. With a shared multi-threaded runtime every request
//! crossed threads several times, and at low load those wake-ups cost more CPU than the
//! proxying itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tracing::{debug, info, warn};

use super::discovery::Discovery;
use super::proxy::Upstream;
use super::{AppState, Stats, router};
use crate::admin::server::AdminHandler;
use crate::config::ApiserverConfig;
use crate::controller::client::ControllerClient;
use crate::daemon::{self, DaemonBase, Readiness};

/// How long in-flight requests (including streams) may take to finish on stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of each controller call.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(5);

struct Admin {
    base: Arc<DaemonBase>,
    state: Arc<AppState>,
    policy: &'static str,
}

impl AdminHandler for Admin {
    fn status(&self) -> crate::admin::Status {
        let d = &self.state.upstream.discovery;
        let view = d.view();
        let mut healthy = 0;
        let mut total = 0;
        for g in view.groups.values() {
            for i in &g.instances {
                total += 1;
                if i.routable() && !d.is_suspect(i) {
                    healthy += 1;
                }
            }
        }
        let mut models = view.models(super::discovery::LLM);
        models.extend(view.models(super::discovery::TEXT2VEC));
        let (ok, err) = d.freshness();
        let refresh = match (ok, err) {
            (_, Some(e)) => format!("failing ({e})"),
            (Some(t), None) => format!("ok {:.1}s ago", t.as_secs_f64()),
            (None, None) => "pending".into(),
        };
        self.base.status(
            healthy,
            total,
            vec![
                ("controller".into(), d.controllers()),
                ("policy".into(), self.policy.into()),
                (
                    "models".into(),
                    if models.is_empty() {
                        "-".into()
                    } else {
                        models.join(",")
                    },
                ),
                (
                    "in_flight".into(),
                    self.state
                        .stats
                        .in_flight
                        .load(Ordering::Relaxed)
                        .to_string(),
                ),
                (
                    "requests".into(),
                    self.state
                        .stats
                        .requests
                        .load(Ordering::Relaxed)
                        .to_string(),
                ),
                ("refresh".into(), refresh),
            ],
        )
    }

    fn stop(&self) {
        self.base.shutdown.cancel();
    }
}

/// CORS: DB-GPT's allow-all (origin echoed, credentials allowed), or a fixed origin list.
fn cors(origins: &Option<Vec<String>>) -> CorsLayer {
    let origin = match origins {
        None => AllowOrigin::mirror_request(),
        Some(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(AllowHeaders::mirror_request())
}

/// The pooled keep-alive client for calls to workers.
fn worker_client() -> reqwest::Result<reqwest::Client> {
    crate::http::build_client(|b| {
        b.connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .http1_only()
    })
}

/// Builds the state (used by the process and by in-process tests).
pub fn build_state(cfg: &ApiserverConfig) -> anyhow::Result<Arc<AppState>> {
    let client = ControllerClient::new(&cfg.controller_addr, CONTROLLER_TIMEOUT)?;
    Ok(Arc::new(AppState {
        upstream: Upstream {
            http: worker_client()?,
            discovery: Arc::new(Discovery::new(client)),
            policy: cfg.routing_policy,
            max_retries: cfg.max_retries,
            timeout: cfg.request_timeout,
        },
        api_keys: cfg.api_keys.clone(),
        embedding_batch_size: cfg.embedding_batch_size,
        stats: Arc::new(Stats::default()),
    }))
}

/// The state of one more serving thread: its own worker connection pool (connections are
/// driven by the runtime that opened them), everything else shared with `base`.
fn thread_state(base: &AppState) -> anyhow::Result<Arc<AppState>> {
    Ok(Arc::new(AppState {
        upstream: Upstream {
            http: worker_client()?,
            discovery: base.upstream.discovery.clone(),
            policy: base.upstream.policy,
            max_retries: base.upstream.max_retries,
            timeout: base.upstream.timeout,
        },
        api_keys: base.api_keys.clone(),
        embedding_batch_size: base.embedding_batch_size,
        stats: base.stats.clone(),
    }))
}

/// Runs the apiserver until it is stopped.
pub async fn run(cfg: ApiserverConfig, mut readiness: Readiness) -> anyhow::Result<()> {
    let started = daemon::report_startup(&mut readiness, start(&cfg).await);
    let (base, state, listener, admin_sock) = started?;
    let base = Arc::new(base);
    let token = base.shutdown.clone();
    daemon::spawn_signal_handler(token.clone())?;

    if cfg.api_keys.is_empty() {
        warn!("no --api_keys given: the API server is open to anyone who can reach it");
    } else {
        info!(keys = cfg.api_keys.len(), "API key authentication enabled");
    }
    let refresher = state
        .upstream
        .discovery
        .spawn_loop(cfg.refresh_interval, token.clone());
    let admin: Arc<dyn AdminHandler> = Arc::new(Admin {
        base: base.clone(),
        state: state.clone(),
        policy: cfg.routing_policy.as_str(),
    });
    let admin_task = tokio::spawn(crate::admin::server::serve(
        admin_sock,
        admin,
        token.clone(),
    ));
    let http = serve_on_threads(&cfg, &state, listener, token.clone())?;

    let status = format!(
        "apiserver serving on {}:{} (controller {}, policy {})",
        cfg.host,
        cfg.port,
        state.upstream.discovery.controllers(),
        cfg.routing_policy.as_str()
    );
    info!("{status}");
    readiness.ready(&status);
    daemon::spawn_watchdog(token.clone());

    token.cancelled().await;
    daemon::notify_stopping();
    info!("stopping: draining in-flight requests");
    daemon::drain_http(http, DRAIN_TIMEOUT).await;
    let _ = refresher.await;
    let _ = admin_task.await;
    info!("apiserver stopped");
    drop(base);
    Ok(())
}

/// Connections accepted by the main runtime, handed to one serving thread.
struct Handoff {
    rx: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for Handoff {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(std) = self.rx.recv().await else {
                // The accept loop is gone (stopping): wait for the graceful shutdown.
                return std::future::pending().await;
            };
            // Registers the socket with this thread's reactor.
            match tokio::net::TcpStream::from_std(std) {
                Ok(tcp) => match tcp.peer_addr() {
                    Ok(addr) => return (tcp, addr),
                    Err(e) => debug!(error = %e, "connection closed before it was served"),
                },
                Err(e) => warn!(error = %e, "cannot register a client connection"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Starts `cfg.threads` serving threads and the accept loop that feeds them; the returned
/// task ends when every thread has finished its graceful shutdown (see [`daemon::drain_http`]).
fn serve_on_threads(
    cfg: &ApiserverConfig,
    state: &Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let local = listener.local_addr()?;
    let mut senders = Vec::with_capacity(cfg.threads);
    let mut threads = Vec::with_capacity(cfg.threads);
    for i in 0..cfg.threads {
        let thread_state = if i == 0 {
            state.clone()
        } else {
            thread_state(state)?
        };
        let app = router(thread_state).layer(cors(&cfg.cors_allow_origins));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dbgpt-http-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    axum::serve(Handoff { rx, local }, app)
                        .with_graceful_shutdown(async move { token.cancelled().await })
                        .await
                })
            })?;
        threads.push(thread);
    }
    tokio::spawn(accept_loop(listener, senders, shutdown));
    Ok(tokio::task::spawn_blocking(move || {
        let mut result = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(std::io::Error::other("a serving thread panicked")),
            }
        }
        result
    }))
}

/// Accepts client connections and deals them out to the serving threads in turn, with
/// `TCP_NODELAY` set: SSE chunks are small writes, and Nagle's algorithm against the
/// client's delayed ACK would hold each one back by up to 40 ms.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    senders: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                match tcp.into_std() {
                    Ok(std) => {
                        // A closed channel means that thread has stopped: the connection
                        // is dropped (closed), as any connection arriving while stopping.
                        let _ = senders[next].send(std);
                        next = (next + 1) % senders.len();
                    }
                    Err(e) => warn!(error = %e, "cannot hand over a client connection"),
                }
            }
            // Per-connection failures (reset before accept…) are routine; running out of
            // file descriptors is not: back off instead of spinning.
            Err(e) => {
                if !is_connection_error(&e) {
                    warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

type Started = (
    DaemonBase,
    Arc<AppState>,
    tokio::net::TcpListener,
    crate::admin::server::AdminSocket,
);

async fn start(cfg: &ApiserverConfig) -> anyhow::Result<Started> {
    let base = DaemonBase::acquire("apiserver", "apiserver", cfg.port)?;
    let state = build_state(cfg)?;
    if !state.upstream.discovery.refresh().await {
        warn!("no controller answered at start-up; models appear once one does");
    }
    let listener = crate::http::bind(&cfg.host, cfg.port).await?;
    let admin = crate::admin::server::bind(&base.socket_path()).await?;
    Ok((base, state, listener, admin))
}
