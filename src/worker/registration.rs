//! Keeping a worker's entries in the controller's registry.
//!
//! The [`Registrar`] knows which entries this worker owns (`name@type` per running model,
//! plus `WorkerManager@service`) and the address it advertises. Each entry is registered
//! when its model starts and deregistered when it stops; one loop heartbeats all entries
//! every `heartbeat_interval`. A heartbeat for an entry the controller does not know
//! re-registers it, so a restarted controller is repopulated by the next round. Unlike
//! DB-GPT, an unreachable controller never stops the worker: it keeps serving and retries
//! with exponential backoff (1 s doubling up to the interval), saying so in the log once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexmap::IndexSet;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::client::ControllerClient;
use crate::wire::controller::ModelInstance;

/// Registers, heartbeats and deregisters this worker's entries.
pub struct Registrar {
    client: ControllerClient,
    host: String,
    port: u16,
    interval: Duration,
    entries: Mutex<IndexSet<String>>,
    /// Held by a registration, a heartbeat round and a deregistration: a registration or
    /// heartbeat of the same entry still in flight would otherwise reach the controller
    /// after the deregistration and mark the entry healthy again. Its value: set once every
    /// entry has been deregistered for the stop, after which nothing is registered again.
    wire: tokio::sync::Mutex<bool>,
    wake: Notify,
}

impl Registrar {
    pub fn new(client: ControllerClient, host: String, port: u16, interval: Duration) -> Self {
        Registrar {
            client,
            host,
            port,
            interval,
            entries: Mutex::new(IndexSet::new()),
            wire: tokio::sync::Mutex::new(false),
            wake: Notify::new(),
        }
    }

    /// The advertised `host:port`.
    pub fn address(&self) -> (String, u16) {
        (self.host.clone(), self.port)
    }

    /// Controller URLs, for status output.
    pub fn controllers(&self) -> String {
        self.client.urls().join(",")
    }

    fn instance(&self, key: &str) -> ModelInstance {
        ModelInstance {
            model_name: key.to_string(),
            host: self.host.clone(),
            port: self.port,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: Some(false),
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: None,
        }
    }

    fn entries(&self) -> Vec<String> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Adds an entry and registers it now (a failure is logged; the loop retries).
    pub async fn add(&self, key: &str) {
        let stopped = self.wire.lock().await;
        if *stopped {
            return;
        }
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        match self.client.register(&self.instance(key)).await {
            Ok(_) => {
                info!(entry = key, host = %self.host, port = self.port, "registered with the controller")
            }
            Err(e) => {
                warn!(entry = key, error = %e, "could not register with the controller; will keep retrying");
                self.wake.notify_one();
            }
        }
    }

    /// Removes an entry and deregisters it (marks it unhealthy, as DB-GPT does).
    pub async fn remove(&self, key: &str) {
        let _wire = self.wire.lock().await;
        let had = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shift_remove(key);
        if had {
            match self.client.deregister(&self.instance(key), false).await {
                Ok(_) => info!(entry = key, "deregistered from the controller"),
                Err(e) => {
                    warn!(entry = key, error = %e, "could not deregister from the controller")
                }
            }
        }
    }

    /// Deregisters every entry (graceful stop). The stop is marked first, so a registration
    /// still to come is skipped and one already done is among the entries removed here.
    pub async fn remove_all(&self) {
        *self.wire.lock().await = true;
        let all = self.entries();
        // Models first, the manager entry last.
        for key in all.iter().rev() {
            self.remove(key).await;
        }
    }

    /// Heartbeats every entry once; `Err` with the first error.
    async fn beat(&self) -> Result<usize, crate::controller::client::ClientError> {
        let _wire = self.wire.lock().await;
        let entries = self.entries();
        for key in &entries {
            self.client.heartbeat(&self.instance(key)).await?;
        }
        Ok(entries.len())
    }

    /// Runs the heartbeat loop until `shutdown`.
    pub fn spawn_loop(self: Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failing = false;
            let mut backoff = Duration::from_secs(1);
            loop {
                let wait = if failing {
                    backoff.min(self.interval)
                } else {
                    self.interval
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {
                        if !failing {
                            failing = true;
                            backoff = Duration::from_secs(1);
                            continue;
                        }
                    }
                }
                match self.beat().await {
                    Ok(n) => {
                        if failing {
                            info!(entries = n, controller = %self.controllers(), "controller reachable again; entries registered");
                        }
                        failing = false;
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        if !failing {
                            warn!(error = %e, "heartbeat failed; the worker keeps serving and retries with backoff");
                        }
                        failing = true;
                        backoff = (backoff * 2).min(self.interval);
                    }
                }
            }
        })
    }
}

/// The address to advertise: `--worker_register_host` if given; the bind host if it is a
/// specific address; else the address of the interface with the default route (a UDP
/// "connect" sends no packet), falling back to 127.0.0.1.
pub fn advertised_host(bind_host: &str, register_host: Option<&str>) -> String {
    if let Some(h) = register_host.filter(|h| !h.trim().is_empty()) {
        return h.trim().to_string();
    }
    if !matches!(bind_host, "0.0.0.0" | "::" | "") {
        return bind_host.to_string();
    }
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("10.254.254.254:1")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn advertised_host_prefers_explicit_then_bind() {
        assert_eq!(
            super::advertised_host("0.0.0.0", Some("10.1.2.3")),
            "10.1.2.3"
        );
        assert_eq!(super::advertised_host("127.0.0.1", None), "127.0.0.1");
        assert!(!super::advertised_host("0.0.0.0", None).is_empty());
        assert_eq!(
            crate::wire::controller::manager_key(),
            "WorkerManager@service"
        );
    }
}
