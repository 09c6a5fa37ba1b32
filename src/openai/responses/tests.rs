use super::*;

fn body(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// The chat request made of a Responses request.
fn chat(v: Value) -> Map<String, Value> {
    to_chat(&body(v)).unwrap().0
}

fn ctx(v: Value) -> ResponsesCtx {
    to_chat(&body(v)).unwrap().1
}

/// The error a Responses request gets: (param, code, message).
fn err(v: Value) -> (String, &'static str, String) {
    let e = to_chat(&body(v)).unwrap_err();
    assert_eq!(e.status.as_u16(), 400, "{}", e.message);
    assert_eq!(e.kind, "invalid_request_error");
    (e.param.unwrap_or_default(), e.code.unwrap(), e.message)
}

fn messages(c: &Map<String, Value>) -> &Vec<Value> {
    c["messages"].as_array().unwrap()
}

#[test]
fn string_input_with_instructions() {
    let (c, x) = to_chat(&body(json!({
        "model": " m ",
        "instructions": "Be brief.",
        "input": "Hi",
    })))
    .unwrap();
    assert_eq!(
        Value::Object(c),
        json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
        })
    );
    assert!(!x.stream());
    assert_eq!(x.model(), "m");
    assert!(x.id().starts_with("resp_"), "{}", x.id());
    // Each request gets its own id.
    assert_ne!(x.id(), ctx(json!({"model": "m", "input": "Hi"})).id());
}

#[test]
fn message_items_of_every_shape() {
    let c = chat(json!({
        "model": "m",
        "input": [
            {"role": "developer", "content": "rules"},
            {"role": "system", "content": [{"type": "input_text", "text": "sys"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "a "},
                {"type": "input_text", "text": "b"},
            ]},
            // An earlier answer's output item, replayed.
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [
                {"type": "output_text", "text": "x", "annotations": []},
                {"type": "output_text", "text": "y", "annotations": []},
             ]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": "next"},
        ],
    }));
    assert_eq!(
        messages(&c),
        &vec![
            json!({"role": "system", "content": "rules"}),
            json!({"role": "system", "content": "sys"}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "a "},
                {"type": "text", "text": "b"},
            ]}),
            json!({"role": "assistant", "content": "xy"}),
            json!({"role": "user", "content": "next"}),
        ]
    );
}

#[test]
fn function_calls_and_outputs_become_chat_tool_turns() {
    let c = chat(json!({
        "model": "m",
        "input": [
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_b", "name": "weather", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rain"}]},
            {"type": "function_call", "call_id": "call_c", "name": "time", "arguments": "{}"},
        ],
    }));
    assert_eq!(
        messages(&c),
        &vec![
            json!({"role": "user", "content": "weather in Paris and Rome?"}),
            json!({"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "call_a", "content": "sunny"}),
            json!({"role": "tool", "tool_call_id": "call_b", "content": "rain"}),
            // A call after a tool answer starts a new assistant turn.
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_c", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ]}),
        ]
    );
}

#[test]
fn bad_input_items_name_the_field() {
    let m = |input: Value| json!({"model": "m", "input": input});
    let (p, code, msg) = err(m(json!([
        {"role": "user", "content": "look"},
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]},
    ])));
    assert_eq!(
        (p.as_str(), code),
        ("input[1].content[0]", "unsupported_value")
    );
    assert!(msg.contains("input_image"), "{msg}");
    let (p, code, _) = err(m(json!([{"type": "function_call_output", "call_id": "c",
        "output": [{"type": "input_text", "text": "t"}, {"type": "input_file", "file_id": "f"}]}])));
    assert_eq!(
        (p.as_str(), code),
        ("input[0].output[1]", "unsupported_value")
    );
    assert_eq!(
        err(m(json!([{"type": "item_reference", "id": "msg_1"}]))).0,
        "input[0].type"
    );
    let (p, code, _) = err(m(json!([{"type": "web_search_call", "id": "ws"}])));
    assert_eq!(
        (p.as_str(), code),
        ("input[0].type", "unsupported_parameter")
    );
    assert_eq!(err(m(json!([{"content": "no role"}]))).0, "input[0].type");
    assert_eq!(err(m(json!(["hi"]))).0, "input[0]");
    assert_eq!(
        err(m(json!([{"role": "tool", "content": "x"}]))).0,
        "input[0].role"
    );
    assert_eq!(err(m(json!([{"role": "user"}]))).0, "input[0].content");
    assert_eq!(
        err(m(json!([{"role": "user", "content": 3}]))).0,
        "input[0].content"
    );
    assert_eq!(
        err(m(json!([{"role": "user", "content": [{"type": "bogus"}]}]))).0,
        "input[0].content[0].type"
    );
    assert_eq!(
        err(m(
            json!([{"role": "user", "content": [{"type": "input_text"}]}])
        ))
        .0,
        "input[0].content[0].text"
    );
    assert_eq!(
        err(m(
            json!([{"type": "function_call", "call_id": "c", "arguments": "{}"}])
        ))
        .0,
        "input[0].name"
    );
    assert_eq!(
        err(m(
            json!([{"type": "function_call", "name": "f", "arguments": "{}"}])
        ))
        .0,
        "input[0].call_id"
    );
    assert_eq!(
        err(m(json!([{"type": "function_call_output", "call_id": "c"}]))).0,
        "input[0].output"
    );
    assert_eq!(err(m(json!(7))).0, "input");
    assert_eq!(err(m(json!([]))).0, "input");
    assert_eq!(err(json!({"model": "m"})).0, "input");
    // An empty list with instructions is a conversation of one system message.
    let c = chat(json!({"model": "m", "instructions": "x", "input": []}));
    assert_eq!(messages(&c).len(), 1);
}

