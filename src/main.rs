//! The `dbgpt` binary: parse the command line, then hand over to [`dbgpt_cluster::cli`].
//! No thread may start before `cli::run` decides whether to fork (`--daemon`).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a request through the apiserver makes ~170 small
/// allocations, and mimalloc's per-thread free lists take a fraction of glibc's
/// instructions for each (and keep a thread's blocks together in cache).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    dbgpt_cluster::cli::run(dbgpt_cluster::cli::Cli::parse())
}
