//! DB-GPT's tracer files, end to end: the controller's register/deregister spans (and none
//! for heartbeats), one trace from the apiserver into a real proxy worker's file, the
//! flush on `ctl stop`, and `--tracer_file` (a custom name, and "" for off).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Every line of a tracer file, parsed (a malformed line fails the test).
fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A span as its two lines describe it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    op: String,
    metadata: Value,
}

/// Groups lines by span: each span must have exactly a start line (`end_time: null`)
/// followed by an end line with the same fields and an `end_time`. Returns spans in order
/// of their start lines.
fn spans(lines: &[Value]) -> Vec<Span> {
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    let mut order = Vec::new();
    for l in lines {
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "span_type",
                "trace_id",
                "span_id",
                "parent_span_id",
                "operation_name",
                "start_time",
                "end_time",
                "metadata"
            ],
            "{l}"
        );
        assert_eq!(l["span_type"], "base");
        let id = l["span_id"].as_str().unwrap().to_string();
        let trace = l["trace_id"].as_str().unwrap();
        assert_eq!(trace.len(), 32, "{l}");
        assert!(
            id.starts_with(&format!("{trace}:")) && id.len() == 49,
            "{l}"
        );
        let e = by_id.entry(id.clone()).or_default();
        if e.is_empty() {
            order.push(id);
        }
        e.push(l);
    }
    order
        .into_iter()
        .map(|id| {
            let ls = &by_id[&id];
            assert_eq!(
                ls.len(),
                2,
                "span {id} must have a start and an end line: {ls:?}"
            );
            let (s, e) = (ls[0], ls[1]);
            assert!(s["end_time"].is_null(), "{s}");
            let end = e["end_time"].as_str().expect("end line has end_time");
            assert_eq!(end.len(), 23, "YYYY-MM-DD HH:MM:SS.mmm: {end}");
            assert!(end >= s["start_time"].as_str().unwrap());
            for k in [
                "trace_id",
                "parent_span_id",
                "operation_name",
                "start_time",
                "metadata",
            ] {
                assert_eq!(s[k], e[k], "{k} differs between start and end of {id}");
            }
            Span {
                trace_id: s["trace_id"].as_str().unwrap().into(),
                span_id: id,
                parent: s["parent_span_id"].as_str().map(str::to_string),
                op: s["operation_name"].as_str().unwrap().into(),
                metadata: s["metadata"].clone(),
            }
        })
        .collect()
}

