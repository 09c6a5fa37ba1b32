use std::sync::{Arc, Mutex};

use super::*;

/// Doubles its items; records each pass; the first pass waits until `gate` opens so that
/// requests queue up behind it. An item `u32::MAX` fails its pass.
struct Doubler {
    passes: Arc<Mutex<Vec<Vec<u32>>>>,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl BatchModel for Doubler {
    type Item = u32;
    type Output = u32;
    fn run(&self, items: &[&u32]) -> Result<Vec<u32>, BackendError> {
        {
            let (open, cv) = &*self.gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        self.passes
            .lock()
            .unwrap()
            .push(items.iter().map(|x| **x).collect());
        if items.iter().any(|x| **x == u32::MAX) {
            return Err(BackendError::internal("bad item"));
        }
        Ok(items.iter().map(|x| **x * 2).collect())
    }
}

struct Harness {
    batcher: Batcher<Doubler>,
    passes: Arc<Mutex<Vec<Vec<u32>>>>,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Harness {
    fn new(max_batch: usize, open: bool) -> Self {
        let passes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new((Mutex::new(open), std::sync::Condvar::new()));
        let model = Doubler {
            passes: passes.clone(),
            gate: gate.clone(),
        };
        let config = BatchConfig {
            max_batch,
            max_wait: Duration::from_millis(2),
            threads: 1,
        };
        Harness {
            batcher: Batcher::start(model, config, "test-batcher").unwrap(),
            passes,
            gate,
        }
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }

    fn passes(&self) -> Vec<Vec<u32>> {
        self.passes.lock().unwrap().clone()
    }
}

/// Waits (bounded) until the first pass is running, i.e. blocked on the gate.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn queued_requests_share_one_pass_and_get_their_own_answers() {
    let h = Harness::new(32, false);
    let first = tokio::spawn(h.batcher.submit(vec![1]));
    settle().await;
    // These queue while the first pass is held.
    let rest: Vec<_> = (0..5)
        .map(|i| tokio::spawn(h.batcher.submit(vec![10 * (i + 1), 10 * (i + 1) + 1])))
        .collect();
    settle().await;
    h.open();
    assert_eq!(first.await.unwrap().unwrap(), vec![2]);
    for (i, r) in rest.into_iter().enumerate() {
        let base = 10 * (i as u32 + 1);
        assert_eq!(r.await.unwrap().unwrap(), vec![2 * base, 2 * base + 2]);
    }
    let passes = h.passes();
    assert_eq!(passes.len(), 2, "{passes:?}");
    assert_eq!(passes[0], vec![1]);
    // Round-robin: the first item of each request, then the second of each.
    assert_eq!(passes[1], vec![10, 20, 30, 40, 50, 11, 21, 31, 41, 51]);
}

#[tokio::test]
async fn a_big_request_does_not_starve_small_ones() {
    let h = Harness::new(4, false);
    let big = tokio::spawn(h.batcher.submit((100..110).collect()));
    settle().await;
    let small = tokio::spawn(h.batcher.submit(vec![7]));
    settle().await;
    h.open();
    assert_eq!(
        big.await.unwrap().unwrap(),
        (100..110).map(|x| 2 * x).collect::<Vec<_>>()
    );
    assert_eq!(small.await.unwrap().unwrap(), vec![14]);
    let passes = h.passes();
    assert!(passes.iter().all(|p| p.len() <= 4), "{passes:?}");
    assert_eq!(passes[0], vec![100, 101, 102, 103]);
    // The small request rides in the next pass, not after the whole big one.
    assert_eq!(passes[1], vec![104, 7, 105, 106]);
    assert_eq!(passes.concat().len(), 11);
}

#[tokio::test]
async fn a_failing_pass_fails_only_its_requests_and_withdrawn_ones_are_skipped() {
    let h = Harness::new(2, false);
    let first = tokio::spawn(h.batcher.submit(vec![1]));
    settle().await;
    let bad = tokio::spawn(h.batcher.submit(vec![u32::MAX]));
    let also_in_bad_pass = tokio::spawn(h.batcher.submit(vec![3]));
    let withdrawn = h.batcher.submit(vec![5, 6]);
    let later = tokio::spawn(h.batcher.submit(vec![8]));
    settle().await;
    drop(withdrawn);
    h.open();
    assert_eq!(first.await.unwrap().unwrap(), vec![2]);
    assert!(bad.await.unwrap().is_err());
    assert!(also_in_bad_pass.await.unwrap().is_err());
    assert_eq!(later.await.unwrap().unwrap(), vec![16]);
    let passes = h.passes();
    assert_eq!(passes, vec![vec![1], vec![u32::MAX, 3], vec![8]]);
}

#[tokio::test]
async fn empty_requests_and_a_stopped_model() {
    let h = Harness::new(8, true);
    assert!(h.batcher.submit(Vec::new()).await.unwrap().is_empty());
    assert_eq!(h.batcher.submit(vec![4]).await.unwrap(), vec![8]);
    let pending = h.batcher.submit(vec![9]);
    drop(h.batcher);
    // The thread serves what was queued before it goes.
    assert_eq!(pending.await.unwrap(), vec![18]);
}

#[tokio::test]
async fn lanes_take_requests_by_their_outstanding_items() {
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let logs: Vec<Arc<Mutex<Vec<Vec<u32>>>>> = (0..2).map(|_| Arc::default()).collect();
    let config = BatchConfig {
        max_batch: 32,
        max_wait: Duration::ZERO,
        threads: 2,
    };
    let mut made = logs.iter();
    let lanes = Lanes::start(config, "test-lanes", || {
        Ok(Doubler {
            passes: made.next().expect("two lanes").clone(),
            gate: gate.clone(),
        })
    })
    .unwrap();
    let count = |i: usize| lanes.lanes[i].1.load(Ordering::Relaxed);
    // A → lane 0 (both empty: the first), B → lane 1, C (3 items) → lane 0 (1 each: the
    // first), D → lane 1 (4 against 1).
    let a = tokio::spawn(lanes.submit(vec![1]));
    let b = tokio::spawn(lanes.submit(vec![2]));
    let c = tokio::spawn(lanes.submit(vec![3, 4, 5]));
    let d = tokio::spawn(lanes.submit(vec![6]));
    settle().await;
    assert_eq!((count(0), count(1)), (4, 2));
    // A request withdrawn before it ran gives its count back.
    drop(lanes.submit(vec![7, 8, 9]));
    assert_eq!((count(0), count(1)), (4, 2));
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    assert_eq!(a.await.unwrap().unwrap(), vec![2]);
    assert_eq!(b.await.unwrap().unwrap(), vec![4]);
    assert_eq!(c.await.unwrap().unwrap(), vec![6, 8, 10]);
    assert_eq!(d.await.unwrap().unwrap(), vec![12]);
    assert_eq!(
        (count(0), count(1)),
        (0, 0),
        "answered requests are not outstanding"
    );
    let items = |i: usize| -> Vec<u32> { logs[i].lock().unwrap().concat() };
    assert_eq!((items(0), items(1)), (vec![1, 3, 4, 5], vec![2, 6]));
    // Idle again: a lone client is served by lane 0.
    assert_eq!(lanes.submit(vec![10]).await.unwrap(), vec![20]);
    assert_eq!(items(0), vec![1, 3, 4, 5, 10]);
    // A request of SPLIT_ITEMS per lane is cut in two, one part per lane, answered in order;
    // one item less is not.
    let big: Vec<u32> = (100..100 + 2 * SPLIT_ITEMS as u32).collect();
    let doubled: Vec<u32> = big.iter().map(|x| 2 * x).collect();
    assert_eq!(lanes.submit(big.clone()).await.unwrap(), doubled);
    assert_eq!(items(0)[5..], big[..SPLIT_ITEMS]);
    assert_eq!(items(1)[2..], big[SPLIT_ITEMS..]);
    let smaller: Vec<u32> = (200..200 + 2 * SPLIT_ITEMS as u32 - 1).collect();
    lanes.submit(smaller.clone()).await.unwrap();
    assert_eq!(items(0)[5 + SPLIT_ITEMS..], smaller[..]);
    assert_eq!(lanes.submit(Vec::new()).await.unwrap(), Vec::<u32>::new());
}

#[test]
fn lanes_start_at_least_one_and_report_a_failed_model() {
    let config = BatchConfig {
        threads: 0,
        ..BatchConfig::default()
    };
    let mut made = 0;
    let lanes = Lanes::<Doubler>::start(config, "one", || {
        made += 1;
        Ok(Doubler {
            passes: Arc::default(),
            gate: Arc::new((Mutex::new(true), std::sync::Condvar::new())),
        })
    })
    .unwrap();
    assert_eq!((lanes.lanes.len(), made), (1, 1));
    let err = Lanes::<Doubler>::start(BatchConfig::default(), "none", || {
        Err(BackendError::internal("cannot load"))
    });
    assert!(err.is_err());
    assert!((1..=BatchConfig::MAX_DEFAULT_THREADS).contains(&BatchConfig::default().threads));
}
