//! OTLP trace export, end to end: a test-double OTLP/HTTP receiver decodes what the
//! apiserver and a proxy worker export (protobuf, `opentelemetry-proto`), and one chat
//! request sent with a client `traceparent` must be one trace across the apiserver, the
//! worker and the worker's upstream (which receives the `traceparent` of the worker's
//! upstream call). DB-GPT's span files share the trace id. A malformed `traceparent`
//! starts a new trace; an unreachable endpoint leaves serving unaffected, with one warning.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::{Value, json};

use crate::common::*;

/// One span as the receiver decoded it (ids in lowercase hex, `parent` empty for a root).
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace: String,
    span: String,
    parent: String,
    name: String,
    /// OTLP's SpanKind: 2 server, 3 client.
    kind: i32,
}

/// The test-double collector: `POST /v1/traces` with an OTLP protobuf body.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<Got>>>,
    /// Requests that were not `application/x-protobuf` or did not decode.
    bad: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Collector {
    fn start() -> Self {
        use axum::routing::post;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (s2, b2) = (spans.clone(), bad.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| {
                let (spans, bad) = (s2.clone(), b2.clone());
                async move {
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    if ct != "application/x-protobuf" {
                        bad.lock().unwrap().push(format!("content-type {ct:?}"));
                    }
                    match ExportTraceServiceRequest::decode(body.as_ref()) {
                        Err(e) => bad.lock().unwrap().push(format!("decode: {e}")),
                        Ok(req) => {
                            for rs in req.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| r.attributes.iter())
                                    .find(|kv| kv.key == "service.name")
                                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                                    .map(|v| match v {
                                        any_value::Value::StringValue(s) => s.clone(),
                                        other => format!("{other:?}"),
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for s in ss.spans {
                                        spans.lock().unwrap().push(Got {
                                            service: service.clone(),
                                            trace: hex(&s.trace_id),
                                            span: hex(&s.span_id),
                                            parent: hex(&s.parent_span_id),
                                            name: s.name,
                                            kind: s.kind,
                                        });
                                    }
                                }
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse (full success).
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let (rt, port) = serve(app);
        Collector {
            port,
            spans,
            bad,
            _rt: rt,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn in_trace(&self, trace: &str) -> Vec<Got> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.trace == trace).cloned().collect()
    }
}

/// Serves `app` on a fresh 127.0.0.1 port from its own runtime (kept alive by the caller).
fn serve(app: axum::Router) -> (tokio::runtime::Runtime, u16) {
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, port)
}

/// A test-double OpenAI upstream that records the `traceparent` of each chat request.
struct Upstream {
    port: u16,
    traceparents: Arc<Mutex<Vec<Option<String>>>>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    fn start() -> Self {
        use axum::routing::post;
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let t2 = traceparents.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |headers: HeaderMap| {
                let t = t2.clone();
                async move {
                    t.lock().unwrap().push(
                        headers
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string),
                    );
                    axum::Json(json!({
                        "id": "x", "object": "chat.completion", "created": 0, "model": "up",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from upstream"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
                    }))
                }
            }),
        );
        let (rt, port) = serve(app);
        Upstream {
            port,
            traceparents,
            _rt: rt,
        }
    }
}

fn chat(port: u16, traceparent: Option<&str>) -> (u16, String) {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(t) = traceparent {
        headers.push(("traceparent", t));
    }
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]});
    let (s, _, b) = raw_http(
        port,
        "POST",
        "/v1/chat/completions",
        &headers,
        &serde_json::to_vec(&body).unwrap(),
    )
    .expect("no HTTP answer");
    (s, String::from_utf8_lossy(&b).into_owned())
}

