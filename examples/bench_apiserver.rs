//! Load generator for the apiserver benchmark (not a test): drives OpenAI chat completions
//! against several targets side by side and prints one table.
//!
//! A target is `label|base_url|pid,pid,…[|model[|JSON]]` — the base URL ends in `/v1` (or
//! `/api/v1`) and the pids are the processes on that path whose CPU time is charged per
//! request (every thread's `/proc/<pid>/task/<tid>/schedstat`, nanoseconds). Insert a middle hop (e.g. a proxy worker) by adding
//! a target. The optional JSON object is merged into every request body of that target (after
//! `--body-extra`, which applies to all), e.g. `tools`, `tool_choice` and `response_format`;
//! its member `"_api_key"` is not sent in the body but as the target's bearer key (instead
//! of `--api-key`), so one run can compare a static and a managed key.
//! For each target and concurrency: a non-stream phase (req/s, p50/p99 latency, CPU µs per
//! request per pid) and a stream phase (`stream_options.include_usage`; time to first chunk
//! p50/p99, full stream p50, CPU µs per request per pid). Every phase is bounded by `--secs`.
//!
//! ```text
//! cargo run --example bench_apiserver -- --model fake --secs 5 --concurrency 1,32,128 \
//!   --target 'direct|http://127.0.0.1:9000/v1|1234' --target 'apiserver|http://127.0.0.1:8100/v1|5678,1234'
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use serde_json::json;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::{CpuSample, cpu_between, cpu_sample};

#[derive(Parser, Debug)]
struct Args {
    /// `label|base_url|pid,pid` (repeatable).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    #[arg(long, default_value = "fake")]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    concurrency: Vec<usize>,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bearer key to send.
    #[arg(long)]
    api_key: Option<String>,
    /// A JSON object merged into every request body (a target's own JSON goes on top).
    #[arg(long)]
    body_extra: Option<String>,
}

struct Target {
    label: String,
    /// Model name for this target (else `--model`).
    model: Option<String>,
    url: String,
    pids: Vec<u32>,
    /// Merged into every request body of this target.
    extra: serde_json::Map<String, serde_json::Value>,
    /// The target's own bearer key (its JSON's `_api_key`).
    api_key: Option<String>,
}

