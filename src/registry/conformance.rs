//! The registry conformance suite: DB-GPT's registry semantics (reference §4.1) written once
//! as async checks over a [`Factory`], run against every store (redb here; MySQL/MariaDB
//! and PostgreSQL in `sql::tests`), so the stores cannot drift apart.

use std::time::Duration;

use async_trait::async_trait;

use super::{Counts, Registry};
use crate::wire::controller::{InstanceInput, ModelInstance};

/// Opens the store under test; a second `open` after the first is dropped must see the
/// same data (persistence).
#[async_trait]
pub trait Factory: Send + Sync {
    async fn open(&self, heartbeat_timeout: Duration) -> Box<dyn Registry>;
}

pub fn input(name: &str, port: u16) -> InstanceInput {
    InstanceInput {
        model_name: name.into(),
        host: "127.0.0.1".into(),
        port,
        weight: Some(1.0),
        check_healthy: Some(true),
        enabled: Some(true),
        prompt_template: None,
        remove_from_registry: false,
    }
}

fn summary(l: &[ModelInstance]) -> Vec<(String, u16, bool)> {
    l.iter()
        .map(|i| (i.model_name.clone(), i.port, i.healthy.unwrap()))
        .collect()
}

fn s(name: &str, port: u16, healthy: bool) -> (String, u16, bool) {
    (name.into(), port, healthy)
}

/// Runs every check (each on fresh data: the factory must give an empty store first).
pub async fn run_all(f: &dyn Factory) {
    order_reregister_and_persistence(f).await;
    deregister_removal_and_heartbeat(f).await;
    expiry(f).await;
}

/// Insertion order, upsert keeping `enabled`/`check_healthy`, persistence across reopen.
async fn order_reregister_and_persistence(f: &dyn Factory) {
    let t = Duration::from_secs(60);
    {
        let r = f.open(t).await;
        assert!(
            r.list(None, false).await.unwrap().is_empty(),
            "store not empty"
        );
        r.register(input("b@llm", 2)).await.unwrap();
        r.register(input("a@llm", 1)).await.unwrap();
        r.register(input("b@llm", 1)).await.unwrap();
        // Re-register: weight and prompt template change, enabled/check_healthy stay.
        let mut again = input("b@llm", 2);
        again.weight = Some(3.0);
        again.prompt_template = Some("vicuna".into());
        again.enabled = Some(false);
        again.check_healthy = Some(false);
        r.register(again).await.unwrap();
        let l = r.list(None, false).await.unwrap();
        assert_eq!(
            summary(&l),
            [
                s("b@llm", 2, true),
                s("b@llm", 1, true),
                s("a@llm", 1, true)
            ]
        );
        assert_eq!(l[0].weight, Some(3.0));
        assert_eq!(l[0].prompt_template.as_deref(), Some("vicuna"));
        assert_eq!(l[0].enabled, Some(true));
        assert_eq!(l[0].check_healthy, Some(true));
        assert!(l[0].last_heartbeat.is_some());
        // Filters.
        assert_eq!(r.list(Some("a@llm"), false).await.unwrap().len(), 1);
        assert!(r.list(Some("zzz@llm"), false).await.unwrap().is_empty());
        r.deregister(input("a@llm", 1)).await.unwrap();
        assert_eq!(
            summary(&r.list(None, true).await.unwrap()),
            [s("b@llm", 2, true), s("b@llm", 1, true)]
        );
        assert_eq!(
            r.counts(),
            Counts {
                healthy: 2,
                total: 3
            }
        );
        r.flush().await.unwrap();
    }
    let r = f.open(t).await;
    assert_eq!(
        summary(&r.list(None, false).await.unwrap()),
        [
            s("b@llm", 2, true),
            s("b@llm", 1, true),
            s("a@llm", 1, false)
        ]
    );
    assert_eq!(
        r.counts(),
        Counts {
            healthy: 2,
            total: 3
        }
    );
    // Clean up for the next check.
    for (m, p) in [("b@llm", 2), ("b@llm", 1), ("a@llm", 1)] {
        let mut rm = input(m, p);
        rm.remove_from_registry = true;
        r.deregister(rm).await.unwrap();
    }
    assert!(r.list(None, false).await.unwrap().is_empty());
}

