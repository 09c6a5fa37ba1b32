//! Queues and hold-and-wake in the apiserver, end to end: a real controller and apiserver in
//! front of test-double workers with native OpenAI routes (a fixed delay per answer, and
//! optionally a slot count beyond which they answer 503 with `Retry-After`, as our engine
//! does), and a real worker manager with a proxy model for wake-on-request.
//! Managed keys (`dbgpt keys create --priority batch`) give requests their class:
//! interactive ones are served first and batch ones are shed first.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::*;

struct FakeState {
    model: String,
    delay: Duration,
    /// Requests served at once before it answers overloaded; 0 = no limit.
    slots: usize,
    busy: AtomicUsize,
    max_seen: AtomicUsize,
    hits: AtomicUsize,
    refused: AtomicUsize,
}

/// Counts a request as busy on the fake until dropped (also when the caller goes away).
struct BusyGuard(Arc<FakeState>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn native_chat(State(s): State<Arc<FakeState>>) -> Response {
    let now = s.busy.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = BusyGuard(s.clone());
    if s.slots > 0 && now > s.slots {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            axum::Json(json!({"error": {"message": "the model is overloaded", "type": "server_error", "code": "model_overloaded"}})),
        )
            .into_response();
    }
    s.max_seen.fetch_max(now, Ordering::SeqCst);
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    axum::Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": s.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    }))
    .into_response()
}

/// A test-double worker of `model@llm` that registers and heartbeats like a worker manager.
struct Fake {
    s: Arc<FakeState>,
    _rt: tokio::runtime::Runtime,
}

impl Fake {
    fn start(controller: &str, model: &str, delay_ms: u64, slots: usize) -> Fake {
        let s = Arc::new(FakeState {
            model: model.to_string(),
            delay: Duration::from_millis(delay_ms),
            slots,
            busy: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/worker/openai/v1/chat/completions", post(native_chat))
            .with_state(s.clone());
        let (rt, _) = registered_double(controller, 0, app, &format!("{model}@llm"), (1.0, true));
        Fake { s, _rt: rt }
    }

    fn hits(&self) -> usize {
        self.s.hits.load(Ordering::SeqCst)
    }
}

fn controller(env: &TestEnv) -> Daemon {
    env.controller(&[
        "--heartbeat_timeout_secs",
        "2",
        "--heartbeat_interval_secs",
        "1",
    ])
}

fn chat_body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap()
}

/// A chat request through the apiserver: status, `Retry-After`, body, time taken.
fn chat(port: u16, model: &str) -> (u16, Option<String>, Value, Duration) {
    let start = Instant::now();
    let (s, h, b) = raw_http(
        port,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &chat_body(model),
    )
    .expect("no answer");
    let retry = h
        .iter()
        .find(|(k, _)| k == "retry-after")
        .map(|(_, v)| v.clone());
    (
        s,
        retry,
        serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned())),
        start.elapsed(),
    )
}

fn chat_in_thread(
    port: u16,
    model: &str,
) -> std::thread::JoinHandle<(u16, Option<String>, Value, Duration)> {
    let model = model.to_string();
    std::thread::spawn(move || chat(port, &model))
}

/// Waits until `GET /v1/models` lists `model`.
fn wait_listed(port: u16, model: &str, listed: bool) {
    let ok = wait_until(Duration::from_secs(15), || {
        let (_, v) = json_req(port, "GET", "/v1/models", None);
        let has = v["data"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"] == model));
        has == listed
    });
    assert!(ok, "model {model} never became listed={listed}");
}

/// The apiserver's admin status details (`dbgpt ctl status --json`).
fn details(env: &TestEnv) -> Value {
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "apiserver")
        .expect("an apiserver in the status")["details"]
        .clone()
}

/// Waits until `ctl status` shows `n` requests waiting in the apiserver's queues.
fn wait_queued(env: &TestEnv, n: usize) {
    let want = n.to_string();
    assert!(
        wait_until(Duration::from_secs(10), || details(env)["queued"]
            == want.as_str()),
        "never {n} queued: {}",
        details(env)
    );
}

/// Waits until the fake has `n` requests in hand.
fn wait_busy(fake: &Fake, n: usize) {
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .s
            .busy
            .load(Ordering::SeqCst)
            == n),
        "the worker never had {n} requests"
    );
}