/// A JSON object given on the command line.
fn json_object(what: &str, s: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => anyhow::bail!("{what}: not a JSON object: {s}"),
        Err(e) => anyhow::bail!("{what}: {e}: {s}"),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

struct Phase {
    ok: usize,
    errors: usize,
    elapsed: f64,
    /// Latency (non-stream) or full-stream time, ms.
    lat: Vec<f64>,
    /// Time to first content chunk, ms (stream only).
    ttfc: Vec<f64>,
    cpu: Vec<f64>,
}

async fn phase(c: &reqwest::Client, t: &Target, args: &Args, conc: usize, stream: bool) -> Phase {
    let mut req = json!({
        "model": t.model.as_deref().unwrap_or(&args.model), "stream": stream, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say something."}]
    });
    if stream {
        req["stream_options"] = json!({"include_usage": true});
    }
    let global = args
        .body_extra
        .as_deref()
        .map(|s| json_object("--body-extra", s).expect("checked in main"))
        .unwrap_or_default();
    for (k, v) in global.into_iter().chain(t.extra.clone()) {
        req[k] = v;
    }
    let body = Arc::new(serde_json::to_vec(&req).unwrap());
    let cpu0: Vec<CpuSample> = t.pids.iter().map(|&p| cpu_sample(p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, body, url, stop) = (c.clone(), body.clone(), t.url.clone(), stop.clone());
        let key = t.api_key.clone().or_else(|| args.api_key.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut lat, mut ttfc) = (0, 0, Vec::new(), Vec::new());
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let mut r = c
                    .post(format!("{url}/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .timeout(Duration::from_secs(30));
                if let Some(k) = &key {
                    r = r.bearer_auth(k);
                }
                let resp = match r.send().await {
                    Ok(r) if r.status().is_success() => r,
                    _ => {
                        errors += 1;
                        continue;
                    }
                };
                if stream {
                    let mut s = resp.bytes_stream();
                    let mut first = None;
                    let mut good = false;
                    let mut tail = Vec::new();
                    while let Some(chunk) = s.next().await {
                        let Ok(chunk) = chunk else { break };
                        if first.is_none() && chunk.windows(9).any(|w| w == b"\"content\"") {
                            first = Some(t0.elapsed());
                        }
                        tail.extend_from_slice(&chunk);
                        if tail.len() > 64 {
                            tail.drain(..tail.len() - 64);
                        }
                        if tail.ends_with(b"data: [DONE]\n\n") {
                            good = true;
                        }
                    }
                    if good {
                        ok += 1;
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        ttfc.push(first.unwrap_or(t0.elapsed()).as_secs_f64() * 1e3);
                    } else {
                        errors += 1;
                    }
                } else if resp.bytes().await.is_ok() {
                    ok += 1;
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                }
            }
            (ok, errors, lat, ttfc)
        }));
    }
    let mut p = Phase {
        ok: 0,
        errors: 0,
        elapsed: 0.0,
        lat: Vec::new(),
        ttfc: Vec::new(),
        cpu: Vec::new(),
    };
    for task in tasks {
        if let Ok((ok, e, l, f)) = task.await {
            p.ok += ok;
            p.errors += e;
            p.lat.extend(l);
            p.ttfc.extend(f);
        }
    }
    stop.store(true, Ordering::Relaxed);
    p.elapsed = started.elapsed().as_secs_f64();
    p.cpu = t
        .pids
        .iter()
        .zip(cpu0)
        .map(|(&pid, c0)| cpu_between(&c0, &cpu_sample(pid)) / p.ok.max(1) as f64 * 1e6)
        .collect();
    p
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(s) = &args.body_extra {
        json_object("--body-extra", s)?;
    }
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|s| {
            let mut parts = s.split('|');
            let label = parts.next().unwrap_or_default().to_string();
            let url = parts
                .next()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string();
            let pids = parts
                .next()
                .unwrap_or_default()
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            let model = parts.next().filter(|m| !m.is_empty()).map(str::to_string);
            let rest: Vec<&str> = parts.collect();
            let mut extra = match rest.join("|") {
                j if j.trim().is_empty() => serde_json::Map::new(),
                j => json_object(&format!("target {label}"), &j)?,
            };
            let api_key = match extra.remove("_api_key") {
                None => None,
                Some(serde_json::Value::String(k)) => Some(k),
                Some(_) => anyhow::bail!("target {label}: _api_key must be a string"),
            };
            Ok(Target {
                label,
                model,
                url,
                pids,
                extra,
                api_key,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        dbgpt_cluster::http::ensure_tls_provider();
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()?;
        println!(
            "| target | conc | req/s | p50 ms | p99 ms | stream req/s | TTFC p50 ms | TTFC p99 ms | stream p50 ms | CPU µs/req (per pid) | stream CPU µs/req (per pid) | errors |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|");
        for &conc in &args.concurrency {
            for t in &targets {
                // Warm the connection pool.
                let _ = phase(&c, t, &Args { secs: 0.3, ..clone_args(&args) }, conc.min(8), false).await;
                let mut plain = phase(&c, t, &args, conc, false).await;
                let mut st = phase(&c, t, &args, conc, true).await;
                let per_pid = |cpu: &[f64]| {
                    cpu.iter()
                        .zip(&t.pids)
                        .map(|(c, p)| format!("{p}: {c:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                    t.label,
                    conc,
                    plain.ok as f64 / plain.elapsed,
                    pct(&mut plain.lat, 0.5),
                    pct(&mut plain.lat, 0.99),
                    st.ok as f64 / st.elapsed,
                    pct(&mut st.ttfc, 0.5),
                    pct(&mut st.ttfc, 0.99),
                    pct(&mut st.lat, 0.5),
                    per_pid(&plain.cpu),
                    per_pid(&st.cpu),
                    plain.errors + st.errors,
                );
            }
        }
        anyhow::Ok(())
    })
}

fn clone_args(a: &Args) -> Args {
    Args {
        targets: a.targets.clone(),
        model: a.model.clone(),
        concurrency: a.concurrency.clone(),
        secs: a.secs,
        api_key: a.api_key.clone(),
        body_extra: a.body_extra.clone(),
    }
}
