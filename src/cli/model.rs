//! `dbgpt model …`: client commands against the controller (DB-GPT's §8.3).
//!
//! The controller address is `--address`, else `CONTROLLER_ADDRESS`, else the controller
//! found on this machine through its admin socket, else `http://127.0.0.1:8000`. A comma
//! list is accepted and failed over in order.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::controller::client::ControllerClient;
use crate::daemon::Service;
use crate::wire::controller::{ModelInstance, split_worker_key, worker_key};
use crate::wire::worker::WorkerType;

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Controller URL(s), comma-separated [default: $CONTROLLER_ADDRESS, the local controller, or http://127.0.0.1:8000]
    #[arg(long, global = true, env = "CONTROLLER_ADDRESS")]
    pub address: Option<String>,
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// List model instances registered with the controller.
    List {
        /// Only this model (queried as <model_name>@<model_type>).
        #[arg(long = "model_name", visible_alias = "model-name")]
        model_name: Option<String>,
        /// Worker type used with --model_name.
        #[arg(
            long = "model_type",
            visible_alias = "model-type",
            default_value = WorkerType::Llm.as_str()
        )]
        model_type: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a model on a worker (through the worker's models/startup API).
    Start(ModelStartArgs),
    /// Stop a model on the worker(s) serving it.
    Stop(ModelTarget),
    /// Restart a model (stop + start of the same configuration) on every worker serving it; a stopped model starts again.
    Restart(ModelTarget),
    /// Chat with a model interactively; tokens stream as they are generated.
    Chat(ChatArgs),
}

#[derive(Debug, Args)]
pub struct ModelTarget {
    /// Model name (without @type).
    #[arg(long = "model_name", visible_alias = "model-name")]
    pub model_name: String,
    /// Worker type: llm or text2vec.
    #[arg(
        long = "model_type",
        visible_alias = "model-type",
        alias = "worker_type",
        default_value = WorkerType::Llm.as_str()
    )]
    pub model_type: String,
    /// Only the worker on this host (with --port).
    #[arg(long)]
    pub host: Option<String>,
    /// Only the worker on this port.
    #[arg(long)]
    pub port: Option<u16>,
}

#[derive(Debug, Args)]
pub struct ModelStartArgs {
    /// Model name to register (<model_name>@<worker_type>).
    #[arg(long = "model_name", visible_alias = "model-name")]
    pub model_name: String,
    /// GGUF file or embedding-model directory, as seen by the worker.
    #[arg(long = "model_path", visible_alias = "model-path")]
    pub model_path: Option<String>,
    /// Engine: llama.cpp, hf (embeddings) or proxy.
    #[arg(long = "model_type", visible_alias = "model-type")]
    pub model_type: Option<String>,
    /// Worker type: llm or text2vec.
    #[arg(
        long = "worker_type",
        visible_alias = "worker-type",
        default_value = WorkerType::Llm.as_str()
    )]
    pub worker_type: String,
    /// Worker host [default: the first worker registered with the controller].
    #[arg(long)]
    pub host: Option<String>,
    /// Worker port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Proxy: upstream base URL.
    #[arg(long = "proxy_api_base", visible_alias = "proxy-api-base")]
    pub proxy_api_base: Option<String>,
    /// Proxy: upstream API key.
    #[arg(long = "proxy_api_key", visible_alias = "proxy-api-key")]
    pub proxy_api_key: Option<String>,
    /// Proxy: upstream model name.
    #[arg(long = "proxyllm_backend", visible_alias = "proxyllm-backend")]
    pub proxyllm_backend: Option<String>,
    /// llama.cpp context size.
    #[arg(long = "context_length", visible_alias = "context-length")]
    pub context_length: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model name (an @llm model).
    #[arg(long = "model_name", visible_alias = "model-name", short = 'm')]
    pub model_name: String,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Maximum tokens per answer.
    #[arg(long = "max_new_tokens", visible_alias = "max-new-tokens")]
    pub max_new_tokens: Option<u32>,
}

/// Resolves the controller address for client commands.
pub fn controller_address(explicit: Option<String>) -> String {
    if let Some(a) = explicit.filter(|a| !a.trim().is_empty()) {
        return a;
    }
    // A controller running on this machine answers on its admin socket: use its port.
    if let Some(s) = crate::admin::discover().into_iter().find(|s| {
        s.service == Service::Controller.as_str()
            && std::os::unix::net::UnixStream::connect(&s.path).is_ok()
    }) {
        return format!("http://127.0.0.1:{}", s.port);
    }
    "http://127.0.0.1:8000".into()
}

/// Runs a `model` subcommand.
pub async fn run(args: ModelArgs) -> anyhow::Result<ExitCode> {
    let address = controller_address(args.address);
    let client = ControllerClient::new(&address, Duration::from_secs(10))?;
    match args.command {
        ModelCommand::List {
            model_name,
            model_type,
            json,
        } => {
            let key = model_name.map(|m| worker_key(&m, &model_type));
            let list = client
                .list(key.as_deref(), false)
                .await
                .context("model list failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render_table(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Start(a) => super::model_ops::start(&client, a).await,
        ModelCommand::Stop(t) => super::model_ops::stop(&client, t).await,
        ModelCommand::Restart(t) => super::model_ops::restart(&client, t).await,
        ModelCommand::Chat(c) => super::chat::run(&client, c).await,
    }
}

fn py_bool(b: Option<bool>) -> String {
    match b {
        Some(true) => "True".into(),
        Some(false) => "False".into(),
        None => "None".into(),
    }
}

/// DB-GPT's PrettyTable: centred cells, `+---+` borders.
pub fn render_table(list: &[ModelInstance]) -> String {
    let header = [
        "Model Name",
        "Model Type",
        "Host",
        "Port",
        "Healthy",
        "Enabled",
        "Prompt Template",
        "Last Heartbeat",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            let (name, ty) = split_worker_key(&m.model_name).unwrap_or((&m.model_name, ""));
            vec![
                name.to_string(),
                ty.to_string(),
                m.host.clone(),
                m.port.to_string(),
                py_bool(m.healthy),
                py_bool(m.enabled),
                m.prompt_template.clone().unwrap_or_default(),
                m.last_heartbeat.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let border = {
        let mut s = String::from("+");
        for w in &widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let row = |cells: Vec<&str>| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            let left = pad / 2;
            s.push_str(&format!(
                " {}{}{} |",
                " ".repeat(left),
                c,
                " ".repeat(pad - left)
            ));
        }
        s.push('\n');
        s
    };
    let mut out = border.clone();
    out.push_str(&row(header.to_vec()));
    out.push_str(&border);
    for r in &rows {
        out.push_str(&row(r.iter().map(String::as_str).collect()));
    }
    out.push_str(&border);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_dbgpt_columns_and_splits_keys() {
        let t = render_table(&[ModelInstance {
            model_name: "WorkerManager@service".into(),
            host: "127.0.0.1".into(),
            port: 8001,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: Some(true),
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: Some("2026-11-22T02:40:41.139447".into()),
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[1].contains("Model Name") && lines[1].contains("Last Heartbeat"));
        assert!(lines[3].contains("| WorkerManager |") && lines[3].contains("service"));
        assert!(lines[3].contains("True"));
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
    }
}