/// A proxy worker for model `gpt` in front of `up`, and an apiserver, both with `extra`.
fn stack(
    env: &TestEnv,
    controller: &str,
    up: u16,
    worker_extra: &[&str],
    api_extra: &[&str],
) -> (Daemon, Daemon) {
    let base = format!("http://127.0.0.1:{up}/v1");
    let mut args = vec![
        "--model_name",
        "gpt",
        "--model_type",
        "proxy",
        "--proxy_api_base",
        &base,
    ];
    args.extend_from_slice(worker_extra);
    let w = crate::worker::worker(env, controller, &args);
    let a = apiserver(env, controller, api_extra);
    assert!(
        wait_until(Duration::from_secs(15), || {
            raw_http(a.port, "GET", "/v1/models", &[], b"")
                .is_some_and(|r| String::from_utf8_lossy(&r.2).contains("\"gpt\""))
        }),
        "the apiserver never saw the worker"
    );
    (w, a)
}

fn ctl_stop(env: &TestEnv, d: &mut Daemon) {
    let out = env.run(&["ctl", "stop", "--port", &d.port.to_string()]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    let status = d
        .wait_exit(Duration::from_secs(15))
        .expect("still running after ctl stop returned");
    assert!(status.success(), "{}", d.logs());
}

fn one<'a>(spans: &'a [Got], what: &str, f: impl Fn(&Got) -> bool) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} in {spans:#?}");
    found[0]
}

