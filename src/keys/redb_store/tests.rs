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
