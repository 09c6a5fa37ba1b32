//! Process lifecycle shared by every daemon: background mode, pid lock, readiness,
//! systemd notification, signals and default directories.
//!
//! `--daemon` forks (through the `daemonize` crate) *before* any thread or tokio runtime
//! exists. The original process does not trust the fork's exit code: it waits on a pipe
//! until the daemon reports "ready" (its port and admin socket are bound) or the reason it
//! failed, and exits 0 or 1 accordingly. Under systemd the same readiness point sends
//! `READY=1` (`Type=notify`), `STATUS=` lines and, when `WatchdogSec=` is set, `WATCHDOG=1`
//! pings. Every daemon holds an exclusive `flock` on `<service>-<port>.pid` in its runtime
//! directory for its whole life, so a second instance is refused at once.
//!
//! [`run`] is the one lifecycle of the three daemons: start-up (reported to the `--daemon`
//! parent and systemd) → signals → admin socket → HTTP → `READY=1` → watchdog → wait for a
//! stop (SIGTERM, SIGINT or admin `Stop`, which all cancel one token) → `STOPPING=1` → drain
//! in-flight requests (bounded) → flush → remove socket and pid file. A service supplies only
//! what differs, through the [`Daemon`] hooks.
//!
//! Draining ([`crate::http::Drain`]): a stop first makes `/api/ready` answer 503 and every
//! response carry `Connection: close` (and, when the daemon leaves for good, the
//! `x-dbgpt-draining` header the apiserver acts on), keeps serving for [`DRAIN_GRACE`] so
//! busy keep-alive clients move to new connections, then stops accepting (a daemon that
//! hands over stops accepting at once), closes idle connections and waits for in-flight
//! requests and streams ([`Daemon::DRAIN_TIMEOUT`]; [`HANDOVER_DRAIN_TIMEOUT`] after a
//! handover). The listening socket may come from systemd
//! ([`activation`]) or from the process this one replaces ([`handover`]); after a handover
//! the old process neither deregisters nor removes the pid file and admin socket, which
//! now belong to its successor.

pub mod activation;
pub mod handover;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Environment variable for the log directory (DB-GPT's name).
pub const LOG_DIR_ENV: &str = "DBGPT_LOG_DIR";
/// Environment variable for the state directory (registry file).
pub const STATE_DIR_ENV: &str = "DBGPT_STATE_DIR";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where log files go: `$DBGPT_LOG_DIR`, else `/var/log/dbgpt` for root, else
/// `$XDG_STATE_HOME/dbgpt/logs` (`~/.local/state/dbgpt/logs`).
pub fn log_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(LOG_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/log/dbgpt");
    }
    dirs::state_dir()
        .map(|d| d.join("dbgpt").join("logs"))
        .unwrap_or_else(|| PathBuf::from("logs"))
}

/// Where persistent state goes: `$DBGPT_STATE_DIR`, else `/var/lib/dbgpt` for root, else
/// `$XDG_DATA_HOME/dbgpt` (`~/.local/share/dbgpt`).
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/lib/dbgpt");
    }
    dirs::data_dir()
        .map(|d| d.join("dbgpt"))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Creates a directory (and parents) private to this user if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}

/// An exclusively locked pid file; removed on drop while this process owns it.
///
/// The lock is a `flock` on the open file, so a process that is handed the descriptor (an
/// upgrade's successor) shares it: the file stays locked across the handover and the old
/// process's exit.
pub struct PidFile {
    path: PathBuf,
    file: File,
    owned: Arc<AtomicBool>,
}