#[test]
fn request_level_errors() {
    let (p, code, _) = err(json!({"input": "x"}));
    assert_eq!((p.as_str(), code), ("model", "missing_required_parameter"));
    assert_eq!(err(json!({"model": " ", "input": "x"})).0, "model");
    assert_eq!(err(json!({"model": 1, "input": "x"})).0, "model");
    assert_eq!(
        to_chat(b"{not json").unwrap_err().param.as_deref(),
        Some("body")
    );
    assert_eq!(to_chat(b"[1]").unwrap_err().param.as_deref(), Some("body"));
    // No stored state.
    for (k, v) in [
        ("previous_response_id", json!("resp_123")),
        ("conversation", json!("conv_1")),
        ("prompt", json!({"id": "pmpt_1"})),
        ("background", json!(true)),
    ] {
        let mut b = json!({"model": "m", "input": "x"});
        b[k] = v;
        let (p, code, msg) = err(b);
        assert_eq!((p.as_str(), code), (k, "unsupported_parameter"), "{msg}");
    }
    // Their absent forms are fine, and `store` is accepted either way.
    for extra in [
        json!({"previous_response_id": null, "background": false, "store": true}),
        json!({"store": false, "conversation": null}),
    ] {
        let mut b = json!({"model": "m", "input": "x"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        to_chat(&body(b)).unwrap();
    }
    assert_eq!(
        err(json!({"model": "m", "input": "x", "store": "yes"})).0,
        "store"
    );
    assert_eq!(
        err(json!({"model": "m", "input": "x", "stream": 1})).0,
        "stream"
    );
    assert_eq!(
        err(json!({"model": "m", "input": "x", "instructions": ["a"]})).0,
        "instructions"
    );
    assert_eq!(
        err(json!({"model": "m", "input": "x", "metadata": "a"})).0,
        "metadata"
    );
}

#[test]
fn options_map_to_chat_fields() {
    let (c, x) = to_chat(&body(json!({
        "model": "m",
        "input": "x",
        "max_output_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": true,
        "stream": true,
        "truncation": "auto",
        "reasoning": {"effort": "low"},
        "include": [],
        "service_tier": "auto",
        "some_vendor_extra": {"a": 1},
    })))
    .unwrap();
    assert_eq!(
        Value::Object(c),
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 64,
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u1",
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    );
    assert!(x.stream());
    let m = |k: &str, v: Value| {
        let mut b = json!({"model": "m", "input": "x"});
        b[k] = v;
        b
    };
    for bad in [json!(0), json!(-5), json!(1.5)] {
        let (p, code, _) = err(m("max_output_tokens", bad));
        assert_eq!((p.as_str(), code), ("max_output_tokens", "invalid_value"));
    }
    assert_eq!(err(m("max_output_tokens", json!("9"))).1, "invalid_type");
    assert_eq!(err(m("temperature", json!(2.5))).0, "temperature");
    assert_eq!(err(m("top_p", json!("high"))).0, "top_p");
    assert_eq!(
        err(m("parallel_tool_calls", json!("no"))).0,
        "parallel_tool_calls"
    );
    // parallel_tool_calls only goes along with tools (OpenAI's chat API refuses it alone).
    assert!(!chat(m("parallel_tool_calls", json!(false))).contains_key("parallel_tool_calls"));
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": true,
    })
}

