//! Client side of the admin socket, used by `dbgpt ctl` and `dbgpt stop`.
//!
//! Connecting tells a stale socket (nobody listens: `ECONNREFUSED`, or the file is gone)
//! apart from a live daemon that cannot take the connection now (its listen backlog is
//! full: `EAGAIN`, retried with backoff) and from a socket this user may not open
//! (`EACCES`/`EPERM`): only the first means "not running" ([`ConnectError::is_stale`]).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::proto::{self, PROTOCOL_VERSION, Request, Response, Status};

/// Per-exchange timeout.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("admin I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon closed the connection")]
    Closed,
    #[error("daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("daemon sent an undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("daemon refused: {0}")]
    Refused(String),
    #[error("unexpected answer from daemon: {0:?}")]
    Unexpected(Box<Response>),
}

/// How long [`connect_socket`] retries a socket whose listen backlog is full.
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Why an admin socket could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nobody listens on it (`ECONNREFUSED`) or it is gone (`ENOENT`): the daemon is not
    /// running.
    #[error("stale socket {path} (daemon not running)")]
    Stale { path: String },
    /// Its listen backlog stayed full for `waited`: a live daemon that does not accept.
    #[error(
        "admin socket {path} is busy: its listen backlog stayed full for {waited:?} (the daemon is running but not accepting)"
    )]
    Busy { path: String, waited: Duration },
    /// This user may not connect (`EACCES`/`EPERM`).
    #[error("permission denied on {path} (owned by {owner})")]
    PermissionDenied { path: String, owner: String },
    /// Anything else.
    #[error("cannot connect to {path}: {source}")]
    Other {
        path: String,
        source: std::io::Error,
    },
}

impl ConnectError {
    /// Whether the socket is known to be stale (nobody listens): the only case in which a
    /// daemon counts as not running and its socket may be removed.
    pub fn is_stale(&self) -> bool {
        matches!(self, ConnectError::Stale { .. })
    }
}

/// What a failed `connect(2)` on a Unix socket says about the daemon behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Stale,
    Busy,
    Denied,
    Other,
}

fn classify(e: &std::io::Error) -> Failure {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::ENOENT) => Failure::Stale,
        Some(libc::EAGAIN) => Failure::Busy,
        Some(libc::EACCES | libc::EPERM) => Failure::Denied,
        _ => Failure::Other,
    }
}

/// The user owning `path`, for messages ("uid N" when it has no name, "an unknown user"
/// when the file cannot be examined).
fn owner_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(m.uid())) {
            Ok(Some(u)) => u.name,
            _ => format!("uid {}", m.uid()),
        },
        Err(e) => format!("an unknown user: cannot examine it: {e}"),
    }
}

/// Connects to the admin socket at `path`, retrying with backoff (for up to 2 s) while its
/// listen backlog is full.
pub async fn connect_socket(path: &Path) -> Result<UnixStream, ConnectError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    loop {
        let e = match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let p = path.display().to_string();
        return Err(match classify(&e) {
            Failure::Busy if started.elapsed() < BUSY_RETRY => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(250));
                continue;
            }
            Failure::Busy => ConnectError::Busy {
                path: p,
                waited: started.elapsed(),
            },
            Failure::Stale => ConnectError::Stale { path: p },
            Failure::Denied => ConnectError::PermissionDenied {
                owner: owner_of(path),
                path: p,
            },
            Failure::Other => ConnectError::Other { path: p, source: e },
        });
    }
}

/// A greeted connection to one daemon.
pub struct AdminClient {
    framed: Framed<UnixStream, LengthDelimitedCodec>,
    /// Version string the daemon reported.
    pub server: String,
}

impl AdminClient {
    /// Connects and performs the `Hello` exchange.
    pub async fn connect(path: &Path) -> Result<Self, AdminError> {
        let stream = connect_socket(path).await?;
        let mut c = AdminClient {
            framed: Framed::new(stream, proto::codec()),
            server: String::new(),
        };
        match c
            .call(Request::Hello {
                version: PROTOCOL_VERSION,
                client: "dbgpt-cli".into(),
            })
            .await?
        {
            Response::Hello { server, .. } => {
                c.server = server;
                Ok(c)
            }
            other => Err(unexpected(other)),
        }
    }

