//! The embedded registry: one redb file, owned by one controller.
//!
//! Membership changes (register, deregister, removal, expiry flips) are committed with
//! redb's default `Durability::Immediate` *before* the caller is answered, so a 200 means
//! the change is on disk. Heartbeats of known instances only touch memory and mark the
//! instance dirty; [`Registry::flush`] writes all dirty timestamps in one transaction (the
//! controller calls it every couple of seconds and on shutdown), so a crash loses at most
//! one batch of timestamps, never an instance. Reads are served from [`MemState`].
//! redb calls block, so they run on tokio's blocking pool, one writer at a time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{info, warn};

use super::{Counts, Instance, MemState, Registry, RegistryError, record};
use crate::wire::controller::{InstanceInput, InstanceKey, ModelInstance, Timestamp};

/// `(model_name, host, port)` → versioned record bytes.
const INSTANCES: TableDefinition<(&str, &str, u16), &[u8]> = TableDefinition::new("instances");
/// Store-level metadata (`schema_version`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Version of the table layout (not of the record format, which is per record).
const SCHEMA_VERSION: u64 = 1;

enum Op {
    Put(InstanceKey, Vec<u8>),
    Delete(InstanceKey),
}

/// The redb-backed registry.
pub struct RedbRegistry {
    db: Arc<Database>,
    path: PathBuf,
    mem: RwLock<MemState>,
    /// `seq` of instances whose heartbeat timestamp is not on disk yet.
    dirty: Mutex<HashSet<u64>>,
    writer: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl RedbRegistry {
    /// Opens (or creates) the registry file and loads every stored instance.
    /// Fails at once if another process holds the file.
    pub fn open(path: &Path, heartbeat_timeout: Duration) -> Result<Self, RegistryError> {
        let shown = path.display().to_string();
        let open_err = |reason: String| RegistryError::Open {
            path: shown.clone(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
        }
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(RegistryError::Locked { path: shown });
            }
            Err(e) => return Err(open_err(e.to_string())),
        };
        // Make sure both tables exist and the layout is one we understand.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| open_err(e.to_string()))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| open_err(e.to_string()))?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(open_err(format!(
                        "it was written by a newer dbgpt (registry schema {v}, this build knows {SCHEMA_VERSION})"
                    )));
                }
                Some(_) => {}
            }
            txn.open_table(INSTANCES)
                .map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;

        let mut all = Vec::new();
        let read = db.begin_read().map_err(|e| open_err(e.to_string()))?;
        let table = read
            .open_table(INSTANCES)
            .map_err(|e| open_err(e.to_string()))?;
        for row in table.iter().map_err(|e| open_err(e.to_string()))? {
            let (k, v) = row.map_err(|e| open_err(e.to_string()))?;
            match record::decode(v.value()) {
                Ok(inst) => all.push(inst),
                Err(e) => {
                    let (m, h, p) = k.value();
                    // Keep the bytes on disk (nothing is deleted); just do not serve it.
                    warn!(model = m, host = h, port = p, error = %e, "skipping unreadable registry record");
                }
            }
        }
        drop(table);
        drop(read);
        info!(path = %shown, instances = all.len(), "registry opened");
        Ok(RedbRegistry {
            db: Arc::new(db),
            path: path.to_path_buf(),
            mem: RwLock::new(MemState::from_instances(all)),
            dirty: Mutex::new(HashSet::new()),
            writer: tokio::sync::Mutex::new(()),
            timeout: heartbeat_timeout,
        })
    }

    /// The file this registry lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits a batch of operations durably (one transaction, one fsync).
    async fn commit(&self, ops: Vec<Op>) -> Result<(), RegistryError> {
        if ops.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(INSTANCES)?;
                for op in &ops {
                    match op {
                        Op::Put(k, v) => {
                            table.insert(
                                (k.model_name.as_str(), k.host.as_str(), k.port),
                                v.as_slice(),
                            )?;
                        }
                        Op::Delete(k) => {
                            table.remove((k.model_name.as_str(), k.host.as_str(), k.port))?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| RegistryError::Storage(format!("registry writer task failed: {e}")))?
        .map_err(|e| RegistryError::Storage(e.to_string()))
    }

    fn read_mem(&self) -> std::sync::RwLockReadGuard<'_, MemState> {
        self.mem.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_mem(&self) -> std::sync::RwLockWriteGuard<'_, MemState> {
        self.mem.write().unwrap_or_else(|p| p.into_inner())
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Registry for RedbRegistry {
    async fn register(&self, input: InstanceInput) -> Result<(), RegistryError> {
        let _w = self.writer.lock().await;
        let now = Timestamp::now();
        let key = input.key();
        let inst = {
            let mut mem = self.write_mem();
            match mem.get(&key) {
                Some(old) => old.reregistered(&input, now),
                None => {
                    let seq = mem.next_seq();
                    Instance::from_input(&input, seq, now)
                }
            }
        };
        self.commit(vec![Op::Put(key, record::encode(&inst))])
            .await?;
        let seq = inst.seq;
        self.write_mem().put(inst);
        self.dirty().remove(&seq);
        Ok(())
    }

    async fn deregister(&self, input: InstanceInput) -> Result<(), RegistryError> {
        let _w = self.writer.lock().await;
        let key = input.key();
        if input.remove_from_registry {
            if self.read_mem().get(&key).is_none() {
                return Ok(());
            }
            self.commit(vec![Op::Delete(key.clone())]).await?;
            if let Some(gone) = self.write_mem().remove(&key) {
                self.dirty().remove(&gone.seq);
            }
            return Ok(());
        }
        let updated = match self.read_mem().get(&key) {
            Some(old) => Instance {
                healthy: false,
                ..old.clone()
            },
            None => return Ok(()),
        };
        self.commit(vec![Op::Put(key.clone(), record::encode(&updated))])
            .await?;
        if let Some(cur) = self.write_mem().get_mut(&key) {
            cur.healthy = false;
        }
        Ok(())
    }

    async fn heartbeat(&self, input: InstanceInput) -> Result<(), RegistryError> {
        {
            let mut mem = self.write_mem();
            if let Some(inst) = mem.get_mut_by(&input.model_name, &input.host, input.port) {
                inst.last_heartbeat = Some(Timestamp::now());
                inst.healthy = true;
                let seq = inst.seq;
                drop(mem);
                self.dirty().insert(seq);
                return Ok(());
            }
        }
        // Unknown instance: DB-GPT registers it (this is how workers survive a controller
        // restart or fail over to another controller).
        self.register(input).await
    }

    async fn list(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<ModelInstance>, RegistryError> {
        let now = Timestamp::now();
        let mem = self.read_mem();
        // Sized up front: collecting from the boxed iterator would grow the vector by
        // doubling, copying every instance several times on a full listing.
        let mut out = Vec::with_capacity(mem.len());
        out.extend(
            mem.select(model_name)
                .filter(|i| !healthy_only || i.reported_healthy(now, self.timeout))
                .map(|i| i.to_wire(now, self.timeout)),
        );
        Ok(out)
    }

    async fn list_json(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<u8>, RegistryError> {
        let now = Timestamp::now();
        let mem = self.read_mem();
        Ok(super::write_listing(
            mem.select(model_name),
            healthy_only,
            now,
            self.timeout,
            64 + mem.len() * 256,
        ))
    }

    async fn expire(&self) -> Result<usize, RegistryError> {
        let _w = self.writer.lock().await;
        let now = Timestamp::now();
        let flipped: Vec<Instance> = self
            .read_mem()
            .iter()
            .filter(|i| i.healthy && i.expired(now, self.timeout))
            .map(|i| Instance {
                healthy: false,
                ..i.clone()
            })
            .collect();
        if flipped.is_empty() {
            return Ok(0);
        }
        let ops = flipped
            .iter()
            .map(|i| Op::Put(i.key.clone(), record::encode(i)))
            .collect();
        let result = self.commit(ops).await;
        // Health is derived, so the flip is right in memory even if the write failed; the
        // next sweep retries the write.
        let mut mem = self.write_mem();
        let mut n = 0;
        for f in &flipped {
            if let Some(cur) = mem.get_mut(&f.key) {
                // Only if no heartbeat arrived meanwhile.
                if cur.last_heartbeat == f.last_heartbeat && cur.healthy {
                    if result.is_ok() {
                        cur.healthy = false;
                    }
                    n += 1;
                }
            }
        }
        drop(mem);
        result.map(|_| n)
    }

    async fn flush(&self) -> Result<(), RegistryError> {
        let _w = self.writer.lock().await;
        let seqs: HashSet<u64> = std::mem::take(&mut *self.dirty());
        if seqs.is_empty() {
            return Ok(());
        }
        let ops: Vec<Op> = {
            let mem = self.read_mem();
            mem.iter()
                .filter(|i| seqs.contains(&i.seq))
                .map(|i| Op::Put(i.key.clone(), record::encode(i)))
                .collect()
        };
        if let Err(e) = self.commit(ops).await {
            self.dirty().extend(seqs);
            return Err(e);
        }
        Ok(())
    }

    fn counts(&self) -> Counts {
        let now = Timestamp::now();
        let mem = self.read_mem();
        let mut c = Counts::default();
        for i in mem.iter() {
            c.total += 1;
            if i.reported_healthy(now, self.timeout) {
                c.healthy += 1;
            }
        }
        c
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::conformance::input;

    #[tokio::test]
    async fn survives_reopen_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
            r.register(input("b@llm", 2)).await.unwrap();
            r.register(input("a@llm", 1)).await.unwrap();
            r.register(input("b@llm", 1)).await.unwrap();
            r.deregister(input("a@llm", 1)).await.unwrap();
        }
        let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
        let l = r.list(None, false).await.unwrap();
        let got: Vec<_> = l
            .iter()
            .map(|i| (i.model_name.as_str(), i.port, i.healthy.unwrap()))
            .collect();
        assert_eq!(
            got,
            [("b@llm", 2, true), ("b@llm", 1, true), ("a@llm", 1, false)]
        );
        assert_eq!(
            r.counts(),
            Counts {
                healthy: 2,
                total: 3
            }
        );
    }

    #[tokio::test]
    async fn second_open_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let _a = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
        let err = RedbRegistry::open(&path, Duration::from_secs(60))
            .err()
            .expect("second open must fail");
        assert!(matches!(err, RegistryError::Locked { .. }));
        assert!(err.to_string().contains("r.redb"), "{err}");
    }

    #[tokio::test]
    async fn removal_heartbeat_and_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
            // Heartbeat from an unknown instance registers it (durably).
            r.heartbeat(input("x@llm", 9)).await.unwrap();
            r.register(input("y@llm", 9)).await.unwrap();
            let mut rm = input("y@llm", 9);
            rm.remove_from_registry = true;
            r.deregister(rm).await.unwrap();
            // Removing an unknown instance is fine.
            let mut rm = input("nope@llm", 1);
            rm.remove_from_registry = true;
            r.deregister(rm).await.unwrap();
            let before = r.list(Some("x@llm"), false).await.unwrap()[0].clone();
            tokio::time::sleep(Duration::from_millis(5)).await;
            r.heartbeat(input("x@llm", 9)).await.unwrap();
            r.flush().await.unwrap();
            let after = r.list(Some("x@llm"), false).await.unwrap()[0].clone();
            assert_ne!(before.last_heartbeat, after.last_heartbeat);
        }
        let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
        let l = r.list(None, false).await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].model_name, "x@llm");
    }

    /// The direct JSON writer is byte-identical to serialising the wire structs, across
    /// every optional field and escaping case.
    #[tokio::test]
    async fn list_json_equals_serialised_list() {
        let dir = tempfile::tempdir().unwrap();
        let r = RedbRegistry::open(&dir.path().join("r.redb"), Duration::from_secs(60)).unwrap();
        let mut odd = input("quote\"back\\slash \u{e9}\u{4e2d}@llm", 65535);
        odd.weight = None;
        odd.check_healthy = None;
        odd.enabled = Some(false);
        odd.prompt_template = Some("tab\tnew\nline \u{1f600}".into());
        r.register(odd).await.unwrap();
        let mut w = input("w@text2vec", 0);
        w.weight = Some(0.1 + 0.2);
        w.check_healthy = Some(false);
        r.register(w).await.unwrap();
        r.register(input("a@llm", 1)).await.unwrap();
        r.deregister(input("a@llm", 1)).await.unwrap();
        for (name, healthy_only) in [
            (None, false),
            (None, true),
            (Some("a@llm"), false),
            (Some("zz"), false),
        ] {
            let direct = r.list_json(name, healthy_only).await.unwrap();
            let via = serde_json::to_vec(&r.list(name, healthy_only).await.unwrap()).unwrap();
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(via).unwrap()
            );
        }
    }

    #[tokio::test]
    async fn expiry_flips_and_heartbeat_revives() {
        let dir = tempfile::tempdir().unwrap();
        let r = RedbRegistry::open(&dir.path().join("r.redb"), Duration::from_millis(50)).unwrap();
        r.register(input("a@llm", 1)).await.unwrap();
        let mut unchecked = input("b@llm", 1);
        unchecked.check_healthy = Some(false);
        r.register(unchecked).await.unwrap();
        assert_eq!(r.list(None, true).await.unwrap().len(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        // Reported unhealthy at once (derived), before any sweep.
        let healthy = r.list(None, true).await.unwrap();
        assert_eq!(healthy.len(), 1);
        assert_eq!(healthy[0].model_name, "b@llm");
        assert_eq!(r.expire().await.unwrap(), 1);
        assert_eq!(r.expire().await.unwrap(), 0);
        r.heartbeat(input("a@llm", 1)).await.unwrap();
        assert_eq!(r.list(None, true).await.unwrap().len(), 2);
    }
}
