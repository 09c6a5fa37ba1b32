//! Tests of the local OpenAI engine: with a scripted fake backend that records the
//! [`GenerateParams`] it got (request mapping, every 400, the exact answer and stream
//! shapes, tools, logprobs, `n`, templates), and with the real SmolLM2 GGUF (a forced tool
//! call and a json_schema answer that validate against their schemas).

use std::collections::VecDeque;
use std::sync::Mutex;

use futures::StreamExt;
use serde_json::{Value, json};

use super::*;
use crate::worker::backends::{ChatMessage, Role, TopLogprob};

type Script = Vec<Result<GenerateEvent, BackendError>>;

/// A backend that replays one script per generation and records what it was asked.
#[derive(Default)]
struct Fake {
    scripts: Mutex<VecDeque<Script>>,
    seen: Mutex<Vec<GenerateParams>>,
}

impl Fake {
    fn new(scripts: Vec<Script>) -> Arc<Fake> {
        Arc::new(Fake {
            scripts: Mutex::new(scripts.into()),
            seen: Mutex::default(),
        })
    }

    fn seen(&self) -> Vec<GenerateParams> {
        self.seen.lock().unwrap().clone()
    }
}

impl LlmBackend for Fake {
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        self.seen.lock().unwrap().push(params);
        let script = self
            .scripts
            .lock()
            .unwrap()
            .pop_front()
            .expect("the test scripted fewer generations than the engine ran");
        futures::stream::iter(script).boxed()
    }

    fn count_tokens(&self, text: &str) -> Result<usize, BackendError> {
        Ok(text.split_whitespace().count())
    }

    fn context_length(&self) -> usize {
        2048
    }
}

fn d(text: &str) -> Result<GenerateEvent, BackendError> {
    Ok(GenerateEvent::Delta { text: text.into() })
}

fn fin(reason: FinishReason, prompt: u32, completion: u32) -> Result<GenerateEvent, BackendError> {
    Ok(GenerateEvent::Finish {
        finish_reason: reason,
        usage: Some(Usage::new(prompt, completion)),
    })
}

fn tok(token: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
    TokenLogprob {
        token: token.into(),
        bytes: token.as_bytes().to_vec(),
        logprob,
        top: top
            .iter()
            .map(|(t, l)| TopLogprob {
                token: (*t).into(),
                bytes: t.as_bytes().to_vec(),
                logprob: *l,
            })
            .collect(),
    }
}

fn lps(tokens: Vec<TokenLogprob>) -> Result<GenerateEvent, BackendError> {
    Ok(GenerateEvent::Logprobs { tokens })
}

/// A script answering `words` (one delta each), then `stop`.
fn says(words: &[&str], prompt: u32) -> Script {
    let mut s: Script = words.iter().map(|w| d(w)).collect();
    s.push(fin(FinishReason::Stop, prompt, words.len() as u32));
    s
}

async fn chat(backend: Arc<Fake>, body: Value) -> Value {
    match chat_completions(backend, body.to_string().as_bytes()).await {
        Ok(Answer::Whole(b)) => serde_json::from_slice(&b).unwrap(),
        Ok(Answer::Stream(_)) => panic!("expected a whole answer"),
        Err(e) => panic!("unexpected error: {:?}", e.body()),
    }
}

/// The stream's events: JSON values, and `"[DONE]"` as a string.
async fn collect(answer: Result<Answer, OpenAiError>) -> Vec<Value> {
    let Ok(Answer::Stream(s)) = answer else {
        panic!("expected a stream, got {:?}", answer.map_err(|e| e.body()));
    };
    let events: Vec<Bytes> = s.collect().await;
    events
        .iter()
        .map(|b| {
            let t = std::str::from_utf8(b).unwrap();
            let body = t
                .strip_prefix("data: ")
                .and_then(|t| t.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("not an SSE data event: {t:?}"));
            if body == "[DONE]" {
                json!("[DONE]")
            } else {
                serde_json::from_str(body).unwrap()
            }
        })
        .collect()
}

async fn chat_stream(backend: Arc<Fake>, body: Value) -> Vec<Value> {
    collect(chat_completions(backend, body.to_string().as_bytes()).await).await
}

async fn chat_err(body: Value) -> OpenAiError {
    let b = Fake::new(vec![]);
    match chat_completions(b.clone(), body.to_string().as_bytes()).await {
        Err(e) => {
            assert!(
                b.seen().is_empty(),
                "an invalid request reached the backend"
            );
            e
        }
        Ok(a) => panic!("expected an error for {body}, got {a:?}"),
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"]}}})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}})
}

#[tokio::test]
async fn plain_chat_maps_the_request_and_answers_openai_shape() {
    let b = Fake::new(vec![says(&["Hello", " there"], 7)]);
    let v = chat(
        b.clone(),
        json!({"model": "smol", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}]},
            {"role": "assistant", "content": "Yes?"},
            {"role": "user", "content": "Greet me"}],
        "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 12, "max_tokens": 99,
        "stop": ["\n\n", "END"], "seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "user": "u-1", "metadata": {"a": "b"}, "vendor_extra": [1, 2]}),
    )
    .await;
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() > 12, "{id}");
    assert!(v["created"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(
        v,
        json!({"id": id, "object": "chat.completion", "created": v["created"], "model": "smol",
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "Hello there", "refusal": null},
                "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
    );
    let seen = b.seen();
    assert_eq!(seen.len(), 1);
    let p = &seen[0];
    assert_eq!(
        p.messages,
        vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Hi\nyou"),
            ChatMessage::new(Role::Assistant, "Yes?"),
            ChatMessage::new(Role::User, "Greet me"),
        ]
    );
    assert_eq!(p.temperature, Some(0.5));
    assert_eq!(p.top_p, Some(0.9));
    assert_eq!(p.max_new_tokens, Some(12), "max_completion_tokens wins");
    assert_eq!(p.stop, ["\n\n", "END"]);
    assert_eq!(p.seed, Some(42));
    assert_eq!(p.presence_penalty, Some(0.5));
    assert_eq!(p.frequency_penalty, Some(-0.5));
    assert_eq!((&p.grammar, p.logprobs, &p.prompt), (&None, None, &None));
}

#[tokio::test]
async fn max_tokens_and_single_stop_string() {
    let b = Fake::new(vec![vec![d("a"), fin(FinishReason::Length, 3, 1)]]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "messages": user("x"), "max_tokens": 1, "stop": "Q:"}),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(b.seen()[0].max_new_tokens, Some(1));
    assert_eq!(b.seen()[0].stop, ["Q:"]);
}

