//! The queue's order and shedding, the gate's deadline, cancellation and pauses, and
//! admission against a discovery view (hold, capacity, unknown models).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::controller::client::ControllerClient;
use crate::wire::controller::ModelInstance;

const I: Priority = Priority::Interactive;
const B: Priority = Priority::Batch;

#[test]
fn queue_orders_interactive_first_then_arrival() {
    let mut q = Queue::new(10);
    for (p, seq) in [(B, 1), (I, 2), (B, 3), (I, 4), (I, 5)] {
        assert_eq!(q.push((p, seq), seq), Push::Queued);
    }
    let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|(_, v)| v)).collect();
    assert_eq!(order, [2, 4, 5, 1, 3]);
}

#[test]
fn a_full_queue_sheds_the_newest_batch_request_first() {
    let mut q = Queue::new(3);
    q.push((I, 1), 1);
    q.push((B, 2), 2);
    q.push((B, 3), 3);
    // A batch request finds the queue full: it is shed itself.
    assert_eq!(q.push((B, 4), 4), Push::Full(4));
    // An interactive one evicts the newest batch request.
    assert_eq!(q.push((I, 5), 5), Push::Evicted((B, 3), 3));
    assert_eq!(q.push((I, 6), 6), Push::Evicted((B, 2), 2));
    // Only interactive requests left: the arriving one is shed.
    assert_eq!(q.push((I, 7), 7), Push::Full(7));
    assert_eq!(q.len(), 3);
    let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|(_, v)| v)).collect();
    assert_eq!(order, [1, 5, 6]);
    // No room at all: everything is shed.
    let mut q = Queue::new(0);
    assert_eq!(q.push((I, 1), 1), Push::Full(1));
}

