//! The modern OpenAI surface through the whole cluster (issue 14): a proxy worker passes the
//! client's request to its upstream byte for byte (only `model` becomes the upstream's name)
//! and the upstream's answer (tool calls, log-probabilities, usage, fingerprint) back to the
//! client unchanged; a DB-GPT-style worker without the native routes gets the 0.5 surface.

use std::sync::{Arc, Mutex};

use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::common::*;
use crate::worker::worker;

/// What the recording upstream received: (path, body bytes).
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// The upstream's non-stream answer: a tool call with log-probabilities and extras a fixed
/// struct would drop.
const WHOLE: &str = r#"{"id":"chatcmpl-up1","object":"chat.completion","created":1765000000,"model":"upstream-model-2026","system_fingerprint":"fp_abc123","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_9","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}],"refusal":null},"logprobs":{"content":[{"token":"{","logprob":-0.01,"bytes":[123],"top_logprobs":[{"token":"{","logprob":-0.01,"bytes":[123]}]}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":31,"completion_tokens":9,"total_tokens":40,"prompt_tokens_details":{"cached_tokens":0}},"x_vendor_extra":[1,2.50]}"#;

/// The upstream's streamed answer: a tool call in fragments, then usage.
const STREAM: &[&str] = &[
    r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"upstream-model-2026","system_fingerprint":"fp_s","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]}"#,
    r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"upstream-model-2026","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}]}"#,
    r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"upstream-model-2026","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]},"finish_reason":null}]}"#,
    r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"upstream-model-2026","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
    r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"upstream-model-2026","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":9,"total_tokens":40}}"#,
];

fn sse(chunks: &[&str]) -> String {
    let mut s: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    s.push_str("data: [DONE]\n\n");
    s
}

/// A test-double OpenAI upstream that records every request's path and exact bytes, and
/// answers chat with [`WHOLE`] or [`STREAM`] (as the body's `stream` asks), embeddings with a
/// fixed list, and a 400 OpenAI error for the model name `reject`.
struct RecordingUpstream {
    port: u16,
    received: Received,
    _rt: tokio::runtime::Runtime,
}

impl RecordingUpstream {
    fn start() -> Self {
        use axum::routing::post;
        let received: Received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let handler = move |uri: axum::http::Uri, body: Bytes| {
            let rec = rec.clone();
            async move {
                rec.lock()
                    .unwrap()
                    .push((uri.path().to_string(), body.clone()));
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v["model"] == "reject" {
                    let err = r#"{"error":{"message":"Invalid schema for function 'f': 3 is not of type 'object'","type":"invalid_request_error","param":"tools[0].function.parameters","code":"invalid_function_parameters"}}"#;
                    return (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "application/json")],
                        err,
                    )
                        .into_response();
                }
                if uri.path().ends_with("/embeddings") {
                    let e = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":"AACAPwAAAEA="}],"model":"emb-up","usage":{"prompt_tokens":2,"total_tokens":2}}"#;
                    return ([("content-type", "application/json")], e).into_response();
                }
                if v["stream"] == true {
                    ([("content-type", "text/event-stream")], sse(STREAM)).into_response()
                } else {
                    ([("content-type", "application/json")], WHOLE).into_response()
                }
            }
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(handler.clone()))
            .route("/v1/completions", post(handler.clone()))
            .route("/v1/embeddings", post(handler));
        let rt = runtime(1);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        RecordingUpstream {
            port,
            received,
            _rt: rt,
        }
    }

    fn last(&self) -> (String, Bytes) {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream got no request")
    }
}

