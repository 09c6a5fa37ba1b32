//! `dbgpt model start|stop|restart`: find workers through the controller's registry, then
//! call their lifecycle APIs (`models/startup`, `models/shutdown`, `apply`).
//!
//! Errors from a worker are printed with the worker's own message (e.g. "model x@llm is
//! already running on this worker") and make the command exit 1.

use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::model::{ModelStartArgs, ModelTarget};
use crate::controller::client::ControllerClient;
use crate::wire::controller::{ModelInstance, manager_key, worker_key};
use crate::wire::worker::{
    APPLY_PATH, MODELS_SHUTDOWN_PATH, MODELS_STARTUP_PATH, WorkerApplyOutput,
};
use crate::worker::client::{post_worker, worker_http};

fn matches(i: &ModelInstance, host: &Option<String>, port: Option<u16>) -> bool {
    host.as_ref().is_none_or(|h| *h == i.host) && port.is_none_or(|p| p == i.port)
}

/// `dbgpt model start`.
pub async fn start(client: &ControllerClient, a: ModelStartArgs) -> anyhow::Result<ExitCode> {
    let managers = client
        .list(Some(&manager_key()), true)
        .await
        .context("cannot list workers")?;
    let target = managers
        .iter()
        .find(|m| matches(m, &a.host, a.port))
        .cloned()
        .or_else(|| {
            // An explicit host/port need not be registered.
            match (&a.host, a.port) {
                (Some(h), Some(p)) => Some(ModelInstance {
                    model_name: manager_key(),
                    host: h.clone(),
                    port: p,
                    weight: None,
                    check_healthy: None,
                    healthy: None,
                    enabled: None,
                    prompt_template: None,
                    last_heartbeat: None,
                }),
                _ => None,
            }
        });
    let Some(w) = target else {
        bail!(
            "no healthy worker registered with the controller{}; start one with `dbgpt start worker`",
            match (&a.host, a.port) {
                (None, None) => String::new(),
                _ => " matching --host/--port".to_string(),
            }
        );
    };
    let mut params = Map::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            params.insert(k.into(), Value::String(v));
        }
    };
    put("model_path", a.model_path);
    put("model_type", a.model_type);
    put("proxy_api_base", a.proxy_api_base);
    put("proxy_api_key", a.proxy_api_key);
    put("proxyllm_backend", a.proxyllm_backend);
    put("context_length", a.context_length.map(|c| c.to_string()));
    let http = worker_http()?;
    eprintln!(
        "starting {} on worker {}:{} …",
        worker_key(&a.model_name, &a.worker_type),
        w.host,
        w.port
    );
    post_worker(
        &http,
        &w.host,
        w.port,
        MODELS_STARTUP_PATH,
        &json!({"host": w.host, "port": w.port, "model": a.model_name, "worker_type": a.worker_type, "params": params}),
    )
    .await?;
    println!(
        "Started {} on {}:{}",
        worker_key(&a.model_name, &a.worker_type),
        w.host,
        w.port
    );
    Ok(ExitCode::SUCCESS)
}

async fn instances(
    client: &ControllerClient,
    t: &ModelTarget,
) -> anyhow::Result<Vec<ModelInstance>> {
    let key = worker_key(&t.model_name, &t.model_type);
    let all = client
        .list(Some(&key), false)
        .await
        .context("cannot list model instances")?;
    let mut chosen: Vec<ModelInstance> = all
        .into_iter()
        .filter(|i| matches(i, &t.host, t.port))
        .collect();
    if chosen.is_empty()
        && let (Some(h), Some(p)) = (&t.host, t.port)
    {
        chosen.push(ModelInstance {
            model_name: key.clone(),
            host: h.clone(),
            port: p,
            weight: None,
            check_healthy: None,
            healthy: None,
            enabled: None,
            prompt_template: None,
            last_heartbeat: None,
        });
    }
    if chosen.is_empty() {
        bail!("no instance of {key} is registered with the controller");
    }
    Ok(chosen)
}

/// `dbgpt model stop`.
pub async fn stop(client: &ControllerClient, t: ModelTarget) -> anyhow::Result<ExitCode> {
    let key = worker_key(&t.model_name, &t.model_type);
    let http = worker_http()?;
    let mut failed = false;
    // Only instances whose worker is alive can be stopped; unhealthy ones are already gone.
    for i in instances(client, &t)
        .await?
        .into_iter()
        .filter(|i| i.healthy != Some(false) || t.port.is_some())
    {
        let body = json!({"host": i.host, "port": i.port, "model": t.model_name, "worker_type": t.model_type, "params": {}});
        match post_worker(&http, &i.host, i.port, MODELS_SHUTDOWN_PATH, &body).await {
            Ok(_) => println!("Stopped {key} on {}:{}", i.host, i.port),
            Err(e) => {
                eprintln!("error: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `dbgpt model restart`.
pub async fn restart(client: &ControllerClient, t: ModelTarget) -> anyhow::Result<ExitCode> {
    let key = worker_key(&t.model_name, &t.model_type);
    let http = worker_http()?;
    let mut failed = false;
    for i in instances(client, &t).await? {
        let body = json!({"model": t.model_name, "apply_type": "restart", "worker_type": t.model_type, "params": {}});
        match post_worker(&http, &i.host, i.port, APPLY_PATH, &body).await {
            Ok(v) => {
                let out: WorkerApplyOutput =
                    serde_json::from_value(v).context("unexpected apply answer")?;
                println!(
                    "Restarted {key} on {}:{} in {:.2} s",
                    i.host, i.port, out.timecost
                );
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
