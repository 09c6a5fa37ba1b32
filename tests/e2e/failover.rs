//! Mid-stream failover through the apiserver: a chat stream whose worker is killed (-9) or
//! frozen (SIGSTOP) mid-way goes on on the other instance of the model, and the client sees
//! one stream whose text equals an uninterrupted run's (the real SmolLM2 GGUF, greedy);
//! past the migration bound the stream ends with an error event; a proxy model's stream
//! goes on with an assistant prefill sent to its upstream.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::worker::{gguf, worker};

/// An SSE answer read event by event as it arrives (HTTP/1.1, chunked).
struct Sse {
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
    eof: bool,
}

impl Sse {
    /// POSTs `body` to the apiserver's chat route; panics unless the answer is a 200 stream.
    fn open(port: u16, body: &Value) -> Sse {
        let body = serde_json::to_vec(body).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut chunked = false;
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l.trim().is_empty() {
                break;
            }
            chunked |= l
                .to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked");
        }
        if !status.contains(" 200 ") {
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            panic!("{status}{}", String::from_utf8_lossy(&rest));
        }
        assert!(chunked, "a stream is chunked");
        Sse {
            r,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next event's `data` payload; `None` at the end of the body.
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..p + 2).collect();
                let text = String::from_utf8(ev).unwrap();
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                return Some(data.join("\n"));
            }
            if self.eof {
                assert!(
                    self.buf.iter().all(u8::is_ascii_whitespace),
                    "half an event at the end: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
            let mut size = String::new();
            if self.r.read_line(&mut size).unwrap_or(0) == 0 {
                self.eof = true;
                continue;
            }
            let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if n == 0 {
                self.eof = true;
                continue;
            }
            let mut chunk = vec![0u8; n + 2];
            self.r.read_exact(&mut chunk).unwrap();
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What the client saw of one stream.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    ids: BTreeSet<String>,
    created: BTreeSet<i64>,
    models: BTreeSet<String>,
    roles: usize,
    finishes: Vec<String>,
    usage: Vec<Value>,
    error: Option<Value>,
    done: usize,
    /// Content chunks.
    pieces: usize,
}

/// Reads `sse` to its end; `at(pieces)` runs after each content chunk (once with each
/// count).
fn read(mut sse: Sse, mut at: impl FnMut(usize)) -> Seen {
    let mut s = Seen::default();
    while let Some(data) = sse.next() {
        assert!(s.error.is_none(), "nothing after an error event: {data}");
        if data == "[DONE]" {
            s.done += 1;
            continue;
        }
        assert_eq!(s.done, 0, "nothing after [DONE]: {data}");
        let v: Value = serde_json::from_str(&data).unwrap_or_else(|_| panic!("{data}"));
        if v.get("error").is_some() {
            s.error = Some(v["error"].clone());
            continue;
        }
        s.ids.insert(v["id"].as_str().unwrap().to_string());
        s.created.insert(v["created"].as_i64().unwrap_or(-1));
        s.models.insert(v["model"].as_str().unwrap().to_string());
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let mut u = u.clone();
            // How much of the prompt an instance's prefix cache held depends on which
            // instances served the stream, not on the text: checked apart.
            if let Some(d) = u
                .as_object_mut()
                .and_then(|o| o.remove("prompt_tokens_details"))
            {
                assert!(
                    d["cached_tokens"].as_u64().unwrap() <= u["prompt_tokens"].as_u64().unwrap(),
                    "{u}"
                );
            }
            s.usage.push(u);
        }
        for c in v["choices"].as_array().unwrap() {
            let d = &c["delta"];
            if d.get("role").is_some() {
                s.roles += 1;
            }
            if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
                s.text.push_str(t);
                s.pieces += 1;
                at(s.pieces);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                s.finishes.push(f.to_string());
            }
        }
    }
    s
}

/// One complete, well-formed stream: one id, created and model, one role, one finish,
/// the usage asked for, `[DONE]` once, no error.
fn assert_whole(s: &Seen, api: &Daemon) {
    assert!(s.error.is_none(), "{s:?}\n{}", api.logs());
    assert_eq!(s.done, 1, "{s:?}");
    assert_eq!(
        (s.ids.len(), s.created.len(), s.models.len()),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.roles, 1, "{s:?}");
    assert_eq!(s.finishes.len(), 1, "{s:?}");
    assert_eq!(s.usage.len(), 1, "{s:?}");
}