/// The value of one series in the apiserver's `/metrics` (0 when absent).
fn metric(port: u16, series: &str) -> f64 {
    let (s, _, b) = raw_http(port, "GET", "/metrics", &[], b"").expect("no answer");
    assert_eq!(s, 200);
    String::from_utf8(b)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn requests_beyond_the_instance_limit_wait_then_succeed() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let fake = Fake::start(&ctl.url(), "m", 2000, 0);
    let api = apiserver(
        &env,
        &ctl.url(),
        &["--max_instance_concurrency", "1", "--queue_timeout", "20"],
    );
    wait_listed(api.port, "m", true);
    let asks: Vec<_> = (0..3).map(|_| chat_in_thread(api.port, "m")).collect();
    // One request on the instance, two waiting in the queue, shown by `ctl status`.
    wait_queued(&env, 2);
    let d = details(&env);
    assert_eq!(d["queued"], "2", "{d}");
    assert_eq!(d["queue"], "m@llm=2", "{d}");
    assert_eq!(
        metric(
            api.port,
            "dbgpt_apiserver_queue_depth{model=\"m\",worker_type=\"llm\"}"
        ),
        2.0
    );
    let mut took: Vec<Duration> = Vec::new();
    for h in asks {
        let (s, _, v, t) = h.join().unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "ok");
        took.push(t);
    }
    took.sort();
    // One after the other: never two on the instance.
    assert_eq!(fake.s.max_seen.load(Ordering::SeqCst), 1);
    assert_eq!(fake.hits(), 3);
    assert!(took[2] >= Duration::from_millis(5900), "{took:?}");
    assert_eq!(details(&env)["queued"], "0");
    assert_eq!(
        metric(
            api.port,
            "dbgpt_apiserver_queue_waits_total{model=\"m\",worker_type=\"llm\"}"
        ),
        2.0
    );
}

#[test]
fn overloaded_instances_queue_requests_instead_of_failing() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    // One slot, and no wait queue of its own: a second request at once is refused as
    // overloaded (503 + Retry-After) by the worker.
    let fake = Fake::start(&ctl.url(), "m", 700, 1);
    let api = apiserver(&env, &ctl.url(), &[]);
    wait_listed(api.port, "m", true);
    let asks: Vec<_> = (0..3).map(|_| chat_in_thread(api.port, "m")).collect();
    for h in asks {
        let (s, _, v, _) = h.join().unwrap();
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(fake.hits(), 3);
    assert!(
        fake.s.refused.load(Ordering::SeqCst) >= 1,
        "the worker refused some as overloaded"
    );
    // Without waiting (--queue_timeout 0) the overloaded answer is the client's.
    let api0 = apiserver(&env, &ctl.url(), &["--queue_timeout", "0"]);
    wait_listed(api0.port, "m", true);
    let first = chat_in_thread(api0.port, "m");
    wait_busy(&fake, 1);
    let (s, retry, v, _) = chat(api0.port, "m");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_overloaded");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(first.join().unwrap().0, 200);
}

#[test]
fn a_full_queue_sheds_and_a_long_wait_expires() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let fake = Fake::start(&ctl.url(), "m", 3000, 0);
    let api = apiserver(
        &env,
        &ctl.url(),
        &[
            "--max_instance_concurrency",
            "1",
            "--max_queue",
            "1",
            "--queue_timeout",
            "1",
        ],
    );
    wait_listed(api.port, "m", true);
    let running = chat_in_thread(api.port, "m");
    wait_busy(&fake, 1);
    let queued = chat_in_thread(api.port, "m");
    wait_queued(&env, 1);
    // The queue holds one: the next is shed at once.
    let (s, retry, v, took) = chat(api.port, "m");
    assert_eq!(s, 503, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(v["error"]["code"], "model_overloaded");
    assert_eq!(v["error"]["type"], "server_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{v}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    // The queued one waits its second, then expires.
    let (s, retry, v, took) = queued.join().unwrap();
    assert_eq!(s, 503, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(v["error"]["code"], "model_overloaded");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("waited"),
        "{v}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(running.join().unwrap().0, 200);
    let series = |name: &str| {
        metric(
            api.port,
            &format!("{name}{{model=\"m\",worker_type=\"llm\"}}"),
        )
    };
    assert_eq!(series("dbgpt_apiserver_queue_shed_total"), 1.0);
    assert_eq!(series("dbgpt_apiserver_queue_expired_total"), 1.0);
}

#[test]
fn a_client_that_goes_away_leaves_the_queue() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let fake = Fake::start(&ctl.url(), "m", 4000, 0);
    let api = apiserver(
        &env,
        &ctl.url(),
        &["--max_instance_concurrency", "1", "--queue_timeout", "20"],
    );
    wait_listed(api.port, "m", true);
    let running = chat_in_thread(api.port, "m");
    wait_busy(&fake, 1);
    let body = chat_body("m");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api.port)).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || details(&env)["queued"] == "1"),
        "the second request never queued"
    );
    drop(s);
    assert!(
        wait_until(Duration::from_secs(3), || details(&env)["queued"] == "0"),
        "the request of a client that went away stayed in the queue"
    );
    assert_eq!(running.join().unwrap().0, 200);
    // Its place was not given a slot: the worker served only the first.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.hits(), 1);
}

