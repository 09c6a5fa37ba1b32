//! Worker benchmark (not a test): decode and prefill tokens/s of the SmolLM2 GGUF at 1 and
//! 4 concurrent streams, time to the first token of a long prompt, MiniLM embeddings/s at
//! batch 1 and 32 and for one call of 100 texts (several sub-batches), and the worker's
//! overhead per request against calling the engine directly — all measured in one run,
//! printed as a markdown table.
//!
//! Run with `scripts/bench-worker.sh` (builds with our crate optimised). Every loop is
//! bounded in count; the worker listens on 127.0.0.1 only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dbgpt_cluster::wire::worker::WorkerType;
use dbgpt_cluster::worker::backends::{
    ChatMessage, GenerateEvent, GenerateParams, LlmBackend, Role,
};
use dbgpt_cluster::worker::manager::WorkerManager;
use dbgpt_cluster::worker::routes::{WorkerState, router};
use dbgpt_cluster::worker::spec::{Engine, ModelSpec, ModelType};
use futures::StreamExt;
use serde_json::json;

fn models_dir() -> std::path::PathBuf {
    std::env::var_os("DBGPT_MODELS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/dbgpt-cluster/models")
        })
}

fn params(prompt: &str, max: u32) -> GenerateParams {
    GenerateParams {
        messages: vec![ChatMessage::new(Role::User, prompt)],
        temperature: Some(0.0),
        max_new_tokens: Some(max),
        ..Default::default()
    }
}

/// (time to first token, total time, prompt tokens, completion tokens)
async fn run_one(b: Arc<dyn LlmBackend>, p: GenerateParams) -> (Duration, Duration, u32, u32) {
    let t0 = Instant::now();
    let mut first = None;
    let mut usage = (0, 0);
    let mut s = b.generate_stream(p);
    while let Some(ev) = s.next().await {
        match ev.expect("generation failed") {
            GenerateEvent::Delta { .. } => {
                first.get_or_insert(t0.elapsed());
            }
            GenerateEvent::Finish { usage: u, .. } => {
                if let Some(u) = u {
                    usage = (u.prompt_tokens, u.completion_tokens);
                }
            }
            GenerateEvent::Logprobs { .. } => {}
        }
    }
    (first.unwrap_or_default(), t0.elapsed(), usage.0, usage.1)
}

