//! Workers with the real models (SmolLM2 GGUF through llama.cpp, all-MiniLM through candle)
//! and with the proxy backend against a test-double OpenAI upstream: registration,
//! DB-GPT's stream format, lifecycle, and failure handling.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Directory with the real model files (fails, never skips, when they are missing).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("DBGPT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dbgpt-cluster/models")
        });
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
            && dir.join("all-MiniLM-L6-v2/model.safetensors").is_file(),
        "test models are missing in {}: run scripts/fetch-models.sh (or set DBGPT_MODELS_DIR)",
        dir.display()
    );
    dir
}

pub fn gguf() -> String {
    models_dir()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        .display()
        .to_string()
}

pub fn minilm() -> String {
    models_dir().join("all-MiniLM-L6-v2").display().to_string()
}

/// Starts a worker on a fresh port; waits for its health route.
pub fn worker(env: &TestEnv, controller: &str, extra: &[&str]) -> Daemon {
    let port = free_port();
    let ps = port.to_string();
    let mut args = vec![
        "start",
        "worker",
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--controller_addr",
        controller,
    ];
    args.extend_from_slice(extra);
    let d = env.spawn(&args, port, "worker");
    d.wait_healthy();
    d
}

fn registered(c: u16, key: &str) -> Option<Value> {
    let (_, v) = json_req(
        c,
        "GET",
        &format!(
            "/api/controller/models?model_name={}",
            key.replace('@', "%40")
        ),
        None,
    );
    v.as_array().and_then(|a| a.first().cloned())
}

fn healthy(c: u16, key: &str) -> bool {
    registered(c, key)
        .map(|i| i["healthy"] == json!(true))
        .unwrap_or(false)
}

