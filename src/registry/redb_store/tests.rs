use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

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

// ---- Committed fixtures (tests/data): the released file format must keep opening. ----

pub(crate) fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A writable copy of a committed fixture (opening a registry writes to it).
fn fixture_copy(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::copy(data(name), &path).unwrap();
    path
}

pub(crate) const V010: &str = "v0.1.0_registry.redb";
pub(crate) const V010_CORRUPT: &str = "v0.1.0_registry_corrupt.redb";

fn key(model_name: &str, host: &str, port: u16) -> InstanceKey {
    InstanceKey {
        model_name: model_name.into(),
        host: host.into(),
        port,
    }
}

/// Every record of the file written by the first release, as it must still load.
fn v010_instances() -> Vec<Instance> {
    // A registration with `input`'s defaults (weight 1, checked, enabled, no template).
    let base = |k: InstanceKey, seq: u64, t: i64| Instance {
        key: k,
        ..Instance::from_input(&input("", 0), seq, Timestamp(t))
    };
    vec![
        // Re-registered with a new weight and template: `enabled`/`check_healthy` kept.
        Instance {
            weight: Some(2.0),
            prompt_template: Some("vicuna_v1.1".into()),
            ..base(key("smollm2@llm", "127.0.0.1", 8001), 0, 1796625604711681)
        },
        // Deregistered: kept, unhealthy.
        Instance {
            healthy: false,
            ..base(key("smollm2@llm", "127.0.0.1", 8002), 1, 1796625604677110)
        },
        Instance {
            weight: None,
            check_healthy: Some(false),
            ..base(
                key("bge-small@text2vec", "10.0.0.5", 8003),
                2,
                1796625604680998,
            )
        },
        Instance {
            check_healthy: None,
            enabled: Some(false),
            prompt_template: Some("chatml".into()),
            ..base(
                key("gpt-proxy@llm", "worker.example", 9000),
                3,
                1796625604681659,
            )
        },
        // seq 4 was `gone@llm`, removed with remove_from_registry.
        Instance {
            weight: Some(0.3),
            prompt_template: Some("tab\tnew\nline".into()),
            ..base(key("名字 \"q\"\\@llm", "::1", 65535), 5, 1796625604690973)
        },
        // First seen by a heartbeat; its second heartbeat's timestamp was flushed in a batch.
        base(key("hb@llm", "127.0.0.1", 8005), 6, 1796625604707959),
    ]
}

/// The registry file of the first release (table layout 1, record format 1, redb 4.5) opens
/// with every record intact, in order, and takes writes. If this fails, a change broke the
/// upgrade of every installed controller: add a migration instead of editing the fixture.
#[tokio::test]
async fn the_first_releases_registry_file_still_opens_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path(), V010);
    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    let got: Vec<Instance> = r.read_mem().iter().cloned().collect();
    assert_eq!(got, v010_instances());
    // The next registration gets the next sequence number and survives a reopen.
    r.register(input("new@llm", 1)).await.unwrap();
    drop(r);
    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    let mem = r.read_mem();
    let new = mem.get(&key("new@llm", "127.0.0.1", 1)).unwrap();
    assert_eq!(new.seq, 7);
    assert_eq!(mem.len(), 7);
}

/// The same file through the raw reader the `dbgpt registry` commands use: every row
/// decodes, and the layout version is the first one.
#[test]
fn the_first_releases_file_scans_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path(), V010);
    let (db, scan) = file::open(&path, &file::create).unwrap();
    assert!(scan.unreadable.is_empty(), "{:?}", scan.unreadable);
    let mut got = scan.instances;
    got.sort_by_key(|i| i.seq);
    assert_eq!(got, v010_instances());
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    use redb::ReadableDatabase;
    let read = db.begin_read().unwrap();
    let version = read
        .open_table(meta)
        .unwrap()
        .get("schema_version")
        .unwrap();
    assert_eq!(version.map(|v| v.value()), Some(1));
}

