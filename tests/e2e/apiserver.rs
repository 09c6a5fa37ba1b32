//! The OpenAI-compatible apiserver, end to end: a real controller and a real apiserver (the
//! `dbgpt` binary) in front of test-double workers.
//!
//! The test double speaks DB-GPT's worker protocol (NUL-terminated JSON frames with
//! cumulative `text`, `/generate`, `/embeddings`), registers itself with the controller and
//! heartbeats like a worker manager. Each one runs on its own tokio runtime on its own thread,
//! so "dying" (shutting that runtime down) closes its listener *and* every open connection,
//! like `kill -9`. All traffic stays on 127.0.0.1; every loop is bounded in count and time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::*;

/// How a test-double worker answers.
#[derive(Clone, Debug)]
enum Mode {
    /// `tokens` frames, `delay` apart; `dbgpt_py` = no finish_reason/usage (DB-GPT 0.5.10).
    Stream {
        tokens: usize,
        delay_ms: u64,
        dbgpt_py: bool,
    },
    /// An error frame after `after` good frames.
    ErrorFrame { after: usize },
    /// HTTP 500 before any frame.
    Http500,
    /// HTTP 422 (as DB-GPT answers a body it cannot parse).
    Http422,
    /// The request refused as the client's error (`status` 400 or 413), as our worker
    /// refuses a prompt longer than the model's context.
    Refuse { status: u16 },
    /// Never answers.
    Hang,
}

struct WorkerShared {
    mode: Mutex<Mode>,
    hits: AtomicUsize,
    last_body: Mutex<Value>,
    embed_batches: Mutex<Vec<usize>>,
    reranker: AtomicBool,
    /// Streams whose HTTP body was dropped before the last frame (client went away).
    cancelled: AtomicUsize,
}

/// Counts a stream as cancelled if it is dropped before it finished.
struct Unfinished(Arc<WorkerShared>, bool);

impl Unfinished {
    fn finish(&mut self) {
        self.1 = true;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A test-double DB-GPT worker serving one model.
struct FakeWorker {
    port: u16,
    shared: Arc<WorkerShared>,
    rt: Option<tokio::runtime::Runtime>,
}

fn fake_text(n: usize) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

async fn generate_stream(State(s): State<Arc<WorkerShared>>, body: Bytes) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    *s.last_body.lock().unwrap() = req.clone();
    let mode = s.mode.lock().unwrap().clone();
    let max_new = req["max_new_tokens"].as_u64().map(|m| m as usize);
    let frame = |text: String, finish: Option<&str>, usage: Option<Value>, code: i64| {
        let mut b = serde_json::to_vec(&json!({
            "text": text, "error_code": code, "incremental": false, "model_context": null,
            "finish_reason": finish, "usage": usage, "metrics": null
        }))
        .unwrap();
        b.push(0);
        Ok::<Bytes, std::io::Error>(Bytes::from(b))
    };
    match mode {
        Mode::Http500 => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
        )
            .into_response(),
        Mode::Http422 => (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"detail":[{"loc":["body","stop"]}]}"#,
        )
            .into_response(),
        Mode::Refuse { status } => (
            axum::http::StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            r#"{"detail":"bad request: prompt is 5000 tokens but the model's context window is 4096 tokens"}"#,
        )
            .into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            ().into_response()
        }
        Mode::ErrorFrame { after } => {
            let s = futures::stream::iter((0..=after).map(move |i| {
                if i < after {
                    frame(fake_text(i + 1), None, None, 0)
                } else {
                    frame(
                        "**LLMServer Generate Error, Please CheckErrorInfo.**: boom".into(),
                        None,
                        None,
                        1,
                    )
                }
            }));
            Response::new(Body::from_stream(s))
        }
        Mode::Stream {
            tokens,
            delay_ms,
            dbgpt_py,
        } => {
            let n = max_new.map_or(tokens, |m| m.min(tokens));
            let finish = if max_new.is_some_and(|m| m <= n && m < tokens) {
                "length"
            } else {
                "stop"
            };
            let prompt_tokens = req["messages"].as_array().map_or(0, |a| a.len() as u64) * 3;
            let guard = Unfinished(s.clone(), false);
            let st = futures::stream::unfold((0usize, guard), move |(i, mut guard)| async move {
                if i >= n {
                    guard.finish();
                    return None;
                }
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                let last = i + 1 == n;
                let f = if last && !dbgpt_py {
                    frame(
                        fake_text(i + 1),
                        Some(finish),
                        Some(
                            json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n as u64}),
                        ),
                        0,
                    )
                } else {
                    frame(fake_text(i + 1), None, None, 0)
                };
                Some((f, (i + 1, guard)))
            });
            Response::new(Body::from_stream(st))
        }
    }
}

async fn generate(State(s): State<Arc<WorkerShared>>, body: Bytes) -> Response {
    // The last frame of the stream, as DB-GPT's worker manager does.
    let resp = generate_stream(State(s), body).await;
    if resp.status() != 200 {
        return resp;
    }
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let last = bytes
        .split(|&b| b == 0)
        .rfind(|p| !p.is_empty())
        .unwrap_or(b"{}")
        .to_vec();
    ([("content-type", "application/json")], last).into_response()
}

