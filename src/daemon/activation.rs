//! Listening sockets a daemon is given instead of binding its own: by systemd socket
//! activation (`LISTEN_FDS`/`LISTEN_PID`, the `dbgpt-*.socket` units), or by the process it
//! replaces in an upgrade ([`super::handover`]). Either way the socket is checked to be what
//! the daemon needs — a listening TCP socket on its `--port` — before anything is served, and
//! refused with a message that says what it is instead.
//!
//! A socket from systemd outlives the daemon: `systemctl restart` stops the old process and
//! starts the new one while connections wait in the socket's listen queue, so none is
//! refused.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::socket::{SockType, getsockopt, sockopt};

/// Why an inherited socket cannot be the daemon's listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("the socket from {from} is not a listening TCP socket: {what}")]
    NotAListener { from: String, what: String },
    #[error(
        "the socket from {from} listens on port {got}, but this daemon's --port is {want}: give both the same port"
    )]
    WrongPort { from: String, got: u16, want: u16 },
    #[error("systemd passed {0} sockets (LISTEN_FDS); a dbgpt daemon takes exactly one")]
    TooMany(usize),
    #[error("cannot read the sockets systemd passed (LISTEN_FDS): {0}")]
    Env(std::io::Error),
}

/// Checks that `fd` is a listening TCP socket (IPv4 or IPv6) on `port` and returns it as a
/// non-blocking listener; `from` names where it came from in errors.
pub fn tcp_listener(
    fd: OwnedFd,
    port: u16,
    from: &str,
) -> Result<std::net::TcpListener, ListenerError> {
    let not = |what: String| ListenerError::NotAListener {
        from: from.to_string(),
        what,
    };
    match getsockopt(&fd.as_fd(), sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => return Err(not(format!("it is a {other:?} socket, not a stream"))),
        Err(nix::errno::Errno::ENOTSOCK) => return Err(not("it is not a socket".into())),
        Err(e) => return Err(not(format!("cannot examine it: {e}"))),
    }
    match getsockopt(&fd.as_fd(), sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => {
            return Err(not(
                "it is not listening (a connection, or never listened)".into()
            ));
        }
        Err(e) => return Err(not(format!("cannot examine it: {e}"))),
    }
    let l = std::net::TcpListener::from(fd);
    let got = match l.local_addr() {
        Ok(a) => a.port(),
        Err(_) => {
            return Err(not(
                "it is not a TCP socket over IPv4 or IPv6 (a Unix socket?)".into(),
            ));
        }
    };
    if got != port {
        return Err(ListenerError::WrongPort {
            from: from.to_string(),
            got,
            want: port,
        });
    }
    l.set_nonblocking(true)
        .map_err(|e| not(format!("cannot make it non-blocking: {e}")))?;
    Ok(l)
}

/// What `systemd socket activation` names the source in messages.
pub const SYSTEMD: &str = "systemd (LISTEN_FDS)";

/// The listening socket systemd passed for this process (`LISTEN_PID` is ours and
/// `LISTEN_FDS` is 1), checked by [`tcp_listener`]; `None` when not socket-activated.
pub fn systemd_listener(port: u16) -> Result<Option<std::net::TcpListener>, ListenerError> {
    let mut fds = sd_notify::listen_fds().map_err(ListenerError::Env)?;
    let n = fds.len();
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if n > 1 {
        return Err(ListenerError::TooMany(n));
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) for it to
    // own; nothing else in the process refers to it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    tcp_listener(fd, port, SYSTEMD).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(fd: impl Into<OwnedFd>, port: u16) -> Result<std::net::TcpListener, ListenerError> {
        tcp_listener(fd.into(), port, "the test")
    }

    #[test]
    fn a_listening_tcp_socket_on_the_port_is_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = check(l, port).unwrap();
        assert_eq!(got.local_addr().unwrap().port(), port);
        let l6 = match std::net::TcpListener::bind("[::1]:0") {
            Ok(l) => l,
            Err(_) => return, // no IPv6 here
        };
        let port = l6.local_addr().unwrap().port();
        check(l6, port).unwrap();
    }

    #[test]
    fn anything_else_is_refused_with_what_it_is() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = check(l.try_clone().unwrap(), port + 1).unwrap_err();
        assert!(
            matches!(e, ListenerError::WrongPort { got, want, .. } if got == port && want == port + 1),
            "{e}"
        );

        let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let e = check(conn, port).unwrap_err().to_string();
        assert!(
            e.contains("not a listening TCP socket") && e.contains("not listening"),
            "{e}"
        );

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        let e = check(udp, uport).unwrap_err().to_string();
        assert!(e.contains("not a stream"), "{e}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let e = check(file, port).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let e = check(unix, port).unwrap_err().to_string();
        assert!(e.contains("not a TCP socket over IPv4 or IPv6"), "{e}");
    }
}