#[test]
fn one_chat_request_is_one_trace_across_apiserver_worker_and_upstream() {
    let col = Collector::start();
    let up = Upstream::start();
    let env = TestEnv::new();
    let mut c = env.controller(&[]);
    let otlp = col.url();
    // The apiserver exports every 100 ms; the worker only at its stop (an hour's delay),
    // which checks the flush on shutdown.
    let (mut w, mut a) = stack(
        &env,
        &c.url(),
        up.port,
        &["--otlp_endpoint", &otlp, "--otlp_batch_delay_ms", "3600000"],
        &["--otlp_endpoint", &otlp, "--otlp_batch_delay_ms", "100"],
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let (s, b) = chat(a.port, Some(&format!("00-{trace}-{client_span}-01")));
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("Hello from upstream"), "{b}");

    // The apiserver's spans arrive while it runs.
    assert!(
        wait_until(Duration::from_secs(10), || col.in_trace(trace).len() >= 2),
        "no apiserver spans in the trace: {:#?}",
        col.spans.lock().unwrap()
    );
    assert!(
        col.in_trace(trace)
            .iter()
            .all(|s| s.service == "dbgpt-apiserver"),
        "the worker exported before its stop: {:#?}",
        col.in_trace(trace)
    );
    // A malformed traceparent is ignored: 200, and a new trace.
    let (s, b) = chat(a.port, Some("00-not-a-trace-01"));
    assert_eq!(s, 200, "{b}");
    let n_before_stop = col.spans.lock().unwrap().len();
    ctl_stop(&env, &mut w);
    ctl_stop(&env, &mut a);
    ctl_stop(&env, &mut c);
    assert!(
        col.spans.lock().unwrap().len() > n_before_stop,
        "the worker's stop flushed nothing"
    );
    assert!(
        col.bad.lock().unwrap().is_empty(),
        "{:?}",
        col.bad.lock().unwrap()
    );

    let spans = col.in_trace(trace);
    // apiserver: the request (continuing the client's span) and its call to the worker.
    let api = one(&spans, "apiserver server span", |s| {
        s.service == "dbgpt-apiserver" && s.kind == 2
    });
    assert_eq!(api.name, "POST /v1/chat/completions");
    assert_eq!(api.parent, client_span);
    let call = one(&spans, "worker call", |s| s.name == "worker_call");
    assert_eq!((call.service.as_str(), call.kind), ("dbgpt-apiserver", 3));
    assert_eq!(call.parent, api.span);
    // worker: the request (continuing the worker call), the model call, the upstream call.
    let wreq = one(&spans, "worker server span", |s| {
        s.service == "dbgpt-worker" && s.kind == 2
    });
    assert_eq!(wreq.parent, call.span);
    assert_eq!(wreq.name, "POST /api/worker/openai/v1/chat/completions");
    let generate = one(&spans, "generate span", |s| s.name == "generate");
    assert_eq!(generate.service, "dbgpt-worker");
    assert_eq!(generate.parent, wreq.span);
    let upcall = one(&spans, "upstream call", |s| {
        s.name == "POST chat/completions"
    });
    assert_eq!((upcall.service.as_str(), upcall.kind), ("dbgpt-worker", 3));
    assert_eq!(upcall.parent, generate.span);
    assert_eq!(spans.len(), 5, "{spans:#?}");
    // The upstream was told the worker's upstream call is its parent.
    let tps = up.traceparents.lock().unwrap().clone();
    assert_eq!(tps.len(), 2, "{tps:?}");
    assert_eq!(
        tps[0].as_deref(),
        Some(format!("00-{trace}-{}-01", upcall.span).as_str())
    );

    // The request with the malformed traceparent: a root server span in another trace,
    // whose id the upstream got.
    let all = col.spans.lock().unwrap().clone();
    let fresh = one(&all, "second apiserver request", |s| {
        s.service == "dbgpt-apiserver" && s.name == "POST /v1/chat/completions" && s.trace != trace
    });
    assert!(fresh.parent.is_empty(), "{fresh:?}");
    let t2 = tps[1]
        .as_deref()
        .expect("the second upstream call has a traceparent");
    assert!(
        t2.starts_with(&format!("00-{}-", fresh.trace)),
        "{t2} vs {fresh:?}"
    );

    // DB-GPT's span files go on beside the export, in the same trace.
    let file_spans = |name: &str| -> Vec<Value> {
        std::fs::read_to_string(env.log_dir().join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let api_file = file_spans("dbgpt_model_apiserver_tracer.jsonl");
    assert!(
        api_file.iter().any(|l| l["trace_id"] == trace
            && l["operation_name"] == "dbgpt.model.apiserver.create_chat_completion"),
        "{api_file:#?}"
    );
    let wrk_file = file_spans("dbgpt_model_worker_manager_tracer.jsonl");
    assert!(
        wrk_file.iter().any(|l| l["trace_id"] == trace
            && l["operation_name"] == "WorkerManager.openai_chat_completions"),
        "{wrk_file:#?}"
    );
}

#[test]
fn an_unreachable_endpoint_leaves_serving_unaffected() {
    let up = Upstream::start();
    let env = TestEnv::new();
    let mut c = env.controller(&[]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (mut w, mut a) = stack(
        &env,
        &c.url(),
        up.port,
        &["--otlp_endpoint", &dead, "--otlp_batch_delay_ms", "50"],
        &["--otlp_endpoint", &dead, "--otlp_batch_delay_ms", "50"],
    );
    let warning = "cannot export spans to the OTLP endpoint";
    for i in 0..12 {
        let (s, b) = chat(a.port, None);
        assert_eq!(s, 200, "request {i}: {b}");
        assert!(b.contains("Hello from upstream"), "{b}");
        if i == 5 {
            // Several exports fail meanwhile.
            assert!(
                wait_until(Duration::from_secs(10), || a.logs().contains(warning)
                    && w.logs().contains(warning)),
                "no warning:\n{}\n{}",
                a.logs(),
                w.logs()
            );
        }
    }
    ctl_stop(&env, &mut a);
    ctl_stop(&env, &mut w);
    ctl_stop(&env, &mut c);
    for d in [&a, &w] {
        let logs = d.logs();
        assert_eq!(
            logs.matches(warning).count(),
            1,
            "one warning only:\n{logs}"
        );
        assert!(
            logs.contains("Connection refused") || logs.contains("connect"),
            "{logs}"
        );
    }
}

#[test]
fn a_bad_otlp_endpoint_is_refused_at_start_naming_the_flag() {
    let env = TestEnv::new();
    let out = env.run(&[
        "start",
        "apiserver",
        "--port",
        &free_port().to_string(),
        "--otlp_endpoint",
        "collector:4318",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--otlp_endpoint"), "{}", stderr(&out));
}