/// Raw `generate_stream`: (frames, raw body).
pub fn stream(port: u16, body: &Value) -> (Vec<Value>, Vec<u8>) {
    let (s, _, raw) = raw_http(
        port,
        "POST",
        "/api/worker/generate_stream",
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(
        raw.last(),
        Some(&0u8),
        "every frame, the last included, ends with NUL"
    );
    let frames = raw
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| serde_json::from_slice(f).unwrap())
        .collect();
    (frames, raw)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn real_models_register_stream_and_embed() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    // Both models in one worker process, from a TOML file.
    let cfg = env.path("worker.toml");
    std::fs::write(&cfg, format!("[worker]\nlimit_model_concurrency = 2\n\n[[models.llms]]\nname = \"smollm2\"\nmodel_type = \"llama.cpp\"\npath = \"{}\"\n\n[[models.embeddings]]\nname = \"all-minilm\"\npath = \"{}\"\n", gguf(), minilm())).unwrap();
    let w = worker(&env, &c.url(), &["--config", cfg.to_str().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || healthy(
        c.port,
        "smollm2@llm"
    ) && healthy(
        c.port,
        "all-minilm@text2vec"
    ) && healthy(
        c.port,
        "WorkerManager@service"
    )));
    let inst = registered(c.port, "smollm2@llm").unwrap();
    assert_eq!(
        (inst["host"].as_str(), inst["port"].as_u64()),
        (Some("127.0.0.1"), Some(w.port as u64))
    );

    // DB-GPT roles, greedy: NUL-delimited frames of cumulative text, then finish + usage.
    let body = json!({"model": "smollm2", "messages": [{"role": "human", "content": "What is the capital of France?"}], "temperature": 0, "max_new_tokens": 24, "echo": false});
    let (frames, _) = stream(w.port, &body);
    assert!(frames.len() >= 3, "{frames:?}");
    for pair in frames.windows(2) {
        let (a, b) = (
            pair[0]["text"].as_str().unwrap(),
            pair[1]["text"].as_str().unwrap(),
        );
        assert!(
            b.starts_with(a),
            "text must be cumulative: {a:?} then {b:?}"
        );
    }
    let last = frames.last().unwrap();
    assert_eq!(last["error_code"], 0);
    assert!(last["text"].as_str().unwrap().contains("Paris"), "{last}");
    assert!(matches!(
        last["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let u = &last["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        frames[..frames.len() - 1]
            .iter()
            .all(|f| f["finish_reason"].is_null()),
        "exactly one frame finishes"
    );

    // Greedy is deterministic; OpenAI roles give the same answer as DB-GPT roles.
    let (again, _) = stream(w.port, &body);
    assert_eq!(again.last().unwrap()["text"], last["text"]);
    let openai = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_new_tokens": 24});
    assert_eq!(
        stream(w.port, &openai).0.last().unwrap()["text"],
        last["text"]
    );

    // max_new_tokens is honoured.
    let (short, _) = stream(
        w.port,
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "temperature": 0, "max_new_tokens": 5}),
    );
    let l = short.last().unwrap();
    assert_eq!(l["finish_reason"], "length");
    assert_eq!(l["usage"]["completion_tokens"], 5);

    // An unknown role is an error frame, never a silently dropped message.
    let (bad, _) = stream(
        w.port,
        &json!({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}),
    );
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["error_code"], 1);
    assert!(bad[0]["text"].as_str().unwrap().contains("wizard"));
    // An unknown model: DB-GPT's error frame.
    let (none, _) = stream(
        w.port,
        &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(
        none[0]["text"]
            .as_str()
            .unwrap()
            .contains("Cound not found worker instances for model name nope")
    );

    // Non-stream generate = the last frame.
    let (s, g) = json_req(w.port, "POST", "/api/worker/generate", Some(&body));
    assert_eq!(s, 200);
    assert_eq!(g["text"], last["text"]);
    let (_, n) = json_req(
        w.port,
        "POST",
        "/api/worker/count_token",
        Some(&json!({"model": "smollm2", "prompt": "hello world"})),
    );
    assert!(n.as_i64().unwrap() >= 2, "{n}");
    let (_, md) = json_req(
        w.port,
        "POST",
        "/api/worker/model_metadata",
        Some(&json!({"model": "smollm2"})),
    );
    assert!(md["context_length"].as_u64().unwrap() >= 512, "{md}");
    // The GGUF's own chat template (ChatML for SmolLM2).
    assert!(
        md["ext_metadata"]["prompt_chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>")),
        "{md}"
    );

    // Embeddings match sentence-transformers' reference for "hello world".
    let (s, e) = json_req(
        w.port,
        "POST",
        "/api/worker/embeddings",
        Some(&json!({"model": "all-minilm", "input": ["hello world"]})),
    );
    assert_eq!(s, 200, "{e}");
    let v = floats(&e[0]);
    assert_eq!(v.len(), 384);
    let reference = [-0.0344773, 0.0310233, 0.0067349, 0.0261089, -0.0393620];
    assert!(cosine(&v[..5], &reference) >= 0.9999, "{:?}", &v[..5]);
    assert!(
        (v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4,
        "unit norm"
    );
    // A padded batch gives the same vectors as single calls.
    let texts = [
        "hello world",
        "The quick brown fox jumps over the lazy dog",
        "A man is eating food.",
    ];
    let (_, batch) = json_req(
        w.port,
        "POST",
        "/api/worker/embeddings",
        Some(&json!({"model": "all-minilm", "input": texts})),
    );
    for (i, t) in texts.iter().enumerate() {
        let (_, single) = json_req(
            w.port,
            "POST",
            "/api/worker/embeddings",
            Some(&json!({"model": "all-minilm", "input": [t]})),
        );
        let (a, b) = (floats(&batch[i]), floats(&single[0]));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{t}");
    }
    // Bad input to the worker API is a 422 naming the field.
    let (s, v) = json_req(
        w.port,
        "POST",
        "/api/worker/generate_stream",
        Some(&json!({"messages": []})),
    );
    assert_eq!(s, 422);
    assert_eq!(v["detail"][0]["loc"], json!(["body", "model"]));
    let (s, _) = json_req(
        w.port,
        "POST",
        "/api/worker/embeddings",
        Some(&json!({"model": "all-minilm", "input": 5})),
    );
    assert_eq!(s, 422);
    let (s, _) = json_req(
        w.port,
        "POST",
        "/api/worker/embeddings",
        Some(&json!({"model": "nope", "input": ["x"]})),
    );
    assert_eq!(s, 404);
}

