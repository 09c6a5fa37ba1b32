//! The model-instance registry: what instances exist, where, and whether they are alive.
//!
//! [`Registry`] is the contract every store meets (the embedded redb file of one
//! controller, [`RedbRegistry`], or DB-GPT's table in MySQL or PostgreSQL shared by several
//! controllers, [`SqlRegistry`]) with DB-GPT's semantics (reference §4.1):
//! register upserts and keeps `enabled`/`check_healthy`, deregister marks unhealthy (or
//! removes, with 0.7's `remove_from_registry`), a heartbeat from an unknown instance
//! registers it. Health is *derived*: an instance with `check_healthy` whose last heartbeat
//! is older than the timeout is reported unhealthy at once, and the periodic
//! [`Registry::expire`] sweep also records that flip. [`MemState`] is the ordered in-memory
//! view the stores serve reads from.

#[cfg(test)]
mod conformance;
pub mod record;
pub mod redb_store;
pub mod sql;

use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;

use crate::wire::controller::{InstanceInput, InstanceKey, ModelInstance, Timestamp};

pub use redb_store::RedbRegistry;
pub use sql::SqlRegistry;

/// The registry contract. Writes return only once they are durable.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Upserts an instance and marks it healthy. Durable when it returns `Ok`.
    async fn register(&self, input: InstanceInput) -> Result<(), RegistryError>;
    /// Marks an instance unhealthy, or removes it when `input.remove_from_registry`.
    /// Unknown instances are not an error. Durable when it returns `Ok`.
    async fn deregister(&self, input: InstanceInput) -> Result<(), RegistryError>;
    /// Refreshes `last_heartbeat` (registers unknown instances).
    async fn heartbeat(&self, input: InstanceInput) -> Result<(), RegistryError>;
    /// Instances of `model_name` (or all), optionally only the healthy ones.
    async fn list(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<ModelInstance>, RegistryError>;
    /// The same listing as [`Registry::list`], as DB-GPT's JSON array. Stores with an
    /// in-memory view override this to write it without intermediate copies.
    async fn list_json(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<u8>, RegistryError> {
        let list = self.list(model_name, healthy_only).await?;
        serde_json::to_vec(&list).map_err(|e| RegistryError::Storage(e.to_string()))
    }
    /// Marks instances past their heartbeat deadline unhealthy; returns how many flipped.
    async fn expire(&self) -> Result<usize, RegistryError>;
    /// Persists buffered heartbeat timestamps.
    async fn flush(&self) -> Result<(), RegistryError>;
    /// Healthy/total counts from the current view.
    fn counts(&self) -> Counts;
    /// Why the store cannot take writes right now (readiness), `None` while it can.
    fn storage_failure(&self) -> Option<String> {
        None
    }
    /// A human-readable description of the store (e.g. `redb:/var/lib/dbgpt/registry.redb`).
    fn describe(&self) -> String;
    /// Healthy/total counts per model name, from the current view (for the metrics).
    fn model_counts(&self) -> Vec<(String, Counts)> {
        Vec::new()
    }
    /// The store's error and reconnect counts (for the metrics; zero for stores that have
    /// no connection to lose).
    fn store_stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// Failed round trips to the store and recoveries from them, since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub errors: u64,
    pub reconnects: u64,
}

/// Per-model healthy/total counts of `instances` (in the order models first appear).
pub(crate) fn model_counts<'a>(
    instances: impl Iterator<Item = &'a Instance>,
    now: Timestamp,
    timeout: Duration,
) -> Vec<(String, Counts)> {
    let mut out: IndexMap<&str, Counts> = IndexMap::new();
    for i in instances {
        let c = out.entry(i.key.model_name.as_str()).or_default();
        c.total += 1;
        if i.reported_healthy(now, timeout) {
            c.healthy += 1;
        }
    }
    out.into_iter().map(|(m, c)| (m.to_string(), c)).collect()
}

/// Healthy and total instance counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub healthy: usize,
    pub total: usize,
}

/// Errors of a registry store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another process holds the store (redb's file lock).
    #[error(
        "registry file {path} is already in use by another process (is another controller running on it?)"
    )]
    Locked { path: String },
    /// The store could not be opened or read.
    #[error("cannot open registry {path}: {reason}")]
    Open { path: String, reason: String },
    /// The registry file is damaged beyond what redb repairs on open.
    #[error(
        "registry file {path} is damaged ({reason}). Run `dbgpt registry check --registry_path {path}` for details; then restore a backup with `dbgpt registry restore`, or move the file aside to start with an empty registry (running workers register again with their next heartbeat)"
    )]
    Corrupt { path: String, reason: String },
    /// A write could not be made durable; nothing was acknowledged.
    #[error("registry storage error: {0}")]
    Storage(String),
}