/// Asserts a 400 naming `param`.
fn assert_400(e: &OpenAiError, param: &str) {
    assert_eq!(e.status, StatusCode::BAD_REQUEST, "{:?}", e.body());
    assert_eq!(e.kind, "invalid_request_error");
    assert_eq!(e.param.as_deref(), Some(param), "{:?}", e.body());
    assert!(e.code.is_some());
    assert!(!e.message.is_empty());
}

#[tokio::test]
async fn bad_requests_are_400s_naming_the_field() {
    let m = |extra: Value| {
        let mut b = json!({"model": "m", "messages": user("hi")});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"model": "m", "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "look"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
            "messages[2].content[0]",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hear"},
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
            "messages[0].content[1]",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "messages[0].content[0].text",
        ),
        (
            json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"model": "m", "messages": [{"role": "tool", "content": "42"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}]}),
            "messages[0].tool_calls[0].function.name",
        ),
        (json!({"model": "m"}), "messages"),
        (json!({"messages": user("x")}), "model"),
        (
            m(json!({"top_logprobs": 21, "logprobs": true})),
            "top_logprobs",
        ),
        (m(json!({"top_logprobs": 2})), "top_logprobs"),
        (m(json!({"n": 9})), "n"),
        (m(json!({"n": 0})), "n"),
        (m(json!({"temperature": 3})), "temperature"),
        (
            m(json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (
            m(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}),
            ),
            "tools[0].function.parameters",
        ),
        (
            m(
                json!({"tools": [weather_tool(), {"type": "function", "function": {"name": "g", "parameters": [1]}}]}),
            ),
            "tools[1].function.parameters",
        ),
        (
            m(json!({"tools": [{"type": "retrieval"}]})),
            "tools[0].type",
        ),
        (
            m(json!({"tools": [{"type": "function"}]})),
            "tools[0].function",
        ),
        (
            m(json!({"tools": [{"type": "function", "function": {"name": "bad name!"}}]})),
            "tools[0].function.name",
        ),
        (
            m(json!({"tools": [weather_tool(), weather_tool()]})),
            "tools[1].function.name",
        ),
        (m(json!({"tools": {"a": 1}})), "tools"),
        (
            m(
                json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
            "tool_choice.function.name",
        ),
        (
            m(json!({"tools": [weather_tool()], "tool_choice": "always"})),
            "tool_choice",
        ),
        (
            m(json!({"tools": [weather_tool()], "tool_choice": 3})),
            "tool_choice",
        ),
        (
            m(
                json!({"tools": [weather_tool()], "tool_choice": {"type": "tool", "function": {"name": "get_weather"}}}),
            ),
            "tool_choice.type",
        ),
        (
            m(json!({"tools": [weather_tool()], "tool_choice": {"type": "function"}})),
            "tool_choice.function",
        ),
        (m(json!({"tool_choice": "required"})), "tool_choice"),
        (
            m(json!({"parallel_tool_calls": "yes"})),
            "parallel_tool_calls",
        ),
        (
            m(json!({"response_format": {"type": "xml"}})),
            "response_format.type",
        ),
        (m(json!({"response_format": {}})), "response_format.type"),
        (m(json!({"response_format": "json"})), "response_format"),
        (
            m(json!({"response_format": {"type": "json_schema"}})),
            "response_format.json_schema",
        ),
        (
            m(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}),
            ),
            "response_format.json_schema.name",
        ),
        (
            m(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}),
            ),
            "response_format.json_schema.schema",
        ),
    ];
    for (body, param) in cases {
        let e = chat_err(body.clone()).await;
        assert_400(&e, param);
    }
    let e = chat_completions(Fake::new(vec![]), b"{not json")
        .await
        .unwrap_err();
    assert_400(&e, "body");
}

