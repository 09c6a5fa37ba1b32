//! Tests of the OpenAI-compatible proxy backend against in-process fake upstreams.

use super::super::{ChatMessage, Role};
use super::*;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::sync::Mutex;

#[derive(Default)]
struct Recorded {
    chat: Vec<Value>,
    embeddings: Vec<Value>,
    auth: Vec<Option<String>>,
}
type Shared = Arc<Mutex<Recorded>>;

fn sse(chunks: &[Value], done: bool) -> String {
    let mut s = String::new();
    for c in chunks {
        s.push_str(&format!("data: {c}\n\n"));
    }
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s
}

async fn chat(State(rec): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let v: Value = serde_json::from_str(&body).unwrap();
    {
        let mut r = rec.lock().unwrap();
        r.chat.push(v.clone());
        r.auth.push(
            headers
                .get("authorization")
                .map(|h| h.to_str().unwrap().to_string()),
        );
    }
    match v["model"].as_str().unwrap() {
        "fail401" => (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"error":{"message":"Incorrect API key provided: sk-bad","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        )
            .into_response(),
        "fail500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error":{"message":"model crashed","type":"server_error"}}"#,
        )
            .into_response(),
        "midstream-error" => (
            [("content-type", "text/event-stream")],
            sse(
                &[
                    json!({"choices":[{"index":0,"delta":{"content":"par"}}]}),
                    json!({"error":{"message":"out of memory","code":500}}),
                ],
                false,
            ),
        )
            .into_response(),
        "nonstream" => axum::Json(json!({
            "id": "c2", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole answer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        }))
        .into_response(),
        "truncated" => (
            [("content-type", "text/event-stream")],
            sse(&[json!({"choices":[{"index":0,"delta":{"content":"par"}}]})], false),
        )
            .into_response(),
        _ => {
            let text = sse(
                &[
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}),
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}),
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo, "},"finish_reason":null}]}),
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"wörld"},"finish_reason":null}]}),
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}),
                    json!({"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}),
                ],
                true,
            );
            // Deliver in small pieces that split lines and a UTF-8 character.
            let bytes = text.into_bytes();
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                bytes.chunks(7).map(|c| Ok(c.to_vec())).collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream::iter(pieces)))
                .unwrap()
        }
    }
}

async fn embeddings(State(rec): State<Shared>, body: String) -> Response {
    let v: Value = serde_json::from_str(&body).unwrap();
    rec.lock().unwrap().embeddings.push(v.clone());
    if v["model"] == "fail500" {
        return (StatusCode::INTERNAL_SERVER_ERROR, "plain text failure").into_response();
    }
    let inputs = v["input"].as_array().unwrap();
    // Reverse order on purpose: the client must sort by index.
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, s)| {
            let len = s.as_str().unwrap().len() as f64;
            json!({"object":"embedding","index":i,"embedding":[i as f64, len, 0.5]})
        })
        .collect();
    axum::Json(json!({"object":"list","data":data,"model":v["model"]})).into_response()
}

async fn upstream() -> (String, Shared) {
    let rec: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .with_state(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), rec)
}

/// A backend for `model` at `base` whose three timeouts are all `secs`.
fn backend_timing_out(base: &str, model: &str, secs: u64) -> OpenAiProxyBackend {
    let mut cfg = OpenAiProxyConfig::new(base, model);
    cfg.api_key = Some("sk-test-secret".into());
    let t = Duration::from_secs(secs);
    cfg.timeouts = ProxyTimeouts {
        connect: t,
        first_byte: t,
        between_chunks: t,
    };
    OpenAiProxyBackend::new(cfg).unwrap()
}

fn backend(base: &str, model: &str) -> OpenAiProxyBackend {
    backend_timing_out(base, model, 10)
}

async fn collect(
    b: &OpenAiProxyBackend,
    p: GenerateParams,
) -> Vec<Result<GenerateEvent, BackendError>> {
    b.generate_stream(p).collect().await
}

fn params() -> GenerateParams {
    GenerateParams {
        messages: vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "hi"),
            ChatMessage::new(Role::Assistant, "hello"),
            ChatMessage::new(Role::User, "again"),
        ],
        temperature: Some(0.0),
        top_p: Some(0.9),
        top_k: Some(40),
        max_new_tokens: Some(3),
        stop: vec!["\n\n".into(), "END".into()],
        seed: Some(1234),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(-0.25),
        ..Default::default()
    }
}

