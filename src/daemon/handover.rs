//! Upgrading a running daemon in place (`dbgpt ctl upgrade`): the old process starts the
//! binary now on disk with its own arguments, and hands the new one its listening TCP
//! socket, its pid-file lock and its admin socket over the admin socket (SCM_RIGHTS). No
//! port or path is ever unbound, so no connection is refused and no second instance can
//! slip in.
//!
//! The exchange, on one admin connection from the successor to its predecessor:
//! 1. the predecessor (on `Upgrade` from `dbgpt ctl`) spawns the successor with
//!    [`UPGRADE_ENV`] naming its admin socket; a second `Upgrade` meanwhile is refused;
//! 2. the successor says `HandOver`; the predecessor answers `HandingOver` with the three
//!    descriptors (only to the pid it spawned). The successor checks the TCP socket
//!    ([`super::activation::tcp_listener`]): anything but a listening TCP socket on its
//!    `--port` fails its start with that reason, sent back as `Failed`, and the predecessor
//!    keeps serving;
//! 3. the successor starts like any daemon, on the inherited sockets (a worker loads and
//!    registers its models: the same `host:port` entries, so they stay healthy), accepting
//!    on the same listen queue as its predecessor; then it says `Release`;
//! 4. the predecessor answers `Released`, gives up the pid file and socket path (it will
//!    not remove them), stops accepting and drains its in-flight requests and streams to
//!    their end, then exits. The successor writes its pid into the pid file; under systemd
//!    it sends `MAINPID=` first (the units say `NotifyAccess=all`).
//!
//! A daemon whose state cannot be shared by two processes (the controller's redb file) is
//! *sequential*: its successor says `Release` before opening that state, and the
//! predecessor answers only once it has drained and closed it. Meanwhile new connections
//! wait in the shared listen queue.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::proto::{self, PROTOCOL_VERSION, Request, Response};

/// Environment variable naming the admin socket of the process this one replaces.
pub const UPGRADE_ENV: &str = "DBGPT_UPGRADE_FROM";

/// How long the successor waits for each answer of its predecessor (a sequential
/// predecessor answers `Release` only after draining).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether this process was started by `dbgpt ctl upgrade` to replace another.
pub fn is_successor() -> bool {
    std::env::var_os(UPGRADE_ENV).is_some_and(|v| !v.is_empty())
}

/// The three descriptors handed over, in this order.
pub(crate) struct Inherited {
    pub listener: std::net::TcpListener,
    pub pid_file: OwnedFd,
    pub admin: std::os::unix::net::UnixListener,
}

// ---- successor side -------------------------------------------------------------------

/// The successor's connection to its predecessor, from `HandOver` until `Release` (or a
/// failure report). One per process.
static PREDECESSOR: Mutex<Option<Predecessor>> = Mutex::new(None);

struct Predecessor {
    stream: UnixStream,
    pid: u32,
}

fn write_frame(s: &mut UnixStream, req: &Request) -> std::io::Result<()> {
    let body = proto::encode(req);
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf)
}

/// Reads one frame; with `fds`, receives the descriptors sent with its first bytes.
fn read_frame(s: &mut UnixStream, fds: Option<&mut Vec<OwnedFd>>) -> anyhow::Result<Response> {
    let mut head = [0u8; 4];
    let mut got = 0;
    if let Some(fds) = fds {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut head)];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(cmsg.as_mut_slice()),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("cannot receive from the old process")?;
        got = msg.bytes;
        for c in msg.cmsgs().context("descriptors truncated")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if got == 0 {
            bail!("the old process closed the connection");
        }
    }
    s.read_exact(&mut head[got..])
        .context("the old process closed the connection")?;
    let len = u32::from_be_bytes(head) as usize;
    if len > proto::MAX_FRAME_BYTES {
        bail!("oversized frame from the old process");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .context("the old process closed the connection")?;
    Ok(proto::decode(&body)?)
}

fn refused(r: Response) -> anyhow::Error {
    match r {
        Response::Error { message } => anyhow!("the old process refused: {message}"),
        other => anyhow!("unexpected answer from the old process: {other:?}"),
    }
}

