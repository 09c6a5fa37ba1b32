use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::keys::conformance::{self, Factory};
use crate::registry::Registry;
use crate::registry::redb_store::tests::{V010, data};

struct RedbFactory {
    path: PathBuf,
}

#[async_trait]
impl Factory for RedbFactory {
    async fn open(&self) -> Box<dyn KeyStore> {
        let r = RedbRegistry::open(&self.path, Duration::from_secs(60)).unwrap();
        Box::new(RedbKeyStore::new(Arc::new(r)))
    }
}

#[tokio::test]
async fn conformance() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(&RedbFactory {
        path: dir.path().join("r.redb"),
    })
    .await;
}

/// A registry file written before managed keys existed (the first release's, without the
/// key tables) opens as it is: no keys, no usage; the first key write creates the tables
/// and leaves every instance where it was.
#[tokio::test]
async fn a_registry_file_from_before_keys_opens_and_takes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(V010);
    std::fs::copy(data(V010), &path).unwrap();
    {
        let r = Arc::new(RedbRegistry::open(&path, Duration::from_secs(60)).unwrap());
        let keys = RedbKeyStore::new(r.clone());
        assert!(keys.list().await.unwrap().is_empty());
        assert!(matches!(
            keys.get("team-a").await,
            Err(KeyError::NotFound(_))
        ));
        assert!(keys.usage(None, None).await.unwrap().is_empty());
        let created = keys
            .create(KeySpec {
                name: "team-a".into(),
                ..KeySpec::default()
            })
            .await
            .unwrap();
        assert_eq!(created.key.version, 1);
        assert_eq!(r.list(None, false).await.unwrap().len(), 6);
    }
    let r = Arc::new(RedbRegistry::open(&path, Duration::from_secs(60)).unwrap());
    assert_eq!(r.list(None, false).await.unwrap().len(), 6);
    let keys = RedbKeyStore::new(r);
    assert_eq!(keys.list().await.unwrap().len(), 1);
}

/// A sync on a fresh file (no key tables yet) answers nothing changed.
#[tokio::test]
async fn a_sync_on_an_empty_file_answers_version_zero() {
    let dir = tempfile::tempdir().unwrap();
    let r =
        Arc::new(RedbRegistry::open(&dir.path().join("r.redb"), Duration::from_secs(60)).unwrap());
    let keys = RedbKeyStore::new(r);
    let answer = keys
        .sync(
            &SyncRequest {
                apiserver: "a".into(),
                since_version: 0,
                usage: vec![],
                minute: vec![],
            },
            super::super::now_secs(),
        )
        .await
        .unwrap();
    assert_eq!(answer.version, 0);
    assert!(answer.keys.is_empty() && answer.minute.is_empty() && answer.daily_tokens.is_empty());
}

/// On a full disk key writes and usage reports fail with a storage error and change
/// nothing (the registry reports itself failing, as for its own writes); once space
/// returns the next write reopens the file and everything acknowledged is there.
#[tokio::test]
async fn a_full_disk_fails_key_writes_without_changing_anything() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use crate::registry::redb_store::tests::open_on_fillable_disk;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let full = Arc::new(AtomicBool::new(false));
    let now = super::super::now_secs();
    let today = super::super::day_of(now);
    let report = |id: &str| SyncRequest {
        apiserver: "a".into(),
        since_version: 0,
        usage: vec![UsageRow {
            key_id: id.into(),
            key_name: String::new(),
            model: "m".into(),
            day: today.clone(),
            requests: 1,
            prompt_tokens: 2,
            completion_tokens: 3,
        }],
        minute: vec![],
    };
    let spec = |n: &str| KeySpec {
        name: n.into(),
        ..KeySpec::default()
    };
    let id = {
        let r = Arc::new(open_on_fillable_disk(&path, full.clone()));
        let keys = RedbKeyStore::new(r.clone());
        let a = keys.create(spec("a")).await.unwrap().key;
        keys.sync(&report(&a.id), now).await.unwrap();

        full.store(true, SeqCst);
        assert!(matches!(
            keys.create(spec("b")).await,
            Err(KeyError::Storage(_))
        ));
        assert!(matches!(keys.revoke("a").await, Err(KeyError::Storage(_))));
        assert!(matches!(
            keys.sync(&report(&a.id), now).await,
            Err(KeyError::Storage(_))
        ));
        assert!(r.storage_failure().is_some());

        full.store(false, SeqCst);
        let c = keys.create(spec("c")).await.unwrap().key;
        assert_eq!(c.version, 2, "the failed writes took no version");
        assert_eq!(r.storage_failure(), None);
        a.id
    };
    let r = Arc::new(RedbRegistry::open(&path, Duration::from_secs(60)).unwrap());
    let keys = RedbKeyStore::new(r);
    let names: Vec<String> = keys
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.spec.name)
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert!(keys.get("a").await.unwrap().revoked_at.is_none());
    let usage = keys.usage(Some(&id), None).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].requests, 1, "only the acknowledged report counts");
}