#[test]
fn lifecycle_through_apply_startup_and_the_cli() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let w = worker(
        &env,
        &c.url(),
        &["--model_name", "smollm2", "--model_path", &gguf()],
    );
    assert!(wait_until(Duration::from_secs(10), || healthy(
        c.port,
        "smollm2@llm"
    )));
    let ask = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0, "max_new_tokens": 3});
    let works = |p: u16| stream(p, &ask).0.last().unwrap()["error_code"] == 0;

    // A duplicate start is refused and the running model is untouched.
    let start = json!({"host": "127.0.0.1", "port": w.port, "model": "smollm2", "worker_type": "llm", "params": {"model_path": gguf()}});
    let (s, v) = json_req(w.port, "POST", "/api/worker/models/startup", Some(&start));
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("already running"));
    assert!(works(w.port));
    assert!(healthy(c.port, "smollm2@llm"));

    // apply restart keeps it registered, healthy and serving (DB-GPT's restart loses it).
    let (s, v) = json_req(
        w.port,
        "POST",
        "/api/worker/apply",
        Some(
            &json!({"model": "smollm2", "apply_type": "restart", "worker_type": "llm", "params": null, "apply_user": null}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["success"], true);
    assert!(healthy(c.port, "smollm2@llm"));
    assert!(works(w.port));

    // Stop deregisters; generate then answers DB-GPT's error frame.
    let (s, _) = json_req(
        w.port,
        "POST",
        "/api/worker/apply",
        Some(&json!({"model": "smollm2", "apply_type": "stop"})),
    );
    assert_eq!(s, 200);
    assert_eq!(registered(c.port, "smollm2@llm").unwrap()["healthy"], false);
    assert!(!works(w.port));
    // Stopping again is a 404; start through models/startup brings it back.
    let (s, _) = json_req(w.port, "POST", "/api/worker/models/shutdown", Some(&start));
    assert_eq!(s, 404);
    let (s, v) = json_req(w.port, "POST", "/api/worker/models/startup", Some(&start));
    assert_eq!(s, 200, "{v}");
    assert!(healthy(c.port, "smollm2@llm") && works(w.port));
    // A bad path is a 400 naming the file, and nothing is registered for it.
    let bad = json!({"host": "127.0.0.1", "port": w.port, "model": "ghost", "worker_type": "llm", "params": {"model_path": "/nonexistent/x.gguf"}});
    let (s, v) = json_req(w.port, "POST", "/api/worker/models/startup", Some(&bad));
    assert_eq!(s, 400);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/x.gguf"),
        "{v}"
    );
    assert!(registered(c.port, "ghost@llm").is_none());
    let (s, _) = json_req(
        w.port,
        "POST",
        "/api/worker/apply",
        Some(&json!({"model": "smollm2", "apply_type": "explode"})),
    );
    assert_eq!(s, 422);

    // Restart of a stopped model starts it (DB-GPT's restart is stop-then-start).
    let apply = |apply_type: &str| {
        json_req(
            w.port,
            "POST",
            "/api/worker/apply",
            Some(
                &json!({"model": "smollm2", "apply_type": apply_type, "worker_type": "llm", "params": null, "apply_user": null}),
            ),
        )
    };
    assert_eq!(apply("stop").0, 200);
    assert!(!works(w.port));
    let (s, v) = apply("restart");
    assert_eq!(s, 200, "{v}");
    assert!(healthy(c.port, "smollm2@llm") && works(w.port));
    // A model this worker never ran is still a 404.
    let (s, _) = json_req(
        w.port,
        "POST",
        "/api/worker/apply",
        Some(&json!({"model": "ghost", "apply_type": "restart"})),
    );
    assert_eq!(s, 404);

    // DB-GPT 0.5.10's `dbgpt model start --model_name smollm2 --host H --port P` sends
    // every field of DB-GPT's LlamaCppModelParameters with its defaults, `model_type`
    // "huggingface" included: the model comes back on llama.cpp, and a second start is 409.
    assert_eq!(apply("stop").0, 200);
    let dbgpt_start = json!({"host": "127.0.0.1", "port": w.port, "model": "smollm2", "worker_type": "llm", "params": {
        "model_name": "smollm2", "model_path": gguf(), "device": null,
        "model_type": "huggingface", "prompt_template": null, "max_context_size": 4096,
        "num_gpus": null, "max_gpu_memory": null, "cpu_offloading": false,
        "load_8bit": false, "load_4bit": false, "quant_type": "nf4",
        "use_double_quant": true, "compute_dtype": null, "trust_remote_code": true,
        "verbose": false, "seed": -1, "n_threads": null, "n_batch": 512,
        "n_gpu_layers": 1000000000, "n_gqa": null, "rms_norm_eps": 5e-06,
        "cache_capacity": null, "prefer_cpu": false
    }});
    let dbgpt_cli_start = || {
        json_req(
            w.port,
            "POST",
            "/api/worker/models/startup",
            Some(&dbgpt_start),
        )
    };
    let (s, v) = dbgpt_cli_start();
    assert_eq!(s, 200, "{v}");
    assert!(healthy(c.port, "smollm2@llm") && works(w.port));
    let (_, d) = json_req(
        w.port,
        "GET",
        "/api/worker/parameter/descriptions?model=smollm2",
        None,
    );
    let engine = d
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["param_name"] == "model_type")
        .unwrap();
    assert_eq!(engine["default_value"], "llama.cpp", "{d}");
    let (s, v) = dbgpt_cli_start();
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("already running"));
    assert!(works(w.port));

    // The same through the CLI.
    let addr = c.url();
    let cli = |args: &[&str]| {
        let mut all = vec!["model", "--address", &addr];
        all.extend_from_slice(args);
        env.run(&all)
    };
    let out = cli(&["restart", "--model_name", "smollm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Restarted smollm2@llm"));
    let out = cli(&["stop", "--model_name", "smollm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(registered(c.port, "smollm2@llm").unwrap()["healthy"], false);
    // `model restart` of the stopped model starts it again.
    let out = cli(&["restart", "--model_name", "smollm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Restarted smollm2@llm"));
    assert!(healthy(c.port, "smollm2@llm") && works(w.port));
    let out = cli(&["stop", "--model_name", "smollm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["start", "--model_name", "smollm2", "--model_path", &gguf()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(healthy(c.port, "smollm2@llm") && works(w.port));
    let out = cli(&["start", "--model_name", "smollm2", "--model_path", &gguf()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));

    // Chat: streams an answer, keeps going after /clear, leaves on exit.
    let mut child = env
        .cmd()
        .args([
            "model",
            "--address",
            &addr,
            "chat",
            "--model_name",
            "smollm2",
            "--temperature",
            "0",
            "--max_new_tokens",
            "12",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/clear\nexit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("Chatbot started with model smollm2")
            && text.contains("Bot: ")
            && text.contains("Paris")
            && text.contains("history cleared"),
        "{text}"
    );
}

#[test]
fn sigterm_deregisters_and_kill_9_expires() {
    let env = TestEnv::new();
    let c = env.controller(&[
        "--heartbeat_interval_secs",
        "1",
        "--heartbeat_timeout_secs",
        "2",
    ]);
    let mut a = worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "smollm2",
            "--model_path",
            &gguf(),
            "--heartbeat_interval",
            "1",
        ],
    );
    // The manager's entry is registered once serving starts, after the model's: wait for
    // both (a stop before that leaves no manager entry to mark unhealthy).
    assert!(wait_until(Duration::from_secs(10), || healthy(
        c.port,
        "smollm2@llm"
    ) && healthy(
        c.port,
        "WorkerManager@service"
    )));
    assert!(a.terminate().success(), "{}", a.logs());
    assert_eq!(
        registered(c.port, "smollm2@llm").unwrap()["healthy"],
        false,
        "deregistered on SIGTERM"
    );
    assert_eq!(
        registered(c.port, "WorkerManager@service").unwrap()["healthy"],
        false
    );

    let mut b = worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "other",
            "--model_path",
            &gguf(),
            "--heartbeat_interval",
            "1",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || healthy(
        c.port,
        "other@llm"
    )));
    b.kill9();
    assert!(
        healthy(c.port, "other@llm"),
        "still healthy right after kill -9"
    );
    assert!(
        wait_until(Duration::from_secs(6), || !healthy(c.port, "other@llm")),
        "expired after the heartbeat timeout"
    );
}