#[test]
fn tools_and_tool_choice() {
    let c = chat(json!({
        "model": "m",
        "input": "x",
        "tools": [weather_tool(), {"type": "function", "name": "time"}],
        "tool_choice": {"type": "function", "name": "time"},
        "parallel_tool_calls": false,
    }));
    assert_eq!(
        c["tools"],
        json!([
            {"type": "function", "function": {
                "name": "weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "strict": true,
            }},
            {"type": "function", "function": {"name": "time"}},
        ])
    );
    assert_eq!(
        c["tool_choice"],
        json!({"type": "function", "function": {"name": "time"}})
    );
    assert_eq!(c["parallel_tool_calls"], json!(false));
    let with = |choice: Value| json!({"model": "m", "input": "x", "tools": [weather_tool(), {"type": "function", "name": "time"}], "tool_choice": choice});
    for s in ["auto", "none", "required"] {
        assert_eq!(chat(with(json!(s)))["tool_choice"], json!(s));
    }
    // allowed_tools narrows the tool list.
    let c = chat(with(json!({"type": "allowed_tools", "mode": "required",
        "tools": [{"type": "function", "name": "time"}]})));
    assert_eq!(c["tool_choice"], json!("required"));
    assert_eq!(
        c["tools"],
        json!([{"type": "function", "function": {"name": "time"}}])
    );
    // tool_choice without tools: auto/none are dropped, the others need tools.
    let c = chat(json!({"model": "m", "input": "x", "tool_choice": "auto"}));
    assert!(!c.contains_key("tool_choice") && !c.contains_key("tools"));
    assert_eq!(
        err(json!({"model": "m", "input": "x", "tool_choice": "required"})).0,
        "tool_choice"
    );

    let (p, code, msg) = err(with(json!({"type": "function", "name": "nope"})));
    assert_eq!((p.as_str(), code), ("tool_choice.name", "invalid_value"));
    assert!(msg.contains("nope"), "{msg}");
    assert_eq!(err(with(json!("sometimes"))).0, "tool_choice");
    assert_eq!(err(with(json!(3))).0, "tool_choice");
    assert_eq!(err(with(json!({"type": "function"}))).0, "tool_choice.name");
    let (p, code, _) = err(with(json!({"type": "file_search"})));
    assert_eq!(
        (p.as_str(), code),
        ("tool_choice.type", "unsupported_parameter")
    );
    assert_eq!(
        err(with(
            json!({"type": "allowed_tools", "mode": "always", "tools": []})
        ))
        .0,
        "tool_choice.mode"
    );
    assert_eq!(
        err(with(json!({"type": "allowed_tools", "mode": "auto",
            "tools": [{"type": "function", "name": "x"}]})))
        .0,
        "tool_choice.tools[0].name"
    );

    let t = |tools: Value| json!({"model": "m", "input": "x", "tools": tools});
    let (p, code, msg) = err(t(json!([weather_tool(), {"type": "web_search_preview"}])));
    assert_eq!(
        (p.as_str(), code),
        ("tools[1].type", "unsupported_parameter")
    );
    assert!(msg.contains("web_search_preview"), "{msg}");
    // Chat's nested shape gets a hint.
    let (p, _, msg) = err(t(json!([{"type": "function", "function": {"name": "f"}}])));
    assert_eq!(p, "tools[0].name");
    assert!(msg.contains("flat"), "{msg}");
    assert_eq!(err(t(json!([{"type": "function"}]))).0, "tools[0].name");
    assert_eq!(
        err(t(json!([{"type": "function", "name": ""}]))).0,
        "tools[0].name"
    );
    assert_eq!(err(t(json!([{"name": "f"}]))).0, "tools[0].type");
    assert_eq!(
        err(t(
            json!([{"type": "function", "name": "f", "parameters": "{}"}])
        ))
        .0,
        "tools[0].parameters"
    );
    assert_eq!(
        err(t(
            json!([{"type": "function", "name": "f", "strict": "yes"}])
        ))
        .0,
        "tools[0].strict"
    );
    assert_eq!(
        err(t(
            json!([{"type": "function", "name": "f"}, {"type": "function", "name": "f"}])
        ))
        .0,
        "tools[1].name"
    );
    assert_eq!(err(t(json!({"a": 1}))).0, "tools");
    assert_eq!(err(t(json!([1]))).0, "tools[0]");
}

#[test]
fn text_format_maps_to_response_format() {
    let f = |format: Value| chat(json!({"model": "m", "input": "x", "text": {"format": format}}));
    assert!(!f(json!({"type": "text"})).contains_key("response_format"));
    assert!(
        !chat(json!({"model": "m", "input": "x", "text": {"verbosity": "low"}}))
            .contains_key("response_format")
    );
    assert_eq!(
        f(json!({"type": "json_object"}))["response_format"],
        json!({"type": "json_object"})
    );
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    assert_eq!(
        f(
            json!({"type": "json_schema", "name": "out", "schema": schema, "strict": true, "description": "d"})
        )["response_format"],
        json!({"type": "json_schema", "json_schema": {
            "name": "out", "description": "d", "schema": schema, "strict": true,
        }})
    );
    // The body the `openai` SDK (3.63) sends for `responses.parse(text_format=City)`.
    let sdk = br#"{"model": "m", "input": [{"role": "user", "content": "a city"}], "instructions": "json only", "text": {"format": {"type": "json_schema", "strict": true, "name": "City", "schema": {"properties": {"name": {"title": "Name", "type": "string"}, "population": {"title": "Population", "type": "integer"}}, "required": ["name", "population"], "title": "City", "type": "object", "additionalProperties": false}}}}"#;
    let (c, x) = to_chat(sdk).unwrap();
    assert_eq!(c["response_format"]["type"], "json_schema");
    assert_eq!(c["response_format"]["json_schema"]["name"], "City");
    assert_eq!(c["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        c["response_format"]["json_schema"]["schema"]["required"],
        json!(["name", "population"])
    );
    assert_eq!(
        messages(&c)[0],
        json!({"role": "system", "content": "json only"})
    );
    assert_eq!(x.text["format"]["name"], "City");
    let e = |format: Value| err(json!({"model": "m", "input": "x", "text": {"format": format}}));
    assert_eq!(
        e(json!({"type": "json_schema", "name": "out"})).0,
        "text.format.schema"
    );
    assert_eq!(
        e(json!({"type": "json_schema", "name": "out", "schema": "{}"})).0,
        "text.format.schema"
    );
    assert_eq!(
        e(json!({"type": "json_schema", "schema": {}})).0,
        "text.format.name"
    );
    let (p, code, _) = e(json!({"type": "yaml"}));
    assert_eq!((p.as_str(), code), ("text.format.type", "invalid_value"));
    assert_eq!(e(json!("json")).0, "text.format");
    assert_eq!(
        err(json!({"model": "m", "input": "x", "text": "json"})).0,
        "text"
    );
}

// ---------------------------------------------------------------------------------------
// Whole answers
// ---------------------------------------------------------------------------------------

fn whole_json(x: &ResponsesCtx, answer: Value) -> Value {
    serde_json::from_slice(&whole(x, &body(answer)).unwrap()).unwrap()
}

fn chat_answer(message: Value, finish: &str) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 4}},
    })
}

