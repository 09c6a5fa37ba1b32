//! Daemon side of the admin socket: bind safely, check peers, answer frames.
//!
//! Binding removes a *stale* socket (one nobody listens on: the connection is refused) and
//! refuses to start if a daemon answers, or might (a full backlog, a socket of another
//! user). The socket is chmod'ed 0600 before `listen`, so there is no window in which
//! another user could connect. Each connection must say `Hello` first (within a timeout),
//! then send each request frame within another; peers whose uid is neither ours nor root
//! are refused with an error frame; garbage, unknown or oversized frames get an error frame
//! and the connection is closed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixSocket, UnixStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::proto::{self, PROTOCOL_VERSION, Request, Response, Status};
use crate::daemon::handover::Upgrades;

/// How long a client may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// After `Hello`, how long a client may take to send each complete request frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin server needs from the daemon it belongs to: its current status. (A `Stop`
/// is answered by [`serve`] itself, by cancelling the daemon's shutdown token.) Any
/// `Fn() -> Status` closure is a handler.
pub trait AdminHandler: Send + Sync + 'static {
    /// Current status.
    fn status(&self) -> Status;
}

impl<F: Fn() -> Status + Send + Sync + 'static> AdminHandler for F {
    fn status(&self) -> Status {
        self()
    }
}

/// A bound admin socket; removes its file when dropped, unless it belongs to another
/// process by then (handed over in an upgrade, or not yet taken over).
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    owned: Arc<AtomicBool>,
}

impl AdminSocket {
    /// A listening socket handed over by the process this one replaces; its file is
    /// removed on drop only while `owned` is set.
    pub(crate) fn inherited(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
        owned: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        Ok(AdminSocket {
            listener: UnixListener::from_std(listener)?,
            path: path.to_path_buf(),
            owned,
        })
    }

    /// Ties the removal of the socket file to `owned` (set while this process owns it).
    pub(crate) fn owned_while(&mut self, owned: Arc<AtomicBool>) {
        self.owned = owned;
    }

    /// The listening socket, for handing over.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if self.owned.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket at `path` (mode 0600), cleaning up a stale one.
pub async fn bind(path: &Path) -> anyhow::Result<AdminSocket> {
    if path.exists() {
        match super::client::connect_socket(path).await {
            Ok(_) => anyhow::bail!(
                "another daemon is already answering on admin socket {}",
                path.display()
            ),
            // Only a socket nobody listens on is removed; one that is busy, not ours or
            // cannot be examined might belong to a live daemon.
            Err(e) if e.is_stale() => {
                info!(path = %path.display(), "removing stale admin socket");
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        anyhow::bail!("cannot remove stale socket {}: {e}", path.display())
                    }
                    _ => {}
                }
            }
            Err(e) => anyhow::bail!("{e}; not removing it: another daemon may be using it"),
        }
    }
    let sock = UnixSocket::new_stream()?;
    sock.bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let listener = sock.listen(64)?;
    Ok(AdminSocket {
        listener,
        path: path.to_path_buf(),
        owned: Arc::new(AtomicBool::new(true)),
    })
}

/// Accepts connections until `shutdown` is cancelled; an admin `Stop` cancels it. With
/// `upgrades`, the daemon can be upgraded in place (`Upgrade`, `HandOver`, `Release`).
pub async fn serve(
    sock: AdminSocket,
    handler: Arc<dyn AdminHandler>,
    shutdown: CancellationToken,
    upgrades: Option<Arc<Upgrades>>,
) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = sock.listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let upgrades = upgrades.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler, shutdown, upgrades, me).await {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
    drop(sock);
}

