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
                if v["model"] == "slow-up" {
                    // A long non-stream generation: the head comes with the whole answer.
                    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
                }
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
             [[models.llms]]\nname = \"slow\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"slow-up\"\n\n\
             [[models.embeddings]]\nname = \"emb\"\nmodel_type = \"proxy\"\napi_base = \"{base}\"\nbackend = \"emb-up\"\n"
        ),
    )
    .unwrap();
    let w = worker(&env, &c.url(), &["--config", cfg.to_str().unwrap()]);
    // The worker says what its native route takes for this model.
    let (_, meta) = json_req(
        w.port,
        "POST",
        "/api/worker/model_metadata",
        Some(&json!({"model": "gpt-4o"})),
    );
    assert_eq!(
        meta["ext_metadata"]["openai_capabilities"],
        json!(["passthrough"]),
        "{meta}"
    );
    let api = apiserver(&env, &c.url(), &[]);
    assert!(
        wait_until(std::time::Duration::from_secs(20), || {
            json_req(api.port, "GET", "/v1/models", None).1["data"]
                .as_array()
                .is_some_and(|d| d.len() == 4)
        }),
        "the four models never showed up"
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

    // A non-stream answer that takes longer than the apiserver's first-byte timeout: the
    // worker sends its headers first, so it is not taken for a frozen worker.
    let patient = apiserver(&env, &c.url(), &["--first_byte_timeout_secs", "2"]);
    assert!(wait_until(std::time::Duration::from_secs(20), || {
        json_req(patient.port, "GET", "/v1/models", None).1["data"]
            .as_array()
            .is_some_and(|d| d.len() == 4)
    }));
    let sent = r#"{"model":"slow","messages":[{"role":"user","content":"take your time"}]}"#;
    let r = post(patient.port, "/v1/chat/completions", sent.as_bytes());
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    assert_eq!(String::from_utf8_lossy(&r.2), WHOLE);
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

/// The real SmolLM2 GGUF behind the whole cluster: tools forced by a grammar (the model's
/// own template cannot describe them), structured output, log-probabilities, `n`, the
/// usage chunk, content parts, and the 400s for what a local model cannot take. The model
/// is tiny: shapes and constraints are checked, not wisdom.
#[test]
fn local_model_tools_structured_output_and_logprobs_end_to_end() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let _w = worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "smollm2",
            "--model_path",
            &crate::worker::gguf(),
        ],
    );
    let api = apiserver(&env, &c.url(), &[]);
    assert!(wait_until(std::time::Duration::from_secs(20), || {
        json_req(api.port, "GET", "/v1/models", None).1["data"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    }));
    let chat = |body: Value| {
        let r = post(
            api.port,
            "/v1/chat/completions",
            &serde_json::to_vec(&body).unwrap(),
        );
        (r.0, r.2)
    };
    let weather = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"]}}}]);
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);

    // A named tool choice: the call is forced, its arguments parse and fit the schema.
    let (s, b) = chat(
        json!({"model": "smollm2", "messages": ask, "tools": weather,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 150, "temperature": 0}),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().is_some_and(|i| !i.is_empty()));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .expect("the arguments are a JSON string");
    assert!(args["city"].is_string(), "{args}");
    assert!(
        ["c", "f"].contains(&args["unit"].as_str().unwrap()),
        "{args}"
    );
    let first_call = choice["message"].clone();

    // Streamed, with `required` and one call at most (with parallel calls allowed, greedy
    // SmolLM2 repeats the call until max_tokens): tool-call fragments, one finish, a usage
    // chunk.
    let (s, b) = chat(
        json!({"model": "smollm2", "messages": ask, "tools": weather,
        "tool_choice": "required", "parallel_tool_calls": false, "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 150, "temperature": 0}),
    );
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b).to_string();
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let mut name = String::new();
    let mut arguments = String::new();
    for c in &chunks {
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(tc["index"], 0);
            name.push_str(tc["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(name, "get_weather", "{text}");
    let args: Value = serde_json::from_str(&arguments).expect("streamed arguments parse");
    assert!(
        args["city"].is_string() && args["unit"].is_string(),
        "{args}"
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(|_| c))
        .collect();
    assert_eq!(finishes.len(), 1, "{text}");
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "tool_calls");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );

    // The follow-up turn with the assistant's call and the tool's answer.
    let mut turn = ask.as_array().unwrap().clone();
    turn.push(first_call.clone());
    turn.push(json!({"role": "tool", "tool_call_id": first_call["tool_calls"][0]["id"], "content": "18C and sunny"}));
    let (s, b) =
        chat(json!({"model": "smollm2", "messages": turn, "tools": weather, "max_tokens": 20}));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    // Structured output: the answer parses and fits the schema.
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"},
        "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": false});
    let (s, b) = chat(
        json!({"model": "smollm2", "max_tokens": 150, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe a person "}, {"type": "text", "text": "as JSON."}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}}),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let person: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap())
            .expect("the content parses");
    assert!(
        person["name"].is_string() && person["age"].is_i64(),
        "{person}"
    );
    assert_eq!(person.as_object().unwrap().len(), 2, "{person}");

    // Log-probabilities and n = 2.
    let (s, b) = chat(
        json!({"model": "smollm2", "messages": ask, "max_tokens": 5, "n": 2,
        "temperature": 0.8, "seed": 7, "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert!(!content.is_empty());
        let mut bytes = Vec::new();
        for t in content {
            assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
            bytes.extend(
                t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8),
            );
        }
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            c["message"]["content"].as_str().unwrap(),
            "the tokens' bytes make the text"
        );
    }
    assert_eq!(
        v["usage"]["completion_tokens"],
        choices
            .iter()
            .map(|c| c["logprobs"]["content"].as_array().unwrap().len())
            .sum::<usize>()
    );

    // What a local text model cannot take is a 400 naming the field.
    for (body, param) in [
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "smollm2", "messages": ask, "top_logprobs": 21, "logprobs": true}),
            "top_logprobs",
        ),
        (
            json!({"model": "smollm2", "messages": ask, "tools": weather, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"model": "smollm2", "messages": ask, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"model": "smollm2", "messages": ask, "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
    ] {
        let (s, b) = chat(body.clone());
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
}

/// A worker whose native stream goes silent after its first event: the apiserver cuts the
/// answer short after the request timeout instead of holding the client forever, and a
/// later request is served.
#[test]
fn a_native_stream_that_goes_silent_is_cut_short() {
    use axum::routing::post as route_post;
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let app = axum::Router::new().route(
        "/api/worker/openai/v1/chat/completions",
        route_post(|| async {
            let first = futures::stream::once(async {
                Ok::<_, std::convert::Infallible>(Bytes::from_static(
                    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
                ))
            });
            let stall = futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                Ok(Bytes::from_static(b"data: [DONE]\n\n"))
            });
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(futures::StreamExt::chain(first, stall)),
            )
        }),
    );
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (s, _) = json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("stall@llm", port)),
    );
    assert_eq!(s, 200);
    let api = apiserver(&env, &c.url(), &["--request_timeout_secs", "2"]);
    let body =
        json!({"model": "stall", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let started = std::time::Instant::now();
    let r = post(
        api.port,
        "/v1/chat/completions",
        &serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(r.0, 200);
    let text = String::from_utf8_lossy(&r.2);
    assert!(text.contains("\"hi\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    // A liveness bound (the worker would hold it for 120 s), not a timing check.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        api.logs().contains("the worker went silent"),
        "{}",
        api.logs()
    );
}

/// `--chat_template FILE`: an operator's Jinja template renders the prompts of the native
/// chat route (tools included), and a template that does not parse fails the start, naming
/// the file.
#[test]
fn an_operator_chat_template_renders_the_prompt() {
    let env = TestEnv::new();
    // ChatML, as SmolLM2 expects, plus a tools section the GGUF's own template lacks and a
    // long preamble that shows in the prompt's token count.
    let template = env.path("chatml-tools.jinja");
    std::fs::write(
        &template,
        "<|im_start|>system\n{% for i in range(300) %}note {% endfor %}<|im_end|>\n{% if tools %}<|im_start|>system\nYou can call these tools by answering {\"tool_calls\":[{\"name\":...,\"arguments\":{...}}]}:\n{% for t in tools %}{{ t.function.name }}: {{ t.function.parameters | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let w = worker(
        &env,
        "http://127.0.0.1:1",
        &[
            "--no_register",
            "--model_name",
            "smollm2",
            "--model_path",
            &crate::worker::gguf(),
            "--chat_template",
            template.to_str().unwrap(),
        ],
    );
    // Greedy: the template is under test, not sampling (at the default temperature the
    // tiny model may wander inside the forced JSON string until max_tokens).
    let body = json!({"model": "smollm2", "max_tokens": 150, "temperature": 0,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required"});
    let r = post(
        w.port,
        "/api/worker/openai/v1/chat/completions",
        &serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    let v: Value = serde_json::from_slice(&r.2).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let args = v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(serde_json::from_str::<Value>(args).unwrap()["city"].is_string());
    // The template, not the GGUF's, made the prompt: its 300-word preamble is in the count
    // (the GGUF's own template makes about 20 tokens of this question).
    let plain = json!({"model": "smollm2", "max_tokens": 1,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}]});
    let r = post(
        w.port,
        "/api/worker/openai/v1/chat/completions",
        &serde_json::to_vec(&plain).unwrap(),
    );
    let p: Value = serde_json::from_slice(&r.2).unwrap();
    assert!(p["usage"]["prompt_tokens"].as_u64().unwrap() > 300, "{p}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > p["usage"]["prompt_tokens"].as_u64(),
        "the tools section adds to it: {v} {p}"
    );
    drop(w);

    let broken = env.path("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}{{ m.content").unwrap();
    let out = env.run(&[
        "start",
        "worker",
        "--host",
        "127.0.0.1",
        "--port",
        &free_port().to_string(),
        "--no_register",
        "--model_name",
        "smollm2",
        "--model_path",
        &crate::worker::gguf(),
        "--chat_template",
        broken.to_str().unwrap(),
        "--daemon",
    ]);
    assert!(!out.status.success());
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("broken.jinja"), "{said}");
}
