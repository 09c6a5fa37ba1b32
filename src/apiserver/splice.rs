//! A worker's answer relayed to the client as the bytes it is: the native OpenAI routes
//! answer in OpenAI's shape already, so the apiserver parses none of it. [`Spliced`] is the
//! worker's body with two additions: a bound on every silence (the request timeout, as for
//! DB-GPT frames) and the guards that must live exactly as long as the answer (the
//! instance's in-flight count, the busy count, the span). It keeps the body's size hint, so a
//! whole answer goes out with the worker's `Content-Length` and a stream as it comes.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::pool;

/// Why a relayed body ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("the worker sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the connection to the worker failed: {0}")]
    Broken(#[from] hyper::Error),
}

/// See the module documentation.
pub struct Spliced<G> {
    inner: pool::Body,
    idle: Duration,
    /// Armed once; every frame only notes its time, and the timer, when it fires early,
    /// re-arms itself from the last frame (a reset per frame costs a timer-wheel update).
    timer: Pin<Box<tokio::time::Sleep>>,
    last: tokio::time::Instant,
    _guards: G,
}

impl<G> Spliced<G> {
    pub fn new(inner: pool::Body, idle: Duration, guards: G) -> Self {
        Spliced {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last: tokio::time::Instant::now(),
            _guards: guards,
        }
    }
}

impl<G: Unpin> Body for Spliced<G> {
    type Data = Bytes;
    type Error = SpliceError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SpliceError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.last = tokio::time::Instant::now();
                Poll::Ready(frame.map(|f| f.map_err(SpliceError::from)))
            }
            Poll::Pending => loop {
                ready!(this.timer.as_mut().poll(cx));
                let due = this.last + this.idle;
                if tokio::time::Instant::now() >= due {
                    tracing::warn!(idle = ?this.idle, "the worker went silent; the answer is cut short");
                    return Poll::Ready(Some(Err(SpliceError::Idle(this.idle))));
                }
                this.timer.as_mut().reset(due);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
