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
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixSocket, UnixStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::proto::{self, PROTOCOL_VERSION, Request, Response, Status};

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

/// A bound admin socket; removes its file when dropped.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    })
}

/// Accepts connections until `shutdown` is cancelled; an admin `Stop` cancels it.
pub async fn serve(sock: AdminSocket, handler: Arc<dyn AdminHandler>, shutdown: CancellationToken) {
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
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler, shutdown, me).await {
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
    loop {
        let (limit, waiting_for) = if greeted {
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
        }
    }
}