fn flock_exclusive(file: &File) -> Result<(), nix::errno::Errno> {
    // SAFETY: flock on a descriptor this process holds.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

impl PidFile {
    /// Locks `path` and writes our pid; the file is removed on drop while `owned` is set.
    /// Fails at once, naming the running pid, if another process holds the lock.
    pub fn acquire(path: &Path, what: &str, owned: Arc<AtomicBool>) -> anyhow::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open pid file {}", path.display()))?;
        if let Err(errno) = flock_exclusive(&file) {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let pid = s.trim();
                bail!(
                    "{what} is already running{} (lock held on {})",
                    if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" with pid {pid}")
                    },
                    path.display()
                );
            }
            bail!("cannot lock pid file {}: {errno}", path.display());
        }
        let pid = PidFile {
            path: path.to_path_buf(),
            file,
            owned,
        };
        pid.write_pid()?;
        Ok(pid)
    }

    /// The pid file handed over by the process this one replaces (already locked by the
    /// shared open file); removed on drop only while `owned` is set.
    fn inherited(fd: OwnedFd, path: &Path, owned: Arc<AtomicBool>) -> anyhow::Result<Self> {
        let file = File::from(fd);
        flock_exclusive(&file).map_err(|e| {
            anyhow::anyhow!(
                "the pid file handed over is not the locked {}: {e}",
                path.display()
            )
        })?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
            owned,
        })
    }

    /// Writes this process's pid into the file.
    fn write_pid(&self) -> std::io::Result<()> {
        write_pid_to(&self.file, std::process::id())
    }
}

/// Replaces the content of the pid file `file` by `pid`.
fn write_pid_to(file: &File, pid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.set_len(0)?;
    file.write_all_at(format!("{pid}\n").as_bytes(), 0)
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so nobody can lock a file about to vanish.
        if self.owned.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reports start-up success or failure to whoever waits: the `--daemon` parent (through a
/// pipe) and systemd (through `NOTIFY_SOCKET`).
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// Foreground: only systemd (if any) is told.
    pub fn foreground() -> Self {
        Readiness { pipe: None }
    }

    /// Start-up finished: the daemon serves.
    pub fn ready(&mut self, status: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "OK {}", std::process::id());
        }
        if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
            warn!(error = %e, "could not notify systemd");
        }
    }

    /// Start-up failed; `reason` is shown to the user who ran `--daemon` (or `dbgpt ctl
    /// upgrade`, through the process this one was to replace).
    pub fn failed(&mut self, reason: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "ERR {}", reason.replace('\n', " "));
        }
        handover::report_failure(reason);
        let _ = sd_notify::notify(&[NotifyState::Status(&format!("failed: {reason}"))]);
    }
}

/// Detaches into the background. Returns in the daemon (the grandchild) only; the calling
/// process waits for the daemon's readiness report, prints it and exits with 0 on success
/// or 1 with the reason. Must be called before any thread is started.
pub fn daemonize(label: &str, log_path: &Path) -> anyhow::Result<Readiness> {
    if let Some(dir) = log_path.parent() {
        ensure_private_dir(dir)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    let (rx, tx): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("cannot create pipe")?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let d = daemonize::Daemonize::new()
        .working_directory(cwd)
        .umask(0o027)
        .stdout(log.try_clone()?)
        .stderr(log);
    match d.execute() {
        daemonize::Outcome::Parent(res) => {
            drop(tx);
            if let Err(e) = res {
                eprintln!("error: could not start {label} in the background: {e}");
                std::process::exit(1);
            }
            let mut answer = String::new();
            let _ = File::from(rx).read_to_string(&mut answer);
            let answer = answer.trim();
            if let Some(pid) = answer.strip_prefix("OK ") {
                println!(
                    "Started {label} in background with pid: {pid} (log: {})",
                    log_path.display()
                );
                std::process::exit(0);
            }
            let reason = answer
                .strip_prefix("ERR ")
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "the daemon exited during start-up; see {}",
                        log_path.display()
                    )
                });
            eprintln!("error: {label} failed to start: {reason}");
            std::process::exit(1);
        }
        daemonize::Outcome::Child(Ok(_)) => {
            drop(rx);
            Ok(Readiness {
                pipe: Some(File::from(tx)),
            })
        }
        daemonize::Outcome::Child(Err(e)) => {
            let mut p = File::from(tx);
            let _ = writeln!(p, "ERR cannot daemonize: {e}");
            std::process::exit(1);
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn spawn_signal_handler(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = token.cancelled() => return,
        };
        // The stop first: nothing after it (a log line) can keep it from happening.
        token.cancel();
        info!("{name} received: stopping");
    });
    Ok(())
}

/// Sends `WATCHDOG=1` at half the period systemd asked for, while the runtime is alive.
pub fn spawn_watchdog(token: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    info!(?period, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => { let _ = sd_notify::notify(&[NotifyState::Watchdog]); }
            }
        }
    });
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The three daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Controller,
    Worker,
    Apiserver,
}