fn post(port: u16, path: &str, body: &[u8]) -> RawResponse {
    raw_http(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .expect("no HTTP answer")
}

fn header<'a>(r: &'a RawResponse, name: &str) -> Option<&'a str> {
    r.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn proxy_models_pass_every_field_through_both_ways() {
    let up = RecordingUpstream::start();
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    let cfg = env.path("w.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[models.llms]]\nname = \"gpt-4o\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"upstream-model\"\n\n\
             [[models.llms]]\nname = \"reject\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\n\n\
             [[models.embeddings]]\nname = \"emb\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"emb-up\"\n"
        ),
    )
    .unwrap();
    let _w = worker(&env, &c.url(), &["--config", cfg.to_str().unwrap()]);
    let api = apiserver(&env, &c.url(), &[]);
    assert!(
        wait_until(std::time::Duration::from_secs(20), || {
            json_req(api.port, "GET", "/v1/models", None).1["data"]
                .as_array()
                .is_some_and(|d| d.len() == 3)
        }),
        "the three models never showed up"
    );

    // Every field the client sent reaches the upstream, byte for byte: tools, tool_choice,
    // response_format, logprobs, n, image parts, a tool turn, vendor extras, odd spacing and
    // number spellings. Only `model` is the upstream's name.
    let sent = r#"{"messages":[{"role":"system","content":"be terse"},{"role":"user","content":[{"type":"text","text":"weather?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"call_0","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},{"role":"tool","tool_call_id":"call_0","content":"-3C"}],  "model" : "gpt-4o", "tools":[{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]},"strict":true}}],"tool_choice":{"type":"function","function":{"name":"get_weather"}},"parallel_tool_calls":false,"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object"},"strict":true}},"logprobs":true,"top_logprobs":3,"n":1,"temperature":0.70,"seed":42,"user":"u-1","metadata":{"k":"v"},"x_vendor":{"deep":[1,{"a":null}]},"max_completion_tokens":64}"#;
    let r = post(api.port, "/v1/chat/completions", sent.as_bytes());
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    let (path, got) = up.last();
    assert_eq!(path, "/v1/chat/completions");
    let expected = sent.replace(r#""model" : "gpt-4o""#, r#""model" : "upstream-model""#);
    assert_eq!(
        String::from_utf8_lossy(&got),
        expected,
        "the upstream got other bytes than the client sent"
    );
    // ... and its answer comes back unchanged, byte for byte.
    assert_eq!(String::from_utf8_lossy(&r.2), WHOLE);
    assert_eq!(header(&r, "content-type"), Some("application/json"));

    // Streamed: the tool-call fragments and the usage chunk arrive as the upstream sent them.
    let sent = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"weather in Paris?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],"tool_choice":"required"}"#;
    let r = post(api.port, "/api/v1/chat/completions", sent.as_bytes());
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    assert_eq!(String::from_utf8_lossy(&r.2), sse(STREAM));
    assert!(
        header(&r, "content-type").is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        r.1
    );
    let (_, got) = up.last();
    assert_eq!(
        String::from_utf8_lossy(&got),
        sent.replace(r#""model":"gpt-4o""#, r#""model":"upstream-model""#)
    );

    // The upstream's 400 comes back as it said it (param and code included), not retried.
    let before = up.received.lock().unwrap().len();
    let sent = r#"{"model":"reject","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":3}}]}"#;
    let r = post(api.port, "/v1/chat/completions", sent.as_bytes());
    assert_eq!(r.0, 400);
    let err: Value = serde_json::from_slice(&r.2).unwrap();
    assert_eq!(
        err["error"]["param"], "tools[0].function.parameters",
        "{err}"
    );
    assert_eq!(err["error"]["code"], "invalid_function_parameters");
    assert_eq!(
        up.received.lock().unwrap().len(),
        before + 1,
        "a 400 is not retried"
    );

    // Text completions and embeddings take the same way.
    let sent = r#"{"model":"gpt-4o","prompt":"Say hi","logprobs":2,"echo":false,"suffix":"!"}"#;
    let r = post(api.port, "/v1/completions", sent.as_bytes());
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    let (path, got) = up.last();
    assert_eq!(path, "/v1/completions");
    assert_eq!(
        String::from_utf8_lossy(&got),
        sent.replace(r#""model":"gpt-4o""#, r#""model":"upstream-model""#)
    );
    let sent = r#"{"model":"emb","input":"hi","encoding_format":"base64","dimensions":2}"#;
    let r = post(api.port, "/v1/embeddings", sent.as_bytes());
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    let (path, got) = up.last();
    assert_eq!(path, "/v1/embeddings");
    assert_eq!(
        String::from_utf8_lossy(&got),
        sent.replace(r#""model":"emb""#, r#""model":"emb-up""#)
    );
    let v: Value = serde_json::from_slice(&r.2).unwrap();
    assert_eq!(v["data"][0]["embedding"], "AACAPwAAAEA=");
    assert_eq!(v["usage"]["prompt_tokens"], 2);

    // /v1/responses becomes a chat request upstream; the tool call comes back as a
    // function_call output item, whole and streamed.
    let sent = json!({"model": "gpt-4o", "instructions": "be terse", "input": "weather in Paris?",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": "required", "max_output_tokens": 50});
    let r = post(
        api.port,
        "/v1/responses",
        &serde_json::to_vec(&sent).unwrap(),
    );
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    let (path, got) = up.last();
    assert_eq!(path, "/v1/chat/completions");
    let chat: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(chat["model"], "upstream-model");
    assert_eq!(
        chat["messages"][0],
        json!({"role": "system", "content": "be terse"})
    );
    assert_eq!(chat["messages"][1]["role"], "user");
    assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(chat["tool_choice"], "required");
    assert_eq!(chat["max_completion_tokens"], 50);
    let v: Value = serde_json::from_slice(&r.2).unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    let call = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "function_call")
        .unwrap_or_else(|| panic!("no function_call item: {v}"));
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(v["usage"]["input_tokens"], 31);
    let mut streamed = sent.clone();
    streamed["stream"] = json!(true);
    let r = post(
        api.port,
        "/v1/responses",
        &serde_json::to_vec(&streamed).unwrap(),
    );
    assert_eq!(r.0, 200);
    let text = String::from_utf8_lossy(&r.2);
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"), "{text}");
    assert_eq!(kinds.last(), Some(&"response.completed"), "{text}");
    assert!(
        kinds.contains(&"response.function_call_arguments.done"),
        "{text}"
    );
    assert!(
        text.contains(r#""arguments":"{\"city\":\"Paris\"}""#),
        "{text}"
    );
}

/// A worker without the native routes (DB-GPT's own, played by a test double that answers
/// them with FastAPI's 404): plain chat takes DB-GPT's API; tools are a 400 naming the field.
#[test]
fn dbgpt_workers_get_plain_chat_and_a_clear_400_for_the_rest() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let (_rt, port) = dbgpt_style_worker();
    let (s, _) = json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("legacy-llm@llm", port)),
    );
    assert_eq!(s, 200);
    let api = apiserver(&env, &c.url(), &[]);
    let plain = json!({"model": "legacy-llm", "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = json_req(api.port, "POST", "/v1/chat/completions", Some(&plain));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "legacy answer");
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"logprobs": true}), "logprobs"),
    ] {
        let mut body = plain.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, v) = json_req(api.port, "POST", "/v1/chat/completions", Some(&body));
        assert_eq!((s, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
    }
    let (s, v) = json_req(
        api.port,
        "POST",
        "/v1/chat/completions",
        Some(
            &json!({"model": "legacy-llm", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "1"}]}),
        ),
    );
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("messages[1].role")),
        "{v}"
    );
}

/// A DB-GPT-like worker: `generate` answers one frame; every other path is FastAPI's 404.
fn dbgpt_style_worker() -> (tokio::runtime::Runtime, u16) {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/api/worker/generate",
            post(|| async {
                axum::Json(json!({"text": "legacy answer", "error_code": 0, "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}))
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(json!({"detail": "Not Found"})),
            )
        });
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, port)
}