fn wait(e: Entry) -> Waiting {
    match e {
        Entry::Wait(w) => w,
        Entry::In => panic!("admitted at once"),
        Entry::Shed => panic!("shed"),
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn releases_admit_waiters_in_priority_order() {
    let g = Gate::new("m@llm", 10);
    let mut p = None;
    assert!(matches!(g.enter(1, I, &mut p).0, Entry::In));
    let mut waiters = Vec::new();
    for (name, prio) in [("b1", B), ("i1", I), ("b2", B), ("i2", I)] {
        let mut place = None;
        let w = wait(g.enter(1, prio, &mut place).0);
        waiters.push((name, tokio::spawn(w.until(soon()))));
    }
    assert_eq!((g.depth(), g.active()), (4, 1));
    let mut order = Vec::new();
    for _ in 0..4 {
        g.release();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let done: Vec<usize> = waiters
            .iter()
            .enumerate()
            .filter(|(_, (_, h))| h.is_finished())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(done.len(), 1, "one admitted per release");
        let (name, h) = waiters.remove(done[0]);
        assert_eq!(h.await.unwrap(), Ok(()));
        order.push(name);
        assert_eq!(g.active(), 1);
    }
    assert_eq!(order, ["i1", "i2", "b1", "b2"]);
    g.release();
    assert_eq!((g.depth(), g.active()), (0, 0));
}

#[tokio::test]
async fn a_wait_expires_at_its_deadline_and_leaves_the_queue() {
    let g = Gate::new("m@llm", 10);
    assert!(matches!(g.enter(1, I, &mut None).0, Entry::In));
    let w = wait(g.enter(1, I, &mut None).0);
    let start = Instant::now();
    let r = w.until(Instant::now() + Duration::from_millis(150)).await;
    assert_eq!(r, Err(Refused::Expired));
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!((g.depth(), g.active()), (0, 1));
    // The freed slot is not given to the one that left.
    g.release();
    assert_eq!(g.active(), 0);
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_the_queue_and_gives_back_its_slot() {
    let g = Gate::new("m@llm", 10);
    assert!(matches!(g.enter(1, I, &mut None).0, Entry::In));
    // Waiting, then dropped (the handler future is dropped with the connection).
    let w = wait(g.enter(1, I, &mut None).0);
    let h = tokio::spawn(w.until(soon()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(g.depth(), 1);
    h.abort();
    let _ = h.await;
    assert_eq!(g.depth(), 0);
    // Admitted just before it went away: the slot goes on to the next waiter.
    let gone = wait(g.enter(1, I, &mut None).0);
    let next = wait(g.enter(1, I, &mut None).0);
    g.release();
    assert_eq!(g.active(), 1, "the slot was granted to the first waiter");
    drop(gone);
    assert_eq!(next.until(soon()).await, Ok(()));
    assert_eq!((g.depth(), g.active()), (0, 1));
}

#[tokio::test]
async fn an_evicted_batch_waiter_is_told_it_was_shed() {
    let g = Gate::new("m@llm", 1);
    assert!(matches!(g.enter(1, I, &mut None).0, Entry::In));
    let batch = wait(g.enter(1, B, &mut None).0);
    let (e, evicted) = g.enter(1, I, &mut None);
    assert_eq!(evicted, 1);
    let interactive = wait(e);
    assert_eq!(batch.until(soon()).await, Err(Refused::Shed));
    // Full of interactive requests: a batch one is shed on arrival.
    assert!(matches!(g.enter(1, B, &mut None).0, Entry::Shed));
    g.release();
    assert_eq!(interactive.until(soon()).await, Ok(()));
}

#[tokio::test]
async fn after_an_overloaded_answer_waiters_retry_one_per_free_slot() {
    let g = Gate::new("m@llm", 10);
    let mut place = None;
    assert!(matches!(g.enter(usize::MAX, I, &mut place).0, Entry::In));
    assert!(matches!(g.enter(usize::MAX, I, &mut None).0, Entry::In));
    // The first found every instance overloaded: it gives up its slot and waits again
    // (keeping its place), with the gate paused.
    g.release_paused(Duration::from_millis(200));
    let h = tokio::spawn(wait(g.enter(usize::MAX, I, &mut place).0).until(soon()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.retune(usize::MAX);
    assert!(!h.is_finished(), "paused");
    // The pause is over, but the instances took one request then, and it still runs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.retune(usize::MAX);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!h.is_finished(), "no free slot");
    // It finishes: the waiter goes.
    g.release();
    assert_eq!(h.await.unwrap(), Ok(()));
    assert_eq!(g.active(), 1);
    // The queue drained: no bound any more.
    assert!(matches!(g.enter(usize::MAX, I, &mut None).0, Entry::In));
    g.release();
    // Alone: the pause ends on the tick after it is over.
    g.release_paused(Duration::from_millis(150));
    let mut place = None;
    let w = wait(g.enter(usize::MAX, I, &mut place).0);
    let start = Instant::now();
    let h = tokio::spawn(w.until(soon()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.retune(usize::MAX);
    assert_eq!(h.await.unwrap(), Ok(()));
    assert!(start.elapsed() >= Duration::from_millis(150));
    // A request that finishes ends a pause at once (one still runs here).
    assert!(matches!(g.enter(usize::MAX, I, &mut None).0, Entry::In));
    g.release_paused(Duration::from_secs(60));
    let w = wait(g.enter(usize::MAX, I, &mut None).0);
    assert_eq!(g.active(), 1);
    g.release();
    assert_eq!(w.until(soon()).await, Ok(()));
}

// Admission against a discovery view.

fn inst(name: &str, port: u16, healthy: bool) -> ModelInstance {
    ModelInstance {
        model_name: name.into(),
        host: "127.0.0.1".into(),
        port,
        weight: Some(1.0),
        check_healthy: Some(true),
        healthy: Some(healthy),
        enabled: Some(true),
        prompt_template: None,
        last_heartbeat: None,
    }
}

fn upstream() -> Upstream {
    // No controller answers: a miss's refresh fails at once and the view stays as set.
    let client = ControllerClient::new("http://127.0.0.1:1", Duration::from_secs(1)).unwrap();
    Upstream {
        http: crate::apiserver::proxy::worker_client(),
        discovery: Arc::new(Discovery::new(client)),
        policy: Default::default(),
        max_retries: 0,
        timeout: Duration::from_secs(1),
        first_byte_timeout: Duration::from_secs(1),
        metrics: Arc::new(crate::telemetry::metrics::apiserver::ApiMetrics::new()),
    }
}

/// The answer a refusal becomes.
fn answer(r: Refusal) -> OpenAiError {
    match r {
        Refusal::Upstream(e) => e.into(),
        Refusal::Answer(e) => e,
    }
}

/// The answer to an interactive request that may wait, which `a` must refuse.
async fn refused(a: &Admission, up: &Upstream, model: (&str, WorkerType)) -> OpenAiError {
    a.admit(up, model, I, true)
        .await
        .err()
        .map(answer)
        .expect("the request was admitted")
}

fn admission(s: Settings) -> Arc<Admission> {
    let client = ControllerClient::new("http://127.0.0.1:1", Duration::from_secs(1)).unwrap();
    Arc::new(Admission::new(s, wake::Waker::new(client).unwrap()))
}

#[tokio::test]
async fn instances_at_their_limit_queue_requests_until_one_finishes() {
    let up = upstream();
    up.discovery
        .install(vec![inst("m@llm", 1, true), inst("m@llm", 2, true)]);
    let a = admission(Settings {
        max_instance_concurrency: 1,
        queue_timeout: Duration::from_secs(5),
        ..Default::default()
    });
    let (_, t1) = a.admit(&up, ("m", WorkerType::Llm), I, true).await.unwrap();
    let (_, t2) = a.admit(&up, ("m", WorkerType::Llm), I, true).await.unwrap();
    // Two instances at one request each: the third waits.
    let (a2, up2) = (a.clone(), up.clone());
    let third = tokio::spawn(async move { a2.admit(&up2, ("m", WorkerType::Llm), B, true).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!third.is_finished());
    assert_eq!(a.depths(), [("m@llm".to_string(), 1)]);
    assert_eq!(a.status_details()[0], ("queued".into(), "1".into()));
    drop(t1);
    let (_, t3) = third.await.unwrap().unwrap();
    assert_eq!(a.depths(), []);
    drop((t2, t3));
    assert_eq!(a.gate("m@llm").active(), 0);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let up = upstream();
    up.discovery.install(vec![inst("m@llm", 1, true)]);
    let a = admission(Settings {
        max_instance_concurrency: 1,
        max_queue: 0,
        ..Default::default()
    });
    let _t = a.admit(&up, ("m", WorkerType::Llm), I, true).await.unwrap();
    let e = refused(&a, &up, ("m", WorkerType::Llm)).await;
    assert_eq!(e.status, 503);
    assert_eq!(e.code, Some("model_overloaded"));
    assert_eq!(e.retry_after, Some(RETRY_AFTER_SECS));
    assert!(e.message.contains("queue is full"), "{}", e.message);
}

#[tokio::test]
async fn a_queued_request_expires_with_model_overloaded() {
    let up = upstream();
    up.discovery.install(vec![inst("m@llm", 1, true)]);
    let a = admission(Settings {
        max_instance_concurrency: 1,
        queue_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let _t = a.admit(&up, ("m", WorkerType::Llm), I, true).await.unwrap();
    let start = Instant::now();
    let e = refused(&a, &up, ("m", WorkerType::Llm)).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!((e.status.as_u16(), e.code), (503, Some("model_overloaded")));
    assert_eq!(e.retry_after, Some(RETRY_AFTER_SECS));
}

#[tokio::test]
async fn a_known_model_without_instances_holds_until_one_appears() {
    let up = upstream();
    up.discovery.install(vec![inst("m@llm", 1, false)]);
    let a = admission(Settings {
        queue_timeout: Duration::from_secs(5),
        ..Default::default()
    });
    let (a2, up2) = (a.clone(), up.clone());
    let held = tokio::spawn(async move { a2.admit(&up2, ("m", WorkerType::Llm), I, true).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!held.is_finished());
    up.discovery.install(vec![inst("m@llm", 1, true)]);
    a.tick(&up.discovery);
    let (g, _t) = held.await.unwrap().unwrap();
    assert_eq!(g.instances.len(), 1);
}

#[tokio::test]
async fn a_hold_expires_as_no_healthy_instance_and_unknown_models_stay_404() {
    let up = upstream();
    up.discovery.install(vec![inst("m@llm", 1, false)]);
    let a = admission(Settings {
        queue_timeout: Duration::from_millis(150),
        wake_models: vec!["configured".into()],
        ..Default::default()
    });
    let e = refused(&a, &up, ("m", WorkerType::Llm)).await;
    assert_eq!(
        (e.status.as_u16(), e.code),
        (503, Some("no_healthy_instance"))
    );
    assert_eq!(e.retry_after, Some(RETRY_AFTER_SECS));
    assert!(e.message.contains("no healthy instance"), "{}", e.message);
    // Never known: 404 at once.
    let start = Instant::now();
    let e = refused(&a, &up, ("never", WorkerType::Llm)).await;
    assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
    assert!(start.elapsed() < Duration::from_millis(150));
    // Configured, or seen in the view before: held.
    let e = refused(&a, &up, ("configured", WorkerType::Llm)).await;
    assert_eq!(e.code, Some("no_healthy_instance"));
    up.discovery.install(vec![inst("seen@llm", 1, true)]);
    a.learn(&up.discovery);
    up.discovery.install(vec![]);
    let e = refused(&a, &up, ("seen", WorkerType::Llm)).await;
    assert_eq!(e.code, Some("no_healthy_instance"));
    // Another worker type of a seen name was never seen.
    let e = refused(&a, &up, ("seen", WorkerType::Text2vec)).await;
    assert_eq!(e.status, 404);
}

#[tokio::test]
async fn waiting_off_answers_at_once() {
    let up = upstream();
    up.discovery
        .install(vec![inst("m@llm", 1, true), inst("down@llm", 2, false)]);
    let a = admission(Settings {
        queue_timeout: Duration::ZERO,
        max_instance_concurrency: 1,
        ..Default::default()
    });
    let e = refused(&a, &up, ("down", WorkerType::Llm)).await;
    assert_eq!(
        (e.status.as_u16(), e.code),
        (503, Some("no_healthy_instance"))
    );
    assert_eq!(e.retry_after, None, "today's answer, unchanged");
    let _t = a.admit(&up, ("m", WorkerType::Llm), I, true).await.unwrap();
    let start = Instant::now();
    let e = refused(&a, &up, ("m", WorkerType::Llm)).await;
    assert_eq!(e.code, Some("model_overloaded"));
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[tokio::test]
async fn an_idle_gate_quiesces_and_holds_arrivals_while_its_model_stops() {
    let g = Gate::new("m@llm", 10);
    assert!(matches!(g.enter(usize::MAX, I, &mut None).0, Entry::In));
    assert!(!g.quiesce(Duration::ZERO, Duration::from_secs(60)), "busy");
    g.release();
    assert!(
        !g.quiesce(Duration::from_secs(60), Duration::from_secs(60)),
        "not idle long"
    );
    assert!(g.quiesce(Duration::ZERO, Duration::from_millis(100)));
    // An arrival waits out the hold.
    let w = wait(g.enter(usize::MAX, I, &mut None).0);
    let h = tokio::spawn(w.until(soon()));
    tokio::time::sleep(Duration::from_millis(150)).await;
    g.retune(usize::MAX);
    assert_eq!(h.await.unwrap(), Ok(()));
}

#[tokio::test]
async fn a_model_that_may_not_wait_is_refused_at_once_for_the_next_of_its_chain() {
    let up = upstream();
    up.discovery
        .install(vec![inst("m@llm", 1, true), inst("down@llm", 2, false)]);
    let a = admission(Settings {
        max_instance_concurrency: 1,
        ..Default::default()
    });
    let _t = a
        .admit(&up, ("m", WorkerType::Llm), I, false)
        .await
        .unwrap();
    let start = Instant::now();
    let r = a
        .admit(&up, ("m", WorkerType::Llm), I, false)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(r, Refusal::Upstream(UpstreamError::Overloaded { .. })),
        "{r:?}"
    );
    let r = a
        .admit(&up, ("down", WorkerType::Llm), I, false)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(r, Refusal::Upstream(UpstreamError::NoneRoutable { .. })),
        "{r:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(a.depths(), []);
}