impl Service {
    /// The name in socket and pid file names (`<name>-<port>.sock`) and in the admin
    /// protocol's `Status.service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Controller => "controller",
            Service::Worker => "worker",
            Service::Apiserver => "apiserver",
        }
    }

    /// DB-GPT's name for the service, shown to users ("Started ModelController …").
    pub fn label(self) -> &'static str {
        match self {
            Service::Controller => "ModelController",
            Service::Worker => "ModelWorker",
            Service::Apiserver => "ModelAPIServer",
        }
    }

    /// The service a socket, pid file or status names, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        [Service::Controller, Service::Worker, Service::Apiserver]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a daemon reports over the admin socket besides the fields every daemon has.
pub struct Health {
    /// Healthy instances (controller, apiserver) or running models (worker).
    pub healthy: u32,
    /// All instances or configured models.
    pub total: u32,
    /// Service-specific `key=value` details.
    pub details: Vec<(String, String)>,
}

/// Everything a daemon holds from start-up to exit: pid lock, runtime dir and start time.
pub struct DaemonBase {
    pub service: Service,
    pub port: u16,
    pub runtime_dir: PathBuf,
    pub started: std::time::Instant,
    pub started_unix_ms: u64,
    pub shutdown: CancellationToken,
    /// The HTTP server's drain state (readiness, `Connection: close`, accepting).
    pub drain: crate::http::Drain,
    /// Set while this process owns the pid file and the admin socket's path (cleared once
    /// handed over to a successor; set by a successor once its predecessor let go).
    owns_files: Arc<AtomicBool>,
    /// The listener and admin socket handed over by the process this one replaces, until
    /// bound.
    inherited: Option<(std::net::TcpListener, std::os::unix::net::UnixListener)>,
    /// A successor whose predecessor has not been released yet.
    taking_over: AtomicBool,
    pid: PidFile,
}

impl DaemonBase {
    /// Creates the runtime directory and takes the pid lock — or, in a process started by
    /// `dbgpt ctl upgrade`, takes the sockets and the locked pid file of the process it
    /// replaces ([`handover`]).
    pub async fn acquire(service: Service, port: u16) -> anyhow::Result<Self> {
        if port == 0 {
            bail!("--port must be between 1 and 65535");
        }
        let runtime_dir = crate::admin::runtime_dir();
        ensure_private_dir(&runtime_dir)?;
        let pid_path = runtime_dir.join(crate::admin::pid_name(service.as_str(), port));
        let inherited = handover::take_over(port).await?;
        let owns_files = Arc::new(AtomicBool::new(inherited.is_none()));
        let (pid, inherited) = match inherited {
            Some(handover::Inherited {
                listener,
                pid_file,
                admin,
            }) => (
                PidFile::inherited(pid_file, &pid_path, owns_files.clone())?,
                Some((listener, admin)),
            ),
            None => (
                PidFile::acquire(
                    &pid_path,
                    &format!("{service} on port {port}"),
                    owns_files.clone(),
                )?,
                None,
            ),
        };
        Ok(DaemonBase {
            service,
            port,
            runtime_dir,
            started: std::time::Instant::now(),
            started_unix_ms: unix_ms(),
            shutdown: CancellationToken::new(),
            drain: crate::http::Drain::new(),
            owns_files,
            taking_over: AtomicBool::new(inherited.is_some()),
            inherited,
            pid,
        })
    }

    /// In a successor: lets the process it replaces go (see [`handover`]) and takes the pid
    /// file and socket path. Called once this process serves — or, for a daemon whose state
    /// two processes cannot share, before opening it. Does nothing the second time.
    pub async fn release_predecessor(&self) -> anyhow::Result<()> {
        if !self.taking_over.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let r = handover::release_predecessor().await;
        // Released, or gone: either way the files are ours now.
        self.owns_files.store(true, Ordering::SeqCst);
        self.pid.write_pid()?;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the old process did not confirm the handover; serving anyway");
                Ok(())
            }
        }
    }

    /// Path of this daemon's admin socket.
    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir
            .join(crate::admin::socket_name(self.service.as_str(), self.port))
    }

    /// The admin status: the common fields, and the service's own `health`.
    pub fn status(&self, health: Health) -> crate::admin::Status {
        let Health {
            healthy,
            total,
            details,
        } = health;
        crate::admin::Status {
            service: self.service.as_str().to_string(),
            port: self.port,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix_ms: self.started_unix_ms,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            healthy,
            total,
            details,
        }
    }
}