#[tokio::test]
async fn sampling_params_reach_upstream_and_deltas_stream_in_order() {
    let (base, rec) = upstream().await;
    let b = backend(&base, "smollm2");
    let events = collect(&b, params()).await;
    let events: Vec<GenerateEvent> = events.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        events,
        vec![
            GenerateEvent::Delta { text: "Hel".into() },
            GenerateEvent::Delta {
                text: "lo, ".into()
            },
            GenerateEvent::Delta {
                text: "wörld".into()
            },
            GenerateEvent::Finish {
                finish_reason: FinishReason::Length,
                usage: Some(Usage {
                    prompt_tokens: 11,
                    completion_tokens: 3,
                    total_tokens: 14,
                    prompt_tokens_details: None,
                }),
            },
        ]
    );
    let r = rec.lock().unwrap();
    let body = &r.chat[0];
    assert_eq!(body["model"], "smollm2");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["temperature"], json!(0.0));
    assert_eq!(body["top_p"].as_f64().unwrap() as f32, 0.9);
    assert_eq!(body["top_k"], 40);
    assert_eq!(body["max_tokens"], 3);
    assert_eq!(body["seed"], 1234);
    assert_eq!(body["stop"], json!(["\n\n", "END"]));
    assert_eq!(body["presence_penalty"], json!(0.5));
    assert_eq!(body["frequency_penalty"], json!(-0.25));
    assert_eq!(
        body["messages"],
        json!([
            {"role":"system","content":"be brief"},
            {"role":"user","content":"hi"},
            {"role":"assistant","content":"hello"},
            {"role":"user","content":"again"},
        ])
    );
    assert_eq!(r.auth[0].as_deref(), Some("Bearer sk-test-secret"));
}

#[tokio::test]
async fn unset_params_are_not_sent() {
    let (base, rec) = upstream().await;
    let b = backend(&base, "smollm2");
    let p = GenerateParams {
        messages: vec![ChatMessage::new(Role::User, "hi")],
        ..Default::default()
    };
    let events = collect(&b, p).await;
    assert!(events.iter().all(Result::is_ok));
    let body = rec.lock().unwrap().chat[0].clone();
    for k in [
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
    ] {
        assert!(body.get(k).is_none(), "{k} sent: {body}");
    }
}

#[tokio::test]
async fn upstream_http_errors_carry_status_and_message() {
    let (base, _rec) = upstream().await;
    let events = collect(&backend(&base, "fail401"), params()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0],
        Err(BackendError::Upstream {
            status: Some(401),
            message: "Incorrect API key provided: sk-bad".into()
        })
    );
    let events = collect(&backend(&base, "fail500"), params()).await;
    assert_eq!(
        events,
        vec![Err(BackendError::Upstream {
            status: Some(500),
            message: "model crashed".into()
        })]
    );
}

#[tokio::test]
async fn midstream_errors_and_truncated_streams() {
    let (base, _rec) = upstream().await;
    let events = collect(&backend(&base, "midstream-error"), params()).await;
    assert_eq!(events[0], Ok(GenerateEvent::Delta { text: "par".into() }));
    assert_eq!(
        events[1],
        Err(BackendError::Upstream {
            status: Some(500),
            message: "out of memory".into()
        })
    );
    assert_eq!(events.len(), 2);
    let events = collect(&backend(&base, "truncated"), params()).await;
    assert_eq!(events.len(), 2);
    assert!(matches!(
        &events[1],
        Err(BackendError::Upstream { status: None, .. })
    ));
}

#[tokio::test]
async fn non_streamed_json_answer_is_accepted() {
    let (base, _rec) = upstream().await;
    // Used through the trait object, as the worker manager will.
    let b: Arc<dyn LlmBackend> = Arc::new(backend(&base, "nonstream"));
    let events: Vec<_> = b.generate_stream(params()).collect().await;
    assert_eq!(
        events,
        vec![
            Ok(GenerateEvent::Delta {
                text: "whole answer".into()
            }),
            Ok(GenerateEvent::Finish {
                finish_reason: FinishReason::Stop,
                usage: Some(Usage::new(5, 2)),
            }),
        ]
    );
    let e: Arc<dyn EmbeddingBackend> = Arc::new(backend(&base, "m"));
    assert_eq!(e.embed(vec!["x".into()]).await.unwrap().len(), 1);
    // The upstream's tokenizer is not here: no made-up count.
    assert!(e.count_tokens(&["x".into()]).is_err());
    assert_eq!(b.context_length(), 4096);
    assert!(b.count_tokens("hello there world").unwrap() >= 3);
}

#[tokio::test]
async fn connection_refused_is_upstream_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let b = backend(&format!("http://{addr}/v1"), "m");
    let events = collect(&b, params()).await;
    assert!(
        matches!(&events[..], [Err(BackendError::Upstream { status: None, message })] if message.contains("connect")),
        "{events:?}"
    );
    let err = b.embed(vec!["x".into()]).await.unwrap_err();
    assert!(matches!(err, BackendError::Upstream { status: None, .. }));
}

