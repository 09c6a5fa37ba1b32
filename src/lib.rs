//! dbgpt-cluster: a drop-in Rust replacement for DB-GPT's model-serving cluster.
//!
//! One `dbgpt` binary runs the **controller** (registry of model instances on a redb
//! file, DB-GPT's controller HTTP API), **workers** (host models, register and
//! heartbeat) and the OpenAI-compatible **apiserver**; every daemon answers an **admin
//! protocol** on a Unix socket, so `dbgpt ctl status` and `dbgpt stop …` never grep
//! process lists.
//!
//! Module map:
//! - [`types`]: wire types in DB-GPT's JSON shapes; [`validate`]: FastAPI-shaped input checks.
//! - [`registry`]: the registry trait and the redb store.
//! - [`controller`]: HTTP routes, background health/flush tasks, the controller process,
//!   and the HTTP client other processes use to reach it.
//! - [`admin`]: Unix-socket frames, server and client.
//! - [`daemon`]: background mode, pid lock, readiness, systemd notify, signals.
//! - [`config`]: what every daemon's flags and TOML share (each service has its own `config`
//!   module); [`telemetry`]: logging; [`tracer`]: DB-GPT's JSON-lines span file.
//! - [`worker`]: model backends (llama.cpp, candle embeddings, OpenAI proxy) and the worker.
//! - [`http`]: shared HTTP plumbing; [`cli`]: the `dbgpt` command line.

pub mod admin;
pub mod apiserver;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod http;
pub mod registry;
pub mod telemetry;
pub mod tracer;
pub mod types;
pub mod validate;
pub mod worker;