#[tokio::main]
async fn main() {
    let dir = models_dir();
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let minilm = dir.join("all-MiniLM-L6-v2");
    assert!(
        gguf.is_file() && minilm.is_dir(),
        "models missing in {}: run scripts/fetch-models.sh",
        dir.display()
    );

    let manager = Arc::new(WorkerManager::new(None, 8));
    let llm = manager
        .start(ModelSpec {
            name: "smollm2".into(),
            worker_type: WorkerType::Llm,
            model_type: ModelType::LlamaCpp,
            path: Some(gguf),
            api_base: None,
            api_key: None,
            backend: None,
            context_length: Some(2048),
            n_threads: None,
            concurrency: Some(4),
            proxy_timeouts: None,
            chat_template: None,
            llama: Default::default(),
            embed_max_batch: None,
            embed_batch_wait_ms: None,
            embed_threads: None,
        })
        .await
        .unwrap();
    let emb = manager
        .start(ModelSpec {
            name: "all-minilm".into(),
            worker_type: WorkerType::Text2vec,
            model_type: ModelType::Bert,
            path: Some(minilm),
            api_base: None,
            api_key: None,
            backend: None,
            context_length: None,
            n_threads: None,
            concurrency: Some(4),
            proxy_timeouts: None,
            chat_template: None,
            llama: Default::default(),
            embed_max_batch: None,
            embed_batch_wait_ms: None,
            embed_threads: None,
        })
        .await
        .unwrap();
    let Engine::Llm(llm) = llm.engine.clone() else {
        unreachable!()
    };
    let Engine::Embedding(emb) = emb.engine.clone() else {
        unreachable!()
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = router(WorkerState {
        manager: manager.clone(),
        tracer: dbgpt_cluster::tracer::Tracer::disabled(),
        bind: listener.local_addr().unwrap(),
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    dbgpt_cluster::http::ensure_tls_provider();
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");

    let short = "Write a short poem about the sea.";
    let long = "Summarise the following text in one sentence. ".to_string() + &"The river flows through the valley, past farms and villages, carrying snow melt from the mountains to the sea. ".repeat(20);
    let mut rows: Vec<(String, String)> = Vec::new();

    // Warm-up.
    run_one(llm.clone(), params(short, 8)).await;

    // Decode and prefill, 1 and 4 concurrent streams.
    for conc in [1usize, 4] {
        let t0 = Instant::now();
        let runs =
            futures::future::join_all((0..conc).map(|_| run_one(llm.clone(), params(short, 96))))
                .await;
        let wall = t0.elapsed().as_secs_f64();
        let tokens: u32 = runs.iter().map(|r| r.3).sum();
        let decode_per_stream: f64 = runs
            .iter()
            .map(|r| (r.3.saturating_sub(1)) as f64 / (r.1 - r.0).as_secs_f64())
            .sum::<f64>()
            / conc as f64;
        rows.push((
            format!("decode, {conc} stream(s): tokens/s aggregate (per stream)"),
            format!("{:.0} ({:.0})", tokens as f64 / wall, decode_per_stream),
        ));
        let t0 = Instant::now();
        let runs =
            futures::future::join_all((0..conc).map(|_| run_one(llm.clone(), params(&long, 1))))
                .await;
        let wall = t0.elapsed().as_secs_f64();
        let ptoks: u32 = runs.iter().map(|r| r.2).sum();
        rows.push((
            format!(
                "prefill, {conc} stream(s): prompt tokens/s aggregate ({} tokens each)",
                runs[0].2
            ),
            format!("{:.0}", ptoks as f64 / wall),
        ));
    }

    // Time to the first token of a long prompt (prefill of one request, alone).
    let longest = "Summarise: ".to_string() + &"The cat sat on the mat. ".repeat(120);
    let (first, _, prompt_tokens, _) = run_one(llm.clone(), params(&longest, 8)).await;
    rows.push((
        format!("time to first token, {prompt_tokens}-token prompt: ms"),
        format!("{:.0}", first.as_secs_f64() * 1e3),
    ));

    // Embeddings/s, batch 1 and 32.
    let text = "The quick brown fox jumps over the lazy dog".to_string();
    emb.embed(vec![text.clone()]).await.unwrap();
    for batch in [1usize, 32] {
        let n_batches = if batch == 1 { 64 } else { 8 };
        let t0 = Instant::now();
        for _ in 0..n_batches {
            emb.embed(vec![text.clone(); batch]).await.unwrap();
        }
        let direct = (n_batches * batch) as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..n_batches {
            let r = http
                .post(url("/api/worker/embeddings"))
                .json(&json!({"model": "all-minilm", "input": vec![text.clone(); batch]}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
        let via = (n_batches * batch) as f64 / t0.elapsed().as_secs_f64();
        rows.push((
            format!("embeddings, batch {batch}: texts/s direct / through the worker"),
            format!("{direct:.0} / {via:.0}"),
        ));
    }

    // One call of 100 texts: sub-batches of 32, run one after another.
    let texts: Vec<String> = (0..100)
        .map(|i| format!("This is test sentence number {i}, about databases and SQL."))
        .collect();
    let t0 = Instant::now();
    let n = emb.embed(texts).await.unwrap().len();
    rows.push((
        "embeddings, one call of 100 texts: texts/s".into(),
        format!("{:.0}", n as f64 / t0.elapsed().as_secs_f64()),
    ));

    // Worker overhead per request: the same 1-token generation and 1-text embedding,
    // engine called directly vs through the worker's HTTP API (median of 30).
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut direct = Vec::new();
    let mut via = Vec::new();
    for _ in 0..30 {
        let t0 = Instant::now();
        run_one(llm.clone(), params("Hi", 1)).await;
        direct.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        let r = http.post(url("/api/worker/generate_stream")).json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_new_tokens": 1})).send().await.unwrap();
        r.bytes().await.unwrap();
        via.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (d, v) = (median(direct), median(via));
    rows.push((
        "1-token generation: ms direct / through the worker (overhead)".into(),
        format!("{d:.2} / {v:.2} ({:+.2} ms)", v - d),
    ));
    let mut direct = Vec::new();
    let mut via = Vec::new();
    for _ in 0..30 {
        let t0 = Instant::now();
        emb.embed(vec!["hi".into()]).await.unwrap();
        direct.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        let r = http
            .post(url("/api/worker/embeddings"))
            .json(&json!({"model": "all-minilm", "input": ["hi"]}))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
        via.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (d, v) = (median(direct), median(via));
    rows.push((
        "1-text embedding: ms direct / through the worker (overhead)".into(),
        format!("{d:.2} / {v:.2} ({:+.2} ms)", v - d),
    ));

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("| measurement | value |\n| --- | --- |");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    println!(
        "\nload average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