/// One registered instance as the registry keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub key: InstanceKey,
    /// Insertion order, preserved across restarts (DB-GPT lists in insertion order).
    pub seq: u64,
    pub weight: Option<f64>,
    pub check_healthy: Option<bool>,
    pub healthy: bool,
    pub enabled: Option<bool>,
    pub prompt_template: Option<String>,
    pub last_heartbeat: Option<Timestamp>,
}

impl Instance {
    /// Whether this instance is past its heartbeat deadline (only if it is checked).
    pub fn expired(&self, now: Timestamp, timeout: Duration) -> bool {
        if self.check_healthy != Some(true) {
            return false;
        }
        match self.last_heartbeat {
            Some(t) => t.secs_until(now) > timeout.as_secs_f64(),
            None => true,
        }
    }

    /// Health as reported: the stored flag, unless the deadline has already passed.
    pub fn reported_healthy(&self, now: Timestamp, timeout: Duration) -> bool {
        self.healthy && !self.expired(now, timeout)
    }

    /// The DB-GPT wire form.
    pub fn to_wire(&self, now: Timestamp, timeout: Duration) -> ModelInstance {
        ModelInstance {
            model_name: self.key.model_name.clone(),
            host: self.key.host.clone(),
            port: self.key.port,
            weight: self.weight,
            check_healthy: self.check_healthy,
            healthy: Some(self.reported_healthy(now, timeout)),
            enabled: self.enabled,
            prompt_template: self.prompt_template.clone(),
            last_heartbeat: self.last_heartbeat.map(Timestamp::to_local_iso),
        }
    }

    /// Appends the DB-GPT wire form as JSON, byte-identical to serialising
    /// [`Instance::to_wire`], without building it (the listing hot path).
    pub fn write_wire_json(
        &self,
        out: &mut Vec<u8>,
        now: Timestamp,
        timeout: Duration,
        offsets: &mut crate::wire::controller::LocalOffsets,
    ) {
        fn opt_bool(out: &mut Vec<u8>, b: Option<bool>) {
            out.extend_from_slice(match b {
                Some(true) => b"true",
                Some(false) => b"false",
                None => b"null",
            });
        }
        let json = |out: &mut Vec<u8>, v: &dyn erased::Json| v.write(out);
        out.extend_from_slice(b"{\"model_name\":");
        json(out, &self.key.model_name.as_str());
        out.extend_from_slice(b",\"host\":");
        json(out, &self.key.host.as_str());
        out.extend_from_slice(b",\"port\":");
        out.extend_from_slice(self.key.port.to_string().as_bytes());
        out.extend_from_slice(b",\"weight\":");
        json(out, &self.weight);
        out.extend_from_slice(b",\"check_healthy\":");
        opt_bool(out, self.check_healthy);
        out.extend_from_slice(b",\"healthy\":");
        opt_bool(out, Some(self.reported_healthy(now, timeout)));
        out.extend_from_slice(b",\"enabled\":");
        opt_bool(out, self.enabled);
        out.extend_from_slice(b",\"prompt_template\":");
        json(out, &self.prompt_template.as_deref());
        out.extend_from_slice(b",\"last_heartbeat\":");
        match self.last_heartbeat {
            Some(t) => {
                out.push(b'"');
                t.write_local_iso(out, offsets);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// A new instance from a registration.
    pub fn from_input(input: &InstanceInput, seq: u64, now: Timestamp) -> Self {
        Instance {
            key: input.key(),
            seq,
            weight: input.weight,
            check_healthy: input.check_healthy,
            healthy: true,
            enabled: input.enabled,
            prompt_template: input.prompt_template.clone(),
            last_heartbeat: Some(now),
        }
    }

    /// DB-GPT's re-register: refresh weight and prompt template, mark healthy, keep
    /// `enabled` and `check_healthy` from the first registration.
    pub fn reregistered(&self, input: &InstanceInput, now: Timestamp) -> Self {
        Instance {
            weight: input.weight,
            prompt_template: input.prompt_template.clone(),
            healthy: true,
            last_heartbeat: Some(now),
            ..self.clone()
        }
    }
}

/// The in-memory view: model names in first-seen order, instances in insertion order.
#[derive(Debug, Default)]
pub struct MemState {
    models: IndexMap<String, IndexMap<(String, u16), Instance>>,
    next_seq: u64,
}

impl MemState {
    /// Builds the view from stored instances (any order; sorted by `seq`).
    pub fn from_instances(mut all: Vec<Instance>) -> Self {
        all.sort_by_key(|i| i.seq);
        let mut state = MemState::default();
        for inst in all {
            state.next_seq = state.next_seq.max(inst.seq + 1);
            state.put(inst);
        }
        state
    }

    pub fn get(&self, key: &InstanceKey) -> Option<&Instance> {
        self.models
            .get(&key.model_name)?
            .get(&HostPort(&key.host, key.port))
    }

    pub fn get_mut(&mut self, key: &InstanceKey) -> Option<&mut Instance> {
        self.get_mut_by(&key.model_name, &key.host, key.port)
    }

    /// [`MemState::get_mut`] from borrowed parts (no key to build: the heartbeat path).
    pub fn get_mut_by(&mut self, model_name: &str, host: &str, port: u16) -> Option<&mut Instance> {
        self.models
            .get_mut(model_name)?
            .get_mut(&HostPort(host, port))
    }

    /// Inserts or replaces an instance (keeping its position if it exists).
    pub fn put(&mut self, inst: Instance) {
        let list = self.models.entry(inst.key.model_name.clone()).or_default();
        list.insert((inst.key.host.clone(), inst.key.port), inst);
    }

    pub fn remove(&mut self, key: &InstanceKey) -> Option<Instance> {
        let list = self.models.get_mut(&key.model_name)?;
        let removed = list.shift_remove(&(key.host.clone(), key.port));
        if list.is_empty() {
            self.models.shift_remove(&key.model_name);
        }
        removed
    }

    /// Allocates the next insertion sequence number.
    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Every instance, models in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.models.values().flat_map(|m| m.values())
    }

    /// Instances of one model name, or of all models.
    pub fn select<'a>(
        &'a self,
        model_name: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = &'a Instance> + 'a> {
        match model_name {
            Some(name) => match self.models.get(name) {
                Some(list) => Box::new(list.values()),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(self.iter()),
        }
    }

    pub fn len(&self) -> usize {
        self.models.values().map(|m| m.len()).sum()
    }
}

/// A borrowed `(host, port)` that looks up `(String, u16)` keys without allocating: it
/// hashes exactly as the tuple does (`str`, then `u16`).
#[derive(Hash)]
struct HostPort<'a>(&'a str, u16);

impl indexmap::Equivalent<(String, u16)> for HostPort<'_> {
    fn equivalent(&self, key: &(String, u16)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// serde_json writing of the few value types the instance writer needs.
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("plain values serialise");
        }
    }
}

