//! The `dbgpt` binary: parse the command line, then hand over to [`dbgpt_cluster::cli`].
//! No thread may start before `cli::run` decides whether to fork (`--daemon`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    dbgpt_cluster::cli::run(dbgpt_cluster::cli::Cli::parse())
}