#[test]
fn worker_survives_controller_absence_and_restart() {
    let env = TestEnv::new();
    let cport = free_port();
    let curl = format!("http://127.0.0.1:{cport}");
    // Controller down when the worker starts: the worker serves anyway.
    let w = worker(
        &env,
        &curl,
        &[
            "--model_name",
            "smollm2",
            "--model_path",
            &gguf(),
            "--heartbeat_interval",
            "2",
        ],
    );
    assert_eq!(stream(w.port, &json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2})).0.last().unwrap()["error_code"], 0);
    // The controller appears: the worker registers by itself (backoff ≤ the interval).
    let reg = env.path("c.redb");
    let mut c = env.controller_on(cport, &reg, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || healthy(cport, "smollm2@llm")
            && healthy(cport, "WorkerManager@service")),
        "{}",
        w.logs()
    );
    // The controller restarts with an empty registry: the next heartbeats restore the entries.
    c.kill9();
    std::fs::remove_file(&reg).unwrap();
    let _c2 = env.controller_on(cport, &reg, &[]);
    assert!(registered(cport, "smollm2@llm").is_none());
    assert!(
        wait_until(Duration::from_secs(10), || healthy(cport, "smollm2@llm")),
        "{}",
        w.logs()
    );
    assert!(
        w.logs().contains("controller reachable again"),
        "{}",
        w.logs()
    );
}