fn story(max_tokens: u32) -> Value {
    json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": max_tokens,
           "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread in a small village."}]})
}

/// The worker of the two with a request in flight, from `dbgpt ctl status`.
fn serving<'a>(env: &TestEnv, a: &'a mut Daemon, b: &'a mut Daemon) -> &'a mut Daemon {
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let busy: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == "worker" && s["details"]["in_flight"] == "1")
        .filter_map(|s| s["port"].as_u64())
        .collect();
    assert_eq!(busy.len(), 1, "one worker serves the stream: {v}");
    if u64::from(a.port) == busy[0] {
        a
    } else {
        assert_eq!(u64::from(b.port), busy[0], "a worker of this test");
        b
    }
}

/// Waits until the controller lists `n` healthy instances of `key`.
fn instances(c: &Daemon, key: &str, n: usize) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (s, _, b) = raw_http(
                c.port,
                "GET",
                &format!(
                    "/api/controller/models?model_name={}&healthy_only=true",
                    key.replace('@', "%40")
                ),
                &[],
                b"",
            )
            .unwrap();
            s == 200 && serde_json::from_slice::<Vec<Value>>(&b).is_ok_and(|v| v.len() == n)
        }),
        "{n} instances of {key}"
    );
}

/// Resumes a SIGSTOPped process (by pid, one this test started) when dropped.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Two SmolLM2 workers; the worker under a greedy stream is killed with SIGKILL after a
/// few chunks: the client's one stream has the uninterrupted run's text.
#[test]
fn a_killed_workers_stream_goes_on_on_the_other_instance() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let model = ["--model_name", "smollm2", "--model_path", &gguf()];
    let mut w1 = worker(&env, &c.url(), &model);
    let mut w2 = worker(&env, &c.url(), &model);
    instances(&c, "smollm2@llm", 2);
    // Stall timeouts are generous: a loaded machine running a debug build is slow, and a
    // slow worker taken for a stalled one would spend the other instance.
    let api = apiserver(&env, &c.url(), &["--stream_stall_timeout_secs", "30"]);
    let reference = read(Sse::open(api.port, &story(100)), |_| {});
    assert_whole(&reference, &api);
    assert!(
        reference.pieces > 40,
        "the reference streams a while: {reference:?}"
    );

    let sse = Sse::open(api.port, &story(100));
    let mut killed = None;
    let seen = read(sse, |n| {
        if n == 12 {
            let w = serving(&env, &mut w1, &mut w2);
            killed = Some(w.port);
            w.kill9();
        }
    });
    assert!(killed.is_some());
    assert_whole(&seen, &api);
    assert_eq!(
        seen.text, reference.text,
        "the text of an uninterrupted run"
    );
    assert_eq!(seen.finishes, reference.finishes);
    assert_eq!(
        seen.usage, reference.usage,
        "usage as if uninterrupted (the continued text counted as output)"
    );
    let log = api.logs();
    assert!(
        log.contains("continuing a broken stream on another instance"),
        "{log}"
    );
}

/// The stall timeout of the SIGSTOP test: long enough that a slow worker on a loaded
/// machine is not taken for a stalled one.
const STALL: &str = "12";
const STALL_SECS: u64 = 12;

