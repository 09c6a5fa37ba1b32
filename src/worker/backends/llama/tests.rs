//! Tests of the llama.cpp backend against the real SmolLM2 GGUF (greedy determinism,
//! limits, stop strings, token counts, concurrency, cancellation), and of its streaming
//! helpers ([`Utf8Stream`], [`StopMatcher`]).

use super::super::{FinishReason, Role, TokenLogprob, Usage, require_test_model};
use super::*;
use futures::StreamExt;
use llama_cpp_2::sampling::LlamaSampler;

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
    // The prefix cache may serve `b` (and other tests' requests share this model).
    let counts = |u: &Usage| (u.prompt_tokens, u.completion_tokens, u.total_tokens);
    assert_eq!(counts(&a.usage), counts(&b.usage));
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
    let limit = format!("context window is {} tokens", m.context_length());
    assert!(
        matches!(&err, BackendError::BadRequest(msg) if msg.contains(&limit)),
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

/// A model of its own (tests that read the status must not share one), with `parallel`
/// slots of 1024 tokens.
fn own_model(
    parallel: usize,
    max_queue: usize,
    queue_timeout: std::time::Duration,
) -> LlamaCppBackend {
    let mut c = LlamaCppConfig::new(require_test_model(GGUF));
    c.parallel = parallel;
    c.context_length = Some(1024);
    c.max_queue = max_queue;
    c.queue_timeout = queue_timeout;
    LlamaCppBackend::load(c).expect("load SmolLM2")
}

async fn status_until(
    m: &LlamaCppBackend,
    what: &str,
    ok: impl Fn(&EngineStatus) -> bool,
) -> EngineStatus {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = m.engine_status().unwrap();
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: status stays {st}");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_frees_the_slot_within_a_step() {
    let m = &own_model(1, 4, std::time::Duration::from_secs(20));
    let mut p = ask("Write a very long essay about the history of Europe.");
    p.max_new_tokens = Some(900);
    let mut s = m.generate_stream(p);
    // Take one delta, then drop the stream.
    let first = s.next().await.unwrap().unwrap();
    assert!(matches!(first, GenerateEvent::Delta { .. }));
    assert_eq!(m.engine_status().unwrap().busy, 1);
    drop(s);
    let at_drop = m.engine_status().unwrap().generated_tokens;
    let st = status_until(m, "after the drop", |st| st.busy == 0).await;
    // The slot leaves at the next step: at most the token in flight and one more.
    assert!(
        st.generated_tokens <= at_drop + 2,
        "a dropped stream decoded {} more tokens",
        st.generated_tokens - at_drop
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        m.engine_status().unwrap().generated_tokens,
        st.generated_tokens
    );
    // The slot serves the next request.
    let mut p = ask("Say hi.");
    p.max_new_tokens = Some(4);
    run(m, p).await.unwrap();
}

/// Batching must not change results: greedy answers of requests decoded together (and
/// joining while others run, their prompts read in the same steps) are the answers each
/// gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_answer_as_alone() {
    let m = &own_model(4, 8, std::time::Duration::from_secs(60));
    let questions = [
        "Name three colours.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Count from one to ten in words.",
        "Who wrote Hamlet?",
        "What is two plus two?",
    ];
    let params = |q: &str| {
        let mut p = ask(q);
        p.max_new_tokens = Some(40);
        p
    };
    let mut alone = Vec::new();
    for q in questions {
        // A fresh model state each time: no prefix cache between different prompts either.
        alone.push(run(m, params(q)).await.unwrap().text);
    }
    let together = futures::future::join_all(questions.iter().map(|q| run(m, params(q)))).await;
    for ((q, a), t) in questions.iter().zip(&alone).zip(together) {
        assert_eq!(&t.unwrap().text, a, "{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_cache_hit_answers_as_a_cold_request_and_reports_cached_tokens() {
    let m = &own_model(2, 4, std::time::Duration::from_secs(60));
    let system = "You are a helpful assistant who answers briefly. ".repeat(12);
    let params = |q: &str| {
        let mut p = GenerateParams {
            messages: vec![
                ChatMessage::new(Role::System, system.clone()),
                ChatMessage::new(Role::User, q),
            ],
            temperature: Some(0.0),
            ..Default::default()
        };
        p.max_new_tokens = Some(24);
        p
    };
    let cold = run(m, params("What is the capital of France?"))
        .await
        .unwrap();
    let cached = |o: &Outcome| o.usage.prompt_tokens_details.unwrap().cached_tokens;
    assert_eq!(cached(&cold), 0, "a cold start has no cache");
    // The same prompt again: everything but the last prompt token comes from the cache.
    let hot = run(m, params("What is the capital of France?"))
        .await
        .unwrap();
    assert_eq!(hot.text, cold.text);
    assert_eq!(cached(&hot), hot.usage.prompt_tokens - 1);
    // Another question after the same system prompt reuses the system prompt. (Its answer
    // is not compared with a cold one: llama.cpp's kernels do not promise bit-identical
    // logits for a prompt read in one chunk and for the same prompt read in two, so a
    // greedy near-tie may go the other way; llama-server's cache_prompt has the same
    // caveat. A whole-prompt hit recomputes only the last token and answers the same.)
    let other = run(m, params("Name a large animal.")).await.unwrap();
    assert!(!other.text.is_empty());
    let system_tokens = m.count_tokens(&system).unwrap() as u32;
    assert!(
        cached(&other) >= system_tokens && cached(&other) < other.usage.prompt_tokens,
        "{:?} (system prompt {system_tokens} tokens)",
        other.usage
    );
    let st = m.engine_status().unwrap();
    assert!(
        st.reused_prompt_tokens >= u64::from(cached(&hot) + cached(&other)),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_an_expired_wait_are_overloaded() {
    let m = &own_model(1, 1, std::time::Duration::from_secs(60));
    let long = || {
        let mut p = ask("Write a very long essay about the history of Europe.");
        p.max_new_tokens = Some(900);
        p
    };
    let mut running = m.generate_stream(long());
    assert!(matches!(running.next().await, Some(Ok(_))));
    // The second waits in the queue (its stream must be polled to be submitted).
    let mut waiting = m.generate_stream(long());
    let waiter = tokio::spawn(async move { waiting.next().await.map(|r| r.is_ok()) });
    status_until(m, "the second request queued", |st| st.queued == 1).await;
    // The third finds the slot taken and the queue full.
    let third = m.generate_stream(long()).next().await;
    match third {
        Some(Err(BackendError::Overloaded {
            message,
            retry_after_secs,
        })) => {
            assert!(message.contains("--max_queue 1"), "{message}");
            assert!(retry_after_secs >= 1);
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
    drop(running);
    // The queued one gets the slot once the first is gone.
    assert_eq!(waiter.await.unwrap(), Some(true));

    // A wait longer than the queue timeout is refused too.
    let m = &own_model(1, 4, std::time::Duration::from_millis(300));
    let mut running = m.generate_stream(long());
    assert!(matches!(running.next().await, Some(Ok(_))));
    let t = Instant::now();
    let late = m.generate_stream(long()).next().await;
    assert!(
        matches!(&late, Some(Err(BackendError::Overloaded { message, .. })) if message.contains("queue timeout")),
        "{late:?}"
    );
    assert!(t.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(m.engine_status().unwrap().queued, 0);
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

/// A generation's events, with the log-probabilities checked to come right before a delta.
struct Traced {
    outcome: Outcome,
    /// (tokens of a `Logprobs` event, text of the `Delta` right after it).
    logprobs: Vec<(Vec<TokenLogprob>, String)>,
}

async fn run_traced(
    backend: &LlamaCppBackend,
    params: GenerateParams,
) -> Result<Traced, BackendError> {
    let mut s = backend.generate_stream(params);
    let mut text = String::new();
    let mut deltas = 0;
    let mut logprobs = Vec::new();
    let mut waiting: Option<Vec<TokenLogprob>> = None;
    while let Some(ev) = s.next().await {
        match ev? {
            GenerateEvent::Logprobs { tokens } => {
                assert!(
                    waiting.is_none(),
                    "two Logprobs events without a Delta between"
                );
                assert!(!tokens.is_empty(), "empty Logprobs event");
                waiting = Some(tokens);
            }
            GenerateEvent::Delta { text: t } => {
                assert!(!t.is_empty(), "empty delta");
                if let Some(tokens) = waiting.take() {
                    logprobs.push((tokens, t.clone()));
                }
                text.push_str(&t);
                deltas += 1;
            }
            GenerateEvent::Finish {
                finish_reason,
                usage,
            } => {
                assert!(waiting.is_none(), "Logprobs event not followed by a Delta");
                assert!(s.next().await.is_none(), "events after Finish");
                return Ok(Traced {
                    outcome: Outcome {
                        text,
                        deltas,
                        finish: finish_reason,
                        usage: usage.expect("local models always report usage"),
                    },
                    logprobs,
                });
            }
        }
    }
    panic!("stream ended without Finish");
}

/// The first item of a stream, which must be an error.
async fn first_error(params: GenerateParams) -> BackendError {
    let mut s = model().generate_stream(params);
    match s.next().await {
        Some(Err(e)) => e,
        other => panic!("expected an error as the first item, got {other:?}"),
    }
}

const JSON_ANSWER_GRAMMAR: &str = r#"
# An object with one integer member.
root ::= "{" ws "\"answer\"" ws ":" ws int ws "}"
int  ::= "-"? [0-9] [0-9]? [0-9]? [0-9]?
ws   ::= " "?
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammar_forces_a_json_object() {
    let mut p = ask("What is two plus three? Reply in JSON.");
    p.max_new_tokens = Some(40);
    p.grammar = Some(JSON_ANSWER_GRAMMAR.into());
    let o = run(model(), p).await.unwrap();
    eprintln!("grammar json: {:?}", o.text);
    // The grammar is complete after `}`: only end-of-generation is allowed, so `stop`.
    assert_eq!(o.finish, FinishReason::Stop, "{:?}", o.text);
    let v: serde_json::Value = serde_json::from_str(&o.text).expect("the text is JSON");
    let obj = v.as_object().expect("a JSON object");
    assert_eq!(obj.len(), 1, "{v}");
    assert!(obj["answer"].is_i64(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammar_yes_or_no_greedy_sampled_and_concurrent() {
    let m = model();
    let grammar = r#"root ::= "yes" | "no""#;
    let mut greedy = ask("Is the sky blue? Answer yes or no.");
    greedy.max_new_tokens = Some(10);
    greedy.grammar = Some(grammar.into());
    let o = run(m, greedy.clone()).await.unwrap();
    assert!(o.text == "yes" || o.text == "no", "{:?}", o.text);
    assert_eq!(o.finish, FinishReason::Stop);
    // Random sampling at a high temperature, with top-k/top-p after the grammar, two
    // requests at once (each has its own grammar state).
    for seed in [1u64, 2, 3] {
        let mut hot = greedy.clone();
        hot.temperature = Some(1.5);
        hot.top_k = Some(5);
        hot.top_p = Some(0.9);
        hot.seed = Some(seed);
        let (a, b) = tokio::join!(run(m, hot.clone()), run(m, greedy.clone()));
        for o in [a.unwrap(), b.unwrap()] {
            assert!(
                o.text == "yes" || o.text == "no",
                "seed {seed}: {:?}",
                o.text
            );
            assert_eq!(o.finish, FinishReason::Stop);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grammars_are_bad_requests_before_generation() {
    for (grammar, expect) in [
        (r#"root ::= "yes"#, "unterminated string"),
        (r#"answer ::= "yes""#, "no `root` rule"),
        (r#"root ::= answer"#, "rule `answer`"),
        ("root ::= my_rule\nmy_rule ::= \"x\"", "`_`"),
        (r#"root ::= ("a" | "b""#, "unclosed `(`"),
        // Left recursion: llama.cpp refuses it after parsing; the scan does not see it.
        (r#"root ::= root "a" | "a""#, "llama.cpp could not parse it"),
        ("root ::= \"a\0\"", "NUL"),
        ("  \n", "grammar must not be empty"),
    ] {
        let mut p = ask("hi");
        p.grammar = Some(grammar.into());
        let err = first_error(p).await;
        assert!(
            matches!(&err, BackendError::BadRequest(m) if m.contains("grammar") && m.contains(expect)),
            "{grammar:?}: {err:?}"
        );
    }
}

#[test]
fn the_grammar_scan_finds_nothing_wrong_in_valid_grammars() {
    let m = model();
    for g in [
        JSON_ANSWER_GRAMMAR,
        r#"root ::= "yes" | "no""#,
        "root ::= item (\",\" item)* # trailing comment\nitem ::= [a-z]{1,3} | [^\\]\"]+ | \"x\"?",
        "root   ::=   (\n  \"a\"\n  | \"b\"\n)",
    ] {
        assert!(
            LlamaSampler::grammar(&m.inner.model, g, "root").is_ok(),
            "llama.cpp refuses {g:?}"
        );
        assert_eq!(explain_grammar_error(g), None, "{g:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_match_the_generated_tokens() {
    let m = model();
    let mut p = ask("Write a short poem about the sea.");
    p.max_new_tokens = Some(24);
    let plain = run(m, p.clone()).await.unwrap();
    p.logprobs = Some(5);
    let t = run_traced(m, p).await.unwrap();
    let o = &t.outcome;
    // Asking for log-probabilities does not change what is generated.
    assert_eq!(o.text, plain.text);
    let counts = |u: &Usage| (u.prompt_tokens, u.completion_tokens);
    assert_eq!(counts(&o.usage), counts(&plain.usage));
    assert_eq!(t.logprobs.len(), o.deltas, "one Logprobs event per delta");
    let tokens: Vec<&TokenLogprob> = t.logprobs.iter().flat_map(|(ts, _)| ts).collect();
    assert_eq!(tokens.len(), o.usage.completion_tokens as usize);
    let bytes: Vec<u8> = tokens.iter().flat_map(|tl| tl.bytes.clone()).collect();
    assert_eq!(bytes, o.text.as_bytes());
    // Each event lists the tokens of its delta: the bytes reported so far spell the text
    // so far, plus at most an incomplete character held back for the next delta.
    let (mut bytes_so_far, mut text_so_far) = (Vec::new(), String::new());
    for (ts, delta) in &t.logprobs {
        bytes_so_far.extend(ts.iter().flat_map(|tl| tl.bytes.clone()));
        text_so_far.push_str(delta);
        assert!(bytes_so_far.starts_with(text_so_far.as_bytes()));
        assert!(
            bytes_so_far.len() - text_so_far.len() < 4,
            "{ts:?} / {delta:?}"
        );
    }
    let mut uncertain = 0;
    for tl in &tokens {
        assert_eq!(tl.token, String::from_utf8_lossy(&tl.bytes));
        assert!(tl.logprob <= 0.0 && tl.logprob.is_finite(), "{tl:?}");
        assert_eq!(tl.top.len(), 5);
        assert!(
            tl.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "alternatives not sorted: {tl:?}"
        );
        let mass: f32 = tl.top.iter().map(|a| a.logprob.exp()).sum();
        assert!(
            mass <= 1.0 + 1e-4,
            "top probabilities sum to {mass}: {tl:?}"
        );
        // Greedy: the chosen token is the most likely one.
        assert_eq!(tl.top[0].bytes, tl.bytes, "{tl:?}");
        assert!((tl.top[0].logprob - tl.logprob).abs() < 1e-5, "{tl:?}");
        if tl.logprob < -0.01 {
            uncertain += 1;
        }
    }
    assert!(uncertain > 0, "every token has probability ~1: {tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_follow_the_temperature_and_zero_alternatives_work() {
    let m = model();
    let mut p = ask("Name a fruit.");
    p.max_new_tokens = Some(1);
    p.logprobs = Some(3);
    let greedy = run_traced(m, p.clone()).await.unwrap();
    p.temperature = Some(0.5);
    p.seed = Some(11);
    let cold = run_traced(m, p.clone()).await.unwrap();
    // Same first position, same logits: at temperature 0.5 (logits doubled) the most likely
    // token is more likely than in the model's plain distribution (what greedy reports).
    let (g, c) = (&greedy.logprobs[0].0[0], &cold.logprobs[0].0[0]);
    assert_eq!(g.top[0].bytes, c.top[0].bytes);
    assert!(c.top[0].logprob > g.top[0].logprob, "{g:?} / {c:?}");
    p.logprobs = Some(0);
    let none = run_traced(m, p).await.unwrap();
    let tl = &none.logprobs[0].0[0];
    assert!(tl.top.is_empty());
    assert!(tl.logprob <= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_with_a_stop_string() {
    let m = model();
    let mut p = ask("Write a long story about a dragon who learns to fly.");
    p.max_new_tokens = Some(40);
    let full = run(m, p.clone()).await.unwrap();
    let words: Vec<&str> = full.text.split_whitespace().collect();
    let stop = words[4].to_string();
    p.stop = vec![stop];
    p.logprobs = Some(1);
    let t = run_traced(m, p).await.unwrap();
    let bytes: Vec<u8> = t
        .logprobs
        .iter()
        .flat_map(|(ts, _)| ts.iter().flat_map(|tl| tl.bytes.clone()))
        .collect();
    // Reported tokens spell the text, then at most the start of the stop string.
    assert!(bytes.starts_with(t.outcome.text.as_bytes()), "{bytes:?}");
    let reported = t.logprobs.iter().map(|(ts, _)| ts.len()).sum::<usize>();
    assert!(reported <= t.outcome.usage.completion_tokens as usize);
    assert_eq!(t.outcome.finish, FinishReason::Stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_logprobs_is_bad_request() {
    let mut p = ask("hi");
    p.logprobs = Some(21);
    let err = first_error(p).await;
    assert!(
        matches!(&err, BackendError::BadRequest(m) if m.contains("logprobs")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_prompt_is_used_as_is() {
    let m = model();
    let vocab = m.inner.model.vocab();
    // Special tokens in the prompt are parsed, not spelled out.
    assert_eq!(
        m.inner.tokenize_prompt("<|im_start|>").len(),
        1 + usize::from(vocab.should_add_bos())
    );
    assert!(m.count_tokens("<|im_start|>").unwrap() > 1);

    // The rendered template as a raw prompt gives the chat's answer; `messages` is ignored.
    let chat = {
        let mut p = ask("What is the capital of France?");
        p.max_new_tokens = Some(12);
        p
    };
    let rendered = m.render_prompt(&chat.messages).unwrap();
    let mut raw = ask("Something else entirely, with a longer question than the other.");
    raw.max_new_tokens = Some(12);
    raw.prompt = Some(rendered.clone());
    let (a, b) = tokio::join!(run(m, chat), run(m, raw.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.text, b.text);
    // The prefix cache may serve `b` (and other tests' requests share this model).
    let counts = |u: &Usage| (u.prompt_tokens, u.completion_tokens, u.total_tokens);
    assert_eq!(counts(&a.usage), counts(&b.usage));

    // A plain completion prompt: no template around it.
    let text = "The capital of France is";
    raw.prompt = Some(text.into());
    raw.messages.clear();
    let o = run(m, raw.clone()).await.unwrap();
    assert_eq!(
        o.usage.prompt_tokens as usize,
        m.count_tokens(text).unwrap() + usize::from(vocab.should_add_bos())
    );

    raw.prompt = Some(String::new());
    let err = first_error(raw.clone()).await;
    assert!(
        matches!(&err, BackendError::BadRequest(m) if m.contains("prompt")),
        "{err:?}"
    );
    raw.prompt = Some("hello world ".repeat(3000));
    let err = first_error(raw).await;
    assert!(
        matches!(&err, BackendError::BadRequest(m) if m.contains("context window")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_decides_the_sample() {
    let m = model();
    let mut p = ask("Tell me a story.");
    p.max_new_tokens = Some(12);
    p.temperature = Some(1.2);
    // Folds to u32::MAX, which llama.cpp would take for "random seed".
    p.seed = Some(0xFFFF_FFFF);
    let a = run(m, p.clone()).await.unwrap();
    let b = run(m, p.clone()).await.unwrap();
    assert_eq!(a.text, b.text);
    let mut texts = std::collections::HashSet::new();
    for seed in [1u64, 2, 3, 4] {
        p.seed = Some(seed);
        texts.insert(run(m, p.clone()).await.unwrap().text);
    }
    assert!(texts.len() > 1, "four seeds gave the same text: {texts:?}");
}

#[test]
fn seeds_never_map_to_llama_cpp_random_seed() {
    assert_ne!(sampler_seed(Some(0xFFFF_FFFF)), u32::MAX);
    assert_ne!(sampler_seed(Some(0xFFFF_FFFF_0000_0000)), u32::MAX);
    assert_eq!(sampler_seed(Some(7)), 7);
    assert_eq!(sampler_seed(Some(7)), sampler_seed(Some(7)));
}
