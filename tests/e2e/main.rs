//! End-to-end tests: every test starts the real `dbgpt` binary on ephemeral ports with
//! private temp directories. One integration-test binary (one link step) with shared
//! fixtures in `common`.

mod admin;
mod admission;
mod apiserver;
mod cli;
mod common;
mod controller;
mod engine;
mod failover;
mod http_limits;
mod keys;
mod metrics;
mod openai;
mod otlp;
mod registry;
mod rerank;
mod restart;
mod routing;
mod sql;
mod stack;
mod tenancy;
mod tracer;
mod worker;