/// A frozen worker (SIGSTOP) is left after the stall timeout and its stream goes on on the
/// other instance; with `--max_stream_migrations 1` a second failure ends the stream with an
/// error event naming the bound.
#[test]
fn a_stalled_workers_stream_goes_on_and_the_bound_ends_it() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let model = ["--model_name", "smollm2", "--model_path", &gguf()];
    let mut w1 = worker(&env, &c.url(), &model);
    let mut w2 = worker(&env, &c.url(), &model);
    instances(&c, "smollm2@llm", 2);
    let api = apiserver(
        &env,
        &c.url(),
        &[
            "--stream_stall_timeout_secs",
            STALL,
            "--max_stream_migrations",
            "1",
        ],
    );
    let reference = read(Sse::open(api.port, &story(80)), |_| {});
    assert_whole(&reference, &api);

    let mut frozen = None;
    let seen = read(Sse::open(api.port, &story(80)), |n| {
        if n == 10 {
            let w = serving(&env, &mut w1, &mut w2);
            frozen = Some(Stopped::stop(w.pid()));
        }
    });
    drop(frozen.take().expect("a worker was frozen"));
    assert_whole(&seen, &api);
    assert_eq!(
        seen.text, reference.text,
        "the text of an uninterrupted run"
    );
    assert!(api.logs().contains("went silent"), "{}", api.logs());

    // Both frozen in turn: one migration, then the bound.
    std::thread::sleep(Duration::from_secs(11)); // any ejection wears off (outlier detection)
    let (p1, p2) = (w1.pid(), w2.pid());
    let mut stops: Vec<Stopped> = Vec::new();
    let mut other = None;
    let mut last = std::time::Instant::now();
    let seen = read(Sse::open(api.port, &story(80)), |n| {
        let gap = last.elapsed();
        last = std::time::Instant::now();
        if n == 5 {
            let w = serving(&env, &mut w1, &mut w2);
            other = Some(if w.pid() == p1 { p2 } else { p1 });
            stops.push(Stopped::stop(w.pid()));
        } else if n > 5 && gap.as_secs() >= STALL_SECS - 2 && stops.len() == 1 {
            // The first text after the stall comes from the continuation: freeze it too.
            stops.push(Stopped::stop(other.unwrap()));
        }
    });
    assert_eq!(stops.len(), 2, "both workers were frozen: {seen:?}");
    drop(stops);
    let e = seen.error.as_ref().expect("an error event ends the stream");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max_stream_migrations")),
        "{e}"
    );
    assert_eq!(seen.done, 0, "a failed stream has no [DONE]");
    assert!(seen.finishes.is_empty());
    assert!(
        reference.text.starts_with(&seen.text) && seen.text.len() > 10,
        "what was sent is the run's beginning, once: {seen:?}"
    );
}

/// The words a test-double upstream streams, one piece each.
const WORDS: &str = "one two three four five six seven eight nine ten eleven twelve";

/// A test-double OpenAI upstream streaming [`WORDS`] slowly, each answer with its own id; a
/// request ending with an assistant message (a prefill) gets the rest after it. Records
/// the requests.
fn prefill_upstream() -> (tokio::runtime::Runtime, u16, Arc<Mutex<Vec<Value>>>) {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let requests = Arc::new(Mutex::new(Vec::new()));
    let r2 = requests.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let r = r2.clone();
            async move {
                let k = {
                    let mut g = r.lock().unwrap();
                    g.push(body.clone());
                    g.len()
                };
                let last = body["messages"].as_array().and_then(|m| m.last()).cloned();
                let prefill = match last {
                    Some(m) if m["role"] == "assistant" => {
                        m["content"].as_str().unwrap_or_default().to_string()
                    }
                    _ => String::new(),
                };
                // "one", " two", " three", …: the rest after the prefill.
                let all: Vec<String> = WORDS
                    .split(' ')
                    .enumerate()
                    .map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") })
                    .collect();
                let mut done = String::new();
                let mut from = 0;
                while from < all.len() && done.len() < prefill.len() {
                    done.push_str(&all[from]);
                    from += 1;
                }
                let pieces: Vec<String> = if done == prefill {
                    all[from..].to_vec()
                } else {
                    vec![format!("<prefill {prefill:?} is not a prefix>")]
                };
                let id = format!("up-{k}");
                let chunk = move |delta: Value, finish: Value| {
                    format!(
                        "data: {}\n\n",
                        json!({"id": id, "object": "chat.completion.chunk", "created": k, "model": "upstream-model",
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                    )
                };
                let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
                events.extend(pieces.iter().map(|p| chunk(json!({"content": p}), Value::Null)));
                events.push(chunk(json!({}), json!("stop")));
                events.push("data: [DONE]\n\n".to_string());
                let body = futures::stream::iter(events).then(|e| async move {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok::<_, std::convert::Infallible>(e)
                });
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(body),
                )
                    .into_response()
            }
        }),
    );
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, port, requests)
}

