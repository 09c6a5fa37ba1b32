//! Admin socket, daemon mode and the stop/status commands, with the real binary.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn sock(env: &TestEnv, port: u16) -> std::path::PathBuf {
    env.runtime_dir().join(format!("controller-{port}.sock"))
}

fn pidfile(env: &TestEnv, port: u16) -> std::path::PathBuf {
    env.runtime_dir().join(format!("controller-{port}.pid"))
}

/// Sends one raw frame and reads one raw answer frame body.
fn exchange(s: &mut UnixStream, body: &[u8]) -> Vec<u8> {
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_frame(s)
}

fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    body
}

#[test]
fn ctl_status_reports_the_controller() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("a@llm", 1)),
    );
    json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("b@llm", 2)),
    );
    json_req(
        c.port,
        "DELETE",
        "/api/controller/models?model_name=b%40llm&host=127.0.0.1&port=2",
        None,
    );
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let s = &v.as_array().unwrap()[0];
    assert_eq!(s["service"], "controller");
    assert_eq!(s["port"], c.port);
    assert_eq!(s["pid"], c.pid());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (s["healthy"].as_u64(), s["total"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        s["details"]["registry"]
            .as_str()
            .unwrap()
            .starts_with("redb:")
    );
    assert!(s["uptime_ms"].is_u64());
    // Human table.
    let out = env.run(&["ctl", "status"]);
    let text = stdout(&out);
    assert!(
        text.contains("SERVICE") && text.contains("controller") && text.contains("1/2"),
        "{text}"
    );
    // The socket is private.
    let mode = std::fs::metadata(sock(&env, c.port))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn ctl_stop_is_graceful_and_removes_socket_and_pid_file() {
    let env = TestEnv::new();
    let mut c = env.controller(&[]);
    assert!(sock(&env, c.port).exists() && pidfile(&env, c.port).exists());
    let port = c.port.to_string();
    let out = env.run(&["ctl", "stop", "--port", &port]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("Stopped controller"),
        "{}",
        stdout(&out)
    );
    // When ctl returns, the process is gone (exit 0) and its files are removed.
    let status = c
        .wait_exit(Duration::from_secs(1))
        .expect("still running after ctl stop returned");
    assert!(status.success(), "{}", c.logs());
    assert!(!sock(&env, c.port).exists());
    assert!(!pidfile(&env, c.port).exists());
    // Nothing left to stop: an explicit port is an error, naming the flag.
    let out = env.run(&["ctl", "stop", "--port", &port]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--port"), "{}", stderr(&out));
}

#[test]
fn dbgpt_stop_controller_spelling_and_sigterm() {
    let env = TestEnv::new();
    let mut a = env.controller(&[]);
    let mut b = env.controller(&[]);
    let pa = a.port.to_string();
    let out = env.run(&["stop", "controller", "--port", &pa]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(a.wait_exit(Duration::from_secs(1)).is_some());
    assert_eq!(
        http_get_status(b.port, "/api/health"),
        Some(200),
        "the other controller keeps running"
    );
    // SIGTERM takes the same graceful path.
    assert!(b.terminate().success());
    assert!(!sock(&env, b.port).exists());
    let out = env.run(&["stop", "all"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("not found"), "{}", stdout(&out));
}

/// A daemon whose log pipe was closed (the shell or supervisor that read it went away)
/// still stops on SIGTERM: a log line that cannot be written is dropped, it does not take
/// the signal handler down with it.
#[test]
fn sigterm_stops_a_daemon_whose_log_pipe_is_closed() {
    let env = TestEnv::new();
    let port = free_port();
    let port_s = port.to_string();
    let reg = env.path("r.redb");
    for service in ["controller", "apiserver"] {
        let mut args = vec!["start", service, "--host", "127.0.0.1", "--port", &port_s];
        match service {
            "controller" => args.extend(["--registry_path", reg.to_str().unwrap()]),
            _ => args.extend(["--controller_addr", "http://127.0.0.1:1"]),
        }
        let mut child = env
            .cmd()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || http_get_status(
                port,
                "/api/health"
            ) == Some(200)),
            "{service} never answered"
        );
        // The reader of both pipes goes away.
        drop(child.stdout.take());
        drop(child.stderr.take());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_timeout(&mut child, Duration::from_secs(15));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "{service} did not stop cleanly on SIGTERM with its log pipe closed: {status:?}"
        );
    }
}

#[test]
fn stale_socket_after_kill_9_is_cleaned_and_second_instance_refused() {
    let env = TestEnv::new();
    let reg = env.path("r.redb");
    let port = free_port();
    let mut c = env.controller_on(port, &reg, &[]);
    // A second controller on the same port is refused at once, naming the running pid.
    let reg2 = env.path("other.redb");
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--registry_path",
        reg2.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already running") && stderr(&out).contains(&c.pid().to_string()),
        "{}",
        stderr(&out)
    );

    c.kill9();
    assert!(
        sock(&env, port).exists(),
        "kill -9 leaves the socket behind"
    );
    // ctl status does not hang or fail on the stale socket.
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), "[]");
    // The next start cleans it up and serves.
    let c2 = env.controller_on(port, &reg, &[]);
    let out = env.run(&["ctl", "status", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v[0]["pid"], c2.pid());
}

