//! Restarts and upgrades that drop nothing: a load of plain and streamed chat requests
//! through the apiserver (a proxy worker in front of a test-double upstream whose streams
//! last a while) while the apiserver, the controller and the worker are upgraded in place
//! (`dbgpt ctl upgrade`) and the apiserver and controller are restarted the way systemd
//! socket activation does it (the test holds their listening sockets and starts each new
//! process with it as fd 3, `LISTEN_FDS=1`, `LISTEN_PID`). Every request must succeed, every
//! stream must end with `[DONE]`, no connection may be refused, and the worker's model must
//! stay registered and healthy throughout. Also the bad inputs: a failed upgrade leaves the
//! old process serving, a second upgrade while one runs is refused, and a handed-over socket
//! that is not a listening TCP socket is refused with what it is.
//!
//! `scripts/restart-load.sh` runs [`restart_load_at_scale`] (ignored here) with ten rounds
//! and a real SmolLM2 worker beside the proxy worker.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};

use crate::common::*;

/// Events of each upstream stream, [`STEP`] apart.
const CHUNKS: usize = 8;
const STEP: Duration = Duration::from_millis(25);

/// A test-double OpenAI upstream: a fixed chat answer, or a stream of [`CHUNKS`] events.
struct Upstream {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

fn chunk(i: usize) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}},\"finish_reason\":null}}]}}\n\n"
    )
}

const WHOLE: &str = r#"{"id":"w","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"whole answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

impl Upstream {
    fn start() -> Self {
        use axum::response::IntoResponse;
        use futures::StreamExt;
        let handler = |body: Bytes| async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if v["stream"] == true {
                let events = futures::stream::iter(0..=CHUNKS).then(|i| async move {
                    tokio::time::sleep(STEP).await;
                    let e = if i == CHUNKS {
                        "data: [DONE]\n\n".to_string()
                    } else {
                        chunk(i)
                    };
                    Ok::<_, std::convert::Infallible>(Bytes::from(e))
                });
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(events),
                )
                    .into_response()
            } else {
                ([("content-type", "application/json")], WHOLE).into_response()
            }
        };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
        let rt = runtime(1);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream { port, _rt: rt }
    }
}

/// What the load saw.
struct Tally {
    started: Instant,
    sent: AtomicU64,
    streams: AtomicU64,
    failed: AtomicU64,
    truncated: AtomicU64,
    refused: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            started: Instant::now(),
            sent: Default::default(),
            streams: Default::default(),
            failed: Default::default(),
            truncated: Default::default(),
            refused: Default::default(),
            samples: Default::default(),
        }
    }

    fn note(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap();
        if s.len() < 10 {
            s.push(format!("at {:.1?}: {what}", self.started.elapsed()));
        }
    }

    fn row(&self, what: &str) -> String {
        format!(
            "{what:<34} {:>8} {:>8} {:>7} {:>9} {:>8}",
            self.sent.load(Ordering::Relaxed),
            self.streams.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.truncated.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed)
        )
    }
}

/// One request; `stream` asks for SSE and checks every event and `[DONE]` arrived.
async fn one(client: &reqwest::Client, port: u16, model: &str, stream: bool, t: &Tally) {
    t.sent.fetch_add(1, Ordering::Relaxed);
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                      "stream": stream, "max_tokens": 8, "temperature": 0});
    let r = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&body)
        .send()
        .await;
    let resp = match r {
        Ok(r) => r,
        Err(e) if e.is_connect() => return t.note(&t.refused, format!("refused: {e:?}")),
        Err(e) => return t.note(&t.failed, format!("failed: {e:?}")),
    };
    let status = resp.status();
    let text = resp.text().await;
    if status != 200 {
        return t.note(&t.failed, format!("HTTP {status}: {text:?}"));
    }
    let text = match text {
        Ok(b) => b,
        Err(e) if stream => return t.note(&t.truncated, format!("stream broke: {e:?}")),
        Err(e) => return t.note(&t.failed, format!("body broke: {e:?}")),
    };
    if stream {
        t.streams.fetch_add(1, Ordering::Relaxed);
        let complete = text.trim_end().ends_with("data: [DONE]")
            && (model != "chat" || (0..CHUNKS).all(|i| text.contains(&format!("t{i} "))));
        if !complete {
            t.note(&t.truncated, format!("truncated stream: {text:?}"));
        }
    } else if !text.contains("\"choices\"") {
        t.note(&t.failed, format!("no answer: {text}"));
    }
}