#[tokio::test]
async fn embeddings_are_ordered_by_index() {
    let (base, rec) = upstream().await;
    let b = backend(&base, "text-embedding-3-small");
    assert_eq!(b.dimension(), None);
    let inputs: Vec<String> = vec!["a".into(), "bbb".into(), "cc".into()];
    let out = b.embed(inputs).await.unwrap();
    assert_eq!(
        out,
        vec![
            vec![0.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.5],
            vec![2.0, 2.0, 0.5]
        ]
    );
    assert_eq!(b.dimension(), Some(3));
    let body = rec.lock().unwrap().embeddings[0].clone();
    assert_eq!(
        body,
        json!({"model":"text-embedding-3-small","input":["a","bbb","cc"]})
    );
    let err = backend(&base, "fail500")
        .embed(vec!["x".into()])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BackendError::Upstream {
            status: Some(500),
            message: "plain text failure".into()
        }
    );
}

#[test]
fn sse_parser_handles_split_lines_crlf_and_comments() {
    let mut p = SseChatParser::default();
    let text = ": keep-alive\r\n\r\nevent: message\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\ndata:{\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\ndata: {\"ignored\":true}\n";
    let mut events = Vec::new();
    for b in text.as_bytes() {
        events.extend(p.feed(std::slice::from_ref(b)));
    }
    events.extend(p.finish());
    assert_eq!(
        events,
        vec![
            Ok(GenerateEvent::Delta { text: "a".into() }),
            Ok(GenerateEvent::Delta { text: "b".into() }),
            Ok(GenerateEvent::Finish {
                finish_reason: FinishReason::Stop,
                usage: None
            }),
        ]
    );
}

/// Every event of `lines` fed as one SSE stream (`data: ` prefixed, then `finish`).
fn events_of(lines: &[&str]) -> Vec<Result<GenerateEvent, BackendError>> {
    let mut p = SseChatParser::default();
    let mut events = Vec::new();
    for l in lines {
        events.extend(p.feed(format!("data: {l}\n\n").as_bytes()));
    }
    events.extend(p.finish());
    events
}

#[test]
fn sse_chunks_typed_and_unusual() {
    // Escapes, unicode, null content, usage: the typed path.
    let e = events_of(&[
        r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}],"usage":null}"#,
        r#"{"choices":[{"delta":{"content":"a\n\"b\" \u00e9"}}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#,
        "[DONE]",
    ]);
    assert_eq!(
        e,
        vec![
            Ok(GenerateEvent::Delta {
                text: "a\n\"b\" é".into()
            }),
            Ok(GenerateEvent::Finish {
                finish_reason: FinishReason::Length,
                usage: Some(Usage::new(3, 2)),
            }),
        ]
    );
    // Usage without prompt_tokens is ignored; content that is not a string (the
    // general path) is skipped; a stream without [DONE] ends at its finish_reason.
    let e = events_of(&[
        r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}]}}],"usage":{"completion_tokens":1}}"#,
        r#"{"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}"#,
    ]);
    assert_eq!(
        e,
        vec![
            Ok(GenerateEvent::Delta { text: "ok".into() }),
            Ok(GenerateEvent::Finish {
                finish_reason: FinishReason::Stop,
                usage: None,
            }),
        ]
    );
    // An error object ends the stream with its message and status.
    let e = events_of(&[
        r#"{"choices":[{"delta":{"content":"a"}}]}"#,
        r#"{"error":{"message":"overloaded","code":503}}"#,
    ]);
    assert_eq!(
        e,
        vec![
            Ok(GenerateEvent::Delta { text: "a".into() }),
            Err(BackendError::Upstream {
                status: Some(503),
                message: "overloaded".into()
            }),
        ]
    );
    // A null error is no error.
    assert_eq!(
        events_of(&[
            r#"{"error":null,"choices":[{"delta":{"content":"z"},"finish_reason":"stop"}]}"#,
            "[DONE]"
        ]),
        vec![
            Ok(GenerateEvent::Delta { text: "z".into() }),
            Ok(GenerateEvent::Finish {
                finish_reason: FinishReason::Stop,
                usage: None,
            }),
        ]
    );
}

