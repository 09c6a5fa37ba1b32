//! Request metrics at the HTTP layer: [`MeasureLayer`] around a daemon's router counts every
//! request by route, model and status class and times it to the end of its body (a stream
//! is timed to its last byte); for a streamed answer it also times the first byte, and it
//! reads the token counts out of the `usage` object of an answer that carries one
//! ([`super::usage`]). What differs per daemon (its routes, its per-model handles) is a
//! [`Meter`].
//!
//! A handler names the model of its request by putting a [`ModelName`] in the response's
//! extensions; the meter decides whether that name gets its own series. A handler that
//! wants the answer's token counts (a managed key's quota, [`crate::apiserver::tenancy`])
//! puts a [`Charge`] there: the layer takes it out, feeds it every `usage` object it reads
//! and drops it when the body ends or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::future::BoxFuture;
use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::Vitals;
use super::usage::{BodyScan, Tokens};

/// Takes the token counts read out of an answer.
pub trait TokenSink: Send + Sync + 'static {
    fn tokens(&self, t: Tokens);
}

/// Put on a response by its handler: gets the answer's token counts, and is dropped (its
/// last clone) when the answer's body ends or is dropped.
#[derive(Clone)]
pub struct Charge(pub Arc<dyn TokenSink>);

/// The model a request was for, set by the handler on its response.
#[derive(Debug, Clone)]
pub struct ModelName(pub Arc<str>);

impl ModelName {
    /// Puts the name on `resp`.
    pub fn tag(mut resp: Response, model: &str) -> Response {
        resp.extensions_mut().insert(ModelName(model.into()));
        resp
    }
}

/// What one finished request updates: resolved handles, no label look-ups left.
pub struct Record {
    /// `requests_total{route, model, status_class}`.
    pub requests: Counter,
    /// `request_duration_seconds{route, model}`.
    pub duration: Histogram,
    /// Time to the first byte of a streamed answer.
    pub ttft: Option<Histogram>,
    /// Prompt and completion token counters, when the answer's `usage` is to be read.
    pub tokens: Option<(Counter, Counter)>,
}

/// What differs per daemon.
pub trait Meter: Send + Sync + 'static {
    /// The route label of a request; `None`: not measured (the scrape itself).
    fn route(&self, method: &axum::http::Method, path: &str) -> Option<u8>;
    /// The handles of a finished request's route, model (as the handler named it) and status.
    fn record(&self, route: u8, model: Option<&ModelName>, status: StatusCode) -> Record;
    /// The daemon's ctl-status figures.
    fn vitals(&self) -> &Vitals;
}

/// The layer; see the module documentation.
pub struct MeasureLayer<M>(pub Arc<M>);

impl<M> Clone for MeasureLayer<M> {
    fn clone(&self) -> Self {
        MeasureLayer(self.0.clone())
    }
}

impl<M: Meter, S> tower::Layer<S> for MeasureLayer<M> {
    type Service = Measure<M, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Measure {
            meter: self.0.clone(),
            inner,
        }
    }
}

/// The service [`MeasureLayer`] makes.
pub struct Measure<M, S> {
    meter: Arc<M>,
    inner: S,
}

impl<M, S: Clone> Clone for Measure<M, S> {
    fn clone(&self) -> Self {
        Measure {
            meter: self.meter.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<M, S> tower::Service<Request> for Measure<M, S>
where
    M: Meter,
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future =
        futures::future::Either<S::Future, BoxFuture<'static, Result<Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let Some(route) = self.meter.route(req.method(), req.uri().path()) else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        let started = Instant::now();
        self.meter.vitals().started();
        let fut = self.inner.call(req);
        let meter = self.meter.clone();
        futures::future::Either::Right(Box::pin(async move {
            let resp = fut.await?;
            let status = resp.status();
            let rec = meter.record(route, resp.extensions().get::<ModelName>(), status);
            let sse = resp.headers().get(header::CONTENT_TYPE).is_some_and(is_sse);
            let streamed = rec.ttft.is_some() && sse;
            let (mut parts, body) = resp.into_parts();
            let charge = parts.extensions.remove::<Charge>();
            let done = Done {
                meter,
                rec,
                started,
                error: status.is_server_error(),
                charge,
            };
            let scan = done.rec.tokens.is_some() || done.charge.is_some();
            let body = crate::http::boxed_body(Measured {
                inner: body,
                scan: scan.then(|| BodyScan::new(sse)),
                streamed,
                first: true,
                done: Some(done),
            });
            Ok(Response::from_parts(parts, body))
        }))
    }
}

fn is_sse(v: &HeaderValue) -> bool {
    v.as_bytes().starts_with(b"text/event-stream")
}

/// Recorded when the answer's body is done (or dropped: a client that went away).
struct Done<M: Meter> {
    meter: Arc<M>,
    rec: Record,
    started: Instant,
    error: bool,
    /// Dropped with this, at the body's end.
    charge: Option<Charge>,
}

impl<M: Meter> Done<M> {
    /// The answer's token counts: its metrics and its charge.
    fn tokens(&self, u: Tokens) {
        if let Some((p, c)) = &self.rec.tokens {
            p.inc_by(u.prompt_tokens);
            c.inc_by(u.completion_tokens);
        }
        if let Some(charge) = &self.charge {
            charge.0.tokens(u);
        }
    }
}

impl<M: Meter> Drop for Done<M> {
    fn drop(&mut self) {
        self.rec.requests.inc();
        self.rec
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        self.meter.vitals().finished(self.error);
    }
}

/// The answer's body, watched on its way out.
struct Measured<M: Meter> {
    inner: Body,
    scan: Option<BodyScan>,
    streamed: bool,
    first: bool,
    done: Option<Done<M>>,
}

impl<M: Meter> hyper::body::Body for Measured<M> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.first {
                        this.first = false;
                        if this.streamed
                            && let Some(d) = &this.done
                            && let Some(h) = &d.rec.ttft
                        {
                            h.observe(d.started.elapsed().as_secs_f64());
                        }
                    }
                    if let (Some(scan), Some(d)) = (&mut this.scan, &this.done)
                        && let Some(u) = scan.feed(data)
                    {
                        d.tokens(u);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let (Some(scan), Some(d)) = (&mut this.scan, &this.done)
                    && let Some(u) = scan.finish()
                {
                    d.tokens(u);
                }
                this.done.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