fn ctl_stop(env: &TestEnv, d: &mut Daemon) {
    let out = env.run(&["ctl", "stop", "--port", &d.port.to_string()]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("still running after ctl stop returned");
    assert!(status.success(), "{}", d.logs());
}

#[test]
fn controller_spans_for_register_and_deregister_none_for_heartbeats() {
    let env = TestEnv::new();
    let mut c = env.controller(&[]);
    let body = instance("m@llm", 9001);
    assert_eq!(
        json_req(c.port, "POST", "/api/controller/models", Some(&body)).0,
        200
    );
    for _ in 0..5 {
        assert_eq!(
            json_req(c.port, "POST", "/api/controller/heartbeat", Some(&body)).0,
            200
        );
        assert_eq!(http_get_status(c.port, "/api/health"), Some(200));
        // The apiserver's periodic instance-list poll is marked and not traced either.
        let (s, _, _) = raw_http(
            c.port,
            "GET",
            "/api/controller/models?healthy_only=false",
            &[("dbgpt-poll", "1")],
            b"",
        )
        .unwrap();
        assert_eq!(s, 200);
    }
    // A caller's span continues: DB-GPT's header names the parent.
    let parent = "0123456789abcdef0123456789abcdef:00000000000000aa";
    let (s, _, _) = raw_http(
        c.port,
        "GET",
        "/api/controller/models?model_name=m%40llm",
        &[("DB-GPT-Trace-Span-Id", parent)],
        b"",
    )
    .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        json_req(
            c.port,
            "DELETE",
            "/api/controller/models?model_name=m%40llm&host=127.0.0.1&port=9001",
            None
        )
        .0,
        200
    );
    // The last request's lines are still buffered (the writer waits 1 s or 256 lines):
    // the stop must flush them.
    assert_eq!(http_get_status(c.port, "/api/controller/models"), Some(200));
    ctl_stop(&env, &mut c);

    let file = env.log_dir().join("dbgpt_model_controller_tracer.jsonl");
    let sp = spans(&read_lines(&file));
    let ops: Vec<&str> = sp.iter().map(|s| s.op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "DB-GPT-ModelController",
            "dbgpt.model.controller.register_instance",
            "DB-GPT-ModelController",
            "DB-GPT-ModelController",
            "dbgpt.model.controller.deregister_instance",
            "DB-GPT-ModelController",
        ],
        "one root per request except heartbeats, health checks and polls: {sp:#?}"
    );
    for root in sp.iter().filter(|s| s.op == "DB-GPT-ModelController") {
        assert_eq!(root.metadata, json!({"path": "/api/controller/models"}));
    }
    let (reg_root, reg, listing, dereg_root, dereg, last) =
        (&sp[0], &sp[1], &sp[2], &sp[3], &sp[4], &sp[5]);
    assert_eq!(reg_root.parent, None);
    assert_eq!(reg.parent.as_deref(), Some(reg_root.span_id.as_str()));
    assert_eq!(reg.trace_id, reg_root.trace_id);
    assert_eq!(
        reg.metadata,
        json!({"model_name": "m@llm", "host": "127.0.0.1", "port": 9001, "weight": 1.0, "check_healthy": true, "enabled": true})
    );
    assert_eq!(listing.parent.as_deref(), Some(parent));
    assert_eq!(listing.trace_id, "0123456789abcdef0123456789abcdef");
    assert_ne!(
        dereg_root.trace_id, reg_root.trace_id,
        "a new trace per request"
    );
    assert_eq!(dereg.parent.as_deref(), Some(dereg_root.span_id.as_str()));
    assert_eq!(dereg.metadata["model_name"], "m@llm");
    assert_eq!(dereg.metadata["port"], 9001);
    assert_eq!(last.parent, None);

    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o007, 0, "no access for others: {mode:o}");
}

/// Starts a controller with `args`, registers one instance and stops it (`ctl stop`, which
/// flushes the tracer file).
fn register_one_and_stop(env: &TestEnv, args: &[&str]) {
    let mut c = env.controller(args);
    assert_eq!(
        json_req(
            c.port,
            "POST",
            "/api/controller/models",
            Some(&instance("a@llm", 1))
        )
        .0,
        200
    );
    ctl_stop(env, &mut c);
}