#[test]
fn error_message_extraction() {
    let s = reqwest::StatusCode::BAD_REQUEST;
    assert_eq!(
        upstream_error_message(s, r#"{"error":{"message":"m1"}}"#),
        "m1"
    );
    assert_eq!(upstream_error_message(s, r#"{"error":"m2"}"#), "m2");
    assert_eq!(upstream_error_message(s, r#"{"detail":"m3"}"#), "m3");
    assert_eq!(upstream_error_message(s, "  plain  "), "plain");
    assert_eq!(upstream_error_message(s, ""), "Bad Request");
}

#[test]
fn config_debug_redacts_key_and_bad_base_is_rejected() {
    let mut c = OpenAiProxyConfig::new("http://127.0.0.1:1/v1", "m");
    c.api_key = Some("sk-very-secret".into());
    assert!(!format!("{c:?}").contains("sk-very-secret"));
    let c = OpenAiProxyConfig::new("http://user:pw-secret@127.0.0.1:1/v1?key=q-secret", "m");
    assert!(!format!("{c:?}").contains("secret"), "{c:?}");
    assert_eq!(shown_api_base(&c.api_base), "http://127.0.0.1:1/v1");
    assert!(OpenAiProxyBackend::new(OpenAiProxyConfig::new("not a url", "m")).is_err());
    assert!(OpenAiProxyBackend::new(OpenAiProxyConfig::new("ftp://x/v1", "m")).is_err());
}

/// A test-double upstream on a raw socket: every connection's request is read and then
/// answered with `reply` (possibly nothing), after which the connection stays open and
/// silent. Returns the base URL, with credentials that must never be shown.
async fn silent_upstream(reply: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(reply).await;
                // Hold the connection open and say nothing more.
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    format!("http://user:hunter2@{addr}/v1?key=sk-query-secret")
}

fn one_second(base: &str) -> OpenAiProxyBackend {
    backend_timing_out(base, "m", 1)
}

/// The single upstream error of `events` (after any deltas), its message checked to name
/// the upstream without its credentials or query.
fn timeout_message(events: &[Result<GenerateEvent, BackendError>], base: &str) -> String {
    let Some(Err(BackendError::Upstream {
        status: None,
        message,
    })) = events.last()
    else {
        panic!("expected an upstream error last: {events:?}");
    };
    let shown = base
        .replace("user:hunter2@", "")
        .replace("?key=sk-query-secret", "");
    assert!(message.contains(&shown), "{message}");
    assert!(
        !message.contains("hunter2") && !message.contains("sk-query-secret"),
        "{message}"
    );
    message.clone()
}

/// Issue 18 item 4: an upstream that accepts and never answers ends the stream with a
/// first-byte timeout error (chat and embeddings alike); the backend keeps working.
#[tokio::test]
async fn upstream_that_never_answers_times_out_at_the_first_byte() {
    let base = silent_upstream(b"").await;
    let b = one_second(&base);
    for _ in 0..2 {
        let events = collect(&b, params()).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let m = timeout_message(&events, &base);
        assert!(m.contains("first-byte timeout") && m.contains("1s"), "{m}");
    }
    let Err(BackendError::Upstream { message, .. }) = b.embed(vec!["x".into()]).await else {
        panic!("embeddings from a silent upstream must fail");
    };
    assert!(message.contains("first-byte timeout"), "{message}");
    // Headers sent, but no first chunk: still the first-byte bound.
    let base = silent_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    let events = collect(&one_second(&base), params()).await;
    let m = timeout_message(&events, &base);
    assert!(m.contains("first-byte timeout"), "{m}");
}

/// Issue 18 item 4: an upstream that sends its head and one chunk, then goes silent,
/// ends the stream after the delta with a between-chunk timeout error.
#[tokio::test]
async fn upstream_silent_mid_stream_times_out_between_chunks() {
    let base = silent_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
          3b\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\n\r\n",
    )
    .await;
    let events = collect(&one_second(&base), params()).await;
    assert_eq!(
        events.first(),
        Some(&Ok(GenerateEvent::Delta { text: "par".into() })),
        "{events:?}"
    );
    assert_eq!(events.len(), 2, "{events:?}");
    let m = timeout_message(&events, &base);
    assert!(
        m.contains("between-chunk timeout") && m.contains("1s"),
        "{m}"
    );
}

/// A stream whose chunks each come within the between-chunk bound is not cut, however
/// long it runs in total.
#[tokio::test]
async fn steady_stream_longer_than_the_bounds_is_not_cut() {
    async fn slow(_: State<Shared>) -> Response {
        let chunks = (0..4).map(|i| {
            let last = i == 3;
            let c = json!({"choices":[{"index":0,"delta":{"content":"x"},"finish_reason": if last { json!("stop") } else { Value::Null }}]});
            format!("data: {c}\n\n{}", if last { "data: [DONE]\n\n" } else { "" })
        });
        let body = stream::iter(chunks).then(|c| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok::<_, std::io::Error>(c)
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(body))
            .unwrap()
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(slow))
        .with_state(Shared::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let events = collect(&one_second(&format!("http://{addr}/v1")), params()).await;
    assert_eq!(events.len(), 5, "{events:?}");
    assert!(events.iter().all(Result::is_ok), "{events:?}");
}