    async fn call(&mut self, req: Request) -> Result<Response, AdminError> {
        self.call_within(req, TIMEOUT).await
    }

    async fn call_within(
        &mut self,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, AdminError> {
        let fut = async {
            self.framed.send(Bytes::from(proto::encode(&req))).await?;
            match self.framed.next().await {
                None => Err(AdminError::Closed),
                Some(frame) => Ok(proto::decode::<Response>(&frame?)?),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| AdminError::Timeout(timeout))?
    }

    /// The daemon's status.
    pub async fn status(&mut self) -> Result<Status, AdminError> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the daemon to stop gracefully (returns once it has acknowledged).
    pub async fn stop(&mut self) -> Result<(), AdminError> {
        match self.call(Request::Stop).await? {
            Response::Stopping => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

impl AdminClient {
    /// Asks the daemon to replace itself by the binary now on disk (see
    /// [`crate::daemon::handover`]); returns the new process's pid once it serves, waiting
    /// up to `timeout` (a worker loads its models first).
    pub async fn upgrade(&mut self, timeout: Duration) -> Result<u32, AdminError> {
        match self.call_within(Request::Upgrade, timeout).await? {
            Response::Upgraded { pid } => Ok(pid),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: Response) -> AdminError {
    match r {
        Response::Error { message } => AdminError::Refused(message),
        other => AdminError::Unexpected(Box::new(other)),
    }
}

/// A listening Unix socket whose listen backlog is full and that never accepts: what a
/// live daemon too busy to accept looks like to a client.
#[cfg(test)]
pub(crate) struct FullBacklog {
    _listener: std::os::fd::OwnedFd,
    _queued: Vec<std::os::fd::OwnedFd>,
}

#[cfg(test)]
impl FullBacklog {
    /// Binds `path`, listens with a backlog of 0 and connects until the kernel refuses
    /// more with `EAGAIN`.
    pub(crate) fn bind(path: &Path) -> FullBacklog {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
        };
        use std::os::fd::AsRawFd;
        let new = |flags| socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
        let listener = new(SockFlag::empty());
        let addr = UnixAddr::new(path).unwrap();
        bind(listener.as_raw_fd(), &addr).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        for _ in 0..64 {
            let c = new(SockFlag::SOCK_NONBLOCK);
            match connect(c.as_raw_fd(), &addr) {
                Ok(()) => queued.push(c),
                Err(nix::errno::Errno::EAGAIN) => {
                    return FullBacklog {
                        _listener: listener,
                        _queued: queued,
                    };
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
        panic!("the listen backlog never filled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_backlog_is_busy_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller-1.sock");
        let _full = FullBacklog::bind(&path);
        match connect_socket(&path).await {
            Err(ConnectError::Busy { path: p, .. }) => assert_eq!(p, path.display().to_string()),
            other => panic!("expected busy, got {other:?}"),
        }
        // The socket is left alone.
        assert!(path.exists());
    }

    #[tokio::test]
    async fn refused_and_missing_sockets_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller-2.sock");
        let e = connect_socket(&path).await.unwrap_err();
        assert!(e.is_stale(), "{e:?}");
        // Bound, then the listener closed: connections are refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = connect_socket(&path).await.unwrap_err();
        assert!(e.is_stale(), "{e:?}");
    }

    #[test]
    fn connect_failures_are_classified_by_errno() {
        let f = |n| classify(&std::io::Error::from_raw_os_error(n));
        assert_eq!(f(libc::ECONNREFUSED), Failure::Stale);
        assert_eq!(f(libc::ENOENT), Failure::Stale);
        assert_eq!(f(libc::EAGAIN), Failure::Busy);
        assert_eq!(f(libc::EACCES), Failure::Denied);
        assert_eq!(f(libc::EPERM), Failure::Denied);
        assert_eq!(f(libc::ENOTSOCK), Failure::Other);
    }

    #[test]
    fn owner_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        assert_eq!(owner_of(dir.path()), me);
        assert!(owner_of(&dir.path().join("missing")).contains("unknown user"));
    }
}
