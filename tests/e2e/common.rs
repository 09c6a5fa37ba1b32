//! Shared fixtures: an isolated environment per test (temp runtime/state/log dirs),
//! ephemeral ports, and daemons started from the real `dbgpt` binary that are killed by
//! pid when the fixture drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dbgpt");

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Private directories for one test; every `dbgpt` run gets them through the environment.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> Self {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("dbgpt-e2e")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `dbgpt` command with this environment.
    pub fn cmd(&self) -> Command {
        self.with_env(Command::new(BIN))
    }

    /// A `dbgpt` command with this environment, run as uid and gid `id` (through
    /// `setpriv`, so the test must run as root).
    pub fn cmd_as(&self, id: u32) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={id}"),
            format!("--regid={id}"),
            "--clear-groups".into(),
            "--".into(),
            BIN.into(),
        ]);
        self.with_env(c)
    }

    fn with_env(&self, mut c: Command) -> Command {
        c.env("DBGPT_RUNTIME_DIR", self.runtime_dir())
            .env("DBGPT_LOG_DIR", self.log_dir())
            .env("DBGPT_STATE_DIR", self.state_dir())
            .env_remove("CONTROLLER_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DBGPT_LOG_LEVEL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_BSP_SCHEDULE_DELAY")
            .env_remove("OTEL_SDK_DISABLED")
            .stdin(Stdio::null());
        c
    }

    /// Runs `dbgpt ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    }

    /// Starts a foreground controller on a fresh port and waits until it answers.
    pub fn controller(&self, extra: &[&str]) -> Daemon {
        let port = free_port();
        let registry = self.path(&format!("registry-{port}.redb"));
        self.controller_on(port, &registry, extra)
    }

    pub fn controller_on(&self, port: u16, registry: &Path, extra: &[&str]) -> Daemon {
        let d = self.spawn_controller(port, registry, extra);
        d.wait_healthy();
        d
    }

    /// Spawns without waiting.
    pub fn spawn_controller(&self, port: u16, registry: &Path, extra: &[&str]) -> Daemon {
        let port_s = port.to_string();
        let mut args = vec![
            "start",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--registry_path",
            registry.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.spawn(&args, port, "controller")
    }

    /// Spawns a foreground daemon with output to a log file in the test dir.
    pub fn spawn(&self, args: &[&str], port: u16, name: &str) -> Daemon {
        std::fs::create_dir_all(self.log_dir()).unwrap();
        let log = self.log_dir().join(format!("{name}-{port}.out"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = self
            .cmd()
            .args(args)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            port,
            log,
        }
    }
}

/// A daemon process this test started; killed (by pid) on drop if still running.
pub struct Daemon {
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/api/health` answers 200 (panics with the log after 20 s).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get_status(self.port, "/api/health") == Some(200) {
                return;
            }
            if let Some(c) = self.child.as_ref() {
                let _ = c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon on port {} never became healthy:\n{}",
            self.port,
            self.logs()
        );
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("already stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        wait_timeout(&mut c, Duration::from_secs(20)).expect("daemon did not exit after SIGTERM")
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let r = wait_timeout(&mut c, timeout);
        if r.is_none() {
            self.child = Some(c);
        }
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_timeout(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until true or `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A tokio runtime with `threads` worker threads, for test doubles served in-process.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// A worker test double: `app` served on its own runtime on `port` (0: any free one),
/// registered with the controller at `controller` (its base URL) as `model_key`
/// (`name@type`) with `weight` and `enabled`, and heartbeating every 300 ms while the
/// runtime lives (dropping or shutting down the runtime is a worker dying). Returns the
/// runtime and the port.
pub fn registered_double(
    controller: &str,
    port: u16,
    app: axum::Router,
    model_key: &str,
    (weight, enabled): (f64, bool),
) -> (tokio::runtime::Runtime, u16) {
    let rt = runtime(1);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        // With the peer's address, for doubles that count the connections they get.
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let _ = axum::serve(listener, app).await;
    });
    let inst = serde_json::json!({
        "model_name": model_key, "host": "127.0.0.1", "port": port,
        "weight": weight, "check_healthy": true, "healthy": true, "enabled": enabled,
        "prompt_template": null, "last_heartbeat": null
    });
    dbgpt_cluster::http::ensure_tls_provider();
    let client = reqwest::Client::new();
    let url = controller.to_string();
    let r = rt
        .block_on(
            client
                .post(format!("{url}/api/controller/models"))
                .json(&inst)
                .send(),
        )
        .unwrap();
    assert_eq!(r.status(), 200, "registering the test double {model_key}");
    rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = client
                .post(format!("{url}/api/controller/heartbeat"))
                .json(&inst)
                .send()
                .await;
        }
    });
    (rt, port)
}

/// Status, lowercased headers, body.
pub type RawResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// One raw HTTP/1.1 exchange on 127.0.0.1 (no client library in between, so tests see
/// exactly what goes over the wire). Returns (status, headers lowercased, body).
pub fn raw_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<RawResponse> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    // A liveness bound, not a performance check: generous, because a request may load a
    // model or wait behind a build on a loaded 2-core machine.
    s.set_read_timeout(Some(Duration::from_secs(90))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let has_len = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len && (!body.is_empty() || method == "POST") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Some((status, hdrs, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
    out
}

pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    raw_http(port, "GET", path, &[], b"").map(|r| r.0)
}

/// JSON request helper: returns (status, parsed JSON body or Null).
pub fn json_req(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_some() {
        &[("Content-Type", "application/json")]
    } else {
        &[]
    };
    let (status, _, body) = raw_http(port, method, path, headers, &bytes).expect("no HTTP answer");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A DB-GPT worker's registration body.
pub fn instance(model: &str, port: u16) -> serde_json::Value {
    serde_json::json!({
        "model_name": model, "host": "127.0.0.1", "port": port, "weight": 1.0,
        "check_healthy": true, "healthy": false, "enabled": true,
        "prompt_template": null, "last_heartbeat": null
    })
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Starts an apiserver in front of `controller` (instance list refreshed every 0.5 s) with
/// `extra` arguments and waits until it answers.
pub fn apiserver(env: &TestEnv, controller: &str, extra: &[&str]) -> Daemon {
    apiserver_refreshing(env, controller, "0.5", extra)
}

/// [`apiserver`] with the instance list refreshed every `refresh_secs`.
pub fn apiserver_refreshing(
    env: &TestEnv,
    controller: &str,
    refresh_secs: &str,
    extra: &[&str],
) -> Daemon {
    let port = free_port();
    let p = port.to_string();
    let mut args = vec![
        "start",
        "apiserver",
        "--host",
        "127.0.0.1",
        "--port",
        &p,
        "--controller_addr",
        controller,
        "--refresh_interval_secs",
        refresh_secs,
    ];
    args.extend_from_slice(extra);
    let d = env.spawn(&args, port, "apiserver");
    d.wait_healthy();
    d
}