/// Overwrites `blocks` 512-byte blocks of `bytes` with pseudo-random bytes (xorshift64 from
/// `seed`: the same damage on every machine).
pub(crate) fn corrupt(bytes: &mut [u8], seed: u64, blocks: usize) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let count = bytes.len() / 512;
    for _ in 0..blocks {
        let b = (next() % count as u64) as usize;
        for byte in &mut bytes[b * 512..(b + 1) * 512] {
            *byte = next() as u8;
        }
    }
}

/// Seed and block count of the committed corrupted fixture.
const CORRUPT_SEED: u64 = 1;
const CORRUPT_BLOCKS: usize = 8;

/// Writes the committed fixtures' derived file: run by hand after changing the recipe.
#[test]
#[ignore = "writes tests/data/v0.1.0_registry_corrupt.redb"]
fn write_corrupt_fixture() {
    let mut bytes = std::fs::read(data(V010)).unwrap();
    corrupt(&mut bytes, CORRUPT_SEED, CORRUPT_BLOCKS);
    std::fs::write(data(V010_CORRUPT), bytes).unwrap();
}

/// The committed corrupted fixture is exactly the recipe applied to the good one.
#[test]
fn the_corrupt_fixture_is_the_recipe_applied_to_the_release_file() {
    let mut bytes = std::fs::read(data(V010)).unwrap();
    corrupt(&mut bytes, CORRUPT_SEED, CORRUPT_BLOCKS);
    assert!(bytes != std::fs::read(data(V010)).unwrap());
    assert!(bytes == std::fs::read(data(V010_CORRUPT)).unwrap());
}

/// A damaged file is refused with an error that names it and says what to do, not a panic.
#[test]
fn a_corrupt_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path(), V010_CORRUPT);
    let err = RedbRegistry::open(&path, Duration::from_secs(60))
        .err()
        .expect("a corrupt file must not open");
    assert!(matches!(err, RegistryError::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("dbgpt registry check"), "{text}");
    assert!(text.contains("move the file aside"), "{text}");
}

/// Random damage anywhere in a registry either leaves a file that opens (free pages hit)
/// or is refused as corrupt: redb's integrity check on open finds it, never a panic.
#[test]
fn random_damage_opens_or_is_refused_as_corrupt() {
    let good = std::fs::read(data(V010)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut opened, mut refused) = (0, 0);
    for seed in 1..=40 {
        let mut bytes = good.clone();
        corrupt(&mut bytes, seed, 1 + (seed as usize % 6));
        let path = dir.path().join(format!("r{seed}.redb"));
        std::fs::write(&path, bytes).unwrap();
        match file::open(&path, &file::create) {
            Ok((_, scan)) => {
                opened += 1;
                // Whatever survived decodes to records of the release file.
                for i in &scan.instances {
                    assert!(v010_instances().contains(i), "seed {seed}: {i:?}");
                }
            }
            Err(RegistryError::Corrupt { path: p, reason }) => {
                refused += 1;
                assert_eq!(p, path.display().to_string());
                assert!(!reason.contains("panicked"), "seed {seed}: {reason}");
            }
            Err(e) => panic!("seed {seed}: unexpected {e:?}"),
        }
    }
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );
}

// ---- Rows that do not decode. ----

