//! Admin frames: `u32` big-endian length + postcard body, version-negotiated.
//!
//! The first request on a connection must be [`Request::Hello`] carrying the client's
//! protocol version; the server answers [`Response::Hello`] with its own. Postcard matches
//! enum variants by index and is not self-describing, so variants are only ever *appended*
//! and existing ones never change shape; the fixture tests pin the bytes of version 1.

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Client → daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Must come first: the client's protocol version and a name for logs.
    Hello { version: u16, client: String },
    /// Ask for [`Status`].
    Status,
    /// Graceful stop (same path as SIGTERM). Answered with [`Response::Stopping`].
    Stop,
    /// Replace the daemon by the binary now on disk, handing over its sockets (see
    /// [`crate::daemon::handover`]). Answered with [`Response::Upgraded`] once the new
    /// process serves, or an error saying why not (this daemon then keeps serving).
    Upgrade,
    /// From the new process of an upgrade: send the descriptors. Answered with
    /// [`Response::HandingOver`], which carries them (SCM_RIGHTS).
    HandOver,
    /// From the new process of an upgrade: it serves; the old one may go. Answered with
    /// [`Response::Released`].
    Release,
    /// From the new process of an upgrade: it gives up (the old one keeps serving).
    /// Answered with [`Response::Noted`].
    Failed { reason: String },
}

/// Daemon → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u16,
        server: String,
    },
    Status(Status),
    Stopping,
    /// Any failure: bad frame, unknown request, permission, version mismatch.
    Error {
        message: String,
    },
    /// The upgrade is done: the new process (`pid`) serves, this one drains and exits.
    Upgraded {
        pid: u32,
    },
    /// The descriptors of an upgrade travel with this frame.
    HandingOver,
    /// The old process of an upgrade has let go of its sockets.
    Released,
    /// Acknowledges [`Request::Failed`].
    Noted,
}

/// What `dbgpt ctl status` shows for one daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `controller`, `worker` or `apiserver`.
    pub service: String,
    /// HTTP port.
    pub port: u16,
    pub pid: u32,
    /// dbgpt version of the daemon.
    pub version: String,
    pub started_unix_ms: u64,
    pub uptime_ms: u64,
    /// Instances known to a controller (for other services: models served).
    pub healthy: u32,
    pub total: u32,
    /// Service-specific facts, in display order (e.g. `registry`, `models`, `in_flight`).
    pub details: Vec<(String, String)>,
}

/// Encodes a message body (without the length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("postcard encoding of plain data cannot fail")
}

/// Decodes a message body.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The codec both sides use.
pub fn codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Version-1 bytes. An old client or daemon sends exactly these: never change them.
    #[test]
    fn v1_frames_are_pinned() {
        assert_eq!(
            encode(&Request::Hello {
                version: 1,
                client: "ctl".into()
            }),
            [0, 1, 3, b'c', b't', b'l']
        );
        assert_eq!(encode(&Request::Status), [1]);
        assert_eq!(encode(&Request::Stop), [2]);
        assert_eq!(encode(&Response::Stopping), [2]);
        // Upgrades (appended after version 1's variants: old peers see an unknown request).
        assert_eq!(encode(&Request::Upgrade), [3]);
        assert_eq!(encode(&Request::HandOver), [4]);
        assert_eq!(encode(&Request::Release), [5]);
        assert_eq!(
            encode(&Request::Failed { reason: "x".into() }),
            [6, 1, b'x']
        );
        assert_eq!(encode(&Response::Upgraded { pid: 300 }), [4, 172, 2]);
        assert_eq!(encode(&Response::HandingOver), [5]);
        assert_eq!(encode(&Response::Released), [6]);
        assert_eq!(encode(&Response::Noted), [7]);
        assert_eq!(
            decode::<Response>(&[3, 2, b'n', b'o']).unwrap(),
            Response::Error {
                message: "no".into()
            }
        );
        let st = Status {
            service: "controller".into(),
            port: 8000,
            pid: 42,
            version: "0.1.0".into(),
            started_unix_ms: 1,
            uptime_ms: 2,
            healthy: 3,
            total: 4,
            details: vec![("registry".into(), "redb:/x".into())],
        };
        let bytes = encode(&Response::Status(st.clone()));
        assert_eq!(
            bytes,
            [
                1, 10, 99, 111, 110, 116, 114, 111, 108, 108, 101, 114, 192, 62, 42, 5, 48, 46, 49,
                46, 48, 1, 2, 3, 4, 1, 8, 114, 101, 103, 105, 115, 116, 114, 121, 7, 114, 101, 100,
                98, 58, 47, 120
            ]
        );
        assert_eq!(decode::<Response>(&bytes).unwrap(), Response::Status(st));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<Request>(&[]).is_err());
        assert!(decode::<Request>(&[77]).is_err());
        assert!(decode::<Request>(&[0, 1, 200]).is_err());
    }

    proptest! {
        #[test]
        fn status_round_trips(service in ".{0,20}", port: u16, pid: u32, h: u32, t: u32,
                              details in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..4)) {
            let st = Response::Status(Status { service, port, pid, version: "v".into(),
                started_unix_ms: 5, uptime_ms: 6, healthy: h, total: t, details });
            prop_assert_eq!(decode::<Response>(&encode(&st)).unwrap(), st);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
