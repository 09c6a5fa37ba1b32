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
use futures::StreamExt;
use serde_json::{Value, json};

use super::model::ChatArgs;
use crate::controller::client::ControllerClient;
use crate::types::{ModelOutput, worker_key};

/// Splits a NUL-delimited frame stream; returns the complete frames and keeps the rest.
pub fn split_frames(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(pos) = buf.iter().position(|&b| b == 0) {
        let frame: Vec<u8> = buf.drain(..=pos).collect();
        if frame.len() > 1 {
            out.push(frame[..frame.len() - 1].to_vec());
        }
    }
    out
}

/// Runs the REPL.
pub async fn run(client: &ControllerClient, a: ChatArgs) -> anyhow::Result<ExitCode> {
    let key = worker_key(&a.model_name, "llm");
    let instances = client
        .list(Some(&key), true)
        .await
        .context("cannot find the model")?;
    let Some(inst) = instances.first() else {
        bail!("no healthy instance of {key} is registered with the controller");
    };
    let url = format!(
        "http://{}:{}{}",
        inst.host,
        inst.port,
        crate::types::WORKER_GENERATE_STREAM
    );
    let http = super::model_ops::worker_http()?;
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
        let mut messages: Vec<Value> = Vec::new();
        if let Some(s) = &a.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        for (role, content) in &history {
            messages.push(json!({"role": role, "content": content}));
        }
        messages.push(json!({"role": "human", "content": input}));
        let mut body =
            json!({"model": a.model_name, "messages": messages, "prompt": "", "echo": false});
        if let Some(t) = a.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = a.max_new_tokens {
            body["max_new_tokens"] = json!(m);
        }
        let resp = match http.post(&url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "error: cannot reach the worker at {}:{}: {}",
                    inst.host,
                    inst.port,
                    crate::controller::client::describe(&e)
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
        let mut buf = Vec::new();
        let mut shown = String::new();
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                eprintln!("\nerror: the stream was cut");
                failed = true;
                break;
            };
            buf.extend_from_slice(&chunk);
            for f in split_frames(&mut buf) {
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

#[cfg(test)]
mod tests {
    #[test]
    fn frames_split_on_nul_keeping_partial_tail() {
        let mut b = b"{\"a\":1}\0{\"a\":2}\0{\"a\"".to_vec();
        let f = super::split_frames(&mut b);
        assert_eq!(f, vec![b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()]);
        assert_eq!(b, b"{\"a\"".to_vec());
    }
}