async fn send(
    framed: &mut Framed<UnixStream, tokio_util::codec::LengthDelimitedCodec>,
    r: &Response,
) -> std::io::Result<()> {
    framed.send(Bytes::from(proto::encode(r))).await
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

async fn connection(
    stream: UnixStream,
    handler: Arc<dyn AdminHandler>,
    shutdown: CancellationToken,
    upgrades: Option<Arc<Upgrades>>,
    me: u32,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let mut framed = Framed::new(stream, proto::codec());
    if cred.uid() != me && cred.uid() != 0 {
        warn!(
            peer_uid = cred.uid(),
            "refused admin connection from another user"
        );
        return send(
            &mut framed,
            &error(format!(
                "permission denied: uid {} may not administer this daemon",
                cred.uid()
            )),
        )
        .await;
    }
    let mut greeted = false;
    // The new process of an upgrade, once it has the descriptors: it says `Release` when it
    // serves, which may take as long as loading its models.
    let mut successor = false;
    let peer = cred.pid().and_then(|p| u32::try_from(p).ok());
    loop {
        let (limit, waiting_for) = if successor {
            (Duration::MAX, "Release")
        } else if greeted {
            (FRAME_TIMEOUT, "a request")
        } else {
            (HELLO_TIMEOUT, "Hello")
        };
        let next = match tokio::time::timeout(limit, framed.next()).await {
            Ok(n) => n,
            Err(_) => {
                let why = format!("timed out waiting for {waiting_for} ({limit:?})");
                return send(&mut framed, &error(why)).await;
            }
        };
        let frame = match next {
            None => return Ok(()),
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                // Oversized frame or broken stream: say why, then close.
                return send(
                    &mut framed,
                    &error(format!(
                        "bad frame: {e} (limit {} bytes)",
                        proto::MAX_FRAME_BYTES
                    )),
                )
                .await;
            }
        };
        let req: Request = match proto::decode(&frame) {
            Ok(r) => r,
            Err(e) => {
                return send(
                    &mut framed,
                    &error(format!("malformed or unknown request: {e}")),
                )
                .await;
            }
        };
        match (greeted, req) {
            (false, Request::Hello { version, client }) => {
                if version == 0 || version > PROTOCOL_VERSION {
                    return send(&mut framed, &error(format!(
                        "unsupported admin protocol version {version}; this daemon speaks {PROTOCOL_VERSION}"
                    ))).await;
                }
                debug!(client, version, pid = cred.pid(), "admin hello");
                greeted = true;
                send(
                    &mut framed,
                    &Response::Hello {
                        version: PROTOCOL_VERSION,
                        server: format!("dbgpt {}", env!("CARGO_PKG_VERSION")),
                    },
                )
                .await?;
            }
            (false, _) => {
                return send(&mut framed, &error("the first request must be Hello")).await;
            }
            (true, Request::Hello { .. }) => send(&mut framed, &error("already greeted")).await?,
            (true, Request::Status) => {
                send(&mut framed, &Response::Status(handler.status())).await?
            }
            (true, Request::Stop) => {
                info!(
                    peer_uid = cred.uid(),
                    peer_pid = cred.pid(),
                    "stop requested over the admin socket"
                );
                send(&mut framed, &Response::Stopping).await?;
                shutdown.cancel();
                return Ok(());
            }
            (true, req @ (Request::Upgrade | Request::HandOver | Request::Release)) => {
                let Some(u) = upgrades.as_ref() else {
                    send(
                        &mut framed,
                        &error("this daemon cannot be upgraded in place"),
                    )
                    .await?;
                    continue;
                };
                match req {
                    Request::Upgrade => {
                        info!(
                            peer_uid = cred.uid(),
                            peer_pid = cred.pid(),
                            "upgrade requested over the admin socket"
                        );
                        let r = match u.clone().upgrade().await {
                            Ok(pid) => Response::Upgraded { pid },
                            Err(message) => Response::Error { message },
                        };
                        send(&mut framed, &r).await?;
                    }
                    Request::HandOver => match u.hand_over(peer) {
                        Ok(fds) => {
                            SinkExt::<Bytes>::flush(&mut framed).await?;
                            debug_assert!(framed.read_buffer().is_empty());
                            crate::daemon::handover::send_with_fds(
                                framed.get_ref(),
                                &Response::HandingOver,
                                &fds,
                            )
                            .await?;
                            successor = true;
                        }
                        Err(m) => send(&mut framed, &error(m)).await?,
                    },
                    _ => {
                        // The last request of the connection. A sequential daemon answers
                        // once it has closed its state, which this must not hold open.
                        drop(handler);
                        let r = match u.release(peer).await {
                            Ok(()) => send(&mut framed, &Response::Released).await,
                            Err(m) => send(&mut framed, &error(m)).await,
                        };
                        u.answered();
                        return r;
                    }
                }
            }
            (true, Request::Failed { reason }) => {
                if let Some(u) = upgrades.as_ref() {
                    u.failed(peer, reason);
                }
                send(&mut framed, &Response::Noted).await?;
            }
        }
    }
}
