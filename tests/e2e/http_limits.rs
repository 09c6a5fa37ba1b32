//! HTTP connection limits (`--http_*_timeout_secs`, `--http_max_connections`) on the real
//! daemons: slow, idle and stalled connections are cut while new clients keep being served,
//! and connections over the cap wait until a slot frees.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

/// One-second limits, so that every cut happens quickly.
const SHORT: &[&str] = &[
    "--http_header_timeout_secs",
    "1",
    "--http_idle_timeout_secs",
    "1",
    "--http_body_timeout_secs",
    "1",
];

/// How long a test waits for the daemon to cut a connection (well above the 1 s limits).
const BOUND: Duration = Duration::from_secs(20);

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s
}

/// Reads until the daemon closes the connection; `None` if it is still open after [`BOUND`].
fn read_until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(out),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Sends a request head one byte every 200 ms and never finishes it; true once the daemon
/// has closed the connection (within [`BOUND`]).
fn slow_head_is_cut(port: u16) -> bool {
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let head = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let started = Instant::now();
    let mut buf = [0u8; 512];
    for i in 0.. {
        if started.elapsed() > BOUND {
            return false;
        }
        let byte = head.get(i).copied().unwrap_or(b'a');
        if s.write_all(&[byte]).is_err() {
            return true;
        }
        match s.read(&mut buf) {
            // Closed (with or without a 408 first).
            Ok(0) => return true,
            Ok(_) => return read_until_closed(&mut s).is_some(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    unreachable!()
}

/// A request to the daemon's `/api/health` on a new connection.
fn health(port: u16) -> Option<u16> {
    http_get_status(port, "/api/health")
}

/// Starts a chunked upload to `path`, sends one chunk and then nothing.
fn stalled_upload(port: u16, path: &str) -> TcpStream {
    let mut s = connect(port);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\n"
    )
    .unwrap();
    s
}

/// An idle keep-alive connection after one answered request.
fn idle_after_request(port: u16) -> TcpStream {
    let mut s = connect(port);
    s.write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

fn assert_cuts(port: u16, upload_path: &str) {
    // Slow and idle connections are open while a new client asks.
    let mut idle = connect(port);
    let mut idle_kept = idle_after_request(port);
    let mut upload = stalled_upload(port, upload_path);
    let slow = std::thread::spawn(move || slow_head_is_cut(port));
    assert_eq!(health(port), Some(200));

    assert!(
        read_until_closed(&mut idle).is_some(),
        "a connection that never sent anything is still open after {BOUND:?}"
    );
    assert!(
        read_until_closed(&mut idle_kept).is_some(),
        "an idle keep-alive connection is still open after {BOUND:?}"
    );
    let answer = read_until_closed(&mut upload)
        .unwrap_or_else(|| panic!("a stalled chunked upload is still open after {BOUND:?}"));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request body not received"), "{answer}");
    assert!(
        slow.join().unwrap(),
        "a request head sent one byte at a time is still open after {BOUND:?}"
    );
    // And the daemon still answers.
    assert_eq!(health(port), Some(200));
}

#[test]
fn http_limits_controller_cuts_slow_idle_and_stalled_connections() {
    let env = TestEnv::new();
    let c = env.controller(SHORT);
    assert_cuts(c.port, "/api/controller/models");
}

#[test]
fn http_limits_apiserver_cuts_slow_idle_and_stalled_connections() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let a = apiserver(&env, &c.url(), SHORT);
    let port = a.port;
    assert_cuts(port, "/api/v1/chat/completions");
}

#[test]
fn http_limits_connections_over_the_cap_wait_until_a_slot_frees() {
    let env = TestEnv::new();
    let c = env.controller(&["--http_max_connections", "2"]);
    // Two served keep-alive connections take both slots.
    let held: Vec<_> = (0..2).map(|_| idle_after_request(c.port)).collect();
    let mut third = connect(c.port);
    third
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Not served while both slots are taken (it waits in the listen backlog)…
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    let early = third.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "a connection over the cap was served: {early:?}"
    );
    // …and served once one closes.
    drop(held);
    third.set_read_timeout(Some(BOUND)).unwrap();
    let answer = read_until_closed(&mut third).expect("not served after the slots freed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(health(c.port), Some(200));
}