/// A test-double OpenAI upstream: records requests, streams a fixed answer, counts
/// concurrent requests, and fails on demand (model name "fail").
pub struct FakeUpstream {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Value>>>,
    pub max_concurrent: Arc<Mutex<(usize, usize)>>,
    _rt: tokio::runtime::Runtime,
}

/// Serves `app` on a fresh 127.0.0.1 port from its own runtime (kept alive by the caller).
fn serve_upstream(app: axum::Router) -> (tokio::runtime::Runtime, u16) {
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, port)
}

impl FakeUpstream {
    pub fn start(delay: Duration) -> Self {
        use axum::routing::post;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let conc = Arc::new(Mutex::new((0usize, 0usize)));
        let (r2, c2) = (requests.clone(), conc.clone());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(move |axum::Json(body): axum::Json<Value>| {
                let (r, c) = (r2.clone(), c2.clone());
                async move {
                    r.lock().unwrap().push(body.clone());
                    {
                        let mut g = c.lock().unwrap();
                        g.0 += 1;
                        g.1 = g.1.max(g.0);
                    }
                    tokio::time::sleep(delay).await;
                    c.lock().unwrap().0 -= 1;
                    if body["model"] == "fail" {
                        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}))).into_response();
                    }
                    let mut sse = String::new();
                    for (i, piece) in ["Hello", " from", " upstream"].iter().enumerate() {
                        let delta = if i == 0 { json!({"role": "assistant", "content": piece}) } else { json!({"content": piece}) };
                        sse.push_str(&format!("data: {}\n\n", json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})));
                    }
                    sse.push_str(&format!("data: {}\n\n", json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
                    sse.push_str(&format!("data: {}\n\n", json!({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})));
                    sse.push_str("data: [DONE]\n\n");
                    ([("content-type", "text/event-stream")], sse).into_response()
                }
            }))
            .route("/v1/embeddings", post(|axum::Json(body): axum::Json<Value>| async move {
                let n = body["input"].as_array().map(|a| a.len()).unwrap_or(0);
                let data: Vec<Value> = (0..n).rev().map(|i| json!({"object": "embedding", "index": i, "embedding": [i as f64, 1.0]})).collect();
                axum::Json(json!({"object": "list", "data": data}))
            }));
        let (rt, port) = serve_upstream(app);
        FakeUpstream {
            port,
            requests,
            max_concurrent: conc,
            _rt: rt,
        }
    }
}

use axum::response::IntoResponse;

