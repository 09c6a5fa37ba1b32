//! The whole cluster with the real models: controller, a SmolLM2 worker, a MiniLM worker
//! and the apiserver, driven the way an OpenAI client drives it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::worker::{gguf, minilm, worker};

fn post(port: u16, path: &str, body: &Value) -> (u16, String) {
    let (s, _, b) = raw_http(
        port,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer k1"),
        ],
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap();
    (s, String::from_utf8(b).unwrap())
}

#[test]
fn openai_requests_reach_the_real_models_through_the_apiserver() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let _llm = worker(
        &env,
        &c.url(),
        &["--model_name", "smollm2", "--model_path", &gguf()],
    );
    let _emb = worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "all-minilm",
            "--worker_type",
            "text2vec",
            "--model_path",
            &minilm(),
        ],
    );
    let api = apiserver(&env, &c.url(), &["--api_keys", "k1"]);

    // The model list shows both models once the apiserver's view has them.
    assert!(wait_until(Duration::from_secs(10), || {
        let (s, _, b) = raw_http(
            api.port,
            "GET",
            "/v1/models",
            &[("Authorization", "Bearer k1")],
            b"",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        let ids: Vec<&str> = v["data"]
            .as_array()
            .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        s == 200 && ids.contains(&"smollm2") && ids.contains(&"all-minilm")
    }));

    // Non-stream chat: OpenAI shape, the local model's answer, usage that adds up.
    let ask = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 24});
    let (s, body) = post(api.port, "/v1/chat/completions", &ask);
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let u = &v["usage"];
    assert!(u["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );

    // Streaming: role first, deltas that add up to the same greedy answer, one finish, [DONE].
    let mut sask = ask.clone();
    sask["stream"] = json!(true);
    let (s, body) = post(api.port, "/api/v1/chat/completions", &sask);
    assert_eq!(s, 200, "{body}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last().copied(), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].clone();
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text, answer,
        "streamed and non-streamed greedy answers agree"
    );
    assert_eq!(
        chunks
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .count(),
        1
    );

    // Embeddings through the apiserver equal the reference vector's direction.
    let (s, body) = post(
        api.port,
        "/v1/embeddings",
        &json!({"model": "all-minilm", "input": ["hello world", "A man is eating food."]}),
    );
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let e0: Vec<f64> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(e0.len(), 384);
    let reference = [-0.0344773, 0.0310233, 0.0067349, 0.0261089, -0.0393620];
    let dot: f64 = e0[..5].iter().zip(reference).map(|(a, b)| a * b).sum();
    let (na, nb) = (
        e0[..5].iter().map(|x| x * x).sum::<f64>().sqrt(),
        reference.iter().map(|x| x * x).sum::<f64>().sqrt(),
    );
    assert!(dot / (na * nb) >= 0.9999);
    assert_eq!(v["data"][1]["index"], 1);

    // No key: 401 in OpenAI's shape.
    let (s, _, b) = raw_http(
        api.port,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(&ask).unwrap(),
    )
    .unwrap();
    assert_eq!(s, 401);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert!(v["error"]["message"].is_string());

    // ctl status lists the whole cluster.
    let out = env.run(&["ctl", "status", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let services: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    for s in ["controller", "worker", "apiserver"] {
        assert!(services.contains(&s), "{services:?}");
    }
    // stop all stops everything (workers before the controller, so they deregister).
    let out = env.run(&["stop", "all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(http_get_status(api.port, "/api/health"), None);
    assert_eq!(http_get_status(c.port, "/api/health"), None);
}

/// Resumes a SIGSTOPped process (by pid, one this test started) when dropped, so that a
/// failing assertion never leaves it stopped.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn stop(d: &Daemon) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Through the apiserver to two real SmolLM2 workers: what the model refuses (a prompt
/// longer than its context window, streamed or not; a NUL byte; a body over the old 1 MiB
/// worker cap) is a 400 naming the field, never a 502; and with one worker frozen by
/// SIGSTOP every request is still answered by the other, within the first-byte timeout.
#[test]
fn apiserver_real_workers_refusals_and_a_frozen_one() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let model = ["--model_name", "smollm2", "--model_path", &gguf()];
    let w1 = worker(&env, &c.url(), &model);
    let w2 = worker(&env, &c.url(), &model);
    let api = apiserver(
        &env,
        &c.url(),
        &[
            "--api_keys",
            "k1",
            "--routing_policy",
            "round_robin",
            "--first_byte_timeout_secs",
            "5",
            "--request_timeout_secs",
            "120",
        ],
    );
    let chat = |content: &str, stream: bool| {
        json!({"model": "smollm2", "stream": stream, "max_tokens": 3, "temperature": 0,
               "messages": [{"role": "user", "content": content}]})
    };
    // Both instances in the apiserver's view.
    assert!(wait_until(Duration::from_secs(20), || {
        let (s, _, b) = raw_http(
            c.port,
            "GET",
            "/api/controller/models?model_name=smollm2@llm&healthy_only=true",
            &[],
            b"",
        )
        .unwrap();
        s == 200 && serde_json::from_slice::<Vec<Value>>(&b).is_ok_and(|v| v.len() == 2)
    }));
    let (s, body) = post(api.port, "/v1/chat/completions", &chat("Say hi", false));
    assert_eq!(s, 200, "{body}");

    let too_long = "hello ".repeat(6000);
    let over_old_cap = "hello ".repeat(400_000);
    for (what, content, stream, has) in [
        ("too long", too_long.as_str(), false, "context window"),
        (
            "too long, stream",
            too_long.as_str(),
            true,
            "context window",
        ),
        ("NUL byte", "a\u{0}b", false, "NUL"),
        ("NUL byte, stream", "a\u{0}b", true, "NUL"),
        (
            "2.4 MB body",
            over_old_cap.as_str(),
            false,
            "context window",
        ),
    ] {
        let (s, body) = post(api.port, "/v1/chat/completions", &chat(content, stream));
        assert_eq!(s, 400, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let e = &v["error"];
        assert_eq!(e["param"], "messages", "{what}: {body}");
        assert_eq!(e["type"], "invalid_request_error", "{what}: {body}");
        assert!(
            e["message"].as_str().unwrap().contains(has),
            "{what}: {body}"
        );
    }
    let log = api.logs();
    assert!(
        !log.contains("worker call failed"),
        "refusals are not failures: {log}"
    );
    // The worker itself answers them with HTTP 400 naming the limit, on both routes.
    let ask = json!({"model": "smollm2", "messages": [{"role": "user", "content": too_long}]});
    for path in ["/api/worker/generate_stream", "/api/worker/generate"] {
        let (s, _, b) = raw_http(
            w2.port,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            &serde_json::to_vec(&ask).unwrap(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(s, 400, "{path}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("context window is 4096 tokens")),
            "{path}: {v}"
        );
    }

    // One worker frozen: every request, streamed or not, is answered by the other.
    let frozen = Stopped::stop(&w1);
    for i in 0..4 {
        let (s, body) = post(
            api.port,
            "/v1/chat/completions",
            &chat("Say hi", i % 2 == 1),
        );
        assert_eq!(s, 200, "request {i}: {body}");
    }
    drop(frozen);
    let log = api.logs();
    assert!(log.contains("first-byte timeout"), "{log}");
}