#[test]
fn hold_and_wake_waits_for_a_worker_started_late() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    // The periodic refresh is far away: only the refreshes the held request asks for can
    // find the worker.
    let api = apiserver_refreshing(
        &env,
        &ctl.url(),
        "60",
        &["--wake_models", "late", "--queue_timeout", "15"],
    );
    // A model never known is a 404 at once.
    let (s, _, v, took) = chat(api.port, "nope");
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let held = chat_in_thread(api.port, "late");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(details(&env)["queue"], "late@llm=1");
    let started = Instant::now();
    let fake = Fake::start(&ctl.url(), "late", 0, 0);
    let (s, _, v, took) = held.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "ok");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "found {:?} after the worker started",
        started.elapsed()
    );
    assert_eq!(fake.hits(), 1);
}

#[test]
fn hold_expires_as_no_healthy_instance_with_retry_after() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let api = apiserver(
        &env,
        &ctl.url(),
        &["--wake_models", "ghost@llm", "--queue_timeout", "1"],
    );
    let (s, retry, v, took) = chat(api.port, "ghost");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_healthy_instance");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(took >= Duration::from_millis(950), "{took:?}");
}

#[test]
fn wake_on_request_starts_a_stopped_model_and_unloads_it_when_idle() {
    let up = crate::worker::FakeUpstream::start(Duration::from_millis(50));
    let env = TestEnv::new();
    // Default health expiry: the worker heartbeats at its default interval.
    let ctl = env.controller(&[]);
    let cfg = env.path("w.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[models.llms]]\nname = \"sleepy\"\nmodel_type = \"proxy\"\napi_base = \"http://127.0.0.1:{}/v1\"\napi_key = \"sk-test\"\n",
            up.port
        ),
    )
    .unwrap();
    let w = crate::worker::worker(&env, &ctl.url(), &["--config", cfg.to_str().unwrap()]);
    let api = apiserver(
        &env,
        &ctl.url(),
        &[
            "--wake_on_request",
            "--idle_unload_secs",
            "2",
            "--queue_timeout",
            "20",
        ],
    );
    wait_listed(api.port, "sleepy", true);
    // Stopped on its worker (as `dbgpt model stop` does): deregistered, gone from the view.
    let stop = json!({"host": "127.0.0.1", "port": w.port, "model": "sleepy", "worker_type": "llm", "params": {}});
    let (s, v) = json_req(w.port, "POST", "/api/worker/models/shutdown", Some(&stop));
    assert_eq!(s, 200, "{v}");
    wait_listed(api.port, "sleepy", false);
    // A request wakes it on that worker, and is answered once it is up.
    let (s, _, v, _) = chat(api.port, "sleepy");
    assert_eq!(s, 200, "{v}\n{}", api.logs());
    // The test-double upstream answers every call as a stream, which the proxy model
    // passes on: its pieces are the answer.
    assert!(
        v.to_string().contains(r#"\"content\":\" upstream\""#),
        "{v}"
    );
    assert!(
        api.logs().contains("woke a stopped model"),
        "{}",
        api.logs()
    );
    assert_eq!(
        metric(
            api.port,
            "dbgpt_apiserver_model_wakes_total{model=\"sleepy\",worker_type=\"llm\"}"
        ),
        1.0
    );
    // Idle for 2 s: stopped again through the same API.
    let served = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || api
            .logs()
            .contains("stopped an idle woken model")),
        "{}",
        api.logs()
    );
    assert!(
        served.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        served.elapsed()
    );
    wait_listed(api.port, "sleepy", false);
    let (_, sup) = json_req(w.port, "GET", "/api/worker/models/supports", None);
    assert_eq!(sup[0]["models"][0]["model"], "sleepy", "{sup}");
    // And woken again by the next request.
    let (s, _, v, _) = chat(api.port, "sleepy");
    assert_eq!(s, 200, "{v}\n{}\n{}", api.logs(), w.logs());
}

/// `dbgpt keys create --name NAME ARGS… --address URL`: the secret it prints.
fn create_key(env: &TestEnv, url: &str, name: &str, args: &[&str]) -> String {
    let mut all = vec!["keys", "create", "--name", name];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--address", url]);
    let o = env.run(&all);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    stdout(&o)
        .lines()
        .find(|l| l.starts_with("sk-dbgpt-"))
        .unwrap_or_else(|| panic!("no secret printed: {}", stdout(&o)))
        .to_string()
}