#[test]
fn proxy_worker_forwards_parameters_and_surfaces_errors() {
    let up = FakeUpstream::start(Duration::from_millis(200));
    let env = TestEnv::new();
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    let cfg = env.path("w.toml");
    std::fs::write(&cfg, format!("[[models.llms]]\nname = \"gpt-4o-mini\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\napi_key = \"sk-test\"\nconcurrency = 1\n\n[[models.llms]]\nname = \"broken\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"fail\"\n\n[[models.embeddings]]\nname = \"remote-emb\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\n")).unwrap();
    let w = worker(
        &env,
        "http://127.0.0.1:1",
        &["--config", cfg.to_str().unwrap(), "--no_register"],
    );
    // Without a controller, models/supports reports the address the worker listens on.
    let (_, sup) = json_req(w.port, "GET", "/api/worker/models/supports", None);
    assert_eq!(
        (sup[0]["host"].as_str(), sup[0]["port"].as_u64()),
        (Some("127.0.0.1"), Some(w.port as u64)),
        "{sup}"
    );
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"}, {"role": "human", "content": "hi"}, {"role": "ai", "content": "hello"}, {"role": "user", "content": "again"}], "temperature": 0, "top_p": 0.5, "max_new_tokens": 7, "stop": ["\n\n"], "seed": 3});
    let (frames, _) = stream(w.port, &body);
    let texts: Vec<&str> = frames.iter().map(|f| f["text"].as_str().unwrap()).collect();
    assert_eq!(texts.first().copied(), Some("Hello"));
    assert_eq!(texts.last().copied(), Some("Hello from upstream"));
    let last = frames.last().unwrap();
    assert_eq!(last["finish_reason"], "stop");
    assert_eq!(last["usage"]["total_tokens"], 12);
    let sent = up.requests.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["temperature"], 0.0, "temperature 0 is passed on");
    assert_eq!(sent["top_p"], 0.5);
    assert_eq!(sent["max_tokens"], 7);
    assert_eq!(sent["stop"], json!(["\n\n"]));
    assert_eq!(sent["seed"], 3);
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "user"],
        "no message dropped, roles mapped"
    );
    // Upstream errors become error frames with the upstream message.
    let (err, _) = stream(
        w.port,
        &json!({"model": "broken", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(err.last().unwrap()["error_code"], 1);
    assert!(
        err.last().unwrap()["text"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key provided"),
        "{err:?}"
    );
    // Embeddings through the proxy come back in input order.
    let (_, e) = json_req(
        w.port,
        "POST",
        "/api/worker/embeddings",
        Some(&json!({"model": "remote-emb", "input": ["a", "b", "c"]})),
    );
    assert_eq!(e, json!([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]));
    // concurrency = 1: parallel requests wait; the upstream never sees two at once.
    *up.max_concurrent.lock().unwrap() = (0, 0);
    let port = w.port;
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let b = body.clone();
            std::thread::spawn(move || stream(port, &b))
        })
        .collect();
    for h in handles {
        assert_eq!(
            h.join().unwrap().0.last().unwrap()["error_code"],
            0,
            "excess requests wait, they are not rejected"
        );
    }
    assert_eq!(up.max_concurrent.lock().unwrap().1, 1);
}

/// Issue 18 item 4: a proxy worker whose upstream accepts and never answers, or goes
/// silent mid-stream, ends the stream with an error frame naming the upstream (without its
/// credentials) and the timeout, stays healthy, and answers the next requests.
#[test]
fn proxy_worker_times_out_a_silent_upstream_and_keeps_serving() {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|axum::Json(body): axum::Json<Value>| async move {
            let chunk = |c: Value| format!("data: {c}\n\n");
            let hello = chunk(json!({"choices": [{"index": 0, "delta": {"content": "Hello"}}]}));
            match body["model"].as_str() {
                Some("hang") => std::future::pending().await,
                Some("stall") => {
                    let first =
                        futures::stream::once(async move { Ok::<_, std::io::Error>(hello) });
                    let body = futures::StreamExt::chain(first, futures::stream::pending());
                    (
                        [("content-type", "text/event-stream")],
                        axum::body::Body::from_stream(body),
                    )
                        .into_response()
                }
                _ => {
                    let end = chunk(
                        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                    );
                    (
                        [("content-type", "text/event-stream")],
                        format!("{hello}{end}data: [DONE]\n\n"),
                    )
                        .into_response()
                }
            }
        }),
    );
    let (_rt, port) = serve_upstream(app);
    let env = TestEnv::new();
    let base = format!("http://user:hunter2@127.0.0.1:{port}/v1");
    let cfg = env.path("w.toml");
    let model = |name: &str| {
        format!(
            "[[models.llms]]\nname = \"{name}\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"{name}\"\nconcurrency = 1\n\n"
        )
    };
    std::fs::write(&cfg, [model("hang"), model("stall"), model("ok")].concat()).unwrap();
    let w = worker(
        &env,
        "http://127.0.0.1:1",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--no_register",
            "--proxy_first_byte_timeout_secs",
            "1",
            "--proxy_chunk_timeout_secs",
            "1",
        ],
    );
    let ask = |m: &str| {
        stream(
            w.port,
            &json!({"model": m, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .0
    };
    let shown = format!("http://127.0.0.1:{port}/v1");
    // Twice each: with concurrency 1, a request still holding its slot would block the next.
    for _ in 0..2 {
        for (m, timeout) in [
            ("hang", "first-byte timeout"),
            ("stall", "between-chunk timeout"),
        ] {
            let frames = ask(m);
            let last = frames.last().unwrap();
            assert_eq!(last["error_code"], 1, "{m}: {frames:?}");
            let text = last["text"].as_str().unwrap();
            assert!(text.contains(timeout) && text.contains("1s"), "{m}: {text}");
            assert!(text.contains(&shown), "{m}: {text}");
            assert!(!text.contains("hunter2"), "{m}: {text}");
        }
        // The native route (the apiserver's way): a silent upstream is a 502 naming the
        // timeout; one that stalls mid-answer has its answer cut short after "Hello".
        let native = |m: &str| {
            raw_http(
                w.port,
                "POST",
                "/api/worker/openai/v1/chat/completions",
                &[("Content-Type", "application/json")],
                &serde_json::to_vec(
                    &json!({"model": m, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
                )
                .unwrap(),
            )
            .expect("no HTTP answer")
        };
        let (status, _, body) = native("hang");
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{text}");
        assert!(
            text.contains("first-byte timeout") && !text.contains("hunter2"),
            "{text}"
        );
        let (status, _, body) = native("stall");
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200);
        assert!(text.contains("Hello") && !text.contains("[DONE]"), "{text}");
        assert_eq!(http_get_status(w.port, "/api/health"), Some(200));
        let frames = ask("ok");
        let last = frames.last().unwrap();
        assert_eq!(
            (last["error_code"].clone(), last["text"].clone()),
            (json!(0), json!("Hello"))
        );
    }
}

/// Concurrent embedding requests to one MiniLM worker are merged into shared forward passes
/// (`--embed_max_batch`, `--embed_batch_wait_ms`) and each gets the vectors it gets alone,
/// on DB-GPT's route and the native OpenAI route, texts of different lengths mixed.
#[test]
fn concurrent_embeddings_match_single_calls() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let w = worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "all-minilm",
            "--worker_type",
            "text2vec",
            "--model_path",
            &minilm(),
            "--embed_max_batch",
            "8",
            "--embed_batch_wait_ms",
            "5",
        ],
    );
    let texts: Vec<String> = (0..16)
        .map(|i| match i % 4 {
            0 => format!("short text {i}"),
            1 => format!("The quick brown fox number {i} jumps over the lazy dog."),
            2 => "A much longer text about databases, indexes and query planners. ".repeat(i),
            _ => String::new(),
        })
        .collect();
    let native = |t: &str| -> Vec<f64> {
        let (s, v) = json_req(
            w.port,
            "POST",
            "/api/worker/openai/v1/embeddings",
            Some(&json!({"model": "all-minilm", "input": t})),
        );
        assert_eq!(s, 200, "{v}");
        floats(&v["data"][0]["embedding"])
    };
    let dbgpt = |t: &str| -> Vec<f64> {
        let (s, v) = json_req(
            w.port,
            "POST",
            "/api/worker/embeddings",
            Some(&json!({"model": "all-minilm", "input": [t]})),
        );
        assert_eq!(s, 200, "{v}");
        floats(&v[0])
    };
    let alone: Vec<Vec<f64>> = texts.iter().map(|t| native(t)).collect();
    for round in 0..2 {
        let together: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    s.spawn(move || {
                        if (i + round) % 2 == 0 {
                            native(t)
                        } else {
                            dbgpt(t)
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let cos = cosine(a, b);
            assert!(cos >= 0.99999, "text {i}: cosine {cos}");
        }
    }
    // A bad batching flag is refused at startup, naming the flag.
    let out = env.run(&[
        "start",
        "worker",
        "--no_register",
        "--model_name",
        "m",
        "--worker_type",
        "text2vec",
        "--model_path",
        &minilm(),
        "--embed_max_batch",
        "0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--embed_max_batch"), "{err}");
}
