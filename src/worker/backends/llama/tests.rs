//! Tests of the llama.cpp backend against the real SmolLM2 GGUF (greedy determinism,
//! limits, stop strings, token counts, concurrency, cancellation), and of its streaming
//! helpers ([`Utf8Stream`], [`StopMatcher`]).

use super::super::{Role, require_test_model};
use super::*;
use futures::StreamExt;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model() -> &'static LlamaCppBackend {
    static MODEL: OnceLock<LlamaCppBackend> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = require_test_model(GGUF);
        let t = Instant::now();
        let m = LlamaCppBackend::load(LlamaCppConfig::new(path)).expect("load SmolLM2");
        eprintln!("SmolLM2 load: {:?}", t.elapsed());
        m
    })
}

fn ask(question: &str) -> GenerateParams {
    GenerateParams {
        messages: vec![ChatMessage::new(Role::User, question)],
        temperature: Some(0.0),
        ..Default::default()
    }
}

struct Outcome {
    text: String,
    deltas: usize,
    finish: FinishReason,
    usage: Usage,
}

async fn run(backend: &LlamaCppBackend, params: GenerateParams) -> Result<Outcome, BackendError> {
    let mut s = backend.generate_stream(params);
    let mut text = String::new();
    let mut deltas = 0;
    while let Some(ev) = s.next().await {
        match ev? {
            GenerateEvent::Logprobs { .. } => {}
            GenerateEvent::Delta { text: t } => {
                assert!(!t.is_empty(), "empty delta");
                text.push_str(&t);
                deltas += 1;
            }
            GenerateEvent::Finish {
                finish_reason,
                usage,
            } => {
                assert!(s.next().await.is_none(), "events after Finish");
                return Ok(Outcome {
                    text,
                    deltas,
                    finish: finish_reason,
                    usage: usage.expect("local models always report usage"),
                });
            }
        }
    }
    panic!("stream ended without Finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_is_deterministic_and_non_empty() {
    let m = model();
    let mut p = ask("What is the capital of France?");
    p.max_new_tokens = Some(24);
    let t = Instant::now();
    let a = run(m, p.clone()).await.unwrap();
    let elapsed = t.elapsed();
    eprintln!(
        "greedy: {:?} ({} tokens, {} deltas, {:?}, {:.1} tok/s incl. prefill)",
        a.text,
        a.usage.completion_tokens,
        a.deltas,
        elapsed,
        a.usage.completion_tokens as f64 / elapsed.as_secs_f64()
    );
    let b = run(m, p).await.unwrap();
    assert!(!a.text.trim().is_empty());
    assert_eq!(a.text, b.text);
    assert_eq!(a.usage, b.usage);
    assert!(a.usage.prompt_tokens > 5);
    assert_eq!(
        a.usage.total_tokens,
        a.usage.prompt_tokens + a.usage.completion_tokens
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_new_tokens_gives_length() {
    let mut p = ask("Write a long story about a dragon who learns to fly.");
    p.max_new_tokens = Some(5);
    let o = run(model(), p).await.unwrap();
    assert_eq!(o.finish, FinishReason::Length);
    assert_eq!(o.usage.completion_tokens, 5);
    assert!(!o.text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_truncates() {
    let m = model();
    let mut p = ask("Write a long story about a dragon who learns to fly.");
    p.max_new_tokens = Some(40);
    let full = run(m, p.clone()).await.unwrap();
    // Pick a stop string from the middle of the greedy output.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() >= 6, "output too short: {:?}", full.text);
    let stop = words[4].to_string();
    let idx = full.text.find(&stop).expect("stop string present");
    p.stop = vec!["NEVER-APPEARS".into(), stop.clone()];
    let o = run(m, p).await.unwrap();
    assert_eq!(o.finish, FinishReason::Stop);
    assert_eq!(o.text, full.text[..idx], "stop {stop:?}");
    assert!(!o.text.contains(&stop));
    assert!(o.usage.completion_tokens < full.usage.completion_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_counts_are_consistent() {
    let m = model();
    let n = m
        .count_tokens("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    assert!(n > 5 && n < 20, "{n}");
    assert_eq!(m.count_tokens("").unwrap(), 0);
    assert_eq!(m.context_length(), 4096);
    // The usage's prompt tokens are the tokens of the rendered template.
    let p = ask("Hello!");
    let rendered = m.render_prompt(&p.messages).unwrap();
    assert!(rendered.contains("<|im_start|>assistant"), "{rendered}");
    let mut p2 = p.clone();
    p2.max_new_tokens = Some(2);
    let o = run(m, p2).await.unwrap();
    assert_eq!(
        o.usage.prompt_tokens as usize,
        m.inner.tokenize_prompt(&rendered).len()
    );
}

#[test]
fn the_gguf_chat_template_is_reported() {
    let t = model()
        .chat_template()
        .expect("SmolLM2's GGUF carries a chat template");
    assert!(t.contains("<|im_start|>"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_long_prompt_is_bad_request() {
    let m = model();
    let long = "hello world ".repeat(3000);
    assert!(m.count_tokens(&long).unwrap() > m.context_length());
    let err = run(m, ask(&long)).await.err().expect("must fail");
    assert!(
        matches!(&err, BackendError::BadRequest(msg) if msg.contains("context window")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_params_are_bad_request() {
    let m = model();
    let mut p = ask("hi");
    p.temperature = Some(-1.0);
    assert!(matches!(run(m, p).await, Err(BackendError::BadRequest(_))));
    let p = GenerateParams::default();
    assert!(matches!(run(m, p).await, Err(BackendError::BadRequest(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_generations_complete() {
    let m = model();
    let mut a = ask("Name three colours.");
    a.max_new_tokens = Some(16);
    let mut b = ask("Name three animals.");
    b.max_new_tokens = Some(16);
    b.temperature = Some(0.7);
    b.seed = Some(42);
    b.top_p = Some(0.9);
    b.top_k = Some(40);
    b.frequency_penalty = Some(0.5);
    let t = Instant::now();
    let (ra, rb) = tokio::join!(run(m, a), run(m, b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    eprintln!(
        "concurrent: {:?} / {:?} in {:?}",
        ra.text,
        rb.text,
        t.elapsed()
    );
    assert!(!ra.text.is_empty() && !rb.text.is_empty());
    assert!(ra.usage.completion_tokens > 0 && rb.usage.completion_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible() {
    let m = model();
    let mut p = ask("Tell me a joke.");
    p.max_new_tokens = Some(12);
    p.temperature = Some(1.0);
    p.seed = Some(7);
    let a = run(m, p.clone()).await.unwrap();
    let b = run(m, p).await.unwrap();
    assert_eq!(a.text, b.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels() {
    // Own instance: other tests share `model()` and its counters.
    let m = &LlamaCppBackend::load_async(LlamaCppConfig::new(require_test_model(GGUF)))
        .await
        .unwrap();
    // More tokens than a dropped stream can still decode: the event channel's buffer
    // plus the one token in progress (and a margin for tokens that emit no text).
    let limit = 2 * EVENT_BUFFER as u32 + 32;
    let mut p = ask("Write a very long essay about the history of Europe.");
    // Not cancelled, this greedy generation runs past `limit` tokens.
    p.max_new_tokens = Some(limit);
    let full = run(m, p.clone()).await.unwrap();
    assert_eq!(full.finish, FinishReason::Length, "{:?}", full.text);
    let before = m.inner.generated.load(Ordering::SeqCst);

    p.max_new_tokens = Some(2000);
    let mut s = m.generate_stream(p);
    // Take one delta, then drop the stream.
    let first = s.next().await.unwrap().unwrap();
    assert!(matches!(first, GenerateEvent::Delta { .. }));
    drop(s);
    // Wait (bounded) for the generation thread to end, then check that it stopped early.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while m.inner.running.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        m.inner.running.load(Ordering::SeqCst),
        0,
        "the generation thread is still running"
    );
    let generated = m.inner.generated.load(Ordering::SeqCst) - before;
    assert!(
        generated < limit as usize,
        "a dropped stream decoded {generated} tokens: the generation was not cancelled"
    );
}

#[test]
fn missing_or_bad_file_is_load_error() {
    let err = LlamaCppBackend::load(LlamaCppConfig::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(
        matches!(&err, BackendError::Load { path, .. } if path.ends_with("model.gguf")),
        "{err:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fake.gguf");
    std::fs::write(&f, b"not a gguf at all").unwrap();
    let err = LlamaCppBackend::load(LlamaCppConfig::new(&f)).unwrap_err();
    assert!(err.to_string().contains("fake.gguf"), "{err}");
    assert!(err.to_string().contains("GGUF"), "{err}");
}

#[test]
fn utf8_stream_handles_split_characters() {
    let mut d = Utf8Stream::default();
    let bytes = "aé😀b".as_bytes();
    let mut out = String::new();
    for b in bytes {
        out.push_str(&d.push(std::slice::from_ref(b)));
    }
    out.push_str(&d.finish());
    assert_eq!(out, "aé😀b");
    let mut d = Utf8Stream::default();
    assert_eq!(d.push(&[b'x', 0xff, b'y']), "x\u{fffd}y");
    assert_eq!(d.push(&[0xe2, 0x82]), "");
    assert_eq!(d.finish(), "\u{fffd}");
}

#[test]
fn stop_matcher_holds_back_prefixes() {
    let mut m = StopMatcher::new(&["</end>".into(), "".into()]);
    assert_eq!(m.push("hello </"), ("hello ".into(), false));
    assert_eq!(m.push("en"), ("".into(), false));
    assert_eq!(m.push("x more"), ("</enx more".into(), false));
    assert_eq!(m.push(" </e"), (" ".into(), false));
    assert_eq!(m.push("nd> tail"), ("".into(), true));
    assert!(m.stopped);
    let mut m = StopMatcher::new(&["ab".into()]);
    assert_eq!(m.push("xa"), ("x".into(), false));
    assert_eq!(m.flush(), "a");
    let mut m = StopMatcher::new(&[]);
    assert_eq!(m.push("abc"), ("abc".into(), false));
}
