//! Shared by the benchmark baselines (`hello_hyper`, `bare_relay`): serves HTTP/1.1 with
//! hyper on `127.0.0.1:<port>`, one task per keep-alive connection (`TCP_NODELAY`).

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Accepts connections forever and serves each with `handle` (runs until killed).
pub async fn serve_forever<F, Fut, B>(port: u16, handle: F) -> std::io::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, std::convert::Infallible>> + Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
