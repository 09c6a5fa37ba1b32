//! Model workers: the code that hosts models inside a worker process. The
//! [`backends`] module holds the inference engines (local llama.cpp and candle
//! models, and the OpenAI-compatible proxy).
pub mod backends;
