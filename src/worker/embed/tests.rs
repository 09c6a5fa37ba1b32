use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::*;

/// A test double: vector `i` of text `t` is `vector_of(t, len)`, a text counts its
/// whitespace-separated words plus 2 (as if `[CLS]`/`[SEP]` were added).
struct Fake {
    /// What `dimension()` says.
    dimension: Option<usize>,
    /// The length of the vectors `embed` gives.
    len: usize,
    embed_error: Option<BackendError>,
    count_error: Option<BackendError>,
    /// Drop the last vector (a broken backend).
    drop_one: bool,
    embed_calls: AtomicUsize,
    seen: Mutex<Vec<String>>,
}

impl Fake {
    fn new(len: usize) -> Fake {
        Fake {
            dimension: Some(len),
            len,
            embed_error: None,
            count_error: None,
            drop_one: false,
            embed_calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        }
    }
}

/// Values with long mantissas and both signs, distinct per text and position.
fn vector_of(text: &str, len: usize) -> Vec<f32> {
    let seed = text.len() as f32 + 1.0;
    (0..len)
        .map(|i| {
            let x = (i as f32 + 1.0) / (3.0 * seed);
            if i % 2 == 0 { x } else { -x * 1e-3 }
        })
        .collect()
}

impl EmbeddingBackend for Fake {
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>> {
        self.embed_calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().extend(inputs.iter().cloned());
        let result = match &self.embed_error {
            Some(e) => Err(e.clone()),
            None => {
                let mut v: Vec<Vec<f32>> = inputs.iter().map(|t| vector_of(t, self.len)).collect();
                if self.drop_one {
                    v.pop();
                }
                Ok(v)
            }
        };
        Box::pin(async move { result })
    }

    fn dimension(&self) -> Option<usize> {
        self.dimension
    }

    fn count_tokens(&self, texts: &[String]) -> Result<usize, BackendError> {
        match &self.count_error {
            Some(e) => Err(e.clone()),
            None => Ok(texts.iter().map(|t| t.split_whitespace().count() + 2).sum()),
        }
    }
}

async fn answer(fake: Fake, body: &str) -> (Arc<Fake>, Result<Value, OpenAiError>) {
    let fake = Arc::new(fake);
    let backend: Arc<dyn EmbeddingBackend> = fake.clone();
    let r = embeddings(backend, body.as_bytes()).await.map(|b| {
        serde_json::from_slice::<Value>(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b:?}"))
    });
    (fake, r)
}

/// Test-side base64 decoder (RFC 4648, padded), independent of `base64_f32`.
fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    assert_eq!(s.len() % 4, 0, "unpadded base64 {s}");
    let mut out = Vec::new();
    for quad in s.as_bytes().chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = quad
            .iter()
            .map(|&c| if c == b'=' { 0 } else { val(c) })
            .fold(0u32, |acc, v| (acc << 6) | v);
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