async fn embeddings(State(s): State<Arc<WorkerShared>>, body: Bytes) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap();
    let input: Vec<String> = serde_json::from_value(req["input"].clone()).unwrap();
    s.embed_batches.lock().unwrap().push(input.len());
    if s.reranker.load(Ordering::SeqCst) && req.get("query").is_some() {
        let scores: Vec<f32> = input.iter().map(|d| d.len() as f32 / 10.0).collect();
        return axum::Json(json!([scores])).into_response();
    }
    // A deterministic "embedding": [length, first byte, 0.5].
    let v: Vec<Vec<f32>> = input
        .iter()
        .map(|t| {
            vec![
                t.len() as f32,
                *t.as_bytes().first().unwrap_or(&0) as f32,
                0.5,
            ]
        })
        .collect();
    axum::Json(json!(v)).into_response()
}

impl FakeWorker {
    /// Starts on `port` (0 = any) and registers `model@worker_type` with the controller.
    fn start(
        controller: &str,
        model: &str,
        worker_type: &str,
        port: u16,
        mode: Mode,
        weight: f64,
        enabled: bool,
    ) -> FakeWorker {
        let shared = Arc::new(WorkerShared {
            mode: Mutex::new(mode),
            hits: AtomicUsize::new(0),
            last_body: Mutex::new(Value::Null),
            embed_batches: Mutex::new(Vec::new()),
            reranker: AtomicBool::new(false),
            cancelled: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/worker/generate_stream", post(generate_stream))
            .route("/api/worker/generate", post(generate))
            .route("/api/worker/embeddings", post(embeddings))
            .with_state(shared.clone());
        let key = format!("{model}@{worker_type}");
        let (rt, port) = registered_double(controller, port, app, &key, (weight, enabled));
        FakeWorker {
            port,
            shared,
            rt: Some(rt),
        }
    }

    fn llm(controller: &str, model: &str, mode: Mode) -> FakeWorker {
        Self::start(controller, model, "llm", 0, mode, 1.0, true)
    }

    fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    fn set_mode(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    /// Like `kill -9`: listener, open connections and heartbeats vanish at once.
    fn die(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.die();
    }
}

fn stream_mode(tokens: usize) -> Mode {
    Mode::Stream {
        tokens,
        delay_ms: 0,
        dbgpt_py: false,
    }
}

/// Starts a controller with fast health expiry.
fn controller(env: &TestEnv) -> Daemon {
    env.controller(&[
        "--heartbeat_timeout_secs",
        "2",
        "--heartbeat_interval_secs",
        "1",
    ])
}

/// A reqwest client (after installing the TLS provider reqwest needs).
fn client() -> reqwest::Client {
    dbgpt_cluster::http::ensure_tls_provider();
    reqwest::Client::new()
}

fn rt() -> tokio::runtime::Runtime {
    runtime(2)
}

/// Waits until `GET /v1/models` lists all of `models`.
async fn wait_models(c: &reqwest::Client, base: &str, key: Option<&str>, models: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut r = c.get(format!("{base}/v1/models"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Ok(resp) = r.send().await
            && let Ok(v) = resp.json::<Value>().await
        {
            let ids: Vec<&str> = v["data"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
                .unwrap_or_default();
            if models.iter().all(|m| ids.contains(m)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "models {models:?} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

async fn post_json(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Checks a streamed chat/completion body; returns the concatenated content per choice,
/// the finish reasons and the usage chunk.
fn check_stream(body: &str, object: &str, n: usize) -> (Vec<String>, Vec<String>, Option<Value>) {
    let ev = sse_events(body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    let mut content = vec![String::new(); n];
    let mut finish = vec![String::new(); n];
    let mut finish_count = vec![0; n];
    let mut usage = None;
    let mut seen_role = vec![false; n];
    for c in &chunks {
        assert_eq!(c["id"], id.as_str(), "ids stable within a stream");
        assert_eq!(c["object"], object);
        assert!(c["created"].as_i64().unwrap() > 1_600_000_000);
        assert!(c["model"].is_string());
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = Some(c["usage"].clone());
            continue;
        }
        for ch in choices {
            let i = ch["index"].as_u64().unwrap() as usize;
            if object == "chat.completion.chunk" {
                if !seen_role[i] {
                    assert_eq!(
                        ch["delta"]["role"], "assistant",
                        "first chunk carries the role"
                    );
                    seen_role[i] = true;
                } else {
                    assert!(ch["delta"].get("role").is_none());
                }
                content[i] += ch["delta"]["content"].as_str().unwrap_or("");
            } else {
                content[i] += ch["text"].as_str().unwrap();
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish[i] = f.to_string();
                finish_count[i] += 1;
            }
        }
    }
    assert!(
        finish_count.iter().all(|&c| c == 1),
        "exactly one finish_reason per choice: {finish_count:?}"
    );
    (content, finish, usage)
}

#[test]
fn apiserver_every_route_has_openai_shapes() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let w = FakeWorker::llm(&ctl.url(), "chat", stream_mode(5));
    let py = FakeWorker::llm(
        &ctl.url(),
        "pychat",
        Mode::Stream {
            tokens: 3,
            delay_ms: 0,
            dbgpt_py: true,
        },
    );
    let emb = FakeWorker::start(&ctl.url(), "emb", "text2vec", 0, stream_mode(1), 1.0, true);
    let rr = FakeWorker::start(
        &ctl.url(),
        "rerank",
        "text2vec",
        0,
        stream_mode(1),
        1.0,
        true,
    );
    rr.shared.reranker.store(true, Ordering::SeqCst);
    let api = apiserver(&env, &ctl.url(), &["--embedding_batch_size", "3"]);
    let base = api.url();
    rt().block_on(async {
        let c = client();
        wait_models(&c, &base, None, &["chat", "pychat", "emb", "rerank"]).await;

        // Model list, both prefixes.
        for prefix in ["/v1", "/api/v1"] {
            let v: Value = c.get(format!("{base}{prefix}/models")).send().await.unwrap().json().await.unwrap();
            assert_eq!(v["object"], "list");
            let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
            assert_eq!(ids, ["chat", "emb", "pychat", "rerank"]);
            assert_eq!(v["data"][0]["object"], "model");
            assert_eq!(v["data"][0]["owned_by"], "DB-GPT");
            assert!(v["data"][0]["created"].is_i64());
        }

        // Non-stream chat, n = 2: roles mapped, temperature 0 and stop passed on, usage sums.
        let (s, v) = post_json(&c, format!("{base}/api/v1/chat/completions"), json!({
            "model": "chat", "n": 2, "temperature": 0, "stop": ["\n\n"], "top_p": 0.9,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
        })).await;
        assert_eq!(s, 200, "{v}");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "chat");
        assert!(v["created"].is_i64());
        assert_eq!(v["choices"].as_array().unwrap().len(), 2);
        for (i, ch) in v["choices"].as_array().unwrap().iter().enumerate() {
            assert_eq!(ch["index"], i);
            assert_eq!(ch["message"]["role"], "assistant");
            assert_eq!(ch["message"]["content"], fake_text(5));
            assert_eq!(ch["finish_reason"], "stop");
        }
        assert_eq!(v["usage"]["prompt_tokens"], 12);
        assert_eq!(v["usage"]["completion_tokens"], 10);
        assert_eq!(v["usage"]["total_tokens"], 22);
        let sent = w.shared.last_body.lock().unwrap().clone();
        let roles: Vec<&str> = sent["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "human", "ai", "human"]);
        assert_eq!(sent["temperature"], 0.0);
        assert_eq!(sent["stop"], "\n\n");
        assert_eq!(sent["top_p"], 0.9);
        assert_eq!(sent["echo"], false);

        // max_tokens → max_new_tokens, finish_reason length.
        let (s, v) = post_json(&c, format!("{base}/v1/chat/completions"), json!({
            "model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]
        })).await;
        assert_eq!(s, 200);
        assert_eq!(v["choices"][0]["message"]["content"], fake_text(2));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(w.shared.last_body.lock().unwrap()["max_new_tokens"], 2);

        // Streaming chat with n = 2 and include_usage.
        let r = c.post(format!("{base}/v1/chat/completions")).json(&json!({
            "model": "chat", "stream": true, "n": 2, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]
        })).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let body = r.text().await.unwrap();
        let (content, finish, usage) = check_stream(&body, "chat.completion.chunk", 2);
        assert_eq!(content, [fake_text(5), fake_text(5)]);
        assert_eq!(finish, ["stop", "stop"]);
        let usage = usage.expect("a usage chunk");
        assert_eq!(usage["prompt_tokens"], 3);
        assert_eq!(usage["completion_tokens"], 10);
        assert_eq!(usage["total_tokens"], 13);

        // DB-GPT's Python worker: no finish_reason, no usage → "stop" and zeros.
        let r = c.post(format!("{base}/v1/chat/completions")).json(&json!({
            "model": "pychat", "stream": true, "messages": [{"role": "user", "content": "hi"}]
        })).send().await.unwrap();
        let body = r.text().await.unwrap();
        let (content, finish, usage) = check_stream(&body, "chat.completion.chunk", 1);
        assert_eq!(content, [fake_text(3)]);
        assert_eq!(finish, ["stop"]);
        assert!(usage.is_none(), "no usage chunk unless asked");
        assert!(!body.contains("\"usage\""), "{body}");
        let (_, v) = post_json(&c, format!("{base}/v1/chat/completions"), json!({
            "model": "pychat", "messages": "plain string prompt"
        })).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"], json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}));

        // Legacy completions: plain (with echo, two prompts) and streaming.
        let (s, v) = post_json(&c, format!("{base}/api/v1/completions"), json!({
            "model": "chat", "prompt": ["A: ", "B: "], "echo": true, "max_tokens": 3
        })).await;
        assert_eq!(s, 200, "{v}");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], format!("A: {}", fake_text(3)));
        assert_eq!(v["choices"][1]["text"], format!("B: {}", fake_text(3)));
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let r = c.post(format!("{base}/v1/completions")).json(&json!({
            "model": "chat", "prompt": "go", "stream": true
        })).send().await.unwrap();
        let body = r.text().await.unwrap();
        let (content, finish, _) = check_stream(&body, "text_completion", 1);
        assert_eq!(content, [fake_text(5)]);
        assert_eq!(finish, ["stop"]);

        // Embeddings: 7 inputs in batches of 3, re-assembled in order; float and base64.
        let inputs: Vec<String> = (0..7).map(|i| format!("{}{}", (b'a' + i as u8) as char, "x".repeat(i))).collect();
        let (s, v) = post_json(&c, format!("{base}/v1/embeddings"), json!({"model": "emb", "input": inputs})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "emb");
        assert!(v["usage"]["prompt_tokens"].is_u64());
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 7);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            assert_eq!(d["embedding"], json!([inputs[i].len() as f32, (b'a' + i as u8) as f32, 0.5]));
        }
        let mut batches = emb.shared.embed_batches.lock().unwrap().clone();
        batches.sort();
        assert_eq!(batches, [1, 3, 3]);
        let (s, v) = post_json(&c, format!("{base}/api/v1/embeddings"), json!({"model": "emb", "input": "a", "encoding_format": "base64"})).await;
        assert_eq!(s, 200);
        // [1.0, 97.0, 0.5] as little-endian f32.
        assert_eq!(v["data"][0]["embedding"], "AACAPwAAwkIAAAA/");

        // Relevance with a reranker, and with a plain embedding model.
        let (s, v) = post_json(&c, format!("{base}/api/v1/beta/relevance"), json!({"model": "rerank", "query": "q", "documents": ["a", "abcd"]})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"], json!([0.1f32, 0.4f32]));
        let (s, v) = post_json(&c, format!("{base}/v1/beta/relevance"), json!({"model": "emb", "query": "q", "documents": ["a", "b"]})).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"]["code"], "model_not_reranker");

        // Health is open.
        let r = c.get(format!("{base}/api/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    });
    drop(py);
}

/// One row of the error matrix.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    key: Option<&'static str>,
    body: Option<Value>,
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message_has: &'static str,
}

#[test]
fn apiserver_auth_and_error_matrix() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let _ok = FakeWorker::llm(&ctl.url(), "good", stream_mode(2));
    let _err = FakeWorker::llm(&ctl.url(), "errs", Mode::ErrorFrame { after: 0 });
    let _midway = FakeWorker::llm(&ctl.url(), "midway", Mode::ErrorFrame { after: 2 });
    let _five = FakeWorker::llm(&ctl.url(), "five", Mode::Http500);
    let _rej = FakeWorker::llm(&ctl.url(), "rejects", Mode::Http422);
    let _hang = FakeWorker::llm(&ctl.url(), "hangs", Mode::Hang);
    // Registered, then gone: known but not healthy.
    let mut gone = FakeWorker::llm(&ctl.url(), "gone", stream_mode(1));
    gone.die();
    let (s, _) = json_req(
        ctl.port,
        "DELETE",
        &format!(
            "/api/controller/models?model_name=gone%40llm&host=127.0.0.1&port={}",
            gone.port
        ),
        None,
    );
    assert_eq!(s, 200);
    let api = apiserver(
        &env,
        &ctl.url(),
        &[
            "--api_keys",
            "k1, k2",
            "--request_timeout_secs",
            "1.5",
            "--max_retries",
            "1",
            // The model that is down answers at once instead of being held.
            "--queue_timeout",
            "0",
        ],
    );
    let base = api.url();
    let chat = |m: &str| json!({"model": m, "messages": [{"role": "user", "content": "hi"}]});
    let cases = vec![
        Case {
            what: "no key",
            method: "GET",
            path: "/v1/models",
            key: None,
            body: None,
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message_has: "didn't provide an API key",
        },
        Case {
            what: "wrong key",
            method: "GET",
            path: "/v1/models",
            key: Some("Bearer nope"),
            body: None,
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message_has: "Incorrect API key",
        },
        Case {
            what: "not bearer",
            method: "GET",
            path: "/api/v1/models",
            key: Some("Basic azE6"),
            body: None,
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message_has: "Malformed",
        },
        Case {
            what: "key prefix",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k"),
            body: Some(chat("good")),
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message_has: "Incorrect",
        },
        Case {
            what: "no key on chat",
            method: "POST",
            path: "/v1/embeddings",
            key: None,
            body: Some(json!({"model": "x", "input": "a"})),
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message_has: "API key",
        },
        Case {
            what: "unknown model",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k2"),
            body: Some(chat("nope")),
            status: 404,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message_has: "good",
        },
        Case {
            what: "unknown embeddings model",
            method: "POST",
            path: "/v1/embeddings",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "input": "a"})),
            status: 404,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message_has: "`good` does not exist",
        },
        Case {
            what: "model down",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(chat("gone")),
            status: 503,
            kind: "server_error",
            code: Some("no_healthy_instance"),
            param: None,
            message_has: "no healthy instance",
        },
        Case {
            what: "empty body",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: None,
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_json"),
            param: Some("body"),
            message_has: "empty",
        },
        Case {
            what: "not json",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!("just a string")),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_json"),
            param: Some("body"),
            message_has: "JSON object",
        },
        Case {
            what: "missing model",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"messages": []})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("missing_required_parameter"),
            param: Some("model"),
            message_has: "'model'",
        },
        Case {
            what: "missing messages",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good"})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("missing_required_parameter"),
            param: Some("messages"),
            message_has: "'messages'",
        },
        Case {
            what: "temperature range",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "messages": "x", "temperature": 2.5})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some("temperature"),
            message_has: "between 0 and 2",
        },
        Case {
            what: "n type",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "messages": "x", "n": "2"})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_type"),
            param: Some("n"),
            message_has: "integer",
        },
        Case {
            what: "bad role",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "messages": [{"role": "wizard", "content": "x"}]})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some("messages[0].role"),
            message_has: "wizard",
        },
        Case {
            what: "stop type",
            method: "POST",
            path: "/v1/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "prompt": "x", "stop": {"a": 1}})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_type"),
            param: Some("stop"),
            message_has: "stop",
        },
        Case {
            what: "max_tokens zero",
            method: "POST",
            path: "/v1/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "prompt": "x", "max_tokens": 0})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some("max_tokens"),
            message_has: "max_tokens",
        },
        Case {
            what: "token prompt",
            method: "POST",
            path: "/v1/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "prompt": [[1, 2]]})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_type"),
            param: Some("prompt"),
            message_has: "token arrays",
        },
        Case {
            what: "encoding format",
            method: "POST",
            path: "/v1/embeddings",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "input": "a", "encoding_format": "hex"})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some("encoding_format"),
            message_has: "base64",
        },
        Case {
            what: "empty input",
            method: "POST",
            path: "/v1/embeddings",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "input": []})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some("input"),
            message_has: "empty",
        },
        Case {
            what: "relevance needs query",
            method: "POST",
            path: "/api/v1/beta/relevance",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "good", "documents": []})),
            status: 400,
            kind: "invalid_request_error",
            code: Some("missing_required_parameter"),
            param: Some("query"),
            message_has: "query",
        },
        Case {
            what: "unknown route",
            method: "GET",
            path: "/v1/nothing",
            key: Some("Bearer k1"),
            body: None,
            status: 404,
            kind: "invalid_request_error",
            code: Some("unknown_url"),
            param: None,
            message_has: "/v1/nothing",
        },
        Case {
            what: "wrong method",
            method: "GET",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: None,
            status: 405,
            kind: "invalid_request_error",
            code: Some("method_not_allowed"),
            param: None,
            message_has: "GET",
        },
        Case {
            what: "worker error frame",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(chat("errs")),
            status: 502,
            kind: "server_error",
            code: Some("upstream_error"),
            param: None,
            message_has: "boom",
        },
        Case {
            what: "worker error frame, stream",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "errs", "stream": true, "messages": "x"})),
            status: 502,
            kind: "server_error",
            code: Some("upstream_error"),
            param: None,
            message_has: "boom",
        },
        Case {
            what: "worker 500 (retried, then given up)",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(chat("five")),
            status: 502,
            kind: "server_error",
            code: Some("upstream_error"),
            param: None,
            message_has: "HTTP 500",
        },
        Case {
            what: "worker 422",
            method: "POST",
            path: "/v1/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "rejects", "prompt": "x", "stream": true})),
            status: 502,
            kind: "server_error",
            code: Some("upstream_error"),
            param: None,
            message_has: "HTTP 422",
        },
        Case {
            what: "worker hangs",
            method: "POST",
            path: "/v1/chat/completions",
            key: Some("Bearer k1"),
            body: Some(json!({"model": "hangs", "stream": true, "messages": "x"})),
            status: 504,
            kind: "server_error",
            code: Some("upstream_timeout"),
            param: None,
            message_has: "did not answer",
        },
    ];
    assert!(cases.len() >= 20);
    rt().block_on(async {
        let c = client();
        wait_models(
            &c,
            &base,
            Some("k1"),
            &["good", "errs", "midway", "five", "rejects", "hangs"],
        )
        .await;
        for case in &cases {
            let mut r = c.request(case.method.parse().unwrap(), format!("{base}{}", case.path));
            if let Some(k) = case.key {
                r = r.header("authorization", k);
            }
            if let Some(b) = &case.body {
                r = r.json(b);
            }
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(status, case.status, "{}: {v}", case.what);
            assert_eq!(ct.as_deref(), Some("application/json"), "{}", case.what);
            let e = v["error"]
                .as_object()
                .unwrap_or_else(|| panic!("{}: {v}", case.what));
            assert_eq!(e.len(), 4, "{}: {v}", case.what);
            assert_eq!(e["type"], case.kind, "{}: {v}", case.what);
            assert_eq!(e["code"].as_str(), case.code, "{}: {v}", case.what);
            assert_eq!(e["param"].as_str(), case.param, "{}: {v}", case.what);
            let msg = e["message"].as_str().unwrap();
            assert!(msg.contains(case.message_has), "{}: {msg}", case.what);
            assert!(
                !msg.contains("k1") && !msg.contains("k2"),
                "keys never echoed"
            );
        }

        // Good key works on both prefixes; health is open; CORS preflight needs no key.
        let r = c
            .get(format!("{base}/api/v1/models"))
            .bearer_auth("k2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            c.get(format!("{base}/api/health"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let r = c
            .request(
                reqwest::Method::OPTIONS,
                format!("{base}/v1/chat/completions"),
            )
            .header("origin", "http://example.test")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "http://example.test"
        );
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        // A cross-origin call gets the CORS headers; one without `Origin` (an SDK, curl) is
        // not a CORS request and gets none, as from DB-GPT's Starlette middleware.
        let models = |origin: Option<&'static str>| {
            let mut rb = c.get(format!("{base}/v1/models")).bearer_auth("k1");
            if let Some(o) = origin {
                rb = rb.header("origin", o);
            }
            rb.send()
        };
        let r = models(Some("http://example.test")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "http://example.test"
        );
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        assert!(r.headers()["vary"].to_str().unwrap().contains("origin"));
        // A script may read which model served it and the rate-limit headers.
        let exposed = r.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_string();
        for h in [
            "x-dbgpt-served-model",
            "retry-after",
            "x-ratelimit-remaining-tokens",
        ] {
            assert!(exposed.contains(h), "{h} not exposed: {exposed}");
        }
        let r = models(None).await.unwrap();
        assert_eq!(r.status(), 200);
        for h in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "vary",
        ] {
            assert!(!r.headers().contains_key(h), "{h} without an Origin header");
        }

        // A worker failing mid-stream: the stream ends with an error event, not a silent cut.
        let r = c
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth("k1")
            .json(&json!({"model": "midway", "stream": true, "messages": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        let ev = sse_events(&body);
        let last: Value = serde_json::from_str(ev.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "upstream_error", "{body}");
        assert!(last["error"]["message"].as_str().unwrap().contains("boom"));
        assert!(!body.contains("[DONE]"));
        assert!(!body.contains("finish_reason\":\"stop"));
    });
    let logs = api.logs();
    assert!(logs.contains("API key authentication enabled"), "{logs}");
    assert!(
        !logs.contains("k1") && !logs.contains("k2"),
        "keys never logged:\n{logs}"
    );
}