#[cfg(feature = "local-models")]
#[tokio::test]
async fn a_schema_the_converter_rejects_is_a_400_with_its_message() {
    let e = chat_err(
        json!({"model": "m", "messages": user("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}),
    )
    .await;
    assert_400(&e, "response_format.json_schema.schema");
    assert!(e.message.contains("grammar"), "{}", e.message);
    let e = chat_err(
        json!({"model": "m", "messages": user("x"), "tool_choice": "required",
        "tools": [time_tool(), {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]}),
    )
    .await;
    assert_400(&e, "tools[1].function.parameters");
}

#[tokio::test]
async fn streaming_sends_role_content_finish_usage_then_done() {
    let b = Fake::new(vec![says(&["Hel", "lo"], 5)]);
    let ev = chat_stream(
        b,
        json!({"model": "smol", "messages": user("hi"), "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(ev.len(), 6, "{ev:#?}");
    let id = ev[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    let created = ev[0]["created"].clone();
    let chunk = |choices: Value, usage: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": "smol",
               "choices": choices, "usage": usage})
    };
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    assert_eq!(
        ev[0],
        chunk(
            delta(json!({"role": "assistant", "content": ""}), Value::Null),
            Value::Null
        )
    );
    assert_eq!(
        ev[1],
        chunk(delta(json!({"content": "Hel"}), Value::Null), Value::Null)
    );
    assert_eq!(
        ev[2],
        chunk(delta(json!({"content": "lo"}), Value::Null), Value::Null)
    );
    assert_eq!(ev[3], chunk(delta(json!({}), json!("stop")), Value::Null));
    assert_eq!(
        ev[4],
        chunk(
            json!([]),
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
        )
    );
    assert_eq!(ev[5], "[DONE]");
}

#[tokio::test]
async fn streaming_without_usage_has_no_usage_key() {
    let b = Fake::new(vec![says(&["ok"], 5)]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(ev.len(), 4);
    for e in &ev[..3] {
        assert!(e.get("usage").is_none(), "{e}");
    }
    assert_eq!(ev[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(ev[3], "[DONE]");
}

#[tokio::test]
async fn n_choices_are_separate_generations() {
    let b = Fake::new(vec![says(&["one"], 6), says(&["two", "!"], 6)]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "messages": user("x"), "n": 2, "seed": 10}),
    )
    .await;
    let ch = v["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!(
        (&ch[0]["index"], &ch[0]["message"]["content"]),
        (&json!(0), &json!("one"))
    );
    assert_eq!(
        (&ch[1]["index"], &ch[1]["message"]["content"]),
        (&json!(1), &json!("two!"))
    );
    // The prompt is counted once, as OpenAI does.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );
    let seeds: Vec<_> = b.seen().iter().map(|p| p.seed).collect();
    assert_eq!(seeds, [Some(10), Some(11)]);

    let b = Fake::new(vec![says(&["a"], 4), says(&["b"], 4)]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("x"), "n": 2, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    let idx: Vec<(u64, Value)> = ev[..ev.len() - 2]
        .iter()
        .map(|e| {
            (
                e["choices"][0]["index"].as_u64().unwrap(),
                e["choices"][0]["delta"].clone(),
            )
        })
        .collect();
    assert_eq!(
        idx,
        vec![
            (0, json!({"role": "assistant", "content": ""})),
            (0, json!({"content": "a"})),
            (0, json!({})),
            (1, json!({"role": "assistant", "content": ""})),
            (1, json!({"content": "b"})),
            (1, json!({})),
        ]
    );
    assert_eq!(ev[ev.len() - 2]["usage"]["completion_tokens"], 2);
    assert_eq!(ev[ev.len() - 2]["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn auto_tools_are_described_and_a_json_answer_becomes_tool_calls() {
    let out = r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}]}"#;
    let b = Fake::new(vec![says(&[&out[..20], &out[20..]], 30)]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "messages": [{"role": "system", "content": "You help."},
            {"role": "user", "content": "Weather in Paris?"}],
            "tools": [weather_tool(), time_tool()]}),
    )
    .await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], Value::Null);
    assert_eq!(c["message"]["role"], "assistant");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let id = calls[0]["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() > 10, "{id}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = calls[0]["function"]["arguments"]
        .as_str()
        .expect("arguments is a string");
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"city": "Paris", "unit": "c"})
    );
    let p = &b.seen()[0];
    assert_eq!(p.grammar, None, "auto does not force");
    assert_eq!(
        p.messages.len(),
        2,
        "the tools join the existing system message"
    );
    assert_eq!(p.messages[0].role, Role::System);
    let sys = &p.messages[0].content;
    assert!(sys.starts_with("You help.\n\n"), "{sys}");
    for needle in [
        "get_weather",
        "Current weather of a city",
        r#""required":["city","unit"]"#,
        "get_time",
        r#"{"tool_calls":[{"name":"#,
    ] {
        assert!(sys.contains(needle), "{needle} missing from {sys}");
    }
    assert_eq!(
        p.messages[1],
        ChatMessage::new(Role::User, "Weather in Paris?")
    );
}

#[tokio::test]
async fn auto_tools_with_a_text_answer_stream_as_content() {
    let b = Fake::new(vec![says(&["The", " sky", " is", " blue"], 9)]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("Colour?"), "tools": [weather_tool()], "stream": true}),
    )
    .await;
    let contents: Vec<&str> = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    // Nothing is held back once the text cannot be a call.
    assert_eq!(contents, ["", "The", " sky", " is", " blue"]);
    assert_eq!(ev[ev.len() - 2]["choices"][0]["finish_reason"], "stop");
    // A tool name that was not offered is not a call.
    let b = Fake::new(vec![says(&[r#"{"name":"launch","arguments":{}}"#], 9)]);
    let v = chat(
        b,
        json!({"model": "m", "messages": user("x"), "tools": [weather_tool()]}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        r#"{"name":"launch","arguments":{}}"#
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn auto_tools_streamed_call_is_held_then_sent_as_tool_call_deltas() {
    let out = r#" {"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC"}}]}"#;
    let b = Fake::new(vec![says(&[&out[..5], &out[5..30], &out[30..]], 9)]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("time?"), "tools": [weather_tool(), time_tool()],
               "stream": true}),
    )
    .await;
    let deltas: Vec<&Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| &e["choices"][0]["delta"])
        .collect();
    assert_eq!(deltas.len(), 4, "{ev:#?}");
    assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
    let first = &deltas[1]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(first["type"], "function");
    assert_eq!(first["function"]["name"], "get_time");
    assert_eq!(
        deltas[2],
        &json!({"tool_calls": [{"index": 0, "function": {"arguments": r#"{"zone":"UTC"}"#}}]})
    );
    assert_eq!(deltas[3], &json!({}));
    assert_eq!(
        ev[ev.len() - 2]["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

/// Forcing needs llama.cpp's grammar converter.
#[cfg(feature = "local-models")]
#[tokio::test]
async fn named_tool_choice_forces_a_grammar_and_streams_the_call() {
    let out = r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}]}"#;
    let b = Fake::new(vec![says(&[&out[..10], &out[10..]], 9)]);
    let ev = chat_stream(
        b.clone(),
        json!({"model": "m", "messages": user("Oslo?"), "tools": [time_tool(), weather_tool()],
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let p = &b.seen()[0];
    assert!(
        p.messages[0]
            .content
            .contains("You must call the tool 'get_weather' now.")
    );
    #[cfg(feature = "local-models")]
    {
        let g = p.grammar.as_deref().expect("a forced call has a grammar");
        assert!(g.contains("root ::="), "{g}");
        assert!(g.contains("get_weather"), "{g}");
        assert!(
            !g.contains("get_time"),
            "only the named tool may be called: {g}"
        );
    }
    let deltas: Vec<&Value> = ev[..ev.len() - 2]
        .iter()
        .map(|e| &e["choices"][0]["delta"])
        .collect();
    assert_eq!(deltas[0], &json!({"role": "assistant", "content": null}));
    assert_eq!(
        deltas[1]["tool_calls"][0]["function"],
        json!({"name": "get_weather", "arguments": ""})
    );
    let args = deltas[2]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"city": "Oslo", "unit": "c"})
    );
    assert_eq!(
        ev[ev.len() - 3]["choices"][0]["finish_reason"],
        "tool_calls"
    );
    assert_eq!(ev[ev.len() - 2]["usage"]["total_tokens"], 11);
    assert_eq!(ev[ev.len() - 1], "[DONE]");
}

#[test]
fn forced_schema_lists_the_tools_and_limits_parallel_calls() {
    let req = |extra: Value| {
        let mut b =
            json!({"model": "m", "messages": user("x"), "tools": [weather_tool(), time_tool()]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        request::parse_chat(b.to_string().as_bytes()).unwrap()
    };
    let r = req(json!({"tool_choice": "required", "parallel_tool_calls": false}));
    let s = tools::forced_schema(&r.tools, &r.tool_choice, r.parallel_tool_calls);
    assert_eq!(s["required"], json!(["tool_calls"]));
    let list = &s["properties"]["tool_calls"];
    assert_eq!(
        (&list["minItems"], &list["maxItems"]),
        (&json!(1), &json!(1))
    );
    let items = list["items"]["anyOf"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[0]["properties"]["name"],
        json!({"const": "get_weather"})
    );
    assert_eq!(
        items[0]["properties"]["arguments"]["required"],
        json!(["city", "unit"])
    );
    assert_eq!(
        items[0]["properties"]["arguments"]["additionalProperties"],
        false
    );
    assert_eq!(items[1]["properties"]["name"], json!({"const": "get_time"}));
    let r = req(json!({"tool_choice": "required"}));
    let s = tools::forced_schema(&r.tools, &r.tool_choice, r.parallel_tool_calls);
    assert!(s["properties"]["tool_calls"].get("maxItems").is_none());
    let r = req(json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}));
    let s = tools::forced_schema(&r.tools, &r.tool_choice, r.parallel_tool_calls);
    let items = s["properties"]["tool_calls"]["items"]["anyOf"]
        .as_array()
        .unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["properties"]["name"]["const"], "get_time");
}

/// Forcing needs llama.cpp's grammar converter.
#[cfg(feature = "local-models")]
#[tokio::test]
async fn required_with_parallel_calls_answers_every_call() {
    let out = r#"{"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC"}},{"name":"get_weather","arguments":{"city":"Rome","unit":"f"}}]}"#;
    let b = Fake::new(vec![says(&[out], 9), says(&[out], 9)]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "messages": user("x"), "tools": [weather_tool(), time_tool()],
               "tool_choice": "required"}),
    )
    .await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["function"]["name"], "get_weather");
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    assert!(
        b.seen()[0].messages[0]
            .content
            .contains("You must call a tool now.")
    );
    // parallel_tool_calls: false keeps only the first.
    let v = chat(
        b,
        json!({"model": "m", "messages": user("x"), "tools": [weather_tool(), time_tool()],
               "tool_choice": "required", "parallel_tool_calls": false}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn follow_up_turns_replay_calls_and_results() {
    let b = Fake::new(vec![says(&["It is 12C."], 40)]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "tools": [weather_tool()], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "12C, cloudy"}]}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "It is 12C.");
    let m = &b.seen()[0].messages;
    assert_eq!(m.len(), 4);
    assert_eq!(m[0].role, Role::System);
    assert_eq!(m[2].role, Role::Assistant);
    assert_eq!(
        serde_json::from_str::<Value>(&m[2].content).unwrap(),
        json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]})
    );
    assert_eq!(m[3].role, Role::User);
    assert_eq!(
        m[3].content,
        "Result of tool call call_abc (get_weather):\n12C, cloudy"
    );
}

#[tokio::test]
async fn tool_choice_none_neither_describes_nor_parses_tools() {
    let out = r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"x","unit":"c"}}]}"#;
    let b = Fake::new(vec![says(&[out], 9)]);
    let v = chat(
        b.clone(),
        json!({"model": "m", "messages": user("x"), "tools": [weather_tool()], "tool_choice": "none"}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], out);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        b.seen()[0].messages,
        vec![ChatMessage::new(Role::User, "x")]
    );
}

