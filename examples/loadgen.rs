//! Closed-loop HTTP/1.1 load generator for `scripts/bench-controller.sh`.
//!
//! Deliberately cheap so that it does not steal the CPU it measures: one current-thread
//! tokio runtime, raw `TcpStream`s with keep-alive, a hand-written request writer and a
//! minimal response reader (status line, `Content-Length`, body). Each of `--conc`
//! connections sends a request, waits for the whole response, and sends the next.
//!
//! ```text
//! loadgen run      --addr 127.0.0.1:P --mode heartbeat|register|list|hello --conc N
//!                  [--secs 5] [--max-requests 500000] [--instances 1000] [--pid SERVER_PID]
//! loadgen populate --addr 127.0.0.1:P [--instances 1000]
//! loadgen startup  --bin dbgpt [--runs 10] [--registry FILE]   (env gives the temp dirs)
//! loadgen freeport
//! ```
//!
//! `run` prints one tab-separated line:
//! `mode conc requests secs req_per_s p50_us p99_us errors server_cpu_us_per_req
//! loadgen_cpu_us_per_req`
//! where the server CPU is utime+stime of `--pid` from `/proc/<pid>/stat`, read right
//! before and right after the measured window (after connecting and one warm-up request
//! per connection). Every loop is bounded in time and in count.

use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Model names of the pre-registered instances: `bench-model-<i % MODELS>@llm`.
const MODELS: usize = 50;
/// Give up on a connection after this many consecutive I/O errors.
const MAX_RECONNECTS: u32 = 100;

fn usage() -> ! {
    eprintln!(
        "usage: loadgen run --addr HOST:PORT --mode heartbeat|register|list|hello --conc N \
         [--secs S] [--max-requests N] [--instances N] [--pid PID]\n       \
         loadgen populate --addr HOST:PORT [--instances N]\n       \
         loadgen startup --bin PATH [--runs N] [--registry FILE]\n       loadgen freeport"
    );
    std::process::exit(2)
}

struct Args {
    cmd: String,
    addr: String,
    mode: String,
    conc: usize,
    secs: f64,
    max_requests: u64,
    instances: usize,
    pid: Option<u32>,
    bin: String,
    runs: usize,
    registry: Option<String>,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_else(|| usage());
    let mut a = Args {
        cmd,
        addr: String::new(),
        mode: String::new(),
        conc: 1,
        secs: 5.0,
        max_requests: 500_000,
        instances: 1000,
        pid: None,
        bin: String::new(),
        runs: 10,
        registry: None,
    };
    while let Some(flag) = it.next() {
        let val = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| -> u64 { v.parse().unwrap_or_else(|_| usage()) };
        match flag.as_str() {
            "--addr" => a.addr = val,
            "--mode" => a.mode = val,
            "--conc" => a.conc = num(&val).max(1) as usize,
            "--secs" => a.secs = val.parse().unwrap_or_else(|_| usage()),
            "--max-requests" => a.max_requests = num(&val),
            "--instances" => a.instances = num(&val).max(1) as usize,
            "--pid" => a.pid = Some(num(&val) as u32),
            "--bin" => a.bin = val,
            "--runs" => a.runs = num(&val).max(1) as usize,
            "--registry" => a.registry = Some(val),
            _ => usage(),
        }
    }
    a
}

/// DB-GPT's worker body for register and heartbeat (`ModelInstance` as a dict).
fn instance_body(model: &str, host: &str, port: u32) -> String {
    format!(
        r#"{{"model_name":"{model}","host":"{host}","port":{port},"weight":1.0,"check_healthy":true,"healthy":false,"enabled":true,"prompt_template":null,"last_heartbeat":null}}"#
    )
}

/// Pre-registered instance `i` of `n`.
fn existing_body(i: usize) -> String {
    instance_body(
        &format!("bench-model-{}@llm", i % MODELS),
        "127.0.0.1",
        20000 + i as u32,
    )
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes()
}

/// What one connection sends; `n` counts this connection's requests.
#[derive(Clone)]
enum Workload {
    /// A fixed set of pre-built requests, cycled (round-robin from an offset per connection).
    Cycle(Arc<Vec<Vec<u8>>>),
    /// Registrations: even requests re-register an existing instance, odd ones a new one.
    Register {
        existing: Arc<Vec<Vec<u8>>>,
        tag: String,
    },
}

