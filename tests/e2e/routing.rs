//! Aliases, fallback chains and passive outlier detection, end to end: a real controller
//! and apiserver in front of test-double workers that speak our workers' native OpenAI
//! routes (the client's body in, an OpenAI answer out, naming the `model` they were sent)
//! and can be switched to answer 500, 400 or 503 overloaded, or killed.
//!
//! Every double runs on its own tokio runtime on its own thread; "dying" shuts that runtime
//! down, which closes its listener, its connections and its heartbeats at once. All traffic
//! stays on 127.0.0.1; every loop is bounded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::*;

/// How a test double answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    /// HTTP 500.
    Http500,
    /// HTTP 400 (the client's error, e.g. a prompt longer than the context).
    Refuse,
    /// HTTP 503 with `Retry-After` (every slot and the wait queue full).
    Overloaded,
}

struct Shared {
    name: String,
    mode: Mutex<Mode>,
    hits: AtomicUsize,
    /// The `model` of every request body received.
    models: Mutex<Vec<String>>,
}

/// A test-double worker serving one model through the native OpenAI routes.
struct Fake {
    port: u16,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {c}\n\n"))
}

async fn answer(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("").to_string();
    s.models.lock().unwrap().push(model.clone());
    let mode = *s.mode.lock().unwrap();
    match mode {
        Mode::Ok => {}
        Mode::Http500 => {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
        }
        Mode::Refuse => {
            let e = json!({"error": {"message": "prompt is longer than the context window", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
            return (axum::http::StatusCode::BAD_REQUEST, axum::Json(e)).into_response();
        }
        Mode::Overloaded => {
            let e = json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": "model_overloaded"}});
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                axum::Json(e),
            )
                .into_response();
        }
    }
    let text = format!("from {}", s.name);
    if req.get("input").is_some() {
        return axum::Json(json!({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": [1.0, 2.0], "index": 0}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}
        }))
        .into_response();
    }
    if req["stream"] == json!(true) {
        let pieces = vec![
            chunk(&model, json!({"role": "assistant", "content": ""}), None),
            chunk(&model, json!({"content": text}), None),
            chunk(&model, json!({}), Some("stop")),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        let st = futures::stream::iter(pieces.into_iter().map(Ok::<Bytes, std::io::Error>));
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(st),
        )
            .into_response();
    }
    axum::Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    }))
    .into_response()
}

