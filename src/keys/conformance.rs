//! The key store conformance suite: written once over a [`Factory`], run against every
//! store (redb in `redb_store::tests`; MariaDB and PostgreSQL in `sql::tests`), so the
//! stores cannot drift apart.

use async_trait::async_trait;

use super::{KeyError, KeyStore, day_of, minute_of, now_secs};
use crate::wire::keys::{
    KeySpec, KeyUpdate, Limits, MinuteCount, Priority, SyncRequest, UsageRow, key_matches,
};

/// Opens the store under test; a second `open` after the first is dropped must see the
/// same data (persistence). The first open gives an empty store.
#[async_trait]
pub trait Factory: Send + Sync {
    async fn open(&self) -> Box<dyn KeyStore>;
}

/// Runs every check, in order, on one store.
pub async fn run_all(f: &dyn Factory) {
    keys_lifecycle_and_persistence(f).await;
    sync_adds_usage_and_minutes(f).await;
    an_expired_key_can_still_be_changed(f).await;
}

fn spec(name: &str) -> KeySpec {
    KeySpec {
        name: name.into(),
        ..KeySpec::default()
    }
}

fn usage(key_id: &str, model: &str, day: &str, r: u64, p: u64, c: u64) -> UsageRow {
    UsageRow {
        key_id: key_id.into(),
        key_name: String::new(),
        model: model.into(),
        day: day.into(),
        requests: r,
        prompt_tokens: p,
        completion_tokens: c,
    }
}

fn sync_req(since: u64, usage: Vec<UsageRow>, minute: Vec<MinuteCount>) -> SyncRequest {
    SyncRequest {
        apiserver: "test:1/1".into(),
        since_version: since,
        usage,
        minute,
    }
}

async fn keys_lifecycle_and_persistence(f: &dyn Factory) {
    let (a_id, b_id, a_hash, secret);
    {
        let s = f.open().await;
        assert!(s.list().await.unwrap().is_empty(), "store not empty");
        let mut a = spec("team-a");
        a.models = Some(vec!["m1".into(), "m2".into()]);
        a.limits = Limits {
            rpm: Some(60),
            tpm: Some(1000),
            max_concurrency: Some(2),
            daily_tokens: Some(100_000),
        };
        a.priority = Priority::Batch;
        a.expires_at = Some(now_secs() + 3600);
        let created = s.create(a.clone()).await.unwrap();
        assert_eq!(created.key.spec, a);
        assert!(key_matches(&created.key, &created.secret));
        assert_eq!(created.key.version, 1);
        secret = created.secret.clone();
        a_id = created.key.id.clone();
        a_hash = created.key.hash.clone();

        let b = s.create(spec("team-b")).await.unwrap().key;
        assert!(b.version > created.key.version);
        b_id = b.id.clone();

        match s.create(spec("team-a")).await {
            Err(KeyError::NameTaken(n)) => assert_eq!(n, "team-a"),
            other => panic!("{other:?}"),
        }
        // Names are case-sensitive.
        s.create(spec("TEAM-A")).await.unwrap();
        match s.create(spec("bad name")).await {
            Err(KeyError::Invalid { field, .. }) => assert_eq!(field, "name"),
            other => panic!("{other:?}"),
        }

        let names: Vec<_> = s
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.spec.name)
            .collect();
        assert_eq!(names, ["TEAM-A", "team-a", "team-b"]);
        assert_eq!(s.get("team-a").await.unwrap().id, a_id);
        assert_eq!(s.get(&a_id).await.unwrap().spec.name, "team-a");
        match s.get("nobody").await {
            Err(KeyError::NotFound(n)) => assert_eq!(n, "nobody"),
            other => panic!("{other:?}"),
        }

        let before = s.get("team-a").await.unwrap();
        let updated = s
            .update(
                "team-a",
                KeyUpdate {
                    rpm: Some(None),
                    tpm: Some(Some(5)),
                    priority: Some(Priority::Interactive),
                    ..KeyUpdate::default()
                },
            )
            .await
            .unwrap();
        assert!(updated.version > before.version);
        assert_eq!(updated.spec.limits.rpm, None);
        assert_eq!(updated.spec.limits.tpm, Some(5));
        assert_eq!(updated.spec.limits.daily_tokens, Some(100_000));
        assert_eq!(updated.hash, a_hash);

        // A rejected update changes nothing, the version included.
        let bad = s
            .update(
                "team-a",
                KeyUpdate {
                    rpm: Some(Some(0)),
                    ..KeyUpdate::default()
                },
            )
            .await;
        assert!(
            matches!(&bad, Err(KeyError::Invalid { field, .. }) if field == "rpm"),
            "{bad:?}"
        );
        assert_eq!(s.get("team-a").await.unwrap(), updated);
        assert!(matches!(
            s.update("nobody", KeyUpdate::default()).await,
            Err(KeyError::NotFound(_))
        ));

        let revoked = s.revoke(&b_id).await.unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(revoked.version > updated.version);
        // Revoking again changes nothing.
        assert_eq!(s.revoke("team-b").await.unwrap(), revoked);
        assert!(matches!(
            s.revoke("nobody").await,
            Err(KeyError::NotFound(_))
        ));
        // A revoked key keeps its name.
        assert!(matches!(
            s.create(spec("team-b")).await,
            Err(KeyError::NameTaken(_))
        ));
    }
    let s = f.open().await;
    let a = s.get("team-a").await.unwrap();
    assert_eq!(a.id, a_id);
    assert!(key_matches(&a, &secret));
    assert_eq!(a.spec.limits.tpm, Some(5));
    assert!(s.get("team-b").await.unwrap().revoked_at.is_some());
    // Versions keep growing after a reopen.
    let c = s.create(spec("team-c")).await.unwrap().key;
    let max = s.list().await.unwrap().iter().map(|k| k.version).max();
    assert_eq!(max, Some(c.version));
    assert!(c.version >= 6, "{}", c.version);
}