/// Wraps a start-up error so the `--daemon` parent and systemd see the reason.
pub fn report_startup<T>(readiness: &mut Readiness, r: anyhow::Result<T>) -> anyhow::Result<T> {
    if let Err(e) = &r {
        readiness.failed(&format!("{e:#}"));
    }
    r
}

/// Waits up to `timeout` for an HTTP server task to finish draining in-flight requests,
/// logging how it ended; `false` if it had to be abandoned.
pub async fn drain_http(
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    timeout: Duration,
) -> bool {
    match tokio::time::timeout(timeout, http).await {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => {
            warn!(error = %e, "HTTP server ended with an error");
            true
        }
        Ok(Err(e)) => {
            warn!(error = %e, "HTTP server task failed");
            true
        }
        Err(_) => {
            warn!("in-flight requests did not finish within {timeout:?}; closing");
            false
        }
    }
}

/// What a service's start-up produced: the pid lock, the bound HTTP port and admin socket,
/// and the service's own state.
pub(crate) struct Started<D> {
    pub base: DaemonBase,
    pub listener: TcpListener,
    pub admin: crate::admin::server::AdminSocket,
    pub daemon: D,
}

/// The daemon's HTTP listener and admin socket: those handed over by the process it
/// replaces; else the listener systemd passed (socket activation) or a new one on `host`,
/// and a new admin socket.
pub(crate) async fn bind(
    base: &mut DaemonBase,
    host: &str,
) -> anyhow::Result<(TcpListener, crate::admin::server::AdminSocket)> {
    if let Some((listener, admin)) = base.inherited.take() {
        let listener = TcpListener::from_std(listener)?;
        let admin = crate::admin::server::AdminSocket::inherited(
            admin,
            &base.socket_path(),
            base.owns_files.clone(),
        )?;
        return Ok((listener, admin));
    }
    let listener = match activation::systemd_listener(base.port)? {
        Some(l) => {
            info!(
                addr = %l.local_addr()?,
                "serving on the socket systemd passed (socket activation)"
            );
            TcpListener::from_std(l)?
        }
        None => crate::http::bind(host, base.port).await?,
    };
    let mut admin = crate::admin::server::bind(&base.socket_path()).await?;
    admin.owned_while(base.owns_files.clone());
    Ok((listener, admin))
}

/// How long a draining daemon keeps serving (answering with `Connection: close`) before it
/// closes its idle connections: long enough for a busy keep-alive client to finish its next
/// request on its old connection and open a new one, instead of having its idle connection
/// closed under a request it is sending. A daemon that stops for good keeps accepting for
/// this long (readiness probes see 503, not a refused connection), then waits as long again
/// for connections it just accepted to send their request; one that hands over stops
/// accepting at once (its successor takes new connections).
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How long the old process of an upgrade lets its in-flight requests and streams run on
/// (its successor serves meanwhile).
pub const HANDOVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the daemons differ; [`run`] does everything else, in the same order for all.
pub(crate) trait Daemon {
    /// How long in-flight requests may take to finish on stop.
    const DRAIN_TIMEOUT: Duration;
    /// Logged when a stop begins.
    const STOPPING: &'static str = "stopping: draining in-flight requests";
    /// Whether two processes cannot run at once (state only one may open): an upgrade's
    /// old process then drains and closes it before the new one starts serving.
    const SEQUENTIAL_HANDOVER: bool = false;

    /// The service's own status fields, computed on the admin socket's task.
    fn health(&self) -> impl Fn() -> Health + Send + Sync + 'static;

    /// Runs once signals are handled and the admin socket answers, before HTTP is served
    /// (the worker loads its models here). An error fails the start with its reason.
    async fn prepare(&mut self, _shutdown: &CancellationToken) -> anyhow::Result<()> {
        Ok(())
    }