/// Two proxy workers in front of one upstream: the worker under a stream is killed, the
/// stream goes on through the other, whose upstream request carries the text so far as an
/// assistant prefill (and none of our continuation fields); the client sees one stream.
#[test]
fn a_proxy_models_stream_goes_on_with_an_assistant_prefill() {
    let (_rt, up, requests) = prefill_upstream();
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let cfg = env.path("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[models.llms]]\nname = \"remote\"\nmodel_type = \"proxy\"\napi_base = \"http://127.0.0.1:{up}/v1\"\napi_key = \"sk-test\"\n"
        ),
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut w1 = worker(&env, &c.url(), &args);
    let mut w2 = worker(&env, &c.url(), &args);
    instances(&c, "remote@llm", 2);
    let api = apiserver(&env, &c.url(), &["--stream_stall_timeout_secs", "5"]);
    let ask = json!({"model": "remote", "stream": true,
                     "messages": [{"role": "user", "content": "count"}]});
    let seen = read(Sse::open(api.port, &ask), |n| {
        if n == 3 {
            serving(&env, &mut w1, &mut w2).kill9();
        }
    });
    assert!(seen.error.is_none(), "{seen:?}");
    assert_eq!(seen.text, WORDS);
    assert_eq!(seen.done, 1);
    assert_eq!(seen.roles, 1, "{seen:?}");
    assert_eq!(seen.finishes, ["stop"]);
    assert_eq!(seen.ids.len(), 1, "one id: {seen:?}");
    assert_eq!(seen.created.len(), 1, "{seen:?}");
    let sent = requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let msgs = sent[1]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0], json!({"role": "user", "content": "count"}));
    assert_eq!(msgs[1]["role"], "assistant");
    let prefill = msgs[1]["content"].as_str().unwrap();
    assert!(
        prefill.starts_with("one two three") && WORDS.starts_with(prefill),
        "{prefill:?}"
    );
    for f in [
        "continue_final_message",
        "add_generation_prompt",
        "x_dbgpt_continuation",
    ] {
        assert!(sent[1].get(f).is_none(), "{f} is ours: {}", sent[1]);
    }

    // A stream with tools offered is not continued: it ends with an error event saying so.
    let tools = json!({"model": "remote", "stream": true,
                       "messages": [{"role": "user", "content": "count"}],
                       "tools": [{"type": "function", "function": {"name": "f"}}]});
    let mut killed = false;
    let seen = read(Sse::open(api.port, &tools), |n| {
        if n == 3 {
            serving(&env, &mut w1, &mut w2).kill9();
            killed = true;
        }
    });
    assert!(killed);
    let e = seen.error.expect("an error event");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("'tools'")),
        "{e}"
    );
    assert_eq!(seen.done, 0);
    assert!(WORDS.starts_with(&seen.text) && !seen.text.is_empty());
    assert_eq!(
        requests.lock().unwrap().len(),
        3,
        "no continuation was sent"
    );
}

/// Streams relayed one after another give their connection to the worker back to the
/// apiserver's pool: eight streams reach the worker on one connection. The relay used to drop
/// the worker's body at `[DONE]`, before the chunked body's end, which closed the connection,
/// so every stream paid for a new one (connect, accept, close: about a third more CPU per
/// stream in both daemons).
#[test]
fn relayed_streams_reuse_the_connection_to_the_worker() {
    use axum::extract::{ConnectInfo, State};
    use axum::response::IntoResponse;
    type Peers = Arc<Mutex<BTreeSet<std::net::SocketAddr>>>;
    async fn stream(
        State(peers): State<Peers>,
        ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    ) -> axum::response::Response {
        peers.lock().unwrap().insert(peer);
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "streamer",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let events = vec![
            chunk(json!({"role": "assistant", "content": "one"}), Value::Null),
            chunk(json!({"content": " two"}), Value::Null),
            chunk(json!({}), json!("stop")),
            "data: [DONE]\n\n".to_string(),
        ];
        (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(futures::stream::iter(
                events.into_iter().map(Ok::<_, std::convert::Infallible>),
            )),
        )
            .into_response()
    }
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let peers: Peers = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/worker/openai/v1/chat/completions",
            axum::routing::post(stream),
        )
        .with_state(peers.clone());
    let (_rt, _) = registered_double(&c.url(), 0, app, "streamer@llm", (1.0, true));
    // One serving thread: one pool of connections to the worker.
    let api = apiserver(&env, &c.url(), &["--threads", "1"]);
    let listed = wait_until(Duration::from_secs(15), || {
        let (_, v) = json_req(api.port, "GET", "/v1/models", None);
        v["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"] == "streamer"))
    });
    assert!(listed, "the double's model is never listed");
    let body = json!({"model": "streamer", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    for i in 0..8 {
        let seen = read(Sse::open(api.port, &body), |_| {});
        assert_eq!(
            (seen.text.as_str(), seen.done),
            ("one two", 1),
            "stream {i}"
        );
    }
    let peers = peers.lock().unwrap();
    assert_eq!(
        peers.len(),
        1,
        "8 streams reached the worker on {} connections: {peers:?}",
        peers.len()
    );
}