#[test]
fn tool_call_text_forms() {
    let r = request::parse_chat(
        json!({"model": "m", "messages": user("x"), "tools": [weather_tool(), time_tool()]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let parse = |t: &str| tools::parse_calls(t, &r.tools, true);
    let one = |name: &str, args: Value| tools::ParsedCall {
        name: name.into(),
        arguments: args.to_string(),
    };
    assert_eq!(
        parse(
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>"
        ),
        Some(vec![one("get_time", json!({"zone": "CET"}))])
    );
    assert_eq!(
        parse("<tool_call>{\"name\":\"get_time\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"get_time\",\"arguments\":{\"zone\":\"X\"}}</tool_call>")
            .map(|c| c.len()),
        Some(2)
    );
    assert_eq!(
        parse("```json\n{\"name\":\"get_time\",\"arguments\":\"{\\\"zone\\\":\\\"A\\\"}\"}\n```"),
        Some(vec![tools::ParsedCall {
            name: "get_time".into(),
            arguments: r#"{"zone":"A"}"#.into()
        }])
    );
    assert_eq!(
        parse(r#"[{"name":"get_time","parameters":{"zone":"B"}}]"#),
        Some(vec![one("get_time", json!({"zone": "B"}))])
    );
    assert_eq!(parse("Sure! {\"name\":\"get_time\"}"), None);
    assert_eq!(parse(r#"{"tool_calls":[]}"#), None);
    assert_eq!(
        parse(r#"{"tool_calls":[{"name":"get_time","arguments":{}}"#),
        None
    );
    assert_eq!(parse(r#"{"answer": 4}"#), None);
    assert_eq!(
        parse("<tool_call>{\"name\":\"get_time\"}</tool_call> and more"),
        None
    );
    assert!(tools::may_be_call("  "));
    assert!(tools::may_be_call(" <tool"));
    assert!(tools::may_be_call("``"));
    assert!(tools::may_be_call("\n{\"tool"));
    assert!(!tools::may_be_call("The"));
    assert!(!tools::may_be_call("<b>"));
}

#[cfg(feature = "local-models")]
#[tokio::test]
async fn response_format_sets_a_grammar() {
    let run = |rf: Value| async move {
        let b = Fake::new(vec![says(&["{}"], 3)]);
        chat(
            b.clone(),
            json!({"model": "m", "messages": user("x"), "response_format": rf}),
        )
        .await;
        b.seen()[0].grammar.clone()
    };
    assert_eq!(run(json!({"type": "text"})).await, None);
    let g = run(json!({"type": "json_object"})).await.unwrap();
    assert!(g.contains("root ::="), "{g}");
    let g = run(
        json!({"type": "json_schema", "json_schema": {"name": "p", "strict": true,
        "schema": {"type": "object", "properties": {"age": {"type": "integer"},
            "colour": {"enum": ["red", "green"]}}, "required": ["age", "colour"]}}}),
    )
    .await
    .unwrap();
    assert!(g.contains("colour") && g.contains("green"), "{g}");
}

#[tokio::test]
async fn chat_logprobs_whole_and_streamed() {
    let script = || {
        vec![
            lps(vec![tok("Hi", -0.25, &[("Hi", -0.25), ("Hey", -1.5)])]),
            d("Hi"),
            lps(vec![
                tok("!", -0.5, &[("!", -0.5), (".", -2.0)]),
                tok(" ", -1.0, &[(" ", -1.0), ("?", -3.0)]),
            ]),
            d("! "),
            fin(FinishReason::Stop, 4, 3),
        ]
    };
    let b = Fake::new(vec![script(), script()]);
    let body = json!({"model": "m", "messages": user("x"), "logprobs": true, "top_logprobs": 2});
    let v = chat(b.clone(), body.clone()).await;
    assert_eq!(b.seen()[0].logprobs, Some(2));
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["refusal"], Value::Null);
    let content = lp["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(
        content[0],
        json!({"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
               "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                                {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]}]})
    );
    assert_eq!(content[2]["token"], " ");
    let mut body = body;
    body["stream"] = json!(true);
    let ev = chat_stream(b, body).await;
    assert_eq!(ev[0]["choices"][0]["logprobs"], Value::Null);
    let toks: Vec<Vec<String>> = ev[1..3]
        .iter()
        .map(|e| {
            e["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["token"].as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    assert_eq!(toks, [vec!["Hi"], vec!["!", " "]]);
    // logprobs: true alone asks for no alternatives.
    let b = Fake::new(vec![says(&["a"], 1)]);
    chat(
        b.clone(),
        json!({"model": "m", "messages": user("x"), "logprobs": true}),
    )
    .await;
    assert_eq!(b.seen()[0].logprobs, Some(0));
}

#[tokio::test]
async fn text_completions_prompt_echo_logprobs_and_n() {
    let b = Fake::new(vec![vec![
        lps(vec![tok(
            " Paris",
            -0.1,
            &[(" Paris", -0.1), (" Lyon", -3.0)],
        )]),
        d(" Paris"),
        lps(vec![tok(".", -0.2, &[(".", -0.2)])]),
        d("."),
        fin(FinishReason::Stop, 5, 2),
    ]]);
    let resp = completions(
        b.clone(),
        json!({"model": "m", "prompt": "Capital:", "echo": true, "logprobs": 2, "max_tokens": 5,
               "suffix": null, "best_of": 1})
        .to_string()
        .as_bytes(),
    )
    .await
    .unwrap();
    let Answer::Whole(body) = resp else {
        panic!("whole expected")
    };
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    assert_eq!(c["text"], "Capital: Paris.");
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(
        c["logprobs"],
        json!({"tokens": [" Paris", "."], "token_logprobs": [-0.1, -0.2],
               "top_logprobs": [{" Paris": -0.1, " Lyon": -3.0}, {".": -0.2}],
               "text_offset": [8, 14]})
    );
    let p = &b.seen()[0];
    assert_eq!(p.prompt.as_deref(), Some("Capital:"));
    assert!(p.messages.is_empty());
    assert_eq!((p.logprobs, p.max_new_tokens), (Some(2), Some(5)));

    // Two prompts × n=2: indexes by prompt then choice; streamed.
    let b = Fake::new(vec![
        says(&["a"], 2),
        says(&["b"], 2),
        says(&["c"], 3),
        says(&["d"], 3),
    ]);
    let ev = collect(
        completions(
            b.clone(),
            json!({"model": "m", "prompt": ["p1", "p2"], "n": 2, "stream": true,
                   "stream_options": {"include_usage": true}})
            .to_string()
            .as_bytes(),
        )
        .await,
    )
    .await;
    let pieces: Vec<(u64, String, Value)> = ev[..ev.len() - 2]
        .iter()
        .map(|e| {
            assert_eq!(e["object"], "text_completion");
            let c = &e["choices"][0];
            (
                c["index"].as_u64().unwrap(),
                c["text"].as_str().unwrap().into(),
                c["finish_reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        pieces,
        vec![
            (0, "a".into(), Value::Null),
            (0, "".into(), json!("stop")),
            (1, "b".into(), Value::Null),
            (1, "".into(), json!("stop")),
            (2, "c".into(), Value::Null),
            (2, "".into(), json!("stop")),
            (3, "d".into(), Value::Null),
            (3, "".into(), json!("stop")),
        ]
    );
    assert_eq!(
        ev[ev.len() - 2]["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
    let prompts: Vec<_> = b.seen().iter().map(|p| p.prompt.clone().unwrap()).collect();
    assert_eq!(prompts, ["p1", "p1", "p2", "p2"]);
    let e = completions(
        Fake::new(vec![]),
        br#"{"model":"m","prompt":["a","b","c"],"n":3}"#,
    )
    .await
    .unwrap_err();
    assert_400(&e, "n");
    let e = completions(
        Fake::new(vec![]),
        br#"{"model":"m","prompt":"a","logprobs":21}"#,
    )
    .await
    .unwrap_err();
    assert_400(&e, "logprobs");
    let e = completions(Fake::new(vec![]), br#"{"model":"m"}"#)
        .await
        .unwrap_err();
    assert_400(&e, "prompt");
}

#[tokio::test]
async fn streamed_echo_sends_the_prompt_first() {
    let b = Fake::new(vec![says(&[" world"], 2)]);
    let ev = collect(
        completions(
            b,
            br#"{"model":"m","prompt":"hello","echo":true,"stream":true}"#,
        )
        .await,
    )
    .await;
    let texts: Vec<&str> = ev[..ev.len() - 1]
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello", " world", ""]);
}

#[tokio::test]
async fn backend_failures_before_and_after_the_stream_starts() {
    // Refused before any output: an HTTP error naming the prompt field.
    let b = Fake::new(vec![vec![Err(BackendError::BadRequest(
        "prompt is 9 tokens but the model's context window is 8 tokens".into(),
    ))]]);
    let e = chat_completions(
        b,
        json!({"model": "m", "messages": user("x"), "stream": true})
            .to_string()
            .as_bytes(),
    )
    .await
    .unwrap_err();
    assert_400(&e, "messages");
    assert!(e.message.contains("context window"));
    // The same refusal without streaming.
    let b = Fake::new(vec![vec![Err(BackendError::BadRequest("too long".into()))]]);
    let e = chat_completions(
        b,
        json!({"model": "m", "messages": user("x")})
            .to_string()
            .as_bytes(),
    )
    .await
    .unwrap_err();
    assert_400(&e, "messages");
    // A failure mid-stream: an error event, then [DONE].
    let b = Fake::new(vec![vec![
        d("par"),
        Err(BackendError::internal("decode failed")),
    ]]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("x"), "stream": true}),
    )
    .await;
    assert_eq!(ev.len(), 4, "{ev:#?}");
    assert_eq!(ev[1]["choices"][0]["delta"]["content"], "par");
    assert_eq!(ev[2]["error"]["type"], "server_error");
    assert!(
        ev[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("decode failed")
    );
    assert_eq!(ev[3], "[DONE]");
    // A stream that ends without a finish is an error too.
    let b = Fake::new(vec![vec![d("x")]]);
    let e = chat_completions(
        b,
        json!({"model": "m", "messages": user("x")})
            .to_string()
            .as_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    // A failure of the second choice's start, mid-stream.
    let b = Fake::new(vec![
        says(&["a"], 1),
        vec![Err(BackendError::internal("gone"))],
    ]);
    let ev = chat_stream(
        b,
        json!({"model": "m", "messages": user("x"), "stream": true, "n": 2}),
    )
    .await;
    assert_eq!(ev[ev.len() - 2]["error"]["code"], "model_error");
    assert_eq!(ev[ev.len() - 1], "[DONE]");
}

/// A backend whose generation never ends, noting when its stream is dropped.
struct Endless {
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LlmBackend for Endless {
    fn generate_stream(
        &self,
        _: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        let flag = DropFlag(self.dropped.clone());
        futures::stream::iter([d("tick")])
            .chain(futures::stream::pending())
            .map(move |e| {
                let _keep = &flag;
                e
            })
            .boxed()
    }

    fn count_tokens(&self, _: &str) -> Result<usize, BackendError> {
        Ok(0)
    }

    fn context_length(&self) -> usize {
        2048
    }
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_generation() {
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = Arc::new(Endless {
        dropped: dropped.clone(),
    });
    let body = json!({"model": "m", "messages": user("x"), "stream": true});
    let Answer::Stream(mut s) = chat_completions(b, body.to_string().as_bytes())
        .await
        .unwrap()
    else {
        panic!()
    };
    let role = s.next().await.unwrap();
    assert!(
        std::str::from_utf8(&role)
            .unwrap()
            .contains(r#""role":"assistant""#)
    );
    let tick = s.next().await.unwrap();
    assert!(
        std::str::from_utf8(&tick)
            .unwrap()
            .contains(r#""content":"tick""#)
    );
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    drop(s);
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\
{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}\
{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}: {{ m.content }}\
{% else %}{{ m.content.strip() }}{% endif %};{% endfor %}\
{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %};{% endif %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

fn template_opts(src: &str) -> ChatOptions {
    ChatOptions {
        template: Some(Arc::new(
            ChatTemplate::new(src, "test")
                .unwrap()
                .with_tokens("<s>", "</s>"),
        )),
        render: None,
    }
}

#[tokio::test]
async fn a_custom_template_renders_the_prompt_with_tools() {
    let out = "<tool_call>{\"name\":\"get_time\",\"arguments\":{\"zone\":\"UTC\"}}</tool_call>";
    let b = Fake::new(vec![says(&[out], 20)]);
    let body = json!({"model": "m", "tools": [time_tool()], "messages": [
        {"role": "system", "content": "  Sys  "},
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [{"id": "c9", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"zone\":\"CET\"}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "10:00"}]});
    let a = chat_completions_with(
        b.clone(),
        &template_opts(TEMPLATE),
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    let Answer::Whole(w) = a else { panic!() };
    let v: Value = serde_json::from_slice(&w).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_time"
    );
    let p = &b.seen()[0];
    assert!(p.messages.is_empty());
    assert_eq!(
        p.prompt.as_deref().unwrap(),
        "<s><|system|>Sys;<|user|>time?;<|assistant|>CALL get_time {\"zone\":\"CET\"};\
         <|tool|>RESULT c9: 10:00;TOOLS: get_time;<|assistant|>"
    );
    // tool_choice none: the template gets no tools.
    let b = Fake::new(vec![says(&["ok"], 2)]);
    let body = json!({"model": "m", "tools": [time_tool()], "tool_choice": "none",
                      "messages": user("hi")});
    chat_completions_with(
        b.clone(),
        &template_opts(TEMPLATE),
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        b.seen()[0].prompt.as_deref(),
        Some("<s><|user|>hi;<|assistant|>")
    );
    // A required call with a template: the template gets the tools, the grammar forces
    // the call.
    #[cfg(feature = "local-models")]
    {
        let out = r#"{"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC"}}]}"#;
        let b = Fake::new(vec![says(&[out], 2)]);
        let body = json!({"model": "m", "tools": [time_tool()], "tool_choice": "required",
                          "messages": user("hi")});
        let a = chat_completions_with(
            b.clone(),
            &template_opts(TEMPLATE),
            body.to_string().as_bytes(),
        )
        .await
        .unwrap();
        let Answer::Whole(w) = a else { panic!() };
        let v: Value = serde_json::from_slice(&w).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let p = &b.seen()[0];
        assert_eq!(
            p.prompt.as_deref(),
            Some("<s><|user|>hi;TOOLS: get_time;<|assistant|>")
        );
        assert!(p.grammar.as_deref().unwrap().contains("get_time"));
    }
}

#[tokio::test]
async fn template_errors() {
    let raising = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with the user') }}{% endif %}x";
    let body = json!({"model": "m", "messages": [{"role": "system", "content": "s"}]});
    let e = chat_completions_with(
        Fake::new(vec![]),
        &template_opts(raising),
        body.to_string().as_bytes(),
    )
    .await
    .unwrap_err();
    assert_400(&e, "messages");
    assert!(
        e.message.contains("Conversation must start with the user"),
        "{}",
        e.message
    );
    assert!(matches!(
        ChatTemplate::new("{% for %}", "bad.jinja"),
        Err(TemplateError::Syntax { .. })
    ));
    // A tokenizer_config.json carries the template and the special tokens.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &cfg,
        json!({"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
               "bos_token": {"content": "<B>"}, "eos_token": "<E>"})
        .to_string(),
    )
    .unwrap();
    let opts = ChatOptions {
        template: Some(Arc::new(ChatTemplate::load(&cfg).unwrap())),
        render: None,
    };
    let b = Fake::new(vec![says(&["x"], 1)]);
    chat_completions_with(
        b.clone(),
        &opts,
        json!({"model": "m", "messages": user("q")})
            .to_string()
            .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(b.seen()[0].prompt.as_deref(), Some("<B>q<E>"));
    let missing = dir.path().join("nope.jinja");
    assert!(matches!(
        ChatTemplate::load(&missing),
        Err(TemplateError::Read { .. })
    ));
}

/// Tests against the real SmolLM2 GGUF: the grammar makes its output fit the schema.
#[cfg(feature = "local-models")]
mod real {
    use std::sync::OnceLock;

    use super::*;
    use crate::worker::backends::{LlamaCppBackend, LlamaCppConfig, require_test_model};

    fn smol() -> Arc<dyn LlmBackend> {
        static MODEL: OnceLock<Arc<LlamaCppBackend>> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let path = require_test_model("SmolLM2-135M-Instruct.Q4_1.gguf");
                Arc::new(LlamaCppBackend::load(LlamaCppConfig::new(path)).expect("load SmolLM2"))
            })
            .clone()
    }

    /// A small JSON-schema check: object, required keys, property types and enums.
    fn validate(v: &Value, schema: &Value) -> Result<(), String> {
        if let Some(e) = schema.get("enum") {
            return if e.as_array().unwrap().contains(v) {
                Ok(())
            } else {
                Err(format!("{v} not in {e}"))
            };
        }
        let ok = match schema.get("type").and_then(Value::as_str) {
            Some("object") => v.is_object(),
            Some("string") => v.is_string(),
            Some("integer") => v.is_i64() || v.is_u64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            Some("array") => v.is_array(),
            _ => true,
        };
        if !ok {
            return Err(format!("{v} is not of type {}", schema["type"]));
        }
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for k in req {
                if v.get(k.as_str().unwrap()).is_none() {
                    return Err(format!("required key {k} missing from {v}"));
                }
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                if let Some(x) = v.get(k) {
                    validate(x, s)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_validator_can_fail() {
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x"]}},
                       "required": ["a"]});
        assert!(validate(&json!({"a": 1, "b": "x"}), &s).is_ok());
        assert!(validate(&json!({"b": "x"}), &s).is_err());
        assert!(validate(&json!({"a": "1"}), &s).is_err());
        assert!(validate(&json!({"a": 1, "b": "y"}), &s).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smollm2_forced_named_tool_call_validates() {
        let tool = weather_tool();
        let body = json!({"model": "smol", "temperature": 0, "max_tokens": 120,
            "messages": [{"role": "user", "content": "What is the weather like in Paris, in celsius?"}],
            "tools": [time_tool(), tool.clone()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        let Answer::Whole(w) = chat_completions(smol(), body.to_string().as_bytes())
            .await
            .unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&w).unwrap();
        eprintln!("forced call: {v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        validate(&args, &tool["function"]["parameters"]).unwrap();
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        // Streamed: the same call as fragments.
        let mut body = body;
        body["stream"] = json!(true);
        let ev = collect(chat_completions(smol(), body.to_string().as_bytes()).await).await;
        let mut name = String::new();
        let mut args = String::new();
        for e in &ev[..ev.len() - 1] {
            for tc in e["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                name.push_str(tc["function"]["name"].as_str().unwrap_or_default());
                args.push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
            }
        }
        assert_eq!(name, "get_weather");
        validate(
            &serde_json::from_str(&args).unwrap(),
            &tool["function"]["parameters"],
        )
        .unwrap();
        assert_eq!(
            ev[ev.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smollm2_json_schema_answer_validates() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog", "none"]}}, "required": ["name", "age", "pet"],
            "additionalProperties": false});
        let body = json!({"model": "smol", "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": "Describe a person as JSON: name, age, pet."}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "person", "strict": true, "schema": schema}}});
        let Answer::Whole(w) = chat_completions(smol(), body.to_string().as_bytes())
            .await
            .unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&w).unwrap();
        eprintln!("json_schema answer: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let content: Value =
            serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        validate(&content, &schema).unwrap();
    }

    /// The GGUF's own template rendered by minijinja gives the prompt llama.cpp renders:
    /// Hugging Face templates work as operator templates.
    #[test]
    fn smollm2_template_renders_like_llama_cpp() {
        let path = require_test_model("SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = LlamaCppBackend::load(LlamaCppConfig::new(path)).unwrap();
        let src = model
            .chat_template()
            .expect("SmolLM2 has a template")
            .to_string();
        let t = ChatTemplate::new(src, "gguf").unwrap();
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]});
        let req = request::parse_chat(body.to_string().as_bytes()).unwrap();
        let ours = t.render(&req.messages, None).unwrap();
        let theirs = model
            .render_prompt(&tools::generic_messages(&req.messages, None))
            .unwrap();
        assert_eq!(ours, theirs);
        assert!(ours.ends_with("<|im_start|>assistant\n"), "{ours}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smollm2_logprobs_n_and_usage_streamed() {
        let body = json!({"model": "smol", "max_tokens": 6, "n": 2, "seed": 7, "temperature": 0.9,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
            "logprobs": true, "top_logprobs": 3, "stream": true,
            "stream_options": {"include_usage": true}});
        let ev = collect(chat_completions(smol(), body.to_string().as_bytes()).await).await;
        assert_eq!(ev[ev.len() - 1], "[DONE]");
        let usage = &ev[ev.len() - 2]["usage"];
        let mut text = [String::new(), String::new()];
        let mut tokens = [0u64, 0];
        for e in &ev[..ev.len() - 2] {
            let c = &e["choices"][0];
            let i = c["index"].as_u64().unwrap() as usize;
            text[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            for t in c["logprobs"]["content"].as_array().into_iter().flatten() {
                tokens[i] += 1;
                let lp = t["logprob"].as_f64().unwrap();
                assert!(lp <= 0.0, "{t}");
                assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
                let bytes: Vec<u8> = t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                assert_eq!(
                    String::from_utf8_lossy(&bytes),
                    t["token"].as_str().unwrap()
                );
            }
        }
        assert!(!text[0].is_empty() && !text[1].is_empty(), "{text:?}");
        assert_eq!(
            usage["completion_tokens"].as_u64().unwrap(),
            tokens[0] + tokens[1],
            "one logprobs entry per generated token: {ev:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smollm2_text_completion_with_logprobs() {
        let body = json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 4,
                          "temperature": 0, "logprobs": 2, "echo": true});
        let Answer::Whole(w) = completions(smol(), body.to_string().as_bytes())
            .await
            .unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&w).unwrap();
        eprintln!("text completion: {v}");
        let c = &v["choices"][0];
        let text = c["text"].as_str().unwrap();
        assert!(
            text.starts_with("The capital of France is") && text.len() > 24,
            "{text}"
        );
        let lp = &c["logprobs"];
        let n = lp["tokens"].as_array().unwrap().len();
        assert_eq!(n as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
        assert_eq!(lp["text_offset"][0], 24);
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    }
}

/// A continuation request of `partial` after "hi" (greedy, counted as generated).
fn continuation_body(partial: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "m", "temperature": 0, "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": partial}],
           "continue_final_message": true, "add_generation_prompt": false,
           "x_dbgpt_continuation": true})
}

#[tokio::test]
async fn a_continuation_regenerates_the_cut_tail_and_drops_it() {
    let b = Fake::new(vec![vec![
        d(" fo"),
        d("x"),
        d(" jumps"),
        fin(FinishReason::Stop, 7, 3),
    ]]);
    let opts = template_opts(TEMPLATE);
    let body = continuation_body("The quick brown fo", 10, false);
    let Answer::Whole(w) = chat_completions_with(b.clone(), &opts, body.to_string().as_bytes())
        .await
        .unwrap()
    else {
        panic!("a whole answer")
    };
    let v: Value = serde_json::from_slice(&w).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "x jumps", "{v}");
    // The prompt: the conversation before, the turn opened, the text cut before " fo".
    let seen = b.seen();
    assert_eq!(
        seen[0].prompt.as_deref(),
        Some("<s><|user|>hi;<|assistant|>The quick brown")
    );
    // "The quick brown" (3 tokens for the fake) counts as generated: 10 - 3 left, and
    // usage as one run's.
    assert_eq!(seen[0].max_new_tokens, Some(7));
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn a_continuation_that_departs_from_the_tail_continues_the_whole_text() {
    let b = Fake::new(vec![
        vec![d(" fig"), d(" tree"), fin(FinishReason::Stop, 7, 2)],
        vec![d("x"), d(" jumps"), fin(FinishReason::Stop, 8, 2)],
    ]);
    let opts = template_opts(TEMPLATE);
    let body = continuation_body("The quick brown fo", 10, true);
    let ev =
        collect(chat_completions_with(b.clone(), &opts, body.to_string().as_bytes()).await).await;
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "x jumps");
    let seen = b.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].prompt.as_deref(),
        Some("<s><|user|>hi;<|assistant|>The quick brown fo")
    );
    assert_eq!(seen[1].max_new_tokens, Some(6));
}

#[tokio::test]
async fn a_continuation_without_the_extension_continues_as_vllm_does() {
    let b = Fake::new(vec![says(&["x"], 9)]);
    let opts = template_opts(TEMPLATE);
    let mut body = continuation_body("The quick brown fo", 10, false);
    body.as_object_mut().unwrap().remove("x_dbgpt_continuation");
    let Answer::Whole(w) = chat_completions_with(b.clone(), &opts, body.to_string().as_bytes())
        .await
        .unwrap()
    else {
        panic!("a whole answer")
    };
    let v: Value = serde_json::from_slice(&w).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "x");
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    let seen = b.seen();
    assert_eq!(
        seen[0].prompt.as_deref(),
        Some("<s><|user|>hi;<|assistant|>The quick brown fo")
    );
    assert_eq!(seen[0].max_new_tokens, Some(10));
}

#[tokio::test]
async fn a_continuation_with_its_budget_spent_finishes_at_once() {
    let opts = template_opts(TEMPLATE);
    let whole = |w: Answer| -> Value {
        let Answer::Whole(w) = w else {
            panic!("a whole answer")
        };
        serde_json::from_slice(&w).unwrap()
    };
    // Four words (tokens, for the fake) of four allowed: the original run ended there.
    // Greedy: the last word is regenerated (one token left), checked and dropped.
    let b = Fake::new(vec![vec![d(" four"), fin(FinishReason::Length, 5, 1)]]);
    let body = continuation_body("one two three four", 4, false);
    let v = whole(
        chat_completions_with(b.clone(), &opts, body.to_string().as_bytes())
            .await
            .unwrap(),
    );
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(b.seen()[0].max_new_tokens, Some(1));
    // Sampling: the text is continued whole, and nothing is left to generate.
    let b = Fake::new(vec![]);
    let mut body = continuation_body("one two three four", 4, false);
    body["temperature"] = json!(0.7);
    let v = whole(
        chat_completions_with(b.clone(), &opts, body.to_string().as_bytes())
            .await
            .unwrap(),
    );
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(b.seen().is_empty(), "the model is not run");
}

#[tokio::test]
async fn bad_continuations_are_refused_naming_the_field() {
    let opts = template_opts(TEMPLATE);
    for (body, why) in [
        (
            json!({"model": "m", "continue_final_message": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
            "last message",
        ),
        (
            json!({"model": "m", "continue_final_message": true, "add_generation_prompt": true,
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}),
            "cannot both",
        ),
        (
            json!({"model": "m", "continue_final_message": true,
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}),
            "tools",
        ),
    ] {
        let e = chat_completions_with(Fake::new(vec![]), &opts, body.to_string().as_bytes())
            .await
            .unwrap_err();
        let v = e.body();
        assert_eq!(v["error"]["param"], "continue_final_message", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    // A model whose prompt is not rendered here (no template, no renderer).
    let e = chat_completions(
        Fake::new(vec![]),
        continuation_body("a", 3, false).to_string().as_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.body()["error"]["param"], "continue_final_message");
}

/// The real SmolLM2 GGUF, greedy: a stream continued from any of its chunks gives the
/// uninterrupted run's text (the tail cut back, regenerated and dropped); the naive
/// continuation (the text re-tokenized whole) is reported beside it.
#[cfg(feature = "local-models")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_continuations_from_every_point_equal_the_uninterrupted_run() {
    use crate::worker::backends::{LlamaCppBackend, LlamaCppConfig, require_test_model};
    let path = require_test_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = Arc::new(LlamaCppBackend::load(LlamaCppConfig::new(path)).unwrap());
    let m = model.clone();
    let opts = ChatOptions {
        template: None,
        render: Some(Arc::new(move |msgs: &[ChatMessage]| m.render_prompt(msgs))),
    };
    let backend: Arc<dyn LlmBackend> = model;
    let question = "Write a short story about a dragon who learns to bake bread.";
    let ask = |extra: Value| {
        let mut body = json!({"model": "m", "temperature": 0, "max_tokens": 50, "stream": true,
                              "messages": [{"role": "user", "content": question}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let pieces = |ev: &[Value]| -> Vec<String> {
        ev.iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    };
    let finish = |ev: &[Value]| {
        ev.iter().find_map(|e| {
            e["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
    };
    let full = collect(
        chat_completions_with(
            backend.clone(),
            &opts,
            ask(json!({})).to_string().as_bytes(),
        )
        .await,
    )
    .await;
    let run = pieces(&full);
    let whole: String = run.concat();
    assert!(run.len() > 20, "{whole:?}");
    let mut naive_bad = 0;
    let points: Vec<usize> = (1..run.len()).step_by(5).collect();
    for &k in &points {
        let partial: String = run[..k].concat();
        for as_generated in [true, false] {
            let msgs = json!([{"role": "user", "content": question},
                              {"role": "assistant", "content": partial}]);
            let body = ask(json!({"messages": msgs, "continue_final_message": true,
                                  "x_dbgpt_continuation": as_generated}));
            let ev = collect(
                chat_completions_with(backend.clone(), &opts, body.to_string().as_bytes()).await,
            )
            .await;
            let got = format!("{partial}{}", pieces(&ev).concat());
            if as_generated {
                assert_eq!(got, whole, "continued after {k} chunks ({partial:?})");
                assert_eq!(finish(&ev), finish(&full), "after {k} chunks");
            } else if !whole.starts_with(&got) && !got.starts_with(&whole) {
                naive_bad += 1;
            }
        }
    }
    eprintln!(
        "continuations from {} points equal the run; the naive one departs at {naive_bad}",
        points.len()
    );
}