/// Sends `total` streaming chat requests from `conc` tasks; returns (ok, failed before the
/// first chunk, failed after streaming started) and stops early at `deadline`.
async fn load(
    base: &str,
    model: &str,
    conc: usize,
    total: usize,
    deadline: Instant,
) -> (usize, usize, usize) {
    let c = client();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, next, base, model) = (c.clone(), next.clone(), base.to_string(), model.to_string());
        tasks.push(tokio::spawn(async move {
            let mut r = (0, 0, 0);
            while next.fetch_add(1, Ordering::SeqCst) < total && Instant::now() < deadline {
                let resp = c
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&json!({"model": model, "stream": true, "messages": "x"}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let Ok(resp) = resp else {
                    r.1 += 1;
                    continue;
                };
                if resp.status() != 200 {
                    r.1 += 1;
                    continue;
                }
                match resp.text().await {
                    Ok(body) if body.ends_with("data: [DONE]\n\n") => r.0 += 1,
                    _ => r.2 += 1,
                }
            }
            r
        }));
    }
    let mut out = (0, 0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        out = (out.0 + r.0, out.1 + r.1, out.2 + r.2);
    }
    out
}

#[test]
fn apiserver_failover_and_cached_view() {
    let env = TestEnv::new();
    let ctl_port = free_port();
    let registry = env.path("reg.redb");
    let ctl_args = [
        "--heartbeat_timeout_secs",
        "2",
        "--heartbeat_interval_secs",
        "1",
    ];
    let mut ctl = env.controller_on(ctl_port, &registry, &ctl_args);
    let slow = Mode::Stream {
        tokens: 4,
        delay_ms: 15,
        dbgpt_py: false,
    };
    let a = FakeWorker::llm(&ctl.url(), "m", slow.clone());
    let mut b = FakeWorker::llm(&ctl.url(), "m", slow.clone());
    let b_port = b.port;
    let api = apiserver(&env, &ctl.url(), &["--routing_policy", "round_robin"]);
    let base = api.url();
    let runtime = rt();
    runtime.block_on(async {
        let c = client();
        wait_models(&c, &base, None, &["m"]).await;
        // Warm-up: both serve.
        let (ok, pre, post) =
            load(&base, "m", 4, 20, Instant::now() + Duration::from_secs(20)).await;
        assert_eq!((ok, pre, post), (20, 0, 0));
        assert!(a.hits() >= 5 && b.hits() >= 5, "{} {}", a.hits(), b.hits());

        // Kill b under a steady, bounded stream of requests.
        let base2 = base.clone();
        let loader = tokio::spawn(async move {
            load(
                &base2,
                "m",
                6,
                240,
                Instant::now() + Duration::from_secs(30),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.die();
        let (ok, pre, post) = loader.await.unwrap();
        assert_eq!(pre, 0, "no request that had not started streaming may fail");
        assert!(
            post <= 6,
            "only streams already running on the dead worker may break: {post}"
        );
        assert!(ok >= 234, "{ok}");

        // After one refresh past the heartbeat timeout, only a is chosen.
        tokio::time::sleep(Duration::from_millis(2500 + 500)).await;
        let before = a.hits();
        let (ok, pre, post) =
            load(&base, "m", 2, 20, Instant::now() + Duration::from_secs(20)).await;
        assert_eq!((ok, pre, post), (20, 0, 0));
        assert_eq!(
            a.hits() - before,
            20,
            "the dead instance is no longer tried"
        );
    });
    let api_log = api.logs();
    assert!(api_log.contains("worker call failed"), "{api_log}");

    // b comes back on the same port: chosen again within a refresh or two.
    let b2 = FakeWorker::start(&ctl.url(), "m", "llm", b_port, slow.clone(), 1.0, true);
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while b2.hits() == 0 && Instant::now() < deadline {
            let (ok, pre, _) = load(&base, "m", 1, 2, deadline).await;
            assert_eq!(pre, 0);
            assert!(ok > 0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            b2.hits() > 0,
            "the restarted instance was never chosen again"
        );
    });

    // Every controller down: requests keep flowing from the cached view.
    ctl.kill9();
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (ok, pre, post) =
            load(&base, "m", 2, 30, Instant::now() + Duration::from_secs(20)).await;
        assert_eq!((ok, pre, post), (30, 0, 0));
        let c = client();
        let v: Value = c
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"][0]["id"], "m");
    });
    let out = env.run(&["ctl", "status", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let s = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "apiserver")
        .unwrap()
        .clone();
    assert_eq!(s["details"]["policy"], "round_robin");
    assert_eq!(s["details"]["models"], "m");
    assert!(
        s["details"]["refresh"]
            .as_str()
            .unwrap()
            .starts_with("failing"),
        "{s}"
    );
    assert_eq!(s["total"], 2);
    drop(a);
}

#[test]
fn apiserver_routing_policies() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let quick = stream_mode(1);
    let w1 = FakeWorker::llm(&u, "rr", quick.clone());
    let w2 = FakeWorker::llm(&u, "rr", quick.clone());
    let w3 = FakeWorker::llm(&u, "rr", quick.clone());
    let zero = FakeWorker::start(&u, "rr", "llm", 0, quick.clone(), 0.0, true);
    let off = FakeWorker::start(&u, "rr", "llm", 0, quick.clone(), 1.0, false);
    let busy = FakeWorker::llm(&u, "lo", quick.clone());
    let idle = FakeWorker::llm(&u, "lo", quick.clone());
    // The first controller URL is dead: discovery fails over to the second at once.
    let dead_first = format!("http://127.0.0.1:{},{u}", free_port());
    // Three serving threads, and a new connection per request below: consecutive requests
    // are served by different threads, which share the policy's state.
    let rr_api = apiserver(
        &env,
        &dead_first,
        &["--routing_policy", "round_robin", "--threads", "3"],
    );
    let lo_api = apiserver(&env, &u, &[]);
    let rnd_api = apiserver(&env, &u, &["--routing_policy", "random"]);
    rt().block_on(async {
        let c = client();
        for api in [&rr_api, &lo_api, &rnd_api] {
            wait_models(&c, &api.url(), None, &["rr", "lo"]).await;
        }
        // round_robin: strictly even over the three routable instances.
        for _ in 0..30 {
            let (s, _) = post_json(
                &client(),
                format!("{}/v1/chat/completions", rr_api.url()),
                json!({"model": "rr", "messages": "x"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert_eq!([w1.hits(), w2.hits(), w3.hits()], [10, 10, 10]);
        // random: spreads, and weight 0 / enabled=false are never chosen either.
        for _ in 0..30 {
            let (s, _) = post_json(
                &c,
                format!("{}/v1/chat/completions", rnd_api.url()),
                json!({"model": "rr", "messages": "x"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert_eq!(w1.hits() + w2.hits() + w3.hits(), 60);
        assert_eq!((zero.hits(), off.hits()), (0, 0));

        // least_outstanding (the default): while `busy` holds a long stream, new requests
        // go to `idle`.
        busy.set_mode(Mode::Stream {
            tokens: 200,
            delay_ms: 20,
            dbgpt_py: false,
        });
        idle.set_mode(Mode::Stream {
            tokens: 200,
            delay_ms: 20,
            dbgpt_py: false,
        });
        let lo = lo_api.url();
        let first = c
            .post(format!("{lo}/v1/chat/completions"))
            .json(&json!({"model": "lo", "stream": true, "messages": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), 200);
        let (held, other) = if busy.hits() == 1 {
            (&busy, &idle)
        } else {
            (&idle, &busy)
        };
        assert_eq!(held.hits() + other.hits(), 1);
        other.set_mode(quick.clone());
        for _ in 0..10 {
            let (s, _) = post_json(
                &c,
                format!("{lo}/v1/chat/completions"),
                json!({"model": "lo", "messages": "x"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert_eq!(
            (held.hits(), other.hits()),
            (1, 10),
            "least_outstanding prefers the idle instance"
        );
        // Dropping the client's stream cancels it; afterwards both share the load again.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while held.shared.cancelled.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            held.shared.cancelled.load(Ordering::SeqCst),
            1,
            "the client's disconnect reached the worker"
        );
        held.set_mode(quick.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..20 {
            let (s, _) = post_json(
                &c,
                format!("{lo}/v1/chat/completions"),
                json!({"model": "lo", "messages": "x"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert!(held.hits() > 1, "the freed instance is chosen again");
    });
}

#[test]
fn apiserver_daemon_mode_and_stop() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let port = free_port();
    let p = port.to_string();
    let out = env.run(&[
        "start",
        "apiserver",
        "--host",
        "127.0.0.1",
        "--port",
        &p,
        "--controller_addr",
        &ctl.url(),
        "-d",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Started ModelAPIServer in background"),
        "{}",
        stdout(&out)
    );
    assert_eq!(http_get_status(port, "/api/health"), Some(200));
    // A second one on the same port is refused with the reason.
    let out = env.run(&[
        "start",
        "apiserver",
        "--host",
        "127.0.0.1",
        "--port",
        &p,
        "-d",
    ]);
    assert!(!out.status.success());
    let out = env.run(&["stop", "apiserver", "--port", &p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(10), || http_get_status(
        port,
        "/api/health"
    )
    .is_none()));
    assert!(
        !env.runtime_dir()
            .join(format!("apiserver-{port}.sock"))
            .exists()
    );
}

/// A worker's 400 or 413 (the prompt is longer than the model's context, the body too large)
/// is the client's error: the same status with an OpenAI error naming the prompt field, for
/// whole answers and streams alike, and no other instance is tried (each would refuse too).
#[test]
fn apiserver_worker_refusals_stay_client_errors() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let long: Vec<FakeWorker> = (0..2)
        .map(|_| FakeWorker::llm(&u, "small", Mode::Refuse { status: 400 }))
        .collect();
    let big: Vec<FakeWorker> = (0..2)
        .map(|_| FakeWorker::llm(&u, "tiny", Mode::Refuse { status: 413 }))
        .collect();
    let api = apiserver(&env, &u, &["--max_retries", "3"]);
    let base = api.url();
    let hits = |ws: &[FakeWorker]| ws.iter().map(FakeWorker::hits).sum::<usize>();
    rt().block_on(async {
        let c = client();
        wait_models(&c, &base, None, &["small", "tiny"]).await;
        let mut sent = 0;
        for stream in [false, true] {
            for (path, field, body) in [
                (
                    "/v1/chat/completions",
                    "messages",
                    json!({"model": "small", "stream": stream, "messages": [{"role": "user", "content": "long"}]}),
                ),
                (
                    "/api/v1/completions",
                    "prompt",
                    json!({"model": "small", "stream": stream, "prompt": "long"}),
                ),
            ] {
                let (status, v) = post_json(&c, format!("{base}{path}"), body).await;
                sent += 1;
                let what = format!("{path} stream={stream}: {v}");
                assert_eq!(status, 400, "{what}");
                let e = &v["error"];
                assert_eq!(e["type"], "invalid_request_error", "{what}");
                assert_eq!(e["code"], "invalid_prompt", "{what}");
                assert_eq!(e["param"], field, "{what}");
                assert!(
                    e["message"]
                        .as_str()
                        .unwrap()
                        .contains("context window is 4096 tokens"),
                    "{what}"
                );
                assert_eq!(hits(&long), sent, "one instance per request: {what}");
            }
        }
        for stream in [false, true] {
            let body = json!({"model": "tiny", "stream": stream, "messages": [{"role": "user", "content": "x"}]});
            let (status, v) = post_json(&c, format!("{base}/v1/chat/completions"), body).await;
            assert_eq!(status, 413, "{v}");
            assert_eq!(v["error"]["code"], "request_too_large", "{v}");
            assert_eq!(v["error"]["param"], "messages", "{v}");
        }
        assert_eq!(hits(&big), 2, "one instance per request");
    });
    let log = api.logs();
    assert!(!log.contains("worker call failed"), "{log}");
}

/// A model registered a moment ago is found at once: the miss refreshes the view (the
/// periodic refresh, once an hour here, cannot be what finds it), for concurrent requests
/// too; a model that really does not exist is still a 404.
#[test]
fn apiserver_finds_a_model_registered_a_moment_ago() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let api = apiserver_refreshing(&env, &u, "3600", &[]);
    let base = api.url();
    let runtime = rt();
    let chat = |m: &str, stream: bool| json!({"model": m, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    runtime.block_on(async {
        let (status, v) = post_json(
            &client(),
            format!("{base}/v1/chat/completions"),
            chat("fresh", false),
        )
        .await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"]["code"], "model_not_found");
    });
    let fresh = FakeWorker::llm(&u, "fresh", stream_mode(2));
    runtime.block_on(async {
        let c = client();
        let (status, v) = post_json(
            &c,
            format!("{base}/v1/chat/completions"),
            chat("fresh", false),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], fake_text(2));
    });
    // Several requests at once for another new model: all find it.
    let other = FakeWorker::llm(&u, "other", stream_mode(2));
    runtime.block_on(async {
        let c = client();
        let asks = (0..6).map(|i| {
            let c = c.clone();
            let url = format!("{base}/v1/chat/completions");
            let body = chat("other", i % 2 == 0);
            async move {
                let r = c.post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        });
        for (status, body) in futures::future::join_all(asks).await {
            assert_eq!(status, 200, "{body}");
        }
        let (status, v) = post_json(
            &c,
            format!("{base}/v1/chat/completions"),
            chat("nope", false),
        )
        .await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
    });
    assert_eq!((fresh.hits(), other.hits()), (1, 6));
}

/// A worker that accepts connections but never answers (frozen, as under SIGSTOP) costs a
/// request the first-byte timeout, not the request timeout: the failure is recorded against it and the
/// request goes to the healthy instance next to it, streamed or not.
#[test]
fn apiserver_moves_past_a_frozen_worker() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let frozen_s = FakeWorker::llm(&u, "streamed", Mode::Hang);
    let ok_s = FakeWorker::llm(&u, "streamed", stream_mode(3));
    let frozen_w = FakeWorker::llm(&u, "whole", Mode::Hang);
    let ok_w = FakeWorker::llm(&u, "whole", stream_mode(3));
    let api = apiserver(
        &env,
        &u,
        &[
            "--routing_policy",
            "round_robin",
            "--first_byte_timeout_secs",
            "1",
            "--request_timeout_secs",
            "300",
        ],
    );
    let base = api.url();
    rt().block_on(async {
        let c = client();
        wait_models(&c, &base, None, &["streamed", "whole"]).await;
        // Round robin over two instances: one of the first two requests meets the frozen one.
        for _ in 0..2 {
            let body = json!({"model": "streamed", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
            let r = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let (content, _, _) = check_stream(&r.text().await.unwrap(), "chat.completion.chunk", 1);
            assert_eq!(content, [fake_text(3)]);
            let body = json!({"model": "whole", "messages": [{"role": "user", "content": "hi"}]});
            let (status, v) = post_json(&c, format!("{base}/v1/chat/completions"), body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["message"]["content"], fake_text(3));
        }
    });
    assert!(frozen_s.hits() >= 1 && frozen_w.hits() >= 1);
    assert_eq!((ok_s.hits(), ok_w.hits()), (2, 2));
    let log = api.logs();
    assert!(log.contains("first-byte timeout"), "{log}");
    assert!(log.contains("worker call failed"), "{log}");
}
