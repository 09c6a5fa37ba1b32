//! A fast fake upstream for benchmarks: answers OpenAI's `POST /v1/chat/completions` (plain
//! and SSE) and DB-GPT's worker protocol (`POST /api/worker/generate_stream`, `/generate`)
//! with a fixed reply of `--tokens` tokens, doing as little work as possible.
//!
//! It also answers what a gateway probes before it routes to an upstream: `GET /health`,
//! `/health_generate`, `/v1/models`, and SGLang's `/model_info`, `/get_model_info`,
//! `/server_info`, `/get_server_info` (the SGLang gateway row of `scripts/bench-apiserver.sh`).
//! A streamed reply with `stream_options.include_usage` ends with OpenAI's usage chunk
//! (`"choices": []`).
//!
//! With `--register <controller URL>` it also registers `<--model>@llm` with that controller
//! and heartbeats, so an apiserver can route to it directly until a real proxy worker sits in
//! between (then point the worker's proxy backend at `/v1` here instead).
//!
//! ```text
//! cargo run --example fake_openai -- --port 9000 --tokens 16 [--register http://127.0.0.1:8000 --model fake]
//! ```

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use dbgpt_cluster::wire::worker::{GENERATE_PATH, GENERATE_STREAM_PATH};
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Tokens per reply.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Register `<model>@llm` with this controller (and heartbeat).
    #[arg(long)]
    register: Option<String>,
    #[arg(long, default_value = "fake")]
    model: String,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn words(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i} ")).collect()
}

/// `(stream, stream_options.include_usage)` of a request body.
fn wants_stream(body: &[u8]) -> (bool, bool) {
    let v = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (stream, stream && usage)
}

async fn openai_chat(tokens: usize, body: Bytes) -> Response {
    let w = words(tokens);
    let (stream, include_usage) = wants_stream(&body);
    if !stream {
        let v = json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": w.concat()}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        });
        return ([("content-type", "application/json")], v.to_string()).into_response();
    }
    let mut frames: Vec<Result<Bytes, std::io::Error>> = Vec::with_capacity(tokens + 2);
    frames.push(Ok(Bytes::from(format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
    ))));
    for t in &w {
        frames.push(Ok(Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                   "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
        ))));
    }
    frames.push(Ok(Bytes::from(format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    ))));
    if include_usage {
        frames.push(Ok(Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                   "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}})
        ))));
    }
    frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(frames)))
        .unwrap()
}

/// What SGLang's gateway reads from `/model_info` and `/server_info` (and the deprecated
/// `/get_…` spellings) when it registers a worker: the model's name.
fn model_info(model: &str) -> Response {
    axum::Json(
        json!({"model_path": model, "tokenizer_path": null, "is_generation": true,
                      "served_model_name": model}),
    )
    .into_response()
}

fn model_list(model: &str) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}]}))
        .into_response()
}

fn worker_frame(text: &str, last: bool, tokens: usize) -> Bytes {
    let v = if last {
        json!({"text": text, "error_code": 0, "incremental": false, "model_context": null,
               "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}, "metrics": null})
    } else {
        json!({"text": text, "error_code": 0, "incremental": false, "model_context": null,
               "finish_reason": null, "usage": null, "metrics": null})
    };
    let mut b = serde_json::to_vec(&v).unwrap();
    b.push(0);
    Bytes::from(b)
}

async fn worker_stream(tokens: usize) -> Response {
    let w = words(tokens);
    let mut text = String::new();
    let mut frames: Vec<Result<Bytes, std::io::Error>> = Vec::with_capacity(tokens);
    for (i, t) in w.iter().enumerate() {
        text.push_str(t);
        frames.push(Ok(worker_frame(&text, i + 1 == tokens, tokens)));
    }
    Response::new(Body::from_stream(futures::stream::iter(frames)))
}

async fn worker_generate(tokens: usize) -> Response {
    let f = worker_frame(&words(tokens).concat(), true, tokens);
    (
        [("content-type", "application/json")],
        f.slice(..f.len() - 1),
    )
        .into_response()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let n = args.tokens.max(1);
        let m = args.model.clone();
        let (m1, m2) = (m.clone(), m.clone());
        let app = Router::new()
            .route("/health", get(|| async { "" }))
            .route("/health_generate", get(|| async { "" }))
            .route("/v1/models", get(move || std::future::ready(model_list(&m))))
            .route("/model_info", get(move || std::future::ready(model_info(&m1))))
            .route("/get_model_info", get(move || std::future::ready(model_info(&m2))))
            .route("/server_info", get(|| async { axum::Json(json!({"version": "fake"})) }))
            .route("/get_server_info", get(|| async { axum::Json(json!({"version": "fake"})) }))
            .route("/v1/chat/completions", post(move |b: Bytes| openai_chat(n, b)))
            .route(GENERATE_STREAM_PATH, post(move || worker_stream(n)))
            .route(GENERATE_PATH, post(move || worker_generate(n)));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        let port = listener.local_addr()?.port();
        let listener = {
            use axum::serve::ListenerExt;
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        };
        if let Some(ctl) = args.register.clone() {
            dbgpt_cluster::http::ensure_tls_provider();
            let inst = json!({"model_name": format!("{}@llm", args.model), "host": "127.0.0.1", "port": port,
                              "weight": 1.0, "check_healthy": true, "healthy": true, "enabled": true,
                              "prompt_template": null, "last_heartbeat": null});
            let c = reqwest::Client::new();
            c.post(format!("{ctl}/api/controller/models"))
                .json(&inst)
                .send()
                .await?
                .error_for_status()?;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let _ = c
                        .post(format!("{ctl}/api/controller/heartbeat"))
                        .json(&inst)
                        .send()
                        .await;
                }
            });
        }
        eprintln!("fake upstream on 127.0.0.1:{port} ({n} tokens per reply)");
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}
