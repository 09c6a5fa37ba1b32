//! `dbgpt model chat`: an interactive chat with one model, streaming tokens as they come.
//!
//! The model is found through the controller (a healthy `<name>@llm` instance) and called
//! on its worker's `generate_stream`, whose frames carry cumulative text: the REPL prints
//! only the new suffix of each frame. History is kept (DB-GPT roles `human`/`ai`, plus an
//! optional `system`); `exit`, `/exit` or Ctrl-D leave, `/clear` (or `/reset`) forgets the
//! history.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::BytesMut;
use futures::StreamExt;

use super::model::ChatArgs;
use crate::controller::client::ControllerClient;
use crate::wire::controller::worker_key;
use crate::wire::worker::{
    GENERATE_STREAM_PATH, ModelOutput, PromptMessage, PromptRequest, WorkerType, next_frame,
};
use crate::worker::client::worker_http;

/// Runs the REPL.
pub async fn run(client: &ControllerClient, a: ChatArgs) -> anyhow::Result<ExitCode> {
    let key = worker_key(&a.model_name, WorkerType::Llm.as_str());
    let instances = client
        .list(Some(&key), true)
        .await
        .context("cannot find the model")?;
    let Some(inst) = instances.first() else {
        bail!("no healthy instance of {key} is registered with the controller");
    };
    let url = format!("http://{}:{}{GENERATE_STREAM_PATH}", inst.host, inst.port);
    let http = worker_http()?;
    println!(
        "Chatbot started with model {}. Type 'exit' to leave the chat.",
        a.model_name
    );
    let mut history: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("\nYou: ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break; // Ctrl-D
        }
        let input = line.trim();
        match input {
            "" => continue,
            "exit" | "/exit" | "quit" | "/quit" => break,
            "/clear" | "/reset" => {
                history.clear();
                println!("(history cleared)");
                continue;
            }
            _ => {}
        }
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(s) = &a.system {
            messages.push(PromptMessage::new("system", s));
        }
        for (role, content) in &history {
            messages.push(PromptMessage::new(role, content));
        }
        messages.push(PromptMessage::new("human", input));
        let body = PromptRequest {
            model: a.model_name.as_str().into(),
            messages,
            prompt: Some("".into()),
            echo: false,
            temperature: a.temperature,
            max_new_tokens: a.max_new_tokens.map(i64::from),
            ..PromptRequest::default()
        };
        let resp = match http.post(&url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "error: cannot reach the worker at {}:{}: {}",
                    inst.host,
                    inst.port,
                    crate::http::describe(&e)
                );
                continue;
            }
        };
        if !resp.status().is_success() {
            eprintln!(
                "error: worker answered {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
            continue;
        }
        print!("Bot: ");
        stdout.flush()?;
        let mut stream = resp.bytes_stream();
        let mut buf = BytesMut::new();
        let mut shown = String::new();
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                eprintln!("\nerror: the stream was cut");
                failed = true;
                break;
            };
            buf.extend_from_slice(&chunk);
            while let Some(f) = next_frame(&mut buf) {
                let Ok(out) = serde_json::from_slice::<ModelOutput>(&f) else {
                    continue;
                };
                if out.error_code != 0 {
                    eprintln!("\nerror: {}", out.text);
                    failed = true;
                    continue;
                }
                if let Some(new) = out.text.strip_prefix(shown.as_str()) {
                    print!("{new}");
                    stdout.flush()?;
                }
                shown = out.text;
            }
        }
        println!();
        if !failed {
            history.push(("human".into(), input.to_string()));
            history.push(("ai".into(), shown));
        }
    }
    Ok(ExitCode::SUCCESS)
}