/// A chat request with the bearer `key`, from a thread: status, body, when it ended.
fn keyed_chat(port: u16, key: &str) -> std::thread::JoinHandle<(u16, Value, Instant)> {
    let auth = format!("Bearer {key}");
    std::thread::spawn(move || {
        let (s, _, b) = raw_http(
            port,
            "POST",
            "/v1/chat/completions",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            &chat_body("m"),
        )
        .expect("no answer");
        (
            s,
            serde_json::from_slice(&b).unwrap_or(Value::Null),
            Instant::now(),
        )
    })
}

#[test]
fn interactive_keys_go_first_and_batch_keys_are_shed_first() {
    let env = TestEnv::new();
    let ctl = env.controller(&[]);
    let fake = Fake::start(&ctl.url(), "m", 1500, 0);
    let inter = create_key(&env, &ctl.url(), "inter", &[]);
    let bulk = create_key(&env, &ctl.url(), "bulk", &["--priority", "batch"]);
    let api = apiserver(
        &env,
        &ctl.url(),
        &[
            "--max_instance_concurrency",
            "1",
            "--max_queue",
            "2",
            "--queue_timeout",
            "20",
        ],
    );
    // Both keys served (the apiserver has synced them).
    for k in [&inter, &bulk] {
        assert!(
            wait_until(Duration::from_secs(20), || keyed_chat(api.port, k)
                .join()
                .unwrap()
                .0
                == 200),
            "key never served"
        );
    }
    // Order: a batch request that came first waits behind an interactive one that came later.
    let running = keyed_chat(api.port, &inter);
    wait_busy(&fake, 1);
    let batch = keyed_chat(api.port, &bulk);
    wait_queued(&env, 1);
    let interactive = keyed_chat(api.port, &inter);
    let (rs, _, _) = running.join().unwrap();
    let (bs, bv, b_end) = batch.join().unwrap();
    let (is, iv, i_end) = interactive.join().unwrap();
    assert_eq!((rs, bs, is), (200, 200, 200), "{bv} {iv}");
    assert!(i_end < b_end, "the interactive request was served first");
    // Shedding: with the queue full of batch requests, each interactive arrival evicts the
    // newest batch one; a batch arrival finding only interactive ones waiting is shed.
    let before = fake.hits();
    let running = keyed_chat(api.port, &inter);
    wait_busy(&fake, 1);
    let b1 = keyed_chat(api.port, &bulk);
    wait_queued(&env, 1);
    let b2 = keyed_chat(api.port, &bulk);
    wait_queued(&env, 2);
    let i1 = keyed_chat(api.port, &inter);
    let (s, v, evicted_at) = b2.join().unwrap();
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_overloaded");
    wait_queued(&env, 2);
    let i2 = keyed_chat(api.port, &inter);
    let (s, v, _) = b1.join().unwrap();
    assert_eq!(s, 503, "{v}");
    wait_queued(&env, 2);
    let (s, v, shed_at) = keyed_chat(api.port, &bulk).join().unwrap();
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{v}"
    );
    let (rs, _, r_end) = running.join().unwrap();
    assert!(evicted_at < r_end && shed_at < r_end, "shed at once");
    for h in [i1, i2] {
        let (s, v, _) = h.join().unwrap();
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(rs, 200);
    // The worker saw the first and the two interactive ones only.
    assert_eq!(fake.hits() - before, 3);
}

#[test]
fn a_full_model_with_a_fallback_passes_requests_on_at_once() {
    let env = TestEnv::new();
    let ctl = controller(&env);
    let slow = Fake::start(&ctl.url(), "a", 2000, 0);
    let spare = Fake::start(&ctl.url(), "b", 0, 0);
    let api = apiserver(
        &env,
        &ctl.url(),
        &["--max_instance_concurrency", "1", "--fallback", "a=b"],
    );
    wait_listed(api.port, "a", true);
    wait_listed(api.port, "b", true);
    let running = chat_in_thread(api.port, "a");
    wait_busy(&slow, 1);
    // `a` is full: the request goes to `b` without waiting, and the answer says so.
    let start = Instant::now();
    let (s, h, b) = raw_http(
        api.port,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &chat_body("a"),
    )
    .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert!(
        h.iter()
            .any(|(k, v)| k == "x-dbgpt-served-model" && v == "b"),
        "{h:?}"
    );
    assert_eq!(spare.hits(), 1);
    assert_eq!(running.join().unwrap().0, 200);
    assert_eq!(slow.hits(), 1);
}