/// Writes rows straight into a registry file, bypassing the record encoder.
pub(crate) fn write_raw_rows(path: &Path, rows: &[(file::InstanceRow, Vec<u8>)]) {
    let (db, _) = file::open(path, &file::create).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(file::INSTANCES).unwrap();
        for (k, v) in rows {
            t.insert(*k, v.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

async fn model_names(r: &RedbRegistry) -> Vec<String> {
    let all = r.list(None, false).await.unwrap();
    all.into_iter().map(|i| i.model_name).collect()
}

pub(crate) fn encoded(name: &str, port: u16, seq: u64) -> Vec<u8> {
    record::encode(&Instance::from_input(&input(name, port), seq, Timestamp(1)))
}

/// A value that does not decode, or that decodes to another instance than its key, is
/// reported (with the file and the key) and not served; the good rows load.
#[tokio::test]
async fn unreadable_rows_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    write_raw_rows(
        &path,
        &[
            (("good@llm", "127.0.0.1", 1), encoded("good@llm", 1, 0)),
            (("bad@llm", "127.0.0.1", 2), vec![1, 255, 255]),
            (("newer@llm", "127.0.0.1", 3), vec![9, 0]),
            (("new\nline@llm", "127.0.0.1", 5), vec![]),
            (("moved@llm", "127.0.0.1", 4), encoded("other@llm", 5, 1)),
        ],
    );
    let (_, scan) = file::open(&path, &file::create).unwrap();
    let keys: Vec<&str> = scan.unreadable.iter().map(|u| u.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "bad@llm@127.0.0.1:2",
            "moved@llm@127.0.0.1:4",
            // Shown escaped: it goes into a log line.
            "new\\nline@llm@127.0.0.1:5",
            "newer@llm@127.0.0.1:3"
        ]
    );
    assert_eq!(scan.unreadable[2].error, "empty record");
    assert!(
        scan.unreadable[0].error.contains("corrupt record"),
        "{:?}",
        scan.unreadable
    );
    assert!(
        scan.unreadable[1].error.contains("does not match"),
        "{:?}",
        scan.unreadable
    );
    assert!(
        scan.unreadable[3].error.contains("newer"),
        "{:?}",
        scan.unreadable
    );
    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    let names = model_names(&r).await;
    assert_eq!(names, ["good@llm"]);
}

/// The resync after a storage error makes the file hold the in-memory view: rows of
/// instances memory does not have are removed, unreadable rows are kept untouched.
#[test]
fn resync_writes_the_view_and_keeps_unreadable_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    write_raw_rows(
        &path,
        &[
            (("stale@llm", "127.0.0.1", 1), encoded("stale@llm", 1, 0)),
            (("bad@llm", "127.0.0.1", 2), vec![1, 255]),
            (("kept@llm", "127.0.0.1", 3), encoded("kept@llm", 3, 1)),
        ],
    );
    let kept = Instance {
        weight: Some(5.0),
        ..Instance::from_input(&input("kept@llm", 3), 1, Timestamp(2))
    };
    let added = Instance::from_input(&input("added@llm", 4), 2, Timestamp(3));
    let view: Vec<(InstanceKey, Vec<u8>)> = [&kept, &added]
        .iter()
        .map(|i| (i.key.clone(), record::encode(i)))
        .collect();
    let (db, _) = file::open(&path, &file::create).unwrap();
    file::resync(&db, &view).unwrap();
    drop(db);
    let (_, scan) = file::open(&path, &file::create).unwrap();
    let mut got = scan.instances;
    got.sort_by_key(|i| i.seq);
    assert_eq!(got, [kept, added]);
    assert_eq!(scan.unreadable.len(), 1);
    assert_eq!(scan.unreadable[0].key, "bad@llm@127.0.0.1:2");
}

#[test]
fn contain_turns_a_panic_into_its_message() {
    let got = file::contain(|| -> u8 { panic!("page type byte {}", 7) });
    let msg = got.unwrap_err();
    assert!(msg.contains("page type byte 7"), "{msg}");
    assert!(msg.contains("tests.rs"), "{msg}");
    assert_eq!(file::contain(|| 5), Ok(5));
}

// ---- A full disk: fault injection through a redb storage backend. ----

/// A file backend that answers ENOSPC to every write and growth while `full` is set.
#[derive(Debug)]
struct FillableDisk {
    inner: redb::backends::FileBackend,
    full: Arc<AtomicBool>,
}

fn enospc() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOSPC)
}

