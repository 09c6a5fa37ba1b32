//! The embedded registry: one redb file, owned by one controller.
//!
//! Membership changes (register, deregister, removal, expiry flips) are committed with
//! redb's default `Durability::Immediate` *before* the caller is answered, so a 200 means
//! the change is on disk. Heartbeats of known instances only touch memory and mark the
//! instance dirty; [`Registry::flush`] writes all dirty timestamps in one transaction (the
//! controller calls it every couple of seconds and on shutdown), so a crash loses at most
//! one batch of timestamps, never an instance. Reads are served from [`MemState`].
//! redb calls block, so they run on tokio's blocking pool, one writer at a time.
//!
//! The file is opened without trusting it ([`file`]). A failed write (a full disk, an I/O
//! error) leaves redb refusing every later write until the database is reopened, so the
//! store then reports itself failing ([`Registry::storage_failure`]) and, before the next
//! write and on every flush tick, closes and reopens the file and writes the in-memory view
//! back ([`file::resync`]): whatever was not committed is persisted, whatever a failed commit
//! left behind is undone. Writes succeed again as soon as the disk does.

pub(crate) mod file;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redb::Database;
use tracing::{error, info, warn};

use super::{Counts, Instance, MemState, Registry, RegistryError, record};
use crate::wire::controller::{InstanceInput, InstanceKey, ModelInstance, Timestamp};
use file::{CreateFn, INSTANCES, row};

enum Op {
    Put(InstanceKey, Vec<u8>),
    Delete(InstanceKey),
}

