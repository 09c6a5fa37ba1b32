//! Client side of the admin socket, used by `dbgpt ctl` and `dbgpt stop`.

use std::path::Path;
use std::time::Duration;

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
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
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

/// A greeted connection to one daemon.
pub struct AdminClient {
    framed: Framed<UnixStream, LengthDelimitedCodec>,
    /// Version string the daemon reported.
    pub server: String,
}

impl AdminClient {
    /// Connects and performs the `Hello` exchange.
    pub async fn connect(path: &Path) -> Result<Self, AdminError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AdminError::Connect {
                path: path.display().to_string(),
                source,
            })?;
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
        let fut = async {
            self.framed.send(Bytes::from(proto::encode(&req))).await?;
            match self.framed.next().await {
                None => Err(AdminError::Closed),
                Some(frame) => Ok(proto::decode::<Response>(&frame?)?),
            }
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| AdminError::Timeout(TIMEOUT))?
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

fn unexpected(r: Response) -> AdminError {
    match r {
        Response::Error { message } => AdminError::Refused(message),
        other => AdminError::Unexpected(Box::new(other)),
    }
}