fn f32s_of(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The vector of one answer item, whichever encoding it came in.
fn vector_in(item: &Value) -> Vec<f32> {
    match &item["embedding"] {
        Value::String(s) => f32s_of(&decode_base64(s)),
        Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        v => panic!("embedding is {v}"),
    }
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

#[tokio::test]
async fn float_answer_has_openais_shape_and_real_usage() {
    let (fake, r) = answer(
        Fake::new(5),
        r#"{"model":"my-embedder","input":["one two three","four"],"user":"u-1","extra":{"x":[1]}}"#,
    )
    .await;
    let v = r.unwrap();
    assert_eq!(keys(&v), ["object", "data", "model", "usage"]);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "my-embedder");
    // (3 words + 2) + (1 word + 2), as the fake counts.
    assert_eq!(v["usage"], json!({"prompt_tokens": 8, "total_tokens": 8}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, (item, text)) in data.iter().zip(["one two three", "four"]).enumerate() {
        assert_eq!(keys(item), ["object", "index", "embedding"]);
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert!(item["embedding"].is_array());
        // Every f32 survives the decimal round trip exactly.
        assert_eq!(vector_in(item), vector_of(text, 5), "item {i}");
    }
    assert_eq!(fake.embed_calls.load(Ordering::SeqCst), 1);
    assert_eq!(*fake.seen.lock().unwrap(), ["one two three", "four"]);
}

#[tokio::test]
async fn a_string_input_is_one_item_and_encoding_float_is_the_default() {
    for body in [
        r#"{"model":"m","input":"hello there"}"#,
        r#"{"model":"m","input":"hello there","encoding_format":"float"}"#,
        r#"{"model":"m","input":"hello there","encoding_format":null,"dimensions":null}"#,
    ] {
        let v = answer(Fake::new(3), body).await.1.unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(v["data"][0]["index"], 0);
        assert_eq!(vector_in(&v["data"][0]), vector_of("hello there", 3));
        assert_eq!(v["usage"]["prompt_tokens"], 4, "{body}");
    }
}

#[tokio::test]
async fn base64_is_little_endian_f32_and_round_trips() {
    let body = r#"{"model":"m","input":["a","bb","a longer text"],"encoding_format":"base64"}"#;
    let v = answer(Fake::new(7), body).await.1.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (item, text) in data.iter().zip(["a", "bb", "a longer text"]) {
        let s = item["embedding"].as_str().expect("base64 is a string");
        let bytes = decode_base64(s);
        assert_eq!(bytes.len(), 7 * 4);
        let got = f32s_of(&bytes);
        let want = vector_of(text, 7);
        // Bit for bit, not approximately.
        assert_eq!(
            got.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
    }
    // The same request as floats gives the same vectors.
    let floats = answer(Fake::new(7), &body.replace("base64", "float"))
        .await
        .1
        .unwrap();
    for (a, b) in floats["data"].as_array().unwrap().iter().zip(data) {
        assert_eq!(vector_in(a), vector_in(b));
    }
    assert_eq!(floats["usage"], v["usage"]);
}

#[tokio::test]
async fn dimensions_equal_to_the_models_size_is_accepted() {
    for d in ["4", "4.0"] {
        let body = format!(r#"{{"model":"m","input":"x","dimensions":{d}}}"#);
        let v = answer(Fake::new(4), &body).await.1.unwrap();
        assert_eq!(vector_in(&v["data"][0]).len(), 4, "{body}");
    }
    // A backend that learns its size only from its answer is checked on the answer.
    let unknown = || Fake {
        dimension: None,
        ..Fake::new(4)
    };
    let body = r#"{"model":"m","input":"x","dimensions":4}"#;
    assert!(answer(unknown(), body).await.1.is_ok());
    let (fake, r) = answer(unknown(), &body.replace(":4", ":3")).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.status, e.param.as_deref()),
        (StatusCode::BAD_REQUEST, Some("dimensions"))
    );
    assert!(e.message.contains("only dimensions=4"), "{}", e.message);
    assert_eq!(fake.embed_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn other_dimensions_are_a_400_saying_the_models_size_before_any_work() {
    for d in ["3", "383", "385", "1536"] {
        let body = format!(r#"{{"model":"m","input":["x","y"],"dimensions":{d}}}"#);
        let (fake, r) = answer(Fake::new(384), &body).await;
        let e = r.unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(e.kind, "invalid_request_error");
        assert_eq!(e.param.as_deref(), Some("dimensions"));
        assert_eq!(e.code, Some("invalid_value"));
        assert!(
            e.message.contains("supports only dimensions=384")
                && e.message.contains(&format!("got dimensions={d}")),
            "{}",
            e.message
        );
        assert_eq!(fake.embed_calls.load(Ordering::SeqCst), 0, "{body}");
    }
}

#[tokio::test]
async fn every_bad_request_is_a_400_naming_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("", "body", "invalid_json"),
        ("  \n", "body", "invalid_json"),
        ("{", "body", "invalid_json"),
        ("[1]", "body", "invalid_json"),
        (r#""text""#, "body", "invalid_json"),
        (r#"{"input":"x"}"#, "model", "missing_required_parameter"),
        (r#"{"model":" ","input":"x"}"#, "model", "invalid_value"),
        (r#"{"model":7,"input":"x"}"#, "model", "invalid_type"),
        (r#"{"model":"m"}"#, "input", "missing_required_parameter"),
        (
            r#"{"model":"m","input":null}"#,
            "input",
            "missing_required_parameter",
        ),
        (r#"{"model":"m","input":[]}"#, "input", "invalid_value"),
        // Token arrays: ids of some other tokenizer's vocabulary.
        (r#"{"model":"m","input":[1,2,3]}"#, "input", "invalid_type"),
        (
            r#"{"model":"m","input":[[1,2],[3]]}"#,
            "input",
            "invalid_type",
        ),
        (r#"{"model":"m","input":["a",2]}"#, "input", "invalid_type"),
        (
            r#"{"model":"m","input":{"text":"a"}}"#,
            "input",
            "invalid_type",
        ),
        (r#"{"model":"m","input":5}"#, "input", "invalid_type"),
        (
            r#"{"model":"m","input":"x","encoding_format":"int8"}"#,
            "encoding_format",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","encoding_format":"FLOAT"}"#,
            "encoding_format",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","encoding_format":1}"#,
            "encoding_format",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":0}"#,
            "dimensions",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":-4}"#,
            "dimensions",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":1.5}"#,
            "dimensions",
            "invalid_value",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":"4"}"#,
            "dimensions",
            "invalid_type",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":true}"#,
            "dimensions",
            "invalid_type",
        ),
        (
            r#"{"model":"m","input":"x","dimensions":[4]}"#,
            "dimensions",
            "invalid_type",
        ),
    ];
    for (body, param, code) in cases {
        let (fake, r) = answer(Fake::new(4), body).await;
        let e = r.expect_err(body);
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(e.kind, "invalid_request_error", "{body}");
        assert_eq!(e.param.as_deref(), Some(*param), "{body}: {}", e.message);
        assert_eq!(e.code, Some(*code), "{body}: {}", e.message);
        assert!(!e.message.is_empty());
        assert_eq!(fake.embed_calls.load(Ordering::SeqCst), 0, "{body}");
    }
    // More inputs than OpenAI accepts in one request.
    let many = serde_json::to_string(&json!({"model": "m", "input": vec!["a"; 2049]})).unwrap();
    let e = answer(Fake::new(4), &many).await.1.unwrap_err();
    assert_eq!(
        (e.status, e.param.as_deref()),
        (StatusCode::BAD_REQUEST, Some("input"))
    );
    let most = serde_json::to_string(&json!({"model": "m", "input": vec!["a"; 2048]})).unwrap();
    let v = answer(Fake::new(4), &most).await.1.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2048);
    assert_eq!(v["data"][2047]["index"], 2047);
    assert_eq!(v["usage"]["prompt_tokens"], 3 * 2048);
}

#[tokio::test]
async fn backend_failures_map_to_openai_errors() {
    let body = r#"{"model":"m","input":["a","b"]}"#;
    let with_embed_error = |e: BackendError| Fake {
        embed_error: Some(e),
        ..Fake::new(4)
    };
    // The model refusing the input is the client's error.
    let e = answer(
        with_embed_error(BackendError::BadRequest("text has a NUL byte".into())),
        body,
    )
    .await
    .1
    .unwrap_err();
    assert_eq!(
        (e.status, e.param.as_deref(), e.code, e.message.as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("input"),
            Some("invalid_input"),
            "text has a NUL byte"
        )
    );
    // A failing model is the server's.
    let e = answer(
        with_embed_error(BackendError::internal("BERT forward failed: oom")),
        body,
    )
    .await
    .1
    .unwrap_err();
    assert_eq!(
        (e.status, e.kind, e.param),
        (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None)
    );
    assert!(
        e.message.contains("BERT forward failed: oom"),
        "{}",
        e.message
    );
    // An upstream's refusal keeps its status; its other failures are a bad gateway.
    let e = answer(
        with_embed_error(BackendError::Upstream {
            status: Some(413),
            message: "too big".into(),
        }),
        body,
    )
    .await
    .1
    .unwrap_err();
    assert_eq!(
        (e.status.as_u16(), e.param.as_deref()),
        (413, Some("input"))
    );
    let e = answer(
        with_embed_error(BackendError::Upstream {
            status: Some(503),
            message: "down".into(),
        }),
        body,
    )
    .await
    .1
    .unwrap_err();
    assert_eq!((e.status.as_u16(), e.param), (502, None));
    // A backend that cannot count tokens fails before embedding anything.
    let (fake, r) = answer(
        Fake {
            count_error: Some(BackendError::internal("cannot count")),
            ..Fake::new(4)
        },
        body,
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(e.message.contains("cannot count"), "{}", e.message);
    assert_eq!(fake.embed_calls.load(Ordering::SeqCst), 0);
    // A backend answering fewer vectors than inputs is a server error, not a short list.
    let e = answer(
        Fake {
            drop_one: true,
            ..Fake::new(4)
        },
        body,
    )
    .await
    .1
    .unwrap_err();
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        e.message.contains("1 embeddings for 2 inputs"),
        "{}",
        e.message
    );
}

/// The real all-MiniLM-L6-v2: `usage.prompt_tokens` is what its tokenizer counts (computed
/// here from `tokenizer.json` directly, truncation done by hand), and the vectors are the
/// backend's own.
#[cfg(feature = "local-models")]
#[tokio::test]
async fn minilm_usage_is_the_tokenizers_count_and_vectors_are_the_models() {
    use crate::worker::backends::{BertEmbeddingBackend, BertEmbeddingConfig, require_test_model};

    let dir = require_test_model("all-MiniLM-L6-v2");
    let config = BertEmbeddingConfig::new(&dir);
    let max_length = config.max_length;
    let backend = BertEmbeddingBackend::load_async(config).await.unwrap();
    let long = format!("{} ünïcödé end", "word ".repeat(400));
    let inputs = vec![
        "hello world".to_string(),
        // Short and long in one sub-batch: padding must not be counted.
        long.clone(),
        "The quick brown fox jumps over the lazy dog.".to_string(),
        String::new(),
    ];

    // Independent count: the raw tokenizer, no padding, no truncation; then the cap.
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    let full: Vec<usize> = inputs
        .iter()
        .map(|t| tok.encode(t.as_str(), true).unwrap().get_ids().len())
        .collect();
    assert_eq!(full[0], 4, "[CLS] hello world [SEP]");
    assert_eq!(full[3], 2, "[CLS] [SEP]");
    assert!(
        full[1] > max_length,
        "the long input must be truncated: {full:?}"
    );
    let expected: usize = full.iter().map(|&n| n.min(max_length)).sum();

    let backend: Arc<dyn EmbeddingBackend> = Arc::new(backend);
    let body = json!({"model": "all-MiniLM-L6-v2", "input": inputs, "dimensions": 384});
    let v: Value = serde_json::from_slice(
        &embeddings(backend.clone(), body.to_string().as_bytes())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], expected);
    assert_eq!(v["usage"]["total_tokens"], expected);
    assert_eq!(v["model"], "all-MiniLM-L6-v2");

    let direct = backend.embed(inputs.clone()).await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), inputs.len());
    for (i, (item, want)) in data.iter().zip(&direct).enumerate() {
        assert_eq!(item["index"], i);
        let got = vector_in(item);
        assert_eq!(got.len(), 384);
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6, "input {i}: max abs diff {diff}");
    }

    // base64 carries the same vectors; another size is refused naming the real one.
    let body = json!({"model": "m", "input": "hello world", "encoding_format": "base64"});
    let v: Value = serde_json::from_slice(
        &embeddings(backend.clone(), body.to_string().as_bytes())
            .await
            .unwrap(),
    )
    .unwrap();
    let got = vector_in(&v["data"][0]);
    let diff = got
        .iter()
        .zip(&direct[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-6, "max abs diff {diff}");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    let body = json!({"model": "m", "input": "hello world", "dimensions": 256});
    let e = embeddings(backend, body.to_string().as_bytes())
        .await
        .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("dimensions"));
    assert!(e.message.contains("only dimensions=384"), "{}", e.message);
}
