//! Load generator for `scripts/bench-embed.sh` (not a test): closed-loop OpenAI embeddings
//! requests against one URL for one phase, bounded in time and in count.
//!
//! `--conc` connections each send a request of `--texts` short texts (about ten tokens
//! each, a different sentence every time), wait for the whole answer, check it has one
//! vector per text, and send the next, until `--secs` have passed or `--max-requests` were
//! sent. One warm-up request per connection comes first. The CPU the processes `--pids`
//! used during the phase (every thread's schedstat nanoseconds, see `support/cpu.rs`) is
//! charged per text. Prints one tab-separated line:
//! `label conc texts_per_request requests texts secs texts_per_s p50_ms errors cpu_ms_per_text…`
//! with one CPU column per pid, in the order given.
//!
//! ```text
//! bench_embed --label new-worker --url http://127.0.0.1:8001/api/worker/openai/v1/embeddings \
//!   --model minilm --conc 8 --secs 3 --pids 1234
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[path = "support/cpu.rs"]
mod cpu;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "run")]
    label: String,
    /// The embeddings endpoint (full URL).
    #[arg(long)]
    url: String,
    #[arg(long)]
    model: String,
    /// Concurrent connections, each with one request at a time.
    #[arg(long, default_value_t = 1)]
    conc: usize,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    texts: usize,
    /// Seconds of the measured phase.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// At most this many measured requests.
    #[arg(long, default_value_t = 100_000)]
    max_requests: u64,
    /// Processes whose CPU is charged per text, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

const WORDS: [&str; 16] = [
    "database", "query", "index", "cluster", "model", "worker", "vector", "river", "mountain",
    "coffee", "sentence", "table", "schema", "network", "garden", "window",
];

/// A short sentence (about ten tokens), different for every `n`.
fn sentence(n: u64) -> String {
    let w = |k: u64| WORDS[((n / 16u64.pow(k as u32)) % 16) as usize];
    format!(
        "The {} and the {} meet a {} near the {} today.",
        w(0),
        w(1),
        w(2),
        w(3)
    )
}

async fn one(http: &reqwest::Client, args: &Args, counter: &AtomicU64) -> Result<Duration, String> {
    let input: Vec<String> = (0..args.texts)
        .map(|_| sentence(counter.fetch_add(1, Ordering::Relaxed)))
        .collect();
    let t0 = Instant::now();
    let r = http
        .post(&args.url)
        .json(&json!({"model": args.model, "input": input}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let n = v["data"].as_array().map_or(0, Vec::len);
    if n != args.texts {
        return Err(format!("{n} vectors for {} texts", args.texts));
    }
    Ok(t0.elapsed())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    dbgpt_cluster::http::ensure_tls_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.conc)
        .timeout(Duration::from_secs(60))
        .build()?;
    let counter = Arc::new(AtomicU64::new(0));
    // Warm-up: one request per connection, concurrently (opens the connections).
    let warm = futures::future::join_all((0..args.conc).map(|_| one(&http, &args, &counter))).await;
    if let Some(Err(e)) = warm.into_iter().find(|r| r.is_err()) {
        anyhow::bail!("{}: warm-up failed: {e}", args.label);
    }
    let cpu0: Vec<_> = args.pids.iter().map(|&p| cpu::cpu_sample(p)).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.secs);
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..args.conc)
        .map(|_| {
            let (http, args, counter, sent, stop) = (
                http.clone(),
                args.clone(),
                counter.clone(),
                sent.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && sent.fetch_add(1, Ordering::Relaxed) < args.max_requests
                {
                    match one(&http, &args, &counter).await {
                        Ok(d) => lat.push(d.as_secs_f64() * 1e3),
                        Err(e) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!("{}: {e}", args.label);
                            }
                            if errors > 100 {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu: Vec<f64> = args
        .pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| cpu::cpu_between(c0, &cpu::cpu_sample(p)))
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let requests = lat.len() as u64;
    let texts = requests * args.texts as u64;
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or(f64::NAN);
    let mut line = format!(
        "{}\t{}\t{}\t{requests}\t{texts}\t{secs:.2}\t{:.1}\t{p50:.2}\t{errors}",
        args.label,
        args.conc,
        args.texts,
        texts as f64 / secs
    );
    for c in cpu {
        line.push_str(&format!("\t{:.2}", c * 1e3 / texts.max(1) as f64));
    }
    println!("{line}");
    Ok(())
}