    /// Starts serving HTTP on `listener` until `drain` closes; the task ends once drained.
    /// `shutdown` is cancelled when the stop begins.
    fn serve(
        &mut self,
        listener: TcpListener,
        drain: crate::http::Drain,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<std::io::Result<()>>>;

    /// The status line logged and sent to systemd with `READY=1`.
    fn ready_status(&self) -> String;

    /// Runs when a stop begins, before draining (the worker deregisters here). Not run
    /// when the daemon hands over to a successor (which keeps its registrations).
    async fn stopping(&mut self) {}

    /// Runs after draining (`drained` is false if in-flight requests were abandoned): waits
    /// for background tasks and flushes what must outlive the process.
    async fn finish(self, drained: bool);
}

/// Runs a daemon from start-up to exit. `start` takes the pid lock, binds the ports and
/// builds the service; its failure, or the failure of [`Daemon::prepare`] or
/// [`Daemon::serve`], is reported to the `--daemon` parent and systemd with the reason.
pub(crate) async fn run<D: Daemon>(
    mut readiness: Readiness,
    start: impl Future<Output = anyhow::Result<Started<D>>>,
) -> anyhow::Result<()> {
    let Started {
        base,
        listener,
        admin,
        mut daemon,
    } = report_startup(&mut readiness, start.await)?;
    let base = Arc::new(base);
    let token = base.shutdown.clone();
    let drain = base.drain.clone();
    spawn_signal_handler(token.clone())?;

    let upgrades = report_startup(
        &mut readiness,
        (|| {
            let fds = [
                listener.as_fd().try_clone_to_owned()?,
                base.pid.file.as_fd().try_clone_to_owned()?,
                admin.as_fd().try_clone_to_owned()?,
            ];
            handover::Upgrades::new(
                base.socket_path(),
                fds,
                token.clone(),
                D::SEQUENTIAL_HANDOVER,
                base.owns_files.clone(),
                base.taking_over.load(Ordering::SeqCst),
            )
        })(),
    )?;
    let health = daemon.health();
    let b = base.clone();
    let status = move || b.status(health());
    let admin_task = tokio::spawn(crate::admin::server::serve(
        admin,
        Arc::new(status),
        token.clone(),
        Some(upgrades.clone()),
    ));
    let serving = async {
        daemon.prepare(&token).await?;
        let http = daemon.serve(listener, drain.clone(), &token)?;
        // A successor serves now: its predecessor may go.
        base.release_predecessor().await?;
        upgrades.took_over();
        anyhow::Ok(http)
    }
    .await;
    let http = match report_startup(&mut readiness, serving) {
        Ok(http) => http,
        Err(e) => {
            token.cancel();
            drain.close();
            let _ = admin_task.await;
            return Err(e);
        }
    };
    let status = daemon.ready_status();
    info!("{status}");
    readiness.ready(&status);
    spawn_watchdog(token.clone());

    token.cancelled().await;
    let handed_over = upgrades.handed_over();
    let drain_timeout = if handed_over {
        info!("handed over to the new process: draining in-flight requests");
        // The successor takes new connections from the same listen queue from now on.
        drain.stop_accepting();
        drain.begin(false);
        // Nobody waits for this process any more: slow generations may finish.
        D::DRAIN_TIMEOUT.max(HANDOVER_DRAIN_TIMEOUT)
    } else {
        upgrades.close_fds();
        notify_stopping();
        info!("{}", D::STOPPING);
        drain.begin(true);
        daemon.stopping().await;
        // Still accepting: new clients (a readiness probe, an apiserver with a stale view)
        // get answers that say so rather than a refused connection.
        tokio::time::sleep(DRAIN_GRACE).await;
        drain.stop_accepting();
        D::DRAIN_TIMEOUT
    };
    // Requests and streams in flight finish while their connections stay open: a keep-alive
    // client whose long stream began before the drain sends its next request on the same
    // connection, and it is answered (with `Connection: close`) instead of being cut.
    let deadline = tokio::time::Instant::now() + drain_timeout;
    while drain.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then time for connections just accepted or just answered to send their request.
    tokio::time::sleep(DRAIN_GRACE).await;
    drain.close();
    let drained = drain_http(http, drain_timeout).await;
    let _ = admin_task.await;
    daemon.finish(drained).await;
    upgrades.finished().await;
    info!("{} stopped", base.service);
    drop(base);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Service;

    #[test]
    fn service_names_round_trip() {
        for s in [Service::Controller, Service::Worker, Service::Apiserver] {
            assert_eq!(Service::from_name(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(Service::Apiserver.as_str(), "apiserver");
        assert_eq!(Service::Worker.label(), "ModelWorker");
        assert_eq!(Service::from_name("ModelController"), None);
    }
}