#[test]
fn whole_text_answer() {
    let x = ctx(json!({
        "model": "m",
        "instructions": "Be brief.",
        "input": "Hi",
        "max_output_tokens": 50,
        "temperature": 0.5,
        "metadata": {"k": "v"},
        "store": true,
    }));
    let r = whole_json(
        &x,
        chat_answer(json!({"role": "assistant", "content": "Hello!"}), "stop"),
    );
    assert_eq!(r["id"], json!(x.id()));
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["model"], "m");
    assert!(r["created_at"].as_i64().unwrap() > 1_700_000_000);
    assert!(r["completed_at"].as_i64().unwrap() >= r["created_at"].as_i64().unwrap());
    assert_eq!(r["error"], Value::Null);
    assert_eq!(r["incomplete_details"], Value::Null);
    let out = r["output"].as_array().unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(out[0]["type"], "message");
    assert_eq!(out[0]["role"], "assistant");
    assert_eq!(out[0]["status"], "completed");
    assert_eq!(
        out[0]["content"],
        json!([{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}])
    );
    assert_eq!(
        r["usage"],
        json!({
            "input_tokens": 12,
            "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 17,
        })
    );
    // Echoes of the request, with OpenAI's defaults where nothing was sent.
    assert_eq!(r["instructions"], "Be brief.");
    assert_eq!(r["max_output_tokens"], 50);
    assert_eq!(r["temperature"], 0.5);
    assert_eq!(r["top_p"], Value::Null);
    assert_eq!(r["metadata"], json!({"k": "v"}));
    assert_eq!(r["store"], false);
    assert_eq!(r["tools"], json!([]));
    assert_eq!(r["tool_choice"], "auto");
    assert_eq!(r["parallel_tool_calls"], true);
    assert_eq!(r["text"], json!({"format": {"type": "text"}}));
    assert_eq!(r["background"], false);
}

#[test]
fn whole_tool_call_answer() {
    let schema_format = json!({"type": "json_schema", "name": "o", "schema": {"type": "object"}});
    let x = ctx(json!({
        "model": "m",
        "input": "weather?",
        "tools": [weather_tool()],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "text": {"format": schema_format, "verbosity": "low"},
    }));
    let r = whole_json(
        &x,
        chat_answer(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
            ]}),
            "tool_calls",
        ),
    );
    assert_eq!(r["status"], "completed");
    let out = r["output"].as_array().unwrap();
    assert_eq!(out.len(), 2, "no message item for a null content: {out:?}");
    for (item, (call_id, city)) in out.iter().zip([("call_1", "Paris"), ("call_2", "Rome")]) {
        assert!(item["id"].as_str().unwrap().starts_with("fc_"));
        assert_eq!(item["type"], "function_call");
        assert_eq!(item["status"], "completed");
        assert_eq!(item["call_id"], call_id);
        assert_eq!(item["name"], "weather");
        assert_eq!(item["arguments"], json!(format!("{{\"city\":\"{city}\"}}")));
    }
    assert_ne!(out[0]["id"], out[1]["id"]);
    assert_eq!(r["tools"], json!([weather_tool()]));
    assert_eq!(r["tool_choice"], "required");
    assert_eq!(r["parallel_tool_calls"], false);
    assert_eq!(
        r["text"],
        json!({"format": schema_format, "verbosity": "low"})
    );

    // Text alongside calls: the message first, then the calls.
    let r = whole_json(
        &x,
        chat_answer(
            json!({"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": "{}"}},
            ]}),
            "tool_calls",
        ),
    );
    let types: Vec<&str> = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["message", "function_call"]);
    assert_eq!(r["output"][0]["content"][0]["text"], "Let me check.");
}