impl Fake {
    /// Starts a double named `name` serving `model@worker_type`, registered with the
    /// controller and heartbeating.
    fn start(controller: &str, name: &str, model: &str, worker_type: &str) -> Fake {
        let shared = Arc::new(Shared {
            name: name.into(),
            mode: Mutex::new(Mode::Ok),
            hits: AtomicUsize::new(0),
            models: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/worker/openai/v1/chat/completions", post(answer))
            .route("/api/worker/openai/v1/completions", post(answer))
            .route("/api/worker/openai/v1/embeddings", post(answer))
            .with_state(shared.clone());
        let key = format!("{model}@{worker_type}");
        let (rt, port) = registered_double(controller, 0, app, &key, (1.0, true));
        Fake {
            port,
            shared,
            rt: Some(rt),
        }
    }

    fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    fn last_model(&self) -> String {
        self.shared
            .models
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    fn set(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Like `kill -9`.
    fn die(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.die();
    }
}

/// A controller with fast health expiry.
fn controller(env: &TestEnv) -> Daemon {
    env.controller(&[
        "--heartbeat_timeout_secs",
        "2",
        "--heartbeat_interval_secs",
        "1",
    ])
}

/// A POST of `body` to the apiserver: status, lowercased headers, JSON body (or the raw
/// text as a JSON string, for a stream).
fn call(api: &Daemon, path: &str, body: &Value) -> (u16, Vec<(String, String)>, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let (status, headers, b) = raw_http(
        api.port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &bytes,
    )
    .expect("no answer");
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).to_string()));
    (status, headers, v)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// The ids `/v1/models` lists.
fn listed(api: &Daemon) -> Vec<String> {
    let (s, v) = json_req(api.port, "GET", "/v1/models", None);
    assert_eq!(s, 200, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The apiserver's `/metrics` value of `series` (0 when absent).
fn metric(api: &Daemon, series: &str) -> f64 {
    let (s, _, b) = raw_http(api.port, "GET", "/metrics", &[], b"").expect("no answer");
    assert_eq!(s, 200);
    String::from_utf8(b)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn bad_aliases_and_chains_stop_the_start_naming_the_flag() {
    let env = TestEnv::new();
    for (args, says) in [
        (vec!["--model_alias", "a="], "--model_alias"),
        (vec!["--model_alias", "=b"], "--model_alias"),
        (vec!["--model_alias", "a=a"], "an alias cannot name itself"),
        (
            vec!["--model_alias", "a=b", "--model_alias", "b=a"],
            "form a loop",
        ),
        (vec!["--fallback", "m="], "--fallback"),
        (vec!["--fallback", "m=x,m"], "names `m` itself"),
    ] {
        let port = free_port().to_string();
        let mut full = vec![
            "start",
            "apiserver",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--controller_addr",
            "http://127.0.0.1:9",
        ];
        full.extend_from_slice(&args);
        let out = env.run(&full);
        assert!(!out.status.success(), "{args:?} started");
        let err = stderr(&out);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn aliases_are_served_by_their_target_and_fallbacks_name_the_serving_model() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let mut small = Fake::start(&u, "small", "smollm2", "llm");
    let big = Fake::start(&u, "big", "qwen", "llm");
    let emb = Fake::start(&u, "emb", "minilm", "text2vec");
    let api = apiserver(
        &env,
        &u,
        &[
            "--model_alias",
            "gpt-4o-mini=smollm2",
            "--model_alias",
            "text-embedding-3-small=minilm",
            "--fallback",
            "smollm2=qwen",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || listed(&api).len() == 5),
        "{:?}",
        listed(&api)
    );
    let mut ids = listed(&api);
    ids.sort();
    assert_eq!(
        ids,
        [
            "gpt-4o-mini",
            "minilm",
            "qwen",
            "smollm2",
            "text-embedding-3-small"
        ]
    );

    // The alias is served by its target: the worker is sent the target's name, the client
    // gets the alias back, and the header names the serving model.
    let (s, h, v) = call(&api, "/v1/chat/completions", &chat("gpt-4o-mini", false));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["content"], "from small");
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("smollm2"));
    assert_eq!(small.last_model(), "smollm2");
    // Streamed: every chunk carries the alias.
    let (s, h, v) = call(&api, "/v1/chat/completions", &chat("gpt-4o-mini", true));
    assert_eq!(s, 200);
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("smollm2"));
    let text = v.as_str().unwrap();
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    assert!(chunks.iter().all(|c| c["model"] == "gpt-4o-mini"), "{text}");
    assert!(text.contains("from small") && text.ends_with("data: [DONE]\n\n"));
    // Embeddings too.
    let body = json!({"model": "text-embedding-3-small", "input": "x"});
    let (s, h, v) = call(&api, "/v1/embeddings", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("minilm"));
    assert_eq!(emb.last_model(), "minilm");
    // The Responses API too (its Response object names the requested model).
    let body = json!({"model": "gpt-4o-mini", "input": "hi"});
    let (s, h, v) = call(&api, "/v1/responses", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("smollm2"));
    assert_eq!(small.last_model(), "smollm2");
    // The target itself answers under its own name.
    let (s, h, v) = call(&api, "/v1/chat/completions", &chat("smollm2", false));
    assert_eq!((s, v["model"].as_str()), (200, Some("smollm2")));
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("smollm2"));

    // The target failing (5xx) or overloaded: the alias walks the target's chain, and the
    // answer says qwen served it.
    for mode in [Mode::Http500, Mode::Overloaded] {
        small.set(mode);
        let before = big.hits();
        for model in ["gpt-4o-mini", "smollm2"] {
            for stream in [false, true] {
                let (s, h, v) = call(&api, "/v1/chat/completions", &chat(model, stream));
                assert_eq!(s, 200, "{mode:?} {model} {v}");
                assert_eq!(header(&h, "x-dbgpt-served-model"), Some("qwen"), "{mode:?}");
                if stream {
                    let t = v.as_str().unwrap();
                    assert!(
                        t.contains("\"model\":\"qwen\"") && t.contains("from big"),
                        "{t}"
                    );
                } else {
                    assert_eq!(v["model"], "qwen", "{mode:?}");
                    assert_eq!(v["choices"][0]["message"]["content"], "from big");
                }
            }
        }
        assert_eq!(big.hits(), before + 4, "{mode:?}");
        assert_eq!(big.last_model(), "qwen", "the body's model is rewritten");
    }

    // A 400 is the client's error: no fallback, the worker's answer as it is.
    small.set(Mode::Refuse);
    let before = big.hits();
    let (s, h, v) = call(&api, "/v1/chat/completions", &chat("gpt-4o-mini", false));
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(header(&h, "x-dbgpt-served-model"), Some("smollm2"));
    assert_eq!(big.hits(), before, "no fallback on a 400");

    // The target's only worker is down: connect errors, then (heartbeats gone) no routable
    // instance; both fall back.
    small.die();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let (s, h, v) = call(&api, "/v1/chat/completions", &chat("gpt-4o-mini", false));
        assert_eq!(s, 200, "{v}");
        assert_eq!(header(&h, "x-dbgpt-served-model"), Some("qwen"));
        std::thread::sleep(Duration::from_millis(250));
    }
    let fallbacks = metric(
        &api,
        "dbgpt_apiserver_fallbacks_total{model=\"smollm2\",to=\"qwen\"}",
    );
    assert!(fallbacks >= 9.0, "{fallbacks}");
    let log = api.logs();
    assert!(log.contains("falling back"), "{log}");

    // A model without a chain still answers its own errors.
    let (s, _, v) = call(&api, "/v1/chat/completions", &chat("nope", false));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
}

/// The apiserver's admin status line for `m@llm@addr`.
fn status_of(env: &TestEnv, api: &Daemon, addr: &str) -> String {
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let me = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "apiserver" && s["port"] == api.port)
        .expect("the apiserver answers ctl status")
        .clone();
    me["details"][format!("instance m@llm@{addr}")]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_instance_failing_in_a_row_is_ejected_and_its_trial_brings_it_back() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let good = Fake::start(&u, "good", "m", "llm");
    let bad = Fake::start(&u, "bad", "m", "llm");
    let api = apiserver(
        &env,
        &u,
        &[
            "--routing_policy",
            "round_robin",
            "--outlier_consecutive_failures",
            "2",
            "--outlier_base_ejection_secs",
            "4",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || listed(&api) == ["m"]));
    let ejected_series = format!(
        "dbgpt_apiserver_instance_ejected{{model=\"m\",worker_type=\"llm\",worker=\"{}\"}}",
        bad.addr()
    );
    let ask = || {
        let (s, _, v) = call(&api, "/v1/chat/completions", &chat("m", false));
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "from good");
    };

    // Two 500s in a row (each retried on the good instance: the clients see none) eject it.
    bad.set(Mode::Http500);
    for _ in 0..20 {
        if bad.hits() >= 2 {
            break;
        }
        ask();
    }
    assert_eq!(bad.hits(), 2);
    let ejected_at = Instant::now();
    let st = status_of(&env, &api, &bad.addr());
    assert!(
        st.starts_with("ejected ") && st.contains("ejections=1"),
        "{st}"
    );
    assert!(status_of(&env, &api, &good.addr()).starts_with("healthy"));
    assert_eq!(metric(&api, &ejected_series), 1.0);
    assert_eq!(
        metric(&api, "dbgpt_apiserver_ejections_total{model=\"m\"}"),
        1.0
    );
    // The human table shows it too.
    let table = stdout(&env.run(&["ctl", "status"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains(&bad.addr()) && l.contains("ejected")),
        "{table}"
    );
    // Skipped while ejected.
    for _ in 0..6 {
        ask();
    }
    assert!(
        ejected_at.elapsed() < Duration::from_secs(4),
        "the checks took longer than the backoff"
    );
    assert_eq!(bad.hits(), 2, "an ejected instance is passed over");

    // After the backoff: exactly one trial; it fails, so out again for twice as long.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(ejected_at.elapsed()));
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..6 {
        ask();
    }
    assert_eq!(bad.hits(), 3, "one trial request");
    let st = status_of(&env, &api, &bad.addr());
    assert!(st.contains("ejections=2"), "{st}");
    assert_eq!(
        metric(&api, "dbgpt_apiserver_ejections_total{model=\"m\"}"),
        2.0
    );

    // Healthy again: after the (8 s) backoff its trial succeeds and it is back in rotation.
    bad.set(Mode::Ok);
    std::thread::sleep(Duration::from_millis(8200));
    let mut from_bad = 0;
    for _ in 0..8 {
        let (s, _, v) = call(&api, "/v1/chat/completions", &chat("m", false));
        assert_eq!(s, 200, "{v}");
        if v["choices"][0]["message"]["content"] == "from bad" {
            from_bad += 1;
        }
    }
    assert!(from_bad >= 3, "round robin shares again: {from_bad} of 8");
    assert!(status_of(&env, &api, &bad.addr()).starts_with("healthy"));
    assert_eq!(metric(&api, &ejected_series), 0.0);
    let log = api.logs();
    assert!(log.contains("instance ejected"), "{log}");
    assert!(log.contains("back in rotation"), "{log}");
}

/// An overloaded instance (503 with `Retry-After`) is never ejected: it is busy, not broken.
#[test]
fn overload_does_not_eject() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let u = ctl.url();
    let _good = Fake::start(&u, "good", "m", "llm");
    let full = Fake::start(&u, "full", "m", "llm");
    let api = apiserver(
        &env,
        &u,
        &[
            "--routing_policy",
            "round_robin",
            "--outlier_consecutive_failures",
            "1",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || listed(&api) == ["m"]));
    full.set(Mode::Overloaded);
    for _ in 0..6 {
        let (s, _, v) = call(&api, "/v1/chat/completions", &chat("m", false));
        assert_eq!(s, 200, "{v}");
    }
    assert!(
        full.hits() >= 2,
        "round robin kept trying it: {}",
        full.hits()
    );
    assert!(status_of(&env, &api, &full.addr()).starts_with("healthy"));
    assert_eq!(
        metric(&api, "dbgpt_apiserver_ejections_total{model=\"m\"}"),
        0.0
    );
}
