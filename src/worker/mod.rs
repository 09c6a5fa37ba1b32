//! Model workers: one worker process (a "worker manager" in DB-GPT's terms) hosts one or
//! more models behind DB-GPT's worker HTTP API and keeps them registered with the
//! controller.
//!
//! [`backends`] holds the inference engines (llama.cpp, candle embeddings, the
//! OpenAI-compatible proxy); [`chat`] answers OpenAI chat and text completion requests from a
//! local backend; [`spec`] describes a model and loads it; [`manager`] owns the
//! running models and their lifecycle; [`registration`] keeps the controller's registry in
//! step; [`embed`] answers OpenAI's embeddings requests with a local model; [`routes`] is
//! the HTTP API and [`client`] its client; [`config`] reads the worker's flags and file;
//! [`service`] wires the process together.
pub mod backends;
pub mod chat;
pub(crate) mod client;
pub(crate) mod config;
pub mod embed;
pub mod manager;
pub(crate) mod native;
pub(crate) mod registration;
pub mod routes;
pub(crate) mod service;
pub mod spec;