/// A JSON array of instances in DB-GPT's wire form, written straight from `instances`.
pub fn write_listing<'a>(
    instances: impl Iterator<Item = &'a Instance>,
    healthy_only: bool,
    now: Timestamp,
    timeout: Duration,
    capacity: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    let mut offsets = crate::wire::controller::LocalOffsets::default();
    out.push(b'[');
    let mut first = true;
    for i in instances {
        if healthy_only && !i.reported_healthy(now, timeout) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        i.write_wire_json(&mut out, now, timeout, &mut offsets);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, port: u16, seq: u64) -> Instance {
        Instance {
            key: InstanceKey {
                model_name: name.into(),
                host: "h".into(),
                port,
            },
            seq,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: true,
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: Some(Timestamp(0)),
        }
    }

    #[test]
    fn memstate_orders_by_model_first_seen_then_insertion() {
        let s = MemState::from_instances(vec![
            inst("b@llm", 2, 3),
            inst("a@llm", 1, 1),
            inst("b@llm", 1, 0),
            inst("a@llm", 2, 2),
        ]);
        let order: Vec<_> = s
            .iter()
            .map(|i| (i.key.model_name.as_str(), i.key.port))
            .collect();
        assert_eq!(
            order,
            [("b@llm", 1), ("b@llm", 2), ("a@llm", 1), ("a@llm", 2)]
        );
        assert_eq!(s.next_seq, 4);
    }

    #[test]
    fn expiry_is_derived_and_check_healthy_false_never_expires() {
        let mut i = inst("a@llm", 1, 0);
        i.last_heartbeat = Some(Timestamp(0));
        let t = Duration::from_secs(60);
        assert!(!i.expired(Timestamp(60_000_000), t));
        assert!(i.expired(Timestamp(60_000_001), t));
        assert!(!i.reported_healthy(Timestamp(61_000_000), t));
        i.check_healthy = Some(false);
        assert!(!i.expired(Timestamp(i64::MAX / 2), t));
        i.check_healthy = None;
        assert!(!i.expired(Timestamp(i64::MAX / 2), t));
    }

    #[test]
    fn reregister_keeps_enabled_and_check_healthy() {
        let mut old = inst("a@llm", 1, 7);
        old.enabled = Some(false);
        old.check_healthy = Some(false);
        old.healthy = false;
        let input = InstanceInput {
            model_name: "a@llm".into(),
            host: "h".into(),
            port: 1,
            weight: Some(3.0),
            check_healthy: Some(true),
            enabled: Some(true),
            prompt_template: Some("t".into()),
            remove_from_registry: false,
        };
        let new = old.reregistered(&input, Timestamp(5));
        assert_eq!(new.enabled, Some(false));
        assert_eq!(new.check_healthy, Some(false));
        assert_eq!(new.weight, Some(3.0));
        assert_eq!(new.prompt_template.as_deref(), Some("t"));
        assert!(new.healthy);
        assert_eq!(new.seq, 7);
    }
}