#[test]
fn whole_incomplete_refusal_and_failures() {
    let x = ctx(json!({"model": "m", "input": "Hi", "max_output_tokens": 3}));
    let r = whole_json(
        &x,
        chat_answer(
            json!({"role": "assistant", "content": "Hello th"}),
            "length",
        ),
    );
    assert_eq!(r["status"], "incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["output"][0]["status"], "incomplete");
    assert!(r.get("completed_at").is_none());
    let r = whole_json(
        &x,
        chat_answer(
            json!({"role": "assistant", "content": ""}),
            "content_filter",
        ),
    );
    assert_eq!(r["incomplete_details"], json!({"reason": "content_filter"}));
    // An empty answer is still one (empty) message.
    assert_eq!(r["output"][0]["content"][0]["text"], "");

    let r = whole_json(
        &x,
        chat_answer(
            json!({"role": "assistant", "content": null, "refusal": "I can't."}),
            "stop",
        ),
    );
    assert_eq!(
        r["output"][0]["content"],
        json!([{"type": "refusal", "refusal": "I can't."}])
    );

    // No usage in the chat answer: none in the response.
    let mut a = chat_answer(json!({"role": "assistant", "content": "ok"}), "stop");
    a.as_object_mut().unwrap().remove("usage");
    assert_eq!(whole_json(&x, a)["usage"], Value::Null);

    let e = whole(
        &x,
        &body(json!({"error": {"message": "boom", "type": "server_error"}})),
    )
    .unwrap_err();
    assert_eq!(e.status.as_u16(), 502);
    assert!(e.message.contains("boom"), "{}", e.message);
    assert_eq!(whole(&x, b"<html>").unwrap_err().status.as_u16(), 502);
    assert_eq!(
        whole(&x, &body(json!({"choices": []})))
            .unwrap_err()
            .status
            .as_u16(),
        502
    );
}

fn chat_logprobs(tokens: &[(&str, f64)]) -> Value {
    json!({"content": tokens.iter().map(|(t, lp)| json!({
        "token": t, "logprob": lp, "bytes": t.as_bytes(),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": t.as_bytes()}, {"token": "zz", "logprob": -9.0, "bytes": null}],
    })).collect::<Vec<_>>()})
}

#[test]
fn logprobs_when_included() {
    let req = json!({"model": "m", "input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 2});
    let c = chat(req.clone());
    assert_eq!(
        (&c["logprobs"], &c["top_logprobs"]),
        (&json!(true), &json!(2))
    );
    // top_logprobs alone asks for them too; neither: no chat logprobs.
    assert_eq!(
        chat(json!({"model": "m", "input": "x", "top_logprobs": 1}))["logprobs"],
        json!(true)
    );
    let c = chat(
        json!({"model": "m", "input": "x", "include": ["reasoning.encrypted_content"], "top_logprobs": 0}),
    );
    assert!(!c.contains_key("logprobs") && !c.contains_key("top_logprobs"));
    let (p, code, _) = err(json!({"model": "m", "input": "x", "top_logprobs": 21}));
    assert_eq!((p.as_str(), code), ("top_logprobs", "invalid_value"));
    assert_eq!(
        err(json!({"model": "m", "input": "x", "include": "all"})).0,
        "include"
    );
    assert_eq!(
        err(json!({"model": "m", "input": "x", "include": [1]})).0,
        "include[0]"
    );

    let mut a = chat_answer(json!({"role": "assistant", "content": "Hi!"}), "stop");
    a["choices"][0]["logprobs"] = chat_logprobs(&[("Hi", -0.5), ("!", -1.0)]);
    let r = whole_json(&ctx(req.clone()), a.clone());
    let lp = &r["output"][0]["content"][0]["logprobs"];
    assert_eq!(lp.as_array().unwrap().len(), 2);
    assert_eq!(lp[0]["token"], "Hi");
    assert_eq!(lp[0]["bytes"], json!([72, 105]));
    assert_eq!(lp[1]["logprob"], -1.0);
    assert_eq!(
        lp[1]["top_logprobs"][1],
        json!({"token": "zz", "bytes": [122, 122], "logprob": -9.0})
    );
    assert_eq!(r["top_logprobs"], 2);
    // Not asked for: none, whatever the chat side sent.
    let r = whole_json(&ctx(json!({"model": "m", "input": "x"})), a);
    assert_eq!(r["output"][0]["content"][0]["logprobs"], json!([]));

    let mut s = ResponsesStream::new(ctx(req));
    let with_lp = |content: &str, tokens: &[(&str, f64)], finish: Option<&str>| {
        let mut c: Value =
            serde_json::from_slice(&chunk(json!({"content": content}), finish)).unwrap();
        c["choices"][0]["logprobs"] = chat_logprobs(tokens);
        body(c)
    };
    let payloads = [
        with_lp("Hi", &[("Hi", -0.5)], None),
        with_lp("!", &[("!", -1.0)], Some("stop")),
        b"[DONE]".to_vec(),
    ];
    let ev = parse_events(&run(&mut s, &payloads), 0);
    let deltas: Vec<&Value> = ev
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert_eq!(
        deltas[0]["logprobs"],
        json!([{"token": "Hi", "logprob": -0.5, "top_logprobs": [
            {"token": "Hi", "logprob": -0.5}, {"token": "zz", "logprob": -9.0}]}])
    );
    let done = ev
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(done["logprobs"].as_array().unwrap().len(), 2);
    assert!(done["logprobs"][0].get("bytes").is_none());
    let fin = &ev.last().unwrap()["response"]["output"][0]["content"][0]["logprobs"];
    assert_eq!(fin[1]["bytes"], json!([33]));
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

/// Parses SSE events, checking the framing (`event: T\ndata: {...}\n\n`, the data's `type`
/// equal to the event name) and that sequence numbers count up from `first_seq`.
fn parse_events(chunks: &[Bytes], first_seq: u64) -> Vec<Value> {
    let mut out = Vec::new();
    for (n, c) in chunks.iter().enumerate() {
        let s = std::str::from_utf8(c).unwrap();
        let rest = s.strip_prefix("event: ").expect(s);
        let (name, rest) = rest.split_once("\ndata: ").expect(s);
        let data = rest.strip_suffix("\n\n").expect(s);
        assert!(!data.contains('\n'), "{s}");
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], name, "{s}");
        assert_eq!(v["sequence_number"], json!(first_seq + n as u64), "{s}");
        out.push(v);
    }
    out
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn chunk(delta: Value, finish: Option<&str>) -> Vec<u8> {
    body(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null,
    }))
}

fn usage_chunk() -> Vec<u8> {
    body(json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }))
}