impl Workload {
    fn request(&self, conn: usize, conc: usize, n: u64) -> Vec<u8> {
        match self {
            Workload::Cycle(reqs) => {
                let i = (conn + (n as usize) * conc) % reqs.len();
                reqs[i].clone()
            }
            Workload::Register { existing, tag } => {
                if n.is_multiple_of(2) {
                    existing[(conn + (n as usize / 2) * conc) % existing.len()].clone()
                } else {
                    let body = instance_body(
                        &format!("bench-new-{tag}-c{conn}@llm"),
                        "127.0.0.2",
                        1 + (n / 2 % 65535) as u32,
                    );
                    post("/api/controller/models", &body)
                }
            }
        }
    }
}

/// Reads one HTTP/1.1 response (Content-Length framed); returns the status code.
/// `buf` keeps any bytes read past the response (none in a closed loop).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 && buf.windows(4).all(|w| w != b"\r\n\r\n") {
            return Err(bad("response head too large"));
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| bad("no content-length"))?;
    let total = head_end + len;
    while buf.len() < total {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..total);
    Ok(status)
}

async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

struct ConnResult {
    latencies_us: Vec<u32>,
    errors: u64,
}

/// One closed-loop connection: warm up with one request, wait for the start signal, then
/// loop until the deadline or the shared request budget is spent.
async fn connection(
    addr: String,
    work: Workload,
    conn: usize,
    conc: usize,
    start: Arc<tokio::sync::Barrier>,
    deadline: Arc<std::sync::OnceLock<Instant>>,
    budget: Arc<AtomicU64>,
) -> ConnResult {
    let mut res = ConnResult {
        latencies_us: Vec::with_capacity(1 << 14),
        errors: 0,
    };
    let mut buf = Vec::with_capacity(1 << 16);
    let mut stream = connect(&addr).await.ok();
    let mut n: u64 = 0;
    // Warm-up request (not measured).
    if let Some(s) = stream.as_mut() {
        let req = work.request(conn, conc, n);
        n += 1;
        if s.write_all(&req).await.is_err() || read_response(s, &mut buf).await.is_err() {
            stream = None;
        }
    }
    // Twice: "everyone is warmed up", then "go" (the deadline is set in between).
    start.wait().await;
    start.wait().await;
    let deadline = *deadline
        .get()
        .expect("deadline set before the start signal");
    let mut reconnects = 0;
    while Instant::now() < deadline {
        if budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        if stream.is_none() {
            if reconnects >= MAX_RECONNECTS {
                break;
            }
            reconnects += 1;
            buf.clear();
            match connect(&addr).await {
                Ok(s) => stream = Some(s),
                Err(_) => {
                    res.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected above");
        let req = work.request(conn, conc, n);
        n += 1;
        let t0 = Instant::now();
        let r = match s.write_all(&req).await {
            Ok(()) => read_response(s, &mut buf).await,
            Err(e) => Err(e),
        };
        let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
        match r {
            Ok(200) => {
                res.latencies_us.push(us);
                reconnects = 0;
            }
            Ok(_) => {
                res.latencies_us.push(us);
                res.errors += 1;
            }
            Err(_) => {
                res.errors += 1;
                stream = None;
            }
        }
    }
    res
}

/// utime+stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn run(a: &Args) {
    let existing: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..a.instances)
            .map(|i| post("/api/controller/heartbeat", &existing_body(i)))
            .collect(),
    );
    let work = match a.mode.as_str() {
        "heartbeat" | "hello" => Workload::Cycle(existing),
        "list" => Workload::Cycle(Arc::new(vec![get("/api/controller/models")])),
        "register" => Workload::Register {
            existing: Arc::new(
                (0..a.instances)
                    .map(|i| post("/api/controller/models", &existing_body(i)))
                    .collect(),
            ),
            tag: format!("{}-{}", a.conc, std::process::id()),
        },
        _ => usage(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (results, secs, cpu, gen_cpu) = rt.block_on(async {
        let start = Arc::new(tokio::sync::Barrier::new(a.conc + 1));
        let deadline = Arc::new(std::sync::OnceLock::new());
        let budget = Arc::new(AtomicU64::new(a.max_requests));
        let tasks: Vec<_> = (0..a.conc)
            .map(|c| {
                tokio::spawn(connection(
                    a.addr.clone(),
                    work.clone(),
                    c,
                    a.conc,
                    start.clone(),
                    deadline.clone(),
                    budget.clone(),
                ))
            })
            .collect();
        start.wait().await;
        let cpu0 = a.pid.and_then(cpu_ticks);
        let gen0 = cpu_ticks(std::process::id());
        let t0 = Instant::now();
        deadline
            .set(t0 + Duration::from_secs_f64(a.secs))
            .expect("set once");
        start.wait().await;
        let mut results = Vec::with_capacity(a.conc);
        for t in tasks {
            results.push(t.await.expect("connection task"));
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu1 = a.pid.and_then(cpu_ticks);
        let gen1 = cpu_ticks(std::process::id());
        let secs_of = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) => Some((y - x) as f64 / clk_tck() as f64),
            _ => None,
        };
        (results, secs, secs_of(cpu0, cpu1), secs_of(gen0, gen1))
    });
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    lat.sort_unstable();
    let ok = lat.len() as u64;
    let per_req = |cpu: Option<f64>| match cpu {
        Some(c) if ok > 0 => format!("{:.1}", c * 1e6 / ok as f64),
        _ => "-".into(),
    };
    println!(
        "{}\t{}\t{}\t{:.3}\t{:.0}\t{}\t{}\t{}\t{}\t{}",
        a.mode,
        a.conc,
        ok,
        secs,
        ok as f64 / secs,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        errors,
        per_req(cpu),
        per_req(gen_cpu)
    );
}

/// Blocking one-shot request on a fresh connection; returns the status.
fn blocking_request(addr: &str, req: &[u8], timeout: Duration) -> std::io::Result<u16> {
    let mut s =
        StdTcpStream::connect_timeout(&addr.parse().map_err(std::io::Error::other)?, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(req)?;
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad response"))
}

fn populate(a: &Args) {
    let started = Instant::now();
    let mut failed = 0;
    for i in 0..a.instances {
        let req = post("/api/controller/models", &existing_body(i));
        match blocking_request(&a.addr, &req, Duration::from_secs(10)) {
            Ok(200) => {}
            _ => failed += 1,
        }
    }
    println!(
        "registered {} instances in {:.2} s ({failed} failed)",
        a.instances - failed,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Spawn → first 200 from `/api/health`, `runs` times; prints each and the median (ms).
fn startup(a: &Args) {
    if a.bin.is_empty() {
        usage();
    }
    let tmp = std::env::temp_dir().join(format!("dbgpt-bench-startup-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let health = get("/api/health");
    let mut times = Vec::new();
    for run in 0..a.runs {
        let port = free_port();
        let registry = match &a.registry {
            Some(r) => {
                // A private copy, so every start opens the same populated file.
                let copy = tmp.join(format!("copy-{run}.redb"));
                std::fs::copy(r, &copy).expect("copy registry");
                copy
            }
            None => tmp.join(format!("empty-{run}.redb")),
        };
        let log = std::fs::File::create(tmp.join(format!("startup-{run}.log"))).expect("log");
        let t0 = Instant::now();
        let mut child = Command::new(&a.bin)
            .args(["start", "controller", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--registry_path")
            .arg(&registry)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dbgpt");
        let addr = format!("127.0.0.1:{port}");
        let mut ready = None;
        // Poll every 0.5 ms for up to 10 s.
        for _ in 0..20_000 {
            if blocking_request(&addr, &health, Duration::from_millis(500)).ok() == Some(200) {
                ready = Some(t0.elapsed());
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        // Stop the controller this loop started (by its pid) and reap it.
        let _ = child.kill();
        let _ = child.wait();
        match ready {
            Some(d) => times.push(d.as_secs_f64() * 1e3),
            None => eprintln!("start {run}: controller never answered /api/health"),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let runs: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    times.sort_by(f64::total_cmp);
    let median = if times.is_empty() {
        f64::NAN
    } else {
        times[times.len() / 2]
    };
    println!("{median:.1}\t{}", runs.join(" "));
}

fn main() {
    let a = parse_args();
    match a.cmd.as_str() {
        "run" => run(&a),
        "populate" => populate(&a),
        "startup" => startup(&a),
        "freeport" => println!("{}", free_port()),
        _ => usage(),
    }
}