/// Runs `clients` request loops (half on keep-alive connections, half on a new connection
/// per request), alternating plain and streamed requests, until `stop`.
fn load(
    port: u16,
    models: Vec<String>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, std::thread::JoinHandle<()>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tally = Arc::new(Tally::new());
    let t = tally.clone();
    let h = std::thread::spawn(move || {
        runtime(2).block_on(async move {
            let mut tasks = Vec::new();
            for c in 0..clients {
                let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60));
                if c % 2 == 1 {
                    b = b.pool_max_idle_per_host(0);
                }
                let client = b.build().unwrap();
                let (t, stop, models) = (t.clone(), stop.clone(), models.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let model = &models[i % models.len()];
                        one(&client, port, model, i % 2 == 0, &t).await;
                        i += 1;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
    (tally, h)
}

/// Whether process `pid` has exited (gone, or a zombie); reaps it if it is our child.
fn gone(pid: u32) -> bool {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let _ = waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(WaitPidFlag::WNOHANG),
    );
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The pids of the daemons this test started (directly or through upgrades): killed on
/// drop if still running.
#[derive(Default)]
struct Pids(Mutex<Vec<u32>>);

impl Pids {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            if !gone(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = wait_until(Duration::from_secs(5), || gone(pid));
            }
        }
    }
}

/// The pid in `<service>-<port>.pid`.
fn pid_of(env: &TestEnv, service: &str, port: u16) -> Option<u32> {
    std::fs::read_to_string(env.runtime_dir().join(format!("{service}-{port}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `dbgpt ctl upgrade --port P`; returns (old pid, new pid) once the new one serves and the
/// old one has exited.
fn upgrade(env: &TestEnv, pids: &Pids, service: &str, port: u16) -> (u32, u32) {
    let old = pid_of(env, service, port).expect("no pid file");
    let out = env.run(&["ctl", "upgrade", "--port", &port.to_string()]);
    assert!(
        out.status.success(),
        "upgrade of the {service} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let new = pid_of(env, service, port).expect("no pid file after the upgrade");
    assert_ne!(new, old, "{}", stdout(&out));
    pids.add(new);
    assert!(
        stdout(&out).contains(&format!("pid {new} serves")),
        "{}",
        stdout(&out)
    );
    assert!(
        wait_until(Duration::from_secs(40), || gone(old)),
        "the old {service} (pid {old}) did not exit after handing over"
    );
    // The admin socket and pid file now belong to the new process.
    let st = env.run(&["ctl", "status", "--json"]);
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["port"] == port && d["pid"] == new),
        "{v}"
    );
    (old, new)
}

/// Starts `dbgpt ARGS` the way systemd socket activation does: `listener` as fd 3,
/// `LISTEN_FDS=1` and `LISTEN_PID` set to the new process's pid.
fn spawn_activated(
    env: &TestEnv,
    listener: &std::net::TcpListener,
    args: &[&str],
    log: &str,
) -> Child {
    std::fs::create_dir_all(env.log_dir()).unwrap();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.log_dir().join(log))
        .unwrap();
    let fd = listener.as_raw_fd();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
        .arg(BIN)
        .args(args)
        .env("DBGPT_RUNTIME_DIR", env.runtime_dir())
        .env("DBGPT_LOG_DIR", env.log_dir())
        .env("DBGPT_STATE_DIR", env.state_dir())
        .env_remove("CONTROLLER_ADDRESS")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DBGPT_LOG_LEVEL")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().unwrap()
}

/// `systemctl restart` of a socket-activated daemon: SIGTERM, wait for the exit, start a
/// new process on the same socket. Returns the new process.
fn restart_activated(
    env: &TestEnv,
    pids: &Pids,
    service: &str,
    listener: &std::net::TcpListener,
    args: &[&str],
) -> u32 {
    let port = listener.local_addr().unwrap().port();
    let old = pid_of(env, service, port).expect("no pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(40), || gone(old)),
        "{service} pid {old} did not stop"
    );
    let child = spawn_activated(env, listener, args, &format!("{service}-{port}.out"));
    let new = child.id();
    pids.add(new);
    std::mem::forget(child);
    assert!(
        wait_until(Duration::from_secs(30), || pid_of(env, service, port)
            == Some(new)
            && http_get_status(port, "/api/ready") == Some(200)),
        "the restarted {service} never became ready"
    );
    new
}

fn models_healthy(controller: u16, key: &str) -> Option<bool> {
    let (s, _, b) = raw_http(
        controller,
        "GET",
        &format!(
            "/api/controller/models?model_name={}",
            key.replace('@', "%40")
        ),
        &[],
        b"",
    )?;
    let v: Value = serde_json::from_slice(&b).ok()?;
    Some(s == 200 && v.as_array()?.iter().any(|i| i["healthy"] == json!(true)))
}

/// The cluster under test and the operations applied to it while the load runs.
fn restarts_under_load(rounds: usize, clients: usize, local_model: Option<String>) {
    let env = TestEnv::new();
    let pids = Pids::default();
    let up = Upstream::start();

    // Controller and apiserver on sockets held here, as systemd's .socket units hold them.
    let c_sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c_port = c_sock.local_addr().unwrap().port();
    let registry = env.path("registry.redb");
    let c_args_owned = [
        "start".to_string(),
        "controller".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        c_port.to_string(),
        "--registry_path".into(),
        registry.display().to_string(),
    ];
    let c_args: Vec<&str> = c_args_owned.iter().map(String::as_str).collect();
    let c = spawn_activated(&env, &c_sock, &c_args, &format!("controller-{c_port}.out"));
    pids.add(c.id());
    std::mem::forget(c);
    assert!(wait_until(Duration::from_secs(20), || http_get_status(
        c_port,
        "/api/ready"
    ) == Some(200)));
    let controller = format!("http://127.0.0.1:{c_port}");

    let mut models = vec!["chat".to_string()];
    let mut w = crate::worker::worker(
        &env,
        &controller,
        &[
            "--model_name",
            "chat",
            "--proxy_api_base",
            &format!("http://127.0.0.1:{}/v1", up.port),
        ],
    );
    // Tracked by pid from here on (the process is replaced by upgrades).
    pids.add(w.pid());
    std::mem::forget(w.child.take());
    let mut workers = vec![(w.port, "chat@llm".to_string())];
    let mut _local = None;
    if let Some(path) = &local_model {
        let lw = crate::worker::worker(
            &env,
            &controller,
            &["--model_name", "smollm2", "--model_path", path],
        );
        let mut lw = lw;
        pids.add(lw.pid());
        std::mem::forget(lw.child.take());
        workers.push((lw.port, "smollm2@llm".into()));
        models.push("smollm2".into());
        _local = Some(lw);
    }

    let a_sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a_port = a_sock.local_addr().unwrap().port();
    let a_args_owned = [
        "start".to_string(),
        "apiserver".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        a_port.to_string(),
        "--controller_addr".into(),
        controller.clone(),
        "--refresh_interval_secs".into(),
        "0.5".into(),
    ];
    let a_args: Vec<&str> = a_args_owned.iter().map(String::as_str).collect();
    let a = spawn_activated(&env, &a_sock, &a_args, &format!("apiserver-{a_port}.out"));
    pids.add(a.id());
    std::mem::forget(a);
    assert!(
        wait_until(Duration::from_secs(30), || {
            json_req(a_port, "GET", "/v1/models", None).1["data"]
                .as_array()
                .is_some_and(|d| d.len() == models.len())
        }),
        "the models never showed up"
    );

    // Watch the workers' registrations throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let unhealthy = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (stop, unhealthy, workers) = (stop.clone(), unhealthy.clone(), workers.clone());
        std::thread::spawn(move || {
            let mut checks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (_, key) in &workers {
                    checks += 1;
                    if models_healthy(c_port, key) == Some(false) {
                        unhealthy.lock().unwrap().push(key.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            checks
        })
    };

    let (tally, load_thread) = load(a_port, models.clone(), clients, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let mut log = Vec::new();
    let started = Instant::now();
    let at = |started: Instant| format!("{:.1?}", started.elapsed());
    let pause = || std::thread::sleep(Duration::from_millis(300));
    for round in 0..rounds {
        let (o, n) = upgrade(&env, &pids, "apiserver", a_port);
        log.push(format!(
            "{} round {round}: apiserver upgraded {o} -> {n}",
            at(started)
        ));
        pause();
        for (port, _) in &workers {
            let (o, n) = upgrade(&env, &pids, "worker", *port);
            log.push(format!(
                "{} round {round}: worker {port} upgraded {o} -> {n}",
                at(started)
            ));
            pause();
        }
        let (o, n) = upgrade(&env, &pids, "controller", c_port);
        log.push(format!(
            "{} round {round}: controller upgraded {o} -> {n}",
            at(started)
        ));
        pause();
        let n = restart_activated(&env, &pids, "apiserver", &a_sock, &a_args);
        log.push(format!(
            "{} round {round}: apiserver restarted as {n}",
            at(started)
        ));
        pause();
        let n = restart_activated(&env, &pids, "controller", &c_sock, &c_args);
        log.push(format!(
            "{} round {round}: controller restarted as {n}",
            at(started)
        ));
        pause();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load_thread.join().unwrap();
    let checks = watcher.join().unwrap();
    let elapsed = started.elapsed();

    println!(
        "{:<34} {:>8} {:>8} {:>7} {:>9} {:>8}",
        "operations", "requests", "streams", "failed", "truncated", "refused"
    );
    let per = workers.len() + 4;
    println!(
        "{}",
        tally.row(&format!("{rounds} rounds x {per} ops in {:.0?}", elapsed))
    );
    let samples = tally.samples.lock().unwrap().clone();
    let mut warnings = Vec::new();
    for e in std::fs::read_dir(env.log_dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        warnings.extend(
            text.lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .filter(|l| !l.contains("no --api_keys"))
                .map(|l| format!("{}: {l}", e.file_name().to_string_lossy())),
        );
    }
    let report = format!(
        "{}\nsamples (load time): {samples:#?}\nops (test time):\n{}\nwarnings:\n{}",
        tally.row("total"),
        log.join("\n"),
        warnings.join("\n")
    );
    assert!(
        tally.sent.load(Ordering::Relaxed) >= 20 * rounds as u64,
        "{report}"
    );
    assert!(tally.streams.load(Ordering::Relaxed) > 0, "{report}");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(tally.truncated.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(tally.refused.load(Ordering::Relaxed), 0, "{report}");
    assert!(checks > 0);
    assert_eq!(
        *unhealthy.lock().unwrap(),
        Vec::<String>::new(),
        "a worker's model was not healthy during its upgrades"
    );
    // Every old process said it handed over and drained.
    let logs = std::fs::read_to_string(env.log_dir().join(format!("apiserver-{a_port}.out")))
        .unwrap_or_default();
    assert!(logs.contains("handed over to the new process"), "{logs}");
}

#[test]
fn upgrades_and_socket_activated_restarts_drop_no_request() {
    restarts_under_load(2, 4, None);
}

/// The larger run of `scripts/restart-load.sh`: `RESTART_ROUNDS` rounds (10) with
/// `RESTART_CLIENTS` clients (8), and a SmolLM2 worker beside the proxy one.
#[test]
#[ignore = "load run of scripts/restart-load.sh"]
fn restart_load_at_scale() {
    let n = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let model = crate::worker::gguf();
    let local = std::path::Path::new(&model).exists().then_some(model);
    restarts_under_load(n("RESTART_ROUNDS", 10), n("RESTART_CLIENTS", 8), local);
}

#[test]
fn readiness_turns_503_while_draining_and_workers_say_so() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let w = crate::worker::worker(
        &env,
        &c.url(),
        &[
            "--model_name",
            "chat",
            "--proxy_api_base",
            "http://127.0.0.1:9/v1",
        ],
    );
    for port in [c.port, w.port] {
        assert_eq!(http_get_status(port, "/api/ready"), Some(200));
    }
    // A stop begins: the worker deregisters, then keeps answering (for the grace period)
    // with readiness 503, health 200 and the draining header on every response.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut seen = None;
    wait_until(Duration::from_secs(5), || {
        let ready = raw_http(w.port, "GET", "/api/ready", &[], b"");
        let health = raw_http(w.port, "GET", "/api/health", &[], b"");
        if let (Some(r), Some(h)) = (ready, health)
            && r.0 == 503
        {
            seen = Some((r, h));
            return true;
        }
        false
    });
    let (ready, health) = seen.expect("the worker's readiness never turned 503 while draining");
    assert_eq!(health.0, 200);
    assert!(
        health
            .1
            .iter()
            .any(|(k, v)| k == "x-dbgpt-draining" && v == "1"),
        "{:?}",
        health.1
    );
    assert!(String::from_utf8_lossy(&ready.2).contains("draining"));
}

#[test]
fn failed_and_concurrent_upgrades_leave_the_old_process_serving() {
    let env = TestEnv::new();
    let pids = Pids::default();
    // A controller that never answers (connections wait in its backlog): each apiserver
    // start takes its 5 s first refresh, long enough to try a second upgrade meanwhile.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let controller = format!("http://{}", black_hole.local_addr().unwrap());
    let cfg = env.path("apiserver.toml");
    std::fs::write(&cfg, "refresh_interval_secs = 30\n").unwrap();
    let port = free_port();
    let ps = port.to_string();
    let args = [
        "start",
        "apiserver",
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--controller_addr",
        &controller,
        "--config",
        cfg.to_str().unwrap(),
    ];
    let mut api = env.spawn(&args, port, "apiserver");
    pids.add(api.pid());
    let api_child = api.child.take().unwrap();
    assert!(wait_until(Duration::from_secs(30), || http_get_status(
        port,
        "/api/ready"
    ) == Some(200)));
    let old = api_child.id();
    std::mem::forget(api_child);

    // Two upgrades at once: the second is refused while the first runs.
    let first = env
        .cmd()
        .args(["ctl", "upgrade", "--port", &ps])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let second = env.run(&["ctl", "upgrade", "--port", &ps]);
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("upgrade") && stderr(&second).contains("in progress"),
        "{}",
        stderr(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}{}",
        stdout(&first),
        stderr(&first)
    );
    let new = pid_of(&env, "apiserver", port).unwrap();
    pids.add(new);
    assert_ne!(new, old);
    assert!(wait_until(Duration::from_secs(40), || gone(old)));

    // A new process that cannot start (its config file is now broken): the upgrade fails
    // with a message and the running process keeps serving, files and all.
    std::fs::write(&cfg, "refresh_interval_secs = [[[\n").unwrap();
    let out = env.run(&["ctl", "upgrade", "--port", &ps]);
    assert!(
        !out.status.success(),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        std::fs::read_to_string(env.log_dir().join(format!("apiserver-{port}.out")))
            .unwrap_or_default()
    );
    assert!(
        stderr(&out).contains("was not upgraded") && stderr(&out).contains("before taking over"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pid_of(&env, "apiserver", port), Some(new));
    assert!(!gone(new));
    assert_eq!(http_get_status(port, "/api/ready"), Some(200));
    let st = env.run(&["ctl", "status", "--json"]);
    assert!(String::from_utf8_lossy(&st.stdout).contains(&format!("\"pid\": {new}")));
}

#[test]
fn a_handed_over_socket_that_is_not_listening_tcp_is_refused() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::{Read, Write};
    let env = TestEnv::new();
    std::fs::create_dir_all(env.runtime_dir()).unwrap();
    // A fake old process: answers Hello, then HandOver with a UDP socket where the TCP
    // listener should be, and records what the new process says next.
    let path = env.path("fake-old.sock");
    let fake = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let port = free_port();
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let pid_file = std::fs::File::create(env.path("fake.pid")).unwrap();
    let admin = std::os::unix::net::UnixListener::bind(env.path("fake-admin.sock")).unwrap();
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let fake_old = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let read_frame = |s: &mut std::os::unix::net::UnixStream| {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).ok()?;
            let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut b).ok()?;
            Some(b)
        };
        let hello = read_frame(&mut s).unwrap();
        assert_eq!(hello[0], 0, "Hello first");
        // Response::Hello { version: 1, server: "x" }
        s.write_all(&frame(&[0, 1, 1, b'x'])).unwrap();
        let req = read_frame(&mut s).unwrap();
        assert_eq!(req, [4], "HandOver");
        let fds = [udp.as_raw_fd(), pid_file.as_raw_fd(), admin.as_raw_fd()];
        // Response::HandingOver, with the descriptors.
        sendmsg::<()>(
            s.as_raw_fd(),
            &[std::io::IoSlice::new(&frame(&[5]))],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        read_frame(&mut s)
    });
    let out = env
        .cmd()
        .args([
            "start",
            "apiserver",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--controller_addr",
            "http://127.0.0.1:9",
        ])
        .env("DBGPT_UPGRADE_FROM", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the socket from the old process is not a listening TCP socket")
            && err.contains("not a stream"),
        "{err}"
    );
    // The old process was told why (Request::Failed { reason }).
    let failed = fake_old.join().unwrap().expect("no failure report");
    assert_eq!(failed[0], 6, "Failed");
    assert!(String::from_utf8_lossy(&failed).contains("not a listening TCP socket"));
}

#[test]
fn a_socket_activated_daemon_checks_what_systemd_passed() {
    let env = TestEnv::new();
    // The right socket: served, and the daemon says so.
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let ps = port.to_string();
    let args = [
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--registry_path",
        env.path("r.redb").to_str().unwrap().to_string().leak(),
    ];
    let mut c = spawn_activated(&env, &sock, &args, "activated.out");
    assert!(wait_until(Duration::from_secs(20), || http_get_status(
        port,
        "/api/ready"
    ) == Some(200)));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(wait_timeout(&mut c, Duration::from_secs(20)).is_some_and(|s| s.success()));
    let logs = std::fs::read_to_string(env.log_dir().join("activated.out")).unwrap();
    assert!(logs.contains("socket activation"), "{logs}");
    // Still listening (held here): a connection is queued, not refused, between processes.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // A socket on another port than --port: refused, naming both.
    let other = free_port().to_string();
    let args2 = [
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &other,
        "--registry_path",
        env.path("r2.redb").to_str().unwrap().to_string().leak(),
    ];
    let mut c = spawn_activated(&env, &sock, &args2, "wrong-port.out");
    let st = wait_timeout(&mut c, Duration::from_secs(20)).expect("did not exit");
    assert!(!st.success());
    let logs = std::fs::read_to_string(env.log_dir().join("wrong-port.out")).unwrap();
    assert!(
        logs.contains(&format!(
            "listens on port {port}, but this daemon's --port is {other}"
        )),
        "{logs}"
    );
}
