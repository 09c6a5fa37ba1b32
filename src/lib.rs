//! dbgpt-cluster: a drop-in Rust replacement for DB-GPT's model-serving cluster.
//!
//! # Processes
//!
//! One `dbgpt` binary runs three kinds of daemon and the client commands:
//!
//! ```text
//!  dbgpt model list / chat ──HTTP──►  controller :8000  ◄──register/heartbeat──  worker :8001..
//!  OpenAI SDK / curl ──HTTP──► apiserver :8100 ──(instances)──► controller          ▲
//!                                      └──────────generate / embeddings────────────┘
//!  dbgpt ctl status|stop ──Unix socket (postcard frames)──► any of the three daemons
//! ```
//!
//! - The **controller** owns the registry of model instances (a redb file, or a MySQL /
//!   PostgreSQL table shared by several controllers) and serves DB-GPT's controller API.
//! - A **worker** hosts models (llama.cpp GGUF, candle embeddings, an OpenAI-compatible
//!   proxy), registers them, heartbeats, and serves DB-GPT's worker API.
//! - The **apiserver** serves the OpenAI-compatible API: it learns healthy instances from the
//!   controller, picks one per request and relays to it, failing over before the first byte.
//! - Every daemon answers the **admin protocol** on a Unix socket (`dbgpt ctl status|stop`).
//!
//! # Modules
//!
//! - [`wire`]: the HTTP protocols between the processes, in DB-GPT's JSON shapes, one module
//!   per protocol (`wire::controller`, `wire::worker`), used by every side that speaks it.
//!   `validate`: FastAPI/pydantic-shaped input checks those protocols need.
//! - `admin`: the Unix-socket protocol (`admin::proto`, shared), its server and client.
//! - `daemon`: the one lifecycle of every daemon (fork, pid lock, admin socket, HTTP,
//!   readiness, watchdog, stop, drain, flush) with per-service hooks; [`http`]: serving with
//!   per-connection limits, FastAPI-shaped errors, body caps; `config`: what every daemon's
//!   flags and TOML share; [`telemetry`]: logging, Prometheus metrics
//!   ([`telemetry::metrics`]) and OTLP trace export (`telemetry::otlp`); [`tracer`]:
//!   DB-GPT's JSON-lines span file.
//! - `registry`: the `Registry` trait, the redb store and the SQL store, one conformance
//!   suite for both.
//! - `controller`: its config, HTTP routes over the registry, its service hooks, and the
//!   client every other process uses to reach it.
//! - [`worker`]: its config, model specs, the manager of running models, registration,
//!   DB-GPT's worker routes, and [`worker::backends`] (llama.cpp, embeddings, OpenAI proxy).
//! - [`openai`]: the OpenAI API's shapes (request, response, error), the one home of that
//!   protocol for every side that speaks it: the apiserver, the workers' native routes and
//!   the proxy backend.
//! - [`apiserver`]: its config, routes, model aliases and fallback chains, discovery of
//!   instances, outlier detection from live traffic, the routing policy, the relay (retries,
//!   failover, typed upstream errors), the keep-alive pool to workers, and admission
//!   (`apiserver::admission`: per-model queues with priorities, hold-and-wake).
//! - [`cli`]: clap definitions and one file per client command group.
//!
//! Only what the `dbgpt` binary and the examples (benchmarks, test doubles) use is `pub`;
//! everything else is `pub(crate)`, so the compiler reports dead code.
//!
//! # The path of a chat request
//!
//! `apiserver::mod` (route, key check) → `openai::request` (parse, validate) →
//! `apiserver::aliases` (the models to try: an alias's target, then its fallbacks) →
//! `apiserver::discovery` (healthy instances of the model) → `apiserver::admission` (room
//! in the model's queue, or a wait for it) → `apiserver::policy` (pick one, passing over
//! instances `apiserver::outlier` ejected) →
//! `apiserver::proxy` (relay: `wire::worker::PromptRequest` over `apiserver::pool`) → the
//! worker's `worker::routes` (`generate_stream`) → `worker::manager` → a backend's token
//! stream, sent back as DB-GPT's cumulative NUL-separated frames (`wire::worker`) → the relay
//! decodes them (`wire::worker::ModelOutput`) → `openai::response` turns them into
//! OpenAI chunks or one answer. Registration takes `worker::registration` →
//! `controller::client` → the controller's routes (`wire::controller::InstanceInput`) →
//! `registry`, answered once the change is on disk.

pub(crate) mod admin;
pub mod apiserver;
pub mod cli;
pub(crate) mod config;
pub(crate) mod controller;
pub(crate) mod daemon;
pub mod http;
pub(crate) mod keys;
pub mod openai;
/// In-process per-request cost measurements for `examples/bench_overhead.rs` (not an API).
#[doc(hidden)]
pub mod overhead;
pub(crate) mod registry;
pub mod telemetry;
pub mod tracer;
pub(crate) mod validate;
pub mod wire;
pub mod worker;