/// Applies `ops` in one durable transaction.
fn write_ops(db: &Database, ops: &[Op]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(INSTANCES)?;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    table.insert(row(k), v.as_slice())?;
                }
                Op::Delete(k) => {
                    table.remove(row(k))?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// The redb-backed registry.
pub struct RedbRegistry {
    /// The open database; `None` after a storage error until a reopen succeeds.
    db: Mutex<Option<Arc<Database>>>,
    path: PathBuf,
    /// How the file is opened (again, after a storage error).
    create: Arc<CreateFn>,
    mem: RwLock<MemState>,
    /// `seq` of instances whose heartbeat timestamp is not on disk yet.
    dirty: Mutex<HashSet<u64>>,
    /// Why the last write failed, until a reopen has written the in-memory view back.
    failing: Mutex<Option<String>>,
    writer: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl RedbRegistry {
    /// Opens (or creates) the registry file and loads every stored instance.
    /// Fails at once if another process holds the file, and with
    /// [`RegistryError::Corrupt`] if it is damaged beyond redb's repair.
    pub fn open(path: &Path, heartbeat_timeout: Duration) -> Result<Self, RegistryError> {
        Self::open_with(path, heartbeat_timeout, Arc::new(file::create))
    }

    /// [`RedbRegistry::open`] with the given way of opening the file.
    pub(crate) fn open_with(
        path: &Path,
        heartbeat_timeout: Duration,
        create: Arc<CreateFn>,
    ) -> Result<Self, RegistryError> {
        let (db, scan) = file::open(path, &*create)?;
        let shown = path.display().to_string();
        for bad in &scan.unreadable {
            // Keep the bytes on disk (nothing is deleted); just do not serve them.
            warn!(file = %shown, key = %bad.key, error = %bad.error,
                "skipping unreadable registry record (`dbgpt registry check` lists them)");
        }
        info!(path = %shown, instances = scan.instances.len(), "registry opened");
        Ok(RedbRegistry {
            db: Mutex::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
            create,
            mem: RwLock::new(MemState::from_instances(scan.instances)),
            dirty: Mutex::new(HashSet::new()),
            failing: Mutex::new(None),
            writer: tokio::sync::Mutex::new(()),
            timeout: heartbeat_timeout,
        })
    }

    /// Commits a batch of operations durably (one transaction, one fsync). The caller holds
    /// the writer lock. A failure marks the store failing, so the next write reopens it.
    async fn commit(&self, ops: Vec<Op>) -> Result<(), RegistryError> {
        if ops.is_empty() {
            return Ok(());
        }
        let db = self.usable_db().await?;
        let written = tokio::task::spawn_blocking(move || {
            file::contain(|| write_ops(&db, &ops))
                .unwrap_or_else(|panic| Err(redb::Error::Corrupted(panic)))
        })
        .await;
        let reason = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("registry writer task failed: {e}"),
        };
        self.set_failing(&reason);
        Err(RegistryError::Storage(reason))
    }

    /// The database to write to: the open one, or (after a storage error) a reopened one
    /// that holds the in-memory view again. The caller holds the writer lock.
    async fn usable_db(&self) -> Result<Arc<Database>, RegistryError> {
        if self.failing().is_none()
            && let Some(db) = self.lock_db().clone()
        {
            return Ok(db);
        }
        self.reopen().await
    }

    /// Closes the database, opens the file again and writes the whole in-memory view back
    /// (redb refuses every write after an I/O error until it is reopened). The caller holds
    /// the writer lock.
    async fn reopen(&self) -> Result<Arc<Database>, RegistryError> {
        let old = self.lock_db().take();
        // Taken before the snapshot: a heartbeat arriving meanwhile stays dirty.
        let dirty = std::mem::take(&mut *self.dirty());
        let view: Vec<(InstanceKey, Vec<u8>)> = self
            .read_mem()
            .iter()
            .map(|i| (i.key.clone(), record::encode(i)))
            .collect();
        let path = self.path.clone();
        let create = self.create.clone();
        let reopened = tokio::task::spawn_blocking(move || {
            drop(old);
            let (db, _) = file::open(&path, &*create).map_err(|e| match e {
                RegistryError::Open { reason, .. } => reason,
                e => e.to_string(),
            })?;
            file::resync(&db, &view).map_err(|e| e.to_string())?;
            Ok::<_, String>(db)
        })
        .await
        .unwrap_or_else(|e| Err(format!("registry reopen task failed: {e}")));
        match reopened {
            Ok(db) => {
                let db = Arc::new(db);
                *self.lock_db() = Some(db.clone());
                let was = self.lock_failing().take();
                info!(path = %self.path.display(), previous_error = was.as_deref().unwrap_or(""),
                    "registry reopened: the in-memory view is on disk again");
                Ok(db)
            }
            Err(e) => {
                self.dirty().extend(dirty);
                let reason = format!("reopening the file failed: {e}");
                self.set_failing(&reason);
                Err(RegistryError::Storage(reason))
            }
        }
    }

    /// Runs `f` on the registry's database in the blocking pool, as the one writer (the
    /// registry's own writes wait meanwhile): other tables in the same file (the managed API
    /// keys, [`crate::keys::RedbKeyStore`]) are written through this. A redb error marks
    /// the store failing, like a failed registry write, so the next write reopens the file.
    pub(crate) async fn with_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let _w = self.writer.lock().await;
        let db = self.usable_db().await?;
        let written = tokio::task::spawn_blocking(move || {
            file::contain(|| f(&db)).unwrap_or_else(|panic| Err(redb::Error::Corrupted(panic)))
        })
        .await;
        let reason = match written {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("registry writer task failed: {e}"),
        };
        self.set_failing(&reason);
        Err(RegistryError::Storage(reason))
    }

    /// Runs `f` on the registry's database in the blocking pool, for reading other tables in
    /// the same file.
    pub(crate) async fn with_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let Some(db) = self.lock_db().clone() else {
            let why = self
                .failing()
                .unwrap_or_else(|| "the file is closed".into());
            return Err(RegistryError::Storage(why));
        };
        tokio::task::spawn_blocking(move || {
            file::contain(|| f(&db)).unwrap_or_else(|panic| Err(redb::Error::Corrupted(panic)))
        })
        .await
        .unwrap_or_else(|e| {
            Err(redb::Error::Corrupted(format!(
                "registry reader task failed: {e}"
            )))
        })
        .map_err(|e| RegistryError::Storage(e.to_string()))
    }

    /// The registry file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records why writes fail (logged when the store starts failing, not on every retry).
    fn set_failing(&self, reason: &str) {
        let was = self.lock_failing().replace(reason.to_string());
        if was.is_none() {
            error!(path = %self.path.display(), error = reason,
                "registry write failed; the file is reopened before the next write and on every flush until that works");
        }
    }

    fn failing(&self) -> Option<String> {
        self.lock_failing().clone()
    }

    fn lock_failing(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_db(&self) -> std::sync::MutexGuard<'_, Option<Arc<Database>>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
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
        if self.failing().is_some() {
            // The reopen writes every instance, buffered timestamps included.
            return self.reopen().await.map(drop);
        }
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

    fn model_counts(&self) -> Vec<(String, Counts)> {
        super::model_counts(self.read_mem().iter(), Timestamp::now(), self.timeout)
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

    fn storage_failure(&self) -> Option<String> {
        self.failing()
    }

    fn describe(&self) -> String {
        match self.failing() {
            None => format!("redb:{}", self.path.display()),
            Some(why) => format!("redb:{} (failing: {why})", self.path.display()),
        }
    }
}