impl redb::StorageBackend for FillableDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.full.load(SeqCst) && len > self.inner.len()? {
            return Err(enospc());
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.full.load(SeqCst) {
            return Err(enospc());
        }
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(
        &self,
        s: Bound<u64>,
        e: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

pub(crate) fn open_on_fillable_disk(path: &Path, full: Arc<AtomicBool>) -> RedbRegistry {
    let create = move |b: &redb::Builder, p: &Path| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)?;
        b.create_with_backend(FillableDisk {
            inner: redb::backends::FileBackend::new(f)?,
            full: full.clone(),
        })
    };
    RedbRegistry::open_with(path, Duration::from_secs(60), Arc::new(create)).unwrap()
}

/// After ENOSPC redb refuses every write until the database is reopened. The store reports
/// itself failing, acknowledges nothing it could not write, and once space returns reopens
/// by itself and writes back what memory holds (the heartbeat taken meanwhile included).
#[tokio::test]
async fn a_full_disk_fails_writes_until_space_returns_then_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let full = Arc::new(AtomicBool::new(false));
    let r = open_on_fillable_disk(&path, full.clone());
    r.register(input("a@llm", 1)).await.unwrap();
    r.register(input("b@llm", 1)).await.unwrap();
    assert_eq!(r.storage_failure(), None);

    full.store(true, SeqCst);
    let err = r.register(input("c@llm", 1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Storage(_)), "{err:?}");
    let why = r.storage_failure().expect("failing while the disk is full");
    assert!(r.describe().contains("failing"), "{}", r.describe());
    // Heartbeats of known instances are memory-only and keep working.
    tokio::time::sleep(Duration::from_millis(2)).await;
    r.heartbeat(input("a@llm", 1)).await.unwrap();
    let beat = r
        .read_mem()
        .get(&key("a@llm", "127.0.0.1", 1))
        .unwrap()
        .last_heartbeat;
    assert!(r.deregister(input("b@llm", 1)).await.is_err());
    // A flush tick tries to reopen: still full, still failing.
    assert!(r.flush().await.is_err());
    assert!(r.storage_failure().is_some(), "was: {why}");
    // Nothing unacknowledged reached memory.
    assert!(r.read_mem().get(&key("c@llm", "127.0.0.1", 1)).is_none());
    assert!(
        r.read_mem()
            .get(&key("b@llm", "127.0.0.1", 1))
            .unwrap()
            .healthy
    );

    full.store(false, SeqCst);
    r.flush().await.unwrap();
    assert_eq!(r.storage_failure(), None);
    r.register(input("c@llm", 1)).await.unwrap();
    drop(r);

    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    let mem = r.read_mem();
    let names: Vec<&str> = mem.iter().map(|i| i.key.model_name.as_str()).collect();
    assert_eq!(names, ["a@llm", "b@llm", "c@llm"]);
    assert_eq!(
        mem.get(&key("a@llm", "127.0.0.1", 1))
            .unwrap()
            .last_heartbeat,
        beat
    );
    assert!(mem.get(&key("b@llm", "127.0.0.1", 1)).unwrap().healthy);
}

/// Without a reopen nothing would recover: the next write also goes through one when the
/// failure is noticed by a write rather than by the flush tick.
#[tokio::test]
async fn the_first_write_after_space_returns_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let full = Arc::new(AtomicBool::new(false));
    let r = open_on_fillable_disk(&path, full.clone());
    r.register(input("a@llm", 1)).await.unwrap();
    full.store(true, SeqCst);
    assert!(r.register(input("b@llm", 1)).await.is_err());
    assert!(r.register(input("b@llm", 1)).await.is_err());
    full.store(false, SeqCst);
    r.register(input("b@llm", 1)).await.unwrap();
    assert_eq!(r.storage_failure(), None);
    let mut rm = input("a@llm", 1);
    rm.remove_from_registry = true;
    r.deregister(rm).await.unwrap();
    drop(r);
    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    let names = model_names(&r).await;
    assert_eq!(names, ["b@llm"]);
}