#[test]
fn garbage_unknown_and_oversized_frames_get_error_frames() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let path = sock(&env, c.port);
    // Version 1 Hello as an old client sends it, then Status.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = exchange(&mut s, &[0, 1, 3, b'c', b't', b'l']);
    assert_eq!(hello[0], 0, "Hello answer");
    let status = exchange(&mut s, &[1]);
    assert_eq!(status[0], 1, "Status answer");
    // Unknown variant after the handshake.
    let err = exchange(&mut s, &[99]);
    assert_eq!(err[0], 3, "Error frame");
    assert!(String::from_utf8_lossy(&err).contains("malformed or unknown"));

    // Garbage before Hello.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = exchange(&mut s, b"\xff\xfe garbage");
    assert_eq!(err[0], 3);
    // A request other than Hello first.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = exchange(&mut s, &[1]);
    assert!(String::from_utf8_lossy(&err).contains("Hello"));
    // A future protocol version.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = exchange(&mut s, &[0, 9, 0]);
    assert!(String::from_utf8_lossy(&err).contains("unsupported admin protocol version"));
    // An oversized frame header.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&(10u32 << 20).to_be_bytes()).unwrap();
    let err = read_frame(&mut s);
    assert_eq!(err[0], 3);
    assert!(String::from_utf8_lossy(&err).contains("limit"));
    // The daemon is fine.
    assert_eq!(http_get_status(c.port, "/api/health"), Some(200));
    let out = env.run(&["ctl", "status", "--json"]);
    assert!(stdout(&out).contains("controller"));
}

#[test]
fn daemon_mode_returns_once_serving_and_reports_failures() {
    let env = TestEnv::new();
    let port = free_port();
    let ps = port.to_string();
    let reg = env.path("r.redb");
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--registry-path",
        reg.to_str().unwrap(),
        "--daemon",
    ]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("Started ModelController in background with pid"));
    // Serving the moment --daemon returned.
    assert_eq!(http_get_status(port, "/api/health"), Some(200));
    let log = env.log_dir().join("dbgpt_model_controller.log");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .map(|s| s.contains("controller serving"))
            .unwrap_or(false)),
        "log file {log:?}"
    );

    // Same port again: non-zero with the reason.
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--registry-path",
        env.path("x.redb").to_str().unwrap(),
        "--daemon",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));

    // A port held by someone else: non-zero with the reason.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bp = blocker.local_addr().unwrap().port().to_string();
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &bp,
        "--registry-path",
        env.path("y.redb").to_str().unwrap(),
        "-d",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("port {bp} is already in use")),
        "{}",
        stderr(&out)
    );

    // Same registry file, other port: refused naming the file.
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &free_port().to_string(),
        "--registry-path",
        reg.to_str().unwrap(),
        "-d",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("r.redb"), "{}", stderr(&out));

    // Stop the daemon we started (through its socket, never by process name).
    let out = env.run(&["stop", "controller", "--port", &ps]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(http_get_status(port, "/api/health"), None);
}

#[test]
fn notify_socket_gets_ready_only_once_serving() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.dir.path()).unwrap();
    let nsock = env.path("notify.sock");
    let dgram = std::os::unix::net::UnixDatagram::bind(&nsock).unwrap();
    dgram
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let ps = port.to_string();
    let reg = env.path("r.redb");
    let mut child = env
        .cmd()
        .args([
            "start",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &ps,
            "--registry_path",
            reg.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &nsock)
        .env("WATCHDOG_USEC", "400000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // No WATCHDOG_PID: sd-notify then honours WATCHDOG_USEC for any pid (as systemd allows).
    let mut buf = [0u8; 512];
    let n = dgram.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // At the moment READY arrives, the port and admin socket already answer.
    assert_eq!(http_get_status(port, "/api/health"), Some(200));
    assert!(sock(&env, port).exists());
    // WatchdogSec pings follow READY, every half period (200 ms here): expect at least two
    // within 3 s, and nothing else but STATUS lines.
    let mut pings = 0;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while pings < 2 && std::time::Instant::now() < until {
        let n = dgram.recv(&mut buf).unwrap();
        let m = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(!m.contains("READY=1"), "READY=1 sent twice: {m}");
        if m.contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(
        pings >= 2,
        "expected WATCHDOG=1 pings after READY=1, got {pings}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut saw_stopping = false;
    while let Ok(n) = dgram.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            saw_stopping = true;
            break;
        }
    }
    assert!(saw_stopping);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(10))
            .unwrap()
            .success()
    );
}

#[test]
fn admin_partial_frame_after_hello_times_out() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let mut s = UnixStream::connect(sock(&env, c.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = exchange(&mut s, &[0, 1, 3, b'c', b't', b'l']);
    assert_eq!(hello[0], 0, "Hello answer");
    // A frame header announcing 100 bytes, then only 3 of them.
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    // The daemon gives up on it (an error frame, then the connection is closed) well
    // within the bounded wait, instead of holding the connection forever.
    let err = read_frame(&mut s);
    assert_eq!(err[0], 3, "Error frame");
    assert!(
        String::from_utf8_lossy(&err).contains("timed out waiting for a request"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(http_get_status(c.port, "/api/health"), Some(200));
}

#[test]
fn admin_ctl_stop_by_another_user_says_permission_denied() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run the client as another user");
        return;
    }
    let env = TestEnv::new();
    let c = env.controller(&[]);
    // A shared runtime directory other users may list, as an operator might set up; the
    // socket itself stays 0600 and root's.
    for d in [env.dir.path().to_path_buf(), env.runtime_dir()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let port = c.port.to_string();
    for args in [
        &["ctl", "stop", "--port", &port][..],
        &["stop", "controller", "--port", &port][..],
    ] {
        let out = env
            .cmd_as(65534)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let (o, e) = (stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{o}{e}");
        assert!(
            !o.contains("stale socket") && !e.contains("stale socket"),
            "{o}{e}"
        );
        let expected = format!(
            "permission denied on {} (owned by root)",
            sock(&env, c.port).display()
        );
        assert!(e.contains(&expected), "{o}{e}");
    }
    // Still running, socket still there.
    assert!(sock(&env, c.port).exists());
    assert_eq!(http_get_status(c.port, "/api/health"), Some(200));
}