/// Soft deregister, removal, heartbeat of unknown = register, heartbeat revives, flush.
async fn deregister_removal_and_heartbeat(f: &dyn Factory) {
    let t = Duration::from_secs(60);
    {
        let r = f.open(t).await;
        r.heartbeat(input("x@llm", 9)).await.unwrap();
        assert_eq!(
            summary(&r.list(None, false).await.unwrap()),
            [s("x@llm", 9, true)]
        );
        r.register(input("y@llm", 9)).await.unwrap();
        let mut rm = input("y@llm", 9);
        rm.remove_from_registry = true;
        r.deregister(rm).await.unwrap();
        let mut rm = input("nope@llm", 1);
        rm.remove_from_registry = true;
        r.deregister(rm).await.unwrap();
        r.deregister(input("nope@llm", 2)).await.unwrap();
        // A heartbeat before a deregister does not revive it; one after does.
        r.heartbeat(input("x@llm", 9)).await.unwrap();
        r.deregister(input("x@llm", 9)).await.unwrap();
        r.flush().await.unwrap();
        assert_eq!(
            summary(&r.list(None, false).await.unwrap()),
            [s("x@llm", 9, false)]
        );
        let before = r.list(None, false).await.unwrap()[0].last_heartbeat.clone();
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.heartbeat(input("x@llm", 9)).await.unwrap();
        r.flush().await.unwrap();
        let l = r.list(None, false).await.unwrap();
        assert_eq!(summary(&l), [s("x@llm", 9, true)]);
        assert_ne!(l[0].last_heartbeat, before);
    }
    let r = f.open(t).await;
    let l = r.list(None, false).await.unwrap();
    assert_eq!(summary(&l), [s("x@llm", 9, true)]);
    let mut rm = input("x@llm", 9);
    rm.remove_from_registry = true;
    r.deregister(rm).await.unwrap();
}

/// Derived health, the sweep's count, unchecked instances never expire, heartbeat revives.
async fn expiry(f: &dyn Factory) {
    let r = f.open(Duration::from_millis(1500)).await;
    r.register(input("a@llm", 1)).await.unwrap();
    let mut unchecked = input("b@llm", 1);
    unchecked.check_healthy = Some(false);
    r.register(unchecked).await.unwrap();
    assert_eq!(r.list(None, true).await.unwrap().len(), 2);
    assert_eq!(r.expire().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Reported unhealthy at once (derived), before any sweep.
    let healthy = r.list(None, true).await.unwrap();
    assert_eq!(summary(&healthy), [s("b@llm", 1, true)]);
    assert_eq!(r.counts().healthy, 1);
    assert_eq!(r.expire().await.unwrap(), 1);
    assert_eq!(r.expire().await.unwrap(), 0);
    r.heartbeat(input("a@llm", 1)).await.unwrap();
    assert_eq!(r.list(None, true).await.unwrap().len(), 2);
    r.flush().await.unwrap();
    assert_eq!(r.expire().await.unwrap(), 0);
    for (m, p) in [("a@llm", 1), ("b@llm", 1)] {
        let mut rm = input(m, p);
        rm.remove_from_registry = true;
        r.deregister(rm).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RedbRegistry;

    struct Redb(std::path::PathBuf);

    #[async_trait]
    impl Factory for Redb {
        async fn open(&self, t: Duration) -> Box<dyn Registry> {
            Box::new(RedbRegistry::open(&self.0, t).unwrap())
        }
    }

    #[tokio::test]
    async fn redb_conforms() {
        let dir = tempfile::tempdir().unwrap();
        run_all(&Redb(dir.path().join("r.redb"))).await;
    }
}