/// In a successor: connects to the predecessor named by [`UPGRADE_ENV`] and takes its
/// descriptors, checked for `port`. `None` when this process is no successor.
pub(crate) async fn take_over(port: u16) -> anyhow::Result<Option<Inherited>> {
    let Some(path) = std::env::var_os(UPGRADE_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let (pred, inherited) = tokio::task::spawn_blocking(move || receive(&path, port)).await??;
    info!(
        predecessor = pred.pid,
        "took over the listening socket, pid file and admin socket"
    );
    *PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(pred);
    Ok(Some(inherited))
}

fn receive(path: &Path, port: u16) -> anyhow::Result<(Predecessor, Inherited)> {
    let mut s = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the old process at {}", path.display()))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let pid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid() as u32)
        .unwrap_or(0);
    write_frame(
        &mut s,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            client: "dbgpt-successor".into(),
        },
    )?;
    match read_frame(&mut s, None)? {
        Response::Hello { .. } => {}
        other => return Err(refused(other)),
    }
    write_frame(&mut s, &Request::HandOver)?;
    let mut fds = Vec::new();
    match read_frame(&mut s, Some(&mut fds))? {
        Response::HandingOver => {}
        other => return Err(refused(other)),
    }
    let pred = Predecessor { stream: s, pid };
    let inherited = (|| {
        let [tcp, pid_file, admin]: [OwnedFd; 3] = fds.try_into().map_err(|v: Vec<_>| {
            anyhow!(
                "the old process handed over {} descriptors instead of 3",
                v.len()
            )
        })?;
        let listener = super::activation::tcp_listener(tcp, port, "the old process")?;
        let admin = std::os::unix::net::UnixListener::from(admin);
        admin
            .local_addr()
            .context("the admin socket handed over is not a Unix socket")?;
        admin.set_nonblocking(true)?;
        anyhow::Ok(Inherited {
            listener,
            pid_file,
            admin,
        })
    })();
    match inherited {
        Ok(i) => Ok((pred, i)),
        Err(e) => {
            // The predecessor keeps serving; tell it why we give up.
            let mut pred = pred;
            let _ = write_frame(
                &mut pred.stream,
                &Request::Failed {
                    reason: format!("{e:#}"),
                },
            );
            Err(e)
        }
    }
}

/// In a successor whose predecessor still waits: asks it to leave (`Release`) and waits for
/// its answer. `Ok(false)` when there is no predecessor (any more).
pub(crate) async fn release_predecessor() -> anyhow::Result<bool> {
    let Some(mut pred) = PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(false);
    };
    // Under systemd: this process becomes the service's main process before the old one
    // exits (a sequential predecessor exits right after answering).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
    let old = pred.pid;
    tokio::task::spawn_blocking(move || {
        write_frame(&mut pred.stream, &Request::Release)?;
        match read_frame(&mut pred.stream, None)? {
            Response::Released => Ok(()),
            other => Err(refused(other)),
        }
    })
    .await??;
    info!(
        predecessor = old,
        "the old process released its sockets and is draining"
    );
    Ok(true)
}

/// In a successor whose start failed: tells the predecessor why (it keeps serving).
pub(crate) fn report_failure(reason: &str) {
    let pred = PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut pred) = pred {
        let _ = pred.stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write_frame(
            &mut pred.stream,
            &Request::Failed {
                reason: reason.to_string(),
            },
        );
        let _ = read_frame(&mut pred.stream, None);
    }
}

// ---- predecessor side -----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Pending,
    Released,
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// This process is itself a successor that has not been released yet.
    TakingOver,
    Idle,
    /// A successor with this pid was started; `handed` once it has the descriptors.
    Starting {
        pid: u32,
        handed: bool,
    },
    /// Handed over to this pid: this process drains and exits.
    Released {
        pid: u32,
    },
}