async fn sync_adds_usage_and_minutes(f: &dyn Factory) {
    let now = now_secs();
    let today = day_of(now);
    let min = minute_of(now);
    let (a, b);
    {
        let s = f.open().await;
        // Everything from version 0.
        let all = s.sync(&sync_req(0, vec![], vec![]), now).await.unwrap();
        assert_eq!(all.keys.len(), 4);
        assert_eq!(
            all.version,
            all.keys.iter().map(|k| k.version).max().unwrap()
        );
        a = s.get("team-a").await.unwrap().id;
        b = s.get("team-b").await.unwrap().id;
        // Nothing changed since: no keys.
        let none = s
            .sync(&sync_req(all.version, vec![], vec![]), now)
            .await
            .unwrap();
        assert!(none.keys.is_empty());
        assert_eq!(none.version, all.version);

        let first = s
            .sync(
                &sync_req(
                    all.version,
                    vec![
                        usage(&a, "m1", &today, 2, 10, 20),
                        usage(&a, "m1", "2020-01-01", 1, 1, 1),
                        usage(&b, "m2", &today, 1, 5, 5),
                    ],
                    vec![
                        MinuteCount {
                            key_id: a.clone(),
                            model: String::new(),
                            minute: min,
                            requests: 2,
                            tokens: 30,
                        },
                        // Too old: pruned, never answered.
                        MinuteCount {
                            key_id: a.clone(),
                            model: String::new(),
                            minute: min - 30,
                            requests: 9,
                            tokens: 9,
                        },
                    ],
                ),
                now,
            )
            .await
            .unwrap();
        assert_eq!(first.daily_tokens.get(&a), Some(&30));
        assert_eq!(first.daily_tokens.get(&b), Some(&10));
        assert_eq!(first.minute.len(), 1, "{:?}", first.minute);
        assert_eq!((first.minute[0].requests, first.minute[0].tokens), (2, 30));

        // A second apiserver's report adds to the first's.
        let second = s
            .sync(
                &sync_req(
                    all.version,
                    vec![usage(&a, "m1", &today, 1, 3, 4)],
                    vec![
                        MinuteCount {
                            key_id: a.clone(),
                            model: String::new(),
                            minute: min,
                            requests: 1,
                            tokens: 7,
                        },
                        MinuteCount {
                            key_id: a.clone(),
                            model: "m1".into(),
                            minute: min - 1,
                            requests: 1,
                            tokens: 7,
                        },
                    ],
                ),
                now,
            )
            .await
            .unwrap();
        assert_eq!(second.daily_tokens.get(&a), Some(&37));
        let mut m: Vec<_> = second
            .minute
            .iter()
            .map(|c| (c.model.as_str(), c.minute, c.requests, c.tokens))
            .collect();
        m.sort();
        assert_eq!(m, [("", min, 3, 37), ("m1", min - 1, 1, 7)]);

        // A changed key comes back, and only it.
        s.update(
            "team-b",
            KeyUpdate {
                rpm: Some(Some(9)),
                ..KeyUpdate::default()
            },
        )
        .await
        .unwrap();
        let changed = s
            .sync(&sync_req(second.version, vec![], vec![]), now)
            .await
            .unwrap();
        assert_eq!(changed.keys.len(), 1);
        assert_eq!(changed.keys[0].id, b);
        assert!(changed.version > second.version);

        // Bad reports are refused whole.
        let bad = s
            .sync(
                &sync_req(0, vec![usage(&a, "m1", "2020-13-01", 1, 1, 1)], vec![]),
                now,
            )
            .await;
        assert!(
            matches!(&bad, Err(KeyError::Invalid { field, .. }) if field == "usage[0].day"),
            "{bad:?}"
        );
    }
    let s = f.open().await;
    let rows = s.usage(None, None).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.key_id.as_str(),
                r.model.as_str(),
                r.day.as_str(),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect();
    let mut want = vec![
        (a.as_str(), "m1", "2020-01-01", 1, 1, 1),
        (a.as_str(), "m1", today.as_str(), 3, 13, 24),
        (b.as_str(), "m2", today.as_str(), 1, 5, 5),
    ];
    want.sort();
    assert_eq!(got, want);
    let only_a_recent = s.usage(Some(a.as_str()), Some("2021-01-01")).await.unwrap();
    assert_eq!(only_a_recent.len(), 1);
    assert_eq!(only_a_recent[0].day, today);
    assert!(s.usage(Some("nobody"), None).await.unwrap().is_empty());
}

/// An expired key's settings can be changed (its expiry is checked only when set), and
/// it can be given a new expiry in the future, not one in the past.
async fn an_expired_key_can_still_be_changed(f: &dyn Factory) {
    let s = f.open().await;
    let mut spec = spec("short-lived");
    spec.expires_at = Some(now_secs() + 1);
    s.create(spec).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let k = s
        .update(
            "short-lived",
            KeyUpdate {
                rpm: Some(Some(3)),
                ..KeyUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(k.spec.limits.rpm, Some(3));
    let past = s
        .update(
            "short-lived",
            KeyUpdate {
                expires_at: Some(Some(now_secs() - 10)),
                ..KeyUpdate::default()
            },
        )
        .await;
    assert!(
        matches!(&past, Err(KeyError::Invalid { field, .. }) if field == "expires_at"),
        "{past:?}"
    );
    let renewed = s
        .update(
            "short-lived",
            KeyUpdate {
                expires_at: Some(Some(now_secs() + 3600)),
                ..KeyUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(super::state(&renewed, now_secs()), "active");
}
