//! The HTTP protocols between the processes, one module per protocol, in DB-GPT 0.5.10's
//! JSON shapes: [`controller`] (registration, heartbeats, listings) and [`worker`]
//! (generation, embeddings, model lifecycle), plus one of ours, [`keys`] (managed API keys
//! and their usage). Every side that speaks a protocol — server, client, the CLI — uses the
//! types and paths defined here, so a field or a route is added once. (The admin protocol
//! over Unix sockets lives in [`crate::admin::proto`].)

pub mod controller;
pub mod keys;
pub mod worker;

/// `GET`: liveness of any of our HTTP services (`{"status": "ok"}`).
pub const HEALTH_PATH: &str = "/api/health";
/// Readiness (ours, not DB-GPT's): 503 while the daemon cannot do its work (e.g. the
/// controller's registry cannot write) or is draining to stop or hand over
/// ([`crate::http::Drain`]), while liveness stays on [`HEALTH_PATH`].
pub const READY_PATH: &str = "/api/ready";