#[test]
fn tracer_file_option_names_the_file_or_turns_tracing_off() {
    // A bare name goes into the log directory.
    let env = TestEnv::new();
    register_one_and_stop(&env, &["--tracer_file", "mine.jsonl"]);
    assert_eq!(read_lines(&env.log_dir().join("mine.jsonl")).len(), 4);
    assert!(
        !env.log_dir()
            .join("dbgpt_model_controller_tracer.jsonl")
            .exists()
    );

    // "" turns it off: no file at all.
    let env = TestEnv::new();
    register_one_and_stop(&env, &["--tracer_file", ""]);
    let jsonl: Vec<_> = std::fs::read_dir(env.log_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert!(jsonl.is_empty(), "{jsonl:?}");

    // DB-GPT 0.7's [trace] table in a config file.
    let env = TestEnv::new();
    let cfg = env.path("c.toml");
    let path = env.path("elsewhere/t.jsonl");
    std::fs::write(
        &cfg,
        format!(
            "[service.model.controller]\nheartbeat_timeout_secs = 60\n\n[trace]\nfile = \"{}\"\nroot_operation_name = \"MyController\"\n",
            path.display()
        ),
    )
    .unwrap();
    let mut c = env.controller(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(http_get_status(c.port, "/api/controller/models"), Some(200));
    ctl_stop(&env, &mut c);
    let sp = spans(&read_lines(&path));
    assert_eq!(sp.len(), 1);
    assert_eq!(sp[0].op, "MyController");
}

fn post(port: u16, path: &str, body: &Value) -> (u16, Vec<u8>) {
    let (s, _, b) = raw_http(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(body).unwrap(),
    )
    .expect("no HTTP answer");
    (s, b)
}

#[test]
fn one_trace_from_the_apiserver_into_the_worker() {
    let up = crate::worker::FakeUpstream::start(Duration::ZERO);
    let env = TestEnv::new();
    let mut c = env.controller(&[]);
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    let mut w = crate::worker::worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "gpt",
            "--model_type",
            "proxy",
            "--proxy_api_base",
            &base,
            "--proxy_api_key",
            "sk-test",
        ],
    );
    let mut a = apiserver(&env, &c.url(), &[]);
    assert!(
        wait_until(Duration::from_secs(15), || {
            raw_http(a.port, "GET", "/api/v1/models", &[], b"")
                .is_some_and(|r| String::from_utf8_lossy(&r.2).contains("\"gpt\""))
        }),
        "the apiserver never saw the worker"
    );
    let chat = |stream: bool| json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "stream": stream});
    let (s, b) = post(a.port, "/api/v1/chat/completions", &chat(true));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("[DONE]"));
    let (s, b) = post(a.port, "/api/v1/chat/completions", &chat(false));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    // Outside /api: no root span, but the operation span is still written (a new trace).
    let (s, _) = post(a.port, "/v1/chat/completions", &chat(false));
    assert_eq!(s, 200);
    ctl_stop(&env, &mut a);
    ctl_stop(&env, &mut w);
    ctl_stop(&env, &mut c);

    let api = spans(&read_lines(
        &env.log_dir().join("dbgpt_model_apiserver_tracer.jsonl"),
    ));
    let wrk = spans(&read_lines(
        &env.log_dir()
            .join("dbgpt_model_worker_manager_tracer.jsonl"),
    ));
    let ops = |v: &[Span]| v.iter().map(|s| s.op.clone()).collect::<Vec<_>>();
    // Model listings are traced too (they are /api requests); keep the chat spans.
    let api_chat: Vec<&Span> = api
        .iter()
        .filter(|s| {
            s.op == "dbgpt.model.apiserver.create_chat_completion"
                || s.metadata["path"] == "/api/v1/chat/completions"
        })
        .collect();
    assert_eq!(api_chat.len(), 5, "{:#?}", ops(&api));
    let creates: Vec<&&Span> = api_chat
        .iter()
        .filter(|s| s.op == "dbgpt.model.apiserver.create_chat_completion")
        .collect();
    assert_eq!(creates.len(), 3);
    for (i, create) in creates.iter().enumerate() {
        assert_eq!(create.metadata, json!({"model": "gpt", "temperature": 0.5}));
        if i < 2 {
            // Under the /api request's root span.
            let root = api_chat
                .iter()
                .find(|s| Some(&s.span_id) == create.parent.as_ref())
                .expect("parent is the root span");
            assert_eq!(root.op, "DB-GPT-APIServer");
            assert_eq!(root.parent, None);
        } else {
            assert_eq!(create.parent, None, "/v1 has no root span");
        }
        // The worker continued the trace: its root's parent is this span.
        let wroot = wrk
            .iter()
            .find(|s| s.parent.as_ref() == Some(&create.span_id))
            .unwrap_or_else(|| panic!("no worker span continues {create:?}: {:#?}", ops(&wrk)));
        assert_eq!(wroot.op, "DB-GPT-ModelWorker");
        assert_eq!(wroot.trace_id, create.trace_id);
        // Our worker takes the request on its native OpenAI route, streamed or not.
        assert_eq!(
            wroot.metadata,
            json!({"path": "/api/worker/openai/v1/chat/completions"})
        );
        let op = wrk
            .iter()
            .find(|s| s.parent.as_ref() == Some(&wroot.span_id))
            .expect("a WorkerManager span under the worker's root");
        assert_eq!(op.op, "WorkerManager.openai_chat_completions");
        assert_eq!(op.trace_id, create.trace_id);
        assert!(op.metadata.is_null());
    }
}
