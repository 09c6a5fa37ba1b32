//! The llama.cpp engine through the real binary (SmolLM2 GGUF): continuous batching gives
//! every concurrent greedy request the answer it gets alone, the prefix cache reports
//! `cached_tokens` without changing answers, a full model answers 503 with `Retry-After`
//! (the apiserver tries another instance, and answers the same when there is none), a
//! dropped stream frees its slot (seen in `ctl status`), and a prompt longer than a slot's
//! window is a 400 naming the limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::worker::{gguf, worker};

/// A llama.cpp worker of SmolLM2 with `extra` flags.
fn llama_worker(env: &TestEnv, controller: &str, extra: &[&str]) -> Daemon {
    let gguf = gguf();
    let mut args = vec![
        "--model_name",
        "smollm2",
        "--model_path",
        &gguf,
        "--n_threads",
        "2",
    ];
    args.extend_from_slice(extra);
    worker(env, controller, &args)
}

/// Waits until the apiserver lists `n` instances' worth of the model.
fn wait_listed(api: u16) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (_, v) = json_req(api, "GET", "/v1/models", None);
            v.to_string().contains("\"smollm2\"")
        }),
        "the apiserver never listed smollm2"
    );
}

fn chat(q: &str, max_tokens: u32) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": q}],
           "temperature": 0, "max_tokens": max_tokens})
}

/// POST `body` to `path`: (status, headers, JSON body).
fn post(port: u16, path: &str, body: &Value) -> (u16, Vec<(String, String)>, Value) {
    let (s, h, b) = raw_http(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(body).unwrap(),
    )
    .expect("no HTTP answer");
    (s, h, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Opens a long streamed generation on the worker's native route and returns the connection
/// once its first event arrived (dropping it cancels the generation).
fn open_long_stream(port: u16) -> TcpStream {
    let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 900,
        "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}]})
    .to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /api/worker/openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"content\":\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// The worker's engine line of `ctl status --json`.
fn engine_status(env: &TestEnv, port: u16) -> String {
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "worker" && s["port"] == port)
        .and_then(|s| s["details"]["engine smollm2@llm"].as_str())
        .unwrap_or_else(|| panic!("no engine status for port {port}: {v}"))
        .to_string()
}

#[test]
fn concurrent_greedy_chats_answer_as_alone_and_the_prefix_cache_reports_cached_tokens() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let w = llama_worker(
        &env,
        &c.url(),
        &["--parallel", "4", "--context_length", "1024"],
    );
    let api = apiserver(&env, &c.url(), &[]);
    wait_listed(api.port);
    let questions = [
        "Name three colours.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Who wrote Hamlet?",
    ];
    let answer = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let alone: Vec<String> = questions
        .iter()
        .map(|q| {
            let (s, _, v) = post(api.port, "/v1/chat/completions", &chat(q, 32));
            assert_eq!(s, 200, "{v}");
            answer(&v)
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = questions
            .iter()
            .map(|q| sc.spawn(move || post(api.port, "/v1/chat/completions", &chat(q, 32)).2))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((q, a), t) in questions.iter().zip(&alone).zip(&together) {
        assert_eq!(&answer(t), a, "{q}: {t}");
    }

    // A shared system prompt: the second request reads it from the cache.
    let system = "You are a helpful assistant who answers briefly and politely. ".repeat(10);
    let with_system = |q: &str| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 24, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q}]})
    };
    let (_, _, first) = post(
        api.port,
        "/v1/chat/completions",
        &with_system("Name a fruit."),
    );
    let (_, _, again) = post(
        api.port,
        "/v1/chat/completions",
        &with_system("Name a fruit."),
    );
    assert_eq!(answer(&again), answer(&first));
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(cached, prompt - 1, "{}", again["usage"]);
    // Streamed with usage, another question after the same system prompt.
    let mut body = with_system("Name a river.");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (s, _, raw) = raw_http(
        w.port,
        "POST",
        "/api/worker/openai/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(&body).unwrap(),
    )
    .unwrap();
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&raw);
    let usage: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk: {text}"));
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached > 100 && cached < usage["prompt_tokens"].as_u64().unwrap(),
        "{usage}"
    );
    let st = engine_status(&env, w.port);
    assert!(
        st.contains("slots 0/4 busy") && st.contains("queued 0/32"),
        "{st}"
    );
}

#[test]
fn a_full_model_is_overloaded_and_a_dropped_stream_frees_its_slot() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let w = llama_worker(
        &env,
        &c.url(),
        &[
            "--parallel",
            "1",
            "--max_queue",
            "0",
            "--context_length",
            "512",
        ],
    );
    // Overloaded answers reach the client at once instead of waiting in the queue.
    let api = apiserver(&env, &c.url(), &["--queue_timeout", "0"]);
    wait_listed(api.port);

    // Too long for a slot: a 400 naming the limit, from the worker and through the apiserver.
    let long = chat(&"hello world ".repeat(400), 8);
    for (port, path) in [
        (w.port, "/api/worker/openai/v1/chat/completions"),
        (api.port, "/v1/chat/completions"),
    ] {
        let (s, _, v) = post(port, path, &long);
        assert_eq!(s, 400, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("context window is 512 tokens"), "{msg}");
    }

    let running = open_long_stream(w.port);
    let st = engine_status(&env, w.port);
    assert!(st.contains("slots 1/1 busy"), "{st}");
    // The only slot is taken and no request may wait: 503 with Retry-After, from the
    // worker and through the apiserver (no other instance to try).
    for (port, path) in [
        (w.port, "/api/worker/openai/v1/chat/completions"),
        (api.port, "/v1/chat/completions"),
    ] {
        let (s, h, v) = post(port, path, &chat("Hi", 4));
        assert_eq!(s, 503, "{path}: {v}");
        assert_eq!(header(&h, "retry-after"), Some("1"), "{path}: {h:?}");
        assert_eq!(v["error"]["code"], "model_overloaded", "{path}: {v}");
    }
    // DB-GPT's worker routes say the same in their own shape, with the same Retry-After.
    let ask = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]});
    for path in ["/api/worker/generate_stream", "/api/worker/generate"] {
        let (s, h, v) = post(w.port, path, &ask);
        assert_eq!(s, 503, "{path}: {v}");
        assert_eq!(header(&h, "retry-after"), Some("1"), "{path}: {h:?}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("sequence slots are busy"), "{path}: {v}");
    }

    // A second instance: the apiserver tries it when the first is full.
    let w2 = llama_worker(
        &env,
        &c.url(),
        &[
            "--parallel",
            "1",
            "--max_queue",
            "0",
            "--context_length",
            "512",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (s, _, _) = post(api.port, "/v1/chat/completions", &chat("Hi", 4));
            s == 200
        }),
        "the apiserver never used the second instance"
    );
    for _ in 0..4 {
        let (s, _, v) = post(api.port, "/v1/chat/completions", &chat("Hi", 4));
        assert_eq!(s, 200, "{v}");
    }
    drop(w2);

    // The client goes away: its slot is free at once.
    drop(running);
    assert!(
        wait_until(Duration::from_secs(5), || engine_status(&env, w.port)
            .contains("slots 0/1 busy")),
        "{}",
        engine_status(&env, w.port)
    );
    let (s, _, v) = post(
        w.port,
        "/api/worker/openai/v1/chat/completions",
        &chat("Hi", 4),
    );
    assert_eq!(s, 200, "{v}");
}