/// Feeds every payload (the chat stream), returning all the events.
fn run(s: &mut ResponsesStream, payloads: &[Vec<u8>]) -> Vec<Bytes> {
    payloads.iter().flat_map(|p| s.feed(p)).collect()
}

#[test]
fn streamed_text() {
    let x = ctx(json!({"model": "m", "input": "Hi", "stream": true, "instructions": "I"}));
    let id = x.id().to_string();
    let mut s = ResponsesStream::new(x);
    let all = run(
        &mut s,
        &[
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Hel"}), None),
            chunk(json!({"content": "lo"}), None),
            chunk(json!({}), Some("stop")),
            usage_chunk(),
            b"[DONE]".to_vec(),
        ],
    );
    assert!(s.ended());
    let ev = parse_events(&all, 0);
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for e in [&ev[0], &ev[1]] {
        assert_eq!(e["response"]["id"], json!(id));
        assert_eq!(e["response"]["status"], "in_progress");
        assert_eq!(e["response"]["output"], json!([]));
        assert_eq!(e["response"]["instructions"], "I");
    }
    let item_id = ev[2]["item"]["id"].as_str().unwrap();
    assert!(item_id.starts_with("msg_"));
    assert_eq!(ev[2]["output_index"], 0);
    assert_eq!(ev[2]["item"]["status"], "in_progress");
    assert_eq!(ev[2]["item"]["content"], json!([]));
    assert_eq!(ev[3]["part"]["type"], "output_text");
    assert_eq!(ev[3]["part"]["text"], "");
    for e in &ev[3..9] {
        assert_eq!(
            e["item_id"].as_str().or(e["item"]["id"].as_str()),
            Some(item_id)
        );
        assert_eq!(e["output_index"], 0);
    }
    assert_eq!(
        (ev[4]["delta"].as_str(), ev[5]["delta"].as_str()),
        (Some("Hel"), Some("lo"))
    );
    assert_eq!(ev[4]["content_index"], 0);
    assert_eq!(ev[4]["logprobs"], json!([]));
    assert_eq!(ev[6]["text"], "Hello");
    assert_eq!(ev[7]["part"]["text"], "Hello");
    assert_eq!(ev[8]["item"]["status"], "completed");
    assert_eq!(ev[8]["item"]["content"][0]["text"], "Hello");
    let r = &ev[9]["response"];
    assert_eq!(r["id"], json!(id));
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"], json!([ev[8]["item"]]));
    assert_eq!(r["usage"]["input_tokens"], 7);
    assert_eq!(r["usage"]["output_tokens"], 3);
    assert_eq!(r["usage"]["total_tokens"], 10);
    // The Responses stream has no [DONE]; nothing follows the end.
    assert!(s.feed(&chunk(json!({"content": "late"}), None)).is_empty());
    assert!(s.finish().is_empty());
}

#[test]
fn streamed_text_then_tool_calls() {
    let x =
        ctx(json!({"model": "m", "input": "weather?", "stream": true, "tools": [weather_tool()]}));
    let mut s = ResponsesStream::new(x);
    let mut all = s.start();
    assert!(s.start().is_empty(), "the opening events come once");
    all.extend(run(
        &mut s,
        &[
            chunk(json!({"role": "assistant", "content": "Checking."}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                "function": {"name": "weather", "arguments": ""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                None,
            ),
            // The second call arrives with its first fragment.
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
            usage_chunk(),
            b"[DONE]".to_vec(),
        ],
    ));
    let ev = parse_events(&all, 0);
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let call_a = &ev[8]["item"];
    assert_eq!(ev[8]["output_index"], 1);
    assert_eq!(call_a["type"], "function_call");
    assert_eq!(call_a["call_id"], "call_a");
    assert_eq!(call_a["name"], "weather");
    assert_eq!(call_a["arguments"], "");
    assert_eq!(call_a["status"], "in_progress");
    let fc_a = call_a["id"].as_str().unwrap();
    assert!(fc_a.starts_with("fc_"));
    for e in &ev[9..12] {
        assert_eq!(
            (e["item_id"].as_str(), e["output_index"].as_u64()),
            (Some(fc_a), Some(1))
        );
    }
    assert_eq!(ev[11]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(ev[12]["item"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(ev[12]["item"]["status"], "completed");
    assert_eq!(ev[13]["output_index"], 2);
    assert_eq!(ev[13]["item"]["call_id"], "call_b");
    assert_eq!(ev[14]["delta"], "{\"city\":\"Rome\"}");
    let r = &ev[17]["response"];
    assert_eq!(r["status"], "completed");
    let out = r["output"].as_array().unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0]["content"][0]["text"], "Checking.");
    assert_eq!(out[1], ev[12]["item"]);
    assert_eq!(out[2], ev[16]["item"]);
    assert_eq!(r["tools"], json!([weather_tool()]));
}

#[test]
fn streamed_call_without_id_and_interleaved_fragments() {
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let all = run(
        &mut s,
        &[
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "{}"}}]}),
                None,
            ),
            // A late fragment of the first (closed) call.
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ],
    );
    let ev = parse_events(&all, 0);
    // A call without an id gets one.
    assert!(
        ev[2]["item"]["call_id"]
            .as_str()
            .unwrap()
            .starts_with("call_")
    );
    // No event for a closed item; its arguments still reach the final object.
    assert!(!ev.iter().any(|e| e["delta"] == "1}"));
    let end = parse_events(&s.finish(), ev.len() as u64);
    assert_eq!(types(&end).last(), Some(&"response.completed"));
    let out = &end.last().unwrap()["response"]["output"];
    assert_eq!(out[0]["arguments"], "{\"a\":1}");
    assert_eq!(out[1]["name"], "g");
}