/// A daemon's side of upgrades: what it hands over and to whom.
pub(crate) struct Upgrades {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    socket: PathBuf,
    /// Duplicates of the listening TCP socket, the pid file and the admin socket (closed
    /// when the daemon stops without a successor, so its port refuses connections again).
    fds: Mutex<Option<[OwnedFd; 3]>>,
    shutdown: CancellationToken,
    sequential: bool,
    /// Cleared when handed over: the pid file and socket path belong to the successor.
    owns_files: Arc<AtomicBool>,
    phase: Mutex<Phase>,
    outcome: tokio::sync::watch::Sender<Outcome>,
    /// Sequential: the daemon has drained and closed its state.
    finished: tokio::sync::Notify,
    /// Sequential: the `Released` answer has been sent.
    answered: tokio::sync::Notify,
}

/// The path of the binary now on disk that this process was started from: what `/proc`
/// says, without the ` (deleted)` it adds once a package upgrade has replaced the file.
fn current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

impl Upgrades {
    pub(crate) fn new(
        socket: PathBuf,
        fds: [OwnedFd; 3],
        shutdown: CancellationToken,
        sequential: bool,
        owns_files: Arc<AtomicBool>,
        taking_over: bool,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Upgrades {
            exe: current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            socket,
            fds: Mutex::new(Some(fds)),
            shutdown,
            sequential,
            owns_files,
            phase: Mutex::new(if taking_over {
                Phase::TakingOver
            } else {
                Phase::Idle
            }),
            outcome: tokio::sync::watch::channel(Outcome::Pending).0,
            finished: tokio::sync::Notify::new(),
            answered: tokio::sync::Notify::new(),
        }))
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This process, a successor, has been released by its predecessor: it may be
    /// upgraded in turn.
    pub(crate) fn took_over(&self) {
        let mut p = self.phase();
        if *p == Phase::TakingOver {
            *p = Phase::Idle;
        }
    }

    /// Whether this process has handed over to a successor (its stop is a handover).
    pub(crate) fn handed_over(&self) -> bool {
        matches!(*self.phase(), Phase::Released { .. })
    }

    /// Starts the successor and waits until it has taken over (its pid) or failed (why).
    pub(crate) async fn upgrade(self: Arc<Self>) -> Result<u32, String> {
        let mut child = {
            let mut p = self.phase();
            match *p {
                Phase::TakingOver => {
                    return Err(format!(
                        "an upgrade is in progress: this process (pid {}) is still taking over",
                        std::process::id()
                    ));
                }
                Phase::Starting { pid, .. } => {
                    return Err(format!(
                        "an upgrade is already in progress (new process pid {pid})"
                    ));
                }
                Phase::Released { pid } => {
                    return Err(format!(
                        "this process has already handed over to pid {pid} and is draining"
                    ));
                }
                Phase::Idle => {}
            }
            if self.shutdown.is_cancelled() {
                return Err("the daemon is stopping".into());
            }
            let mut cmd = tokio::process::Command::new(&self.exe);
            cmd.args(&self.args)
                .env(UPGRADE_ENV, &self.socket)
                // Not ours to pass on: systemd's sockets (handed over instead) and the
                // watchdog pid (the successor pings as itself).
                .env_remove("LISTEN_PID")
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES")
                .env_remove("WATCHDOG_PID")
                .stdin(std::process::Stdio::null())
                // Its own process group: a Ctrl-C meant for a foreground predecessor does
                // not reach it.
                .process_group(0)
                .kill_on_drop(false);
            let child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
            let pid = child.id().unwrap_or(0);
            *p = Phase::Starting { pid, handed: false };
            self.outcome.send_replace(Outcome::Pending);
            info!(pid, exe = %self.exe.display(), "upgrade: started the new process");
            child
        };
        let pid = child.id().unwrap_or(0);
        let mut outcome = self.outcome.subscribe();
        let result = tokio::select! {
            status = child.wait() => {
                let why = match &*self.outcome.borrow() {
                    Outcome::Failed(r) => format!(": {r}"),
                    _ => String::new(),
                };
                Err(format!(
                    "the new process (pid {pid}) exited ({}) before taking over{why}",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                ))
            }
            r = settled(&mut outcome) => {
              match r {
                Some(Outcome::Released) => Ok(pid),
                Some(Outcome::Failed(r)) => {
                    // Reap it (it exits after saying why), or end it.
                    if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    Err(format!("the new process (pid {pid}) failed: {r}"))
                }
                _ => Err("upgrade abandoned".to_string()),
              }
            }
        };
        match &result {
            Ok(pid) => info!(
                pid,
                "upgrade: the new process serves; this one drains and exits"
            ),
            Err(e) => {
                warn!("upgrade failed, this process keeps serving: {e}");
                let mut p = self.phase();
                if matches!(*p, Phase::Starting { .. }) {
                    *p = Phase::Idle;
                }
            }
        }
        result
    }

    /// `HandOver` from `peer`: the descriptors to send, if `peer` is the successor started.
    pub(crate) fn hand_over(&self, peer: Option<u32>) -> Result<[RawFd; 3], String> {
        let mut p = self.phase();
        match *p {
            Phase::Starting { pid, handed: false } if Some(pid) == peer => {
                let fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
                let Some(fds) = fds.as_ref() else {
                    return Err("the daemon is stopping".into());
                };
                *p = Phase::Starting { pid, handed: true };
                Ok(fds.each_ref().map(|f| f.as_raw_fd()))
            }
            _ => Err("no upgrade is waiting for this process".into()),
        }
    }

    /// `Release` from `peer`: the successor serves (or, sequential, is ready to open the
    /// state): give it everything and stop. Returns once the answer may be sent.
    pub(crate) async fn release(&self, peer: Option<u32>) -> Result<(), String> {
        {
            let mut p = self.phase();
            match *p {
                Phase::Starting { pid, handed: true } if Some(pid) == peer => {
                    *p = Phase::Released { pid };
                    // The pid file names the successor before anyone hears it took over.
                    if let Some([_, pid_file, _]) =
                        self.fds.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
                    {
                        let f =
                            std::fs::File::from(pid_file.try_clone().map_err(|e| e.to_string())?);
                        super::write_pid_to(&f, pid)
                            .map_err(|e| format!("cannot write the pid file: {e}"))?;
                    }
                }
                _ => return Err("no upgrade is waiting for this process".into()),
            }
        }
        self.owns_files.store(false, Ordering::SeqCst);
        self.outcome.send_replace(Outcome::Released);
        self.shutdown.cancel();
        if self.sequential {
            self.finished.notified().await;
        }
        Ok(())
    }

    /// The daemon stops without a successor: close the duplicates kept for one.
    pub(crate) fn close_fds(&self) {
        self.fds.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// For a sequential daemon, after `release`'s answer went out.
    pub(crate) fn answered(&self) {
        self.answered.notify_one();
    }

    /// `Failed` from `peer`: the successor gives up, saying why.
    pub(crate) fn failed(&self, peer: Option<u32>, reason: String) {
        if matches!(*self.phase(), Phase::Starting { pid, .. } if Some(pid) == peer) {
            self.outcome.send_replace(Outcome::Failed(reason));
        }
    }

    /// Called by the daemon after it has drained and closed its state: a sequential
    /// successor may now open it. Waits (briefly) until the answer has been sent.
    pub(crate) async fn finished(&self) {
        if self.sequential && self.handed_over() {
            self.finished.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.answered.notified()).await;
        }
    }
}

/// The outcome of an upgrade once it is no longer pending (`None`: the sender is gone).
async fn settled(rx: &mut tokio::sync::watch::Receiver<Outcome>) -> Option<Outcome> {
    rx.wait_for(|o| *o != Outcome::Pending)
        .await
        .ok()
        .map(|o| o.clone())
}

/// Sends one admin response frame with `fds` attached (SCM_RIGHTS) on `stream`.
pub(crate) async fn send_with_fds(
    stream: &tokio::net::UnixStream,
    r: &Response,
    fds: &[RawFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let body = proto::encode(r);
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    let mut sent = 0;
    while sent < buf.len() {
        stream.writable().await?;
        let cmsgs: &[ControlMessage] = if sent == 0 {
            &[ControlMessage::ScmRights(fds)]
        } else {
            &[]
        };
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&buf[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
