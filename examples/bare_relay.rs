//! The apiserver benchmark's baseline: the least an HTTP relay in front of a DB-GPT worker
//! can do on the apiserver's stack, to show what the apiserver itself adds per request.
//!
//! It serves HTTP/1.1 with hyper on one single-threaded tokio runtime (as one apiserver
//! serving thread does) and relays every request to one worker through the apiserver's
//! keep-alive pool (`dbgpt_cluster::apiserver::pool`): it reads the client's body, POSTs a fixed DB-GPT
//! PromptRequest for `--model` to the worker's `/api/worker/generate` (or `generate_stream`
//! when the body contains `"stream":true`) and answers with the worker's body as it comes,
//! followed by `data: [DONE]` for streams. No routing, JSON parsing, validation, discovery,
//! policy, OpenAI conversion, tracing or CORS — so it is not an OpenAI server, and its
//! answers are the worker's frames.
//!
//! With `--native` it relays to the worker's native OpenAI route instead, as the apiserver
//! does for our workers: the client's body goes to `/api/worker/openai/v1/chat/completions`
//! unchanged and the worker's answer comes back byte for byte.
//!
//! Usage: `bare_relay --port <port> --worker http://127.0.0.1:<worker port> --model <name> [--native]`
//! (runs until killed).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use dbgpt_cluster::apiserver::pool::{Target, WorkerHttp};
use dbgpt_cluster::wire::worker::{GENERATE_PATH, GENERATE_STREAM_PATH, OPENAI_CHAT_PATH};
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};

#[path = "support/serve.rs"]
mod serve;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    port: u16,
    /// The worker's base URL.
    #[arg(long)]
    worker: String,
    /// The model name to ask the worker for.
    #[arg(long)]
    model: String,
    /// Relay the client's body to the worker's native OpenAI route, the answer as it is.
    #[arg(long)]
    native: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Relay {
    client: WorkerHttp,
    target: Target,
    prompt: Bytes,
    native: bool,
}

fn error(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

async fn handle(relay: &Relay, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e.to_string())),
    };
    if relay.native {
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = hyper::Method::POST;
        *up.uri_mut() = hyper::Uri::from_static(OPENAI_CHAT_PATH);
        let h = up.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(hyper::header::HOST, relay.target.host_header().clone());
        return Ok(match relay.client.request(&relay.target, up).await {
            Ok(r) => r.map(BodyExt::boxed),
            Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        });
    }
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let mut up = Request::new(Full::new(relay.prompt.clone()));
    *up.method_mut() = hyper::Method::POST;
    *up.uri_mut() = hyper::Uri::from_static(if stream {
        GENERATE_STREAM_PATH
    } else {
        GENERATE_PATH
    });
    let h = up.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(hyper::header::HOST, relay.target.host_header().clone());
    let resp = match relay.client.request(&relay.target, up).await {
        Ok(r) => r,
        Err(e) => return Ok(error(StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let (mut parts, body) = resp.into_parts();
    let body: Body = if stream {
        parts.headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        parts.headers.remove(hyper::header::CONTENT_LENGTH);
        let done = futures::stream::once(async {
            Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))
        });
        BodyExt::boxed(StreamBody::new(
            body.into_data_stream()
                .map(|r| r.map(Frame::data))
                .chain(done),
        ))
    } else {
        body.boxed()
    };
    Ok(Response::from_parts(parts, body))
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let target = args
        .worker
        .parse::<hyper::Uri>()
        .ok()
        .as_ref()
        .and_then(Target::new)
        .unwrap_or_else(|| {
            eprintln!("bad --worker: {} (want http://host:port)", args.worker);
            std::process::exit(2)
        });
    let prompt = serde_json::json!({
        "model": args.model,
        "messages": [{"role": "human", "content": "Say something.", "round_index": 0}],
        "echo": false,
        "max_new_tokens": 16,
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let relay: &'static Relay = Box::leak(Box::new(Relay {
                client: WorkerHttp::new(Duration::from_secs(3), Duration::from_secs(90), 256),
                target,
                prompt: Bytes::from(serde_json::to_vec(&prompt).unwrap_or_default()),
                native: args.native,
            }));
            serve::serve_forever(args.port, move |req| handle(relay, req)).await
        })
}