#[test]
fn streamed_length_limit_is_incomplete() {
    let mut s = ResponsesStream::new(ctx(
        json!({"model": "m", "input": "x", "stream": true, "max_output_tokens": 2}),
    ));
    let all = run(
        &mut s,
        &[
            chunk(json!({"content": "Hel"}), None),
            chunk(json!({"content": "lo"}), Some("length")),
        ],
    );
    // Ended by the relay without [DONE]: a finish reason was seen, so it completes.
    let mut all = all;
    all.extend(s.finish());
    let ev = parse_events(&all, 0);
    let t = types(&ev);
    assert_eq!(t.last(), Some(&"response.incomplete"));
    assert!(!t.contains(&"response.completed"));
    let done = ev
        .iter()
        .find(|e| e["type"] == "response.output_item.done")
        .unwrap();
    assert_eq!(done["item"]["status"], "incomplete");
    let r = &ev.last().unwrap()["response"];
    assert_eq!(r["status"], "incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["output"][0]["status"], "incomplete");
    assert_eq!(r["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(r["max_output_tokens"], 2);
}

#[test]
fn streamed_failures() {
    // An error chunk mid-stream.
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let all = run(
        &mut s,
        &[
            chunk(json!({"content": "Hel"}), None),
            body(json!({"error": {"message": "worker died", "type": "server_error"}})),
        ],
    );
    let ev = parse_events(&all, 0);
    assert_eq!(types(&ev).last(), Some(&"response.failed"));
    let r = &ev.last().unwrap()["response"];
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"]["code"], "server_error");
    assert_eq!(r["error"]["message"], "worker died");
    // What was said so far stays, unfinished.
    assert_eq!(r["output"][0]["content"][0]["text"], "Hel");
    assert_eq!(r["output"][0]["status"], "incomplete");
    assert!(s.ended());
    assert!(s.feed(b"[DONE]").is_empty());

    // A stream that stops before any finish.
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let mut all = run(&mut s, &[chunk(json!({"content": "a"}), None)]);
    all.extend(s.finish());
    let ev = parse_events(&all, 0);
    assert_eq!(types(&ev).last(), Some(&"response.failed"));
    assert!(
        ev.last().unwrap()["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ended before it finished")
    );

    // A malformed chunk, as the very first thing.
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let ev = parse_events(&s.feed(b"{oops"), 0);
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.failed"
        ]
    );
    assert!(
        ev[2]["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed")
    );

    // The relay's own failure.
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let ev = parse_events(&s.fail_with("the worker stream broke"), 0);
    assert_eq!(
        ev[2]["response"]["error"]["message"],
        "the worker stream broke"
    );
    assert!(s.fail_with("again").is_empty());
}

#[test]
fn empty_stream_is_one_empty_message() {
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let all = run(
        &mut s,
        &[
            chunk(json!({"role": "assistant"}), Some("stop")),
            b"[DONE]".to_vec(),
        ],
    );
    let ev = parse_events(&all, 0);
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let out = &ev[7]["response"]["output"];
    assert_eq!(out.as_array().unwrap().len(), 1);
    assert_eq!(out[0]["content"][0]["text"], "");
    assert_eq!(out[0]["status"], "completed");
}

/// Writes sample answers (whole JSON and SSE streams) for a check with the official `openai`
/// Python SDK: `RESPONSES_SDK_DIR=/tmp/x cargo test --lib responses::tests::sdk_samples --
/// --ignored`, then `python3 src/openai/responses/sdk_check.py /tmp/x` (needs `pip install
/// openai`) parses every one with the SDK's pydantic types and replays the streams through
/// its `responses.stream()` accumulator.
#[test]
#[ignore = "writes files for the Python SDK check"]
fn sdk_samples() {
    let dir = std::path::PathBuf::from(std::env::var("RESPONSES_SDK_DIR").unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    let req = json!({
        "model": "m", "input": "weather?", "instructions": "Be brief.",
        "tools": [weather_tool()], "tool_choice": "auto", "max_output_tokens": 100,
        "metadata": {"k": "v"}, "text": {"format": {"type": "text"}},
    });
    let x = ctx(req.clone());
    write(
        "whole_text.json",
        &whole(
            &x,
            &body(chat_answer(
                json!({"role": "assistant", "content": "Sunny."}),
                "stop",
            )),
        )
        .unwrap(),
    );
    write(
        "whole_tools.json",
        &whole(
            &x,
            &body(chat_answer(
                json!({"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                ]}),
                "tool_calls",
            )),
        )
        .unwrap(),
    );
    write(
        "whole_incomplete.json",
        &whole(
            &x,
            &body(chat_answer(
                json!({"role": "assistant", "content": "Sun"}),
                "length",
            )),
        )
        .unwrap(),
    );
    let stream = |name: &str, payloads: &[Vec<u8>], finish: bool| {
        let mut s = ResponsesStream::new(ctx(req.clone()));
        let mut all = run(&mut s, payloads);
        if finish {
            all.extend(s.finish());
        }
        write(name, &all.concat());
    };
    stream(
        "stream_text.sse",
        &[
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Sun"}), None),
            chunk(json!({"content": "ny."}), None),
            chunk(json!({}), Some("stop")),
            usage_chunk(),
            b"[DONE]".to_vec(),
        ],
        false,
    );
    stream(
        "stream_tools.sse",
        &[
            chunk(json!({"role": "assistant", "content": "Checking."}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                "function": {"name": "weather", "arguments": ""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
            usage_chunk(),
            b"[DONE]".to_vec(),
        ],
        false,
    );
    stream(
        "stream_incomplete.sse",
        &[
            chunk(json!({"content": "Sun"}), Some("length")),
            usage_chunk(),
        ],
        true,
    );
    let lp_req = json!({"model": "m", "input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 2});
    let mut a = chat_answer(json!({"role": "assistant", "content": "Hi!"}), "stop");
    a["choices"][0]["logprobs"] = chat_logprobs(&[("Hi", -0.5), ("!", -1.0)]);
    write(
        "whole_logprobs.json",
        &whole(&ctx(lp_req.clone()), &body(a)).unwrap(),
    );
    let mut s = ResponsesStream::new(ctx(lp_req));
    let lp_chunks: Vec<Vec<u8>> = [("Hi", -0.5, None), ("!", -1.0, Some("stop"))]
        .into_iter()
        .map(|(t, lp, finish)| {
            let mut c: Value =
                serde_json::from_slice(&chunk(json!({"content": t}), finish)).unwrap();
            c["choices"][0]["logprobs"] = chat_logprobs(&[(t, lp)]);
            body(c)
        })
        .chain([usage_chunk(), b"[DONE]".to_vec()])
        .collect();
    write("stream_logprobs.sse", &run(&mut s, &lp_chunks).concat());
    stream(
        "stream_failed.sse",
        &[
            chunk(json!({"content": "Sun"}), None),
            body(json!({"error": {"message": "worker died", "type": "server_error"}})),
        ],
        false,
    );
}

/// A chat SSE stream as a worker sends it.
fn sse_stream(payloads: &[Vec<u8>], crlf: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(b": keep-alive\n\n");
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(p);
        out.extend_from_slice(if crlf { b"\r\n\r\n" } else { b"\n\n" });
    }
    out
}

#[test]
fn raw_sse_split_anywhere_gives_the_same_events() {
    let payloads = [
        chunk(json!({"role": "assistant", "content": "Hé"}), None),
        chunk(json!({"content": "llo"}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "c", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
        usage_chunk(),
        b"[DONE]".to_vec(),
    ];
    let fresh = || ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let mut s = fresh();
    let want = parse_events(&run(&mut s, &payloads), 0);
    let summary = |ev: &[Value]| -> Vec<(String, Value, Value)> {
        ev.iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["delta"].clone(),
                    e["text"].clone(),
                )
            })
            .collect()
    };
    for crlf in [false, true] {
        let raw = sse_stream(&payloads, crlf);
        for size in [1, 2, 5, 17, raw.len()] {
            let mut s = fresh();
            let got: Vec<Bytes> = raw.chunks(size).flat_map(|c| s.feed_sse(c)).collect();
            assert!(s.finish().is_empty(), "size {size}");
            let got = parse_events(&got, 0);
            assert_eq!(summary(&got), summary(&want), "size {size} crlf {crlf}");
            assert_eq!(
                got.last().unwrap()["response"]["output"][0]["content"][0]["text"],
                "Héllo"
            );
        }
    }
    // A last event without its blank line (or newline), a data field split in two lines,
    // and an empty data event (skipped, not an error).
    let mut s = fresh();
    let mut got = s.feed_sse(b"data:\n\ndata: {\"choices\":[{\"index\":0,\n");
    got.extend(s.feed_sse(
        b"data: \"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]",
    ));
    got.extend(s.finish());
    let ev = parse_events(&got, 0);
    assert_eq!(types(&ev).last(), Some(&"response.completed"));
    assert_eq!(
        ev.last().unwrap()["response"]["output"][0]["content"][0]["text"],
        "ok"
    );
}

#[test]
fn text_after_a_tool_call_is_a_new_message() {
    let mut s = ResponsesStream::new(ctx(json!({"model": "m", "input": "x", "stream": true})));
    let all = run(
        &mut s,
        &[
            chunk(json!({"content": "a"}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]}),
                None,
            ),
            chunk(json!({"content": "b"}), Some("stop")),
            b"[DONE]".to_vec(),
        ],
    );
    let ev = parse_events(&all, 0);
    // Every item is done before the next one is added.
    let mut open: Option<u64> = None;
    for e in &ev {
        match e["type"].as_str().unwrap() {
            "response.output_item.added" => {
                assert_eq!(open, None, "item added while {open:?} is open: {e}");
                open = e["output_index"].as_u64();
            }
            "response.output_item.done" => {
                assert_eq!(open, e["output_index"].as_u64(), "{e}");
                open = None;
            }
            _ => {}
        }
    }
    let out = &ev.last().unwrap()["response"]["output"];
    let kinds: Vec<&str> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["message", "function_call", "message"]);
    assert_eq!(out[2]["content"][0]["text"], "b");
    assert_ne!(out[0]["id"], out[2]["id"]);
}
