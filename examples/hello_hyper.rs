//! The benchmark's baseline: a bare hyper 1.x HTTP/1.1 server on `127.0.0.1:<port>` that
//! reads the request body and answers `true` (`application/json`) to any request.
//!
//! It runs on the same stack as the controller (tokio multi-thread runtime, hyper's
//! HTTP/1.1 connection driver, keep-alive) minus axum, routing, JSON parsing and the
//! registry, so "controller vs hello" measures what the controller adds per request.
//!
//! Usage: `hello_hyper <port>` (runs until killed).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};

#[path = "support/serve.rs"]
mod serve;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read (and drop) the body, as the controller must.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from_static(b"true")));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: hello_hyper <port>");
            std::process::exit(2)
        });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move { serve::serve_forever(port, hello).await })
}
