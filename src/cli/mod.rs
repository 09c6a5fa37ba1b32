//! The `dbgpt` command line: clap definitions and dispatch.
//!
//! `start` runs a server (forking first with `--daemon`, before any runtime exists);
//! `stop` and `ctl` talk to local daemons over their admin sockets; `model` and `keys` talk
//! to a controller over HTTP; `registry` checks, backs up and restores the controller's redb
//! file. Errors print one line naming what failed and exit 1; clap's usage errors exit 2.

pub(crate) mod chat;
pub(crate) mod ctl;
pub(crate) mod keys;
pub(crate) mod model;
pub(crate) mod model_ops;
pub(crate) mod registry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::apiserver::config::ApiserverArgs;
use crate::controller::config::ControllerArgs;
use crate::daemon::{self, Readiness, Service};
use crate::worker::config::WorkerArgs;

/// DB-GPT model-serving cluster: controller, workers and OpenAI-compatible API server.
#[derive(Debug, Parser)]
#[command(name = "dbgpt", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a server (foreground, or in the background with --daemon).
    #[command(subcommand)]
    Start(StartCommand),
    /// Stop local servers gracefully through their admin sockets.
    Stop(StopArgs),
    /// Inspect and control local daemons through their admin sockets.
    #[command(subcommand)]
    Ctl(ctl::CtlCommand),
    /// Query and manage models through the controller.
    Model(model::ModelArgs),
    /// Manage API keys (limits, expiry, usage) through the controller.
    Keys(keys::KeysArgs),
    /// Check, back up and restore the controller's registry file.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
}

#[derive(Debug, Subcommand)]
pub enum StartCommand {
    /// The model controller: registry of model instances (DB-GPT's controller API).
    Controller(Box<ControllerArgs>),
    /// A model worker: hosts models (llama.cpp GGUF, local embeddings, OpenAI-compatible
    /// proxies) and registers them with the controller.
    Worker(Box<WorkerArgs>),
    /// The OpenAI-compatible API server in front of the workers the controller knows.
    Apiserver(Box<ApiserverArgs>),
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[command(subcommand)]
    pub target: StopTarget,
}

#[derive(Debug, Subcommand)]
pub enum StopTarget {
    /// Stop the controller(s) on this machine.
    Controller(StopPort),
    /// Stop the worker(s) on this machine.
    Worker(StopPort),
    /// Stop the API server(s) on this machine.
    Apiserver(StopPort),
    /// Stop every dbgpt daemon on this machine.
    All(StopOpts),
}

#[derive(Debug, clap::Args)]
pub struct StopPort {
    /// Only the instance listening on this port (default: all of that kind).
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub opts: StopOpts,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StopOpts {
    /// Seconds to wait for each daemon to exit.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// Builds the multi-threaded runtime (only after any fork).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dbgpt")
        .build()?)
}

/// A small runtime for client commands.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Start(StartCommand::Controller(args)) => start_controller(*args),
        Command::Start(StartCommand::Worker(args)) => start_worker(*args),
        Command::Start(StartCommand::Apiserver(args)) => start_apiserver(*args),
        Command::Stop(s) => client_runtime().and_then(|rt| rt.block_on(ctl::stop_command(s))),
        Command::Ctl(c) => client_runtime().and_then(|rt| rt.block_on(ctl::run(c))),
        Command::Model(m) => client_runtime().and_then(|rt| rt.block_on(model::run(m))),
        Command::Keys(k) => client_runtime().and_then(|rt| rt.block_on(keys::run(k))),
        Command::Registry(r) => registry::run(r),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.resolve()?;
    let readiness = if cfg.daemon && !daemon::handover::is_successor() {
        daemon::daemonize(Service::Controller.label(), &cfg.log_file)?
    } else {
        Readiness::foreground()
    };
    let spans = crate::telemetry::init(cfg.log_level.as_deref(), cfg.otlp.as_ref())?;
    let served = runtime()?.block_on(crate::controller::service::run(cfg, readiness));
    spans.shutdown();
    served?;
    Ok(ExitCode::SUCCESS)
}

fn start_worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: no thread has started yet (see main.rs).
    unsafe { crate::worker::backends::init_process_env() };
    let cfg = args.resolve()?;
    let label = format!("{}-{}", Service::Worker.label(), cfg.port);
    let readiness = if cfg.daemon && !daemon::handover::is_successor() {
        daemon::daemonize(&label, &cfg.log_file)?
    } else {
        Readiness::foreground()
    };
    let spans = crate::telemetry::init(cfg.log_level.as_deref(), cfg.otlp.as_ref())?;
    let served = runtime()?.block_on(crate::worker::service::run(cfg, readiness));
    spans.shutdown();
    served?;
    Ok(ExitCode::SUCCESS)
}

fn start_apiserver(args: ApiserverArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.resolve()?;
    let readiness = if cfg.daemon && !daemon::handover::is_successor() {
        daemon::daemonize(Service::Apiserver.label(), &cfg.log_file)?
    } else {
        Readiness::foreground()
    };
    let spans = crate::telemetry::init(cfg.log_level.as_deref(), cfg.otlp.as_ref())?;
    let served = runtime()?.block_on(crate::apiserver::service::run(cfg, readiness));
    spans.shutdown();
    served?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dbgpt_and_kebab_spellings_parse() {
        let c = Cli::try_parse_from([
            "dbgpt",
            "start",
            "controller",
            "--port",
            "18000",
            "--registry-path",
            "/tmp/r.redb",
            "--heartbeat_timeout_secs",
            "5",
            "-d",
        ])
        .unwrap();
        let Command::Start(StartCommand::Controller(a)) = c.command else {
            panic!()
        };
        assert_eq!(a.port, Some(18000));
        assert_eq!(a.heartbeat_timeout_secs, Some(5));
        assert!(a.common.daemon);
    }
}
